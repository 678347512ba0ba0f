"""Single-instance locks: one server per store file, one agent per queue file.

Two servers on one SQLite store, or two agents on one queue, would each believe they own
the offsets, windows and acks: SQLite keeps the bytes consistent but not that logic. The
lock is an exclusive ``flock`` on ``<file>.lock`` (next to the file, never the database
itself, whose own locking SQLite manages). The kernel drops it when the process dies, even
by SIGKILL, so a crash never leaves a stale lock behind; the pid written into the lock file
is only there to name the holder in the error.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from pipeline.common.errors import AlreadyRunning, ConfigError


def lock_path_for(path: str | os.PathLike[str]) -> Path:
    """The lock file of a data file: ``<file>.lock``."""
    target = Path(path)
    return target.with_name(target.name + ".lock")


class InstanceLock:
    """An exclusive, non-blocking lock on ``<file>.lock``; ``key`` names the setting
    (``store.path``, ``queue.path``) in errors."""

    def __init__(self, path: str | os.PathLike[str], key: str) -> None:
        self.path = Path(path)
        self.lock_path = lock_path_for(self.path)
        self.key = key
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise ``AlreadyRunning`` naming the file and the holder's pid."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{self.key}: cannot create lock file {self.lock_path}: "
                              f"{exc.strerror or exc}", field=self.key) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"{self.key}: cannot lock {self.lock_path}: "
                                  f"{exc.strerror or exc}", field=self.key) from exc
            who = f"pid {holder}" if holder else "another process"
            raise AlreadyRunning(f"{self.path} ({self.key}) is in use by {who} "
                                 f"(lock file {self.lock_path}); stop it first or "
                                 f"point {self.key} at another file", field=self.key) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            # The pid only names the holder; the flock is the lock. A full disk must not
            # stop the agent that is about to make room (docs/reliability-disk.md).
            pass
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could race a starting process)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
