"""The sensor's configuration: one frozen dataclass per section, checked by ``validate``."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pipeline.common import capabilities
from pipeline.common.config.checks import (
    KIB,
    MAX_SLICE_SIZE,
    MIB,
    MIN_SLICE_SIZE,
    SENSOR_TOKEN_ENV,
    Synchronous,
    check_listen,
    check_non_negative,
    check_not_empty,
    check_positive,
    check_tls_scheme,
    check_url,
    dotted_key,
    fail,
    ignored_field,
)
from pipeline.common.config.shared_schema import TracingConfig
from pipeline.common.config.sources_schema import SourcesConfig
from pipeline.common.messages import SENSOR_ID_RE
from pipeline.version import SOFTWARE_VERSION


@dataclass(frozen=True)
class SensorTlsConfig:
    enabled: bool = False
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    skip_verify: bool = False

    def validate(self, at: str) -> None:
        if self.cert and not self.key:
            fail(dotted_key(at, "key"), "required when cert is set")
        if self.key and not self.cert:
            fail(dotted_key(at, "cert"), "required when key is set")


@dataclass(frozen=True)
class SensorQueueConfig:
    """``path`` empty = ``./var/sensor-<sensor_id>.db`` (filled in by ``SensorConfig``)."""

    path: str = ""
    retention_hours: int = 72
    max_bytes: int | None = 512 * MIB
    synchronous: Synchronous = "FULL"
    slice_size: int = 128 * KIB
    # Disk held back so deletes and checkpoints work on a full disk (docs/reliability-disk.md).
    reserve_bytes: int = 4 * MIB
    cache_kib: int = 2 * 1024  # SQLite page cache of the queue's connection

    def validate(self, at: str) -> None:
        check_positive(at, "retention_hours", self.retention_hours)
        check_positive(at, "cache_kib", self.cache_kib)
        if self.max_bytes is not None:
            check_positive(at, "max_bytes", self.max_bytes)
        if self.reserve_bytes < 0:
            fail(dotted_key(at, "reserve_bytes"), "must be 0 (off) or a number of bytes")
        if not MIN_SLICE_SIZE <= self.slice_size <= MAX_SLICE_SIZE:
            fail(dotted_key(at, "slice_size"),
                  f"must be between {MIN_SLICE_SIZE} and {MAX_SLICE_SIZE} bytes (64-256 KiB)")


@dataclass(frozen=True)
class SensorControlConfig:
    url: str = "ws://127.0.0.1:8765/control"
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    headers: dict[str, str] = field(default_factory=dict)
    tls: SensorTlsConfig = field(default_factory=SensorTlsConfig)

    def validate(self, at: str) -> None:
        scheme = check_url(at, "url", self.url, ("ws", "wss"))
        check_tls_scheme(at, scheme, self.tls.enabled, "wss")
        check_positive(at, "ping_interval", self.ping_interval)
        check_positive(at, "ping_timeout", self.ping_timeout)


@dataclass(frozen=True)
class SensorIngestConfig:
    url: str = "http://127.0.0.1:8081/v1/ingest/chunk"
    timeout: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)
    tls: SensorTlsConfig = field(default_factory=SensorTlsConfig)
    max_parallel: int = 8

    def validate(self, at: str) -> None:
        scheme = check_url(at, "url", self.url, ("http", "https"))
        check_tls_scheme(at, scheme, self.tls.enabled, "https")
        check_positive(at, "timeout", self.timeout)
        check_positive(at, "max_parallel", self.max_parallel)


@dataclass(frozen=True)
class TimeSyncConfig:
    """Clock skew comes from the server's ``server_time`` on the control channel, so the
    platform's NTP keys are accepted and ignored."""

    enabled: bool = True
    max_skew_ms: float = 500.0
    ntp_server: str = ignored_field(
        "", "skew is measured against the server's server_time, not an NTP server")
    fallback_skew_ms: float = ignored_field(
        0.0, "no fallback skew is applied: without server_time events keep the sensor clock")

    def validate(self, at: str) -> None:
        check_non_negative(at, "max_skew_ms", self.max_skew_ms)


@dataclass(frozen=True)
class BackoffConfig:
    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.1

    def validate(self, at: str) -> None:
        check_positive(at, "initial_s", self.initial_s)
        if self.max_s < self.initial_s:
            fail(dotted_key(at, "max_s"), "must not be smaller than initial_s")
        if not 0 <= self.jitter < 1:
            fail(dotted_key(at, "jitter"), "must be at least 0 and below 1")


@dataclass(frozen=True)
class SubmitConfig:
    """Optional local HTTP endpoint where test programs hand events to the sensor."""

    listen: str = ""

    def validate(self, at: str) -> None:
        check_listen(at, "listen", self.listen)


@dataclass(frozen=True)
class SensorMetricsConfig:
    listen: str = ""

    def validate(self, at: str) -> None:
        check_listen(at, "listen", self.listen)


# proto, batch, http_ack: used only with a server that announces them too (1.0 servers
# get JSON single-chunk POSTs and ChunkAck deletes, as before).
DEFAULT_CAPABILITIES = capabilities.SENSOR_DEFAULT_CAPABILITIES
#: The protocol 1.0 base set. A ``capabilities`` list naming nothing beyond it (the
#: platform's old default ``[chunks, heartbeats]``) means "the base set and every
#: extension", minus ``capabilities_exclude``; a list naming any extension is taken as is.
BASE_CAPABILITIES = frozenset(capabilities.BASE_CAPABILITIES)


def expand_capabilities(listed: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[str, ...]:
    """The capabilities a sensor asks for (docs/deployment.md, "Capabilities")."""
    chosen = listed
    if set(listed) <= BASE_CAPABILITIES:
        chosen = tuple(listed) + tuple(c for c in DEFAULT_CAPABILITIES if c not in listed)
    return tuple(c for c in chosen if c not in exclude)


def exact_capabilities(listed: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Config keys that make a sensor announce exactly ``listed`` (e.g. a 1.0 sensor)."""
    return {"capabilities": list(listed),
            "capabilities_exclude": [c for c in DEFAULT_CAPABILITIES if c not in listed]}


@dataclass(frozen=True)
class SensorConfig:
    sensor_id: str
    software_version: str = SOFTWARE_VERSION
    token: str = field(default="", repr=False)
    token_file: str = ""
    heartbeat_interval: float = 30.0
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    capabilities_exclude: tuple[str, ...] = ()
    queue: SensorQueueConfig = field(default_factory=SensorQueueConfig)
    control: SensorControlConfig = field(default_factory=SensorControlConfig)
    ingest: SensorIngestConfig = field(default_factory=SensorIngestConfig)
    time_sync: TimeSyncConfig = field(default_factory=TimeSyncConfig)
    backoff: BackoffConfig = field(default_factory=BackoffConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    metrics: SensorMetricsConfig = field(default_factory=SensorMetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)

    def __post_init__(self) -> None:
        if not self.queue.path:
            path = f"./var/sensor-{self.sensor_id}.db"
            object.__setattr__(self, "queue", replace(self.queue, path=path))
        object.__setattr__(self, "capabilities",
                           expand_capabilities(self.capabilities, self.capabilities_exclude))

    def validate(self, at: str) -> None:
        if not SENSOR_ID_RE.fullmatch(self.sensor_id):
            fail(dotted_key(at, "sensor_id"), f"invalid sensor id {self.sensor_id[:140]!r}")
        check_not_empty(at, "software_version", self.software_version)
        if not self.token and not self.token_file:
            fail(dotted_key(at, "token"), f"set token or token_file (or {SENSOR_TOKEN_ENV})")
        check_positive(at, "heartbeat_interval", self.heartbeat_interval)
        for i, capability in enumerate(self.capabilities):
            check_not_empty(at, f"capabilities[{i}]", capability)
        for i, capability in enumerate(self.capabilities_exclude):
            if capability in BASE_CAPABILITIES:
                fail(dotted_key(at, f"capabilities_exclude[{i}]"),
                      f"{capability!r} is part of protocol 1.0 and cannot be excluded")
