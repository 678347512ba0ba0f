"""Acceptance 4 of issue 12: I/O errors injected under real processes.

``powerfs`` (``sim/powerfs.py``) fails writes or fsyncs of the files on its mount with
EIO or ENOSPC, once or until cleared. One side of a real sensor/server pair keeps its
database there:

* server: while every fsync of the store fails, ingest answers 503 and nothing is acked
  (the sensor's queue keeps everything); the error is counted in
  ``pipeline_store_write_errors_total`` and logged, once per interval; once the fault
  clears, every event arrives exactly once.
* sensor: a one-off write error fails one submit cleanly (and the next one works); while
  every fsync of the queue fails, delivered events cannot be deleted, so they stay queued
  (``sensor_queue_write_errors_total`` counts it); once the fault clears the queue drains
  and the server holds every event exactly once.
"""

from __future__ import annotations

import random
import re
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.common.errors import QueueError, QueueFull
from pipeline.sensor.queue import DurableQueue
from pipeline.sim.powerfs import PowerFS
from pipeline.sim.processes import SensorProcess, ServerProcess, free_port
from pipeline.tests.disk_support import assert_exactly_once, require_fuse, wait_for

SENSOR_ID = "io-1"
TOKEN = "token-io-1-" + "x" * 24
EVENTS = 30


@pytest.fixture
def fuse() -> None:
    require_fuse()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def _fill(queue: DurableQueue, rng: random.Random, count: int) -> dict[str, bytes]:
    sent = {}
    for _ in range(count):
        data = rng.randbytes(rng.randint(200, 6000))
        sent[queue.enqueue(data).event_id] = data
    return sent


def test_store_write_and_fsync_errors_ack_nothing_and_delivery_completes_after(
        fuse: None, tmp_path: Path) -> None:
    rng = random.Random(4)
    with PowerFS(tmp_path / "mnt") as fs:
        server = ServerProcess(tmp_path / "server", {SENSOR_ID: TOKEN}, extra_config={
            "store": {"path": str(fs.mountpoint / "server.db"), "reserve_bytes": 64 * 1024}})
        sensor = SensorProcess(tmp_path / "sensor", SENSOR_ID, TOKEN,
                               control_url=server.control_url, ingest_url=server.ingest_url)
        queue = DurableQueue(sensor.queue_path)
        try:
            sent = _fill(queue, rng, EVENTS)
            server.start()
            # Persistent: every fsync of the store fails. The server cannot persist a
            # window, so it asks for nothing and acks nothing; the sensor keeps it all.
            fs.fail("fsync", "EIO", count=None, match="server.db")
            sensor.start()
            metrics = server.http_base + "/metrics"
            wait_for(lambda: _sample(_scrape(metrics), "pipeline_store_write_errors_total",
                                  kind="io_error") >= 3, 30, "store I/O errors", server)
            time.sleep(1)
            assert server.events(SENSOR_ID) == [], "an event was stored without its fsync"
            assert queue.queue_depth() == EVENTS, "a chunk was deleted without a durable ack"
            log_text = server.log_text()
            assert log_text.count("store_io_error") <= 2, "the I/O error log is not limited"
            assert "store_io_error" in log_text
            fs.clear()
            wait_for(lambda: queue.queue_depth() == 0, 60, "the queue to drain", server, sensor)
            assert_exactly_once(server, SENSOR_ID, sent)
            # One-off faults (EIO and ENOSPC, writes and fsyncs) while a backlog drains.
            more = _fill(queue, rng, 300)
            sent.update(more)
            injected = fs.status()["faults_injected"]
            for index in range(20):
                fs.fail(("fsync", "write")[index % 2], ("EIO", "ENOSPC")[index // 2 % 2],
                        count=1, match="server.db")
                time.sleep(0.1)
            wait_for(lambda: queue.queue_depth() == 0, 90, "the queue to drain again",
                  server, sensor)
            assert_exactly_once(server, SENSOR_ID, sent)
            assert fs.status()["faults_injected"] > injected
        finally:
            queue.close()
            sensor.terminate()
            server.terminate()


def test_queue_write_and_fsync_errors_lose_nothing_and_the_queue_drains_after(
        fuse: None, tmp_path: Path) -> None:
    rng = random.Random(5)
    with PowerFS(tmp_path / "mnt") as fs:
        server = ServerProcess(tmp_path / "server", {SENSOR_ID: TOKEN})
        metrics_port = free_port()
        queue_path = fs.mountpoint / "queue.db"
        sensor = SensorProcess(tmp_path / "sensor", SENSOR_ID, TOKEN,
                               control_url=server.control_url, ingest_url=server.ingest_url,
                               extra_config={"queue": {"path": str(queue_path),
                                                       "reserve_bytes": 64 * 1024},
                                             "metrics": {"listen": f"127.0.0.1:{metrics_port}"}})
        queue = DurableQueue(queue_path, reserve_bytes=64 * 1024)
        try:
            sent = _fill(queue, rng, EVENTS)
            # One-off write error: that submit fails cleanly, the next one is accepted.
            fs.fail("write", "EIO", count=1, match="queue.db")
            with pytest.raises(QueueError) as failed:
                queue.enqueue(b"lost to a write error")
            assert not isinstance(failed.value, QueueFull)
            sent.update(_fill(queue, rng, 1))
            assert queue.queue_depth() == EVENTS + 1
            assert queue.health.counts().get(("enqueue", "io_error")) == 1
            # Persistent fsync errors while the agent delivers: nothing can be deleted.
            fs.fail("fsync", "EIO", count=None, match="queue.db")
            server.start()
            sensor.start()
            wait_for(lambda: len(server.events(SENSOR_ID)) >= len(sent), 60, "delivery",
                  server, sensor)
            scrape = f"http://127.0.0.1:{metrics_port}/metrics"
            wait_for(lambda: _sample(_scrape(scrape), "sensor_queue_write_errors_total",
                                  kind="io_error", operation="delete") >= 1, 30,
                  "the sensor's delete errors", sensor)
            assert queue.queue_depth() == len(sent), "a delete went through a failed fsync"
            assert "queue_io_error" in sensor.log_text()
            fs.clear()
            wait_for(lambda: queue.queue_depth() == 0, 90, "the queue to drain", sensor, server)
            assert_exactly_once(server, SENSOR_ID, sent)
        finally:
            queue.close()
            sensor.terminate()
            server.terminate()
