"""DashboardFeed on a real SQLite store: it follows new results exactly while they are
few, and reads a weighted sample when more arrive than it may decode, so the KPIs stay
right while its cost stays flat."""

from __future__ import annotations

import json

from pipeline.common.config import DashboardConfig
from pipeline.server.read.dashboard_feed import DashboardFeed
from pipeline.server.read.event_reader import EventReader
from pipeline.server.store import ChunkStore
from pipeline.tests.store_support import open_test_store
from pipeline.tests.test_store import make_chunks

NOW = 1_800_000_000.0


def fill(store: ChunkStore, count: int, first: int = 1, fail_every: int = 10) -> None:
    chunks = []
    for n in range(count):
        doc = {"test": ("ping", "dns")[n % 2], "rtt_ms": 10.0,
               "success": n % fail_every != 0}
        chunks += make_chunks(json.dumps(doc).encode(), first + n,
                              logical_ts=int((NOW - 60) * 1000))
    for i in range(0, len(chunks), 2000):
        store.ingest(chunks[i:i + 2000])


def test_few_results_are_read_exactly_many_are_sampled_and_weighted(tmp_path):
    clock = [NOW]
    with open_test_store(tmp_path / "s.db", clock=lambda: clock[0]) as store:
        reader = EventReader(store.path)
        try:
            feed = DashboardFeed(reader, DashboardConfig(reporting_window_s=600),
                                 clock=lambda: clock[0])
            fill(store, 100)
            assert feed.refresh() == 100 and feed.sampled == 1.0
            latest = {r.test: r.payload["success"] for r in feed.latest("pi-01")}
            assert latest == {"ping": True, "dns": True}   # 99 and 98: not multiples of 10
            clock[0] += 1.0  # one second later 10,000 more arrived: a sample of 2,000
            fill(store, 10_000, first=101)
            read = feed.refresh()
            assert read < 2600 and 0.15 < feed.sampled < 0.25
            doc = feed.payload([], now=clock[0])
        finally:
            reader.close()
    kpis = doc["kpis"]
    assert 9_000 / 10 < kpis["ingestRate"] < 11_200 / 10   # ~10,100 results in 10 minutes
    assert 87.0 < kpis["globalAvailability"] < 93.0         # one in ten failed
    assert kpis["medianLatency"] == 10.0


def test_the_first_refresh_reads_only_the_two_windows(tmp_path):
    clock = [NOW - 7200]
    with open_test_store(tmp_path / "s.db", clock=lambda: clock[0]) as store:
        fill(store, 50)            # stored two hours ago
        clock[0] = NOW
        fill(store, 30, first=51)  # stored now
        reader = EventReader(store.path)
        try:
            feed = DashboardFeed(reader, DashboardConfig(reporting_window_s=600),
                                 clock=lambda: clock[0])
            assert feed.refresh() == 30
        finally:
            reader.close()
