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
    pipeline_chunks_reacked_total{sensor_id}  counter    committed sequences acked again in a
                                                         recovery round (session.AckLedger)
    pipeline_heartbeat_age_seconds{sensor_id} gauge      seconds since the last heartbeat
    pipeline_heartbeat_interval_seconds       gauge      the configured heartbeat interval
    pipeline_clock_skew_ms{sensor_id}         gauge      clock skew reported by the sensor
    pipeline_asyncio_tasks                    gauge      tasks alive on the server's loop
                                                         (common.runtime_metrics; soak checks)
    pipeline_sensor_dropped_total{sensor_id}  gauge      chunks the sensor's queue dropped
                                                         (size/age limits), from heartbeats;
                                                         by reason on the sensor's own
                                                         /metrics (sensor_chunks_dropped_total)
    pipeline_sensor_quarantined_total{sensor_id}
                                              gauge      chunks the sensor quarantined, from
                                                         heartbeats
    pipeline_snapshot_value{sensor_id, field} gauge      allow-listed numeric fields of the
                                                         sensor's latest snapshot
    pipeline_store_disk_full                  gauge      1 while ingest is refused for lack of
                                                         disk (the store's reserve is in use)
    pipeline_store_write_errors_total{operation, kind}
                                              counter    store writes that failed (kind
                                                         disk_full or io_error)

The ``pipeline_sensor_*_total`` and ``sensor_chunk_retry_total`` series are gauges that
mirror counters the sensor keeps (capability ``heartbeat_stats``): they only grow while the
sensor's process (retries) or queue file (dropped, quarantined) lives, and PromQL's
``increase()``/``rate()`` treat a drop to a lower value as a counter reset, which is what a
sensor restart is. Sensors that did not negotiate ``heartbeat_stats`` have no such series.
"""

from __future__ import annotations

import json
import math
import re
from typing import TYPE_CHECKING, AbstractSet, Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.common.messages import Heartbeat
from pipeline.server.read.snapshot_cache import decode_json_payload

if TYPE_CHECKING:
    from pipeline.server.store.port import ChunkStore

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
        self.forwarded_ignored = Counter(
            "pipeline_forwarded_headers_ignored_total",
            "Requests carrying proxy-forwarded identity headers from a peer that is not in "
            "proxy.trusted_proxies (ignored; a forgery attempt or a missing trust entry)",
            ["listener"], registry=r)
        self.acks_pending = Gauge("pipeline_acks_pending",
                                  "Committed sequences whose acks wait for the sensor to "
                                  "reconnect", registry=r)
        self.acks_unsent = Counter("pipeline_acks_unsent_total",
                                   "Held acks given up (sequences) over the hold cap",
                                   ["sensor_id"], registry=r)
        self.reacked = Counter("pipeline_chunks_reacked_total",
                               "Committed sequences acked again (their first ack may have "
                               "died with a control connection)", ["sensor_id"], registry=r)
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
        self._snapshot_paths = SnapshotPaths(self.snapshot_fields)

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
            self.on_stored_batch(sensor_id, stored=0, stored_bytes=0, duplicates=1,
                                 latencies_ms=(latency_ms,))
        else:
            self.on_stored_batch(sensor_id, stored=1, stored_bytes=nbytes, duplicates=0,
                                 latencies_ms=(latency_ms,))

    def on_stored_batch(self, sensor_id: str, *, stored: int, stored_bytes: int,
                        duplicates: int, latencies_ms: Iterable[float]) -> None:
        """One sensor's share of a committed batch: the same values as ``on_stored`` per
        chunk, with each labelled child looked up once (the latency histogram still gets
        one observation per chunk)."""
        if duplicates:
            self.duplicates.labels(sensor_id).inc(duplicates)
        if stored:
            self.chunks_ingested.inc(stored)
            self.bytes_ingested.inc(stored_bytes)
        observe = self.ingest_latency.labels(sensor_id).observe
        for latency_ms in latencies_ms:
            observe(latency_ms)

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

    def on_forwarded_ignored(self, listener: str) -> None:
        self.forwarded_ignored.labels(listener).inc()

    def on_ack_unsent(self, sensor_id: str, sequences: int = 1) -> None:
        self.acks_unsent.labels(sensor_id).inc(sequences)

    def on_reack(self, sensor_id: str, sequences: int) -> None:
        self.reacked.labels(sensor_id).inc(sequences)

    def set_heartbeat_interval(self, seconds: float) -> None:
        self.heartbeat_interval.set(seconds)

    def on_snapshot(self, sensor_id: str, document: Any) -> dict[str, float]:
        """Export the allow-listed numeric fields of a sensor's new latest snapshot.

        A field missing from this snapshot keeps the value it had (the latest result that
        carried it), so a speed test stays on the chart after a DNS test. Returns what was
        set."""
        values = self._snapshot_paths.numbers(document)
        for name, value in values.items():
            self.snapshot_value.labels(sensor_id, name).set(value)
        return values

    def on_snapshot_payload(self, sensor_id: str, data: bytes) -> dict[str, float]:
        """``on_snapshot`` for a raw result: the JSON is parsed only when it can hold one
        of the allow-listed fields (see ``SnapshotPaths.may_match``)."""
        return self.on_snapshot_payloads(sensor_id, [data])

    def on_snapshot_payloads(self, sensor_id: str, payloads: Sequence[bytes]
                             ) -> dict[str, float]:
        """The gauges after a sensor's successive latest results (oldest first), as if
        each had gone through ``on_snapshot`` in turn, with fewer parses.

        A field's gauge ends on the newest result that carries it, so the results are read
        newest first, each only for the fields no newer one had; a result that cannot hold
        any of those (``may_match``) is not parsed. A sensor whose results share their
        fields costs one parse per committed batch instead of one per result."""
        paths = self._snapshot_paths
        wanted = frozenset(paths.paths)
        values: dict[str, float] = {}
        for data in reversed(payloads):
            if not wanted:
                break
            if not paths.may_match(data, wanted):
                continue
            found = paths.numbers(decode_json_payload(data), wanted)
            for name, value in found.items():
                values[name] = value
            wanted = wanted - found.keys()
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


class StoreHealthCollector(Collector):
    """The store's disk state, read at scrape time (``store`` returns the open store or
    None): a flag and in-memory counts, no SQLite read."""

    def __init__(self, store: Callable[[], ChunkStore | None]) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        health = store.health if store is not None else None
        full = GaugeMetricFamily("pipeline_store_disk_full",
                                 "1 while ingest is refused for lack of disk")
        full.add_metric([], 1.0 if store is not None and store.disk_full else 0.0)
        yield full
        errors = CounterMetricFamily("pipeline_store_write_errors",
                                     "Store writes that failed, by operation and kind",
                                     labels=["operation", "kind"])
        for (operation, kind), count in sorted(health.counts().items() if health else ()):
            errors.add_metric([operation, kind], count)
        yield errors


def snapshot_numbers(document: Any, paths: Iterable[str]) -> dict[str, float]:
    """``{path: value}`` for each dotted ``path`` that names a finite number in
    ``document`` (a decoded JSON snapshot). Booleans, strings and containers are skipped:
    a gauge needs a number, and guessing units from text would mislead a chart."""
    return SnapshotPaths(paths).numbers(document)


# A key is written as "name" in UTF-8 JSON unless one of its characters is a \u escape
# (field names are letters, digits, _ and -, which need no other escape).
_JSON_KEY_END = rb'"[ \t\n\r]*:'


class SnapshotPaths:
    """The allow-listed dotted paths, split once: the gauges are updated per completed
    event, on the ingest loop."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths: tuple[str, ...] = tuple(paths)
        self._steps: tuple[tuple[str, tuple[tuple[str, int | None], ...]], ...] = tuple(
            (path, tuple((part, int(part) if part.isascii() and part.isdigit() else None)
                         for part in path.split(".")))
            for path in self.paths)
        # The key names each path needs; a path with no key name (list indexes only) can
        # match any document.
        self._needs: tuple[frozenset[bytes], ...] = tuple(
            frozenset(part.encode() for part, index in steps if index is None)
            for _, steps in self._steps)
        # A path that needs one key name matches as soon as that name is seen.
        self._alone: frozenset[bytes] = frozenset(
            name for need in self._needs if len(need) == 1 for name in need)
        names = sorted(set().union(*self._needs), key=len, reverse=True)
        self._keys = (re.compile(b'"(' + b"|".join(re.escape(n) for n in names) + b")"
                                 + _JSON_KEY_END) if names else None)

    def may_match(self, data: bytes, only: AbstractSet[str] | None = None) -> bool:
        """False only when ``data`` cannot yield a field (of ``only``, default all): every
        such path needs a key that is written nowhere in it. Sound for UTF-8 JSON without
        ``\\u`` escapes; anything else (UTF-16/32, escapes) answers True and is parsed."""
        needs = self._needs if only is None else tuple(
            need for (path, _), need in zip(self._steps, self._needs) if path in only)
        if not needs:
            return False
        if self._keys is None or any(not need for need in needs):
            return True
        alone = self._alone if only is None else frozenset(
            name for need in needs if len(need) == 1 for name in need)
        present: set[bytes] = set()
        for match in self._keys.finditer(data):
            name = match.group(1)
            if name in alone:
                return True
            present.add(name)
        if any(need <= present for need in needs):
            return True
        return b"\\u" in data or json.detect_encoding(data) not in ("utf-8", "utf-8-sig")

    def numbers(self, document: Any, only: AbstractSet[str] | None = None
                ) -> dict[str, float]:
        """``{path: value}`` for the paths (of ``only``, default all) that name a finite
        number in ``document``."""
        found: dict[str, float] = {}
        for path, steps in self._steps:
            if only is not None and path not in only:
                continue
            node: Any = document
            for part, index in steps:
                if isinstance(node, dict):  # what json.loads builds: no ABC check
                    node = node.get(part)
                elif isinstance(node, list):
                    node = node[index] if index is not None and index < len(node) else None
                elif isinstance(node, Mapping):
                    node = node.get(part)
                else:
                    node = None
                if node is None:
                    break
            if isinstance(node, bool) or not isinstance(node, (int, float)):
                continue
            value = float(node)
            if math.isfinite(value):
                found[path] = value
        return found
