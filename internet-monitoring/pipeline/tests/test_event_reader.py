"""EventReader on a real SQLite store: pages by time in both orders, and the evenly
spread sample a long chart range is read as."""

from __future__ import annotations

import json
from collections import Counter

from pipeline.server.read.event_pages import EventQuery
from pipeline.server.read.event_reader import EventReader
from pipeline.server.store import SQLiteChunkStore
from pipeline.tests.test_store import make_chunks

T0 = 1_796_000_000_000
TESTS = ("speed", "dns", "ping")


def fill(store: SQLiteChunkStore, count: int) -> None:
    chunks = []
    for n in range(count):
        data = json.dumps({"test": TESTS[n % 3], "n": n}).encode()
        chunks += make_chunks(data, n + 1, logical_ts=T0 + n * 1000)
    store.ingest(chunks)


def test_pages_by_time_both_ways(tmp_path):
    with SQLiteChunkStore(tmp_path / "s.db") as store:
        fill(store, 30)
        reader = EventReader(store.path)
        try:
            q = EventQuery("pi-01", since_ms=T0 + 10_000, until_ms=T0 + 20_000, limit=4)
            up = [json.loads(e.data)["n"] for e in reader.events(q)]
            down = reader.events(EventQuery("pi-01", since_ms=q.since_ms, until_ms=q.until_ms,
                                            order="desc", limit=4))
            more = reader.events(EventQuery("pi-01", since_ms=q.since_ms, until_ms=q.until_ms,
                                            order="desc", limit=4, before=down[-1].row_id))
            assert up == [10, 11, 12, 13]
            assert [json.loads(e.data)["n"] for e in down + more] == [19, 18, 17, 16, 15, 14,
                                                                      13, 12]
            assert reader.count_in_range("pi-01", T0, T0 + 30_000) == 30
            assert reader.has_events("pi-01") and not reader.has_events("pi-02")
        finally:
            reader.close()


def test_a_sample_is_spread_over_the_range_and_the_test_types(tmp_path):
    with SQLiteChunkStore(tmp_path / "s.db") as store:
        fill(store, 3000)
        reader = EventReader(store.path)
        try:
            every = reader.in_range("pi-01", T0, T0 + 3_000_000, 10_000)
            sample = reader.in_range("pi-01", T0, T0 + 3_000_000, 10_000, fraction=0.1)
        finally:
            reader.close()
    assert len(every) == 3000
    assert 240 <= len(sample) <= 360  # about a tenth
    kinds = Counter(json.loads(e.data)["test"] for e in sample)
    assert all(70 <= kinds[t] <= 130 for t in TESTS), kinds  # each about a third
    halves = Counter(json.loads(e.data)["n"] < 1500 for e in sample)
    assert abs(halves[True] - halves[False]) < 60, halves  # spread over the whole range
