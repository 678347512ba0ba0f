"""The PostgreSQL store's ingest: one group-commit transaction per batch, every decision the
ledger's (``ledger.py``), only the lookups and writes here.

A batch costs a fixed number of round trips, not a few per chunk: the sensors' locks and
offsets, two probe statements for every key of the batch (``pg_probe.BatchView``), the
ledger's decisions in memory, then each kind of write sent as one pipelined
``executemany``, and COMMIT. Only an event completing from chunks of earlier batches reads
their payloads (one statement per such event).

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
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import psycopg

from pipeline.common.messages import Chunk
from pipeline.server.offsets import OffsetKey, OffsetTracker
from pipeline.server.store.event_rows import ENCODING_GZIP
from pipeline.server.store.ledger import (
    DUPLICATE,
    Completed,
    Conflict,
    Finished,
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
from pipeline.server.store.pg_base import PgBase
from pipeline.server.store.pg_probe import BatchView, EventKey, read_probes, send_probes
from pipeline.server.store.pg_schema import day_of, translate
from pipeline.server.store.records import ChunkOutcome, StoredEvent

log = logging.getLogger("pipeline.server.store")


@dataclass
class _Writes:
    """Everything a batch writes, sent at the end (one ``executemany`` per kind)."""

    chunks: list[list[Any]] = field(default_factory=list)  # INSERT rows (payload at [7])
    # slices stored by this batch for events still incomplete: (sensor, event) ->
    # chunk_index -> (row in ``chunks``, decompressed slice)
    pieces: dict[EventKey, dict[int, tuple[list[Any], bytes | None]]] = \
        field(default_factory=dict)
    clear_payloads: list[EventKey] = field(default_factory=list)  # earlier batches' rows
    partial_gone: list[EventKey] = field(default_factory=list)
    partials: dict[EventKey, Partial] = field(default_factory=dict)  # final progress
    events: list[tuple[Pending, Partial, Completed]] = field(default_factory=list)
    rejected: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass
class PgPreparedIngest:
    """A batch between ``begin_ingest`` and ``commit_ingest``: its connection holds the
    open transaction (and the sensors' advisory locks)."""

    conn: psycopg.Connection[Any]
    items: list[Pending]
    work: dict[OffsetKey, OffsetTracker]
    writes: _Writes


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
        pending = [Pending(chunk) for chunk in chunks]
        for item in pending:
            precheck(item, self._max_event_bytes)
        valid = [item.chunk for item in pending if item.error is None]
        conn = self._getconn("ingest failed")
        try:
            sensors = {c.sensor_id for c in chunks}
            # One round trip: the statements run in order on the server, so the offsets
            # and probes (each with a fresh read-committed snapshot) are read only once
            # the locks are held.
            with conn.pipeline():
                self._lock_sensors(conn, sensors)
                offsets = self._send_offsets_query(conn, sensors)
                sent = send_probes(conn, valid)
            work = self._read_trackers(offsets)
            view = read_probes(sent)
            writes = _Writes()
            day = day_of(now)
            for item in pending:
                if item.error is None:
                    self._decide(conn, item, work, view, writes, now, day)
            with conn.pipeline():
                self._send(conn, writes, work,
                           {(c.sensor_id, c.queue_epoch) for c in chunks}, now, day)
            if writes.events:  # their row ids come back: after the pipeline's sync
                with conn.cursor() as cur:
                    self._insert_events(cur, writes.events, now, day)
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
        return PgPreparedIngest(conn, pending, work, writes)

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
        # Slices of events still incomplete, for their completion in a later batch.
        for slots in prepared.writes.pieces.values():
            for row, raw in slots.values():
                if raw is not None:
                    self._slices.put(row[6], raw)
        return [outcome(item, prepared.work.get((item.chunk.sensor_id, item.chunk.queue_epoch)))
                for item in prepared.items]

    def abort_ingest(self, prepared: PgPreparedIngest) -> None:
        """Roll back a prepared batch (nothing of it becomes visible)."""
        self._putconn(prepared.conn)

    # -- deciding --------------------------------------------------------------------

    @staticmethod
    def _send_offsets_query(conn: psycopg.Connection[Any], sensors: set[str]
                            ) -> psycopg.Cursor[Any]:
        return conn.execute("SELECT sensor_id, epoch, watermark, ranges FROM offsets"
                            " WHERE sensor_id = ANY(%s)", (sorted(sensors),))

    @staticmethod
    def _read_trackers(cursor: psycopg.Cursor[Any]) -> dict[OffsetKey, OffsetTracker]:
        """The sensors' committed offsets as the database has them now (under their
        locks: no other server can move them until this transaction ends)."""
        work: dict[OffsetKey, OffsetTracker] = {}
        for sensor_id, epoch, watermark, ranges in cursor.fetchall():
            work[(sensor_id, epoch)] = OffsetTracker.restore(
                {"watermark": int(watermark), "ranges": json.loads(ranges)})
        return work

    def _decide(self, conn: psycopg.Connection[Any], item: Pending,
                work: dict[OffsetKey, OffsetTracker], view: BatchView, writes: _Writes,
                now: float, day: int) -> None:
        """Ask the ledger about one chunk; record what it decided."""
        chunk = item.chunk
        tracker = work.setdefault((chunk.sensor_id, chunk.queue_epoch), OffsetTracker())
        verdict = judge_keys(chunk, view.keys(chunk, tracker.contains(chunk.sequence)))
        if verdict is DUPLICATE:
            item.duplicate = True
            item.event_complete = view.completed(chunk)
        elif isinstance(verdict, Conflict):
            refuse(item, verdict)
            return
        else:
            decision = judge_event(chunk, view.state(chunk))
            if isinstance(decision, Conflict):
                refuse(item, decision)
                return
            if isinstance(decision, StoreLate):
                self._add_chunk(writes, chunk, None, now, day)
                item.stored = True
                item.event_complete = decision.event_complete
            else:
                self._progress(conn, item, decision, view, writes, now, day)
            view.stored(chunk)
        tracker.add(chunk.sequence)

    @staticmethod
    def _add_chunk(writes: _Writes, chunk: Chunk, payload: bytes | None, now: float,
                   day: int) -> list[Any]:
        row = [chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id,
               chunk.chunk_index, chunk.chunk_count, chunk.chunk_sha256, payload, now, day]
        writes.chunks.append(row)
        return row

    def _progress(self, conn: psycopg.Connection[Any], item: Pending,
                  decision: StoreProgress, view: BatchView, writes: _Writes, now: float,
                  day: int) -> None:
        chunk, partial = item.chunk, decision.partial
        key = (chunk.sensor_id, chunk.event_id)
        row = self._add_chunk(writes, chunk, None if decision.completes else chunk.payload,
                              now, day)
        item.stored = True
        if decision.completes:
            self._complete(conn, item, partial, view, writes)
            return
        view.states[key] = partial
        writes.partials[key] = partial  # inserted, or updated (first_seen kept)
        if chunk.chunk_count > 1:
            writes.pieces.setdefault(key, {})[chunk.chunk_index] = (row, item.raw)

    def _complete(self, conn: psycopg.Connection[Any], item: Pending, partial: Partial,
                  view: BatchView, writes: _Writes) -> None:
        """All chunks are in: the ledger reassembles and verifies; the event row (or the
        rejection) is queued and the pieces' payloads dropped."""
        chunk = item.chunk
        key = (chunk.sensor_id, chunk.event_id)
        pieces = self._pieces(conn, item, view, writes) if chunk.chunk_count > 1 else []
        writes.partials.pop(key, None)
        if key in view.partial_rows:
            writes.partial_gone.append(key)
        result = complete_event(chunk, item.raw, partial, pieces, self._max_event_bytes)
        if isinstance(result, Completed):
            writes.events.append((item, partial, result))
            item.event_complete = True
            view.states[key] = Finished(partial.event_sha256, completed=True)
            return
        exc = result.error
        writes.rejected.append((chunk.sensor_id, chunk.event_id, partial.epoch,
                                partial.event_sha256, partial.chunk_count, exc.message,
                                exc.code, self._clock()))
        view.states[key] = Finished(partial.event_sha256, completed=False)
        log.warning("event_rejected sensor_id=%s epoch=%s event_id=%s reason=%s",
                    chunk.sensor_id, partial.epoch, chunk.event_id, exc.code)

    def _pieces(self, conn: psycopg.Connection[Any], item: Pending, view: BatchView,
                writes: _Writes) -> list[Piece]:
        """The event's stored slices in chunk_index order: this chunk's from the request,
        this batch's from memory, earlier batches' from the database (then cleared)."""
        chunk = item.chunk
        key = (chunk.sensor_id, chunk.event_id)
        found: dict[int, Piece] = {}
        if key in view.partial_rows:
            for index, payload, digest in conn.execute(
                    "SELECT chunk_index, payload, chunk_sha256 FROM chunks WHERE"
                    " sensor_id = %s AND event_id = %s AND payload IS NOT NULL",
                    key):
                found[int(index)] = Piece(bytes(payload), self._slices.pop(bytes(digest)))
            writes.clear_payloads.append(key)
        for index, (row, raw) in writes.pieces.pop(key, {}).items():
            found[index] = Piece(row[7], raw)
            row[7] = None  # the event row holds it from now on
        found[chunk.chunk_index] = Piece(chunk.payload, item.raw)
        return [found[index] for index in sorted(found)]

    # -- writing ---------------------------------------------------------------------

    def _send(self, conn: psycopg.Connection[Any], writes: _Writes,
              work: Mapping[OffsetKey, OffsetTracker], touched: set[OffsetKey], now: float,
              day: int) -> None:
        """Every write of the batch but the events: one ``executemany`` per kind, all in
        the caller's pipeline (one round trip)."""
        with conn.cursor() as cur:
            if writes.chunks:
                cur.executemany(
                    "INSERT INTO chunks (sensor_id, epoch, sequence, event_id, chunk_index,"
                    " chunk_count, chunk_sha256, payload, received_at, day)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", writes.chunks)
            if writes.clear_payloads:
                cur.executemany("UPDATE chunks SET payload = NULL WHERE sensor_id = %s AND"
                                " event_id = %s AND payload IS NOT NULL",
                                writes.clear_payloads)
            if writes.partial_gone:
                cur.executemany("DELETE FROM partial_events WHERE sensor_id = %s AND"
                                " event_id = %s", writes.partial_gone)
            if writes.partials:
                cur.executemany(
                    "INSERT INTO partial_events (sensor_id, event_id, epoch, chunk_count,"
                    " received, event_sha256, created_at, logical_timestamp_ms, attributes,"
                    " first_sequence, last_sequence, first_seen)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (sensor_id, event_id) DO UPDATE SET"
                    " received = excluded.received, first_sequence = excluded.first_sequence,"
                    " last_sequence = excluded.last_sequence,"
                    " created_at = excluded.created_at,"
                    " logical_timestamp_ms = excluded.logical_timestamp_ms,"
                    " attributes = excluded.attributes",
                    [(sid, ev, p.epoch, p.chunk_count, p.received, p.event_sha256,
                      p.created_at, p.logical_timestamp_ms, p.attributes, p.first_sequence,
                      p.last_sequence, now) for (sid, ev), p in writes.partials.items()])
            if writes.rejected:
                cur.executemany(
                    "INSERT INTO rejected_events (sensor_id, event_id, epoch, event_sha256,"
                    " chunk_count, reason, code, rejected_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", writes.rejected)
            offsets = []
            for key in sorted(touched):
                tracker = work.get(key)
                if tracker is not None:
                    snap = tracker.snapshot()
                    offsets.append((key[0], key[1], snap["watermark"],
                                    json.dumps(snap["ranges"]), now))
            if offsets:
                cur.executemany(
                    "INSERT INTO offsets (sensor_id, epoch, watermark, ranges, updated_at)"
                    " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (sensor_id, epoch) DO UPDATE"
                    " SET watermark = excluded.watermark, ranges = excluded.ranges,"
                    " updated_at = excluded.updated_at", offsets)

    @staticmethod
    def _insert_events(cur: psycopg.Cursor[Any],
                       events: list[tuple[Pending, Partial, Completed]], now: float,
                       day: int) -> None:
        """Insert the completed events in completion order; their row ids come back."""
        cur.executemany(
            "INSERT INTO events (sensor_id, epoch, event_id, event_sha256, data,"
            " logical_timestamp_ms, created_at, completed_at, first_sequence, last_sequence,"
            " attributes, encoding, day) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            " %s, %s) RETURNING row_id",
            [(item.chunk.sensor_id, partial.epoch, item.chunk.event_id, partial.event_sha256,
              done.stored, partial.logical_timestamp_ms, partial.created_at, now,
              partial.first_sequence, partial.last_sequence, partial.attributes,
              ENCODING_GZIP, day) for item, partial, done in events], returning=True)
        row_ids: list[int] = []
        while True:
            row = cur.fetchone()
            assert row is not None
            row_ids.append(int(row[0]))
            if not cur.nextset():
                break
        for (item, partial, done), row_id in zip(events, row_ids, strict=True):
            chunk = item.chunk
            item.completed_event = StoredEvent(
                row_id=row_id, sensor_id=chunk.sensor_id, epoch=partial.epoch,
                event_id=chunk.event_id, event_sha256=partial.event_sha256, data=done.data,
                logical_timestamp_ms=partial.logical_timestamp_ms,
                created_at=partial.created_at, completed_at=now,
                first_sequence=partial.first_sequence, last_sequence=partial.last_sequence,
                attributes=(dict(chunk.attributes) if chunk.chunk_index == 0
                            else json.loads(partial.attributes)))
            log.debug("event_committed sensor_id=%s event_id=%s bytes=%d", chunk.sensor_id,
                      chunk.event_id, len(done.data))
