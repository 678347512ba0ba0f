"""The simulator's verification report: pure data in, verdict and figures out.

Inputs are plain records: what the workload generated (``GeneratedEvent``), what the
server holds (``ServerEvent``, from the read API), what is left in each sensor's queue
file (``QueueLeftovers``) and facts about the run (``RunFacts``: faults injected, kills,
counters scraped from ``/metrics``, timings). ``build_report`` checks every generated event:

* **delivered exactly once**: the server holds exactly one event with its id, and both the
  bytes the read API returned and the ``event_sha256`` the server stored equal the SHA-256
  of what was enqueued (byte-identical);
* **duplicated**: more than one stored event with the id;
* **corrupted**: a stored copy whose bytes or declared hash differ;
* **missing**: no stored copy; split into *left in queue* (still queued: not delivered
  yet), *quarantined* (taken out of service by the sensor) and *lost* (nowhere);
* **unexpected**: a stored event under a simulated sensor that was never generated.

The run passes when nothing is missing, duplicated, corrupted or unexpected and no chunk
is left in a queue (a drain that never finishes is a failure too).
Goodput is delivered (uncompressed) bytes over the time from the first enqueue to the
last commit; latency is enqueue (sensor queue commit, simulator clock) to the server's
``completed_at`` (both wall clocks of this machine; against a remote server they differ
by the hosts' clock offset).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

SAMPLE_LIMIT = 20
MB = 1_000_000


@dataclass(frozen=True)
class GeneratedEvent:
    """One submitted event: the ground truth."""

    sensor_id: str
    event_id: str
    sha256: str  # hex of the exact bytes enqueued
    size: int
    enqueued_at: float  # wall clock when the enqueue committed


@dataclass(frozen=True)
class ServerEvent:
    """One event as the server's read API returned it."""

    sensor_id: str
    event_id: str
    sha256: str  # hex SHA-256 of the bytes returned (computed by the simulator)
    declared_sha256: str  # hex of the event_sha256 the server stored
    size: int
    completed_at: float  # wall clock of the server's commit


@dataclass(frozen=True)
class QueueLeftovers:
    """What remains in one sensor's queue file after the run."""

    sensor_id: str
    queued_event_ids: frozenset[str] = frozenset()
    queued_chunks: int = 0
    quarantined_event_ids: frozenset[str] = frozenset()
    quarantined_chunks: int = 0
    dropped_events: int = 0
    dropped_chunks: int = 0


@dataclass(frozen=True)
class RunFacts:
    """Everything about the run that is not an event."""

    profile: str
    seed: int
    sensors: int
    events_per_sensor: int
    mode: str = "processes"  # or "in-process"
    server: str = "embedded"  # or the URL of an existing server
    submit_s: float = 0.0  # how long submitting took
    elapsed_s: float = 0.0  # workload start to the end of the drain
    drain: str = "complete"  # complete | settled | timeout | aborted
    kills: Mapping[str, int] = field(default_factory=dict)  # sensors / server
    faults: Mapping[str, int] = field(default_factory=dict)  # proxy counters, summed
    counters: Mapping[str, float] = field(default_factory=dict)  # scraped or agent stats
    workload_errors: Sequence[str] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    cpu_s: Mapping[str, float] = field(default_factory=dict)  # simulator / processes


@dataclass(frozen=True)
class Latency:
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    rank = max(1, math.ceil(pct * len(sorted_values) / 100))  # pct * n first: exact
    return sorted_values[rank - 1]


def summarize_latency(latencies_ms: Iterable[float]) -> Latency:
    values = sorted(latencies_ms)
    return Latency(count=len(values), p50_ms=percentile(values, 50),
                   p95_ms=percentile(values, 95), p99_ms=percentile(values, 99),
                   max_ms=values[-1] if values else None)


@dataclass(frozen=True)
class Report:
    facts: RunFacts
    generated: int
    generated_bytes: int
    delivered_exactly_once: int
    delivered: int  # events with at least one byte-identical copy
    delivered_bytes: int
    missing: int
    missing_left_in_queue: int
    missing_quarantined: int
    lost: int
    duplicated: int  # events stored more than once
    duplicate_copies: int  # the extra copies
    corrupted: int
    unexpected: int
    left_in_queues_events: int
    left_in_queues_chunks: int
    quarantined_events: int
    quarantined_chunks: int
    dropped_events: int
    retries: float | None
    duplicates_absorbed: float | None
    goodput_mb_s: float | None
    events_per_s: float | None
    delivery_window_s: float | None
    latency: Latency
    samples: Mapping[str, Sequence[str]]
    per_sensor: Mapping[str, Mapping[str, int]]
    soak: Any = None  # pipeline.sim.soak.SoakResult of a --soak run

    @property
    def ok(self) -> bool:
        """Nothing missing, duplicated, corrupted or unexpected, and every queue drained
        (chunks left behind mean a drain that never finished, even if their events made
        it: the sensor would hold and re-send them); a soak also needs flat resources."""
        return not (self.missing or self.duplicated or self.corrupted or self.unexpected
                    or self.left_in_queues_chunks) and (self.soak is None or self.soak.ok)

    @property
    def delivered_pct(self) -> float:
        return 100.0 * self.delivered_exactly_once / self.generated if self.generated else 100.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(dataclasses.replace(self, soak=None))
        doc["soak"] = self.soak.to_json() if self.soak is not None else None
        doc["facts"] = {**doc["facts"], "kills": dict(self.facts.kills),
                        "faults": dict(self.facts.faults),
                        "counters": dict(self.facts.counters),
                        "workload_errors": list(self.facts.workload_errors),
                        "parameters": dict(self.facts.parameters),
                        "cpu_s": dict(self.facts.cpu_s)}
        doc["samples"] = {k: list(v) for k, v in self.samples.items()}
        doc["per_sensor"] = {k: dict(v) for k, v in self.per_sensor.items()}
        doc["ok"] = self.ok
        doc["delivered_pct"] = round(self.delivered_pct, 4)
        return doc


def build_report(generated: Iterable[GeneratedEvent], stored: Iterable[ServerEvent],
                 leftovers: Iterable[QueueLeftovers], facts: RunFacts) -> Report:
    """Check every generated event against the server and the queues (see module doc)."""
    truth: dict[tuple[str, str], GeneratedEvent] = {}
    for event in generated:
        truth[(event.sensor_id, event.event_id)] = event
    copies: dict[tuple[str, str], list[ServerEvent]] = {}
    for copy in stored:
        copies.setdefault((copy.sensor_id, copy.event_id), []).append(copy)
    left = {q.sensor_id: q for q in leftovers}

    per_sensor: dict[str, dict[str, int]] = {}
    samples: dict[str, list[str]] = {"lost": [], "left_in_queue": [], "quarantined": [],
                                     "duplicated": [], "corrupted": [], "unexpected": []}
    counts = dict.fromkeys(("exactly_once", "delivered", "missing", "left_in_queue",
                            "quarantined", "lost", "duplicated", "duplicate_copies",
                            "corrupted", "unexpected"), 0)
    delivered_bytes = 0
    first_enqueue = math.inf
    last_commit = -math.inf
    latencies: list[float] = []

    def note(kind: str, sensor_id: str, event_id: str, amount: int = 1) -> None:
        counts[kind] += amount
        row = per_sensor.setdefault(sensor_id, dict.fromkeys(
            ("generated", "exactly_once", "missing", "lost", "duplicated", "corrupted"), 0))
        if kind in row:
            row[kind] += amount
        if kind in samples and len(samples[kind]) < SAMPLE_LIMIT:
            samples[kind].append(f"{sensor_id}/{event_id}")

    for key, event in truth.items():
        sensor_id, event_id = key
        per_sensor.setdefault(sensor_id, dict.fromkeys(
            ("generated", "exactly_once", "missing", "lost", "duplicated", "corrupted"), 0))
        per_sensor[sensor_id]["generated"] += 1
        first_enqueue = min(first_enqueue, event.enqueued_at)
        found = copies.get(key, [])
        good = [c for c in found
                if c.sha256 == event.sha256 and c.declared_sha256 == event.sha256]
        if len(good) != len(found):
            note("corrupted", sensor_id, event_id)
        if len(found) > 1:
            note("duplicated", sensor_id, event_id)
            counts["duplicate_copies"] += len(found) - 1
        if len(found) == 1 and good:
            note("exactly_once", sensor_id, event_id)
        if good:
            counts["delivered"] += 1
            delivered_bytes += event.size
            committed = min(c.completed_at for c in good)
            last_commit = max(last_commit, committed)
            latencies.append(max(0.0, committed - event.enqueued_at) * 1000.0)
        if not found:
            note("missing", sensor_id, event_id)
            queue = left.get(sensor_id)
            if queue is not None and event_id in queue.queued_event_ids:
                note("left_in_queue", sensor_id, event_id)
            elif queue is not None and event_id in queue.quarantined_event_ids:
                note("quarantined", sensor_id, event_id)
            else:
                note("lost", sensor_id, event_id)
    simulated = {sid for sid, _ in truth} | set(left)
    for key, found in copies.items():
        if key not in truth and key[0] in simulated:
            note("unexpected", key[0], key[1], len(found))

    window = last_commit - first_enqueue if latencies else None
    goodput = delivered_bytes / window / MB if window and window > 0 else None
    rate = counts["delivered"] / window if window and window > 0 else None
    queues = list(left.values())
    return Report(
        facts=facts,
        generated=len(truth),
        generated_bytes=sum(e.size for e in truth.values()),
        delivered_exactly_once=counts["exactly_once"],
        delivered=counts["delivered"],
        delivered_bytes=delivered_bytes,
        missing=counts["missing"],
        missing_left_in_queue=counts["left_in_queue"],
        missing_quarantined=counts["quarantined"],
        lost=counts["lost"],
        duplicated=counts["duplicated"],
        duplicate_copies=counts["duplicate_copies"],
        corrupted=counts["corrupted"],
        unexpected=counts["unexpected"],
        left_in_queues_events=sum(len(q.queued_event_ids) for q in queues),
        left_in_queues_chunks=sum(q.queued_chunks for q in queues),
        quarantined_events=sum(len(q.quarantined_event_ids) for q in queues),
        quarantined_chunks=sum(q.quarantined_chunks for q in queues),
        dropped_events=sum(q.dropped_events for q in queues),
        retries=facts.counters.get("sensor_retries"),
        duplicates_absorbed=facts.counters.get("server_duplicates_absorbed"),
        goodput_mb_s=goodput,
        events_per_s=rate,
        delivery_window_s=window,
        latency=summarize_latency(latencies),
        samples={k: tuple(v) for k, v in samples.items() if v},
        per_sensor=per_sensor,
    )


# ---------------------------------------------------------------------------------------
# Printing


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def format_report(report: Report) -> str:
    """The human table (``pipeline-sim`` prints it on stdout)."""
    f = report.facts
    lat = report.latency
    faults = f.faults
    rows: list[tuple[str, str]] = [
        ("events generated", f"{report.generated:,}  ({report.generated_bytes / MB:,.2f} MB)"),
        ("delivered exactly once",
         f"{report.delivered_exactly_once:,}  ({report.delivered_pct:.2f} %)"),
        ("missing", (f"{report.missing:,}  (left in queue {report.missing_left_in_queue:,}, "
                    f"quarantined {report.missing_quarantined:,}, lost {report.lost:,})")),
        ("duplicated", f"{report.duplicated:,}  ({report.duplicate_copies:,} extra copies)"),
        ("corrupted (bytes differ)", f"{report.corrupted:,}"),
        ("unexpected events", f"{report.unexpected:,}"),
        ("left in queues", (f"{report.left_in_queues_events:,} events, "
                           f"{report.left_in_queues_chunks:,} chunks")),
        ("quarantined", (f"{report.quarantined_events:,} events, "
                        f"{report.quarantined_chunks:,} chunks")),
        ("dropped by queue limits", f"{report.dropped_events:,} events"),
        ("sensor retries", _num(report.retries)),
        ("duplicates absorbed (server)", _num(report.duplicates_absorbed)),
        ("resets injected", (f"{faults.get('resets', 0):,}  (at connect "
                            f"{faults.get('resets_at_connect', 0):,}, mid-stream "
                            f"{faults.get('resets_mid_stream', 0):,}, partition "
                            f"{faults.get('resets_partition', 0):,})")),
        ("black-holed bytes", (f"{faults.get('blackholed_bytes', 0):,}  (hung connections "
                              f"{faults.get('hangs', 0):,})")),
        ("kills (SIGKILL)", (f"sensors {f.kills.get('sensors', 0)}, "
                            f"server {f.kills.get('server', 0)}")),
        ("goodput", "-" if report.goodput_mb_s is None else
         f"{report.goodput_mb_s:.3f} MB/s  ({report.events_per_s:,.1f} events/s over "
         f"{report.delivery_window_s:.1f} s)"),
        ("latency enqueue->commit", (f"p50 {_ms(lat.p50_ms)}, p95 {_ms(lat.p95_ms)}, "
                                    f"p99 {_ms(lat.p99_ms)}, max {_ms(lat.max_ms)}")),
        ("cpu (whole run)", _cpu(f.cpu_s, report.delivered_bytes)),
        ("drain", f"{f.drain} after {f.elapsed_s:.1f} s (submitting took {f.submit_s:.1f} s)"),
    ]
    if f.workload_errors:
        rows.append(("workload errors", "; ".join(f.workload_errors)[:300]))
    for kind, items in report.samples.items():
        if kind in ("lost", "duplicated", "corrupted", "unexpected", "left_in_queue"):
            rows.append((f"e.g. {kind}", ", ".join(items[:3])))
    rows.append(("verdict", "PASS" if report.ok else "FAIL"))
    width = max(len(label) for label, _ in rows)
    head = (f"pipeline-sim: profile {f.profile}, seed {f.seed}, {f.sensors} sensors x "
            f"{f.events_per_sensor} events ({f.mode}, server {f.server})")
    lines = [head] + [f"  {label:<{width}}  {value}" for label, value in rows]
    if report.soak is not None:
        from pipeline.sim.soak import format_soak  # the soak section only when soaking

        lines.append(format_soak(report.soak))
    return "\n".join(lines) + "\n"


def _cpu(cpu_s: Mapping[str, float], delivered_bytes: int) -> str:
    if not cpu_s:
        return "-"
    total = sum(cpu_s.values())
    per_mb = f", {total / (delivered_bytes / MB):.1f} s per delivered MB" \
        if delivered_bytes else ""
    return (f"{total:.1f} s  (simulator {cpu_s.get('simulator', 0.0):.1f} s, server and "
            f"sensor processes {cpu_s.get('processes', 0.0):.1f} s{per_mb})")


def goodput_ratio(run: Report, baseline: Report) -> float | None:
    if run.goodput_mb_s is None or not baseline.goodput_mb_s:
        return None
    return run.goodput_mb_s / baseline.goodput_mb_s


def format_comparison(run: Report, baseline: Report) -> str:
    ratio = goodput_ratio(run, baseline)
    text = "-" if ratio is None else f"{100 * ratio:.1f} %"
    return (f"goodput: {run.facts.profile} {_mb(run.goodput_mb_s)} vs {baseline.facts.profile} "
            f"{_mb(baseline.goodput_mb_s)} -> {text} of {baseline.facts.profile}\n")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} MB/s"
