"""What the ingest listener's handlers share: the ``IngestContext`` and its app key."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from pipeline.common.tracing import Tracing
from pipeline.server.control.channel import ControlManager
from pipeline.server.ingest.group_commit import GroupCommitter
from pipeline.server.metrics import ServerMetrics
from pipeline.server.read.snapshot_cache import SnapshotCache
from pipeline.server.security.auth import TokenAuthenticator


@dataclass
class IngestContext:
    authenticator: TokenAuthenticator
    committer: GroupCommitter
    manager: ControlManager
    snapshots: SnapshotCache
    metrics: ServerMetrics
    store: Any
    executor: Executor | None
    max_body_bytes: int
    metrics_enabled: bool = True
    listeners_up: Callable[[], bool] = lambda: True
    configured_sensors: frozenset[str] = frozenset()
    tracing: Tracing = field(default_factory=Tracing)

    async def in_store_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


CONTEXT_KEY: web.AppKey[IngestContext] = web.AppKey("ingest_context", IngestContext)
METRICS_KEY: web.AppKey[ServerMetrics] = web.AppKey("metrics", ServerMetrics)
