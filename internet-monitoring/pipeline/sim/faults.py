"""Fault plans for the flaky-link simulator: pure, seeded data and decisions.

A ``FaultPlan`` says what a link does to the connections and byte segments crossing it;
``LinkSession`` turns those per-segment decisions into a delivery schedule for one proxied
connection (bandwidth, ordering, close-after-N-bytes, black-hole stalls). Neither touches a
socket or a clock: callers pass the time in. ``pipeline.sim.proxy`` is the asyncio shell.

Determinism: every random decision comes from a ``random.Random`` seeded with a hash of
``(seed, what, conn_index, direction, segment_index)``, so a decision does not depend on the
order in which connections or segments happen to be scheduled. Same seed, same decisions.

Time: windows (partitions, black-holes) are ``(start_s, duration_s)`` pairs, half-open
``[start, start + duration)``, measured in seconds from the moment the plan was installed
(the proxy's ``start()`` or ``set_plan()``).

Directions: *upstream* is client -> server (sensor -> pipeline server), *downstream* is
server -> client. Latencies are one-way, per direction.

Black-holed bytes are DISCARDED, and a connection that lost bytes to a black-hole stays
silent in both directions until an endpoint closes it: TCP never delivers a stream with a
hole in it, so the realistic outcome of a long black-hole is a stalled connection that the
endpoints must time out. Connections opened after the window are forwarded normally.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Iterator

from pipeline.common.errors import ConfigError

Window = tuple[float, float]  # (start_s, duration_s)


class Direction(str, enum.Enum):
    UPSTREAM = "upstream"  # client -> server
    DOWNSTREAM = "downstream"  # server -> client


# ---------------------------------------------------------------------------------------
# Validation helpers


def _bad(name: str, problem: str) -> ConfigError:
    return ConfigError(f"{name}: {problem}", field=name)


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _bad(name, "must be finite")
    return float(value)


def _check_non_negative(name: str, value: object) -> None:
    if _check_number(name, value) < 0:
        raise _bad(name, f"must be >= 0, got {value!r}")


def _check_probability(name: str, value: object) -> None:
    number = _check_number(name, value)
    if not 0.0 <= number <= 1.0:
        raise _bad(name, f"must be a probability in [0, 1], got {value!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {type(value).__name__}")
    if value < 0:
        raise _bad(name, f"must be >= 0, got {value!r}")


def normalize_windows(name: str, windows: Iterable[Iterable[float]]) -> tuple[Window, ...]:
    """Validate ``(start_s, duration_s)`` pairs and return them sorted, as float tuples."""
    result: list[Window] = []
    try:
        items = list(windows)
    except TypeError as exc:
        raise _bad(name, "expected a sequence of (start_s, duration_s) pairs") from exc
    for item in items:
        try:
            start, duration = item
        except (TypeError, ValueError) as exc:
            raise _bad(name, f"expected (start_s, duration_s), got {item!r}") from exc
        start_f = _check_number(name, start)
        duration_f = _check_number(name, duration)
        if start_f < 0:
            raise _bad(name, f"window start must be >= 0, got {start!r}")
        if duration_f <= 0:
            raise _bad(name, f"window duration must be > 0, got {duration!r}")
        result.append((start_f, duration_f))
    return tuple(sorted(result))


def periodic_windows(every_s: float, duration_s: float, *, first_s: float | None = None,
                     count: int | None = None,
                     until_s: float | None = None) -> Iterator[Window]:
    """Yield ``(start, duration)`` windows: every ``every_s`` seconds for ``duration_s``.

    The first window starts at ``first_s`` (default: one period in). The generator stops
    after ``count`` windows or before a window starting at or after ``until_s``; with
    neither it is infinite (slice it).
    """
    every = _check_number("every_s", every_s)
    duration = _check_number("duration_s", duration_s)
    if every <= 0:
        raise _bad("every_s", f"must be > 0, got {every_s!r}")
    if not 0 < duration < every:
        raise _bad("duration_s", f"must be > 0 and < every_s ({every_s}), got {duration_s!r}")
    start = every if first_s is None else _check_number("first_s", first_s)
    if start < 0:
        raise _bad("first_s", f"must be >= 0, got {first_s!r}")
    if count is not None:
        _check_count("count", count)
    emitted = 0
    while (count is None or emitted < count) and (until_s is None or start < until_s):
        yield (start, duration)
        emitted += 1
        start += every


class _WindowIndex:
    """Merged windows with binary search: ``contains(t)`` and ``next_start(after)``."""

    def __init__(self, windows: tuple[Window, ...]) -> None:
        merged: list[list[float]] = []
        for start, duration in windows:  # already sorted by start
            end = start + duration
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [m[0] for m in merged]
        self.ends = [m[1] for m in merged]

    def find(self, t: float) -> int | None:
        i = bisect.bisect_right(self.starts, t) - 1
        if i >= 0 and t < self.ends[i]:
            return i
        return None

    def next_start(self, after: float) -> float | None:
        i = bisect.bisect_right(self.starts, after)
        return self.starts[i] if i < len(self.starts) else None


# ---------------------------------------------------------------------------------------
# Fault parameters


@dataclass(frozen=True)
class DirectionFaults:
    """What one direction of a link does to the bytes crossing it.

    ``latency_ms`` +/- ``jitter_ms`` (uniform) is the one-way delay of each segment;
    ``bandwidth_bps`` caps throughput (0 = unlimited) with a token bucket holding
    ``bandwidth_burst_bytes``; ``reset_mid_stream_p`` is the chance that a forwarded segment
    resets the connection instead; ``fragment_max_bytes`` splits each segment into writes of
    1..N bytes (0 = off); ``close_after_bytes`` closes the connection once that many bytes
    went this way (0 = off); ``slow_close_ms`` delays passing an end-of-stream (FIN) on.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bps: int = 0
    bandwidth_burst_bytes: int = 0
    reset_mid_stream_p: float = 0.0
    fragment_max_bytes: int = 0
    close_after_bytes: int = 0
    slow_close_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "slow_close_ms"):
            _check_non_negative(name, getattr(self, name))
        for name in ("bandwidth_bps", "bandwidth_burst_bytes", "fragment_max_bytes",
                     "close_after_bytes"):
            _check_count(name, getattr(self, name))
        _check_probability("reset_mid_stream_p", self.reset_mid_stream_p)


DIRECTION_PARAMS: tuple[str, ...] = tuple(f.name for f in fields(DirectionFaults))


@dataclass(frozen=True)
class LinkFaults:
    """Both directions of a link, plus what happens when a connection opens."""

    upstream: DirectionFaults = field(default_factory=DirectionFaults)
    downstream: DirectionFaults = field(default_factory=DirectionFaults)
    reset_at_connect_p: float = 0.0
    # The chance that a connection hangs: what the client sends still reaches the server,
    # but nothing comes back (a stuck middlebox). The client sees a timeout, the server
    # may well have stored the request: the case that makes duplicates and lost answers.
    hang_p: float = 0.0

    def __post_init__(self) -> None:
        for name in ("upstream", "downstream"):
            if not isinstance(getattr(self, name), DirectionFaults):
                raise _bad(name, "expected DirectionFaults")
        _check_probability("reset_at_connect_p", self.reset_at_connect_p)
        _check_probability("hang_p", self.hang_p)

    @classmethod
    def symmetric(cls, *, reset_at_connect_p: float = 0.0,
                  **direction_params: float) -> LinkFaults:
        """The same ``DirectionFaults(**direction_params)`` both ways."""
        unknown = sorted(set(direction_params) - set(DIRECTION_PARAMS))
        if unknown:
            raise _bad(unknown[0], f"unknown link parameter; valid: {', '.join(DIRECTION_PARAMS)}")
        one_way = DirectionFaults(**direction_params)  # type: ignore[arg-type]
        return cls(upstream=one_way, downstream=one_way, reset_at_connect_p=reset_at_connect_p)

    def for_direction(self, direction: Direction) -> DirectionFaults:
        return self.upstream if direction is Direction.UPSTREAM else self.downstream


# ---------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class ConnectionFate:
    """Whether a new connection is reset (RST) at once, and why."""

    reset: bool
    reason: str | None = None


@dataclass(frozen=True)
class SegmentAction:
    """What happens to one segment (one read) in one direction.

    ``delay_s`` is the propagation delay (latency + jitter, never negative);
    ``transmit_s`` the serialisation time at the capped bandwidth (``nbytes*8/bps``, 0 when
    unlimited) -- the proxy enforces the cap with a token bucket, see ``LinkSession``;
    ``fragments`` the write sizes, summing to ``nbytes``; ``reset`` resets the connection
    instead of forwarding; ``blackhole`` discards the segment.
    """

    delay_s: float
    transmit_s: float
    fragments: tuple[int, ...]
    reset: bool = False
    blackhole: bool = False
    reason: str | None = None

    @property
    def forwarded(self) -> bool:
        return not (self.reset or self.blackhole)


def _rng(*key: object) -> random.Random:
    """A generator that depends only on ``key``: stable across runs and processes."""
    digest = hashlib.blake2b(repr(key).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _fragment_sizes(rng: random.Random, nbytes: int, max_bytes: int) -> tuple[int, ...]:
    if nbytes <= 0:
        return ()
    if max_bytes <= 0:
        return (nbytes,)
    sizes: list[int] = []
    left = nbytes
    while left > 0:
        size = min(left, rng.randint(1, max_bytes))
        sizes.append(size)
        left -= size
    return tuple(sizes)


@dataclass(frozen=True)
class FaultPlan:
    """A seeded description of a flaky link; every decision is a pure function of it."""

    seed: int = 0
    faults: LinkFaults = field(default_factory=LinkFaults)
    partitions: tuple[Window, ...] = ()
    blackholes: tuple[Window, ...] = ()
    _partition_index: _WindowIndex = field(init=False, repr=False, compare=False)
    _blackhole_index: _WindowIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _bad("seed", f"expected an integer, got {type(self.seed).__name__}")
        if not isinstance(self.faults, LinkFaults):
            raise _bad("faults", "expected LinkFaults")
        partitions = normalize_windows("partitions", self.partitions)
        blackholes = normalize_windows("blackholes", self.blackholes)
        object.__setattr__(self, "partitions", partitions)
        object.__setattr__(self, "blackholes", blackholes)
        object.__setattr__(self, "_partition_index", _WindowIndex(partitions))
        object.__setattr__(self, "_blackhole_index", _WindowIndex(blackholes))

    # -- schedules ------------------------------------------------------------------------

    def partitioned(self, now_s: float) -> bool:
        """True inside a partition window: no connection may live or open."""
        return self._partition_index.find(now_s) is not None

    def blackholed(self, now_s: float) -> bool:
        """True inside a black-hole window: bytes are read and discarded."""
        return self._blackhole_index.find(now_s) is not None

    def next_partition_start(self, after_s: float) -> float | None:
        """Start of the first (merged) partition window strictly after ``after_s``."""
        return self._partition_index.next_start(after_s)

    def partition_end(self, now_s: float) -> float | None:
        """End of the (merged) partition window holding ``now_s``, if any."""
        i = self._partition_index.find(now_s)
        return None if i is None else self._partition_index.ends[i]

    # -- decisions ------------------------------------------------------------------------

    def decide_connection(self, conn_index: int, now_s: float | None = None) -> ConnectionFate:
        """Fate of the ``conn_index``-th connection; ``now_s`` (plan time) adds partitions."""
        roll = _rng(self.seed, "connect", conn_index).random()
        if now_s is not None and self.partitioned(now_s):
            return ConnectionFate(reset=True, reason="partition")
        if roll < self.faults.reset_at_connect_p:
            return ConnectionFate(reset=True, reason="reset_at_connect")
        return ConnectionFate(reset=False)

    def decide_hang(self, conn_index: int) -> bool:
        """Whether the ``conn_index``-th connection hangs (its answers are swallowed).
        Drawn from its own generator, so adding hangs reshuffles no other decision."""
        if not self.faults.hang_p:
            return False
        return _rng(self.seed, "hang", conn_index).random() < self.faults.hang_p

    def decide_segment(self, conn_index: int, segment_index: int, nbytes: int, now_s: float,
                       *, direction: Direction = Direction.UPSTREAM) -> SegmentAction:
        """What happens to one segment of ``nbytes`` read at plan time ``now_s``.

        Precedence: partition (reset) > black-hole (discard) > mid-stream reset > forward.
        Random draws happen in a fixed order whatever the outcome, so changing one
        parameter does not reshuffle the others.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        params = self.faults.for_direction(direction)
        rng = _rng(self.seed, "segment", conn_index, direction.value, segment_index)
        reset_roll = rng.random()
        jitter_roll = rng.uniform(-1.0, 1.0)
        delay_ms = max(0.0, params.latency_ms + params.jitter_ms * jitter_roll)
        transmit_s = nbytes * 8 / params.bandwidth_bps if params.bandwidth_bps else 0.0
        fragments = _fragment_sizes(rng, nbytes, params.fragment_max_bytes)
        action = SegmentAction(delay_s=delay_ms / 1000.0, transmit_s=transmit_s,
                               fragments=fragments)
        if self.partitioned(now_s):
            return replace(action, reset=True, reason="partition")
        if self.blackholed(now_s):
            return replace(action, blackhole=True, reason="blackhole")
        if reset_roll < params.reset_mid_stream_p:
            return replace(action, reset=True, reason="reset_mid_stream")
        return action


# ---------------------------------------------------------------------------------------
# Per-connection schedule (sans-I/O)


class TokenBucket:
    """Bandwidth cap: ``reserve(n, now)`` says when ``n`` bytes have crossed the link.

    Holds up to ``burst_bytes`` tokens, refilled at ``rate_bytes_per_s``; a reservation
    larger than the tokens at hand goes into debt, which later reservations wait out, so
    back-to-back segments are serialised at the rate (burst 0 = a plain serialiser).
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float = 0.0) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be > 0")
        self.rate = float(rate_bytes_per_s)
        self.burst = max(0.0, float(burst_bytes))
        self._tokens = self.burst
        self._stamp: float | None = None

    def reserve(self, nbytes: int, now_s: float) -> float:
        if self._stamp is None:
            self._stamp = now_s
        elif now_s > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now_s - self._stamp) * self.rate)
            self._stamp = now_s
        self._tokens -= nbytes
        if self._tokens >= 0:
            return max(now_s, self._stamp)
        return self._stamp + (-self._tokens) / self.rate


class StepKind(str, enum.Enum):
    FORWARD = "forward"  # deliver ``fragments`` at ``release_at_s``
    DISCARD = "discard"  # read and drop (black-hole, stalled, already closing)
    RESET = "reset"  # reset the whole connection now


@dataclass(frozen=True)
class Step:
    kind: StepKind
    release_at_s: float = 0.0
    fragments: tuple[int, ...] = ()
    close_after: bool = False  # close the connection (FIN) once these bytes are out
    reason: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(self.fragments)


def _truncate(fragments: tuple[int, ...], budget: int) -> tuple[int, ...]:
    kept: list[int] = []
    for size in fragments:
        if budget <= 0:
            break
        kept.append(min(size, budget))
        budget -= kept[-1]
    return tuple(kept)


@dataclass
class _DirectionState:
    segments: int = 0
    forwarded: int = 0
    last_release_s: float = float("-inf")
    closing: bool = False
    bucket: TokenBucket | None = None
    bucket_key: tuple[int, int] = (0, 0)


class LinkSession:
    """The delivery schedule of one proxied connection, both directions.

    Times given to and returned by this class are on the caller's clock (e.g. the event
    loop's); ``origin_s`` is when the plan was installed on that clock, so the plan sees
    ``now_s - origin_s``. Release times never decrease within a direction: jitter delays
    bytes but never reorders them, as on a real TCP connection.
    """

    def __init__(self, plan: FaultPlan, conn_index: int, origin_s: float = 0.0) -> None:
        self.plan = plan
        self.origin_s = origin_s
        self.conn_index = conn_index
        self.stalled = False
        self.hung = plan.decide_hang(conn_index)
        self.reset_reason: str | None = None
        self._dirs = {d: _DirectionState() for d in Direction}

    def set_plan(self, plan: FaultPlan, origin_s: float) -> None:
        self.plan = plan
        self.origin_s = origin_s

    def forwarded_bytes(self, direction: Direction) -> int:
        return self._dirs[direction].forwarded

    def _bucket(self, state: _DirectionState, params: DirectionFaults) -> TokenBucket | None:
        key = (params.bandwidth_bps, params.bandwidth_burst_bytes)
        if key != state.bucket_key:
            state.bucket_key = key
            state.bucket = (TokenBucket(params.bandwidth_bps / 8, params.bandwidth_burst_bytes)
                            if params.bandwidth_bps else None)
        return state.bucket

    def on_segment(self, direction: Direction, nbytes: int, now_s: float) -> Step:
        """A segment of ``nbytes`` was read in ``direction`` at ``now_s``: what to do."""
        state = self._dirs[direction]
        index = state.segments
        state.segments += 1
        if self.reset_reason is not None:
            return Step(StepKind.RESET, reason=self.reset_reason)
        action = self.plan.decide_segment(self.conn_index, index, nbytes, now_s - self.origin_s,
                                          direction=direction)
        if action.reset:
            self.reset_reason = action.reason
            return Step(StepKind.RESET, reason=action.reason)
        if self.hung and direction is Direction.DOWNSTREAM:
            return Step(StepKind.DISCARD, reason="hang")
        if action.blackhole or self.stalled:
            self.stalled = True
            return Step(StepKind.DISCARD, reason="blackhole" if action.blackhole else "stalled")
        if state.closing:
            return Step(StepKind.DISCARD, reason="closing")
        params = self.plan.faults.for_direction(direction)
        fragments = action.fragments
        close_after = False
        if params.close_after_bytes:
            budget = params.close_after_bytes - state.forwarded
            if nbytes >= budget:
                fragments = _truncate(fragments, budget)
                close_after = True
                state.closing = True
        size = sum(fragments)
        bucket = self._bucket(state, params)
        ready = bucket.reserve(size, now_s) if bucket is not None else now_s
        release = max(ready + action.delay_s, state.last_release_s)
        state.last_release_s = release
        state.forwarded += size
        return Step(StepKind.FORWARD, release_at_s=release, fragments=fragments,
                    close_after=close_after)

    def on_eof(self, direction: Direction, now_s: float) -> float | None:
        """End of stream read in ``direction``: when to pass it on, or None to tear down.

        The FIN travels behind the data (never overtakes it), with the one-way latency plus
        ``slow_close_ms``. A stalled connection is torn down instead: nothing may cross it.
        """
        if self.stalled or self.reset_reason is not None:
            return None
        state = self._dirs[direction]
        params = self.plan.faults.for_direction(direction)
        release = max(now_s + (params.latency_ms + params.slow_close_ms) / 1000.0,
                      state.last_release_s)
        state.last_release_s = release
        return release
