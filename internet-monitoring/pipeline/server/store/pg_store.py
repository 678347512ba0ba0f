"""The PostgreSQL backend of the store port: ``synchronous_commit=on`` (an ingest batch is
durable, on the server's WAL, before its outcomes are returned), one group-commit
transaction per batch, several server processes on one database.

``PostgresChunkStore`` is assembled from ``pg_base`` (pool, transactions, advisory locks,
partitions), ``pg_ingest``, ``pg_reads``, ``pg_control`` (control state, retention) and
``pg_forward`` (forwarding cursors);
``pg_schema`` holds the tables and migrations. Here: opening and closing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from pipeline.common.errors import ConfigError, StoreError
from pipeline.common.headroom import DiskHealth
from pipeline.server.store.pending import DEFAULT_MAX_EVENT_BYTES
from pipeline.server.store.pg_control import PgControl
from pipeline.server.store.pg_forward import PgForward
from pipeline.server.store.pg_ingest import PgIngest
from pipeline.server.store.pg_reads import PgReads
from pipeline.server.store.pg_schema import migrate, translate
from pipeline.server.store.slices import SliceCache

log = logging.getLogger("pipeline.server.store")

OPEN_TIMEOUT_S = 10.0
SLICE_CACHE_BYTES = 32 * 1024 * 1024


def redacted(dsn: str) -> str:
    """``dsn`` without its password (for logs and errors): host, port, database, user."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable dsn>"
    keep = ("host", "port", "dbname", "user")
    return " ".join(f"{k}={parts[k]}" for k in keep if parts.get(k))


def _probe(dsn: str, where: str, timeout_s: float) -> None:
    """One plain connection first: an unreachable or refusing database is reported at once,
    with libpq's reason, instead of after the pool's whole open timeout."""
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, int(timeout_s))) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"store.dsn: cannot connect to PostgreSQL ({where}): {reason}"
                         ) from exc


class PostgresChunkStore(PgIngest, PgReads, PgControl, PgForward):
    """``ChunkStore`` on a PostgreSQL database (``dsn``: a libpq connection string)."""

    def __init__(self, dsn: str, *, pool_min_size: int = 1, pool_max_size: int = 4,
                 synchronous: str = "FULL", max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 slice_cache_bytes: int = SLICE_CACHE_BYTES,
                 clock: Callable[[], float] = time.time,
                 open_timeout_s: float = OPEN_TIMEOUT_S) -> None:
        if max_event_bytes < 1:
            raise ConfigError("max_event_bytes must be positive", field="max_event_bytes")
        if not 0 <= pool_min_size <= pool_max_size or pool_max_size < 1:
            raise ConfigError("store.pool_max_size must be at least 1 and at least"
                              " store.pool_min_size", field="store.pool_max_size")
        self.where = redacted(dsn)
        self.health = DiskHealth("store", self.where)
        self._max_event_bytes = max_event_bytes
        self._clock = clock
        self._closed = False
        self._slices = SliceCache(slice_cache_bytes)
        self._days: set[int] = set()
        self._days_lock = threading.Lock()
        # OFF is the only mode that gives up durability: commits return before the WAL is
        # flushed (a crash of the database loses the last ones). Anything else: on.
        self._synchronous_commit = "off" if synchronous.upper() == "OFF" else "on"
        _probe(dsn, self.where, open_timeout_s)
        self._pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=max(1, pool_min_size), max_size=pool_max_size, open=False,
            configure=self._configure, name="store",
            # One empty round trip per checkout: a connection the database dropped while
            # idle (restart, failover, a cut network) is replaced instead of failing a batch.
            check=ConnectionPool.check_connection,
            kwargs={"connect_timeout": max(1, int(open_timeout_s))})
        try:
            self._pool.open(wait=True, timeout=open_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreError(f"store.dsn: cannot connect to PostgreSQL ({self.where})"
                             f" within {open_timeout_s:.0f} s") from exc
        try:
            with self._pool.connection(timeout=open_timeout_s) as conn:
                row = conn.execute("SELECT current_schema()").fetchone()
                self._schema = str(row[0]) if row and row[0] else "public"
                found = migrate(conn, self.where)
        except psycopg.Error as exc:
            self._pool.close()
            raise translate(exc, f"store.dsn: cannot open store ({self.where})") from exc
        except BaseException:
            self._pool.close()
            raise
        self._ensure_day(self._clock())
        if self._synchronous_commit == "off":
            log.warning("store_durability_reduced store=%s synchronous_commit=off", self.where)
        log.info("store_opened engine=postgres store=%s schema=%s schema_version_found=%d"
                 " pool_max=%d", self.where, self._schema, found, pool_max_size)

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Every new pooled connection: durable commits, no idle transaction forever."""
        conn.execute(f"SET synchronous_commit = {self._synchronous_commit}")
        conn.execute("SET idle_in_transaction_session_timeout = '60s'")
        conn.commit()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
        log.info("store_closed engine=postgres store=%s", self.where)

    def __enter__(self) -> PostgresChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
