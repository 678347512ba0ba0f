"""The reserve file and the disk-health record (common/headroom.py), and what a test
program sees when the sensor's disk is full (``pipeline-sensor submit`` exits 75)."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from pipeline.common.chunking import split_event
from pipeline.common.errors import QueueFull, StorageFull
from pipeline.common.headroom import KIND_FULL, KIND_IO, DiskHealth, Reserve, reserve_path
from pipeline.common.messages import Chunk
from pipeline.sensor.metrics import AgentCollector
from pipeline.sensor.queue import DurableQueue
from pipeline.server.store import SQLiteChunkStore
from pipeline.tests.disk_support import fill, tmpfs


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_reserve_is_created_whole_released_and_restored(tmp_path: Path) -> None:
    clock = FakeClock()
    reserve = Reserve(tmp_path / "q.db", 64 * 1024, clock=clock)
    assert not reserve.present()
    assert reserve.ensure()
    assert reserve_path(tmp_path / "q.db").stat().st_size == 64 * 1024
    assert reserve.release() == 64 * 1024
    assert not reserve.present()
    assert reserve.release() == 0
    assert reserve.ensure()  # a release allows an immediate attempt
    assert [p.name for p in tmp_path.iterdir()] == ["q.db-reserve"]


def test_a_half_written_reserve_left_by_a_killed_process_is_cleaned_up(tmp_path: Path
                                                                       ) -> None:
    stale = tmp_path / "q.db-reserve.999999.tmp"
    stale.write_bytes(bytes(4096))
    assert Reserve(tmp_path / "q.db", 8192).ensure()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.db-reserve"]


def test_disabled_reserve_is_always_present(tmp_path: Path) -> None:
    reserve = Reserve(tmp_path / "q.db", 0)
    assert reserve.present() and reserve.ensure() and reserve.release() == 0
    assert list(tmp_path.iterdir()) == []


def test_reserve_needs_room_for_the_wal_besides_it_and_retries_at_most_once_a_second(
        tmp_path: Path) -> None:
    clock = FakeClock()
    with tmpfs(tmp_path / "disk", "1m") as disk:
        too_big = Reserve(disk / "q.db", 900 * 1024, clock=clock)  # + 225 KiB > 1 MiB
        assert not too_big.ensure()
        assert list(disk.iterdir()) == [], "a failed attempt left a file behind"
        reserve = Reserve(disk / "s.db", 256 * 1024, clock=clock)
        ballast = disk / "ballast"
        fill(ballast)
        assert not reserve.ensure()
        ballast.unlink()
        assert not reserve.ensure(), "tried again within the second"
        clock.now += 1.5
        assert reserve.ensure()


def test_disk_health_counts_every_failure_and_logs_one_line_a_minute(caplog) -> None:
    clock = FakeClock()
    health = DiskHealth("store", "/x/server.db", clock=clock)
    with caplog.at_level(logging.INFO, logger="pipeline.common.headroom"):
        for _ in range(5):
            health.failed("checkpoint", KIND_FULL, "database or disk is full")
            clock.now += 0.2
        health.failed("ingest", KIND_IO, "disk I/O error")
        clock.now += 61
        health.failed("checkpoint", KIND_FULL, "database or disk is full")
        assert health.full
        health.recovered()
        health.recovered()
    lines = [r.getMessage() for r in caplog.records]
    assert health.counts() == {("checkpoint", KIND_FULL): 6, ("ingest", KIND_IO): 1}
    assert sum("store_disk_full" in line for line in lines) == 2
    assert any("store_disk_full" in line and "suppressed=4" in line for line in lines)
    assert sum("store_io_error" in line for line in lines) == 1
    assert sum("store_disk_recovered" in line for line in lines) == 1
    assert not health.full


def test_submit_exits_75_while_the_disk_is_full_and_works_once_it_has_room(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        config = tmp_path / "sensor.yml"
        config.write_text(yaml.safe_dump({
            "sensor_id": "pi-07", "token": "t" * 32,
            "queue": {"path": str(disk / "queue.db"), "reserve_bytes": 256 * 1024}}))
        submit = [sys.executable, "-m", "pipeline.sensor", "submit", "--config", str(config),
                  "-"]
        first = subprocess.run(submit, input=b'{"test": "dns"}', capture_output=True,
                               timeout=60)
        assert first.returncode == 0, first.stderr
        ballast = disk / "ballast"
        fill(ballast)
        refused = subprocess.run(submit, input=b'{"test": "ping"}', capture_output=True,
                                 timeout=60)
        assert refused.returncode == 75, refused.stderr
        assert b"disk is full" in refused.stderr
        ballast.unlink()
        accepted = subprocess.run(submit, input=b'{"test": "ping"}', capture_output=True,
                                  timeout=60)
        assert accepted.returncode == 0, accepted.stderr
        assert len(accepted.stdout.strip()) == 32


class _Figures:
    """The agent's side of the collector: counters at zero, a real queue."""

    sensor_id = "pi-07"

    def __init__(self, queue: DurableQueue) -> None:
        self.queue = queue

    def stats(self) -> dict[str, float]:
        return dict.fromkeys(("retries", "posted", "acked", "in_flight", "clock_skew_ms",
                              "connected", "connects", "connect_failures", "heartbeats"), 0)


def test_sensor_metrics_say_the_disk_is_full_until_deletes_make_room(tmp_path: Path) -> None:
    rng = random.Random(3)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        queue = DurableQueue(disk / "q.db", reserve_bytes=128 * 1024)
        registry = CollectorRegistry()
        registry.register(AgentCollector(_Figures(queue)))
        sid = {"sensor_id": "pi-07"}
        try:
            assert registry.get_sample_value("sensor_disk_full", sid) == 0
            sequences: list[int] = []
            with pytest.raises(QueueFull):
                while True:
                    sequences.extend(queue.enqueue(rng.randbytes(8000)).sequences)
            assert registry.get_sample_value("sensor_disk_full", sid) == 1
            assert registry.get_sample_value("sensor_queue_write_errors_total", {
                **sid, "operation": "enqueue", "kind": "disk_full"}) >= 1
            assert queue.delete(sequences) == len(sequences)
            assert registry.get_sample_value("sensor_disk_full", sid) == 0
            queue.enqueue(b"room again")
        finally:
            queue.close()


def _chunks(rng: random.Random, first: int, count: int) -> list[Chunk]:
    out = []
    for sequence in range(first, first + count):
        split = split_event(rng.randbytes(6000))
        piece = split.pieces[0]
        out.append(Chunk(sensor_id="pi-07", event_id=split.event_id, sequence=sequence,
                         chunk_index=0, chunk_count=1, payload=piece.payload,
                         chunk_sha256=piece.chunk_sha256, event_sha256=split.event_sha256,
                         created_at="2026-12-05T00:00:00Z", logical_timestamp_ms=sequence))
    return out


def test_store_on_full_disk_keeps_control_state_refuses_ingest_and_resumes(
        tmp_path: Path) -> None:
    rng = random.Random(4)
    with tmpfs(tmp_path / "disk", "4m") as disk:
        ballast = disk / "ballast"
        fill(ballast)
        os.truncate(ballast, ballast.stat().st_size - 1024 * 1024)
        store = SQLiteChunkStore(disk / "server.db", reserve_bytes=256 * 1024)
        try:
            sequence = 1
            with pytest.raises(StorageFull):
                while True:
                    store.ingest(_chunks(rng, sequence, 8))
                    sequence += 8
            stored = store.event_count()
            assert store.disk_full and stored > 0
            # The reserve is handed over: control state still commits.
            store.save_sensor_state("pi-07", {"windows": 3})
            assert store.load_sensor_states()["pi-07"] == {"windows": 3}
            # Ingest is refused before any statement while the reserve is in use.
            with pytest.raises(StorageFull):
                store.ingest(_chunks(rng, sequence, 1))
            assert store.health.counts()[("ingest", KIND_FULL)] >= 2
            ballast.unlink()
            deadline = time.monotonic() + 10
            while store.disk_full:  # the checkpointer thread restores the reserve
                assert time.monotonic() < deadline, "the store never left the full state"
                time.sleep(0.1)
            outcomes = store.ingest(_chunks(rng, sequence, 8))
            assert all(o.stored for o in outcomes)
            assert store.event_count() == stored + 8
        finally:
            store.close()


def test_a_queue_file_from_before_the_reserve_is_switched_to_incremental_vacuum(
        tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    with DurableQueue(path, reserve_bytes=0) as queue:  # as older versions made them
        queue._conn.execute("PRAGMA auto_vacuum=NONE")
        queue._conn.execute("VACUUM")
        kept = queue.enqueue(b"still queued")
        queue.delete(queue.enqueue(b"delivered").sequences)
        last = queue.last_sequence()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    with DurableQueue(path) as queue:  # the agent opens it (verify_on_open)
        assert queue._conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert queue.last_sequence() == last, "sequences must never be reused"
        assert [c.event_id for c in queue.read_window(0, 10, 1 << 20)] == [kept.event_id]
        assert queue.enqueue(b"next").sequences[0] == last + 1
