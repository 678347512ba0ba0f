"""What a store hands back: completed and rejected events, one chunk's outcome, and the
handles of a split (prepared, not yet committed) write. Plain data, no engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pipeline.common.errors import PipelineError


@dataclass(frozen=True)
class StoredEvent:
    """A completed, verified event. ``row_id`` is a monotonic store id used for paging."""

    row_id: int
    sensor_id: str
    epoch: str
    event_id: str
    event_sha256: bytes
    data: bytes
    logical_timestamp_ms: int
    created_at: str
    completed_at: float
    first_sequence: int
    last_sequence: int
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RejectedEvent:
    """An event that will never complete: its reassembled bytes were bad, or it expired."""

    sensor_id: str
    epoch: str
    event_id: str
    event_sha256: bytes
    chunk_count: int
    reason: str
    code: str
    rejected_at: float


@dataclass(frozen=True)
class ChunkOutcome:
    """What happened to one ingested chunk.

    ``completed_event`` is set only on the outcome of the chunk whose commit completed the
    event, so the caller updates caches and streams exactly once. ``event_complete`` is
    true whenever the event is complete after this chunk (duplicates included). ``error``
    is set when the chunk was rejected; then ``stored`` and ``duplicate`` are false.
    ``last_committed_sequence`` is the (sensor, epoch) watermark after the batch committed.
    """

    sensor_id: str
    epoch: str
    sequence: int
    event_id: str
    window_id: str
    stored: bool
    duplicate: bool
    event_complete: bool
    completed_event: StoredEvent | None
    last_committed_sequence: int
    error: PipelineError | None = None

    @property
    def committed(self) -> bool:
        """True when the sequence may be acked (stored or duplicate, durably)."""
        return self.stored or self.duplicate


# (sensor_id, window ids to delete, window states to save, sensor state)
ControlChange = tuple[str, Sequence[str], Mapping[str, Mapping[str, Any]], Mapping[str, Any]]


@dataclass(frozen=True)
class PreparedWrite:
    """A control-state write between ``begin_control_state`` and ``commit_write``."""

    what: str
