"""Chunks and row counts shared by the store's tests (ledger, contract, SQLite)."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Callable

from pipeline.common.chunking import MIN_SLICE, split_event
from pipeline.common.config import StoreConfig
from pipeline.common.messages import Chunk
from pipeline.server.store import ChunkStore, open_store

SENSOR = "pi-01"
EPOCH_A = "aaaaaaaa"
EPOCH_B = "bbbbbbbb"


def make_chunks(data: bytes, first_sequence: int, *, sensor: str = SENSOR, epoch: str = "",
                event_id: str | None = None, logical_ts: int = 1_795_755_600_000,
                window_id: str = "w-1") -> list[Chunk]:
    """The chunks a sensor would queue for one event, with consecutive sequences."""
    split = split_event(data, slice_size=MIN_SLICE, event_id=event_id)
    return [Chunk(sensor_id=sensor, event_id=split.event_id, sequence=first_sequence + i,
                  chunk_index=piece.index, chunk_count=piece.count, payload=piece.payload,
                  chunk_sha256=piece.chunk_sha256, event_sha256=split.event_sha256,
                  created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=logical_ts,
                  attributes={"window_id": window_id}, queue_epoch=epoch)
            for i, piece in enumerate(split.pieces)]


def event_bytes(n_chunks: int, seed: int = 0) -> bytes:
    """Incompressible data that splits into exactly ``n_chunks`` MIN_SLICE chunks."""
    size = (n_chunks - 1) * MIN_SLICE + 1000
    return random.Random(seed).randbytes(size)


def rows(path: Path, table: str) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def all_counts(path: Path) -> dict[str, int]:
    return {t: rows(path, t) for t in ("chunks", "events", "partial_events", "offsets",
                                       "rejected_events")}


def open_test_store(path: Path | str, *, synchronous: str = "FULL",
                    clock: Callable[[], float] = time.time) -> ChunkStore:
    """``open_store`` on ``path`` with no disk reserve (the tests' usual store)."""
    config = StoreConfig(path=str(path), synchronous=synchronous,  # type: ignore[arg-type]
                         reserve_bytes=0)
    return open_store(config, clock=clock)
