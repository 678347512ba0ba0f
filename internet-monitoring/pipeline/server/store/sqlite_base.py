"""The SQLite store's machinery under every write: the connection and its lock, short and
split (statements now, COMMIT later) transactions, disk headroom, and WAL checkpointing.

The store is synchronous; the server calls it from several threads. One connection
(``check_same_thread=False``) guarded by a plain lock makes that safe: a split transaction
takes the lock in ``begin_*`` and releases it in ``commit_*``/``abort_*``, maybe in another
thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.common.errors import StorageFull, StoreError
from pipeline.common.headroom import KIND_FULL, DiskHealth, Reserve
from pipeline.server.offsets import OffsetBook
from pipeline.server.store.slices import SliceCache
from pipeline.server.store.sqlite_schema import error_kind as _error_kind
from pipeline.server.store.sqlite_schema import translate as _translate

log = logging.getLogger("pipeline.server.store")

BUSY_TIMEOUT_MS = 30_000
CHECKPOINT_INTERVAL_S = 0.2
WAL_RESTART_FRAMES = 16_384  # ~64 MiB of WAL
CHECKPOINT_WARN_FRAMES = 250_000  # ~1 GiB of WAL: the checkpointer is not keeping up
BATCH_SLICES_UNBOUNDED = 1 << 62  # a batch's own slices are held anyway (its items keep them)


class SQLiteBase:
    """State and transaction helpers shared by the store's ingest, read and control parts
    (set up by ``SQLiteChunkStore.__init__``)."""

    path: Path
    health: DiskHealth
    checkpoints: int
    _conn: sqlite3.Connection
    _lock: threading.Lock
    _reserve: Reserve
    _book: OffsetBook
    _slices: SliceCache
    _batch_slices: SliceCache
    _clock: Callable[[], float]
    _closed: bool
    _wal_frames: int
    _checkpoint_stop: threading.Event

    # -- transactions ----------------------------------------------------------------

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


    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            self._check_open()
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "read failed") from exc

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

    # -- WAL checkpointing -----------------------------------------------------------

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

    def _limit_journal(self) -> None:
        """Truncate the WAL file back to about ``WAL_RESTART_FRAMES`` pages once reset."""
        self._conn.execute(f"PRAGMA journal_size_limit={WAL_RESTART_FRAMES * 4096}")

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

