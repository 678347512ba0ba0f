"""The SQLite store's ingest: one group-commit transaction per batch, every decision the
ledger's (``ledger.py``), only the lookups and writes here.

Every check that can reject a chunk runs *before* that chunk writes anything, so one bad
chunk never fails its neighbours; only a storage failure (``StorageFull``/``StoreError``)
rolls the whole batch back, and then nothing of the batch is visible, in the database or
in the in-memory offsets.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Mapping, Sequence

from pipeline.common.messages import Chunk
from pipeline.server.offsets import OffsetKey, OffsetTracker
from pipeline.server.store.event_rows import ENCODING_GZIP
from pipeline.server.store.ledger import (
    DUPLICATE,
    Completed,
    Conflict,
    Partial,
    Piece,
    StoreLate,
    StoreProgress,
    complete_event,
    judge_event,
    judge_keys,
)
from pipeline.server.store.pending import (
    DEFAULT_MAX_EVENT_BYTES,
    Pending,
    outcome,
    precheck,
    refuse,
)
from pipeline.server.store.records import ChunkOutcome, StoredEvent
from pipeline.server.store.slices import SliceCache
from pipeline.server.store.sqlite_base import BATCH_SLICES_UNBOUNDED, SQLiteBase
from pipeline.server.store.sqlite_schema import (
    read_chunk_keys,
    read_event_state,
)
from pipeline.server.store.sqlite_schema import translate as _translate

log = logging.getLogger("pipeline.server.store")


@dataclass
class PreparedIngest:
    """A batch between ``begin_ingest`` and ``commit_ingest`` (store-private state)."""

    items: list[Pending]
    work: dict[OffsetKey, OffsetTracker]


class SQLiteIngest(SQLiteBase):
    """``ingest`` and its split halves."""

    _max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES

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
            pending = [Pending(chunk) for chunk in chunks]
            work: dict[OffsetKey, OffsetTracker] = {}
            now = self._clock()
            self._batch_slices = SliceCache(BATCH_SLICES_UNBOUNDED)
            for item in pending:
                precheck(item, self._max_event_bytes)
            for item in pending:
                if item.error is None:
                    self._ingest_one(item, work, now)
                    self._keep_slice(item)
            self._save_offsets(work, now)
        return PreparedIngest(pending, work)

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
            return [outcome(item, self._book.peek(item.chunk.sensor_id, item.chunk.queue_epoch))
                    for item in prepared.items]
        finally:
            self._lock.release()

    def _keep_slice(self, item: Pending) -> None:
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

    def _tracker_for(self, work: dict[OffsetKey, OffsetTracker], chunk: Chunk) -> OffsetTracker:
        """A batch-private copy of the key's tracker, published only after COMMIT."""
        key = (chunk.sensor_id, chunk.queue_epoch)
        tracker = work.get(key)
        if tracker is None:
            current = self._book.peek(*key)
            tracker = work[key] = current.copy() if current is not None else OffsetTracker()
        return tracker

    def _ingest_one(self, item: Pending, work: dict[OffsetKey, OffsetTracker],
                    now: float) -> None:
        """Ask the ledger about the chunk and write what it decided."""
        chunk = item.chunk
        tracker = self._tracker_for(work, chunk)
        conn = self._conn
        keys = read_chunk_keys(conn, chunk.sensor_id, chunk.queue_epoch, chunk.sequence,
                               chunk.event_id, chunk.chunk_index,
                               tracker.contains(chunk.sequence))
        verdict = judge_keys(chunk, keys)
        if verdict is DUPLICATE:
            self._mark_duplicate(item)
        elif isinstance(verdict, Conflict):
            refuse(item, verdict)
            return
        else:
            decision = judge_event(chunk, read_event_state(conn, chunk.sensor_id,
                                                                  chunk.event_id))
            if isinstance(decision, Conflict):
                refuse(item, decision)
                return
            if isinstance(decision, StoreLate):
                # A late chunk of an event already completed/rejected: keep only its key.
                self._insert_chunk(chunk, None, now)
                item.stored = True
                item.event_complete = decision.event_complete
            else:
                self._store_progress(item, decision, now)
        tracker.add(chunk.sequence)

    def _store_progress(self, item: Pending, decision: StoreProgress,
                        now: float) -> None:
        """Write the chunk and its event's progress; a chunk that completes its event is
        inserted without its payload, which goes straight into the event row instead of
        being written and cleared in the same transaction."""
        chunk, partial = item.chunk, decision.partial
        self._insert_chunk(chunk, None if decision.completes else chunk.payload, now)
        item.stored = True
        if decision.completes:
            self._complete(item, partial, had_row=not decision.is_new, now=now)
        elif decision.is_new:
            self._conn.execute(
                "INSERT INTO partial_events (sensor_id, event_id, epoch, chunk_count,"
                " received, event_sha256, created_at, logical_timestamp_ms, attributes,"
                " first_sequence, last_sequence, first_seen)"
                " VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
                (chunk.sensor_id, chunk.event_id, partial.epoch, chunk.chunk_count,
                 chunk.event_sha256, partial.created_at, partial.logical_timestamp_ms,
                 partial.attributes, chunk.sequence, chunk.sequence, now))
        else:
            self._conn.execute(
                "UPDATE partial_events SET received = ?, first_sequence = ?,"
                " last_sequence = ?, created_at = ?, logical_timestamp_ms = ?,"
                " attributes = ? WHERE sensor_id = ? AND event_id = ?",
                (partial.received, partial.first_sequence, partial.last_sequence,
                 partial.created_at, partial.logical_timestamp_ms, partial.attributes,
                 chunk.sensor_id, chunk.event_id))

    def _insert_chunk(self, chunk: Chunk, payload: bytes | None, now: float) -> None:
        self._conn.execute(
            "INSERT INTO chunks (sensor_id, epoch, sequence, event_id, chunk_index, chunk_count,"
            " chunk_sha256, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id,
             chunk.chunk_index, chunk.chunk_count, chunk.chunk_sha256, payload, now))

    def _mark_duplicate(self, item: Pending) -> None:
        item.duplicate = True
        item.event_complete = self._conn.execute(
            "SELECT 1 FROM events WHERE sensor_id = ? AND event_id = ?",
            (item.chunk.sensor_id, item.chunk.event_id)).fetchone() is not None

    def _complete(self, item: Pending, partial: Partial, had_row: bool, now: float) -> None:
        """All chunks are in: the ledger reassembles and verifies; here the event row is
        inserted once (or the rejection recorded) and the chunks' payloads dropped.

        ``item``'s own chunk row was written without its payload; the payload is taken
        from the request (and a one-chunk event from the slice ``_precheck`` decompressed).
        """
        chunk = item.chunk
        pieces = self._pieces(item) if chunk.chunk_count > 1 else []
        if had_row:
            self._conn.execute("DELETE FROM partial_events WHERE sensor_id = ? AND"
                               " event_id = ?", (chunk.sensor_id, chunk.event_id))
        result = complete_event(chunk, item.raw, partial, pieces, self._max_event_bytes)
        if isinstance(result, Completed):
            self._insert_event(item, partial, result, now)
            return
        # The chunk itself was valid and stays stored (and acked); only the event fails.
        exc = result.error
        self._conn.execute(
            "INSERT INTO rejected_events (sensor_id, event_id, epoch, event_sha256,"
            " chunk_count, reason, code, rejected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (chunk.sensor_id, chunk.event_id, partial.epoch, partial.event_sha256,
             partial.chunk_count, exc.message, exc.code, now))
        log.warning("event_rejected sensor_id=%s epoch=%s event_id=%s reason=%s",
                    chunk.sensor_id, partial.epoch, chunk.event_id, exc.code)

    def _pieces(self, item: Pending) -> list[Piece]:
        """The event's stored slices in chunk_index order (this chunk's from the request),
        then their payloads cleared: the event row holds them from now on."""
        chunk = item.chunk
        sid, event_id = chunk.sensor_id, chunk.event_id
        pieces: list[Piece] = []
        for index, payload, digest in self._conn.execute(
                "SELECT chunk_index, payload, chunk_sha256 FROM chunks WHERE sensor_id = ?"
                " AND event_id = ? ORDER BY chunk_index", (sid, event_id)):
            if index == chunk.chunk_index:
                pieces.append(Piece(chunk.payload, item.raw))
            elif payload is not None:
                pieces.append(Piece(bytes(payload), self._stored_slice(bytes(digest))))
        self._conn.execute("UPDATE chunks SET payload = NULL WHERE sensor_id = ? AND"
                           " event_id = ? AND payload IS NOT NULL", (sid, event_id))
        return pieces

    def _insert_event(self, item: Pending, partial: Partial, done: Completed,
                      now: float) -> None:
        chunk = item.chunk
        sid, event_id = chunk.sensor_id, chunk.event_id
        cursor = self._conn.execute(
            "INSERT INTO events (sensor_id, epoch, event_id, event_sha256, data,"
            " logical_timestamp_ms, created_at, completed_at, first_sequence, last_sequence,"
            " attributes, encoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, partial.epoch, event_id, partial.event_sha256, done.stored,
             partial.logical_timestamp_ms, partial.created_at, now, partial.first_sequence,
             partial.last_sequence, partial.attributes, ENCODING_GZIP))
        row_id = cursor.lastrowid
        assert row_id is not None
        item.event_complete = True
        item.completed_event = StoredEvent(
            row_id=row_id, sensor_id=sid, epoch=partial.epoch, event_id=event_id,
            event_sha256=partial.event_sha256, data=done.data,
            logical_timestamp_ms=partial.logical_timestamp_ms, created_at=partial.created_at,
            completed_at=now, first_sequence=partial.first_sequence,
            last_sequence=partial.last_sequence,
            attributes=(dict(chunk.attributes) if chunk.chunk_index == 0
                        else json.loads(partial.attributes)))
        log.debug("event_committed sensor_id=%s event_id=%s bytes=%d", sid, event_id,
                  len(done.data))

    def _stored_slice(self, digest: bytes) -> bytes | None:
        """The decompressed slice of a stored chunk, if still at hand (content-addressed:
        this batch's own slices first, then those of committed batches)."""
        raw = self._batch_slices.pop(digest)
        return raw if raw is not None else self._slices.pop(digest)

    def _save_offsets(self, work: Mapping[OffsetKey, OffsetTracker], now: float) -> None:
        for (sensor_id, epoch), tracker in work.items():
            snap = tracker.snapshot()
            self._conn.execute(
                "INSERT INTO offsets (sensor_id, epoch, watermark, ranges, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sensor_id, epoch) DO UPDATE SET"
                " watermark = excluded.watermark, ranges = excluded.ranges,"
                " updated_at = excluded.updated_at",
                (sensor_id, epoch, snap["watermark"], json.dumps(snap["ranges"]), now))
