"""Real file systems for the disk tests: a size-limited tmpfs per test, and the check
that ``powerfs`` (FUSE) can run.

Mounting needs root (and a kernel that lets this container mount tmpfs or FUSE). Locally a
test that cannot mount skips with the reason; under ``CI=true`` it fails, as conftest's
tools do.
"""

from __future__ import annotations

import base64
import ctypes.util
import hashlib
import importlib.util
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from pipeline.sim.processes import ManagedProcess, ServerProcess
from pipeline.tests.conftest import on_ci


def _unavailable(message: str) -> None:
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


def require_fuse() -> None:
    """powerfs needs /dev/fuse, root (to mount), mfusepy and libfuse 2."""
    missing = [what for what, ok in (
        ("/dev/fuse", os.path.exists("/dev/fuse")),
        ("root", os.geteuid() == 0),
        ("mfusepy (pip install -e '.[dev]')", importlib.util.find_spec("mfusepy") is not None),
        ("libfuse2 (make tools)", ctypes.util.find_library("fuse") is not None),
    ) if not ok]
    if missing:
        _unavailable("the power-cut and I/O-error tests need " + ", ".join(missing))


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. ``2m``) at ``path``; unmounted on exit."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        _unavailable("the full-disk tests mount a tmpfs and need root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        _unavailable(f"cannot mount a tmpfs at {path}: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, chunk: int = 64 * 1024) -> int:
    """Write ``path`` until the file system is full; returns the bytes written."""
    written = 0
    block = b"\xa5" * chunk
    with open(path, "wb", buffering=0) as out:
        while True:
            try:
                written += out.write(block[:max(4096, chunk)])
            except OSError:
                if chunk <= 4096:
                    return written
                chunk //= 4
                block = block[:chunk]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             *logs: ManagedProcess) -> None:
    """Poll ``predicate`` (these tests drive processes from plain threads; the async tests
    use server_support.eventually); on timeout fail with the processes' log tails."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.log_text()[-3000:]}" for p in logs)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tails}")
        time.sleep(0.25)


def assert_exactly_once(server: ServerProcess, sensor_id: str, sent: dict[str, bytes]) -> None:
    """The server holds every event of ``sent`` once, byte-identical, and nothing else."""
    events = server.events(sensor_id)
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was stored twice"
    assert set(ids) == set(sent), (f"missing {len(set(sent) - set(ids))}, "
                                   f"unexpected {len(set(ids) - set(sent))}")
    for event in events:
        data = base64.b64decode(event["payload_base64"])
        assert hashlib.sha256(data).digest() == hashlib.sha256(sent[event["event_id"]]).digest()
