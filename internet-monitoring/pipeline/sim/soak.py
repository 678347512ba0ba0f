"""Soak mode of ``pipeline-sim``: resources of every process over a long run, and a verdict.

A leak rarely fails a short test; it shows as a slope. While the fleet runs under faults
(the profile's, plus a link flap -- every connection of one random sensor reset -- at
random intervals), the ``SoakMonitor`` samples each process every ``sample_every_s``:
resident memory and open descriptors from ``/proc/<pid>``, asyncio tasks from the
process's own ``/metrics`` (``pipeline_asyncio_tasks``). ``check_growth`` (pure) then
compares, per process and resource, the median of the first third of the samples taken
after warm-up with the median of the last third: growth beyond the limit fails the run.
Medians, not single samples: a garbage collection or a burst of reconnects at the wrong
moment must not decide the verdict.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import aiohttp

from pipeline.common.errors import ConfigError
from pipeline.common.runtime_metrics import TASKS_METRIC

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_TASKS_RE = re.compile(rf"^{TASKS_METRIC}\s+([0-9.eE+-]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class SoakSettings:
    duration_s: float
    sample_every_s: float = 5.0
    warmup_s: float | None = None  # None: a quarter of the run, at most 300 s
    fault_every_s: float = 15.0    # mean interval of link flaps (exponential); 0 = none
    max_rss_growth: float = 0.25   # fraction of the post-warm-up baseline ...
    min_rss_growth_bytes: int = 16 * MIB  # ... but never less than this
    max_fd_growth: int = 16
    max_task_growth: int = 32

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ConfigError("--soak: the duration must be > 0", field="soak")
        if not self.sample_every_s > 0:
            raise ConfigError("--soak-sample-every must be > 0", field="soak_sample_every")
        if self.warmup_s is not None and not 0 <= self.warmup_s < self.duration_s:
            raise ConfigError("--soak-warmup must be >= 0 and shorter than the soak",
                              field="soak_warmup")
        if self.fault_every_s < 0:
            raise ConfigError("--soak-fault-every must be >= 0", field="soak_fault_every")

    @property
    def warmup(self) -> float:
        if self.warmup_s is not None:
            return self.warmup_s
        return min(self.duration_s / 4, 300.0)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*", text or "")
    if not match:
        raise ConfigError(f"--soak: expected a duration like 90, 90s, 30m or 2h, got {text!r}",
                          field="soak")
    value = float(match.group(1))
    return value * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


@dataclass(frozen=True)
class Sample:
    t: float            # seconds since the soak began
    rss_bytes: int | None
    fds: int | None
    tasks: int | None


@dataclass(frozen=True)
class Growth:
    process: str
    resource: str       # rss_bytes, fds, tasks
    baseline: float
    end: float
    limit: float

    @property
    def growth(self) -> float:
        return self.end - self.baseline

    @property
    def exceeded(self) -> bool:
        return self.growth > self.limit

    def describe(self) -> str:
        unit = (lambda v: f"{v / MIB:.1f} MiB") if self.resource == "rss_bytes" \
            else (lambda v: f"{v:g}")
        return (f"{self.process} {self.resource}: {unit(self.baseline)} -> {unit(self.end)} "
                f"(+{unit(self.growth)}, limit +{unit(self.limit)})")


def _limit(resource: str, baseline: float, settings: SoakSettings) -> float:
    if resource == "rss_bytes":
        return max(settings.max_rss_growth * baseline, float(settings.min_rss_growth_bytes))
    if resource == "fds":
        return float(settings.max_fd_growth)
    return float(settings.max_task_growth)


def check_growth(process: str, samples: Sequence[Sample], settings: SoakSettings
                 ) -> tuple[list[Growth], list[str]]:
    """Growth of each resource after warm-up; returns (measured, problems).

    A resource with fewer than six samples after warm-up cannot be judged: that is a
    problem too (a soak that proves nothing must not pass)."""
    after = [s for s in samples if s.t >= settings.warmup]
    measured: list[Growth] = []
    problems: list[str] = []
    for resource in ("rss_bytes", "fds", "tasks"):
        values = [float(v) for s in after if (v := getattr(s, resource)) is not None]
        if len(values) < 6:
            problems.append(f"{process} {resource}: only {len(values)} samples after warm-up "
                            f"({settings.warmup:g} s); run longer or sample more often")
            continue
        third = max(2, len(values) // 3)
        baseline = statistics.median(values[:third])
        end = statistics.median(values[-third:])
        growth = Growth(process, resource, baseline, end, _limit(resource, baseline, settings))
        measured.append(growth)
        if growth.exceeded:
            problems.append(f"growth after warm-up: {growth.describe()}")
    return measured, problems


# ---------------------------------------------------------------------------------------
# Sampling


def read_proc(pid: int) -> tuple[int | None, int | None]:
    """(resident bytes, open descriptors) of ``pid`` from /proc; None where unreadable."""
    rss: int | None = None
    fds: int | None = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return rss, fds


def parse_tasks(metrics_text: str) -> int | None:
    match = _TASKS_RE.search(metrics_text)
    return int(float(match.group(1))) if match else None


@dataclass
class Watched:
    """One process to sample: how to find its pid now, and its ``/metrics`` URL."""

    name: str
    pid: Callable[[], int | None]
    metrics_url: str | None


@dataclass
class SoakResult:
    settings: dict[str, Any]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    growth: list[Growth] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    link_flaps: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"settings": self.settings, "ok": self.ok, "problems": list(self.problems),
                "link_flaps": self.link_flaps, "restarts": dict(self.restarts),
                "growth": [{**asdict(g), "growth": g.growth, "exceeded": g.exceeded}
                           for g in self.growth],
                "samples": {name: [asdict(s) for s in series]
                            for name, series in self.samples.items()}}


class SoakMonitor:
    """Samples every watched process until stopped; ``finish`` judges the series."""

    def __init__(self, settings: SoakSettings, watched: Sequence[Watched]) -> None:
        self.settings = settings
        self.watched = list(watched)
        self.result = SoakResult(settings=asdict(settings))
        self._pids: dict[str, int] = {}
        self._started = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while not stop.is_set():
                await self.sample(http, loop.time() - self._started)
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.sample_every_s)
                except TimeoutError:
                    pass

    async def sample(self, http: aiohttp.ClientSession, t: float) -> None:
        for item in self.watched:
            pid = item.pid()
            if pid is None:
                continue
            if self._pids.get(item.name, pid) != pid:
                # A restarted process starts a new series: its memory is not the old one's.
                self.result.restarts[item.name] = self.result.restarts.get(item.name, 0) + 1
                self.result.samples[item.name] = []
            self._pids[item.name] = pid
            rss, fds = read_proc(pid)
            tasks = await self._tasks(http, item.metrics_url)
            self.result.samples.setdefault(item.name, []).append(
                Sample(round(t, 1), rss, fds, tasks))

    @staticmethod
    async def _tasks(http: aiohttp.ClientSession, url: str | None) -> int | None:
        if url is None:
            return None
        try:
            async with http.get(url) as resp:
                if resp.status != 200:
                    return None
                return parse_tasks(await resp.text())
        except (TimeoutError, aiohttp.ClientError, OSError):
            return None

    def finish(self) -> SoakResult:
        for name, series in self.result.samples.items():
            measured, problems = check_growth(name, series, self.settings)
            self.result.growth.extend(measured)
            self.result.problems.extend(problems)
        missing = [w.name for w in self.watched if not self.result.samples.get(w.name)]
        self.result.problems.extend(f"{name}: never sampled" for name in missing)
        return self.result


async def flap_links(settings: SoakSettings, proxies: Mapping[str, Sequence[Any]],
                     stop: asyncio.Event, result: SoakResult, seed: int) -> None:
    """Reset every connection of one random sensor at random intervals (mean
    ``fault_every_s``): the sensor reconnects and resumes, as after a Wi-Fi roam."""
    if not settings.fault_every_s or not proxies:
        return
    rng = random.Random(seed)
    names = sorted(proxies)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), rng.expovariate(1.0 / settings.fault_every_s))
            return
        except TimeoutError:
            pass
        name = rng.choice(names)
        resets = sum(proxy.reset_all("link_flap") for proxy in proxies[name])
        result.link_flaps += 1
        log.info("soak_link_flap sensor_id=%s connections_reset=%d", name, resets)


def format_soak(result: SoakResult) -> str:
    """The report's soak section: per process, first and last sample and the growth."""
    lines = [("  soak (resources per process; growth = median of the last third minus the "
             "first third after warm-up)")]
    by_process: dict[str, dict[str, Growth]] = {}
    for growth in result.growth:
        by_process.setdefault(growth.process, {})[growth.resource] = growth
    for name in sorted(result.samples):
        series = result.samples[name]
        if not series:
            continue
        peak = max((s.rss_bytes or 0) for s in series)
        parts = []
        for resource, label in (("rss_bytes", "rss"), ("fds", "fds"), ("tasks", "tasks")):
            g = by_process.get(name, {}).get(resource)
            if g is None:
                parts.append(f"{label} -")
            elif resource == "rss_bytes":
                parts.append(f"rss {g.baseline / MIB:.1f}->{g.end / MIB:.1f} MiB "
                             f"(peak {peak / MIB:.1f})")
            else:
                parts.append(f"{label} {g.baseline:g}->{g.end:g}")
        restarts = result.restarts.get(name, 0)
        extra = f", restarted {restarts}x" if restarts else ""
        lines.append(f"    {name:<14} {len(series)} samples, " + ", ".join(parts) + extra)
    lines.append(f"    link flaps {result.link_flaps}; verdict "
                 + ("PASS" if result.ok else "FAIL: " + "; ".join(result.problems)))
    return "\n".join(lines)

