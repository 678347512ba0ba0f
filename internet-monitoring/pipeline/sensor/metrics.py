"""The sensor agent's own Prometheus metrics and ``/healthz``, on an optional local port
(``metrics.listen``).

The figures are read at scrape time from the agent's counters and its queue, through a
collector registered on an injected ``CollectorRegistry`` (tests build their own and read
exact values with ``registry.get_sample_value``)::

    sensor_queue_depth{sensor_id}                   gauge    chunks in the queue
    sensor_queue_bytes{sensor_id}                   gauge    compressed bytes in the queue
    sensor_queue_oldest_age_seconds{sensor_id}      gauge    age of the oldest queued chunk
    sensor_chunk_retry_total{sensor_id}             counter  POST attempts repeated (this run)
    sensor_chunks_posted_total{sensor_id}           counter  POSTs answered 2xx (this run)
    sensor_chunks_acked_total{sensor_id}            counter  chunks confirmed durable (this run)
    sensor_chunks_quarantined{sensor_id}            gauge    chunks held in quarantine (file)
    sensor_chunks_dropped_total{sensor_id, reason}  counter  chunks the queue dropped (file)
    sensor_chunks_in_flight{sensor_id}              gauge    chunks sent, not yet confirmed
    sensor_clock_skew_ms{sensor_id}                 gauge    estimated skew to the server
    control_channel_connected{sensor_id}            gauge    1 while the control socket is up
    sensor_control_connects_total{sensor_id}        counter  control connections made
    sensor_control_connect_failures_total{sensor_id} counter failed connection attempts
    sensor_heartbeats_sent_total{sensor_id}         counter  heartbeats sent
    sensor_disk_full{sensor_id}                     gauge    1 while new events are refused for
                                                             lack of disk (the queue's reserve
                                                             is in use)
    sensor_queue_write_errors_total{sensor_id, operation, kind}  counter  queue writes that
                                                             failed: kind disk_full / io_error
    pipeline_asyncio_tasks                          gauge    tasks alive on the agent's loop

The remote-write receiver's and the scraper's counters (``sensor_remote_write_*``,
``sensor_scrapes_total``) are collected by ``sensor/sources.py`` on the same registry.

"this run" counters restart at 0 with the agent process; "file" figures live in the queue
file and survive restarts. ``sensor_queue_depth``, ``sensor_chunk_retry_total`` and
``control_channel_connected`` carry the runbook names the server uses for the same facts,
so one dashboard query works against either endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterator, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.common.errors import ConfigError, QueueError
from pipeline.sensor.http_site import bound_port, start_site

if TYPE_CHECKING:
    from pipeline.sensor.queue import DurableQueue

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
#: Liveness of the agent's event loop (``pipeline-sensor health``, the image's HEALTHCHECK).
HEALTH_PATH = "/healthz"


class AgentFigures(Protocol):
    """What the collector reads from the agent (``SensorAgent`` provides it)."""

    queue: DurableQueue

    @property
    def sensor_id(self) -> str: ...
    def stats(self) -> dict[str, float]: ...


class AgentCollector(Collector):
    """Reads the agent and its queue at every scrape; SQLite reads block, so scrape from a
    worker thread (``SensorMetricsServer`` does)."""

    def __init__(self, agent: AgentFigures) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        sid = agent.sensor_id
        stats = agent.stats()
        queue = agent.queue
        disk_full = bool(getattr(queue, "disk_full", False))  # a stat: no SQLite read
        try:
            depth = queue.queue_depth()
            nbytes = queue.total_bytes()
            oldest = queue.oldest_age_seconds()
            quarantined = queue.quarantined_count()
            dropped = queue.dropped_counts()
        except QueueError as exc:
            log.warning("sensor_metrics_queue_unreadable sensor_id=%s error=%s", sid, exc.code)
            depth = nbytes = quarantined = 0
            oldest = None
            dropped = {}

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["sensor_id"])
            family.add_metric([sid], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=["sensor_id"])
            family.add_metric([sid], value)
            return family

        yield gauge("sensor_queue_depth", "Chunks in the sensor's queue", depth)
        yield gauge("sensor_queue_bytes", "Compressed bytes in the sensor's queue", nbytes)
        yield gauge("sensor_queue_oldest_age_seconds", "Age of the oldest queued chunk",
                    oldest or 0.0)
        yield counter("sensor_chunk_retry", "POST attempts repeated by this agent run",
                      stats["retries"])
        yield counter("sensor_chunks_posted", "Chunk POSTs answered 2xx", stats["posted"])
        yield counter("sensor_chunks_acked", "Chunks confirmed durable by the server",
                      stats["acked"])
        yield gauge("sensor_chunks_quarantined", "Chunks held in the queue's quarantine",
                    quarantined)
        drops = CounterMetricFamily("sensor_chunks_dropped", "Chunks dropped by the queue",
                                    labels=["sensor_id", "reason"])
        for reason, counts in sorted(dropped.items()):
            drops.add_metric([sid, reason], counts.get("chunks", 0))
        yield drops
        yield gauge("sensor_chunks_in_flight", "Chunks sent and not yet confirmed",
                    stats["in_flight"])
        yield gauge("sensor_clock_skew_ms", "Estimated clock skew to the server, ms",
                    stats["clock_skew_ms"])
        yield gauge("control_channel_connected", "1 while the control channel is connected",
                    stats["connected"])
        yield counter("sensor_control_connects", "Control connections made",
                      stats["connects"])
        yield counter("sensor_control_connect_failures", "Failed control connection attempts",
                      stats["connect_failures"])
        yield counter("sensor_heartbeats_sent", "Heartbeats sent", stats["heartbeats"])
        yield gauge("sensor_disk_full", "1 while the queue refuses new events for lack of disk",
                    1.0 if disk_full else 0.0)
        errors = CounterMetricFamily("sensor_queue_write_errors",
                                     "Queue writes that failed, by operation and kind",
                                     labels=["sensor_id", "operation", "kind"])
        health = getattr(queue, "health", None)
        for (operation, kind), count in sorted(health.counts().items() if health else ()):
            errors.add_metric([sid, operation, kind], count)
        yield errors


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port); the config already checked the form."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"metrics.listen must be host:port, got {listen!r}",
                          field="metrics.listen")
    return host.strip("[]"), int(port)


class SensorMetricsServer:
    """``GET /metrics`` for one agent's registry on ``metrics.listen`` (no authentication:
    bind it to loopback or a management network)."""

    def __init__(self, registry: CollectorRegistry, listen: str) -> None:
        self._registry = registry
        self._host, self._port = parse_listen(listen)
        self._runner: web.AppRunner | None = None

    @property
    def port(self) -> int | None:
        return bound_port(self._runner)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._handle)
        app.router.add_get(HEALTH_PATH, self._health)
        runner = web.AppRunner(app, access_log=None)
        await start_site(runner, self._host, self._port, "metrics.listen")
        self._runner = runner
        log.info("sensor_metrics_listening host=%s port=%s path=%s", self._host, self.port,
                 METRICS_PATH)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        """200 while the agent's event loop answers (it serves this very request)."""
        return web.json_response({"status": "ok"})

    async def _handle(self, request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
