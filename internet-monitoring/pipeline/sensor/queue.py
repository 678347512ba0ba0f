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

This module holds ``DurableQueue``; its parts live next to it: ``queue_schema`` (tables),
``queue_rows`` (what goes in and out), ``queue_inputs`` (checks of what callers pass),
``queue_file`` (opening the file), ``queue_sqlite`` (transactions, error translation).
"""

from __future__ import annotations

import functools
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from pipeline.common.chunking import DEFAULT_SLICE, sha256
from pipeline.common.errors import FieldValueError, QueueError, QueueFull
from pipeline.common.headroom import KIND_FULL, DiskHealth, Reserve
from pipeline.sensor.queue_file import (
    MIN_CHECKPOINT_PAGES,
    enable_incremental_vacuum,
    open_connection,
    vacuum_pages,
)
from pipeline.sensor.queue_inputs import (
    RESERVED_ATTRIBUTES,
    SYNCHRONOUS_MODES,
    check_max_bytes,
    check_max_pages,
    check_reserve,
    check_retention,
    check_sequence,
    check_slice_size,
    PreparedEvent,
    check_synchronous,
    prepare_event,
)
from pipeline.sensor.queue_rows import (
    ChunkMeta,
    DropTally,
    EnqueuedEvent,
    EventInput,
    QueuedChunk,
)
from pipeline.sensor.queue_schema import SCHEMA_SQL, SCHEMA_VERSION, run_script
from pipeline.sensor.queue_sqlite import Transaction, Translate, disk_short, error_kind
from pipeline.sensor.queue_statements import (
    REASON_BYTE_CAP,
    REASON_INTEGRITY,
    REASON_RETENTION,
    drop_events_before,
    insert_event,
    move_to_quarantine,
    select_after,
    select_chunks,
    select_dropped,
    select_quarantined,
    select_window,
)

log = logging.getLogger(__name__)

#: Re-exported: callers import the queue's rows and input rules from here.
__all__ = ["ChunkMeta", "DurableQueue", "EnqueuedEvent", "EventInput", "QueuedChunk",
           "RESERVED_ATTRIBUTES", "SCHEMA_VERSION", "SYNCHRONOUS_MODES"]

DEFAULT_RESERVE_BYTES = 4 * 1024 * 1024
MAX_RECLAIM_STEPS = 256  # vacuum steps per attempt to put the reserve back


_T = TypeVar("_T")



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
        self._reserve = Reserve(self._path, check_reserve(reserve_bytes))
        self._vacuum_pages = MIN_CHECKPOINT_PAGES
        self.health = DiskHealth("queue", str(self._path))
        self._synchronous = check_synchronous(synchronous)
        self._retention_s = check_retention(retention_hours)
        self._max_bytes = check_max_bytes(max_bytes)
        self._slice_size = check_slice_size(slice_size)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        pages = check_max_pages(max_pages)
        try:
            self._start(pages, verify_on_open)
        except QueueError as exc:
            if not disk_short(self._path):
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
        conn = open_connection(self._path, self._synchronous, self._reserve, max_pages,
                               cache_kib=self._cache_kib)
        if self._reserve.enabled:
            self._vacuum_pages = vacuum_pages(self._reserve)
        self._conn = conn
        try:
            if verify_on_open:
                self._quick_check()
            self._epoch = self._init_schema()
            if verify_on_open:
                self._integrity_pass()
                enable_incremental_vacuum(conn, self._path, self._reserve)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # ------------------------------------------------------------------ opening

    def _init_schema(self) -> str:
        conn = self._require_conn()
        with self._translate("open"):
            with self._write(conn):
                run_script(conn, SCHEMA_SQL)
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

    def _write(self, conn: sqlite3.Connection) -> Transaction:
        """One write transaction; rolled back on any error so nothing is half-written."""
        return Transaction(conn, self._path)

    def _translate(self, operation: str) -> Translate:
        """Turn sqlite3 errors into the package's QueueError family."""
        return Translate(self._path, operation, self.health)

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
        prepared = prepare_event(data, event_id, created_at, logical_timestamp_ms, attributes,
                                 traceparent, now, self._slice_size, self._max_bytes)
        drops = DropTally()
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
        prepared = [prepare_event(e.data, e.event_id, e.created_at, e.logical_timestamp_ms,
                                  e.attributes, e.traceparent, now, self._slice_size,
                                  self._max_bytes, e.compresslevel) for e in events]
        drops = DropTally()
        self._require_headroom()
        out = self._retry_full(lambda: self._insert_all(prepared, now, drops))
        if self.health.full:
            self.health.recovered()
        if drops.events:
            self._log_drops(drops)
        return out

    def _insert_one(self, prepared: PreparedEvent, now: float, drops: DropTally
                    ) -> EnqueuedEvent:
        with self._lock:
            conn = self._require_conn()
            with self._translate("enqueue"), self._write(conn):
                return insert_event(conn, prepared, now, self._max_bytes, drops)

    def _insert_all(self, prepared: list[PreparedEvent], now: float, drops: DropTally
                    ) -> list[EnqueuedEvent]:
        with self._lock:
            conn = self._require_conn()
            with self._translate("enqueue"), self._write(conn):
                return [insert_event(conn, item, now, self._max_bytes, drops)
                        for item in prepared]

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

    def _log_drops(self, drops: DropTally) -> None:
        log.warning("queue_dropped reason=%s events=%d chunks=%d bytes=%d max_bytes=%d",
                    REASON_BYTE_CAP, drops.events, drops.chunks, drops.bytes,
                    self._max_bytes or 0)

    def delete(self, sequences: Iterable[int]) -> int:
        """Delete chunks by sequence in one transaction; unknown sequences are ignored."""
        wanted = sorted({check_sequence(s) for s in sequences})
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
                # error_kind is None for a non-disk error: recorded as before (kind None);
                # whether it belongs in the disk-health record at all is an open question.
                self.health.failed("checkpoint", error_kind(exc), exc)  # type: ignore[arg-type]

    def restore_headroom(self) -> bool:
        """Timer hook (the agent's tick): reclaim space and put the reserve back if the disk
        has room again. True when new events are accepted."""
        self._reclaim()
        return not self.disk_full

    def quarantine(self, sequence: int, reason: str) -> bool:
        """Move one chunk to quarantine; False when no such chunk is queued."""
        with self._lock:
            moved = self._quarantine(check_sequence(sequence), reason)
        if moved:
            log.warning("queue_quarantined path=%s sequence=%d reason=%s",
                        self._path, sequence, reason)
        return moved

    def _quarantine(self, sequence: int, reason: str) -> bool:
        conn = self._require_conn()
        with self._translate("quarantine"), self._write(conn):
            return move_to_quarantine(conn, sequence, reason, self._clock())

    def prune(self, now: float | None = None, batch: int = 1000) -> dict[str, int]:
        """Drop whole events older than the retention period, in small transactions.

        Runs on a timer, never on the enqueue path, so a large backlog expiring at once
        does not hold the write lock for long.
        """
        if batch < 1:
            raise FieldValueError("batch must be at least 1", field="batch")
        cutoff = (self._clock() if now is None else now) - self._retention_s
        total = DropTally()
        while True:
            step = DropTally()
            self._with_room("prune", functools.partial(self._prune_step, cutoff, batch, step))
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

    def _prune_step(self, cutoff: float, batch: int, step: DropTally) -> int:
        """One prune transaction; ``step`` is reset first, so a retry counts once."""
        step.chunks = step.events = step.bytes = 0
        with self._lock:
            conn = self._require_conn()
            with self._translate("prune"), self._write(conn):
                drop_events_before(conn, cutoff, batch, step)
        return step.events

    # ------------------------------------------------------------------ reading

    def list_after(self, since_sequence: int, limit: int) -> list[ChunkMeta]:
        """Light rows (no payload) with ``sequence > since_sequence``, oldest first."""
        if limit < 1:
            return []
        with self._lock:
            conn = self._require_conn()
            with self._translate("list_after"):
                return select_after(conn, since_sequence, limit)

    def get(self, sequences: Sequence[int]) -> list[QueuedChunk]:
        """The queued chunks among ``sequences``, ascending; missing ones are omitted."""
        wanted = sorted({check_sequence(s) for s in sequences})
        with self._lock:
            conn = self._require_conn()
            with self._translate("get"):
                return select_chunks(conn, wanted)

    def read_window(self, since_sequence: int, max_chunks: int, max_bytes: int
                    ) -> list[QueuedChunk]:
        """Chunks with ``sequence > since_sequence``, oldest first, within both limits.

        As protocol 1.0 requires, the first chunk is returned even if it alone is larger
        than ``max_bytes``, so an oversized chunk can never block the queue.
        """
        if max_chunks < 1:
            return []
        with self._lock:
            conn = self._require_conn()
            with self._translate("read_window"):
                return select_window(conn, since_sequence, max_chunks, max_bytes)

    def quarantined(self) -> list[tuple[QueuedChunk, str]]:
        with self._lock:
            conn = self._require_conn()
            with self._translate("quarantined"):
                return select_quarantined(conn)

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
                return select_dropped(conn)

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
