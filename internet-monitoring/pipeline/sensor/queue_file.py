"""Opening the queue's SQLite file: WAL, pragmas sized to the disk reserve, and the
one-time switch of old files to incremental auto-vacuum."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

from pipeline.common.errors import QueueError, QueueFull
from pipeline.common.headroom import Reserve
from pipeline.sensor.queue_sqlite import is_disk_full

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000
PAGE_SIZE = 4096
MIN_CHECKPOINT_PAGES = 16


def vacuum_pages(reserve: Reserve) -> int:
    """Pages per WAL checkpoint and per vacuum step: a checkpoint always fits in the
    reserve (the WAL is checkpointed every ``reserve / 4``)."""
    return max(MIN_CHECKPOINT_PAGES, (reserve.size // 4) // PAGE_SIZE)


def open_connection(path: Path, synchronous: str, reserve: Reserve,
                    max_pages: int | None, *, cache_kib: int) -> sqlite3.Connection:
    """A connection in WAL mode with the queue's pragmas; QueueFull when the disk is full."""
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise QueueError(f"cannot open queue {path}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            # A new file: lets deletes hand pages back to the disk. (On an existing
            # file the pragma would write, and fail on a full disk.)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise QueueError(f"queue {path} could not switch to WAL (mode {mode})")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA cache_size=-{cache_kib}")
        conn.execute("PRAGMA mmap_size=0")
        # Builds with SECURE_DELETE (Debian's) zero every freed page through the WAL:
        # a delete would write as much as it frees, and fail on a full disk. FAST
        # still clears the b-tree pages it touches, without writing freed pages.
        conn.execute("PRAGMA secure_delete=FAST")
        if reserve.enabled:
            conn.execute(f"PRAGMA wal_autocheckpoint={vacuum_pages(reserve)}")
            conn.execute(f"PRAGMA journal_size_limit={reserve.size // 4}")
        if max_pages is not None:
            conn.execute(f"PRAGMA max_page_count={max_pages}")
    except sqlite3.Error as exc:
        conn.close()
        if is_disk_full(exc):
            raise QueueFull(f"queue {path} cannot be opened: the disk is full"
                            ) from exc
        raise QueueError(f"queue {path} is not a usable database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


def enable_incremental_vacuum(conn: sqlite3.Connection, path: Path,
                              reserve: Reserve) -> None:
    """A queue file made before the reserve existed keeps freed pages inside the file,
    so a full disk would not get them back: switch it to incremental auto-vacuum (a
    VACUUM, once, by the agent at open) when the disk has room for the copy."""
    if not reserve.enabled or \
            int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 0:
        return
    size = path.stat().st_size
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return
    if fs.f_bavail * fs.f_frsize < 2 * size + 2 * reserve.size:
        log.warning("queue_vacuum_deferred path=%s bytes=%d reason=disk_space",
                    path, size)
        return
    started = time.monotonic()
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
    except sqlite3.Error as exc:
        log.warning("queue_vacuum_failed path=%s error=%s", path, exc)
        return
    log.info("queue_migrated path=%s auto_vacuum=incremental bytes=%d duration_ms=%.1f",
             path, size, (time.monotonic() - started) * 1000)
