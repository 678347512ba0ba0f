"""The runbook's alert rules: ``promtool check rules`` and ``promtool test rules``.

The unit-test file fires each alert on synthetic series and shows it silent at or below
its threshold. To show those tests can fail, each alert's threshold is moved in a copy of
the rules and the same unit tests must then fail. promtool comes from Debian's
``prometheus`` package (``make tools`` installs it); without it these tests skip locally
and fail under ``CI=true`` (the ``promtool`` fixture in conftest.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "prometheus"
RULES = PROMETHEUS_DIR / "pipeline-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "tests" / "pipeline-alerts.test.yml"
ALERTS = {"PipelineSensorQueueBacklog", "PipelineSnapshotStale", "PipelineChunkRetries",
          "PipelineClockSkew", "PipelineHeartbeatsMissing", "PipelineForwardLagGrowing"}


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_rule_file_holds_the_runbook_alerts() -> None:
    doc = yaml.safe_load(RULES.read_text())
    names = [rule["alert"] for group in doc["groups"] for rule in group["rules"]]
    assert sorted(names) == sorted(ALERTS)
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test["alert_rule_test"]}
    assert tested == ALERTS


def test_promtool_check_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES), cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_promtool_check_config_of_the_example_prometheus(promtool: str) -> None:
    result = run(promtool, "check", "config", "pipeline-prometheus.example.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_promtool_unit_tests_fire_and_stay_silent(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(RULE_TESTS), cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


# Each mutation moves one alert's threshold so that its "fires" case no longer fires (or
# its "silent" case fires): the unit tests must catch it.
MUTATIONS = {
    "PipelineSensorQueueBacklog": ("(sensor_queue_depth) > 500", "(sensor_queue_depth) > 1000"),
    "PipelineSnapshotStale": ("server_snapshot_age_seconds > 300",
                              "server_snapshot_age_seconds > 200"),
    "PipelineChunkRetries": ("increase(sensor_chunk_retry_total[10m])) > 5",
                             "increase(sensor_chunk_retry_total[10m])) > 3"),
    "PipelineClockSkew": ("abs(pipeline_clock_skew_ms) > 500", "pipeline_clock_skew_ms > 500"),
    "PipelineHeartbeatsMissing": ("2 * pipeline_heartbeat_interval_seconds",
                                  "1 * pipeline_heartbeat_interval_seconds"),
    "PipelineForwardLagGrowing": ("delta(pipeline_forward_lag_seconds[10m]) > 0",
                                  "delta(pipeline_forward_lag_seconds[10m]) > -1000"),
}


@pytest.mark.parametrize("alert", sorted(MUTATIONS))
def test_a_moved_threshold_fails_the_unit_tests(promtool: str, tmp_path: Path,
                                                alert: str) -> None:
    old, new = MUTATIONS[alert]
    text = RULES.read_text()
    assert text.count(old) == 1
    (tmp_path / "tests").mkdir()
    (tmp_path / RULES.name).write_text(text.replace(old, new))
    shutil.copy(RULE_TESTS, tmp_path / "tests" / RULE_TESTS.name)
    result = run(promtool, "test", "rules", RULE_TESTS.name, cwd=tmp_path / "tests")
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr
