"""Throttling decisions, sans-I/O: token buckets, auth-failure bans, connection counts.

Each class takes the current time (``now``, monotonic seconds) as an argument and returns a
decision; the listeners turn decisions into 429 answers, refused handshakes or dropped
connections. Nothing here sleeps, reads a clock or touches a socket.

::

    RateLimiter        per identity (the authenticated sensor id): ``rate`` chunks per
                       second refilled, at most ``burst`` banked. acquire() -> 0.0 (go) or
                       the seconds until enough tokens are back (the Retry-After value).
    AuthFailureBans    per client address: ``max_failures`` refused credentials within
                       ``window_s`` ban the address for ``ban_s``.
    ConnectionLimiter  per client address: at most ``max_per_address`` open connections.

Memory is bounded: every table keeps at most ``max_keys`` entries and forgets the least
recently used one first. For buckets that is safe because keys are authenticated sensor
ids (a stranger cannot create them); for failure counters an attacker rotating addresses
can at worst push out counters of other addresses, never unban one that is banned
(bans are kept in their own table, which evicts the ban ending soonest).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable

DEFAULT_MAX_KEYS = 100_000


@dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` banked; starts full."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = max(self.updated, now)

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens and return 0.0, or take nothing and return the wait in seconds.

        ``n`` above ``burst`` is treated as ``burst`` (a full bucket lets any single request
        through; otherwise a request larger than the burst could never pass)."""
        self.refill(now)
        need = min(float(n), self.burst)
        if self.tokens >= need:
            self.tokens -= need
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (need - self.tokens) / self.rate


class RateLimiter:
    """One ``TokenBucket`` per key; ``rate <= 0`` switches limiting off."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key: str, now: float, n: int = 1) -> float:
        """0.0 when ``n`` submissions of ``key`` may go now, else seconds to wait."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket.full(self.rate, self.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now, n)

    def reconfigure(self, rate: float, burst: float) -> None:
        """New limits (reload); banked tokens are capped to the new burst."""
        self.rate = float(rate)
        self.burst = max(1.0, float(burst))
        for bucket in self._buckets.values():
            bucket.rate = self.rate
            bucket.burst = self.burst
            bucket.tokens = min(bucket.tokens, self.burst)

    def __len__(self) -> int:
        return len(self._buckets)


class AuthFailureBans:
    """Bans an address after ``max_failures`` refused credentials within ``window_s``.

    ``max_failures <= 0`` switches banning off."""

    def __init__(self, max_failures: int, window_s: float, ban_s: float, *,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.max_failures = int(max_failures)
        self.window_s = float(window_s)
        self.ban_s = float(ban_s)
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._bans: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0 and self.ban_s > 0

    def banned_for(self, address: str, now: float) -> float:
        """Seconds left on the address's ban, 0.0 when it is not banned."""
        until = self._bans.get(address)
        if until is None:
            return 0.0
        if now >= until:
            del self._bans[address]
            return 0.0
        return until - now

    def record_failure(self, address: str, now: float) -> bool:
        """Count one refused credential; True when this failure starts a ban."""
        if not self.enabled or self.banned_for(address, now) > 0:
            return False
        times = self._failures.get(address)
        if times is None:
            times = deque()
            self._failures[address] = times
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        times.append(now)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) < self.max_failures:
            return False
        del self._failures[address]
        self._bans[address] = now + self.ban_s
        if len(self._bans) > self.max_keys:
            soonest = min(self._bans, key=self._bans.__getitem__)
            del self._bans[soonest]
        return True

    def failures(self, address: str, now: float) -> int:
        times = self._failures.get(address)
        if not times:
            return 0
        return sum(1 for t in times if t > now - self.window_s)

    def reconfigure(self, max_failures: int, window_s: float, ban_s: float) -> None:
        self.max_failures = int(max_failures)
        self.window_s = float(window_s)
        self.ban_s = float(ban_s)


class ConnectionLimiter:
    """Counts open connections per address; ``max_per_address <= 0`` means no cap.
    Addresses for which ``exempt`` is true (trusted proxies) are counted, never capped."""

    def __init__(self, max_per_address: int,
                 exempt: Callable[[str], bool] | None = None) -> None:
        self.max_per_address = int(max_per_address)
        self.exempt = exempt
        self._open: dict[str, int] = {}

    def acquire(self, address: str) -> bool:
        """Take a slot; False (nothing taken) when the address is at its cap."""
        count = self._open.get(address, 0)
        if self.max_per_address > 0 and count >= self.max_per_address and not (
                self.exempt is not None and self.exempt(address)):
            return False
        self._open[address] = count + 1
        return True

    def release(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def count(self, address: str) -> int:
        return self._open.get(address, 0)

    def total(self) -> int:
        return sum(self._open.values())
