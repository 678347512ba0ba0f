"""Remote write into the sensor agent, then its footprint idle and while draining.

Parent (``run_once``): a real ``pipeline-sensor run`` process (pinned to CPU 0: it is the
measured process) with ``sources.remote_write.listen`` on, its control and ingest URLs
pointing at a server that is not started yet. Then, in order:

1. **receive**: ``python -m bench.remote_write '<spec>'`` (CPU 1) keeps ``senders``
   keep-alive connections with one request each in flight, ``samples`` samples per
   request (one sample per series, six labels, like a Prometheus agent's batches of node
   exporter series), bodies encoded before the clock starts; every answer must be 204.
2. **drain**: the server starts; from its first healthy answer the agent's CPU time
   (``/proc/<pid>/stat``) and peak resident memory are sampled until its queue is empty
   (everything committed on the server, whose event count must equal what was queued).
3. **idle**: connected, empty queue, nothing arriving: CPU time over ``idle_s`` seconds
   and resident memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.loadgen import _read_answer
from bench.procs import (
    BENCH_TOKEN,
    LOAD_CPU,
    SERVER_CPU,
    BenchError,
    Child,
    _wait_http,
    count_rows,
    free_port,
    python,
    rss_kib,
    run_child,
    server_config,
)

T0 = 1_795_755_600_000
#: The agent runs with the allocator setting of its systemd unit and image
#: (internet-monitoring/pipeline/systemd/pipeline-agent.service, docker/sensor.Dockerfile).
AGENT_ENV = {"MALLOC_ARENA_MAX": "2"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def queue_state(path: Path) -> tuple[int, int]:
    """(chunks, events) in the queue file."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as conn:
        chunks = int(conn.execute("SELECT chunks FROM totals WHERE id = 1").fetchone()[0])
        events = int(conn.execute("SELECT COUNT(DISTINCT event_id) FROM chunks").fetchone()[0])
    return chunks, events


def _agent_config(workdir: Path, rw_port: int, metrics_port: int, control_port: int,
                  ingest_port: int) -> Path:
    doc = {"sensor_id": "rw-bench", "token": BENCH_TOKEN,
           "queue": {"path": str(workdir / "queue.db"), "max_bytes": None},
           "control": {"url": f"ws://127.0.0.1:{control_port}/control"},
           "ingest": {"url": f"http://127.0.0.1:{ingest_port}/v1/ingest/chunk"},
           "backoff": {"initial_s": 0.2, "max_s": 0.5},
           "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
           "sources": {"remote_write": {"listen": f"127.0.0.1:{rw_port}"}}}
    path = workdir / "sensor.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_once(workdir: Path, requests: int, senders: int, samples: int,
             idle_s: float, timeout: float = 600.0) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    rw_port, metrics_port = free_port(), free_port()
    control_port, ingest_port = free_port(), free_port()
    config = _agent_config(workdir, rw_port, metrics_port, control_port, ingest_port)
    agent = Child(python("-m", "pipeline.sensor", "--log-level", "WARNING", "run",
                         "--config", str(config)), SERVER_CPU, workdir / "agent.log",
                  env=dict(AGENT_ENV))
    server: Child | None = None
    proc = agent.start()
    try:
        _wait_http(f"http://127.0.0.1:{metrics_port}/healthz", 30, proc, workdir / "agent.log")
        rss_start = rss_kib(agent.pid)
        cpu_before = cpu_seconds(agent.pid)
        load = run_child(python("-m", "bench.remote_write", json.dumps({
            "port": rw_port, "requests": requests, "senders": senders, "samples": samples})),
            LOAD_CPU, timeout=timeout)
        if load["statuses"] != {"204": load["requests"]}:
            raise BenchError(f"remote write answers {load['statuses']}")
        receive_cpu = cpu_seconds(agent.pid) - cpu_before
        rss_receive = rss_kib(agent.pid)
        _, queued_events = queue_state(workdir / "queue.db")

        server_dir = workdir / "server"
        server_dir.mkdir()
        server_yml = server_config(server_dir, ingest_port=ingest_port,
                                   control_port=control_port, stream_port=free_port())
        server = Child(python("-m", "pipeline.server", "--config", str(server_yml)), LOAD_CPU,
                       server_dir / "server.log")
        server_proc = server.start()
        _wait_http(f"http://127.0.0.1:{ingest_port}/healthz", 30, server_proc,
                   server_dir / "server.log")
        started, cpu_start = time.monotonic(), cpu_seconds(agent.pid)
        rss_drain = 0
        deadline = started + timeout
        while queue_state(workdir / "queue.db")[0] > 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise BenchError(f"drain did not finish; see {workdir / 'agent.log'}")
            rss_drain = max(rss_drain, rss_kib(agent.pid))
            time.sleep(0.05)
        drain_s = time.monotonic() - started
        drain_cpu = cpu_seconds(agent.pid) - cpu_start

        time.sleep(2.0)  # the last acks and heartbeats settle
        cpu_idle_start = cpu_seconds(agent.pid)
        time.sleep(idle_s)
        idle_cpu = cpu_seconds(agent.pid) - cpu_idle_start
        rss_idle = rss_kib(agent.pid)
    finally:
        agent.stop()
        if server is not None:
            server.stop()
    stored = count_rows(workdir / "server" / "server.db", "events")
    if stored != queued_events:
        raise BenchError(f"server holds {stored} events, the agent queued {queued_events}")
    return {**load, "receive_cpu_s": receive_cpu, "events": queued_events,
            "drain_s": drain_s, "drain_cpu_pct": 100 * drain_cpu / drain_s,
            "idle_cpu_pct": 100 * idle_cpu / idle_s,
            "rss_start_mib": rss_start / 1024, "rss_receive_mib": rss_receive / 1024,
            "rss_drain_mib": rss_drain / 1024, "rss_idle_mib": rss_idle / 1024}


# ---------------------------------------------------------------------------------------
# The load child


def build_bodies(count: int, samples: int) -> list[bytes]:
    from pipeline.common import remote_write as rw

    bodies = []
    for index in range(count):
        series = [rw.Series((("__name__", f"node_metric_{k % 50}_total"), ("cpu", str(k % 8)),
                             ("instance", "localhost:9100"), ("job", "node"),
                             ("mode", f"m{k // 50}"), ("sensor", "pi-01")),
                            ((T0 + 15_000 * index, float(index * samples + k)),))
                  for k in range(samples)]
        bodies.append(rw.encode(rw.build(series)))
    return bodies


def _request(port: int, body: bytes) -> bytes:
    head = (f"POST /api/v1/write HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: application/x-protobuf\r\nContent-Encoding: snappy\r\n"
            "X-Prometheus-Remote-Write-Version: 0.1.0\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    port, senders = int(spec["port"]), int(spec["senders"])
    per_sender = max(1, int(spec["requests"]) // senders)
    bodies = build_bodies(per_sender * senders, int(spec["samples"]))
    work = [[_request(port, body) for body in bodies[s::senders]] for s in range(senders)]
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in work]
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def sender(index: int) -> None:
        reader, writer = conns[index]
        for request in work[index]:
            started = time.perf_counter()
            writer.write(request)
            status, _ = await _read_answer(reader)
            latencies.append(time.perf_counter() - started)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(senders)))
    elapsed = time.perf_counter() - started
    for _, writer in conns:
        writer.close()
    latencies.sort()
    return {"requests": len(latencies), "seconds": elapsed,
            "requests_per_s": len(latencies) / elapsed,
            "samples_per_s": len(latencies) * int(spec["samples"]) / elapsed,
            "body_bytes": len(bodies[0]),
            "latency_p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "statuses": statuses}


def main() -> int:
    result = asyncio.run(load(json.loads(sys.argv[1])))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
