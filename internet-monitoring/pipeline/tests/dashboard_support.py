"""Shared pieces of the dashboard tests: results submitted through real HTTP ingest."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pipeline.server.app import PipelineServer
from pipeline.tests.server_support import TOKENS, chunk_docs, urls


@dataclass
class ResultPoster:
    """Posts JSON results as protocol 1.0 chunks, one sequence counter per sensor."""

    http: aiohttp.ClientSession
    server: PipelineServer
    tokens: dict[str, str] = field(default_factory=lambda: dict(TOKENS))
    sequences: dict[str, int] = field(default_factory=dict)

    async def post(self, sensor_id: str, doc: dict[str, Any], *, ago_s: float = 0.0,
                   at_ms: int | None = None) -> str:
        """Submit one result measured ``ago_s`` seconds ago; returns its event id."""
        seq = self.sequences.get(sensor_id, 0) + 1
        ts = at_ms if at_ms is not None else int((time.time() - ago_s) * 1000)
        event_id, docs = chunk_docs(sensor_id, json.dumps(doc).encode(), seq,
                                    logical_timestamp_ms=ts)
        self.sequences[sensor_id] = seq + len(docs) - 1
        for chunk in docs:
            async with self.http.post(
                    urls(self.server)["ingest"] + "/v1/ingest/chunk", json=chunk,
                    headers={"Authorization": f"Bearer {self.tokens[sensor_id]}"}) as r:
                assert r.status == 200, await r.text()
        return event_id
