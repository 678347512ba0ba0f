"""Acceptance 2 of issue 12: full disks, with real processes on real small file systems.

* Sensor: its queue fills a 2 MiB tmpfs. Submits fail cleanly with ``QueueFull``; once a
  real agent has delivered everything to a real server, the queue is empty and takes new
  events again, without anyone freeing space by hand.
* Server: its store fills a small tmpfs (a ballast file takes most of it). Ingest answers
  507 with Retry-After, ``pipeline_store_disk_full`` is 1, the full-disk log line is
  rate-limited; once the ballast is deleted, ingest resumes by itself and every event
  arrives exactly once.
"""

from __future__ import annotations

import os
import random
import re
import time
import urllib.request
from pathlib import Path

from pipeline.common.errors import QueueFull
from pipeline.sensor.queue import DurableQueue
from pipeline.sim.processes import SensorProcess, ServerProcess
from pipeline.tests.disk_support import assert_exactly_once, fill, tmpfs, wait_for

SENSOR_ID = "disk-1"
TOKEN = "token-disk-1-" + "x" * 24
EVENT_BYTES = 20 * 1024  # incompressible: the queue holds what it is given
QUEUE_RESERVE = 256 * 1024
STORE_RESERVE = 256 * 1024


def _event(rng: random.Random) -> bytes:
    return rng.randbytes(EVENT_BYTES)


def _metric(server: ServerProcess, name: str) -> float | None:
    with urllib.request.urlopen(server.http_base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_sensor_queue_on_full_disk_recovers_once_the_server_has_everything(tmp_path: Path
                                                                          ) -> None:
    rng = random.Random(12)
    with tmpfs(tmp_path / "qdisk", "2m") as disk:
        server = ServerProcess(tmp_path / "server", {SENSOR_ID: TOKEN})
        queue_path = disk / "queue.db"
        sensor = SensorProcess(tmp_path / "sensor", SENSOR_ID, TOKEN,
                               control_url=server.control_url, ingest_url=server.ingest_url,
                               extra_config={"queue": {"path": str(queue_path),
                                                       "reserve_bytes": QUEUE_RESERVE}})
        sent: dict[str, bytes] = {}
        queue = DurableQueue(queue_path, reserve_bytes=QUEUE_RESERVE)
        try:
            # 1. No agent yet: the test program fills the disk until submits are refused.
            refused = 0
            while refused < 3:
                data = _event(rng)
                try:
                    sent[queue.enqueue(data).event_id] = data
                except QueueFull:
                    refused += 1
            assert len(sent) >= 20, f"only {len(sent)} events fitted on 2 MiB"
            assert queue.queue_depth() == len(sent), "a refused submit left chunks behind"
            queue.close()  # as after a reboot: nobody holds the file open
            # 2. Server and agent start: everything is delivered and deleted, on a full disk.
            server.start()
            sensor.start()
            wait_for(lambda: "sensor_agent_started" in sensor.log_text(), 30, "the agent",
                  sensor)
            queue = DurableQueue(queue_path, reserve_bytes=QUEUE_RESERVE)
            wait_for(lambda: queue.queue_depth() == 0, 60, "the queue to drain", sensor, server)
            wait_for(lambda: len(server.events(SENSOR_ID)) >= len(sent), 30, "the server")
            assert_exactly_once(server, SENSOR_ID, sent)
            # 3. Without help, the queue accepts new events again and they are delivered.
            deadline = time.monotonic() + 30
            more: dict[str, bytes] = {}
            while len(more) < 5:
                data = _event(rng)
                try:
                    more[queue.enqueue(data).event_id] = data
                except QueueFull:
                    assert time.monotonic() < deadline, "the queue never took new events"
                    time.sleep(0.5)
            sent.update(more)
            wait_for(lambda: len(server.events(SENSOR_ID)) >= len(sent), 60, "the new events")
            wait_for(lambda: queue.queue_depth() == 0, 30, "the queue to drain again")
            assert_exactly_once(server, SENSOR_ID, sent)
            assert "queue_delete_failed" not in sensor.log_text()
        finally:
            queue.close()
            sensor.terminate()
            server.terminate()


def test_server_store_on_full_disk_refuses_then_resumes_when_space_is_freed(tmp_path: Path
                                                                           ) -> None:
    rng = random.Random(13)
    with tmpfs(tmp_path / "sdisk", "8m") as disk:
        server = ServerProcess(tmp_path / "server", {SENSOR_ID: TOKEN}, extra_config={
            "store": {"path": str(disk / "server.db"), "reserve_bytes": STORE_RESERVE}})
        sensor = SensorProcess(tmp_path / "sensor", SENSOR_ID, TOKEN,
                               control_url=server.control_url, ingest_url=server.ingest_url)
        server.start()
        ballast = disk / "ballast"
        fill(ballast)
        os.truncate(ballast, ballast.stat().st_size - 900 * 1024)  # room for ~40 events
        sent: dict[str, bytes] = {}
        queue = DurableQueue(sensor.queue_path)
        try:
            for _ in range(120):  # ~2.4 MiB: more than the store's disk holds now
                data = _event(rng)
                sent[queue.enqueue(data).event_id] = data
            sensor.start()
            wait_for(lambda: _metric(server, "pipeline_store_disk_full") == 1.0, 60,
                  "pipeline_store_disk_full to say so", server, sensor)
            time.sleep(3)  # let the checkpointer and the sensor's retries run into it
            assert queue.queue_depth() > 0, "everything fitted: the disk was never full"
            log_text = server.log_text()
            full_lines = log_text.count("store_disk_full")
            assert 1 <= full_lines <= 4, f"{full_lines} full-disk lines in ~3 s"
            assert "request_failed" not in log_text, "a log line per refused request"
            assert _metric(server, 'pipeline_rejected_total{reason="storage_full"}') >= 1
            stored_while_full = len(server.events(SENSOR_ID))
            # Free the space: ingest resumes on its own and the queue drains.
            ballast.unlink()
            wait_for(lambda: queue.queue_depth() == 0, 90, "the queue to drain", server, sensor)
            wait_for(lambda: len(server.events(SENSOR_ID)) >= len(sent), 30, "the server")
            assert_exactly_once(server, SENSOR_ID, sent)
            assert stored_while_full < len(sent)
            assert _metric(server, "pipeline_store_disk_full") == 0.0
            assert "store_disk_recovered" in server.log_text()
        finally:
            queue.close()
            sensor.terminate()
            server.terminate()
