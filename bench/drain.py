"""End-to-end drain: a pre-filled sensor queue, a real agent, a real server, until every
event is committed on the server.

Parent: fills the queue file (``enqueue_many``, synchronous=FULL), starts the server
(CPU 0) and ``python -m bench.drain '<spec>'`` (the agent, CPU 1). The agent prints the
``time.monotonic()`` at which ``run()`` starts (queue already open and checked); the
parent polls the queue file's depth (one read of a one-row table every 2 ms) until it is
0: a chunk leaves the queue only once the server has committed it durably, so an empty
queue means everything is on the server. It then stops the agent and counts the events in
the server's store, which must equal what was queued.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.payloads import measurement
from bench.procs import (
    BENCH_TOKEN,
    LOAD_CPU,
    BenchError,
    ServerProcess,
    count_rows,
    pinned,
    python,
)

SENSOR_ID = "drain-sensor"


def fill_queue(path: Path, count: int, size: int) -> None:
    from pipeline.sensor.queue import DurableQueue, EventInput

    with DurableQueue(path, max_bytes=None) as queue:
        step = 500
        for start in range(0, count, step):
            queue.enqueue_many([EventInput(measurement(size, start + i))
                                for i in range(min(step, count - start))])


def queue_depth(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        return int(conn.execute("SELECT chunks FROM totals WHERE id = 1").fetchone()[0])


def run_once(workdir: Path, count: int, size: int, capabilities: list[str],
             timeout: float = 300.0) -> dict[str, Any]:
    """One drain; returns seconds and events/s."""
    workdir.mkdir(parents=True, exist_ok=True)
    queue_path = workdir / "queue.db"
    fill_queue(queue_path, count, size)
    server = ServerProcess(workdir / "server")
    server.start()
    agent: subprocess.Popen[str] | None = None
    log = open(workdir / "agent.log", "a")
    try:
        spec = {"control": f"ws://127.0.0.1:{server.control_port}/control",
                "ingest": f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk",
                "queue": str(queue_path), "capabilities": capabilities}
        agent = subprocess.Popen(pinned(python("-m", "bench.drain", json.dumps(spec)), LOAD_CPU),
                                 stdout=subprocess.PIPE, stderr=log, text=True)
        assert agent.stdout is not None
        line = agent.stdout.readline()
        if not line:
            raise BenchError(f"drain agent did not start; see {workdir / 'agent.log'}")
        started = float(json.loads(line)["started"])
        deadline = time.monotonic() + timeout
        while queue_depth(queue_path) > 0:
            if time.monotonic() > deadline:
                raise BenchError(f"drain of {count} events did not finish in {timeout}s")
            if agent.poll() is not None:
                raise BenchError(f"drain agent exited early; see {workdir / 'agent.log'}")
            time.sleep(0.002)
        elapsed = time.monotonic() - started
    finally:
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(20)
            except subprocess.TimeoutExpired:
                # The figure is already taken (the queue is empty); a slow exit is noted
                # in the agent log and must not stop the benchmark.
                log.write("bench: agent did not exit within 20 s of SIGTERM; killed\n")
                agent.kill()
                agent.wait(10)
                log.flush()
                keep = Path("var") / f"bench-agent-slow-exit-{int(time.time())}.log"
                keep.parent.mkdir(exist_ok=True)
                shutil.copy(workdir / "agent.log", keep)
        server.stop()
        log.close()
    events = count_rows(server.db_path, "events")
    if events != count:
        raise BenchError(f"server holds {events} events, {count} were queued")
    return {"events": count, "size": size, "seconds": elapsed, "events_per_s": count / elapsed}


# ---------------------------------------------------------------------------------------
# The agent child


async def _agent(spec: dict[str, Any]) -> None:
    from pipeline.common.config import exact_capabilities, sensor_config_from_dict
    from pipeline.sensor.agent import SensorAgent
    from pipeline.sensor.queue import DurableQueue

    config = sensor_config_from_dict({
        "sensor_id": SENSOR_ID, "token": BENCH_TOKEN, **exact_capabilities(spec["capabilities"]),
        "queue": {"path": spec["queue"], "max_bytes": None},
        "control": {"url": spec["control"]}, "ingest": {"url": spec["ingest"]}})
    queue = DurableQueue(spec["queue"], max_bytes=None)
    agent = SensorAgent(config, queue)
    loop = asyncio.get_running_loop()
    import signal

    def on_term() -> None:
        agent.stop()
        # Should the agent not be gone in 10 s, its threads' stacks go to the log.
        faulthandler.dump_traceback_later(10, exit=False)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    sys.stdout.write(json.dumps({"started": time.monotonic()}) + "\n")
    sys.stdout.flush()
    try:
        await agent.run()
    finally:
        queue.close()


def main() -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_agent(json.loads(sys.argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
