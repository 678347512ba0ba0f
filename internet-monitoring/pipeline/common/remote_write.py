"""Prometheus remote write 1.0 bodies: decoding, checking and encoding, no I/O.

A remote-write request is a protobuf ``WriteRequest`` compressed with snappy's block
format (not the framed format), sent with ``Content-Encoding: snappy`` and
``Content-Type: application/x-protobuf``. The sensor's receiver decodes and checks every
body before it queues anything (a body it refuses is answered 400 or 413 and never
retried by Prometheus); the server decodes queued events again to read their samples and
encodes requests when it forwards them.

A queued remote-write event holds the *uncompressed* serialised ``WriteRequest`` (the
chunker gzips it anyway) and carries the attribute ``content_type`` =
``EVENT_CONTENT_TYPE``. Serialised ``WriteRequest`` messages concatenate into one valid
``WriteRequest`` holding all their series, so a batch of requests is one event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import cramjam
from google.protobuf.message import DecodeError

from pipeline.common.errors import PayloadTooLarge, ProtocolError
from pipeline.proto.remote_write_pb2 import (
    FlatSeriesView,
    Label,
    SeriesLabelsView,
    WriteRequest,
    WriteRequestLabelsView,
    WriteRequestSeriesBytes,
)

#: The attribute a queued event carries, and its value for remote-write events.
CONTENT_TYPE_ATTRIBUTE = "content_type"
EVENT_CONTENT_TYPE = "application/x-protobuf;proto=prometheus.WriteRequest"

#: What a remote-write 1.0 sender sends (and what the forwarder sends).
HTTP_CONTENT_TYPE = "application/x-protobuf"
HTTP_CONTENT_ENCODING = "snappy"
VERSION_HEADER = "X-Prometheus-Remote-Write-Version"
VERSION = "0.1.0"

NAME_LABEL = "__name__"
_MAX_VARINT_BYTES = 5  # snappy's length preamble is a 32-bit varint
#: Label sets (their serialised labels) already found valid: Prometheus sends the same
#: series in every request, and checking a set costs ~2 us in Python against ~0.15 us to
#: look a whole request's sets up, per series. Bounded (a set's key is its label bytes,
#: ~0.2 KiB for six labels; emptied when full).
LABEL_SET_CACHE_MAX = 8192


class RemoteWriteMalformed(ProtocolError):
    """The body is not a remote-write 1.0 request (answered 400: the sender must not retry)."""

    code = "bad_remote_write"


@dataclass(frozen=True)
class Series:
    """One time series: its labels (sorted by name) and its samples (timestamp ms, value)."""

    labels: tuple[tuple[str, str], ...]
    samples: tuple[tuple[int, float], ...]

    @property
    def name(self) -> str:
        return dict(self.labels).get(NAME_LABEL, "")


@dataclass(frozen=True)
class DecodedWrite:
    """A checked request: its uncompressed protobuf bytes (what gets queued) and counts."""

    raw: bytes
    series: int
    samples: int


def check_headers(content_type: str | None, content_encoding: str | None) -> None:
    """RemoteWriteMalformed unless the headers say protobuf compressed with snappy.

    A ``proto=`` parameter other than ``prometheus.WriteRequest`` (remote write 2.0) is
    refused: this receiver speaks 1.0."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != HTTP_CONTENT_TYPE:
        raise RemoteWriteMalformed(
            f"Content-Type must be {HTTP_CONTENT_TYPE} (got {content_type or 'none'!r})",
            field="Content-Type")
    proto = _parameter(params, "proto")
    if proto is not None and proto != "prometheus.WriteRequest":
        raise RemoteWriteMalformed(f"only remote write 1.0 (prometheus.WriteRequest) is"
                                   f" accepted, not proto={proto}", field="Content-Type")
    if (content_encoding or "").strip().lower() != HTTP_CONTENT_ENCODING:
        raise RemoteWriteMalformed(
            f"Content-Encoding must be snappy (got {content_encoding or 'none'!r})",
            field="Content-Encoding")


def _parameter(params: str, name: str) -> str | None:
    for part in params.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"')
    return None


def uncompressed_length(body: bytes) -> int:
    """The length snappy's block format announces in its varint preamble."""
    length = 0
    for index, byte in enumerate(body[:_MAX_VARINT_BYTES]):
        length |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return length
    raise RemoteWriteMalformed("body is not snappy block-compressed (bad length preamble)")


def decompress(body: bytes, *, max_bytes: int) -> bytes:
    """The uncompressed body; PayloadTooLarge before decompressing anything over ``max_bytes``."""
    if not body:
        raise RemoteWriteMalformed("empty body")
    announced = uncompressed_length(body)
    if announced > max_bytes:
        raise PayloadTooLarge(f"body decompresses to {announced} bytes, over the limit of"
                              f" {max_bytes}")
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except cramjam.DecompressionError as exc:
        raise RemoteWriteMalformed(f"body is not valid snappy: {exc}") from exc
    if len(raw) != announced:
        raise RemoteWriteMalformed("snappy body is truncated")
    return raw


def parse(raw: bytes) -> WriteRequest:
    """The ``WriteRequest`` in ``raw``, checked (see ``check_request``)."""
    request = WriteRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise RemoteWriteMalformed(f"body is not a protobuf WriteRequest: {exc}") from exc
    check_request(request)
    return request


def check_request(request: WriteRequest) -> int:
    """RemoteWriteMalformed naming the first series that breaks remote write 1.0's rules:
    every series has a non-empty ``__name__`` and no label name empty or given twice.

    Names are not held to the classic ``[a-zA-Z_][a-zA-Z0-9_]*``: Prometheus 3 sends UTF-8
    names, and protobuf has already checked they are UTF-8. Returns the number of samples
    (counted in the same pass: each access to a series costs a wrapper object)."""
    samples = 0
    for series in request.timeseries:  # the fast pass: one set per series
        labels = series.labels
        names = {label.name: label.value for label in labels}
        if len(names) != len(labels) or "" in names or not names.get(NAME_LABEL):
            break
        samples += len(series.samples)
    else:
        return samples
    for index, series in enumerate(request.timeseries):  # say which series and why
        where = f"timeseries[{index}]"
        seen: set[str] = set()
        for label in series.labels:
            if not label.name:
                raise RemoteWriteMalformed(f"{where}: a label has an empty name")
            if label.name in seen:
                raise RemoteWriteMalformed(f"{where}: label {label.name!r} given twice")
            seen.add(label.name)
        if NAME_LABEL not in seen:
            raise RemoteWriteMalformed(f"{where}: no __name__ label")
        if not any(label.name == NAME_LABEL and label.value for label in series.labels):
            raise RemoteWriteMalformed(f"{where}: the __name__ label is empty")
    raise AssertionError("the fast pass found a problem the detailed pass did not")


class LabelSetCache:
    """Label sets known to pass ``check_request``'s rules, keyed by their exact bytes.

    A series' key is its labels re-serialised without its samples (``SeriesLabelsView``
    with the unknown fields dropped): each label's exact bytes behind its tag and length,
    so two keys are equal only when the label lists are byte for byte the same. The keys
    of a whole request are made and looked up by protobuf's C code in a few calls; only a
    series never seen before costs Python work per label."""

    def __init__(self, capacity: int = LABEL_SET_CACHE_MAX) -> None:
        self._capacity = capacity
        self._known: set[bytes] = set()

    def count_if_valid(self, raw: bytes) -> int | None:
        """The number of samples in ``raw`` (already parsed as a ``WriteRequest``) when
        every series' labels pass the rules; None when one may not (the caller then runs
        ``check_request`` for the verdict and the reason)."""
        view = WriteRequestLabelsView.FromString(raw)
        view.DiscardUnknownFields()
        keys = WriteRequestSeriesBytes.FromString(view.SerializeToString()).timeseries
        known = self._known
        if not known.issuperset(keys):
            for key in keys:
                if key in known:
                    continue
                if not _labels_ok(tuple(SeriesLabelsView.FromString(key).labels)):
                    return None
                if len(known) >= self._capacity:
                    known.clear()
                known.add(key)
        return sample_count(raw)

    def __len__(self) -> int:
        return len(self._known)


def sample_count(raw: bytes) -> int:
    """How many samples the ``WriteRequest`` in ``raw`` holds: its series' bodies end to
    end parse as one ``FlatSeriesView`` whose ``samples`` are all of them."""
    series = WriteRequestSeriesBytes.FromString(raw).timeseries
    return len(FlatSeriesView.FromString(b"".join(series)).samples)


def _labels_ok(encoded: tuple[bytes, ...]) -> bool:
    names: dict[str, str] = {}
    for item in encoded:
        try:
            label = Label.FromString(item)
        except DecodeError:
            return False
        names[label.name] = label.value
    return len(names) == len(encoded) and "" not in names and bool(names.get(NAME_LABEL))


_CACHE = LabelSetCache()


def decode(body: bytes, *, content_type: str | None, content_encoding: str | None,
           max_bytes: int) -> DecodedWrite:
    """Check a request's headers and body all the way through; nothing is kept of a body
    that fails. ``max_bytes`` bounds the uncompressed size (PayloadTooLarge, 413)."""
    check_headers(content_type, content_encoding)
    raw = decompress(body, max_bytes=max_bytes)
    request = WriteRequest()
    try:
        request.ParseFromString(raw)
    except DecodeError as exc:
        raise RemoteWriteMalformed(f"body is not a protobuf WriteRequest: {exc}") from exc
    samples = _CACHE.count_if_valid(raw)
    if samples is None:
        samples = check_request(request)  # raises naming the series and the reason
    return DecodedWrite(raw=raw, series=len(request.timeseries), samples=samples)


def series_of(request: WriteRequest) -> list[Series]:
    """The request's series as plain data, labels sorted by name."""
    return [Series(labels=tuple(sorted((label.name, label.value) for label in ts.labels)),
                   samples=tuple((s.timestamp, s.value) for s in ts.samples))
            for ts in request.timeseries]


def build(series: Iterable[Series]) -> WriteRequest:
    """A ``WriteRequest`` of ``series`` (labels written sorted, as the spec asks)."""
    request = WriteRequest()
    for one in series:
        ts = request.timeseries.add()
        for name, value in sorted(one.labels):
            ts.labels.add(name=name, value=value)
        for timestamp, sample in one.samples:
            ts.samples.add(timestamp=timestamp, value=sample)
    return request


def encode(request: WriteRequest) -> bytes:
    """The HTTP body for ``request``: serialised and snappy block-compressed."""
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


def same_value(a: float, b: float) -> bool:
    """Sample values compare equal when both are NaN (Prometheus's stale markers are NaN)."""
    return (math.isnan(a) and math.isnan(b)) or a == b
