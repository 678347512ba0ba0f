"""The server's Prometheus metrics, on an injected ``CollectorRegistry``.

Names come from the operators' runbook and must not change (Grafana dashboards and alert
rules query them). Tests build their own registry and read exact values with
``registry.get_sample_value``; nothing here touches the global registry.

Runbook names::

    sensor_queue_depth{sensor_id}             gauge      queue depth from the last heartbeat
    sensor_chunk_retry_total{sensor_id}       gauge      the sensor's own retry counter, as
                                                         reported in heartbeats (capability
                                                         ``heartbeat_stats``); a gauge because
                                                         the server mirrors a value it does not
                                                         count itself (it resets when the
                                                         sensor restarts)
    server_ingest_duplicate_total{sensor_id}  counter    chunks answered ``duplicate=true``
    server_ingest_latency_ms{sensor_id}       histogram  request receipt -> durable commit
    server_snapshot_age_seconds{sensor_id}    gauge      now - updated_at of the latest snapshot
    control_channel_connected{sensor_id}      gauge      1 while the control socket is up

Operator extras::

    pipeline_chunks_ingested_total            counter    chunks newly stored (fleet)
    pipeline_bytes_ingested_total             counter    compressed payload bytes newly stored
    pipeline_events_completed_total           counter    events reassembled and verified
    pipeline_rejected_total{reason}           counter    ingest requests refused, by error code
    pipeline_auth_failures_total              counter    refused credentials (every listener)
    pipeline_auth_bans_total                  counter    clients banned after repeated failures
    pipeline_throttled_total{sensor_id}       counter    requests answered 429 (rate limits)
    pipeline_windows_open                     gauge      active chunk request windows
    pipeline_acks_pending                     gauge      committed sequences whose acks wait
                                                         for their sensor's next connection
    pipeline_acks_unsent_total{sensor_id}     counter    held acks given up (over the hold cap;
                                                         the sensor re-sends, answered duplicate)
    pipeline_heartbeat_age_seconds{sensor_id} gauge      seconds since the last heartbeat
    pipeline_heartbeat_interval_seconds       gauge      the configured heartbeat interval
    pipeline_clock_skew_ms{sensor_id}         gauge      clock skew reported by the sensor
    pipeline_sensor_dropped_total{sensor_id}  gauge      chunks the sensor's queue dropped
                                                         (size/age limits), from heartbeats;
                                                         by reason on the sensor's own
                                                         /metrics (sensor_chunks_dropped_total)
    pipeline_sensor_quarantined_total{sensor_id}
                                              gauge      chunks the sensor quarantined, from
                                                         heartbeats
    pipeline_snapshot_value{sensor_id, field} gauge      allow-listed numeric fields of the
                                                         sensor's latest snapshot

The ``pipeline_sensor_*_total`` and ``sensor_chunk_retry_total`` series are gauges that
mirror counters the sensor keeps (capability ``heartbeat_stats``): they only grow while the
sensor's process (retries) or queue file (dropped, quarantined) lives, and PromQL's
``increase()``/``rate()`` treat a drop to a lower value as a counter reset, which is what a
sensor restart is. Sensors that did not negotiate ``heartbeat_stats`` have no such series.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.common.messages import Heartbeat

LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry, *,
                 snapshot_fields: Iterable[str] = ()) -> None:
        self.registry = registry
        r = registry
        self.queue_depth = Gauge("sensor_queue_depth", "Sensor queue depth from heartbeats",
                                 ["sensor_id"], registry=r)
        self.chunk_retry = Gauge("sensor_chunk_retry_total",
                                 "Sensor-side chunk retries, as reported in heartbeats",
                                 ["sensor_id"], registry=r)
        self.duplicates = Counter("server_ingest_duplicate_total",
                                  "Chunks answered as duplicates", ["sensor_id"], registry=r)
        self.ingest_latency = Histogram("server_ingest_latency_ms",
                                        "Ingest request receipt to durable commit, ms",
                                        ["sensor_id"], buckets=LATENCY_BUCKETS_MS, registry=r)
        self.snapshot_age = Gauge("server_snapshot_age_seconds",
                                  "Age of the latest snapshot per sensor", ["sensor_id"],
                                  registry=r)
        self.connected = Gauge("control_channel_connected",
                               "1 while the sensor's control channel is connected",
                               ["sensor_id"], registry=r)
        self.chunks_ingested = Counter("pipeline_chunks_ingested_total",
                                       "Chunks newly stored", registry=r)
        self.bytes_ingested = Counter("pipeline_bytes_ingested_total",
                                      "Compressed payload bytes newly stored", registry=r)
        self.events_completed = Counter("pipeline_events_completed_total",
                                        "Events reassembled and verified", registry=r)
        self.rejected = Counter("pipeline_rejected_total", "Requests refused, by reason",
                                ["reason"], registry=r)
        self.auth_failures = Counter("pipeline_auth_failures_total",
                                     "Refused credentials (control, ingest, stream, read API)",
                                     registry=r)
        self.windows_open = Gauge("pipeline_windows_open", "Active chunk request windows",
                                  registry=r)
        self.heartbeat_age = Gauge("pipeline_heartbeat_age_seconds",
                                   "Seconds since the sensor's last heartbeat", ["sensor_id"],
                                   registry=r)
        self.clock_skew = Gauge("pipeline_clock_skew_ms", "Clock skew reported by the sensor",
                                ["sensor_id"], registry=r)
        self.throttled = Counter("pipeline_throttled_total",
                                 "Requests refused with 429 by a rate limit", ["sensor_id"],
                                 registry=r)
        self.auth_bans = Counter("pipeline_auth_bans_total",
                                 "Clients banned after repeated authentication failures",
                                 registry=r)
        self.acks_pending = Gauge("pipeline_acks_pending",
                                  "Committed sequences whose acks wait for the sensor to "
                                  "reconnect", registry=r)
        self.acks_unsent = Counter("pipeline_acks_unsent_total",
                                   "Held acks given up (sequences) over the hold cap",
                                   ["sensor_id"], registry=r)
        self.heartbeat_interval = Gauge("pipeline_heartbeat_interval_seconds",
                                        "Configured heartbeat interval", registry=r)
        self.sensor_dropped = Gauge("pipeline_sensor_dropped_total",
                                    "Chunks dropped by the sensor's queue, from heartbeats",
                                    ["sensor_id"], registry=r)
        self.sensor_quarantined = Gauge("pipeline_sensor_quarantined_total",
                                        "Chunks quarantined by the sensor, from heartbeats",
                                        ["sensor_id"], registry=r)
        self.snapshot_value = Gauge("pipeline_snapshot_value",
                                    "Allow-listed numeric fields of the latest snapshot",
                                    ["sensor_id", "field"], registry=r)
        self.snapshot_fields: tuple[str, ...] = tuple(snapshot_fields)

    # -- updates ------------------------------------------------------------------------

    def on_heartbeat(self, sensor_id: str, heartbeat: Heartbeat) -> None:
        self.queue_depth.labels(sensor_id).set(heartbeat.queue_depth)
        self.clock_skew.labels(sensor_id).set(heartbeat.clock_skew_ms)
        self.heartbeat_age.labels(sensor_id).set(0.0)
        if heartbeat.retry_total is not None:
            self.chunk_retry.labels(sensor_id).set(heartbeat.retry_total)
        if heartbeat.dropped_total is not None:
            self.sensor_dropped.labels(sensor_id).set(heartbeat.dropped_total)
        if heartbeat.quarantined_total is not None:
            self.sensor_quarantined.labels(sensor_id).set(heartbeat.quarantined_total)

    def on_connection(self, sensor_id: str, connected: bool) -> None:
        self.connected.labels(sensor_id).set(1.0 if connected else 0.0)

    def on_stored(self, sensor_id: str, nbytes: int, duplicate: bool, latency_ms: float) -> None:
        if duplicate:
            self.duplicates.labels(sensor_id).inc()
        else:
            self.chunks_ingested.inc()
            self.bytes_ingested.inc(nbytes)
        self.ingest_latency.labels(sensor_id).observe(latency_ms)

    def on_event_completed(self) -> None:
        self.events_completed.inc()

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def on_auth_failure(self) -> None:
        self.auth_failures.inc()

    def on_throttled(self, sensor_id: str) -> None:
        """A request refused with 429; ``sensor_id`` is ``""`` when it is not known yet."""
        self.throttled.labels(sensor_id).inc()

    def on_auth_ban(self) -> None:
        self.auth_bans.inc()

    def on_ack_unsent(self, sensor_id: str, sequences: int = 1) -> None:
        self.acks_unsent.labels(sensor_id).inc(sequences)

    def set_heartbeat_interval(self, seconds: float) -> None:
        self.heartbeat_interval.set(seconds)

    def on_snapshot(self, sensor_id: str, document: Any) -> dict[str, float]:
        """Export the allow-listed numeric fields of a sensor's new latest snapshot.

        A field missing from this snapshot keeps the value it had (the latest result that
        carried it), so a speed test stays on the chart after a DNS test. Returns what was
        set."""
        values = snapshot_numbers(document, self.snapshot_fields)
        for name, value in values.items():
            self.snapshot_value.labels(sensor_id, name).set(value)
        return values

    def refresh(self, now: float, *, heartbeats: Mapping[str, float],
                snapshots: Mapping[str, float], windows_open: int,
                acks_pending: int | None = None) -> None:
        """Recompute the time-derived gauges (called on scrape and by the timer).

        ``heartbeats`` and ``snapshots`` map sensor ids to the wall-clock time of the last
        heartbeat / snapshot update."""
        for sensor_id, at in heartbeats.items():
            self.heartbeat_age.labels(sensor_id).set(max(0.0, now - at))
        for sensor_id, at in snapshots.items():
            self.snapshot_age.labels(sensor_id).set(max(0.0, now - at))
        self.windows_open.set(windows_open)
        if acks_pending is not None:
            self.acks_pending.set(acks_pending)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def snapshot_numbers(document: Any, paths: Iterable[str]) -> dict[str, float]:
    """``{path: value}`` for each dotted ``path`` that names a finite number in
    ``document`` (a decoded JSON snapshot). Booleans, strings and containers are skipped:
    a gauge needs a number, and guessing units from text would mislead a chart."""
    found: dict[str, float] = {}
    for path in paths:
        node: Any = document
        for part in path.split("."):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                node = None
                break
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            continue
        value = float(node)
        if math.isfinite(value):
            found[path] = value
    return found
