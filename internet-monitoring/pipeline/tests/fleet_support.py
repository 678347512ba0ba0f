"""A fleet of real processes for the end-to-end tests (test_e2e_processes.py on SQLite,
test_pg_e2e.py on PostgreSQL): one ``pipeline-server``, sensor agents pointed at it, what
the test enqueued per sensor, and the checks that every event arrived exactly once."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from pipeline.sim.processes import SensorProcess, ServerProcess

DRAIN_TIMEOUT_S = 180.0


class ProcessFleet:
    """The server and one agent per ``sensors`` entry (id -> token); ``submit_all`` is the
    test's own (what it enqueues and how fast), recorded in ``sent``."""

    def __init__(self, workdir: Path, server: ServerProcess, sensors: dict[str, str]) -> None:
        self.server = server
        self.sensors = {
            sid: SensorProcess(workdir / "sensors", sid, tok, control_url=self.server.control_url,
                               ingest_url=self.server.ingest_url)
            for sid, tok in sensors.items()}
        self.sent: dict[str, dict[str, bytes]] = {sid: {} for sid in sensors}

    def start(self) -> None:
        self.server.start()
        for sensor in self.sensors.values():
            sensor.start()

    def submit_all(self, spread_s: float = 4.0) -> None:
        raise NotImplementedError

    def submit_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.submit_all, daemon=True)
        thread.start()
        return thread

    def wait_stored(self, stored_events: Callable[[], int]) -> None:
        """Wait for empty queues (cheap to poll), then for ``stored_events()`` to reach
        every event sent."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        expected = sum(len(v) for v in self.sent.values())
        depths: list[int] = []
        stored = 0
        while time.monotonic() < deadline:
            depths = [s.queue_depth() for s in self.sensors.values()]
            if not any(depths):
                stored = stored_events()
                if stored >= expected:
                    return
            time.sleep(0.5)
        logs = "\n".join(s.log_text()[-2000:] for s in self.sensors.values())
        pytest.fail(f"not drained: depths={depths} stored={stored}/{expected}\n"
                    f"{self.server.log_text()[-3000:]}\n{logs}")

    def verify_read_api(self) -> None:
        """Through the read API: every sensor's events once each, byte for byte what was
        sent, and its queue empty."""
        for sid, sent in self.sent.items():
            events = self.server.events(sid)
            ids = [e["event_id"] for e in events]
            assert len(ids) == len(set(ids)), f"{sid}: duplicate events stored"
            assert set(ids) == set(sent), f"{sid}: missing {set(sent) - set(ids)}"
            for event in events:
                data = base64.b64decode(event["payload_base64"])
                expected = hashlib.sha256(sent[event["event_id"]]).digest()
                assert hashlib.sha256(data).digest() == expected
            assert self.sensors[sid].queue_depth() == 0

    def stop(self) -> None:
        for sensor in self.sensors.values():
            sensor.terminate()
        self.server.terminate()
