"""A real Prometheus agent (Debian's prometheus 2.42, ``--enable-feature=agent``) scrapes a
tiny exporter and remote-writes into the sensor's receiver: the queue holds every value
the exporter served, each once, with Prometheus's job/instance labels (the receiver alone;
the end-to-end path through the server is rw14d's acceptance test)."""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from pipeline.sensor.queue import DurableQueue
from pipeline.tests.conftest import require_tool
from pipeline.tests.remote_write_support import all_series, sources_for
from pipeline.tests.server_support import eventually


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
async def test_prometheus_agent_writes_every_scraped_value_once(tmp_path: Path) -> None:
    prometheus = require_tool("prometheus")
    served: list[int] = []

    async def metrics(request: web.Request) -> web.Response:
        served.append(len(served) + 1)
        return web.Response(text=f"# TYPE bench_value gauge\nbench_value {served[-1]}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    exporter_port = int(runner.addresses[0][1])

    queue = DurableQueue(tmp_path / "queue.db")
    sources = sources_for(queue, tmp_path)
    await sources.start()
    config = {
        "global": {"scrape_interval": "1s", "external_labels": {"sensor": "pi-test"}},
        "scrape_configs": [{"job_name": "exporter", "static_configs": [
            {"targets": [f"127.0.0.1:{exporter_port}"]}]}],
        "remote_write": [{"name": "openuxi-pipeline",
                          "url": f"http://127.0.0.1:{sources.remote_write_port}/api/v1/write",
                          "queue_config": {"batch_send_deadline": "1s", "max_shards": 2},
                          "metadata_config": {"send": False}}]}
    (tmp_path / "agent.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        prometheus, "--enable-feature=agent", f"--config.file={tmp_path / 'agent.yml'}",
        f"--storage.agent.path={tmp_path / 'wal'}",
        f"--web.listen-address=127.0.0.1:{_free_port()}", stdout=log, stderr=log)

    def values() -> list[tuple[int, float]]:
        found = [s for s in all_series(queue) if s.name == "bench_value"]
        # Stale markers (NaN) are Prometheus's own, not values the exporter served.
        return sorted(sample for s in found for sample in s.samples
                      if not math.isnan(sample[1]))

    try:
        await eventually(lambda: len(values()) >= 4, timeout=40,
                         what="four scraped values in the queue")
    finally:
        proc.terminate()
        await proc.wait()
        log.close()
        await sources.close()
        await runner.cleanup()
    series = [s for s in all_series(queue) if s.name == "bench_value"]
    got = values()
    queue.close()
    assert {s.labels for s in series} == {(
        ("__name__", "bench_value"), ("instance", f"127.0.0.1:{exporter_port}"),
        ("job", "exporter"), ("sensor", "pi-test"))}
    # Each value once, in scrape order, all of them served by the exporter.
    assert [v for _, v in got] == [float(n) for n in range(1, len(got) + 1)]
    assert len({t for t, _ in got}) == len(got)
    assert len(got) <= len(served)
    assert sources.receiver is not None
    assert sources.receiver.outcomes["malformed"] == 0
