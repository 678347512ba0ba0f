"""``sources.scrape``: the agent scrapes exporters itself, for hosts without a Prometheus.

One task per target: every ``interval`` seconds a GET (aiohttp, timeout below the
interval, ``Accept`` asking for the text format), parsed by ``scrape_convert`` and queued
through the ``GroupCommitter`` as a remote-write event like the receiver's. A failed scrape
(refused, timeout, non-200, unparsable) still queues ``up 0``. A scrape whose commit fails
(full queue) is logged and counted; its samples are lost: there is no sender to retry it,
and the next scrape reads fresh values.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Callable

import aiohttp

from pipeline.common.config.sources_schema import ScrapeTargetConfig
from pipeline.common.errors import PipelineError
from pipeline.common.remote_write import build
from pipeline.sensor.group_commit import GroupCommitter
from pipeline.sensor.scrape_convert import (
    ExpositionError,
    ScrapeTarget,
    parse_exposition,
    report_series,
)

log = logging.getLogger(__name__)

ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
MAX_SCRAPE_BYTES = 16 * 1024 * 1024


class ScrapeFailed(Exception):
    """The exporter could not be read (the reason is the message)."""


class Scraper:
    """Scrapes every configured target on its interval until ``close``."""

    def __init__(self, targets: tuple[ScrapeTargetConfig, ...], committer: GroupCommitter,
                 *, clock: Callable[[], float] = time.time) -> None:
        self._targets = targets
        self._committer = committer
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: (job, outcome) -> scrapes; outcome ok / failed / not_queued.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    async def open(self) -> None:
        """The HTTP client only (``scrape_once`` on demand, no interval tasks)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"Accept": ACCEPT})

    async def start(self) -> None:
        if not self._targets:
            return
        await self.open()
        for target in self._targets:
            self._tasks.append(asyncio.create_task(self._loop(target),
                                                   name=f"scrape-{target.job}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self, target: ScrapeTargetConfig) -> None:
        next_at = time.monotonic()
        while True:
            await self.scrape_once(target)
            next_at += target.interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow commit): skip the missed slots
                next_at = time.monotonic() + target.interval
                delay = target.interval
            await asyncio.sleep(delay)

    async def scrape_once(self, target: ScrapeTargetConfig) -> bool:
        """Scrape ``target`` once and queue the result; True when the scrape was queued."""
        where = ScrapeTarget(job=target.job, instance=target.instance)
        scrape_ms = int(self._clock() * 1000)
        started = time.monotonic()
        try:
            text = await self._fetch(target)
            series = parse_exposition(text, where, scrape_ms)
            up = True
        except (ScrapeFailed, ExpositionError) as exc:
            log.warning("scrape_failed job=%s url=%s error=%r", target.job, target.url,
                        str(exc)[:300])
            series, up = [], False
        duration = time.monotonic() - started
        series += report_series(where, scrape_ms, up=up, duration_s=duration,
                                samples=len(series))
        try:
            await self._committer.write(build(series).SerializeToString(), source="scrape")
        except PipelineError as exc:
            log.warning("scrape_not_queued job=%s error=%s message=%s", target.job, exc.code,
                        exc.message)
            self.outcomes[(target.job, "not_queued")] += 1
            return False
        self.outcomes[(target.job, "ok" if up else "failed")] += 1
        return True

    async def _fetch(self, target: ScrapeTargetConfig) -> str:
        if self._session is None:
            raise ScrapeFailed("scraper not started")
        timeout = aiohttp.ClientTimeout(total=target.effective_timeout)
        try:
            async with self._session.get(target.url, timeout=timeout) as response:
                if response.status != 200:
                    raise ScrapeFailed(f"HTTP status {response.status}")
                body = await _read_capped(response)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ScrapeFailed(f"{type(exc).__name__}: {exc}") from exc
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ScrapeFailed("body is not UTF-8") from exc


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in response.content.iter_chunked(64 * 1024):
        size += len(part)
        if size > MAX_SCRAPE_BYTES:
            raise ScrapeFailed(f"body over {MAX_SCRAPE_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)
