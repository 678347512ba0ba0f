"""What one ingest batch knows about its chunks, read from PostgreSQL in two statements
(whatever the batch size, sent in the same pipeline as the sensors' locks and offsets),
then kept up to date in memory while the batch decides.

``BatchView`` answers the ledger's two questions for each chunk (``keys``, ``state``) as the
database would inside the transaction once the batch's earlier chunks were written, so the
writes themselves can be sent together at the end (``executemany``, pipelined). Each probe
joins an ``unnest`` of the batch's keys to a unique index of every live day partition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from pipeline.common.messages import Chunk
from pipeline.server.store.ledger import ChunkKeys, EventState, Finished, Partial

SequenceKey = tuple[str, str, int]  # (sensor_id, epoch, sequence)
SlotKey = tuple[str, str, int]  # (sensor_id, event_id, chunk_index)
EventKey = tuple[str, str]  # (sensor_id, event_id)

KEYS_SQL = (
    "SELECT 0, c.sensor_id, c.epoch, c.sequence, c.event_id, c.chunk_index, c.chunk_sha256"
    " FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS k(s, e, q)"
    " JOIN chunks c ON c.sensor_id = k.s AND c.epoch = k.e AND c.sequence = k.q"
    " UNION ALL"
    " SELECT 1, c.sensor_id, c.epoch, c.sequence, c.event_id, c.chunk_index, c.chunk_sha256"
    " FROM unnest(%s::text[], %s::text[], %s::int[]) AS k(s, ev, i)"
    " JOIN chunks c ON c.sensor_id = k.s AND c.event_id = k.ev AND c.chunk_index = k.i")

STATES_SQL = (
    "SELECT 0, p.sensor_id, p.event_id, p.epoch, p.chunk_count, p.received, p.event_sha256,"
    " p.first_sequence, p.last_sequence, p.created_at, p.logical_timestamp_ms, p.attributes"
    " FROM unnest(%s::text[], %s::text[]) AS k(s, ev)"
    " JOIN partial_events p ON p.sensor_id = k.s AND p.event_id = k.ev"
    " UNION ALL SELECT 1, e.sensor_id, e.event_id, NULL, NULL, NULL, e.event_sha256, NULL,"
    " NULL, NULL, NULL, NULL FROM unnest(%s::text[], %s::text[]) AS k(s, ev)"
    " JOIN events e ON e.sensor_id = k.s AND e.event_id = k.ev"
    " UNION ALL SELECT 2, r.sensor_id, r.event_id, NULL, NULL, NULL, r.event_sha256, NULL,"
    " NULL, NULL, NULL, NULL FROM unnest(%s::text[], %s::text[]) AS k(s, ev)"
    " JOIN rejected_events r ON r.sensor_id = k.s AND r.event_id = k.ev")


@dataclass
class BatchView:
    """The stored rows under the batch's keys, plus what the batch has decided so far."""

    by_sequence: dict[SequenceKey, tuple[str, int, bytes]] = field(default_factory=dict)
    by_slot: dict[SlotKey, bytes] = field(default_factory=dict)
    states: dict[EventKey, EventState] = field(default_factory=dict)
    partial_rows: set[EventKey] = field(default_factory=set)  # rows in partial_events

    def keys(self, chunk: Chunk, committed_before: bool) -> ChunkKeys:
        return ChunkKeys(
            self.by_sequence.get((chunk.sensor_id, chunk.queue_epoch, chunk.sequence)),
            self.by_slot.get((chunk.sensor_id, chunk.event_id, chunk.chunk_index)),
            committed_before)

    def state(self, chunk: Chunk) -> EventState:
        return self.states.get((chunk.sensor_id, chunk.event_id))

    def stored(self, chunk: Chunk) -> None:
        """The chunk's row is written (by this batch)."""
        self.by_sequence[(chunk.sensor_id, chunk.queue_epoch, chunk.sequence)] = (
            chunk.event_id, chunk.chunk_index, chunk.chunk_sha256)
        self.by_slot[(chunk.sensor_id, chunk.event_id, chunk.chunk_index)] = chunk.chunk_sha256

    def completed(self, chunk: Chunk) -> bool:
        state = self.states.get((chunk.sensor_id, chunk.event_id))
        return isinstance(state, Finished) and state.completed


def send_probes(conn: psycopg.Connection[Any], chunks: list[Chunk]
                ) -> tuple[psycopg.Cursor[Any], psycopg.Cursor[Any]] | None:
    """Send the two probe statements for every key of ``chunks`` (in a pipeline their
    answers come with the next sync); None when there is nothing to probe."""
    if not chunks:
        return None
    seqs = sorted({(c.sensor_id, c.queue_epoch, c.sequence) for c in chunks})
    slots = sorted({(c.sensor_id, c.event_id, c.chunk_index) for c in chunks})
    keys = conn.execute(KEYS_SQL, (
        [k[0] for k in seqs], [k[1] for k in seqs], [k[2] for k in seqs],
        [k[0] for k in slots], [k[1] for k in slots], [k[2] for k in slots]))
    events = sorted({(c.sensor_id, c.event_id) for c in chunks})
    states = conn.execute(STATES_SQL, ([k[0] for k in events], [k[1] for k in events]) * 3)
    return keys, states


def read_probes(sent: tuple[psycopg.Cursor[Any], psycopg.Cursor[Any]] | None) -> BatchView:
    """The ``BatchView`` the answers of ``send_probes`` describe."""
    view = BatchView()
    if sent is None:
        return view
    keys, states = sent
    for tag, sid, epoch, seq, event_id, index, digest in keys.fetchall():
        if tag == 0:
            view.by_sequence[(sid, epoch, int(seq))] = (event_id, int(index), bytes(digest))
        else:
            view.by_slot[(sid, event_id, int(index))] = bytes(digest)
    for row in states.fetchall():
        key = (row[1], row[2])
        if row[0] == 0:
            view.partial_rows.add(key)
            view.states[key] = Partial(
                epoch=row[3], chunk_count=int(row[4]), received=int(row[5]),
                event_sha256=bytes(row[6]), first_sequence=int(row[7]),
                last_sequence=int(row[8]), created_at=row[9],
                logical_timestamp_ms=int(row[10]), attributes=row[11])
        elif not isinstance(view.states.get(key), Partial):
            previous = view.states.get(key)
            if previous is None or row[0] == 1:  # completed wins over rejected
                view.states[key] = Finished(bytes(row[6]), completed=row[0] == 1)
    return view
