"""The thin PostgreSQL transport of the cluster: LISTEN/NOTIFY and session advisory locks.

Three psycopg ``AsyncConnection``s on the event loop, all autocommit:

    listen   LISTEN pipeline_cluster_<hash of the store's schema>; payloads go to
             ``on_payload``; reconnects with backoff and calls ``on_listening`` after each
             (re)connect, so the replica can re-read what it may have missed while deaf
    notify   ``pg_notify`` of queued payloads, many per statement
    locks    ``pg_try_advisory_lock`` / ``pg_advisory_unlock`` of session keys; checked
             every ``probe_s``: when it dies PostgreSQL has dropped every lock it held, and
             ``on_locks_lost`` is called before it reconnects

PostgreSQL ends a SIGKILLed replica's backends when their sockets close (at once); for a
host that vanishes without closing them, the lock connection asks for TCP keepalives on
both ends, so its locks free within about ``keepalive_idle_s + 3 x keepalive_interval_s``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import psycopg

from pipeline.common.errors import PipelineError
from pipeline.server.cluster.identity import channel_for

log = logging.getLogger(__name__)

MAX_NOTIFY_BATCH = 64


def _int4(value: int) -> int:
    return value - 2**32 if value >= 2**31 else value


class BusUnavailable(PipelineError):
    """The cluster's PostgreSQL connection is down (locks cannot be taken now)."""

    code = "cluster_bus_unavailable"


class PgBus:
    def __init__(self, dsn: str, *, on_payload: Callable[[str], None],
                 on_listening: Callable[[], Awaitable[None]] | None = None,
                 on_locks_lost: Callable[[], None] | None = None,
                 probe_s: float = 2.0, keepalive_idle_s: int = 10,
                 keepalive_interval_s: int = 3, reconnect_max_s: float = 5.0) -> None:
        self.dsn = dsn
        self.on_payload = on_payload
        self.on_listening = on_listening
        self.on_locks_lost = on_locks_lost
        self.probe_s = probe_s
        self.keepalive_idle_s = keepalive_idle_s
        self.keepalive_interval_s = keepalive_interval_s
        self.reconnect_max_s = reconnect_max_s
        self._outbox: asyncio.Queue[str] = asyncio.Queue()
        self._locks: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._locks_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self.namespace = ""  # the store's schema (``start``): this cluster's name
        self.channel = channel_for("")
        self.sent = 0
        self.received = 0
        self.reconnects = 0

    async def _connect(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, keepalives=1, keepalives_idle=self.keepalive_idle_s,
            keepalives_interval=self.keepalive_interval_s, keepalives_count=3,
            application_name="pipeline-cluster")

    async def start(self, timeout: float = 10.0) -> None:
        """Connect all three; returns once LISTEN is in place (raises BusUnavailable)."""
        try:
            self._locks = await self._connect_locks()
            cur = await self._locks.execute("SELECT current_schema()")
            row = await cur.fetchone()
        except psycopg.Error as exc:
            raise BusUnavailable(f"cluster: cannot connect to PostgreSQL: {exc}") from exc
        self.namespace = str(row[0]) if row else ""
        self.channel = channel_for(self.namespace)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen_loop(), name="cluster-listen"),
                       loop.create_task(self._notify_loop(), name="cluster-notify"),
                       loop.create_task(self._probe_loop(), name="cluster-locks-probe")]
        try:
            await asyncio.wait_for(self._listening.wait(), timeout)
        except TimeoutError as exc:
            await self.close()
            raise BusUnavailable("cluster: LISTEN did not start in time") from exc

    async def _connect_locks(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await self._connect()
        # PostgreSQL's side of the keepalives: a vanished host's locks are freed.
        await conn.execute(f"SET tcp_keepalives_idle = {int(self.keepalive_idle_s)}")
        await conn.execute(f"SET tcp_keepalives_interval = {int(self.keepalive_interval_s)}")
        await conn.execute("SET tcp_keepalives_count = 3")
        return conn

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._locks is not None:
            conn, self._locks = self._locks, None
            await conn.close()  # the session ends: PostgreSQL drops its locks

    # -- notify -----------------------------------------------------------------------

    def publish(self, payloads: list[str]) -> None:
        """Queue payloads (each under NOTIFY's limit, see messages.encode)."""
        for payload in payloads:
            self._outbox.put_nowait(payload)

    async def _notify_loop(self) -> None:
        conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        delay = 0.1
        while True:
            batch = [await self._outbox.get()]
            while len(batch) < MAX_NOTIFY_BATCH and not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = await self._connect()
                    await conn.execute("SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
                                       (self.channel, batch))
                    self.sent += len(batch)
                    delay = 0.1
                    break
                except psycopg.Error as exc:
                    # Kept and retried: a lost ack notification only delays the sensor.
                    log.warning("cluster_notify_failed payloads=%d error=%s", len(batch),
                                type(exc).__name__)
                    conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.reconnect_max_s)

    # -- listen -----------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                conn = await self._connect()
                await conn.execute(f"LISTEN {self.channel}")
                self._listening.set()
                delay = 0.1
                if self.on_listening is not None:
                    await self.on_listening()
                async for note in conn.notifies():
                    self.received += 1
                    try:
                        self.on_payload(note.payload)
                    except Exception:  # one bad message must not deafen the replica
                        log.exception("cluster_payload_failed")
            except psycopg.Error as exc:
                log.warning("cluster_listen_lost error=%s retry_s=%.1f", type(exc).__name__,
                            delay)
            finally:
                if conn is not None:
                    await conn.close()
            self.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.reconnect_max_s)

    # -- session locks ----------------------------------------------------------------

    async def try_lock(self, key: tuple[int, int]) -> bool:
        return bool(await self._lock_call("SELECT pg_try_advisory_lock(%s, %s)", key))

    async def unlock(self, key: tuple[int, int]) -> None:
        await self._lock_call("SELECT pg_advisory_unlock(%s, %s)", key)

    async def held_keys(self) -> set[tuple[int, int]]:
        """Two-int4 advisory keys held by any session of this database (``pg_locks``
        shows them as unsigned ``classid``/``objid``; turned back into signed int4)."""
        async with self._locks_lock:
            conn = self._locks
            if conn is None or conn.closed:
                raise BusUnavailable("cluster: lock connection is down")
            try:
                cur = await conn.execute(
                    "SELECT classid::bigint, objid::bigint FROM pg_locks "
                    "WHERE locktype = 'advisory' AND objsubid = 2 AND granted "
                    "AND database = (SELECT oid FROM pg_database "
                    "WHERE datname = current_database())")
                rows = await cur.fetchall()
            except psycopg.Error as exc:
                raise BusUnavailable(f"cluster: pg_locks: {exc}") from exc
        return {(_int4(int(str(a))), _int4(int(str(b)))) for a, b in rows}

    async def _lock_call(self, sql: str, key: tuple[int, int]) -> object:
        async with self._locks_lock:
            conn = self._locks
            if conn is None or conn.closed:
                raise BusUnavailable("cluster: lock connection is down")
            try:
                cur = await conn.execute(sql, key)
                row = await cur.fetchone()
            except psycopg.Error as exc:
                await self._lost(exc)
                raise BusUnavailable(f"cluster: lock call failed: {exc}") from exc
            return row[0] if row else None

    async def _lost(self, exc: BaseException) -> None:
        log.warning("cluster_locks_lost error=%s", type(exc).__name__)
        conn, self._locks = self._locks, None
        if conn is not None:
            await conn.close()
        if self.on_locks_lost is not None:
            self.on_locks_lost()

    async def _probe_loop(self) -> None:
        delay = self.probe_s
        while True:
            await asyncio.sleep(delay)
            async with self._locks_lock:
                try:
                    if self._locks is None:
                        self._locks = await self._connect_locks()
                        log.info("cluster_locks_reconnected")
                    else:
                        await self._locks.execute("SELECT 1")
                    delay = self.probe_s
                except psycopg.Error as exc:
                    if self._locks is not None:
                        await self._lost(exc)
                    delay = min(delay * 2, self.reconnect_max_s)
