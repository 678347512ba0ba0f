"""Helpers of the deployment tests: run the Ansible roles locally, read the images' start
commands, start the rendered configs as real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.sim.processes import ManagedProcess, free_port
from pipeline.tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[3]
IM_DIR = REPO / "internet-monitoring"
ROLES = REPO / "ansible" / "roles"
DOCKER_DIR = IM_DIR / "pipeline" / "docker"
SYSTEMD_DIR = IM_DIR / "pipeline" / "systemd"
VENV_BIN = Path(sys.executable).parent
PLAYBOOK_TIMEOUT_S = 120.0
_RECAP_RE = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                       r"failed=(\d+)", re.MULTILINE)

# The platform's cloud files before the role runs (what its own templates render).
PLATFORM_COMPOSE = {"services": {"prometheus": {"image": "prom/prometheus:v2.53.0",
                                                "networks": ["back-tier"]}},
                    "networks": {"back-tier": {}}}
PLATFORM_PROMETHEUS = {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
                       "rule_files": ["alert.rules"],
                       "scrape_configs": [{"job_name": "prometheus", "static_configs": [
                           {"targets": ["localhost:9090"]}]}]}


@dataclass
class PlaybookRun:
    rc: int
    output: str

    @property
    def changed(self) -> int:
        """``changed=`` summed over the hosts of the PLAY RECAP."""
        recap = self.output.rpartition("PLAY RECAP")[2]
        found = _RECAP_RE.findall(recap)
        assert found, f"no PLAY RECAP in ansible output:\n{self.output[-3000:]}"
        return sum(int(match[1]) for match in found)


@dataclass
class Lab:
    """Two hosts on this machine: a sensor host and a server host, each its config_dir."""

    root: Path
    recorder: Path
    calls: Path

    @property
    def sensor_dir(self) -> Path:
        return self.root / "sensor-host" / "internet-monitoring" / "pipeline"

    @property
    def server_dir(self) -> Path:
        return self.root / "server-host" / "internet-monitoring" / "pipeline"

    def take_calls(self) -> list[str]:
        """Service-manager commands the handlers ran since the last call, in order (hosts
        run in parallel, so only the order within one host is meaningful)."""
        if not self.calls.exists():
            return []
        lines = self.calls.read_text().splitlines()
        self.calls.unlink()
        return lines


def make_lab(root: Path) -> Lab:
    """Config dirs with the platform's cloud files, and a recorder for handler commands."""
    cloud = root / "server-host" / "internet-monitoring"
    (cloud / "prometheus").mkdir(parents=True)
    (cloud / "docker-compose.yml").write_text(yaml.safe_dump(PLATFORM_COMPOSE))
    (cloud / "prometheus" / "prometheus.yml").write_text(yaml.safe_dump(PLATFORM_PROMETHEUS))
    (root / "sensor-host" / "internet-monitoring").mkdir(parents=True)
    for side in ("sensor", "server"):
        (root / f"{side}-host" / "systemd").mkdir()  # stands for /etc/systemd/system
    calls = root / "calls.log"
    recorder = root / "record-call"
    recorder.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    recorder.chmod(0o755)
    return Lab(root, recorder, calls)


def file_owner() -> int:
    """The image's uid as root (CI), else this user (chown needs root)."""
    return 10001 if os.getuid() == 0 else os.getuid()


def lab_vars(lab: Lab, side: str, **overrides: Any) -> dict[str, Any]:
    """Variables of one host: the platform's switch on, and this machine's paths."""
    common: dict[str, Any] = {
        "config_dir": str(lab.root / f"{side}-host"),
        "pipeline_source_dir": str(IM_DIR),
        "pipeline_python": sys.executable,
        "pipeline_file_owner": file_owner(),
        "pipeline_file_group": file_owner() if os.getuid() == 0 else os.getgid(),
        "pipeline_systemd_daemon_reload_command": f"{lab.recorder} {side} daemon-reload",
        "pipeline_venv_dir": str(VENV_BIN.parent),
        "pipeline_install_package": False,
        "pipeline_validate_packages": [],  # PyYAML is in this venv; no apt in tests
        "pipeline_create_user": False,
        "pipeline_systemd_dir": str(lab.root / f"{side}-host" / "systemd"),
    }
    if side == "sensor":
        common.update({
            "pipeline_sensor_enable": True,
            "pipeline_sensor_reload_command": f"{lab.recorder} sensor reload",
            "pipeline_sensor_restart_command": f"{lab.recorder} sensor restart"})
    else:
        common.update({
            "pipeline_server_enable": True,
            "pipeline_server_reload_command": f"{lab.recorder} server reload",
            "pipeline_server_restart_command": f"{lab.recorder} server restart",
            "pipeline_prometheus_reload_command": f"{lab.recorder} prometheus reload"})
    common.update(overrides)
    return common


def run_playbook(lab: Lab, sensor_vars: Mapping[str, Any] | None,
                 server_vars: Mapping[str, Any] | None, *extra: str) -> PlaybookRun:
    """``ansible-playbook`` for a sensor host and a server host of one lab."""
    hosts = {name: variables for name, variables in (("sensor-host", sensor_vars),
                                                     ("server-host", server_vars))
             if variables is not None}
    return run_hosts(lab.root, hosts, *extra)


def run_hosts(root: Path, hosts: Mapping[str, Mapping[str, Any]], *extra: str) -> PlaybookRun:
    """One play over several inventory hosts, all this machine (local connection), run in
    parallel: a host named ``sensor...`` gets pipeline_sensor, ``server...`` pipeline_server
    (as the platform's main.yml picks a role per host)."""
    ansible = require_tool_in_venv("ansible-playbook")
    inventory = {"all": {"hosts": {
        name: {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
               **variables} for name, variables in hosts.items()}}}
    play = {"name": "Open UXI pipeline", "hosts": "all", "gather_facts": False, "tasks": [
        {"name": f"Role {role}", "ansible.builtin.import_role": {"name": role},
         "when": f"inventory_hostname.startswith('{side}')"}
        for side, role in (("sensor", "pipeline_sensor"), ("server", "pipeline_server"))]}
    (root / "inventory.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    (root / "playbook.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    home = root / "ansible-home"
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
           "ANSIBLE_REMOTE_TEMP": str(home / "remote"), "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_PIPELINING": "1"}
    done = subprocess.run([ansible, "-i", str(root / "inventory.yml"), "--forks",
                           str(max(5, len(hosts))), str(root / "playbook.yml"), *extra],
                          env=env, capture_output=True, text=True,
                          timeout=PLAYBOOK_TIMEOUT_S, check=False)
    return PlaybookRun(done.returncode, done.stdout + done.stderr)


def require_tool_in_venv(name: str) -> str:
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    return require_tool(name)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# ---------------------------------------------------------------------------------------
# Dockerfiles: the start commands the images run


@dataclass(frozen=True)
class ImageCommands:
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    env: dict[str, str]


def image_commands(dockerfile: Path) -> ImageCommands:
    """ENTRYPOINT, CMD, HEALTHCHECK CMD and ENV of the final stage (exec form only)."""
    text = dockerfile.read_text().replace("\\\n", " ")
    final = text.split("\nFROM ")[-1]
    found: dict[str, list[str]] = {}
    env: dict[str, str] = {}
    for line in final.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            found[word] = json.loads(rest)
        elif word == "HEALTHCHECK":
            found[word] = json.loads(rest.split(" CMD ", 1)[1])
        elif word == "ENV":
            env.update(dict(pair.split("=", 1) for pair in rest.split()))
    return ImageCommands(found["ENTRYPOINT"], found["CMD"], found["HEALTHCHECK"], env)


def host_argv(argv: list[str], mounts: Mapping[str, Path]) -> list[str]:
    """An image's argv run on this host: container mount points moved to their sources."""
    out = []
    for arg in argv:
        for point, source in mounts.items():
            if arg == point or arg.startswith(point + "/"):
                arg = str(source) + arg[len(point):]
        out.append(arg)
    return out


def image_env(commands: ImageCommands, **extra: str) -> dict[str, str]:
    """The image's ENV with its PATH pointing at this venv's scripts."""
    env = {k: v for k, v in commands.env.items() if k != "PATH"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env.update(extra)
    return env


def start_image_process(name: str, commands: ImageCommands, mounts: Mapping[str, Path],
                        env: Mapping[str, str], workdir: Path) -> ManagedProcess:
    argv = host_argv(commands.entrypoint + commands.cmd, mounts)
    process = ManagedProcess(name=name, argv=argv, log_path=workdir / f"{name}.log",
                             env=dict(env))
    process.start()
    return process


def healthcheck(commands: ImageCommands, mounts: Mapping[str, Path],
                env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    argv = host_argv(commands.healthcheck, mounts)
    return subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=30, check=False)


def wait_healthy(commands: ImageCommands, mounts: Mapping[str, Path], env: Mapping[str, str],
                 process: ManagedProcess, timeout: float = 30.0) -> None:
    """Run the image's HEALTHCHECK command until it exits 0 (as Docker would)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert process.running, f"{process.name} exited:\n{process.log_text()[-3000:]}"
        last = healthcheck(commands, mounts, env)
        if last.returncode == 0:
            return
        time.sleep(0.3)
    raise AssertionError(f"{process.name} never healthy: {last.stdout if last else ''}"
                         f"\n{process.log_text()[-3000:]}")


__all__ = ["DOCKER_DIR", "IM_DIR", "ImageCommands", "Lab", "PlaybookRun", "REPO", "ROLES",
           "SYSTEMD_DIR", "free_port", "healthcheck", "image_commands", "image_env",
           "lab_vars", "make_lab", "mode", "run_playbook", "start_image_process",
           "wait_healthy"]
