"""SnapshotCache: the latest completed event of every sensor, and its subscribers.

"Latest" is by ``logical_timestamp_ms``; on a tie, the event that arrived later wins. The
cache is warmed from the store on start and then fed exactly once per completed event by
the ingest path (invariant 5). Every completed event is also published to subscribers (UI
streams), even one older than the cached latest: the stream contract is "a `snapshot` per
newly completed event" and the page decides what to show.

Subscribers get a bounded queue. A subscriber that falls ``max_pending`` messages behind is
dropped (its queue gets a ``None`` sentinel and the stream closes it) instead of letting
memory grow with the slowest browser tab.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, replace
from functools import cached_property
from datetime import datetime, timezone
from typing import Any, Iterable, Protocol

log = logging.getLogger(__name__)


class EventLike(Protocol):
    @property
    def sensor_id(self) -> str: ...
    @property
    def event_id(self) -> str: ...
    @property
    def logical_timestamp_ms(self) -> int: ...
    @property
    def data(self) -> bytes: ...


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


def decode_json_payload(data: bytes) -> dict[str, Any] | list[Any]:
    """The event as JSON when it is a JSON object or array, else ``{}``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return doc if isinstance(doc, (dict, list)) else {}


@dataclass(frozen=True)
class Snapshot:
    sensor_id: str
    event_id: str
    logical_timestamp_ms: int
    updated_at: float
    payload: bytes
    arrival: int = 0
    payload_omitted: bool = False  # larger than the cache's limit: read it from the store
    # Latest remote-write sample per series of the sensor (read/rw_snapshot.py), or ().
    series: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_event(cls, event: EventLike, updated_at: float, arrival: int = 0,
                   max_payload_bytes: int | None = None,
                   series: tuple[dict[str, Any], ...] = ()) -> Snapshot:
        omitted = max_payload_bytes is not None and len(event.data) > max_payload_bytes
        return cls(sensor_id=event.sensor_id, event_id=event.event_id,
                   logical_timestamp_ms=int(event.logical_timestamp_ms),
                   updated_at=updated_at, payload=b"" if omitted else bytes(event.data),
                   arrival=arrival, payload_omitted=omitted, series=series)

    def newer_than(self, other: Snapshot) -> bool:
        return ((self.logical_timestamp_ms, self.arrival)
                > (other.logical_timestamp_ms, other.arrival))

    @cached_property
    def stream_message(self) -> str:
        """The UI stream frame for this snapshot, encoded once for every subscriber."""
        return json.dumps({"type": "snapshot", "snapshot": self.to_json()})

    def to_json(self) -> dict[str, Any]:
        """Exactly the protocol.md snapshot object (plus ``payload_omitted: true`` when
        the event was too large to keep in memory; receivers ignore unknown fields)."""
        doc: dict[str, Any] = {
            "sensor_id": self.sensor_id,
            "event_id": self.event_id,
            "logical_timestamp_ms": self.logical_timestamp_ms,
            "updated_at": iso_utc(self.updated_at),
            "payload_base64": base64.b64encode(self.payload).decode("ascii"),
            "payload_json": decode_json_payload(self.payload),
        }
        if self.payload_omitted:
            doc["payload_omitted"] = True
        if self.series:
            doc["series"] = list(self.series)
        return doc


@dataclass(frozen=True)
class StreamMessage:
    """Any other stream frame (``{"type": "dashboard", ...}``), already encoded."""

    stream_message: str


class Subscription:
    """One subscriber's bounded inbox; ``None`` in the queue means "you were dropped"."""

    def __init__(self, max_pending: int) -> None:
        self.queue: asyncio.Queue[Snapshot | StreamMessage | None] = asyncio.Queue(
            maxsize=max_pending + 1)
        self.max_pending = max_pending
        self.dropped = False

    def offer(self, snapshot: Snapshot | StreamMessage) -> bool:
        if self.dropped:
            return False
        if self.queue.qsize() >= self.max_pending:
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False
        self.queue.put_nowait(snapshot)
        return True

    async def get(self) -> Snapshot | StreamMessage | None:
        return await self.queue.get()


class SnapshotCache:
    """The latest snapshot per sensor. ``max_payload_bytes`` bounds each one's payload
    (memory.snapshot_payload_max_kib): with one large event per sensor the cache would
    otherwise hold sensors x event size, plus the encoded stream frame of each."""

    def __init__(self, max_pending: int = 256, max_payload_bytes: int | None = None) -> None:
        self._latest: dict[str, Snapshot] = {}
        self._subscribers: set[Subscription] = set()
        self._arrivals = 0
        self.max_pending = max_pending
        self.max_payload_bytes = max_payload_bytes

    # -- filling ------------------------------------------------------------------------

    def warm(self, events: Iterable[tuple[EventLike, float]]) -> int:
        """Load ``(event, completed_at)`` pairs from the store; returns how many were kept."""
        for event, at in events:
            self._offer(Snapshot.from_event(event, at, self._next_arrival(),
                                            self.max_payload_bytes))
        return len(self._latest)

    def update(self, event: EventLike, now: float,
               series: tuple[dict[str, Any], ...] | None = None) -> Snapshot:
        """A newly completed event: cache it if latest and publish it to every subscriber.
        ``series`` (the sensor's latest remote-write samples, when they changed) also
        replaces those of the cached snapshot when this event is not the latest one."""
        current = self._latest.get(event.sensor_id)
        if series is None:
            series = current.series if current is not None else ()
        snapshot = Snapshot.from_event(event, now, self._next_arrival(), self.max_payload_bytes,
                                       series)
        if not self._offer(snapshot) and current is not None and current.series != series:
            self._latest[event.sensor_id] = replace(current, series=series)
        for sub in list(self._subscribers):
            if not sub.offer(snapshot):
                self._subscribers.discard(sub)
                log.warning("stream_subscriber_dropped reason=slow pending=%d", sub.max_pending)
        return snapshot

    def publish(self, message: StreamMessage) -> None:
        """A frame for every subscriber, with the same slow-subscriber rule as snapshots."""
        for sub in list(self._subscribers):
            if not sub.offer(message):
                self._subscribers.discard(sub)
                log.warning("stream_subscriber_dropped reason=slow pending=%d", sub.max_pending)

    def _offer(self, snapshot: Snapshot) -> bool:
        current = self._latest.get(snapshot.sensor_id)
        if current is None or snapshot.newer_than(current):
            self._latest[snapshot.sensor_id] = snapshot
            return True
        return False

    def _next_arrival(self) -> int:
        self._arrivals += 1
        return self._arrivals

    # -- reading ------------------------------------------------------------------------

    def get(self, sensor_id: str) -> Snapshot | None:
        return self._latest.get(sensor_id)

    def all(self) -> list[Snapshot]:
        return sorted(self._latest.values(), key=lambda s: s.sensor_id)

    def updated_at(self) -> dict[str, float]:
        return {sid: snap.updated_at for sid, snap in self._latest.items()}

    # -- subscribers --------------------------------------------------------------------

    def subscribe(self) -> tuple[Subscription, list[Snapshot]]:
        """A new subscription plus the current snapshots, taken atomically (no await in
        between), so nothing completed later is missed and nothing is sent twice."""
        sub = Subscription(self.max_pending)
        self._subscribers.add(sub)
        return sub, self.all()

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
