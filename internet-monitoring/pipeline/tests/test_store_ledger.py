"""The exactly-once ledger without a database: each decision on its own, then Hypothesis
properties of exactly-once completion under any arrival order, with duplicates,
conflicting content and bad event hashes.

``LedgerModel`` is the smallest store the ledger needs (dicts for the keys, the event
states and the offsets): it looks up, asks the ledger and applies the answer the way the
SQLite backend does, with no SQL, so the properties test the decisions alone.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import sys
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.chunking import MAX_SLICE, MIN_SLICE
from pipeline.common.errors import (
    ConflictError,
    DecompressionLimitExceeded,
    EventHashMismatch,
    FieldValueError,
    IntegrityError,
    PayloadTooLarge,
    PipelineError,
    SequenceConflict,
)
from pipeline.common.messages import Chunk
from pipeline.server.store import ledger
from pipeline.server.store.ledger import (
    DUPLICATE,
    ChunkKeys,
    Completed,
    Conflict,
    Finished,
    Partial,
    Piece,
    Rejected,
    StoreLate,
    StoreProgress,
)
from pipeline.tests.store_support import SENSOR, event_bytes, make_chunks

MAX_EVENT = 64 * 1024 * 1024
Key = tuple[str, str]


@dataclass
class LedgerModel:
    """A store in dicts driven by the ledger; ``deliver`` returns what became of a chunk:
    invalid, conflict, duplicate, stored, completed or rejected."""

    max_event_bytes: int = MAX_EVENT
    by_sequence: dict[tuple[str, str, int], tuple[str, int, bytes]] = field(default_factory=dict)
    by_slot: dict[tuple[str, str, int], tuple[bytes, bytes | None]] = field(default_factory=dict)
    partials: dict[Key, Partial] = field(default_factory=dict)
    finished: dict[Key, Finished] = field(default_factory=dict)
    committed: set[tuple[str, str, int]] = field(default_factory=set)
    events: dict[Key, bytes] = field(default_factory=dict)
    finishes: list[Key] = field(default_factory=list)

    def deliver(self, chunk: Chunk) -> str:
        try:
            raw = ledger.check_chunk(chunk, self.max_event_bytes)
        except PipelineError:
            return "invalid"
        seq_key = (chunk.sensor_id, chunk.queue_epoch, chunk.sequence)
        slot_key = (chunk.sensor_id, chunk.event_id, chunk.chunk_index)
        slot = self.by_slot.get(slot_key)
        keys = ChunkKeys(self.by_sequence.get(seq_key), slot[0] if slot else None,
                         seq_key in self.committed)
        verdict = ledger.judge_keys(chunk, keys)
        if isinstance(verdict, Conflict):
            return "conflict"
        if verdict is DUPLICATE:
            self.committed.add(seq_key)
            return "duplicate"
        event_key = (chunk.sensor_id, chunk.event_id)
        decision = ledger.judge_event(chunk, self.partials.get(event_key)
                                      or self.finished.get(event_key))
        if isinstance(decision, Conflict):
            return "conflict"
        self.by_sequence[seq_key] = (chunk.event_id, chunk.chunk_index, chunk.chunk_sha256)
        self.committed.add(seq_key)
        if isinstance(decision, StoreLate):
            self.by_slot[slot_key] = (chunk.chunk_sha256, None)
            return "stored"
        if not decision.completes:
            self.by_slot[slot_key] = (chunk.chunk_sha256, chunk.payload)
            self.partials[event_key] = decision.partial
            return "stored"
        self.by_slot[slot_key] = (chunk.chunk_sha256, None)
        return self._complete(chunk, raw, decision.partial)

    def _complete(self, chunk: Chunk, raw: bytes, partial: Partial) -> str:
        event_key = (chunk.sensor_id, chunk.event_id)
        pieces = []
        for index in range(chunk.chunk_count):
            if index == chunk.chunk_index:
                pieces.append(Piece(chunk.payload, raw))
                continue
            stored = self.by_slot.get((chunk.sensor_id, chunk.event_id, index))
            if stored is not None and stored[1] is not None:
                pieces.append(Piece(stored[1]))
                self.by_slot[(chunk.sensor_id, chunk.event_id, index)] = (stored[0], None)
        self.partials.pop(event_key, None)
        self.finishes.append(event_key)
        result = ledger.complete_event(chunk, raw, partial, pieces, self.max_event_bytes)
        if isinstance(result, Completed):
            self.events[event_key] = result.data
            self.finished[event_key] = Finished(partial.event_sha256, completed=True)
            return "completed"
        self.finished[event_key] = Finished(partial.event_sha256, completed=False)
        return "rejected"


def one_chunk(data: bytes = b'{"rtt_ms": 12.5}', sequence: int = 1, **kw: object) -> Chunk:
    [chunk] = make_chunks(data, sequence, **kw)  # type: ignore[arg-type]
    return chunk


# ---------------------------------------------------------------------------------------
# The module stays pure


def test_the_ledger_imports_neither_sqlite3_nor_asyncio() -> None:
    for name in ("sqlite3", "asyncio"):
        assert name not in vars(ledger)
    source = open(ledger.__file__, encoding="utf-8").read()
    assert "import sqlite3" not in source and "import asyncio" not in source
    # And importing it alone pulls neither in.
    saved = {k: sys.modules.pop(k) for k in list(sys.modules)
             if k == "pipeline.server.store.ledger"}
    try:
        fresh = importlib.import_module("pipeline.server.store.ledger")
        assert not hasattr(fresh, "sqlite3") and not hasattr(fresh, "asyncio")
    finally:
        sys.modules.update(saved)


# ---------------------------------------------------------------------------------------
# 1. The chunk alone


def test_check_chunk_returns_the_decompressed_slice() -> None:
    assert ledger.check_chunk(one_chunk(b"hello"), MAX_EVENT) == b"hello"


@pytest.mark.parametrize("change, error", [
    ({"sequence": 0}, FieldValueError),
    ({"compression": "zstd"}, FieldValueError),
    ({"chunk_index": 3, "chunk_count": 3}, FieldValueError),
    ({"chunk_count": 10**9}, PayloadTooLarge),
])
def test_check_chunk_refuses_bad_fields(change: dict[str, object],
                                        error: type[PipelineError]) -> None:
    with pytest.raises(error):
        ledger.check_chunk(replace(one_chunk(), **change), MAX_EVENT)  # type: ignore[arg-type]


def test_check_chunk_refuses_a_gzip_bomb_with_a_correct_hash() -> None:
    bomb = gzip.compress(b"\0" * (MAX_SLICE + 1), mtime=0)
    chunk = replace(one_chunk(), payload=bomb, chunk_sha256=hashlib.sha256(bomb).digest())
    with pytest.raises(DecompressionLimitExceeded):
        ledger.check_chunk(chunk, MAX_EVENT)


# ---------------------------------------------------------------------------------------
# 2. The keys


def test_same_sequence_same_content_is_a_duplicate_other_content_a_sequence_conflict() -> None:
    chunk = one_chunk()
    same = ChunkKeys(same_sequence=(chunk.event_id, 0, chunk.chunk_sha256))
    assert ledger.judge_keys(chunk, same) is DUPLICATE
    other = ChunkKeys(same_sequence=(chunk.event_id, 0, b"\1" * 32))
    verdict = ledger.judge_keys(chunk, other)
    assert isinstance(verdict, Conflict) and isinstance(verdict.error, SequenceConflict)


def test_a_pruned_but_committed_sequence_is_a_duplicate() -> None:
    assert ledger.judge_keys(one_chunk(), ChunkKeys(committed_before=True)) is DUPLICATE


def test_same_slot_same_hash_is_a_duplicate_other_hash_a_conflict() -> None:
    chunk = one_chunk()
    assert ledger.judge_keys(chunk, ChunkKeys(same_slot=chunk.chunk_sha256)) is DUPLICATE
    verdict = ledger.judge_keys(chunk, ChunkKeys(same_slot=b"\2" * 32))
    assert isinstance(verdict, Conflict) and verdict.error.field == "chunk_index"


def test_unknown_keys_mean_a_new_chunk() -> None:
    assert ledger.judge_keys(one_chunk(), ChunkKeys()) is None


# ---------------------------------------------------------------------------------------
# 3. The event


def test_first_chunk_of_an_event_starts_its_progress() -> None:
    first, _second = make_chunks(event_bytes(2), 5)
    decision = ledger.judge_event(first, None)
    assert isinstance(decision, StoreProgress) and decision.is_new and not decision.completes
    assert (decision.partial.received, decision.partial.first_sequence) == (1, 5)


def test_last_chunk_completes_and_chunk_zero_sets_the_metadata() -> None:
    first, second = make_chunks(event_bytes(2), 5, logical_ts=111)
    started = ledger.judge_event(replace(second, logical_timestamp_ms=999), None)
    assert isinstance(started, StoreProgress)
    done = ledger.judge_event(first, started.partial)
    assert isinstance(done, StoreProgress) and done.completes and not done.is_new
    assert done.partial.logical_timestamp_ms == 111
    assert (done.partial.first_sequence, done.partial.last_sequence) == (5, 6)


def test_a_chunk_disagreeing_with_its_event_conflicts() -> None:
    first, second = make_chunks(event_bytes(2), 1)
    started = ledger.judge_event(first, None)
    assert isinstance(started, StoreProgress)
    for change, name in (({"chunk_count": 3}, "chunk_count"),
                         ({"event_sha256": b"\3" * 32}, "event_sha256")):
        verdict = ledger.judge_event(replace(second, **change), started.partial)
        assert isinstance(verdict, Conflict) and verdict.error.field == name


def test_a_late_chunk_of_a_finished_event_keeps_only_its_key() -> None:
    chunk = one_chunk()
    assert ledger.judge_event(chunk, Finished(chunk.event_sha256, True)) == StoreLate(True)
    assert ledger.judge_event(chunk, Finished(chunk.event_sha256, False)) == StoreLate(False)
    verdict = ledger.judge_event(chunk, Finished(b"\4" * 32, True))
    assert isinstance(verdict, Conflict) and isinstance(verdict.error, ConflictError)


# ---------------------------------------------------------------------------------------
# 4. Completion


def _partial(chunk: Chunk) -> Partial:
    decision = ledger.judge_event(chunk, None)
    assert isinstance(decision, StoreProgress)
    return decision.partial


def test_a_one_chunk_event_completes_from_its_slice_and_keeps_the_gzip() -> None:
    chunk = one_chunk(b"payload")
    result = ledger.complete_event(chunk, b"payload", _partial(chunk), [], MAX_EVENT)
    assert result == Completed(b"payload", chunk.payload)


def test_a_bad_event_hash_rejects_the_event() -> None:
    chunk = replace(one_chunk(b"payload"), event_sha256=b"\5" * 32)
    result = ledger.complete_event(chunk, b"payload", _partial(chunk), [], MAX_EVENT)
    assert isinstance(result, Rejected) and isinstance(result.error, EventHashMismatch)


def test_reassembly_with_and_without_decompressed_slices_gives_the_same_bytes() -> None:
    data = event_bytes(3, seed=7)
    chunks = make_chunks(data, 1)
    partial = _partial(chunks[0])
    for raws in ([None, None, None], [None, b"?", None]):
        pieces = [Piece(c.payload, ledger.check_chunk(c, MAX_EVENT) if r else None)
                  for c, r in zip(chunks, raws)]
        result = ledger.complete_event(chunks[2], None, partial, pieces, MAX_EVENT)
        assert isinstance(result, Completed) and result.data == data
        assert result.stored == b"".join(c.payload for c in chunks)


def test_a_missing_piece_or_an_oversized_event_is_rejected() -> None:
    chunks = make_chunks(event_bytes(3, seed=8), 1)
    partial = _partial(chunks[0])
    short = ledger.complete_event(chunks[2], None, partial,
                                  [Piece(c.payload) for c in chunks[:2]], MAX_EVENT)
    assert isinstance(short, Rejected) and isinstance(short.error, IntegrityError)
    big = ledger.complete_event(chunks[2], None, partial,
                                [Piece(c.payload) for c in chunks], 2 * MIN_SLICE)
    assert isinstance(big, Rejected)
    assert isinstance(big.error, DecompressionLimitExceeded)


# ---------------------------------------------------------------------------------------
# Properties: exactly once under any arrival order


EVENT_SIZES = (1, 3, 1, 2)  # chunks per event; sequences 1..7
EVENTS = [event_bytes(n, seed=100 + i) if n > 1 else f"single {i}".encode()
          for i, n in enumerate(EVENT_SIZES)]


def _genuine() -> list[Chunk]:
    out: list[Chunk] = []
    for i, data in enumerate(EVENTS):
        out += make_chunks(data, len(out) + 1, event_id=f"{i:032x}")
    return out


GENUINE = _genuine()


FORGED_DATA = b"forged content"


def _forged() -> list[Chunk]:
    """Chunks that contradict the genuine ones: other content under a genuine sequence,
    another slice for a genuine slot under a new sequence, and a two-chunk event whose
    chunks are sound but whose event hash is wrong."""
    other = make_chunks(FORGED_DATA, 2, event_id="e" * 32)[0]  # seq 2 is event 1's #0
    slot = replace(make_chunks(event_bytes(3, seed=999), 1, event_id=f"{1:032x}")[1],
                   sequence=50, event_sha256=GENUINE[1].event_sha256)
    poison = [replace(c, event_sha256=b"\6" * 32)
              for c in make_chunks(event_bytes(2, seed=5), 60, event_id="f" * 32)]
    return [other, slot, *poison]


FORGED = _forged()
POOL = GENUINE + FORGED


def _expected_done(delivered: list[Chunk]) -> set[str]:
    seen = {c.sequence for c in delivered}
    return {c.event_id for c in GENUINE
            if all(d.sequence in seen for d in GENUINE if d.event_id == c.event_id)}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(GENUINE) - 1), min_size=1, max_size=30))
def test_any_arrival_order_with_duplicates_completes_each_event_exactly_once(
        picks: list[int]) -> None:
    model = LedgerModel()
    deliveries = [GENUINE[i] for i in picks]
    outcomes = [model.deliver(c) for c in deliveries]
    assert "conflict" not in outcomes and "rejected" not in outcomes
    completed = [c.event_id for c, o in zip(deliveries, outcomes) if o == "completed"]
    assert sorted(completed) == sorted(_expected_done(deliveries))  # once each
    for event_id in completed:
        assert model.events[(SENSOR, event_id)] == EVENTS[int(event_id, 16)]
    first_seen: set[int] = set()
    for chunk, outcome in zip(deliveries, outcomes):
        assert (outcome == "duplicate") == (chunk.sequence in first_seen)
        first_seen.add(chunk.sequence)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=40))
def test_conflicting_content_and_bad_hashes_never_complete_an_event_twice_or_wrongly(
        picks: list[int]) -> None:
    model = LedgerModel()
    deliveries = [POOL[i] for i in picks]
    outcomes = [model.deliver(c) for c in deliveries]
    # Every event finishes (completed or rejected) at most once.
    assert len(model.finishes) == len(set(model.finishes))
    # A completed event is exactly its genuine bytes; the poisoned event never completes.
    for (_, event_id), data in model.events.items():
        assert event_id != "f" * 32
        assert data == (FORGED_DATA if event_id == "e" * 32 else EVENTS[int(event_id, 16)])
    # An event finishes exactly when every one of its slots holds an accepted chunk.
    for chunk in POOL:
        key = (chunk.sensor_id, chunk.event_id)
        filled = all((chunk.sensor_id, chunk.event_id, i) in model.by_slot
                     for i in range(chunk.chunk_count))
        assert (key in model.finished) == filled
    # Content that contradicts an accepted chunk under its sequence is refused.
    accepted: dict[int, bytes] = {}
    for chunk, outcome in zip(deliveries, outcomes):
        if outcome in ("stored", "completed", "rejected"):
            assert chunk.sequence not in accepted
            accepted[chunk.sequence] = chunk.chunk_sha256
        elif chunk.sequence in accepted and accepted[chunk.sequence] != chunk.chunk_sha256:
            assert outcome == "conflict"
    # The poisoned event is rejected once both of its chunks came.
    poison = {c.sequence for c in FORGED[2:]}
    if poison <= {c.sequence for c in deliveries}:
        assert [o for c, o in zip(deliveries, outcomes)
                if c.event_id == "f" * 32].count("rejected") == 1
        assert model.finished[(SENSOR, "f" * 32)] == Finished(b"\6" * 32, completed=False)
