"""SQLiteChunkStore on real SQLite files: dedupe, integrity, exactly-once events, offsets."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.chunking import MAX_SLICE, MIN_SLICE, split_event
from pipeline.common.errors import (
    ChunkHashMismatch,
    ConflictError,
    DecompressionError,
    DecompressionLimitExceeded,
    FieldValueError,
    PayloadTooLarge,
    SequenceConflict,
    StorageFull,
    StoreError,
)
from pipeline.common.config import StoreConfig
from pipeline.common.messages import Chunk
from pipeline.server.store import ChunkStore, SQLiteChunkStore, open_store

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


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.sqlite3"


@pytest.fixture
def store(db: Path):
    s = SQLiteChunkStore(db)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------
# Basics


def test_open_store_gives_a_chunk_store_in_wal_full(db: Path) -> None:
    s = open_store(StoreConfig(path=str(db)))
    try:
        assert isinstance(s, ChunkStore)
        s.ingest(make_chunks(b"x", 1))
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()


def test_single_chunk_event_completes_and_is_readable(store: SQLiteChunkStore) -> None:
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


def test_duplicate_creates_no_row_and_is_reported(store: SQLiteChunkStore, db: Path) -> None:
    [chunk] = make_chunks(b"hello", 1)
    store.ingest([chunk])
    before = all_counts(db)
    [out] = store.ingest([chunk])
    assert (out.stored, out.duplicate, out.event_complete) == (False, True, True)
    assert out.completed_event is None
    assert out.error is None
    assert all_counts(db) == before
    assert store.chunk_count() == 1


def test_identical_chunks_in_one_batch_first_stored_second_duplicate(
        store: SQLiteChunkStore) -> None:
    chunks = make_chunks(event_bytes(2), 1)
    first, second, third = store.ingest([chunks[0], chunks[0], chunks[1]])
    assert first.stored and not first.duplicate
    assert second.duplicate and not second.stored
    assert third.stored and third.completed_event is not None
    assert store.chunk_count() == 2


def test_hash_mismatch_is_refused_and_writes_nothing(store: SQLiteChunkStore, db: Path) -> None:
    [chunk] = make_chunks(b"payload", 1)
    bad = replace(chunk, chunk_sha256=hashlib.sha256(b"other").digest())
    before = all_counts(db)
    [out] = store.ingest([bad])
    assert isinstance(out.error, ChunkHashMismatch)
    assert (out.stored, out.duplicate, out.event_complete) == (False, False, False)
    assert all_counts(db) == before
    assert store.committed_offset(SENSOR, "") == 0


def test_gzip_bomb_with_correct_hash_is_refused(store: SQLiteChunkStore, db: Path) -> None:
    [chunk] = make_chunks(b"x", 1)
    bomb = gzip.compress(b"\0" * (20 * MAX_SLICE), mtime=0)
    assert len(bomb) < MAX_SLICE // 10
    bad = replace(chunk, payload=bomb, chunk_sha256=hashlib.sha256(bomb).digest())
    before = all_counts(db)
    [out] = store.ingest([bad])
    assert isinstance(out.error, DecompressionLimitExceeded)
    assert all_counts(db) == before


def test_corrupt_gzip_is_refused(store: SQLiteChunkStore) -> None:
    [chunk] = make_chunks(b"x", 1)
    junk = b"not gzip at all"
    [out] = store.ingest([replace(chunk, payload=junk, chunk_sha256=hashlib.sha256(junk).digest())])
    assert isinstance(out.error, DecompressionError)
    assert store.chunk_count() == 0


def test_sequence_zero_and_absurd_chunk_count_are_refused(store: SQLiteChunkStore) -> None:
    [chunk] = make_chunks(b"x", 1)
    zero, huge = store.ingest([replace(chunk, sequence=0),
                               replace(chunk, chunk_count=60_000, chunk_index=0)])
    assert isinstance(zero.error, FieldValueError) and zero.error.field == "sequence"
    assert isinstance(huge.error, PayloadTooLarge) and huge.error.field == "chunk_count"
    assert store.chunk_count() == 0


def test_same_sequence_different_content_is_a_sequence_conflict(
        store: SQLiteChunkStore) -> None:
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
        store: SQLiteChunkStore) -> None:
    [a] = make_chunks(b"same", 1)
    store.ingest([a])
    [out] = store.ingest([replace(a, sequence=2)])
    assert out.duplicate and not out.stored
    assert out.last_committed_sequence == 2  # the sensor will delete 2: it must not be a gap
    assert store.chunk_count() == 1
    assert store.event_count() == 1


def test_same_event_chunk_with_other_hash_under_another_sequence_conflicts(
        store: SQLiteChunkStore) -> None:
    chunks = make_chunks(event_bytes(2, seed=1), 1)
    other = make_chunks(event_bytes(2, seed=2), 1, event_id=chunks[0].event_id)
    store.ingest([chunks[0]])
    [out] = store.ingest([replace(other[0], sequence=5)])
    assert isinstance(out.error, ConflictError)
    assert out.error.field == "chunk_index"
    assert store.committed_offset(SENSOR, "") == 1
    assert store.missing_sequences(SENSOR, "") == []


def test_bad_chunk_among_good_ones_does_not_fail_the_batch(store: SQLiteChunkStore) -> None:
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


def test_multi_chunk_event_completes_exactly_once_out_of_order_with_duplicates(
        store: SQLiteChunkStore, db: Path) -> None:
    data = event_bytes(4, seed=3)
    chunks = make_chunks(data, 10)
    assert len(chunks) == 4
    order = [chunks[3], chunks[1], chunks[3], chunks[0]]
    outs = store.ingest(order)
    assert [o.completed_event for o in outs] == [None] * 4
    assert [o.event_complete for o in outs] == [False] * 4
    assert rows(db, "partial_events") == 1
    [last] = store.ingest([chunks[2]])
    assert last.completed_event is not None and last.event_complete
    assert last.completed_event.data == data
    assert (last.completed_event.first_sequence, last.completed_event.last_sequence) == (10, 13)
    again = store.ingest([chunks[2], chunks[0]])
    assert all(o.duplicate and o.event_complete and o.completed_event is None for o in again)
    assert store.event_count() == 1
    assert rows(db, "partial_events") == 0
    assert store.get_event(SENSOR, chunks[0].event_id).data == data
    # Payloads of a completed event are dropped, dedupe keys kept.
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM chunks WHERE payload IS NOT NULL"
                            ).fetchone()[0] == 0
    assert store.chunk_count() == 4


def test_last_chunk_twice_in_one_batch_completes_once(store: SQLiteChunkStore) -> None:
    chunks = make_chunks(event_bytes(3, seed=4), 1)
    outs = store.ingest([chunks[0], chunks[1], chunks[2], chunks[2]])
    completed = [o for o in outs if o.completed_event is not None]
    assert len(completed) == 1 and completed[0] is outs[2]
    assert outs[3].duplicate and outs[3].event_complete
    assert store.event_count() == 1


def test_event_metadata_comes_from_chunk_zero(store: SQLiteChunkStore) -> None:
    chunks = make_chunks(event_bytes(2, seed=5), 1, logical_ts=111)
    late_zero = replace(chunks[0], logical_timestamp_ms=222, attributes={"window_id": "w-9"})
    store.ingest([chunks[1]])
    [out] = store.ingest([late_zero])
    assert out.completed_event is not None
    assert out.completed_event.logical_timestamp_ms == 222
    assert out.completed_event.attributes == {"window_id": "w-9"}


def test_event_hash_mismatch_rejects_event_but_keeps_chunks(
        store: SQLiteChunkStore, caplog: pytest.LogCaptureFixture) -> None:
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


def test_inconsistent_chunk_count_within_an_event_conflicts(store: SQLiteChunkStore) -> None:
    chunks = make_chunks(event_bytes(3, seed=6), 1)
    store.ingest([chunks[0]])
    liar = replace(chunks[1], chunk_count=2)
    [out] = store.ingest([liar])
    assert isinstance(out.error, ConflictError) and out.error.field == "chunk_count"
    assert store.chunk_count() == 1


def test_events_paging_and_latest_events(store: SQLiteChunkStore) -> None:
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
# Offsets and epochs


def test_lost_chunk_below_stored_one_is_reported_missing(store: SQLiteChunkStore) -> None:
    chunks = [make_chunks(f"e{i}".encode(), i)[0] for i in range(1, 7)]
    outs = store.ingest([c for c in chunks if c.sequence != 4])
    assert outs[-1].last_committed_sequence == 3
    assert store.committed_offset(SENSOR, "") == 3
    assert store.missing_sequences(SENSOR, "") == [4]
    assert store.tracker(SENSOR, "").highest == 6
    [fill] = store.ingest([chunks[3]])
    assert fill.last_committed_sequence == 6
    assert store.missing_sequences(SENSOR, "") == []


def test_tracker_is_a_copy(store: SQLiteChunkStore) -> None:
    store.ingest(make_chunks(b"x", 2))
    copy = store.tracker(SENSOR, "")
    copy.add(1)
    assert store.committed_offset(SENSOR, "") == 0


def test_epochs_are_independent(store: SQLiteChunkStore) -> None:
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


# ---------------------------------------------------------------------------------------
# Restart


def test_restart_keeps_offsets_gaps_and_partial_events(db: Path) -> None:
    data = event_bytes(4, seed=7)
    chunks = make_chunks(data, 1)
    extra = make_chunks(b"later event", 6)
    s = SQLiteChunkStore(db)
    s.ingest([chunks[0], chunks[1], chunks[3]] + extra)  # sequence 3 and 5 lost
    assert s.committed_offset(SENSOR, "") == 2
    s.close()

    s = SQLiteChunkStore(db)
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
    s = SQLiteChunkStore(db)
    try:
        assert s.committed_offset(SENSOR, "") == 6
        assert s.event_count() == 3
        assert s.get_event(SENSOR, chunks[0].event_id).data == data
    finally:
        s.close()


def test_committed_sequences_above_watermark_recovered_from_chunk_rows(db: Path) -> None:
    """The offsets row may hold only the watermark: chunk rows above it still count."""
    s = SQLiteChunkStore(db)
    s.ingest([make_chunks(b"a", 1)[0], make_chunks(b"c", 3)[0]])
    s.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE offsets SET ranges = '[]'")
    s = SQLiteChunkStore(db)
    try:
        assert s.missing_sequences(SENSOR, "") == [2]
        assert s.tracker(SENSOR, "").contains(3)
    finally:
        s.close()


ACKER = textwrap.dedent("""
    import random, sys
    from pipeline.common.chunking import split_event
    from pipeline.common.messages import Chunk
    from pipeline.server.store import SQLiteChunkStore
    store = SQLiteChunkStore(sys.argv[1])
    rng = random.Random(1)
    seq = 0
    while True:
        batch = []
        for _ in range(5):
            seq += 1
            split = split_event(rng.randbytes(200))
            p = split.pieces[0]
            batch.append(Chunk(sensor_id="pi-01", event_id=split.event_id, sequence=seq,
                               chunk_index=0, chunk_count=1, payload=p.payload,
                               chunk_sha256=p.chunk_sha256, event_sha256=split.event_sha256,
                               created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=seq))
        outs = store.ingest(batch)
        assert all(o.stored for o in outs)
        print(outs[-1].last_committed_sequence, flush=True)
""")


def test_acked_sequences_survive_sigkill(db: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", ACKER, str(db)], stdout=subprocess.PIPE,
                            text=True)
    acked = 0
    try:
        assert proc.stdout is not None
        for _ in range(40):
            line = proc.stdout.readline()
            assert line, "writer process died"
            acked = int(line)
    finally:
        proc.kill()  # SIGKILL, mid-batch or not
        proc.wait()
    assert acked >= 200
    s = SQLiteChunkStore(db)
    try:
        assert s.committed_offset(SENSOR, "") >= acked
        assert s.missing_sequences(SENSOR, "") == []
        assert s.event_count() == s.committed_offset(SENSOR, "")
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# Storage failure


def test_storage_full_rolls_back_everything_and_store_stays_usable(db: Path) -> None:
    s = SQLiteChunkStore(db)
    s.ingest(make_chunks(b"baseline", 1))
    s.close()
    with sqlite3.connect(db) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    s = SQLiteChunkStore(db, max_pages=pages + 4)
    try:
        before = all_counts(db)
        small = make_chunks(b"small", 2)
        big = make_chunks(event_bytes(4, seed=8), 3)
        with pytest.raises(StorageFull) as info:
            s.ingest(small + big)
        assert info.value.http_status == 507
        assert all_counts(db) == before
        assert s.committed_offset(SENSOR, "") == 1
        assert s.missing_sequences(SENSOR, "") == []
        # Still usable: something that fits goes in.
        [ok] = s.ingest(small)
        assert ok.stored and ok.last_committed_sequence == 2
    finally:
        s.close()
    s = SQLiteChunkStore(db)
    try:
        assert s.committed_offset(SENSOR, "") == 2
        assert s.event_count() == 2
    finally:
        s.close()


def test_check_writable_and_closed_store(db: Path) -> None:
    s = SQLiteChunkStore(db)
    s.check_writable()
    s.close()
    with pytest.raises(StoreError):
        s.check_writable()
    with pytest.raises(StoreError):
        s.ingest(make_chunks(b"x", 1))


def test_check_writable_fails_when_the_directory_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "store.sqlite3"
    path.parent.mkdir()
    s = SQLiteChunkStore(path)
    try:
        for name in os.listdir(path.parent):
            os.unlink(path.parent / name)
        path.parent.rmdir()
        with pytest.raises(StoreError):
            s.check_writable()
    finally:
        s.close()


def test_bad_synchronous_mode_is_a_config_error(db: Path) -> None:
    from pipeline.common.errors import ConfigError
    with pytest.raises(ConfigError):
        SQLiteChunkStore(db, synchronous="SOMETIMES")


# ---------------------------------------------------------------------------------------
# Control state


def test_windows_and_sensor_state_round_trip_across_reopen(db: Path) -> None:
    s = SQLiteChunkStore(db)
    s.save_window(SENSOR, "w-1", {"since": 0, "sequences": [1, 2, 3]})
    s.save_window(SENSOR, "w-2", {"since": 3, "sequences": []})
    s.save_window(SENSOR, "w-1", {"since": 0, "sequences": [1]})
    s.save_window("pi-02", "w-1", {"since": 9})
    s.save_sensor_state(SENSOR, {"epoch": EPOCH_A, "capabilities": ["chunks"]})
    s.delete_windows(SENSOR, ["w-2", "missing"])
    s.close()
    s = SQLiteChunkStore(db)
    try:
        assert s.load_windows(SENSOR) == {"w-1": {"since": 0, "sequences": [1]}}
        assert s.load_windows("pi-02") == {"w-1": {"since": 9}}
        assert s.load_windows("nobody") == {}
        assert s.load_sensor_states() == {SENSOR: {"epoch": EPOCH_A, "capabilities": ["chunks"]}}
    finally:
        s.close()


# ---------------------------------------------------------------------------------------
# Retention


def test_prune_in_batches_keeps_recent_data_and_offsets(db: Path) -> None:
    now = [1000.0]
    s = SQLiteChunkStore(db, clock=lambda: now[0])
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
# Concurrency and a randomized delivery check


def test_ingest_from_several_threads(store: SQLiteChunkStore) -> None:
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


EVENT_SIZES = (1, 3, 1, 2)  # chunks per event; sequences 1..7
EVENTS = [event_bytes(n, seed=100 + i) if n > 1 else f"single {i}".encode()
          for i, n in enumerate(EVENT_SIZES)]


def _all_chunks() -> list[Chunk]:
    out: list[Chunk] = []
    for i, data in enumerate(EVENTS):
        out += make_chunks(data, len(out) + 1, event_id=f"{i:032x}")
    return out


ALL_CHUNKS = _all_chunks()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, len(ALL_CHUNKS) - 1), min_size=1, max_size=25),
       st.integers(1, 6), st.booleans())
def test_any_delivery_order_completes_each_event_exactly_once(
        picks: list[int], batch_size: int, reopen: bool) -> None:
    deliveries = [ALL_CHUNKS[i] for i in picks]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sqlite3"
        s = SQLiteChunkStore(path, synchronous="NORMAL")
        completed: list[str] = []
        try:
            for i in range(0, len(deliveries), batch_size):
                for out in s.ingest(deliveries[i:i + batch_size]):
                    assert out.error is None
                    if out.completed_event is not None:
                        completed.append(out.event_id)
                if reopen:
                    s.close()
                    s = SQLiteChunkStore(path, synchronous="NORMAL")
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


# -- completed events are kept as their gzip slices (schema version 2) ------------------


def test_completed_events_are_stored_as_their_compressed_slices(db: Path) -> None:
    text = b'{"download_mbps": 93.5, "samples": [' + b"1.5, " * 40_000 + b"2.0]}"
    chunks = make_chunks(text, 1)
    assert len(chunks) > 1
    with SQLiteChunkStore(db) as store:
        outcomes = store.ingest(chunks)
        assert outcomes[-1].completed_event is not None
        assert outcomes[-1].completed_event.data == text
    with sqlite3.connect(db) as conn:
        (blob, encoding), = conn.execute("SELECT data, encoding FROM events").fetchall()
    assert encoding == "gzip"
    assert bytes(blob) == b"".join(c.payload for c in chunks)
    assert len(blob) < len(text) // 4
    with SQLiteChunkStore(db) as store:  # read back after a restart, whole and verified
        (event,) = store.events(SENSOR)
        assert event.data == text
        assert store.get_event(SENSOR, event.event_id).data == text
        assert store.latest_events()[0].data == text


def test_a_version_1_store_is_migrated_and_its_plain_events_still_read(db: Path) -> None:
    old = b'{"dns_ms": 12}'
    with SQLiteChunkStore(db) as store:
        store.ingest(make_chunks(old, 1))
    # Make the file what schema version 1 wrote: no encoding column, plain bytes.
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE events DROP COLUMN encoding")
        conn.execute("UPDATE events SET data = ?", (old,))
        conn.execute("PRAGMA user_version=1")
    new = b'{"dns_ms": 13}'
    with SQLiteChunkStore(db) as store:
        store.ingest(make_chunks(new, 2))
        assert [e.data for e in store.events(SENSOR)] == [old, new]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert [r[0] for r in conn.execute("SELECT encoding FROM events ORDER BY row_id")] \
            == ["identity", "gzip"]


def test_a_damaged_stored_event_is_reported_not_served(db: Path) -> None:
    with SQLiteChunkStore(db) as store:
        store.ingest(make_chunks(b'{"ping_ms": 4.2}', 1))
        other = make_chunks(b'{"ping_ms": 4.3}', 2)
        store.ingest(other)
    with sqlite3.connect(db) as conn:
        good = conn.execute("SELECT data FROM events WHERE event_id = ?",
                            (other[0].event_id,)).fetchone()[0]
        conn.execute("UPDATE events SET data = ? WHERE event_id != ?",
                     (bytes(good), other[0].event_id))  # valid gzip, wrong event
    with SQLiteChunkStore(db) as store:
        with pytest.raises(StoreError, match="damaged"):
            store.events(SENSOR)
        assert store.get_event(SENSOR, other[0].event_id).data == b'{"ping_ms": 4.3}'
    for junk in (b"not gzip at all", bytes(good)[:-6]):  # corrupt, truncated
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE events SET data = ? WHERE event_id != ?",
                         (junk, other[0].event_id))
        with SQLiteChunkStore(db) as store, pytest.raises(StoreError, match="damaged"):
            store.events(SENSOR)


def test_a_store_from_a_newer_version_is_refused(db: Path) -> None:
    with SQLiteChunkStore(db):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="newer"):
        SQLiteChunkStore(db)
