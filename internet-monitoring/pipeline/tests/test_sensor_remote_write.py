"""The sensor's remote-write receiver over real HTTP into a real queue file: what it
accepts (204 only once committed), what it refuses (400/413 with the reason, nothing
queued, still serving), a full queue (503 + Retry-After, nothing lost) and group commit."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import aiohttp
import pytest

from pipeline.common import remote_write as rw
from pipeline.common.config import sensor_config_from_dict
from pipeline.common.errors import ConfigError, QueueFull
from pipeline.sensor.queue import DurableQueue, EnqueuedEvent, EventInput
from pipeline.sensor.remote_write_server import RemoteWriteServer
from pipeline.sensor.sources import SensorSources
from pipeline.tests.remote_write_support import (
    HEADERS,
    T0,
    all_series,
    body,
    post,
    queued_writes,
    request_of,
    series,
    sources_for,
)


class CountingQueue(DurableQueue):
    """The real queue, counting its write transactions."""

    transactions = 0

    def enqueue_many(self, events: Sequence[EventInput]) -> list[EnqueuedEvent]:
        out = super().enqueue_many(events)
        self.transactions += 1
        return out

    def enqueue(self, data: bytes, **kwargs: Any) -> EnqueuedEvent:
        out = super().enqueue(data, **kwargs)
        self.transactions += 1
        return out


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[CountingQueue]:
    q = CountingQueue(tmp_path / "queue.db")
    yield q
    q.close()


async def _started(sources: SensorSources) -> tuple[SensorSources, str]:
    await sources.start()
    return sources, f"http://127.0.0.1:{sources.remote_write_port}/api/v1/write"


async def test_accepted_request_is_in_the_queue_with_labels_and_timestamps_exact(
        queue: CountingQueue, tmp_path: Path) -> None:
    stale = rw.Series((("__name__", "wifi_signal_dbm"), ("job", "wifi"), ("ssid", "Café ☕")),
                      ((T0 + 1, -61.25), (T0 + 2, math.nan), (-5, 1e308)))
    sources, url = await _started(sources_for(queue, tmp_path))
    try:
        async with aiohttp.ClientSession() as session:
            status, _, text = await post(session, url, body(series(7, 3), stale))
    finally:
        await sources.close()
    assert (status, text) == (204, "")
    [write] = queued_writes(queue)
    assert write.attributes == {rw.CONTENT_TYPE_ATTRIBUTE: rw.EVENT_CONTENT_TYPE,
                                "source": "remote_write"}
    got = write.series
    assert got[0] == series(7, 3)
    assert got[1].labels == stale.labels
    assert [t for t, _ in got[1].samples] == [T0 + 1, T0 + 2, -5]
    assert got[1].samples[0][1] == -61.25 and math.isnan(got[1].samples[1][1])
    assert got[1].samples[2][1] == 1e308
    assert sources.receiver is not None and sources.receiver.samples == 6


BAD = [
    ("wrong content type", body(series(1)), {**HEADERS, "Content-Type": "application/json"},
     "Content-Type must be application/x-protobuf"),
    ("gzip not snappy", body(series(1)), {**HEADERS, "Content-Encoding": "gzip"},
     "Content-Encoding must be snappy"),
    ("remote write 2.0", body(series(1)),
     {**HEADERS, "Content-Type": "application/x-protobuf;proto=io.prometheus.write.v2.Request"},
     "only remote write 1.0"),
    ("truncated", body(*(series(i, 20) for i in range(20)))[:-40], HEADERS, "snappy"),
    ("not snappy", b"\x05hello world", HEADERS, "snappy"),
    ("empty", b"", HEADERS, "empty body"),
    ("not a WriteRequest", rw.encode(rw.build([])) [:1] + b"\x0a\x05\x0a\x03\x0a\x01", HEADERS,
     ""),
    ("no __name__", body(rw.Series((("job", "x"),), ((T0, 1.0),))), HEADERS, "no __name__"),
    ("empty __name__", body(rw.Series((("__name__", ""), ("job", "x")), ((T0, 1.0),))),
     HEADERS, "the __name__ label is empty"),
]


async def test_malformed_bodies_get_400_with_the_reason_and_nothing_is_queued(
        queue: CountingQueue, tmp_path: Path) -> None:
    sources, url = await _started(sources_for(queue, tmp_path))
    try:
        async with aiohttp.ClientSession() as session:
            for what, data, headers, reason in BAD:
                status, _, text = await post(session, url, data, headers)
                assert status == 400, what
                assert '"bad_remote_write"' in text and reason in text, (what, text)
            # Still serving: a good request right after goes through.
            status, _, _ = await post(session, url, body(series(99)))
    finally:
        await sources.close()
    assert status == 204
    assert all_series(queue) == [series(99)]
    assert sources.receiver is not None
    assert sources.receiver.outcomes["malformed"] == len(BAD)


async def test_oversized_bodies_get_413_and_nothing_is_queued(
        queue: CountingQueue, tmp_path: Path) -> None:
    big = body(*(series(i, 200) for i in range(400)))  # ~1.3 MB decompressed
    assert len(big) > 65_536
    small_body_cap = sources_for(queue, tmp_path, max_body_bytes=65_536,
                                 max_decompressed_bytes=1 << 30)
    sources, url = await _started(small_body_cap)
    try:
        async with aiohttp.ClientSession() as session:
            status, _, text = await post(session, url, big)
            assert status == 413 and "max_body_bytes" in text, text

            async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: cap while reading
                for start in range(0, len(big), 8192):
                    yield big[start:start + 8192]

            async with session.post(url, data=chunked(), headers=HEADERS) as response:
                assert response.status == 413
                assert "max_body_bytes" in await response.text()
            status, _, _ = await post(session, url, body(series(1)))
            assert status == 204
    finally:
        await sources.close()
    decompressed_cap = sources_for(queue, tmp_path, max_decompressed_bytes=100_000)
    sources, url = await _started(decompressed_cap)
    try:
        async with aiohttp.ClientSession() as session:
            status, _, text = await post(session, url, big)
            assert status == 413 and "over the limit of 100000" in text, text
            status, _, _ = await post(session, url, body(series(2)))
            assert status == 204
    finally:
        await sources.close()
    assert all_series(queue) == [series(1), series(2)]


async def test_full_queue_answers_503_with_retry_after_and_loses_nothing(tmp_path: Path
                                                                         ) -> None:
    # A queue file capped by max_pages: SQLite reports a full disk, the queue QueueFull.
    queue = DurableQueue(tmp_path / "queue.db", max_pages=64, reserve_bytes=0)
    fillers: list[EnqueuedEvent] = []
    try:
        while True:
            fillers.append(queue.enqueue(bytes(range(256)) * 40 + len(fillers).to_bytes(4)))
    except QueueFull:
        pass
    sources, url = await _started(sources_for(queue, tmp_path, retry_after_s=7))
    data = request_of(1, samples=500)
    try:
        async with aiohttp.ClientSession() as session:
            status, headers, text = await post(session, url, data)
            assert status == 503 and headers["Retry-After"] == "7", text
            assert "queue_full" in text
            assert not [w for w in queued_writes(queue) if w.attributes.get("source")]
            # The sender retries after room was made (the agent delivered its backlog).
            queue.delete([s for event in fillers for s in event.sequences])
            status, _, _ = await post(session, url, data)
            assert status == 204
    finally:
        await sources.close()
    [write] = queued_writes(queue)
    assert write.series == _series_in(data)
    assert sources.receiver is not None and sources.receiver.outcomes["unavailable"] == 1
    queue.close()


async def test_concurrent_requests_share_one_queue_transaction(
        queue: CountingQueue, tmp_path: Path) -> None:
    sources, url = await _started(sources_for(queue, tmp_path, batch_delay_ms=50))
    requests = [request_of(i, samples=100) for i in range(40)]
    try:
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(post(session, url, r) for r in requests))
    finally:
        await sources.close()
    assert [a[0] for a in answers] == [204] * 40
    # 40 requests, each durable on its own answer, in a handful of transactions.
    assert 1 <= queue.transactions <= 4, queue.transactions
    assert sources.committer.commits == queue.transactions
    expected = [one for r in requests for one in _series_in(r)]
    assert sorted(all_series(queue), key=repr) == sorted(expected, key=repr)


async def test_a_batch_is_cut_into_events_by_batch_max_bytes(
        queue: CountingQueue, tmp_path: Path) -> None:
    sources, url = await _started(sources_for(queue, tmp_path, batch_delay_ms=50,
                                              batch_max_bytes=65_536))
    requests = [request_of(i, samples=500) for i in range(12)]  # ~30 KB raw each
    try:
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(post(session, url, r) for r in requests))
    finally:
        await sources.close()
    assert [a[0] for a in answers] == [204] * 12
    writes = queued_writes(queue)
    assert 1 < len(writes) < 12
    assert all(len(w.data) <= 65_536 for w in writes)
    assert sum(len(w.series) for w in writes) == 12 * 50


def test_listen_that_is_not_loopback_is_refused_naming_the_key() -> None:
    doc = {"sensor_id": "pi-rw-01", "token": "t" * 32,
           "sources": {"remote_write": {"listen": "0.0.0.0:9201"}}}
    with pytest.raises(ConfigError) as caught:
        sensor_config_from_dict(doc)
    assert caught.value.field == "sources.remote_write.listen"
    assert "allow_remote" in caught.value.message
    doc["sources"]["remote_write"]["allow_remote"] = True  # type: ignore[index]
    assert sensor_config_from_dict(doc).sources.remote_write.listen == "0.0.0.0:9201"
    for listen in ("127.0.0.1:9201", "[::1]:9201", "localhost:9201"):
        config = sensor_config_from_dict(
            {**doc, "sources": {"remote_write": {"listen": listen}}})
        assert config.sources.remote_write.listen == listen


async def test_receiver_refuses_a_remote_listen_at_start_up(queue: CountingQueue) -> None:
    from pipeline.sensor.group_commit import GroupCommitter

    committer = GroupCommitter(queue, max_event_bytes=1 << 20, delay_s=0)
    server = RemoteWriteServer(_unchecked("192.0.2.1:0"), committer)
    with pytest.raises(ConfigError) as caught:
        await server.start()
    assert caught.value.field == "sources.remote_write.listen"


def _series_in(data: bytes) -> list[rw.Series]:
    return rw.series_of(rw.parse(rw.decode(data, content_type=rw.HTTP_CONTENT_TYPE,
                                           content_encoding="snappy", max_bytes=1 << 30).raw))


def _unchecked(listen: str) -> Any:
    """Settings built without validate(), as a caller bypassing the loader would."""
    from pipeline.common.config.sources_schema import RemoteWriteSourceConfig

    return RemoteWriteSourceConfig(listen=listen)


async def test_a_request_without_series_is_answered_and_queues_nothing(
        queue: CountingQueue, tmp_path: Path) -> None:
    from pipeline.proto.remote_write_pb2 import WriteRequest

    metadata_only = WriteRequest()
    metadata_only.metadata.add(metric_family_name="probe_success", help="1 if it worked")
    sources, url = await _started(sources_for(queue, tmp_path))
    try:
        async with aiohttp.ClientSession() as session:
            status, _, _ = await post(session, url, rw.encode(metadata_only))
    finally:
        await sources.close()
    assert status == 204
    assert queued_writes(queue) == [] and queue.transactions == 0


async def test_metrics_count_requests_by_outcome_samples_and_commits(
        queue: CountingQueue, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    config = sensor_config_from_dict({
        "sensor_id": "pi-rw-01", "token": "t" * 32, "queue": {"path": str(tmp_path / "q.db")},
        "sources": {"remote_write": {"listen": "127.0.0.1:0"}}})
    sources, url = await _started(SensorSources(config, queue, registry=registry))
    try:
        async with aiohttp.ClientSession() as session:
            assert (await post(session, url, body(series(1, 4))))[0] == 204
            assert (await post(session, url, b"junk"))[0] == 400
    finally:
        await sources.close()

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"sensor_id": "pi-rw-01", **labels})

    assert value("sensor_remote_write_requests_total", outcome="accepted") == 1
    assert value("sensor_remote_write_requests_total", outcome="malformed") == 1
    assert value("sensor_remote_write_requests_total", outcome="unavailable") == 0
    assert value("sensor_remote_write_samples_total") == 4
    assert value("sensor_remote_write_commits_total") == queue.transactions == 1
