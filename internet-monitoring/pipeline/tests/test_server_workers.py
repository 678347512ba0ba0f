"""``server.workers: N``: N processes on one host share the listeners' ports (SO_REUSEPORT),
each a replica on PostgreSQL; with SQLite anything but 1 is a ConfigError naming the key.
The workers test runs the real ``pipeline-server`` on a real PostgreSQL (``pg_dsn``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipeline.common.config import load_server_config
from pipeline.common.errors import ConfigError
from pipeline.sim.processes import free_port


def test_sqlite_with_two_workers_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "server.yml"
    path.write_text(yaml.safe_dump({"server": {"workers": 2},
                                    "store": {"path": str(tmp_path / "s.db")}}))
    with pytest.raises(ConfigError) as caught:
        load_server_config(str(path))
    assert caught.value.field == "server.workers"
    path.write_text(yaml.safe_dump({"server": {"workers": 0}}))
    with pytest.raises(ConfigError) as caught:
        load_server_config(str(path))
    assert caught.value.field == "server.workers"
    path.write_text(yaml.safe_dump({"server": {"workers": 1},
                                    "store": {"path": str(tmp_path / "s.db")}}))
    assert load_server_config(str(path)).server.workers == 1


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None
          ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text()[-4000:] if log is not None else ""
    raise AssertionError(f"{what} not reached in {timeout}s\n{tail}")


def test_two_workers_share_the_ports_and_a_killed_one_comes_back(pg_dsn: str,
                                                                   tmp_path: Path) -> None:
    ingest = free_port()
    config = {"server": {"workers": 2}, "store": {"engine": "postgres", "dsn": pg_dsn},
              "control": {"port": free_port()}, "ingest": {"port": ingest},
              "stream": {"port": free_port()},
              "auth": {"sensors": [{"id": "w-01", "token": "w-01-token-0123456789abcdef"}]}}
    path = tmp_path / "server.yml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.server", "--config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log_path = tmp_path / "server.log"
        _wait(lambda: len(_children(proc.pid)) == 2
              and log_path.read_text().count("server_started") == 2, 60, "two workers",
              log_path)
        workers = _children(proc.pid)
        # Both accept on the one port: the kernel spreads connections over them, so with
        # one worker SIGKILLed the port still answers, and the supervisor restarts it.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _ready(ingest), 10, "the other worker answering")
        _wait(lambda: len(_children(proc.pid) - {victim}) == 2, 30, "a restarted worker")
        _wait(lambda: (tmp_path / "server.log").read_text().count("server_started") >= 3,
              60, "the restarted worker serving", tmp_path / "server.log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
        assert _children(proc.pid) == set()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert "worker_exited" in text and text.count("cluster_joined") >= 3, text[-3000:]
    assert text.count("server_stopped") == 2, text[-3000:]  # both stopped gracefully
