"""The store reads both engines phrase alike (the same statement but for the driver's
placeholder): events by sensor, one event, the row counts, the rejected events. Mixed
into ``SQLiteReads`` and ``PgReads`` after their engine base, whose ``_read`` runs them."""

from __future__ import annotations

from typing import Any, Sequence

from pipeline.server.store.event_rows import (
    EVENT_COLUMNS,
    rejected_sql,
    row_to_event,
    row_to_rejected,
)
from pipeline.server.store.records import RejectedEvent, StoredEvent


class PlainStoreReads:
    """Reads over the engine's ``_read`` (one statement, its rows) and ``MARK``."""

    MARK = "?"

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError  # the engine base's, which comes first in the MRO

    def events(self, sensor_id: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        m = self.MARK
        rows = self._read(f"SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = {m} AND"
                          f" row_id > {m} ORDER BY row_id LIMIT {m}",
                          (sensor_id, after, max(0, limit)))
        return [row_to_event(r) for r in rows]

    def get_event(self, sensor_id: str, event_id: str) -> StoredEvent | None:
        m = self.MARK
        rows = self._read(f"SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = {m} AND"
                          f" event_id = {m}", (sensor_id, event_id))
        return row_to_event(rows[0]) if rows else None

    def event_count(self, sensor_id: str | None = None) -> int:
        if sensor_id is None:
            return int(self._read("SELECT COUNT(*) FROM events")[0][0])
        return int(self._read(f"SELECT COUNT(*) FROM events WHERE sensor_id = {self.MARK}",
                              (sensor_id,))[0][0])

    def chunk_count(self) -> int:
        """Stored chunk rows (dedupe keys included, whether or not a payload is kept)."""
        return int(self._read("SELECT COUNT(*) FROM chunks")[0][0])

    def partial_event_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM partial_events")[0][0])

    def rejected_events(self, sensor_id: str | None = None) -> list[RejectedEvent]:
        return [row_to_rejected(r) for r in self._read(*rejected_sql(sensor_id, self.MARK))]
