"""Shared pieces of the server tests: configuration, a running server, and a minimal
protocol 1.0 sensor written from protocol.md alone (JSON, no extra capabilities, deletes
only on ChunkAck, never re-sends an in-flight chunk under another window id)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp
from prometheus_client import CollectorRegistry

from pipeline.common.chunking import split_event
from pipeline.common.config import ServerConfig, server_config_from_dict
from pipeline.server.app import PipelineServer


TOKENS = {"pi-01": "test-token-pi-01", "pi-02": "test-token-pi-02"}
STREAM_TOKEN = "test-stream-token"


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0,
                     what: str = "condition", interval: float = 0.02) -> None:
    """Poll ``predicate`` (sync or async) until it is true; AssertionError naming ``what``
    after ``timeout`` seconds. The one polling helper of the test suite."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


def server_config(tmp_path: Path, **sections: dict[str, Any]) -> ServerConfig:
    """Ephemeral ports, a store in ``tmp_path``, two sensors; ``sections`` update the doc."""
    doc: dict[str, Any] = {
        "store": {"path": str(tmp_path / "server.db"), "reserve_bytes": 1024 * 1024},
        "control": {"port": 0},
        "ingest": {"port": 0},
        "stream": {"port": 0},
        "auth": {"sensors": [{"id": sid, "token": tok} for sid, tok in TOKENS.items()]},
        "scheduler": {"window_timeout_s": 0.6, "quiet_s": 0.2},
        "heartbeat": {"interval_s": 5.0},
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    return server_config_from_dict(doc)


@asynccontextmanager
async def running_server(config: ServerConfig) -> AsyncIterator[PipelineServer]:
    server = PipelineServer(config, registry=CollectorRegistry())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def urls(server: PipelineServer) -> dict[str, str]:
    return {"control": f"ws://127.0.0.1:{server.control_port}/control",
            "ingest": f"http://127.0.0.1:{server.ingest_port}",
            "stream": f"ws://127.0.0.1:{server.stream_port}/"}


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def chunk_docs(sensor_id: str, data: bytes, first_sequence: int, *,
               logical_timestamp_ms: int | None = None, event_id: str | None = None
               ) -> tuple[str, list[dict[str, Any]]]:
    """The 1.0 chunk JSON documents of one event (without ``attributes.window_id``)."""
    split = split_event(data, event_id=event_id)
    ts = logical_timestamp_ms if logical_timestamp_ms is not None else int(time.time() * 1000)
    docs = []
    for offset, piece in enumerate(split.pieces):
        docs.append({
            "schema_version": "1.0.0", "sensor_id": sensor_id, "event_id": split.event_id,
            "sequence": first_sequence + offset, "chunk_index": piece.index,
            "chunk_count": piece.count, "compression": "gzip",
            "payload": base64.b64encode(piece.payload).decode("ascii"),
            "chunk_sha256": base64.b64encode(piece.chunk_sha256).decode("ascii"),
            "event_sha256": base64.b64encode(split.event_sha256).decode("ascii"),
            "created_at": iso_now(), "logical_timestamp_ms": ts, "clock_skew_ms": 0.0,
            "attributes": {},
        })
    return split.event_id, docs


def envelope(sensor_id: str, body_type: str, body: dict[str, Any]) -> str:
    return json.dumps({"schema_version": "1.0.0", "sensor_id": sensor_id, "sent_at": iso_now(),
                       "capabilities": ["chunks", "heartbeats"], "body_type": body_type,
                       "body": body})


@dataclass
class Record:
    kind: str          # "request", "ack", "post", "dropped"
    at: float
    data: Any


@dataclass
class MiniSensor:
    """A protocol 1.0 sensor reduced to what protocol.md states."""

    http: aiohttp.ClientSession
    server: PipelineServer
    sensor_id: str
    token: str
    drop_once: set[int] = field(default_factory=set)
    on_ack: Callable[[list[int]], None] | None = None
    queue: dict[int, dict[str, Any]] = field(default_factory=dict)
    in_flight: dict[int, str] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    next_sequence: int = 1
    ws: aiohttp.ClientWebSocketResponse | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def enqueue(self, data: bytes, logical_timestamp_ms: int | None = None,
                attributes: dict[str, str] | None = None) -> str:
        event_id, docs = chunk_docs(self.sensor_id, data, self.next_sequence,
                                    logical_timestamp_ms=logical_timestamp_ms)
        for doc in docs:
            doc["attributes"].update(attributes or {})
            self.queue[doc["sequence"]] = doc
        self.next_sequence += len(docs)
        return event_id

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def connect(self) -> None:
        self.ws = await self.http.ws_connect(
            urls(self.server)["control"], headers={"X-Sensor-ID": self.sensor_id, **self.auth})
        self._spawn(self._read())
        await self.heartbeat()

    async def heartbeat(self) -> None:
        assert self.ws is not None
        await self.ws.send_str(envelope(self.sensor_id, "heartbeat", {
            "software_version": "mini-1.0", "last_committed_sequence": 0,
            "queue_depth": len(self.queue), "clock_skew_ms": 0.0}))

    async def heartbeat_every(self, interval: float) -> None:
        while self.ws is not None and not self.ws.closed:
            await asyncio.sleep(interval)
            if self.ws.closed:
                return
            await self.heartbeat()

    def start_heartbeats(self, interval: float) -> None:
        self._spawn(self.heartbeat_every(interval))

    async def drained(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.queue:
            assert time.monotonic() < deadline, f"queue not drained: {sorted(self.queue)}"
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals ------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            doc = json.loads(msg.data)
            self.frames.append(doc)
            body = doc["body"]
            if doc["body_type"] == "chunk_request":
                self.records.append(Record("request", time.monotonic(), body))
                self._spawn(self._answer(body))
            elif doc["body_type"] == "chunk_ack":
                seqs = list(body["committed_sequences"])
                self.records.append(Record("ack", time.monotonic(), body))
                if self.on_ack is not None:
                    self.on_ack(seqs)
                for seq in seqs:  # deleted only now
                    self.queue.pop(seq, None)
                    self.in_flight.pop(seq, None)

    def _pick(self, body: dict[str, Any]) -> list[int]:
        window_id = body["window_id"]
        picked: list[int] = []
        size = 0
        for seq in sorted(self.queue):
            if seq <= body["since_sequence"]:
                continue
            owner = self.in_flight.get(seq)
            if owner is not None and owner != window_id:
                continue  # in flight under another window: only a same-id request re-sends
            if owner is None and len(self.in_flight) >= body["max_in_flight"]:
                break
            nbytes = len(self.queue[seq]["payload"])
            if len(picked) >= body["max_chunks"] or (picked and size + nbytes > body["max_bytes"]):
                break
            picked.append(seq)
            size += nbytes
            self.in_flight[seq] = window_id
        return picked

    async def _answer(self, body: dict[str, Any]) -> None:
        for seq in self._pick(body):
            await self.post(seq, body["window_id"])

    async def post(self, seq: int, window_id: str) -> int:
        if seq in self.drop_once:
            self.drop_once.discard(seq)
            self.records.append(Record("dropped", time.monotonic(), seq))
            return 0
        queued = self.queue[seq]
        doc = dict(queued, attributes={**queued["attributes"], "window_id": window_id})
        delay = 0.05
        while True:
            async with self.http.post(urls(self.server)["ingest"] + "/v1/ingest/chunk",
                                      json=doc, headers=self.auth) as resp:
                answer = await resp.json()
                status = resp.status
            self.records.append(Record("post", time.monotonic(), (seq, status, answer)))
            if status < 500 and status != 429:
                return status
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
