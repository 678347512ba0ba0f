"""Health endpoints and structured logs.

``/readyz`` goes 503 when the store is made read-only for real: as root (where chmod does
not stop writes) the store's files and directory get the immutable attribute
(``chattr +i``, enforced by the kernel for root too), otherwise they are chmod-ed
read-only. The SQLite ``-shm`` file is left alone: SQLite maps it, and a write through the
map to an immutable file would kill the process with SIGBUS instead of failing a query.

Logs: a full ingest (real agent, real server, a refused token on each listener) is
captured at DEBUG through both formatters and must never contain a token; lines carry
``sensor_id``/``window_id``/``sequence``/``event_id`` where they concern one; the JSON
flag of both programs yields one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
import yaml

from pipeline.common.logs import JsonFormatter, KeyValueFormatter
from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.submit import open_queue
from pipeline.tests.conftest import on_ci
from pipeline.tests.observability_support import (
    RunningAgent,
    agent_config,
    event_docs,
    post_doc,
    wait_for,
)
from pipeline.tests.server_support import running_server, server_config, urls

SECRET = "tok-Secret-7f3a9c41e2b8d6054f1a"
WRONG = "wrong-Secret-0b1c2d3e4f5a6b7c8d9e"


# ---------------------------------------------------------------------------------------
# /healthz and /readyz


def _immutable(paths: list[Path], on: bool) -> None:
    flag = "+i" if on else "-i"
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True,
                   timeout=10)


@contextmanager
def read_only(paths: list[Path]) -> Iterator[str]:
    """Make ``paths`` unwritable for this process; yields how."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p in paths:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield "chmod"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None:
        message = "needs chattr (e2fsprogs) to make a file read-only for root"
        pytest.fail(message) if on_ci() else pytest.skip(message)
    try:
        _immutable(paths, True)
    except subprocess.CalledProcessError as exc:
        message = f"chattr +i refused here: {exc.stderr.decode().strip()}"
        pytest.fail(message) if on_ci() else pytest.skip(message)
    try:
        yield "chattr +i"
    finally:
        _immutable(paths, False)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


async def test_readyz_goes_503_while_the_store_is_read_only(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    config = server_config(tmp_path, store={"path": str(store_dir / "server.db")})
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        base = urls(server)["ingest"]
        assert await get(http, base + "/readyz") == (200, {"status": "ready"})
        db = store_dir / "server.db"
        wal = store_dir / "server.db-wal"
        assert db.exists() and wal.exists()

        with read_only([db, wal, store_dir]):
            status, doc = await get(http, base + "/readyz")
            assert status == 503 and doc["error"] == "store_unavailable"
            assert "not writable" in doc["message"]
            assert await get(http, base + "/healthz") == (200, {"status": "alive"})
        assert await get(http, base + "/readyz") == (200, {"status": "ready"})

        if os.geteuid() == 0:
            # Only the write-ahead log refuses writes: the path checks pass and the write
            # itself fails; readiness comes back once the file is writable again.
            with read_only([wal]):
                status, doc = await get(http, base + "/readyz")
                assert status == 503 and doc["error"] == "store_unavailable"
            await wait_for(lambda: _ready(http, base), timeout=5)


async def _ready(http: aiohttp.ClientSession, base: str) -> bool:
    return (await get(http, base + "/readyz"))[0] == 200


# ---------------------------------------------------------------------------------------
# Logs


class Capture(logging.Handler):
    """Formats every record with both of the project's formatters."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.kv = KeyValueFormatter()
        self.json = JsonFormatter()
        self.lines: list[str] = []
        self.docs: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.kv.format(record))
        line = self.json.format(record)
        self.lines.append(line)
        self.docs.append(json.loads(line))


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_tokens_never_reach_the_logs(tmp_path: Path, captured: Capture) -> None:
    config = server_config(tmp_path, auth={"sensors": [{"id": "pi-01", "token": SECRET}]})
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        sensor = agent_config(server, tmp_path, "pi-01", SECRET)
        queue = open_queue(sensor)
        try:
            for i in range(3):
                queue.enqueue(json.dumps({"test": "speed", "i": i}).encode() + os.urandom(150_000))
            agent = SensorAgent(sensor, queue)
            async with RunningAgent(agent):
                await wait_for(lambda: server.store.event_count() == 3, timeout=15)
                await wait_for(lambda: queue.queue_depth() == 0, timeout=10)
                # Refused credentials on each listener.
                _, (doc,) = event_docs("pi-01", {"x": 1}, 100)
                assert (await post_doc(http, server, doc, WRONG))[0] == 401
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await http.ws_connect(urls(server)["control"], headers={
                        "X-Sensor-ID": "pi-01", "Authorization": f"Bearer {WRONG}"})
                async with http.get(urls(server)["ingest"] + "/v1/snapshots",
                                    headers={"Authorization": f"Bearer {WRONG}"}) as resp:
                    assert resp.status in (200, 401)
                # A chunk refused by the store logs its coordinates.
                bad = dict(doc, chunk_sha256=doc["event_sha256"],
                           attributes={"window_id": "w-obs"})
                assert (await post_doc(http, server, bad, SECRET))[0] == 422
        finally:
            queue.close()
    assert len(captured.lines) > 40
    for line in captured.lines:
        assert SECRET not in line and WRONG not in line, line
    # The hints that do appear are not reversible into the token.
    assert SECRET[:12] not in "\n".join(captured.lines)

    def records(event: str) -> list[dict]:
        return [d for d in captured.docs if d["msg"].split(" ", 1)[0] == event]

    completed = [d for d in records("event_completed") if d["logger"] == "pipeline.server.app"]
    assert len(completed) == 3
    assert all(d["sensor_id"] == "pi-01" and len(d["event_id"]) == 32 for d in completed)
    (rejected,) = [d for d in records("chunk_rejected") if "window_id" in d]
    assert (rejected["sensor_id"], rejected["window_id"], rejected["sequence"],
            rejected["event_id"]) == ("pi-01", "w-obs", "100", doc["event_id"])
    # Every line the agent logged names its sensor (bound context), e.g. its start line.
    agent_docs = [d for d in captured.docs if d["logger"] == "pipeline.sensor.agent"]
    assert agent_docs and all(d.get("sensor_id") == "pi-01" for d in agent_docs)


def test_the_server_logs_json_lines_with_the_flag(tmp_path: Path) -> None:
    config = {"store": {"path": str(tmp_path / "server.db")},
              "control": {"port": 0}, "ingest": {"port": 0}, "stream": {"port": 0},
              "auth": {"sensors": [{"id": "pi-01", "token": SECRET}]},
              "logging": {"level": "INFO", "format": "json"}}
    path = tmp_path / "server.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.server", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("dashboard: http://"), line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    docs = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert docs and all({"ts", "level", "logger", "msg"} <= set(d) for d in docs)
    (started,) = [d for d in docs if d["msg"].startswith("server_started ")]
    assert started["level"] == "info" and int(started["ingest_port"]) > 0
    assert any(d["msg"] == "server_stopped" for d in docs)
    assert SECRET not in err


def test_the_sensor_cli_logs_json_lines_with_the_flag(tmp_path: Path) -> None:
    config = {"sensor_id": "pi-01", "token": SECRET,
              "queue": {"path": str(tmp_path / "queue.db")}}
    path = tmp_path / "sensor.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.sensor", "--log-format", "json", "submit",
         "--config", str(path), "-"], input=b'{"test": "dns"}', capture_output=True,
        timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    event_id = result.stdout.decode().strip()
    docs = [json.loads(line) for line in result.stderr.decode().splitlines() if line.strip()]
    (submitted,) = [d for d in docs if d["msg"].startswith("event_submitted ")]
    assert submitted["sensor_id"] == "pi-01" and submitted["event_id"] == event_id
    assert SECRET not in result.stderr.decode()
