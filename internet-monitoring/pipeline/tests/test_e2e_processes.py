"""End to end with real processes: a server, three sensors, SIGKILL mid-transfer.

Every event's assembled bytes on the server must equal what was submitted, every sensor
queue must end empty, and no event may be stored twice.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from pipeline.sensor.queue import DurableQueue
from pipeline.sim.processes import ServerProcess
from pipeline.tests.fleet_support import ProcessFleet

SENSORS = {f"e2e-{i}": f"token-e2e-{i}-{'x' * 24}" for i in range(3)}


def event_bytes(rng: random.Random, index: int) -> bytes:
    """Mixed sizes from 200 B to 1 MiB, mostly small, half of them JSON results."""
    roll = rng.random()
    size = (rng.randint(200, 4_000) if roll < 0.7 else
            rng.randint(4_000, 200_000) if roll < 0.95 else rng.randint(200_000, 1024 * 1024))
    if index % 2:
        return rng.randbytes(size)
    doc = {"test": "speed", "index": index, "download_mbps": round(rng.uniform(5, 900), 2),
           "padding": "p" * max(0, size - 100)}
    return json.dumps(doc).encode()


class Fleet(ProcessFleet):
    def __init__(self, workdir: Path, events_per_sensor: int, seed: int = 1) -> None:
        super().__init__(workdir, ServerProcess(workdir / "server", SENSORS), SENSORS)
        self.events_per_sensor = events_per_sensor
        self.rng = random.Random(seed)
        self.done_submitting = threading.Event()

    def submit_all(self, spread_s: float = 4.0) -> None:
        """Enqueue from this (separate) process while the agents run, like a test program."""
        queues = {sid: DurableQueue(s.queue_path) for sid, s in self.sensors.items()}
        try:
            pause = spread_s / self.events_per_sensor
            for index in range(self.events_per_sensor):
                for sid, queue in queues.items():
                    data = event_bytes(self.rng, index)
                    self.sent[sid][queue.enqueue(data).event_id] = data
                time.sleep(pause)
        finally:
            for queue in queues.values():
                queue.close()
            self.done_submitting.set()

    def wait_drained(self) -> None:
        """Until the read API holds every event."""
        self.wait_stored(lambda: sum(len(self.server.events(sid)) for sid in SENSORS))

    def verify(self) -> None:
        self.verify_read_api()


@pytest.fixture
def fleet(tmp_path):
    fleet = Fleet(tmp_path, events_per_sensor=200)
    fleet.start()
    yield fleet
    fleet.stop()


def test_three_sensors_deliver_every_event_exactly_once(fleet):
    fleet.submit_all()
    fleet.wait_drained()
    fleet.verify()
    snapshots = fleet.server.get_json("/v1/snapshots")
    assert {s["sensor_id"] for s in snapshots["snapshots"]} == set(SENSORS)


def test_server_sigkilled_mid_transfer_loses_nothing(fleet):
    thread = fleet.submit_in_background()
    for _ in range(2):
        time.sleep(1.5)
        fleet.server.kill()
        time.sleep(0.5)
        fleet.server.start()
    thread.join()
    fleet.wait_drained()
    fleet.verify()
    assert fleet.server.kills == 2


def test_sensor_sigkilled_mid_transfer_loses_nothing(fleet):
    thread = fleet.submit_in_background()
    victim = fleet.sensors["e2e-0"]
    for _ in range(3):
        time.sleep(1.2)
        victim.kill()
        time.sleep(0.3)
        victim.start()
    thread.join()
    fleet.wait_drained()
    fleet.verify()
    assert victim.kills == 3
