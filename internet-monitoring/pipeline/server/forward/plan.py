"""What the remote-write forwarder sends and what an answer means: no sockets, no clock.

A sensor's outbox is its committed events in store order (``row_id``) after a durable
cursor. ``SensorOutbox`` turns a page of events into sends of at most ``samples_per_send``
samples, hands them out one at a time (one request in flight per sensor keeps the order),
and turns each answer into a ``Decision``: the cursor to save, samples sent or failed, or
a delay before the same send is tried again.

Answers (Prometheus's own client does the same): 2xx sent; 429, 5xx and no answer at all
retried with bounded exponential backoff and jitter; 401, 403 and 407 retried too (the
credential is wrong, which an operator fixes, not the samples); every other 4xx is a
permanent rejection. The Prometheus receiver refuses a whole request for one bad sample,
so a rejected send of several samples is split in halves and each half is tried again;
a single rejected sample is counted as failed and logged, never tried again.

Identity label: every forwarded series carries ``sensor_label`` = the authenticated sensor
id. A series that already has that label with another value (forged, or a sensor whose
Prometheus calls itself differently) keeps it as ``exported_<label>``, as Prometheus does
for conflicting target labels when ``honor_labels`` is false.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol, Sequence

from pipeline.common import remote_write
from pipeline.common.backoff import Backoff
from pipeline.common.remote_write import Series

RETRY_STATUSES_4XX = frozenset({401, 403, 407, 408, 429})


class EventView(Protocol):
    @property
    def row_id(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def completed_at(self) -> float: ...
    @property
    def attributes(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class Send:
    """One request's worth of series. ``cursor``: the row id to save once it is sent (set
    on the last send of an event; None on the earlier parts of a split event)."""

    series: tuple[Series, ...]
    samples: int
    cursor: int | None
    completed_at: float


@dataclass(frozen=True)
class Decision:
    """What the shell does after an answer: save ``cursor`` (when set), count, and wait
    ``retry_after`` seconds before sending the head again (None: go on at once)."""

    cursor: int | None = None
    sent: int = 0
    failed: int = 0
    retry_after: float | None = None
    rejected: bool = False


def is_remote_write(attributes: Mapping[str, str]) -> bool:
    return attributes.get(remote_write.CONTENT_TYPE_ATTRIBUTE) == remote_write.EVENT_CONTENT_TYPE


def relabel(series: Series, sensor_id: str, label: str) -> Series:
    """``series`` with ``label`` = ``sensor_id``; another value moves to ``exported_<label>``."""
    labels = dict(series.labels)
    claimed = labels.get(label)
    if claimed is not None and claimed != sensor_id:
        labels[f"exported_{label}"] = claimed
    labels[label] = sensor_id
    return Series(labels=tuple(sorted(labels.items())), samples=series.samples)


def split_samples(series: Sequence[Series], limit: int) -> list[list[Series]]:
    """``series`` cut into groups of at most ``limit`` samples, in order (a series whose
    samples straddle a cut appears in both groups with its own part of the samples)."""
    groups: list[list[Series]] = []
    current: list[Series] = []
    room = limit
    for one in series:
        samples = one.samples
        while samples:
            take, samples = samples[:room], samples[room:]
            current.append(Series(labels=one.labels, samples=take))
            room -= len(take)
            if room == 0:
                groups.append(current)
                current, room = [], limit
    if current:
        groups.append(current)
    return groups


def event_series(event: EventView, sensor_id: str, label: str) -> list[Series]:
    """The relabelled series of a remote-write event (RemoteWriteMalformed if it is not one
    after all: the sensor checked it, so that is a damaged or forged event)."""
    request = remote_write.parse(event.data)
    return [relabel(s, sensor_id, label) for s in remote_write.series_of(request)]


def plan_sends(events: Iterable[EventView], sensor_id: str, *, samples_per_send: int,
               label: str) -> tuple[list[Send], list[tuple[int, str]]]:
    """The sends for ``events`` (in order) and the events that could not be read
    (``(row_id, reason)``). Events that are not remote write become an empty send, so
    the cursor passes them; so does an unreadable one."""
    sends: list[Send] = []
    unreadable: list[tuple[int, str]] = []
    for event in events:
        groups: list[list[Series]] = []
        if is_remote_write(event.attributes):
            try:
                groups = split_samples(event_series(event, sensor_id, label),
                                       samples_per_send)
            except remote_write.RemoteWriteMalformed as exc:
                unreadable.append((event.row_id, exc.message))
        if not groups:
            sends.append(Send((), 0, event.row_id, event.completed_at))
            continue
        for index, group in enumerate(groups):
            last = index == len(groups) - 1
            sends.append(Send(tuple(group), sum(len(s.samples) for s in group),
                              event.row_id if last else None, event.completed_at))
    return sends, unreadable


def halves(send: Send) -> tuple[Send, Send]:
    """A rejected send of two or more samples, split to find the sample the receiver
    refuses; the cursor goes with the second half."""
    first_size = send.samples // 2
    flat = [group[0] for group in split_samples(send.series, 1)]
    return (Send(tuple(_merge(flat[:first_size])), first_size, None, send.completed_at),
            Send(tuple(_merge(flat[first_size:])), send.samples - first_size, send.cursor,
                 send.completed_at))


def _merge(parts: Sequence[Series]) -> list[Series]:
    """Adjacent one-sample parts of the same series joined back into one series."""
    merged: list[Series] = []
    for part in parts:
        if merged and merged[-1].labels == part.labels:
            merged[-1] = Series(merged[-1].labels, merged[-1].samples + part.samples)
        else:
            merged.append(part)
    return merged


def verdict(status: int | None) -> str:
    """``sent``, ``retry`` or ``rejected`` for an HTTP status (None: no answer at all)."""
    if status is None or status >= 500 or status in RETRY_STATUSES_4XX:
        return "retry"
    if 200 <= status < 300:
        return "sent"
    return "rejected"


class SensorOutbox:
    """One sensor's sends, strictly in order, the head retried until decided."""

    def __init__(self, sensor_id: str, cursor: int, *, samples_per_send: int, label: str,
                 backoff: Backoff) -> None:
        self.sensor_id = sensor_id
        self.cursor = cursor          # durable: everything up to here is decided
        self.read_after = cursor      # the next page starts after this row id
        self.samples_per_send = samples_per_send
        self.label = label
        self.backoff = backoff
        self.pending: deque[Send] = deque()
        self._released_at: float | None = None  # the head's completed_at when released
        self.mid_event = False  # part of an event is decided, the rest is not yet

    @property
    def needs_events(self) -> bool:
        return not self.pending

    def load(self, events: Sequence[EventView]) -> list[tuple[int, str]]:
        """Queue a page of events read after ``read_after``; returns the unreadable ones."""
        sends, unreadable = plan_sends(events, self.sensor_id,
                                       samples_per_send=self.samples_per_send,
                                       label=self.label)
        self.pending.extend(sends)
        self._released_at = None
        if events:
            self.read_after = max(self.read_after, events[-1].row_id)
        return unreadable

    def head(self) -> Send | None:
        return self.pending[0] if self.pending else None

    def oldest_completed_at(self) -> float | None:
        return self.pending[0].completed_at if self.pending else self._released_at

    def release(self) -> None:
        """Drop what is loaded (memory) and read again from the durable decisions on the
        next turn: the in-memory ``cursor``, so parts of an event already sent are sent
        again (at least once)."""
        if self.pending:
            self._released_at = self.pending[0].completed_at
        self.pending.clear()
        self.read_after = self.cursor
        self.mid_event = False

    def on_answer(self, status: int | None) -> Decision:
        """The head's answer (an empty head needs none: pass ``200``)."""
        send = self.pending[0]
        kind = verdict(status) if send.samples else "sent"
        if kind == "retry":
            return Decision(retry_after=self.backoff.next())
        self.backoff.reset()
        if kind == "rejected" and send.samples > 1:
            first, second = halves(send)
            self.pending.popleft()
            self.pending.extendleft((second, first))
            self.mid_event = True
            return Decision(rejected=True)
        self.pending.popleft()
        self.mid_event = send.cursor is None
        if send.cursor is not None:
            self.cursor = max(self.cursor, send.cursor)
        if kind == "rejected":
            return Decision(cursor=send.cursor, failed=send.samples, rejected=True)
        return Decision(cursor=send.cursor, sent=send.samples)
