"""Real server and sensor processes for the simulator, the demo and end-to-end tests.

Each process gets its own YAML config and log file in a work directory; crash injection
is a real ``SIGKILL``. Ports are picked free on the loopback interface.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

log = logging.getLogger(__name__)


class ProcessError(RuntimeError):
    """A managed process did not start or stop as expected (harness error, not a
    pipeline error: it never crosses the wire)."""


LOWEST_PICKED_PORT = 10_000


def _ephemeral_low() -> int:
    """The bottom of the kernel's ephemeral port range (Linux; 32768 where unknown)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for a process that binds it later (and again after a restart).

    Chosen below the kernel's ephemeral range: outgoing connections and port-0 listeners
    of any process draw from that range, so one of them could take a port picked there
    between this check and the server's bind (seen when two test runs share a machine).
    Falls back to a port-0 pick when there is no room below the range."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200) if low > LOWEST_PICKED_PORT + 1000 else ():
        port = rng.randrange(LOWEST_PICKED_PORT, low)
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class ManagedProcess:
    """One child process: started, SIGKILLed, restarted; output appended to a log."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0

    def start(self) -> None:
        if self.running:
            raise ProcessError(f"{self.name} is already running")
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        self.starts += 1
        log.info("process_started name=%s pid=%d", self.name, self.proc.pid)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL: the power-cut of a process."""
        if self.proc is None or not self.running:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.kills += 1
        log.info("process_killed name=%s", self.name)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("process_stop_timeout name=%s", self.name)
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ServerProcess(ManagedProcess):
    """``python -m pipeline.server`` on free loopback ports with a generated config."""

    def __init__(self, workdir: Path, sensors: Mapping[str, str], *,
                 extra_config: Mapping[str, Any] | None = None, name: str = "server",
                 ports: tuple[int, int, int] | None = None) -> None:
        """``ports``: (control, ingest, stream); free loopback ports when omitted."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.control_port, self.ingest_port, self.stream_port = (
            ports or (free_port(), free_port(), free_port()))
        self.sensors = dict(sensors)
        config: dict[str, Any] = {
            "store": {"path": str(workdir / "server.db")},
            "control": {"port": self.control_port},
            "ingest": {"port": self.ingest_port},
            "stream": {"port": self.stream_port},
            "auth": {"sensors": [{"id": sid, "token": tok} for sid, tok in self.sensors.items()]},
            "scheduler": {"window_timeout_s": 3.0, "quiet_s": 0.5},
            "heartbeat": {"interval_s": 5.0},
        }
        self.config = _merge(config, extra_config or {})
        self.config_path = workdir / "server.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        super().__init__(name=name, log_path=workdir / "server.log",
                         argv=[sys.executable, "-m", "pipeline.server", "--config",
                               str(self.config_path)])

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"

    @property
    def control_url(self) -> str:
        return f"ws://127.0.0.1:{self.control_port}/control"

    @property
    def ingest_url(self) -> str:
        return f"{self.http_base}/v1/ingest/chunk"

    @property
    def stream_url(self) -> str:
        return f"ws://127.0.0.1:{self.stream_port}/"

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        super().start()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ProcessError(f"server exited early:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.http_base + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ProcessError(f"server not ready after {timeout}s:\n{self.log_text()[-3000:]}")

    def get_json(self, path: str, token: str | None = None) -> Any:
        request = urllib.request.Request(self.http_base + path)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())

    def events(self, sensor_id: str) -> list[dict[str, Any]]:
        """Every assembled event of a sensor, following the paging cursor."""
        out: list[dict[str, Any]] = []
        after = 0
        while True:
            page = self.get_json(f"/v1/sensors/{sensor_id}/events?after={after}&limit=500")
            items = page["events"]
            out.extend(items)
            if not items or page.get("next_after") in (None, after):
                return out
            after = page["next_after"]


class SensorProcess(ManagedProcess):
    """``python -m pipeline.sensor run`` with its own queue file."""

    def __init__(self, workdir: Path, sensor_id: str, token: str, *, control_url: str,
                 ingest_url: str, extra_config: Mapping[str, Any] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.sensor_id = sensor_id
        self.queue_path = workdir / f"{sensor_id}.db"
        config: dict[str, Any] = {
            "sensor_id": sensor_id,
            "token": token,
            "heartbeat_interval": 2.0,
            "queue": {"path": str(self.queue_path)},
            "control": {"url": control_url},
            "ingest": {"url": ingest_url},
            "backoff": {"initial_s": 0.2, "max_s": 2.0},
        }
        self.config = _merge(config, extra_config or {})
        self.config_path = workdir / f"{sensor_id}.yml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        super().__init__(name=sensor_id, log_path=workdir / f"{sensor_id}.log",
                         argv=[sys.executable, "-m", "pipeline.sensor", "run", "--config",
                               str(self.config_path)])

    def queue_depth(self) -> int:
        from pipeline.sensor.queue import DurableQueue

        with DurableQueue(self.queue_path, verify_on_open=False) as queue:
            return queue.queue_depth()
