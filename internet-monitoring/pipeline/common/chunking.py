"""Splitting events into gzip chunks and putting them back together (pure, no I/O).

An event is cut into slices of ``slice_size`` uncompressed bytes (64-256 KiB, protocol.md
section 2); each slice is gzip-compressed on its own so that any chunk can be checked and
decompressed without its neighbours. Two hashes protect the data: ``chunk_sha256`` over the
compressed payload (checked before anything is decompressed) and ``event_sha256`` over the
whole uncompressed event (checked after reassembly).

Decompression never trusts the sender: it streams with a hard output cap, so a gzip bomb
costs at most ``max_bytes`` of memory before it is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import math
import os
import time
import zlib
from dataclasses import dataclass
from typing import Sequence

from pipeline.common.errors import (
    ChunkHashMismatch,
    DecompressionError,
    DecompressionLimitExceeded,
    EventHashMismatch,
    FieldTypeError,
    FieldValueError,
    PayloadTooLarge,
)
from pipeline.common.messages import EVENT_ID_RE, MAX_CHUNK_COUNT, SHA256_LEN

MIN_SLICE = 64 * 1024
DEFAULT_SLICE = 128 * 1024
MAX_SLICE = 256 * 1024
DEFAULT_MAX_EVENT_BYTES = 64 * 1024 * 1024

_GZIP_WBITS = 16 + zlib.MAX_WBITS


@dataclass(frozen=True)
class ChunkPiece:
    """One compressed slice of an event."""

    index: int
    count: int
    payload: bytes
    chunk_sha256: bytes
    raw_size: int


@dataclass(frozen=True)
class SplitEvent:
    """An event cut into pieces, with the hash of the whole uncompressed event."""

    event_id: str
    event_sha256: bytes
    size: int
    pieces: tuple[ChunkPiece, ...]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def new_event_id(now_ms: int | None = None) -> str:
    """A version-7 UUID (RFC 9562: 48-bit Unix milliseconds, then 74 random bits) as 32
    lowercase hex digits, the protocol's event id format.

    Time-ordered on purpose: every index keyed on event ids (the sensor queue's, the
    server's per-sensor ones) then grows at its end instead of at a random page, which
    kept enqueue and ingest from slowing down as the tables fill. The random bits keep
    ids unique without a lookup, even across a clock that steps back."""
    millis = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    raw = bytearray(millis.to_bytes(6, "big") + os.urandom(10))
    raw[6] = (raw[6] & 0x0F) | 0x70  # version 7
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 / 9562 variant
    return raw.hex()


def slice_count(size: int, slice_size: int = DEFAULT_SLICE) -> int:
    """Number of chunks an event of ``size`` bytes becomes; an empty event is one chunk."""
    return max(1, math.ceil(size / slice_size))


def _check_slice_size(slice_size: int) -> None:
    if isinstance(slice_size, bool) or not isinstance(slice_size, int):
        raise FieldTypeError("slice_size must be an integer", field="slice_size")
    if not MIN_SLICE <= slice_size <= MAX_SLICE:
        raise FieldValueError(
            f"slice_size must be between {MIN_SLICE} and {MAX_SLICE} bytes, got {slice_size}",
            field="slice_size",
        )


def _check_event_id(event_id: str) -> None:
    if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
        raise FieldValueError("event_id must be 32 lowercase hex characters", field="event_id")


def split_event(
    data: bytes,
    *,
    slice_size: int = DEFAULT_SLICE,
    event_id: str | None = None,
    compresslevel: int = 6,
) -> SplitEvent:
    """Cut ``data`` into gzip-compressed slices.

    ``mtime=0`` makes the output a pure function of the input, so re-splitting the same event
    gives the same chunk hashes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FieldTypeError("event data must be bytes", field="data")
    _check_slice_size(slice_size)
    if event_id is None:
        event_id = new_event_id()
    else:
        _check_event_id(event_id)
    raw = bytes(data)
    count = slice_count(len(raw), slice_size)
    if count > MAX_CHUNK_COUNT:
        raise PayloadTooLarge(
            f"event of {len(raw)} bytes needs {count} chunks, more than {MAX_CHUNK_COUNT}",
            field="data",
        )
    pieces = []
    for index in range(count):
        part = raw[index * slice_size:(index + 1) * slice_size]
        payload = gzip.compress(part, compresslevel=compresslevel, mtime=0)
        pieces.append(ChunkPiece(index=index, count=count, payload=payload,
                                 chunk_sha256=sha256(payload), raw_size=len(part)))
    return SplitEvent(event_id=event_id, event_sha256=sha256(raw), size=len(raw),
                      pieces=tuple(pieces))


def verify_chunk(payload: bytes, chunk_sha256: bytes) -> None:
    """Raise ChunkHashMismatch unless ``payload`` hashes to ``chunk_sha256``."""
    if len(chunk_sha256) != SHA256_LEN or not hmac.compare_digest(sha256(payload), chunk_sha256):
        raise ChunkHashMismatch("chunk payload does not match chunk_sha256", field="chunk_sha256")


def decompress_slice(payload: bytes, *, max_bytes: int = MAX_SLICE) -> bytes:
    """Decompress exactly one gzip member, producing at most ``max_bytes`` bytes.

    Concatenated members and trailing bytes are refused: a slice is one member by
    construction, and anything after it would be data the hashes were not meant to cover.
    """
    decoder = zlib.decompressobj(wbits=_GZIP_WBITS)
    try:
        # One byte over the cap is enough to know the cap is exceeded.
        out = decoder.decompress(payload, max_bytes + 1)
    except zlib.error as exc:
        raise DecompressionError(f"corrupt gzip payload: {exc}", field="payload") from exc
    if len(out) > max_bytes:
        raise DecompressionLimitExceeded(
            f"payload decompresses to more than {max_bytes} bytes", field="payload")
    if not decoder.eof:
        raise DecompressionError("truncated gzip payload", field="payload")
    if decoder.unused_data:
        raise DecompressionError("trailing bytes after the gzip member", field="payload")
    return out


def reassemble(
    payloads: Sequence[bytes],
    event_sha256: bytes,
    *,
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    max_slice: int = MAX_SLICE,
    chunk_sha256s: Sequence[bytes] | None = None,
) -> bytes:
    """Rebuild an event from its payloads in ``chunk_index`` order and check its hash.

    When ``chunk_sha256s`` is given each payload is verified first. Without it, a change
    the gzip format does not cover (header mtime/OS bytes) goes unnoticed, which is harmless:
    the event hash still guarantees the returned bytes are the original ones.
    """
    if not payloads:
        raise FieldValueError("an event has at least one chunk", field="payloads")
    if chunk_sha256s is not None:
        if len(chunk_sha256s) != len(payloads):
            raise FieldValueError("one chunk_sha256 per payload is needed", field="chunk_sha256")
        for payload, digest in zip(payloads, chunk_sha256s):
            verify_chunk(payload, digest)
    parts: list[bytes] = []
    total = 0
    for payload in payloads:
        budget = max_event_bytes - total
        if budget < max_slice:
            part = _decompress_within_event(payload, budget, max_event_bytes)
        else:
            part = decompress_slice(payload, max_bytes=max_slice)
        total += len(part)
        parts.append(part)
    data = b"".join(parts)
    verify_event(data, event_sha256)
    return data


def decompress_members(blob: bytes) -> bytes:
    """Decompress back-to-back gzip members (an event's verified slices stored as one blob).

    Only for bytes this system verified before storing them: there is no size cap here."""
    parts: list[bytes] = []
    rest = blob
    while rest:
        decoder = zlib.decompressobj(wbits=_GZIP_WBITS)
        try:
            parts.append(decoder.decompress(rest))
        except zlib.error as exc:
            raise DecompressionError(f"corrupt stored gzip member: {exc}",
                                     field="payload") from exc
        if not decoder.eof:
            raise DecompressionError("truncated stored gzip member", field="payload")
        rest = decoder.unused_data
    return b"".join(parts)


def verify_event(data: bytes, event_sha256: bytes) -> None:
    """Raise EventHashMismatch unless the whole uncompressed event hashes to ``event_sha256``."""
    if len(event_sha256) != SHA256_LEN or not hmac.compare_digest(sha256(data), event_sha256):
        raise EventHashMismatch("reassembled event does not match event_sha256",
                                field="event_sha256")


def _decompress_within_event(payload: bytes, budget: int, max_event_bytes: int) -> bytes:
    """Decompress the slice that reaches the event cap, naming the event cap when exceeded."""
    try:
        return decompress_slice(payload, max_bytes=budget)
    except DecompressionLimitExceeded as exc:
        raise DecompressionLimitExceeded(
            f"event decompresses to more than {max_event_bytes} bytes", field="payload") from exc
