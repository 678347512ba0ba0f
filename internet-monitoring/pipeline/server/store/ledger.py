"""The exactly-once ledger: every decision about a chunk and its event, without storage.

A backend looks up what it knows (the rows under a chunk's two dedupe keys, where its
event stands), hands that here, and writes what the answer says. Nothing here does I/O,
so the rules — store, duplicate, conflict, complete (with the event's bytes and hash
check) — are the same for every engine and are tested without a database.

The steps, in the order a backend calls them for one chunk:

1. ``check_chunk``: field sanity, the chunk's hash, decompression under the slice cap.
2. ``judge_keys``: the chunk's sequence and (event, chunk_index) slot against what is
   stored: ``DUPLICATE``, a ``Conflict``, or ``None`` (new: go on).
3. ``judge_event``: the event's state (in progress, finished, unknown): a ``Conflict``,
   ``StoreLate`` (a late chunk of a finished event: keep only its key) or ``StoreProgress``
   (the event's new progress, and whether this chunk completes it).
4. ``complete_event`` (when ``StoreProgress.completes``): the event's bytes, verified,
   as ``Completed`` or ``Rejected``.

The values passed in and out are never changed once made. They are plain slotted
dataclasses rather than frozen ones: a frozen dataclass costs about a microsecond more to
build, and the ingest path builds several per chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from pipeline.common import chunking
from pipeline.common.errors import (
    ConflictError,
    DecompressionLimitExceeded,
    FieldValueError,
    IntegrityError,
    PayloadTooLarge,
    PipelineError,
    SequenceConflict,
)
from pipeline.common.messages import Chunk

# ---------------------------------------------------------------------------------------
# What a backend knows


@dataclass(slots=True)
class ChunkKeys:
    """What is stored under a chunk's dedupe keys.

    ``same_sequence``: (event_id, chunk_index, chunk_sha256) of the chunk stored under this
    (sensor, epoch, sequence); ``same_slot``: chunk_sha256 of the chunk stored for this
    (sensor, event, chunk_index); ``committed_before``: the offsets hold the sequence (its
    key may have been pruned by retention)."""

    same_sequence: tuple[str, int, bytes] | None = None
    same_slot: bytes | None = None
    committed_before: bool = False


@dataclass(slots=True)
class Partial:
    """Progress of an event still missing chunks (metadata is chunk 0's once it came)."""

    epoch: str
    chunk_count: int
    received: int
    event_sha256: bytes
    first_sequence: int
    last_sequence: int
    created_at: str
    logical_timestamp_ms: int
    attributes: str  # JSON, sorted keys


@dataclass(slots=True)
class Finished:
    """An event already completed (``completed``) or rejected (not ``completed``)."""

    event_sha256: bytes
    completed: bool


EventState = Partial | Finished | None


# ---------------------------------------------------------------------------------------
# Decisions


class Verdict(Enum):
    DUPLICATE = "duplicate"


DUPLICATE = Verdict.DUPLICATE


@dataclass(slots=True)
class Conflict:
    """The chunk contradicts what is stored; it is refused and writes nothing."""

    error: ConflictError


@dataclass(slots=True)
class StoreLate:
    """A late chunk of a finished event: store its key (no payload), nothing else."""

    event_complete: bool


@dataclass(slots=True)
class StoreProgress:
    """Store the chunk; ``partial`` is the event's progress with it (``is_new``: the first
    chunk seen). ``completes``: this chunk is the last one, so the event completes now and
    the chunk's payload goes into the event rather than a chunk row."""

    partial: Partial
    is_new: bool
    completes: bool


@dataclass(slots=True)
class Completed:
    """The event's verified bytes, and what to keep of it (its gzip slices, in order)."""

    data: bytes
    stored: bytes


@dataclass(slots=True)
class Rejected:
    """The event's reassembled bytes are bad: it is recorded as rejected (its chunks stay
    stored and acked)."""

    error: PipelineError


@dataclass(slots=True)
class Piece:
    """One stored slice of an event: its gzip payload and, when at hand, its decompressed
    bytes (checked against the slice cap already)."""

    payload: bytes
    raw: bytes | None = None


# ---------------------------------------------------------------------------------------
# 1. The chunk alone


def check_chunk(chunk: Chunk, max_event_bytes: int) -> bytes:
    """Checks needing nothing stored: fields, hash, decompression (bomb cap). Returns the
    decompressed slice (for a one-chunk event, the event itself); raises PipelineError."""
    if chunk.sequence < 1:
        raise FieldValueError("sequence must be at least 1", field="sequence")
    if chunk.compression != "gzip":
        raise FieldValueError("compression must be 'gzip'", field="compression")
    if not 0 <= chunk.chunk_index < chunk.chunk_count:
        raise FieldValueError("chunk_index must be below chunk_count", field="chunk_index")
    # Slices are at least MIN_SLICE bytes except the last one, so an event with more
    # chunks than this cannot fit max_event_bytes: refuse before storing any.
    if (chunk.chunk_count - 1) * chunking.MIN_SLICE >= max_event_bytes:
        raise PayloadTooLarge(f"an event of {chunk.chunk_count} chunks exceeds the "
                              f"{max_event_bytes}-byte event limit", field="chunk_count")
    chunking.verify_chunk(chunk.payload, chunk.chunk_sha256)
    return chunking.decompress_slice(chunk.payload, max_bytes=chunking.MAX_SLICE)


# ---------------------------------------------------------------------------------------
# 2. The chunk's keys


def judge_keys(chunk: Chunk, keys: ChunkKeys) -> Verdict | Conflict | None:
    """``DUPLICATE`` (ack, write nothing), a ``Conflict``, or None: a new chunk."""
    if keys.same_sequence is not None:
        if keys.same_sequence == (chunk.event_id, chunk.chunk_index, chunk.chunk_sha256):
            return DUPLICATE
        return Conflict(SequenceConflict(
            f"sequence {chunk.sequence} is already stored with different content",
            field="sequence"))
    if keys.committed_before:
        # Committed long ago and its key pruned by retention: still a duplicate.
        return DUPLICATE
    if keys.same_slot is not None:
        if keys.same_slot == chunk.chunk_sha256:
            # The same chunk queued twice under two sequences: ack this one too.
            return DUPLICATE
        return Conflict(ConflictError(
            f"chunk {chunk.chunk_index} of event {chunk.event_id} is already stored "
            "with different content", field="chunk_index"))
    return None


# ---------------------------------------------------------------------------------------
# 3. The chunk's event


def attributes_json(chunk: Chunk) -> str:
    return json.dumps(dict(chunk.attributes), sort_keys=True)


def judge_event(chunk: Chunk, state: EventState) -> Conflict | StoreLate | StoreProgress:
    """Where a new chunk leaves its event."""
    if isinstance(state, Finished):
        if state.event_sha256 != chunk.event_sha256:
            return Conflict(ConflictError(f"event {chunk.event_id} was finished with another "
                                          "event_sha256", field="event_sha256"))
        return StoreLate(event_complete=state.completed)
    if state is None:
        first = Partial(epoch=chunk.queue_epoch, chunk_count=chunk.chunk_count, received=1,
                        event_sha256=chunk.event_sha256, first_sequence=chunk.sequence,
                        last_sequence=chunk.sequence, created_at=chunk.created_at,
                        logical_timestamp_ms=chunk.logical_timestamp_ms,
                        attributes=attributes_json(chunk))
        return StoreProgress(first, is_new=True, completes=chunk.chunk_count <= 1)
    if state.chunk_count != chunk.chunk_count:
        return Conflict(ConflictError(f"event {chunk.event_id} has chunk_count "
                                      f"{state.chunk_count}", field="chunk_count"))
    if state.event_sha256 != chunk.event_sha256:
        return Conflict(ConflictError(f"event {chunk.event_id} has another event_sha256",
                                      field="event_sha256"))
    return StoreProgress(_advance(state, chunk), is_new=False,
                         completes=state.received + 1 >= chunk.chunk_count)


def _advance(partial: Partial, chunk: Chunk) -> Partial:
    # The event's metadata is chunk 0's, whatever order the chunks came in.
    first = chunk.chunk_index == 0
    return Partial(epoch=partial.epoch, chunk_count=partial.chunk_count,
                   received=partial.received + 1, event_sha256=partial.event_sha256,
                   first_sequence=min(partial.first_sequence, chunk.sequence),
                   last_sequence=max(partial.last_sequence, chunk.sequence),
                   created_at=chunk.created_at if first else partial.created_at,
                   logical_timestamp_ms=(chunk.logical_timestamp_ms if first
                                         else partial.logical_timestamp_ms),
                   attributes=attributes_json(chunk) if first else partial.attributes)


# ---------------------------------------------------------------------------------------
# 4. The event's completion


def complete_event(chunk: Chunk, raw: bytes | None, partial: Partial,
                   pieces: Sequence[Piece], max_event_bytes: int) -> Completed | Rejected:
    """The completing ``chunk`` (``raw``: its decompressed slice) and every stored piece of
    its event in chunk_index order (the completing chunk's own place included) give the
    event's bytes, checked against ``event_sha256`` and ``max_event_bytes``."""
    try:
        if chunk.chunk_count == 1 and raw is not None:
            return Completed(_single(raw, partial.event_sha256, max_event_bytes),
                             chunk.payload)
        if chunk.chunk_count == 1:
            pieces = [Piece(chunk.payload)]
        if len(pieces) != partial.chunk_count:
            raise IntegrityError(f"event {chunk.event_id} has {len(pieces)} stored "
                                 f"payloads, expected {partial.chunk_count}")
        data = reassemble(pieces, partial.event_sha256, max_event_bytes)
    except PipelineError as exc:
        return Rejected(exc)
    # Kept as the slices that arrived (each verified against its chunk_sha256, the whole
    # against event_sha256 just above), not as ``data``.
    stored = b"".join(p.payload for p in pieces) if chunk.chunk_count > 1 else chunk.payload
    return Completed(data, stored)


def _single(raw: bytes, event_sha256: bytes, max_event_bytes: int) -> bytes:
    if len(raw) > max_event_bytes:
        raise DecompressionLimitExceeded(
            f"event decompresses to more than {max_event_bytes} bytes", field="payload")
    chunking.verify_event(raw, event_sha256)
    return raw


def reassemble(pieces: Sequence[Piece], event_sha256: bytes, max_event_bytes: int) -> bytes:
    """``chunking.reassemble`` that skips decompressing slices already decompressed; same
    limits, same errors."""
    if all(p.raw is None for p in pieces):
        return chunking.reassemble([p.payload for p in pieces], event_sha256,
                                   max_event_bytes=max_event_bytes,
                                   max_slice=chunking.MAX_SLICE)
    parts: list[bytes] = []
    total = 0
    for piece in pieces:
        budget = max_event_bytes - total
        data = piece.raw if piece.raw is not None else _decompress(piece.payload, budget,
                                                                     max_event_bytes)
        if len(data) > budget:
            raise DecompressionLimitExceeded(
                f"event decompresses to more than {max_event_bytes} bytes", field="payload")
        total += len(data)
        parts.append(data)
    data = b"".join(parts)
    chunking.verify_event(data, event_sha256)
    return data


def _decompress(payload: bytes, budget: int, max_event_bytes: int) -> bytes:
    try:
        return chunking.decompress_slice(
            payload, max_bytes=min(chunking.MAX_SLICE, max(budget, 0)))
    except DecompressionLimitExceeded as exc:
        if budget >= chunking.MAX_SLICE:
            raise
        raise DecompressionLimitExceeded(
            f"event decompresses to more than {max_event_bytes} bytes",
            field="payload") from exc
