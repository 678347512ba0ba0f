"""The read side's port: what the read API and the dashboard feed ask of stored events,
and ``open_reader(config)``, which opens the right reader for ``store.engine``."""

from __future__ import annotations

from typing import Protocol

from pipeline.common.config import StoreConfig
from pipeline.server.read.event_pages import EventQuery, ResultRow
from pipeline.server.read.event_reader import EventReader
from pipeline.server.read.feed_marks import FeedMark, PageKey
from pipeline.server.store.records import StoredEvent


class Reader(Protocol):
    """Bounded, index-walking reads on a connection of the reader's own."""

    def events(self, q: EventQuery) -> list[StoredEvent]: ...
    def events_capped(self, q: EventQuery, max_bytes: int | None
                      ) -> tuple[list[StoredEvent], bool]: ...
    def count_in_range(self, sensor_id: str, since_ms: int, until_ms: int) -> int: ...
    def in_range(self, sensor_id: str, since_ms: int, until_ms: int, limit: int,
                 fraction: float = 1.0) -> list[ResultRow]: ...
    def last_row_id(self) -> int: ...
    def results_between(self, after_row: int, upto_row: int, limit: int,
                        fraction: float = 1.0) -> tuple[list[ResultRow], int | None]: ...
    def first_row_completed_since(self, completed_at: float) -> int: ...
    def feed_mark(self) -> FeedMark: ...
    def feed_rows(self, since: FeedMark, upto: FeedMark, after: PageKey | None, limit: int,
                  fraction: float = 1.0) -> tuple[list[ResultRow], PageKey | None]: ...
    def has_events(self, sensor_id: str) -> bool: ...
    def close(self) -> None: ...


def open_reader(config: StoreConfig) -> Reader:
    """A reader of the store ``config`` names (SQLite file or PostgreSQL database)."""
    if config.engine == "postgres":
        from pipeline.server.read.pg_event_reader import PgEventReader

        return PgEventReader(config.dsn)
    return EventReader(config.path)
