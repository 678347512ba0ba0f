"""Online backup of an SQLite file (the server store or a sensor queue) while it is in use.

SQLite's backup API copies a consistent snapshot page by page, WAL included, without
stopping the writer (a plain ``cp`` of a WAL database can copy a torn state). The copy is
written next to the destination and renamed into place, so a crash never leaves a
half-written backup under the final name; ``PRAGMA integrity_check`` then checks it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from pipeline.common.errors import StoreError

log = logging.getLogger(__name__)

PAGES_PER_STEP = 1024


def backup_sqlite(source: str | Path, destination: str | Path) -> int:
    """Copy ``source`` to ``destination``; returns the page count. Raises ``StoreError``."""
    src_path, dest_path = Path(source), Path(destination)
    if not src_path.is_file():
        raise StoreError(f"backup: {src_path} does not exist")
    partial = dest_path.with_name(dest_path.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(src_path)
        try:
            dest = sqlite3.connect(partial)
            try:
                src.backup(dest, pages=PAGES_PER_STEP, progress=_progress)
                dest.execute("PRAGMA journal_mode=DELETE")
                pages = int(dest.execute("PRAGMA page_count").fetchone()[0])
                verdict = dest.execute("PRAGMA integrity_check").fetchone()[0]
            finally:
                dest.close()
        finally:
            src.close()
        if verdict != "ok":
            partial.unlink(missing_ok=True)
            raise StoreError(f"backup: the copy of {src_path} failed its integrity check: "
                             f"{verdict}")
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, dest_path)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"backup of {src_path} failed: {exc}") from exc
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise StoreError(f"backup to {dest_path} failed: {exc.strerror or exc}") from exc
    log.info("backup_done source=%s destination=%s pages=%d", src_path, dest_path, pages)
    return pages


def _progress(status: int, remaining: int, total: int) -> None:
    log.info("backup_progress copied_pages=%d total_pages=%d", total - remaining, total)
