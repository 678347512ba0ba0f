"""The PostgreSQL store beyond the shared contract (tests/test_store_contract.py): schema
versions, day partitions dropped whole by retention, exactly-once between two processes
ingesting the same chunks, a database that is unreachable or goes away, and the reader.

Every test runs on the PostgreSQL at 127.0.0.1:5432 in a fresh schema of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Callable

import psycopg
import pytest

from pipeline.common.config import StoreConfig, load_server_config
from pipeline.common.errors import ConfigError, StoreError
from pipeline.server.read.event_pages import EventQuery
from pipeline.server.read.readers import open_reader
from pipeline.server.store import ChunkStore, open_store
from pipeline.server.store.pg_schema import (
    DAY_S,
    MIGRATIONS,
    SCHEMA_VERSION,
    VERSION_TABLE,
    partition_days,
)
from pipeline.sim.processes import free_port
from pipeline.tests.pg_support import CuttableProxy, require_postgres
from pipeline.tests.store_support import SENSOR, make_chunks

T0 = 1_796_000_000_000
TESTS = ("speed", "dns", "ping")

pytestmark = pytest.mark.postgres


def pg_store(dsn: str, clock: Callable[[], float] = time.time) -> ChunkStore:
    return open_store(StoreConfig(engine="postgres", dsn=dsn), clock=clock)


def catalog(dsn: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql).fetchall()


# ---------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(("store", "key"), [
    ({"engine": "postgres", "dsn": ""}, "store.dsn"),
    ({"engine": "postgres", "dsn": "dbname=x", "pool_max_size": 0}, "store.pool_max_size"),
    ({"engine": "postgres", "dsn": "dbname=x", "pool_min_size": 5, "pool_max_size": 4},
     "store.pool_min_size"),
])
def test_bad_postgres_settings_name_their_key(store: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_server_config_from({"store": store})
    assert info.value.field == key


def load_server_config_from(doc: dict[str, object]) -> object:
    import tempfile

    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(doc, f)
        f.flush()
        return load_server_config(f.name, env={})


# ---------------------------------------------------------------------------------------
# Schema versions


def test_schema_is_created_once_and_versioned(pg_dsn: str) -> None:
    pg_store(pg_dsn).close()
    pg_store(pg_dsn).close()  # reopening applies nothing again
    assert catalog(pg_dsn, "SELECT version FROM schema_version ORDER BY version") == [
        (version,) for version in range(1, SCHEMA_VERSION + 1)]


def test_a_version_1_database_gains_the_forward_cursors(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:  # what a server of schema version 1 left
        conn.execute(VERSION_TABLE)
        for statement in MIGRATIONS[1]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    store = pg_store(pg_dsn)
    try:
        store.save_forward_cursor("remote_write", "pi-01", 7)
        assert store.forward_cursors("remote_write") == {"pi-01": 7}
    finally:
        store.close()
    assert catalog(pg_dsn, "SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    pg_store(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this server"):
        pg_store(pg_dsn)


# ---------------------------------------------------------------------------------------
# Partitions and retention


def test_retention_drops_old_day_partitions_whole(pg_dsn: str) -> None:
    now = [10 * DAY_S + 100.0]
    store = pg_store(pg_dsn, clock=lambda: now[0])
    try:
        store.ingest([make_chunks(f"old {i}".encode(), i)[0] for i in range(1, 6)])
        now[0] = 20 * DAY_S + 100.0
        store.ingest([make_chunks(f"new {i}".encode(), i)[0] for i in range(6, 9)])
        with psycopg.connect(pg_dsn) as conn:
            assert 10 in partition_days(conn, "events") and 20 in partition_days(conn, "chunks")
        removed = store.prune(15 * DAY_S)
        assert removed == 5
        with psycopg.connect(pg_dsn) as conn:
            assert [d for d in partition_days(conn, "events") if d < 15] == []
            assert [d for d in partition_days(conn, "chunks") if d < 15] == []
        assert store.event_count() == 3 and store.chunk_count() == 3
        assert store.committed_offset(SENSOR, "") == 8
        [dup] = store.ingest([make_chunks(b"old 1", 1)[0]])  # its key went with the day
        assert dup.duplicate and store.event_count() == 3
    finally:
        store.close()


def test_ingest_statements_use_indexes(pg_dsn: str) -> None:
    """Every probe the ingest path runs is an index scan on each partition."""
    store = pg_store(pg_dsn)
    store.ingest([make_chunks(f"e {i}".encode(), i)[0] for i in range(1, 50)])
    store.close()
    probes = [
        "SELECT 1 FROM chunks WHERE sensor_id = 'pi-01' AND epoch = '' AND sequence = 3",
        "SELECT 1 FROM chunks WHERE sensor_id = 'pi-01' AND event_id = 'x' AND chunk_index = 0",
        "SELECT 1 FROM events WHERE sensor_id = 'pi-01' AND event_id = 'x'",
        "SELECT 1 FROM partial_events WHERE sensor_id = 'pi-01' AND event_id = 'x'",
        "SELECT 1 FROM offsets WHERE sensor_id = 'pi-01'",
    ]
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        for sql in probes:
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql))
            assert "Seq Scan" not in plan, plan
            assert "Index" in plan, plan


# ---------------------------------------------------------------------------------------
# Two processes, one database

CHILD = textwrap.dedent("""
    import json, sys
    from pipeline.common.config import StoreConfig
    from pipeline.server.store import open_store
    from pipeline.tests.store_support import event_bytes, make_chunks
    dsn = sys.argv[1]
    chunks = []
    for i in range(40):
        chunks += make_chunks(event_bytes(1 + i % 3, seed=i), len(chunks) + 1,
                              event_id=f"{i:032x}")
    store = open_store(StoreConfig(engine="postgres", dsn=dsn))
    done = 0
    for start in range(0, len(chunks), 7):
        for out in store.ingest(chunks[start:start + 7]):
            assert out.error is None, out.error
            done += out.completed_event is not None
    store.close()
    print(json.dumps({"completed": done}))
""")


def test_two_processes_ingesting_the_same_chunks_store_each_once(pg_dsn: str) -> None:
    pg_store(pg_dsn).close()  # schema first, so both children race on ingest only
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, pg_dsn], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1])["completed"])
    assert sum(results) == 40  # every event completed by exactly one of the two
    store = pg_store(pg_dsn)
    try:
        assert store.event_count() == 40
        assert store.committed_offset(SENSOR, "") == store.chunk_count()
        assert catalog(pg_dsn, "SELECT event_id FROM events GROUP BY event_id"
                               " HAVING count(*) > 1") == []
    finally:
        store.close()


# ---------------------------------------------------------------------------------------
# The database unreachable, or going away


def test_unreachable_database_names_store_dsn() -> None:
    require_postgres()
    dsn = f"host=127.0.0.1 port={free_port()} dbname=test user=postgres connect_timeout=2"
    with pytest.raises(StoreError, match=r"store\.dsn: cannot connect") as info:
        pg_store(dsn)
    assert "password" not in info.value.message


def test_lost_connection_fails_the_batch_and_nothing_is_lost(pg_dsn: str) -> None:
    schema = pg_dsn.split("search_path=")[1].rstrip("'")
    proxy = CuttableProxy()
    store = pg_store(proxy.dsn_for(schema))
    try:
        first = [make_chunks(f"a {i}".encode(), i)[0] for i in range(1, 4)]
        second = [make_chunks(f"b {i}".encode(), i)[0] for i in range(4, 7)]
        store.ingest(first)
        proxy.cut()
        with pytest.raises(StoreError):
            store.ingest(second)
        proxy.restore()
        outs = store.ingest(second + first)  # the sender retries; old ones are duplicates
        assert [o.stored for o in outs] == [True] * 3 + [False] * 3
        assert all(o.duplicate for o in outs[3:])
        assert store.event_count() == 6 and store.committed_offset(SENSOR, "") == 6
        store.check_writable()
    finally:
        store.close()
        proxy.close()


# ---------------------------------------------------------------------------------------
# The read side


def _fill(store: ChunkStore, count: int) -> None:
    chunks = []
    for n in range(count):
        data = json.dumps({"test": TESTS[n % 3], "n": n}).encode()
        chunks += make_chunks(data, n + 1, logical_ts=T0 + n * 1000)
    store.ingest(chunks)


def test_reader_pages_by_time_and_samples(pg_dsn: str) -> None:
    config = StoreConfig(engine="postgres", dsn=pg_dsn)
    store = open_store(config)
    try:
        _fill(store, 600)
        reader = open_reader(config)
        try:
            q = EventQuery(SENSOR, since_ms=T0 + 10_000, until_ms=T0 + 20_000, limit=4)
            assert [json.loads(e.data)["n"] for e in reader.events(q)] == [10, 11, 12, 13]
            down = reader.events(EventQuery(SENSOR, since_ms=q.since_ms, until_ms=q.until_ms,
                                            order="desc", limit=4))
            assert [json.loads(e.data)["n"] for e in down] == [19, 18, 17, 16]
            capped, cut = reader.events_capped(q, 1)
            assert len(capped) == 1 and cut
            assert reader.count_in_range(SENSOR, T0, T0 + 600_000) == 600
            assert reader.has_events(SENSOR) and not reader.has_events("pi-02")
            sample = reader.in_range(SENSOR, T0, T0 + 600_000, 10_000, fraction=0.2)
            assert 80 <= len(sample) <= 160
            assert all(Counter(json.loads(r.data)["test"] for r in sample)[t] > 15
                       for t in TESTS)
            last = reader.last_row_id()
            rows, more = reader.results_between(0, last, 1000)
            assert len(rows) == 600 and more is None
            assert reader.first_row_completed_since(0.0) == rows[0].row_id - 1
        finally:
            reader.close()
    finally:
        store.close()


def test_dsn_is_shown_without_its_password_and_lock_keys_are_stable() -> None:
    from pipeline.server.store.pg_base import lock_key
    from pipeline.server.store.pg_store import redacted

    shown = redacted("host=db.example port=5433 dbname=pipe user=srv password=s3cret")
    assert shown == "host=db.example port=5433 dbname=pipe user=srv"
    assert "s3cret" not in redacted("postgresql://srv:s3cret@db.example/pipe")
    assert lock_key("public", "pi-01") == lock_key("public", "pi-01")
    assert lock_key("public", "pi-01") != lock_key("other", "pi-01")
    assert -2**63 <= lock_key("public", "pi-01") < 2**63
