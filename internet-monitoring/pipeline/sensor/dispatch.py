"""The sensor's window and ack bookkeeping, sans-I/O.

Fed with messages and the time, returns what to do; never awaits, sleeps or touches a
socket. The agent (``pipeline.sensor.agent``) is the thin asyncio shell around it.

Transitions of one queued chunk::

    queued --request(window W)--> in_flight[W, posting]
    in_flight[W, posting] --post delivered--> in_flight[W, delivered]   (waits for the ack)
    in_flight[W, posting] --post delivered, http_ack--> deleted
    in_flight[W, posting] --post rejected (permanent 4xx)--> quarantined
    in_flight[W, *] --chunk_ack listing it--> deleted
    in_flight[W, delivered] --request reusing W--> in_flight[W, posting]    (re-sent)
    in_flight[W, delivered] --reset_window W / give-up timer / reconnect--> queued

Protocol 1.0 rules kept here: a chunk in flight under window ``A`` is never sent under
another window id; it is re-sent when a request reuses ``A``; a chunk is deleted only when
an ack lists it. A chunk whose POST is still being retried is never sent twice at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from pipeline.common.messages import ChunkAck, ChunkRequest


class ChunkInfo(Protocol):
    """What the dispatcher needs of a queued chunk (``queue.ChunkMeta`` fits)."""

    @property
    def sequence(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


@dataclass
class InFlight:
    window_id: str
    sent_at: float
    posting: bool = True


@dataclass(frozen=True)
class SendPlan:
    """Chunks to POST for one request, oldest first."""

    window_id: str
    sequences: tuple[int, ...]

    def __bool__(self) -> bool:
        return bool(self.sequences)


@dataclass
class _Window:
    last_seen: float


@dataclass
class Dispatcher:
    """Decides which chunks go out under which window, and which may be deleted.

    ``give_up_after_s``: a window whose delivered chunks were neither acked nor
    re-requested for that long is released, so its chunks may go out again under any
    window (the server dedupes). This bounds how long a server that forgot a window can
    strand a chunk.
    """

    give_up_after_s: float = 120.0
    in_flight: dict[int, InFlight] = field(default_factory=dict)
    _windows: dict[str, _Window] = field(default_factory=dict)

    # -- queries ---------------------------------------------------------------------

    def candidate_limit(self, request: ChunkRequest) -> int:
        """How many queued chunks the shell must list so that skipping in-flight ones
        still leaves enough to fill the window."""
        return request.max_chunks + len(self.in_flight)

    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def posting(self) -> set[int]:
        return {seq for seq, item in self.in_flight.items() if item.posting}

    # -- inputs ----------------------------------------------------------------------

    def on_request(self, request: ChunkRequest, candidates: Sequence[ChunkInfo],
                   now: float) -> SendPlan:
        """A ``chunk_request`` arrived; ``candidates`` are queued chunks with
        ``sequence > since_sequence``, ascending, as many as ``candidate_limit`` asks."""
        self._windows[request.window_id] = _Window(last_seen=now)
        chosen: list[int] = []
        total_bytes = 0
        in_flight_after = len(self.in_flight)
        for info in candidates:
            if info.sequence <= request.since_sequence:
                continue
            if len(chosen) >= request.max_chunks:
                break
            current = self.in_flight.get(info.sequence)
            if current is not None and (current.window_id != request.window_id or current.posting):
                continue
            if current is None and in_flight_after >= request.max_in_flight:
                break
            if chosen and total_bytes + info.nbytes > request.max_bytes:
                break
            chosen.append(info.sequence)
            total_bytes += info.nbytes
            if current is None:
                in_flight_after += 1
            self.in_flight[info.sequence] = InFlight(request.window_id, now, posting=True)
        return SendPlan(request.window_id, tuple(chosen))

    def on_post_delivered(self, sequence: int, now: float, *, http_ack: bool = False
                          ) -> tuple[int, ...]:
        """The server answered 200 for this chunk. With the ``http_ack`` capability that
        answer is the durable confirmation: returns the sequence to delete."""
        item = self.in_flight.get(sequence)
        if http_ack:
            self.in_flight.pop(sequence, None)
            return (sequence,)
        if item is not None:
            item.posting = False
            item.sent_at = now
        return ()

    def on_post_rejected(self, sequence: int) -> None:
        """The server refused this chunk for good; the shell quarantines it."""
        self.in_flight.pop(sequence, None)

    def on_post_abandoned(self, sequence: int) -> None:
        """The shell stopped trying (shutdown): the chunk goes back to queued."""
        self.in_flight.pop(sequence, None)

    def on_ack(self, ack: ChunkAck, now: float) -> tuple[int, ...]:
        """Sequences to delete. Acks for chunks not in flight (sent before a restart, or
        under a released window) still delete them: the server has them durably."""
        for seq in ack.committed_sequences:
            self.in_flight.pop(seq, None)
        if ack.reset_window:
            self._release(lambda item: item.window_id == ack.window_id and not item.posting)
            self._windows.pop(ack.window_id, None)
        elif ack.window_id in self._windows:
            self._windows[ack.window_id].last_seen = now
        return tuple(ack.committed_sequences)

    def on_deleted_elsewhere(self, sequences: Iterable[int]) -> None:
        """Rows gone from the queue for another reason (retention, byte cap, quarantine)."""
        for seq in sequences:
            self.in_flight.pop(seq, None)

    def on_tick(self, now: float) -> tuple[str, ...]:
        """Release windows idle for ``give_up_after_s``; returns their ids."""
        stale = tuple(wid for wid, w in self._windows.items()
                      if now - w.last_seen >= self.give_up_after_s)
        for wid in stale:
            self._release(lambda item, wid=wid: item.window_id == wid and not item.posting)
            if not any(item.window_id == wid for item in self.in_flight.values()):
                del self._windows[wid]
        return stale

    def on_disconnect(self) -> None:
        """The control channel dropped: acks for delivered chunks may be lost with it, and
        the server asks again from the start of the queue on reconnect. Chunks whose POST
        is still running stay with their window."""
        self._release(lambda item: not item.posting)
        self._windows = {wid: w for wid, w in self._windows.items()
                         if any(item.window_id == wid for item in self.in_flight.values())}

    # -- helpers ---------------------------------------------------------------------

    def _release(self, predicate) -> None:  # type: ignore[no-untyped-def]
        for seq in [s for s, item in self.in_flight.items() if predicate(item)]:
            del self.in_flight[seq]
