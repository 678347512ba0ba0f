"""The Grafana provisioning: the "Pipeline overview" dashboard queries only metrics the
server really exports.

The exported names are not listed here: a real PipelineServer is started, given traffic
(a heartbeat with sensor stats, a complete event with result fields, a duplicate, a hash
mismatch, a wrong token), and its ``/metrics`` is scraped over HTTP. Every PromQL
expression of the dashboard (panels and template variables) and of the alert rules must
name only metrics in that scrape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import pytest
import yaml

from pipeline.common.messages import CAP_CHUNKS, CAP_HEARTBEAT_STATS, CAP_HEARTBEATS
from pipeline.tests.observability_support import (
    connect_control,
    event_docs,
    exported_names,
    heartbeat_envelope,
    post_doc,
    promql_metric_names,
    scrape,
    wait_for,
)
from pipeline.tests.server_support import TOKENS, running_server, server_config, urls

MONITORING = Path(__file__).resolve().parents[2]
PROVISIONING = MONITORING / "grafana" / "provisioning"
DASHBOARD = PROVISIONING / "dashboards" / "openuxi-pipeline-delivery.json"
RULES = MONITORING / "prometheus" / "pipeline-alerts.yml"


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def dashboard_queries(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    found = []
    for panel in walk_panels(doc["panels"]):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", query))
    return found


def rule_queries() -> list[tuple[str, str]]:
    doc = yaml.safe_load(RULES.read_text())
    return [(f"alert {rule['alert']}", rule["expr"])
            for group in doc["groups"] for rule in group["rules"]]


# ---------------------------------------------------------------------------------------
# The extractor the check relies on


@pytest.mark.parametrize("expr,names", [
    (('sum by (sensor_id) (rate(server_ingest_duplicate_total{sensor_id=~"$sensor"}'
     '[$__rate_interval]))'), {"server_ingest_duplicate_total"}),
    ("histogram_quantile(0.95, sum by (le) (rate(server_ingest_latency_ms_bucket[5m])))",
     {"server_ingest_latency_ms_bucket"}),
    ("a_total > ignoring (sensor_id) group_left () 2 * b_seconds", {"a_total", "b_seconds"}),
    ("increase(x[10m]) > 5 unless on (sensor_id) increase(y_count[10m]) > 0",
     {"x", "y_count"}),
    ('sum(up{job="by (x)"}) or vector(0)', {"up"}),
    ("label_values(control_channel_connected, sensor_id)", {"control_channel_connected"}),
    ("abs(pipeline_clock_skew_ms) > 500", {"pipeline_clock_skew_ms"}),
])
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


# ---------------------------------------------------------------------------------------
# Provisioning files


def test_dashboard_is_the_pipeline_overview_with_the_required_panels() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["title"] == "Pipeline overview" and doc["uid"]
    panels = list(walk_panels(doc["panels"]))
    titles = {p["title"] for p in panels}
    for wanted in ("Fleet connected", "Ingest rate",
                   "Ingest latency percentiles (receipt to durable commit)",
                   "Duplicates by sensor", "Queue depth by sensor", "Snapshot age by sensor",
                   "Per-sensor status", "Snapshot values"):
        assert wanted in titles
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    latency = next(p for p in panels if p["title"].startswith("Ingest latency"))
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]
    table = next(p for p in panels if p["title"] == "Per-sensor status")
    assert table["type"] == "table" and all(t.get("instant") for t in table["targets"])
    # Every query goes through the dashboard's datasource variable, so an operator's
    # existing Prometheus datasource works unchanged.
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}"


def test_provider_and_datasource_yaml() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "pipeline.yml").read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file"
    assert entry["options"]["path"] == "/etc/grafana/provisioning/dashboards"
    sources = yaml.safe_load((PROVISIONING / "datasources" / "pipeline-prometheus.yml")
                             .read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")


# ---------------------------------------------------------------------------------------
# Every query names an exported metric


async def drive_traffic(http: aiohttp.ClientSession, server: Any) -> None:
    """Enough real traffic that every labelled metric has samples."""
    ws = await connect_control(http, server, "pi-01", TOKENS["pi-01"])
    await ws.send_str(heartbeat_envelope(
        "pi-01", [CAP_CHUNKS, CAP_HEARTBEATS, CAP_HEARTBEAT_STATS], queue_depth=1,
        clock_skew_ms=12.0, retry_total=3, dropped_total=0, quarantined_total=0))
    _, docs = event_docs("pi-01", {"test": "speed", "download_mbps": 512.5}, 1)
    assert (await post_doc(http, server, docs[0], TOKENS["pi-01"]))[0] == 200
    assert (await post_doc(http, server, docs[0], TOKENS["pi-01"]))[0] == 200  # duplicate
    bad = dict(docs[0], sequence=2, chunk_sha256=docs[0]["event_sha256"])
    assert (await post_doc(http, server, bad, TOKENS["pi-01"]))[0] == 422
    assert (await post_doc(http, server, docs[0], "wrong-token"))[0] == 401
    await wait_for(lambda: server.registry.get_sample_value(
        "pipeline_snapshot_value", {"sensor_id": "pi-01", "field": "download_mbps"}) == 512.5)
    await ws.close()


async def test_every_query_names_a_metric_the_server_exports(tmp_path: Path) -> None:
    # Forwarding on (to a closed port: nothing is forwarded) so its families are declared,
    # as on a server whose alert rules watch the forwarder.
    config = server_config(tmp_path, forward={"remote_write": {
        "url": "http://127.0.0.1:9/api/v1/write"}})
    async with running_server(config) as server, \
            aiohttp.ClientSession() as http:
        await drive_traffic(http, server)
        exported = exported_names(await scrape(http, urls(server)["ingest"]))
    # The scrape is real: the runbook names are in it.
    assert {"sensor_queue_depth", "sensor_chunk_retry_total", "server_ingest_duplicate_total",
            "server_ingest_latency_ms_bucket", "server_snapshot_age_seconds",
            "control_channel_connected", "pipeline_snapshot_value"} <= exported
    queries = dashboard_queries(json.loads(DASHBOARD.read_text())) + rule_queries()
    assert len(queries) > 30
    unknown = {}
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        missing = names - exported
        if missing:
            unknown[where] = sorted(missing)
    assert unknown == {}
