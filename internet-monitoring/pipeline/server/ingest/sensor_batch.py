"""One sensor's share of a committed ingest batch: the ack items its control session
sends and the totals its metrics count, gathered from the batch's outcomes."""

from __future__ import annotations

from typing import Any

from pipeline.server.control.session import Committed


class SensorBatch:
    """One sensor's committed chunks in one batch: its ack items and metric totals."""

    __slots__ = ("items", "marks", "stored", "stored_bytes", "duplicates", "latencies_ms",
                 "events")

    def __init__(self) -> None:
        self.items: list[Committed] = []
        self.marks: dict[str, int] = {}
        self.stored = 0
        self.stored_bytes = 0
        self.duplicates = 0
        self.latencies_ms: list[float] = []
        self.events = 0

    def add(self, outcome: Any, window_id: str, nbytes: int, latency_ms: float) -> None:
        epoch = outcome.epoch
        self.items.append(Committed(outcome.sequence, window_id, nbytes, epoch=epoch))
        self.marks[epoch] = max(self.marks.get(epoch, 0), outcome.last_committed_sequence)
        if outcome.duplicate:
            self.duplicates += 1
        else:
            self.stored += 1
            self.stored_bytes += nbytes
        self.latencies_ms.append(latency_ms)
        if outcome.completed_event is not None:
            self.events += 1
