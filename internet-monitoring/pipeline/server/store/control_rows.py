"""What both engines write for control state and retention, apart from the engine's own
transactions: the window and sensor-state upserts, the row recording an expired partial
event as rejected, the rejected-events prune, and the prune's summary log lines. The SQL
takes the driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg)."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping

from pipeline.common.errors import ConfigError

log = logging.getLogger("pipeline.server.store")


def upsert_window(mark: str, sensor_id: str, window_id: str, state: Mapping[str, Any],
                  now: float) -> tuple[str, tuple[Any, ...]]:
    """Store one window's state (insert or replace), as statement and parameters."""
    return ((f"INSERT INTO windows (sensor_id, window_id, state, updated_at)"
             f" VALUES ({mark}, {mark}, {mark}, {mark}) ON CONFLICT (sensor_id, window_id)"
             " DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"),
            (sensor_id, window_id, json.dumps(state, sort_keys=True), now))


def upsert_sensor_state(mark: str, sensor_id: str, state: Mapping[str, Any], now: float
                        ) -> tuple[str, tuple[Any, ...]]:
    """Store one sensor's state (insert or replace), as statement and parameters."""
    return ((f"INSERT INTO sensor_state (sensor_id, state, updated_at)"
             f" VALUES ({mark}, {mark}, {mark}) ON CONFLICT (sensor_id) DO UPDATE SET"
             " state = excluded.state, updated_at = excluded.updated_at"),
            (sensor_id, json.dumps(state, sort_keys=True), now))


def reject_expired(mark: str, sensor_id: str, event_id: str, epoch: str, sha: bytes,
                   count: int, received: int, now: float) -> tuple[str, tuple[Any, ...]]:
    """Record a partial event that expired (code ``expired``) among the rejected ones."""
    return ((f"INSERT INTO rejected_events (sensor_id, event_id, epoch, event_sha256,"
             f" chunk_count, reason, code, rejected_at) VALUES ({mark}, {mark}, {mark},"
             f" {mark}, {mark}, {mark}, {mark}, {mark})"),
            (sensor_id, event_id, epoch, sha, count,
             f"expired with {received} of {count} chunks", "expired", now))


def prune_rejected_sql(mark: str) -> str:
    """One batch of rejected-event records older than the cut-off (cut-off, batch)."""
    return ("DELETE FROM rejected_events WHERE (sensor_id, event_id) IN (SELECT sensor_id,"
            f" event_id FROM rejected_events WHERE rejected_at < {mark} LIMIT {mark})")


def check_batch(batch: int) -> None:
    if batch < 1:
        raise ConfigError("prune batch must be positive", field="batch")


def expire_all(expire: Callable[[float, int], int], older_than: float, batch: int) -> int:
    """Call ``expire`` (one batch of partial events expired, how many) until a batch
    comes back short; the total."""
    expired = 0
    while True:
        n = expire(older_than, batch)
        expired += n
        if n < batch:
            return expired


def log_pruned(events: int, expired: int, rejected: int, keys: int, older_than: float
               ) -> None:
    if expired:
        log.warning("store_partial_events_expired count=%d older_than=%.0f",
                    expired, older_than)
    log.info("store_pruned events=%d partial_expired=%d rejected=%d chunk_keys=%d "
             "older_than=%.0f", events, expired, rejected, keys, older_than)
