"""Helpers of the DurableQueue tests: a settable clock, deterministic payloads, raw SQLite."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from pipeline.common.chunking import reassemble
from pipeline.sensor.queue import QueuedChunk

CHILD = Path(__file__).with_name("queue_child.py")
HOUR = 3600.0


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _random(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def _event_rows(path: Path, event_id: str) -> int:
    with _raw(path) as conn:
        return int(conn.execute("SELECT COUNT(*) FROM chunks WHERE event_id = ?",
                                (event_id,)).fetchone()[0])


def _rebuild(chunks: list[QueuedChunk]) -> bytes:
    ordered = sorted(chunks, key=lambda c: c.chunk_index)
    assert [c.chunk_index for c in ordered] == list(range(ordered[0].chunk_count))
    return reassemble([c.payload for c in ordered], ordered[0].event_sha256)
