"""The SQLite store's tables, the statements the ingest path probes with, the schema
migration, and how SQLite errors and rows map onto the package's types.

Tables (every ingest step is an index lookup, never a scan)::

    chunks          one row per accepted chunk; UNIQUE(sensor_id, epoch, sequence) is the
                    dedupe key, UNIQUE(sensor_id, event_id, chunk_index) catches the same
                    chunk under another sequence and serves reassembly (ORDER BY
                    chunk_index). ``payload`` is set to NULL once its event is finished.
    partial_events  progress of events still missing chunks (count received so far).
    events          completed events, inserted exactly once (UNIQUE(sensor_id, event_id));
                    ``row_id`` is monotonic (AUTOINCREMENT: never reused after pruning).
    rejected_events events whose reassembly failed, or partial events expired by retention.
    offsets         per (sensor_id, epoch): watermark and the committed ranges above it.
    windows, sensor_state   control-state JSON, written off the ingest path.
    forward_cursors per (sink, sensor_id): the events.row_id a forwarder has passed (the
                    durable outbox of server/forward/ is "events after the cursor").

The SQL sticks to what PostgreSQL accepts too (``ON CONFLICT ... DO UPDATE``,
``IN (SELECT ... LIMIT n)``, no engine-only functions).
"""

from __future__ import annotations

import logging
import sqlite3

from pipeline.common.errors import StorageFull, StoreError
from pipeline.common.headroom import KIND_FULL, KIND_IO
from pipeline.server.store.event_rows import ENCODING_IDENTITY
from pipeline.server.store.ledger import ChunkKeys, EventState, Finished, Partial

log = logging.getLogger("pipeline.server.store")

SCHEMA_VERSION = 2  # 2: events.encoding (completed events kept as their gzip slices)

# ---------------------------------------------------------------------------------------
# Schema

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS chunks (
        id INTEGER PRIMARY KEY,
        sensor_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        chunk_index INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        chunk_sha256 BLOB NOT NULL,
        payload BLOB,
        received_at REAL NOT NULL,
        UNIQUE (sensor_id, epoch, sequence),
        UNIQUE (sensor_id, event_id, chunk_index))""",
    "CREATE INDEX IF NOT EXISTS chunks_received ON chunks (received_at)",
    """CREATE TABLE IF NOT EXISTS partial_events (
        sensor_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        chunk_count INTEGER NOT NULL,
        received INTEGER NOT NULL,
        event_sha256 BLOB NOT NULL,
        created_at TEXT NOT NULL,
        logical_timestamp_ms INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        first_sequence INTEGER NOT NULL,
        last_sequence INTEGER NOT NULL,
        first_seen REAL NOT NULL,
        PRIMARY KEY (sensor_id, event_id))""",
    "CREATE INDEX IF NOT EXISTS partial_events_seen ON partial_events (first_seen)",
    """CREATE TABLE IF NOT EXISTS events (
        row_id INTEGER PRIMARY KEY AUTOINCREMENT,
        sensor_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        event_id TEXT NOT NULL,
        event_sha256 BLOB NOT NULL,
        data BLOB NOT NULL,
        logical_timestamp_ms INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        completed_at REAL NOT NULL,
        first_sequence INTEGER NOT NULL,
        last_sequence INTEGER NOT NULL,
        attributes TEXT NOT NULL,
        encoding TEXT NOT NULL DEFAULT 'identity',
        UNIQUE (sensor_id, event_id))""",
    "CREATE INDEX IF NOT EXISTS events_by_sensor ON events (sensor_id, row_id)",
    """CREATE INDEX IF NOT EXISTS events_latest
        ON events (sensor_id, logical_timestamp_ms, row_id)""",
    "CREATE INDEX IF NOT EXISTS events_completed ON events (completed_at)",
    """CREATE TABLE IF NOT EXISTS rejected_events (
        sensor_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        event_sha256 BLOB NOT NULL,
        chunk_count INTEGER NOT NULL,
        reason TEXT NOT NULL,
        code TEXT NOT NULL,
        rejected_at REAL NOT NULL,
        PRIMARY KEY (sensor_id, event_id))""",
    "CREATE INDEX IF NOT EXISTS rejected_events_at ON rejected_events (rejected_at)",
    """CREATE TABLE IF NOT EXISTS offsets (
        sensor_id TEXT NOT NULL,
        epoch TEXT NOT NULL,
        watermark INTEGER NOT NULL,
        ranges TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (sensor_id, epoch))""",
    """CREATE TABLE IF NOT EXISTS windows (
        sensor_id TEXT NOT NULL,
        window_id TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (sensor_id, window_id))""",
    """CREATE TABLE IF NOT EXISTS sensor_state (
        sensor_id TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        updated_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS forward_cursors (
        sink TEXT NOT NULL,
        sensor_id TEXT NOT NULL,
        row_id INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (sink, sensor_id))""",
    """CREATE TABLE IF NOT EXISTS store_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
)

def is_storage_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def error_kind(exc: sqlite3.Error) -> str | None:
    """``disk_full``, ``io_error`` (SQLITE_IOERR: EIO, a failed fsync) or None."""
    if is_storage_full(exc):
        return KIND_FULL
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) == sqlite3.SQLITE_IOERR:
        return KIND_IO
    return KIND_IO if "disk I/O error" in str(exc) else None


def translate(exc: sqlite3.Error, what: str) -> StoreError:
    """Map a sqlite3 error to the package's tree (the caller raises it ``from exc``)."""
    if is_storage_full(exc):
        return StorageFull(f"{what}: storage is full")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------
# The ingest probes: what the ledger needs to know, read in two index lookups

# Both dedupe keys of a chunk in one statement: tag 0 = same (sensor, epoch, sequence),
# tag 1 = same (sensor, event, chunk_index). Each arm is a probe of a UNIQUE index.
CHUNK_KEYS_SQL = (
    "SELECT 0, event_id, chunk_index, chunk_sha256 FROM chunks"
    " WHERE sensor_id = ? AND epoch = ? AND sequence = ?"
    " UNION ALL SELECT 1, event_id, chunk_index, chunk_sha256 FROM chunks"
    " WHERE sensor_id = ? AND event_id = ? AND chunk_index = ?")

# Where an event stands, in one statement: tag 0 = partial (still missing chunks),
# 1 = completed, 2 = rejected. Each arm is a primary-key / UNIQUE index probe.
EVENT_STATE_SQL = (
    "SELECT 0, epoch, chunk_count, received, event_sha256, first_sequence, last_sequence,"
    " created_at, logical_timestamp_ms, attributes FROM partial_events"
    " WHERE sensor_id = ? AND event_id = ?"
    " UNION ALL SELECT 1, NULL, NULL, NULL, event_sha256, NULL, NULL, NULL, NULL, NULL"
    " FROM events WHERE sensor_id = ? AND event_id = ?"
    " UNION ALL SELECT 2, NULL, NULL, NULL, event_sha256, NULL, NULL, NULL, NULL, NULL"
    " FROM rejected_events WHERE sensor_id = ? AND event_id = ?")


def migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to ``SCHEMA_VERSION`` (in the setup
    transaction). Version 1 had no ``events.encoding``: its rows hold plain bytes."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    if "encoding" not in columns:
        conn.execute("ALTER TABLE events ADD COLUMN encoding TEXT NOT NULL"
                     f" DEFAULT '{ENCODING_IDENTITY}'")
        log.info("store_migrated to_version=%d change=events.encoding", SCHEMA_VERSION)



_NOTHING_STORED = ChunkKeys()


def read_chunk_keys(conn: sqlite3.Connection, sensor_id: str, epoch: str, sequence: int,
                    event_id: str, chunk_index: int, committed_before: bool) -> ChunkKeys:
    """What is stored under a chunk's two dedupe keys (one statement)."""
    same_sequence: tuple[str, int, bytes] | None = None
    same_slot: bytes | None = None
    for tag, found_event, index, digest in conn.execute(
            CHUNK_KEYS_SQL, (sensor_id, epoch, sequence, sensor_id, event_id, chunk_index)):
        if tag == 0:
            same_sequence = (found_event, index, bytes(digest))
        else:
            same_slot = bytes(digest)
    if same_sequence is None and same_slot is None and not committed_before:
        return _NOTHING_STORED  # the common case: a new chunk
    return ChunkKeys(same_sequence, same_slot, committed_before)


def read_event_state(conn: sqlite3.Connection, sensor_id: str, event_id: str) -> EventState:
    """A ``Partial`` for an event still missing chunks, ``Finished`` for one completed or
    rejected (completed wins), else None (one statement)."""
    finished: Finished | None = None
    for row in conn.execute(EVENT_STATE_SQL, (sensor_id, event_id) * 3):
        tag = row[0]
        if tag == 0:
            return Partial(epoch=row[1], chunk_count=row[2], received=row[3],
                           event_sha256=bytes(row[4]), first_sequence=row[5],
                           last_sequence=row[6], created_at=row[7],
                           logical_timestamp_ms=row[8], attributes=row[9])
        if finished is None or tag == 1:
            finished = Finished(bytes(row[4]), completed=tag == 1)
    return finished
