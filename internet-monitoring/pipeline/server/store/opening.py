"""``open_store(config)``: the one way to get a store, whichever engine the config names."""

from __future__ import annotations

import time
from typing import Callable

from pipeline.common.config import StoreConfig
from pipeline.common.errors import ConfigError
from pipeline.server.store.pending import DEFAULT_MAX_EVENT_BYTES
from pipeline.server.store.pg_store import PostgresChunkStore
from pipeline.server.store.port import ChunkStore
from pipeline.server.store.sqlite import CACHE_KIB, SLICE_CACHE_BYTES, SQLiteChunkStore

ENGINES = ("sqlite", "postgres")


def check_engine(config: StoreConfig) -> None:
    """ConfigError naming ``store.engine`` unless this build has the configured engine."""
    if config.engine not in ENGINES:
        raise ConfigError(f"store.engine: {config.engine!r} is not available in this server"
                          f" (available: {', '.join(ENGINES)})", field="store.engine")


def open_store(config: StoreConfig, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               cache_kib: int = CACHE_KIB, slice_cache_bytes: int = SLICE_CACHE_BYTES,
               max_pages: int | None = None,
               clock: Callable[[], float] = time.time) -> ChunkStore:
    """Open the store ``config`` describes (``store.path``, ``synchronous``,
    ``reserve_bytes`` for SQLite; ``store.dsn`` and the pool sizes for PostgreSQL).
    ``max_event_bytes`` is the ingest limit (``limits.max_event_bytes``); ``cache_kib``
    and ``slice_cache_bytes`` the memory budget (``memory.sqlite_cache_kib``,
    ``memory.slice_cache_kib``); ``max_pages`` and ``clock`` are for tests."""
    check_engine(config)
    if config.engine == "postgres":
        return PostgresChunkStore(config.dsn, pool_min_size=config.pool_min_size,
                                  pool_max_size=config.pool_max_size,
                                  synchronous=config.synchronous,
                                  max_event_bytes=max_event_bytes,
                                  slice_cache_bytes=slice_cache_bytes, clock=clock)
    return SQLiteChunkStore(config.path, synchronous=config.synchronous,
                            max_event_bytes=max_event_bytes, cache_kib=cache_kib,
                            slice_cache_bytes=slice_cache_bytes, max_pages=max_pages,
                            clock=clock, reserve_bytes=config.reserve_bytes)
