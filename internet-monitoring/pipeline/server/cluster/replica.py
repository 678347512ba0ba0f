"""One replica's cluster shell: feeds ``OwnershipTable`` and ``AckRouter`` from the server
and the bus, and carries out what they decide (the decisions are in ``ownership.py`` and
``routing.py``; the PostgreSQL calls in ``pg_bus.py``)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from pipeline.common.errors import PipelineError
from pipeline.server.cluster.identity import ReplicaId
from pipeline.server.cluster.messages import ReleaseRequest, decode, encode
from pipeline.server.cluster.ownership import (
    AskRelease,
    ClaimState,
    CloseSocket,
    LoadSession,
    OwnershipAction,
    OwnershipTable,
    Persist,
    Refuse,
    Resume,
    TryLock,
    Unlock,
    lock_key,
)
from pipeline.server.cluster.pg_bus import BusUnavailable, PgBus
from pipeline.server.cluster.routing import (
    AckRouter,
    ApplyAcks,
    Defer,
    HandRelease,
    LoadEvents,
    Publish,
    RouteAction,
)
from pipeline.server.control.channel import CLOSE_REPLACED, ControlManager
from pipeline.server.control.session import Committed

log = logging.getLogger(__name__)

TICK_S = 0.1
HELD_POLL_S = 1.0


class ClusterReplica:
    """Session ownership, ack routing and fleet-wide snapshots for one server process.

    ``on_event`` is the server's own handler for a completed event (snapshot cache, UI
    stream, gauges); events completed on other replicas are loaded and passed to it."""

    def __init__(self, dsn: str, replica: ReplicaId, manager: ControlManager, store: Any,
                 on_event: Callable[[Any], object], *, claim_timeout_s: float = 5.0,
                 known_ids: Callable[[], Iterable[str]] = tuple) -> None:
        self.replica = replica
        self.manager = manager
        self.store = store
        self.on_event = on_event
        self.table = OwnershipTable(claim_timeout_s=claim_timeout_s)
        self.router = AckRouter(replica.value, self.table.state)
        self.bus = PgBus(dsn, on_payload=self._on_payload, on_listening=self._resync,
                         on_locks_lost=self._locks_lost)
        self._claims: dict[str, asyncio.Future[bool]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._listened_once = False
        self.events_loaded = 0
        self.known_ids = known_ids  # sensors to look for in pg_locks (read API)
        self._held: set[str] = set()  # sessions held by any replica, polled

    async def start(self) -> None:
        await self.bus.start()
        self.table.namespace = self.bus.namespace
        loop = asyncio.get_running_loop()
        self._ticker = loop.create_task(self._tick_loop(), name="cluster-tick")
        self._poller = loop.create_task(self._held_loop(), name="cluster-held")
        log.info("cluster_joined replica=%s", self.replica)

    async def close(self) -> None:
        """After the control sockets closed (their sessions persisted): leave the bus."""
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.close()

    # -- the server's hooks --------------------------------------------------------------

    async def claim(self, sensor_id: str) -> bool:
        """A control socket of ``sensor_id`` connected here: own its session first."""
        pending = self._claims.get(sensor_id)
        if pending is None or pending.done():
            pending = asyncio.get_running_loop().create_future()
            self._claims[sensor_id] = pending
            await self._run(self.table.on_connect(sensor_id, time.monotonic()))
        return await asyncio.shield(pending)

    def released(self, sensor_id: str) -> None:
        self._spawn(self._run(self.table.on_disconnect(sensor_id)))

    def held_elsewhere(self, sensor_id: str) -> bool:
        """Another replica holds the sensor's session (polled every HELD_POLL_S)."""
        return sensor_id in self._held and self.table.state(sensor_id) is ClaimState.NONE

    async def _held_loop(self) -> None:
        while True:
            try:
                keys = await self.bus.held_keys()
                ns = self.table.namespace
                self._held = {sid for sid in self.known_ids() if lock_key(sid, ns) in keys}
            except BusUnavailable:
                self._held = set()
            await asyncio.sleep(HELD_POLL_S)

    def on_commit(self, sensor_id: str, items: Sequence[Committed],
                  marks: Mapping[str, int]) -> None:
        self._route(self.router.on_commit(sensor_id, items, marks))

    def on_events(self, events: Sequence[tuple[str, str]]) -> None:
        self._route(self.router.on_events(events))

    # -- routing -------------------------------------------------------------------------

    def _on_payload(self, payload: str) -> None:
        try:
            msg = decode(payload)
        except PipelineError as exc:
            log.warning("cluster_message_dropped error=%s", exc.message)
            return
        self._route(self.router.on_message(msg))

    def _route(self, actions: Iterable[RouteAction]) -> None:
        for action in actions:
            if isinstance(action, ApplyAcks):
                self.manager.on_committed(action.sensor_id, action.items, action.marks)
            elif isinstance(action, Defer):
                if not self.table.defer(action.acks.sensor_id, action.acks):
                    log.info("cluster_acks_dropped sensor_id=%s items=%d",
                             action.acks.sensor_id, len(action.acks.items))
            elif isinstance(action, Publish):
                self.bus.publish(encode(action.message))
            elif isinstance(action, LoadEvents):
                self._spawn(self._load_events(action.events))
            elif isinstance(action, HandRelease):
                self._spawn(self._run(self.table.on_release_request(action.request.sensor_id)))

    async def _load_events(self, events: Sequence[tuple[str, str]]) -> None:
        store = self.store
        try:
            loaded = await asyncio.to_thread(
                lambda: [store.get_event(sensor_id, event_id) for sensor_id, event_id in events])
        except PipelineError as exc:
            log.warning("cluster_events_unread count=%d error=%s", len(events), exc.code)
            return
        for event in loaded:
            if event is not None:
                self.on_event(event)
                self.events_loaded += 1

    async def _resync(self) -> None:
        """LISTEN (re)started: events completed while deaf are read from the store."""
        if not self._listened_once:
            self._listened_once = True
            return
        try:
            latest = await asyncio.to_thread(self.store.latest_events)
        except PipelineError as exc:
            log.warning("cluster_resync_failed error=%s", exc.code)
            return
        for event in latest:
            self.on_event(event)
        log.info("cluster_resynced events=%d", len(latest))

    # -- ownership -----------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self._run(self.table.on_tick(time.monotonic()))
            except Exception:  # the ticker must survive one bad round
                log.exception("cluster_tick_failed")

    def _locks_lost(self) -> None:
        self._spawn(self._run(self.table.on_locks_lost()))

    async def _run(self, actions: Iterable[OwnershipAction]) -> None:
        for action in actions:
            await self._do(action)

    async def _do(self, action: OwnershipAction) -> None:
        sensor_id = action.sensor_id
        if isinstance(action, TryLock):
            try:
                acquired = await self.bus.try_lock(action.key)
            except BusUnavailable:
                acquired = False
            await self._run(self.table.on_lock_result(sensor_id, acquired, time.monotonic()))
        elif isinstance(action, AskRelease):
            self.bus.publish(encode(ReleaseRequest(self.replica.value, sensor_id)))
        elif isinstance(action, LoadSession):
            await self._load_session(sensor_id)
            await self._run(self.table.on_loaded(sensor_id))
        elif isinstance(action, Resume):
            for acks in action.deferred:
                self.manager.on_committed(acks.sensor_id, acks.items, acks.marks)
            self._settle(sensor_id, True)
        elif isinstance(action, Refuse):
            log.warning("cluster_claim_refused sensor_id=%s", sensor_id)
            self._settle(sensor_id, False)
        elif isinstance(action, CloseSocket):
            self._settle(sensor_id, False)
            conn = self.manager.connections.get(sensor_id)
            if conn is not None:
                log.info("cluster_session_handed_over sensor_id=%s reason=%s", sensor_id,
                         action.reason)
                self._spawn(conn.close(CLOSE_REPLACED, action.reason))
        elif isinstance(action, Persist):
            await self.manager.persist_now()
            await self._run(self.table.on_persisted(sensor_id))
        elif isinstance(action, Unlock):
            if self.table.state(sensor_id) is ClaimState.NONE:
                self._forget(sensor_id)
            try:
                await self.bus.unlock(action.key)
            except BusUnavailable:
                pass  # the lock went with the connection

    def _settle(self, sensor_id: str, owned: bool) -> None:
        pending = self._claims.pop(sensor_id, None)
        if pending is not None and not pending.done():
            pending.set_result(owned)

    async def _load_session(self, sensor_id: str) -> None:
        """The stored windows, epoch and offsets of the sensor: the previous owner's last
        word (it persisted every window before sending its request)."""
        store, manager = self.store, self.manager

        def read() -> tuple[dict[str, Any], dict[str, Any], int]:
            state = store.load_sensor_states().get(sensor_id, {})
            windows = store.load_windows(sensor_id)
            mark = store.committed_offset(sensor_id, str(state.get("epoch", "")))
            return dict(state), dict(windows), int(mark)

        state, windows, mark = await asyncio.to_thread(read)
        self._forget(sensor_id)
        session = manager.scheduler.session(sensor_id)
        session.epoch = str(state.get("epoch", ""))
        session.watermark = max(int(state.get("watermark", 0)), mark)
        session.restore_windows(windows)
        session.take_changed()
        manager._persisted[sensor_id] = set(windows)
        log.info("cluster_session_owned sensor_id=%s windows=%d watermark=%d", sensor_id,
                 len(windows), session.watermark)

    def _forget(self, sensor_id: str) -> None:
        manager = self.manager
        manager.scheduler.forget(sensor_id)
        manager._persisted.pop(sensor_id, None)
        manager._held_acks.pop(sensor_id, None)
        manager._held_counts.pop(sensor_id, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
