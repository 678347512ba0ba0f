"""Configs rendered by the Ansible roles from the platform's default variables (plain, TLS
with certificate contents, TLS without them) pass ``check-config`` and start the server and
the agent as real processes, each with its image's start command and HEALTHCHECK command
(container mount points moved to the rendered directories): an event submitted on the
sensor arrives on the server."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import trustme
import yaml

from pipeline.sim.processes import ManagedProcess
from pipeline.tests.deploy_support import (
    DOCKER_DIR,
    Lab,
    free_port,
    image_commands,
    image_env,
    lab_vars,
    make_lab,
    run_playbook,
    start_image_process,
    wait_healthy,
)

TOKEN = "change-me"  # the platform's default pipeline_sensor_token
SENSOR_IMAGE = image_commands(DOCKER_DIR / "sensor.Dockerfile")
SERVER_IMAGE = image_commands(DOCKER_DIR / "server.Dockerfile")


def mount_env(prefix: str, doc: Any, mounts: Mapping[str, Path], at: tuple[str, ...] = ()
              ) -> dict[str, str]:
    """Overrides (``PREFIX__A__B``) moving every path under a container mount point to the
    directory mounted there: what the compose volumes do."""
    env: dict[str, str] = {}
    if isinstance(doc, dict):
        for key, value in doc.items():
            env.update(mount_env(prefix, value, mounts, (*at, key)))
    elif isinstance(doc, str):
        for point, source in mounts.items():
            if doc.startswith(point + "/"):
                name = "__".join((prefix, *(part.upper() for part in at)))
                env[name] = str(source) + doc[len(point):]
    return env


def check_config(program: str, config: Path, tls_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", f"pipeline.{program}", "check-config",
                           "--tls-dir", str(tls_dir), str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


class Deployment:
    """The rendered server and sensor of a lab, started as the images start them."""

    def __init__(self, lab: Lab, scheme: str) -> None:
        self.lab = lab
        self.secure = scheme == "https"
        self.ports = {"control": free_port(), "ingest": free_port(), "stream": free_port()}
        self.health_port = free_port()
        state = lab.root / "state"
        state.mkdir()
        self.server_mounts = {"/config": lab.server_dir / "config", "/tls": lab.server_dir / "tls",
                              "/var/lib/pipeline": state}
        self.sensor_mounts = {"/config": lab.sensor_dir / "config", "/tls": lab.sensor_dir / "tls",
                              "/var/lib/pipeline": state}
        server_doc = yaml.safe_load((lab.server_dir / "config" / "server.yml").read_text())
        sensor_doc = yaml.safe_load((lab.sensor_dir / "config" / "sensor.yml").read_text())
        self.server_env = image_env(SERVER_IMAGE, **mount_env(
            "PIPELINE_SERVER", server_doc, self.server_mounts))
        for name, port in self.ports.items():  # loopback and free ports, not 0.0.0.0:8081
            self.server_env[f"PIPELINE_SERVER__{name.upper()}__PORT"] = str(port)
            self.server_env[f"PIPELINE_SERVER__{name.upper()}__BIND"] = "127.0.0.1"
        ws = "wss" if self.secure else "ws"
        self.sensor_env = image_env(SENSOR_IMAGE, **mount_env(
            "PIPELINE_SENSOR", sensor_doc, self.sensor_mounts),
            PIPELINE_SENSOR__METRICS__LISTEN=f"127.0.0.1:{self.health_port}",
            PIPELINE_SENSOR__CONTROL__URL=f"{ws}://127.0.0.1:{self.ports['control']}/control",
            PIPELINE_SENSOR__INGEST__URL=f"{scheme}://127.0.0.1:{self.ports['ingest']}"
                                         "/v1/ingest/chunk")
        self.processes: list[ManagedProcess] = []

    def start_server(self) -> ManagedProcess:
        server = start_image_process("server", SERVER_IMAGE, self.server_mounts,
                                     self.server_env, self.lab.root)
        self.processes.append(server)
        wait_healthy(SERVER_IMAGE, self.server_mounts, self.server_env, server)
        return server

    def start_agent(self) -> ManagedProcess:
        agent = start_image_process("agent", SENSOR_IMAGE, self.sensor_mounts, self.sensor_env,
                                    self.lab.root)
        self.processes.append(agent)
        wait_healthy(SENSOR_IMAGE, self.sensor_mounts, self.sensor_env, agent)
        return agent

    def submit(self, data: bytes) -> str:
        config = self.lab.sensor_dir / "config" / "sensor.yml"
        done = subprocess.run([sys.executable, "-m", "pipeline.sensor", "submit", "--config",
                               str(config), "-"], input=data, capture_output=True, timeout=60,
                              env={**os.environ, **self.sensor_env}, check=True)
        return done.stdout.decode().strip()

    def event_ids(self, ca: Path | None, token: str = TOKEN) -> set[str]:
        scheme = "https" if self.secure else "http"
        request = urllib.request.Request(
            f"{scheme}://127.0.0.1:{self.ports['ingest']}/v1/sensors/sensor-1/events",
            headers={"Authorization": f"Bearer {token}"})
        context = ssl.create_default_context(cafile=str(ca)) if ca else None
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return {e["event_id"] for e in json.loads(answer.read())["events"]}

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield make_lab(tmp_path)


def render(lab: Lab, sensor: dict[str, Any], server: dict[str, Any]) -> None:
    run = run_playbook(lab, sensor, server)
    assert run.rc == 0, run.output[-4000:]


def wait_for_event(deployment: Deployment, ca: Path | None, event_id: str,
                   token: str = TOKEN) -> None:
    deadline = time.monotonic() + 30
    while event_id not in deployment.event_ids(ca, token):
        assert time.monotonic() < deadline, "\n".join(
            p.log_text()[-3000:] for p in deployment.processes)
        time.sleep(0.2)


def deliver_one_event(deployment: Deployment, ca: Path | None) -> tuple[ManagedProcess,
                                                                         ManagedProcess]:
    server = deployment.start_server()
    agent = deployment.start_agent()
    wait_for_event(deployment, ca, deployment.submit(b'{"test": "ping", "rtt_ms": 12.5}'))
    log = agent.log_text()
    # The platform's old default [chunks, heartbeats] gets the fast path (server_time only
    # with time_sync.enabled, which the platform defaults to false).
    started = next(line for line in log.splitlines() if "sensor_agent_started" in line)
    assert "capabilities=chunks,heartbeats,epoch,heartbeat_stats,proto,batch,http_ack " in started
    assert log.count("config_key_ignored program=sensor key=time_sync.ntp_server") == 1
    assert "config_key_ignored" not in server.log_text()  # the server uses every platform key
    return server, agent


def rotate_token_by_reload(deployment: Deployment, server: ManagedProcess,
                           agent: ManagedProcess) -> None:
    """What the role's reload handler does after a token change: new files, SIGHUP to
    both; the agent keeps its process (and queue) and authenticates with the new token."""
    lab, new_token = deployment.lab, "rotated-token-0123456789abcdef"
    for path, edit in ((lab.server_dir / "config" / "server.yml",
                        lambda d: d["auth"]["sensors"][0].update(token=new_token)),
                       (lab.sensor_dir / "config" / "sensor.yml",
                        lambda d: d.update(token=new_token))):
        doc = yaml.safe_load(path.read_text())
        edit(doc)
        path.write_text(yaml.safe_dump(doc))
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while "config_reloaded reason=sighup" not in server.log_text():
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.1)
    agent.proc.send_signal(signal.SIGHUP)
    wait_for_event(deployment, None, deployment.submit(b'{"test": "dns", "lookup_ms": 3}'),
                   new_token)
    assert agent.running and agent.starts == 1
    assert "sensor_reloaded credentials=token,tls" in agent.log_text()
    assert "sensor_reload_partial" not in agent.log_text()
    assert agent.log_text().count("config_key_ignored program=sensor "
                                  "key=time_sync.ntp_server") == 1  # not at every reload


@pytest.mark.slow
def test_platform_defaults_check_and_start(lab: Lab) -> None:
    render(lab, lab_vars(lab, "sensor"),
           lab_vars(lab, "server", pipeline_server_auth_sensors=[{"id": "sensor-1",
                                                                  "token": TOKEN}]))
    for program, side in (("sensor", lab.sensor_dir), ("server", lab.server_dir)):
        checked = check_config(program, side / "config" / f"{program}.yml", side / "tls")
        assert checked.returncode == 0, checked.stderr
        assert "ok" in checked.stdout
    deployment = Deployment(lab, "http")
    try:
        server, agent = deliver_one_event(deployment, None)
        rotate_token_by_reload(deployment, server, agent)
    finally:
        deployment.stop()


@pytest.mark.slow
def test_tls_with_contents_check_and_start(lab: Lab) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = leaf.cert_chain_pems[0].bytes().decode(), leaf.private_key_pem.bytes().decode()
    ca_pem = ca.cert_pem.bytes().decode()
    server_tls = {f"pipeline_server_{name}_tls_{item}": value
                  for name in ("control", "ingest", "stream")
                  for item, value in (("enable", True), ("cert_content", cert),
                                      ("key_content", key))}
    sensor_tls = {f"pipeline_sensor_{name}_tls_{item}": value for name in ("control", "ingest")
                  for item, value in (("enable", True), ("ca_content", ca_pem))}
    render(lab, lab_vars(lab, "sensor", pipeline_sensor_control_url="wss://127.0.0.1:8765/control",
                         pipeline_sensor_ingest_url="https://127.0.0.1:8081/v1/ingest/chunk",
                         **sensor_tls),
           lab_vars(lab, "server", pipeline_server_auth_sensors=[{"id": "sensor-1",
                                                                  "token": TOKEN}],
                    pipeline_server_hash_tokens=True, **server_tls))
    ca_file = lab.root / "ca.pem"
    ca_file.write_text(ca_pem)
    deployment = Deployment(lab, "https")
    try:
        deliver_one_event(deployment, ca_file)
    finally:
        deployment.stop()


def test_tls_without_contents(lab: Lab) -> None:
    """TLS switched on but no certificate content: the sensor uses the system CA store
    and no client certificate (passes, starts); a server cannot serve TLS without a
    certificate, so check-config stops it naming the key (the role's validate would
    refuse it, hence validate off here to get the file)."""
    render(lab, lab_vars(lab, "sensor", pipeline_validate_config=False,
                         pipeline_sensor_control_url="wss://monitoring.example.com/control",
                         pipeline_sensor_control_tls_enable=True,
                         pipeline_sensor_ingest_url="https://monitoring.example.com/v1/ingest"
                                                    "/chunk",
                         pipeline_sensor_ingest_tls_enable=True),
           lab_vars(lab, "server", pipeline_validate_config=False,
                    pipeline_server_control_tls_enable=True))
    sensor = check_config("sensor", lab.sensor_dir / "config" / "sensor.yml",
                          lab.sensor_dir / "tls")
    assert sensor.returncode == 0, sensor.stderr
    server = check_config("server", lab.server_dir / "config" / "server.yml",
                          lab.server_dir / "tls")
    assert server.returncode == 2
    assert "control.tls.cert: required when enabled is true" in server.stderr
    deployment = Deployment(lab, "https")
    try:
        deployment.start_agent()  # healthy although monitoring.example.com is unreachable
    finally:
        deployment.stop()


def test_files_the_platform_rendered_start_unchanged(tmp_path: Path) -> None:
    """A host that ran the platform's own playbook has configs naming every TLS path, with
    no file written and TLS off, and the old capabilities default: both start as they are."""
    from pipeline.tests.test_deploy_config import PLATFORM_SENSOR, PLATFORM_SERVER

    lab = make_lab(tmp_path)
    for side, doc in ((lab.sensor_dir, PLATFORM_SENSOR), (lab.server_dir, PLATFORM_SERVER)):
        (side / "config").mkdir(parents=True)
        (side / "tls").mkdir()
        name = "sensor.yml" if doc is PLATFORM_SENSOR else "server.yml"
        (side / "config" / name).write_text(yaml.safe_dump(doc))
    deployment = Deployment(lab, "http")
    try:
        deliver_one_event(deployment, None)
    finally:
        deployment.stop()
