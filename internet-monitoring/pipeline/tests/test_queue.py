"""DurableQueue on real SQLite files, with real second processes and real SIGKILLs."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.common.chunking import MIN_SLICE, reassemble
from pipeline.common.errors import (
    ConfigError,
    ConflictError,
    EventTooLarge,
    ProtocolError,
    QueueError,
    QueueFull,
)
from pipeline.sensor.queue import DurableQueue, EnqueuedEvent, EventInput, QueuedChunk

CHILD = Path(__file__).with_name("queue_child.py")
HOUR = 3600.0


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def _event_rows(path: Path, event_id: str) -> int:
    with _raw(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM chunks WHERE event_id = ?",
                                (event_id,)).fetchone()[0])


def _rebuild(chunks: list[QueuedChunk]) -> bytes:
    ordered = sorted(chunks, key=lambda c: c.chunk_index)
    assert [c.chunk_index for c in ordered] == list(range(ordered[0].chunk_count))
    return reassemble([c.payload for c in ordered], ordered[0].event_sha256)


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
    import time

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
    queue, chunks = filled
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
    queue, chunks = filled
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


# ---------------------------------------------------------------------- limits


def test_retention_drops_whole_old_events_and_counts_them(
        qpath: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    with DurableQueue(qpath, clock=clock, retention_hours=72) as queue:
        old = [queue.enqueue(_random(n, seed=n)) for n in (10, 200_000, 300_000)]
        old_bytes = queue.total_bytes()
        clock.now += 50 * HOUR
        young = [queue.enqueue(_random(n, seed=n)) for n in (150_000, 20)]
        assert queue.prune(now=clock.now) == {"chunks": 0, "events": 0, "bytes": 0}

        clock.now += 23 * HOUR  # old events are now 73 h old, young ones 23 h
        with caplog.at_level(logging.WARNING, logger="pipeline.sensor.queue"):
            dropped = queue.prune(batch=2)
        assert dropped == {"chunks": 1 + 2 + 3, "events": 3, "bytes": old_bytes}
        assert queue.dropped_counts() == {"retention": dropped}
        assert any("queue_pruned" in r.getMessage() and "events=3" in r.getMessage()
                   for r in caplog.records)
        remaining = queue.read_window(0, 100, 10**9)
        assert {c.event_id for c in remaining} == {e.event_id for e in young}
        assert queue.queue_depth() == 2 + 1
        assert queue.prune() == {"chunks": 0, "events": 0, "bytes": 0}

        clock.now += 50 * HOUR
        second = queue.prune()
        assert second["events"] == 2 and second["chunks"] == 3
        assert queue.dropped_counts()["retention"]["events"] == 5
        assert queue.queue_depth() == 0
        assert queue.total_bytes() == 0
    assert all(_event_rows(qpath, e.event_id) == 0 for e in old + young)


def _compressed_sizes(path: Path, seeds_and_sizes: list[int]) -> dict[int, int]:
    """Stored bytes of each test event, measured on a scratch queue."""
    sizes = {}
    with DurableQueue(path) as probe:
        for n in seeds_and_sizes:
            before = probe.total_bytes()
            probe.enqueue(_random(n, seed=n))
            sizes[n] = probe.total_bytes() - before
    return sizes


def test_byte_cap_drops_oldest_whole_events_and_counts_them(
        qpath: Path, caplog: pytest.LogCaptureFixture) -> None:
    sizes = _compressed_sizes(qpath.with_name("probe.db"), [300_000, 100_000, 200_000])
    cap = sizes[300_000] + sizes[100_000] + sizes[200_000] - 1
    with DurableQueue(qpath, max_bytes=cap) as queue:
        first = queue.enqueue(_random(300_000, seed=300_000))
        second = queue.enqueue(_random(100_000, seed=100_000))
        assert queue.dropped_counts() == {}
        with caplog.at_level(logging.WARNING, logger="pipeline.sensor.queue"):
            third = queue.enqueue(_random(200_000, seed=200_000))
        assert queue.dropped_counts() == {
            "byte_cap": {"chunks": 3, "events": 1, "bytes": sizes[300_000]}}
        assert any("queue_dropped" in r.getMessage() and "reason=byte_cap" in r.getMessage()
                   and "events=1" in r.getMessage() for r in caplog.records)
        assert _event_rows(qpath, first.event_id) == 0
        assert queue.total_bytes() == sizes[100_000] + sizes[200_000] <= cap
        survivors = queue.read_window(0, 100, 10**9)
        assert [c.sequence for c in survivors] == list(second.sequences + third.sequences)
        assert queue.event_count() == 2


def test_byte_cap_drops_the_rest_of_a_partly_delivered_event(qpath: Path) -> None:
    sizes = _compressed_sizes(qpath.with_name("probe.db"), [300_000, 200_000])
    with DurableQueue(qpath, max_bytes=sizes[300_000]) as queue:
        first = queue.enqueue(_random(300_000, seed=300_000))
        delivered = queue.get(first.sequences[:1])[0]
        assert queue.delete([delivered.sequence]) == 1
        second = queue.enqueue(_random(200_000, seed=200_000))
        assert queue.dropped_counts() == {"byte_cap": {
            "chunks": 2, "events": 1, "bytes": sizes[300_000] - delivered.nbytes}}
        assert [c.event_id for c in queue.read_window(0, 100, 10**9)] == [second.event_id] * 2
        assert queue.total_bytes() == sizes[200_000]


def test_an_event_larger_than_the_cap_is_refused(qpath: Path) -> None:
    with DurableQueue(qpath, max_bytes=50_000) as queue:
        kept = queue.enqueue(_random(10_000))
        with pytest.raises(EventTooLarge):
            queue.enqueue(_random(60_000))
        assert queue.read_window(0, 10, 10**9)[0].event_id == kept.event_id
        assert queue.queue_depth() == 1
        assert queue.last_sequence() == 1
        assert queue.dropped_counts() == {}


def test_disk_full_raises_queue_full_and_leaves_nothing_half_written(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        kept = queue.enqueue(_random(100_000, seed=1))
    with _raw(qpath) as conn:
        pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    # Room for the first 128 KiB chunk of the next event but not the second: the failure
    # happens in the middle of a multi-chunk event.
    room = (128 * 1024 * 3 // 2) // page_size
    with DurableQueue(qpath, max_pages=pages + room) as queue:
        with pytest.raises(QueueFull) as info:
            queue.enqueue(_random(400_000, seed=2))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert queue.queue_depth() == 1
        assert queue.last_sequence() == 1
        assert queue.total_bytes() == sum(c.nbytes for c in queue.get(kept.sequences))
        small = queue.enqueue(b"still usable")
        assert small.sequences == (2,)
    with _raw(qpath) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        events = conn.execute("SELECT event_id, COUNT(*) FROM chunks GROUP BY event_id").fetchall()
        assert sorted(events) == sorted([(kept.event_id, 1), (small.event_id, 1)])


# ---------------------------------------------------------------------- quarantine


def test_corrupted_payload_is_quarantined_on_open(qpath: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with DurableQueue(qpath) as queue:
        good = queue.enqueue(_random(5_000, seed=1))
        victim = queue.enqueue(_random(200_000, seed=2))
    with _raw(qpath) as conn:
        payload = bytearray(conn.execute("SELECT payload FROM chunks WHERE sequence = ?",
                                         (victim.sequences[1],)).fetchone()[0])
        payload[100] ^= 0x01
        conn.execute("UPDATE chunks SET payload = ? WHERE sequence = ?",
                     (bytes(payload), victim.sequences[1]))
    with caplog.at_level(logging.INFO, logger="pipeline.sensor.queue"):
        queue = DurableQueue(qpath)
    with queue:
        assert queue.quarantined_count() == 1
        ((chunk, reason),) = queue.quarantined()
        assert reason == "integrity"
        assert chunk.sequence == victim.sequences[1]
        assert chunk.payload == bytes(payload)
        window = queue.read_window(0, 100, 10**9)
        assert [c.sequence for c in window] == [good.sequences[0], victim.sequences[0]]
        assert queue.get([victim.sequences[1]]) == []
        assert queue.queue_depth() == 2
        assert queue.total_bytes() == sum(c.nbytes for c in window)
    assert any("queue_integrity_checked" in r.getMessage() and "quarantined=1" in r.getMessage()
               for r in caplog.records)
    with DurableQueue(qpath) as queue:  # idempotent: nothing more to move
        assert queue.quarantined_count() == 1


def test_manual_quarantine_moves_one_row(qpath: Path) -> None:
    with DurableQueue(qpath) as queue:
        event = queue.enqueue(b"poison")
        assert queue.quarantine(event.sequences[0], "server_rejected") is True
        assert queue.quarantine(event.sequences[0], "server_rejected") is False
        assert queue.queue_depth() == 0
        assert [(c.event_id, r) for c, r in queue.quarantined()] == [
            (event.event_id, "server_rejected")]


# ---------------------------------------------------------------------- processes


def _spawn(*args: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    line = child.stdout.readline()
    if line != "ready\n":
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"child did not start: {line!r} {err}")
    return child


def test_second_process_enqueues_while_first_reads_and_deletes(qpath: Path) -> None:
    DurableQueue(qpath).close()
    child = _spawn("burst", str(qpath), "7", "120")
    received: dict[str, list[QueuedChunk]] = defaultdict(list)
    mine: dict[str, bytes] = {}
    since = 0
    deadline = time.monotonic() + 60
    with DurableQueue(qpath) as queue:
        rng = random.Random(8)
        while time.monotonic() < deadline:
            if len(mine) < 60:
                data = rng.randbytes(rng.randint(1, 200_000))
                mine[queue.enqueue(data).event_id] = data
            child_done = child.poll() is not None  # before reading: its last commit is visible
            window = queue.read_window(since, 16, 512 * 1024)
            for chunk in window:
                received[chunk.event_id].append(chunk)
            if window:
                since = window[-1].sequence
                assert queue.delete([c.sequence for c in window]) == len(window)
            elif child_done and len(mine) >= 60:
                break
        out, err = child.communicate(timeout=30)
        assert queue.queue_depth() == 0
    assert child.returncode == 0, err
    assert "locked" not in err
    theirs = [json.loads(line) for line in out.splitlines()]
    assert len(theirs) == 120
    their_sequences = [c.sequence for item in theirs for c in received[item["event_id"]]]
    my_sequences = [c.sequence for event_id in mine for c in received[event_id]]
    # The two writers really interleaved on the file.
    assert min(their_sequences) < max(my_sequences)
    assert min(my_sequences) < max(their_sequences)
    for item in theirs:
        rebuilt = _rebuild(received.pop(item["event_id"]))
        assert len(rebuilt) == item["size"]
        assert hashlib.sha256(rebuilt).hexdigest() == item["sha256"]
    for event_id, data in mine.items():
        assert _rebuild(received.pop(event_id)) == data
    assert not received


def _check_every_event_is_whole(path: Path) -> tuple[int, list[int]]:
    """Assert the file is sound and every event in it is complete; return counts."""
    with _raw(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT sequence, event_id, chunk_index, chunk_count, payload, "
                            "event_sha256 FROM chunks ORDER BY sequence").fetchall()
    events: dict[str, list[tuple]] = defaultdict(list)
    for row in rows:
        events[row[1]].append(row)
    for event_id, parts in events.items():
        parts.sort(key=lambda r: r[2])
        count = parts[0][3]
        assert len(parts) == count, f"event {event_id} has {len(parts)} of {count} chunks"
        assert [p[2] for p in parts] == list(range(count))
        assert {p[3] for p in parts} == {count}
        assert {p[5] for p in parts} == {parts[0][5]}
        reassemble([p[4] for p in parts], parts[0][5])
    return len(events), [r[0] for r in rows]


def test_sigkill_during_enqueue_never_leaves_a_partial_event(qpath: Path) -> None:
    rng = random.Random(20261127)
    DurableQueue(qpath).close()
    events_seen = 0
    multi_chunk_seen = 0
    last_sequence = 0
    for kill in range(50):
        child = _spawn("crash", str(qpath), str(rng.randrange(2**32)))
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL, f"child died on its own at kill {kill}"

        count, sequences = _check_every_event_is_whole(qpath)
        with DurableQueue(qpath) as queue:
            assert queue.quarantined_count() == 0
            assert queue.last_sequence() >= last_sequence
            assert all(s > last_sequence for s in sequences)
            events_seen += count
            multi_chunk_seen += len({c.event_id for c in queue.read_window(0, 10**6, 10**12)
                                     if c.chunk_count > 1})
            last_sequence = queue.last_sequence()
            # Empty the file so every round checks only what the last child wrote.
            assert queue.delete(sequences) == len(sequences)
    # The kills really landed on a busy writer of multi-chunk events.
    assert events_seen >= 50
    assert multi_chunk_seen >= 25


def test_reserved_attributes_and_wire_limit_refused_at_enqueue(tmp_path):
    """The agent adds window_id/traceparent when sending; an event whose attributes would
    push a chunk past the server's limit must be refused now, not quarantined later."""
    from pipeline.common.errors import FieldValueError
    from pipeline.common.messages import MAX_ATTRIBUTES
    from pipeline.sensor.queue import RESERVED_ATTRIBUTES

    with DurableQueue(tmp_path / "q.db") as queue:
        with pytest.raises(FieldValueError) as err:
            queue.enqueue(b"x", attributes={"window_id": "w"})
        assert err.value.field == "attributes.window_id"
        too_many = {f"k{i}": "v" for i in range(MAX_ATTRIBUTES - len(RESERVED_ATTRIBUTES) + 1)}
        with pytest.raises(FieldValueError):
            queue.enqueue(b"x", attributes=too_many)
        too_many.popitem()
        queue.enqueue(b"x", attributes=too_many)
        assert queue.event_count() == 1
