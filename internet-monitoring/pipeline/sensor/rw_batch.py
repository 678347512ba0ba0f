"""Which remote-write requests go into which queued event, sans-I/O.

Requests that arrive while a commit runs (or within ``batch_delay_ms`` of the first one)
wait in a ``GroupPlan``; the committer takes them all at once and writes them in ONE
queue transaction. Consecutive requests are packed into events of at most
``max_event_bytes`` (uncompressed; a larger request is an event of its own). Serialised
``WriteRequest`` messages concatenate into one valid ``WriteRequest``, so an event's data
is simply its requests' bytes end to end, in arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

W = TypeVar("W")


@dataclass(frozen=True)
class EventGroup(Generic[W]):
    """One queued event: its data and the waiters (requests) answered by its commit."""

    data: bytes
    waiters: tuple[W, ...]
    source: str


@dataclass
class _Pending(Generic[W]):
    raw: bytes
    waiter: W
    source: str


@dataclass
class GroupPlan(Generic[W]):
    """Pending requests of the next commit, and how to cut them into events."""

    max_event_bytes: int
    _pending: list[_Pending[W]] = field(default_factory=list)
    _bytes: int = 0

    def add(self, raw: bytes, waiter: W, source: str) -> bool:
        """Queue ``raw`` for the next commit; True when the pending bytes fill an event
        (commit now, no need to wait for more)."""
        self._pending.append(_Pending(raw, waiter, source))
        self._bytes += len(raw)
        return self._bytes >= self.max_event_bytes

    @property
    def empty(self) -> bool:
        return not self._pending

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._pending)

    def take(self) -> list[EventGroup[W]]:
        """Everything pending, packed into events (order kept, one source per event)."""
        pending, self._pending, self._bytes = self._pending, [], 0
        groups: list[EventGroup[W]] = []
        parts: list[bytes] = []
        waiters: list[W] = []
        used = 0
        source = ""
        for item in pending:
            if parts and (used + len(item.raw) > self.max_event_bytes or item.source != source):
                groups.append(EventGroup(b"".join(parts), tuple(waiters), source))
                parts, waiters, used = [], [], 0
            source = item.source
            parts.append(item.raw)
            waiters.append(item.waiter)
            used += len(item.raw)
        if parts:
            groups.append(EventGroup(b"".join(parts), tuple(waiters), source))
        return groups
