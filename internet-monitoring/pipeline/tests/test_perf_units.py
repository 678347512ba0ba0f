"""Unit tests of the performance work: batch planning, Accept negotiation, window sizes
for batch sensors, the split store transaction, one-transaction writes, and index use.
Real SQLite files throughout; no sockets."""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.chunking import split_event
from pipeline.common.errors import ConflictError
from pipeline.common.messages import Chunk, Heartbeat
from pipeline.sensor.batching import RecentlyDeleted, split_batches
from pipeline.sensor.queue import DurableQueue, EventInput
from pipeline.common import chunking
from pipeline.server.store import sqlite as store_sqlite
from pipeline.server.store import sqlite_base, sqlite_schema
from pipeline.server.ingest.wire import answer_in_proto
from pipeline.server.control.session import SensorSession, WindowPolicy
from pipeline.server.store import SQLiteChunkStore


def one_chunk_events(n: int, first: int = 1, sensor: str = "pi-01") -> list[Chunk]:
    out = []
    for i in range(n):
        split = split_event(json.dumps({"i": first + i}).encode())
        piece = split.pieces[0]
        out.append(Chunk(sensor_id=sensor, event_id=split.event_id, sequence=first + i,
                         chunk_index=0, chunk_count=1, payload=piece.payload,
                         chunk_sha256=piece.chunk_sha256, event_sha256=split.event_sha256,
                         created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=first + i,
                         attributes={"window_id": "w"}))
    return out


# -- batch planning ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=300), st.integers(1, 40),
       st.integers(1, 20_000))
def test_split_batches_keeps_order_and_limits(sizes: list[int], max_chunks: int,
                                              max_bytes: int) -> None:
    sequences = list(range(1, len(sizes) + 1))
    by_seq = dict(zip(sequences, sizes))
    batches = split_batches(sequences, by_seq, max_chunks=max_chunks, max_bytes=max_bytes)
    assert [s for batch in batches for s in batch] == sequences
    for batch in batches:
        assert 1 <= len(batch) <= max_chunks
        total = sum(by_seq[s] for s in batch)
        assert total <= max_bytes or len(batch) == 1  # an oversized chunk travels alone
    # Greedy: no batch could have taken the next chunk.
    for left, right in itertools.pairwise(batches):
        assert len(left) == max_chunks or \
            sum(by_seq[s] for s in left) + by_seq[right[0]] > max_bytes


def test_recently_deleted_is_bounded() -> None:
    seen = RecentlyDeleted(capacity=3)
    seen.add([1, 2, 3, 2])
    seen.add([4])
    assert 1 not in seen and all(s in seen for s in (2, 3, 4)) and len(seen) == 3


# -- Accept negotiation -----------------------------------------------------------------


class FakeRequest:
    def __init__(self, accept: str | None) -> None:
        self.headers = {} if accept is None else {"Accept": accept}


@pytest.mark.parametrize("accept, request_proto, expected", [
    (None, False, False), (None, True, True), ("*/*", True, True),
    ("application/json", True, False), ("application/x-protobuf", False, True),
    ("application/x-protobuf;q=0", True, False), ("application/json;q=0", False, True),
    ("application/json;q=0.5, application/x-protobuf", False, True),
    ("application/json, application/x-protobuf;q=0.2", True, False),
    ("application/json, application/x-protobuf", True, True),
])
def test_answer_encoding_follows_accept(accept: str | None, request_proto: bool,
                                        expected: bool) -> None:
    assert answer_in_proto(FakeRequest(accept), request_proto, True) is expected  # type: ignore[arg-type]
    assert answer_in_proto(FakeRequest(accept), request_proto, False) is False  # type: ignore[arg-type]


# -- windows for batch sensors ----------------------------------------------------------


def test_batch_sensors_get_larger_and_more_windows() -> None:
    """Batch sensors: 8x the chunks per window and 2x the windows, with the in-flight
    allowance covering all of them (two windows finishing together left the store idle
    while the next pair was persisted and sent)."""
    policy = WindowPolicy(max_chunks=64, max_in_flight=128, batch_window_factor=8,
                          windows_per_sensor=2, batch_windows_factor=2)
    for batched, chunks, in_flight, windows in ((False, 64, 128, 2), (True, 512, 2048, 4)):
        session = SensorSession("pi-01", policy=policy, batched=batched)
        session.on_connect(0.0)
        session.on_heartbeat(Heartbeat("t", 0, 50_000, 0.0), 0.0)
        requests = []
        while (request := session.issue_window(0.0)) is not None:
            requests.append(request)
        assert len(requests) == windows and not session.wants_window()
        assert {(r.max_chunks, r.max_in_flight, r.max_bytes) for r in requests} == \
            {(chunks, in_flight, policy.max_bytes)}


# -- store: split transaction, one-transaction writes, index use ------------------------


@pytest.fixture
def store(tmp_path: Path):
    with SQLiteChunkStore(tmp_path / "server.db") as s:
        yield s


def test_prepared_ingest_is_invisible_until_committed_and_abort_leaves_nothing(
        store: SQLiteChunkStore, tmp_path: Path) -> None:
    chunks = one_chunk_events(3)
    prepared = store.begin_ingest(chunks)
    assert prepared is not None
    assert store.begin_ingest(chunks, blocking=False) is None  # the lock is held
    with sqlite3.connect(tmp_path / "server.db") as other:
        assert other.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0
    store.abort_ingest(prepared)
    assert store.chunk_count() == 0 and store.committed_offset("pi-01", "") == 0
    prepared = store.begin_ingest(chunks)
    assert prepared is not None
    outcomes = store.commit_ingest(prepared)
    assert [o.stored for o in outcomes] == [True] * 3
    assert store.committed_offset("pi-01", "") == 3 and store.event_count() == 3


def test_begin_without_blocking_gives_way_to_another_writer(store: SQLiteChunkStore,
                                                            tmp_path: Path) -> None:
    blocker = sqlite3.connect(tmp_path / "server.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        assert store.begin_ingest(one_chunk_events(1), blocking=False) is None
        blocker.execute("ROLLBACK")
        prepared = store.begin_ingest(one_chunk_events(1), blocking=False)
        assert prepared is not None
        store.commit_ingest(prepared)
    finally:
        blocker.close()
    assert store.chunk_count() == 1


def test_one_chunk_events_keep_no_payload_and_a_bad_event_hash_is_rejected(
        store: SQLiteChunkStore, tmp_path: Path) -> None:
    good, bad = one_chunk_events(2)
    bad = replace(bad, event_sha256=bytes(32))
    outcomes = store.ingest([good, bad])
    assert outcomes[0].completed_event is not None
    assert outcomes[0].completed_event.data == json.dumps({"i": 1}).encode()
    assert outcomes[1].stored and not outcomes[1].event_complete
    assert [r.code for r in store.rejected_events()] == ["event_hash_mismatch"]
    with sqlite3.connect(tmp_path / "server.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks WHERE payload IS NOT NULL"
                            ).fetchone()[0] == 0
    # A one-chunk event larger than the event limit is rejected, its chunk kept (acked).
    with SQLiteChunkStore(tmp_path / "small.db", max_event_bytes=4) as small:
        (out,) = small.ingest(one_chunk_events(1, first=7))
        assert out.stored and not out.event_complete
        assert [r.code for r in small.rejected_events()] == ["decompressed_too_large"]


def test_ingest_statements_search_indexes_never_scan(store: SQLiteChunkStore) -> None:
    store.ingest(one_chunk_events(50))
    conn = store._conn  # the plan of the exact statements the ingest runs
    plans = [conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
             for sql, params in ((sqlite_schema.CHUNK_KEYS_SQL, ("pi-01", "", 1, "pi-01", "e", 0)),
                                 (sqlite_schema.EVENT_STATE_SQL, ("pi-01", "e") * 3))]
    details = [row[3] for plan in plans for row in plan]
    assert not any(d.startswith("SCAN") for d in details), details
    assert sum(d.startswith("SEARCH") for d in details) == 5


def test_control_state_of_many_sensors_is_one_transaction(store: SQLiteChunkStore,
                                                          tmp_path: Path) -> None:
    store.save_window("s-0", "old", {"x": 1})
    commits: list[str] = []
    store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    store.save_control_state([(f"s-{i}", ["old"] if i == 0 else [], {f"w-{i}": {"n": i}},
                               {"epoch": "", "watermark": i}) for i in range(50)])
    store._conn.set_trace_callback(None)
    assert commits == ["COMMIT"]
    assert store.load_windows("s-0") == {"w-0": {"n": 0}}
    assert store.load_sensor_states()["s-49"] == {"epoch": "", "watermark": 49}


def test_enqueue_many_is_one_transaction_and_all_or_nothing(tmp_path: Path) -> None:
    with DurableQueue(tmp_path / "q.db", max_bytes=None) as queue:
        queued = queue.enqueue_many([EventInput(b"a" * 10), EventInput(b"b" * 200_000,
                                                                       event_id="f" * 32)])
        assert [len(e.sequences) for e in queued] == [1, 2]
        assert queue.queue_depth() == 3
        with pytest.raises(ConflictError):
            queue.enqueue_many([EventInput(b"c"), EventInput(b"d", event_id="f" * 32)])
        assert queue.queue_depth() == 3  # the first event of the failed call is not kept


def test_wal_is_checkpointed_in_the_background_and_kept_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import time

    monkeypatch.setattr(sqlite_base, "WAL_RESTART_FRAMES", 64)
    wal = tmp_path / "server.db-wal"
    with SQLiteChunkStore(tmp_path / "server.db") as store:
        sizes = []
        for round_no in range(12):
            store.ingest(one_chunk_events(40, first=1 + round_no * 40))
            deadline = time.monotonic() + 5
            while store.checkpoints <= round_no // 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            sizes.append(os.path.getsize(wal))
        assert store.checkpoints > 0  # frames were copied by the background thread
        assert store.event_count() == 480
    # Without resets the WAL would only grow; with them it restarts from the beginning.
    assert min(sizes[4:]) < max(sizes)


EVENT_300K = random.Random(7).randbytes(300 * 1024)  # three distinct slices


def multi_chunk_event(first: int = 1) -> list[Chunk]:
    split = split_event(EVENT_300K)
    return [Chunk(sensor_id="pi-01", event_id=split.event_id, sequence=first + p.index,
                  chunk_index=p.index, chunk_count=p.count, payload=p.payload,
                  chunk_sha256=p.chunk_sha256, event_sha256=split.event_sha256,
                  created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=1,
                  attributes={"window_id": "w"}) for p in split.pieces]


def test_completing_an_event_reuses_the_slices_decompressed_on_arrival(
        store: SQLiteChunkStore, tmp_path: Path) -> None:
    chunks = multi_chunk_event()
    assert len(chunks) == 3
    store.ingest([chunks[0]])
    store.ingest([chunks[1]])
    assert len(store._slices) == 2
    # Spoil the stored payloads behind the store's back: reassembly must not need them.
    with sqlite3.connect(tmp_path / "server.db") as conn:
        conn.execute("UPDATE chunks SET payload = ? WHERE payload IS NOT NULL", (b"junk",))
    (out,) = store.ingest([chunks[2]])
    assert out.completed_event is not None
    assert out.completed_event.data == EVENT_300K
    assert len(store._slices) == 0


def count_decompressions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every payload the store decompresses (the real function runs)."""
    calls: list[int] = []
    real = chunking.decompress_slice

    def counting(payload: bytes, **kwargs):
        calls.append(len(payload))
        return real(payload, **kwargs)

    monkeypatch.setattr(chunking, "decompress_slice", counting)
    return calls


def test_an_event_whose_chunks_share_one_batch_decompresses_each_slice_once(
        store: SQLiteChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slices an event's earlier chunks decompressed in the same transaction complete
    it (before, they were cached only after COMMIT and decompressed a second time)."""
    calls = count_decompressions(monkeypatch)
    chunks = multi_chunk_event()
    outcomes = store.ingest(chunks)
    assert outcomes[-1].completed_event is not None
    assert outcomes[-1].completed_event.data == EVENT_300K
    assert len(calls) == 3  # one per slice, at arrival
    assert len(store._slices) == 0  # nothing of a completed event stays cached
    # A batch that is rolled back publishes none of its slices.
    second = multi_chunk_event(first=10)
    prepared = store.begin_ingest(second[:2])
    assert prepared is not None
    store.abort_ingest(prepared)
    assert len(store._slices) == 0
    store.ingest(second[:2])
    assert len(store._slices) == 2  # committed, event incomplete: kept for its completion


def test_events_with_identical_slices_each_complete_from_the_cache(
        store: SQLiteChunkStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two incomplete events carrying the same slice content share one cache entry; the
    first to complete must not take it from the second (in one batch and across batches)."""
    calls = count_decompressions(monkeypatch)
    a = multi_chunk_event(first=1)
    b = [replace(c, event_id="e" * 32, sequence=10 + c.chunk_index) for c in a]
    c = [replace(x, event_id="f" * 32, sequence=20 + x.chunk_index) for x in a]
    store.ingest(a[:2] + b[:2])          # same slices, one batch
    store.ingest(c[:2])                  # and in a later batch
    calls.clear()
    outcomes = store.ingest([a[2], b[2], c[2]])
    assert [o.completed_event.data for o in outcomes] == [EVENT_300K] * 3
    assert len(calls) == 3  # only the three completing slices, at arrival
    assert len(store._slices) == 0


def test_without_cached_slices_events_still_complete_from_the_stored_payloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_sqlite, "SLICE_CACHE_BYTES", 1)  # nothing fits
    with SQLiteChunkStore(tmp_path / "server.db") as store:
        chunks = multi_chunk_event()
        store.ingest(chunks[:2])
        (out,) = store.ingest(chunks[2:])
        assert out.completed_event is not None
        assert out.completed_event.data == EVENT_300K
    with SQLiteChunkStore(tmp_path / "small.db", max_event_bytes=200_000) as small:
        chunks = multi_chunk_event()
        small.ingest(chunks[:2])
        (out,) = small.ingest(chunks[2:])
        assert out.stored and not out.event_complete
        assert [r.code for r in small.rejected_events()] == ["decompressed_too_large"]
