"""Reload and rotation against a real ``pipeline-server`` process.

SIGHUP re-reads the configuration file: a revoked sensor's open control connection is
closed with 1008 while another sensor's keeps going; the file watch does the same without
a signal. ``pipeline-server token rotate`` rotates a real agent's token through the running
server's admin API; nothing secret reaches stdout or the server log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import yaml

from pipeline.common.config import sensor_config_from_dict
from pipeline.tests.security_support import enqueue, running_agent
from pipeline.tests.server_support import eventually
from pipeline.tests.server_support import envelope

ADMIN = "proc-admin-token-0123456789"
TOK = {"pi-01": "proc-tok-pi-01-0123456789", "pi-02": "proc-tok-pi-02-0123456789",
       "pi-02-new": "proc-tok-pi-02-next-0123456789"}


def write_config(path: Path, base: Path, sensors: list[dict[str, Any]], watch: float) -> None:
    path.write_text(yaml.safe_dump({
        "store": {"path": str(base / "server.db")},
        "control": {"port": 0}, "ingest": {"port": 0}, "stream": {"port": 0},
        "auth": {"sensors": sensors, "admin_token": ADMIN, "reload_watch_s": watch},
        "heartbeat": {"interval_s": 5.0},
        "limits": {"auth_failures_before_ban": 0},
    }))


@asynccontextmanager
async def server_process(config: Path, log: Path
                         ) -> AsyncIterator[tuple[subprocess.Popen, dict[str, int]]]:
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.server", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        ports: dict[str, int] = {}
        deadline = time.monotonic() + 20
        while not ports:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            match = re.search(r"server_started control_port=(\d+) ingest_port=(\d+) "
                              r"stream_port=(\d+)", log.read_text())
            if match:
                ports = dict(zip(("control", "ingest", "stream"), map(int, match.groups())))
            else:
                await asyncio.sleep(0.05)
        yield proc, ports
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 15)
    assert proc.returncode == 0, log.read_text()[-3000:]


async def connect(http, port: int, sensor_id: str, token: str):
    ws = await http.ws_connect(f"ws://127.0.0.1:{port}/control",
                               headers={"X-Sensor-ID": sensor_id,
                                        "Authorization": f"Bearer {token}"})
    await ws.send_str(envelope(sensor_id, "heartbeat", {
        "software_version": "p", "last_committed_sequence": 0, "queue_depth": 0,
        "clock_skew_ms": 0.0}))
    return ws


async def first_close(ws, timeout: float = 8.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = await ws.receive(timeout=max(0.05, deadline - time.monotonic()))
        except TimeoutError:
            return None
        if msg.type is aiohttp.WSMsgType.CLOSE:
            return msg.data
        if msg.type is aiohttp.WSMsgType.CLOSED:
            return ws.close_code
    return None


async def connected(http, ingest_port: int) -> dict[str, bool]:
    async with http.get(f"http://127.0.0.1:{ingest_port}/v1/sensors") as resp:
        return {s["sensor_id"]: s["connected"] for s in (await resp.json())["sensors"]}


def assert_no_secret_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text


async def test_sighup_revokes_one_sensor_and_keeps_the_other(tmp_path):
    config = tmp_path / "server.yml"
    sensors = [{"id": "pi-01", "token": TOK["pi-01"]}, {"id": "pi-02", "token": TOK["pi-02"]}]
    write_config(config, tmp_path, sensors, watch=0)
    async with server_process(config, tmp_path / "server.log") as (proc, ports):
        async with aiohttp.ClientSession() as http:
            keep = await connect(http, ports["control"], "pi-01", TOK["pi-01"])
            doomed = await connect(http, ports["control"], "pi-02", TOK["pi-02"])
            await asyncio.sleep(0.3)
            assert await connected(http, ports["ingest"]) == {"pi-01": True, "pi-02": True}
            # pi-02's token is replaced in the file; SIGHUP makes it count.
            write_config(config, tmp_path, [sensors[0], {"id": "pi-02",
                                                         "token": TOK["pi-02-new"]}], watch=0)
            proc.send_signal(signal.SIGHUP)
            assert await first_close(doomed) == 1008
            await keep.send_str(envelope("pi-01", "heartbeat", {
                "software_version": "p", "last_committed_sequence": 0, "queue_depth": 0,
                "clock_skew_ms": 0.0}))
            assert not keep.closed
            state = await connected(http, ports["ingest"])
            assert state["pi-01"] is True and state["pi-02"] is False
            try:
                await connect(http, ports["control"], "pi-02", TOK["pi-02"])
                raise AssertionError("the revoked token still connects")
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 401
            again = await connect(http, ports["control"], "pi-02", TOK["pi-02-new"])
            await asyncio.sleep(0.2)
            assert (await connected(http, ports["ingest"]))["pi-02"] is True
            await again.close()
            await keep.close()
    assert_no_secret_in((tmp_path / "server.log").read_text(), *TOK.values(), ADMIN)


async def test_file_watch_reloads_without_a_signal(tmp_path):
    config = tmp_path / "server.yml"
    sensors = [{"id": "pi-01", "token": TOK["pi-01"]}, {"id": "pi-02", "token": TOK["pi-02"]}]
    write_config(config, tmp_path, sensors, watch=0.2)
    async with server_process(config, tmp_path / "server.log") as (_, ports):
        async with aiohttp.ClientSession() as http:
            doomed = await connect(http, ports["control"], "pi-02", TOK["pi-02"])
            await asyncio.sleep(0.3)
            write_config(config, tmp_path, sensors[:1], watch=0.2)
            assert await first_close(doomed) == 1008
    assert "config_reloaded reason=file_changed" in (tmp_path / "server.log").read_text()


async def test_token_rotate_command_rotates_a_real_agent(tmp_path):
    config = tmp_path / "server.yml"
    write_config(config, tmp_path, [{"id": "pi-01", "token": TOK["pi-01"]}], watch=0)
    token_file = tmp_path / "pi-01.token"
    token_file.write_text(TOK["pi-01"] + "\n")
    async with server_process(config, tmp_path / "server.log") as (_, ports):
        agent_config = sensor_config_from_dict({
            "sensor_id": "pi-01", "token_file": str(token_file), "heartbeat_interval": 2.0,
            "capabilities": ["chunks", "heartbeats", "epoch", "rotation"],
            "queue": {"path": str(tmp_path / "queue.db"), "slice_size": 65536},
            "control": {"url": f"ws://127.0.0.1:{ports['control']}/control"},
            "ingest": {"url": f"http://127.0.0.1:{ports['ingest']}/v1/ingest/chunk"},
            "backoff": {"initial_s": 0.05, "max_s": 0.3, "jitter": 0.1}})
        async with running_agent(agent_config) as (agent, queue):
            await eventually(lambda: agent.connected and agent.heartbeats > 0, what="agent up")
            env = {**os.environ, "PIPELINE_ADMIN_TOKEN": ADMIN}
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "pipeline.server", "--config", str(config), "token",
                 "rotate", "pi-01", "--url", f"http://127.0.0.1:{ports['ingest']}",
                 "--overlap-s", "60"],
                capture_output=True, text=True, env=env, timeout=30)
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            new_token = token_file.read_text().strip()
            assert answer["status"] == 200 and answer["confirmed"] is True
            assert new_token.startswith("oux_") and new_token != TOK["pi-01"]
            assert_no_secret_in(done.stdout + done.stderr, new_token, ADMIN, TOK["pi-01"])
            ids = enqueue(queue, agent, 3)
            await eventually(lambda: queue.queue_depth() == 0, what="drained after rotation")
            assert agent.connects == 1 and len(ids) == 3
        # Without the admin token the command refuses before sending anything.
        bad = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "pipeline.server", "token", "rotate", "pi-01", "--url",
             f"http://127.0.0.1:{ports['ingest']}"],
            capture_output=True, text=True,
            env={k: v for k, v in os.environ.items() if k != "PIPELINE_ADMIN_TOKEN"},
            timeout=30)
        assert bad.returncode == 2 and "PIPELINE_ADMIN_TOKEN" in bad.stderr
    log = (tmp_path / "server.log").read_text()
    assert "token_rotated sensor_id=pi-01" in log
    assert_no_secret_in(log, new_token, ADMIN, TOK["pi-01"])
