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

Operator extras: ``pipeline_chunks_ingested_total``, ``pipeline_bytes_ingested_total``,
``pipeline_events_completed_total``, ``pipeline_rejected_total{reason}``,
``pipeline_auth_failures_total``, ``pipeline_windows_open``,
``pipeline_heartbeat_age_seconds{sensor_id}``, ``pipeline_clock_skew_ms{sensor_id}``.
"""

from __future__ import annotations

from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.common.messages import Heartbeat

LATENCY_BUCKETS_MS = (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
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

    # -- updates ------------------------------------------------------------------------

    def on_heartbeat(self, sensor_id: str, heartbeat: Heartbeat) -> None:
        self.queue_depth.labels(sensor_id).set(heartbeat.queue_depth)
        self.clock_skew.labels(sensor_id).set(heartbeat.clock_skew_ms)
        self.heartbeat_age.labels(sensor_id).set(0.0)
        if heartbeat.retry_total is not None:
            self.chunk_retry.labels(sensor_id).set(heartbeat.retry_total)

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

    def refresh(self, now: float, *, heartbeats: Mapping[str, float],
                snapshots: Mapping[str, float], windows_open: int) -> None:
        """Recompute the time-derived gauges (called on scrape and by the timer).

        ``heartbeats`` and ``snapshots`` map sensor ids to the wall-clock time of the last
        heartbeat / snapshot update."""
        for sensor_id, at in heartbeats.items():
            self.heartbeat_age.labels(sensor_id).set(max(0.0, now - at))
        for sensor_id, at in snapshots.items():
            self.snapshot_age.labels(sensor_id).set(max(0.0, now - at))
        self.windows_open.set(windows_open)

    def render(self) -> bytes:
        return generate_latest(self.registry)
