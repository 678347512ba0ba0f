"""The sensor's durable queue: one SQLite file in WAL mode that survives power cuts.

Each event is split into gzip chunks (``pipeline.common.chunking``) and all its chunks are
written in one ``BEGIN IMMEDIATE`` transaction, so after a crash an event is either wholly
queued or absent. A chunk's ``sequence`` is its ``AUTOINCREMENT`` row id: unique and
increasing for the life of the file, never reused after deletes (protocol.md section 2).
The random ``epoch`` created with the file tells the server that a re-imaged sensor whose
sequences restart at 1 is not sending duplicates.

Nothing leaves the queue silently: retention and the byte cap drop whole events and count
them in the ``dropped`` table; chunks whose payload no longer matches its hash are moved
to ``quarantine`` at open and never sent.

Tables::

    meta        key/value: epoch, schema_version
    chunks      the queued chunks (sequence AUTOINCREMENT)
    quarantine  chunks taken out of service, with the reason
    dropped     reason -> chunks / events / bytes dropped
    totals      one row: chunks and payload bytes in ``chunks``, kept by triggers so the
                byte cap costs O(1) per enqueue however large the backlog

One connection per object, guarded by a lock, so the agent can call it from
``asyncio.to_thread`` workers; other processes (``pipeline-sensor submit``) open their own
``DurableQueue`` on the same file and WAL plus ``busy_timeout`` lets them write concurrently.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from pipeline.common.chunking import (
    DEFAULT_SLICE,
    MAX_SLICE,
    MIN_SLICE,
    SplitEvent,
    sha256,
    split_event,
)
from pipeline.common.errors import (
    ConfigError,
    ConflictError,
    EventTooLarge,
    FieldTypeError,
    FieldValueError,
    QueueError,
    QueueFull,
)
from pipeline.common.headroom import KIND_FULL, KIND_IO, DiskHealth, Reserve
from pipeline.common.messages import (
    MAX_ATTRIBUTE_VALUE,
    MAX_ATTRIBUTES,
    MAX_SEQUENCE,
    MAX_STRING,
    Chunk,
)
from pipeline.common.tracing import TRACEPARENT, is_valid_traceparent

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
BUSY_TIMEOUT_MS = 10_000
SYNCHRONOUS_MODES = ("FULL", "NORMAL")
RESERVED_ATTRIBUTES = ("window_id", "traceparent")  # set by the agent when sending
REASON_BYTE_CAP = "byte_cap"
REASON_RETENTION = "retention"
REASON_INTEGRITY = "integrity"
_MAX_CREATED_AT = 64
_IN_BATCH = 500  # host parameters per IN (...) query, well under SQLite's limit
DEFAULT_RESERVE_BYTES = 4 * 1024 * 1024
PAGE_SIZE = 4096
MIN_CHECKPOINT_PAGES = 16
_OPEN_NEEDS_BYTES = 256 * 1024
MAX_RECLAIM_STEPS = 256  # vacuum steps per attempt to put the reserve back

_CHUNK_COLUMNS = (
    "sequence, event_id, chunk_index, chunk_count, payload, chunk_sha256, event_sha256, "
    "created_at, logical_timestamp_ms, attributes, enqueued_at, nbytes"
)

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    sequence             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id             TEXT    NOT NULL,
    chunk_index          INTEGER NOT NULL,
    chunk_count          INTEGER NOT NULL,
    payload              BLOB    NOT NULL,
    chunk_sha256         BLOB    NOT NULL,
    event_sha256         BLOB    NOT NULL,
    created_at           TEXT    NOT NULL,
    logical_timestamp_ms INTEGER NOT NULL,
    attributes           TEXT    NOT NULL,
    enqueued_at          REAL    NOT NULL,
    nbytes               INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_enqueued_at ON chunks (enqueued_at);
CREATE INDEX IF NOT EXISTS chunks_event_id ON chunks (event_id, chunk_index);
CREATE TABLE IF NOT EXISTS quarantine (
    sequence             INTEGER PRIMARY KEY,
    event_id             TEXT    NOT NULL,
    chunk_index          INTEGER NOT NULL,
    chunk_count          INTEGER NOT NULL,
    payload              BLOB    NOT NULL,
    chunk_sha256         BLOB    NOT NULL,
    event_sha256         BLOB    NOT NULL,
    created_at           TEXT    NOT NULL,
    logical_timestamp_ms INTEGER NOT NULL,
    attributes           TEXT    NOT NULL,
    enqueued_at          REAL    NOT NULL,
    nbytes               INTEGER NOT NULL,
    reason               TEXT    NOT NULL,
    quarantined_at       REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    reason TEXT PRIMARY KEY,
    chunks INTEGER NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    bytes  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS totals (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    chunks INTEGER NOT NULL,
    bytes  INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, chunks, bytes)
    SELECT 1, COUNT(*), COALESCE(SUM(nbytes), 0) FROM chunks;
CREATE TRIGGER IF NOT EXISTS chunks_totals_insert AFTER INSERT ON chunks BEGIN
    UPDATE totals SET chunks = chunks + 1, bytes = bytes + NEW.nbytes WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS chunks_totals_delete AFTER DELETE ON chunks BEGIN
    UPDATE totals SET chunks = chunks - 1, bytes = bytes - OLD.nbytes WHERE id = 1;
END;
"""


_INSERT_CHUNK = (f"INSERT INTO chunks ({_CHUNK_COLUMNS}) "
                 "VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

# split, attributes JSON, created_at, logical ms, compressed bytes, id chosen by the caller
_Prepared = tuple[SplitEvent, str, str, int, int, bool]
_T = TypeVar("_T")


@dataclass(frozen=True)
class EventInput:
    """One event for ``enqueue_many`` (the keyword arguments of ``enqueue``)."""

    data: bytes
    event_id: str | None = None
    created_at: str | None = None
    logical_timestamp_ms: int | None = None
    attributes: Mapping[str, str] | None = None
    traceparent: str | None = None


@dataclass(frozen=True)
class EnqueuedEvent:
    """What ``enqueue`` wrote: the event's chunk sequences in ``chunk_index`` order."""

    event_id: str
    sequences: tuple[int, ...]
    event_sha256: bytes
    size: int


@dataclass(frozen=True)
class QueuedChunk:
    """One stored chunk, everything needed to build the wire ``Chunk``."""

    sequence: int
    event_id: str
    chunk_index: int
    chunk_count: int
    payload: bytes
    chunk_sha256: bytes
    event_sha256: bytes
    created_at: str
    logical_timestamp_ms: int
    attributes: dict[str, str] = field(default_factory=dict)
    enqueued_at: float = 0.0

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def to_wire(self, sensor_id: str, window_id: str, *, queue_epoch: str = "",
                clock_skew_ms: float = 0.0) -> Chunk:
        """The wire chunk sent under ``window_id`` (added to the stored attributes)."""
        return Chunk(
            sensor_id=sensor_id, event_id=self.event_id, sequence=self.sequence,
            chunk_index=self.chunk_index, chunk_count=self.chunk_count, payload=self.payload,
            chunk_sha256=self.chunk_sha256, event_sha256=self.event_sha256,
            created_at=self.created_at, logical_timestamp_ms=self.logical_timestamp_ms,
            clock_skew_ms=clock_skew_ms, attributes={**self.attributes, "window_id": window_id},
            queue_epoch=queue_epoch)


@dataclass(frozen=True)
class ChunkMeta:
    """A chunk without its payload: what the sans-I/O dispatcher plans windows with."""

    sequence: int
    nbytes: int
    enqueued_at: float


@dataclass
class _DropTally:
    chunks: int = 0
    events: int = 0
    bytes: int = 0

    def add(self, chunks: int, nbytes: int) -> None:
        self.chunks += chunks
        self.events += 1
        self.bytes += nbytes

    def as_dict(self) -> dict[str, int]:
        return {"chunks": self.chunks, "events": self.events, "bytes": self.bytes}


class DurableQueue:
    """SQLite-backed FIFO of event chunks.

    ``synchronous="FULL"`` (the default) fsyncs the WAL on every commit: a committed event
    survives a power cut. ``synchronous="NORMAL"`` is an explicit opt-in that trades that
    safety for speed: it is still safe against a process crash, but the last committed
    transactions may be lost if the power fails before the next WAL checkpoint.

    ``max_pages`` caps the database file (``PRAGMA max_page_count``); beyond it SQLite
    reports a full disk, which tests use to exercise ``QueueFull``. ``verify_on_open=False``
    skips the O(n) open-time checks, for short-lived writers such as ``submit`` when the
    agent already runs them.

    ``reserve_bytes`` of disk are held back in ``<path>-reserve`` (``common/headroom.py``)
    so that deleting acknowledged chunks never fails for lack of space: new events are
    refused (``QueueFull``) while the reserve is missing; a delete that finds the disk
    full removes it, and once deletes have made room the freed pages are handed back to
    the file system (incremental vacuum, TRUNCATE checkpoint) and the reserve comes back.
    The WAL is checkpointed every ``reserve_bytes / 4``, so a checkpoint always fits in
    the reserve. 0 turns all of this off.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "FULL",
        retention_hours: float = 72.0,
        max_bytes: int | None = None,
        slice_size: int = DEFAULT_SLICE,
        clock: Callable[[], float] = time.time,
        max_pages: int | None = None,
        verify_on_open: bool = True,
        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
        open_with_reserve: bool = False,
        cache_kib: int = 2048,
    ) -> None:
        self._path = Path(path)
        self._cache_kib = max(1, int(cache_kib))  # bounded page cache (memory budget)
        self._reserve = Reserve(self._path, _check_reserve(reserve_bytes))
        self._vacuum_pages = MIN_CHECKPOINT_PAGES
        self.health = DiskHealth("queue", str(self._path))
        self._synchronous = _check_synchronous(synchronous)
        self._retention_s = _check_retention(retention_hours)
        self._max_bytes = _check_max_bytes(max_bytes)
        self._slice_size = _check_slice_size(slice_size)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        pages = _check_max_pages(max_pages)
        try:
            self._start(pages, verify_on_open)
        except QueueError as exc:
            if not _disk_short(self._path):
                raise
            # Opening needs a little disk (the WAL index, the WAL). The agent may spend
            # the reserve on it: it is the process that will delete and make room.
            if not (open_with_reserve and self._reserve.release()):
                raise QueueFull(f"queue {self._path} cannot be opened: the disk is full"
                                ) from exc
            log.warning("queue_reserve_used path=%s operation=open", self._path)
            self._start(pages, verify_on_open)
        # In place from the start: its absence is what says the disk is full.
        self._reserve.ensure(force=True)

    def _start(self, max_pages: int | None, verify_on_open: bool) -> None:
        conn = self._open(max_pages)
        self._conn = conn
        try:
            if verify_on_open:
                self._quick_check()
            self._epoch = self._init_schema()
            if verify_on_open:
                self._integrity_pass()
                self._enable_incremental_vacuum()
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _enable_incremental_vacuum(self) -> None:
        """A queue file made before the reserve existed keeps freed pages inside the file,
        so a full disk would not get them back: switch it to incremental auto-vacuum (a
        VACUUM, once, by the agent at open) when the disk has room for the copy."""
        conn = self._require_conn()
        if not self._reserve.enabled or \
                int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 0:
            return
        size = self._path.stat().st_size
        try:
            fs = os.statvfs(self._path.parent)
        except OSError:
            return
        if fs.f_bavail * fs.f_frsize < 2 * size + 2 * self._reserve.size:
            log.warning("queue_vacuum_deferred path=%s bytes=%d reason=disk_space",
                        self._path, size)
            return
        started = time.monotonic()
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
        except sqlite3.Error as exc:
            log.warning("queue_vacuum_failed path=%s error=%s", self._path, exc)
            return
        log.info("queue_migrated path=%s auto_vacuum=incremental bytes=%d duration_ms=%.1f",
                 self._path, size, (time.monotonic() - started) * 1000)

    # ------------------------------------------------------------------ opening

    def _open(self, max_pages: int | None) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self._path), timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise QueueError(f"cannot open queue {self._path}: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new file: lets deletes hand pages back to the disk. (On an existing
                # file the pragma would write, and fail on a full disk.)
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise QueueError(f"queue {self._path} could not switch to WAL (mode {mode})")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
            conn.execute("PRAGMA mmap_size=0")
            # Builds with SECURE_DELETE (Debian's) zero every freed page through the WAL:
            # a delete would write as much as it frees, and fail on a full disk. FAST
            # still clears the b-tree pages it touches, without writing freed pages.
            conn.execute("PRAGMA secure_delete=FAST")
            if self._reserve.enabled:
                wal_bytes = self._reserve.size // 4
                conn.execute("PRAGMA wal_autocheckpoint="
                             f"{max(MIN_CHECKPOINT_PAGES, wal_bytes // PAGE_SIZE)}")
                conn.execute(f"PRAGMA journal_size_limit={wal_bytes}")
                self._vacuum_pages = max(MIN_CHECKPOINT_PAGES, wal_bytes // PAGE_SIZE)
            if max_pages is not None:
                conn.execute(f"PRAGMA max_page_count={max_pages}")
        except sqlite3.Error as exc:
            conn.close()
            if _is_disk_full(exc):
                raise QueueFull(f"queue {self._path} cannot be opened: the disk is full"
                                ) from exc
            raise QueueError(f"queue {self._path} is not a usable database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(self) -> str:
        conn = self._require_conn()
        with self._translate("open"):
            with self._write(conn):
                _run_script(conn, _SCHEMA)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                             (SCHEMA_VERSION,))
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?)",
                             (secrets.token_hex(16),))
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise QueueError(f"queue {self._path} has schema version "
                             f"{meta.get('schema_version')!r}, expected {SCHEMA_VERSION!r}")
        return str(meta["epoch"])

    def _quick_check(self) -> None:
        conn = self._require_conn()
        with self._translate("quick_check"):
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        if rows != ["ok"]:
            detail = "; ".join(rows).replace("\n", "; ")
            raise QueueError(f"queue {self._path} is corrupt: {detail[:300]}")

    def _integrity_pass(self) -> None:
        """Re-hash every payload; move mismatches to quarantine instead of sending them."""
        conn = self._require_conn()
        started = time.monotonic()
        checked = 0
        bad: list[int] = []
        with self._translate("integrity"):
            for sequence, payload, digest in conn.execute(
                    "SELECT sequence, payload, chunk_sha256 FROM chunks ORDER BY sequence"):
                checked += 1
                if not isinstance(payload, bytes) or not isinstance(digest, bytes) \
                        or sha256(payload) != digest:
                    bad.append(int(sequence))
        moved = sum(1 for seq in bad if self._quarantine(seq, REASON_INTEGRITY))
        duration_ms = (time.monotonic() - started) * 1000
        log.info("queue_integrity_checked path=%s chunks=%d quarantined=%d duration_ms=%.1f",
                 self._path, checked, moved, duration_ms)
        if moved:
            log.warning("queue_integrity_failed path=%s quarantined=%d sequences=%s",
                        self._path, moved, bad[:20])

    # ------------------------------------------------------------------ plumbing

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise QueueError(f"queue {self._path} is closed")
        return self._conn

    def _write(self, conn: sqlite3.Connection) -> _Transaction:
        """One write transaction; rolled back on any error so nothing is half-written."""
        return _Transaction(conn, self._path)

    def _translate(self, operation: str) -> _Translate:
        """Turn sqlite3 errors into the package's QueueError family."""
        return _Translate(self._path, operation, self.health)

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def epoch(self) -> str:
        return self._epoch

    @property
    def synchronous(self) -> str:
        return self._synchronous

    # ------------------------------------------------------------------ writing

    def enqueue(
        self,
        data: bytes,
        *,
        event_id: str | None = None,
        created_at: str | None = None,
        logical_timestamp_ms: int | None = None,
        attributes: Mapping[str, str] | None = None,
        traceparent: str | None = None,
    ) -> EnqueuedEvent:
        """Queue one event: all of its chunks commit together or none does.

        ``traceparent`` (the submit span's W3C trace context) is stored under the reserved
        attribute of that name; callers cannot set it through ``attributes``."""
        now = self._clock()
        prepared = self._prepare(data, event_id, created_at, logical_timestamp_ms, attributes,
                                 traceparent, now)
        drops = _DropTally()
        self._require_headroom()
        queued = self._retry_full(lambda: self._insert_one(prepared, now, drops))
        if self.health.full:
            self.health.recovered()
        if drops.events:
            self._log_drops(drops)
        return queued

    def enqueue_many(self, events: Sequence[EventInput]) -> list[EnqueuedEvent]:
        """Queue several events in ONE transaction, so one fsync covers them all.

        Each event is still whole or absent; the call commits all of them or, on any
        error (a refused event, a full disk), none. For producers that have several events
        at hand (grouped submits, backfills)."""
        if not events:
            return []
        now = self._clock()
        prepared = [self._prepare(e.data, e.event_id, e.created_at, e.logical_timestamp_ms,
                                  e.attributes, e.traceparent, now) for e in events]
        drops = _DropTally()
        self._require_headroom()
        out = self._retry_full(lambda: self._insert_all(prepared, now, drops))
        if self.health.full:
            self.health.recovered()
        if drops.events:
            self._log_drops(drops)
        return out

    def _insert_one(self, prepared: _Prepared, now: float, drops: _DropTally
                    ) -> EnqueuedEvent:
        with self._lock:
            conn = self._require_conn()
            with self._translate("enqueue"), self._write(conn):
                return self._insert(conn, prepared, now, drops)

    def _insert_all(self, prepared: list[_Prepared], now: float, drops: _DropTally
                    ) -> list[EnqueuedEvent]:
        with self._lock:
            conn = self._require_conn()
            with self._translate("enqueue"), self._write(conn):
                return [self._insert(conn, item, now, drops) for item in prepared]

    def _retry_full(self, work: Callable[[], _T]) -> _T:
        """An insert that found the disk full is tried once more after a TRUNCATE
        checkpoint: a write-ahead log that could not grow is then empty, and the pages
        the deletes freed inside the file take the data. The reserve is never used."""
        try:
            return work()
        except QueueFull:
            if not self._reserve.enabled:
                raise
        self._checkpoint("TRUNCATE")
        return work()

    def _insert(self, conn: sqlite3.Connection, prepared: _Prepared, now: float,
                drops: _DropTally) -> EnqueuedEvent:
        """Write one prepared event inside the caller's transaction (under the lock).

        The duplicate check runs only for caller-chosen ids: an id this process just drew
        from 74 random bits within one millisecond cannot already be queued, and the check is a B-tree probe
        per event on the hottest path."""
        split, attrs_json, created, logical_ms, nbytes, caller_id = prepared
        if caller_id and conn.execute("SELECT 1 FROM chunks WHERE event_id = ? LIMIT 1",
                                      (split.event_id,)).fetchone() is not None:
            raise ConflictError(f"event {split.event_id} is already queued", field="event_id")
        if self._max_bytes is not None:
            self._make_room(conn, nbytes, drops)
        sequences = []
        for piece in split.pieces:
            cursor = conn.execute(_INSERT_CHUNK, (
                split.event_id, piece.index, piece.count, piece.payload, piece.chunk_sha256,
                split.event_sha256, created, logical_ms, attrs_json, now, len(piece.payload)))
            sequences.append(int(cursor.lastrowid or 0))
        return EnqueuedEvent(event_id=split.event_id, sequences=tuple(sequences),
                             event_sha256=split.event_sha256, size=split.size)

    def _log_drops(self, drops: _DropTally) -> None:
        log.warning("queue_dropped reason=%s events=%d chunks=%d bytes=%d max_bytes=%d",
                    REASON_BYTE_CAP, drops.events, drops.chunks, drops.bytes,
                    self._max_bytes or 0)

    def _prepare(self, data: bytes, event_id: str | None, created_at: str | None,
                 logical_timestamp_ms: int | None, attributes: Mapping[str, str] | None,
                 traceparent: str | None, now: float) -> _Prepared:
        """Validate and compress one event outside the lock (the slow, pure part)."""
        attrs_json = _encode_attributes(attributes, traceparent=traceparent)
        split = split_event(data, slice_size=self._slice_size, event_id=event_id)
        nbytes = sum(len(piece.payload) for piece in split.pieces)
        if self._max_bytes is not None and nbytes > self._max_bytes:
            raise EventTooLarge(f"event of {nbytes} compressed bytes exceeds the queue cap "
                                f"of {self._max_bytes} bytes", field="data")
        created = (_check_created_at(created_at) if created_at is not None
                   else _iso_utc(now))
        logical_ms = (_check_logical_ms(logical_timestamp_ms)
                      if logical_timestamp_ms is not None else int(now * 1000))
        return split, attrs_json, created, logical_ms, nbytes, event_id is not None

    def _make_room(self, conn: sqlite3.Connection, nbytes: int, drops: _DropTally) -> None:
        """Drop the oldest whole events until ``nbytes`` more fit under the byte cap."""
        assert self._max_bytes is not None
        total = int(conn.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()[0])
        while total + nbytes > self._max_bytes:
            row = conn.execute("SELECT event_id FROM chunks ORDER BY sequence LIMIT 1").fetchone()
            if row is None:
                break
            chunks, freed = _delete_event(conn, str(row[0]))
            drops.add(chunks, freed)
            total -= freed
        if drops.events:
            _record_drops(conn, REASON_BYTE_CAP, drops)

    def delete(self, sequences: Iterable[int]) -> int:
        """Delete chunks by sequence in one transaction; unknown sequences are ignored."""
        wanted = sorted({_check_sequence(s) for s in sequences})
        if not wanted:
            return 0
        deleted = self._with_room("delete", lambda: self._delete(wanted))
        self._reclaim()
        if deleted and self.health.full and self._reserve.present():
            self.health.recovered()  # freed pages take the next events
        return deleted

    def _delete(self, wanted: list[int]) -> int:
        with self._lock:
            conn = self._require_conn()
            with self._translate("delete"), self._write(conn):
                cursor = conn.executemany("DELETE FROM chunks WHERE sequence = ?",
                                          [(s,) for s in wanted])
                return max(int(cursor.rowcount), 0)

    # ------------------------------------------------------------------ headroom

    @property
    def disk_full(self) -> bool:
        """True while new events are refused for lack of disk space (the gauge)."""
        return self.health.full or not self._reserve.present()

    def _require_headroom(self) -> None:
        """New events only while the reserve is in place: it is the deletes' room."""
        if self._reserve.ensure():
            return
        error = QueueFull(f"queue {self._path}: the disk is full; new events are refused "
                          "until delivered ones are deleted and the reserve "
                          f"({self._reserve.size} bytes) is back")
        self.health.failed("enqueue", KIND_FULL, "reserve missing")
        raise error

    def _with_room(self, operation: str, work: Callable[[], int]) -> int:
        """Run a write that frees space; if the disk is too full even for that, give it
        the reserve and try once more."""
        try:
            return work()
        except QueueFull:
            if not self._reserve.enabled:
                raise
        # The reserve may already be gone (a concurrent delete took it): the checkpoint
        # may still have made room.
        freed = self._reserve.release()
        log.warning("queue_reserve_used path=%s operation=%s freed=%d", self._path,
                    operation, freed)
        self._checkpoint("TRUNCATE")
        return work()

    def _reclaim(self) -> None:
        """With the reserve gone, hand free pages back to the disk and try to put the
        reserve back; a no-op (one stat) while the reserve is in place."""
        if self._reserve.present():
            return
        self._checkpoint("TRUNCATE")
        for _ in range(MAX_RECLAIM_STEPS):
            if self._reserve.ensure(force=True):
                self.health.recovered()
                return
            if not self._vacuum_step():
                return

    def _vacuum_step(self) -> bool:
        """Move a few pages off the end of the file and truncate it (each step fits in
        the WAL's share of the reserve); False when nothing is left to give back."""
        with self._lock:
            conn = self._require_conn()
            try:
                if int(conn.execute("PRAGMA freelist_count").fetchone()[0]) == 0:
                    return False
                conn.execute(f"PRAGMA incremental_vacuum({self._vacuum_pages})").fetchall()
            except sqlite3.Error as exc:
                log.debug("queue_vacuum_failed path=%s error=%s", self._path, exc)
                return False
        self._checkpoint("TRUNCATE")
        return True

    def _checkpoint(self, mode: str) -> None:
        with self._lock:
            conn = self._require_conn()
            try:
                conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()
            except sqlite3.Error as exc:
                self.health.failed("checkpoint", _error_kind(exc), exc)

    def restore_headroom(self) -> bool:
        """Timer hook (the agent's tick): reclaim space and put the reserve back if the disk
        has room again. True when new events are accepted."""
        self._reclaim()
        return not self.disk_full

    def quarantine(self, sequence: int, reason: str) -> bool:
        """Move one chunk to quarantine; False when no such chunk is queued."""
        with self._lock:
            moved = self._quarantine(_check_sequence(sequence), reason)
        if moved:
            log.warning("queue_quarantined path=%s sequence=%d reason=%s",
                        self._path, sequence, reason)
        return moved

    def _quarantine(self, sequence: int, reason: str) -> bool:
        conn = self._require_conn()
        with self._translate("quarantine"), self._write(conn):
            cursor = conn.execute(
                f"INSERT OR REPLACE INTO quarantine ({_CHUNK_COLUMNS}, reason, quarantined_at) "
                f"SELECT {_CHUNK_COLUMNS}, ?, ? FROM chunks WHERE sequence = ?",
                (str(reason), self._clock(), sequence))
            if cursor.rowcount <= 0:
                return False
            conn.execute("DELETE FROM chunks WHERE sequence = ?", (sequence,))
            return True

    def prune(self, now: float | None = None, batch: int = 1000) -> dict[str, int]:
        """Drop whole events older than the retention period, in small transactions.

        Runs on a timer, never on the enqueue path, so a large backlog expiring at once
        does not hold the write lock for long.
        """
        if batch < 1:
            raise FieldValueError("batch must be at least 1", field="batch")
        cutoff = (self._clock() if now is None else now) - self._retention_s
        total = _DropTally()
        while True:
            step = _DropTally()
            self._with_room("prune", lambda: self._prune_step(cutoff, batch, step))
            if not step.events:
                break
            total.chunks += step.chunks
            total.events += step.events
            total.bytes += step.bytes
        if total.events:
            self._reclaim()
            log.warning("queue_pruned reason=%s events=%d chunks=%d bytes=%d retention_hours=%g",
                        REASON_RETENTION, total.events, total.chunks, total.bytes,
                        self._retention_s / 3600)
        return total.as_dict()

    def _prune_step(self, cutoff: float, batch: int, step: _DropTally) -> int:
        """One prune transaction; ``step`` is reset first, so a retry counts once."""
        step.chunks = step.events = step.bytes = 0
        with self._lock:
            conn = self._require_conn()
            with self._translate("prune"), self._write(conn):
                rows = conn.execute(
                    "SELECT event_id FROM chunks WHERE enqueued_at < ? "
                    "ORDER BY enqueued_at LIMIT ?", (cutoff, batch)).fetchall()
                for event_id in dict.fromkeys(str(r[0]) for r in rows):
                    step.add(*_delete_event(conn, event_id))
                if step.events:
                    _record_drops(conn, REASON_RETENTION, step)
        return step.events

    # ------------------------------------------------------------------ reading

    def list_after(self, since_sequence: int, limit: int) -> list[ChunkMeta]:
        """Light rows (no payload) with ``sequence > since_sequence``, oldest first."""
        if limit < 1:
            return []
        with self._lock:
            conn = self._require_conn()
            with self._translate("list_after"):
                rows = conn.execute(
                    "SELECT sequence, nbytes, enqueued_at FROM chunks WHERE sequence > ? "
                    "ORDER BY sequence LIMIT ?", (since_sequence, limit)).fetchall()
        return [ChunkMeta(sequence=int(s), nbytes=int(n), enqueued_at=float(e))
                for s, n, e in rows]

    def get(self, sequences: Sequence[int]) -> list[QueuedChunk]:
        """The queued chunks among ``sequences``, ascending; missing ones are omitted."""
        wanted = sorted({_check_sequence(s) for s in sequences})
        found: list[QueuedChunk] = []
        with self._lock:
            conn = self._require_conn()
            with self._translate("get"):
                for start in range(0, len(wanted), _IN_BATCH):
                    part = wanted[start:start + _IN_BATCH]
                    marks = ",".join("?" * len(part))
                    rows = conn.execute(
                        f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE sequence IN ({marks}) "
                        "ORDER BY sequence", part).fetchall()
                    found.extend(_row_to_chunk(r) for r in rows)
        return found

    def read_window(self, since_sequence: int, max_chunks: int, max_bytes: int) -> list[QueuedChunk]:
        """Chunks with ``sequence > since_sequence``, oldest first, within both limits.

        As protocol 1.0 requires, the first chunk is returned even if it alone is larger
        than ``max_bytes``, so an oversized chunk can never block the queue.
        """
        if max_chunks < 1:
            return []
        window: list[QueuedChunk] = []
        used = 0
        with self._lock:
            conn = self._require_conn()
            with self._translate("read_window"):
                cursor = conn.execute(
                    f"SELECT {_CHUNK_COLUMNS} FROM chunks WHERE sequence > ? "
                    "ORDER BY sequence LIMIT ?", (since_sequence, max_chunks))
                try:
                    for row in cursor:
                        chunk = _row_to_chunk(row)
                        if window and used + chunk.nbytes > max_bytes:
                            break
                        window.append(chunk)
                        used += chunk.nbytes
                finally:
                    cursor.close()
        return window

    def quarantined(self) -> list[tuple[QueuedChunk, str]]:
        with self._lock:
            conn = self._require_conn()
            with self._translate("quarantined"):
                rows = conn.execute(f"SELECT {_CHUNK_COLUMNS}, reason FROM quarantine "
                                    "ORDER BY sequence").fetchall()
        return [(_row_to_chunk(r[:-1]), str(r[-1])) for r in rows]

    def quarantined_count(self) -> int:
        return int(self._scalar("SELECT COUNT(*) FROM quarantine"))

    # ------------------------------------------------------------------ statistics

    def queue_depth(self) -> int:
        """Chunks waiting to be sent (runbook name)."""
        return int(self._scalar("SELECT chunks FROM totals WHERE id = 1"))

    def event_count(self) -> int:
        """Distinct events with at least one queued chunk (an index scan: not for hot paths)."""
        return int(self._scalar("SELECT COUNT(DISTINCT event_id) FROM chunks"))

    def total_bytes(self) -> int:
        """Compressed payload bytes waiting to be sent (what ``max_bytes`` caps)."""
        return int(self._scalar("SELECT bytes FROM totals WHERE id = 1"))

    def oldest_age_seconds(self) -> float | None:
        oldest = self._scalar("SELECT MIN(enqueued_at) FROM chunks")
        if oldest is None:
            return None
        return max(0.0, self._clock() - float(oldest))

    def last_sequence(self) -> int:
        """Highest sequence ever assigned in this file; 0 before the first enqueue."""
        value = self._scalar("SELECT seq FROM sqlite_sequence WHERE name = 'chunks'")
        return int(value or 0)

    def dropped_counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            conn = self._require_conn()
            with self._translate("dropped_counts"):
                rows = conn.execute(
                    "SELECT reason, chunks, events, bytes FROM dropped ORDER BY reason").fetchall()
        return {str(r): {"chunks": int(c), "events": int(e), "bytes": int(b)}
                for r, c, e, b in rows}

    def _scalar(self, sql: str) -> Any:
        with self._lock:
            conn = self._require_conn()
            with self._translate("read"):
                row = conn.execute(sql).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> DurableQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error (a failed COMMIT too).

    A class rather than a generator context manager: it runs on every enqueue."""

    __slots__ = ("_conn", "_path")

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> bool:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return False
        self._rollback()
        return False

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # SQLite may already have rolled back
                log.warning("queue_rollback_failed path=%s error=%s", self._path, exc)


class _Translate:
    """Re-raise sqlite3 errors as QueueFull (disk full) or QueueError; others pass through.
    Write failures are recorded in ``health`` (metrics, rate-limited log lines)."""

    __slots__ = ("_path", "_operation", "_health")

    def __init__(self, path: Path, operation: str, health: DiskHealth) -> None:
        self._path = path
        self._operation = operation
        self._health = health

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> bool:
        if not isinstance(exc, sqlite3.Error):
            return False
        kind = _error_kind(exc)
        if kind is not None:
            self._health.failed(self._operation, kind, exc)
        if kind == KIND_FULL:
            raise QueueFull(f"queue {self._path} is full: {exc}") from exc
        raise QueueError(f"queue {self._path} {self._operation} failed: {exc}") from exc



def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run DDL statement by statement: ``executescript`` would COMMIT our transaction."""
    for statement in _split_statements(script):
        conn.execute(statement)


def _split_statements(script: str) -> list[str]:
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def _delete_event(conn: sqlite3.Connection, event_id: str) -> tuple[int, int]:
    """Delete every queued chunk of one event; returns (chunks, bytes) removed."""
    chunks, nbytes = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM chunks WHERE event_id = ?",
        (event_id,)).fetchone()
    conn.execute("DELETE FROM chunks WHERE event_id = ?", (event_id,))
    return int(chunks), int(nbytes)


def _record_drops(conn: sqlite3.Connection, reason: str, tally: _DropTally) -> None:
    conn.execute(
        "INSERT INTO dropped (reason, chunks, events, bytes) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (reason) DO UPDATE SET chunks = chunks + excluded.chunks, "
        "events = events + excluded.events, bytes = bytes + excluded.bytes",
        (reason, tally.chunks, tally.events, tally.bytes))


def _row_to_chunk(row: Sequence[Any]) -> QueuedChunk:
    (sequence, event_id, chunk_index, chunk_count, payload, chunk_sha256, event_sha256,
     created_at, logical_ms, attributes, enqueued_at, _nbytes) = row
    return QueuedChunk(
        sequence=int(sequence), event_id=str(event_id), chunk_index=int(chunk_index),
        chunk_count=int(chunk_count), payload=bytes(payload), chunk_sha256=bytes(chunk_sha256),
        event_sha256=bytes(event_sha256), created_at=str(created_at),
        logical_timestamp_ms=int(logical_ms), attributes=dict(json.loads(attributes)),
        enqueued_at=float(enqueued_at))


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "database or disk is full" in str(exc)


def _disk_short(path: Path) -> bool:
    """Less free space than SQLite needs to open a WAL database (index and log)."""
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < _OPEN_NEEDS_BYTES


def _error_kind(exc: sqlite3.Error) -> str | None:
    """``disk_full``, ``io_error`` (EIO and the like: SQLITE_IOERR) or None (not the disk)."""
    if _is_disk_full(exc):
        return KIND_FULL
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        return KIND_IO
    return KIND_IO if "disk I/O error" in str(exc) else None


def _iso_utc(timestamp: float) -> str:
    """``timestamp`` as ISO 8601 UTC with milliseconds and ``Z``.

    The text is exactly ``datetime.fromtimestamp(timestamp, utc).isoformat(
    timespec="milliseconds")`` with ``Z``; the microseconds are rounded as that call rounds
    them (half to even on the fraction), and the per-second prefix is cached, because
    building a datetime for every event is a measurable share of an enqueue."""
    global _iso_second
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    cached = _iso_second
    if cached[0] != second:
        prefix = datetime.fromtimestamp(second, tz=timezone.utc).isoformat(timespec="seconds")
        cached = (second, prefix[:-len("+00:00")])
        _iso_second = cached
    return f"{cached[1]}.{micros // 1000:03d}Z"


_iso_second: tuple[int | None, str] = (None, "")  # (whole second, its ISO text); see _iso_utc


def _encode_attributes(attributes: Mapping[str, str] | None, *,
                       traceparent: str | None = None) -> str:
    """Validate against the server's limits: a chunk it would refuse would never leave.

    The reserved attributes are refused here and count against the wire limit: the agent
    adds ``window_id`` when sending; ``traceparent`` comes only through its own argument."""
    if traceparent is not None and not is_valid_traceparent(traceparent):
        raise FieldValueError("traceparent must be a W3C version-00 traceparent",
                              field="traceparent")
    if attributes is None:
        if traceparent is None:
            return "{}"  # the common case, without a JSON encoder round trip
        attributes = {}
    if not isinstance(attributes, Mapping):
        raise FieldTypeError("attributes must be a mapping of strings", field="attributes")
    for name in RESERVED_ATTRIBUTES:
        if name in attributes:
            raise FieldValueError(f"attribute {name} is reserved", field=f"attributes.{name}")
    limit = MAX_ATTRIBUTES - len(RESERVED_ATTRIBUTES)
    if len(attributes) > limit:
        raise FieldValueError(f"at most {limit} attributes", field="attributes")
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FieldTypeError("attributes must map strings to strings", field="attributes")
        if len(key) > MAX_STRING or len(value) > MAX_ATTRIBUTE_VALUE:
            raise FieldValueError("attribute key or value too long",
                                  field=f"attributes.{key[:64]}")
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FieldValueError("attributes must be valid unicode",
                                  field=f"attributes.{key[:64]}") from exc
    doc = dict(attributes)
    if traceparent is not None:
        doc[TRACEPARENT] = traceparent
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _check_created_at(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_CREATED_AT:
        raise FieldValueError(f"created_at must be a string of 1-{_MAX_CREATED_AT} characters",
                              field="created_at")
    return value


def _check_logical_ms(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQUENCE:
        raise FieldValueError("logical_timestamp_ms must be a non-negative integer",
                              field="logical_timestamp_ms")
    return value


def _check_sequence(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldTypeError("sequence must be an integer", field="sequence")
    return value


def _check_synchronous(value: str) -> str:
    mode = value.upper() if isinstance(value, str) else ""
    if mode not in SYNCHRONOUS_MODES:
        raise ConfigError(f"queue.synchronous must be one of {SYNCHRONOUS_MODES}, got {value!r}",
                          field="queue.synchronous")
    return mode


def _check_retention(hours: float) -> float:
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not hours > 0 \
            or hours == float("inf"):
        raise ConfigError(f"queue.retention_hours must be a positive number, got {hours!r}",
                          field="queue.retention_hours")
    return float(hours) * 3600.0


def _check_max_bytes(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"queue.max_bytes must be a positive integer, got {value!r}",
                          field="queue.max_bytes")
    return value


def _check_max_pages(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"queue.max_pages must be a positive integer, got {value!r}",
                          field="queue.max_pages")
    return value


def _check_reserve(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"queue.reserve_bytes must be a non-negative integer, got {value!r}",
                          field="queue.reserve_bytes")
    return value


def _check_slice_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SLICE <= value <= MAX_SLICE:
        raise ConfigError(f"queue.slice_size must be between {MIN_SLICE} and {MAX_SLICE}, "
                          f"got {value!r}", field="queue.slice_size")
    return value
