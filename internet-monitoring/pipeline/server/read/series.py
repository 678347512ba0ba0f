"""Time series of one result field for charts (pure): values bucketed by a step.

``GET /v1/sensors/{id}/series`` reads a sensor's results in a time range and hands them
here. A field is a name or a dotted path into the result's JSON (``download_mbps``,
``dns.lookup_ms``); results without a number there are skipped, so one chart can show the
speed test's download rate while DNS and ping results arrive in between.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

MAX_POINTS = 1000


def field_value(doc: Any, path: str) -> float | None:
    """The number at ``path`` in ``doc``, or None (booleans are not numbers)."""
    node = doc
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node) if math.isfinite(node) else None


@dataclass(frozen=True)
class Point:
    t_ms: int      # start of the step
    count: int
    mean: float
    minimum: float
    maximum: float
    last: float

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t_ms, "count": self.count, "avg": round(self.mean, 4),
                "min": self.minimum, "max": self.maximum, "last": self.last}


def bucket(values: Iterable[tuple[int, float]], since_ms: int, step_ms: int) -> list[Point]:
    """``(time_ms, value)`` pairs, in time order, as one point per step that holds any."""
    groups: dict[int, list[float]] = {}
    for t_ms, value in values:
        start = since_ms + (t_ms - since_ms) // step_ms * step_ms
        groups.setdefault(start, []).append(value)
    return [Point(start, len(vals), statistics.fmean(vals), min(vals), max(vals), vals[-1])
            for start, vals in sorted(groups.items())]
