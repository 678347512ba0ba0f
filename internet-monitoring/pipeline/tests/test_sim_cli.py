"""``pipeline-sim`` modes and arguments: an existing server by URL and token, in-process
agents, the profiles listing, and usage errors that name what is wrong."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sim.main import main, profiles_table
from pipeline.sim.processes import ServerProcess
from pipeline.tests.sim_support import run_sim

FLEET_TOKEN = "sim-test-fleet-token-" + "x" * 24


@pytest.fixture
def existing_server(tmp_path: Path):
    server = ServerProcess(tmp_path / "existing", {},
                           extra_config={"auth": {"sensors": [], "fleet_token": FLEET_TOKEN}})
    server.start()
    yield server
    server.terminate()


def test_against_an_existing_server_by_url_and_token(existing_server: ServerProcess,
                                                     tmp_path: Path) -> None:
    run = run_sim(["--profile", "lossy", "--sensors", "2", "--events", "15", "--duration", "2",
                   "--quiet", "--server-url", existing_server.http_base,
                   "--control-url", existing_server.control_url, "--token", FLEET_TOKEN],
                  tmp_path / "run")
    assert run.report is not None, run.explain()
    assert run.code == 0 and run.report["ok"] is True, run.explain()
    assert run.report["facts"]["server"] == existing_server.http_base
    sensors = existing_server.get_json("/v1/sensors")["sensors"]
    ids = [s["sensor_id"] for s in sensors]
    assert len(ids) == 2 and all(i.startswith("sim-") for i in ids)  # fresh ids per run
    assert sum(len(existing_server.events(i)) for i in ids) == 30
    assert existing_server.kills == 0


def test_in_process_agents(tmp_path: Path) -> None:
    run = run_sim(["--profile", "lossy", "--in-process", "--sensors", "2", "--events", "20",
                   "--duration", "2", "--quiet", "--set", "reset_mid_stream_p=0.2"], tmp_path)
    assert run.report is not None, run.explain()
    assert run.code == 0 and run.report["delivered_exactly_once"] == 40, run.explain()
    assert run.report["facts"]["mode"] == "in-process"
    assert run.report["facts"]["parameters"]["profile"]["faults"]["upstream"][
        "reset_mid_stream_p"] == 0.2
    assert run.report["retries"] is not None


def test_compare_reports_both_runs_and_enforces_the_ratio(tmp_path: Path) -> None:
    run = run_sim(["--profile", "lossy", "--compare", "clean", "--sensors", "2", "--events", "15",
                   "--duration", "0", "--quiet", "--min-goodput-ratio", "1000"], tmp_path)
    assert run.report is not None, run.explain()
    doc = run.report
    assert (doc["baseline"]["facts"]["profile"] == "clean"
            and doc["run"]["facts"]["profile"] == "lossy")
    assert doc["baseline"]["ok"] and doc["run"]["ok"], run.explain()  # both delivered all
    assert doc["goodput_ratio"] == doc["run"]["goodput_mb_s"] / doc["baseline"]["goodput_mb_s"]
    assert doc["goodput_ratio_met"] is False and doc["ok"] is False
    assert run.code == 1 and "% of clean" in run.stdout


def test_list_profiles_prints_the_table() -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.sim", "--list-profiles"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stdout == profiles_table()
    for name in ("clean", "lossy", "satellite", "partition", "chaos"):
        assert f"`{name}`" in proc.stdout


@pytest.mark.parametrize("argv,needle", [
    (["--set", "latency=5"], "latency"),
    (["--set", "reset_mid_stream_p=2"], "reset_mid_stream_p"),
    (["--event-size", "5-2"], "event size"),
    (["--in-process", "--kill-sensors-every", "3"], "in-process"),
    (["--server-url", "http://127.0.0.1:9", "--token", "t", "--kill-server-every", "3"],
     "never killed"),
    (["--token", "t"], "--server-url"),
    (["--server-url", "https://example.invalid", "--token", "t"], "TLS"),
    (["--min-goodput-ratio", "0.7"], "--compare"),
    (["--replicas", "2"], "--store postgres"),
    (["--replicas", "0", "--store", "postgres"], "--replicas"),
    (["--store", "postgres", "--kill-replica-every", "5"], "--replicas 2 or more"),
    (["--replicas", "2", "--store", "postgres", "--kill-replica-every", "5",
      "--kill-server-every", "5"], "choose one"),
    (["--store", "postgres", "--server-url", "http://127.0.0.1:9", "--token", "t"],
     "--server-url"),
])
def test_usage_errors_exit_2_naming_the_problem(argv: list[str], needle: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*argv, "--workdir", str(tmp_path / "w"), "--quiet"])
    assert code == 2
    assert needle in capsys.readouterr().err


def test_non_empty_workdir_is_refused(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.db").write_text("x")
    assert main(["--workdir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
