"""Process-level figures a long run needs to spot leaks, on an injected registry.

``pipeline_asyncio_tasks`` counts the tasks alive on the process's event loop: a task
that is created per connection or per request and never ends shows up here long before
it shows up in memory. ``pipeline-sim --soak`` reads it from every process's ``/metrics``
next to resident memory and open descriptors (read from ``/proc``).
"""

from __future__ import annotations

import asyncio
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TASKS_METRIC = "pipeline_asyncio_tasks"


class AsyncioTasksCollector(Collector):
    """Reads ``len(asyncio.all_tasks(loop))`` at scrape time (any thread: ``all_tasks``
    copes with the set changing while it is read)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(TASKS_METRIC, "asyncio tasks alive on the event loop")
        family.add_metric([], float(len(asyncio.all_tasks(self._loop))))
        yield family


def register_task_gauge(registry: CollectorRegistry, loop: asyncio.AbstractEventLoop) -> None:
    """Register the collector once per registry (a restarted component reuses it)."""
    if getattr(registry, "_pipeline_tasks_registered", False):
        return
    registry.register(AsyncioTasksCollector(loop))
    registry._pipeline_tasks_registered = True  # type: ignore[attr-defined]
