"""SQLiteChunkStore on real SQLite files: what the rows, files and pragmas hold after
ingest, restart, SIGKILL, a full disk, migration and damage. What every backend must do
is in ``test_store_contract.py``; the decisions alone in ``test_store_ledger.py``."""

from __future__ import annotations

import gzip
import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.common.chunking import MAX_SLICE
from pipeline.common.config import StoreConfig
from pipeline.common.errors import (
    ChunkHashMismatch,
    DecompressionLimitExceeded,
    StorageFull,
    StoreError,
)
from pipeline.server.store import ChunkStore, SQLiteChunkStore, open_store
from pipeline.tests.store_support import (
    SENSOR,
    all_counts,
    event_bytes,
    make_chunks,
    rows,
)


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












# ---------------------------------------------------------------------------------------
# Offsets and epochs








# ---------------------------------------------------------------------------------------
# Restart




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




# ---------------------------------------------------------------------------------------
# Engines


def test_open_store_refuses_an_engine_this_build_lacks(tmp_path: Path) -> None:
    from pipeline.common.errors import ConfigError
    # Every engine the configuration accepts is built in (postgres too: test_pg_store.py);
    # a value that slipped past validation is still refused naming the key.
    config = StoreConfig(engine="oracle",  # type: ignore[arg-type]
                         path=str(tmp_path / "s.db"))
    with pytest.raises(ConfigError) as info:
        open_store(config)
    assert info.value.field == "store.engine" and "store.engine" in str(info.value)


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
