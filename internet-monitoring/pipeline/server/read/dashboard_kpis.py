"""Fleet health, the pipeline's alerts and the UXI dashboard payload, from plain values.

No I/O and no clock: callers pass ``now``, the sensors' state (what the control channel
knows) and result samples (what the store holds). The same functions feed
``GET /v1/dashboard``, the stream's ``{"type": "dashboard"}`` messages, ``GET /v1/sensors``
and the operators' page, so a colour on the page and a status in the payload always agree.

How a result becomes a sample (``sample_from_result``; docs/dashboard.md):

* journey = the result's ``test`` field (``speed``, ``dns``, ``ping``, ``wifi``, ``web``...);
* failed when ``success``/``ok`` is false, ``error`` is non-empty, an HTTP ``status`` is 400
  or more, or ``loss_pct`` is 100; otherwise a result that arrived is a success;
* latency = the first of ``latency_ms``, ``rtt_ms``, ``lookup_ms``, ``ttfb_ms``,
  ``response_ms``, ``duration_ms``; loss = ``loss_pct`` (or ``packet_loss_pct``); jitter =
  ``jitter_ms``, else the mean difference of successive latencies of a bucket.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from pipeline.common.config import DashboardConfig, DashboardSensorConfig

LATENCY_KEYS = ("latency_ms", "rtt_ms", "lookup_ms", "ttfb_ms", "response_ms", "duration_ms")
LOSS_KEYS = ("loss_pct", "packet_loss_pct")
JOURNEY_NAMES = {"speed": "Speed test", "dns": "DNS lookup", "ping": "Ping",
                 "wifi": "Wi-Fi", "web": "Web page", "voip": "VoIP call",
                 "radius": "RADIUS login", "vpn": "VPN tunnel"}
UNKNOWN_TEST = "result"
TOP_IMPACTED = 5

# Pipeline health of one sensor (the page's colours) and UXI status words.
OK, WARNING, CRITICAL, OFFLINE = "ok", "warning", "critical", "offline"
OPERATIONAL, DEGRADED, OUTAGE = "operational", "degraded", "outage"
_SEVERITY_RANK = {OK: 0, WARNING: 1, CRITICAL: 2}


# ---------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True, slots=True)
class Sample:
    """One stored result reduced to what the KPIs need."""

    sensor_id: str
    test: str
    at: float            # the result's own time (logical timestamp), Unix seconds
    received_at: float   # when the server stored it, Unix seconds
    ok: bool
    latency_ms: float | None = None
    loss_pct: float | None = None
    jitter_ms: float | None = None
    weight: float = 1.0  # results it stands for (1 / the share read, see DashboardFeed)


@dataclass(frozen=True)
class SensorState:
    """What the server knows about a sensor's connection, from its control channel."""

    sensor_id: str
    connected: bool
    last_heartbeat_at: float | None = None
    disconnected_at: float | None = None
    queue_depth: int | None = None
    backlog: int = 0
    clock_skew_ms: float | None = None
    last_result_at: float | None = None


@dataclass(frozen=True)
class Thresholds:
    heartbeat_stale_s: float = 90.0
    result_stale_s: float = 900.0
    queue_warning: int = 100
    queue_critical: int = 1000
    skew_warning_ms: float = 2000.0
    skew_critical_ms: float = 30000.0
    availability_warning_pct: float = 99.0
    availability_critical_pct: float = 95.0
    latency_warning_ms: float = 150.0

    @classmethod
    def from_config(cls, config: DashboardConfig) -> Thresholds:
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _first_number(doc: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = _number(doc.get(key))
        if value is not None:
            return value
    return None


def result_failed(doc: Mapping[str, Any]) -> bool:
    for key in ("success", "ok"):
        if isinstance(doc.get(key), bool) and not doc[key]:
            return True
    if doc.get("error") not in (None, "", False):
        return True
    status = doc.get("status")
    if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
        return True
    loss = _first_number(doc, LOSS_KEYS)
    return loss is not None and loss >= 100.0


def result_test(doc: Mapping[str, Any]) -> str:
    test = doc.get("test")
    return test[:64] if isinstance(test, str) and test.strip() else UNKNOWN_TEST


def sample_from_result(sensor_id: str, logical_timestamp_ms: int, received_at: float,
                       doc: Any, weight: float = 1.0) -> Sample:
    """A sample of one stored result; a non-object result counts as a plain success."""
    if not isinstance(doc, Mapping):
        doc = {}
    return Sample(sensor_id=sensor_id, test=result_test(doc), at=logical_timestamp_ms / 1000.0,
                  received_at=received_at, ok=not result_failed(doc),
                  latency_ms=_first_number(doc, LATENCY_KEYS),
                  loss_pct=_first_number(doc, LOSS_KEYS),
                  jitter_ms=_number(doc.get("jitter_ms")), weight=weight)


def journey_name(test: str) -> str:
    return JOURNEY_NAMES.get(test, test.replace("_", " ").capitalize())


# ---------------------------------------------------------------------------------------
# Fleet health and the pipeline's alerts


@dataclass(frozen=True)
class Condition:
    """One reason a sensor is not OK; ``since`` is when it began (best known)."""

    kind: str        # offline | heartbeat_stale | queue | stale_results | clock_skew
    severity: str    # warning | critical
    summary: str
    since: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "summary": self.summary,
                "since": iso(self.since)}


@dataclass(frozen=True)
class SensorHealth:
    status: str      # ok | warning | critical | offline
    conditions: tuple[Condition, ...] = ()


def age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _offline(state: SensorState, now: float) -> Condition:
    seen = state.last_heartbeat_at
    since = state.disconnected_at or seen
    if seen is None and since is None:
        return Condition("offline", CRITICAL, f"{state.sensor_id} has never connected")
    ago = age_text(now - (seen if seen is not None else since or now))
    return Condition("offline", CRITICAL,
                     f"{state.sensor_id} is disconnected (last heard {ago} ago)", since)


def _queue(state: SensorState, th: Thresholds) -> Condition | None:
    depth = state.queue_depth
    if depth is None or depth < th.queue_warning:
        return None
    severity = CRITICAL if depth >= th.queue_critical else WARNING
    limit = th.queue_critical if severity == CRITICAL else th.queue_warning
    return Condition("queue", severity, f"{state.sensor_id} queue holds {depth} chunks "
                     f"(threshold {limit})", state.last_heartbeat_at)


def _skew(state: SensorState, th: Thresholds) -> Condition | None:
    skew = state.clock_skew_ms
    if skew is None or abs(skew) < th.skew_warning_ms:
        return None
    severity = CRITICAL if abs(skew) >= th.skew_critical_ms else WARNING
    return Condition("clock_skew", severity,
                     f"{state.sensor_id} clock is off by {skew / 1000:+.1f} s",
                     state.last_heartbeat_at)


def _stale_results(state: SensorState, th: Thresholds, now: float) -> Condition | None:
    last = state.last_result_at
    if last is None:
        if not state.connected:
            return None  # "offline" already says it; no result ever is not news
        return Condition("stale_results", WARNING, f"{state.sensor_id} has sent no result yet",
                         None)
    if now - last <= th.result_stale_s:
        return None
    return Condition("stale_results", WARNING, f"{state.sensor_id} last result "
                     f"{age_text(now - last)} ago", last + th.result_stale_s)


def sensor_health(state: SensorState, th: Thresholds, now: float) -> SensorHealth:
    """Offline when not connected; otherwise the worst of its conditions."""
    found: list[Condition] = []
    if not state.connected:
        found.append(_offline(state, now))
    elif state.last_heartbeat_at is not None and \
            now - state.last_heartbeat_at > th.heartbeat_stale_s:
        found.append(Condition("heartbeat_stale", WARNING,
                               f"{state.sensor_id} last heartbeat "
                               f"{age_text(now - state.last_heartbeat_at)} ago",
                               state.last_heartbeat_at + th.heartbeat_stale_s))
    for condition in (_queue(state, th), _stale_results(state, th, now), _skew(state, th)):
        if condition is not None:
            found.append(condition)
    if not state.connected:
        return SensorHealth(OFFLINE, tuple(found))
    worst = max((c.severity for c in found), key=_SEVERITY_RANK.__getitem__, default=OK)
    return SensorHealth(worst, tuple(found))


# ---------------------------------------------------------------------------------------
# Aggregation helpers


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(slots=True)
class _Stats:
    """Running figures of a group of samples."""

    total: float = 0.0   # weighted counts (a sample may stand for several results)
    ok: float = 0.0
    latencies: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    jitters: list[float] = field(default_factory=list)

    def add(self, s: Sample) -> None:
        self.total += s.weight
        if s.ok:
            self.ok += s.weight
        if s.latency_ms is not None:
            self.latencies.append(s.latency_ms)
        if s.loss_pct is not None:
            self.losses.append(s.loss_pct)
        if s.jitter_ms is not None:
            self.jitters.append(s.jitter_ms)

    @property
    def success_pct(self) -> float | None:
        return 100.0 * self.ok / self.total if self.total else None

    @property
    def median_latency(self) -> float | None:
        return statistics.median(self.latencies) if self.latencies else None

    @property
    def mean_loss(self) -> float | None:
        return statistics.fmean(self.losses) if self.losses else None

    @property
    def jitter(self) -> float | None:
        if self.jitters:
            return statistics.fmean(self.jitters)
        if len(self.latencies) < 2:
            return None
        steps = [abs(b - a) for a, b in zip(self.latencies, self.latencies[1:])]
        return statistics.fmean(steps)


def _change(current: float | None, previous: float | None) -> float:
    """Current minus previous, in the KPI's unit; 0 when either window has no data."""
    if current is None or previous is None:
        return 0.0
    return round(current - previous, 2)


def _uxi_status(success_pct: float | None, th: Thresholds) -> str:
    if success_pct is None or success_pct >= th.availability_warning_pct:
        return OPERATIONAL
    return DEGRADED if success_pct >= th.availability_critical_pct else OUTAGE


# ---------------------------------------------------------------------------------------
# The UXI payload


@dataclass(frozen=True)
class Window:
    end: float
    seconds: float
    points: int

    @property
    def start(self) -> float:
        return self.end - self.seconds

    @property
    def step(self) -> float:
        return self.seconds / self.points

    def to_json(self) -> dict[str, Any]:
        return {"start": iso(self.start), "end": iso(self.end), "seconds": self.seconds,
                "label": window_label(self.seconds)}


def window_label(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"last {int(seconds // size)} {unit}"
    return f"last {seconds:g} s"


@dataclass
class _Groups:
    """The samples of the current window grouped every way the payload needs."""

    fleet: _Stats = field(default_factory=_Stats)
    previous: _Stats = field(default_factory=_Stats)
    received: float = 0.0
    received_before: float = 0.0
    timeline: list[_Stats] = field(default_factory=list)
    by_sensor: dict[str, _Stats] = field(default_factory=lambda: defaultdict(_Stats))
    sensor_points: dict[str, list[_Stats]] = field(default_factory=dict)
    by_journey: dict[str, _Stats] = field(default_factory=lambda: defaultdict(_Stats))
    by_sensor_journey: dict[tuple[str, str], _Stats] = field(
        default_factory=lambda: defaultdict(_Stats))
    last_check: dict[str, float] = field(default_factory=dict)


def _group(samples: Iterable[Sample], window: Window) -> _Groups:
    """One pass over the samples (in arrival order, which is each sensor's own order)."""
    g = _Groups(timeline=[_Stats() for _ in range(window.points)])
    start, end, step, points = window.start, window.end, window.step, window.points
    before_start = start - window.seconds
    last_check = g.last_check
    by_sensor, by_journey, by_pair = g.by_sensor, g.by_journey, g.by_sensor_journey
    sensor_points = g.sensor_points
    for s in samples:
        at = s.at
        if at <= end and at > last_check.get(s.sensor_id, float("-inf")):
            last_check[s.sensor_id] = at
        if start < s.received_at <= end:
            g.received += s.weight
        elif before_start < s.received_at <= start:
            g.received_before += s.weight
        if not start < at <= end:
            if before_start < at <= start:
                g.previous.add(s)
            continue
        index = min(points - 1, int((at - start) / step))
        g.fleet.add(s)
        g.timeline[index].add(s)
        by_sensor[s.sensor_id].add(s)
        row = sensor_points.get(s.sensor_id)
        if row is None:
            row = sensor_points[s.sensor_id] = [_Stats() for _ in range(points)]
        row[index].add(s)
        by_journey[s.test].add(s)
        by_pair[(s.sensor_id, s.test)].add(s)
    return g


def _labels(labels: Mapping[str, DashboardSensorConfig], sensor_id: str
            ) -> DashboardSensorConfig:
    return labels.get(sensor_id) or DashboardSensorConfig()


def _site(labels: Mapping[str, DashboardSensorConfig], sensor_id: str) -> str:
    return _labels(labels, sensor_id).site or sensor_id


def _journeys(g: _Groups, th: Thresholds, labels: Mapping[str, DashboardSensorConfig]
              ) -> list[dict[str, Any]]:
    out = []
    for test in sorted(g.by_journey, key=journey_name):
        stats = g.by_journey[test]
        impacted = sorted(((st.success_pct, sid) for (sid, t), st in g.by_sensor_journey.items()
                           if t == test and st.success_pct is not None
                           and st.success_pct < th.availability_warning_pct))
        out.append({
            "id": test, "name": journey_name(test),
            "successRate": _round(stats.success_pct),
            "responseTimeMs": _round(stats.median_latency),
            "status": _uxi_status(stats.success_pct, th),
            "impactedSites": len({_site(labels, sid) for _, sid in impacted}),
            "topImpactedSensors": [sid for _, sid in impacted[:TOP_IMPACTED]],
        })
    return out


def _sensor_status(health: SensorHealth, stats: _Stats | None, th: Thresholds) -> str:
    if health.status == OFFLINE:
        return OUTAGE
    success = stats.success_pct if stats is not None else None
    status = _uxi_status(success, th)
    if status == OPERATIONAL:
        latency = stats.median_latency if stats is not None else None
        if health.status != OK or (latency is not None and latency > th.latency_warning_ms):
            status = DEGRADED
    return status


def _performance(points: list[_Stats] | None, window: Window) -> list[dict[str, Any]]:
    out = []
    for i in range(window.points):
        st = points[i] if points is not None else _Stats()
        out.append({"timestamp": iso(window.start + i * window.step),
                    "availability": _round(st.success_pct),
                    "latencyMs": _round(st.median_latency),
                    "jitterMs": _round(st.jitter),
                    "packetLoss": _round(st.mean_loss)})
    return out


def _sensors(g: _Groups, window: Window, health: Mapping[str, SensorHealth], th: Thresholds,
             labels: Mapping[str, DashboardSensorConfig]) -> list[dict[str, Any]]:
    out = []
    for sid in sorted(set(health) | set(g.by_sensor)):
        stats = g.by_sensor.get(sid)
        label = _labels(labels, sid)
        impacted = sum(1 for (s, _), st in g.by_sensor_journey.items()
                       if s == sid and st.success_pct is not None
                       and st.success_pct < th.availability_warning_pct)
        out.append({
            "id": sid, "name": label.name or sid, "site": label.site, "region": label.region,
            "isp": label.isp, "lastCheck": iso(g.last_check.get(sid)),
            "availability": _round(stats.success_pct) if stats else None,
            "latencyMs": _round(stats.median_latency) if stats else None,
            "packetLoss": _round(stats.mean_loss) if stats else None,
            "status": _sensor_status(health.get(sid, SensorHealth(OK)), stats, th),
            "journeysImpacted": impacted,
            "performance": _performance(g.sensor_points.get(sid), window),
        })
    return out


def _alerts(health: Mapping[str, SensorHealth], g: _Groups, window: Window,
            labels: Mapping[str, DashboardSensorConfig]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for sid in sorted(health):
        journeys = sorted({t for (s, t) in g.by_sensor_journey if s == sid})
        for c in health[sid].conditions:
            out.append({"id": f"{c.kind}:{sid}", "severity": c.severity, "summary": c.summary,
                        "detectedAt": iso(c.since if c.since is not None else window.end),
                        "impactedJourneys": journeys, "affectedSites": [_site(labels, sid)],
                        "acknowledged": False})
    rank = {CRITICAL: 0, WARNING: 1}
    out.sort(key=lambda a: (rank.get(a["severity"], 2), a["id"]))
    return out


def build_payload(*, now: float, window_s: float, points: int, samples: Iterable[Sample],
                  states: Iterable[SensorState], thresholds: Thresholds,
                  labels: Mapping[str, DashboardSensorConfig] | None = None
                  ) -> dict[str, Any]:
    """The UXI dashboard document over the window ending at ``now`` (platform.md)."""
    labels = labels or {}
    window = Window(now, window_s, points)
    g = _group(samples, window)
    health = {st.sensor_id: sensor_health(st, thresholds, now) for st in states}
    alerts = _alerts(health, g, window, labels)
    began = iso(window.start) or ""
    new_alerts = sum(1 for a in alerts if a["detectedAt"] > began)  # same ISO format
    minutes = window_s / 60.0
    return {
        "generatedAt": iso(now),
        "reportingWindow": window.to_json(),
        "kpis": {
            "globalAvailability": _round(g.fleet.success_pct),
            "availabilityChange": _change(g.fleet.success_pct, g.previous.success_pct),
            "medianLatency": _round(g.fleet.median_latency),
            "latencyChange": _change(g.fleet.median_latency, g.previous.median_latency),
            "activeIncidents": len(alerts),
            "incidentChange": new_alerts,
            "ingestRate": round(g.received / minutes, 2),
            "ingestChange": round((g.received - g.received_before) / minutes, 2),
        },
        "timeline": [{"timestamp": iso(window.start + i * window.step),
                      "successRate": _round(st.success_pct),
                      "latencyMs": _round(st.median_latency)}
                     for i, st in enumerate(g.timeline)],
        "journeys": _journeys(g, thresholds, labels),
        "sensors": _sensors(g, window, health, thresholds, labels),
        "alerts": alerts,
    }
