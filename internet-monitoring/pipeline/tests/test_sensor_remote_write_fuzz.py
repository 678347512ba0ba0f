"""Hypothesis against the remote-write decoder and the live receiver: arbitrary bytes,
truncations and bit flips of valid bodies never crash, never get a 5xx, and never leave a
partial queue entry: a refused body queues nothing, an accepted one exactly what it said
(nothing when it holds no series)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.common import remote_write as rw
from pipeline.common.errors import PayloadTooLarge
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.sources import SensorSources
from pipeline.tests.remote_write_support import (
    body,
    post_sync,
    queued_writes,
    series,
    sources_for,
)

VALID = [body(series(1)), body(*(series(i, 5) for i in range(30))),
         body(rw.Series((("__name__", "x"), ("é", "☕")), ((0, float("nan")),)))]
LIMIT = 1 << 20


def _flip(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        out[(position // 8) % len(out)] ^= 1 << (position % 8)
    return bytes(out)


mutated = st.one_of(
    st.binary(max_size=4096),
    st.builds(lambda d, n: d[:n], st.sampled_from(VALID), st.integers(0, 3000)),
    st.builds(_flip, st.sampled_from(VALID), st.lists(st.integers(0, 8 * 3000), min_size=1,
                                                      max_size=6)),
)


@settings(max_examples=400, deadline=None)
@given(mutated)
def test_decoder_either_accepts_or_refuses_with_a_4xx_error(data: bytes) -> None:
    try:
        decoded = rw.decode(data, content_type=rw.HTTP_CONTENT_TYPE, content_encoding="snappy",
                            max_bytes=LIMIT)
    except (rw.RemoteWriteMalformed, PayloadTooLarge) as exc:
        assert exc.http_status in (400, 413)
        assert exc.message
        return
    # Accepted: what is queued parses again to the same counts, every series named.
    request = rw.parse(decoded.raw)
    assert len(request.timeseries) == decoded.series
    assert all(one.name for one in rw.series_of(request))


names = st.sampled_from(["", "__name__", "job", "instance", "a", "é"])
label_lists = st.lists(st.tuples(names, st.sampled_from(["", "x", "up", "☕"])), max_size=5)


@settings(max_examples=300, deadline=None)
@given(st.lists(label_lists, min_size=1, max_size=4), st.booleans())
def test_cached_label_check_gives_the_full_checks_verdict(series_labels: list[
        list[tuple[str, str]]], twice: bool) -> None:
    """decode() trusts label sets it has seen before; its verdict must be check_request's,
    including on the second sight of a set (``twice``)."""
    request = rw.WriteRequest()
    for labels in series_labels:
        ts = request.timeseries.add()
        for name, value in labels:  # as given: unsorted, repeated, empty
            ts.labels.add(name=name, value=value)
        ts.samples.add(timestamp=1, value=2.0)
    data = rw.encode(request)
    try:
        expected: int | str = rw.check_request(rw.WriteRequest.FromString(
            request.SerializeToString()))
    except rw.RemoteWriteMalformed as exc:
        expected = exc.message
    for _ in range(2 if twice else 1):
        try:
            got: int | str = rw.decode(data, content_type=rw.HTTP_CONTENT_TYPE,
                                       content_encoding="snappy", max_bytes=LIMIT).samples
        except rw.RemoteWriteMalformed as exc:
            got = exc.message
        assert got == expected


class LiveReceiver:
    """Queue + sources on an event loop in a thread, so Hypothesis can drive it."""

    def __init__(self, tmp_path: Path) -> None:
        self.queue = DurableQueue(tmp_path / "queue.db")
        self.sources: SensorSources = sources_for(self.queue, tmp_path,
                                                  max_decompressed_bytes=LIMIT)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sources.start(), self.loop).result(10)
        port = self.sources.remote_write_port
        assert port is not None
        self.port = port

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sources.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.queue.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveReceiver]:
    receiver = LiveReceiver(tmp_path_factory.mktemp("rw-fuzz"))
    yield receiver
    receiver.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated)
def test_receiver_answers_every_body_without_5xx_and_queues_all_or_nothing(
        live: LiveReceiver, data: bytes) -> None:
    before = len(queued_writes(live.queue))
    status, answer = post_sync(live.port, data)
    writes = queued_writes(live.queue)  # asserts no event is in the queue only partly
    try:
        expected = rw.decode(data, content_type=rw.HTTP_CONTENT_TYPE,
                             content_encoding="snappy", max_bytes=LIMIT)
    except (rw.RemoteWriteMalformed, PayloadTooLarge) as exc:
        assert status == exc.http_status, answer
        assert b'"message"' in answer
        assert len(writes) == before
        return
    assert status == 204, answer
    if not expected.series:  # no series (metadata only): nothing to keep
        assert len(writes) == before
        return
    assert len(writes) == before + 1
    assert writes[-1].data == expected.raw
