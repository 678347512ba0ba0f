"""Server resident memory under the issue-12 load: a fleet at one result/s, read-back, burst.

Real processes and sockets: a fresh ``pipeline-server`` (platform scheduler settings) and
N protocol 1.0 agents (``pipeline.sim.legacy_sensor``, in this process, each with its own
queue file) fed one ~2 KiB JSON result per second each. Resident memory of the server
(``VmRSS``) is read at each phase:

    start      server up, sensors connected
    steady     after ``--steady`` seconds of the fleet at one result/s
    read-back  after every event of every sensor was read back through the read API
    burst      after one sensor delivered ``--burst-mb`` MB of 1 MiB events
    read-back2 after reading everything back again

    python -m bench.memory --sensors 30 --steady 240 --burst-mb 123

prints one line per phase and ``--json FILE`` writes them. ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import aiohttp

from pipeline.sim.legacy_link import PLATFORM_SCHEDULER
from pipeline.sim.legacy_sensor import LegacyAgent, LegacyQueue, LegacySettings
from pipeline.sim.processes import ServerProcess
from pipeline.sim.soak import read_proc

MIB = 1024 * 1024


def _result(rng: random.Random, sensor_id: str, index: int) -> bytes:
    doc = {"sensor": sensor_id, "n": index, "test": "speed",
           "download_mbps": round(rng.uniform(10, 900), 2),
           "upload_mbps": round(rng.uniform(1, 200), 2), "rtt_ms": round(rng.uniform(2, 80), 1),
           "dns_ms": round(rng.uniform(1, 40), 1),
           "samples": [round(rng.uniform(0, 1000), 3) for _ in range(150)]}
    return json.dumps(doc).encode()


class Bench:
    def __init__(self, workdir: Path, sensors: int) -> None:
        self.workdir = workdir
        self.ids = [f"mem-{i:03d}" for i in range(sensors)]
        self.tokens = {sid: f"token-{sid}-0123456789" for sid in self.ids}
        self.server = ServerProcess(workdir / "server", self.tokens,
                                    extra_config={"scheduler": PLATFORM_SCHEDULER,
                                                  "heartbeat": {"interval_s": 5.0}})
        self.agents: dict[str, LegacyAgent] = {}
        self.queues: dict[str, LegacyQueue] = {}
        self.phases: list[dict[str, Any]] = []

    def rss(self, phase: str) -> None:
        assert self.server.pid is not None
        rss, fds = read_proc(self.server.pid)
        row = {"phase": phase, "rss_mib": round((rss or 0) / MIB, 1), "fds": fds,
               "t": round(time.monotonic() - self.started, 1)}
        self.phases.append(row)
        sys.stderr.write(f"memory: {phase:<11} rss {row['rss_mib']:7.1f} MiB  fds {fds}\n")

    async def run(self, steady_s: float, burst_mb: int) -> list[dict[str, Any]]:
        self.started = time.monotonic()
        await asyncio.to_thread(self.server.start)
        tasks = []
        for sid in self.ids:
            path = self.workdir / f"{sid}.db"
            self.queues[sid] = LegacyQueue(path)
            agent = LegacyAgent(LegacySettings(
                sensor_id=sid, token=self.tokens[sid], control_url=self.server.control_url,
                ingest_url=self.server.ingest_url, queue_path=path, heartbeat_interval_s=5.0,
                keepalive=True))
            self.agents[sid] = agent
            tasks.append(asyncio.create_task(agent.run()))
        try:
            await asyncio.sleep(2.0)
            self.rss("start")
            await self._steady(steady_s)
            await self._drained()
            self.rss("steady")
            await self._read_back()
            self.rss("read-back")
            await self._burst(burst_mb)
            self.rss("burst")
            await self._read_back()
            self.rss("read-back2")
        finally:
            for agent in self.agents.values():
                agent.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            for queue in self.queues.values():
                queue.close()
            await asyncio.to_thread(self.server.terminate)
        return self.phases

    async def _steady(self, seconds: float) -> None:
        rng = random.Random(1)
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            tick = time.monotonic()
            for sid in self.ids:
                self.queues[sid].enqueue(sid, _result(rng, sid, n))
            n += 1
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))

    async def _burst(self, megabytes: int) -> None:
        rng = random.Random(2)
        sid = self.ids[0]
        for _ in range(megabytes):
            # Half random, half repeated text: compresses like real result bundles.
            data = rng.randbytes(MIB // 2) + b"rtt_ms=12.5;" * (MIB // 24)
            self.queues[sid].enqueue(sid, data)
            await asyncio.sleep(0)
        await self._drained(timeout=600.0)

    async def _drained(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while any(q.depth() for q in self.queues.values()):
            if time.monotonic() > end:
                raise RuntimeError("queues did not drain")
            await asyncio.sleep(0.5)

    async def _read_back(self) -> None:
        async with aiohttp.ClientSession() as http:
            for sid in self.ids:
                after = 0
                while True:
                    url = f"{self.server.http_base}/v1/sensors/{sid}/events?after={after}&limit=500"
                    async with http.get(url) as resp:
                        page = await resp.json()
                    if not page["events"] or page.get("next_after") in (None, after):
                        break
                    after = page["next_after"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sensors", type=int, default=30)
    parser.add_argument("--steady", type=float, default=240.0, help="seconds at 1 result/s")
    parser.add_argument("--burst-mb", type=int, default=123)
    parser.add_argument("--quick", action="store_true", help="3 sensors, 5 s, 4 MB")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.sensors, args.steady, args.burst_mb = 3, 5.0, 4
    workdir = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    phases = asyncio.run(Bench(workdir, args.sensors).run(args.steady, args.burst_mb))
    doc = {"sensors": args.sensors, "steady_s": args.steady, "burst_mb": args.burst_mb,
           "phases": phases}
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    sys.stdout.write(json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
