"""The PostgreSQL store's tables, versioned migrations, day partitions, and how psycopg
errors and rows map onto the package's types.

Tables (docs/postgres.md explains the choices)::

    chunks          PARTITION BY RANGE (day): one row per accepted chunk, ``day`` =
                    floor(received_at / 86400). Unique indexes of a partitioned table must
                    hold the partition key, so (sensor_id, epoch, sequence, day) and
                    (sensor_id, event_id, chunk_index, day) are unique per day only; the
                    store-wide exactly-once guarantee comes from the per-sensor advisory lock
                    every ingest transaction takes before it reads (see pg_ingest.py).
    events          PARTITION BY RANGE (day), day = floor(completed_at / 86400); ``row_id``
                    from the sequence ``event_row_ids``; ``xid`` the inserting
                    transaction (``pg_current_xact_id()``, NULL for rows older than
                    schema version 3), which the dashboard feed follows.
    partial_events, rejected_events, offsets, windows, sensor_state, store_meta,
    forward_cursors: plain tables (small: one row per incomplete event / sensor / window
                    / forwarding sink and sensor).
    schema_version  one row per applied migration.

Retention drops whole day partitions (``DROP TABLE``: no row is visited) and deletes rows
only in the one partition the cut-off falls into.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import psycopg
from psycopg import errors as pg_errors

from pipeline.common.errors import StorageFull, StoreError
from pipeline.common.headroom import KIND_FULL, KIND_IO

log = logging.getLogger("pipeline.server.store")

SCHEMA_VERSION = 3  # 2: forward_cursors (server/forward/); 3: events.xid (the feed's cursor)
DAY_S = 86_400
PARTITIONED = ("chunks", "events")
# Every schema change (creation, migration, a new partition) runs under this
# transaction-level advisory lock, so several servers opening one database never race.
DDL_LOCK_KEY = 0x7569_7870_6731_3600  # "uixpg16\0"


# version -> the statements that bring version - 1 to it
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE chunks (
            sensor_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            sequence BIGINT NOT NULL,
            event_id TEXT NOT NULL,
            chunk_index INTEGER NOT NULL,
            chunk_count INTEGER NOT NULL,
            chunk_sha256 BYTEA NOT NULL,
            payload BYTEA,
            received_at DOUBLE PRECISION NOT NULL,
            day INTEGER NOT NULL) PARTITION BY RANGE (day)""",
        "CREATE UNIQUE INDEX chunks_by_sequence ON chunks (sensor_id, epoch, sequence, day)",
        "CREATE UNIQUE INDEX chunks_by_slot ON chunks (sensor_id, event_id, chunk_index, day)",
        "CREATE INDEX chunks_received ON chunks (received_at)",
        "CREATE SEQUENCE event_row_ids",
        """CREATE TABLE events (
            row_id BIGINT NOT NULL DEFAULT nextval('event_row_ids'),
            sensor_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            event_id TEXT NOT NULL,
            event_sha256 BYTEA NOT NULL,
            data BYTEA NOT NULL,
            logical_timestamp_ms BIGINT NOT NULL,
            created_at TEXT NOT NULL,
            completed_at DOUBLE PRECISION NOT NULL,
            first_sequence BIGINT NOT NULL,
            last_sequence BIGINT NOT NULL,
            attributes TEXT NOT NULL,
            encoding TEXT NOT NULL DEFAULT 'gzip',
            day INTEGER NOT NULL) PARTITION BY RANGE (day)""",
        "CREATE UNIQUE INDEX events_by_id ON events (sensor_id, event_id, day)",
        "CREATE INDEX events_by_sensor ON events (sensor_id, row_id)",
        "CREATE INDEX events_latest ON events (sensor_id, logical_timestamp_ms, row_id)",
        "CREATE INDEX events_by_row ON events (row_id)",
        "CREATE INDEX events_completed ON events (completed_at)",
        """CREATE TABLE partial_events (
            sensor_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            chunk_count INTEGER NOT NULL,
            received INTEGER NOT NULL,
            event_sha256 BYTEA NOT NULL,
            created_at TEXT NOT NULL,
            logical_timestamp_ms BIGINT NOT NULL,
            attributes TEXT NOT NULL,
            first_sequence BIGINT NOT NULL,
            last_sequence BIGINT NOT NULL,
            first_seen DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (sensor_id, event_id))""",
        "CREATE INDEX partial_events_seen ON partial_events (first_seen)",
        """CREATE TABLE rejected_events (
            sensor_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            event_sha256 BYTEA NOT NULL,
            chunk_count INTEGER NOT NULL,
            reason TEXT NOT NULL,
            code TEXT NOT NULL,
            rejected_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (sensor_id, event_id))""",
        "CREATE INDEX rejected_events_at ON rejected_events (rejected_at)",
        """CREATE TABLE offsets (
            sensor_id TEXT NOT NULL,
            epoch TEXT NOT NULL,
            watermark BIGINT NOT NULL,
            ranges TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (sensor_id, epoch))""",
        """CREATE TABLE windows (
            sensor_id TEXT NOT NULL,
            window_id TEXT NOT NULL,
            state TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (sensor_id, window_id))""",
        """CREATE TABLE sensor_state (
            sensor_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE store_meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL)""",
    ),
    2: (
        """CREATE TABLE forward_cursors (
            sink TEXT NOT NULL,
            sensor_id TEXT NOT NULL,
            row_id BIGINT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (sink, sensor_id))""",
    ),
    # The inserting transaction of every event row, so the dashboard feed can take rows
    # committed out of row-id order (server/read/feed_marks.py). Rows stored before this
    # migration keep NULL (no rewrite of the table): they were all committed before it.
    3: (
        "ALTER TABLE events ADD COLUMN xid xid8",
        "ALTER TABLE events ALTER COLUMN xid SET DEFAULT pg_current_xact_id()",
        "CREATE INDEX events_by_xid ON events (xid, row_id)",
    ),
}
assert max(MIGRATIONS) == SCHEMA_VERSION

VERSION_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version ("
                 " version INTEGER PRIMARY KEY,"
                 " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")


def migrate(conn: psycopg.Connection[Any], where: str) -> int:
    """Create or upgrade the schema in one transaction under the DDL lock; returns the
    version found before. StoreError when the database is newer than this server."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK_KEY,))
        conn.execute(VERSION_TABLE)
        row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise StoreError(f"store {where} has schema version {found}, newer than this"
                             f" server's {SCHEMA_VERSION}: use a newer server")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            log.info("store_migrated store=%s to_version=%d", where, version)
    return found


def day_of(t: float) -> int:
    return int(t // DAY_S)


def partition_name(table: str, day: int) -> str:
    return f"{table}_d{day:06d}"


def ensure_partitions(conn: psycopg.Connection[Any], days: Sequence[int]) -> None:
    """Create the day partitions of both partitioned tables that do not exist yet (one
    transaction under the DDL lock: two servers may ask for the same day at once)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK_KEY,))
        for day in days:
            for table in PARTITIONED:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {partition_name(table, day)}"
                    f" PARTITION OF {table} FOR VALUES FROM ({int(day)}) TO ({int(day) + 1})")


def partition_days(conn: psycopg.Connection[Any], table: str) -> list[int]:
    """The days ``table`` has a partition for, ascending (from the catalog)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = %s::regclass", (table,)).fetchall()
    prefix = f"{table}_d"
    return sorted(int(name[len(prefix):]) for (name,) in rows if name.startswith(prefix))


# ---------------------------------------------------------------------------------------
# Errors


def error_kind(exc: psycopg.Error) -> str | None:
    """``disk_full`` (SQLSTATE 53100), ``io_error`` (58030) or None."""
    if isinstance(exc, pg_errors.DiskFull):
        return KIND_FULL
    if isinstance(exc, pg_errors.IoError):
        return KIND_IO
    return None


def translate(exc: psycopg.Error, what: str) -> StoreError:
    """Map a psycopg error to the package's tree (the caller raises it ``from exc``)."""
    if isinstance(exc, pg_errors.DiskFull):
        return StorageFull(f"{what}: the database's storage is full")
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"{what}: the database is unreachable ({type(exc).__name__})")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")
