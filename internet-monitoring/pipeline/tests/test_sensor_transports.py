"""The sensor's transports over real sockets: TLS (CA pinning, client certificates,
skip_verify), handshake refusals, HTTP answers, network failures and ping timeouts."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import trustme
from aiohttp import web

from pipeline.common.config import SensorConfig, sensor_config_from_dict
from pipeline.common.errors import Forbidden, Unauthenticated
from pipeline.common.messages import (
    Chunk,
    ChunkAck,
    Envelope,
    Heartbeat,
    IngestResult,
    decode_chunk,
    decode_envelope,
    encode_envelope,
    ingest_result_to_json,
)
from pipeline.common.chunking import split_event
from pipeline.sensor.transports import (
    ControlClient,
    IngestClient,
    control_endpoint,
    ingest_endpoint,
    parse_retry_after,
)

SENSOR_ID = "pi-01"
TOKEN = "tok-abc"


class TinyServer:
    """Control WS answering each heartbeat with an ack, and a chunk endpoint; records
    headers and the client certificate it saw."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *,
                 answer_pings: bool = True) -> None:
        self.ssl_context = ssl_context
        self.answer_pings = answer_pings
        self.ingest_answer: tuple[int, bytes, dict[str, str]] | None = None
        self.ingest_delay = 0.0
        self.seen_headers: list[dict[str, str]] = []
        self.peer_certs: list[Any] = []
        self.chunks: list[Chunk] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    def url(self, scheme: str, path: str) -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/control", self._control)
        app.router.add_post("/v1/ingest/chunk", self._ingest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _record(self, request: web.Request) -> None:
        self.seen_headers.append(dict(request.headers))
        transport = request.transport
        self.peer_certs.append(transport.get_extra_info("peercert") if transport else None)

    async def _control(self, request: web.Request) -> web.StreamResponse:
        self._record(request)
        auth = request.headers.get("Authorization")
        if auth == "Bearer forbidden":
            return web.json_response({"error": "forbidden"}, status=403)
        if request.headers.get("X-Sensor-ID") != SENSOR_ID or auth != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthenticated"}, status=401)
        ws = web.WebSocketResponse(autoping=self.answer_pings)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                env = decode_envelope(msg.data)
                reply = Envelope(sensor_id=SENSOR_ID, sent_at=env.sent_at,
                                 body=ChunkAck(window_id="echo", committed_sequences=(7,)))
                await ws.send_str(encode_envelope(reply))
        return ws

    async def _ingest(self, request: web.Request) -> web.Response:
        self._record(request)
        if self.ingest_delay:
            await asyncio.sleep(self.ingest_delay)
        if self.ingest_answer is not None:
            status, body, headers = self.ingest_answer
            return web.Response(status=status, body=body, headers=headers,
                                content_type="application/json")
        chunk = decode_chunk(await request.read())
        self.chunks.append(chunk)
        result = IngestResult(stored=True, duplicate=False, sequence=chunk.sequence,
                              event_id=chunk.event_id, sensor_id=chunk.sensor_id,
                              event_complete=True, last_committed_sequence=chunk.sequence)
        return web.json_response(ingest_result_to_json(result))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def pki(ca: trustme.CA, tmp_path: Path) -> dict[str, Any]:
    """Server certificate for 127.0.0.1, a client certificate, and their files."""
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert(f"{SENSOR_ID}.sensors.example")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "client.pem",
             "key": tmp_path / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client_cert.private_key_pem.write_to_path(str(files["key"]))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_ctx)
    return {"files": files, "server_ctx": server_ctx, "ca": ca}


async def start(server: TinyServer) -> TinyServer:
    await server.start()
    return server


@pytest.fixture
async def plain() -> AsyncIterator[TinyServer]:
    srv = await start(TinyServer())
    yield srv
    await srv.close()


def sensor_config(control_url: str, ingest_url: str, *, tls: dict[str, Any] | None = None,
                  token: str = TOKEN, ping: float = 20.0) -> SensorConfig:
    section_tls = tls or {}
    return sensor_config_from_dict({
        "sensor_id": SENSOR_ID, "token": token, "queue": {"path": "unused.db"},
        "control": {"url": control_url, "headers": {"X-Site": "lab-3"}, "tls": section_tls,
                    "ping_interval": ping, "ping_timeout": ping},
        "ingest": {"url": ingest_url, "headers": {"X-Site": "lab-3"}, "tls": section_tls,
                   "timeout": 0.5},
    })


def heartbeat() -> Envelope:
    return Envelope(sensor_id=SENSOR_ID, sent_at="2026-11-27T05:00:00+00:00",
                    body=Heartbeat(software_version="t", last_committed_sequence=0,
                                   queue_depth=1, clock_skew_ms=0.0))


def a_chunk(sequence: int = 1) -> Chunk:
    split = split_event(b"hello world" * 10)
    piece = split.pieces[0]
    return Chunk(sensor_id=SENSOR_ID, event_id=split.event_id, sequence=sequence,
                 chunk_index=0, chunk_count=1, payload=piece.payload,
                 chunk_sha256=piece.chunk_sha256, event_sha256=split.event_sha256,
                 created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=1,
                 attributes={"window_id": "w1"})


# ---------------------------------------------------------------------------------------
# TLS


async def test_mutual_tls_with_pinned_ca_on_both_channels(pki):
    server_ctx = pki["server_ctx"]
    pki["ca"].configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED  # client certificate is mandatory
    srv = await start(TinyServer(server_ctx))
    files = pki["files"]
    config = sensor_config(srv.url("wss", "/control"), srv.url("https", "/v1/ingest/chunk"),
                           tls={"enabled": True, "ca_cert": str(files["ca"]),
                                "cert": str(files["cert"]), "key": str(files["key"])})
    control = ControlClient.from_config(config)
    ingest = IngestClient.from_config(config)
    try:
        channel = await control.connect()
        await channel.send(heartbeat())
        reply = await asyncio.wait_for(channel.receive(), 5)
        assert reply is not None and isinstance(reply.body, ChunkAck)
        await channel.close()
        answer = await ingest.post_chunk(a_chunk(3))
        assert answer.status == 200 and answer.result is not None
        assert answer.result.sequence == 3 and answer.result.stored
        assert srv.chunks[0].payload == a_chunk().payload
        # Both channels presented the client certificate.
        assert len(srv.peer_certs) == 2
        for cert in srv.peer_certs:
            assert ("DNS", f"{SENSOR_ID}.sensors.example") in cert["subjectAltName"]
        for headers in srv.seen_headers:
            assert headers["X-Site"] == "lab-3"
            assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert srv.seen_headers[0]["X-Sensor-ID"] == SENSOR_ID
    finally:
        await control.close()
        await ingest.close()
        await srv.close()


async def test_unknown_ca_is_refused_and_skip_verify_warns(pki, caplog):
    srv = await start(TinyServer(pki["server_ctx"]))
    try:
        config = sensor_config(srv.url("wss", "/control"), srv.url("https", "/x"),
                               tls={"enabled": True})
        control = ControlClient.from_config(config)
        ingest = IngestClient.from_config(config)
        with pytest.raises(ConnectionError):
            await control.connect()
        with pytest.raises(ConnectionError):
            await ingest.post_chunk(a_chunk())
        await control.close()
        await ingest.close()
        assert srv.chunks == []

        skip = sensor_config(srv.url("wss", "/control"), srv.url("https", "/v1/ingest/chunk"),
                             tls={"enabled": True, "skip_verify": True})
        with caplog.at_level(logging.WARNING, logger="pipeline.sensor.transports"):
            control = ControlClient.from_config(skip)
            ingest = IngestClient.from_config(skip)
        warnings = [r for r in caplog.records
                    if r.getMessage().startswith("tls_verification_disabled")]
        assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
        channel = await control.connect()
        await channel.close()
        assert (await ingest.post_chunk(a_chunk())).status == 200
        await control.close()
        await ingest.close()
    finally:
        await srv.close()


# ---------------------------------------------------------------------------------------
# Handshake and HTTP answers


async def test_handshake_refusals_map_to_auth_errors(plain):
    url = plain.url("ws", "/control")
    wrong = ControlClient.from_config(sensor_config(url, plain.url("http", "/"), token="nope"))
    banned = ControlClient.from_config(
        sensor_config(url, plain.url("http", "/"), token="forbidden"))
    try:
        with pytest.raises(Unauthenticated):
            await wrong.connect()
        with pytest.raises(Forbidden):
            await banned.connect()
    finally:
        await wrong.close()
        await banned.close()


async def test_token_file_is_read_at_each_connect(plain, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("stale\n")
    config = sensor_config_from_dict({
        "sensor_id": SENSOR_ID, "token_file": str(token_file), "queue": {"path": "q.db"},
        "control": {"url": plain.url("ws", "/control")}})
    client = ControlClient.from_config(config)
    try:
        with pytest.raises(Unauthenticated):
            await client.connect()
        token_file.write_text(TOKEN + "\n")  # rotated by an operator, no restart
        channel = await client.connect()
        await channel.close()
    finally:
        await client.close()


async def test_ingest_answers_are_reported_not_raised(plain):
    client = IngestClient(url=plain.url("http", ""), token=TOKEN, timeout=0.5)
    try:
        plain.ingest_answer = (429, b'{"error": "throttled", "message": "slow down"}',
                               {"Retry-After": "7"})
        answer = await client.post_chunk(a_chunk())
        assert (answer.status, answer.error_code, answer.retry_after) == (429, "throttled", 7.0)
        assert not answer.ok

        plain.ingest_answer = (422, b"<html>not json</html>", {})
        answer = await client.post_chunk(a_chunk())
        assert (answer.status, answer.error, answer.error_code) == (422, None, "")

        plain.ingest_answer = (200, b'{"stored": true}', {})  # 200 without the 1.0 fields
        answer = await client.post_chunk(a_chunk())
        assert answer.ok and answer.result is None

        plain.ingest_answer = None
        plain.ingest_delay = 1.0
        with pytest.raises(TimeoutError):
            await client.post_chunk(a_chunk())
        # The bare base URL got the 1.0 path.
        assert client.url.endswith("/v1/ingest/chunk")
    finally:
        await client.close()


async def test_refused_connection_raises_connection_error():
    srv = await start(TinyServer())
    port = srv.port
    await srv.close()
    client = IngestClient(url=f"http://127.0.0.1:{port}/v1/ingest/chunk", token=TOKEN)
    control = ControlClient(url=f"ws://127.0.0.1:{port}/control", sensor_id=SENSOR_ID,
                            token=TOKEN)
    try:
        with pytest.raises(ConnectionError):
            await client.post_chunk(a_chunk())
        with pytest.raises(ConnectionError):
            await control.connect()
    finally:
        await client.close()
        await control.close()


# ---------------------------------------------------------------------------------------
# Ping / ping_timeout


@pytest.mark.parametrize("answer_pings", [True, False])
async def test_ping_timeout_closes_a_silent_connection(answer_pings):
    srv = await start(TinyServer(answer_pings=answer_pings))
    client = ControlClient(url=srv.url("ws", "/control"), sensor_id=SENSOR_ID, token=TOKEN,
                           ping_interval=0.1, ping_timeout=0.2)
    try:
        channel = await client.connect()
        try:
            result = await asyncio.wait_for(channel.receive(), timeout=1.0)
        except TimeoutError:
            result = "still open"
        if answer_pings:
            assert result == "still open" and not channel.closed
        else:
            assert result is None and channel.closed
            assert channel.close_code == 1011
        await channel.close()
    finally:
        await client.close()
        await srv.close()


# ---------------------------------------------------------------------------------------
# Small pure helpers


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("999999") == 3600.0
    assert parse_retry_after("Fri, 27 Nov 2026 05:00:30 GMT", now=1795755600.0) == 30.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_endpoint_defaults():
    assert ingest_endpoint("http://h:8081") == "http://h:8081/v1/ingest/chunk"
    assert ingest_endpoint("http://h:8081/") == "http://h:8081/v1/ingest/chunk"
    assert ingest_endpoint("https://h/custom/path") == "https://h/custom/path"
    assert control_endpoint("ws://h:8765") == "ws://h:8765/control"
    assert control_endpoint("wss://h/ctl") == "wss://h/ctl"
