"""Issue 16, acceptance 2: three replicas behind a round-robin balancer (TCP, no sticky
sessions), 20 sensors of which 6 speak exactly protocol 1.0 (``pipeline.sim.legacy_sensor``),
500 events each: every event stored exactly once and every queue empty, while one replica
is SIGKILLed every 20 s and restarted.

Events are submitted over ~45 s (so two kills land in the middle of traffic), then the
fleet drains; kills go on until every queue is empty. Real processes on a real PostgreSQL
(the ``pg_dsn`` fixture; under CI=true a missing PostgreSQL fails)."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import pytest

from pipeline.sensor.queue import DurableQueue
from pipeline.sim.legacy_sensor import LegacyQueue, QueuedEvent
from pipeline.sim.processes import ManagedProcess, ProcessError, SensorProcess
from pipeline.sim.replicas import ReplicaSet
from pipeline.tests.cluster_support import (
    REPLICA_CONFIG,
    check_exactly_once,
    legacy_depth,
    legacy_sensor,
    stop_all,
    tails,
    wait_until,
)

pytestmark = pytest.mark.wallclock

SENSORS = 20
LEGACY = 6
EVENTS = 500
SIZE = 300
SUBMIT_S = 45.0
KILL_EVERY_S = 20.0
DRAIN_TIMEOUT_S = 180.0


class Killer(threading.Thread):
    """SIGKILL the next replica every ``every`` seconds and start it again."""

    def __init__(self, replicas: ReplicaSet, every: float) -> None:
        super().__init__(name="replica-killer", daemon=True)
        self.replicas, self.every = replicas, every
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.replicas.kill()
            time.sleep(1.0)
            try:
                self.replicas.start(timeout=60)
            except (ProcessError, OSError) as exc:  # reported by the test, never silent
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:2000]}")
                return


def _submit(tmp_path: Path, modern: list[str], legacy: list[str],
            expected: dict[str, list[QueuedEvent]]) -> None:
    """EVENTS per sensor, spread over SUBMIT_S, into the sensors' own queue files."""
    rng = random.Random(16)
    queues_m = {sid: DurableQueue(tmp_path / "sensors" / f"{sid}.db", verify_on_open=False)
                for sid in modern}
    queues_l = {sid: LegacyQueue(tmp_path / "legacy" / f"{sid}.db") for sid in legacy}
    started = time.monotonic()
    try:
        for i in range(EVENTS):
            pause = started + i * SUBMIT_S / EVENTS - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            for sid, queue in queues_m.items():
                data = rng.randbytes(SIZE)
                written = queue.enqueue(data)
                expected[sid].append(QueuedEvent(written.event_id,
                                                 hashlib.sha256(data).hexdigest(), SIZE, 1))
            for sid, lqueue in queues_l.items():
                expected[sid].append(lqueue.enqueue(sid, rng.randbytes(SIZE)))
    finally:
        for q in queues_m.values():
            q.close()
        for lq in queues_l.values():
            lq.close()


def test_three_replicas_round_robin_with_a_replica_killed_every_20s(pg_dsn: str,
                                                                    tmp_path: Path) -> None:
    ids = [f"sensor-{i:02d}" for i in range(SENSORS)]
    legacy, modern = ids[:LEGACY], ids[LEGACY:]
    tokens = {sid: f"{sid}-token-0123456789abcdef" for sid in ids}
    replicas = ReplicaSet(tmp_path / "server", tokens, replicas=3, dsn=pg_dsn,
                          extra_config=REPLICA_CONFIG, fresh_database=False)
    control = f"ws://127.0.0.1:{replicas.control_port}/control"
    ingest = f"{replicas.http_base}/v1/ingest/chunk"
    (tmp_path / "legacy").mkdir()
    sensors: list[ManagedProcess] = [
        SensorProcess(tmp_path / "sensors", sid, tokens[sid], control_url=control,
                      ingest_url=ingest) for sid in modern]
    sensors += [legacy_sensor(tmp_path / "legacy", sid, tokens[sid], control_url=control,
                              ingest_url=ingest) for sid in legacy]
    for sid in modern:  # the queue files exist before the workload opens them
        DurableQueue(tmp_path / "sensors" / f"{sid}.db").close()
    for sid in legacy:
        LegacyQueue(tmp_path / "legacy" / f"{sid}.db").close()
    expected: dict[str, list[QueuedEvent]] = {sid: [] for sid in ids}
    killer = Killer(replicas, KILL_EVERY_S)
    try:
        replicas.start()
        for proc in sensors:
            proc.start()
        killer.start()
        _submit(tmp_path, modern, legacy, expected)

        def drained() -> bool:
            assert not killer.errors, killer.errors
            return all(legacy_depth(tmp_path / "legacy", sid) == 0 for sid in legacy) and all(
                p.queue_depth() == 0 for p in sensors if isinstance(p, SensorProcess))

        took = wait_until(drained, DRAIN_TIMEOUT_S, "every queue empty",
                          lambda: tails([*replicas.replicas, *sensors[:2], sensors[-1]]))
        killer.stop.set()
        killer.join(90)
        assert replicas.kills >= 2, replicas.kills
        for sid in ids:
            check_exactly_once(expected[sid], replicas.events(sid))
        stats = {str(k): (v.connections, v.refused) for k, v in replicas.ingest.stats.items()}
        print(f"drained {SENSORS * EVENTS} events {took:.1f}s after the last submit; "
              f"kills={replicas.kills} ingest connections/refused per replica={stats}")
    finally:
        killer.stop.set()
        stop_all(sensors)
        replicas.terminate()
