"""Many control connections: ``python -m bench.conns '<spec>'`` is the client side (CPU 1).

It opens ``connections`` control WebSockets to one server process, each a protocol 1.0
sensor (JSON frames, fleet token) heartbeating every ``interval_s`` seconds from a random
offset. Heartbeats alternate ``queue_depth`` 1 and 0: a heartbeat reporting a backlog
makes the server grant a window and send a ``chunk_request``; the time from sending that
heartbeat to receiving the request is the handling latency measured (decode, session,
scheduler, window persisted, request encoded and sent). The next heartbeat (depth 0)
settles the window, so every other heartbeat is measured and windows do not pile up.

Prints ``{"connected": n}`` once every socket is open (the parent then reads the server's
resident memory), and at the end the latency percentiles.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
from typing import Any

import aiohttp

from bench.procs import BENCH_TOKEN, raise_nofile


def _heartbeat(sensor_id: str, depth: int) -> str:
    return json.dumps({
        "schema_version": "1.0.0", "sensor_id": sensor_id,
        "sent_at": "2026-11-27T05:00:00+00:00", "capabilities": ["chunks", "heartbeats"],
        "body_type": "heartbeat",
        "body": {"software_version": "bench-1.0", "last_committed_sequence": 0,
                 "queue_depth": depth, "clock_skew_ms": 0.0}})


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    count, url = int(spec["connections"]), spec["url"]
    interval, duration = float(spec["interval_s"]), float(spec["duration_s"])
    latencies: list[float] = []
    state = {"sent": 0, "answered": 0, "errors": 0}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        gate = asyncio.Semaphore(100)

        async def connect(index: int) -> aiohttp.ClientWebSocketResponse:
            sensor_id = f"bench-conn-{index:05d}"
            async with gate:
                return await http.ws_connect(url, headers={
                    "X-Sensor-ID": sensor_id, "Authorization": f"Bearer {BENCH_TOKEN}"},
                    autoping=True, heartbeat=None)

        sockets = await asyncio.gather(*(connect(i) for i in range(count)))
        # The client is the measuring instrument: keep its own full collections (which
        # walk every socket object) out of the latencies it measures, as the server does.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 50, 1_000)
        sys.stdout.write(json.dumps({"connected": len(sockets)}) + "\n")
        sys.stdout.flush()
        end = time.monotonic() + duration

        async def sensor(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            sensor_id = f"bench-conn-{index:05d}"
            waiting: list[float] = []

            async def reader() -> None:
                async for msg in ws:
                    if msg.type is aiohttp.WSMsgType.TEXT and '"chunk_request"' in msg.data:
                        if waiting:
                            latencies.append(time.monotonic() - waiting.pop(0))
                            state["answered"] += 1

            reading = asyncio.ensure_future(reader())
            await asyncio.sleep(random.uniform(0, interval))
            depth = 1
            try:
                while time.monotonic() < end:
                    if depth:
                        waiting.append(time.monotonic())
                        state["sent"] += 1
                    await ws.send_str(_heartbeat(sensor_id, depth))
                    depth = 1 - depth
                    await asyncio.sleep(interval)
                await asyncio.sleep(1.0)  # the last answers
            except (aiohttp.ClientError, ConnectionError, RuntimeError):
                state["errors"] += 1
            finally:
                reading.cancel()
                await ws.close()

        await asyncio.gather(*(sensor(i, ws) for i, ws in enumerate(sockets)))
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000.0

    return {"connections": count, "measured": state["sent"], "answered": state["answered"],
            "errors": state["errors"], "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "max_ms": pct(1.0)}


def main() -> int:
    spec = json.loads(sys.argv[1])
    raise_nofile(int(spec["connections"]) + 1024)
    result = asyncio.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
