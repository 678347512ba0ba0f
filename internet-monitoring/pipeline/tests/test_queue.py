"""DurableQueue on real SQLite files: basics, windows, the identity of the file.

Limits and quarantine: test_queue_limits.py; second processes and SIGKILLs:
test_queue_processes.py."""

from __future__ import annotations

import random
import re
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.common.chunking import MIN_SLICE
from pipeline.common.errors import (
    ConfigError,
    ConflictError,
    ProtocolError,
    QueueError,
)
from pipeline.sensor.queue import DurableQueue, EnqueuedEvent, EventInput, QueuedChunk
from pipeline.tests.queue_support import (
    FakeClock,
    _random,
    _raw,
    _rebuild,
)


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


# ---------------------------------------------------------------------- basics


def test_new_queue_is_empty_with_a_random_epoch(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        assert re.fullmatch(r"[0-9a-f]{32}", queue.epoch)
        assert queue.queue_depth() == 0
        assert queue.event_count() == 0
        assert queue.total_bytes() == 0
        assert queue.last_sequence() == 0
        assert queue.oldest_age_seconds() is None
        assert queue.read_window(0, 10, 10**6) == []
        assert queue.dropped_counts() == {}
    with _raw(qpath) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_enqueue_stores_every_chunk_of_the_event(qpath: Path) -> None:
    clock = FakeClock(1_795_755_600.25)
    data = _random(300_000, seed=1)
    with DurableQueue(qpath, clock=clock) as queue:
        result = queue.enqueue(data, attributes={"kind": "speedtest"})
        assert isinstance(result, EnqueuedEvent)
        assert result.sequences == (1, 2, 3)
        assert result.size == len(data)
        chunks = queue.get(result.sequences)
        assert [c.sequence for c in chunks] == [1, 2, 3]
        assert {c.event_id for c in chunks} == {result.event_id}
        assert {c.chunk_count for c in chunks} == {3}
        assert {c.event_sha256 for c in chunks} == {result.event_sha256}
        assert chunks[0].created_at == "2026-11-27T05:00:00.250Z"
        assert chunks[0].logical_timestamp_ms == 1_795_755_600_250
        assert chunks[0].attributes == {"kind": "speedtest"}
        assert chunks[0].enqueued_at == clock.now
        assert _rebuild(chunks) == data
        assert queue.queue_depth() == 3
        assert queue.event_count() == 1
        assert queue.total_bytes() == sum(c.nbytes for c in chunks)
        assert queue.last_sequence() == 3
        clock.now += 42.0
        assert queue.oldest_age_seconds() == pytest.approx(42.0)


def test_explicit_metadata_is_kept(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        result = queue.enqueue(b"{}", event_id="ab" * 16, created_at="2026-11-27T05:00:00Z",
                               logical_timestamp_ms=7)
        (chunk,) = queue.get(result.sequences)
        assert (chunk.event_id, chunk.created_at, chunk.logical_timestamp_ms) == (
            "ab" * 16, "2026-11-27T05:00:00Z", 7)


def test_duplicate_event_id_writes_nothing(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        queue.enqueue(b"first", event_id="cd" * 16)
        with pytest.raises(ConflictError):
            queue.enqueue(_random(200_000), event_id="cd" * 16)
        assert queue.queue_depth() == 1
        assert queue.last_sequence() == 1


def test_a_duplicate_id_inside_one_batch_writes_nothing(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        with pytest.raises(ConflictError):
            queue.enqueue_many([EventInput(b"a", event_id="ef" * 16), EventInput(b"b"),
                                EventInput(b"c", event_id="ef" * 16)])
        assert queue.queue_depth() == 0


def test_a_duplicate_id_from_another_process_is_refused(qpath: Path) -> None:
    with DurableQueue(qpath) as first, DurableQueue(qpath, verify_on_open=False) as second:
        first.enqueue(b"first", event_id="12" * 16)
        with pytest.raises(ConflictError):
            second.enqueue(b"again", event_id="12" * 16)
        assert second.queue_depth() == 1


def test_generated_event_ids_are_distinct_time_ordered_version_7_uuids(qpath: Path) -> None:

    before = time.time_ns() // 1_000_000
    with DurableQueue(qpath, synchronous="NORMAL") as queue:
        ids = [queue.enqueue(b"x").event_id for _ in range(200)]
        ids += [e.event_id for e in queue.enqueue_many([EventInput(b"y")] * 50)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    millis = []
    for event_id in ids:
        parsed = uuid.UUID(hex=event_id)
        assert (parsed.hex, parsed.version, parsed.variant) == (event_id, 7, uuid.RFC_4122)
        millis.append(int(event_id[:12], 16))
    # The first 48 bits are the enqueue time: ids sort by time (the index grows at its end).
    assert millis == sorted(millis) and before <= millis[0] and millis[-1] <= after


@pytest.mark.parametrize("now", [
    1_800_000_000.0, 1_800_000_000.9994999, 1_800_000_000.9995, 1_800_000_000.9999995,
    1_800_000_000.0000005, 1_800_000_001.0004, 0.0, 0.0000015, 951_782_399.9999996,
])
def test_default_created_at_matches_datetime_formatting(qpath: Path, now: float) -> None:
    expected = datetime.fromtimestamp(now, tz=timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")
    clock = FakeClock(now)
    with DurableQueue(qpath, clock=clock, synchronous="NORMAL") as queue:
        (chunk,) = queue.get(queue.enqueue(b"x").sequences)
    assert chunk.created_at == expected


def test_default_created_at_follows_the_clock_across_seconds(qpath: Path) -> None:
    clock = FakeClock(1_800_000_000.5)
    seen = []
    with DurableQueue(qpath, clock=clock, synchronous="NORMAL") as queue:
        for step in (0.0, 0.4996, 0.7, -3.2, 86_400.0, 0.0):
            clock.now += step
            (chunk,) = queue.get(queue.enqueue(b"x").sequences)
            seen.append(chunk.created_at)
    assert seen == ["2027-01-15T08:00:00.500Z", "2027-01-15T08:00:00.999Z",
                    "2027-01-15T08:00:01.699Z", "2027-01-15T07:59:58.499Z",
                    "2027-01-16T07:59:58.499Z", "2027-01-16T07:59:58.499Z"]


def test_attributes_default_to_empty_and_traceparent_alone_is_stored(qpath: Path) -> None:
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    with DurableQueue(qpath, synchronous="NORMAL") as queue:
        plain = queue.get(queue.enqueue(b"x").sequences)[0]
        traced = queue.get(queue.enqueue(b"y", traceparent=traceparent).sequences)[0]
        with pytest.raises(ProtocolError):
            queue.enqueue(b"z", attributes=[])  # type: ignore[arg-type]
    assert plain.attributes == {}
    assert traced.attributes == {"traceparent": traceparent}


@pytest.mark.parametrize("attributes", [
    {"k": 1}, {"k" * 300: "v"}, {"k": "v" * 2000}, {f"k{i}": "v" for i in range(33)},
])
def test_attributes_the_server_would_refuse_are_refused_here(qpath: Path,
                                                             attributes: dict) -> None:
    with DurableQueue(qpath) as queue:
        with pytest.raises(ProtocolError):
            queue.enqueue(b"x", attributes=attributes)
        assert queue.queue_depth() == 0


def test_bad_synchronous_mode_is_a_config_error(qpath: Path) -> None:
    with pytest.raises(ConfigError) as info:
        DurableQueue(qpath, synchronous="OFF")
    assert info.value.field == "queue.synchronous"
    with DurableQueue(qpath, synchronous="NORMAL") as queue:
        assert queue.synchronous == "NORMAL"
        queue.enqueue(b"works")
        assert queue.queue_depth() == 1


@pytest.mark.parametrize("kwargs, field", [
    ({"retention_hours": 0}, "queue.retention_hours"),
    ({"max_bytes": 0}, "queue.max_bytes"),
    ({"slice_size": MIN_SLICE - 1}, "queue.slice_size"),
    ({"max_pages": 0}, "queue.max_pages"),
])
def test_bad_limits_are_config_errors(qpath: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        DurableQueue(qpath, **kwargs)
    assert info.value.field == field


def test_a_file_that_is_not_a_database_is_a_queue_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(QueueError) as info:
        DurableQueue(path)
    assert str(path) in str(info.value)


def test_a_corrupted_database_file_is_a_queue_error(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        for i in range(20):
            queue.enqueue(_random(20_000, seed=i), attributes={"i": str(i)})
    raw = bytearray(qpath.read_bytes())
    assert len(raw) > 40 * 4096
    raw[4096:4096 * 40] = random.Random(1).randbytes(4096 * 39)  # smash the b-tree pages
    qpath.write_bytes(bytes(raw))
    with pytest.raises(QueueError) as info:
        DurableQueue(qpath)
    assert str(qpath) in str(info.value)


def test_closed_queue_refuses_work(qpath: Path) -> None:
    queue = DurableQueue(qpath)
    queue.close()
    queue.close()
    with pytest.raises(QueueError):
        queue.enqueue(b"late")


# ---------------------------------------------------------------------- windows


@pytest.fixture
def filled(qpath: Path) -> Iterator[tuple[DurableQueue, list[QueuedChunk]]]:
    """Six single-chunk events with distinct, known sizes."""
    queue = DurableQueue(qpath)
    for i, size in enumerate([1000, 5000, 20_000, 3000, 40_000, 100]):
        queue.enqueue(_random(size, seed=i))
    chunks = queue.get(range(1, 7))
    assert [c.sequence for c in chunks] == [1, 2, 3, 4, 5, 6]
    yield queue, chunks
    queue.close()


def test_window_respects_since_and_max_chunks(filled: tuple[DurableQueue, list]) -> None:
    queue, _chunks = filled
    assert [c.sequence for c in queue.read_window(0, 3, 10**9)] == [1, 2, 3]
    assert [c.sequence for c in queue.read_window(2, 3, 10**9)] == [3, 4, 5]
    assert [c.sequence for c in queue.read_window(4, 100, 10**9)] == [5, 6]
    assert queue.read_window(6, 100, 10**9) == []
    assert queue.read_window(0, 0, 10**9) == []


def test_window_respects_max_bytes_in_order(filled: tuple[DurableQueue, list]) -> None:
    queue, chunks = filled
    sizes = {c.sequence: c.nbytes for c in chunks}
    budget = sizes[1] + sizes[2]
    window = queue.read_window(0, 100, budget)
    assert [c.sequence for c in window] == [1, 2]
    # Stops at the first chunk that does not fit, never skipping ahead to smaller ones.
    window = queue.read_window(2, 100, sizes[3] - 1 + sizes[4])
    assert [c.sequence for c in window] == [3]
    assert sum(c.nbytes for c in queue.read_window(0, 100, 30_000)) <= 30_000


def test_window_returns_one_chunk_even_when_it_alone_is_too_big(
        filled: tuple[DurableQueue, list]) -> None:
    queue, _chunks = filled
    window = queue.read_window(4, 100, 10)
    assert [c.sequence for c in window] == [5]
    assert window[0].nbytes > 10


def test_list_after_matches_the_stored_rows(filled: tuple[DurableQueue, list]) -> None:
    queue, chunks = filled
    metas = queue.list_after(1, 3)
    assert [(m.sequence, m.nbytes) for m in metas] == [(c.sequence, c.nbytes) for c in chunks[1:4]]
    assert queue.list_after(6, 10) == []
    assert queue.list_after(0, 0) == []


def test_get_is_ascending_and_omits_missing(filled: tuple[DurableQueue, list]) -> None:
    queue, chunks = filled
    assert [c.sequence for c in queue.get([5, 1, 99, 3, 3])] == [1, 3, 5]
    assert queue.get([]) == []
    assert queue.get(list(range(1, 1200))) == chunks


def test_delete_counts_rows_and_ignores_unknown(filled: tuple[DurableQueue, list]) -> None:
    queue, chunks = filled
    before = queue.total_bytes()
    assert queue.delete([2, 4, 4, 1000]) == 2
    assert queue.delete([2]) == 0
    assert queue.delete([]) == 0
    assert [c.sequence for c in queue.read_window(0, 100, 10**9)] == [1, 3, 5, 6]
    assert queue.queue_depth() == 4
    assert queue.event_count() == 4
    assert queue.total_bytes() == before - chunks[1].nbytes - chunks[3].nbytes


# ---------------------------------------------------------------------- identity of the file


def test_sequences_are_never_reused_after_delete_and_reopen(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        first = queue.enqueue(_random(200_000))
        assert queue.delete(first.sequences) == 2
        assert queue.last_sequence() == 2
    with DurableQueue(qpath) as queue:
        assert queue.queue_depth() == 0
        assert queue.last_sequence() == 2
        again = queue.enqueue(b"next")
        assert again.sequences == (3,)


def test_epoch_is_stable_across_reopen_and_new_per_file(tmp_path: Path) -> None:
    with DurableQueue(tmp_path / "a.db") as queue:
        epoch = queue.epoch
    with DurableQueue(tmp_path / "a.db") as queue:
        assert queue.epoch == epoch
    with DurableQueue(tmp_path / "b.db") as queue:
        assert queue.epoch != epoch
