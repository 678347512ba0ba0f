"""Server pieces below the sockets: SnapshotCache, GroupCommitter (real SQLite), metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from pipeline.common.chunking import split_event
from pipeline.common.errors import StoreError
from pipeline.common.messages import Chunk, Heartbeat
from pipeline.server.ingest.group_commit import CommitRecord, GroupCommitter
from pipeline.server.metrics import ServerMetrics
from pipeline.server.read.snapshot_cache import SnapshotCache
from pipeline.tests.store_support import open_test_store


@dataclass
class Ev:
    sensor_id: str
    event_id: str
    logical_timestamp_ms: int
    data: bytes


# ---------------------------------------------------------------------------------------
# SnapshotCache


def test_snapshot_json_has_exactly_the_protocol_fields():
    cache = SnapshotCache()
    snap = cache.update(Ev("pi-01", "a" * 32, 1000, b'{"download": 93.5}'), 1_800_000_000.0)
    doc = snap.to_json()
    assert set(doc) == {"sensor_id", "event_id", "logical_timestamp_ms", "updated_at",
                        "payload_base64", "payload_json"}
    assert doc["payload_json"] == {"download": 93.5}
    assert base64.b64decode(doc["payload_base64"]) == b'{"download": 93.5}'
    assert doc["updated_at"].startswith("2027-01-15T08:00:00")
    assert cache.update(Ev("pi-01", "b" * 32, 1, b"\x00binary"), 0).to_json()["payload_json"] == {}
    assert cache.update(Ev("pi-01", "c" * 32, 2, b"42"), 0).to_json()["payload_json"] == {}
    assert cache.update(Ev("pi-01", "d" * 32, 3, b"[1, 2]"), 0).to_json()["payload_json"] == [1, 2]


def test_latest_is_by_logical_timestamp_then_arrival():
    cache = SnapshotCache()
    cache.update(Ev("pi-01", "a" * 32, 2000, b"{}"), 0)
    cache.update(Ev("pi-01", "b" * 32, 1000, b"{}"), 0)   # older, arrives later: not latest
    assert cache.get("pi-01").event_id == "a" * 32
    cache.update(Ev("pi-01", "c" * 32, 2000, b"{}"), 0)   # tie: the later arrival wins
    assert cache.get("pi-01").event_id == "c" * 32
    cache.update(Ev("pi-02", "d" * 32, 5, b"{}"), 0)
    assert [s.sensor_id for s in cache.all()] == ["pi-01", "pi-02"]


def test_warm_keeps_the_latest_per_sensor():
    cache = SnapshotCache()
    kept = cache.warm([(Ev("pi-01", "a" * 32, 1, b"{}"), 10.0),
                       (Ev("pi-01", "b" * 32, 9, b"{}"), 11.0),
                       (Ev("pi-02", "c" * 32, 1, b"{}"), 12.0)])
    assert kept == 2
    assert cache.get("pi-01").event_id == "b" * 32
    assert cache.updated_at() == {"pi-01": 11.0, "pi-02": 12.0}


async def test_subscribers_get_every_completed_event_and_slow_ones_are_dropped():
    cache = SnapshotCache(max_pending=3)
    cache.update(Ev("pi-01", "0" * 32, 1, b"{}"), 0)
    fast, batch = cache.subscribe()
    slow, _ = cache.subscribe()
    assert [s.event_id for s in batch] == ["0" * 32]
    for i in range(1, 6):
        cache.update(Ev("pi-01", f"{i:032x}", 10 - i, b"{}"), 0)   # older ones too
        got = await fast.get()
        assert got is not None and got.event_id == f"{i:032x}"
    # The slow subscriber never read: it is cut off with a sentinel, memory stays bounded.
    assert slow.dropped and slow.queue.qsize() == 1
    assert await slow.get() is None
    assert cache.subscriber_count == 1
    cache.unsubscribe(fast)
    assert cache.subscriber_count == 0


# ---------------------------------------------------------------------------------------
# GroupCommitter on a real store


def chunks_of(n: int, sensor_id: str = "pi-01") -> list[Chunk]:
    out = []
    for seq in range(1, n + 1):
        split = split_event(json.dumps({"n": seq}).encode())
        piece = split.pieces[0]
        out.append(Chunk(sensor_id=sensor_id, event_id=split.event_id, sequence=seq,
                         chunk_index=0, chunk_count=1, payload=piece.payload,
                         chunk_sha256=piece.chunk_sha256, event_sha256=split.event_sha256,
                         created_at="2026-11-27T05:00:00Z", logical_timestamp_ms=seq,
                         attributes={"window_id": "w1"}))
    return out


@pytest.fixture
def store(tmp_path):
    s = open_test_store(tmp_path / "s.db")
    yield s
    s.close()


async def test_concurrent_submits_share_transactions_and_get_their_own_outcomes(store, tmp_path):
    seen_in_hook: list[list[CommitRecord]] = []

    def hook(records: list[CommitRecord]) -> None:
        # Runs after the commit: another connection already sees every row.
        with sqlite3.connect(tmp_path / "s.db") as other:
            seqs = {r[0] for r in other.execute("SELECT sequence FROM chunks")}
        assert {r.chunk.sequence for r in records} <= seqs
        seen_in_hook.append(records)

    committer = GroupCommitter(store, on_commit=hook)
    committer.start()
    chunks = chunks_of(30)
    results = await asyncio.gather(*(committer.submit([c]) for c in chunks))
    await committer.close()
    assert [r[0].sequence for r in results] == list(range(1, 31))
    assert all(r[0].stored and r[0].completed_event is not None for r in results)
    assert committer.batches < 30  # shared transactions
    assert sum(len(b) for b in seen_in_hook) == 30 and len(seen_in_hook) == committer.batches
    assert store.event_count("pi-01") == 30


async def test_close_finishes_queued_work_then_refuses(store):
    committer = GroupCommitter(store)
    committer.start()
    pending = [asyncio.ensure_future(committer.submit([c])) for c in chunks_of(5)]
    await asyncio.sleep(0)  # all five are queued
    await committer.close()
    assert store.chunk_count() == 5  # committed before close() returned
    assert all(r[0].stored for r in await asyncio.gather(*pending))
    with pytest.raises(StoreError):
        await committer.submit(chunks_of(1))
    assert store.chunk_count() == 5


async def test_a_store_failure_fails_the_batch_not_the_writer(store):
    committer = GroupCommitter(store)
    committer.start()
    store.close()
    with pytest.raises(StoreError):
        await committer.submit(chunks_of(1))
    await committer.close()


# ---------------------------------------------------------------------------------------
# Metrics


def test_metrics_use_the_injected_registry_and_runbook_names():
    registry = CollectorRegistry()
    m = ServerMetrics(registry)
    m.on_heartbeat("pi-01", Heartbeat("1.0", 0, 42, 12.5, retry_total=7))
    m.on_stored("pi-01", 100, duplicate=True, latency_ms=3.0)
    m.on_stored("pi-01", 100, duplicate=False, latency_ms=4.0)
    m.on_connection("pi-01", True)
    m.refresh(100.0, heartbeats={"pi-01": 90.0}, snapshots={"pi-01": 40.0}, windows_open=3)
    value = registry.get_sample_value
    sid = {"sensor_id": "pi-01"}
    assert value("sensor_queue_depth", sid) == 42
    assert value("sensor_chunk_retry_total", sid) == 7
    assert value("server_ingest_duplicate_total", sid) == 1
    assert value("server_ingest_latency_ms_count", sid) == 2
    assert value("server_snapshot_age_seconds", sid) == 60
    assert value("control_channel_connected", sid) == 1
    assert value("pipeline_chunks_ingested_total") == 1
    assert value("pipeline_bytes_ingested_total") == 100
    assert value("pipeline_heartbeat_age_seconds", sid) == 10
    assert value("pipeline_clock_skew_ms", sid) == 12.5
    assert value("pipeline_windows_open") == 3
    # Nothing leaked into the global registry.
    from prometheus_client import REGISTRY
    assert REGISTRY.get_sample_value("sensor_queue_depth", sid) is None
