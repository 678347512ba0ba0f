"""Where a commit's acks and completed events go, sans-I/O.

A chunk may be committed on any replica (the load balancer picks one per POST), but only
the replica that owns the sensor's session holds its control socket and its windows
(``ownership.py``). So, on the committing replica::

    sensor's session owned here          ApplyAcks (the session acks on its socket)
    owned elsewhere, or by nobody        Publish(RoutedAcks) on the bus
    events completed                     Publish(EventsCommitted) (local snapshots are
                                         updated by the server itself, as with one replica)

and on every replica receiving a bus message::

    our own message (NOTIFY echoes it)   nothing
    RoutedAcks, session owned here       ApplyAcks
    RoutedAcks, session being claimed    Defer (applied once the session is loaded)
    RoutedAcks, not owned here           nothing (counted): if no replica owns the session
                                         the sensor is offline; its next connection's first
                                         window asks from sequence 0, the sensor re-sends,
                                         the store answers duplicate and the new owner acks
    EventsCommitted                      LoadEvents (read them, update snapshots/stream)
    ReleaseRequest                       handed to the ownership table
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pipeline.server.cluster.messages import (
    BusMessage,
    EventsCommitted,
    ReleaseRequest,
    RoutedAcks,
)
from pipeline.server.cluster.ownership import ClaimState
from pipeline.server.control.session import Committed


@dataclass(frozen=True)
class ApplyAcks:
    sensor_id: str
    items: tuple[Committed, ...]
    marks: Mapping[str, int]


@dataclass(frozen=True)
class Defer:
    """Acks for a session this replica is loading: hold them until it is ready."""

    acks: ApplyAcks


@dataclass(frozen=True)
class Publish:
    message: BusMessage


@dataclass(frozen=True)
class LoadEvents:
    events: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class HandRelease:
    request: ReleaseRequest


RouteAction = ApplyAcks | Defer | Publish | LoadEvents | HandRelease


class AckRouter:
    """Routing decisions of one replica; ``state_of`` is the ownership table's view."""

    def __init__(self, replica: str, state_of: Callable[[str], ClaimState]) -> None:
        self.replica = replica
        self.state_of = state_of
        self.routed_out = 0     # ack items published for another replica
        self.routed_in = 0      # ack items received and applied here
        self.not_owned = 0      # ack items received for a session nobody here owns

    def on_commit(self, sensor_id: str, items: Sequence[Committed],
                  marks: Mapping[str, int]) -> list[RouteAction]:
        if not items:
            return []
        state = self.state_of(sensor_id)
        acks = ApplyAcks(sensor_id, tuple(items), dict(marks))
        if state is ClaimState.OWNED:
            return [acks]
        if state is ClaimState.LOADING:
            return [Defer(acks)]
        self.routed_out += len(items)
        return [Publish(RoutedAcks(origin=self.replica, sensor_id=sensor_id,
                                   items=tuple(items), marks=dict(marks)))]

    def on_events(self, events: Sequence[tuple[str, str]]) -> list[RouteAction]:
        if not events:
            return []
        return [Publish(EventsCommitted(origin=self.replica, events=tuple(events)))]

    def on_message(self, msg: BusMessage) -> list[RouteAction]:
        if msg.origin == self.replica:
            return []
        if isinstance(msg, RoutedAcks):
            state = self.state_of(msg.sensor_id)
            acks = ApplyAcks(msg.sensor_id, msg.items, msg.marks)
            if state is ClaimState.OWNED:
                self.routed_in += len(msg.items)
                return [acks]
            if state is ClaimState.LOADING:
                self.routed_in += len(msg.items)
                return [Defer(acks)]
            self.not_owned += len(msg.items)
            return []
        if isinstance(msg, EventsCommitted):
            return [LoadEvents(msg.events)]
        return [HandRelease(msg)]
