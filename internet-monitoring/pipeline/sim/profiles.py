"""Named link profiles for ``pipeline-sim``: data, overridable parameter by parameter.

Latencies are one-way per direction, so a round trip costs twice ``latency_ms`` (plus
jitter both ways): ``satellite`` is 300 +/- 100 ms each way = 600 +/- 200 ms round trip.
Reset probabilities apply per new connection (``reset_at_connect_p``) and per forwarded
segment in each direction (``reset_mid_stream_p``).

Overridable parameters (``Profile.with_overrides`` / ``parse_overrides``):

* link, both directions: ``latency_ms``, ``jitter_ms``, ``bandwidth_bps``,
  ``bandwidth_burst_bytes``, ``reset_mid_stream_p``, ``fragment_max_bytes``,
  ``close_after_bytes``, ``slow_close_ms``; one direction only: the same names prefixed
  with ``upstream_`` or ``downstream_``;
* ``reset_at_connect_p``; ``hang_p`` (the chance that a connection hangs: requests reach
  the server, answers never come back);
* partitions: ``partition_every_s``, ``partition_duration_s``, ``partition_first_s``,
  (default: one period in), ``partition_count`` (0 = until the horizon) and explicit
  ``partitions``; ``blackholes``
  (windows as ``[(start_s, duration_s), ...]`` or the string ``"start:duration,..."``);
* run: ``kill_sensors_every_s``, ``kill_server_every_s`` (0 = never), ``duration_hint_s``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from pipeline.common.errors import ConfigError
from pipeline.sim.faults import (
    DIRECTION_PARAMS,
    DirectionFaults,
    FaultPlan,
    LinkFaults,
    Window,
    normalize_windows,
    periodic_windows,
)

DEFAULT_HORIZON_S = 24 * 3600.0  # periodic partitions are expanded this far


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    faults: LinkFaults = dataclasses.field(default_factory=LinkFaults)
    partitions: tuple[Window, ...] = ()
    blackholes: tuple[Window, ...] = ()
    partition_every_s: float = 0.0  # 0 = no periodic partitions
    partition_duration_s: float = 0.0
    partition_first_s: float | None = None  # None = one period in
    partition_count: int = 0  # 0 = as many as fit before the horizon
    kill_sensors_every_s: float = 0.0  # 0 = never (used by the fleet runner)
    kill_server_every_s: float = 0.0
    duration_hint_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "partitions", normalize_windows("partitions", self.partitions))
        object.__setattr__(self, "blackholes", normalize_windows("blackholes", self.blackholes))
        for name in ("partition_every_s", "partition_duration_s", "partition_first_s",
                     "kill_sensors_every_s", "kill_server_every_s", "duration_hint_s"):
            value = getattr(self, name)
            if value is None and name == "partition_first_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0, got {value!r}",
                                  field=name)
        if isinstance(self.partition_count, bool) or not isinstance(self.partition_count, int) \
                or self.partition_count < 0:
            raise ConfigError(f"partition_count: must be an integer >= 0, got "
                              f"{self.partition_count!r}", field="partition_count")
        if self.partition_every_s:
            if not 0 < self.partition_duration_s < self.partition_every_s:
                raise ConfigError("partition_duration_s: must be > 0 and < partition_every_s "
                                  f"({self.partition_every_s}), got {self.partition_duration_s}",
                                  field="partition_duration_s")

    # -- plans ----------------------------------------------------------------------------

    def partition_windows(self, horizon_s: float = DEFAULT_HORIZON_S) -> tuple[Window, ...]:
        """Explicit windows plus the periodic ones that start before ``horizon_s``."""
        windows = list(self.partitions)
        if self.partition_every_s:
            windows.extend(periodic_windows(
                self.partition_every_s, self.partition_duration_s,
                first_s=self.partition_first_s,
                count=self.partition_count or None, until_s=horizon_s))
        return tuple(sorted(windows))

    def to_plan(self, seed: int, horizon_s: float = DEFAULT_HORIZON_S) -> FaultPlan:
        return FaultPlan(seed=seed, faults=self.faults,
                         partitions=self.partition_windows(horizon_s),
                         blackholes=self.blackholes)

    # -- overrides ------------------------------------------------------------------------

    def with_overrides(self, **params: Any) -> Profile:
        """A copy with parameters replaced (see the module docstring for the names).

        Values may be numbers or strings (as given on a command line); windows may be
        sequences of pairs or ``"start:duration,..."``. Unknown or invalid -> ConfigError
        naming the parameter.
        """
        sides: dict[str, dict[str, Any]] = {"upstream": {}, "downstream": {}}
        link: dict[str, Any] = {}
        top: dict[str, Any] = {}
        # Both-direction names first, so ``upstream_x`` wins over ``x`` whatever the order.
        ordered = sorted(params.items(), key=lambda kv: kv[0].startswith(_SIDE_PREFIXES))
        for key, value in ordered:
            _classify(key, value, sides, link, top)
        faults = dataclasses.replace(
            self.faults, **link,
            **{side: dataclasses.replace(getattr(self.faults, side), **changes)
               for side, changes in sides.items() if changes})
        # Cross-parameter checks (partition duration < period) run once, on the result.
        return dataclasses.replace(self, faults=faults, **top)


# ---------------------------------------------------------------------------------------
# Parameter table


def _number(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: expected a number, got {value!r}", field=key) from exc
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__}", field=key)
    return float(value)


def _integer(key: str, value: Any) -> int:
    number = _number(key, value)
    if not number.is_integer():
        raise ConfigError(f"{key}: expected an integer, got {value!r}", field=key)
    return int(number)


def _windows(key: str, value: Any) -> tuple[Window, ...]:
    if isinstance(value, str):
        pairs = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            start, sep, duration = part.partition(":")
            if not sep:
                raise ConfigError(f"{key}: expected 'start:duration', got {part!r}", field=key)
            pairs.append((_number(key, start), _number(key, duration)))
        value = pairs
    return normalize_windows(key, value)


_SIDE_PREFIXES = ("upstream_", "downstream_")
_DIRECTION_INT = {"bandwidth_bps", "bandwidth_burst_bytes", "fragment_max_bytes",
                  "close_after_bytes"}
_PROFILE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "description": lambda k, v: str(v),
    "partitions": _windows,
    "blackholes": _windows,
    "partition_every_s": _number,
    "partition_duration_s": _number,
    "partition_first_s": _number,
    "partition_count": _integer,
    "kill_sensors_every_s": _number,
    "kill_server_every_s": _number,
    "duration_hint_s": _number,
}


def override_names() -> tuple[str, ...]:
    """Every parameter ``with_overrides`` accepts."""
    names = list(DIRECTION_PARAMS)
    names += [f"{side}_{p}" for side in ("upstream", "downstream") for p in DIRECTION_PARAMS]
    names += ["reset_at_connect_p", "hang_p"]
    names += list(_PROFILE_FIELDS)
    return tuple(names)


def _checked(key: str, build: Callable[[], object]) -> None:
    """Run a constructor's validation and re-raise its error under the override's name."""
    try:
        build()
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc.message}", field=key) from exc


def _classify(key: str, value: Any, sides: dict[str, dict[str, Any]], link: dict[str, Any],
              top: dict[str, Any]) -> None:
    """Coerce and validate one override and file it under what it changes."""
    prefix, _, rest = key.partition("_")
    targets: tuple[str, ...]
    if prefix in sides and rest in DIRECTION_PARAMS:
        targets, param = (prefix,), rest
    elif key in DIRECTION_PARAMS:
        targets, param = tuple(sides), key
    else:
        targets, param = (), key
    if targets:
        coerced = _integer(key, value) if param in _DIRECTION_INT else _number(key, value)
        override: dict[str, Any] = {param: coerced}
        _checked(key, lambda: DirectionFaults(**override))
        for side in targets:
            sides[side][param] = coerced
    elif key in ("reset_at_connect_p", "hang_p"):
        coerced = _number(key, value)
        link_override: dict[str, Any] = {key: coerced}
        _checked(key, lambda: LinkFaults(**link_override))
        link[key] = coerced
    elif key in _PROFILE_FIELDS:
        top[key] = _PROFILE_FIELDS[key](key, value)
    else:
        raise ConfigError(f"unknown profile parameter {key!r}; valid: "
                          f"{', '.join(override_names())}", field=key)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["latency_ms=100", "partitions=5:2,20:2"]`` -> a dict for ``with_overrides``."""
    result: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected name=value", field=key or None)
        result[key] = value.strip()
    return result


# ---------------------------------------------------------------------------------------
# The profiles


def _lossy_link(p: float) -> LinkFaults:
    return LinkFaults.symmetric(reset_at_connect_p=p, reset_mid_stream_p=p,
                                latency_ms=25.0, jitter_ms=12.5)


PROFILES: Mapping[str, Profile] = {
    p.name: p for p in (
        Profile(
            name="clean",
            description="A perfect loopback link: the baseline for goodput.",
            duration_hint_s=30.0,
        ),
        Profile(
            name="lossy",
            description="10 % of connections reset when they open and each segment reset "
                        "with 10 % probability; 50 +/- 25 ms round trip "
                        "(25 +/- 12.5 ms each way).",
            faults=_lossy_link(0.10),
            duration_hint_s=60.0,
        ),
        Profile(
            name="satellite",
            description="600 +/- 200 ms round trip (300 +/- 100 ms each way), 2 Mbit/s "
                        "each way.",
            faults=LinkFaults.symmetric(latency_ms=300.0, jitter_ms=100.0,
                                        bandwidth_bps=2_000_000),
            duration_hint_s=90.0,
        ),
        Profile(
            name="partition",
            description="Links cut for 10 s every 30 s (first cut at 20 s): live connections "
                        "reset, new ones refused.",
            partition_every_s=30.0, partition_duration_s=10.0, partition_first_s=20.0,
            duration_hint_s=90.0,
        ),
        Profile(
            name="chaos",
            description="All of it: 20 % resets (at connect and per segment), 50 +/- 25 ms "
                        "round trip, writes fragmented to <= 512 bytes, 200 ms slow closes, "
                        "two 10 s partitions (at 15 s and 45 s), a 5 s black-hole at 32 s; "
                        "sensors killed every 20 s, the server every 25 s.",
            faults=dataclasses.replace(
                _lossy_link(0.20),
                upstream=dataclasses.replace(_lossy_link(0.20).upstream,
                                             fragment_max_bytes=512, slow_close_ms=200.0),
                downstream=dataclasses.replace(_lossy_link(0.20).downstream,
                                               fragment_max_bytes=512, slow_close_ms=200.0)),
            partition_every_s=30.0, partition_duration_s=10.0, partition_first_s=15.0,
            partition_count=2,
            blackholes=((32.0, 5.0),),
            kill_sensors_every_s=20.0, kill_server_every_s=25.0,
            duration_hint_s=90.0,
        ),
    )
}


def profile_names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}; valid profiles: "
                          f"{', '.join(PROFILES)}", field="profile") from None
