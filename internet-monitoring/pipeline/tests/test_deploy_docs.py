"""Every line of the ``sh`` blocks in docs/deployment.md, run in a scratch directory that
stands for the host (``/opt/openuxi`` and friends moved under tmp_path), with configs the
roles render from the platform's defaults.

Run for real: ``cd``, ``pipeline-server`` / ``pipeline-sensor`` (``check-config``,
``backup`` of a store and a queue held open by a writer), ``ansible-vault``,
``python3 -m venv`` and ``install``; ``ansible-playbook`` with ``--syntax-check`` appended
(no inventory hosts here). Stand-ins, because a test machine has no Docker daemon and no
systemd as PID 1 and cannot download the dependencies: ``docker`` checks that each compose
file, service and container name exists; ``systemctl`` that each unit was installed;
``pip install DIR[extra]`` builds the wheel of DIR (no dependencies) and checks the extra.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from pipeline.sensor.queue import DurableQueue
from pipeline.server.store import SQLiteChunkStore
from pipeline.tests.deploy_support import IM_DIR, REPO, ROLES, VENV_BIN, Lab, lab_vars, run_playbook

DOC = REPO / "docs" / "deployment.md"
_BLOCK_RE = re.compile(r"```sh\n(.*?)```", re.DOTALL)


def doc_commands() -> list[str]:
    lines: list[str] = []
    for block in _BLOCK_RE.findall(DOC.read_text()):
        lines += [line.strip() for line in block.replace("\\\n", " ").splitlines()
                  if line.strip() and not line.strip().startswith("#")]
    return lines


class Host:
    """The scratch host: path mapping, rendered configs, the command runner."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.opt = root / "opt" / "openuxi"
        shutil.copytree(IM_DIR, self.opt / "internet-monitoring",
                        ignore=shutil.ignore_patterns("__pycache__", "tests", "*.egg-info"))
        self.map = {"/opt/openuxi-pipeline": root / "venv", "/opt/openuxi": self.opt,
                    "/etc/systemd/system": root / "systemd", "/var/backups": root / "backups",
                    "vault-pass.txt": root / "vault-pass.txt"}
        for directory in ("systemd", "backups", "state"):
            (root / directory).mkdir()
        (root / "vault-pass.txt").write_text("test-vault-password\n")
        self.cwd = root
        self.env = {**os.environ, "PATH": f"{root / 'bin'}{os.pathsep}{VENV_BIN}{os.pathsep}"
                                          f"{os.environ.get('PATH', '')}",
                    "ANSIBLE_ROLES_PATH": str(ROLES), "ANSIBLE_NOCOLOR": "1",
                    "ANSIBLE_HOME": str(root / "ansible-home"),
                    "ANSIBLE_LOCAL_TEMP": str(root / "ansible-home" / "tmp"),
                    # the containers' volume /var/lib/pipeline
                    "PIPELINE_SERVER__STORE__PATH": str(root / "state" / "server.db"),
                    "PIPELINE_SENSOR__QUEUE__PATH": str(root / "state" / "queue.db")}
        self._stand_ins()

    def _stand_ins(self) -> None:
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        script = Path(__file__).with_name("deploy_stand_in.py")
        for name in ("docker", "systemctl"):
            (bin_dir / name).write_text(
                f"#!/bin/sh\nexec {sys.executable} {script} {name} {self.root} \"$@\"\n")
            (bin_dir / name).chmod(0o755)

    def localize(self, line: str) -> list[str]:
        argv = shlex.split(line)
        out = []
        for arg in argv:
            for point, target in self.map.items():
                if arg == point or arg.startswith((point + "/", point + "[")):
                    arg = str(target) + arg[len(point):]
            out.append(arg)
        return out

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        argv = self.localize(line)
        if argv[0] == "cd":
            self.cwd = Path(argv[1])
            return subprocess.CompletedProcess(argv, 0, "", "")
        if argv[0] == "ansible-playbook":
            argv.append("--syntax-check")
        if argv[0].endswith("/pip") and argv[1] == "install":
            return self._pip_install_stand_in(argv[2])
        return subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)

    def _pip_install_stand_in(self, target: str) -> subprocess.CompletedProcess[str]:
        folder, _, extra = target.partition("[")
        project = tomllib.loads((Path(folder) / "pyproject.toml").read_text())["project"]
        assert extra.rstrip("]") in project["optional-dependencies"]
        wheels = self.root / "wheels"
        return subprocess.run([str(VENV_BIN / "python"), "-m", "pip", "wheel", "--no-deps",
                               "--no-build-isolation", "-q", "-w", str(wheels), folder],
                              cwd=self.root, capture_output=True, text=True, timeout=300,
                              check=False)


def test_every_documented_command_works(tmp_path: Path) -> None:
    host = Host(tmp_path)
    # The host as the playbook leaves it: configs rendered from the platform's defaults.
    lab = Lab(tmp_path, tmp_path / "record-call", tmp_path / "calls.log")
    lab.recorder.write_text(f"#!/bin/sh\necho \"$*\" >> {lab.calls}\n")
    lab.recorder.chmod(0o755)
    config_dir = str(host.opt)
    sensor = lab_vars(lab, "sensor", config_dir=config_dir)
    server = lab_vars(lab, "server", config_dir=config_dir, pipeline_server_prometheus_enable=False,
                      pipeline_server_auth_sensors=[{"id": "sensor-1", "token": "change-me"}])
    compose = host.opt / "internet-monitoring" / "docker-compose.yml"
    compose.write_text(yaml.safe_dump({"services": {}}))
    rendered = run_playbook(lab, sensor, server)
    assert rendered.rc == 0, rendered.output[-3000:]
    # The playbook the docs run: the example main.yml and config.yml, an inventory.
    shutil.copy(REPO / "ansible" / "example-main.yml", tmp_path / "main.yml")
    shutil.copy(REPO / "ansible" / "example.config.yml", tmp_path / "config.yml")
    (tmp_path / "inventory.ini").write_text("[sensors]\npi-01 ansible_connection=local\n")
    # A server store and a sensor queue in use while backups run.
    store = SQLiteChunkStore(tmp_path / "state" / "server.db")
    queue = DurableQueue(tmp_path / "state" / "queue.db")
    queue.enqueue(b'{"test": "ping"}')
    commands = doc_commands()
    assert len(commands) >= 15, commands
    try:
        for line in commands:
            done = host.run(line)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    finally:
        store.close()
        queue.close()
    assert "vault_pipeline_sensor_token: !vault |" in "".join(
        host.run(line).stdout for line in commands if line.startswith("ansible-vault"))
    assert (tmp_path / "backups" / "pipeline-server.db").exists()
    with DurableQueue(tmp_path / "backups" / "pipeline-queue.db") as copy:
        assert copy.queue_depth() == 1
    assert (tmp_path / "systemd" / "pipeline-server.service").exists()


def test_stand_ins_refuse_what_does_not_exist(tmp_path: Path) -> None:
    """The docker and systemctl stand-ins fail on names the repository does not ship."""
    host = Host(tmp_path)
    host.run("cd /opt/openuxi/internet-monitoring")
    for line in (("docker compose --project-name internet-monitoring --file "
                 "docker-compose.sensor.pipeline.yml up --detach pipeline-server"),
                 "docker compose --file docker-compose.missing.yml up pipeline-agent",
                 "docker logs internet-monitoring-pipeline-nothing-1",
                 "systemctl enable --now pipeline-nothing.service"):
        assert host.run(line).returncode != 0, line


def test_links_to_the_other_operator_docs() -> None:
    """deployment.md links security.md and the proxy page written alongside (tls-proxy.md)."""
    text = DOC.read_text()
    assert "](security.md)" in text and "](tls-proxy.md)" in text
    assert (REPO / "docs" / "security.md").exists()
