"""``make bench`` section ``cluster``: several server processes on one PostgreSQL.

Rows (each run in a fresh schema, dropped afterwards; loads from ``bench.loadgen``)::

    events/s per replica, 1 replica    one pipeline-server, JSON 1.0 single-chunk events
    events/s per replica, 2 replicas   two pipeline-servers (one cluster), one load
                                       generator per replica at the same time; the row is
                                       the total / 2, the total is in ``extra``
    PostgreSQL ingest, 2 workers       ``server.workers: 2`` (SO_REUSEPORT), JSON 1.0 and
                                       Protobuf batches, next to the same load on 1 worker
                                       (pg16's ``postgres`` section has the SQLite rows)

Server processes are NOT pinned here (bench/procs.py pins one server to CPU 0): two
replicas pinned to one CPU would measure nothing. On a 2-CPU machine the replicas, the
load generator(s) and PostgreSQL all share the two CPUs, so these rows show what the
cluster costs (bus, ownership, routed acks) rather than how it scales: see
docs/scaling.md for what the figures imply per core.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from bench.pg import BASE_DSN, _drop, _schema
from bench.procs import BenchError, _wait_http, free_port, server_config

KIB = 1024
CONCURRENCY = 8
JSON_REQUESTS = 1500
BATCH_REQUESTS = 160
BATCH = 256

Load = Callable[[int, str, int, int, int, int, str], dict[str, Any]]


class _Server:
    """An unpinned ``pipeline-server`` (or a supervisor of workers) on ephemeral ports."""

    def __init__(self, workdir: Path, dsn: str, workers: int = 1) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.workers = workdir, workers
        self.ingest_port = free_port()
        self.config = server_config(
            workdir, ingest_port=self.ingest_port, control_port=free_port(),
            stream_port=free_port(),
            extra={"store": {"engine": "postgres", "dsn": dsn},
                   "server": {"workers": workers}})
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.server", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_http(f"http://127.0.0.1:{self.ingest_port}/healthz", timeout, self.proc,
                   self.log)
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count("server_started") < self.workers:
            if time.monotonic() > deadline:
                raise BenchError(f"{self.workers} workers not up; log {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _run(work: Path, name: str, servers: int, workers: int, mode: str, requests: int,
         batch: int, load: Load) -> list[dict[str, Any]]:
    """One run: ``servers`` processes on one fresh schema, one load per server at once."""
    schema = _schema()
    dsn = f"{BASE_DSN} options='-c search_path={schema}'"
    procs = [_Server(work / f"{name}-{i}", dsn, workers) for i in range(servers)]
    results: list[dict[str, Any]] = [{} for _ in procs]
    errors: list[Exception] = []
    try:
        for proc in procs:
            proc.start()

        def one(i: int) -> None:
            try:
                results[i] = load(procs[i].ingest_port, mode, KIB, CONCURRENCY, requests,
                                  batch, f"{name[:6]}{i}")
            except (BenchError, OSError, subprocess.SubprocessError, ValueError) as exc:
                # re-raised below, after every load ended
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(servers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results
    finally:
        for proc in procs:
            proc.stop()
            shutil.rmtree(proc.workdir, ignore_errors=True)
        _drop(schema)


def measure(work: Path, runs: int, n: Callable[[int, int], int], load: Load
            ) -> list[tuple[str, str, list[float], str, list[float], dict[str, Any]]]:
    """(name, unit, runs, baseline name, baseline runs, extra) per row."""
    json_n = n(JSON_REQUESTS, CONCURRENCY * 2)
    batch_n = n(BATCH_REQUESTS, CONCURRENCY * 2)
    one: list[float] = []
    two_each: list[float] = []
    two_total: list[float] = []
    for run in range(runs):
        one.append(_run(work, f"one{run}", 1, 1, "json", json_n, 1, load)[0]["chunks_per_s"])
        both = _run(work, f"two{run}", 2, 1, "json", json_n, 1, load)
        total = sum(r["chunks_per_s"] for r in both)
        two_total.append(total)
        two_each.append(total / 2)
    rows: list[tuple[str, str, list[float], str, list[float], dict[str, Any]]] = [
        (("events/s per replica: 2 replicas on one PostgreSQL (JSON 1.0 single-chunk "
          f"events, c={CONCURRENCY} per replica)"), "events/s", two_each,
         "1 replica", one, {"total_events_per_s": two_total})]
    for mode, requests, batch in (("json", json_n, 1), ("proto_batch", batch_n, BATCH)):
        w1: list[float] = []
        w2: list[float] = []
        for run in range(runs):
            w2.append(_run(work, f"w2{mode}{run}", 1, 2, mode, requests, batch,
                           load)[0]["chunks_per_s"])
            w1.append(_run(work, f"w1{mode}{run}", 1, 1, mode, requests, batch,
                           load)[0]["chunks_per_s"])
        label = "JSON 1.0 single-chunk POSTs" if mode == "json" else "Protobuf batches"
        rows.append(((f"PostgreSQL store: {label}, 1 KiB, c={CONCURRENCY}, 2 workers "
                      "(SO_REUSEPORT)"), "chunks/s", w2, "1 worker, unpinned", w1,
                     {"requests": requests, "batch": batch}))
    return rows
