"""The SQLite backend of the store port: WAL, ``synchronous=FULL``, one group-commit
transaction per ingest batch (one fsync per batch, not per chunk).

``SQLiteChunkStore`` is assembled from its parts: ``sqlite_base`` (connection, lock,
transactions, headroom, checkpointing), ``sqlite_ingest`` (ingest, deciding through the
ledger), ``sqlite_reads``, ``sqlite_control`` (control state, retention) and ``sqlite_forward``
(forwarding cursors);
``sqlite_schema`` holds the tables and the migration. Here: opening, setup, closing.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

from pipeline.common.errors import ConfigError, StoreError
from pipeline.common.headroom import KIND_FULL, DiskHealth, Reserve
from pipeline.server.offsets import OffsetBook, OffsetTracker
from pipeline.server.store.pending import DEFAULT_MAX_EVENT_BYTES
from pipeline.server.store.slices import SliceCache
from pipeline.server.store.sqlite_base import BATCH_SLICES_UNBOUNDED, BUSY_TIMEOUT_MS
from pipeline.server.store.sqlite_control import SQLiteControl
from pipeline.server.store.sqlite_forward import SQLiteForward
from pipeline.server.store.sqlite_ingest import SQLiteIngest
from pipeline.server.store.sqlite_reads import SQLiteReads
from pipeline.server.store.sqlite_schema import SCHEMA, SCHEMA_VERSION, migrate
from pipeline.server.store.sqlite_schema import translate as _translate

log = logging.getLogger("pipeline.server.store")

CACHE_KIB = 64 * 1024
SLICE_CACHE_BYTES = 32 * 1024 * 1024
_SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class SQLiteChunkStore(SQLiteIngest, SQLiteReads, SQLiteControl, SQLiteForward):
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
            for statement in SCHEMA:
                conn.execute(statement)
            migrate(conn)
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
        self._limit_journal()

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

    # -- closing ---------------------------------------------------------------------

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

    def __enter__(self) -> SQLiteChunkStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

