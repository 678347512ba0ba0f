"""``make bench`` (``python -m bench``): every figure with its baseline from the same run.

Sections (``--only`` picks some; all by default)::

    ingest  chunks/s and MB/s, 1 KiB and 128 KiB chunks, concurrency 1/8/32: protocol 1.0
            JSON single-chunk POSTs and Protobuf batches, each next to the bare aiohttp
            handler (reads the body, answers 200) loaded by the same generator
    disk    raw SQLite inserts, WAL + synchronous=FULL, 1 and 100 rows per transaction
    flat    Protobuf-batch ingest rate into an empty store vs one holding 200k chunks
    queue   sensor enqueue of 1 KiB events (one per transaction) on an empty queue vs a
            100k-chunk backlog, next to the raw one-row-per-transaction rate
    drain   pre-filled queue -> committed on the server, real agent + real server:
            300 x 20 KiB and 10,000 x 1 KiB, proto+batch+http_ack next to a 1.0 sensor
    conns   5,000 control connections heartbeating every 5 s to one server process:
            resident memory per connection and heartbeat handling p99
    reads   Protobuf-batch ingest while the dashboard and read API are read (a heavy read
            every 0.5 s at most), next to the same ingest without reads (bench/reads.py)
    cluster several server processes on one PostgreSQL: events/s per replica with 1 and
            2 replicas, 2 workers (SO_REUSEPORT) next to 1 (bench/cluster.py)
    postgres  JSON 1.0 and Protobuf-batch ingest with store.engine: postgres next to the
            same load on SQLite, one server process (bench/pg.py)
    remote_write  Prometheus remote write into a real sensor agent, 4 senders, 500 samples
            per request; then the agent's CPU and resident memory while it drains to a
            real server and while idle (bench/remote_write.py)

Each figure is the median of ``--runs`` runs (3 by default) with min-max. ``--quick``
(or ``BENCH_QUICK=1``): one run of smaller loads, for a smoke check (not for docs/performance.md).
Prints one table and writes ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import drain as drain_mod
from bench import cluster as cluster_mod
from bench import pg as pg_mod
from bench import reads as reads_mod
from bench import remote_write as rw_mod
from bench.procs import (
    LOAD_CPU,
    SERVER_CPU,
    BareServer,
    BenchError,
    ServerProcess,
    count_rows,
    pinned,
    pinning_available,
    python,
    raise_nofile,
    rss_kib,
    run_child,
)

KIB = 1024
SECTIONS = ("ingest", "disk", "flat", "queue", "drain", "conns", "reads", "postgres",
            "remote_write", "cluster")


@dataclass(frozen=True)
class Scale:
    """How big each load is; ``quick`` divides the full loads."""

    runs: int = 3
    factor: float = 1.0
    flat_rows: int = 200_000
    queue_backlog: int = 100_000
    queue_events: int = 2_000
    drain_small: int = 10_000
    drain_big: int = 300
    connections: int = 5_000
    conns_duration_s: float = 30.0
    conns_interval_s: float = 5.0
    ingest_only: tuple[str, ...] = ()  # "mode:size:concurrency"; empty = all
    rw_requests: int = 8_000
    rw_idle_s: float = 20.0

    def n(self, full: int, minimum: int = 1) -> int:
        return max(minimum, int(full * self.factor))


FULL = Scale()
TINY = Scale(runs=1, factor=0.01, flat_rows=300, queue_backlog=300, queue_events=50,
             drain_small=100, drain_big=20, connections=20, conns_duration_s=2.5,
             conns_interval_s=1.0, ingest_only=("json:1024:1", "proto_batch:1024:8"),
             rw_requests=80, rw_idle_s=1.0)
QUICK = Scale(runs=1, factor=0.15, flat_rows=20_000, queue_backlog=10_000, queue_events=400,
              drain_small=2_000, connections=500, conns_duration_s=11.0, rw_requests=1_200,
              rw_idle_s=5.0)


@dataclass
class Row:
    section: str
    name: str
    unit: str
    runs: list[float]
    baseline_name: str = ""
    baseline_runs: list[float] = field(default_factory=list)
    target: str = ""
    target_check: Callable[[Row], bool] | None = field(default=None, repr=False)
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def baseline(self) -> float | None:
        return statistics.median(self.baseline_runs) if self.baseline_runs else None

    @property
    def ratio(self) -> float | None:
        base = self.baseline
        return self.median / base if base else None

    @property
    def met(self) -> bool | None:
        return None if self.target_check is None else bool(self.target_check(self))

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("target_check")
        doc.update(median=self.median, min=min(self.runs), max=max(self.runs),
                   baseline=self.baseline, ratio=self.ratio, met=self.met)
        return doc


# ---------------------------------------------------------------------------------------
# Sections


def _loadgen(port: int, mode: str, size: int, concurrency: int, requests: int, batch: int,
             prefix: str) -> dict[str, Any]:
    spec = {"port": port, "mode": mode, "size": size, "concurrency": concurrency,
            "requests": requests, "batch": batch, "prefix": prefix}
    result = run_child(python("-m", "bench.loadgen", json.dumps(spec)), LOAD_CPU, timeout=900)
    bad = {k: v for k, v in result["statuses"].items() if k != "200"}
    if bad or result["confirmed"] != result["chunks"]:
        raise BenchError(f"{mode} {size} c={concurrency}: answers {result['statuses']}, "
                         f"confirmed {result['confirmed']} of {result['chunks']}")
    return result


def ingest_plan(scale: Scale) -> list[tuple[str, int, int, int, int]]:
    """(mode, size, concurrency, requests, batch) for every ingest figure."""
    plan = []
    for size in (1 * KIB, 128 * KIB):
        small = size == KIB
        for conc in (1, 8, 32):
            single = {1: 1500, 8: 6000, 32: 12000}[conc] if small else {1: 300, 8: 1200,
                                                                         32: 1600}[conc]
            plan.append(("json", size, conc, scale.n(single, conc * 4), 1))
            batch = 256 if small else 32
            batches = {1: 60, 8: 160, 32: 192}[conc] if small else {1: 40, 8: 80, 32: 96}[conc]
            plan.append(("proto_batch", size, conc, scale.n(batches, conc * 2), batch))
    return plan


def _mode_label(mode: str) -> str:
    return "JSON 1.0 single-chunk POSTs" if mode == "json" else "Protobuf batches"


def section_ingest(work: Path, scale: Scale) -> list[Row]:
    rows = []
    for mode, size, conc, requests, batch in ingest_plan(scale):
        if scale.ingest_only and f"{mode}:{size}:{conc}" not in scale.ingest_only:
            continue
        server_rates, server_mb, bare_rates, lat = [], [], [], []
        for run in range(scale.runs):
            server = ServerProcess(work / f"ingest-{mode}-{size}-{conc}-{run}")
            server.start()
            try:
                result = _loadgen(server.ingest_port, mode, size, conc, requests, batch,
                                  f"i{run}")
            finally:
                server.stop()
                shutil.rmtree(server.workdir, ignore_errors=True)
            server_rates.append(result["chunks_per_s"])
            server_mb.append(result["mb_per_s"])
            lat.append(result["latency_p99_ms"])
        bare = BareServer(work / "bare")
        bare.start()
        try:
            for run in range(scale.runs):
                bare_rates.append(_loadgen(bare.port, mode, size, conc, requests, batch,
                                           f"b{run}")["chunks_per_s"])
        finally:
            bare.stop()
        name = f"{_mode_label(mode)}, {size // KIB} KiB, c={conc}"
        target, check = "", None
        if mode == "json" and size == KIB and conc == 32:
            target = ">= 6,000/s and >= 60 % of bare"
            check = lambda r: r.median >= 6000 and (r.ratio or 0) >= 0.60  # noqa: E731
        elif mode == "proto_batch" and size == KIB and conc == 32:
            target = ">= 40,000/s"
            check = lambda r: r.median >= 40000  # noqa: E731
        elif size == 128 * KIB and conc == 8:
            target = ">= 150 MB/s"
            check = lambda r: r.extra["mb_per_s_median"] >= 150  # noqa: E731
        rows.append(Row("ingest", name, "chunks/s", server_rates,
                        baseline_name="bare aiohttp handler", baseline_runs=bare_rates,
                        target=target, target_check=check,
                        extra={"mb_per_s": server_mb,
                               "mb_per_s_median": statistics.median(server_mb),
                               "latency_p99_ms": lat, "requests": requests, "batch": batch}))
    return rows


def section_disk(work: Path, scale: Scale) -> tuple[list[Row], dict[str, list[float]]]:
    singles, batched = [], []
    for _ in range(scale.runs):
        result = run_child(python("-m", "bench.disk", "raw", json.dumps({
            "rows_single": scale.n(2000, 200), "rows_batched": scale.n(100_000, 5000),
            "dir": str(work)})), SERVER_CPU, timeout=600)
        singles.append(result["rows_per_s_1"])
        batched.append(result["rows_per_s_100"])
    rows = [Row("disk", "raw SQLite insert, 1 KiB rows, 1 row/txn", "rows/s", singles),
            Row("disk", "raw SQLite insert, 1 KiB rows, 100 rows/txn", "rows/s", batched)]
    return rows, {"single": singles, "batched": batched}


def _prefill_store(path: Path, rows: int) -> None:
    from bench.payloads import sensor_chunks
    from contextlib import closing

    from pipeline.common.config import StoreConfig
    from pipeline.server.store import open_store

    with closing(open_store(StoreConfig(path=str(path), reserve_bytes=0))) as store:
        per_sensor = 10_000
        for start in range(0, rows, per_sensor):
            chunks = sensor_chunks(f"prefill-{start // per_sensor:04d}", KIB,
                                   min(per_sensor, rows - start))
            for i in range(0, len(chunks), 2000):
                store.ingest(chunks[i:i + 2000])


def section_flat(work: Path, scale: Scale) -> list[Row]:
    requests, batch, conc = scale.n(160, 16), 256, 8
    template = work / "flat-template"
    template.mkdir(parents=True, exist_ok=True)
    _prefill_store(template / "server.db", scale.flat_rows)
    stored = count_rows(template / "server.db", "chunks")
    empty_rates: list[float] = []
    full_rates: list[float] = []
    for run in range(scale.runs):
        for label, rates in (("empty", empty_rates), ("full", full_rates)):
            workdir = work / f"flat-{label}-{run}"
            workdir.mkdir(parents=True, exist_ok=True)
            if label == "full":
                for suffix in ("", "-wal", "-shm"):
                    source = template / f"server.db{suffix}"
                    if source.exists():
                        shutil.copy(source, workdir / f"server.db{suffix}")
            server = ServerProcess(workdir)
            server.start()
            try:
                rates.append(_loadgen(server.ingest_port, "proto_batch", KIB, conc, requests,
                                      batch, f"f{run}")["chunks_per_s"])
            finally:
                server.stop()
                shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(template, ignore_errors=True)
    return [Row("flat", f"server ingest with {stored:,} chunks stored (Protobuf batches, "
                f"1 KiB, c={conc})", "chunks/s", full_rates, baseline_name="empty store",
                baseline_runs=empty_rates, target=">= 90 % of empty",
                target_check=lambda r: (r.ratio or 0) >= 0.90)]


def section_queue(work: Path, scale: Scale, raw_single: list[float]) -> list[Row]:
    empty, backlog, grouped = [], [], []
    depth = 0
    for _ in range(scale.runs):
        result = run_child(python("-m", "bench.disk", "queue", json.dumps({
            "events": scale.queue_events, "backlog": scale.queue_backlog,
            "dir": str(work)})), SERVER_CPU, timeout=1800)
        empty.append(result["events_per_s_empty"])
        backlog.append(result["events_per_s_backlog"])
        grouped.append(result["events_per_s_grouped16"])
        depth = int(result["depth_backlog"])
    return [
        Row("queue", "sensor enqueue, 1 KiB events, 1 event/txn, empty queue", "events/s",
            empty, baseline_name="raw SQLite 1 row/txn", baseline_runs=raw_single,
            target=">= 6,000/s and >= 75 % of raw",
            target_check=lambda r: r.median >= 6000 and (r.ratio or 0) >= 0.75),
        Row("queue", f"sensor enqueue with a {depth:,}-chunk backlog", "events/s", backlog,
            baseline_name="empty queue", baseline_runs=empty, target=">= 90 % of empty",
            target_check=lambda r: (r.ratio or 0) >= 0.90),
        Row("queue", "sensor enqueue_many, 16 events/txn, empty queue", "events/s", grouped,
            baseline_name="raw SQLite 1 row/txn", baseline_runs=raw_single),
    ]


NEW_CAPS = ["chunks", "heartbeats", "epoch", "server_time", "proto", "batch", "http_ack"]
OLD_CAPS = ["chunks", "heartbeats"]


def section_drain(work: Path, scale: Scale) -> list[Row]:
    rows = []
    for count, size in ((scale.drain_big, 20 * KIB), (scale.drain_small, KIB)):
        new: list[dict[str, Any]] = []
        old: list[dict[str, Any]] = []
        for run in range(scale.runs):
            for caps, out in ((NEW_CAPS, new), (OLD_CAPS, old)):
                workdir = work / f"drain-{count}-{size}-{len(caps)}-{run}"
                try:
                    out.append(drain_mod.run_once(workdir, count, size, caps))
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
        if size == 20 * KIB:
            rows.append(Row("drain", f"drain {count} x {size // KIB} KiB (proto+batch+http_ack)",
                            "s", [r["seconds"] for r in new], higher_is_better=False,
                            baseline_name="1.0 sensor (JSON, one chunk per POST, ChunkAck)",
                            baseline_runs=[r["seconds"] for r in old], target="<= 0.5 s",
                            target_check=lambda r: r.median <= 0.5))
        else:
            rows.append(Row("drain", f"drain {count:,} x {size // KIB} KiB "
                            "(proto+batch+http_ack)", "events/s",
                            [r["events_per_s"] for r in new],
                            baseline_name="1.0 sensor (JSON, one chunk per POST, ChunkAck)",
                            baseline_runs=[r["events_per_s"] for r in old],
                            target=">= 15,000/s", target_check=lambda r: r.median >= 15000))
    return rows


def section_conns(work: Path, scale: Scale) -> list[Row]:
    per_conn, p99s, p50s = [], [], []
    count = scale.connections
    raise_nofile(count + 4096)
    for run in range(scale.runs):
        workdir = work / f"conns-{run}"
        server = ServerProcess(workdir, extra={
            "scheduler": {"global_max_windows": count * 4},
            "heartbeat": {"interval_s": scale.conns_interval_s}})
        server.start()
        try:
            time.sleep(1.0)
            idle = rss_kib(server.pid)
            spec = {"url": f"ws://127.0.0.1:{server.control_port}/control",
                    "connections": count, "interval_s": scale.conns_interval_s,
                    "duration_s": scale.conns_duration_s}
            client = subprocess.Popen(pinned(python("-m", "bench.conns", json.dumps(spec)),
                                             LOAD_CPU), stdout=subprocess.PIPE, text=True)
            assert client.stdout is not None
            first = client.stdout.readline()
            if not first:
                raise BenchError("connection client did not connect")
            peak = 0
            deadline = time.monotonic() + scale.conns_duration_s + 120
            while client.poll() is None and time.monotonic() < deadline:
                peak = max(peak, rss_kib(server.pid))
                time.sleep(0.5)
            out, _ = client.communicate(timeout=60)
            result = json.loads(out.strip().splitlines()[-1])
        finally:
            server.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        if result["errors"] or result["answered"] < result["measured"] * 0.99:
            raise BenchError(f"connections run incomplete: {result}")
        per_conn.append((peak - idle) / count)
        p99s.append(result["p99_ms"])
        p50s.append(result["p50_ms"])
    return [
        Row("conns", f"{count:,} control connections: resident memory per connection",
            "KiB", per_conn, higher_is_better=False, target="<= 50 KiB",
            target_check=lambda r: r.median <= 50),
        Row("conns", f"{count:,} connections, heartbeat every {scale.conns_interval_s:g} s: "
            "handling p99", "ms", p99s,
            higher_is_better=False, target="<= 100 ms", target_check=lambda r: r.median <= 100,
            extra={"p50_ms": p50s}),
    ]


# ---------------------------------------------------------------------------------------
# Output


def section_reads(work: Path, scale: Scale) -> list[Row]:
    requests, batch, conc = scale.n(160, 16), 256, 8

    def load(port: int, prefix: str) -> float:
        return float(_loadgen(port, "proto_batch", KIB, conc, requests, batch,
                              prefix)["chunks_per_s"])

    try:
        with_reads, without, read_rates = reads_mod.measure(
            work, scale.runs, requests, load, ServerProcess)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from exc
    finally:
        shutil.rmtree(work / "reads-0", ignore_errors=True)
    return [Row("reads", f"server ingest during paced heavy reads of the read API "
                f"(Protobuf batches, 1 KiB, c={conc})",
                "chunks/s", with_reads,
                baseline_name="no reads", baseline_runs=without, target=">= 90 % of no reads",
                target_check=lambda r: (r.ratio or 0) >= 0.90,
                extra={"reads_per_s": read_rates})]


def section_postgres(work: Path, scale: Scale) -> list[Row]:
    def load(port: int, mode: str, size: int, conc: int, requests: int, batch: int,
             prefix: str) -> dict[str, Any]:
        return _loadgen(port, mode, size, conc, requests, batch, prefix)

    return [Row("postgres", name, "chunks/s", pg_runs, baseline_name="SQLite store",
                baseline_runs=sqlite_runs, extra=extra)
            for name, pg_runs, sqlite_runs, extra in pg_mod.measure(
                work, scale.runs, scale.n, load)]


def section_remote_write(work: Path, scale: Scale) -> list[Row]:
    runs = []
    for run in range(scale.runs):
        workdir = work / f"remote-write-{run}"
        try:
            runs.append(rw_mod.run_once(workdir, scale.rw_requests, 4, 500, scale.rw_idle_s))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in runs]

    # CPU figures may be 0 (no tick in the idle window); Row wants positive numbers.
    def pct(key: str) -> list[float]:
        return [max(value, 0.001) for value in col(key)]

    return [
        Row("remote_write", f"remote write into the sensor, 4 senders, 500 samples/request "
            f"({scale.rw_requests:,} requests)", "requests/s", col("requests_per_s"),
            target=">= 1,000/s", target_check=lambda r: r.median >= 1000,
            extra={"samples_per_s": col("samples_per_s"),
                   "latency_p99_ms": col("latency_p99_ms"), "events": col("events"),
                   "agent_cpu_ms_per_request": [1000 * r["receive_cpu_s"] / r["requests"]
                                                for r in runs]}),
        Row("remote_write", "sensor agent resident memory, idle (after the drain)", "MiB",
            col("rss_idle_mib"), higher_is_better=False, target="<= 60 MiB",
            target_check=lambda r: r.median <= 60,
            extra={"rss_start_mib": col("rss_start_mib"),
                   "rss_receive_mib": col("rss_receive_mib")}),
        Row("remote_write", "sensor agent resident memory, peak while draining", "MiB",
            col("rss_drain_mib"), higher_is_better=False, target="<= 60 MiB",
            target_check=lambda r: r.median <= 60),
        Row("remote_write", f"sensor agent CPU, idle ({scale.rw_idle_s:g} s, connected)",
            "% of a core", pct("idle_cpu_pct"), higher_is_better=False, target="<= 1 %",
            target_check=lambda r: r.median <= 1.0),
        Row("remote_write", "sensor agent CPU while draining its backlog to the server",
            "% of a core", pct("drain_cpu_pct"), higher_is_better=False,
            extra={"drain_s": col("drain_s")}),
    ]


def section_cluster(work: Path, scale: Scale) -> list[Row]:
    return [Row("cluster", name, unit, runs, baseline_name=base, baseline_runs=base_runs,
                extra=extra)
            for name, unit, runs, base, base_runs, extra in cluster_mod.measure(
                work, scale.runs, scale.n, _loadgen)]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def render(rows: list[Row]) -> str:
    header = ("Measure", "Result: median [min-max]", "Baseline (same run)", "Ratio", "Target",
              "Met")
    lines = []
    for row in rows:
        result = f"{_fmt(row.median)} {row.unit} [{_fmt(min(row.runs))}-{_fmt(max(row.runs))}]"
        if "mb_per_s_median" in row.extra:
            result += f"; {_fmt(row.extra['mb_per_s_median'])} MB/s"
        base = ("" if row.baseline is None
                else f"{_fmt(row.baseline)} {row.unit} ({row.baseline_name})")
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        met = {None: "", True: "yes", False: "NO"}[row.met]
        lines.append((row.name, result, base, ratio, row.target, met))
    widths = [max(len(str(x[i])) for x in [header, *lines]) for i in range(len(header))]

    def fmt_line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [fmt_line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(fmt_line(line) for line in lines)
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                        help="comma-separated sections: " + ",".join(SECTIONS))
    parser.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench/results.json"))
    parser.add_argument("--workdir", default=None, help="scratch directory (default: temp)")
    parser.add_argument("--tiny", action="store_true",
                        help="a seconds-long smoke configuration (tests); numbers meaningless")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scale = QUICK if args.quick else FULL
    if args.runs is not None:
        scale = Scale(**{**asdict(scale), "runs": max(1, args.runs)})
    if args.tiny:
        scale = TINY
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    for name in only:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    raise_nofile(scale.connections + 4096)
    load_before = os.getloadavg()
    started = time.monotonic()
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    errors: list[str] = []
    disk: dict[str, list[float]] = {"single": [], "batched": []}

    def attempt(name: str, run: Callable[[], list[Row]]) -> None:
        """A failed section is reported and the others still run."""
        try:
            rows.extend(run())
        except (BenchError, subprocess.SubprocessError, OSError) as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}"[:500])

    def disk_section() -> list[Row]:
        disk_rows, found = section_disk(root, scale)
        disk.update(found)
        return disk_rows if "disk" in only else []

    try:
        if "ingest" in only:
            attempt("ingest", lambda: section_ingest(root, scale))
        if "disk" in only or "queue" in only:
            attempt("disk", disk_section)
        if "flat" in only:
            attempt("flat", lambda: section_flat(root, scale))
        if "queue" in only:
            attempt("queue", lambda: section_queue(root, scale, disk["single"]))
        if "drain" in only:
            attempt("drain", lambda: section_drain(root, scale))
        if "conns" in only:
            attempt("conns", lambda: section_conns(root, scale))
        if "reads" in only:
            attempt("reads", lambda: section_reads(root, scale))
        if "postgres" in only:
            attempt("postgres", lambda: section_postgres(root, scale))
        if "remote_write" in only:
            attempt("remote_write", lambda: section_remote_write(root, scale))
        if "cluster" in only:
            attempt("cluster", lambda: section_cluster(root, scale))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    table = render(rows)
    doc = {
        "quick": args.quick, "runs": scale.runs, "elapsed_s": elapsed,
        "pinned": pinning_available(), "cpus": os.cpu_count(),
        # Other processes on the machine skew every figure: the 1-minute load average
        # before and after the run says how busy it was (2 CPUs: 2.0 = both busy).
        "loadavg_before": load_before[0], "loadavg_after": os.getloadavg()[0],
        "machine": platform.platform(), "python": sys.version.split()[0],
        "server_cpu": SERVER_CPU if pinning_available() else None,
        "load_cpu": LOAD_CPU if pinning_available() else None,
        "rows": [row.to_json() for row in rows], "table": table, "errors": errors,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    pin = (f"server CPU {SERVER_CPU}, load CPU {LOAD_CPU}" if pinning_available()
           else "not pinned (taskset or a second CPU missing)")
    failed = "".join(f"FAILED {error}\n" for error in errors)
    sys.stdout.write(f"{table}\n\nmedians of {scale.runs} run(s); {pin}; "
                     f"{elapsed:.0f} s; load average {load_before[0]:.1f} before, "
                     f"{os.getloadavg()[0]:.1f} after; results in {out}\n{failed}")
    return 1 if errors else 0

