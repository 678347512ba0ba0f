"""The server's chunk store: verified, deduplicated, durably committed chunks and events.

``ChunkStore`` is the interface (a ``typing.Protocol``); ``SQLiteChunkStore`` is the embedded
engine (stdlib ``sqlite3``, WAL, ``synchronous=FULL``). A PostgreSQL engine implements the
same protocol, so the SQL here sticks to what both engines accept (``ON CONFLICT ... DO
UPDATE``, ``IN (SELECT ... LIMIT n)``, no engine-only functions).

Ingest is a group commit: one ``BEGIN IMMEDIATE ... COMMIT`` per batch, so durability costs
one fsync per batch rather than per chunk. Every check that can reject a chunk runs *before*
that chunk writes anything, so one bad chunk never fails its neighbours; only a storage
failure (``StorageFull``/``StoreError``) rolls the whole batch back, and then nothing of the
batch is visible, in the database or in the in-memory offsets.

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

The store is synchronous; the server calls it from a writer thread. One connection
(``check_same_thread=False``) guarded by a lock makes that safe.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

from pipeline.common import chunking
from pipeline.common.errors import (
    ConfigError,
    ConflictError,
    DecompressionLimitExceeded,
    FieldValueError,
    IntegrityError,
    PayloadTooLarge,
    PipelineError,
    SequenceConflict,
    StorageFull,
    StoreError,
)
from pipeline.common.headroom import KIND_FULL, KIND_IO, DiskHealth, Reserve
from pipeline.common.messages import Chunk
from pipeline.server.offsets import OffsetBook, OffsetKey, OffsetTracker

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024
SCHEMA_VERSION = 2  # 2: events.encoding (completed events kept as their gzip slices)
CACHE_KIB = 64 * 1024
BUSY_TIMEOUT_MS = 30_000
CHECKPOINT_INTERVAL_S = 0.2
WAL_RESTART_FRAMES = 16_384  # ~64 MiB of WAL
SLICE_CACHE_BYTES = 32 * 1024 * 1024
BATCH_SLICES_UNBOUNDED = 1 << 62  # a batch's own slices are held anyway (its items keep them)
CHECKPOINT_WARN_FRAMES = 250_000  # ~1 GiB of WAL: the checkpointer is not keeping up
_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


# ---------------------------------------------------------------------------------------
# Data types


@dataclass(frozen=True)
class StoredEvent:
    """A completed, verified event. ``row_id`` is a monotonic store id used for paging."""

    row_id: int
    sensor_id: str
    epoch: str
    event_id: str
    event_sha256: bytes
    data: bytes
    logical_timestamp_ms: int
    created_at: str
    completed_at: float
    first_sequence: int
    last_sequence: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RejectedEvent:
    """An event that will never complete: its reassembled bytes were bad, or it expired."""

    sensor_id: str
    epoch: str
    event_id: str
    event_sha256: bytes
    chunk_count: int
    reason: str
    code: str
    rejected_at: float


@dataclass(frozen=True)
class ChunkOutcome:
    """What happened to one ingested chunk.

    ``completed_event`` is set only on the outcome of the chunk whose commit completed the
    event, so the caller updates caches and streams exactly once. ``event_complete`` is
    true whenever the event is complete after this chunk (duplicates included). ``error``
    is set when the chunk was rejected; then ``stored`` and ``duplicate`` are false.
    ``last_committed_sequence`` is the (sensor, epoch) watermark after the batch committed.
    """

    sensor_id: str
    epoch: str
    sequence: int
    event_id: str
    window_id: str
    stored: bool
    duplicate: bool
    event_complete: bool
    completed_event: StoredEvent | None
    last_committed_sequence: int
    error: PipelineError | None = None

    @property
    def committed(self) -> bool:
        """True when the sequence may be acked (stored or duplicate, durably)."""
        return self.stored or self.duplicate


# ---------------------------------------------------------------------------------------
# Interface


@runtime_checkable
class ChunkStore(Protocol):
    """What the server needs from a store; every call is blocking."""

    def ingest(self, chunks: Sequence[Chunk]) -> list[ChunkOutcome]: ...
    def committed_offset(self, sensor_id: str, epoch: str) -> int: ...
    def missing_sequences(self, sensor_id: str, epoch: str, limit: int = 1000) -> list[int]: ...
    def tracker(self, sensor_id: str, epoch: str) -> OffsetTracker: ...
    def epochs(self, sensor_id: str) -> list[str]: ...
    def events(self, sensor_id: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]: ...
    def get_event(self, sensor_id: str, event_id: str) -> StoredEvent | None: ...
    def latest_events(self) -> list[StoredEvent]: ...
    def event_count(self, sensor_id: str | None = None) -> int: ...
    def chunk_count(self) -> int: ...
    def rejected_events(self, sensor_id: str | None = None) -> list[RejectedEvent]: ...
    def save_window(self, sensor_id: str, window_id: str, state: dict[str, Any]) -> None: ...
    def delete_windows(self, sensor_id: str, window_ids: Iterable[str]) -> None: ...
    def load_windows(self, sensor_id: str) -> dict[str, dict[str, Any]]: ...
    def save_sensor_state(self, sensor_id: str, state: dict[str, Any]) -> None: ...
    def load_sensor_states(self) -> dict[str, dict[str, Any]]: ...
    def prune(self, older_than: float, *, batch: int = 1000) -> int: ...
    def check_writable(self) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------
# Schema

_SCHEMA = (
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
    """CREATE TABLE IF NOT EXISTS store_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL)""",
)

_EVENT_COLUMNS = ("row_id, sensor_id, epoch, event_id, event_sha256, data, logical_timestamp_ms, "
                  "created_at, completed_at, first_sequence, last_sequence, attributes, "
                  "encoding")

# How ``events.data`` holds an event: ``gzip`` = its verified slices back to back, as they
# arrived (a quarter of the bytes to write for JSON results, nothing to recompress);
# ``identity`` = the bytes themselves (events stored before schema version 2).
ENCODING_GZIP = "gzip"
ENCODING_IDENTITY = "identity"


def _row_to_event(row: Sequence[Any]) -> StoredEvent:
    return StoredEvent(row_id=row[0], sensor_id=row[1], epoch=row[2], event_id=row[3],
                       event_sha256=bytes(row[4]), data=_stored_data(row),
                       logical_timestamp_ms=row[6], created_at=row[7], completed_at=row[8],
                       first_sequence=row[9], last_sequence=row[10],
                       attributes=json.loads(row[11]))


def _stored_data(row: Sequence[Any]) -> bytes:
    """The event's bytes, checked against its hash when they had to be decompressed (a
    damaged row is reported, never served as data)."""
    blob = bytes(row[5])
    if row[12] == ENCODING_IDENTITY:
        return blob
    if row[12] != ENCODING_GZIP:
        raise StoreError(f"event {row[3]} has an unknown stored encoding {row[12]!r}")
    try:
        data = chunking.decompress_members(blob)
        chunking.verify_event(data, bytes(row[4]))
    except PipelineError as exc:
        raise StoreError(f"stored event {row[3]} of {row[1]} is damaged: {exc.message}"
                         ) from exc
    return data


def _is_storage_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == sqlite3.SQLITE_FULL
    return "database or disk is full" in str(exc)


def _error_kind(exc: sqlite3.Error) -> str | None:
    """``disk_full``, ``io_error`` (SQLITE_IOERR: EIO, a failed fsync) or None."""
    if _is_storage_full(exc):
        return KIND_FULL
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and (code & 0xFF) == sqlite3.SQLITE_IOERR:
        return KIND_IO
    return KIND_IO if "disk I/O error" in str(exc) else None


def _translate(exc: sqlite3.Error, what: str) -> StoreError:
    """Map a sqlite3 error to the package's tree (the caller raises it ``from exc``)."""
    if _is_storage_full(exc):
        return StorageFull(f"{what}: storage is full")
    return StoreError(f"{what}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------
# Per-batch working state


@dataclass
class _Pending:
    """One chunk's result before the batch commits (outcomes are built after COMMIT)."""

    chunk: Chunk
    stored: bool = False
    duplicate: bool = False
    event_complete: bool = False
    completed_event: StoredEvent | None = None
    error: PipelineError | None = None
    raw: bytes | None = None  # the decompressed slice (validated by _precheck)


# (sensor_id, window ids to delete, window states to save, sensor state)
ControlChange = tuple[str, Sequence[str], Mapping[str, Mapping[str, Any]], Mapping[str, Any]]


class SliceCache:
    """Decompressed slices of stored chunks whose event is still incomplete, by
    ``chunk_sha256`` (content-addressed, so a rolled-back or replaced row can never be
    served a wrong slice), least recently stored dropped first beyond ``max_bytes``.

    Completing an event then needs no second decompression of the slices that arrived
    recently; a miss just decompresses from the stored payload as before. Identical slices
    of several incomplete events (same content) share one entry, counted, so the first
    event to complete does not take it from the others."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._items: OrderedDict[bytes, list[Any]] = OrderedDict()  # digest -> [data, uses]
        self._bytes = 0

    def put(self, digest: bytes, data: bytes) -> None:
        entry = self._items.get(digest)
        if entry is not None:
            entry[1] += 1
            self._items.move_to_end(digest)
            return
        if len(data) > self._max_bytes:
            return
        self._items[digest] = [data, 1]
        self._bytes += len(data)
        while self._bytes > self._max_bytes:
            _, (dropped, _uses) = self._items.popitem(last=False)
            self._bytes -= len(dropped)

    def pop(self, digest: bytes) -> bytes | None:
        """The slice for one completing event (the entry stays while others use it)."""
        entry = self._items.get(digest)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] <= 0:
            del self._items[digest]
            self._bytes -= len(entry[0])
        return entry[0]

    def move_to(self, other: "SliceCache") -> None:
        """Hand every entry, with its count, to ``other`` and empty this one."""
        for digest, (data, uses) in self._items.items():
            for _ in range(uses):
                other.put(digest, data)
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class PreparedWrite:
    """A control-state write between ``begin_control_state`` and ``commit_write``."""

    what: str


@dataclass
class PreparedIngest:
    """A batch between ``begin_ingest`` and ``commit_ingest`` (store-private state)."""

    items: list[_Pending]
    work: dict[OffsetKey, OffsetTracker]


@dataclass
class _Partial:
    epoch: str
    chunk_count: int
    received: int
    event_sha256: bytes
    first_sequence: int
    last_sequence: int
    created_at: str
    logical_timestamp_ms: int
    attributes: str  # JSON, sorted keys


def _attributes_json(chunk: Chunk) -> str:
    return json.dumps(dict(chunk.attributes), sort_keys=True)


# Both dedupe keys of a chunk in one statement: tag 0 = same (sensor, epoch, sequence),
# tag 1 = same (sensor, event, chunk_index). Each arm is a probe of a UNIQUE index.
_CHUNK_KEYS_SQL = (
    "SELECT 0, event_id, chunk_index, chunk_sha256 FROM chunks"
    " WHERE sensor_id = ? AND epoch = ? AND sequence = ?"
    " UNION ALL SELECT 1, event_id, chunk_index, chunk_sha256 FROM chunks"
    " WHERE sensor_id = ? AND event_id = ? AND chunk_index = ?")

# Where an event stands, in one statement: tag 0 = partial (still missing chunks),
# 1 = completed, 2 = rejected. Each arm is a primary-key / UNIQUE index probe.
_EVENT_STATE_SQL = (
    "SELECT 0, epoch, chunk_count, received, event_sha256, first_sequence, last_sequence,"
    " created_at, logical_timestamp_ms, attributes FROM partial_events"
    " WHERE sensor_id = ? AND event_id = ?"
    " UNION ALL SELECT 1, NULL, NULL, NULL, event_sha256, NULL, NULL, NULL, NULL, NULL"
    " FROM events WHERE sensor_id = ? AND event_id = ?"
    " UNION ALL SELECT 2, NULL, NULL, NULL, event_sha256, NULL, NULL, NULL, NULL, NULL"
    " FROM rejected_events WHERE sensor_id = ? AND event_id = ?")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to ``SCHEMA_VERSION`` (in the setup
    transaction). Version 1 had no ``events.encoding``: its rows hold plain bytes."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    if "encoding" not in columns:
        conn.execute("ALTER TABLE events ADD COLUMN encoding TEXT NOT NULL"
                     f" DEFAULT '{ENCODING_IDENTITY}'")
        log.info("store_migrated to_version=%d change=events.encoding", SCHEMA_VERSION)


class SQLiteChunkStore:
    """``ChunkStore`` on an SQLite file (WAL, ``synchronous=FULL`` unless told otherwise)."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL",
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                 max_pages: int | None = None,
                 cache_kib: int = CACHE_KIB, slice_cache_bytes: int = SLICE_CACHE_BYTES,
                 clock: Callable[[], float] = time.time,
                 reserve_bytes: int = 0) -> None:
        mode = synchronous.upper()
        if mode not in _SYNCHRONOUS_MODES:
            raise ConfigError(f"store synchronous must be one of {_SYNCHRONOUS_MODES}",
                              field="synchronous")
        if max_event_bytes < 1:
            raise ConfigError("max_event_bytes must be positive", field="max_event_bytes")
        if reserve_bytes < 0:
            raise ConfigError("store.reserve_bytes must not be negative",
                              field="store.reserve_bytes")
        self.path = Path(path)
        self._reserve = Reserve(self.path, reserve_bytes)
        self.health = DiskHealth("store", str(self.path))
        self._max_event_bytes = max_event_bytes
        self._clock = clock
        # A plain Lock, not an RLock: a prepared ingest releases it from another thread.
        self._lock = threading.Lock()
        self._book = OffsetBook()
        self._cache_kib = max(1, int(cache_kib))
        self._slices = SliceCache(slice_cache_bytes)
        # Slices stored earlier in the batch being prepared (under the lock): an event whose
        # chunks share one transaction completes from them; published to _slices on COMMIT.
        self._batch_slices = SliceCache(BATCH_SLICES_UNBOUNDED)
        self._closed = False
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None,
                                         check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        try:
            self._setup(mode, max_pages)
            self._load_offsets()
        except sqlite3.Error as exc:
            self._conn.close()
            raise _translate(exc, f"cannot open store {self.path}") from exc
        if mode != "FULL" and mode != "EXTRA":
            log.warning("store_durability_reduced path=%s synchronous=%s", self.path, mode)
        if not self._reserve.ensure(force=True):
            self.health.failed("open", KIND_FULL, "reserve cannot be created")
        self.checkpoints = 0  # background WAL checkpoints that copied frames
        self._wal_frames = 0  # WAL length last seen by the checkpointer
        self._checkpoint_stop = threading.Event()
        self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                              name="store-checkpoint", daemon=True)
        self._checkpointer.start()
        log.info("store_opened path=%s keys=%d", self.path, len(self._book))

    # -- setup -----------------------------------------------------------------------

    def _setup(self, mode: str, max_pages: int | None) -> None:
        conn = self._conn
        journal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(journal).lower() != "wal":
            raise StoreError(f"store {self.path} cannot use WAL (journal_mode={journal})")
        conn.execute(f"PRAGMA synchronous={mode}")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # The ingest probes hit random keys (event ids) in every UNIQUE index: a page cache
        # that holds those indexes keeps the cost per chunk flat as the tables grow.
        conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        conn.execute("PRAGMA mmap_size=0")  # no mapped file pages counted against us
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = int(conn.execute("PRAGMA user_version").fetchone()[0])
            if found > SCHEMA_VERSION:
                raise StoreError(f"store {self.path} has schema version {found}, newer than"
                                 f" this server's {SCHEMA_VERSION}: use a newer server")
            for statement in _SCHEMA:
                conn.execute(statement)
            _migrate(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if max_pages is not None:
            conn.execute(f"PRAGMA max_page_count={int(max_pages)}")
        # Checkpoints run in a background thread (``_checkpoint_loop``), not inside the
        # COMMIT of whichever ingest or window write crosses the WAL threshold: that COMMIT
        # would copy a thousand pages and fsync the database file while every request in
        # its batch waits. Durability is the WAL's, unchanged.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_RESTART_FRAMES * 4096}")

    def _checkpoint_loop(self) -> None:
        """PASSIVE checkpoints (they never block writers) on a connection of their own."""
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None,
                                   check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            log.error("store_checkpointer_failed path=%s error=%s", self.path, exc)
            return
        try:
            while not self._checkpoint_stop.wait(CHECKPOINT_INTERVAL_S):
                self._restore_headroom()
                try:
                    _busy, log_frames, copied = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    # Rate-limited: on a full disk this fails every interval.
                    self._storage_failed("checkpoint", exc)
                    continue
                if copied > 0:
                    self.checkpoints += 1
                # Steady writes keep appending while this copies, so the WAL would never
                # empty: past the limit the next writer finishes the job (_maybe_reset_wal).
                self._wal_frames = log_frames
                if log_frames > CHECKPOINT_WARN_FRAMES:
                    log.warning("store_wal_large path=%s frames=%d checkpointed=%d",
                                self.path, log_frames, copied)
        finally:
            conn.close()

    def _maybe_reset_wal(self) -> None:
        """After a COMMIT, with the store lock held: when the WAL has grown past its limit,
        copy the few frames the background checkpointer has not (no other writer can
        append now), so the next transaction starts the WAL from the beginning."""
        if self._wal_frames < WAL_RESTART_FRAMES:
            return
        try:
            busy, log_frames, copied = self._conn.execute(
                "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            self._storage_failed("checkpoint", exc)
            return
        if not busy and copied == log_frames:
            self._wal_frames = 0

    # -- headroom (common/headroom.py) ----------------------------------------------

    @property
    def disk_full(self) -> bool:
        """True while ingest is refused for lack of disk (the reserve is in use)."""
        return self.health.full or not self._reserve.present()

    def _storage_failed(self, operation: str, exc: sqlite3.Error) -> None:
        """Count and (rate-limited) log a failed write; on a full disk hand the reserve
        over, so checkpoints, control state and retention can still write."""
        kind = _error_kind(exc)
        if kind is None:
            return  # not the disk (a busy lock, a constraint): the caller reports it
        self.health.failed(operation, kind, exc)
        if kind == KIND_FULL:
            self._reserve.release()

    def _restore_headroom(self) -> None:
        """Checkpointer thread: once the disk has room for the reserve again, ingest
        resumes (attempts at most once a second while the disk is full)."""
        if self._reserve.present():
            if self.health.full:
                self.health.recovered()
            return
        if self._reserve.ensure():
            self.health.recovered()

    def _require_headroom(self) -> None:
        """New data only while the reserve is in place: ``StorageFull`` (507 with
        Retry-After) otherwise, before any statement runs."""
        if self._reserve.present():
            return
        self.health.failed("ingest", KIND_FULL, "reserve in use")
        raise StorageFull(f"store {self.path.name}: the disk is full; ingest resumes once"
                          " space is freed")

    def _load_offsets(self) -> None:
        """Rebuild trackers: persisted watermark and ranges, plus chunk rows above them."""
        rows = self._conn.execute(
            "SELECT sensor_id, epoch, watermark, ranges FROM offsets").fetchall()
        for sensor_id, epoch, watermark, ranges in rows:
            tracker = OffsetTracker.restore({"watermark": watermark,
                                             "ranges": json.loads(ranges)})
            above = self._conn.execute(
                "SELECT sequence FROM chunks WHERE sensor_id = ? AND epoch = ? AND sequence > ?",
                (sensor_id, epoch, tracker.watermark))
            for (seq,) in above:
                tracker.add(seq)
            self._book.put(sensor_id, epoch, tracker)

    # -- ingest ----------------------------------------------------------------------

    def ingest(self, chunks: Sequence[Chunk]) -> list[ChunkOutcome]:
        """Verify, dedupe and commit ``chunks`` in one durable transaction.

        Returns one outcome per chunk, in input order. Raises ``StorageFull`` or
        ``StoreError`` (batch rolled back, nothing written) when the store cannot commit.
        """
        if not chunks:
            return []
        prepared = self.begin_ingest(chunks)
        assert prepared is not None
        return self.commit_ingest(prepared)

    def begin_ingest(self, chunks: Sequence[Chunk], *, blocking: bool = True
                     ) -> PreparedIngest | None:
        """The first half of ``ingest``: checks, BEGIN and every statement, no COMMIT.

        Why split: the statements are many short SQLite calls, each giving up and taking
        back the GIL; run in a worker thread while the event loop is busy, every take-back
        waits for the loop's switch interval. The server runs this half on the loop (it
        is CPU work the process must do anyway) and only ``commit_ingest`` (the fsync) in
        its store thread. The store's lock is held from here until ``commit_ingest`` or
        ``abort_ingest``, which may run in another thread. ``blocking=False`` returns None
        instead of waiting when another store call holds the lock.
        """
        self._require_headroom()
        if not self._enter_split(blocking):
            return None
        with self._split_statements("ingest failed", chunks=len(chunks)):
            pending = [_Pending(chunk) for chunk in chunks]
            work: dict[OffsetKey, OffsetTracker] = {}
            now = self._clock()
            self._batch_slices = SliceCache(BATCH_SLICES_UNBOUNDED)
            for item in pending:
                self._precheck(item)
            for item in pending:
                if item.error is None:
                    self._ingest_one(item, work, now)
                    self._keep_slice(item)
            self._save_offsets(work, now)
        return PreparedIngest(pending, work)

    def _enter_split(self, blocking: bool) -> bool:
        """Take the store lock and BEGIN IMMEDIATE for a split transaction (statements
        here, COMMIT later, maybe in another thread). False, holding nothing, when
        ``blocking`` is false and the store is busy."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            self._check_open()
            if self._begin(blocking):
                return True
        except BaseException:
            self._lock.release()
            raise
        self._lock.release()
        return False

    @contextmanager
    def _split_statements(self, what: str, chunks: int = 0) -> Iterator[None]:
        """The statements of a split transaction: on any error it is rolled back and the
        store released (sqlite errors become StoreError/StorageFull naming ``what``)."""
        try:
            yield
        except sqlite3.Error as exc:
            self._rollback()
            self._lock.release()
            self._storage_failed(what.split()[0], exc)
            error = _translate(exc, what)
            log.error("store_write_failed what=%r chunks=%d error=%s", what, chunks,
                      error.code)
            raise error from exc
        except BaseException:
            self._rollback()
            self._lock.release()
            raise

    def _begin(self, blocking: bool) -> bool:
        """BEGIN IMMEDIATE; without ``blocking``, False at once if another connection
        holds the write lock (instead of waiting up to busy_timeout on the event loop)."""
        conn = self._conn
        if blocking:
            self._execute_begin()
            return True
        conn.execute("PRAGMA busy_timeout=0")
        try:
            self._execute_begin()
        except StoreError:
            if conn.in_transaction:
                raise
            return False
        finally:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return True

    def _execute_begin(self) -> None:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._storage_failed("begin", exc)
            raise _translate(exc, "ingest failed") from exc

    def commit_ingest(self, prepared: PreparedIngest) -> list[ChunkOutcome]:
        """The second half of ``ingest``: COMMIT (durable on return), then the offsets."""
        try:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed("ingest", exc)
                error = _translate(exc, "ingest failed")
                log.error("store_write_failed what=%r chunks=%d error=%s", "ingest failed",
                          len(prepared.items), error.code)
                raise error from exc
            except BaseException:
                self._rollback()
                raise
            # Durable now: publish the new offsets.
            for (sensor_id, epoch), tracker in prepared.work.items():
                self._book.put(sensor_id, epoch, tracker)
            self._batch_slices.move_to(self._slices)
            self._maybe_reset_wal()
            return [self._outcome(item) for item in prepared.items]
        finally:
            self._lock.release()

    def _keep_slice(self, item: _Pending) -> None:
        """Remember a stored slice of an incomplete multi-chunk event for its completion."""
        if item.stored and item.raw is not None and item.chunk.chunk_count > 1 \
                and not item.event_complete:
            self._batch_slices.put(item.chunk.chunk_sha256, item.raw)

    def abort_ingest(self, prepared: PreparedIngest) -> None:
        """Roll back a prepared batch (nothing of it becomes visible)."""
        del prepared
        try:
            self._rollback()
        finally:
            self._lock.release()

    def _precheck(self, item: _Pending) -> None:
        """Checks needing no database: hash, decompression (bomb cap), field sanity.

        A one-chunk event's decompressed slice is the event itself: it is kept so that
        completing the event needs no second decompression."""
        chunk = item.chunk
        try:
            if chunk.sequence < 1:
                raise FieldValueError("sequence must be at least 1", field="sequence")
            if chunk.compression != "gzip":
                raise FieldValueError("compression must be 'gzip'", field="compression")
            if not 0 <= chunk.chunk_index < chunk.chunk_count:
                raise FieldValueError("chunk_index must be below chunk_count",
                                      field="chunk_index")
            # Slices are at least MIN_SLICE bytes except the last one, so an event with
            # more chunks than this cannot fit max_event_bytes: refuse before storing any.
            if (chunk.chunk_count - 1) * chunking.MIN_SLICE >= self._max_event_bytes:
                raise PayloadTooLarge(
                    f"an event of {chunk.chunk_count} chunks exceeds the "
                    f"{self._max_event_bytes}-byte event limit", field="chunk_count")
            chunking.verify_chunk(chunk.payload, chunk.chunk_sha256)
            raw = chunking.decompress_slice(chunk.payload, max_bytes=chunking.MAX_SLICE)
            item.raw = raw
        except PipelineError as exc:
            item.error = exc
            log.info("chunk_rejected sensor_id=%s epoch=%s sequence=%d event_id=%s error=%s",
                     chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id,
                     exc.code)

    def _tracker_for(self, work: dict[OffsetKey, OffsetTracker], chunk: Chunk) -> OffsetTracker:
        """A batch-private copy of the key's tracker, published only after COMMIT."""
        key = (chunk.sensor_id, chunk.queue_epoch)
        tracker = work.get(key)
        if tracker is None:
            current = self._book.peek(*key)
            tracker = work[key] = current.copy() if current is not None else OffsetTracker()
        return tracker

    def _ingest_one(self, item: _Pending, work: dict[OffsetKey, OffsetTracker],
                    now: float) -> None:
        chunk = item.chunk
        tracker = self._tracker_for(work, chunk)
        try:
            self._decide_and_write(item, tracker, now)
        except PipelineError as exc:
            # Raised only before this chunk wrote anything.
            item.error = exc
            log.info("chunk_rejected sensor_id=%s epoch=%s sequence=%d event_id=%s error=%s",
                     chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id,
                     exc.code)
            return
        tracker.add(chunk.sequence)

    def _decide_and_write(self, item: _Pending, tracker: OffsetTracker, now: float) -> None:
        """Dedupe, then write the chunk (and finish its event when it is the last one).

        Two lookups decide (both index probes, see ``_CHUNK_KEYS_SQL`` and
        ``_EVENT_STATE_SQL``); a chunk that completes its event is inserted without its
        payload, which goes straight into the event row instead of being written and
        cleared in the same transaction."""
        chunk = item.chunk
        conn = self._conn
        sid, epoch = chunk.sensor_id, chunk.queue_epoch
        same_sequence: tuple[str, int, bytes] | None = None
        same_slot: bytes | None = None
        for tag, event_id, index, digest in conn.execute(
                _CHUNK_KEYS_SQL, (sid, epoch, chunk.sequence, sid, chunk.event_id,
                                  chunk.chunk_index)):
            if tag == 0:
                same_sequence = (event_id, index, bytes(digest))
            else:
                same_slot = bytes(digest)
        if same_sequence is not None:
            if same_sequence == (chunk.event_id, chunk.chunk_index, chunk.chunk_sha256):
                self._mark_duplicate(item)
                return
            raise SequenceConflict(
                f"sequence {chunk.sequence} is already stored with different content",
                field="sequence")
        if tracker.contains(chunk.sequence):
            # Committed long ago and its key pruned by retention: still a duplicate.
            self._mark_duplicate(item)
            return
        if same_slot is not None:
            if same_slot == chunk.chunk_sha256:
                # The same chunk queued twice under two sequences: ack this one too.
                self._mark_duplicate(item)
                return
            raise ConflictError(
                f"chunk {chunk.chunk_index} of event {chunk.event_id} is already stored "
                "with different content", field="chunk_index")

        partial, finished = self._event_state(sid, chunk.event_id)
        if partial is not None:
            self._check_same_event(partial, chunk)
        elif finished is not None:
            # A late chunk of an event already completed/rejected: keep only its key.
            if finished[0] != chunk.event_sha256:
                raise ConflictError(f"event {chunk.event_id} was finished with another "
                                    "event_sha256", field="event_sha256")
            self._insert_chunk(chunk, None, now)
            item.stored = True
            item.event_complete = finished[1]
            return

        had_row = partial is not None
        completes = (partial.received if partial is not None else 0) + 1 >= chunk.chunk_count
        self._insert_chunk(chunk, None if completes else chunk.payload, now)
        item.stored = True
        if partial is None:
            partial = _Partial(epoch=epoch, chunk_count=chunk.chunk_count, received=1,
                               event_sha256=chunk.event_sha256,
                               first_sequence=chunk.sequence, last_sequence=chunk.sequence,
                               created_at=chunk.created_at,
                               logical_timestamp_ms=chunk.logical_timestamp_ms,
                               attributes=_attributes_json(chunk))
            if not completes:
                conn.execute(
                    "INSERT INTO partial_events (sensor_id, event_id, epoch, chunk_count,"
                    " received, event_sha256, created_at, logical_timestamp_ms, attributes,"
                    " first_sequence, last_sequence, first_seen)"
                    " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
                    (sid, chunk.event_id, epoch, chunk.chunk_count, chunk.event_sha256,
                     partial.created_at, partial.logical_timestamp_ms, partial.attributes,
                     chunk.sequence, chunk.sequence, now))
        else:
            partial.received += 1
            partial.first_sequence = min(partial.first_sequence, chunk.sequence)
            partial.last_sequence = max(partial.last_sequence, chunk.sequence)
            if chunk.chunk_index == 0:
                # The event's metadata is chunk 0's, whatever order the chunks came in.
                partial.created_at = chunk.created_at
                partial.logical_timestamp_ms = chunk.logical_timestamp_ms
                partial.attributes = _attributes_json(chunk)
            if not completes:
                conn.execute(
                    "UPDATE partial_events SET received = ?, first_sequence = ?,"
                    " last_sequence = ?, created_at = ?, logical_timestamp_ms = ?,"
                    " attributes = ? WHERE sensor_id = ? AND event_id = ?",
                    (partial.received, partial.first_sequence, partial.last_sequence,
                     partial.created_at, partial.logical_timestamp_ms, partial.attributes,
                     sid, chunk.event_id))
        if completes:
            self._complete(item, partial, had_row, now)

    def _insert_chunk(self, chunk: Chunk, payload: bytes | None, now: float) -> None:
        self._conn.execute(
            "INSERT INTO chunks (sensor_id, epoch, sequence, event_id, chunk_index, chunk_count,"
            " chunk_sha256, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id,
             chunk.chunk_index, chunk.chunk_count, chunk.chunk_sha256, payload, now))

    def _mark_duplicate(self, item: _Pending) -> None:
        item.duplicate = True
        item.event_complete = self._conn.execute(
            "SELECT 1 FROM events WHERE sensor_id = ? AND event_id = ?",
            (item.chunk.sensor_id, item.chunk.event_id)).fetchone() is not None

    def _event_state(self, sensor_id: str, event_id: str
                     ) -> tuple[_Partial | None, tuple[bytes, bool] | None]:
        """(partial progress, None) for an event still missing chunks; (None,
        (event_sha256, completed)) for one already completed or rejected; else (None, None)."""
        partial: _Partial | None = None
        finished: tuple[bytes, bool] | None = None
        for row in self._conn.execute(_EVENT_STATE_SQL, (sensor_id, event_id) * 3):
            tag = row[0]
            if tag == 0:
                partial = _Partial(epoch=row[1], chunk_count=row[2], received=row[3],
                                   event_sha256=bytes(row[4]), first_sequence=row[5],
                                   last_sequence=row[6], created_at=row[7],
                                   logical_timestamp_ms=row[8], attributes=row[9])
            elif finished is None or tag == 1:
                finished = (bytes(row[4]), tag == 1)
        if partial is not None:
            return partial, None
        return None, finished

    @staticmethod
    def _check_same_event(partial: _Partial, chunk: Chunk) -> None:
        if partial.chunk_count != chunk.chunk_count:
            raise ConflictError(f"event {chunk.event_id} has chunk_count {partial.chunk_count}",
                                field="chunk_count")
        if partial.event_sha256 != chunk.event_sha256:
            raise ConflictError(f"event {chunk.event_id} has another event_sha256",
                                field="event_sha256")

    def _complete(self, item: _Pending, partial: _Partial, had_row: bool, now: float) -> None:
        """All chunks are in: reassemble, verify, insert the event once, drop payloads.

        ``item``'s own chunk row was written without its payload; the payload is taken
        from the request (and a one-chunk event from the slice ``_precheck`` decompressed).
        """
        conn = self._conn
        chunk = item.chunk
        sid, event_id = chunk.sensor_id, chunk.event_id
        payloads: list[bytes] = []
        slices: list[bytes | None] = []  # decompressed already (this request or the cache)
        if chunk.chunk_count > 1:
            for index, payload, digest in conn.execute(
                    "SELECT chunk_index, payload, chunk_sha256 FROM chunks WHERE sensor_id = ?"
                    " AND event_id = ? ORDER BY chunk_index", (sid, event_id)):
                if index == chunk.chunk_index:
                    payloads.append(chunk.payload)
                    slices.append(item.raw)
                elif payload is not None:
                    payloads.append(bytes(payload))
                    slices.append(self._stored_slice(bytes(digest)))
            conn.execute("UPDATE chunks SET payload = NULL WHERE sensor_id = ? AND event_id = ?"
                         " AND payload IS NOT NULL", (sid, event_id))
        if had_row:
            conn.execute("DELETE FROM partial_events WHERE sensor_id = ? AND event_id = ?",
                         (sid, event_id))
        try:
            if chunk.chunk_count == 1 and item.raw is not None:
                data = item.raw
                if len(data) > self._max_event_bytes:
                    raise DecompressionLimitExceeded(
                        f"event decompresses to more than {self._max_event_bytes} bytes",
                        field="payload")
                chunking.verify_event(data, partial.event_sha256)
            else:
                if chunk.chunk_count == 1:
                    payloads, slices = [chunk.payload], [None]
                if len(payloads) != partial.chunk_count:
                    raise IntegrityError(f"event {event_id} has {len(payloads)} stored "
                                         f"payloads, expected {partial.chunk_count}")
                data = self._reassemble(payloads, slices, partial.event_sha256)
        except PipelineError as exc:
            # The chunk itself was valid and stays stored (and acked); only the event fails.
            conn.execute(
                "INSERT INTO rejected_events (sensor_id, event_id, epoch, event_sha256,"
                " chunk_count, reason, code, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (sid, event_id, partial.epoch, partial.event_sha256, partial.chunk_count,
                 exc.message, exc.code, now))
            log.warning("event_rejected sensor_id=%s epoch=%s event_id=%s reason=%s",
                        sid, partial.epoch, event_id, exc.code)
            return
        # Kept as the slices that arrived (each verified against its chunk_sha256, the
        # whole against event_sha256 just above), not as ``data``.
        stored = b"".join(payloads) if chunk.chunk_count > 1 else chunk.payload
        cursor = conn.execute(
            "INSERT INTO events (sensor_id, epoch, event_id, event_sha256, data,"
            " logical_timestamp_ms, created_at, completed_at, first_sequence, last_sequence,"
            " attributes, encoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, partial.epoch, event_id, partial.event_sha256, stored,
             partial.logical_timestamp_ms, partial.created_at, now, partial.first_sequence,
             partial.last_sequence, partial.attributes, ENCODING_GZIP))
        row_id = cursor.lastrowid
        assert row_id is not None
        item.event_complete = True
        item.completed_event = StoredEvent(
            row_id=row_id, sensor_id=sid, epoch=partial.epoch, event_id=event_id,
            event_sha256=partial.event_sha256, data=data,
            logical_timestamp_ms=partial.logical_timestamp_ms, created_at=partial.created_at,
            completed_at=now, first_sequence=partial.first_sequence,
            last_sequence=partial.last_sequence,
            attributes=(dict(chunk.attributes) if chunk.chunk_index == 0
                        else json.loads(partial.attributes)))
        log.debug("event_committed sensor_id=%s event_id=%s bytes=%d", sid, event_id, len(data))

    def _stored_slice(self, digest: bytes) -> bytes | None:
        """The decompressed slice of a stored chunk, if still at hand (content-addressed:
        this batch's own slices first, then those of committed batches)."""
        raw = self._batch_slices.pop(digest)
        return raw if raw is not None else self._slices.pop(digest)

    def _reassemble(self, payloads: list[bytes], slices: list[bytes | None],
                    event_sha256: bytes) -> bytes:
        """``chunking.reassemble`` that skips decompressing slices already decompressed
        (each was checked against the slice cap by ``_precheck``); same limits, same
        errors."""
        if all(piece is None for piece in slices):
            return chunking.reassemble(payloads, event_sha256,
                                       max_event_bytes=self._max_event_bytes,
                                       max_slice=chunking.MAX_SLICE)
        parts: list[bytes] = []
        total = 0
        for payload, piece in zip(payloads, slices):
            budget = self._max_event_bytes - total
            if piece is None:
                try:
                    piece = chunking.decompress_slice(
                        payload, max_bytes=min(chunking.MAX_SLICE, max(budget, 0)))
                except DecompressionLimitExceeded as exc:
                    if budget >= chunking.MAX_SLICE:
                        raise
                    raise DecompressionLimitExceeded(
                        f"event decompresses to more than {self._max_event_bytes} bytes",
                        field="payload") from exc
            if len(piece) > budget:
                raise DecompressionLimitExceeded(
                    f"event decompresses to more than {self._max_event_bytes} bytes",
                    field="payload")
            total += len(piece)
            parts.append(piece)
        data = b"".join(parts)
        chunking.verify_event(data, event_sha256)
        return data

    def _save_offsets(self, work: Mapping[OffsetKey, OffsetTracker], now: float) -> None:
        for (sensor_id, epoch), tracker in work.items():
            snap = tracker.snapshot()
            self._conn.execute(
                "INSERT INTO offsets (sensor_id, epoch, watermark, ranges, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sensor_id, epoch) DO UPDATE SET"
                " watermark = excluded.watermark, ranges = excluded.ranges,"
                " updated_at = excluded.updated_at",
                (sensor_id, epoch, snap["watermark"], json.dumps(snap["ranges"]), now))

    def _outcome(self, item: _Pending) -> ChunkOutcome:
        chunk = item.chunk
        tracker = self._book.peek(chunk.sensor_id, chunk.queue_epoch)
        return ChunkOutcome(
            sensor_id=chunk.sensor_id, epoch=chunk.queue_epoch, sequence=chunk.sequence,
            event_id=chunk.event_id, window_id=chunk.window_id, stored=item.stored,
            duplicate=item.duplicate, event_complete=item.event_complete,
            completed_event=item.completed_event,
            last_committed_sequence=tracker.watermark if tracker is not None else 0,
            error=item.error)

    def _rollback(self) -> None:
        self._batch_slices = SliceCache(BATCH_SLICES_UNBOUNDED)
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.error("store_rollback_failed error=%s", exc)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    # -- offsets (read) --------------------------------------------------------------

    def committed_offset(self, sensor_id: str, epoch: str) -> int:
        with self._lock:
            tracker = self._book.peek(sensor_id, epoch)
            return tracker.watermark if tracker is not None else 0

    def missing_sequences(self, sensor_id: str, epoch: str, limit: int = 1000) -> list[int]:
        with self._lock:
            tracker = self._book.peek(sensor_id, epoch)
            return tracker.missing(limit) if tracker is not None else []

    def tracker(self, sensor_id: str, epoch: str) -> OffsetTracker:
        """A copy of the key's tracker (changing it does not change the store)."""
        with self._lock:
            tracker = self._book.peek(sensor_id, epoch)
            return tracker.copy() if tracker is not None else OffsetTracker()

    def epochs(self, sensor_id: str) -> list[str]:
        with self._lock:
            return self._book.epochs(sensor_id)

    # -- events (read) ---------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "read failed") from exc

    def events(self, sensor_id: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        rows = self._read(f"SELECT {_EVENT_COLUMNS} FROM events WHERE sensor_id = ? AND"
                          " row_id > ? ORDER BY row_id LIMIT ?",
                          (sensor_id, after, max(0, limit)))
        return [_row_to_event(r) for r in rows]

    def get_event(self, sensor_id: str, event_id: str) -> StoredEvent | None:
        rows = self._read(f"SELECT {_EVENT_COLUMNS} FROM events WHERE sensor_id = ? AND"
                          " event_id = ?", (sensor_id, event_id))
        return _row_to_event(rows[0]) if rows else None

    def latest_events(self) -> list[StoredEvent]:
        """Latest completed event per sensor (by logical_timestamp_ms, then row_id)."""
        sensors = [r[0] for r in self._read("SELECT DISTINCT sensor_id FROM offsets"
                                            " ORDER BY sensor_id")]
        out: list[StoredEvent] = []
        for sensor_id in sensors:
            rows = self._read(f"SELECT {_EVENT_COLUMNS} FROM events WHERE sensor_id = ?"
                              " ORDER BY logical_timestamp_ms DESC, row_id DESC LIMIT 1",
                              (sensor_id,))
            if rows:
                out.append(_row_to_event(rows[0]))
        return out

    def event_count(self, sensor_id: str | None = None) -> int:
        if sensor_id is None:
            return int(self._read("SELECT COUNT(*) FROM events")[0][0])
        return int(self._read("SELECT COUNT(*) FROM events WHERE sensor_id = ?",
                              (sensor_id,))[0][0])

    def chunk_count(self) -> int:
        """Stored chunk rows (dedupe keys included, whether or not a payload is kept)."""
        return int(self._read("SELECT COUNT(*) FROM chunks")[0][0])

    def partial_event_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM partial_events")[0][0])

    def rejected_events(self, sensor_id: str | None = None) -> list[RejectedEvent]:
        sql = ("SELECT sensor_id, epoch, event_id, event_sha256, chunk_count, reason, code,"
               " rejected_at FROM rejected_events")
        params: tuple[Any, ...] = ()
        if sensor_id is not None:
            sql += " WHERE sensor_id = ?"
            params = (sensor_id,)
        rows = self._read(sql + " ORDER BY rejected_at, sensor_id, event_id", params)
        return [RejectedEvent(sensor_id=r[0], epoch=r[1], event_id=r[2],
                              event_sha256=bytes(r[3]), chunk_count=r[4], reason=r[5],
                              code=r[6], rejected_at=r[7]) for r in rows]

    # -- control state ---------------------------------------------------------------

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]], what: str) -> None:
        """Run statements in one short durable transaction. On a full disk the reserve is
        handed over and the transaction tried once more: control state must not be lost
        to a disk that new data filled."""
        statements = list(statements)
        try:
            self._write_once(statements, what)
        except StorageFull:
            if not self._reserve.present() and self.health.full:
                self._write_once(statements, what)
                return
            raise

    def _write_once(self, statements: Sequence[tuple[str, Sequence[Any]]], what: str) -> None:
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                for sql, params in statements:
                    self._conn.execute(sql, params)
                self._conn.execute("COMMIT")
                self._maybe_reset_wal()
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed(what.split()[0], exc)
                raise _translate(exc, what) from exc
            except BaseException:
                self._rollback()
                raise

    def save_window(self, sensor_id: str, window_id: str, state: dict[str, Any]) -> None:
        self._write([(
            "INSERT INTO windows (sensor_id, window_id, state, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (sensor_id, window_id) DO UPDATE SET state = excluded.state,"
            " updated_at = excluded.updated_at",
            (sensor_id, window_id, json.dumps(state, sort_keys=True), self._clock()))],
            "save_window failed")

    def delete_windows(self, sensor_id: str, window_ids: Iterable[str]) -> None:
        self._write([("DELETE FROM windows WHERE sensor_id = ? AND window_id = ?",
                      (sensor_id, wid)) for wid in list(window_ids)], "delete_windows failed")

    def load_windows(self, sensor_id: str) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT window_id, state FROM windows WHERE sensor_id = ?"
                          " ORDER BY window_id", (sensor_id,))
        return {wid: json.loads(state) for wid, state in rows}

    def save_sensor_state(self, sensor_id: str, state: dict[str, Any]) -> None:
        self._write([(
            "INSERT INTO sensor_state (sensor_id, state, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT (sensor_id) DO UPDATE SET state = excluded.state,"
            " updated_at = excluded.updated_at",
            (sensor_id, json.dumps(state, sort_keys=True), self._clock()))],
            "save_sensor_state failed")

    def save_control_state(self, changes: Iterable[ControlChange]) -> None:
        """Window deletions, window states and sensor states of many sensors in ONE
        durable transaction: persisting a fleet's window changes costs one fsync per round
        instead of two or more per sensor."""
        statements = self._control_statements(changes)
        if statements:
            self._write(statements, "save_control_state failed")

    def begin_control_state(self, changes: Iterable[ControlChange], *, blocking: bool = True
                            ) -> PreparedWrite | None:
        """``save_control_state`` split like ``begin_ingest``: BEGIN and the statements
        here (the event loop: no GIL hand-off per statement), ``commit_write`` (the fsync)
        in a worker thread. None when ``blocking`` is false and the store is busy."""
        statements = self._control_statements(changes)
        if not self._enter_split(blocking):
            return None
        with self._split_statements("save_control_state failed"):
            for sql, params in statements:
                self._conn.execute(sql, params)
        return PreparedWrite("save_control_state failed")

    def commit_write(self, prepared: PreparedWrite) -> None:
        """COMMIT a ``begin_control_state`` (durable on return) and release the store."""
        try:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed(prepared.what.split()[0], exc)
                raise _translate(exc, prepared.what) from exc
            except BaseException:
                self._rollback()
                raise
            self._maybe_reset_wal()
        finally:
            self._lock.release()

    def _control_statements(self, changes: Iterable[ControlChange]
                            ) -> list[tuple[str, Sequence[Any]]]:
        now = self._clock()
        statements: list[tuple[str, Sequence[Any]]] = []
        for sensor_id, gone, windows, state in changes:
            statements.extend(("DELETE FROM windows WHERE sensor_id = ? AND window_id = ?",
                               (sensor_id, wid)) for wid in gone)
            statements.extend((
                "INSERT INTO windows (sensor_id, window_id, state, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (sensor_id, window_id) DO UPDATE SET"
                " state = excluded.state, updated_at = excluded.updated_at",
                (sensor_id, wid, json.dumps(doc, sort_keys=True), now))
                for wid, doc in windows.items())
            statements.append((
                "INSERT INTO sensor_state (sensor_id, state, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (sensor_id) DO UPDATE SET state = excluded.state,"
                " updated_at = excluded.updated_at",
                (sensor_id, json.dumps(state, sort_keys=True), now)))
        return statements

    def load_sensor_states(self) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT sensor_id, state FROM sensor_state ORDER BY sensor_id")
        return {sid: json.loads(state) for sid, state in rows}

    # -- retention -------------------------------------------------------------------

    def prune(self, older_than: float, *, batch: int = 1000) -> int:
        """Delete data older than ``older_than`` (unix time) in short transactions.

        Completed events (by ``completed_at``), rejected-event records, and partial events
        first seen before the cut-off (recorded as rejected with code ``expired``, their
        payloads dropped) go; then finished chunks' dedupe keys older than the cut-off.
        Offsets keep the committed ranges, so a pruned key still answers ``duplicate``.
        Returns the number of events removed (completed + expired partial).
        """
        if batch < 1:
            raise ConfigError("prune batch must be positive", field="batch")
        events = self._prune_loop(
            "DELETE FROM events WHERE row_id IN (SELECT row_id FROM events"
            " WHERE completed_at < ? LIMIT ?)", older_than, batch)
        expired = 0
        while True:
            n = self._expire_partials(older_than, batch)
            expired += n
            if n < batch:
                break
        rejected = self._prune_loop(
            "DELETE FROM rejected_events WHERE (sensor_id, event_id) IN (SELECT sensor_id,"
            " event_id FROM rejected_events WHERE rejected_at < ? LIMIT ?)", older_than, batch)
        keys = self._prune_loop(
            "DELETE FROM chunks WHERE id IN (SELECT id FROM chunks WHERE received_at < ?"
            " AND payload IS NULL LIMIT ?)", older_than, batch)
        if expired:
            log.warning("store_partial_events_expired count=%d older_than=%.0f",
                        expired, older_than)
        log.info("store_pruned events=%d partial_expired=%d rejected=%d chunk_keys=%d "
                 "older_than=%.0f", events, expired, rejected, keys, older_than)
        return events + expired

    def _prune_loop(self, sql: str, older_than: float, batch: int) -> int:
        total = 0
        while True:
            try:
                n = self._prune_step(sql, older_than, batch)
            except StorageFull:
                # Retention is how a full disk gets room: with the reserve handed over
                # (by this failure), try once more.
                n = self._prune_step(sql, older_than, batch)
            total += max(n, 0)
            if n < batch:
                return total

    def _prune_step(self, sql: str, older_than: float, batch: int) -> int:
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                n = int(self._conn.execute(sql, (older_than, batch)).rowcount)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed("prune", exc)
                raise _translate(exc, "prune failed") from exc
        return n

    def _expire_partials(self, older_than: float, batch: int) -> int:
        now = self._clock()
        with self._lock:
            self._check_open()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                rows = conn.execute(
                    "SELECT sensor_id, event_id, epoch, event_sha256, chunk_count, received"
                    " FROM partial_events WHERE first_seen < ? LIMIT ?",
                    (older_than, batch)).fetchall()
                for sid, event_id, epoch, sha, count, received in rows:
                    conn.execute(
                        "INSERT INTO rejected_events (sensor_id, event_id, epoch, event_sha256,"
                        " chunk_count, reason, code, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (sid, event_id, epoch, sha, count,
                         f"expired with {received} of {count} chunks", "expired", now))
                    conn.execute("DELETE FROM partial_events WHERE sensor_id = ? AND"
                                 " event_id = ?", (sid, event_id))
                    conn.execute("UPDATE chunks SET payload = NULL WHERE sensor_id = ? AND"
                                 " event_id = ?", (sid, event_id))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed("prune", exc)
                raise _translate(exc, "prune failed") from exc
        return len(rows)

    # -- health ----------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise StoreError unless a durable write succeeds right now (for /readyz)."""
        for target in (self.path, self.path.parent):
            if not os.access(target, os.W_OK):
                raise StoreError(f"store path {target} is not writable")
        self._write([(
            "INSERT INTO store_meta (key, value) VALUES ('write_check', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (repr(self._clock()),))], "store is not writable")

    def close(self) -> None:
        self._checkpoint_stop.set()
        if self._checkpointer.is_alive() and self._checkpointer is not threading.current_thread():
            self._checkpointer.join(timeout=30)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._conn.close()
            except sqlite3.Error as exc:
                log.warning("store_close_failed path=%s error=%s", self.path, exc)
            log.info("store_closed path=%s", self.path)

    def __enter__(self) -> "SQLiteChunkStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | os.PathLike[str], **options: Any) -> ChunkStore:
    """Open the store named by ``path`` (an SQLite file path).

    ``postgresql://`` URLs are for the PostgreSQL engine, which is not part of this module.
    """
    text = os.fspath(path)
    if text.startswith(("postgres://", "postgresql://")):
        raise ConfigError("the PostgreSQL store engine is not available in this build",
                          field="store")
    return SQLiteChunkStore(text, **options)
