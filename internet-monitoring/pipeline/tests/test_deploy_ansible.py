"""The Ansible roles, run for real (ansible-core, local connection) into temporary config
dirs for a sensor host and a server host: rendered files, paths and modes as the platform
has them, idempotence, reload (not restart) when only credentials change, no secret in
``--check --diff``, token_sha256 on request, the compose and Prometheus wiring."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from pipeline.tests.conftest import require_tool
from pipeline.tests.deploy_support import (
    IM_DIR,
    VENV_BIN,
    Lab,
    PlaybookRun,
    lab_vars,
    make_lab,
    mode,
    run_playbook,
)

SENSOR_TOKEN = "sensor-token-first-0123456789abcdef"
SENSOR_TOKEN_2 = "sensor-token-second-fedcba9876543210"
STREAM_TOKEN = "stream-token-secret-5555555555"
SENSOR_TLS = {"control-ca.pem", "sensor-control.crt", "sensor-control.key"}
SERVER_TLS = {"control.crt", "control.key"}


@pytest.fixture(scope="module")
def pki() -> dict[str, str]:
    ca = trustme.CA()
    first, second = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("sensor-1")
    return {"ca": ca.cert_pem.bytes().decode(),
            "cert": first.cert_chain_pems[0].bytes().decode(),
            "key": first.private_key_pem.bytes().decode(),
            "cert2": second.cert_chain_pems[0].bytes().decode(),
            "key2": second.private_key_pem.bytes().decode(),
            "client_cert": client.cert_chain_pems[0].bytes().decode(),
            "client_key": client.private_key_pem.bytes().decode()}


Vars = dict[str, Any]


def host_vars(lab: Lab, pki: dict[str, str], **changes: Any) -> tuple[Vars, Vars]:
    sensor = lab_vars(lab, "sensor",
                      pipeline_sensor_token=changes.get("sensor_token", SENSOR_TOKEN),
                      pipeline_sensor_control_url="wss://127.0.0.1:8765/control",
                      pipeline_sensor_control_tls_enable=True,
                      pipeline_sensor_control_tls_ca_content=pki["ca"],
                      pipeline_sensor_control_tls_cert_content=pki["client_cert"],
                      pipeline_sensor_control_tls_key_content=pki["client_key"],
                      pipeline_sensor_heartbeat_interval=changes.get("heartbeat", 30))
    server = lab_vars(lab, "server",
                      pipeline_server_hash_tokens=True,
                      pipeline_server_auth_sensors=[
                          {"id": "sensor-1", "token": changes.get("sensor_token", SENSOR_TOKEN)},
                          {"id": "sensor-2", "token_sha256": "ab" * 32}],
                      pipeline_server_stream_token=changes.get("stream_token", STREAM_TOKEN),
                      pipeline_server_control_tls_enable=True,
                      pipeline_server_control_tls_cert_content=changes.get("cert", pki["cert"]),
                      pipeline_server_control_tls_key_content=changes.get("key", pki["key"]))
    return sensor, server


def ok(run: PlaybookRun) -> PlaybookRun:
    assert run.rc == 0, run.output[-4000:]
    return run


@pytest.mark.slow
def test_role_lifecycle(tmp_path: Path, pki: dict[str, str]) -> None:
    lab = make_lab(tmp_path)
    sensor, server = host_vars(lab, pki)

    ok(run_playbook(lab, sensor, server))
    assert sorted(lab.take_calls()) == ["prometheus reload", "sensor restart", "server restart"]
    check_sensor_files(lab)
    check_server_files(lab)
    check_prometheus_config(lab)

    second = ok(run_playbook(lab, sensor, server))
    assert second.changed == 0, second.output[-3000:]
    assert lab.take_calls() == []

    # Credentials only: new sensor token (both hosts), stream token, renewed certificate.
    sensor, server = host_vars(lab, pki, sensor_token=SENSOR_TOKEN_2, stream_token="other-" * 5,
                               cert=pki["cert2"], key=pki["key2"])
    ok(run_playbook(lab, sensor, server))
    assert sorted(lab.take_calls()) == ["sensor reload", "server reload"]
    rendered = yaml.safe_load((lab.server_dir / "config" / "server.yml").read_text())
    assert rendered["auth"]["sensors"][0]["token_sha256"] == sha256(SENSOR_TOKEN_2)
    assert (lab.server_dir / "tls" / "control.crt").read_text() == pki["cert2"]

    # Anything else restarts.
    sensor, server = host_vars(lab, pki, sensor_token=SENSOR_TOKEN_2, stream_token="other-" * 5,
                               cert=pki["cert2"], key=pki["key2"], heartbeat=10)
    ok(run_playbook(lab, sensor, None))
    assert lab.take_calls() == ["sensor restart"]

    # --check --diff of a token and certificate change shows none of them.
    sensor, server = host_vars(lab, pki, sensor_token="never-shown-" * 3, heartbeat=10,
                               stream_token="hidden-stream-" * 2)
    dry = ok(run_playbook(lab, sensor, server, "--check", "--diff"))
    assert dry.changed > 0
    for secret in ("never-shown-", "hidden-stream-", SENSOR_TOKEN, SENSOR_TOKEN_2,
                   sha256("never-shown-" * 3), pki["key"].splitlines()[1],
                   pki["client_key"].splitlines()[1], "BEGIN"):
        assert secret not in dry.output
    assert lab.take_calls() == []
    assert sha256("never-shown-" * 3) not in (lab.server_dir / "config" / "server.yml").read_text()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_sensor_files(lab: Lab) -> None:
    config, tls = lab.sensor_dir / "config", lab.sensor_dir / "tls"
    assert mode(tls) == 0o700
    assert {p.name for p in tls.iterdir()} == SENSOR_TLS  # ingest files: no content, none
    assert mode(tls / "sensor-control.key") == 0o600
    assert mode(config / "sensor.yml") == 0o600
    doc = yaml.safe_load((config / "sensor.yml").read_text())
    assert doc["token"] == SENSOR_TOKEN
    assert doc["control"]["tls"] == {"enabled": True, "ca_cert": "/tls/control-ca.pem",
                                     "cert": "/tls/sensor-control.crt",
                                     "key": "/tls/sensor-control.key", "skip_verify": False}
    assert doc["ingest"]["tls"]["ca_cert"] == ""  # not written, so not named
    assert doc["capabilities"] == ["chunks", "heartbeats"]
    assert doc["time_sync"] == {"enabled": False, "ntp_server": "pool.ntp.org",
                                "fallback_skew_ms": 0.0}
    assert SENSOR_TOKEN not in (config / ".sensor.restart-keys.yml").read_text()


def check_server_files(lab: Lab) -> None:
    config, tls = lab.server_dir / "config", lab.server_dir / "tls"
    assert mode(tls) == 0o700
    assert {p.name for p in tls.iterdir()} == SERVER_TLS
    assert mode(tls / "control.key") == 0o600
    assert mode(config / "server.yml") == 0o600
    text = (config / "server.yml").read_text()
    assert SENSOR_TOKEN not in text  # pipeline_server_hash_tokens: only the hash is kept
    doc = yaml.safe_load(text)
    assert doc["auth"]["sensors"] == [{"id": "sensor-1", "token_sha256": sha256(SENSOR_TOKEN)},
                                      {"id": "sensor-2", "token_sha256": "ab" * 32}]
    assert doc["stream"]["token"] == STREAM_TOKEN
    assert doc["control"]["tls"]["cert"] == "/tls/control.crt"
    assert doc["dashboard"] == {"sample_path": "", "allow_origins": ["*"]}
    assert doc["forward"] == {"remote_write": {}}  # off unless the operator sets it
    assert STREAM_TOKEN not in (config / ".server.restart-keys.yml").read_text()
    cloud = lab.server_dir.parent
    compose = yaml.safe_load((cloud / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"prometheus", "pipeline-server"}
    assert compose["services"]["pipeline-server"]["network_mode"] == "host"
    assert "pipeline_server_data" in compose["volumes"]
    prometheus = yaml.safe_load((cloud / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == ["alert.rules", "pipeline-alerts.yml"]
    assert [job["job_name"] for job in prometheus["scrape_configs"]] == ["prometheus",
                                                                         "pipeline-server"]
    assert prometheus["scrape_configs"][1]["static_configs"][0]["targets"] == ["172.17.0.1:8081"]


def test_host_overrides_and_validation(tmp_path: Path) -> None:
    lab = make_lab(tmp_path)
    sensor = lab_vars(lab, "sensor", pipeline_sensor_enable=False,
                      pipeline_sensor_id_host="pi-host-7", pipeline_sensor_token_host="host-token")
    ok(run_playbook(lab, sensor, None))
    assert not (lab.sensor_dir / "config").exists()  # no *_enable_host: global switch (off)
    sensor["pipeline_sensor_enable_host"] = True
    ok(run_playbook(lab, sensor, None))
    path = lab.sensor_dir / "config" / "sensor.yml"
    doc = yaml.safe_load(path.read_text())
    assert (doc["sensor_id"], doc["token"]) == ("pi-host-7", "host-token")
    assert doc["control"]["url"] == "ws://monitoring.example.com:8765/control"  # global kept
    lab.take_calls()

    # check-config as validate: a bad value never replaces the running file; the play
    # stops with the dotted key and the fix (while the template's own output stays hidden).
    before = path.read_text()
    bad = run_playbook(lab, {**sensor, "pipeline_sensor_control_url_host": "http://wrong/control"},
                       None)
    assert bad.rc != 0
    assert "control.url: must be a ws:// or wss:// URL" in bad.output
    assert "host-token" not in bad.output
    assert path.read_text() == before
    assert lab.take_calls() == []
    assert not (lab.sensor_dir / "config" / ".sensor.restart-keys.yml").read_text().count("wrong")


def stand_in_pip(lab: Lab, side: str) -> Path:
    """A pip at ``<venv>/bin/pip`` that records its call and puts the two programs where
    an install would (this venv's scripts): the real install downloads dependencies."""
    bin_dir = lab.root / f"{side}-venv" / "bin"
    bin_dir.mkdir(parents=True)
    pip = bin_dir / "pip"
    pip.write_text(f"#!/bin/sh\necho \"{side} pip $1\" >> {lab.calls}\n"
                   f"ln -sf {VENV_BIN}/pipeline-sensor {VENV_BIN}/pipeline-server {bin_dir}/\n"
                   "echo 'Successfully installed openuxi-pipeline-0.1.0'\n")
    pip.chmod(0o755)
    return pip


@pytest.mark.slow
def test_systemd_mode_installs_verifiable_units(tmp_path: Path) -> None:
    """pipeline_service_manager: systemd installs the package from the synced folder (only
    when its source changed), the shipped unit and a drop-in binding this host's config and
    TLS directories; systemd-analyze accepts the result; a second run changes nothing."""
    analyze = require_tool("systemd-analyze")
    lab = make_lab(tmp_path)
    hosts = {}
    for side in ("sensor", "server"):
        synced = tmp_path / f"{side}-host" / "internet-monitoring"
        shutil.copytree(IM_DIR, synced, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "tests", "*.egg-info"))
        pip = stand_in_pip(lab, side)
        hosts[side] = lab_vars(lab, side, pipeline_service_manager="systemd",
                               pipeline_source_dir=str(synced), pipeline_install_package=True,
                               pipeline_venv_dir=str(pip.parent.parent),
                               pipeline_pip_executable=str(pip))
    hosts["server"]["pipeline_server_prometheus_enable"] = False
    ok(run_playbook(lab, hosts["sensor"], hosts["server"]))
    calls = lab.take_calls()
    for side in ("sensor", "server"):  # units reloaded before the restart, per host
        assert [c for c in calls if c.startswith(side)] == [
            f"{side} pip install", f"{side} daemon-reload", f"{side} restart"]
    for side, unit in (("sensor", "pipeline-agent"), ("server", "pipeline-server")):
        units = tmp_path / f"{side}-host" / "systemd"
        dropin = (units / f"{unit}.service.d" / "openuxi.conf").read_text()
        pipeline = tmp_path / f"{side}-host" / "internet-monitoring" / "pipeline"
        assert f"BindReadOnlyPaths={pipeline}/config:/config {pipeline}/tls:/tls" in dropin
        done = subprocess.run([analyze, "verify", str(units / f"{unit}.service")],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
    compose = yaml.safe_load((lab.server_dir.parent / "docker-compose.yml").read_text())
    assert "pipeline-server" not in compose["services"]  # systemd instead of compose

    again = ok(run_playbook(lab, hosts["sensor"], hosts["server"]))
    assert again.changed == 0 and lab.take_calls() == []  # no reinstall of the same source

    # New code on the sensor host restarts it; a new token alone (the rendered config lives
    # inside the synced folder) only reloads the server.
    agent_py = tmp_path / "sensor-host" / "internet-monitoring" / "pipeline" / "sensor" / "agent.py"
    agent_py.write_text(agent_py.read_text() + "\n# upgraded\n")
    hosts["server"]["pipeline_server_auth_sensors"] = [{"id": "pi-09", "token": "new-" * 8}]
    ok(run_playbook(lab, hosts["sensor"], hosts["server"]))
    assert sorted(lab.take_calls()) == ["sensor pip install", "sensor restart", "server reload"]


def check_prometheus_config(lab: Lab) -> None:
    """The platform's prometheus.yml with the role's job and rule file passes promtool."""
    promtool = require_tool("promtool")
    prometheus = lab.server_dir.parent / "prometheus"
    shutil.copy(IM_DIR / "prometheus" / "pipeline-alerts.yml", prometheus)  # the synced folder
    (prometheus / "alert.rules").write_text("groups: []\n")  # the platform's own rules
    done = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=prometheus,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 2 rule files found" in done.stdout
