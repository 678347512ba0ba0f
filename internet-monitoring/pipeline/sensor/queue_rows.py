"""What the queue stores and returns: events in, chunks out, drop tallies."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from pipeline.common.messages import Chunk


@dataclass(frozen=True)
class EventInput:
    """One event for ``enqueue_many`` (the keyword arguments of ``enqueue``)."""

    data: bytes
    event_id: str | None = None
    created_at: str | None = None
    logical_timestamp_ms: int | None = None
    attributes: Mapping[str, str] | None = None
    traceparent: str | None = None
    #: gzip level of the event's chunks: 6 (the default) or 1 for data that is cheap to
    #: store a little larger and costly to compress (remote-write batches, see
    #: sensor/group_commit.py).
    compresslevel: int = 6


@dataclass(frozen=True)
class EnqueuedEvent:
    """What ``enqueue`` wrote: the event's chunk sequences in ``chunk_index`` order."""

    event_id: str
    sequences: tuple[int, ...]
    event_sha256: bytes
    size: int


@dataclass(frozen=True)
class QueuedChunk:
    """One stored chunk, everything needed to build the wire ``Chunk``."""

    sequence: int
    event_id: str
    chunk_index: int
    chunk_count: int
    payload: bytes
    chunk_sha256: bytes
    event_sha256: bytes
    created_at: str
    logical_timestamp_ms: int
    attributes: dict[str, str] = field(default_factory=dict)
    enqueued_at: float = 0.0

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    def to_wire(self, sensor_id: str, window_id: str, *, queue_epoch: str = "",
                clock_skew_ms: float = 0.0) -> Chunk:
        """The wire chunk sent under ``window_id`` (added to the stored attributes)."""
        return Chunk(
            sensor_id=sensor_id, event_id=self.event_id, sequence=self.sequence,
            chunk_index=self.chunk_index, chunk_count=self.chunk_count, payload=self.payload,
            chunk_sha256=self.chunk_sha256, event_sha256=self.event_sha256,
            created_at=self.created_at, logical_timestamp_ms=self.logical_timestamp_ms,
            clock_skew_ms=clock_skew_ms, attributes={**self.attributes, "window_id": window_id},
            queue_epoch=queue_epoch)


@dataclass(frozen=True)
class ChunkMeta:
    """A chunk without its payload: what the sans-I/O dispatcher plans windows with."""

    sequence: int
    nbytes: int
    enqueued_at: float


@dataclass
class DropTally:
    chunks: int = 0
    events: int = 0
    bytes: int = 0

    def add(self, chunks: int, nbytes: int) -> None:
        self.chunks += chunks
        self.events += 1
        self.bytes += nbytes

    def as_dict(self) -> dict[str, int]:
        return {"chunks": self.chunks, "events": self.events, "bytes": self.bytes}


def row_to_chunk(row: Sequence[Any]) -> QueuedChunk:
    (sequence, event_id, chunk_index, chunk_count, payload, chunk_sha256, event_sha256,
     created_at, logical_ms, attributes, enqueued_at, _nbytes) = row
    return QueuedChunk(
        sequence=int(sequence), event_id=str(event_id), chunk_index=int(chunk_index),
        chunk_count=int(chunk_count), payload=bytes(payload), chunk_sha256=bytes(chunk_sha256),
        event_sha256=bytes(event_sha256), created_at=str(created_at),
        logical_timestamp_ms=int(logical_ms), attributes=dict(json.loads(attributes)),
        enqueued_at=float(enqueued_at))
