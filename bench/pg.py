"""``make bench`` section ``postgres``: server ingest with ``store.engine: postgres`` next to
the same load on the SQLite store, in the same run (one server process, one worker).

Each schema is fresh (created in the database ``PIPELINE_BENCH_PGDSN`` names, default the
local test database) and dropped afterwards. Loads: protocol 1.0 JSON single-chunk POSTs
and Protobuf batches of 1 KiB chunks, concurrency 8.
"""

from __future__ import annotations

import os
import shutil
import statistics
import uuid
from pathlib import Path
from typing import Any, Callable

from bench.procs import BenchError, ServerProcess

BASE_DSN = os.environ.get("PIPELINE_BENCH_PGDSN",
                          "host=127.0.0.1 port=5432 dbname=test user=postgres connect_timeout=5")
KIB = 1024
PLAN = (("json", 1500, 1), ("proto_batch", 160, 256))  # mode, requests at full scale, batch
CONCURRENCY = 8

Load = Callable[[int, str, int, int, int, int, str], dict[str, Any]]


def _schema() -> str:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(BASE_DSN, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
    except psycopg.Error as exc:
        raise BenchError(f"postgres: no database at {BASE_DSN!r}: {exc}") from exc
    return name


def _drop(schema: str) -> None:
    import psycopg

    with psycopg.connect(BASE_DSN, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _one_run(work: Path, engine: str, mode: str, requests: int, batch: int, run: int,
             load: Load) -> dict[str, Any]:
    schema = _schema() if engine == "postgres" else ""
    extra = ({"store": {"engine": "postgres",
                        "dsn": f"{BASE_DSN} options='-c search_path={schema}'"}}
             if engine == "postgres" else None)
    server = ServerProcess(work / f"pg-{engine}-{mode}-{run}", extra=extra)
    try:
        server.start()
        try:
            return load(server.ingest_port, mode, KIB, CONCURRENCY, requests, batch,
                        f"{engine[0]}{run}")
        finally:
            server.stop()
    finally:
        shutil.rmtree(server.workdir, ignore_errors=True)
        if schema:
            _drop(schema)


def measure(work: Path, runs: int, n: Callable[[int, int], int], load: Load
            ) -> list[tuple[str, list[float], list[float], dict[str, Any]]]:
    """(name, PostgreSQL chunks/s per run, SQLite chunks/s per run, extra) per load."""
    out = []
    for mode, full, batch in PLAN:
        requests = n(full, CONCURRENCY * 2)
        pg_rates: list[float] = []
        sqlite_rates: list[float] = []
        p99: list[float] = []
        for run in range(runs):
            result = _one_run(work, "postgres", mode, requests, batch, run, load)
            pg_rates.append(result["chunks_per_s"])
            p99.append(result["latency_p99_ms"])
            sqlite_rates.append(_one_run(work, "sqlite", mode, requests, batch, run,
                                         load)["chunks_per_s"])
        label = "JSON 1.0 single-chunk POSTs" if mode == "json" else "Protobuf batches"
        out.append((f"PostgreSQL store: {label}, 1 KiB, c={CONCURRENCY}, 1 worker",
                    pg_rates, sqlite_rates,
                    {"latency_p99_ms": p99, "latency_p99_ms_median": statistics.median(p99),
                     "requests": requests, "batch": batch}))
    return out
