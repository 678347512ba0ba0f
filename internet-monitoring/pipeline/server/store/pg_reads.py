"""The PostgreSQL store's reads: committed offsets and events, always from the database
(another server on the same database may have advanced them since)."""

from __future__ import annotations

import json

from pipeline.server.offsets import OffsetTracker
from pipeline.server.store.event_rows import EVENT_COLUMNS, row_to_event
from pipeline.server.store.pg_base import PgBase
from pipeline.server.store.plain_reads import PlainStoreReads
from pipeline.server.store.records import StoredEvent


class PgReads(PgBase, PlainStoreReads):
    """Offsets and events, each read on a pooled connection."""

    MARK = "%s"

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

    def latest_events(self) -> list[StoredEvent]:
        """Latest completed event per sensor (by logical_timestamp_ms, then row_id): one
        index probe per sensor (LATERAL over the offsets' sensors)."""
        rows = self._read(
            f"SELECT e.* FROM (SELECT DISTINCT sensor_id FROM offsets) s CROSS JOIN LATERAL"
            f" (SELECT {EVENT_COLUMNS} FROM events WHERE sensor_id = s.sensor_id"
            " ORDER BY logical_timestamp_ms DESC, row_id DESC LIMIT 1) e ORDER BY e.sensor_id")
        return [row_to_event(r) for r in rows]
