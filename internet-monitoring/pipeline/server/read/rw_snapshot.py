"""The latest sample of every remote-write series a sensor sent, for its snapshot.

``SeriesBook`` is fed the bytes of each committed remote-write event (the post-commit
hook) and keeps, per sensor, the newest sample of each series by timestamp (a backfilled
older sample never replaces a newer one). A sensor's series are bounded
(``MAX_SERIES_PER_SENSOR``): series beyond it are counted and left out.

The snapshot carries them as ``series``: ``[{"name", "labels", "value", "timestamp_ms"}]``
sorted by name and labels (``labels`` without ``__name__``); a NaN value (Prometheus's
stale marker) is ``null``. ``field_name`` is how ``pipeline_snapshot_value`` names one
series: the bare metric name, or with labels ``name{a="1",b="2"}`` in Prometheus's text
form, so several series of one name stay apart.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pipeline.common import remote_write

log = logging.getLogger(__name__)

MAX_SERIES_PER_SENSOR = 2000
Labels = tuple[tuple[str, str], ...]


def field_name(name: str, labels: Labels) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{inner}}}" if inner else name


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class SeriesBook:
    def __init__(self, max_series: int = MAX_SERIES_PER_SENSOR) -> None:
        self.max_series = max_series
        self._latest: dict[str, dict[tuple[str, Labels], tuple[int, float]]] = {}
        self.overflow = 0

    def update(self, sensor_id: str, data: bytes) -> dict[tuple[str, Labels], float]:
        """Take in one event's samples; returns the series whose latest sample changed
        (``(name, labels) -> value``). Unreadable bytes change nothing (logged)."""
        try:
            request = remote_write.parse(data)
        except remote_write.RemoteWriteMalformed as exc:
            log.warning("snapshot_series_unreadable sensor_id=%s reason=%s", sensor_id,
                        exc.message)
            return {}
        book = self._latest.setdefault(sensor_id, {})
        changed: dict[tuple[str, Labels], float] = {}
        for series in remote_write.series_of(request):
            if not series.samples:
                continue
            key = (series.name, tuple(kv for kv in series.labels
                                      if kv[0] != remote_write.NAME_LABEL))
            newest = max(series.samples, key=lambda s: s[0])
            held = book.get(key)
            if held is None and len(book) >= self.max_series:
                self.overflow += 1
                continue
            if held is None or newest[0] >= held[0]:
                book[key] = newest
                changed[key] = newest[1]
        return changed

    def series(self, sensor_id: str) -> tuple[dict[str, Any], ...]:
        book = self._latest.get(sensor_id, {})
        return tuple({"name": name, "labels": dict(labels),
                      "value": None if math.isnan(value) else value, "timestamp_ms": ts}
                     for (name, labels), (ts, value) in sorted(book.items()))
