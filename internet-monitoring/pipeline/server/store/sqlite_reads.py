"""The SQLite store's reads: committed offsets (in memory, rebuilt at open) and events."""

from __future__ import annotations

from pipeline.server.offsets import OffsetTracker
from pipeline.server.store.event_rows import EVENT_COLUMNS as _EVENT_COLUMNS
from pipeline.server.store.event_rows import rejected_sql, row_to_rejected
from pipeline.server.store.event_rows import row_to_event as _row_to_event
from pipeline.server.store.records import RejectedEvent, StoredEvent
from pipeline.server.store.sqlite_base import SQLiteBase


class SQLiteReads(SQLiteBase):
    """Offsets and events, read under the store's lock."""

    # -- offsets (read) --------------------------------------------------------------

    def committed_offset(self, sensor_id: str, epoch: str) -> int:
        with self._lock:
            tracker = self._book.peek(sensor_id, epoch)
            return tracker.watermark if tracker is not None else 0

    def missing_sequences(self, sensor_id: str, epoch: str, limit: int = 1000) -> list[int]:
        with self._lock:
            tracker = self._book.peek(sensor_id, epoch)
            return tracker.missing(limit) if tracker is not None else []

    def tracker(self, sensor_id: str, epoch: str) -> OffsetTracker:
        """A copy of the key's tracker (changing it does not change the store)."""
        with self._lock:
            tracker = self._book.peek(sensor_id, epoch)
            return tracker.copy() if tracker is not None else OffsetTracker()

    def epochs(self, sensor_id: str) -> list[str]:
        with self._lock:
            return self._book.epochs(sensor_id)

    # -- events (read) ---------------------------------------------------------------

    def events(self, sensor_id: str, *, after: int = 0, limit: int = 100) -> list[StoredEvent]:
        rows = self._read(f"SELECT {_EVENT_COLUMNS} FROM events WHERE sensor_id = ? AND"
                          " row_id > ? ORDER BY row_id LIMIT ?",
                          (sensor_id, after, max(0, limit)))
        return [_row_to_event(r) for r in rows]

    def get_event(self, sensor_id: str, event_id: str) -> StoredEvent | None:
        rows = self._read(f"SELECT {_EVENT_COLUMNS} FROM events WHERE sensor_id = ? AND"
                          " event_id = ?", (sensor_id, event_id))
        return _row_to_event(rows[0]) if rows else None

    def latest_events(self) -> list[StoredEvent]:
        """Latest completed event per sensor (by logical_timestamp_ms, then row_id)."""
        sensors = [r[0] for r in self._read("SELECT DISTINCT sensor_id FROM offsets"
                                            " ORDER BY sensor_id")]
        out: list[StoredEvent] = []
        for sensor_id in sensors:
            rows = self._read(f"SELECT {_EVENT_COLUMNS} FROM events WHERE sensor_id = ?"
                              " ORDER BY logical_timestamp_ms DESC, row_id DESC LIMIT 1",
                              (sensor_id,))
            if rows:
                out.append(_row_to_event(rows[0]))
        return out

    def event_count(self, sensor_id: str | None = None) -> int:
        if sensor_id is None:
            return int(self._read("SELECT COUNT(*) FROM events")[0][0])
        return int(self._read("SELECT COUNT(*) FROM events WHERE sensor_id = ?",
                              (sensor_id,))[0][0])

    def chunk_count(self) -> int:
        """Stored chunk rows (dedupe keys included, whether or not a payload is kept)."""
        return int(self._read("SELECT COUNT(*) FROM chunks")[0][0])

    def partial_event_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM partial_events")[0][0])

    def rejected_events(self, sensor_id: str | None = None) -> list[RejectedEvent]:
        return [row_to_rejected(r) for r in self._read(*rejected_sql(sensor_id, "?"))]
