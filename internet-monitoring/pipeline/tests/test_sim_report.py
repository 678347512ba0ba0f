"""The simulator's pure parts: the verification report, restart-aware counters, the
seeded workload, the profiles table in docs/simulator.md, and the test-only deferred commit."""

from __future__ import annotations

import base64
import hashlib
import random
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.common.errors import ConfigError
from pipeline.sim.broken_server import DeferredCommitConnection
from pipeline.sim.counters import RestartingCounters, parse_samples
from pipeline.sim.fleet import Endpoint, parse_endpoint, server_event_from_json
from pipeline.sim.main import profiles_table
from pipeline.sim.report import (
    GeneratedEvent,
    QueueLeftovers,
    RunFacts,
    ServerEvent,
    build_report,
    format_report,
    percentile,
)
from pipeline.sim.workload import SizeSpec, WorkloadSpec, make_event

SIMULATOR_DOC = Path(__file__).resolve().parents[3] / "docs" / "simulator.md"
FACTS = RunFacts(profile="clean", seed=1, sensors=2, events_per_sensor=2)


def gen(sensor: str, n: int, data: bytes, at: float = 100.0) -> GeneratedEvent:
    return GeneratedEvent(sensor, f"{n:032x}", hashlib.sha256(data).hexdigest(), len(data), at)


def stored(event: GeneratedEvent, *, data: bytes | None = None, declared: str | None = None,
           at: float = 101.0) -> ServerEvent:
    sha = hashlib.sha256(data).hexdigest() if data is not None else event.sha256
    return ServerEvent(event.sensor_id, event.event_id, sha, declared or event.sha256,
                       event.size, at)


# ---------------------------------------------------------------------------------------
# Report


def test_every_event_once_passes_with_goodput_and_latency() -> None:
    a, b = gen("s1", 1, b"a" * 1000, at=100.0), gen("s2", 2, b"b" * 3000, at=101.0)
    report = build_report([a, b], [stored(a, at=100.5), stored(b, at=102.0)],
                          [QueueLeftovers("s1"), QueueLeftovers("s2")], FACTS)
    assert report.ok and report.delivered_exactly_once == 2 and report.missing == 0
    assert report.delivered_bytes == 4000
    assert report.delivery_window_s == pytest.approx(2.0)  # first enqueue -> last commit
    assert report.goodput_mb_s == pytest.approx(4000 / 2.0 / 1e6)
    assert report.latency.p50_ms == pytest.approx(500.0)
    assert report.latency.max_ms == pytest.approx(1000.0)
    assert "verdict" in format_report(report) and "PASS" in format_report(report)


def test_missing_events_are_classified_by_where_they_are() -> None:
    events = [gen("s1", i, bytes([i]) * 10) for i in range(4)]
    leftovers = [QueueLeftovers("s1", queued_event_ids=frozenset({events[1].event_id}),
                                queued_chunks=1,
                                quarantined_event_ids=frozenset({events[2].event_id}),
                                quarantined_chunks=1)]
    report = build_report(events, [stored(events[0])], leftovers, FACTS)
    assert not report.ok
    assert (report.missing, report.missing_left_in_queue, report.missing_quarantined,
            report.lost) == (3, 1, 1, 1)
    assert report.samples["lost"] == (f"s1/{events[3].event_id}",)
    assert report.per_sensor["s1"]["lost"] == 1
    assert report.left_in_queues_chunks == 1 and report.quarantined_events == 1


def test_duplicates_corruption_and_strangers_fail_the_run() -> None:
    dup, bad, lie = (gen("s1", 1, b"x" * 10), gen("s1", 2, b"y" * 10), gen("s1", 3, b"z" * 10))
    stranger = ServerEvent("s1", "f" * 32, "00", "00", 1, 101.0)
    report = build_report(
        [dup, bad, lie],
        [stored(dup), stored(dup), stored(bad, data=b"Y" * 10),
         stored(lie, declared="ab" * 32), stranger],
        [QueueLeftovers("s1")], FACTS)
    assert (report.duplicated, report.duplicate_copies) == (1, 1)
    assert report.corrupted == 2  # bytes differ, or the stored hash differs
    assert report.unexpected == 1
    assert report.delivered_exactly_once == 0 and report.delivered == 1  # dup has good copies
    assert not report.ok and "FAIL" in format_report(report)
    doc = report.to_json()
    assert doc["ok"] is False and doc["duplicated"] == 1


def test_chunks_left_in_a_queue_fail_the_run_even_when_every_event_arrived() -> None:
    """A drain that never finishes (acks that never come) is a failure, not a pass."""
    event = gen("s1", 1, b"q" * 10)
    left = QueueLeftovers("s1", queued_event_ids=frozenset({event.event_id}), queued_chunks=1)
    report = build_report([event], [stored(event)], [left], FACTS)
    assert report.missing == 0 and report.delivered_exactly_once == 1
    assert not report.ok and report.left_in_queues_events == 1


def test_events_of_sensors_not_simulated_are_ignored() -> None:
    """On a shared server other sensors' events are not ours to judge."""
    mine = gen("s1", 1, b"m")
    other = ServerEvent("someone-else", "e" * 32, "00", "00", 1, 101.0)
    report = build_report([mine], [stored(mine), other], [QueueLeftovers("s1")], FACTS)
    assert report.ok and report.unexpected == 0


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=200),
       st.sampled_from([50, 95, 99, 100]))
@settings(max_examples=100, deadline=None)
def test_nearest_rank_percentile(values: list[float], pct: int) -> None:
    ordered = sorted(values)
    p = percentile(ordered, pct)
    assert p in ordered
    assert 100 * sum(v <= p for v in ordered) >= pct * len(ordered)  # >= pct % at or below
    assert 100 * sum(v < p for v in ordered) < pct * len(ordered)  # and the smallest such


def test_percentile_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_read_api_event_is_hashed_by_the_simulator() -> None:
    data = b'{"test":"ping"}'
    doc = {"sensor_id": "s1", "event_id": "a" * 32, "completed_at": "2026-11-27T05:00:00.250+00:00",
           "payload_base64": base64.b64encode(data).decode(),
           "event_sha256": base64.b64encode(hashlib.sha256(b"other").digest()).decode()}
    event = server_event_from_json(doc)
    assert event.sha256 == hashlib.sha256(data).hexdigest()
    assert event.declared_sha256 == hashlib.sha256(b"other").hexdigest()
    assert event.completed_at % 1 == pytest.approx(0.25) and event.size == len(data)


@pytest.mark.parametrize("url,schemes,expected", [
    ("http://10.0.0.5:8081", ("http",), Endpoint("10.0.0.5", 8081, "")),
    ("ws://h/control", ("ws",), Endpoint("h", 80, "/control")),
    ("ws://h:8765", ("ws",), Endpoint("h", 8765, "/control")),
])
def test_parse_endpoint(url: str, schemes: tuple[str, ...], expected: Endpoint) -> None:
    default_path = "/control" if schemes == ("ws",) else ""
    assert parse_endpoint(url, schemes, 80, default_path, "x") == expected


@pytest.mark.parametrize("url", ["https://h:443", "wss://h/control", "http://:80", "ftp://h"])
def test_parse_endpoint_refuses(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(url, ("http", "ws"), 80, "", "server_url")


# ---------------------------------------------------------------------------------------
# Counters across restarts

METRICS = """# HELP server_ingest_duplicate_total Chunks answered as duplicates
# TYPE server_ingest_duplicate_total counter
server_ingest_duplicate_total{{sensor_id="s1"}} {a}
server_ingest_duplicate_total{{sensor_id="s2"}} {b}
"""


def test_counters_bank_the_value_seen_before_a_restart() -> None:
    counters = RestartingCounters()
    for a, b in ((3, 1), (7, 1), (2, 4), (5, 4)):  # the server restarted between 7 and 2
        counters.observe_text(METRICS.format(a=a, b=b), ["server_ingest_duplicate_total"])
    assert counters.total("server_ingest_duplicate_total") == 7 + 5 + 4
    assert counters.total("server_ingest_duplicate_total",
                          lambda labels: labels["sensor_id"] == "s1") == 12
    assert not counters.seen("sensor_chunk_retry_total")


def test_parse_samples_picks_names() -> None:
    samples = parse_samples(METRICS.format(a=1, b=2), ["server_ingest_duplicate_total"])
    assert sorted(v for _, _, v in samples) == [1.0, 2.0]
    assert parse_samples(METRICS.format(a=1, b=2), ["nothing"]) == []


# ---------------------------------------------------------------------------------------
# Workload


@pytest.mark.parametrize("text,expected", [("2000", (2000, 2000)), ("2k", (2048, 2048)),
                                           ("1m", (1 << 20, 1 << 20)),
                                           ("500-64k", (500, 65536)), ("4KiB", (4096, 4096))])
def test_size_spec_parses(text: str, expected: tuple[int, int]) -> None:
    spec = SizeSpec.parse(text)
    assert (spec.min_bytes, spec.max_bytes) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "5-2", "99m", "-3"])
def test_size_spec_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        SizeSpec.parse(text)


@given(st.integers(1, 300_000), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_events_have_the_drawn_size(size: int, index: int) -> None:
    data = make_event(random.Random(index), "pi-01", index, size)
    assert len(data) == size or (len(data) > size and size < 300)  # tiny: the JSON head


def test_same_seed_same_events_other_seed_other_events() -> None:
    spec = WorkloadSpec(20, SizeSpec.parse("100-5k"), seed=7)
    assert spec.event_plan(0, "s") == WorkloadSpec(20, SizeSpec.parse("100-5k"),
                                                   seed=7).event_plan(0, "s")
    assert spec.event_plan(0, "s") != spec.event_plan(1, "s")
    assert spec.event_plan(0, "s") != WorkloadSpec(20, SizeSpec.parse("100-5k"),
                                                   seed=8).event_plan(0, "s")
    ids = [event_id for event_id, _ in spec.event_plan(0, "s")]
    assert len(set(ids)) == 20 and all(len(i) == 32 for i in ids)


def test_pacing() -> None:
    sizes = SizeSpec.parse("1k")
    assert WorkloadSpec.paced(100, sizes, rate=4).interval_s == 0.25
    assert WorkloadSpec.paced(100, sizes, duration_s=50).interval_s == 0.5
    assert WorkloadSpec.paced(100, sizes).interval_s == 0.0
    with pytest.raises(ConfigError):
        WorkloadSpec.paced(10, sizes, rate=-1)


# ---------------------------------------------------------------------------------------
# Documentation


def test_simulator_doc_holds_the_current_profiles_table() -> None:
    assert profiles_table() in SIMULATOR_DOC.read_text(), \
        "docs/simulator.md profiles table is stale: paste `pipeline-sim --list-profiles`"


# ---------------------------------------------------------------------------------------
# The test-only broken server's deferred commit


def test_deferred_commit_pretends_until_the_delay(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE t (x INTEGER)")
    now = [0.0]
    conn = DeferredCommitConnection(raw, delay_s=2.0, clock=lambda: now[0])
    other = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("COMMIT")  # pretended: the caller believes it durable
    assert conn.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    assert other.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 0
    now[0] = 2.5
    conn.execute("BEGIN IMMEDIATE")  # joins the open transaction
    conn.execute("INSERT INTO t VALUES (2)")
    conn.execute("COMMIT")  # now real
    assert other.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 2
    assert conn.pretended_commits == 1
    raw.close()
    other.close()
