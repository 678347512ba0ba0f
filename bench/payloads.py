"""Synthetic test results and the chunk bodies the load generators send.

An event is a JSON measurement document of the requested uncompressed size (numbers with
random digits, so gzip gets about 2:1, like real results). Chunk sizes in the report are
uncompressed slice sizes; MB/s counts uncompressed payload (what sensors measured).
Compressing is the costly part, so a few distinct events are split once and re-used under
fresh event ids and sequences: the server stores each as a new event.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import replace
from functools import lru_cache

from pipeline.common.chunking import split_event
from pipeline.common.messages import Chunk

CREATED_AT = "2026-11-27T05:00:00Z"
DISTINCT_EVENTS = 8


def measurement(size: int, seed: int) -> bytes:
    """A JSON result document of exactly ``size`` bytes (at least 64)."""
    rng = random.Random(seed)
    head = f'{{"test": "speed", "seed": {seed:d}, "samples": ['
    parts: list[str] = []
    used = len(head) + 2
    while used < size:
        t_ms, down, rtt = rng.randrange(10**6), rng.uniform(1, 900), rng.uniform(1, 200)
        item = f'{{"t_ms": {t_ms:d}, "down_mbps": {down:.3f}, "rtt_ms": {rtt:.3f}}}'
        parts.append(item)
        used += len(item) + 2
    body = head + ", ".join(parts)
    body = body[:max(len(head), size - 2)]
    # Cut inside the last sample: pad it into a string so the document stays valid JSON.
    cut = body.rfind(", {")
    if cut > 0:
        body = body[:cut] + ", " + '"' + "x" * max(0, len(body) - cut - 4) + '"'
    text = body + "]}"
    text = text + " " * (size - len(text))
    return text.encode()[:size]


@lru_cache(maxsize=16)
def template_chunks(size: int, chunks_per_event: int) -> tuple[tuple[Chunk, ...], ...]:
    """``DISTINCT_EVENTS`` events of ``chunks_per_event`` slices of ``size`` bytes each."""
    events = []
    for seed in range(DISTINCT_EVENTS):
        data = measurement(size * chunks_per_event, seed)
        split = split_event(data, slice_size=max(size, 64 * 1024))
        pieces = split.pieces
        if len(pieces) != chunks_per_event:
            # Slices are at least 64 KiB: small chunks are one-chunk events.
            split = split_event(data[:size])
            pieces = split.pieces
        events.append(tuple(
            Chunk(sensor_id="template", event_id=split.event_id, sequence=1,
                  chunk_index=p.index, chunk_count=p.count, payload=p.payload,
                  chunk_sha256=p.chunk_sha256, event_sha256=split.event_sha256,
                  created_at=CREATED_AT, logical_timestamp_ms=1_795_755_600_000,
                  attributes={"window_id": "bench"})
            for p in pieces))
    return tuple(events)


def chunks_per_event(size: int) -> int:
    """128 KiB chunks come as 4-chunk events (512 KiB); smaller ones are whole events."""
    return 4 if size >= 64 * 1024 else 1


def sensor_chunks(sensor_id: str, size: int, count: int, first_sequence: int = 1
                  ) -> list[Chunk]:
    """``count`` chunks of one sensor, sequences contiguous, events whole and in order."""
    per_event = chunks_per_event(size)
    templates = template_chunks(size, per_event)
    out: list[Chunk] = []
    event_no = 0
    while len(out) < count:
        event_id = uuid.uuid4().hex
        for piece in templates[event_no % len(templates)]:
            out.append(replace(piece, sensor_id=sensor_id, event_id=event_id,
                               sequence=first_sequence + len(out)))
        event_no += 1
    return out[:count]


def uncompressed_bytes(chunk: Chunk, size: int) -> int:
    """Uncompressed bytes a chunk carries (every slice is ``size`` bytes)."""
    del chunk
    return size
