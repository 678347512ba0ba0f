"""The PostgreSQL store's forwarding cursors: how far each sink has read each sensor's
events (the SQLite twin is ``sqlite_forward``; same contract, tests/test_store_contract.py).

A cursor is safe per sensor: ingest holds the sensor's advisory lock from the row id's
``nextval`` to COMMIT (``PgBase._lock_sensors``), so one sensor's events become visible
in ``row_id`` order and a reader never sees a later row before an earlier one commits.
"""

from __future__ import annotations

from pipeline.server.store.pg_base import PgBase

_UPSERT_CURSOR = (
    "INSERT INTO forward_cursors (sink, sensor_id, row_id, updated_at) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (sink, sensor_id) DO UPDATE SET"
    " row_id = GREATEST(forward_cursors.row_id, excluded.row_id),"
    " updated_at = excluded.updated_at")


class PgForward(PgBase):
    """Forward cursors and the reads that size a forwarder's backlog."""

    def forward_cursors(self, sink: str) -> dict[str, int]:
        rows = self._read("SELECT sensor_id, row_id FROM forward_cursors WHERE sink = %s"
                          " ORDER BY sensor_id", (sink,))
        return {str(sensor_id): int(row_id) for sensor_id, row_id in rows}

    def save_forward_cursor(self, sink: str, sensor_id: str, row_id: int) -> None:
        self._write([(_UPSERT_CURSOR, (sink, sensor_id, int(row_id), self._clock()))],
                    "save_forward_cursor failed")

    def event_sensors(self) -> list[str]:
        """Every sensor with committed offsets (so possibly events), sorted."""
        return [str(r[0]) for r in self._read("SELECT DISTINCT sensor_id FROM offsets"
                                              " ORDER BY sensor_id")]

    def events_after_count(self, sensor_id: str, after: int) -> int:
        return int(self._read("SELECT COUNT(*) FROM events WHERE sensor_id = %s"
                              " AND row_id > %s", (sensor_id, after))[0][0])
