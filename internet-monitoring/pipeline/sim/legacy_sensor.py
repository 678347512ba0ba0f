"""A protocol 1.0 sensor, as deployed sensors behave, written from protocol.md alone.

Why it exists: the sensors already in the field run an agent we cannot change, and the
server must drain them on bad links. This emulator keeps every rule of protocol.md section 1
and 2 that makes such an agent hard to serve, so tests and ``pipeline-sim`` can hold the
server to them:

* JSON only, the 1.0 envelope and bodies with exactly their fields, capabilities
  ``["chunks", "heartbeats"]``; an unknown field inside a server body drops the connection.
* Control messages are read **only between windows**: a background reader answers pings
  and buffers at most ``max_queue`` (32) messages, as the ``websockets`` client of the
  deployed agent does; beyond that it stops reading. The agent takes one message, and
  for a ``chunk_request`` POSTs the whole window (retrying every POST for ever, 0.5 s
  doubling to 30 s, +/-10 %) before it looks at the next message.
* It remembers the window of every chunk it sent: a chunk sent under ``A`` and not acked is
  re-sent only by a request reusing ``A`` (or released by ``reset_window``), also across
  reconnects of the control channel.
* It deletes a chunk only when a ``chunk_ack`` lists it, under the window it was sent by
  (an ack naming another window is logged and ignored: the strict reading).

The queue is its own SQLite file (WAL, ``synchronous=FULL``), rows numbered by SQLite as
the sequence. ``python -m pipeline.sim.legacy_sensor run ...`` runs one; ``fill`` queues
events. ``LegacyWindows`` is the sans-I/O core (tested without sockets).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import aiohttp

from pipeline.common.backoff import Backoff
from pipeline.common.chunking import split_event
from pipeline.common.errors import ProtocolError
from pipeline.common.logs import setup_logging

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0.0"
CAPABILITIES = ("chunks", "heartbeats")
MAX_QUEUE = 32  # messages the websockets client buffers before it stops reading
REQUEST_FIELDS = frozenset({"since_sequence", "max_chunks", "max_bytes", "window_id",
                            "max_in_flight"})
ACK_FIELDS = frozenset({"window_id", "committed_sequences", "reset_window"})
COMMAND_FIELDS = frozenset({"command_id", "success", "message"})
BODY_FIELDS = {"chunk_request": REQUEST_FIELDS, "chunk_ack": ACK_FIELDS,
               "command_response": COMMAND_FIELDS}


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


# ---------------------------------------------------------------------------------------
# The queue file


@dataclass(frozen=True)
class QueuedEvent:
    """What a test needs to check delivery of one queued event."""

    event_id: str
    event_sha256: str  # hex
    size: int
    chunks: int


class LegacyQueue:
    """The agent's SQLite queue: one row per chunk, the row id is the sequence."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute("CREATE TABLE IF NOT EXISTS chunks (sequence INTEGER PRIMARY KEY "
                         "AUTOINCREMENT, nbytes INTEGER NOT NULL, body TEXT NOT NULL)")

    def close(self) -> None:
        self._db.close()

    def enqueue(self, sensor_id: str, data: bytes) -> QueuedEvent:
        """Split ``data`` into 1.0 chunks and queue them in one transaction."""
        split = split_event(data)
        now = iso_now()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for piece in split.pieces:
                cur = self._db.execute("INSERT INTO chunks (nbytes, body) VALUES (?, '')",
                                       (len(piece.payload),))
                body = {"schema_version": SCHEMA_VERSION, "sensor_id": sensor_id,
                        "event_id": split.event_id, "sequence": int(cur.lastrowid or 0),
                        "chunk_index": piece.index, "chunk_count": piece.count,
                        "compression": "gzip",
                        "payload": base64.b64encode(piece.payload).decode("ascii"),
                        "chunk_sha256": base64.b64encode(piece.chunk_sha256).decode("ascii"),
                        "event_sha256": base64.b64encode(split.event_sha256).decode("ascii"),
                        "created_at": now, "logical_timestamp_ms": int(time.time() * 1000),
                        "clock_skew_ms": 0.0}
                self._db.execute("UPDATE chunks SET body = ? WHERE sequence = ?",
                                 (json.dumps(body), body["sequence"]))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return QueuedEvent(split.event_id, split.event_sha256.hex(), split.size,
                           len(split.pieces))

    def after(self, since: int, limit: int) -> list[tuple[int, int]]:
        """(sequence, nbytes) of queued chunks above ``since``, oldest first."""
        return [(int(s), int(n)) for s, n in self._db.execute(
            "SELECT sequence, nbytes FROM chunks WHERE sequence > ? ORDER BY sequence LIMIT ?",
            (since, limit))]

    def body(self, sequence: int) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM chunks WHERE sequence = ?",
                               (sequence,)).fetchone()
        return None if row is None else json.loads(row[0])

    def present(self, sequences: Iterable[int]) -> set[int]:
        """Which of ``sequences`` are still queued."""
        seqs = [int(s) for s in sequences]
        found: set[int] = set()
        for start in range(0, len(seqs), 500):
            part = seqs[start:start + 500]
            marks = ",".join("?" * len(part))
            found.update(int(r[0]) for r in self._db.execute(
                f"SELECT sequence FROM chunks WHERE sequence IN ({marks})", part))
        return found

    def delete(self, sequences: Iterable[int]) -> int:
        seqs = [(s,) for s in sequences]
        if not seqs:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        before = self._db.total_changes
        self._db.executemany("DELETE FROM chunks WHERE sequence = ?", seqs)
        self._db.execute("COMMIT")
        return self._db.total_changes - before

    def depth(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def sequences(self) -> list[int]:
        return [int(r[0]) for r in self._db.execute("SELECT sequence FROM chunks ORDER BY 1")]


# ---------------------------------------------------------------------------------------
# Sans-I/O core: which chunks go out under which window, which acks delete


@dataclass
class LegacyWindows:
    """The 1.0 agent's window memory. ``in_flight`` maps a sent, unacked sequence to the
    window it was sent under; it survives reconnects (only a restart forgets it)."""

    in_flight: dict[int, str] = field(default_factory=dict)
    stale_acks: int = 0        # acked sequences no longer queued
    mismatched_acks: int = 0   # acked under another window than the chunk's
    empty_requests: int = 0    # requests that selected nothing

    def pick(self, request: dict[str, Any], queued: Sequence[tuple[int, int]]) -> list[int]:
        """Sequences to POST for ``request`` from ``queued`` (sequence, nbytes) rows above
        its ``since_sequence``, oldest first, within max_chunks, max_bytes (at least one)
        and max_in_flight; a chunk in flight under another window is skipped."""
        window_id = str(request["window_id"])
        picked: list[int] = []
        size = 0
        for seq, nbytes in queued:
            if seq <= int(request["since_sequence"]):
                continue
            if len(picked) >= int(request["max_chunks"]):
                break
            owner = self.in_flight.get(seq)
            if owner is not None and owner != window_id:
                continue
            if owner is None and len(self.in_flight) >= int(request["max_in_flight"]):
                break
            if picked and size + nbytes > int(request["max_bytes"]):
                break
            picked.append(seq)
            size += nbytes
            self.in_flight[seq] = window_id
        if not picked:
            self.empty_requests += 1
        return picked

    def on_ack(self, body: dict[str, Any], queued: set[int]) -> list[int]:
        """Sequences an ack lets the agent delete (``queued``: those still in the queue)."""
        window_id = str(body["window_id"])
        out: list[int] = []
        for seq in body["committed_sequences"]:
            seq = int(seq)
            if seq not in queued:
                self.stale_acks += 1
                self.in_flight.pop(seq, None)
                continue
            owner = self.in_flight.get(seq)
            if owner is not None and owner != window_id:
                self.mismatched_acks += 1
                continue
            self.in_flight.pop(seq, None)
            out.append(seq)
        if body.get("reset_window"):
            for seq in [s for s, w in self.in_flight.items() if w == window_id]:
                del self.in_flight[seq]
        return out


def check_body(body_type: str, body: Any) -> None:
    """A 1.0 agent builds each body with exactly its fields: anything else is fatal."""
    expected = BODY_FIELDS.get(body_type)
    if expected is None or not isinstance(body, dict):
        raise ProtocolError(f"unexpected body_type {body_type!r}", field="body_type")
    unknown = sorted(set(body) - expected)
    if unknown:
        raise ProtocolError(f"unknown body field {unknown[0]!r} in {body_type}",
                            field=f"body.{unknown[0]}")
    missing = sorted(expected - set(body))
    if missing:
        raise ProtocolError(f"missing body field {missing[0]!r} in {body_type}",
                            field=f"body.{missing[0]}")


# ---------------------------------------------------------------------------------------
# The asyncio agent


@dataclass(frozen=True)
class LegacySettings:
    sensor_id: str
    token: str
    control_url: str
    ingest_url: str
    queue_path: Path
    heartbeat_interval_s: float = 30.0
    ingest_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    software_version: str = "legacy-1.0"
    # One TCP connection per POST, as a plain ``requests.post`` makes: every POST then
    # meets a link's per-connection faults (keep-alive hides most of them).
    keepalive: bool = False


class LegacyAgent:
    """One 1.0 agent: control loop, POSTs, heartbeats; ``stats`` for the caller."""

    def __init__(self, settings: LegacySettings) -> None:
        self.settings = settings
        self.queue = LegacyQueue(settings.queue_path)
        self.windows = LegacyWindows()
        self.posts = 0
        self.post_failures = 0
        self.acked = 0
        self.connects = 0
        self._stop = asyncio.Event()
        self._last_acked = 0
        self.stats_at_stop: dict[str, int] = {}

    def stop(self) -> None:
        self._stop.set()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.token}"}

    def stats(self) -> dict[str, int]:
        return {"queue_depth": self.queue.depth(), "posts": self.posts,
                "post_failures": self.post_failures, "acked": self.acked,
                "stale_acks": self.windows.stale_acks,
                "mismatched_acks": self.windows.mismatched_acks,
                "empty_requests": self.windows.empty_requests,
                "in_flight": len(self.windows.in_flight), "connects": self.connects}

    async def run(self) -> None:
        backoff = Backoff(0.5, 30.0, 0.1)
        timeout = aiohttp.ClientTimeout(total=self.settings.ingest_timeout_s)
        connector = aiohttp.TCPConnector(force_close=not self.settings.keepalive)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            while not self._stop.is_set():
                try:
                    await self._session(http)
                    backoff.reset()
                except (TimeoutError, aiohttp.ClientError, OSError, ProtocolError) as exc:
                    log.info("legacy_control_failed sensor_id=%s error=%s",
                             self.settings.sensor_id, type(exc).__name__)
                if self._stop.is_set():
                    break
                await self._sleep(backoff.next())
        self.stats_at_stop = self.stats()
        self.queue.close()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def _session(self, http: aiohttp.ClientSession) -> None:
        ws = await http.ws_connect(self.settings.control_url,
                                   heartbeat=self.settings.ping_interval_s,
                                   headers={"X-Sensor-ID": self.settings.sensor_id, **self.auth})
        self.connects += 1
        log.info("legacy_connected sensor_id=%s depth=%d", self.settings.sensor_id,
                 self.queue.depth())
        inbox: asyncio.Queue[Any] = asyncio.Queue(MAX_QUEUE)
        reader = asyncio.create_task(self._read(ws, inbox))
        beats = asyncio.create_task(self._heartbeats(ws))
        try:
            await self._heartbeat(ws)
            while not self._stop.is_set():
                getter = asyncio.ensure_future(inbox.get())
                stopper = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
                    return
                doc = getter.result()
                if doc is None:
                    return  # the socket closed
                await self._handle(http, doc)
        finally:
            reader.cancel()
            beats.cancel()
            await asyncio.gather(reader, beats, return_exceptions=True)
            await ws.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, inbox: asyncio.Queue[Any]) -> None:
        """Background reader: pings are answered while reading; at most MAX_QUEUE messages
        wait for the agent, then reading stops (and with it the pongs)."""
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    await inbox.put(json.loads(msg.data))
        finally:
            await inbox.put(None)

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while not ws.closed:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            await self._heartbeat(ws)

    async def _heartbeat(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_str(self._envelope("heartbeat", {
            "software_version": self.settings.software_version,
            "last_committed_sequence": self._last_acked,
            "queue_depth": self.queue.depth(), "clock_skew_ms": 0.0}))

    def _envelope(self, body_type: str, body: dict[str, Any]) -> str:
        return json.dumps({"schema_version": SCHEMA_VERSION, "sensor_id": self.settings.sensor_id,
                           "sent_at": iso_now(), "capabilities": list(CAPABILITIES),
                           "body_type": body_type, "body": body})

    async def _handle(self, http: aiohttp.ClientSession, doc: dict[str, Any]) -> None:
        body_type = str(doc.get("body_type"))
        body: Any = doc.get("body")
        check_body(body_type, body)  # ProtocolError drops the connection
        if body_type == "chunk_ack":
            queued = self.queue.present(body["committed_sequences"])
            deletable = self.windows.on_ack(body, queued)
            self.acked += self.queue.delete(deletable)
            if deletable:
                self._last_acked = max(self._last_acked, max(deletable))
        elif body_type == "chunk_request":
            await self._answer(http, body)

    async def _answer(self, http: aiohttp.ClientSession, request: dict[str, Any]) -> None:
        limit = int(request["max_chunks"]) + len(self.windows.in_flight)
        rows = self.queue.after(int(request["since_sequence"]), limit)
        picked = self.windows.pick(request, rows)
        if not picked:
            log.info("no chunks for request window=%s since=%d", request["window_id"],
                     request["since_sequence"])
            return
        for seq in picked:
            if self._stop.is_set():
                return
            await self._post(http, seq, str(request["window_id"]))

    async def _post(self, http: aiohttp.ClientSession, seq: int, window_id: str) -> None:
        """POST one chunk until any 2xx answer, for ever (the 1.0 retry rule)."""
        backoff = Backoff(0.5, 30.0, 0.1)
        while not self._stop.is_set():
            body = self.queue.body(seq)
            if body is None:
                return  # deleted meanwhile (cannot happen: acks are read between windows)
            body["attributes"] = {"window_id": window_id}
            try:
                async with http.post(self.settings.ingest_url, json=body,
                                     headers=self.auth) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        self.posts += 1
                        return
                    failure = f"status_{resp.status}"
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failure = type(exc).__name__
            self.post_failures += 1
            delay = backoff.next()
            log.info("legacy_post_failed sensor_id=%s sequence=%d error=%s retry_in_s=%.1f",
                     self.settings.sensor_id, seq, failure, delay)
            await self._sleep(delay)


# ---------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sim.legacy_sensor",
                                     description="A protocol 1.0 sensor emulator.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent until SIGTERM")
    run.add_argument("--sensor-id", required=True)
    run.add_argument("--token", required=True)
    run.add_argument("--control-url", required=True)
    run.add_argument("--ingest-url", required=True)
    run.add_argument("--queue", required=True, type=Path)
    run.add_argument("--heartbeat-interval", type=float, default=30.0)
    run.add_argument("--ingest-timeout", type=float, default=10.0)
    run.add_argument("--ping-interval", type=float, default=20.0)
    run.add_argument("--keepalive", action="store_true",
                     help="reuse HTTP connections (default: one connection per POST)")
    run.add_argument("--log-level", default="INFO")
    fill = sub.add_parser("fill", help="queue events of random bytes; prints a JSON manifest")
    fill.add_argument("--sensor-id", required=True)
    fill.add_argument("--queue", required=True, type=Path)
    fill.add_argument("--events", type=int, required=True)
    fill.add_argument("--size", type=int, default=20 * 1024)
    return parser


def fill_queue(path: Path, sensor_id: str, events: int, size: int,
               seed: int = 0) -> list[QueuedEvent]:
    """Queue ``events`` events of ``size`` pseudo-random (incompressible) bytes."""
    import random

    rng = random.Random(seed)
    queue = LegacyQueue(path)
    try:
        return [queue.enqueue(sensor_id, rng.randbytes(size)) for _ in range(events)]
    finally:
        queue.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "fill":
        manifest = fill_queue(args.queue, args.sensor_id, args.events, args.size)
        json.dump([e.__dict__ for e in manifest], sys.stdout)
        sys.stdout.write("\n")
        return 0
    setup_logging(args.log_level)
    settings = LegacySettings(sensor_id=args.sensor_id, token=args.token,
                              control_url=args.control_url, ingest_url=args.ingest_url,
                              queue_path=args.queue,
                              heartbeat_interval_s=args.heartbeat_interval,
                              ingest_timeout_s=args.ingest_timeout,
                              ping_interval_s=args.ping_interval, keepalive=args.keepalive)
    agent = LegacyAgent(settings)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(go())
    log.info("legacy_stopped %s", " ".join(f"{k}={v}" for k, v in agent.stats_at_stop.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
