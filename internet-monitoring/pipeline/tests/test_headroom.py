"""The reserve file and the disk-health record (common/headroom.py), and what a test
program sees when the sensor's disk is full (``pipeline-sensor submit`` exits 75)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.common.headroom import KIND_FULL, KIND_IO, DiskHealth, Reserve, reserve_path
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
