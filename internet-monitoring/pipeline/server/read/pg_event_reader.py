"""``EventReader``'s PostgreSQL twin: the read API and dashboard's queries on a small pool of
read-only connections of their own (never the store's ingest connections), each bounded by
``LIMIT`` and walking an index of every live day partition (``events_latest`` for time
ranges, ``events_by_sensor``/``events_by_row`` for row cursors)."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

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
from pipeline.server.read.feed_marks import FeedMark, PageKey, Snapshot, new_xid_range
from pipeline.server.store.pg_schema import translate
from pipeline.server.store.pg_store import redacted
from pipeline.server.store.records import StoredEvent

log = logging.getLogger("pipeline.server.read")

READ_TIMEOUT_S = 5.0
_RESULT_COLUMNS = result_columns("octet_length")


def _sample_clause(fraction: float) -> tuple[str, tuple[Any, ...]]:
    # (row_id mod p) first: the product stays far inside BIGINT; same residue as SQLite's.
    if fraction >= 1.0:
        return "", ()
    return (f" AND ((row_id %% {BUCKETS}) * {SPREAD}) %% {BUCKETS} < %s",
            (max(1, int(fraction * BUCKETS)),))


class PgEventReader(PlainReads):
    """Read-only queries on the store's database; thread-safe (a pool of up to two)."""

    MARK = "%s"

    def __init__(self, dsn: str, *, open_timeout_s: float = 10.0) -> None:
        self.where = redacted(dsn)
        self._pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=1, max_size=2, open=False, configure=self._configure,
            check=ConnectionPool.check_connection, name="reader",
            kwargs={"connect_timeout": max(1, int(open_timeout_s)), "autocommit": True})
        try:
            self._pool.open(wait=True, timeout=open_timeout_s)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreError(f"store.dsn: cannot connect to PostgreSQL ({self.where}) for"
                             " reading") from exc
        self._closed = False

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET default_transaction_read_only = on")

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        if self._closed:
            raise StoreError("store reader is closed")
        try:
            with self._pool.connection(timeout=READ_TIMEOUT_S) as conn:
                return conn.execute(sql, params).fetchall()
        except PoolTimeout as exc:
            raise StoreError(f"read failed: no database connection ({self.where})") from exc
        except psycopg.Error as exc:
            raise translate(exc, "read failed") from exc

    def events_capped(self, q: EventQuery, max_bytes: int | None
                      ) -> tuple[list[StoredEvent], bool]:
        """``events`` holding at most ``max_bytes`` of event data (at least one event),
        with whether the cap cut the page short (rows streamed from a server cursor)."""
        if max_bytes is None:
            return self.events(q), False
        if self._closed:
            raise StoreError("store reader is closed")
        try:
            with self._pool.connection(timeout=READ_TIMEOUT_S) as conn, conn.transaction(), \
                    conn.cursor(name="events_capped") as cursor:
                cursor.itersize = 16
                cursor.execute(*events_sql(q, "%s"))
                return capped_events(cursor, max_bytes)
        except PoolTimeout as exc:
            raise StoreError(f"read failed: no database connection ({self.where})") from exc
        except psycopg.Error as exc:
            raise translate(exc, "read failed") from exc

    def count_in_range(self, sensor_id: str, since_ms: int, until_ms: int) -> int:
        rows = self._rows("SELECT COUNT(*) FROM events WHERE sensor_id = %s AND"
                          " logical_timestamp_ms >= %s AND logical_timestamp_ms < %s",
                          (sensor_id, since_ms, until_ms))
        return int(rows[0][0])

    def in_range(self, sensor_id: str, since_ms: int, until_ms: int, limit: int,
                 fraction: float = 1.0) -> list[ResultRow]:
        sample, extra = _sample_clause(fraction)
        rows = self._rows(
            f"SELECT {_RESULT_COLUMNS} FROM events WHERE sensor_id = %s"
            f" AND logical_timestamp_ms >= %s AND logical_timestamp_ms < %s{sample}"
            " ORDER BY logical_timestamp_ms, row_id LIMIT %s",
            (sensor_id, since_ms, until_ms, *extra, max(0, limit)))
        return result_rows(rows)

    def results_between(self, after_row: int, upto_row: int, limit: int,
                        fraction: float = 1.0) -> tuple[list[ResultRow], int | None]:
        sample, extra = _sample_clause(fraction)
        rows = self._rows(f"SELECT {_RESULT_COLUMNS} FROM events WHERE row_id > %s"
                          f" AND row_id <= %s{sample} ORDER BY row_id LIMIT %s",
                          (after_row, upto_row, *extra, max(0, limit)))
        return result_rows(rows), last_if_full(rows, limit)

    def feed_mark(self) -> FeedMark:
        """The highest visible row id and the snapshot it was read in (one statement)."""
        row = self._rows("SELECT COALESCE(MAX(row_id), 0), pg_current_snapshot()::text"
                         " FROM events", ())[0]
        return FeedMark(int(row[0]), str(row[1]))

    def feed_rows(self, since: FeedMark, upto: FeedMark, after: PageKey | None, limit: int,
                  fraction: float = 1.0) -> tuple[list[ResultRow], PageKey | None]:
        """The results whose inserting transaction ``upto``'s snapshot sees and ``since``'s
        did not (feed_marks.py), ordered by (xid, row_id) on ``events_by_xid``, a page at a
        time from ``after``. From a starting mark (no snapshot): the rows after its row id
        that ``upto`` sees, in row order (rows older than the ``xid`` column count as seen)."""
        assert upto.snapshot is not None
        sample, extra = _sample_clause(fraction)
        if since.snapshot is None:
            rows = self._rows(
                f"SELECT {_RESULT_COLUMNS} FROM events WHERE row_id > %s AND row_id <= %s"
                " AND (xid IS NULL OR pg_visible_in_snapshot(xid, %s::pg_snapshot))"
                f"{sample} ORDER BY row_id LIMIT %s",
                (since.row if after is None else after[1], upto.row, upto.snapshot, *extra,
                 max(0, limit)))
            last = (0, int(rows[-1][0])) if len(rows) == limit else None
            return result_rows(rows), last
        span = new_xid_range(Snapshot.parse(since.snapshot), Snapshot.parse(upto.snapshot))
        if span is None:
            return [], None
        start = after if after is not None else (span[0], -1)
        rows = self._rows(
            f"SELECT {_RESULT_COLUMNS}, xid::text FROM events"
            " WHERE xid >= %s::text::xid8 AND xid < %s::text::xid8"
            " AND (xid, row_id) > (%s::text::xid8, %s)"
            " AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot)"
            f" AND pg_visible_in_snapshot(xid, %s::pg_snapshot){sample}"
            " ORDER BY xid, row_id LIMIT %s",
            (str(span[0]), str(span[1]), str(start[0]), start[1],
             since.snapshot, upto.snapshot, *extra, max(0, limit)))
        last = (int(rows[-1][7]), int(rows[-1][0])) if len(rows) == limit else None
        return result_rows([r[:7] for r in rows]), last

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.close()
