"""The SQLite store's reads: committed offsets (in memory, rebuilt at open) and events."""

from __future__ import annotations

from pipeline.server.offsets import OffsetTracker
from pipeline.server.store.event_rows import EVENT_COLUMNS as _EVENT_COLUMNS
from pipeline.server.store.event_rows import row_to_event as _row_to_event
from pipeline.server.store.plain_reads import PlainStoreReads
from pipeline.server.store.records import StoredEvent
from pipeline.server.store.sqlite_base import SQLiteBase


class SQLiteReads(SQLiteBase, PlainStoreReads):
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
