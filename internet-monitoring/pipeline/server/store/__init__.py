"""The server's chunk store: verified, deduplicated, durably committed chunks and events.

Layout::

    ledger.py      the exactly-once decisions (store, duplicate, conflict, complete), pure
    port.py        ``ChunkStore``: every method the server calls, whatever the engine
    records.py     what a store returns (events, outcomes, prepared-write handles)
    opening.py     ``open_store(config)``: the one way to get a store
    slices.py      decompressed slices kept for their event's completion
    event_rows.py  an event's (and a rejected event's) row, the same on both engines
    pending.py     one chunk of a batch until COMMIT, and its outcome (both engines' ingest)
    plain_reads.py the reads both engines phrase alike (a mixin over the engine's _read)
    control_rows.py control-state and retention statements both engines write
    sqlite*.py     the SQLite backend: schema and migration, transactions, WAL
                   checkpointing and headroom, ingest, reads, control state and retention
    pg*.py         the PostgreSQL backend: schema, migrations and day partitions, pool and
                   advisory locks, batch probes, ingest, reads, control state and retention

Callers import from here (``from pipeline.server.store import ...``).
"""

from pipeline.server.store.event_rows import ENCODING_GZIP, ENCODING_IDENTITY
from pipeline.server.store.event_rows import EVENT_COLUMNS as _EVENT_COLUMNS
from pipeline.server.store.event_rows import row_to_event as _row_to_event
from pipeline.server.store.ledger import (
    ChunkKeys,
    Completed,
    Conflict,
    Finished,
    Partial,
    Piece,
    Rejected,
    StoreLate,
    StoreProgress,
)
from pipeline.server.store.opening import ENGINES, check_engine, open_store
from pipeline.server.store.pending import DEFAULT_MAX_EVENT_BYTES
from pipeline.server.store.pg_store import PostgresChunkStore
from pipeline.server.store.port import ChunkStore
from pipeline.server.store.records import (
    ChunkOutcome,
    ControlChange,
    PreparedWrite,
    RejectedEvent,
    StoredEvent,
)
from pipeline.server.store.slices import SliceCache
from pipeline.server.store.sqlite import SQLiteChunkStore
from pipeline.server.store.sqlite_ingest import PreparedIngest
from pipeline.server.store.sqlite_schema import SCHEMA_VERSION
from pipeline.server.store.sqlite_schema import translate as _translate

__all__ = [
    "ChunkKeys", "ChunkOutcome", "ChunkStore", "Completed", "Conflict", "ControlChange",
    "DEFAULT_MAX_EVENT_BYTES", "ENCODING_GZIP", "ENCODING_IDENTITY", "ENGINES", "Finished",
    "Partial", "Piece", "PostgresChunkStore", "PreparedIngest", "PreparedWrite", "Rejected",
    "RejectedEvent",
    "SCHEMA_VERSION", "SQLiteChunkStore", "SliceCache", "StoreLate", "StoreProgress",
    "StoredEvent", "_EVENT_COLUMNS", "_row_to_event", "_translate", "check_engine",
    "open_store",
]
