"""The PostgreSQL store's reads: committed offsets and events, always from the database
(another server on the same database may have advanced them since)."""

from __future__ import annotations

import json

from pipeline.server.offsets import OffsetTracker
from pipeline.server.store.event_rows import (
    EVENT_COLUMNS,
    rejected_sql,
    row_to_event,
    row_to_rejected,
)
from pipeline.server.store.pg_base import PgBase
from pipeline.server.store.records import RejectedEvent, StoredEvent


class PgReads(PgBase):
    """Offsets and events, each read on a pooled connection."""

    # -- offsets ---------------------------------------------------------------------

    def tracker(self, sensor_id: str, epoch: str) -> OffsetTracker:
        """The key's committed offsets as stored now (a fresh object: a copy)."""
        rows = self._read("SELECT watermark, ranges FROM offsets WHERE sensor_id = %s"
                          " AND epoch = %s", (sensor_id, epoch))
        if not rows:
            return OffsetTracker()
        return OffsetTracker.restore({"watermark": int(rows[0][0]),
                                      "ranges": json.loads(rows[0][1])})

    def committed_offset(self, sensor_id: str, epoch: str) -> int:
        rows = self._read("SELECT watermark FROM offsets WHERE sensor_id = %s AND epoch = %s",
                          (sensor_id, epoch))
        return int(rows[0][0]) if rows else 0

    def missing_sequences(self, sensor_id: str, epoch: str, limit: int = 1000) -> list[int]:
        return self.tracker(sensor_id, epoch).missing(limit)

    def epochs(self, sensor_id: str) -> list[str]:
        rows = self._read("SELECT epoch FROM offsets WHERE sensor_id = %s ORDER BY epoch",
                          (sensor_id,))
        return [r[0] for r in rows]

    # -- events ----------------------------------------------------------------------

    def events(self, sensor_id: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        rows = self._read(f"SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = %s AND"
                          " row_id > %s ORDER BY row_id LIMIT %s",
                          (sensor_id, after, max(0, limit)))
        return [row_to_event(r) for r in rows]

    def get_event(self, sensor_id: str, event_id: str) -> StoredEvent | None:
        rows = self._read(f"SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = %s AND"
                          " event_id = %s", (sensor_id, event_id))
        return row_to_event(rows[0]) if rows else None

    def latest_events(self) -> list[StoredEvent]:
        """Latest completed event per sensor (by logical_timestamp_ms, then row_id): one
        index probe per sensor (LATERAL over the offsets' sensors)."""
        rows = self._read(
            f"SELECT e.* FROM (SELECT DISTINCT sensor_id FROM offsets) s CROSS JOIN LATERAL"
            f" (SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = s.sensor_id"
            " ORDER BY logical_timestamp_ms DESC, row_id DESC LIMIT 1) e ORDER BY e.sensor_id")
        return [row_to_event(r) for r in rows]

    def event_count(self, sensor_id: str | None = None) -> int:
        if sensor_id is None:
            return int(self._read("SELECT COUNT(*) FROM events")[0][0])
        return int(self._read("SELECT COUNT(*) FROM events WHERE sensor_id = %s",
                              (sensor_id,))[0][0])

    def chunk_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM chunks")[0][0])

    def partial_event_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM partial_events")[0][0])

    def rejected_events(self, sensor_id: str | None = None) -> list[RejectedEvent]:
        return [row_to_rejected(r) for r in self._read(*rejected_sql(sensor_id, "%s"))]
