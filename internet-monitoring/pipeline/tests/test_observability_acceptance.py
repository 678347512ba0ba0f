"""Acceptance (issue "Observability"): real traffic over real sockets, every metric read
from ``GET /metrics`` over HTTP with the exact number the traffic implies.

Traffic, all against one PipelineServer (chunk rate limit: a burst of 6, no refill to
speak of during the test):

    pi-01 control channel, heartbeat with heartbeat_stats (depth 7, skew -42.5 ms,
          retries 4, dropped 2, quarantined 1)
    pi-01 event A (JSON speed result, 1 chunk)     200 stored
    pi-01 event A again                             200 duplicate
    pi-01 event B (2 chunks, binary)                200 stored x2
    pi-01 event C with a wrong chunk_sha256         422 chunk_hash_mismatch
    pi-01 event D (JSON ping result, 1 chunk)       200 stored     (6th chunk of the burst)
    pi-01 event E                                   429 throttled  (over the burst)
    a wrong token                                   401 unauthenticated
    pi-02 event F (1 chunk), pi-02 not connected    200 stored, its ack held
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.common.messages import CAP_CHUNKS, CAP_HEARTBEAT_STATS, CAP_HEARTBEATS
from pipeline.tests.observability_support import (
    connect_control,
    event_docs,
    heartbeat_envelope,
    parse_samples,
    post_doc,
    scrape,
    value,
    wait_for,
)
from pipeline.tests.server_support import TOKENS, chunk_docs, running_server, server_config, urls

CAPS = [CAP_CHUNKS, CAP_HEARTBEATS, CAP_HEARTBEAT_STATS]


def payload_bytes(doc: dict[str, Any]) -> int:
    return len(base64.b64decode(doc["payload"]))


async def frames(ws: aiohttp.ClientWebSocketResponse, quiet_s: float = 0.4
                 ) -> list[dict[str, Any]]:
    """Every frame the server sends until it is quiet for ``quiet_s``."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            msg = await ws.receive(timeout=quiet_s)
        except TimeoutError:
            return out
        if msg.type is not aiohttp.WSMsgType.TEXT:
            return out
        out.append(json.loads(msg.data))


async def test_metrics_over_http_match_the_traffic_exactly(tmp_path: Path) -> None:
    config = server_config(
        tmp_path, limits={"chunk_rate": 0.001, "chunk_burst": 6},
        scheduler={"window_timeout_s": 60.0, "quiet_s": 60.0},
        metrics={"snapshot_fields": ["download_mbps", "rtt_ms", "nested.loss_pct"]})
    t0 = int(time.time() * 1000)
    one, two = TOKENS["pi-01"], TOKENS["pi-02"]
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        base = urls(server)["ingest"]
        ws = await connect_control(http, server, "pi-01", one)
        await ws.send_str(heartbeat_envelope(
            "pi-01", CAPS, queue_depth=7, clock_skew_ms=-42.5, retry_total=4,
            dropped_total=2, quarantined_total=1))
        requests = [f for f in await frames(ws) if f["body_type"] == "chunk_request"]

        _, (a,) = event_docs("pi-01", {"test": "speed", "download_mbps": 512.5}, 1)
        a["logical_timestamp_ms"] = t0
        _, b_docs = chunk_docs("pi-01", os.urandom(200 * 1024), 2, logical_timestamp_ms=t0 + 1)
        assert len(b_docs) == 2
        _, (c,) = event_docs("pi-01", {"test": "dns", "lookup_ms": 9.0}, 4)
        c["chunk_sha256"] = c["event_sha256"]  # a valid digest, of the wrong bytes
        _, (d,) = event_docs("pi-01", {"test": "ping", "rtt_ms": 3.25,
                                       "nested": {"loss_pct": 0.5}}, 5)
        d["logical_timestamp_ms"] = t0 + 2
        _, (e,) = event_docs("pi-01", {"test": "ping", "rtt_ms": 99.0}, 6)
        _, (f,) = event_docs("pi-02", {"test": "wifi", "rssi_dbm": -51}, 1)

        answers = [await post_doc(http, server, doc, one) for doc in (a, a, *b_docs, c, d, e)]
        answers.append(await post_doc(http, server, f, "not-a-token"))
        answers.append(await post_doc(http, server, f, two))
        statuses = [status for status, _ in answers]
        assert statuses == [200, 200, 200, 200, 422, 200, 429, 401, 200]
        assert answers[1][1]["duplicate"] is True
        assert answers[4][1]["error"] == "chunk_hash_mismatch"
        assert answers[6][1]["error"] == "throttled"
        await wait_for(lambda: server.store.event_count() == 4)
        acks = [fr for fr in await frames(ws) if fr["body_type"] == "chunk_ack"]
        await wait_for(lambda: server.manager.acks_pending() == 1)

        live = parse_samples(await scrape(http, base))
        await ws.close()
        await wait_for(lambda: not server.manager.is_connected("pi-01"))
        ws2 = await connect_control(http, server, "pi-02", two)  # takes its held ack
        held = [fr for fr in await frames(ws2) if fr["body_type"] == "chunk_ack"]
        after = parse_samples(await scrape(http, base))
        await ws2.close()

    def v(name: str, **labels: str) -> float | None:
        return value(live, name, **labels)

    stored = [a, *b_docs, d, f]
    # Runbook names.
    assert v("sensor_queue_depth", sensor_id="pi-01") == 7
    assert v("sensor_chunk_retry_total", sensor_id="pi-01") == 4
    assert v("server_ingest_duplicate_total", sensor_id="pi-01") == 1
    assert v("server_ingest_duplicate_total", sensor_id="pi-02") is None
    assert v("server_ingest_latency_ms_count", sensor_id="pi-01") == 5  # 4 stored + 1 dup
    assert v("server_ingest_latency_ms_count", sensor_id="pi-02") == 1
    assert v("server_ingest_latency_ms_bucket", sensor_id="pi-01", le="+Inf") == 5
    assert v("server_ingest_latency_ms_sum", sensor_id="pi-01") > 0
    assert 0 <= v("server_snapshot_age_seconds", sensor_id="pi-01") < 30
    assert 0 <= v("server_snapshot_age_seconds", sensor_id="pi-02") < 30
    assert v("control_channel_connected", sensor_id="pi-01") == 1
    # Operator extras.
    assert v("pipeline_chunks_ingested_total") == 5
    assert v("pipeline_bytes_ingested_total") == sum(payload_bytes(doc) for doc in stored)
    assert v("pipeline_events_completed_total") == 4
    assert v("pipeline_rejected_total", reason="chunk_hash_mismatch") == 1
    assert v("pipeline_rejected_total", reason="throttled") == 1
    assert v("pipeline_rejected_total", reason="unauthenticated") == 1
    assert v("pipeline_throttled_total", sensor_id="pi-01") == 1
    assert v("pipeline_throttled_total", sensor_id="pi-02") is None
    assert v("pipeline_auth_failures_total") == 1
    assert v("pipeline_auth_bans_total") == 0
    assert v("pipeline_sensor_dropped_total", sensor_id="pi-01") == 2
    assert v("pipeline_sensor_quarantined_total", sensor_id="pi-01") == 1
    assert v("pipeline_clock_skew_ms", sensor_id="pi-01") == -42.5
    assert 0 <= v("pipeline_heartbeat_age_seconds", sensor_id="pi-01") < 30
    assert v("pipeline_heartbeat_interval_seconds") == 5.0
    assert requests and v("pipeline_windows_open") == len(
        {r["body"]["window_id"] for r in requests})
    assert v("pipeline_acks_pending") == 1  # pi-02's chunk, its sensor offline
    # pi-01 got an ack for each durable sequence, the duplicate included.
    assert sorted(q for x in acks for q in x["body"]["committed_sequences"]) == [1, 1, 2, 3, 5]
    # Snapshot summaries: the latest result's allow-listed numbers; a field the newest
    # result lacks keeps the value of the result that had it.
    assert v("pipeline_snapshot_value", sensor_id="pi-01", field="download_mbps") == 512.5
    assert v("pipeline_snapshot_value", sensor_id="pi-01", field="rtt_ms") == 3.25
    assert v("pipeline_snapshot_value", sensor_id="pi-01", field="nested.loss_pct") == 0.5
    assert v("pipeline_snapshot_value", sensor_id="pi-02", field="rssi_dbm") is None
    assert v("pipeline_snapshot_value", sensor_id="pi-01", field="lookup_ms") is None

    # After pi-01 left and pi-02 connected and took its held ack.
    assert value(after, "control_channel_connected", sensor_id="pi-01") == 0
    assert value(after, "control_channel_connected", sensor_id="pi-02") == 1
    assert value(after, "pipeline_acks_pending") == 0
    assert [x["body"]["committed_sequences"] for x in held] == [[1]]


async def test_snapshot_values_survive_a_restart_and_follow_the_allow_list(tmp_path: Path
                                                                          ) -> None:
    """The gauges come back from the store's latest events after a restart, with the
    allow-list of the new configuration; ``[]`` exports none."""
    result = {"test": "speed", "download_mbps": 250.0, "upload_mbps": 40.5, "note": "x",
              "ok": True}
    async with running_server(server_config(tmp_path)) as server, \
            aiohttp.ClientSession() as http:
        _, (doc,) = event_docs("pi-01", result, 1)
        assert (await post_doc(http, server, doc, TOKENS["pi-01"]))[0] == 200
        first = parse_samples(await scrape(http, urls(server)["ingest"]))
    assert value(first, "pipeline_snapshot_value", sensor_id="pi-01",
                 field="download_mbps") == 250.0
    assert value(first, "pipeline_snapshot_value", sensor_id="pi-01", field="ok") is None

    restarted = server_config(tmp_path, metrics={"snapshot_fields": ["upload_mbps", "note"]})
    async with running_server(restarted) as server, aiohttp.ClientSession() as http:
        again = parse_samples(await scrape(http, urls(server)["ingest"]))
    fields = {dict(labels)["field"]: v for (name, labels), v in again.items()
              if name == "pipeline_snapshot_value"}
    assert fields == {"upload_mbps": 40.5}  # "note" is text: skipped

    silent = server_config(tmp_path, metrics={"snapshot_fields": []})
    async with running_server(silent) as server, aiohttp.ClientSession() as http:
        text = await scrape(http, urls(server)["ingest"])
    assert not [k for k in parse_samples(text) if k[0] == "pipeline_snapshot_value"]
