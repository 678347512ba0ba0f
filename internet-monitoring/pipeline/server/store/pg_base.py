"""The PostgreSQL store's machinery under every call: the connection pool, short and
split transactions, the per-sensor advisory locks, day partitions, and error handling.

The port is blocking: the server calls it from its store thread and worker threads, so a
``psycopg_pool.ConnectionPool`` (threads, not asyncio) hands each call a connection of its
own. A split transaction keeps its connection from ``begin_*`` until ``commit_*`` /
``abort_*``. No round trip ever runs on the server's event loop: ``blocking=False`` always
answers None (the caller then writes entirely in a thread), which the port allows.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from pipeline.common.errors import StoreError
from pipeline.common.headroom import DiskHealth
from pipeline.server.store.pg_schema import day_of, ensure_partitions, error_kind, translate
from pipeline.server.store.slices import SliceCache

log = logging.getLogger("pipeline.server.store")

POOL_TIMEOUT_S = 5.0  # waiting for a connection; then the call fails (503, retried)
PARTITIONS_AHEAD = 2  # days created before they are needed (today and tomorrow)


def lock_key(schema: str, sensor_id: str) -> int:
    """The signed 64-bit advisory-lock key of one sensor in one schema."""
    digest = hashlib.blake2b(f"{schema}\x00{sensor_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PgBase:
    """State and transaction helpers shared by the store's parts (set up by
    ``PostgresChunkStore.__init__``)."""

    where: str  # the DSN without its password, for messages
    health: DiskHealth
    _pool: ConnectionPool[Any]
    _schema: str
    _clock: Callable[[], float]
    _closed: bool
    _slices: SliceCache
    _days: set[int]
    _days_lock: threading.Lock

    # -- connections -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def _getconn(self, what: str) -> psycopg.Connection[Any]:
        self._check_open()
        try:
            return self._pool.getconn(timeout=POOL_TIMEOUT_S)
        except PoolTimeout as exc:
            raise StoreError(f"{what}: no database connection within {POOL_TIMEOUT_S:.0f} s"
                             f" ({self.where})") from exc

    def _putconn(self, conn: psycopg.Connection[Any]) -> None:
        try:
            if not conn.closed and conn.info.transaction_status != \
                    psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
        except psycopg.Error as exc:
            log.warning("store_rollback_failed error=%s", type(exc).__name__)
        self._pool.putconn(conn)  # a broken connection is discarded by the pool

    @contextmanager
    def _connection(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for one call; psycopg errors become StoreError."""
        conn = self._getconn(what)
        try:
            yield conn
        except psycopg.Error as exc:
            self._failed(what, exc)
            raise translate(exc, what) from exc
        finally:
            self._putconn(conn)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._connection("read failed") as conn:
            rows = conn.execute(sql, params).fetchall()
            conn.rollback()
            return rows

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]], what: str) -> None:
        """Run statements in one short durable transaction."""
        statements = list(statements)
        with self._connection(what) as conn:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.commit()

    def _failed(self, what: str, exc: psycopg.Error) -> None:
        kind = error_kind(exc)
        if kind is not None:
            self.health.failed(what.split()[0], kind, exc)
        log.error("store_call_failed what=%r error=%s", what, type(exc).__name__)

    # -- per-sensor serialisation ----------------------------------------------------

    def _lock_sensors(self, conn: psycopg.Connection[Any], sensors: Iterable[str]) -> None:
        """Transaction-level advisory locks on the sensors, in key order (no deadlock
        between two batches naming the same sensors). Held until COMMIT/ROLLBACK, they
        serialise every write about one sensor across all servers on this database."""
        keys = sorted({lock_key(self._schema, s) for s in sensors})
        conn.execute("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[])"
                     " WITH ORDINALITY AS t(k, n)", (keys,))

    # -- partitions ------------------------------------------------------------------

    def _ensure_day(self, now: float) -> None:
        """Day partitions for ``now`` (and the next days) exist before a write needs them."""
        day = day_of(now)
        if day in self._days:
            return
        with self._days_lock:
            wanted = [d for d in range(day, day + PARTITIONS_AHEAD) if d not in self._days]
            if not wanted:
                return
            with self._connection("creating partitions failed") as conn:
                ensure_partitions(conn, wanted)
            self._days.update(wanted)

    # -- health ----------------------------------------------------------------------

    @property
    def disk_full(self) -> bool:
        """True while the database reported its storage full and no write has worked since."""
        return self.health.full

    def _recovered(self) -> None:
        if self.health.full:
            self.health.recovered()
