"""``pipeline-sim --soak``: the growth check on series that grow and series that do not,
and one short real soak through the CLI (server and sensors as processes, link flaps,
samples of memory, descriptors and asyncio tasks for every process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common.errors import ConfigError
from pipeline.sim.soak import (
    MIB,
    Sample,
    SoakResult,
    SoakSettings,
    check_growth,
    format_soak,
    parse_duration,
    parse_tasks,
)

SETTINGS = SoakSettings(duration_s=100, sample_every_s=1, warmup_s=20)


def series(rss_mib: list[float], fds: list[int] | None = None,
           tasks: list[int] | None = None) -> list[Sample]:
    n = len(rss_mib)
    fds = fds or [20] * n
    tasks = tasks or [10] * n
    return [Sample(t=float(i * 5), rss_bytes=int(r * MIB), fds=f, tasks=k)
            for i, (r, f, k) in enumerate(zip(rss_mib, fds, tasks))]


def test_flat_series_after_warmup_pass_even_with_a_warmup_climb_and_noise() -> None:
    rss: list[float] = [40, 60, 75, 80, 80, 83, 79, 81, 80, 84, 79, 80, 82, 81, 80, 79, 83, 80,
                        81, 80]
    measured, problems = check_growth("server", series(rss), SETTINGS)
    assert problems == []
    assert {g.resource for g in measured} == {"rss_bytes", "fds", "tasks"}


@pytest.mark.parametrize("kind", ["rss", "fds", "tasks"])
def test_a_growing_resource_fails_the_check(kind: str) -> None:
    n = 20
    rss = [80.0] * n
    fds = [20] * n
    tasks = [10] * n
    if kind == "rss":
        rss = [80.0 + 3 * i for i in range(n)]      # +3 MiB per sample: a leak
    elif kind == "fds":
        fds = [20 + 2 * i for i in range(n)]        # a descriptor per request not closed
    else:
        tasks = [10 + 4 * i for i in range(n)]      # a task per connection never ending
    measured, problems = check_growth("sim-000", series(rss, fds, tasks), SETTINGS)
    assert len(problems) == 1 and problems[0].startswith("growth after warm-up: sim-000")
    assert [g.resource for g in measured if g.exceeded] == \
        [{"rss": "rss_bytes", "fds": "fds", "tasks": "tasks"}[kind]]


def test_too_few_samples_after_warmup_is_a_failure_not_a_pass() -> None:
    _, problems = check_growth("server", series([80.0] * 6), SETTINGS)  # t = 0..25 s
    assert problems and all("samples after warm-up" in p for p in problems)


def test_small_absolute_rss_changes_are_tolerated() -> None:
    rss = [30.0] * 10 + [40.0] * 10  # +10 MiB on 30 MiB: 33 %, but under the 16 MiB floor
    _, problems = check_growth("sensor", series(rss), SETTINGS)
    assert problems == []


def test_durations_and_task_counts_parse() -> None:
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200 and parse_duration("1.5s") == 1.5
    with pytest.raises(ConfigError):
        parse_duration("soon")
    text = ("# HELP pipeline_asyncio_tasks x\n# TYPE pipeline_asyncio_tasks gauge\n"
            "pipeline_asyncio_tasks 17.0\npipeline_asyncio_tasks_other 3\n")
    assert parse_tasks(text) == 17 and parse_tasks("nothing") is None


def test_report_section_names_the_failure() -> None:
    result = SoakResult(settings={}, samples={"server": series([80.0 + 3 * i
                                                                 for i in range(20)])})
    result.growth, result.problems = check_growth("server", result.samples["server"],
                                                  SETTINGS)
    text = format_soak(result)
    assert "server" in text and "FAIL: growth after warm-up: server rss_bytes" in text


@pytest.mark.slow
@pytest.mark.wallclock  # a fixed-length soak: waiting, not CPU
def test_short_real_soak_samples_every_process_and_passes(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.sim", "--profile", "lossy", "--sensors", "2",
         "--soak", "24s", "--rate", "2", "--soak-sample-every", "1", "--soak-warmup", "6",
         "--soak-fault-every", "4", "--quiet", "--workdir", str(tmp_path / "work"),
         "--report", str(report)],
        capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    doc = json.loads(report.read_text())
    soak = doc["soak"]
    assert soak["ok"] and soak["problems"] == []
    assert soak["link_flaps"] >= 1
    assert set(soak["samples"]) == {"server", "sim-000", "sim-001"}
    for name, samples in soak["samples"].items():
        assert len(samples) >= 12, name
        assert all(s["rss_bytes"] and s["fds"] and s["tasks"] for s in samples[2:]), name
    assert "soak (resources per process" in proc.stdout and "verdict PASS" in proc.stdout
