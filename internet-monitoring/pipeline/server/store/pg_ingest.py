"""The PostgreSQL store's ingest: one group-commit transaction per batch, every decision the
ledger's (``ledger.py``), only the lookups and writes here.

Exactly-once across processes: the transaction first takes the advisory lock of every
sensor in the batch (``PgBase._lock_sensors``), then reads those sensors' offsets from the
database, then probes and writes. Two servers ingesting the same (sensor, epoch, sequence)
therefore run one after the other, and the second sees the first's committed rows and
offsets: it answers ``duplicate``. Nothing is cached across batches except decompressed
slices, which are content-addressed (a stale entry can never be a wrong one).

As in the SQLite store, every check that can reject a chunk runs before that chunk writes
anything; only a database failure rolls the whole batch back.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import psycopg

from pipeline.common.errors import PipelineError
from pipeline.common.messages import Chunk
from pipeline.server.offsets import OffsetKey, OffsetTracker
from pipeline.server.store.ledger import (
    DUPLICATE,
    Completed,
    Conflict,
    Partial,
    Piece,
    StoreLate,
    StoreProgress,
    check_chunk,
    complete_event,
    judge_event,
    judge_keys,
)
from pipeline.server.store.pg_base import PgBase
from pipeline.server.store.pg_schema import (
    ENCODING_GZIP,
    day_of,
    read_chunk_keys,
    read_event_state,
    translate,
)
from pipeline.server.store.records import ChunkOutcome, StoredEvent
from pipeline.server.store.slices import SliceCache

log = logging.getLogger("pipeline.server.store")

DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024
_UNBOUNDED = 1 << 62


@dataclass
class _Pending:
    chunk: Chunk
    stored: bool = False
    duplicate: bool = False
    event_complete: bool = False
    completed_event: StoredEvent | None = None
    error: PipelineError | None = None
    raw: bytes | None = None


@dataclass
class PgPreparedIngest:
    """A batch between ``begin_ingest`` and ``commit_ingest``: its connection holds the
    open transaction (and the sensors' advisory locks)."""

    conn: psycopg.Connection[Any]
    items: list[_Pending]
    work: dict[OffsetKey, OffsetTracker]
    slices: SliceCache


def _log_rejected(chunk: Chunk, exc: PipelineError) -> None:
    log.info("chunk_rejected sensor_id=%s epoch=%s sequence=%d event_id=%s error=%s",
             chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id, exc.code)


class PgIngest(PgBase):
    """``ingest`` and its split halves."""

    _max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES

    def ingest(self, chunks: Sequence[Chunk]) -> list[ChunkOutcome]:
        """Verify, dedupe and commit ``chunks`` in one durable transaction (one outcome
        per chunk, input order); StoreError/StorageFull when the batch cannot commit."""
        if not chunks:
            return []
        prepared = self.begin_ingest(chunks)
        assert prepared is not None
        return self.commit_ingest(prepared)

    def begin_ingest(self, chunks: Sequence[Chunk], *, blocking: bool = True
                     ) -> PgPreparedIngest | None:
        """Every statement of the batch's transaction, no COMMIT. ``blocking=False``
        answers None: round trips to the database never run on the caller's loop."""
        if not blocking:
            return None
        self._check_open()
        now = self._clock()
        self._ensure_day(now)
        conn = self._getconn("ingest failed")
        try:
            pending = [_Pending(chunk) for chunk in chunks]
            slices = SliceCache(_UNBOUNDED)
            for item in pending:
                self._precheck(item)
            self._lock_sensors(conn, {c.sensor_id for c in chunks})
            work = self._load_trackers(conn, {c.sensor_id for c in chunks})
            day = day_of(now)
            for item in pending:
                if item.error is None:
                    self._ingest_one(conn, item, work, slices, now, day)
                    if item.stored and item.raw is not None and item.chunk.chunk_count > 1 \
                            and not item.event_complete:
                        slices.put(item.chunk.chunk_sha256, item.raw)
            self._save_offsets(conn, work, {(c.sensor_id, c.queue_epoch) for c in chunks}, now)
        except psycopg.Error as exc:
            self._putconn(conn)
            self._failed("ingest failed", exc)
            error = translate(exc, "ingest failed")
            log.error("store_write_failed what='ingest failed' chunks=%d error=%s",
                      len(chunks), error.code)
            raise error from exc
        except BaseException:
            self._putconn(conn)
            raise
        return PgPreparedIngest(conn, pending, work, slices)

    def commit_ingest(self, prepared: PgPreparedIngest) -> list[ChunkOutcome]:
        """COMMIT (durable on return: ``synchronous_commit=on``), then the outcomes."""
        conn = prepared.conn
        try:
            conn.commit()
        except psycopg.Error as exc:
            self._failed("ingest failed", exc)
            error = translate(exc, "ingest failed")
            log.error("store_write_failed what='ingest failed' chunks=%d error=%s",
                      len(prepared.items), error.code)
            raise error from exc
        finally:
            self._putconn(conn)
        self._recovered()
        prepared.slices.move_to(self._slices)
        return [self._outcome(item, prepared.work) for item in prepared.items]

    def abort_ingest(self, prepared: PgPreparedIngest) -> None:
        """Roll back a prepared batch (nothing of it becomes visible)."""
        self._putconn(prepared.conn)

    # -- one chunk -------------------------------------------------------------------

    def _precheck(self, item: _Pending) -> None:
        try:
            item.raw = check_chunk(item.chunk, self._max_event_bytes)
        except PipelineError as exc:
            item.error = exc
            _log_rejected(item.chunk, exc)

    @staticmethod
    def _load_trackers(conn: psycopg.Connection[Any], sensors: set[str]
                       ) -> dict[OffsetKey, OffsetTracker]:
        """The sensors' committed offsets as the database has them now (under their
        locks: no other server can move them until this transaction ends)."""
        work: dict[OffsetKey, OffsetTracker] = {}
        for sensor_id, epoch, watermark, ranges in conn.execute(
                "SELECT sensor_id, epoch, watermark, ranges FROM offsets"
                " WHERE sensor_id = ANY(%s)", (sorted(sensors),)):
            work[(sensor_id, epoch)] = OffsetTracker.restore(
                {"watermark": int(watermark), "ranges": json.loads(ranges)})
        return work

    def _ingest_one(self, conn: psycopg.Connection[Any], item: _Pending,
                    work: dict[OffsetKey, OffsetTracker], slices: SliceCache,
                    now: float, day: int) -> None:
        chunk = item.chunk
        tracker = work.setdefault((chunk.sensor_id, chunk.queue_epoch), OffsetTracker())
        keys = read_chunk_keys(conn, chunk.sensor_id, chunk.queue_epoch, chunk.sequence,
                               chunk.event_id, chunk.chunk_index,
                               tracker.contains(chunk.sequence))
        verdict = judge_keys(chunk, keys)
        if verdict is DUPLICATE:
            item.duplicate = True
            item.event_complete = conn.execute(
                "SELECT 1 FROM events WHERE sensor_id = %s AND event_id = %s",
                (chunk.sensor_id, chunk.event_id)).fetchone() is not None
        elif isinstance(verdict, Conflict):
            self._refuse(item, verdict)
            return
        else:
            decision = judge_event(chunk, read_event_state(conn, chunk.sensor_id,
                                                           chunk.event_id))
            if isinstance(decision, Conflict):
                self._refuse(item, decision)
                return
            if isinstance(decision, StoreLate):
                self._insert_chunk(conn, chunk, None, now, day)
                item.stored = True
                item.event_complete = decision.event_complete
            else:
                self._store_progress(conn, item, decision, slices, now, day)
        tracker.add(chunk.sequence)

    @staticmethod
    def _refuse(item: _Pending, conflict: Conflict) -> None:
        item.error = conflict.error
        _log_rejected(item.chunk, conflict.error)

    def _store_progress(self, conn: psycopg.Connection[Any], item: _Pending,
                        decision: StoreProgress, slices: SliceCache, now: float,
                        day: int) -> None:
        chunk, partial = item.chunk, decision.partial
        self._insert_chunk(conn, chunk, None if decision.completes else chunk.payload, now,
                           day)
        item.stored = True
        if decision.completes:
            self._complete(conn, item, partial, not decision.is_new, slices, now, day)
        elif decision.is_new:
            conn.execute(
                "INSERT INTO partial_events (sensor_id, event_id, epoch, chunk_count,"
                " received, event_sha256, created_at, logical_timestamp_ms, attributes,"
                " first_sequence, last_sequence, first_seen)"
                " VALUES (%s, %s, %s, %s, 1, %s, %s, %s, %s, %s, %s, %s)",
                (chunk.sensor_id, chunk.event_id, partial.epoch, chunk.chunk_count,
                 chunk.event_sha256, partial.created_at, partial.logical_timestamp_ms,
                 partial.attributes, chunk.sequence, chunk.sequence, now))
        else:
            conn.execute(
                "UPDATE partial_events SET received = %s, first_sequence = %s,"
                " last_sequence = %s, created_at = %s, logical_timestamp_ms = %s,"
                " attributes = %s WHERE sensor_id = %s AND event_id = %s",
                (partial.received, partial.first_sequence, partial.last_sequence,
                 partial.created_at, partial.logical_timestamp_ms, partial.attributes,
                 chunk.sensor_id, chunk.event_id))

    @staticmethod
    def _insert_chunk(conn: psycopg.Connection[Any], chunk: Chunk, payload: bytes | None,
                      now: float, day: int) -> None:
        conn.execute(
            "INSERT INTO chunks (sensor_id, epoch, sequence, event_id, chunk_index,"
            " chunk_count, chunk_sha256, payload, received_at, day)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id,
             chunk.chunk_index, chunk.chunk_count, chunk.chunk_sha256, payload, now, day))

    def _complete(self, conn: psycopg.Connection[Any], item: _Pending, partial: Partial,
                  had_row: bool, slices: SliceCache, now: float, day: int) -> None:
        chunk = item.chunk
        pieces = self._pieces(conn, item, slices) if chunk.chunk_count > 1 else []
        if had_row:
            conn.execute("DELETE FROM partial_events WHERE sensor_id = %s AND event_id = %s",
                         (chunk.sensor_id, chunk.event_id))
        result = complete_event(chunk, item.raw, partial, pieces, self._max_event_bytes)
        if isinstance(result, Completed):
            self._insert_event(conn, item, partial, result, now, day)
            return
        exc = result.error
        conn.execute(
            "INSERT INTO rejected_events (sensor_id, event_id, epoch, event_sha256,"
            " chunk_count, reason, code, rejected_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            (chunk.sensor_id, chunk.event_id, partial.epoch, partial.event_sha256,
             partial.chunk_count, exc.message, exc.code, now))
        log.warning("event_rejected sensor_id=%s epoch=%s event_id=%s reason=%s",
                    chunk.sensor_id, partial.epoch, chunk.event_id, exc.code)

    def _pieces(self, conn: psycopg.Connection[Any], item: _Pending,
                slices: SliceCache) -> list[Piece]:
        """The event's stored slices in chunk_index order (this chunk's from the request),
        then their payloads cleared: the event row holds them from now on."""
        chunk = item.chunk
        sid, event_id = chunk.sensor_id, chunk.event_id
        pieces: list[Piece] = []
        for index, payload, digest in conn.execute(
                "SELECT chunk_index, payload, chunk_sha256 FROM chunks WHERE sensor_id = %s"
                " AND event_id = %s ORDER BY chunk_index", (sid, event_id)):
            if index == chunk.chunk_index:
                pieces.append(Piece(chunk.payload, item.raw))
            elif payload is not None:
                digest = bytes(digest)
                raw = slices.pop(digest)
                pieces.append(Piece(bytes(payload), raw if raw is not None
                                    else self._slices.pop(digest)))
        conn.execute("UPDATE chunks SET payload = NULL WHERE sensor_id = %s AND"
                     " event_id = %s AND payload IS NOT NULL", (sid, event_id))
        return pieces

    @staticmethod
    def _insert_event(conn: psycopg.Connection[Any], item: _Pending, partial: Partial,
                      done: Completed, now: float, day: int) -> None:
        chunk = item.chunk
        sid, event_id = chunk.sensor_id, chunk.event_id
        row = conn.execute(
            "INSERT INTO events (sensor_id, epoch, event_id, event_sha256, data,"
            " logical_timestamp_ms, created_at, completed_at, first_sequence, last_sequence,"
            " attributes, encoding, day) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, %s) RETURNING row_id",
            (sid, partial.epoch, event_id, partial.event_sha256, done.stored,
             partial.logical_timestamp_ms, partial.created_at, now, partial.first_sequence,
             partial.last_sequence, partial.attributes, ENCODING_GZIP, day)).fetchone()
        assert row is not None
        item.event_complete = True
        item.completed_event = StoredEvent(
            row_id=int(row[0]), sensor_id=sid, epoch=partial.epoch, event_id=event_id,
            event_sha256=partial.event_sha256, data=done.data,
            logical_timestamp_ms=partial.logical_timestamp_ms, created_at=partial.created_at,
            completed_at=now, first_sequence=partial.first_sequence,
            last_sequence=partial.last_sequence,
            attributes=(dict(chunk.attributes) if chunk.chunk_index == 0
                        else json.loads(partial.attributes)))

    @staticmethod
    def _save_offsets(conn: psycopg.Connection[Any], work: Mapping[OffsetKey, OffsetTracker],
                      touched: set[OffsetKey], now: float) -> None:
        rows = []
        for key in sorted(touched):
            tracker = work.get(key)
            if tracker is None:
                continue
            snap = tracker.snapshot()
            rows.append((key[0], key[1], snap["watermark"], json.dumps(snap["ranges"]), now))
        if not rows:
            return
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO offsets (sensor_id, epoch, watermark, ranges, updated_at)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (sensor_id, epoch) DO UPDATE SET"
                " watermark = excluded.watermark, ranges = excluded.ranges,"
                " updated_at = excluded.updated_at", rows)

    @staticmethod
    def _outcome(item: _Pending, work: Mapping[OffsetKey, OffsetTracker]) -> ChunkOutcome:
        chunk = item.chunk
        tracker = work.get((chunk.sensor_id, chunk.queue_epoch))
        return ChunkOutcome(
            sensor_id=chunk.sensor_id, epoch=chunk.queue_epoch, sequence=chunk.sequence,
            event_id=chunk.event_id, window_id=chunk.window_id, stored=item.stored,
            duplicate=item.duplicate, event_complete=item.event_complete,
            completed_event=item.completed_event,
            last_committed_sequence=tracker.watermark if tracker is not None else 0,
            error=item.error)
