"""What replicas tell each other over the bus, and its wire form.

A NOTIFY payload must be shorter than 8000 bytes (PostgreSQL's default build), so
``encode`` splits a message into as many payloads as it needs, each a complete message
of its own (acks of one window may arrive in two notifications; an ack is idempotent for
the sensor, so order and grouping do not matter)::

    {"t": "ack", "o": origin, "s": sensor, "m": {epoch: mark}, "i": [[seq, window, bytes, epoch]]}
    {"t": "ev",  "o": origin, "e": [[sensor, event_id]]}
    {"t": "rel", "o": origin, "s": sensor}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pipeline.common.errors import PipelineError
from pipeline.server.control.session import Committed

# PostgreSQL refuses payloads of 8000 bytes or more; keep clear of it.
MAX_PAYLOAD_BYTES = 7900


class BusMessageError(PipelineError):
    """A bus payload that is not one of our messages (logged and dropped)."""

    code = "bad_bus_message"


class PayloadTooLarge(PipelineError):
    """A single item does not fit one NOTIFY payload."""

    code = "bus_payload_too_large"


@dataclass(frozen=True)
class RoutedAcks:
    """Chunks of ``sensor_id`` committed on ``origin``: the session owner acks them."""

    origin: str
    sensor_id: str
    items: tuple[Committed, ...]
    marks: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EventsCommitted:
    """Events completed on ``origin``: others load them for their snapshots and stream."""

    origin: str
    events: tuple[tuple[str, str], ...]  # (sensor_id, event_id)


@dataclass(frozen=True)
class ReleaseRequest:
    """``origin`` holds a new control socket of ``sensor_id``: its owner lets go."""

    origin: str
    sensor_id: str


BusMessage = RoutedAcks | EventsCommitted | ReleaseRequest


def _dump(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _size(text: str) -> int:
    return len(text.encode("utf-8"))


def _split(head: dict[str, Any], key: str, items: Sequence[Any],
           limit: int) -> list[str]:
    """``head`` with ``items`` under ``key``, as few payloads under ``limit`` as fit."""
    out: list[str] = []
    batch: list[Any] = []
    # Bytes of the head with an empty list, and of each item with its comma.
    base = _size(_dump({**head, key: []}))
    used = base
    for item in items:
        cost = _size(_dump(item)) + (1 if batch else 0)
        if base + cost > limit:
            raise PayloadTooLarge(f"one {key!r} item needs {base + cost} bytes "
                                  f"(limit {limit})")
        if used + cost > limit:
            out.append(_dump({**head, key: batch}))
            batch, used = [], base
            cost = _size(_dump(item))
        batch.append(item)
        used += cost
    if batch or not out:
        out.append(_dump({**head, key: batch}))
    return out


def encode(msg: BusMessage, limit: int = MAX_PAYLOAD_BYTES) -> list[str]:
    """Payloads for ``msg``, each under ``limit`` bytes and each decodable alone."""
    if isinstance(msg, RoutedAcks):
        head = {"t": "ack", "o": msg.origin, "s": msg.sensor_id, "m": msg.marks}
        rows = [[c.sequence, c.window_id, c.nbytes, c.epoch] for c in msg.items]
        return _split(head, "i", rows, limit)
    if isinstance(msg, EventsCommitted):
        return _split({"t": "ev", "o": msg.origin}, "e", [list(e) for e in msg.events], limit)
    payload = _dump({"t": "rel", "o": msg.origin, "s": msg.sensor_id})
    if _size(payload) > limit:
        raise PayloadTooLarge(f"release payload needs {_size(payload)} bytes")
    return [payload]


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise BusMessageError(f"bus message: {key!r} must be a non-empty string", field=key)
    return value


def _rows(doc: dict[str, Any], key: str, width: int) -> list[list[Any]]:
    rows = doc.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == width
                                             for r in rows):
        raise BusMessageError(f"bus message: {key!r} must be a list of {width}-item lists",
                              field=key)
    return rows


def _acks(doc: dict[str, Any]) -> RoutedAcks:
    marks = doc.get("m")
    if not isinstance(marks, dict) or not all(isinstance(v, int) for v in marks.values()):
        raise BusMessageError("bus message: 'm' must map epochs to integers", field="m")
    items = []
    for seq, window_id, nbytes, epoch in _rows(doc, "i", 4):
        if not (isinstance(seq, int) and isinstance(window_id, str)
                and isinstance(nbytes, int) and isinstance(epoch, str)):
            raise BusMessageError("bus message: bad ack item", field="i")
        items.append(Committed(seq, window_id, nbytes, epoch=epoch))
    return RoutedAcks(origin=_str(doc, "o"), sensor_id=_str(doc, "s"), items=tuple(items),
                      marks=dict(marks))


def _events(doc: dict[str, Any]) -> EventsCommitted:
    events = []
    for sensor_id, event_id in _rows(doc, "e", 2):
        if not (isinstance(sensor_id, str) and isinstance(event_id, str)):
            raise BusMessageError("bus message: bad event item", field="e")
        events.append((sensor_id, event_id))
    return EventsCommitted(origin=_str(doc, "o"), events=tuple(events))


def _release(doc: dict[str, Any]) -> ReleaseRequest:
    return ReleaseRequest(origin=_str(doc, "o"), sensor_id=_str(doc, "s"))


_DECODERS: dict[str, Callable[[dict[str, Any]], BusMessage]] = {
    "ack": _acks, "ev": _events, "rel": _release}


def decode(payload: str) -> BusMessage:
    """One payload back into its message; BusMessageError when it is not ours."""
    try:
        doc = json.loads(payload)
    except ValueError as exc:
        raise BusMessageError(f"bus message is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise BusMessageError("bus message must be an object")
    decoder = _DECODERS.get(str(doc.get("t")))
    if decoder is None:
        raise BusMessageError(f"unknown bus message type {doc.get('t')!r}", field="t")
    return decoder(doc)
