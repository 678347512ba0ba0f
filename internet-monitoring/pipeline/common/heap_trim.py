"""Hand freed heap memory back to the operating system once a burst of work is over.

Payloads of a drain or a burst of remote writes are freed by Python, but glibc keeps the
pages in its heaps, so a process's resident memory after a burst stays near its peak.
``malloc_trim(0)`` returns them. ``HeapTrimmer`` decides when (sans-I/O): after activity
(a counter that grows with work done) has stopped growing for one tick and nothing is in
flight, at most once per ``min_interval_s``. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Callable

log = logging.getLogger(__name__)


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Trims once per quiet spell that follows work (see the module doc)."""

    def __init__(self, *, min_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 trim: Callable[[int], int] | None = None, load: bool = True) -> None:
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._trim = trim if trim is not None or not load else _load_trim()
        self._last_activity = 0
        self._trimmed_activity = 0
        self._last_trim = float("-inf")
        self.trims = 0

    def should_trim(self, activity: int, in_flight: int) -> bool:
        """True when work happened since the last trim, it has stopped (no growth since
        the previous call, nothing in flight) and the interval has passed."""
        quiet = activity == self._last_activity and in_flight == 0
        self._last_activity = activity
        return (quiet and activity != self._trimmed_activity
                and self._clock() - self._last_trim >= self._min_interval_s)

    def tick(self, activity: int, in_flight: int) -> bool:
        """Call once per agent tick; trims when ``should_trim`` says so."""
        if not self.should_trim(activity, in_flight):
            return False
        self._trimmed_activity = activity
        self._last_trim = self._clock()
        if self._trim is None:
            return False
        self._trim(0)
        self.trims += 1
        log.debug("heap_trimmed activity=%d", activity)
        return True
