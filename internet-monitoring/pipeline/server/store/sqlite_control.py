"""The SQLite store's writes off the ingest path: control state (windows, sensor state,
one transaction per round, splittable like ingest), retention, and the readiness write."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from typing import Any, Iterable, Sequence

from pipeline.common.errors import StorageFull, StoreError
from pipeline.server.store.control_rows import (
    check_batch,
    expire_all,
    log_pruned,
    prune_rejected_sql,
    reject_expired,
    upsert_sensor_state,
    upsert_window,
)
from pipeline.server.store.records import ControlChange, PreparedWrite
from pipeline.server.store.sqlite_base import SQLiteBase
from pipeline.server.store.sqlite_schema import translate as _translate

log = logging.getLogger("pipeline.server.store")


class SQLiteControl(SQLiteBase):
    """Control state, retention and the write check."""

    # -- control state ---------------------------------------------------------------

    def save_window(self, sensor_id: str, window_id: str, state: dict[str, Any]) -> None:
        self._write([upsert_window("?", sensor_id, window_id, state, self._clock())],
                    "save_window failed")

    def delete_windows(self, sensor_id: str, window_ids: Iterable[str]) -> None:
        self._write([("DELETE FROM windows WHERE sensor_id = ? AND window_id = ?",
                      (sensor_id, wid)) for wid in list(window_ids)], "delete_windows failed")

    def load_windows(self, sensor_id: str) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT window_id, state FROM windows WHERE sensor_id = ?"
                          " ORDER BY window_id", (sensor_id,))
        return {wid: json.loads(state) for wid, state in rows}

    def save_sensor_state(self, sensor_id: str, state: dict[str, Any]) -> None:
        self._write([upsert_sensor_state("?", sensor_id, state, self._clock())],
                    "save_sensor_state failed")

    def save_control_state(self, changes: Iterable[ControlChange]) -> None:
        """Window deletions, window states and sensor states of many sensors in ONE
        durable transaction: persisting a fleet's window changes costs one fsync per round
        instead of two or more per sensor."""
        statements = self._control_statements(changes)
        if statements:
            self._write(statements, "save_control_state failed")

    def begin_control_state(self, changes: Iterable[ControlChange], *, blocking: bool = True
                            ) -> PreparedWrite | None:
        """``save_control_state`` split like ``begin_ingest``: BEGIN and the statements
        here (the event loop: no GIL hand-off per statement), ``commit_write`` (the fsync)
        in a worker thread. None when ``blocking`` is false and the store is busy."""
        statements = self._control_statements(changes)
        if not self._enter_split(blocking):
            return None
        with self._split_statements("save_control_state failed"):
            for sql, params in statements:
                self._conn.execute(sql, params)
        return PreparedWrite("save_control_state failed")

    def commit_write(self, prepared: PreparedWrite) -> None:
        """COMMIT a ``begin_control_state`` (durable on return) and release the store."""
        try:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed(prepared.what.split()[0], exc)
                raise _translate(exc, prepared.what) from exc
            except BaseException:
                self._rollback()
                raise
            self._maybe_reset_wal()
        finally:
            self._lock.release()

    def _control_statements(self, changes: Iterable[ControlChange]
                            ) -> list[tuple[str, Sequence[Any]]]:
        now = self._clock()
        statements: list[tuple[str, Sequence[Any]]] = []
        for sensor_id, gone, windows, state in changes:
            statements.extend(("DELETE FROM windows WHERE sensor_id = ? AND window_id = ?",
                               (sensor_id, wid)) for wid in gone)
            statements.extend(upsert_window("?", sensor_id, wid, doc, now)
                              for wid, doc in windows.items())
            statements.append(upsert_sensor_state("?", sensor_id, state, now))
        return statements

    def load_sensor_states(self) -> dict[str, dict[str, Any]]:
        rows = self._read("SELECT sensor_id, state FROM sensor_state ORDER BY sensor_id")
        return {sid: json.loads(state) for sid, state in rows}

    # -- retention -------------------------------------------------------------------

    def prune(self, older_than: float, *, batch: int = 1000) -> int:
        """Delete data older than ``older_than`` (unix time) in short transactions.

        Completed events (by ``completed_at``), rejected-event records, and partial events
        first seen before the cut-off (recorded as rejected with code ``expired``, their
        payloads dropped) go; then finished chunks' dedupe keys older than the cut-off.
        Offsets keep the committed ranges, so a pruned key still answers ``duplicate``.
        Returns the number of events removed (completed + expired partial).
        """
        check_batch(batch)
        events = self._prune_loop(
            "DELETE FROM events WHERE row_id IN (SELECT row_id FROM events"
            " WHERE completed_at < ? LIMIT ?)", older_than, batch)
        expired = expire_all(self._expire_partials, older_than, batch)
        rejected = self._prune_loop(prune_rejected_sql("?"), older_than, batch)
        keys = self._prune_loop(
            "DELETE FROM chunks WHERE id IN (SELECT id FROM chunks WHERE received_at < ?"
            " AND payload IS NULL LIMIT ?)", older_than, batch)
        log_pruned(events, expired, rejected, keys, older_than)
        return events + expired

    def _prune_loop(self, sql: str, older_than: float, batch: int) -> int:
        total = 0
        while True:
            try:
                n = self._prune_step(sql, older_than, batch)
            except StorageFull:
                # Retention is how a full disk gets room: with the reserve handed over
                # (by this failure), try once more.
                n = self._prune_step(sql, older_than, batch)
            total += max(n, 0)
            if n < batch:
                return total

    def _prune_step(self, sql: str, older_than: float, batch: int) -> int:
        with self._lock:
            self._check_open()
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                n = int(self._conn.execute(sql, (older_than, batch)).rowcount)
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed("prune", exc)
                raise _translate(exc, "prune failed") from exc
        return n

    def _expire_partials(self, older_than: float, batch: int) -> int:
        now = self._clock()
        with self._lock:
            self._check_open()
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                rows = conn.execute(
                    "SELECT sensor_id, event_id, epoch, event_sha256, chunk_count, received"
                    " FROM partial_events WHERE first_seen < ? LIMIT ?",
                    (older_than, batch)).fetchall()
                for sid, event_id, epoch, sha, count, received in rows:
                    conn.execute(*reject_expired("?", sid, event_id, epoch, sha, count,
                                                 received, now))
                    conn.execute("DELETE FROM partial_events WHERE sensor_id = ? AND"
                                 " event_id = ?", (sid, event_id))
                    conn.execute("UPDATE chunks SET payload = NULL WHERE sensor_id = ? AND"
                                 " event_id = ?", (sid, event_id))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                self._storage_failed("prune", exc)
                raise _translate(exc, "prune failed") from exc
        return len(rows)

    # -- health ----------------------------------------------------------------------

    def check_writable(self) -> None:
        """Raise StoreError unless a durable write succeeds right now (for /readyz)."""
        for target in (self.path, self.path.parent):
            if not os.access(target, os.W_OK):
                raise StoreError(f"store path {target} is not writable")
        self._write([(
            ("INSERT INTO store_meta (key, value) VALUES ('write_check', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
            (repr(self._clock()),))], "store is not writable")

