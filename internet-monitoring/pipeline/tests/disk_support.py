"""Real small file systems for the full-disk tests: a size-limited tmpfs per test.

Mounting needs root (and a kernel that lets this container mount tmpfs). Locally a test
that cannot mount skips with the reason; under ``CI=true`` it fails, as conftest's tools do.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.tests.conftest import on_ci


def _unavailable(message: str) -> None:
    if on_ci():
        pytest.fail(message)
    pytest.skip(message)


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
