"""Checks of what callers hand the queue: attributes, timestamps, limits, settings."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Mapping

from pipeline.common.chunking import MAX_SLICE, MIN_SLICE, SplitEvent, split_event
from pipeline.common.errors import ConfigError, EventTooLarge, FieldTypeError, FieldValueError
from pipeline.common.messages import MAX_ATTRIBUTE_VALUE, MAX_ATTRIBUTES, MAX_SEQUENCE, MAX_STRING
from pipeline.common.tracing import TRACEPARENT, is_valid_traceparent

SYNCHRONOUS_MODES = ("FULL", "NORMAL")
RESERVED_ATTRIBUTES = ("window_id", "traceparent")  # set by the agent when sending
MAX_CREATED_AT = 64

# split, attributes JSON, created_at, logical ms, compressed bytes, id chosen by the caller
PreparedEvent = tuple[SplitEvent, str, str, int, int, bool]


def iso_utc(timestamp: float) -> str:
    """``timestamp`` as ISO 8601 UTC with milliseconds and ``Z``.

    The text is exactly ``datetime.fromtimestamp(timestamp, utc).isoformat(
    timespec="milliseconds")`` with ``Z``; the microseconds are rounded as that call rounds
    them (half to even on the fraction), and the per-second prefix is cached, because
    building a datetime for every event is a measurable share of an enqueue."""
    global _iso_second
    fraction, whole = math.modf(timestamp)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:
        micros += 1_000_000
        whole -= 1.0
    second = int(whole)
    cached = _iso_second
    if cached[0] != second:
        prefix = datetime.fromtimestamp(second, tz=timezone.utc).isoformat(timespec="seconds")
        cached = (second, prefix[:-len("+00:00")])
        _iso_second = cached
    return f"{cached[1]}.{micros // 1000:03d}Z"


_iso_second: tuple[int | None, str] = (None, "")  # (whole second, its ISO text); see iso_utc


def encode_attributes(attributes: Mapping[str, str] | None, *,
                       traceparent: str | None = None) -> str:
    """Validate against the server's limits: a chunk it would refuse would never leave.

    The reserved attributes are refused here and count against the wire limit: the agent
    adds ``window_id`` when sending; ``traceparent`` comes only through its own argument."""
    if traceparent is not None and not is_valid_traceparent(traceparent):
        raise FieldValueError("traceparent must be a W3C version-00 traceparent",
                              field="traceparent")
    if attributes is None:
        if traceparent is None:
            return "{}"  # the common case, without a JSON encoder round trip
        attributes = {}
    if not isinstance(attributes, Mapping):
        raise FieldTypeError("attributes must be a mapping of strings", field="attributes")
    for name in RESERVED_ATTRIBUTES:
        if name in attributes:
            raise FieldValueError(f"attribute {name} is reserved", field=f"attributes.{name}")
    limit = MAX_ATTRIBUTES - len(RESERVED_ATTRIBUTES)
    if len(attributes) > limit:
        raise FieldValueError(f"at most {limit} attributes", field="attributes")
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FieldTypeError("attributes must map strings to strings", field="attributes")
        if len(key) > MAX_STRING or len(value) > MAX_ATTRIBUTE_VALUE:
            raise FieldValueError("attribute key or value too long",
                                  field=f"attributes.{key[:64]}")
        try:
            key.encode("utf-8")
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise FieldValueError("attributes must be valid unicode",
                                  field=f"attributes.{key[:64]}") from exc
    doc = dict(attributes)
    if traceparent is not None:
        doc[TRACEPARENT] = traceparent
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def check_created_at(value: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_CREATED_AT:
        raise FieldValueError(f"created_at must be a string of 1-{MAX_CREATED_AT} characters",
                              field="created_at")
    return value


def check_logical_ms(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQUENCE:
        raise FieldValueError("logical_timestamp_ms must be a non-negative integer",
                              field="logical_timestamp_ms")
    return value


def check_sequence(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldTypeError("sequence must be an integer", field="sequence")
    return value


def check_synchronous(value: str) -> str:
    mode = value.upper() if isinstance(value, str) else ""
    if mode not in SYNCHRONOUS_MODES:
        raise ConfigError(f"queue.synchronous must be one of {SYNCHRONOUS_MODES}, got {value!r}",
                          field="queue.synchronous")
    return mode


def check_retention(hours: float) -> float:
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not hours > 0 \
            or hours == float("inf"):
        raise ConfigError(f"queue.retention_hours must be a positive number, got {hours!r}",
                          field="queue.retention_hours")
    return float(hours) * 3600.0


def check_max_bytes(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"queue.max_bytes must be a positive integer, got {value!r}",
                          field="queue.max_bytes")
    return value


def check_max_pages(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"queue.max_pages must be a positive integer, got {value!r}",
                          field="queue.max_pages")
    return value


def check_reserve(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"queue.reserve_bytes must be a non-negative integer, got {value!r}",
                          field="queue.reserve_bytes")
    return value


def check_slice_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_SLICE <= value <= MAX_SLICE:
        raise ConfigError(f"queue.slice_size must be between {MIN_SLICE} and {MAX_SLICE}, "
                          f"got {value!r}", field="queue.slice_size")
    return value


def prepare_event(data: bytes, event_id: str | None, created_at: str | None,
                  logical_timestamp_ms: int | None, attributes: Mapping[str, str] | None,
                  traceparent: str | None, now: float, slice_size: int,
                  max_bytes: int | None, compresslevel: int = 6) -> PreparedEvent:
    """Validate and compress one event outside the lock (the slow, pure part)."""
    attrs_json = encode_attributes(attributes, traceparent=traceparent)
    split = split_event(data, slice_size=slice_size, event_id=event_id,
                        compresslevel=compresslevel)
    nbytes = sum(len(piece.payload) for piece in split.pieces)
    if max_bytes is not None and nbytes > max_bytes:
        raise EventTooLarge(f"event of {nbytes} compressed bytes exceeds the queue cap "
                            f"of {max_bytes} bytes", field="data")
    created = (check_created_at(created_at) if created_at is not None
               else iso_utc(now))
    logical_ms = (check_logical_ms(logical_timestamp_ms)
                  if logical_timestamp_ms is not None else int(now * 1000))
    return split, attrs_json, created, logical_ms, nbytes, event_id is not None
