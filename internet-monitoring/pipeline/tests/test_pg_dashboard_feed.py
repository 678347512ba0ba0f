"""The dashboard feed on a real PostgreSQL shared by two store instances (two replicas):
rows whose ingest transactions commit out of row-id order are each taken exactly once.

Store A begins an ingest (its rows take the lower row ids, its transaction stays open),
store B ingests and commits rows with higher ids, the feed refreshes, A commits, the feed
refreshes again: every event must be in the feed's samples once, none twice."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import psycopg
import pytest

from pipeline.common.config import DashboardConfig, StoreConfig
from pipeline.server.read.dashboard_feed import DashboardFeed
from pipeline.server.read.readers import Reader, open_reader
from pipeline.server.store import ChunkStore, open_store
from pipeline.server.store.pg_schema import MIGRATIONS, VERSION_TABLE
from pipeline.tests.store_support import make_chunks

pytestmark = pytest.mark.postgres

Key = tuple[str, float]


def batch(sensor: str, first: int, count: int) -> tuple[list, list[Key]]:
    """``count`` one-chunk results of ``sensor``, each with its own logical timestamp (the
    sample's ``at``), and the (sensor, at) keys the feed must show once each."""
    base = int(time.time() * 1000) - 60_000
    chunks, keys = [], []
    for n in range(first, first + count):
        doc = {"test": "ping", "rtt_ms": 10.0 + n, "success": True}
        chunks += make_chunks(json.dumps(doc).encode(), n, sensor=sensor,
                              logical_ts=base + n)
        keys.append((sensor, (base + n) / 1000.0))
    return chunks, keys


def taken(feed: DashboardFeed) -> Counter[Key]:
    return Counter((s.sensor_id, s.at) for s in feed.samples())


def row_ids(reader: Reader) -> dict[str, list[int]]:
    rows, _ = reader.results_between(0, reader.last_row_id(), 10_000)
    out: dict[str, list[int]] = {}
    for row in rows:
        out.setdefault(row.sensor_id, []).append(row.row_id)
    return out


def stores(dsn: str) -> tuple[ChunkStore, ChunkStore, Reader]:
    config = StoreConfig(engine="postgres", dsn=dsn)
    return open_store(config), open_store(config), open_reader(config)


@pytest.mark.parametrize("feed_started", ["before", "while_open"])
def test_rows_committed_out_of_row_id_order_are_taken_exactly_once(pg_dsn: str,
                                                                    feed_started: str):
    a, b, reader = stores(pg_dsn)
    try:
        feed = DashboardFeed(reader, DashboardConfig(reporting_window_s=600))
        early, expected = batch("pi-b", 1, 3)
        b.ingest(early)
        if feed_started == "before":
            assert feed.refresh() == 3
        late_chunks, late = batch("pi-a", 1, 5)
        held = a.begin_ingest(late_chunks)     # A's rows get row ids, A does not commit
        assert held is not None
        committed, keys_b = batch("pi-b", 4, 4)
        b.ingest(committed)                    # B's higher row ids commit first
        expected += keys_b
        assert feed.refresh() == (4 if feed_started == "before" else 7)
        assert taken(feed) == Counter(expected)
        a.commit_ingest(held)                  # now A's lower row ids become visible
        ids = row_ids(reader)
        assert max(ids["pi-a"]) < min(ids["pi-b"][3:]), "the commits were not out of order"
        assert feed.refresh() == 5
        assert feed.refresh() == 0
        assert taken(feed) == Counter(expected + late)
        assert feed.events_seen == 12
    finally:
        reader.close()
        a.close()
        b.close()


def test_a_version_2_database_gains_the_xid_and_its_older_rows_are_taken_once(pg_dsn: str):
    with psycopg.connect(pg_dsn) as conn:  # what a server of schema version 2 left
        conn.execute(VERSION_TABLE)
        for version in (1, 2):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    a, b, reader = stores(pg_dsn)
    try:
        old, expected = batch("pi-a", 1, 4)
        a.ingest(old)
        with psycopg.connect(pg_dsn) as conn:  # rows stored before migration 3 have no xid
            conn.execute("UPDATE events SET xid = NULL")
            indexes = {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'events'")}
        assert "events_by_xid" in indexes
        feed = DashboardFeed(reader, DashboardConfig(reporting_window_s=600))
        assert feed.refresh() == 4
        new, keys = batch("pi-b", 1, 2)
        b.ingest(new)
        assert feed.refresh() == 2 and feed.refresh() == 0
        assert taken(feed) == Counter(expected + keys)
    finally:
        reader.close()
        a.close()
        b.close()


def test_pages_and_samples_between_two_marks_cover_each_new_row_once(pg_dsn: str):
    a, b, reader = stores(pg_dsn)
    try:
        a.ingest(batch("pi-a", 1, 5)[0])
        since = reader.feed_mark()
        for k in range(6):  # six transactions on two stores, interleaved
            (a if k % 2 else b).ingest(batch(f"pi-{k % 2}", 1 + 50 * k, 50)[0])
        upto = reader.feed_mark()
        pages, after = [], None
        while True:
            rows, after = reader.feed_rows(since, upto, after, 7)
            pages += [r.row_id for r in rows]
            if after is None:
                break
        assert len(pages) == len(set(pages)) == 300 and min(pages) > since.row
        sample, more = reader.feed_rows(since, upto, None, 10_000, fraction=0.2)
        assert more is None and 30 <= len(sample) <= 90
        assert {r.row_id for r in sample} <= set(pages)
        assert reader.feed_rows(upto, upto, None, 10) == ([], None)
    finally:
        reader.close()
        a.close()
        b.close()


def test_two_stores_ingesting_at_once_while_the_feed_refreshes_lose_and_repeat_nothing(
        pg_dsn: str):
    a, b, reader = stores(pg_dsn)
    expected: list[Key] = []
    try:
        feed = DashboardFeed(reader, DashboardConfig(reporting_window_s=600))
        feed.refresh()
        work = {}
        for sensor in ("pi-a", "pi-b"):
            work[sensor] = [batch(sensor, 1 + 4 * k, 4) for k in range(25)]
            expected += [key for _, keys in work[sensor] for key in keys]

        def ingest(store: ChunkStore, sensor: str) -> None:
            for chunks, _ in work[sensor]:
                store.ingest(chunks)

        threads = [threading.Thread(target=ingest, args=(s, n)) for s, n in
                   ((a, "pi-a"), (b, "pi-b"))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            feed.refresh()
        for t in threads:
            t.join()
        feed.refresh()
        assert taken(feed) == Counter(expected) and feed.events_seen == 200
    finally:
        reader.close()
        a.close()
        b.close()
