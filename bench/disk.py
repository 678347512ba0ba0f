"""Disk-bound baselines and the sensor queue, each in a child pinned to the server's CPU.

``python -m bench.disk raw '<spec>'``    raw SQLite inserts of 1 KiB rows, WAL,
                                        synchronous=FULL: 1 row and 100 rows per transaction
``python -m bench.disk queue '<spec>'``  ``DurableQueue.enqueue`` of 1 KiB events (one event
                                        per transaction, synchronous=FULL) on an empty queue
                                        and on one holding a backlog; plus ``enqueue_many``
                                        of 16 events per transaction
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.payloads import measurement


def _fresh(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(f"{path}{suffix}")
        except FileNotFoundError:
            pass


def raw_rates(workdir: Path, rows_single: int, rows_batched: int) -> dict[str, float]:
    path = workdir / "raw.db"
    _fresh(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    blob = os.urandom(1024)
    started = time.perf_counter()
    for _ in range(rows_single):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (payload) VALUES (?)", (blob,))
        conn.execute("COMMIT")
    single = rows_single / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(rows_batched // 100):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO t (payload) VALUES (?)", [(blob,)] * 100)
        conn.execute("COMMIT")
    batched = (rows_batched // 100) * 100 / (time.perf_counter() - started)
    conn.close()
    _fresh(path)
    return {"rows_per_s_1": single, "rows_per_s_100": batched}


def queue_rates(workdir: Path, events: int, backlog: int) -> dict[str, float]:
    from pipeline.sensor.queue import DurableQueue, EventInput

    data = [measurement(1024, seed) for seed in range(64)]
    out: dict[str, float] = {}
    for label, prefill in (("empty", 0), ("backlog", backlog)):
        path = workdir / f"queue-{label}.db"
        _fresh(path)
        with DurableQueue(path, max_bytes=None) as queue:
            for start in range(0, prefill, 1000):
                queue.enqueue_many([EventInput(data[i % 64])
                                    for i in range(min(1000, prefill - start))])
            depth = queue.queue_depth()
            started = time.perf_counter()
            for i in range(events):
                queue.enqueue(data[i % 64])
            out[f"events_per_s_{label}"] = events / (time.perf_counter() - started)
            out[f"depth_{label}"] = depth
            if label == "empty":
                started = time.perf_counter()
                for i in range(0, events, 16):
                    queue.enqueue_many([EventInput(data[(i + j) % 64]) for j in range(16)])
                out["events_per_s_grouped16"] = (events // 16 * 16) / (time.perf_counter()
                                                                      - started)
        _fresh(path)
    return out


def main() -> int:
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    with tempfile.TemporaryDirectory(prefix="bench-disk-", dir=spec.get("dir")) as tmp:
        if kind == "raw":
            result: dict[str, Any] = raw_rates(Path(tmp), spec["rows_single"],
                                               spec["rows_batched"])
        elif kind == "queue":
            result = queue_rates(Path(tmp), spec["events"], spec["backlog"])
        else:
            raise SystemExit(f"unknown kind {kind!r}")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
