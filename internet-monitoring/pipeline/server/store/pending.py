"""One chunk of a batch between the ledger's decisions and COMMIT, for both engines' ingest:
the per-chunk record, the checks and refusals that fill it, and the outcome built from it
once the batch has committed. Plain data and logging, no engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.common.errors import PipelineError
from pipeline.common.messages import Chunk
from pipeline.server.offsets import OffsetTracker
from pipeline.server.store.ledger import Conflict, check_chunk
from pipeline.server.store.records import ChunkOutcome, StoredEvent

log = logging.getLogger("pipeline.server.store")

DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024


@dataclass
class Pending:
    """One chunk's result before the batch commits (outcomes are built after COMMIT)."""

    chunk: Chunk
    stored: bool = False
    duplicate: bool = False
    event_complete: bool = False
    completed_event: StoredEvent | None = None
    error: PipelineError | None = None
    raw: bytes | None = None  # the decompressed slice (validated by ledger.check_chunk)


def log_rejected(chunk: Chunk, exc: PipelineError) -> None:
    log.info("chunk_rejected sensor_id=%s epoch=%s sequence=%d event_id=%s error=%s",
             chunk.sensor_id, chunk.queue_epoch, chunk.sequence, chunk.event_id, exc.code)


def precheck(item: Pending, max_event_bytes: int) -> None:
    """The ledger's checks of the chunk alone. A one-chunk event's decompressed slice is
    the event itself: it is kept so that completing the event needs no second
    decompression."""
    try:
        item.raw = check_chunk(item.chunk, max_event_bytes)
    except PipelineError as exc:
        item.error = exc
        log_rejected(item.chunk, exc)


def refuse(item: Pending, conflict: Conflict) -> None:
    item.error = conflict.error
    log_rejected(item.chunk, conflict.error)


def outcome(item: Pending, tracker: OffsetTracker | None) -> ChunkOutcome:
    """The chunk's answer; ``tracker`` is its (sensor, epoch) offsets after the batch."""
    chunk = item.chunk
    return ChunkOutcome(
        sensor_id=chunk.sensor_id, epoch=chunk.queue_epoch, sequence=chunk.sequence,
        event_id=chunk.event_id, window_id=chunk.window_id, stored=item.stored,
        duplicate=item.duplicate, event_complete=item.event_complete,
        completed_event=item.completed_event,
        last_committed_sequence=tracker.watermark if tracker is not None else 0,
        error=item.error)
