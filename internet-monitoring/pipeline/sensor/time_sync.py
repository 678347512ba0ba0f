"""Clock-skew estimation from the server's ``server_time``, sans-I/O.

A sensor that announced the ``server_time`` capability receives envelopes with a
top-level ``server_time`` (ISO 8601, stamped by the server when it sent the frame). Each
frame gives one sample::

    sample_ms = server_time - local_receive_time = skew - one_way_delay

where ``skew = server_clock - sensor_clock``. The delay is never negative, so every
sample *underestimates* the skew, and the sample with the least delay is the best one:
the estimate is the **largest** sample in a sliding window of the latest ``window``
samples. The window lets the estimate follow a clock that was stepped (NTP, RTC battery),
which a running maximum over all time could not.

``clock_skew_ms`` in heartbeats and chunks is this estimate: add it to a sensor timestamp
to get server time.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 16


def parse_server_time(value: str) -> float:
    """Seconds since the epoch of an ISO 8601 timestamp; naive times are taken as UTC.

    Raises ``ValueError`` for anything else.
    """
    moment = datetime.fromisoformat(value.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    seconds = moment.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(f"server_time {value!r} is not finite")
    return seconds


@dataclass
class ClockSkewEstimator:
    """Filtered estimate of ``server_clock - local_clock`` in milliseconds.

    ``max_skew_ms``: beyond it a warning is logged once per excursion (and again when
    the clock comes back within bounds), not on every sample.
    """

    max_skew_ms: float = 1000.0
    window: int = DEFAULT_WINDOW
    _samples: deque[float] = field(default_factory=deque)
    _warned: bool = False
    rejected: int = 0

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError("window must be at least 1")
        self._samples = deque(self._samples, maxlen=self.window)

    @property
    def sample_count(self) -> int:
        return len(self._samples)

    @property
    def skew_ms(self) -> float:
        """The current estimate; 0.0 until the first sample."""
        return max(self._samples) if self._samples else 0.0

    @property
    def beyond_limit(self) -> bool:
        return abs(self.skew_ms) > self.max_skew_ms

    def observe(self, server_time: str | float, received_at: float) -> float | None:
        """Add one sample: ``server_time`` (ISO text or epoch seconds) seen at local time
        ``received_at`` (epoch seconds). Returns the new estimate, or None when the
        timestamp could not be read (the sample is ignored and counted in ``rejected``)."""
        try:
            server_s = (parse_server_time(server_time) if isinstance(server_time, str)
                        else float(server_time))
        except (ValueError, TypeError, OverflowError):
            self.rejected += 1
            log.debug("clock_skew_sample_rejected server_time=%r", server_time)
            return None
        if not math.isfinite(server_s) or not math.isfinite(received_at):
            self.rejected += 1
            return None
        self._samples.append((server_s - received_at) * 1000.0)
        self._check_limit()
        return self.skew_ms

    def reset(self) -> None:
        """Forget all samples (for example after the local clock was stepped)."""
        self._samples.clear()
        self._warned = False

    def _check_limit(self) -> None:
        beyond = self.beyond_limit
        if beyond and not self._warned:
            log.warning("clock_skew_beyond_limit skew_ms=%.1f max_skew_ms=%.1f",
                        self.skew_ms, self.max_skew_ms)
        elif not beyond and self._warned:
            log.info("clock_skew_within_limit skew_ms=%.1f max_skew_ms=%.1f",
                     self.skew_ms, self.max_skew_ms)
        self._warned = beyond
