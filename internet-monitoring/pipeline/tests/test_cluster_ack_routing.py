"""Issue 16, acceptance 3: acks are routed between replicas. A protocol 1.0 sensor whose
control socket is on replica A and whose POSTs all go to replica B drains its backlog:
B commits every chunk, A (the session's owner) acks it on the sensor's socket, and the
1.0 agent, which deletes a chunk only on a ChunkAck naming it, empties its queue.

Real processes on a real PostgreSQL (the ``pg_dsn`` fixture: a schema of this test's own;
under CI=true a missing PostgreSQL fails)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from pipeline.tests.cluster_support import (
    check_exactly_once,
    fill_legacy,
    legacy_depth,
    legacy_sensor,
    replica,
    stop_all,
    tails,
    wait_until,
)

SENSOR = "legacy-routed"
TOKEN = "legacy-routed-token-0123456789"
EVENTS = 40
SIZE = 20 * 1024  # two chunks per event


def _metric(base: str, name: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_legacy_sensor_with_control_on_a_and_posts_on_b_drains(pg_dsn: str,
                                                                tmp_path: Path) -> None:
    sensors = {SENSOR: TOKEN}
    a = replica(tmp_path, "replica-a", pg_dsn, sensors)
    b = replica(tmp_path, "replica-b", pg_dsn, sensors)
    expected = fill_legacy(tmp_path, SENSOR, EVENTS, SIZE)
    agent = legacy_sensor(tmp_path, SENSOR, TOKEN, control_url=a.control_url,
                          ingest_url=b.ingest_url)
    procs = [agent, b, a]
    try:
        a.start()
        b.start()
        agent.start()
        took = wait_until(lambda: legacy_depth(tmp_path, SENSOR) == 0, 90,
                          "legacy queue empty", lambda: tails(procs))
        # Both replicas read the same store: the fleet is the same from each.
        for server in (a, b):
            check_exactly_once(expected, server.events(SENSOR))
        chunks = sum(e.chunks for e in expected)
        # Every chunk was committed on B (A's ingest saw none) and acked by A.
        assert _metric(a.http_base, "pipeline_chunks_ingested_total") == 0
        assert _metric(b.http_base, "pipeline_chunks_ingested_total") >= chunks
        log_a = a.log_text()
        assert f"cluster_session_owned sensor_id={SENSOR}" in log_a
        assert f"cluster_session_owned sensor_id={SENSOR}" not in b.log_text()
        print(f"drained {EVENTS} events ({chunks} chunks) in {took:.1f}s")
    finally:
        stop_all(procs)
