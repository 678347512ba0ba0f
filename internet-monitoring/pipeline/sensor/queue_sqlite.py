"""SQLite plumbing of the queue: transactions, error translation, whole-event deletes."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Literal

from pipeline.common.errors import QueueError, QueueFull
from pipeline.common.headroom import KIND_FULL, KIND_IO, DiskHealth
from pipeline.sensor.queue_rows import DropTally

log = logging.getLogger(__name__)

OPEN_NEEDS_BYTES = 256 * 1024  # free space SQLite needs to open a WAL database


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on any error (a failed COMMIT too).

    A class rather than a generator context manager: it runs on every enqueue."""

    __slots__ = ("_conn", "_path")

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._path = path

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> Literal[False]:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            return False
        self._rollback()
        return False

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:  # SQLite may already have rolled back
                log.warning("queue_rollback_failed path=%s error=%s", self._path, exc)


class Translate:
    """Re-raise sqlite3 errors as QueueFull (disk full) or QueueError; others pass through.
    Write failures are recorded in ``health`` (metrics, rate-limited log lines)."""

    __slots__ = ("_path", "_operation", "_health")

    def __init__(self, path: Path, operation: str, health: DiskHealth) -> None:
        self._path = path
        self._operation = operation
        self._health = health

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: object) -> Literal[False]:
        if not isinstance(exc, sqlite3.Error):
            return False
        kind = error_kind(exc)
        if kind is not None:
            self._health.failed(self._operation, kind, exc)
        if kind == KIND_FULL:
            raise QueueFull(f"queue {self._path} is full: {exc}") from exc
        raise QueueError(f"queue {self._path} {self._operation} failed: {exc}") from exc


def delete_event(conn: sqlite3.Connection, event_id: str) -> tuple[int, int]:
    """Delete every queued chunk of one event; returns (chunks, bytes) removed."""
    chunks, nbytes = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM chunks WHERE event_id = ?",
        (event_id,)).fetchone()
    conn.execute("DELETE FROM chunks WHERE event_id = ?", (event_id,))
    return int(chunks), int(nbytes)


def record_drops(conn: sqlite3.Connection, reason: str, tally: DropTally) -> None:
    conn.execute(
        "INSERT INTO dropped (reason, chunks, events, bytes) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (reason) DO UPDATE SET chunks = chunks + excluded.chunks, "
        "events = events + excluded.events, bytes = bytes + excluded.bytes",
        (reason, tally.chunks, tally.events, tally.bytes))


def is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return True
    return "database or disk is full" in str(exc)


def disk_short(path: Path) -> bool:
    """Less free space than SQLite needs to open a WAL database (index and log)."""
    try:
        fs = os.statvfs(path.parent)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < OPEN_NEEDS_BYTES


def error_kind(exc: sqlite3.Error) -> str | None:
    """``disk_full``, ``io_error`` (EIO and the like: SQLITE_IOERR) or None (not the disk)."""
    if is_disk_full(exc):
        return KIND_FULL
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR:
        return KIND_IO
    return KIND_IO if "disk I/O error" in str(exc) else None
