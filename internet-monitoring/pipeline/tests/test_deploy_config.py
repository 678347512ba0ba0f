"""Config compatibility with the platform's rendered files, check-config, capabilities,
TLS files at start-up, online backup, and that the two pyproject files and the roles'
argument specs stay in step."""

from __future__ import annotations

import io
import logging
import sqlite3
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.common.config import (
    DEFAULT_CAPABILITIES,
    SensorConfig,
    ServerConfig,
    load_sensor_config,
    sensor_config_from_dict,
    server_config_from_dict,
)
from pipeline.common.config_check import check_tls_files, ignored_keys, report_ignored
from pipeline.common.errors import ConfigError
from pipeline.sensor import main as sensor_main
from pipeline.sensor.queue import DurableQueue
from pipeline.server import main as server_main
from pipeline.tests.deploy_support import IM_DIR, REPO, ROLES

# Every key platform.md says a deployed host has on disk, with the playbook's defaults.
PLATFORM_SENSOR: dict[str, Any] = {
    "sensor_id": "sensor-1", "software_version": "sensor-dev", "token": "change-me",
    "heartbeat_interval": 30, "capabilities": ["chunks", "heartbeats"],
    "queue": {"path": "/var/lib/pipeline/queue.db", "retention_hours": 72},
    "control": {"url": "ws://monitoring.example.com:8765/control", "ping_interval": 20,
                "ping_timeout": 20, "headers": {},
                "tls": {"enabled": False, "ca_cert": "/tls/control-ca.pem",
                        "cert": "/tls/sensor-control.crt", "key": "/tls/sensor-control.key",
                        "skip_verify": False}},
    "ingest": {"url": "http://monitoring.example.com:8081/v1/ingest/chunk", "timeout": 10,
               "headers": {},
               "tls": {"enabled": False, "ca_cert": "/tls/ingest-ca.pem",
                       "cert": "/tls/sensor-ingest.crt", "key": "/tls/sensor-ingest.key",
                       "skip_verify": False}},
    "time_sync": {"enabled": False, "ntp_server": "pool.ntp.org", "fallback_skew_ms": 0.0},
}
PLATFORM_SERVER: dict[str, Any] = {
    "store": {"path": "/var/lib/pipeline/server.db", "retention_hours": 72},
    **{name: {"bind": "0.0.0.0", "port": port,
              "tls": {"enabled": False, "cert": f"/tls/{name}.crt", "key": f"/tls/{name}.key",
                      "client_ca": f"/tls/{name}-ca.pem"}}
       for name, port in (("control", 8765), ("ingest", 8081), ("stream", 8766))},
    "auth": {"sensors": [{"id": "sensor-1", "token": "change-me"}]},
    "scheduler": {"max_chunks": 32, "max_bytes": 2097152, "max_in_flight": 32},
    # pipeline_server_dashboard_sample_path is optional (unset by default): no sample file
    "dashboard": {"sample_path": "", "allow_origins": ["*"]},
}
PLATFORM_SERVER["stream"]["token"] = ""


def test_every_platform_key_is_accepted() -> None:
    sensor = sensor_config_from_dict(PLATFORM_SENSOR)
    server = server_config_from_dict(PLATFORM_SERVER)
    assert sensor.control.tls.ca_cert == "/tls/control-ca.pem"
    assert server.scheduler.max_chunks == 32
    # Paths of disabled TLS are never opened, although none of these files exists.
    check_tls_files(sensor)
    check_tls_files(server)


def test_ignored_keys_are_named_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    assert [k for k, _ in ignored_keys(SensorConfig, PLATFORM_SENSOR)] == [
        "time_sync.ntp_server", "time_sync.fallback_skew_ms"]
    assert ignored_keys(ServerConfig, PLATFORM_SERVER) == []  # dashboard.*: docs/dashboard.md
    caplog.set_level(logging.INFO, logger="pipeline.common.config_check")
    for _ in range(3):  # start-up and two reloads
        report_ignored(SensorConfig, PLATFORM_SENSOR, "sensor-test")
    lines = [r.getMessage() for r in caplog.records if "config_key_ignored" in r.getMessage()]
    assert len(lines) == 2
    assert "key=time_sync.ntp_server" in lines[0]


@pytest.mark.parametrize("doc, key", [
    ({**PLATFORM_SENSOR, "time_sync": {"ntp_servr": "x"}}, "time_sync.ntp_servr"),
    ({**PLATFORM_SENSOR, "capabilities_exclude": ["chunks"]}, "capabilities_exclude[0]"),
])
def test_unknown_and_bad_sensor_keys_still_fail(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        sensor_config_from_dict(doc)
    assert info.value.field == key


def test_unknown_server_key_still_fails() -> None:
    with pytest.raises(ConfigError) as info:
        server_config_from_dict({**PLATFORM_SERVER, "dashboard": {"sample": "x"}})
    assert info.value.field == "dashboard.sample"


def test_base_capabilities_mean_every_extension_unless_excluded() -> None:
    assert sensor_config_from_dict(PLATFORM_SENSOR).capabilities == DEFAULT_CAPABILITIES
    kept = sensor_config_from_dict({**PLATFORM_SENSOR, "capabilities_exclude": ["proto", "batch"]})
    assert "proto" not in kept.capabilities and "batch" not in kept.capabilities
    assert "http_ack" in kept.capabilities
    exact = sensor_config_from_dict({**PLATFORM_SENSOR,
                                     "capabilities": ["chunks", "heartbeats", "epoch"]})
    assert exact.capabilities == ("chunks", "heartbeats", "epoch")  # an extension named: as is


def test_enabled_tls_needs_its_files(tmp_path: Path) -> None:
    tls = dict(PLATFORM_SENSOR["control"]["tls"], enabled=True)
    doc = {**PLATFORM_SENSOR, "control": {**PLATFORM_SENSOR["control"], "tls": tls,
                                          "url": "wss://monitoring.example.com/control"}}
    config = sensor_config_from_dict(doc)
    with pytest.raises(ConfigError) as info:
        check_tls_files(config)
    assert info.value.field == "control.tls.ca_cert"
    assert "/tls/control-ca.pem" in info.value.message
    for name in ("control-ca.pem", "sensor-control.crt", "sensor-control.key"):
        (tmp_path / name).write_text("x")
    check_tls_files(config, tls_dir=str(tmp_path))  # --tls-dir: the host's copy of /tls


def write(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_check_config_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good_sensor = write(tmp_path / "sensor.yml", PLATFORM_SENSOR)
    assert sensor_main.main(["check-config", str(good_sensor)]) == 0
    out = capsys.readouterr().out
    assert "ok (ignored: time_sync.ntp_server, time_sync.fallback_skew_ms)" in out
    good_server = write(tmp_path / "server.yml", PLATFORM_SERVER)
    assert server_main.main(["check-config", str(good_server)], out=io.StringIO()) == 0

    bad = write(tmp_path / "bad.yml", {**PLATFORM_SERVER, "control": {"port": 70000}})
    assert server_main.main(["check-config", str(bad)], out=io.StringIO()) == 2
    assert "control.port: must be a port number between 0 and 65535" in capsys.readouterr().err
    tls = write(tmp_path / "tls.yml", {**PLATFORM_SERVER, "ingest": {
        "tls": {"enabled": True, "cert": "/tls/ingest.crt", "key": "/tls/ingest.key"}}})
    assert server_main.main(["check-config", str(tls)], out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert "ingest.tls.cert: TLS is enabled but /tls/ingest.crt cannot be read" in err
    assert "set tls.enabled to false" in err


def test_sensor_backup_while_enqueueing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue_path = tmp_path / "queue.db"
    config = write(tmp_path / "sensor.yml", {**PLATFORM_SENSOR, "queue": {"path": str(queue_path)}})
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        with DurableQueue(queue_path) as queue:
            while not stop.is_set():
                queue.enqueue(b"x" * 3000)
                written.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 50:
            threading.Event().wait(0.01)
        assert sensor_main.main(["backup", "--config", str(config),
                                 str(tmp_path / "copy.db")]) == 0
    finally:
        stop.set()
        thread.join()
    assert "backup:" in capsys.readouterr().out
    copy = tmp_path / "copy.db"
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with DurableQueue(copy) as restored:
        assert 50 <= restored.queue_depth() <= len(written)
    assert not (tmp_path / "copy.db.partial").exists()


def test_server_backup_refuses_a_missing_store(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "server.yml", {"store": {"path": str(tmp_path / "none.db")}})
    assert server_main.main(["backup", "--config", str(config), str(tmp_path / "b.db")],
                            out=io.StringIO()) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b.db").exists()


def test_both_pyprojects_declare_the_same_dependencies() -> None:
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    folder = tomllib.loads((IM_DIR / "pyproject.toml").read_text())["project"]
    assert root["dependencies"] == folder["dependencies"]
    for extra in ("sensor", "server"):
        assert root["optional-dependencies"][extra] == folder["optional-dependencies"][extra]
    assert root["scripts"] == folder["scripts"]
    assert not any("psycopg" in dep for dep in folder["dependencies"])  # server-only


def test_argument_specs_document_every_default() -> None:
    for role in ("pipeline_sensor", "pipeline_server"):
        defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
        specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
        options = specs["argument_specs"]["main"]["options"]
        assert set(options) == set(defaults) | {"config_dir"}
        assert all(spec.get("description") for spec in options.values())


def test_rendered_default_sensor_config_loads(tmp_path: Path) -> None:
    """load_sensor_config (the start-up path) on a platform file, env overrides included."""
    path = write(tmp_path / "sensor.yml", PLATFORM_SENSOR)
    config = load_sensor_config(path, env={"PIPELINE_SENSOR__QUEUE__PATH": str(tmp_path / "q.db")})
    assert config.queue.path == str(tmp_path / "q.db")


@pytest.mark.parametrize("program", ["sensor", "server"])
def test_check_config_needs_only_pyyaml(tmp_path: Path, program: str) -> None:
    """The roles run check-config with the host's python3 and python3-yaml: it must not
    import aiohttp, prometheus_client or protobuf."""
    doc = PLATFORM_SENSOR if program == "sensor" else PLATFORM_SERVER
    path = write(tmp_path / f"{program}.yml", doc)
    blocker = ("import runpy, sys\n"
               "for name in ('aiohttp', 'prometheus_client', 'google', 'google.protobuf'):\n"
               "    sys.modules[name] = None\n"
               f"sys.argv = ['pipeline-{program}', 'check-config', {str(path)!r}]\n"
               f"runpy.run_module('pipeline.{program}', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert ": ok" in done.stdout


def test_credential_only_changes_names_the_rest() -> None:
    from pipeline.sensor.reload import credential_only_changes

    old = sensor_config_from_dict(PLATFORM_SENSOR)
    tls = dict(PLATFORM_SENSOR["control"]["tls"], skip_verify=True)
    new = sensor_config_from_dict({**PLATFORM_SENSOR, "token": "other", "heartbeat_interval": 5,
                                   "control": {**PLATFORM_SENSOR["control"], "tls": tls,
                                               "ping_interval": 3}})
    assert credential_only_changes(old, new) == ["heartbeat_interval", "control.ping_interval"]
    assert credential_only_changes(old, sensor_config_from_dict(
        {**PLATFORM_SENSOR, "token": "other"})) == []


def test_health_commands_fail_when_nothing_answers(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.sim.processes import free_port

    url = f"http://127.0.0.1:{free_port()}/readyz"
    assert server_main.main(["health", "--url", url], out=io.StringIO()) == 1
    sensor = write(tmp_path / "sensor.yml", PLATFORM_SENSOR)  # no metrics.listen
    assert sensor_main.main(["health", "--config", str(sensor)]) == 2
    assert "metrics.listen" in capsys.readouterr().err
