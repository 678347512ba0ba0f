"""The SQLite store's forwarding cursors: how far each sink has read each sensor's events.

The outbox of a forwarder (server/forward/) is not a copy of the data: it is the
``events`` table itself read in ``row_id`` order after a durable per-(sink, sensor)
cursor. A cursor only moves forward, so a late or repeated save never re-sends or skips.
"""

from __future__ import annotations

from pipeline.server.store.sqlite_base import SQLiteBase


class SQLiteForward(SQLiteBase):
    """Forward cursors and the reads that size a forwarder's backlog."""

    def forward_cursors(self, sink: str) -> dict[str, int]:
        rows = self._read("SELECT sensor_id, row_id FROM forward_cursors WHERE sink = ?"
                          " ORDER BY sensor_id", (sink,))
        return {str(sensor_id): int(row_id) for sensor_id, row_id in rows}

    def save_forward_cursor(self, sink: str, sensor_id: str, row_id: int) -> None:
        self._write([(
            ("INSERT INTO forward_cursors (sink, sensor_id, row_id, updated_at)"
             " VALUES (?, ?, ?, ?) ON CONFLICT (sink, sensor_id) DO UPDATE SET"
             " row_id = CASE WHEN excluded.row_id > forward_cursors.row_id"
             " THEN excluded.row_id ELSE forward_cursors.row_id END,"
             " updated_at = excluded.updated_at"),
            (sink, sensor_id, int(row_id), self._clock()))], "save_forward_cursor failed")

    def event_sensors(self) -> list[str]:
        """Every sensor with committed offsets (so possibly events), sorted."""
        return [str(r[0]) for r in self._read("SELECT DISTINCT sensor_id FROM offsets"
                                              " ORDER BY sensor_id")]

    def events_after_count(self, sensor_id: str, after: int) -> int:
        return int(self._read("SELECT COUNT(*) FROM events WHERE sensor_id = ? AND row_id > ?",
                              (sensor_id, after))[0][0])
