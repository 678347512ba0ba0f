"""The sensor agent over real sockets against a minimal 1.0 server written here.

The server (``MiniServer``) implements only what protocol.md promises a 1.0 sensor: the
control WebSocket with header authentication, a ``chunk_request`` after every heartbeat
that reports a backlog, a ``chunk_ack`` after a chunk is stored, and
``POST /v1/ingest/chunk``. Hooks let a test answer a POST differently (503, 422, 429) or
hold acks back. Queues are real SQLite files; the agent runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
import yaml
from aiohttp import web

from pipeline.common import backoff
from pipeline.common.chunking import reassemble, verify_chunk
from pipeline.common.config import SensorConfig, sensor_config_from_dict
from pipeline.common.errors import PipelineError
from pipeline.common.messages import (
    ChunkAck,
    ChunkRequest,
    Command,
    CommandResponse,
    Envelope,
    Heartbeat,
    IngestResult,
    decode_chunk,
    decode_envelope,
    encode_envelope,
    ingest_result_to_json,
)
from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.submit import open_queue, submit_event
from pipeline.tests.server_support import eventually

SENSOR_ID = "pi-01"
TOKEN = "test-token-0123456789"
SLICE = 64 * 1024

PostHook = Callable[[Any], "tuple[int, dict[str, Any], dict[str, str]] | None"]


# ---------------------------------------------------------------------------------------
# A minimal 1.0 server


class MiniServer:
    """Just enough of the server side of protocol 1.0, on one ephemeral port."""

    def __init__(self, *, capabilities: tuple[str, ...] = ("chunks", "heartbeats"),
                 send_acks: bool = True, max_chunks: int = 16,
                 server_time_offset_s: float | None = None) -> None:
        self.capabilities = capabilities
        self.send_acks = send_acks
        self.max_chunks = max_chunks
        self.server_time_offset_s = server_time_offset_s
        self.post_hook: PostHook | None = None
        self.refuse_handshake = False
        self.chunks: dict[int, Any] = {}
        self.raw_posts: list[dict[str, Any]] = []
        self.duplicates = 0
        self.heartbeats: list[Heartbeat] = []
        self.envelopes: list[Envelope] = []
        self.connections = 0
        self.ws: web.WebSocketResponse | None = None
        self.windows = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def control_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/control"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/ingest/chunk"

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_get("/control", self._control)
        app.router.add_post("/v1/ingest/chunk", self._ingest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- helpers for tests

    def events(self) -> dict[str, bytes]:
        """Every event whose chunks all arrived, reassembled and hash-checked."""
        by_event: dict[str, list[Any]] = defaultdict(list)
        for chunk in self.chunks.values():
            by_event[chunk.event_id].append(chunk)
        done = {}
        for event_id, chunks in by_event.items():
            chunks.sort(key=lambda c: c.chunk_index)
            if len(chunks) == chunks[0].chunk_count:
                done[event_id] = reassemble([c.payload for c in chunks], chunks[0].event_sha256)
        return done

    async def send(self, body: Any) -> None:
        assert self.ws is not None
        await self.ws.send_str(encode_envelope(self._envelope(body)))

    def _envelope(self, body: Any) -> Envelope:
        server_time = None
        if self.server_time_offset_s is not None:
            from datetime import datetime, timezone
            server_time = datetime.fromtimestamp(time.time() + self.server_time_offset_s,
                                                 tz=timezone.utc).isoformat()
        return Envelope(sensor_id=SENSOR_ID, sent_at="2026-11-27T05:00:00+00:00", body=body,
                        capabilities=self.capabilities, server_time=server_time)

    # -- handlers

    async def _control(self, request: web.Request) -> web.StreamResponse:
        if self.refuse_handshake:
            return web.json_response({"error": "unavailable"}, status=503)
        if request.headers.get("X-Sensor-ID") != SENSOR_ID or \
                request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthenticated"}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        self.connections += 1
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            env = decode_envelope(msg.data)
            self.envelopes.append(env)
            if isinstance(env.body, Heartbeat):
                self.heartbeats.append(env.body)
                if env.body.queue_depth > 0:
                    self.windows += 1
                    await ws.send_str(encode_envelope(self._envelope(ChunkRequest(
                        since_sequence=0, max_chunks=self.max_chunks, max_bytes=8 * 1024 * 1024,
                        window_id=f"w{self.windows}", max_in_flight=1000))))
        if self.ws is ws:
            self.ws = None
        return ws

    async def _ingest(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "unauthenticated"}, status=401)
        raw = await request.read()
        self.raw_posts.append(json.loads(raw))
        try:
            chunk = decode_chunk(raw)
            verify_chunk(chunk.payload, chunk.chunk_sha256)
        except PipelineError as exc:
            return web.json_response(exc.to_json(), status=exc.http_status)
        if self.post_hook is not None:
            override = self.post_hook(chunk)
            if override is not None:
                status, body, headers = override
                return web.json_response(body, status=status, headers=headers)
        duplicate = chunk.sequence in self.chunks
        self.duplicates += duplicate
        self.chunks[chunk.sequence] = chunk
        if self.send_acks and self.ws is not None:
            await self.send(ChunkAck(window_id=chunk.window_id,
                                     committed_sequences=(chunk.sequence,)))
        result = IngestResult(stored=not duplicate, duplicate=duplicate, sequence=chunk.sequence,
                              event_id=chunk.event_id, sensor_id=chunk.sensor_id,
                              event_complete=False,
                              last_committed_sequence=max(self.chunks))
        return web.json_response(ingest_result_to_json(result))


# ---------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
async def server() -> AsyncIterator[MiniServer]:
    srv = MiniServer()
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
def no_delays() -> Any:
    backoff.set_testing(True)
    yield
    backoff.set_testing(False)


def config_doc(srv: MiniServer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "sensor_id": SENSOR_ID,
        "token": TOKEN,
        # Long on purpose: windows must keep flowing on the agent's extra heartbeats.
        "heartbeat_interval": 30,
        "capabilities": ["chunks", "heartbeats"],
        "queue": {"path": str(tmp_path / "queue.db"), "slice_size": SLICE},
        "control": {"url": srv.control_url, "ping_interval": 5, "ping_timeout": 5},
        "ingest": {"url": srv.ingest_url, "timeout": 5, "max_parallel": 4},
        "backoff": {"initial_s": 0.05, "max_s": 0.2, "jitter": 0.1},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def make_config(srv: MiniServer, tmp_path: Path, **extra: Any) -> SensorConfig:
    return sensor_config_from_dict(config_doc(srv, tmp_path, **extra))


def fill(queue: DurableQueue, count: int, size: int = 150 * 1024) -> dict[str, bytes]:
    """Enqueue ``count`` incompressible events of ``size`` bytes (3 chunks at 150 KiB)."""
    events = {}
    for _ in range(count):
        data = os.urandom(size)
        events[queue.enqueue(data).event_id] = data
    return events


@asynccontextmanager
async def running(agent: SensorAgent) -> AsyncIterator[SensorAgent]:
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=10)


async def depth(queue: DurableQueue) -> int:
    return await asyncio.to_thread(queue.queue_depth)


# ---------------------------------------------------------------------------------------
# Draining and deleting


async def test_drains_multi_chunk_events_and_empties_queue_only_through_acks(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 12)
    assert queue.queue_depth() == 36
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="empty queue")
    assert server.events() == submitted
    assert agent.acked == 36 and agent.deleted == 36
    assert agent.last_committed_sequence == queue.last_sequence()
    # More windows than the first heartbeat's: the extra heartbeats kept them flowing.
    assert server.windows >= 3
    # A 1.0 server announced no epoch: chunks must not carry one.
    assert all("queue_epoch" not in post for post in server.raw_posts)
    assert all(post["attributes"]["window_id"].startswith("w") for post in server.raw_posts)
    # Heartbeats: first one reports the whole backlog, protocol 1.0 fields only.
    assert server.heartbeats[0].queue_depth == 36
    assert server.heartbeats[0].software_version == config.software_version
    # No body extras for a peer that did not announce them.
    assert all(h.retry_total is None and h.dropped_total is None for h in server.heartbeats)
    queue.close()


async def test_chunk_is_deleted_only_after_its_ack_and_replayed_after_restart(server, tmp_path):
    server.send_acks = False
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 4)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: len(server.chunks) == 12, what="all chunks stored")
        await asyncio.sleep(1.2)  # a tick and an extra heartbeat: nothing may be deleted
        assert await depth(queue) == 12
        assert agent.posted == 12 and agent.acked == 0
        # One late ack: exactly that chunk goes.
        await server.send(ChunkAck(window_id="w1", committed_sequences=(2,)))
        await eventually(lambda: agent.acked == 1, what="ack handled")
        assert await depth(queue) == 11
        assert [c.sequence for c in queue.get([1, 2, 3])] == [1, 3]
    queue.close()

    # A fresh agent on the same file: whatever was not acked is offered again.
    server.send_acks = True
    queue = open_queue(config)
    assert queue.queue_depth() == 11
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="replayed and acked")
    assert server.events() == submitted
    assert server.duplicates == 11  # the server dedupes; the sensor re-sent, as it must
    queue.close()


async def test_http_ack_deletes_on_the_post_answer_when_both_sides_announce_it(tmp_path):
    srv = MiniServer(capabilities=("chunks", "heartbeats", "http_ack", "epoch"), send_acks=False)
    await srv.start()
    try:
        config = make_config(srv, tmp_path,
                             capabilities=["chunks", "heartbeats", "http_ack", "epoch"])
        queue = open_queue(config)
        submitted = fill(queue, 3)
        agent = SensorAgent(config, queue)
        async with running(agent):
            await eventually(lambda: queue.queue_depth() == 0, what="deleted on HTTP answer")
        assert srv.events() == submitted
        assert {post["queue_epoch"] for post in srv.raw_posts} == {queue.epoch}
        assert {env.queue_epoch for env in srv.envelopes} == {queue.epoch}
        queue.close()
    finally:
        await srv.close()


# ---------------------------------------------------------------------------------------
# Failures


async def test_permanent_rejection_quarantines_the_chunk_and_the_rest_drains(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 5)
    bad_sequence = 5  # second event, middle chunk

    def reject(chunk: Any) -> Any:
        if chunk.sequence == bad_sequence:
            return 422, {"error": "event_hash_mismatch", "message": "no"}, {}
        return None

    server.post_hook = reject
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="queue drained")
    quarantined = queue.quarantined()
    assert [(c.sequence, reason) for c, reason in quarantined] == \
        [(bad_sequence, "http_422 event_hash_mismatch")]
    assert agent.quarantined == 1
    bad_event = quarantined[0][0].event_id
    assert server.events() == {k: v for k, v in submitted.items() if k != bad_event}
    assert bad_sequence not in server.chunks
    queue.close()


async def test_transient_failures_are_retried_until_delivered(server, tmp_path, no_delays):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    submitted = fill(queue, 2)
    answers = iter([(503, {"error": "store_unavailable"}, {}),
                    (429, {"error": "throttled"}, {"Retry-After": "0.05"}),
                    (401, {"error": "unauthenticated"}, {}),
                    (500, {"error": "internal"}, {})] * 3)

    def flaky(chunk: Any) -> Any:
        return next(answers, None)

    server.post_hook = flaky
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: queue.queue_depth() == 0, what="delivered after retries")
    assert server.events() == submitted
    assert agent.retries == 12
    assert agent.quarantined == 0 and queue.quarantined_count() == 0
    queue.close()


async def test_network_errors_are_retried(tmp_path, no_delays):
    """Ingest URL pointing at a closed port first, then fixed through the hook-free path:
    the POST fails at the socket, the chunk stays queued, nothing is quarantined."""
    srv = MiniServer()
    await srv.start()
    try:
        closed = MiniServer()
        await closed.start()
        dead_url = closed.ingest_url
        await closed.close()
        config = make_config(srv, tmp_path, ingest={"url": dead_url})
        queue = open_queue(config)
        fill(queue, 1)
        agent = SensorAgent(config, queue)
        async with running(agent):
            await eventually(lambda: agent.retries >= 5, what="retries on refused connection")
        assert queue.queue_depth() == 3
        assert queue.quarantined_count() == 0
        assert agent.abandoned >= 1  # stop() gave the retrying chunks back
        queue.close()
    finally:
        await srv.close()


async def test_reconnects_with_backoff_that_resets_after_success(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: server.connections == 1 and len(server.heartbeats) == 1,
                         what="first connection")
        server.refuse_handshake = True
        assert server.ws is not None
        await server.ws.close()
        await eventually(lambda: agent.connect_failures >= 3, what="refused reconnects")
        assert agent.connect_backoff.attempts >= 3
        server.refuse_handshake = False
        await eventually(lambda: server.connections == 2, what="second connection")
        # The agent resets its backoff once its side of the handshake completes.
        await eventually(lambda: agent.connect_backoff.attempts == 0, what="backoff reset")
        # The new connection works end to end.
        submitted = fill(queue, 1)
        agent.notify_enqueued()
        await eventually(lambda: queue.queue_depth() == 0, what="drained after reconnect")
    assert server.events() == submitted
    assert len(server.heartbeats) >= 2
    queue.close()


async def test_unknown_frames_and_commands_do_not_break_the_channel(server, tmp_path):
    config = make_config(server, tmp_path)
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    async with running(agent):
        await eventually(lambda: server.ws is not None and server.heartbeats, what="connected")
        assert server.ws is not None
        await server.ws.send_str('{"schema_version": "1.0.0", "sensor_id": "pi-01", '
                                 '"sent_at": "x", "body_type": "mystery", "body": {}}')
        await server.ws.send_str("not json")
        await server.send(Command(command_id="c1", name="reboot"))
        await eventually(lambda: any(isinstance(e.body, CommandResponse)
                                     for e in server.envelopes), what="command response")
        reply = next(e.body for e in server.envelopes if isinstance(e.body, CommandResponse))
        assert reply.command_id == "c1" and reply.success is False
        assert agent.bad_frames == 2
        # Still the same connection, still working.
        submitted = fill(queue, 1)
        agent.notify_enqueued()
        await eventually(lambda: queue.queue_depth() == 0, what="drained")
    assert server.connections == 1
    assert server.events() == submitted
    queue.close()


async def test_server_time_gives_clock_skew_in_heartbeats_and_chunks(tmp_path):
    caps = ("chunks", "heartbeats", "server_time", "heartbeat_stats")
    srv = MiniServer(capabilities=caps, server_time_offset_s=3.0)
    await srv.start()
    try:
        config = make_config(srv, tmp_path, capabilities=list(caps))
        queue = open_queue(config)
        fill(queue, 1)
        agent = SensorAgent(config, queue)
        async with running(agent):
            await eventually(lambda: queue.queue_depth() == 0, what="drained")
            # The ack envelopes carried server_time too; the next heartbeat reports it.
            submitted = fill(queue, 1)
            agent.notify_enqueued()
            await eventually(lambda: queue.queue_depth() == 0, what="second event drained")
        assert srv.heartbeats[-1].clock_skew_ms == pytest.approx(3000, abs=250)
        assert srv.raw_posts[-1]["clock_skew_ms"] == pytest.approx(3000, abs=250)
        assert list(srv.events().values())[-1] == next(iter(submitted.values()))
        assert "server_time" in srv.envelopes[0].capabilities
        # Stats go in the body only once the server announced heartbeat_stats too.
        assert srv.heartbeats[0].retry_total is None
        last = srv.heartbeats[-1]
        assert (last.retry_total, last.dropped_total, last.quarantined_total) == (0, 0, 0)
        queue.close()
    finally:
        await srv.close()


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
