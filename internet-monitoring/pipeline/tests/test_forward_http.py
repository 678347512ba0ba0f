"""The remote-write forwarder over real sockets and a real SQLite store: what the receiver
gets (headers, basic auth from a file, client certificate over TLS, labels, timestamps),
a permanently rejected sample counted and passed, retries until the receiver answers, and
a restart resuming after the durable cursor without sending saved events again."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import ssl
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import cramjam
import pytest
import trustme
from aiohttp import web
from prometheus_client import CollectorRegistry

from pipeline.common import remote_write as rw
from pipeline.common.config import StoreConfig, server_config_from_dict
from pipeline.server.forward.forwarder import SINK, Forwarder
from pipeline.server.store import ENGINES, ChunkStore, open_store
from pipeline.tests.pg_support import drop_schema, fresh_dsn
from pipeline.tests.server_support import eventually
from pipeline.tests.store_support import make_chunks

SENSOR = "pi-01"
ENGINE_PARAMS = [pytest.param(e, marks=pytest.mark.postgres) if e == "postgres" else e
                 for e in ENGINES]


@pytest.fixture(params=ENGINE_PARAMS)
def store_config(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreConfig]:
    """The forwarder reads through the store port: both engines."""
    if request.param == "postgres":
        dsn, schema = fresh_dsn("forward")
        try:
            yield StoreConfig(engine="postgres", dsn=dsn, reserve_bytes=0)
        finally:
            drop_schema(schema)
        return
    yield StoreConfig(path=str(tmp_path / "server.db"), reserve_bytes=0)


class Receiver:
    """A remote-write receiver that records every request and answers from a script."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []      # answered in turn; then 204
        self.refuse_value: float | None = None  # 400 for any request holding this value

    async def handle(self, request: web.Request) -> web.Response:
        raw = bytes(cramjam.snappy.decompress_raw(await request.read()))
        series = rw.series_of(rw.parse(raw))
        self.requests.append({"headers": dict(request.headers), "series": series,
                              "peercert": request.transport.get_extra_info("peercert")
                              if request.transport else None})
        if self.statuses:
            return web.Response(status=self.statuses.pop(0), text="scripted")
        values = [v for s in series for _, v in s.samples]
        if self.refuse_value is not None and self.refuse_value in values:
            return web.Response(status=400, text="out of bounds")
        return web.Response(status=204)

    def samples(self) -> list[tuple[int, float]]:
        return [s for r in self.requests for one in r["series"] for s in one.samples]


@pytest.fixture
async def receiver_site(tmp_path: Path) -> AsyncIterator[tuple[Receiver, int, dict[str, Path]]]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("cloud.example")
    client_cert = ca.issue_cert("pipeline-server")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "client.crt",
             "key": tmp_path / "client.key"}
    ca.cert_pem.write_to_path(files["ca"])
    client_cert.cert_chain_pems[0].write_to_path(files["cert"])
    client_cert.private_key_pem.write_to_path(files["key"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/api/v1/write", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield receiver, port, files
    await runner.cleanup()


def rw_chunks(seq: int, samples: list[tuple[int, float]], sensor_label: str | None = None
              ) -> list[Any]:
    labels: tuple[tuple[str, str], ...] = (("__name__", "probe_success"),
                                           ("instance", "https://example.org"))
    if sensor_label is not None:
        labels += (("sensor", sensor_label),)
    data = rw.build([rw.Series(labels, tuple(samples))]).SerializeToString()
    return [dataclasses.replace(c, attributes={**c.attributes,
                                               rw.CONTENT_TYPE_ATTRIBUTE: rw.EVENT_CONTENT_TYPE})
            for c in make_chunks(data, seq)]


def forward_config(port: int, files: dict[str, Path], password_file: Path) -> Any:
    return server_config_from_dict({"forward": {"remote_write": {
        "url": f"https://127.0.0.1:{port}/api/v1/write",
        "headers": {"X-Scope-OrgID": "openuxi"},
        "tls": {"ca_file": str(files["ca"]), "cert_file": str(files["cert"]),
                "key_file": str(files["key"]), "server_name": "cloud.example"},
        "basic_auth": {"username": "pipeline", "password_file": str(password_file)},
        "min_backoff_s": 0.01, "max_backoff_s": 0.05, "poll_interval_s": 0.05,
        "samples_per_send": 4}}}).forward.remote_write


async def test_forwards_with_tls_auth_headers_and_the_sensor_label(
        tmp_path: Path, receiver_site: tuple[Receiver, int, dict[str, Path]],
        store_config: StoreConfig) -> None:
    receiver, port, files = receiver_site
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    store: ChunkStore = open_store(store_config)
    store.ingest(rw_chunks(1, [(1000, 1.0), (2000, 0.0)], sensor_label="forged-id"))
    store.ingest(make_chunks(b'{"json": "not forwarded"}', 2))
    store.ingest(rw_chunks(3, [(3000, 1.0)]))
    registry = CollectorRegistry()
    forwarder = Forwarder(store, forward_config(port, files, secret), registry)
    await forwarder.start()
    try:
        await eventually(lambda: len(receiver.samples()) == 3, what="three samples")
        await eventually(lambda: store.forward_cursors(SINK).get(SENSOR, 0) > 0
                         and store.events_after_count(
                             SENSOR, store.forward_cursors(SINK)[SENSOR]) == 0,
                         what="cursor at the end")
    finally:
        await forwarder.stop()
        store.close()
    assert receiver.samples() == [(1000, 1.0), (2000, 0.0), (3000, 1.0)]
    first = receiver.requests[0]
    headers = first["headers"]
    assert headers["X-Scope-OrgID"] == "openuxi"
    assert headers["Content-Encoding"] == "snappy"
    assert headers["X-Prometheus-Remote-Write-Version"] == "0.1.0"
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"pipeline:s3cret").decode()
    assert first["peercert"] is not None  # the client certificate was presented
    assert dict(first["series"][0].labels) == {
        "__name__": "probe_success", "instance": "https://example.org", "sensor": SENSOR,
        "exported_sensor": "forged-id"}
    assert registry.get_sample_value("pipeline_forward_samples_sent_total",
                                     {"sensor_id": SENSOR}) == 3
    assert registry.get_sample_value("pipeline_forward_backlog_events",
                                     {"sensor_id": SENSOR}) == 0


async def test_rejected_sample_is_counted_retries_wait_and_restart_resumes(
        tmp_path: Path, receiver_site: tuple[Receiver, int, dict[str, Path]],
        store_config: StoreConfig) -> None:
    receiver, port, files = receiver_site
    secret = tmp_path / "password"
    secret.write_text("pw")
    config = forward_config(port, files, secret)
    store: ChunkStore = open_store(store_config)
    store.ingest(rw_chunks(1, [(t * 1000, float(t)) for t in range(1, 7)]))  # 6 samples
    receiver.refuse_value = 4.0
    receiver.statuses = [503, 500, 429]  # three retryable answers first
    registry = CollectorRegistry()
    forwarder = Forwarder(store, config, registry)
    await forwarder.start()
    try:
        await eventually(lambda: registry.get_sample_value(
            "pipeline_forward_samples_failed_total", {"sensor_id": SENSOR}) == 1,
            what="one failed sample")
        await eventually(lambda: store.events_after_count(
            SENSOR, store.forward_cursors(SINK).get(SENSOR, 0)) == 0, what="cursor saved")
    finally:
        await forwarder.stop()
    accepted = [s for r in receiver.requests if 4.0 not in
                [v for one in r["series"] for _, v in one.samples] for one in r["series"]
                for s in one.samples]
    assert sorted(set(accepted)) == [(t * 1000, float(t)) for t in (1, 2, 3, 5, 6)]
    assert registry.get_sample_value("pipeline_forward_retries_total",
                                     {"sensor_id": SENSOR}) == 3
    # A restart: only what was committed after the saved cursor is sent.
    sent_before = len(receiver.requests)
    store.ingest(rw_chunks(2, [(7000, 7.0)]))
    again = Forwarder(store, config, CollectorRegistry())
    await again.start()
    try:
        await eventually(lambda: len(receiver.requests) > sent_before, what="a new send")
        await asyncio.sleep(0.3)
    finally:
        await again.stop()
        store.close()
    new = [s for r in receiver.requests[sent_before:] for one in r["series"]
           for s in one.samples]
    assert new == [(7000, 7.0)]
