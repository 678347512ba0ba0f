"""Processes of the benchmark: pinned children, a pipeline server, a bare aiohttp server.

``taskset -c <cpu>`` pins a child when the machine has at least two CPUs and ``taskset`` is
installed; otherwise children run unpinned and the report says so.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
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

SERVER_CPU = 0
LOAD_CPU = 1
BENCH_TOKEN = "bench-fleet-token-0123456789"


class BenchError(RuntimeError):
    """A benchmark step failed (a child did not start, a run did not deliver everything).
    Harness error only: it never crosses the wire."""


def pinning_available() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(argv: list[str], cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if pinning_available() else argv


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def run_child(argv: list[str], cpu: int, *, timeout: float, env: Mapping[str, str] | None = None
              ) -> dict[str, Any]:
    """Run a pinned Python child that prints one JSON document on its last stdout line."""
    proc = subprocess.run(pinned(argv, cpu), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} failed ({proc.returncode}): "
                         f"{proc.stderr.strip()[-2000:]}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise BenchError(f"{' '.join(argv[:4])} printed nothing: {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def python(*module_args: str) -> list[str]:
    return [sys.executable, *module_args]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{url} process exited ({proc.returncode}); log {log}: "
                             f"{log.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise BenchError(f"{url} not up after {timeout}s; log {log}")


@dataclass
class Child:
    """A long-running pinned child (server, bare server, agent)."""

    argv: list[str]
    cpu: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(pinned(self.argv, self.cpu), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **self.env})
        return self.proc

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def server_config(workdir: Path, *, ingest_port: int, control_port: int, stream_port: int,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """A server YAML for the benchmark: defaults (synchronous=FULL) except what a one-host
    load test needs: a fleet token, and no per-sensor chunk rate / per-address connection
    cap (all bench sensors share 127.0.0.1 and push as fast as they can)."""
    doc: dict[str, Any] = {
        "store": {"path": str(workdir / "server.db"), "synchronous": "FULL"},
        "control": {"port": control_port},
        "ingest": {"port": ingest_port},
        "stream": {"port": stream_port},
        "auth": {"fleet_token": BENCH_TOKEN},
        "limits": {"chunk_rate": 0, "max_connections_per_address": 0},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict):
            doc.setdefault(key, {}).update(value)
        else:
            doc[key] = value
    path = workdir / "server.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class ServerProcess:
    """``pipeline-server`` in a child process on ephemeral ports."""

    workdir: Path
    extra: Mapping[str, Any] | None = None
    child: Child | None = None
    ingest_port: int = 0
    control_port: int = 0

    def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ingest_port, self.control_port = free_port(), free_port()
        config = server_config(self.workdir, ingest_port=self.ingest_port,
                               control_port=self.control_port, stream_port=free_port(),
                               extra=self.extra)
        log = self.workdir / "server.log"
        self.child = Child(python("-m", "pipeline.server", "--config", str(config)),
                           SERVER_CPU, log)
        proc = self.child.start()
        _wait_http(f"http://127.0.0.1:{self.ingest_port}/healthz", timeout, proc, log)

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()

    @property
    def db_path(self) -> Path:
        return self.workdir / "server.db"


@dataclass
class BareServer:
    """``bench.bare``: the upper bound, an aiohttp handler that reads the body, answers 200."""

    workdir: Path
    child: Child | None = None
    port: int = 0

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = self.workdir / "bare.log"
        self.child = Child(python("-m", "bench.bare", str(self.port)), SERVER_CPU, log)
        proc = self.child.start()
        _wait_http(f"http://127.0.0.1:{self.port}/healthz", timeout, proc, log)

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def count_rows(db: Path, table: str) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
