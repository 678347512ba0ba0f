"""What both event readers (SQLite ``EventReader``, ``PgEventReader``) share: the page
query and its cursor, the byte cap on a page, the sampling constants, and turning result
rows into ``ResultRow``s. Engine-neutral: the SQL takes the driver's placeholder
(``?`` for sqlite3, ``%s`` for psycopg)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from pipeline.common import chunking
from pipeline.common.errors import PipelineError
from pipeline.server.store.event_rows import ENCODING_IDENTITY, EVENT_COLUMNS, row_to_event
from pipeline.server.store.records import StoredEvent

Order = Literal["asc", "desc"]
MAX_TS_MS = 2**63 - 1
# Sampling by row id: multiply by a large odd constant, keep the residues below a share of
# a prime; spreads consecutive ids evenly (Knuth's multiplicative hashing).
SPREAD = 2654435761
BUCKETS = 1_000_003

# Results bigger than this (stored, compressed) are not decoded for charts and KPIs: UXI
# results are small JSON documents; a big blob is something else and would cost the most.
MAX_DECODED_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ResultRow:
    """What charts and KPIs need of an event: no attributes, no hash check (the gzip
    members' own CRC-32 still catches a damaged row, which is then skipped)."""

    row_id: int
    sensor_id: str
    event_id: str
    logical_timestamp_ms: int
    completed_at: float
    data: bytes


@dataclass(frozen=True)
class EventQuery:
    """One page of a sensor's events: ``since``/``until`` bound the results' own time
    (``logical_timestamp_ms``, half-open ``[since, until)``); ``after``/``before`` are row
    cursors (arrival order) for the next page in ascending/descending order."""

    sensor_id: str
    since_ms: int = 0
    until_ms: int = MAX_TS_MS
    after: int = 0
    before: int = MAX_TS_MS
    order: Order = "asc"
    limit: int = 50


def result_columns(length_fn: str) -> str:
    """The columns of a ``ResultRow`` (and the encoding); the data only when its stored
    size, by the engine's ``length_fn``, is at most ``MAX_DECODED_BYTES``."""
    return ("row_id, sensor_id, event_id, logical_timestamp_ms, completed_at, encoding,"
            f" CASE WHEN {length_fn}(data) <= {MAX_DECODED_BYTES} THEN data END")


def result_rows(rows: list[Any]) -> list[ResultRow]:
    out = []
    for row_id, sensor_id, event_id, ts, completed_at, encoding, blob in rows:
        if blob is None:
            continue
        try:
            data = bytes(blob) if encoding == ENCODING_IDENTITY else \
                chunking.decompress_members(bytes(blob))
        except PipelineError:
            continue  # reported by the event read API, which checks the hash
        out.append(ResultRow(row_id, sensor_id, event_id, ts, completed_at, data))
    return out


def last_if_full(rows: Sequence[Any], limit: int) -> int | None:
    """The row id a full page ended at (more may follow), else None."""
    return int(rows[-1][0]) if len(rows) == limit else None


def events_sql(q: EventQuery, mark: str) -> tuple[str, tuple[Any, ...]]:
    """``q``'s page of events in arrival order (row id), filtered by the results' time:
    the statement with ``mark`` as placeholder, and its parameters."""
    direction = "DESC" if q.order == "desc" else "ASC"
    sql = (f"SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = {mark} AND row_id > {mark}"
           f" AND row_id < {mark} AND logical_timestamp_ms >= {mark}"
           f" AND logical_timestamp_ms < {mark} ORDER BY row_id {direction} LIMIT {mark}")
    return sql, (q.sensor_id, q.after, q.before, q.since_ms, q.until_ms, max(0, q.limit))


def capped_events(rows: Iterable[Sequence[Any]], max_bytes: int
                  ) -> tuple[list[StoredEvent], bool]:
    """The events of ``rows``, taken one at a time, up to ``max_bytes`` of event data (at
    least one event); with whether the cap cut the page short."""
    out: list[StoredEvent] = []
    total = 0
    for row in rows:
        event = row_to_event(row)
        if out and total + len(event.data) > max_bytes:
            return out, True
        out.append(event)
        total += len(event.data)
    return out, False



class PlainReads:
    """The reads both engines phrase alike, on the reader's own ``_rows`` (one statement,
    its rows) with ``MARK``, the driver's placeholder."""

    MARK = "?"

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    def events(self, q: EventQuery) -> list[StoredEvent]:
        """One page in arrival order (row id), filtered by the results' time."""
        return [row_to_event(r) for r in self._rows(*events_sql(q, self.MARK))]

    def last_row_id(self) -> int:
        return int(self._rows("SELECT COALESCE(MAX(row_id), 0) FROM events", ())[0][0])

    def first_row_completed_since(self, completed_at: float) -> int:
        """The row id just before the first event stored at or after ``completed_at``."""
        rows = self._rows(f"SELECT MIN(row_id) FROM events WHERE completed_at >= {self.MARK}",
                          (completed_at,))
        first = rows[0][0] if rows else None
        if first is None:
            return self.last_row_id()
        return int(first) - 1

    def has_events(self, sensor_id: str) -> bool:
        return bool(self._rows(f"SELECT 1 FROM events WHERE sensor_id = {self.MARK} LIMIT 1",
                               (sensor_id,)))
