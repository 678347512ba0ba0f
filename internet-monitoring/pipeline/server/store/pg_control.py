"""The PostgreSQL store's writes off the ingest path: control state (windows, sensor
state), retention by whole day partitions, and the readiness write."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import psycopg

from pipeline.server.store.control_rows import (
    check_batch,
    expire_all,
    log_pruned,
    prune_rejected_sql,
    reject_expired,
    upsert_sensor_state,
    upsert_window,
)
from pipeline.server.store.pg_base import PgBase
from pipeline.server.store.pg_schema import (
    DAY_S,
    DDL_LOCK_KEY,
    day_of,
    partition_days,
    partition_name,
    translate,
)
from pipeline.server.store.records import ControlChange, PreparedWrite

log = logging.getLogger("pipeline.server.store")

@dataclass(frozen=True)
class PgPreparedWrite(PreparedWrite):
    """A control-state write between ``begin_control_state`` and ``commit_write``."""

    conn: Any = None


class PgControl(PgBase):
    """Control state, retention and the write check."""

    # -- control state ---------------------------------------------------------------

    def save_window(self, sensor_id: str, window_id: str, state: dict[str, Any]) -> None:
        self._write([upsert_window("%s", sensor_id, window_id, state, self._clock())],
                    "save_window failed")

    def delete_windows(self, sensor_id: str, window_ids: Iterable[str]) -> None:
        self._write([("DELETE FROM windows WHERE sensor_id = %s AND window_id = ANY(%s)",
                      (sensor_id, list(window_ids)))], "delete_windows failed")

    def load_windows(self, sensor_id: str) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT window_id, state FROM windows WHERE sensor_id = %s"
                          " ORDER BY window_id", (sensor_id,))
        return {wid: json.loads(state) for wid, state in rows}

    def save_sensor_state(self, sensor_id: str, state: dict[str, Any]) -> None:
        self._write([upsert_sensor_state("%s", sensor_id, state, self._clock())],
                    "save_sensor_state failed")

    def load_sensor_states(self) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT sensor_id, state FROM sensor_state ORDER BY sensor_id")
        return {sid: json.loads(state) for sid, state in rows}

    def save_control_state(self, changes: Iterable[ControlChange]) -> None:
        """Many sensors' window and sensor-state changes in ONE durable transaction."""
        statements = self._control_statements(changes)
        if statements:
            self._write(statements, "save_control_state failed")

    def begin_control_state(self, changes: Iterable[ControlChange], *, blocking: bool = True
                            ) -> PreparedWrite | None:
        """``save_control_state`` split in two; ``blocking=False`` answers None (no round
        trip on the caller's event loop)."""
        if not blocking:
            return None
        statements = self._control_statements(changes)
        conn = self._getconn("save_control_state failed")
        try:
            for sql, params in statements:
                conn.execute(sql, params)
        except psycopg.Error as exc:
            self._putconn(conn)
            self._failed("save_control_state failed", exc)
            raise translate(exc, "save_control_state failed") from exc
        except BaseException:
            self._putconn(conn)
            raise
        return PgPreparedWrite("save_control_state failed", conn)

    def commit_write(self, prepared: PreparedWrite) -> None:
        assert isinstance(prepared, PgPreparedWrite)
        conn = prepared.conn
        try:
            conn.commit()
        except psycopg.Error as exc:
            self._failed(prepared.what, exc)
            raise translate(exc, prepared.what) from exc
        finally:
            self._putconn(conn)

    def _control_statements(self, changes: Iterable[ControlChange]
                            ) -> list[tuple[str, Sequence[Any]]]:
        now = self._clock()
        statements: list[tuple[str, Sequence[Any]]] = []
        for sensor_id, gone, windows, state in changes:
            if gone:
                statements.append((("DELETE FROM windows WHERE sensor_id = %s AND"
                                   " window_id = ANY(%s)"), (sensor_id, list(gone))))
            statements.extend(upsert_window("%s", sensor_id, wid, doc, now)
                              for wid, doc in windows.items())
            statements.append(upsert_sensor_state("%s", sensor_id, state, now))
        return statements

    # -- retention -------------------------------------------------------------------

    def prune(self, older_than: float, *, batch: int = 1000) -> int:
        """Delete data older than ``older_than`` (unix time).

        Day partitions wholly before the cut-off are dropped (``DROP TABLE``: the cost does
        not depend on their rows); rows are deleted, ``batch`` at a time, only in the
        partition the cut-off falls into. Partial events first seen before the cut-off
        are expired first (recorded as rejected, code ``expired``), so every chunk left in
        an old partition is a payload-free dedupe key. Offsets keep the committed ranges:
        a pruned key still answers ``duplicate``. Returns the events removed (completed +
        expired partial)."""
        check_batch(batch)
        cut_day = day_of(older_than)  # partitions below this day end before the cut-off
        expired = expire_all(self._expire_partials, older_than, batch)
        events = self._drop_days("events", cut_day, count=True)
        keys = self._drop_days("chunks", cut_day, count=False)
        events += self._delete_loop(
            "DELETE FROM events WHERE (sensor_id, event_id, day) IN (SELECT sensor_id,"
            " event_id, day FROM events WHERE completed_at < %s LIMIT %s)", older_than, batch)
        rejected = self._delete_loop(prune_rejected_sql("%s"), older_than, batch)
        keys += self._delete_loop(
            "DELETE FROM chunks WHERE (sensor_id, epoch, sequence, day) IN (SELECT sensor_id,"
            " epoch, sequence, day FROM chunks WHERE received_at < %s AND payload IS NULL"
            " LIMIT %s)", older_than, batch)
        log_pruned(events, expired, rejected, keys, older_than)
        return events + expired

    def _drop_days(self, table: str, cut_day: int, *, count: bool) -> int:
        """Drop ``table``'s partitions of days before ``cut_day``; the rows they held when
        ``count`` (an index-only count of each, still far cheaper than deleting them)."""
        removed = 0
        with self._connection("prune failed") as conn:
            old = [d for d in partition_days(conn, table) if d < cut_day]
            conn.rollback()
            for day in old:
                name = partition_name(table, day)
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (DDL_LOCK_KEY,))
                    if count:
                        row = conn.execute(f"SELECT COUNT(*) FROM {name}").fetchone()
                        removed += int(row[0]) if row else 0
                    conn.execute(f"DROP TABLE IF EXISTS {name}")
                log.info("store_partition_dropped table=%s day=%d ended=%.0f", table, day,
                         (day + 1) * DAY_S)
        with self._days_lock:
            self._days.difference_update(d for d in list(self._days) if d < cut_day)
        return removed

    def _delete_loop(self, sql: str, older_than: float, batch: int) -> int:
        total = 0
        while True:
            with self._connection("prune failed") as conn:
                n = conn.execute(sql, (older_than, batch)).rowcount
                conn.commit()
            total += max(n, 0)
            if n < batch:
                return total

    def _expire_partials(self, older_than: float, batch: int) -> int:
        now = self._clock()
        with self._connection("prune failed") as conn:
            rows = conn.execute(
                "SELECT sensor_id, event_id FROM partial_events WHERE first_seen < %s"
                " ORDER BY sensor_id LIMIT %s", (older_than, batch)).fetchall()
            conn.rollback()
            if not rows:
                return 0
            self._lock_sensors(conn, {sid for sid, _ in rows})
            expired = 0
            for sid, event_id in rows:
                # Under the sensor's lock: a concurrent ingest may have completed it.
                gone = conn.execute(
                    "DELETE FROM partial_events WHERE sensor_id = %s AND event_id = %s"
                    " AND first_seen < %s RETURNING epoch, event_sha256, chunk_count,"
                    " received", (sid, event_id, older_than)).fetchone()
                if gone is None:
                    continue
                epoch, sha, count, received = gone
                conn.execute(*reject_expired("%s", sid, event_id, epoch, sha, count, received,
                                             now))
                conn.execute("UPDATE chunks SET payload = NULL WHERE sensor_id = %s AND"
                             " event_id = %s AND payload IS NOT NULL", (sid, event_id))
                expired += 1
            conn.commit()
        return expired

    # -- health ----------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise StoreError unless a durable write succeeds right now (for /readyz)."""
        self._write([(("INSERT INTO store_meta (key, value) VALUES ('write_check', %s)"
                      " ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
                      (repr(self._clock()),))], "store is not writable")
        self._recovered()
