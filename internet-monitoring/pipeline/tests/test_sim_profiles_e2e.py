"""A short run of every simulator profile through the real ``pipeline-sim`` CLI.

Real server and sensor processes, a seeded fault proxy per sensor link, real SIGKILLs in
``chaos``. Windows and kill periods are shortened with ``--set`` so the whole file stays
around two to three minutes; each run must deliver every event exactly once (by id and
byte-identical hash), and the profile's faults must really have happened.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.tests.sim_support import run_sim

pytestmark = pytest.mark.slow

SHORT = {
    "clean": ["--sensors", "3", "--events", "40", "--duration", "3"],
    "lossy": ["--sensors", "3", "--events", "40", "--duration", "4"],
    "satellite": ["--sensors", "3", "--events", "20", "--duration", "4"],
    # Events of 1 KiB to 300 KiB: most span two or three chunks, reassembled across cuts.
    "partition": ["--sensors", "3", "--events", "30", "--duration", "10",
                  "--event-size", "1k-300k",
                  "--set", "partition_first_s=2", "--set", "partition_every_s=7",
                  "--set", "partition_duration_s=3"],
    "chaos": ["--sensors", "4", "--events", "50", "--duration", "12",
              "--set", "partition_first_s=3", "--set", "partition_every_s=7",
              "--set", "partition_duration_s=3", "--set", "blackholes=6.5:2",
              "--kill-sensors-every", "5", "--kill-server-every", "7"],
}


def _faults_happened(profile: str, report: dict) -> None:
    faults, kills, latency = report["facts"]["faults"], report["facts"]["kills"], report["latency"]
    if profile == "clean":
        assert faults["resets"] == 0 and kills == {"sensors": 0, "server": 0}
    elif profile == "lossy":
        assert faults["resets_at_connect"] > 0 and faults["resets_mid_stream"] > 0
        assert report["duplicates_absorbed"] > 0 or report["retries"] > 0
    elif profile == "satellite":
        assert latency["p50_ms"] >= 600  # at least one 300 ms hop each way
    elif profile == "partition":
        assert faults["resets_partition"] > 0
        assert report["generated_bytes"] > report["generated"] * 128 * 1024 / 2  # multi-chunk
    elif profile == "chaos":
        assert kills["sensors"] >= 2 and kills["server"] >= 1
        assert faults["resets_partition"] > 0 and faults["resets_mid_stream"] > 0


@pytest.mark.parametrize("profile", list(SHORT))
def test_short_profile_delivers_every_event_exactly_once(profile: str, tmp_path: Path) -> None:
    args = ["--profile", profile, "--seed", "11", "--drain-timeout", "120", "--quiet",
            *SHORT[profile]]
    run = run_sim(args, tmp_path)
    assert run.report is not None, run.explain()
    report = run.report
    expected = int(args[args.index("--sensors") + 1]) * int(args[args.index("--events") + 1])
    assert report["generated"] == expected, run.explain()
    assert report["missing"] == 0 and report["duplicated"] == 0, run.explain()
    assert report["corrupted"] == 0 and report["unexpected"] == 0, run.explain()
    assert report["delivered_exactly_once"] == expected, run.explain()
    assert report["left_in_queues_chunks"] == 0 and report["facts"]["drain"] == "complete"
    assert report["ok"] is True and run.code == 0, run.explain()
    assert "verdict" in run.stdout and "PASS" in run.stdout
    _faults_happened(profile, report)
