"""The control channel: the asyncio shell around ``SensorSession`` / ``RequestScheduler``.

``control_server(manager)`` (``pipeline.server.control.listener``) builds the aiohttp
application serving ``/control``. The
handshake is authenticated BEFORE the WebSocket upgrade, so refusals are plain HTTP
answers with a JSON body (protocol.md section 1)::

    no / empty X-Sensor-ID          400 missing_field
    malformed X-Sensor-ID           400 bad_value
    missing, unknown, expired token 401 unauthenticated
    another sensor's token          403 forbidden
    client certificate (mTLS) not naming X-Sensor-ID       403 forbidden
    address banned after repeated failures                 429 throttled (Retry-After)

After the upgrade each text frame is one envelope (``messages.decode_envelope``):

    malformed envelope              close 1002 (reason names the field)
    unknown schema major            close 1002 "unsupported schema major ..."
    envelope naming another sensor  close 1008
    binary frame                    a Protobuf envelope (capability proto); close 1003
                                    when the server does not announce proto
    heartbeat                       session.on_heartbeat -> scheduler.pump -> ChunkRequests
    command_response                logged

Everything the server sends goes through one ``ControlConnection`` per socket: a bounded
outbound queue drained by a sender task, so post-commit code can queue an ack without
awaiting a socket. Server envelopes carry the server's own ``capabilities`` and, only for
sensors that announced ``server_time``, a top-level ``server_time``; bodies are exactly
the 1.0 fields (a 1.0 sensor drops the connection on an unknown body field).

``ControlManager`` holds the current connection of every sensor. A second connection of
the same sensor replaces the first, which is closed with 1008 "replaced"; acks always go
to the current connection (a stale socket's acks would be lost with it).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from aiohttp import web

from pipeline.common import capabilities
from pipeline.common.errors import PipelineError
from pipeline.common.messages import (
    CAP_BATCH,
    CAP_EPOCH,
    CAP_PROTO,
    CAP_SERVER_TIME,
    Body,
    ChunkAck,
    ChunkRequest,
    CommandResponse,
    Envelope,
    Heartbeat,
    encode_envelope,
)
from pipeline.common.proto_codec import encode_envelope_proto
from pipeline.server.security.auth import TokenAuthenticator
from pipeline.server.metrics import ServerMetrics
from pipeline.server.control.scheduler import Outgoing, RequestScheduler
from pipeline.server.control.session import Committed, SensorSession

log = logging.getLogger(__name__)

CLOSE_REPLACED = 1008
CLOSE_PROTOCOL = 1002
CLOSE_POLICY = 1008
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_LATER = 1013
MAX_FRAME = 64 * 1024
MAX_CLOSE_REASON = 120  # RFC 6455: the reason fits in 123 bytes
MAX_HELD_ACK_SEQUENCES = 20_000


def iso_now(now: float) -> str:
    return datetime.fromtimestamp(now, tz=timezone.utc).isoformat()


def close_reason(text: str) -> bytes:
    return text.encode("utf-8")[:MAX_CLOSE_REASON]


# ---------------------------------------------------------------------------------------
# Persistence seam (the store's window methods, called off the loop)


class SessionClaims(Protocol):
    """Session ownership across replicas (``pipeline.server.cluster.replica``)."""

    async def claim(self, sensor_id: str) -> bool: ...
    def released(self, sensor_id: str) -> None: ...
    def held_elsewhere(self, sensor_id: str) -> bool: ...


class WindowStore(Protocol):
    """The part of the store port (``store/port.py``) the control plane uses."""

    def load_windows(self, sensor_id: str) -> Mapping[str, Any]: ...
    def load_sensor_states(self) -> Any: ...
    def save_control_state(self, changes: Iterable[Any]) -> None: ...
    def begin_control_state(self, changes: Iterable[Any], *, blocking: bool = True) -> Any: ...
    def commit_write(self, prepared: Any) -> None: ...


# ---------------------------------------------------------------------------------------
# One socket


class ControlConnection:
    """One sensor's WebSocket: what it announced, and an outbound queue with its sender."""

    def __init__(self, sensor_id: str, ws: web.WebSocketResponse, *, connected_at: float,
                 peer: str = "", max_outbound: int = 4096) -> None:
        self.sensor_id = sensor_id
        self.ws = ws
        self.connected_at = connected_at
        self.peer = peer
        self.capabilities: frozenset[str] = frozenset()
        self.peer_certificate: Mapping[str, Any] | None = None
        # The credential that let this socket in (security sweeps close it once revoked).
        self.token_sha256: str | None = None
        self.cert_bound = False
        self._outbound: asyncio.Queue[str | bytes | None] = asyncio.Queue(maxsize=max_outbound)
        self._sender: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._sender = asyncio.get_running_loop().create_task(
            self._send_loop(), name=f"control-send-{self.sensor_id}")

    @property
    def closing(self) -> bool:
        return self._closing or self.ws.closed

    def envelope(self, body: Body, now: float) -> Envelope:
        return Envelope(sensor_id=self.sensor_id, sent_at=iso_now(now), body=body,
                        capabilities=capabilities.SERVER_CAPABILITIES,
                        server_time=iso_now(now) if CAP_SERVER_TIME in self.capabilities
                        else None)

    def send_nowait(self, envelope: Envelope) -> bool:
        """Queue an envelope; False (and the socket is closed) when it cannot be sent."""
        if self.closing:
            return False
        if envelope.server_time is not None and CAP_SERVER_TIME not in self.capabilities:
            envelope = dataclasses.replace(envelope, server_time=None)
        if CAP_PROTO in self.capabilities and CAP_PROTO in capabilities.SERVER_CAPABILITIES:
            frame: str | bytes = encode_envelope_proto(envelope)  # both announced proto
        else:
            frame = encode_envelope(envelope)
        try:
            self._outbound.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("control_outbound_full sensor_id=%s", self.sensor_id)
            self._closer = asyncio.get_running_loop().create_task(
                self.close(CLOSE_TRY_LATER, "outbound queue full"))
            return False
        return True

    async def _send_loop(self) -> None:
        while True:
            frame = await self._outbound.get()
            if frame is None or self.ws.closed:
                return
            try:
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                else:
                    await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError) as exc:
                log.info("control_send_failed sensor_id=%s error=%s", self.sensor_id,
                         type(exc).__name__)
                return

    async def flush(self, timeout: float = 2.0) -> None:
        """Let queued frames go out (used before a deliberate close)."""
        deadline = time.monotonic() + timeout
        # Polls a queue and a socket this loop does not own (no event to wait for).
        while not self._outbound.empty() and not self.ws.closed and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def close(self, code: int, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            await self.ws.close(code=code, message=close_reason(reason))
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        await self.stop_sender()

    async def stop_sender(self) -> None:
        if self._sender is None:
            return
        if not self._sender.done():
            self._sender.cancel()
        try:
            await self._sender
        except asyncio.CancelledError:
            pass
        self._sender = None


# ---------------------------------------------------------------------------------------
# All sockets


@dataclasses.dataclass
class SensorInfo:
    """What the read API shows beyond the session: connection facts."""

    software_version: str = ""
    connected_at: float | None = None
    disconnected_at: float | None = None
    peer: str = ""
    capabilities: tuple[str, ...] = ()


class ControlManager:
    def __init__(self, scheduler: RequestScheduler, authenticator: TokenAuthenticator, *,
                 metrics: ServerMetrics, store: WindowStore | None = None,
                 executor: Executor | None = None, heartbeat_interval_s: float = 30.0,
                 missed_before_disconnect: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        self.scheduler = scheduler
        self.authenticator = authenticator
        self.metrics = metrics
        self.store = store
        self.executor = executor
        self.heartbeat_interval_s = heartbeat_interval_s
        self.missed_before_disconnect = missed_before_disconnect
        self.clock = clock
        self.connections: dict[str, ControlConnection] = {}
        self.info: dict[str, SensorInfo] = {}
        self._persisted: dict[str, set[str]] = {}
        self._after_persist: list[Outgoing] = []
        self._held_acks: dict[str, collections.deque[ChunkAck]] = {}
        self._held_counts: dict[str, int] = {}  # sequences in _held_acks, per sensor
        self._deadlines_checked = float("-inf")
        self._dirty: dict[str, tuple[dict[str, dict[str, object]], dict[str, Any]]] = {}
        self._persist_wakeup = asyncio.Event()
        self._persister: asyncio.Task[None] | None = None
        # Runs only the COMMIT of a transaction begun on the loop. That COMMIT releases the
        # store's lock, so it must not queue in a pool that threads waiting for that lock
        # can fill (``executor`` may be shared with read-API calls): a deadlock.
        self._commit_thread: ThreadPoolExecutor | None = None
        self._closed = False
        self._closers: set[asyncio.Task[None]] = set()
        # Commands awaiting their CommandResponse, by (sensor_id, command_id): only the
        # addressed sensor's own socket can answer one (token rotation).
        self.pending_commands: dict[tuple[str, str], asyncio.Future[CommandResponse]] = {}
        self.claims: SessionClaims | None = None  # set when replicas share the store
        self._persist_lock = asyncio.Lock()

    # -- connections --------------------------------------------------------------------

    async def register(self, sensor_id: str, connection: ControlConnection) -> None:
        """Make ``connection`` the sensor's current one; an older one is closed ("replaced").
        With replicas, first own the sensor's session (else the socket is closed: 1013)."""
        if self.claims is not None and not await self.claims.claim(sensor_id):
            await connection.close(CLOSE_TRY_LATER, "session held by another replica")
            return
        old = self.connections.get(sensor_id)
        self.connections[sensor_id] = connection
        now = self.clock()
        session = self.scheduler.session(sensor_id)
        session.on_connect(now)
        info = self.info.setdefault(sensor_id, SensorInfo())
        info.connected_at = now
        info.peer = connection.peer
        self.metrics.on_connection(sensor_id, True)
        log.info("control_connected sensor_id=%s peer=%s replaced=%s", sensor_id,
                 connection.peer, old is not None)
        self._release_held_acks(sensor_id)
        if old is not None and old is not connection:
            # Closed in the background: a dead peer must not delay the new connection.
            task = asyncio.get_running_loop().create_task(old.close(CLOSE_REPLACED, "replaced"))
            self._closers.add(task)
            task.add_done_callback(self._closers.discard)

    def unregister(self, sensor_id: str, connection: ControlConnection) -> bool:
        """Forget ``connection`` if it is still the sensor's current one."""
        if self.connections.get(sensor_id) is not connection:
            return False
        del self.connections[sensor_id]
        now = self.clock()
        self.scheduler.session(sensor_id).on_disconnect(now)
        info = self.info.setdefault(sensor_id, SensorInfo())
        info.disconnected_at = now
        self.metrics.on_connection(sensor_id, False)
        self._note_changes([sensor_id])
        log.info("control_disconnected sensor_id=%s", sensor_id)
        if self.claims is not None:
            self.claims.released(sensor_id)
        return True

    def connection(self, sensor_id: str) -> ControlConnection | None:
        conn = self.connections.get(sensor_id)
        return None if conn is None or conn.closing else conn

    def is_connected(self, sensor_id: str) -> bool:
        return self.connection(sensor_id) is not None

    def send_to(self, sensor_id: str, envelope: Envelope) -> bool:
        """Queue an envelope to the sensor's CURRENT connection; False if none."""
        conn = self.connection(sensor_id)
        return conn is not None and conn.send_nowait(envelope)

    def send_body(self, sensor_id: str, body: Body) -> bool:
        conn = self.connection(sensor_id)
        if conn is None:
            return False
        return conn.send_nowait(conn.envelope(body, self.clock()))

    # -- inputs -------------------------------------------------------------------------

    def on_envelope(self, connection: ControlConnection, env: Envelope) -> None:
        connection.capabilities = frozenset(env.capabilities)
        sensor_id = connection.sensor_id
        info = self.info.setdefault(sensor_id, SensorInfo())
        info.capabilities = tuple(env.capabilities)
        if isinstance(env.body, Heartbeat):
            self.on_heartbeat(connection, env)
        elif isinstance(env.body, CommandResponse):
            log.info("command_response sensor_id=%s command_id=%s success=%s", sensor_id,
                     env.body.command_id, env.body.success)
            waiter = self.pending_commands.pop((sensor_id, env.body.command_id), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(env.body)
        else:
            log.info("control_ignored sensor_id=%s body_type=%s", sensor_id, env.body_type)

    def on_heartbeat(self, connection: ControlConnection, env: Envelope) -> None:
        assert isinstance(env.body, Heartbeat)
        hb = env.body
        sensor_id = connection.sensor_id
        if self.connections.get(sensor_id) is not connection:
            return  # a replaced socket's last words
        now = self.clock()
        epoch = (env.queue_epoch or "") if CAP_EPOCH in connection.capabilities else ""
        session = self.scheduler.session(sensor_id)
        session.on_heartbeat(hb, now, epoch=epoch)
        session.batched = (CAP_BATCH in connection.capabilities
                           and CAP_BATCH in capabilities.SERVER_CAPABILITIES)
        self.info.setdefault(sensor_id, SensorInfo()).software_version = hb.software_version
        self.metrics.on_heartbeat(sensor_id, hb)
        log.debug("heartbeat sensor_id=%s queue_depth=%d last_committed=%d", sensor_id,
                  hb.queue_depth, hb.last_committed_sequence)
        self.dispatch(self.scheduler.pump(now, touched=[sensor_id]))
        self._note_changes([sensor_id])

    def on_committed(self, sensor_id: str, items: Sequence[Committed],
                     watermarks: Mapping[str, int]) -> list[ChunkAck]:
        """Chunks of one sensor made durable: ack them on the current connection and keep
        windows flowing. ``watermarks`` maps a queue epoch to the store's committed offset."""
        if not items:
            return []
        now = self.clock()
        session = self.scheduler.session(sensor_id)
        watermark = watermarks.get(session.epoch, 0)
        acks = session.on_committed(list(items), watermark, now)
        for ack in acks:
            if not self.send_body(sensor_id, ack):
                log.debug("ack_held sensor_id=%s window_id=%s reason=not_connected",
                          sensor_id, ack.window_id)
                self._hold_ack(sensor_id, ack)
        self.dispatch(self.scheduler.pump(now, touched=[sensor_id]))
        self._note_changes([sensor_id])
        return acks

    def request_sensor(self, sensor_id: str) -> ChunkRequest | None:
        """A dashboard asks for fresh data: open a window now if the sensor is connected."""
        if not self.is_connected(sensor_id):
            return None
        request = self.scheduler.request_sensor(sensor_id, self.clock())
        if request is not None:
            self.dispatch([Outgoing(sensor_id, request)])
        return request

    def dispatch(self, outgoing: Iterable[Outgoing]) -> int:
        """Send chunk requests. With a store, a request goes out only after its window is
        durably saved: a sensor may hold chunks under a window id for ever (protocol 1.0
        re-sends them only on a same-id request), so the server must never forget one it
        issued (invariant 6)."""
        items = list(outgoing)
        if self.store is None:
            return self._send_requests(items)
        if items:
            self._after_persist.extend(items)
            self._note_changes({item.sensor_id for item in items}, force=True)
        return 0

    def _send_requests(self, items: Iterable[Outgoing]) -> int:
        sent = 0
        for item in items:
            if self.send_body(item.sensor_id, item.request):
                sent += 1
                if isinstance(item.request, ChunkAck):
                    count = len(item.request.committed_sequences)
                    self.metrics.on_reack(item.sensor_id, count)
                    log.info("chunk_reack sensor_id=%s window_id=%s sequences=%d",
                             item.sensor_id, item.request.window_id, count)
                else:
                    log.debug("chunk_request sensor_id=%s window_id=%s since=%d",
                              item.sensor_id, item.request.window_id,
                              item.request.since_sequence)
        return sent

    def _hold_ack(self, sensor_id: str, ack: ChunkAck) -> None:
        """An ack made while the sensor is offline waits for its next connection: the chunk
        is committed, and without the ack the sensor would keep it (and re-send it)."""
        held = self._held_acks.setdefault(sensor_id, collections.deque())
        held.append(ack)
        # A running count: summing the held acks on every commit made ingest slower the
        # longer a sensor stayed away.
        count = self._held_counts.get(sensor_id, 0) + len(ack.committed_sequences)
        while count > MAX_HELD_ACK_SEQUENCES:
            dropped = held.popleft()  # the sensor still recovers: its first window re-sends
            count -= len(dropped.committed_sequences)
            self.metrics.on_ack_unsent(sensor_id, len(dropped.committed_sequences))
        self._held_counts[sensor_id] = count

    def _release_held_acks(self, sensor_id: str) -> None:
        self._held_counts.pop(sensor_id, None)
        for ack in self._held_acks.pop(sensor_id, ()):
            self.send_body(sensor_id, ack)

    # -- timers -------------------------------------------------------------------------

    def tick(self) -> None:
        """Timers: re-requests, freed budget, heartbeat deadlines, window persistence."""
        now = self.clock()
        self.dispatch(self.scheduler.tick(now))
        deadline = self.heartbeat_interval_s * self.missed_before_disconnect
        if now - self._deadlines_checked < min(1.0, deadline / 4):
            self._note_changes(self.scheduler.sessions)
            return
        # Heartbeat deadlines are seconds long: one scan of every socket per second is
        # enough, and a tick of a large fleet stays short.
        self._deadlines_checked = now
        for sensor_id, conn in list(self.connections.items()):
            session = self.scheduler.session(sensor_id)
            last = max(session.last_heartbeat_at or 0.0, conn.connected_at)
            if now - last > deadline and not conn.closing:
                log.warning("heartbeat_missed sensor_id=%s silent_s=%.1f", sensor_id, now - last)
                self.unregister(sensor_id, conn)
                task = asyncio.get_running_loop().create_task(
                    conn.close(CLOSE_GOING_AWAY, "heartbeat timeout"))
                self._closers.add(task)
                task.add_done_callback(self._closers.discard)
        self._note_changes(self.scheduler.sessions)

    def heartbeat_times(self) -> dict[str, float]:
        return {sid: s.last_heartbeat_at for sid, s in self.scheduler.sessions.items()
                if s.last_heartbeat_at is not None}

    def windows_open(self) -> int:
        return self.scheduler.active_total

    def acks_pending(self) -> int:
        """Committed sequences whose acks wait for their sensor's next connection."""
        return sum(self._held_counts.values())

    # -- persistence --------------------------------------------------------------------

    async def restore(self) -> int:
        """Reload windows and per-sensor state (epoch, watermark) saved before a restart."""
        if self.store is None:
            return 0
        loop = asyncio.get_running_loop()
        store = self.store
        states = await loop.run_in_executor(self.executor, store.load_sensor_states)
        count = 0
        for sensor_id, state in dict(states or {}).items():
            session = self.scheduler.session(sensor_id)
            session.epoch = str(state.get("epoch", ""))
            session.watermark = int(state.get("watermark", 0))
            by_id = await loop.run_in_executor(self.executor, store.load_windows, sensor_id)
            session.restore_windows(dict(by_id))
            self._persisted[sensor_id] = set(by_id)
            count += len(by_id)
            session.take_changed()
        log.info("control_restored sensors=%d windows=%d", len(self.scheduler.sessions), count)
        return count

    def start(self) -> None:
        if self.store is not None and self._persister is None:
            self._persister = asyncio.get_running_loop().create_task(
                self._persist_loop(), name="window-persister")

    def _note_changes(self, sensor_ids: Iterable[str], force: bool = False) -> None:
        """Snapshot changed sessions for the persister; the store work happens off the loop."""
        if self.store is None:
            return
        for sensor_id in list(sensor_ids):
            session: SensorSession = self.scheduler.session(sensor_id)
            if session.take_changed() or force:
                self._dirty[sensor_id] = (session.export_windows(),
                                          {"epoch": session.epoch,
                                           "watermark": session.watermark})
        if self._dirty or self._after_persist:
            self._persist_wakeup.set()

    async def _persist_loop(self) -> None:
        while True:
            await self._persist_wakeup.wait()
            self._persist_wakeup.clear()
            await self.persist_now()
            if self._closed:
                return

    async def persist_now(self) -> None:
        """Write every pending change (windows saved or deleted, epoch, watermark), then
        send the requests that waited for their windows to be durable."""
        async with self._persist_lock:  # a caller sees every earlier change durable
            await self._persist_pending()

    async def _persist_pending(self) -> None:
        if self.store is None or not (self._dirty or self._after_persist):
            return
        dirty, self._dirty = self._dirty, {}
        ready, self._after_persist = self._after_persist, []
        loop = asyncio.get_running_loop()
        try:
            if dirty:
                await self._persist(loop, dirty)
        except PipelineError as exc:
            log.warning("window_persist_failed sensors=%d error=%s", len(dirty), exc.code)
            for sensor_id, item in dirty.items():  # retried on the next change
                self._dirty.setdefault(sensor_id, item)
            self._after_persist[:0] = ready  # not sent until their windows are saved
            return
        self._send_requests(ready)

    async def _persist(self, loop: asyncio.AbstractEventLoop,
                       dirty: Mapping[str, tuple[dict[str, dict[str, object]], dict[str, Any]]]
                       ) -> None:
        """Write ``dirty``: statements on the loop and only the COMMIT in a thread when the
        store can split its transaction and is free (a thread doing hundreds of short
        statements next to a busy loop waits for the GIL on each); else all in a thread."""
        assert self.store is not None
        prepared = self.store.begin_control_state(self._changes(dirty), blocking=False)
        if prepared is None:
            await loop.run_in_executor(self.executor, self._write, dirty)
            return
        if self._commit_thread is None:
            self._commit_thread = ThreadPoolExecutor(max_workers=1,
                                                     thread_name_prefix="control-commit")
        # Shielded: a cancelled caller must not cancel the job before it runs, or the lock
        # it releases would stay held.
        await asyncio.shield(loop.run_in_executor(self._commit_thread, self.store.commit_write,
                                                  prepared))
        for sensor_id, (windows, _) in dirty.items():
            self._persisted[sensor_id] = set(windows)

    def _changes(self, dirty: Mapping[str, tuple[dict[str, dict[str, object]], dict[str, Any]]]
                 ) -> list[tuple[str, list[str], dict[str, dict[str, object]], dict[str, Any]]]:
        return [(sensor_id, sorted(self._persisted.get(sensor_id, set()) - set(windows)),
                 windows, state) for sensor_id, (windows, state) in dirty.items()]

    def _write(self, dirty: Mapping[str, tuple[dict[str, dict[str, object]], dict[str, Any]]]
               ) -> None:
        assert self.store is not None
        # One transaction for every sensor changed since the last round.
        self.store.save_control_state(self._changes(dirty))
        for sensor_id, (windows, _) in dirty.items():
            self._persisted[sensor_id] = set(windows)

    async def close(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutdown") -> None:
        """Close every socket and write the last window changes."""
        conns = list(self.connections.items())
        for sensor_id, conn in conns:
            self.unregister(sensor_id, conn)
        await asyncio.gather(*(c.close(code, reason) for _, c in conns), *self._closers,
                             return_exceptions=True)
        self._closed = True
        if self._persister is not None:
            self._persist_wakeup.set()
            await self._persister
            self._persister = None
        await self.persist_now()
        if self._commit_thread is not None:
            self._commit_thread.shutdown(wait=True)
            self._commit_thread = None
