"""Replicas for the cluster tests: real ``pipeline-server`` processes on one PostgreSQL
schema (the ``pg_dsn`` fixture), protocol 1.0 sensors (``pipeline.sim.legacy_sensor``)
and the checks every test makes (each event stored once, intact; queues empty)."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pipeline.sim.legacy_sensor import LegacyQueue, QueuedEvent, fill_queue
from pipeline.sim.processes import ManagedProcess, ServerProcess

# Short timers (all of them operator settings): a test spends seconds, not minutes.
REPLICA_CONFIG: dict[str, Any] = {
    "scheduler": {"window_timeout_s": 2.0, "quiet_s": 0.5, "max_chunks": 32,
                  "max_in_flight": 32},
    "heartbeat": {"interval_s": 2.0},
    "logging": {"level": "INFO"},
}


def replica(workdir: Path, name: str, dsn: str, sensors: Mapping[str, str],
            extra: Mapping[str, Any] | None = None) -> ServerProcess:
    config = {**REPLICA_CONFIG, "store": {"engine": "postgres", "dsn": dsn}, **(extra or {})}
    return ServerProcess(workdir / name, sensors, extra_config=config, name=name)


def legacy_sensor(workdir: Path, sensor_id: str, token: str, *, control_url: str,
                  ingest_url: str) -> ManagedProcess:
    return ManagedProcess(
        name=sensor_id, log_path=workdir / f"{sensor_id}.log",
        argv=[sys.executable, "-m", "pipeline.sim.legacy_sensor", "run",
              "--sensor-id", sensor_id, "--token", token, "--control-url", control_url,
              "--ingest-url", ingest_url, "--queue", str(workdir / f"{sensor_id}.db"),
              "--heartbeat-interval", "2", "--ingest-timeout", "3", "--ping-interval", "5"])


def fill_legacy(workdir: Path, sensor_id: str, events: int, size: int,
                seed: int = 0) -> list[QueuedEvent]:
    return fill_queue(workdir / f"{sensor_id}.db", sensor_id, events, size, seed)


def legacy_depth(workdir: Path, sensor_id: str) -> int:
    queue = LegacyQueue(workdir / f"{sensor_id}.db")
    try:
        return queue.depth()
    finally:
        queue.close()


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               on_timeout: Callable[[], str] = lambda: "") -> float:
    """Seconds it took; AssertionError naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{what} not reached in {timeout:.0f}s\n{on_timeout()}")


def check_exactly_once(expected: Sequence[QueuedEvent],
                       stored: Sequence[Mapping[str, Any]]) -> None:
    """Every expected event stored exactly once with its bytes; nothing else stored."""
    by_id: dict[str, list[Mapping[str, Any]]] = {}
    for doc in stored:
        by_id.setdefault(str(doc["event_id"]), []).append(doc)
    missing = [e.event_id for e in expected if e.event_id not in by_id]
    doubled = [k for k, docs in by_id.items() if len(docs) > 1]
    corrupt = [e.event_id for e in expected for doc in by_id.get(e.event_id, [])
               if hashlib.sha256(base64.b64decode(doc["payload_base64"])).hexdigest()
               != e.event_sha256]
    assert not missing and not doubled and not corrupt, (
        f"missing={len(missing)} doubled={len(doubled)} corrupt={len(corrupt)} "
        f"stored={len(stored)} expected={len(expected)}")
    assert len(stored) == len(expected)


def stop_all(processes: Sequence[ManagedProcess]) -> None:
    for proc in processes:
        try:
            proc.terminate(timeout=10)
        except (OSError, subprocess.SubprocessError):
            proc.kill()


def tails(processes: Sequence[ManagedProcess], chars: int = 2500) -> str:
    return "\n".join(f"== {p.name}\n{p.log_text()[-chars:]}" for p in processes)
