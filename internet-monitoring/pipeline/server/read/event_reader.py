"""Reads of stored events for the read API and the dashboard, on their own connection.

The store's connection and lock belong to ingest: a week of chart data read through them
would hold every ingest batch behind it. This reader opens a second, read-only (``query_only``)
connection to the same SQLite file; WAL lets it read a consistent snapshot while the writer
commits, so reads and ingest do not wait for each other. Every query is bounded (``LIMIT``)
and walks an index: ``events_latest (sensor_id, logical_timestamp_ms, row_id)`` for time
ranges, the primary key for "everything after row N".
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Sequence

from pipeline.common.errors import StoreError
from pipeline.server.read.event_pages import (
    BUCKETS,
    SPREAD,
    EventQuery,
    PlainReads,
    ResultRow,
    capped_events,
    events_sql,
    last_if_full,
    result_columns,
    result_rows,
)
from pipeline.server.read.feed_marks import FeedMark, PageKey
from pipeline.server.store import StoredEvent, _translate

_RESULT_COLUMNS = result_columns("length")


def _sample_clause(fraction: float) -> tuple[str, tuple[Any, ...]]:
    if fraction >= 1.0:
        return "", ()
    return f" AND (row_id * {SPREAD}) % {BUCKETS} < ?", (max(1, int(fraction * BUCKETS)),)


class EventReader(PlainReads):
    """A read-only connection to the store file; thread-safe (one query at a time)."""

    def __init__(self, path: str | Path, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._conn = sqlite3.connect(str(self.path), isolation_level=None,
                                         check_same_thread=False, timeout=busy_timeout_ms / 1000)
            self._conn.execute("PRAGMA query_only=1")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path} for reading: {exc}") from exc

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._lock:
            if self._closed:
                raise StoreError("store reader is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, "read failed") from exc

    def events_capped(self, q: EventQuery, max_bytes: int | None
                      ) -> tuple[list[StoredEvent], bool]:
        """``events`` holding at most ``max_bytes`` of event data (at least one event),
        read row by row so a page of large events never sits in memory at once; with
        whether the cap cut the page short. ``None``: no cap."""
        if max_bytes is None:
            return self.events(q), False
        with self._lock:
            if self._closed:
                raise StoreError("store reader is closed")
            try:
                cursor = self._conn.execute(*events_sql(q, "?"))
                try:
                    return capped_events(cursor, max_bytes)
                finally:
                    cursor.close()
            except sqlite3.Error as exc:
                raise _translate(exc, "read failed") from exc

    def count_in_range(self, sensor_id: str, since_ms: int, until_ms: int) -> int:
        """How many events a range holds (an index count: no row is read or decoded)."""
        rows = self._rows("SELECT COUNT(*) FROM events INDEXED BY events_latest"
                          " WHERE sensor_id = ? AND logical_timestamp_ms >= ?"
                          " AND logical_timestamp_ms < ?", (sensor_id, since_ms, until_ms))
        return int(rows[0][0])

    def in_range(self, sensor_id: str, since_ms: int, until_ms: int, limit: int,
                 fraction: float = 1.0) -> list[ResultRow]:
        """A sensor's results by their own time, oldest first (charts). ``fraction`` < 1
        reads an evenly spread sample of that share of them (a hash of the row id, so test
        types that alternate are sampled alike), for ranges too long to decode entirely."""
        sample, extra = _sample_clause(fraction)
        rows = self._rows(
            f"SELECT {_RESULT_COLUMNS} FROM events INDEXED BY events_latest WHERE sensor_id = ?"
            f" AND logical_timestamp_ms >= ? AND logical_timestamp_ms < ?{sample}"
            " ORDER BY logical_timestamp_ms, row_id LIMIT ?",
            (sensor_id, since_ms, until_ms, *extra, max(0, limit)))
        return result_rows(rows)

    def results_between(self, after_row: int, upto_row: int, limit: int,
                        fraction: float = 1.0) -> tuple[list[ResultRow], int | None]:
        """Every sensor's results stored in ``(after_row, upto_row]``, in row order (the
        dashboard's feed), optionally sampled like ``in_range``; with the last row id the
        page ended at when the page was full (more may follow), else None."""
        sample, extra = _sample_clause(fraction)
        rows = self._rows(f"SELECT {_RESULT_COLUMNS} FROM events WHERE row_id > ?"
                          f" AND row_id <= ?{sample} ORDER BY row_id LIMIT ?",
                          (after_row, upto_row, *extra, max(0, limit)))
        return result_rows(rows), last_if_full(rows, limit)

    def feed_mark(self) -> FeedMark:
        """One writer: row ids become visible in order, the highest is the whole mark."""
        return FeedMark(self.last_row_id())

    def feed_rows(self, since: FeedMark, upto: FeedMark, after: PageKey | None, limit: int,
                  fraction: float = 1.0) -> tuple[list[ResultRow], PageKey | None]:
        """The results stored after ``since`` up to ``upto`` (``results_between``), a page
        at a time from ``after`` (the key the previous page ended at)."""
        rows, last = self.results_between(since.row if after is None else after[1], upto.row,
                                          limit, fraction)
        return rows, None if last is None else (0, last)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()
