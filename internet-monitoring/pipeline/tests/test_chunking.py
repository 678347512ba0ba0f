"""Properties of event chunking: round trip, piece counts, corruption, bombs, order."""

from __future__ import annotations

import gzip
import hashlib
import math
import random
import re
import time
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.chunking import (
    DEFAULT_SLICE,
    MAX_SLICE,
    MIN_SLICE,
    decompress_slice,
    reassemble,
    split_event,
    verify_chunk,
)
from pipeline.common.errors import (
    ChunkHashMismatch,
    DecompressionError,
    DecompressionLimitExceeded,
    EventHashMismatch,
    FieldValueError,
    IntegrityError,
)

SLICES = st.sampled_from([MIN_SLICE, DEFAULT_SLICE, MAX_SLICE, 100_000])


def _make(seed: int, size: int, compressible: bool) -> bytes:
    rng = random.Random(seed)
    if compressible:
        return (rng.randbytes(97) * (size // 97 + 1))[:size]
    return rng.randbytes(size)


@st.composite
def events(draw: st.DrawFn) -> tuple[bytes, int]:
    """Event bytes and a slice size, biased towards sizes around slice boundaries."""
    slice_size = draw(SLICES)
    kind = draw(st.sampled_from(["small", "boundary", "any"]))
    if kind == "small":
        return draw(st.binary(max_size=2048)), slice_size
    if kind == "boundary":
        k = draw(st.integers(0, 3))
        size = max(0, k * slice_size + draw(st.sampled_from([-1, 0, 1])))
    else:
        size = draw(st.integers(0, 700_000))
    data = _make(draw(st.integers(0, 2**32)), size, draw(st.booleans()))
    return data, slice_size


@settings(max_examples=80, deadline=None)
@given(events())
def test_split_then_reassemble_is_identity(event: tuple[bytes, int]) -> None:
    data, slice_size = event
    split = split_event(data, slice_size=slice_size)
    assert len(split.pieces) == max(1, math.ceil(len(data) / slice_size))
    assert split.size == len(data)
    assert split.event_sha256 == hashlib.sha256(data).digest()
    assert re.fullmatch(r"[0-9a-f]{32}", split.event_id)
    for i, piece in enumerate(split.pieces):
        assert (piece.index, piece.count) == (i, len(split.pieces))
        assert piece.chunk_sha256 == hashlib.sha256(piece.payload).digest()
        assert decompress_slice(piece.payload) == data[i * slice_size:(i + 1) * slice_size]
        assert piece.raw_size == min(slice_size, len(data) - i * slice_size)
        verify_chunk(piece.payload, piece.chunk_sha256)
    payloads = [p.payload for p in split.pieces]
    assert reassemble(payloads, split.event_sha256) == data
    assert reassemble(payloads, split.event_sha256,
                      chunk_sha256s=[p.chunk_sha256 for p in split.pieces]) == data


def test_empty_event_is_one_chunk_of_gzip_empty() -> None:
    split = split_event(b"")
    assert len(split.pieces) == 1
    assert split.pieces[0].raw_size == 0
    assert gzip.decompress(split.pieces[0].payload) == b""
    assert reassemble([split.pieces[0].payload], hashlib.sha256(b"").digest()) == b""


def test_five_mib_event_round_trips() -> None:
    data = random.Random(5).randbytes(5 * 1024 * 1024)
    split = split_event(data)
    assert len(split.pieces) == 40
    assert reassemble([p.payload for p in split.pieces], split.event_sha256) == data


def test_split_is_deterministic_for_the_same_event_id() -> None:
    data = _make(1, 300_000, compressible=False)
    first = split_event(data, event_id="a" * 32)
    second = split_event(data, event_id="a" * 32)
    assert first == second
    assert split_event(data).event_id != split_event(data).event_id


@pytest.mark.parametrize("slice_size", [0, MIN_SLICE - 1, MAX_SLICE + 1, 10**9])
def test_slice_size_out_of_range_is_refused(slice_size: int) -> None:
    with pytest.raises(FieldValueError) as info:
        split_event(b"x", slice_size=slice_size)
    assert info.value.field == "slice_size"


@pytest.mark.parametrize("event_id", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, "a" * 32 + "\n"])
def test_bad_event_id_is_refused(event_id: str) -> None:
    with pytest.raises(FieldValueError) as info:
        split_event(b"x", event_id=event_id)
    assert info.value.field == "event_id"


@settings(max_examples=150, deadline=None)
@given(size=st.integers(0, 400_000), seed=st.integers(0, 2**32), compressible=st.booleans(),
       piece_pick=st.integers(0, 10**6), pos_pick=st.integers(0, 10**9),
       flip=st.integers(1, 255))
def test_any_single_byte_corruption_is_detected(size: int, seed: int, compressible: bool,
                                                piece_pick: int, pos_pick: int,
                                                flip: int) -> None:
    data = _make(seed, size, compressible)
    split = split_event(data, slice_size=MIN_SLICE)
    target = piece_pick % len(split.pieces)
    payload = bytearray(split.pieces[target].payload)
    pos = pos_pick % len(payload)
    payload[pos] ^= flip
    corrupted = bytes(payload)

    with pytest.raises(ChunkHashMismatch):
        verify_chunk(corrupted, split.pieces[target].chunk_sha256)

    payloads = [p.payload for p in split.pieces]
    payloads[target] = corrupted
    with pytest.raises(ChunkHashMismatch):
        reassemble(payloads, split.event_sha256,
                   chunk_sha256s=[p.chunk_sha256 for p in split.pieces])
    # Without the chunk hashes a byte gzip does not cover (header mtime/OS, padding bits)
    # can change harmlessly; what must never happen is wrong bytes coming back.
    try:
        result = reassemble(payloads, split.event_sha256)
    except IntegrityError:
        return
    assert result == data


def test_corrupted_deflate_data_is_refused_by_reassemble() -> None:
    data = _make(2, 200_000, compressible=False)
    split = split_event(data, slice_size=MIN_SLICE)
    payloads = [p.payload for p in split.pieces]
    broken = bytearray(payloads[1])
    broken[len(broken) // 2] ^= 0xFF  # in the middle of a stored/deflate block's data
    payloads[1] = bytes(broken)
    with pytest.raises(IntegrityError):
        reassemble(payloads, split.event_sha256)


def _gzip_bomb(total: int) -> bytes:
    """gzip of ``total`` zero bytes, built in steps so the test never holds them all."""
    encoder = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1024 * 1024)
    parts = [encoder.compress(block) for _ in range(total // len(block))]
    parts.append(encoder.flush())
    return b"".join(parts)


def test_gzip_bomb_is_refused_quickly_without_inflating_it() -> None:
    bomb = _gzip_bomb(50 * 1024 * 1024)
    assert len(bomb) < 100_000
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(DecompressionLimitExceeded):
            decompress_slice(bomb)
        with pytest.raises(DecompressionLimitExceeded):
            reassemble([bomb], hashlib.sha256(b"").digest())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 1.0
    assert peak < 4 * MAX_SLICE


def test_event_cap_limits_the_sum_of_slices() -> None:
    data = _make(3, 300_000, compressible=True)
    split = split_event(data)
    payloads = [p.payload for p in split.pieces]
    with pytest.raises(DecompressionLimitExceeded):
        reassemble(payloads, split.event_sha256, max_event_bytes=299_999)
    assert reassemble(payloads, split.event_sha256, max_event_bytes=300_000) == data


def test_slice_cap_is_exact() -> None:
    payload = gzip.compress(bytes(1000), mtime=0)
    assert decompress_slice(payload, max_bytes=1000) == bytes(1000)
    with pytest.raises(DecompressionLimitExceeded):
        decompress_slice(payload, max_bytes=999)


@pytest.mark.parametrize("payload", [
    b"",
    b"not gzip at all",
    gzip.compress(b"hello world" * 100, mtime=0)[:-5],  # truncated
    gzip.compress(b"hello", mtime=0) + b"garbage",  # trailing bytes
    gzip.compress(b"hello", mtime=0) + gzip.compress(b"again", mtime=0),  # two members
    zlib.compress(b"zlib, not gzip"),
])
def test_malformed_gzip_is_a_decompression_error(payload: bytes) -> None:
    with pytest.raises(DecompressionError) as info:
        decompress_slice(payload)
    assert not isinstance(info.value, DecompressionLimitExceeded)
    assert isinstance(info.value, IntegrityError)


@settings(max_examples=60, deadline=None)
@given(pieces=st.integers(2, 6), seed=st.integers(0, 2**32), data=st.data())
def test_reordered_chunks_fail_the_event_hash(pieces: int, seed: int,
                                              data: st.DataObject) -> None:
    event = _make(seed, pieces * MIN_SLICE, compressible=False)
    split = split_event(event, slice_size=MIN_SLICE)
    order = data.draw(st.permutations(range(pieces)).filter(lambda p: list(p) != sorted(p)))
    payloads = [split.pieces[i].payload for i in order]
    with pytest.raises(EventHashMismatch):
        reassemble(payloads, split.event_sha256)


def test_missing_or_extra_chunk_fails_the_event_hash() -> None:
    split = split_event(_make(4, 3 * MIN_SLICE, compressible=False), slice_size=MIN_SLICE)
    payloads = [p.payload for p in split.pieces]
    with pytest.raises(EventHashMismatch):
        reassemble(payloads[:-1], split.event_sha256)
    with pytest.raises(EventHashMismatch):
        reassemble(payloads + payloads[:1], split.event_sha256)
    with pytest.raises(FieldValueError):
        reassemble([], split.event_sha256)


def test_new_event_ids_carry_their_millisecond_first_and_match_the_wire_format():
    import uuid

    from pipeline.common.chunking import new_event_id
    from pipeline.common.messages import EVENT_ID_RE

    ids = [new_event_id(0x0123456789AB) for _ in range(100)]
    assert len(set(ids)) == 100  # the random part
    for event_id in ids:
        assert EVENT_ID_RE.fullmatch(event_id)
        assert event_id[:12] == "0123456789ab"
        assert uuid.UUID(hex=event_id).version == 7
    assert new_event_id(1) < new_event_id(2)  # later milliseconds sort after
