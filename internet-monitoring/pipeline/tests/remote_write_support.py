"""Helpers of the remote-write receiver and scrape tests: request bodies, POSTs, and what
the queue holds afterwards (read back from the real queue file)."""

from __future__ import annotations

import http.client
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.common import remote_write as rw
from pipeline.common.chunking import reassemble
from pipeline.common.config import sensor_config_from_dict
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.sources import SensorSources

HEADERS = {"Content-Type": rw.HTTP_CONTENT_TYPE, "Content-Encoding": "snappy",
           rw.VERSION_HEADER: rw.VERSION}
T0 = 1_795_755_600_000


def series(index: int, samples: int = 1, *, name: str = "probe_success") -> rw.Series:
    labels = (("__name__", name), ("instance", f"target-{index}"), ("job", "blackbox"))
    return rw.Series(labels, tuple((T0 + 15_000 * i, float(index + i)) for i in range(samples)))


def body(*items: rw.Series) -> bytes:
    return rw.encode(rw.build(items))


def request_of(index: int, samples: int = 500) -> bytes:
    """One request of ``samples`` samples over 50 series (like Prometheus's batches)."""
    per = max(1, samples // 50)
    return body(*(series(index * 1000 + s, per) for s in range(samples // per)))


async def post(session: aiohttp.ClientSession, url: str, data: bytes,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    async with session.post(url, data=data, headers=HEADERS if headers is None else headers
                            ) as response:
        text = await response.text()
        return response.status, dict(response.headers), text


def post_sync(port: int, data: bytes, headers: dict[str, str] | None = None
              ) -> tuple[int, bytes]:
    """A blocking POST (for Hypothesis, which drives the server from the test thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/api/v1/write", body=data,
                     headers=HEADERS if headers is None else headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class QueuedWrite:
    event_id: str
    attributes: dict[str, str]
    data: bytes

    @property
    def series(self) -> list[rw.Series]:
        return rw.series_of(rw.parse(self.data))


def queued_writes(queue: DurableQueue) -> list[QueuedWrite]:
    """Every event in ``queue``, in queue order, reassembled from its chunks."""
    chunks = queue.read_window(0, 1_000_000, 1 << 40)
    by_event: dict[str, list[Any]] = defaultdict(list)
    order: list[str] = []
    for chunk in chunks:
        if chunk.event_id not in by_event:
            order.append(chunk.event_id)
        by_event[chunk.event_id].append(chunk)
    out = []
    for event_id in order:
        parts = sorted(by_event[event_id], key=lambda c: c.chunk_index)
        assert len(parts) == parts[0].chunk_count, "an event is in the queue only partly"
        data = reassemble([c.payload for c in parts], parts[0].event_sha256)
        out.append(QueuedWrite(event_id, dict(parts[0].attributes), data))
    return out


def all_series(queue: DurableQueue) -> list[rw.Series]:
    return [one for write in queued_writes(queue) for one in write.series]


def sources_for(queue: DurableQueue, tmp_path: Path, **remote_write: Any) -> SensorSources:
    settings = {"listen": "127.0.0.1:0", **remote_write}
    config = sensor_config_from_dict({"sensor_id": "pi-rw-01", "token": "t" * 32,
                                      "queue": {"path": str(tmp_path / "queue.db")},
                                      "sources": {"remote_write": settings}})
    return SensorSources(config, queue)
