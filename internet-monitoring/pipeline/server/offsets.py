"""Gap-aware offset tracking per (sensor_id, queue epoch) (pure, no I/O).

Why not just remember the highest sequence seen: when chunk ``k`` is lost and ``k+1``
arrives, the highest sequence says "everything up to k+1 is here" and ``k`` is never asked
for again (architecture invariant 3). This tracker keeps a *watermark* ``w`` (every sequence
``1..w`` is committed; a sensor's sequences start at 1) plus the committed sequences above
it, stored as sorted, disjoint, non-adjacent inclusive ranges. Memory is therefore bounded by
the number of gaps (out-of-order islands), not by history or by how many sequences sit above
a gap.

``snapshot()``/``restore()`` turn a tracker into plain JSON-able data for persistence.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from pipeline.common.errors import FieldTypeError, FieldValueError

OffsetKey = tuple[str, str]  # (sensor_id, epoch); epoch is "" for 1.0 sensors


def _check_sequence(seq: int) -> int:
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise FieldTypeError("sequence must be an integer", field="sequence")
    if seq < 1:
        raise FieldValueError("sequence must be at least 1", field="sequence")
    return seq


class OffsetTracker:
    """Which sequences of one (sensor, epoch) queue are committed.

    Invariants: ``_starts``/``_ends`` describe sorted inclusive ranges, every range starts
    above ``watermark + 1`` (a range touching the watermark is merged into it), and two
    ranges are never adjacent (``ends[i] + 1 < starts[i + 1]``).
    """

    __slots__ = ("_watermark", "_starts", "_ends")

    def __init__(self, watermark: int = 0) -> None:
        if isinstance(watermark, bool) or not isinstance(watermark, int) or watermark < 0:
            raise FieldValueError("watermark must be a non-negative integer", field="watermark")
        self._watermark = watermark
        self._starts: list[int] = []
        self._ends: list[int] = []

    # -- queries ---------------------------------------------------------------------

    @property
    def watermark(self) -> int:
        """Highest w such that every sequence 1..w is committed (0 if none)."""
        return self._watermark

    @property
    def highest(self) -> int:
        """Highest committed sequence (0 if none)."""
        return self._ends[-1] if self._ends else self._watermark

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Committed inclusive ranges above the watermark, ascending."""
        return tuple(zip(self._starts, self._ends))

    @property
    def gap_count(self) -> int:
        """Number of separate gaps below ``highest``."""
        return len(self._starts)

    def contains(self, seq: int) -> bool:
        """True when ``seq`` is committed (always true for 1 <= seq <= watermark)."""
        if seq < 1:
            return False
        if seq <= self._watermark:
            return True
        i = bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    __contains__ = contains

    def missing(self, limit: int = 1000) -> list[int]:
        """Absent sequences below ``highest``, ascending, at most ``limit`` of them."""
        out: list[int] = []
        if limit <= 0:
            return out
        low = self._watermark + 1
        for start, end in zip(self._starts, self._ends):
            stop = min(start, low + (limit - len(out)))
            out.extend(range(low, stop))
            if len(out) >= limit:
                break
            low = end + 1
        return out

    def missing_count(self) -> int:
        """How many sequences below ``highest`` are absent (counted, not listed)."""
        total = 0
        low = self._watermark + 1
        for start, end in zip(self._starts, self._ends):
            total += start - low
            low = end + 1
        return total

    # -- updates ---------------------------------------------------------------------

    def add(self, seq: int) -> bool:
        """Mark ``seq`` committed; True if it was not committed before."""
        _check_sequence(seq)
        if self.contains(seq):
            return False
        starts, ends = self._starts, self._ends
        i = bisect_right(starts, seq)  # ranges[i-1] is the one starting at or below seq
        joins_left = i > 0 and ends[i - 1] + 1 == seq
        joins_right = i < len(starts) and starts[i] - 1 == seq
        if joins_left and joins_right:
            ends[i - 1] = ends[i]
            del starts[i], ends[i]
        elif joins_left:
            ends[i - 1] = seq
        elif joins_right:
            starts[i] = seq
        else:
            starts.insert(i, seq)
            ends.insert(i, seq)
        self._absorb()
        return True

    def _absorb(self) -> None:
        """Fold the first range into the watermark when it touches it."""
        if self._starts and self._starts[0] == self._watermark + 1:
            self._watermark = self._ends[0]
            del self._starts[0], self._ends[0]

    # -- persistence -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-able state: ``{"watermark": w, "ranges": [[start, end], ...]}``."""
        return {"watermark": self._watermark,
                "ranges": [[s, e] for s, e in zip(self._starts, self._ends)]}

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> OffsetTracker:
        """Rebuild a tracker from ``snapshot()`` output, validating it."""
        watermark = snapshot.get("watermark", 0)
        ranges = snapshot.get("ranges", [])
        tracker = cls(watermark)
        if not isinstance(ranges, list):
            raise FieldTypeError("ranges must be a list", field="ranges")
        for item in ranges:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
                    or item[0] < 1 or item[0] > item[1]):
                raise FieldValueError("ranges must hold [start, end] pairs", field="ranges")
            tracker.add_range(item[0], item[1])
        return tracker

    def add_range(self, start: int, end: int) -> None:
        """Mark every sequence in ``start..end`` (inclusive) committed."""
        _check_sequence(start)
        _check_sequence(end)
        if start > end:
            raise FieldValueError("range start must not exceed its end", field="ranges")
        start = max(start, self._watermark + 1)
        if start > end:
            return
        starts, ends = self._starts, self._ends
        # Ranges overlapping or adjacent to [start, end] are merged into it.
        lo = bisect_right(ends, start - 2)
        hi = bisect_right(starts, end + 1)
        if lo < hi:
            start = min(start, starts[lo])
            end = max(end, ends[hi - 1])
        starts[lo:hi] = [start]
        ends[lo:hi] = [end]
        self._absorb()

    def copy(self) -> OffsetTracker:
        clone = OffsetTracker(self._watermark)
        clone._starts = list(self._starts)
        clone._ends = list(self._ends)
        return clone

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OffsetTracker):
            return NotImplemented
        return (self._watermark == other._watermark and self._starts == other._starts
                and self._ends == other._ends)

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"OffsetTracker(watermark={self._watermark}, ranges={list(self.ranges)})"


@dataclass
class OffsetBook:
    """Trackers for every (sensor_id, epoch) key."""

    trackers: dict[OffsetKey, OffsetTracker] = field(default_factory=dict)

    def get(self, sensor_id: str, epoch: str) -> OffsetTracker:
        """The tracker for a key, created empty on first use."""
        key = (sensor_id, epoch)
        tracker = self.trackers.get(key)
        if tracker is None:
            tracker = self.trackers[key] = OffsetTracker()
        return tracker

    def peek(self, sensor_id: str, epoch: str) -> OffsetTracker | None:
        return self.trackers.get((sensor_id, epoch))

    def put(self, sensor_id: str, epoch: str, tracker: OffsetTracker) -> None:
        self.trackers[(sensor_id, epoch)] = tracker

    def epochs(self, sensor_id: str) -> list[str]:
        return sorted(epoch for (sid, epoch) in self.trackers if sid == sensor_id)

    def keys(self) -> Iterator[OffsetKey]:
        return iter(list(self.trackers))

    def __len__(self) -> int:
        return len(self.trackers)
