"""A deployed protocol 1.0 sensor on a bad link: drain a backlog and check exactly once.

Real processes: ``pipeline-server`` on a fresh SQLite file with the platform's scheduler
settings, the 1.0 emulator (``pipeline.sim.legacy_sensor``) with its own queue file, and the
fault proxy in front of ingest (and, with ``--proxy both``, of control) resetting and
hanging connections. The run ends when the sensor's queue is empty and the server holds
every event (or at ``--timeout``); the result says how long that took, how many events the
server had at ``--checkpoint`` seconds, and what duplicates and stale acks it cost::

    python -m pipeline.sim.legacy_link --events 300 --size 20480 --timeout 400

Exit status 0 when the queue drained and every event is stored exactly once, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.sim.faults import DirectionFaults, FaultPlan, LinkFaults
from pipeline.sim.legacy_sensor import LegacyQueue, QueuedEvent, fill_queue
from pipeline.sim.processes import ManagedProcess, ServerProcess
from pipeline.sim.proxy import FaultProxy

SENSOR_ID = "legacy-01"
TOKEN = "legacy-token-0123456789"
# What a deployed server.yml holds (platform.md: pipeline_server_request_*).
PLATFORM_SCHEDULER = {"max_chunks": 32, "max_bytes": 2_097_152, "max_in_flight": 32,
                      "window_timeout_s": 10.0, "quiet_s": 1.0}


@dataclass(frozen=True)
class LinkSettings:
    events: int = 300
    size: int = 20 * 1024
    proxy_control: bool = False
    seed: int = 1
    reset_at_connect_p: float = 0.07
    reset_mid_stream_p: float = 0.03
    hang_p: float = 0.10
    timeout_s: float = 400.0
    checkpoint_s: float = 180.0
    heartbeat_interval_s: float = 30.0
    ingest_timeout_s: float = 10.0
    ping_interval_s: float = 20.0
    window_timeout_s: float = 10.0


@dataclass
class LinkResult:
    settings: dict[str, Any]
    drained: bool = False
    drain_s: float | None = None
    stored_at_checkpoint: int | None = None
    stored: int = 0
    exactly_once: bool = False
    missing: int = 0
    duplicated_events: int = 0
    corrupt: int = 0
    queue_depth: int = -1
    server_duplicates: float = 0.0
    server_reacked: float = 0.0
    proxy: dict[str, int] = field(default_factory=dict)
    sensor: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.drained and self.exactly_once and self.queue_depth == 0


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _sensor_stats(log_text: str) -> dict[str, int]:
    found = re.findall(r"legacy_stopped (.*)", log_text)
    if not found:
        return {}
    return {k: int(v) for k, v in (p.split("=", 1) for p in found[-1].split())}


def _check(expected: list[QueuedEvent], stored: list[dict[str, Any]], result: LinkResult) -> None:
    by_id: dict[str, list[dict[str, Any]]] = {}
    for doc in stored:
        by_id.setdefault(doc["event_id"], []).append(doc)
    result.stored = len(stored)
    result.missing = sum(1 for e in expected if e.event_id not in by_id)
    result.duplicated_events = sum(1 for docs in by_id.values() if len(docs) > 1)
    for event in expected:
        for doc in by_id.get(event.event_id, []):
            data = _payload(doc)
            if hashlib.sha256(data).hexdigest() != event.event_sha256:
                result.corrupt += 1
    result.exactly_once = (result.missing == 0 and result.duplicated_events == 0
                           and result.corrupt == 0 and len(stored) == len(expected))


def _payload(doc: dict[str, Any]) -> bytes:
    import base64

    return base64.b64decode(doc["payload_base64"])


async def run_link(workdir: Path, settings: LinkSettings) -> LinkResult:
    """One run; every process and proxy is stopped before it returns."""
    result = LinkResult(settings=asdict(settings))
    queue_path = workdir / f"{SENSOR_ID}.db"
    expected = await asyncio.to_thread(fill_queue, queue_path, SENSOR_ID, settings.events,
                                       settings.size, settings.seed)
    scheduler = {**PLATFORM_SCHEDULER, "window_timeout_s": settings.window_timeout_s}
    server = ServerProcess(workdir / "server", {SENSOR_ID: TOKEN},
                           extra_config={
                               "scheduler": scheduler,
                               "heartbeat": {"interval_s": settings.heartbeat_interval_s}})
    await asyncio.to_thread(server.start)
    one_way = DirectionFaults(reset_mid_stream_p=settings.reset_mid_stream_p)
    plan = FaultPlan(seed=settings.seed, faults=LinkFaults(
        upstream=one_way, downstream=one_way, reset_at_connect_p=settings.reset_at_connect_p,
        hang_p=settings.hang_p))
    ingest_proxy = FaultProxy(target_port=server.ingest_port, plan=plan, name="ingest")
    control_proxy = FaultProxy(target_port=server.control_port, plan=plan, name="control")
    await ingest_proxy.start()
    control_url = server.control_url
    if settings.proxy_control:
        await control_proxy.start()
        control_url = control_proxy.url("ws", "/control")
    agent = ManagedProcess(name=SENSOR_ID, log_path=workdir / f"{SENSOR_ID}.log", argv=[
        sys.executable, "-m", "pipeline.sim.legacy_sensor", "run", "--sensor-id", SENSOR_ID,
        "--token", TOKEN, "--control-url", control_url,
        "--ingest-url", ingest_proxy.url("http", "/v1/ingest/chunk"),
        "--queue", str(queue_path), "--heartbeat-interval", str(settings.heartbeat_interval_s),
        "--ingest-timeout", str(settings.ingest_timeout_s),
        "--ping-interval", str(settings.ping_interval_s)])
    started = time.monotonic()
    agent.start()
    try:
        await _wait(server, queue_path, expected, settings, started, result)
    finally:
        await asyncio.to_thread(agent.terminate)
        result.sensor = _sensor_stats(agent.log_text())
        try:
            metrics = await asyncio.to_thread(_get_text, server.http_base + "/metrics")
            result.server_duplicates = _metric(metrics, "server_ingest_duplicate_total")
            result.server_reacked = _metric(metrics, "pipeline_chunks_reacked_total")
            stored = await asyncio.to_thread(server.events, SENSOR_ID)
            _check(expected, stored, result)
        finally:
            result.proxy = {**{f"ingest_{k}": v for k, v in asdict(ingest_proxy.stats).items()},
                            **({f"control_{k}": v for k, v in asdict(control_proxy.stats).items()}
                               if settings.proxy_control else {})}
            await ingest_proxy.stop()
            if settings.proxy_control:
                await control_proxy.stop()
            await asyncio.to_thread(server.terminate)
    result.queue_depth = await asyncio.to_thread(_depth, queue_path)
    return result


def _depth(path: Path) -> int:
    queue = LegacyQueue(path)
    try:
        return queue.depth()
    finally:
        queue.close()


def _get_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


def _stored_count(server: ServerProcess) -> int:
    """Events the server completed (one server, one sensor: its counter is ours)."""
    return int(_metric(_get_text(server.http_base + "/metrics"),
                       "pipeline_events_completed_total"))


async def _wait(server: ServerProcess, queue_path: Path, expected: list[QueuedEvent],
                settings: LinkSettings, started: float, result: LinkResult) -> None:
    while True:
        elapsed = time.monotonic() - started
        depth = await asyncio.to_thread(_depth, queue_path)
        stored = await asyncio.to_thread(_stored_count, server)
        if result.stored_at_checkpoint is None and elapsed >= settings.checkpoint_s:
            result.stored_at_checkpoint = stored
        if depth == 0 and stored >= len(expected):
            result.drained = True
            result.drain_s = round(elapsed, 1)
            return
        if elapsed >= settings.timeout_s:
            return
        await asyncio.sleep(0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.sim.legacy_link",
                                     description=__doc__.split("\n\n")[0])
    defaults = LinkSettings()
    parser.add_argument("--events", type=int, default=defaults.events)
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--proxy", choices=("ingest", "both"), default="ingest")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--hang-p", type=float, default=defaults.hang_p)
    parser.add_argument("--reset-at-connect-p", type=float, default=defaults.reset_at_connect_p)
    parser.add_argument("--reset-mid-stream-p", type=float, default=defaults.reset_mid_stream_p)
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s)
    parser.add_argument("--checkpoint", type=float, default=defaults.checkpoint_s)
    parser.add_argument("--heartbeat-interval", type=float, default=defaults.heartbeat_interval_s)
    parser.add_argument("--ingest-timeout", type=float, default=defaults.ingest_timeout_s)
    parser.add_argument("--ping-interval", type=float, default=defaults.ping_interval_s)
    parser.add_argument("--window-timeout", type=float, default=defaults.window_timeout_s,
                        help="the server's scheduler.window_timeout_s (10)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = LinkSettings(events=args.events, size=args.size,
                            proxy_control=args.proxy == "both", seed=args.seed,
                            reset_at_connect_p=args.reset_at_connect_p,
                            reset_mid_stream_p=args.reset_mid_stream_p, hang_p=args.hang_p,
                            timeout_s=args.timeout, checkpoint_s=args.checkpoint,
                            heartbeat_interval_s=args.heartbeat_interval,
                            ingest_timeout_s=args.ingest_timeout,
                            ping_interval_s=args.ping_interval,
                            window_timeout_s=args.window_timeout)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="legacy-link-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run_link(workdir, settings))
    doc = {**asdict(result), "ok": result.ok, "workdir": str(workdir)}
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
