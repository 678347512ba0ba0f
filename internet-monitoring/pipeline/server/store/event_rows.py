"""A stored event's row, the same on both engines: the columns read, how ``events.data``
holds the bytes, and turning a row into a verified ``StoredEvent``; likewise a
``rejected_events`` row into a ``RejectedEvent``."""

from __future__ import annotations

import json
from typing import Any, Sequence

from pipeline.common import chunking
from pipeline.common.errors import PipelineError, StoreError
from pipeline.server.store.records import RejectedEvent, StoredEvent

EVENT_COLUMNS = ("row_id, sensor_id, epoch, event_id, event_sha256, data, logical_timestamp_ms, "
                 "created_at, completed_at, first_sequence, last_sequence, attributes, "
                 "encoding")

# How ``events.data`` holds an event: ``gzip`` = its verified slices back to back, as they
# arrived (a quarter of the bytes to write for JSON results, nothing to recompress);
# ``identity`` = the bytes themselves (events stored before schema version 2).
ENCODING_GZIP = "gzip"
ENCODING_IDENTITY = "identity"


def row_to_event(row: Sequence[Any]) -> StoredEvent:
    """An ``EVENT_COLUMNS`` row as an event (numbers made plain Python ints and floats,
    which PostgreSQL's drivers may hand back otherwise)."""
    return StoredEvent(row_id=int(row[0]), sensor_id=row[1], epoch=row[2], event_id=row[3],
                       event_sha256=bytes(row[4]), data=stored_data(row),
                       logical_timestamp_ms=int(row[6]), created_at=row[7],
                       completed_at=float(row[8]), first_sequence=int(row[9]),
                       last_sequence=int(row[10]), attributes=json.loads(row[11]))


def stored_data(row: Sequence[Any]) -> bytes:
    """The event's bytes, checked against its hash when they had to be decompressed (a
    damaged row is reported, never served as data)."""
    blob = bytes(row[5])
    if row[12] == ENCODING_IDENTITY:
        return blob
    if row[12] != ENCODING_GZIP:
        raise StoreError(f"event {row[3]} has an unknown stored encoding {row[12]!r}")
    try:
        data = chunking.decompress_members(blob)
        chunking.verify_event(data, bytes(row[4]))
    except PipelineError as exc:
        raise StoreError(f"stored event {row[3]} of {row[1]} is damaged: {exc.message}"
                         ) from exc
    return data


def rejected_sql(sensor_id: str | None, mark: str) -> tuple[str, tuple[Any, ...]]:
    """The rejected events (of one sensor, or all), oldest first: the statement with
    ``mark`` as the driver's placeholder, and its parameters."""
    sql = ("SELECT sensor_id, epoch, event_id, event_sha256, chunk_count, reason, code,"
           " rejected_at FROM rejected_events")
    params: tuple[Any, ...] = ()
    if sensor_id is not None:
        sql += f" WHERE sensor_id = {mark}"
        params = (sensor_id,)
    return sql + " ORDER BY rejected_at, sensor_id, event_id", params


def row_to_rejected(r: Sequence[Any]) -> RejectedEvent:
    return RejectedEvent(sensor_id=r[0], epoch=r[1], event_id=r[2],
                         event_sha256=bytes(r[3]), chunk_count=int(r[4]), reason=r[5],
                         code=r[6], rejected_at=float(r[7]))
