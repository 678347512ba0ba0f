"""A minimal 1.0 server and helpers for the sensor agent tests over real sockets.

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
import time
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
from aiohttp import web

from pipeline.common.chunking import reassemble, verify_chunk
from pipeline.common.config import SensorConfig, sensor_config_from_dict
from pipeline.common.errors import PipelineError
from pipeline.common.messages import (
    ChunkAck,
    ChunkRequest,
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
async def serving(server: MiniServer) -> AsyncIterator[MiniServer]:
    """``server`` started on its ephemeral port, closed afterwards (the tests' fixture)."""
    await server.start()
    try:
        yield server
    finally:
        await server.close()


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

