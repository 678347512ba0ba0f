"""The agent's result sources besides ``submit`` (``sources`` in the configuration): the
remote-write receiver and the scraper, sharing one ``GroupCommitter``, and their metrics::

    sensor_remote_write_requests_total{sensor_id, outcome}  accepted / malformed /
                                                            too_large / unavailable
    sensor_remote_write_samples_total{sensor_id}            samples accepted (204)
    sensor_remote_write_commits_total{sensor_id}            queue transactions of
                                                            receiver and scraper data
    sensor_scrapes_total{sensor_id, job, outcome}           ok / failed / not_queued
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline.common.config.sources_schema import SourcesConfig
from pipeline.sensor.group_commit import GroupCommitter
from pipeline.sensor.remote_write_server import OUTCOMES, RemoteWriteServer
from pipeline.sensor.scrape import Scraper

if TYPE_CHECKING:
    from pipeline.common.config import SensorConfig
    from pipeline.sensor.queue import DurableQueue

log = logging.getLogger(__name__)


class SensorSources:
    """Starts and stops what ``config.sources`` asks for; nothing when it is empty."""

    def __init__(self, config: SensorConfig, queue: DurableQueue, *,
                 registry: CollectorRegistry | None = None,
                 on_committed: Callable[[], None] | None = None) -> None:
        sources = getattr(config, "sources", None) or SourcesConfig()
        settings = sources.remote_write
        self.sensor_id = config.sensor_id
        self.committer = GroupCommitter(queue, max_event_bytes=settings.batch_max_bytes,
                                        delay_s=settings.batch_delay_ms / 1000,
                                        on_committed=on_committed)
        self.receiver = (RemoteWriteServer(settings, self.committer)
                         if settings.listen else None)
        self.scraper = Scraper(sources.scrape, self.committer)
        if registry is not None:
            registry.register(SourcesCollector(self))

    @property
    def remote_write_port(self) -> int | None:
        return self.receiver.port if self.receiver is not None else None

    async def start(self) -> None:
        if self.receiver is not None:
            await self.receiver.start()
        await self.scraper.start()

    async def close(self) -> None:
        """Stop taking data, then commit what was already taken."""
        if self.receiver is not None:
            await self.receiver.close()
        await self.scraper.close()
        await self.committer.close()


class SourcesCollector(Collector):
    def __init__(self, sources: SensorSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        sid = self._sources.sensor_id
        receiver = self._sources.receiver
        requests = CounterMetricFamily("sensor_remote_write_requests",
                                       "Remote-write requests answered, by outcome",
                                       labels=["sensor_id", "outcome"])
        for outcome in OUTCOMES:
            requests.add_metric([sid, outcome],
                                receiver.outcomes[outcome] if receiver is not None else 0)
        yield requests
        samples = CounterMetricFamily("sensor_remote_write_samples",
                                      "Remote-write samples accepted into the queue",
                                      labels=["sensor_id"])
        samples.add_metric([sid], receiver.samples if receiver is not None else 0)
        yield samples
        commits = CounterMetricFamily("sensor_remote_write_commits",
                                      "Queue transactions of remote-write and scrape data",
                                      labels=["sensor_id"])
        commits.add_metric([sid], self._sources.committer.commits)
        yield commits
        scrapes = CounterMetricFamily("sensor_scrapes", "Scrapes by job and outcome",
                                      labels=["sensor_id", "job", "outcome"])
        for (job, outcome), count in sorted(self._sources.scraper.outcomes.items()):
            scrapes.add_metric([sid, job, outcome], count)
        yield scrapes
