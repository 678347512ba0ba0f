"""The SQL the queue runs inside its transactions, as functions of a connection.

``DurableQueue`` holds the lock, the transaction and the error translation around them;
nothing here commits.
"""

from __future__ import annotations

import sqlite3

from pipeline.common.errors import ConflictError
from pipeline.sensor.queue_inputs import PreparedEvent
from pipeline.sensor.queue_rows import (
    ChunkMeta,
    DropTally,
    EnqueuedEvent,
    QueuedChunk,
    row_to_chunk,
)
from pipeline.sensor.queue_schema import CHUNK_COLUMNS, INSERT_CHUNK_SQL
from pipeline.sensor.queue_sqlite import delete_event, record_drops

REASON_BYTE_CAP = "byte_cap"
REASON_RETENTION = "retention"
REASON_INTEGRITY = "integrity"
IN_BATCH = 500  # host parameters per IN (...) query, well under SQLite's limit


def insert_event(conn: sqlite3.Connection, prepared: PreparedEvent, now: float,
                 max_bytes: int | None, drops: DropTally) -> EnqueuedEvent:
    """Write one prepared event inside the caller's transaction (under the lock).

    The duplicate check runs only for caller-chosen ids: an id this process just drew
    from 74 random bits within one millisecond cannot already be queued, and the check is
    a B-tree probe per event on the hottest path."""
    split, attrs_json, created, logical_ms, nbytes, caller_id = prepared
    if caller_id and conn.execute("SELECT 1 FROM chunks WHERE event_id = ? LIMIT 1",
                                  (split.event_id,)).fetchone() is not None:
        raise ConflictError(f"event {split.event_id} is already queued", field="event_id")
    if max_bytes is not None:
        make_room(conn, nbytes, max_bytes, drops)
    sequences = []
    for piece in split.pieces:
        cursor = conn.execute(INSERT_CHUNK_SQL, (
            split.event_id, piece.index, piece.count, piece.payload, piece.chunk_sha256,
            split.event_sha256, created, logical_ms, attrs_json, now, len(piece.payload)))
        sequences.append(int(cursor.lastrowid or 0))
    return EnqueuedEvent(event_id=split.event_id, sequences=tuple(sequences),
                         event_sha256=split.event_sha256, size=split.size)


def make_room(conn: sqlite3.Connection, nbytes: int, max_bytes: int, drops: DropTally) -> None:
    """Drop the oldest whole events until ``nbytes`` more fit under the byte cap."""
    total = int(conn.execute("SELECT bytes FROM totals WHERE id = 1").fetchone()[0])
    while total + nbytes > max_bytes:
        row = conn.execute("SELECT event_id FROM chunks ORDER BY sequence LIMIT 1").fetchone()
        if row is None:
            break
        chunks, freed = delete_event(conn, str(row[0]))
        drops.add(chunks, freed)
        total -= freed
    if drops.events:
        record_drops(conn, REASON_BYTE_CAP, drops)


def move_to_quarantine(conn: sqlite3.Connection, sequence: int, reason: str,
                       now: float) -> bool:
    """Move one chunk to quarantine with ``reason``; False when it is not queued."""
    cursor = conn.execute(
        f"INSERT OR REPLACE INTO quarantine ({CHUNK_COLUMNS}, reason, quarantined_at) "
            f"SELECT {CHUNK_COLUMNS}, ?, ? FROM chunks WHERE sequence = ?",
        (str(reason), now, sequence))
    if cursor.rowcount <= 0:
        return False
    conn.execute("DELETE FROM chunks WHERE sequence = ?", (sequence,))
    return True


def drop_events_before(conn: sqlite3.Connection, cutoff: float, batch: int,
                       step: DropTally) -> None:
    """Drop up to ``batch`` chunks' whole events enqueued before ``cutoff`` (retention)."""
    rows = conn.execute(
        "SELECT event_id FROM chunks WHERE enqueued_at < ? "
        "ORDER BY enqueued_at LIMIT ?", (cutoff, batch)).fetchall()
    for event_id in dict.fromkeys(str(r[0]) for r in rows):
        step.add(*delete_event(conn, event_id))
    if step.events:
        record_drops(conn, REASON_RETENTION, step)


def select_after(conn: sqlite3.Connection, since_sequence: int, limit: int) -> list[ChunkMeta]:
    """Light rows (no payload) with ``sequence > since_sequence``, oldest first."""
    rows = conn.execute(
        "SELECT sequence, nbytes, enqueued_at FROM chunks WHERE sequence > ? "
        "ORDER BY sequence LIMIT ?", (since_sequence, limit)).fetchall()
    return [ChunkMeta(sequence=int(s), nbytes=int(n), enqueued_at=float(e))
            for s, n, e in rows]


def select_chunks(conn: sqlite3.Connection, wanted: list[int]) -> list[QueuedChunk]:
    """The queued chunks among the sorted ``wanted`` sequences, ascending."""
    found: list[QueuedChunk] = []
    for start in range(0, len(wanted), IN_BATCH):
        part = wanted[start:start + IN_BATCH]
        marks = ",".join("?" * len(part))
        rows = conn.execute(
            f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE sequence IN ({marks}) "
            "ORDER BY sequence", part).fetchall()
        found.extend(row_to_chunk(r) for r in rows)
    return found


def select_window(conn: sqlite3.Connection, since_sequence: int, max_chunks: int,
                  max_bytes: int) -> list[QueuedChunk]:
    """Chunks after ``since_sequence`` within both limits; the first one always."""
    window: list[QueuedChunk] = []
    used = 0
    cursor = conn.execute(
        f"SELECT {CHUNK_COLUMNS} FROM chunks WHERE sequence > ? "
        "ORDER BY sequence LIMIT ?", (since_sequence, max_chunks))
    try:
        for row in cursor:
            chunk = row_to_chunk(row)
            if window and used + chunk.nbytes > max_bytes:
                break
            window.append(chunk)
            used += chunk.nbytes
    finally:
        cursor.close()
    return window


def select_quarantined(conn: sqlite3.Connection) -> list[tuple[QueuedChunk, str]]:
    """Every quarantined chunk with its reason, by sequence."""
    rows = conn.execute(f"SELECT {CHUNK_COLUMNS}, reason FROM quarantine "
                        "ORDER BY sequence").fetchall()
    return [(row_to_chunk(r[:-1]), str(r[-1])) for r in rows]


def select_dropped(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """What retention and the byte cap dropped, per reason."""
    rows = conn.execute(
        "SELECT reason, chunks, events, bytes FROM dropped ORDER BY reason").fetchall()
    return {str(r): {"chunks": int(c), "events": int(e), "bytes": int(b)}
            for r, c, e, b in rows}
