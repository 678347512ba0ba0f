"""The simulator can fail: against a deliberately broken server that acks before it
commits, killed with SIGKILL while data flows, the report shows lost events and
``pipeline-sim`` exits non-zero. The same run against the real server passes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.sim.broken_server import ENV_FLAG
from pipeline.tests.sim_support import run_sim

ARGS = ["--profile", "clean", "--sensors", "3", "--events", "40", "--duration", "5",
        "--kill-server-every", "2", "--restart-delay", "0.5", "--seed", "3", "--quiet",
        "--drain-timeout", "60"]


def test_ack_before_commit_server_loses_events_and_the_sim_says_so(tmp_path: Path) -> None:
    run = run_sim([*ARGS, "--server-module", "pipeline.sim.broken_server"], tmp_path,
                  env={ENV_FLAG: "1", "PIPELINE_TEST_COMMIT_DELAY_S": "1.5"})
    assert run.report is not None, run.explain()
    report = run.report
    assert run.code == 1, run.explain()
    assert report["ok"] is False
    assert report["facts"]["kills"]["server"] >= 2
    assert report["lost"] > 0 and report["missing"] >= report["lost"], run.explain()
    assert report["left_in_queues_chunks"] == 0  # the sensors deleted them: acked, then lost
    assert report["samples"]["lost"], run.explain()
    assert "FAIL" in run.stdout and "lost" in run.stdout


def test_the_same_run_against_the_real_server_passes(tmp_path: Path) -> None:
    run = run_sim(ARGS, tmp_path)
    assert run.report is not None, run.explain()
    assert run.code == 0 and run.report["ok"] is True, run.explain()
    # At least one SIGKILL mid-run (a fast drain on an idle machine may finish before the
    # second one is due).
    assert run.report["facts"]["kills"]["server"] >= 1
    assert run.report["delivered_exactly_once"] == 120


def test_broken_server_refuses_to_start_without_its_test_flag(tmp_path: Path) -> None:
    config = tmp_path / "server.yml"
    config.write_text(f"store:\n  path: {tmp_path / 'server.db'}\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != ENV_FLAG}
    proc = subprocess.run([sys.executable, "-m", "pipeline.sim.broken_server", "--config",
                           str(config)], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert ENV_FLAG in proc.stderr and not (tmp_path / "server.db").exists()
