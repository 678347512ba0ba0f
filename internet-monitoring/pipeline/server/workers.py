"""``server.workers: N``: N server processes on one host sharing the listeners' ports.

The supervisor (the process started as ``pipeline-server``) does no serving itself:

- it reserves each listener's port (a port 0 becomes one ephemeral port for all) with a
  bound, never listening ``SO_REUSEPORT`` socket, held for its whole life, so the port
  cannot be taken by anyone else between worker restarts;
- it starts N workers (``python -m pipeline.server`` with ``PIPELINE_WORKER_INDEX``), each
  a full replica (its own PostgreSQL connections, cluster identity and sockets) listening
  with ``SO_REUSEPORT``: the kernel spreads new connections over them;
- a worker that exits without being asked is started again after a short back-off (its
  sensors reconnect to the others meanwhile: docs/scaling.md);
- SIGTERM / SIGINT are passed on to every worker and waited for (graceful stop);
  SIGHUP is passed on (reload).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from pipeline.common.config import ServerConfig

log = logging.getLogger(__name__)

WORKER_ENV = "PIPELINE_WORKER_INDEX"
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
STOP_TIMEOUT_S = 30.0


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket holding ``port`` (0: an ephemeral one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    def __init__(self, config: ServerConfig, config_path: str | None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.extra_env = dict(extra_env or {})
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * config.server.workers
        self.restarts = [0] * config.server.workers
        self._reserved: list[socket.socket] = []
        self._stop = threading.Event()
        self.ports: dict[str, int] = {}

    def _reserve(self) -> None:
        for name in ("control", "ingest", "stream"):
            section = getattr(self.config, name)
            sock = reserve_port(section.bind, section.port)
            self._reserved.append(sock)
            self.ports[name] = int(sock.getsockname()[1])

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "pipeline.server"]
        return argv + (["--config", self.config_path] if self.config_path else [])

    def _start(self, index: int) -> None:
        env = {**os.environ, **self.extra_env, WORKER_ENV: str(index)}
        for name, port in self.ports.items():
            env[f"PIPELINE_SERVER__{name.upper()}__PORT"] = str(port)
        self.workers[index] = subprocess.Popen(self._argv(), env=env, stdin=subprocess.DEVNULL)
        log.info("worker_started index=%d pid=%d", index, self.workers[index].pid)  # type: ignore[union-attr]

    def _signal_all(self, sig: int) -> None:
        for proc in self.workers:
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT; returns the exit status."""
        self._reserve()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT,
                                                           signal.SIGHUP)}
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._signal_all(signal.SIGHUP))
        log.info("workers_starting workers=%d ports=%s", len(self.workers),
                 ",".join(f"{k}:{v}" for k, v in self.ports.items()))
        try:
            for index in range(len(self.workers)):
                self._start(index)
            self._watch()
        finally:
            self._signal_all(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self.workers:
                if proc is None:
                    continue
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for sock in self._reserved:
                sock.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        log.info("workers_stopped")
        return 0

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for index, proc in enumerate(self.workers):
                if proc is None or proc.poll() is None:
                    continue
                delay = RESTART_BACKOFF_S[min(self.restarts[index],
                                              len(RESTART_BACKOFF_S) - 1)]
                log.warning("worker_exited index=%d pid=%d status=%s restart_in_s=%.1f",
                            index, proc.pid, proc.returncode, delay)
                self.restarts[index] += 1
                if self._stop.wait(delay):
                    return
                self._start(index)


def supervise(config: ServerConfig, config_path: str | None,
              demo_token: str | None = None, argv: Sequence[str] = ()) -> int:
    """Run ``config.server.workers`` worker processes (see the module docstring)."""
    extra = {"PIPELINE_SERVER__AUTH__FLEET_TOKEN": demo_token} if demo_token else {}
    return Supervisor(config, config_path, extra).run()
