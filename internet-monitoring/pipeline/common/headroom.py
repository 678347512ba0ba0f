"""Disk headroom for the SQLite files: a reserve file and the disk-health record.

Why: an SQLite file in WAL mode needs free space to *delete*. A DELETE appends frames to
the write-ahead log, and a checkpoint copies them into the database file, growing it. A
queue or store that filled its disk can therefore neither delete acknowledged data nor
checkpoint, and stays full for ever (issue 12: ``queue_delete_failed ... database or disk
is full`` every ten seconds). The cure is space that new data may not take:

* ``Reserve``: a preallocated file next to the database (``<db>-reserve``). New data is
  accepted only while it exists; the first write that finds the disk full for a delete or
  a checkpoint removes it, which gives that write room; it is put back as soon as the disk
  has room for it again, and until then new data is refused with a clear error.
* ``DiskHealth``: whether the disk is full now, error counts by operation and kind (for
  the metrics), and log lines rate-limited to one per ``log_interval_s`` while the fault
  lasts, with a line when it clears.

Both are process-local views of shared facts: several processes (agent, ``submit``) may
use one queue file, and each sees the reserve through the file system.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

RESERVE_SUFFIX = "-reserve"
RESTORE_INTERVAL_S = 1.0  # at most one attempt a second to put the reserve back
LOG_INTERVAL_S = 60.0
_WRITE_BLOCK = 64 * 1024

KIND_FULL = "disk_full"
KIND_IO = "io_error"


def reserve_path(database: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(database) + RESERVE_SUFFIX)


class Reserve:
    """A file of ``size`` bytes held back for deletes and checkpoints (0 = none).

    It is put back only when the disk then still has ``size / 4`` free besides it: room
    for the write-ahead log to take the next writes. Restoring it into the last free bytes
    would only move the full disk from the deletes to the inserts."""

    def __init__(self, database: str | os.PathLike[str], size: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = reserve_path(database)
        self.size = size
        self.slack = size // 4
        self._clock = clock
        self._next_attempt = float("-inf")
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def present(self) -> bool:
        """True when the reserve is in place (always, when disabled)."""
        if not self.enabled:
            return True
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def ensure(self, *, force: bool = False) -> bool:
        """Put the reserve back if it is missing and the disk has room; True when it is in
        place. Attempts are spaced ``RESTORE_INTERVAL_S`` apart unless ``force``."""
        if self.present():
            return True
        with self._lock:
            now = self._clock()
            if not force and now < self._next_attempt:
                return False
            self._next_attempt = now + RESTORE_INTERVAL_S
            return self._create()

    def _create(self) -> bool:
        """Write the file under a temporary name, fsync, rename: never half a reserve."""
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return False
        for stale in self.path.parent.glob(f"{self.path.name}.*.tmp"):
            _unlink(stale)  # left by a process killed while writing one: space it holds
            fs = os.statvfs(self.path.parent)
        if fs.f_bavail * fs.f_frsize < self.size + self.slack:
            return False
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            log.debug("reserve_create_failed path=%s error=%s", self.path, exc)
            return False
        try:
            _fill(fd, self.size)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            _unlink(tmp)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.warning("reserve_create_failed path=%s error=%s", self.path, exc)
            return False
        os.close(fd)
        try:
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            _unlink(tmp)
            log.warning("reserve_create_failed path=%s error=%s", self.path, exc)
            return False
        log.info("reserve_restored path=%s bytes=%d", self.path, self.size)
        return True

    def release(self) -> int:
        """Remove the reserve, freeing its space now; returns the bytes freed (0 if none)."""
        if not self.enabled:
            return 0
        try:
            size = self.path.stat().st_size
            self.path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("reserve_release_failed path=%s error=%s", self.path, exc)
            return 0
        self._next_attempt = float("-inf")
        log.warning("reserve_released path=%s bytes=%d", self.path, size)
        return size


def _fill(fd: int, size: int) -> None:
    """Allocate ``size`` bytes for real: fallocate where the file system has it, zeros
    otherwise (a sparse file would reserve nothing)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    block = bytes(_WRITE_BLOCK)
    written = 0
    while written < size:
        written += os.write(fd, block[:min(_WRITE_BLOCK, size - written)])


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class DiskHealth:
    """Disk-full state, error counts and rate-limited log lines for one database file.

    ``errors`` counts failures by ``(operation, kind)`` for the process's lifetime (a
    Prometheus counter); ``full`` is the gauge. A failure logs at once the first time and
    then at most every ``log_interval_s`` with how many were not logged in between."""

    name: str  # "queue" or "store": the log line's prefix
    path: str
    log_interval_s: float = LOG_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    full: bool = False
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    _last_logged: dict[str, float] = field(default_factory=dict)
    _suppressed: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def failed(self, operation: str, kind: str, error: object) -> None:
        """Record one failed write; logs unless a line for ``kind`` went out recently."""
        with self._lock:
            key = (operation, kind)
            self.errors[key] = self.errors.get(key, 0) + 1
            if kind == KIND_FULL:
                self.full = True
            now = self.clock()
            last = self._last_logged.get(kind)
            if last is not None and now - last < self.log_interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            suppressed = self._suppressed.pop(kind, 0)
            self._last_logged[kind] = now
        event = "disk_full" if kind == KIND_FULL else "io_error"
        log.error("%s_%s path=%s operation=%s error=%s suppressed=%d", self.name, event,
                  self.path, operation, error, suppressed)

    def recovered(self) -> None:
        """The disk has room again (the reserve is back): clear the gauge, say so once."""
        with self._lock:
            if not self.full:
                return
            self.full = False
            now = self.clock()
            last = self._last_logged.get("recovered")
            if last is not None and now - last < self.log_interval_s:
                return  # flapping at the edge of full: one line a minute is enough
            self._last_logged["recovered"] = now
            suppressed = self._suppressed.pop(KIND_FULL, 0)
        log.warning("%s_disk_recovered path=%s suppressed=%d", self.name, self.path, suppressed)

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self.errors)
