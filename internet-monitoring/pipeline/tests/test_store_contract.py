"""The store contract: what every backend of the store port must do, tested through the
port alone (``open_store(config)`` and ``ChunkStore``'s methods, no SQL).

The ``backend`` fixture runs every test once per engine in ``ENGINES`` (SQLite in a
temporary directory, PostgreSQL in a fresh schema of the test database, dropped after).
Tests that look at SQLite rows, files or pragmas live in ``test_store.py``.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.config import StoreConfig
from pipeline.common.errors import (
    ChunkHashMismatch,
    ConflictError,
    DecompressionError,
    FieldValueError,
    PayloadTooLarge,
    SequenceConflict,
    StoreError,
)
from pipeline.common.messages import Chunk
from pipeline.server.store import ENGINES, ChunkStore, open_store
from pipeline.tests.pg_support import drop_schema, dsn_for, fresh_dsn
from pipeline.tests.store_support import EPOCH_A, EPOCH_B, SENSOR, event_bytes, make_chunks


@dataclass(frozen=True)
class Backend:
    """One engine with a place of its own: ``open`` may be called again to reopen it.
    ``where`` is a directory (SQLite) or the name of a fresh PostgreSQL schema."""

    engine: str
    where: Path

    def open(self, *, synchronous: str = "FULL",
             clock: Callable[[], float] = time.time) -> ChunkStore:
        config = StoreConfig(engine=self.engine,  # type: ignore[arg-type]
                             path=str(self.where / "store.sqlite3"),
                             dsn=dsn_for(str(self.where)) if self.engine == "postgres" else "",
                             synchronous=synchronous,  # type: ignore[arg-type]
                             reserve_bytes=0)
        return open_store(config, clock=clock)


@contextmanager
def place(engine: str) -> Iterator[Path]:
    """A fresh place for ``engine``: a temporary directory, or a PostgreSQL schema."""
    if engine == "postgres":
        _dsn, schema = fresh_dsn("contract")
        try:
            yield Path(schema)
        finally:
            drop_schema(schema)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


ENGINE_PARAMS = [pytest.param(e, marks=pytest.mark.postgres) if e == "postgres" else e
                 for e in ENGINES]


@pytest.fixture(params=ENGINE_PARAMS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with place(request.param) as where:
        yield Backend(request.param, where)


@pytest.fixture
def store(backend: Backend) -> Iterator[ChunkStore]:
    s = backend.open()
    yield s
    s.close()


def test_open_store_gives_a_chunk_store(store: ChunkStore) -> None:
    assert isinstance(store, ChunkStore)


# ---------------------------------------------------------------------------------------
# Chunks: verified, deduplicated


def test_single_chunk_event_completes_and_is_readable(store: ChunkStore) -> None:
    data = b'{"rtt_ms": 12.5}'
    [chunk] = make_chunks(data, 1)
    [out] = store.ingest([chunk])
    assert (out.stored, out.duplicate, out.event_complete, out.error) == (True, False, True, None)
    assert out.last_committed_sequence == 1
    assert out.window_id == "w-1"
    assert out.completed_event is not None
    assert out.completed_event.data == data
    assert store.get_event(SENSOR, chunk.event_id) == out.completed_event
    assert store.event_count() == 1
    assert store.event_count(SENSOR) == 1
    assert store.event_count("other") == 0


def test_identical_chunks_in_one_batch_first_stored_second_duplicate(
        store: ChunkStore) -> None:
    chunks = make_chunks(event_bytes(2), 1)
    first, second, third = store.ingest([chunks[0], chunks[0], chunks[1]])
    assert first.stored and not first.duplicate
    assert second.duplicate and not second.stored
    assert third.stored and third.completed_event is not None
    assert store.chunk_count() == 2


def test_corrupt_gzip_is_refused(store: ChunkStore) -> None:
    [chunk] = make_chunks(b"x", 1)
    junk = b"not gzip at all"
    [out] = store.ingest([replace(chunk, payload=junk, chunk_sha256=hashlib.sha256(junk).digest())])
    assert isinstance(out.error, DecompressionError)
    assert store.chunk_count() == 0


def test_sequence_zero_and_absurd_chunk_count_are_refused(store: ChunkStore) -> None:
    [chunk] = make_chunks(b"x", 1)
    zero, huge = store.ingest([replace(chunk, sequence=0),
                               replace(chunk, chunk_count=60_000, chunk_index=0)])
    assert isinstance(zero.error, FieldValueError) and zero.error.field == "sequence"
    assert isinstance(huge.error, PayloadTooLarge) and huge.error.field == "chunk_count"
    assert store.chunk_count() == 0


def test_same_sequence_different_content_is_a_sequence_conflict(
        store: ChunkStore) -> None:
    [a] = make_chunks(b"first", 7)
    [b] = make_chunks(b"second", 7)
    store.ingest([a])
    [out] = store.ingest([b])
    assert isinstance(out.error, SequenceConflict)
    assert out.error.http_status == 409
    assert out.error.field == "sequence"
    assert not out.stored and not out.duplicate
    assert store.chunk_count() == 1
    assert store.get_event(SENSOR, b.event_id) is None


def test_same_chunk_under_another_sequence_is_duplicate_and_committed(
        store: ChunkStore) -> None:
    [a] = make_chunks(b"same", 1)
    store.ingest([a])
    [out] = store.ingest([replace(a, sequence=2)])
    assert out.duplicate and not out.stored
    assert out.last_committed_sequence == 2  # the sensor will delete 2: it must not be a gap
    assert store.chunk_count() == 1
    assert store.event_count() == 1


def test_same_event_chunk_with_other_hash_under_another_sequence_conflicts(
        store: ChunkStore) -> None:
    chunks = make_chunks(event_bytes(2, seed=1), 1)
    other = make_chunks(event_bytes(2, seed=2), 1, event_id=chunks[0].event_id)
    store.ingest([chunks[0]])
    [out] = store.ingest([replace(other[0], sequence=5)])
    assert isinstance(out.error, ConflictError)
    assert out.error.field == "chunk_index"
    assert store.committed_offset(SENSOR, "") == 1
    assert store.missing_sequences(SENSOR, "") == []


def test_bad_chunk_among_good_ones_does_not_fail_the_batch(store: ChunkStore) -> None:
    good = [make_chunks(f"event {i}".encode(), i)[0] for i in range(1, 6)]
    bad = replace(good[2], chunk_sha256=bytes(32))
    outs = store.ingest([good[0], good[1], bad, good[3], good[4]])
    assert [o.stored for o in outs] == [True, True, False, True, True]
    assert isinstance(outs[2].error, ChunkHashMismatch)
    assert store.chunk_count() == 4
    assert store.committed_offset(SENSOR, "") == 2
    assert store.missing_sequences(SENSOR, "") == [3]
    assert all(o.last_committed_sequence == 2 for o in outs)
    [retry] = store.ingest([good[2]])
    assert retry.stored and retry.last_committed_sequence == 5


# ---------------------------------------------------------------------------------------
# Events: exactly once


def test_last_chunk_twice_in_one_batch_completes_once(store: ChunkStore) -> None:
    chunks = make_chunks(event_bytes(3, seed=4), 1)
    outs = store.ingest([chunks[0], chunks[1], chunks[2], chunks[2]])
    completed = [o for o in outs if o.completed_event is not None]
    assert len(completed) == 1 and completed[0] is outs[2]
    assert outs[3].duplicate and outs[3].event_complete
    assert store.event_count() == 1


def test_event_metadata_comes_from_chunk_zero(store: ChunkStore) -> None:
    chunks = make_chunks(event_bytes(2, seed=5), 1, logical_ts=111)
    late_zero = replace(chunks[0], logical_timestamp_ms=222, attributes={"window_id": "w-9"})
    store.ingest([chunks[1]])
    [out] = store.ingest([late_zero])
    assert out.completed_event is not None
    assert out.completed_event.logical_timestamp_ms == 222
    assert out.completed_event.attributes == {"window_id": "w-9"}


def test_event_hash_mismatch_rejects_event_but_keeps_chunks(
        store: ChunkStore, caplog: pytest.LogCaptureFixture) -> None:
    chunks = [replace(c, event_sha256=bytes(32)) for c in make_chunks(event_bytes(2), 1)]
    outs = store.ingest(chunks)
    assert all(o.stored and o.error is None for o in outs)
    assert all(o.completed_event is None and not o.event_complete for o in outs)
    assert store.event_count() == 0
    assert store.committed_offset(SENSOR, "") == 2
    [rejected] = store.rejected_events(SENSOR)
    assert rejected.event_id == chunks[0].event_id
    assert rejected.code == "event_hash_mismatch"
    assert "event_rejected" in caplog.text
    [dup] = store.ingest([chunks[1]])
    assert dup.duplicate and not dup.event_complete
    assert len(store.rejected_events()) == 1


def test_inconsistent_chunk_count_within_an_event_conflicts(store: ChunkStore) -> None:
    chunks = make_chunks(event_bytes(3, seed=6), 1)
    store.ingest([chunks[0]])
    liar = replace(chunks[1], chunk_count=2)
    [out] = store.ingest([liar])
    assert isinstance(out.error, ConflictError) and out.error.field == "chunk_count"
    assert store.chunk_count() == 1


def test_events_paging_and_latest_events(store: ChunkStore) -> None:
    seq = 1
    for i, ts in enumerate([300, 100, 200]):
        store.ingest(make_chunks(f"a{i}".encode(), seq, logical_ts=ts))
        seq += 1
    store.ingest(make_chunks(b"b0", 1, sensor="pi-02", logical_ts=50))
    page1 = store.events(SENSOR, limit=2)
    assert [e.data for e in page1] == [b"a0", b"a1"]
    page2 = store.events(SENSOR, after=page1[-1].row_id, limit=2)
    assert [e.data for e in page2] == [b"a2"]
    assert store.events(SENSOR, after=page2[-1].row_id) == []
    latest = {e.sensor_id: e.data for e in store.latest_events()}
    assert latest == {SENSOR: b"a0", "pi-02": b"b0"}


# ---------------------------------------------------------------------------------------
# Offsets, epochs, restart


def test_lost_chunk_below_stored_one_is_reported_missing(store: ChunkStore) -> None:
    chunks = [make_chunks(f"e{i}".encode(), i)[0] for i in range(1, 7)]
    outs = store.ingest([c for c in chunks if c.sequence != 4])
    assert outs[-1].last_committed_sequence == 3
    assert store.committed_offset(SENSOR, "") == 3
    assert store.missing_sequences(SENSOR, "") == [4]
    assert store.tracker(SENSOR, "").highest == 6
    [fill] = store.ingest([chunks[3]])
    assert fill.last_committed_sequence == 6
    assert store.missing_sequences(SENSOR, "") == []


def test_tracker_is_a_copy(store: ChunkStore) -> None:
    store.ingest(make_chunks(b"x", 2))
    copy = store.tracker(SENSOR, "")
    copy.add(1)
    assert store.committed_offset(SENSOR, "") == 0


def test_epochs_are_independent(store: ChunkStore) -> None:
    [old] = make_chunks(b"before re-image", 1, epoch=EPOCH_A)
    [new] = make_chunks(b"after re-image", 1, epoch=EPOCH_B)
    [legacy] = make_chunks(b"1.0 sensor", 1)
    outs = store.ingest([old, new, legacy])
    assert all(o.stored and not o.duplicate for o in outs)
    assert store.epochs(SENSOR) == ["", EPOCH_A, EPOCH_B]
    assert store.event_count(SENSOR) == 3
    store.ingest(make_chunks(b"more", 3, epoch=EPOCH_B))
    assert store.committed_offset(SENSOR, EPOCH_A) == 1
    assert store.committed_offset(SENSOR, EPOCH_B) == 1
    assert store.missing_sequences(SENSOR, EPOCH_B) == [2]
    assert store.missing_sequences(SENSOR, EPOCH_A) == []


def test_restart_keeps_offsets_gaps_and_partial_events(backend: Backend) -> None:
    data = event_bytes(4, seed=7)
    chunks = make_chunks(data, 1)
    extra = make_chunks(b"later event", 6)
    s = backend.open()
    s.ingest([chunks[0], chunks[1], chunks[3], *extra])  # sequence 3 and 5 lost
    assert s.committed_offset(SENSOR, "") == 2
    s.close()

    s = backend.open()
    try:
        assert s.committed_offset(SENSOR, "") == 2
        assert s.missing_sequences(SENSOR, "") == [3, 5]
        assert s.tracker(SENSOR, "").highest == 6
        [dup] = s.ingest([chunks[3]])
        assert dup.duplicate
        [done] = s.ingest([chunks[2]])
        assert done.completed_event is not None and done.completed_event.data == data
        assert done.last_committed_sequence == 4
        [x] = s.ingest(make_chunks(b"filler", 5))
        assert x.last_committed_sequence == 6
    finally:
        s.close()
    s = backend.open()
    try:
        assert s.committed_offset(SENSOR, "") == 6
        assert s.event_count() == 3
        assert s.get_event(SENSOR, chunks[0].event_id).data == data
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# Health, control state, retention, concurrency


def test_check_writable_and_closed_store(backend: Backend) -> None:
    s = backend.open()
    s.check_writable()
    s.close()
    with pytest.raises(StoreError):
        s.check_writable()
    with pytest.raises(StoreError):
        s.ingest(make_chunks(b"x", 1))


def test_windows_and_sensor_state_round_trip_across_reopen(backend: Backend) -> None:
    s = backend.open()
    s.save_window(SENSOR, "w-1", {"since": 0, "sequences": [1, 2, 3]})
    s.save_window(SENSOR, "w-2", {"since": 3, "sequences": []})
    s.save_window(SENSOR, "w-1", {"since": 0, "sequences": [1]})
    s.save_window("pi-02", "w-1", {"since": 9})
    s.save_sensor_state(SENSOR, {"epoch": EPOCH_A, "capabilities": ["chunks"]})
    s.delete_windows(SENSOR, ["w-2", "missing"])
    s.close()
    s = backend.open()
    try:
        assert s.load_windows(SENSOR) == {"w-1": {"since": 0, "sequences": [1]}}
        assert s.load_windows("pi-02") == {"w-1": {"since": 9}}
        assert s.load_windows("nobody") == {}
        assert s.load_sensor_states() == {SENSOR: {"epoch": EPOCH_A, "capabilities": ["chunks"]}}
    finally:
        s.close()


def test_prune_in_batches_keeps_recent_data_and_offsets(backend: Backend) -> None:
    now = [1000.0]
    s = backend.open(clock=lambda: now[0])
    try:
        old = [make_chunks(f"old {i}".encode(), i)[0] for i in range(1, 8)]
        s.ingest(old)
        stale_partial = make_chunks(event_bytes(2, seed=9), 8)
        s.ingest([stale_partial[0]])
        now[0] = 5000.0
        fresh = [make_chunks(f"new {i}".encode(), i)[0] for i in range(10, 13)]
        s.ingest(fresh)
        assert s.event_count() == 10

        removed = s.prune(3000.0, batch=2)
        assert removed == 7 + 1  # seven old events and one expired partial event
        assert s.event_count() == 3
        assert [e.data for e in s.events(SENSOR)] == [b"new 10", b"new 11", b"new 12"]
        assert s.chunk_count() == 3
        [expired] = s.rejected_events(SENSOR)
        assert expired.code == "expired"
        assert s.committed_offset(SENSOR, "") == 8
        assert s.missing_sequences(SENSOR, "") == [9]
        # A late retransmission of a pruned chunk is still a duplicate, not a new event.
        [dup] = s.ingest([old[0]])
        assert dup.duplicate and s.event_count() == 3
        # The missing half of the expired event is stored but cannot complete it.
        [late] = s.ingest([stale_partial[1]])
        assert late.stored and not late.event_complete and late.completed_event is None
        assert late.last_committed_sequence == 12
        assert s.prune(3000.0, batch=2) == 0
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# Forwarding cursors (server/forward/): durable, per sink and sensor, never moving back


def test_forward_cursors_round_trip_and_only_move_forward(backend: Backend) -> None:
    s = backend.open()
    try:
        assert s.forward_cursors("cloud") == {}
        for i in range(1, 4):
            s.ingest(make_chunks(f"a{i}".encode(), i))
        s.ingest(make_chunks(b"b1", 1, sensor="pi-02"))
        assert s.event_sensors() == sorted([SENSOR, "pi-02"])
        rows = [e.row_id for e in s.events(SENSOR)]
        assert s.events_after_count(SENSOR, 0) == 3
        s.save_forward_cursor("cloud", SENSOR, rows[1])
        s.save_forward_cursor("cloud", SENSOR, rows[0])  # a late save does not move it back
        s.save_forward_cursor("other", SENSOR, rows[2])
        assert s.forward_cursors("cloud") == {SENSOR: rows[1]}
        assert s.events_after_count(SENSOR, rows[1]) == 1
        assert [e.data for e in s.events(SENSOR, after=rows[1])] == [b"a3"]
    finally:
        s.close()
    s = backend.open()
    try:
        assert s.forward_cursors("cloud") == {SENSOR: rows[1]}
        assert s.forward_cursors("other") == {SENSOR: rows[2]}
        assert s.forward_cursors("none") == {}
    finally:
        s.close()


def test_ingest_from_several_threads(store: ChunkStore) -> None:
    chunks = [make_chunks(f"t{i}".encode(), i)[0] for i in range(1, 81)]
    errors: list[BaseException] = []

    def worker(part: list[Chunk]) -> None:
        try:
            for i in range(0, len(part), 5):
                store.ingest(part[i:i + 5])
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(chunks[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.committed_offset(SENSOR, "") == 80
    assert store.event_count() == 80


# ---------------------------------------------------------------------------------------
# Any delivery order, across reopen


EVENT_SIZES = (1, 3, 1, 2)  # chunks per event; sequences 1..7
EVENTS = [event_bytes(n, seed=100 + i) if n > 1 else f"single {i}".encode()
          for i, n in enumerate(EVENT_SIZES)]


def _all_chunks() -> list[Chunk]:
    out: list[Chunk] = []
    for i, data in enumerate(EVENTS):
        out += make_chunks(data, len(out) + 1, event_id=f"{i:032x}")
    return out


ALL_CHUNKS = _all_chunks()


@pytest.mark.parametrize("engine", ENGINE_PARAMS)
@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, len(ALL_CHUNKS) - 1), min_size=1, max_size=25),
       st.integers(1, 6), st.booleans())
def test_any_delivery_order_completes_each_event_exactly_once(
        engine: str, picks: list[int], batch_size: int, reopen: bool) -> None:
    deliveries = [ALL_CHUNKS[i] for i in picks]
    with place(engine) as where:
        backend = Backend(engine, where)
        s = backend.open(synchronous="NORMAL")
        completed: list[str] = []
        try:
            for i in range(0, len(deliveries), batch_size):
                for out in s.ingest(deliveries[i:i + batch_size]):
                    assert out.error is None
                    if out.completed_event is not None:
                        completed.append(out.event_id)
                if reopen:
                    s.close()
                    s = backend.open(synchronous="NORMAL")
            delivered = {c.sequence for c in deliveries}
            expected_done = {c.event_id for c in ALL_CHUNKS
                             if all(d.sequence in delivered for d in ALL_CHUNKS
                                    if d.event_id == c.event_id)}
            assert sorted(completed) == sorted(expected_done)
            assert s.event_count() == len(expected_done)
            for event_id in expected_done:
                assert s.get_event(SENSOR, event_id).data == EVENTS[int(event_id, 16)]
            assert s.chunk_count() == len(delivered)
            w = 0
            while w + 1 in delivered:
                w += 1
            assert s.committed_offset(SENSOR, "") == w
            assert s.missing_sequences(SENSOR, "") == [
                q for q in range(1, max(delivered)) if q not in delivered]
        finally:
            s.close()
