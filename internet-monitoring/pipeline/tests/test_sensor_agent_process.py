"""The sensor agent while events are submitted (CLI, API, local HTTP) and as a real process,
against the minimal 1.0 server of sensor_agent_support."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import AsyncIterator

import aiohttp
import pytest
import yaml

from pipeline.common.config import sensor_config_from_dict
from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.submit import open_queue, submit_event
from pipeline.tests.sensor_agent_support import (
    SENSOR_ID,
    MiniServer,
    config_doc,
    fill,
    make_config,
    running,
    serving,
)
from pipeline.tests.server_support import eventually


@pytest.fixture
async def server() -> AsyncIterator[MiniServer]:
    async with serving(MiniServer()) as srv:
        yield srv


# ---------------------------------------------------------------------------------------
# Submitting while the agent runs


async def test_submit_cli_in_another_process_while_agent_runs(server, tmp_path):
    doc = config_doc(server, tmp_path)
    config_path = tmp_path / "sensor.yml"
    config_path.write_text(yaml.safe_dump(doc))
    config = sensor_config_from_dict(doc)
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    data = os.urandom(200 * 1024)
    event_file = tmp_path / "event.bin"
    event_file.write_bytes(data)
    async with running(agent):
        await eventually(lambda: server.heartbeats, what="connected")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline.sensor", "submit", "--config", str(config_path),
            str(event_file), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=20)
        assert proc.returncode == 0, err.decode()
        event_id = out.decode().strip()
        assert len(event_id) == 32
        # Same again from standard input, with an attribute.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline.sensor", "submit", "--config", str(config_path),
            "-", "--attr", "kind=speedtest", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(b'{"down_mbps": 93.1}'), timeout=20)
        assert proc.returncode == 0, err.decode()
        stdin_event_id = out.decode().strip()
        await eventually(lambda: {event_id, stdin_event_id} <= set(server.events()),
                         what="submitted events delivered")
        await eventually(lambda: queue.queue_depth() == 0, what="queue drained")
    assert server.events()[event_id] == data
    assert server.events()[stdin_event_id] == b'{"down_mbps": 93.1}'
    stdin_chunk = next(c for c in server.chunks.values() if c.event_id == stdin_event_id)
    assert stdin_chunk.attributes["kind"] == "speedtest"
    queue.close()


async def test_stop_interrupts_a_hanging_connect(tmp_path):
    """A server that accepts TCP and never answers the handshake must not delay stop()."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    blackhole = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = blackhole.sockets[0].getsockname()[1]
    srv = MiniServer()
    srv.port = port
    config = make_config(srv, tmp_path)
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    task = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: accepted, what="TCP accepted")
        await asyncio.sleep(0.2)
        assert agent.connects == 0
        started = time.monotonic()
        agent.stop()
        await asyncio.wait_for(task, timeout=5)
        assert time.monotonic() - started < 1.0
    finally:
        for writer in accepted:
            writer.close()
        blackhole.close()
        await blackhole.wait_closed()
        queue.close()


async def test_submit_api_and_local_http_endpoint(server, tmp_path):
    config = make_config(server, tmp_path, submit={"listen": "127.0.0.1:0"})
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: agent.submit_port is not None and server.heartbeats,
                         what="submit endpoint up")
        url = f"http://127.0.0.1:{agent.submit_port}/v1/submit"
        async with aiohttp.ClientSession() as client:
            async with client.post(url, data=b'{"ping_ms": 12.5}',
                                   params={"kind": "ping"}) as resp:
                assert resp.status == 202
                via_http = (await resp.json())["event_id"]
            async with client.post(url, data=b"x", params={"window_id": "w9"}) as resp:
                assert resp.status == 400
                assert (await resp.json())["field"] == "attributes.window_id"
            async with client.post(url, data=os.urandom(17 * 1024 * 1024)) as resp:
                assert resp.status == 413
                assert (await resp.json())["error"] == "too_large"
        via_api = await asyncio.to_thread(submit_event, config, b"api-event",
                                          attributes={"kind": "dns"})
        await eventually(lambda: {via_http, via_api} <= set(server.events()),
                         what="both events delivered")
    events = server.events()
    assert events[via_http] == b'{"ping_ms": 12.5}'
    assert events[via_api] == b"api-event"
    attrs = {c.event_id: dict(c.attributes) for c in server.chunks.values()}
    assert attrs[via_http]["kind"] == "ping" and attrs[via_api]["kind"] == "dns"
    queue.close()


# ---------------------------------------------------------------------------------------
# The real process


async def test_process_exits_zero_promptly_on_sigterm_and_keeps_unsent_chunks(server, tmp_path):
    server.post_hook = lambda chunk: (503, {"error": "store_unavailable"}, {})
    doc = config_doc(server, tmp_path)
    config_path = tmp_path / "sensor.yml"
    config_path.write_text(yaml.safe_dump(doc))
    queue = open_queue(sensor_config_from_dict(doc))
    fill(queue, 2)
    queue.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.sensor", "run", "--config", str(config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await eventually(lambda: len(server.raw_posts) >= 6, timeout=20,
                         what="process posting (and being refused)")
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
        elapsed = time.monotonic() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert elapsed < 3.0
    assert b"sensor_agent_stopped" in err
    with DurableQueue(doc["queue"]["path"]) as reopened:
        assert reopened.queue_depth() == 6
        assert reopened.quarantined_count() == 0


async def test_process_config_error_exits_nonzero_with_the_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"sensor_id": SENSOR_ID, "token": "t",
                                   "control": {"url": "http://nope"}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.sensor", "run", "--config", str(bad),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 2
    assert b"control.url" in err
