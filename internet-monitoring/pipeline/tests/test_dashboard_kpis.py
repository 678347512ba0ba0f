"""The UXI payload and fleet health from known inputs (pure: no sockets, no clock)."""

from __future__ import annotations

import pytest

from pipeline.common.config import DashboardConfig, DashboardSensorConfig
from pipeline.server.read.dashboard_kpis import (
    Sample,
    SensorState,
    Thresholds,
    build_payload,
    iso,
    sample_from_result,
    sensor_health,
)
from pipeline.server.read.series import bucket, field_value

NOW = 1_800_000_000.0
TH = Thresholds.from_config(DashboardConfig())


def s(sensor: str, test: str, ago: float, ok: bool = True, latency: float | None = None,
      loss: float | None = None) -> Sample:
    return Sample(sensor, test, NOW - ago, NOW - ago + 1, ok, latency, loss)


SAMPLES = [
    s("pi-01", "ping", 50, latency=10, loss=0),
    s("pi-01", "ping", 150, latency=30, loss=0),
    s("pi-01", "dns", 300, ok=False, latency=50),
    s("pi-02", "speed", 500, latency=20),
    s("pi-01", "ping", 700, latency=100),     # the window before
    s("pi-02", "ping", 900, ok=False, loss=100),
    s("pi-02", "ping", 2000, latency=999),    # older than both windows
]
STATES = [
    SensorState("pi-01", True, NOW - 10, queue_depth=5, clock_skew_ms=0.0,
                last_result_at=NOW - 49),
    SensorState("pi-02", True, NOW - 10, queue_depth=1500, clock_skew_ms=5000.0,
                last_result_at=NOW - 499),
    SensorState("pi-03", False, NOW - 1100, disconnected_at=NOW - 1000),
]
LABELS = {"pi-01": DashboardSensorConfig(name="Lobby", site="HQ", region="EU", isp="ExampleNet")}


@pytest.fixture(scope="module")
def payload():
    return build_payload(now=NOW, window_s=600, points=3, samples=SAMPLES, states=STATES,
                         thresholds=TH, labels=LABELS)


def test_kpis_compare_the_window_with_the_one_before(payload):
    assert payload["generatedAt"] == iso(NOW)
    assert payload["reportingWindow"] == {"start": iso(NOW - 600), "end": iso(NOW),
                                          "seconds": 600, "label": "last 10 min"}
    assert payload["kpis"] == {
        "globalAvailability": 75.0,      # 3 of 4 results in the window succeeded
        "availabilityChange": 25.0,      # 1 of 2 in the window before
        "medianLatency": 25.0,           # median of 10, 30, 50, 20
        "latencyChange": -75.0,          # window before: 100
        "activeIncidents": 3,            # pi-02 queue + skew, pi-03 offline
        "incidentChange": 2,             # pi-03 went offline before the window began
        "ingestRate": 0.4,               # 4 results stored in 10 minutes
        "ingestChange": 0.2,             # 2 in the 10 minutes before
    }


def test_timeline_has_one_point_per_step(payload):
    assert payload["timeline"] == [
        {"timestamp": iso(NOW - 600), "successRate": 100.0, "latencyMs": 20.0},
        {"timestamp": iso(NOW - 400), "successRate": 0.0, "latencyMs": 50.0},
        {"timestamp": iso(NOW - 200), "successRate": 100.0, "latencyMs": 20.0},
    ]


def test_journeys_are_test_types(payload):
    assert payload["journeys"] == [
        {"id": "dns", "name": "DNS lookup", "successRate": 0.0, "responseTimeMs": 50.0,
         "status": "outage", "impactedSites": 1, "topImpactedSensors": ["pi-01"]},
        {"id": "ping", "name": "Ping", "successRate": 100.0, "responseTimeMs": 20.0,
         "status": "operational", "impactedSites": 0, "topImpactedSensors": []},
        {"id": "speed", "name": "Speed test", "successRate": 100.0, "responseTimeMs": 20.0,
         "status": "operational", "impactedSites": 0, "topImpactedSensors": []},
    ]


def test_sensors_carry_figures_status_and_performance(payload):
    by_id = {x["id"]: x for x in payload["sensors"]}
    assert list(by_id) == ["pi-01", "pi-02", "pi-03"]
    one = by_id["pi-01"]
    assert {k: one[k] for k in one if k != "performance"} == {
        "id": "pi-01", "name": "Lobby", "site": "HQ", "region": "EU", "isp": "ExampleNet",
        "lastCheck": iso(NOW - 50), "availability": 66.67, "latencyMs": 30.0,
        "packetLoss": 0.0, "status": "outage", "journeysImpacted": 1}
    assert one["performance"] == [
        {"timestamp": iso(NOW - 600), "availability": None, "latencyMs": None,
         "jitterMs": None, "packetLoss": None},
        {"timestamp": iso(NOW - 400), "availability": 0.0, "latencyMs": 50.0,
         "jitterMs": None, "packetLoss": None},
        {"timestamp": iso(NOW - 200), "availability": 100.0, "latencyMs": 20.0,
         "jitterMs": 20.0, "packetLoss": 0.0},   # 30 then 10 ms: jitter 20
    ]
    assert by_id["pi-02"]["status"] == "degraded"   # results fine, queue critical
    assert by_id["pi-02"]["name"] == "pi-02" and by_id["pi-02"]["site"] == ""
    three = by_id["pi-03"]
    assert (three["status"], three["availability"], three["lastCheck"]) == ("outage", None, None)
    assert len(three["performance"]) == 3


def test_alerts_are_the_pipelines_own_conditions(payload):
    alerts = payload["alerts"]
    assert [(a["id"], a["severity"]) for a in alerts] == [
        ("offline:pi-03", "critical"), ("queue:pi-02", "critical"),
        ("clock_skew:pi-02", "warning")]
    offline = alerts[0]
    assert offline["detectedAt"] == iso(NOW - 1000)
    assert offline["summary"] == "pi-03 is disconnected (last heard 18 min ago)"
    assert offline["affectedSites"] == ["pi-03"] and offline["acknowledged"] is False
    assert alerts[1]["impactedJourneys"] == ["speed"]   # its journeys in the window
    assert alerts[1]["summary"] == "pi-02 queue holds 1500 chunks (threshold 1000)"


def test_every_platform_field_is_present(payload):
    """platform.md, last section: every field of the UXI payload."""
    assert set(payload) == {"generatedAt", "reportingWindow", "kpis", "timeline", "journeys",
                            "sensors", "alerts"}
    assert set(payload["timeline"][0]) == {"timestamp", "successRate", "latencyMs"}
    assert set(payload["journeys"][0]) == {"id", "name", "successRate", "responseTimeMs",
                                           "status", "impactedSites", "topImpactedSensors"}
    assert set(payload["sensors"][0]) == {"id", "name", "site", "region", "isp", "lastCheck",
                                          "availability", "latencyMs", "packetLoss", "status",
                                          "journeysImpacted", "performance"}
    assert set(payload["sensors"][0]["performance"][0]) == {
        "timestamp", "availability", "latencyMs", "jitterMs", "packetLoss"}
    assert set(payload["alerts"][0]) == {"id", "severity", "summary", "detectedAt",
                                         "impactedJourneys", "affectedSites", "acknowledged"}


def test_an_empty_fleet_gives_an_empty_but_complete_payload():
    doc = build_payload(now=NOW, window_s=3600, points=12, samples=[], states=[],
                        thresholds=TH)
    assert doc["kpis"]["globalAvailability"] is None
    assert doc["kpis"]["availabilityChange"] == 0.0 and doc["kpis"]["ingestRate"] == 0.0
    assert len(doc["timeline"]) == 12 and doc["sensors"] == doc["journeys"] == doc["alerts"] == []


@pytest.mark.parametrize("state, status, kinds", [
    (SensorState("a", True, NOW - 5, queue_depth=0, clock_skew_ms=10.0,
                 last_result_at=NOW - 5), "ok", []),
    (SensorState("a", True, NOW - 91, queue_depth=0, last_result_at=NOW - 5),
     "warning", ["heartbeat_stale"]),
    (SensorState("a", True, NOW - 5, queue_depth=100, last_result_at=NOW - 5),
     "warning", ["queue"]),
    (SensorState("a", True, NOW - 5, queue_depth=1000, last_result_at=NOW - 5),
     "critical", ["queue"]),
    (SensorState("a", True, NOW - 5, last_result_at=NOW - 901), "warning", ["stale_results"]),
    (SensorState("a", True, NOW - 5, last_result_at=None), "warning", ["stale_results"]),
    (SensorState("a", True, NOW - 5, clock_skew_ms=-2000.0, last_result_at=NOW),
     "warning", ["clock_skew"]),
    (SensorState("a", True, NOW - 5, clock_skew_ms=30000.0, last_result_at=NOW),
     "critical", ["clock_skew"]),
    (SensorState("a", False, None), "offline", ["offline"]),
    (SensorState("a", False, NOW - 5, queue_depth=5000, last_result_at=NOW - 5),
     "offline", ["offline", "queue"]),
])
def test_sensor_health_thresholds(state, status, kinds):
    health = sensor_health(state, TH, NOW)
    assert health.status == status
    assert [c.kind for c in health.conditions] == kinds


@pytest.mark.parametrize("doc, ok, latency, loss", [
    ({"test": "speed", "download_mbps": 93.5, "latency_ms": 12}, True, 12.0, None),
    ({"test": "dns", "lookup_ms": 4, "success": False}, False, 4.0, None),
    ({"test": "ping", "rtt_ms": 3.5, "loss_pct": 100.0}, False, 3.5, 100.0),
    ({"test": "ping", "rtt_ms": 3.5, "loss_pct": 0.5}, True, 3.5, 0.5),
    ({"test": "web", "ttfb_ms": 80, "status": 503}, False, 80.0, None),
    ({"test": "web", "ttfb_ms": 80, "status": 200}, True, 80.0, None),
    ({"test": "wifi", "rssi_dbm": -60, "error": "no carrier"}, False, None, None),
    ({"test": "wifi", "rssi_dbm": -60, "latency_ms": True}, True, None, None),
    ([1, 2], True, None, None),
])
def test_sample_rules(doc, ok, latency, loss):
    sample = sample_from_result("pi-01", 1_800_000_000_000, NOW, doc)
    assert (sample.ok, sample.latency_ms, sample.loss_pct) == (ok, latency, loss)
    assert sample.at == 1_800_000_000.0
    assert sample.test == (doc["test"] if isinstance(doc, dict) else "result")


def test_series_buckets_a_field():
    assert field_value({"dns": {"lookup_ms": 4}}, "dns.lookup_ms") == 4.0
    assert field_value({"ok": True}, "ok") is None and field_value({}, "x") is None
    points = bucket([(1000, 1.0), (1500, 3.0), (4200, 10.0)], since_ms=0, step_ms=2000)
    assert [p.to_json() for p in points] == [
        {"t": 0, "count": 2, "avg": 2.0, "min": 1.0, "max": 3.0, "last": 3.0},
        {"t": 4000, "count": 1, "avg": 10.0, "min": 10.0, "max": 10.0, "last": 10.0}]
