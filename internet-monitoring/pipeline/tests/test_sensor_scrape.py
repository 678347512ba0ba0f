"""``sources.scrape``: the agent scrapes a real local exporter (a tiny aiohttp server) and
queues what it read as a remote-write event, labelled and timed as Prometheus would."""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest
from aiohttp import web

from pipeline.common import remote_write as rw
from pipeline.common.config import sensor_config_from_dict
from pipeline.sensor.group_commit import GroupCommitter
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.scrape import Scraper
from pipeline.sensor.sources import SensorSources
from pipeline.tests.remote_write_support import queued_writes
from pipeline.tests.server_support import eventually

NOW_S = 1_795_755_600.25


class Exporter:
    """Serves a counter that grows on every scrape, and a few fixed lines."""

    def __init__(self) -> None:
        self.scrapes = 0
        self.status = 200
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        text = ("# HELP fast_download_bits_per_second Download speed\n"
                "# TYPE fast_download_bits_per_second gauge\n"
                f"fast_download_bits_per_second {93_100_000 + self.scrapes}\n"
                "# TYPE probe_success gauge\n"
                'probe_success{job="exporter-side",target="1.1.1.1"} 1 1795755500123\n'
                "wifi_signal_dbm NaN\n")
        return web.Response(text=text, status=self.status)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    server = Exporter()
    await server.start()
    yield server
    await server.close()


def _config(url: str, tmp_path: Path, interval: float = 15.0) -> object:
    return sensor_config_from_dict({
        "sensor_id": "pi-scrape", "token": "s" * 32,
        "queue": {"path": str(tmp_path / "queue.db")},
        "sources": {"scrape": [{"url": url, "job": "fast", "interval": interval}]}})


def _by_name(series: list[rw.Series]) -> dict[str, rw.Series]:
    return {one.name: one for one in series}


@asynccontextmanager
async def _scraping(config: object, queue: DurableQueue) -> AsyncIterator[Scraper]:
    """An open Scraper of ``config``'s targets writing to ``queue`` at ``NOW_S``; closed
    (its committer flushed) on the way out."""
    committer = GroupCommitter(queue, max_event_bytes=1 << 20, delay_s=0)
    scraper = Scraper(config.sources.scrape, committer, clock=lambda: NOW_S)  # type: ignore[attr-defined]
    await scraper.open()
    try:
        yield scraper
    finally:
        await scraper.close()
        await committer.close()


async def test_one_scrape_is_queued_with_job_instance_up_and_timestamps(
        exporter: Exporter, tmp_path: Path) -> None:
    config = _config(exporter.url, tmp_path)
    queue = DurableQueue(tmp_path / "queue.db")
    async with _scraping(config, queue) as scraper:
        assert await scraper.scrape_once(config.sources.scrape[0])  # type: ignore[attr-defined]
    [write] = queued_writes(queue)
    queue.close()
    assert write.attributes == {rw.CONTENT_TYPE_ATTRIBUTE: rw.EVENT_CONTENT_TYPE,
                                "source": "scrape"}
    got = _by_name(write.series)
    target = (("instance", f"127.0.0.1:{exporter.port}"), ("job", "fast"))
    scrape_ms = 1_795_755_600_250
    assert got["fast_download_bits_per_second"] == rw.Series(
        (("__name__", "fast_download_bits_per_second"), *target),
        ((scrape_ms, 93_100_001.0),))
    # The exporter's own timestamp is kept; its job label becomes exported_job.
    assert got["probe_success"] == rw.Series(
        (("__name__", "probe_success"), ("exported_job", "exporter-side"), *target,
         ("target", "1.1.1.1")), ((1_795_755_500_123, 1.0),))
    assert math.isnan(got["wifi_signal_dbm"].samples[0][1])
    assert got["up"].samples == ((scrape_ms, 1.0),)
    assert got["scrape_samples_scraped"].samples == ((scrape_ms, 3.0),)
    assert dict(got["up"].labels) == {"__name__": "up", **dict(target)}


async def test_failed_scrapes_queue_up_zero(exporter: Exporter, tmp_path: Path) -> None:
    exporter.status = 500
    config = _config(exporter.url, tmp_path)
    queue = DurableQueue(tmp_path / "queue.db")
    async with _scraping(config, queue) as scraper:
        assert await scraper.scrape_once(config.sources.scrape[0])  # type: ignore[attr-defined]
        await exporter.close()  # now refused
        assert await scraper.scrape_once(config.sources.scrape[0])  # type: ignore[attr-defined]
    writes = queued_writes(queue)
    queue.close()
    assert len(writes) == 2
    for write in writes:
        got = _by_name(write.series)
        assert set(got) == {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
        assert got["up"].samples == ((1_795_755_600_250, 0.0),)
    assert scraper.outcomes[("fast", "failed")] == 2


async def test_agent_sources_scrape_on_their_interval(exporter: Exporter, tmp_path: Path
                                                      ) -> None:
    config = _config(exporter.url, tmp_path, interval=0.2)
    queue = DurableQueue(tmp_path / "queue.db")
    sources = SensorSources(config, queue)  # type: ignore[arg-type]
    await sources.start()
    try:
        await eventually(lambda: sources.scraper.outcomes[("fast", "ok")] >= 3,
                         what="three scrapes queued")
    finally:
        await sources.close()
    values = sorted(_by_name(w.series)["fast_download_bits_per_second"].samples[0][1]
                    for w in queued_writes(queue))
    queue.close()
    # Every scrape the exporter served is queued once (one may be cut by the close).
    assert values == [93_100_000.0 + n for n in range(1, len(values) + 1)]
    assert exporter.scrapes - 1 <= len(values) <= exporter.scrapes
    assert len(values) >= sources.scraper.outcomes[("fast", "ok")] >= 3
