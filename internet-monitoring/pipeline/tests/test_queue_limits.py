"""DurableQueue limits (retention, byte cap, disk full) and quarantine, on real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from pipeline.common.errors import (
    EventTooLarge,
    QueueFull,
)
from pipeline.sensor.queue import DurableQueue
from pipeline.tests.queue_support import (
    HOUR,
    FakeClock,
    _event_rows,
    _random,
    _raw,
)


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


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
