"""The remote-write codec (common/remote_write.py): round trips and the refusals the
receiver answers 400 or 413 with. The receiver's own tests drive it over HTTP."""

from __future__ import annotations

import math

import pytest

from pipeline.common import remote_write as rw
from pipeline.common.errors import PayloadTooLarge

MB = 1 << 20


def _body(*series: rw.Series) -> bytes:
    return rw.encode(rw.build(series))


def _decode(body: bytes, **headers: str) -> rw.DecodedWrite:
    return rw.decode(body, content_type=headers.get("content_type", rw.HTTP_CONTENT_TYPE),
                     content_encoding=headers.get("content_encoding", "snappy"), max_bytes=MB)


UP = rw.Series((("__name__", "up"), ("instance", "pi-01:9100"), ("job", "node")),
               ((1_795_755_600_000, 1.0), (1_795_755_615_000, 0.0)))


def test_round_trip_keeps_labels_timestamps_and_values_exactly() -> None:
    stale = math.nan  # a stale marker is a NaN
    wifi = rw.Series((("__name__", "wifi_signal_dbm"), ("job", "wifi")),
                     ((1_795_755_600_123, -61.5), (1_795_755_600_124, stale)))
    decoded = _decode(_body(UP, wifi))
    assert (decoded.series, decoded.samples) == (2, 4)
    back = rw.series_of(rw.parse(decoded.raw))
    assert back[0] == UP
    assert back[1].labels == wifi.labels and back[1].samples[0] == wifi.samples[0]
    assert math.isnan(back[1].samples[1][1])


def test_concatenated_requests_are_one_request_with_all_series() -> None:
    raw = _decode(_body(UP)).raw + _decode(_body(UP)).raw
    assert rw.series_of(rw.parse(raw)) == [UP, UP]


@pytest.mark.parametrize(("headers", "field"), [
    ({"content_type": "application/json"}, "Content-Type"),
    ({"content_type": "application/x-protobuf;proto=io.prometheus.write.v2.Request"},
     "Content-Type"),
    ({"content_encoding": "gzip"}, "Content-Encoding"),
    ({"content_encoding": ""}, "Content-Encoding"),
])
def test_wrong_headers_are_refused_naming_the_header(headers: dict[str, str],
                                                     field: str) -> None:
    with pytest.raises(rw.RemoteWriteMalformed) as caught:
        _decode(_body(UP), **headers)
    assert caught.value.http_status == 400 and caught.value.field == field


@pytest.mark.parametrize("body", [b"", b"\xff\xff\xff\xff\xff\xff", _body(UP)[:-4],
                                  b"\x07" + b"garbage"])
def test_broken_bodies_are_malformed(body: bytes) -> None:
    with pytest.raises(rw.RemoteWriteMalformed) as caught:
        _decode(body)
    assert caught.value.http_status == 400


def test_a_series_without_a_name_is_refused() -> None:
    with pytest.raises(rw.RemoteWriteMalformed, match="no __name__"):
        _decode(_body(rw.Series((("job", "node"),), ((1, 1.0),))))


def test_oversized_is_refused_before_decompressing() -> None:
    big = rw.Series((("__name__", "x"), ("pad", "p" * 5000)), ((1, 1.0),))
    with pytest.raises(PayloadTooLarge) as caught:
        rw.decode(_body(big), content_type=rw.HTTP_CONTENT_TYPE, content_encoding="snappy",
                  max_bytes=1000)
    assert caught.value.http_status == 413


def _raw_series(*labels: bytes, samples: int = 1) -> bytes:
    """A serialised WriteRequest of one series with the given serialised Label entries."""
    from pipeline.proto.remote_write_pb2 import FlatSeriesView, Sample

    ts = FlatSeriesView(labels=list(labels),
                        samples=[Sample(value=1.0, timestamp=i).SerializeToString()
                                 for i in range(samples)])
    body = ts.SerializeToString()
    return b"\x0a" + bytes([len(body)]) + body  # field 1, length-delimited (< 128 bytes)


def test_label_set_cache_keys_tell_apart_label_lists_with_the_same_bytes_end_to_end() -> None:
    """[name=a, value=b] as one label is valid once named; split over two labels (one
    without a value, one without a name) the same bytes end to end are not: the cache
    key keeps each label's boundaries, so a cached verdict never covers the other."""
    from pipeline.proto.remote_write_pb2 import Label

    name = Label(name="__name__", value="up").SerializeToString()
    whole = Label(name="a", value="b").SerializeToString()
    first, second = Label(name="a").SerializeToString(), Label(value="b").SerializeToString()
    assert first + second == whole
    cache = rw.LabelSetCache()
    assert cache.count_if_valid(_raw_series(name, whole, samples=3)) == 3
    assert cache.count_if_valid(_raw_series(name, first, second)) is None  # empty name
    assert len(cache) == 1
    assert cache.count_if_valid(_raw_series(name, whole, samples=2)) == 2  # a hit
