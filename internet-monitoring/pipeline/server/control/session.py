"""The server's per-sensor control session, sans-I/O.

Fed with heartbeats, committed chunks, connection changes and the time; returns the
messages to send. ``pipeline.server.control.channel`` is the asyncio shell around it and
``pipeline.server.control.scheduler`` shares the global window budget between sessions.

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
    heartbeat with a backlog after the      committed sequences whose acks went out on a
    control connection dropped              connection that dropped are acked AGAIN, once,
                                            under the window they came with
    backlog reported, no chunk committed    recovery round (at most one per heartbeat and
    for stall_windows x window_timeout_s    window_timeout_s): unsettled windows are
                                            re-requested (same id, backoff), each right
                                            behind the acks of what the server has of it
    connect                                 first window asks since_sequence=0, so chunks
                                            whose acks died with the last connection are
                                            re-sent (and answered as duplicates + acked)
    disconnect                              ACTIVE -> QUIET

Acks are produced only from ``on_committed``, which the shell calls after the store's
transaction is durable (invariant 2), and re-sent from the ack ledger, which holds only
sequences that passed through ``on_committed``.

Why re-acks: a 1.0 sensor deletes a chunk only when an ack lists it, and never re-sends a
chunk under another window id. An ack lost with a control connection (or read after the
sensor gave up on it) therefore strands the chunk in its queue for ever, while the server
holds it. The ledger remembers, per window, the sequences acked since the sensor last
reported an empty queue (bounded: ``ack_ledger_sequences``, oldest windows dropped first;
a window is dropped after ``reack_rounds`` re-acks). Re-acks cost no upload, so they go
out as soon as the sensor, connected again, reports a backlog; re-requests make the
sensor upload again, so they wait until it has stalled for longer than one hung POST
lasts, and come at most once per heartbeat: a 1.0 agent reads control messages only
between windows, and a second round before it has even reported back would only queue up
behind the first.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
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
    def from_state(cls, doc: dict[str, object]) -> Window:
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
    # Recovery rounds start after this many window timeouts without a commit: a 1.0 agent
    # stuck in one hung POST (ingest timeout + backoff) must not be asked to re-send the
    # window it is still working through, which only makes duplicates.
    stall_windows: float = 3.0
    # Committed sequences remembered per sensor for re-acks, and how often each window's
    # sequences are re-acked before they are forgotten (see the module docstring).
    ack_ledger_sequences: int = 4096
    reack_rounds: int = 4
    # Goes into every window id this process issues (a replica's tag, docs/scaling.md):
    # two replicas that own a sensor one after the other never issue the same id.
    id_tag: str = ""


class _LedgerWindow:
    __slots__ = ("ranges", "count", "rounds", "suspect", "acked_at", "generation")

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []  # inclusive [start, end], mostly one per window
        self.count = 0
        self.rounds = 0
        self.suspect = False  # some of its acks went out on a connection that then dropped
        self.acked_at = 0.0   # when its last ack (or re-ack) was queued ...
        self.generation = 0   # ... on which control connection of the sensor

    def add(self, seq: int) -> bool:
        ranges = self.ranges
        if ranges and ranges[-1][1] + 1 == seq:
            ranges[-1][1] = seq
        elif any(start <= seq <= end for start, end in ranges):
            return False
        else:
            ranges.append([seq, seq])
        self.count += 1
        return True

    def sequences(self) -> tuple[int, ...]:
        return tuple(seq for start, end in sorted(self.ranges)
                     for seq in range(start, end + 1))


class AckLedger:
    """Sequences acked per window, oldest window first, at most ``max_sequences`` in all.

    An ack queued on a live connection reaches the sensor (TCP delivers it, the agent
    reads it sooner or later); only a connection that drops can lose it. So only windows
    whose acks went out on a connection that later dropped are *suspect* and re-acked:
    no needless acks on a healthy control channel. Ranges, not sets: a window's sequences
    are mostly contiguous, so a sensor's ledger costs a few small lists."""

    __slots__ = ("max_sequences", "_windows", "_count", "suspects")

    def __init__(self, max_sequences: int = 4096) -> None:
        self.max_sequences = max_sequences
        self._windows: OrderedDict[str, _LedgerWindow] = OrderedDict()
        self._count = 0
        self.suspects = 0  # windows marked suspect

    def __len__(self) -> int:
        return self._count

    def connection_lost(self) -> None:
        """Acks queued so far may have died with the connection."""
        for entry in self._windows.values():
            entry.suspect = True
        self.suspects = len(self._windows)

    def add(self, window_id: str, seq: int, now: float = 0.0, generation: int = 0,
            *, suspect: bool = False) -> None:
        """``seq`` was acked under ``window_id`` at ``now`` on connection ``generation``
        (``suspect``: not sent on any connection yet, held for the next one)."""
        if self.max_sequences <= 0:
            return
        entry = self._windows.get(window_id)
        if entry is None:
            entry = self._windows[window_id] = _LedgerWindow()
        if entry.add(seq):
            self._count += 1
        entry.acked_at, entry.generation = now, generation
        if suspect and not entry.suspect:
            entry.suspect = True
            self.suspects += 1
        while self._count > self.max_sequences and self._windows:
            _, dropped = self._windows.popitem(last=False)
            self._drop(dropped)

    def _drop(self, entry: _LedgerWindow) -> None:
        self._count -= entry.count
        self.suspects -= entry.suspect

    def clear(self) -> None:
        self._windows.clear()
        self._count = 0
        self.suspects = 0

    def confirm(self, before: float, generation: int) -> int:
        """The sensor has read every ack queued on connection ``generation`` before
        ``before``: forget those windows. Returns how many were dropped."""
        gone = [w for w, e in self._windows.items()
                if e.generation == generation and e.acked_at < before and not e.suspect]
        for window_id in gone:
            self._drop(self._windows.pop(window_id))
        return len(gone)

    def round(self, max_rounds: int, now: float = 0.0, generation: int = 0) -> list[ChunkAck]:
        """Suspect windows' acks again, once (they are suspect again only if the connection
        carrying these drops too); a window re-acked ``max_rounds`` times is dropped."""
        out: list[ChunkAck] = []
        for window_id in [w for w, e in self._windows.items() if e.suspect]:
            entry = self._windows[window_id]
            out.append(ChunkAck(window_id=window_id, committed_sequences=entry.sequences(),
                                reset_window=False))
            entry.suspect = False
            self.suspects -= 1
            entry.acked_at, entry.generation = now, generation
            entry.rounds += 1
            if entry.rounds >= max_rounds:
                del self._windows[window_id]
                self._drop(entry)
        return out

    def ack_for(self, window_id: str) -> ChunkAck | None:
        """The window's acks (to go right before a re-request of it)."""
        entry = self._windows.get(window_id)
        if entry is None:
            return None
        return ChunkAck(window_id=window_id, committed_sequences=entry.sequences(),
                        reset_window=False)


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
    ledger: AckLedger = field(default_factory=AckLedger)
    reack_rounds_sent: int = 0
    _last_progress: float = 0.0
    _last_round_at: float = float("-inf")
    _reported_since_round: bool = True
    _reported_since_reack: bool = True
    # Control connections of this sensor, counted; when each window was last (re)requested
    # on which one: a chunk POSTed under a window proves the sensor read everything queued
    # on that connection before the request, acks included (one ordered stream).
    _generation: int = 0
    _requested: dict[str, tuple[int, float]] = field(default_factory=dict)
    _confirmed_before: float = float("-inf")
    _counter: int = 0
    _fresh_connection: bool = False
    _changed: bool = False

    # -- inputs ----------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.ledger.max_sequences = self.policy.ack_ledger_sequences

    def on_connect(self, now: float, epoch: str | None = None) -> None:
        self.connected = True
        self._fresh_connection = True
        self._last_progress = now
        self._generation += 1
        self._confirmed_before = float("-inf")
        if epoch is not None:
            self._switch_epoch(epoch)

    def on_disconnect(self, now: float) -> None:
        self.connected = False
        self.ledger.connection_lost()
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
        self._reported_since_round = True
        self._reported_since_reack = True
        if heartbeat.queue_depth == 0:
            self.ledger.clear()  # the sensor holds nothing: nothing to ack again
            if self.windows:
                self.windows.clear()
                self._changed = True

    def on_committed(self, items: Sequence[Committed], watermark: int, now: float
                     ) -> list[ChunkAck]:
        """Chunks made durable: returns the acks to send, one per window."""
        if watermark > self.watermark:
            self.watermark = watermark
        self.backlog = max(0, self.backlog - len(items))
        self._last_progress = now
        by_window: dict[str, list[int]] = {}
        for item in items:
            by_window.setdefault(item.window_id, []).append(item.sequence)
            self.ledger.add(item.window_id, item.sequence, now, self._generation,
                            suspect=not self.connected)
            self._confirm_read(item.window_id)
            window = self.windows.get(item.window_id)
            if window is not None:
                self._count(window, item.nbytes, now)
        return [ChunkAck(window_id=wid, committed_sequences=tuple(seqs), reset_window=False)
                for wid, seqs in by_window.items()]

    def _confirm_read(self, window_id: str) -> None:
        requested = self._requested.get(window_id)
        if requested is None or requested[0] != self._generation \
                or requested[1] <= self._confirmed_before:
            return
        self._confirmed_before = requested[1]
        self.ledger.confirm(requested[1], self._generation)

    def _note_request(self, window_id: str, now: float) -> None:
        self._requested[window_id] = (self._generation, now)
        if len(self._requested) > 2 * len(self.windows) + 16:
            self._requested = {w: r for w, r in self._requested.items() if w in self.windows}

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

    def on_tick(self, now: float) -> list[ChunkRequest | ChunkAck]:
        """Advance timers; returns re-acks and re-requests (same window ids) to send."""
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
                if window.requests == 1:
                    window.status = WindowStatus.EMPTY
                else:
                    del self.windows[window.window_id]
                self._changed = True
            elif window.received > 0 and idle >= self.policy.quiet_s:
                window.status = WindowStatus.QUIET  # under-filled: the queue ran dry
                self.backlog = 0
                self._changed = True
        out: list[ChunkRequest | ChunkAck] = []
        if self._reack_due(now):
            out.extend(self._reack(now))
        if self._rerequest_due(now):
            out.extend(self._recovery_round(now))
        return out

    def _reack_due(self, now: float) -> bool:
        """Acks that may have died with a dropped connection, and the sensor (connected
        again) still reports a backlog: ack them again at once, on the new connection."""
        return (self.connected and self.backlog > 0 and self.ledger.suspects > 0
                and self._reported_since_reack)

    def _reack(self, now: float) -> list[ChunkAck]:
        self._reported_since_reack = False
        self.reack_rounds_sent += 1
        return self.ledger.round(self.policy.reack_rounds, now, self._generation)

    def _rerequest_due(self, now: float) -> bool:
        """A backlog the server cannot account for: the sensor reports chunks, none came
        for stall_windows x window_timeout_s, and it has reported since the last round."""
        timeout = self.policy.window_timeout_s
        return (self.connected and self.backlog > 0 and self._reported_since_round
                and now - self._last_progress >= timeout * self.policy.stall_windows
                and now - self._last_round_at >= timeout
                and any(w.status is not WindowStatus.ACTIVE for w in self.windows.values()))

    def _recovery_round(self, now: float) -> list[ChunkRequest | ChunkAck]:
        """Re-request unsettled windows, each right behind the acks of what the server
        already has of it, so the sensor deletes those before it re-sends anything."""
        self._last_round_at = now
        self._reported_since_round = False
        out: list[ChunkRequest | ChunkAck] = []
        for request in self._rerequest_unsettled(now):
            ack = self.ledger.ack_for(request.window_id)
            if ack is not None:
                out.append(ack)
            out.append(request)
        return out

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
        window_id = f"{self.sensor_id}-{int(now * 1000)}-{self.policy.id_tag}{self._counter}"
        window = Window(window_id=window_id, since_sequence=since,
                        max_chunks=self.policy.max_chunks * self._factor(),
                        max_bytes=self.policy.max_bytes,
                        issued_at=now, last_activity=now)
        self.windows[window_id] = window
        self._changed = True
        self._note_request(window_id, now)
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
            self._note_request(window.window_id, now)
            out.append(self._request_for(window))
        self._changed = self._changed or bool(out)
        return out

    def _switch_epoch(self, epoch: str) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.watermark = 0
            self.windows.clear()
            self.ledger.clear()
            self._changed = True


def settled_ids(before: Iterable[str], after: Iterable[str]) -> set[str]:
    """Window ids that disappeared between two exports (to delete from the store)."""
    return set(before) - set(after)
