"""The server's per-sensor control session, sans-I/O.

Fed with heartbeats, committed chunks, connection changes and the time; returns the
messages to send. ``pipeline.server.control`` is the asyncio shell around it and
``pipeline.server.scheduler`` shares the global window budget between sessions.

Window life cycle (one table, as h11 keeps its transitions)::

    event                                   window state change / output
    ------------------------------------    ----------------------------------------------
    budget granted, backlog > 0             new window ACTIVE -> ChunkRequest
    chunk committed under W                 ack -> ChunkAck(W, [seq]); W.received += 1
    W received max_chunks / max_bytes       ACTIVE -> FILLED (sensor likely has more: the
                                            next window is issued back to back)
    W quiet for quiet_s after traffic       ACTIVE -> QUIET (sensor sent all it had)
    W got nothing for window_timeout_s      ACTIVE -> EMPTY (kept: its POSTs may have been
                                            lost); if the sensor still reports a backlog,
                                            its chunks are stuck under unsettled windows:
                                            re-request each with the SAME id (protocol
                                            1.0 re-sends only then), with backoff
    re-request of W got nothing             W -> SETTLED (the sensor holds nothing of W)
    heartbeat queue_depth == 0              every window -> SETTLED (forgotten)
    heartbeat with a new queue epoch        every window -> SETTLED; offsets of the new
                                            epoch start at 0
    connect                                 first window asks since_sequence=0, so chunks
                                            whose acks died with the last connection are
                                            re-sent (and answered as duplicates + acked)
    disconnect                              ACTIVE -> QUIET

Acks are produced only from ``on_committed``, which the shell calls after the store's
transaction is durable (invariant 2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Iterable, Sequence

from pipeline.common.messages import ChunkAck, ChunkRequest, Heartbeat


class WindowStatus(str, enum.Enum):
    ACTIVE = "active"
    FILLED = "filled"
    QUIET = "quiet"
    EMPTY = "empty"


@dataclass
class Window:
    window_id: str
    since_sequence: int
    max_chunks: int
    max_bytes: int
    issued_at: float
    last_activity: float
    status: WindowStatus = WindowStatus.ACTIVE
    received: int = 0
    received_bytes: int = 0
    requests: int = 1
    next_rerequest_at: float = 0.0

    def to_state(self) -> dict[str, object]:
        # Field by field: ``dataclasses.asdict`` deep-copies and showed up in fleet profiles.
        doc: dict[str, object] = {name: getattr(self, name) for name in _WINDOW_FIELDS}
        doc["status"] = self.status.value
        return doc

    @classmethod
    def from_state(cls, doc: dict[str, object]) -> "Window":
        data = dict(doc)
        data["status"] = WindowStatus(str(data.get("status", "quiet")))
        return cls(**data)  # type: ignore[arg-type]


_WINDOW_FIELDS = tuple(f.name for f in fields(Window))


@dataclass(frozen=True)
class WindowPolicy:
    max_chunks: int = 64
    max_bytes: int = 4 * 1024 * 1024
    max_in_flight: int = 128
    # Sensors that POST batches (capability ``batch``) get windows this many times larger
    # in chunks and in flight (bytes stay capped by max_bytes): a window's round trip is
    # then amortised over a few batch POSTs instead of dozens of single ones.
    batch_window_factor: int = 8
    windows_per_sensor: int = 2
    # ...and this many times more windows (and in-flight chunks): with only two, both
    # finish together and the store idles while the next pair is persisted and sent
    # (a 10,000-chunk drain ran at ~80 % of the server's batch rate; with four, ~90 %+).
    batch_windows_factor: int = 2
    window_timeout_s: float = 10.0
    quiet_s: float = 1.0
    rerequest_max_s: float = 60.0


@dataclass(frozen=True)
class Committed:
    """One chunk the store has made durable (stored or duplicate)."""

    sequence: int
    window_id: str
    nbytes: int
    epoch: str = ""


@dataclass
class SensorSession:
    sensor_id: str
    policy: WindowPolicy = field(default_factory=WindowPolicy)
    epoch: str = ""
    watermark: int = 0
    connected: bool = False
    backlog: int = 0
    batched: bool = False  # the sensor's connection negotiated ``batch``
    windows: dict[str, Window] = field(default_factory=dict)
    last_heartbeat: Heartbeat | None = None
    last_heartbeat_at: float | None = None
    _counter: int = 0
    _fresh_connection: bool = False
    _changed: bool = False

    # -- inputs ----------------------------------------------------------------------

    def on_connect(self, now: float, epoch: str | None = None) -> None:
        self.connected = True
        self._fresh_connection = True
        if epoch is not None:
            self._switch_epoch(epoch)

    def on_disconnect(self, now: float) -> None:
        self.connected = False
        for window in self.windows.values():
            if window.status is WindowStatus.ACTIVE:
                window.status = WindowStatus.QUIET
        self._changed = True

    def on_heartbeat(self, heartbeat: Heartbeat, now: float, epoch: str | None = None) -> None:
        if epoch is not None:
            self._switch_epoch(epoch)
        self.last_heartbeat = heartbeat
        self.last_heartbeat_at = now
        self.backlog = heartbeat.queue_depth
        if heartbeat.queue_depth == 0 and self.windows:
            self.windows.clear()
            self._changed = True

    def on_committed(self, items: Sequence[Committed], watermark: int, now: float) -> list[ChunkAck]:
        """Chunks made durable: returns the acks to send, one per window."""
        if watermark > self.watermark:
            self.watermark = watermark
        self.backlog = max(0, self.backlog - len(items))
        by_window: dict[str, list[int]] = {}
        for item in items:
            by_window.setdefault(item.window_id, []).append(item.sequence)
            window = self.windows.get(item.window_id)
            if window is not None:
                self._count(window, item.nbytes, now)
        return [ChunkAck(window_id=wid, committed_sequences=tuple(seqs), reset_window=False)
                for wid, seqs in by_window.items()]

    def _count(self, window: Window, nbytes: int, now: float) -> None:
        window.received += 1
        window.received_bytes += nbytes
        window.last_activity = now
        full = window.received >= window.max_chunks or window.received_bytes >= window.max_bytes
        if full and window.status is not WindowStatus.FILLED:
            # A full window means the sensor probably holds more: keep windows flowing.
            window.status = WindowStatus.FILLED
            self.backlog = max(self.backlog, 1)
            self._changed = True

    def on_tick(self, now: float) -> list[ChunkRequest]:
        """Advance timers; returns re-requests (same window ids) to send."""
        stuck = False
        for window in list(self.windows.values()):
            idle = now - window.last_activity
            if window.status is WindowStatus.QUIET:
                continue
            if window.status is WindowStatus.FILLED:
                if idle >= self.policy.quiet_s:
                    window.status = WindowStatus.QUIET
                continue
            if window.received == 0 and idle >= self.policy.window_timeout_s:
                # Nothing came: either the sensor had nothing free to send, or what it
                # sent was lost. A first request is kept for one re-request; a re-request
                # that brings nothing proves the sensor holds nothing under this id.
                stuck = stuck or (window.requests == 1 and self.backlog > 0)
                if window.requests == 1:
                    window.status = WindowStatus.EMPTY
                else:
                    del self.windows[window.window_id]
                self._changed = True
            elif window.received > 0 and idle >= self.policy.quiet_s:
                window.status = WindowStatus.QUIET  # under-filled: the queue ran dry
                self.backlog = 0
                self._changed = True
        if stuck and self.connected:
            return self._rerequest_unsettled(now)
        return []

    # -- window issuing (the scheduler grants the budget) ----------------------------

    def active_windows(self) -> int:
        return sum(1 for w in self.windows.values() if w.status is WindowStatus.ACTIVE)

    def window_limit(self) -> int:
        """Active windows this sensor may hold at once."""
        return self.policy.windows_per_sensor * self._windows_factor()

    def wants_window(self) -> bool:
        return (self.connected and self.backlog > 0
                and self.active_windows() < self.window_limit())

    def issue_window(self, now: float, *, force: bool = False) -> ChunkRequest | None:
        """Open a new window if one is wanted (or ``force``d by a dashboard request)."""
        if not self.connected or self.active_windows() >= self.window_limit():
            return None
        if not force and self.backlog <= 0:
            return None
        since = 0 if self._fresh_connection else self.watermark
        self._fresh_connection = False
        self._counter += 1
        window_id = f"{self.sensor_id}-{int(now * 1000)}-{self._counter}"
        window = Window(window_id=window_id, since_sequence=since,
                        max_chunks=self.policy.max_chunks * self._factor(),
                        max_bytes=self.policy.max_bytes,
                        issued_at=now, last_activity=now)
        self.windows[window_id] = window
        self._changed = True
        return self._request_for(window)

    # -- persistence -----------------------------------------------------------------

    def take_changed(self) -> bool:
        """True once after any change worth persisting (windows, epoch)."""
        changed, self._changed = self._changed, False
        return changed

    def export_windows(self) -> dict[str, dict[str, object]]:
        return {wid: w.to_state() for wid, w in self.windows.items()}

    def restore_windows(self, states: dict[str, dict[str, object]]) -> None:
        """Reload windows after a server restart; none is active any more."""
        for wid, doc in states.items():
            window = Window.from_state(doc)
            if window.status is WindowStatus.ACTIVE:
                window.status = WindowStatus.QUIET
            self.windows[wid] = window
            self._counter = max(self._counter, len(self.windows))

    # -- helpers ---------------------------------------------------------------------

    def _request_for(self, window: Window) -> ChunkRequest:
        return ChunkRequest(since_sequence=window.since_sequence, max_chunks=window.max_chunks,
                            max_bytes=window.max_bytes, window_id=window.window_id,
                            max_in_flight=self._in_flight_limit())

    def _factor(self) -> int:
        return max(1, self.policy.batch_window_factor) if self.batched else 1

    def _windows_factor(self) -> int:
        return max(1, self.policy.batch_windows_factor) if self.batched else 1

    def _in_flight_limit(self) -> int:
        """Chunks the sensor may have in flight: enough for all of its windows at once."""
        return self.policy.max_in_flight * self._factor() * self._windows_factor()

    def _rerequest_unsettled(self, now: float) -> list[ChunkRequest]:
        out: list[ChunkRequest] = []
        for window in self.windows.values():
            if window.status is WindowStatus.ACTIVE or now < window.next_rerequest_at:
                continue
            window.requests += 1
            window.status = WindowStatus.ACTIVE
            window.received = 0
            window.received_bytes = 0
            window.last_activity = now
            delay = min(self.policy.window_timeout_s * 2 ** min(window.requests, 6),
                        self.policy.rerequest_max_s)
            window.next_rerequest_at = now + delay
            out.append(self._request_for(window))
        self._changed = self._changed or bool(out)
        return out

    def _switch_epoch(self, epoch: str) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.watermark = 0
            self.windows.clear()
            self._changed = True


def settled_ids(before: Iterable[str], after: Iterable[str]) -> set[str]:
    """Window ids that disappeared between two exports (to delete from the store)."""
    return set(before) - set(after)
