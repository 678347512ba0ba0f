"""The server's configuration: one frozen dataclass per section, checked by ``validate``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pipeline.common.config.checks import (
    LOG_LEVELS,
    MIB,
    SHA256_HEX_RE,
    Synchronous,
    check_non_negative,
    check_not_empty,
    check_port,
    check_positive,
    dotted_key,
    fail,
    parse_not_after,
)
from pipeline.common.config.forward_schema import ForwardConfig
from pipeline.common.config.shared_schema import TracingConfig
from pipeline.common.messages import SENSOR_ID_RE


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = False
    cert: str = ""
    key: str = ""
    client_ca: str = ""

    def validate(self, at: str) -> None:
        if self.enabled:
            for name in ("cert", "key"):
                if not getattr(self, name):
                    fail(dotted_key(at, name), "required when enabled is true")


@dataclass(frozen=True)
class StoreConfig:
    path: str = "./var/server.db"
    retention_hours: int = 720
    engine: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str = field(default="", repr=False)
    synchronous: Synchronous = "FULL"
    # Disk held back so checkpoints, control state and retention work on a full disk.
    reserve_bytes: int = 64 * MIB
    # PostgreSQL (engine: postgres): connections each server process keeps open.
    pool_min_size: int = 1
    pool_max_size: int = 4

    def validate(self, at: str) -> None:
        check_positive(at, "retention_hours", self.retention_hours)
        check_positive(at, "pool_max_size", self.pool_max_size)
        if not 0 <= self.pool_min_size <= self.pool_max_size:
            fail(dotted_key(at, "pool_min_size"), "must be between 0 and pool_max_size")
        if self.reserve_bytes < 0:
            fail(dotted_key(at, "reserve_bytes"), "must be 0 (off) or a number of bytes")
        if self.engine == "sqlite":
            check_not_empty(at, "path", self.path)
        elif not self.dsn:
            fail(dotted_key(at, "dsn"), "required when engine is postgres")


@dataclass(frozen=True)
class ControlConfig:
    bind: str = "127.0.0.1"
    port: int = 8765
    path: str = "/control"
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, at: str) -> None:
        check_not_empty(at, "bind", self.bind)
        check_port(at, "port", self.port)
        if not self.path.startswith("/"):
            fail(dotted_key(at, "path"), "must start with /")


@dataclass(frozen=True)
class IngestConfig:
    bind: str = "127.0.0.1"
    port: int = 8081
    max_body_bytes: int = 4 * MIB
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, at: str) -> None:
        check_not_empty(at, "bind", self.bind)
        check_port(at, "port", self.port)
        check_positive(at, "max_body_bytes", self.max_body_bytes)


@dataclass(frozen=True)
class StreamConfig:
    """``token`` empty = open stream; ``allowed_origins`` empty = any origin."""

    bind: str = "127.0.0.1"
    port: int = 8766
    token: str = field(default="", repr=False)
    allowed_origins: tuple[str, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, at: str) -> None:
        check_not_empty(at, "bind", self.bind)
        check_port(at, "port", self.port)
        for i, origin in enumerate(self.allowed_origins):
            check_not_empty(at, f"allowed_origins[{i}]", origin)


def _check_token_forms(at: str, token: str, token_sha256: str, has_other: bool,
                       forms: str) -> None:
    if token_sha256 and not SHA256_HEX_RE.fullmatch(token_sha256):
        fail(dotted_key(at, "token_sha256"),
             "must be 64 hexadecimal characters (SHA-256 of the token)")
    if not (token or token_sha256 or has_other):
        fail(dotted_key(at, "token"), f"set {forms}")


@dataclass(frozen=True)
class TokenConfig:
    """One of a sensor's accepted tokens; several overlap during rotation."""

    token: str = field(default="", repr=False)
    token_sha256: str = ""
    not_after: str = ""

    def validate(self, at: str) -> None:
        _check_token_forms(at, self.token, self.token_sha256, False, "token or token_sha256")
        try:
            parse_not_after(self.not_after)
        except ValueError:
            fail(dotted_key(at, "not_after"),
                  "must be an ISO 8601 time with a UTC offset, e.g. 2027-01-01T00:00:00Z")

    def expires_at(self) -> datetime | None:
        return parse_not_after(self.not_after)


@dataclass(frozen=True)
class SensorAuthConfig:
    id: str
    token: str = field(default="", repr=False)
    token_sha256: str = ""
    tokens: tuple[TokenConfig, ...] = ()

    def validate(self, at: str) -> None:
        if not SENSOR_ID_RE.fullmatch(self.id):
            fail(dotted_key(at, "id"), f"invalid sensor id {self.id[:140]!r}")
        _check_token_forms(at, self.token, self.token_sha256, bool(self.tokens),
                           "token, token_sha256 or tokens")


@dataclass(frozen=True)
class AuthConfig:
    """``fleet_token`` (or its hex ``fleet_token_sha256``): one token accepted for any
    well-formed sensor id that has no credentials of its own; for demos, not fleets."""

    sensors: tuple[SensorAuthConfig, ...] = ()
    fleet_token: str = field(default="", repr=False)
    fleet_token_sha256: str = ""
    # Security (docs/security.md): admin API credential, mutual-TLS identity rules,
    # rotated-token overlay file, rotation overlap, config file watch.
    admin_token: str = field(default="", repr=False)
    admin_token_sha256: str = ""
    client_cert_only: bool = False
    client_cert_dns_suffix: str = ""
    client_cert_cn_fallback: bool = False
    credentials_file: str = ""
    rotation_overlap_s: float = 86400.0
    reload_watch_s: float = 2.0

    def validate(self, at: str) -> None:
        for name in ("fleet_token_sha256", "admin_token_sha256"):
            value = getattr(self, name)
            if value and not SHA256_HEX_RE.fullmatch(value):
                fail(dotted_key(at, name),
                     "must be 64 hexadecimal characters (SHA-256 of the token)")
        check_non_negative(at, "rotation_overlap_s", self.rotation_overlap_s)
        check_non_negative(at, "reload_watch_s", self.reload_watch_s)
        first: dict[str, int] = {}
        for i, sensor in enumerate(self.sensors):
            if sensor.id in first:
                fail(dotted_key(at, f"sensors[{i}].id"),
                      f"duplicate sensor id {sensor.id!r} (first at "
                      f"{dotted_key(at, f'sensors[{first[sensor.id]}]')})")
            first[sensor.id] = i


@dataclass(frozen=True)
class SchedulerConfig:
    max_chunks: int = 64
    max_bytes: int = 4 * MIB
    max_in_flight: int = 128
    windows_per_sensor: int = 2
    global_max_windows: int = 1000
    window_timeout_s: float = 10.0
    quiet_s: float = 1.0

    def validate(self, at: str) -> None:
        for name in ("max_chunks", "max_bytes", "max_in_flight", "windows_per_sensor",
                     "global_max_windows", "window_timeout_s"):
            check_positive(at, name, getattr(self, name))
        check_non_negative(at, "quiet_s", self.quiet_s)


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_s: float = 30.0
    missed_before_disconnect: int = 2

    def validate(self, at: str) -> None:
        check_positive(at, "interval_s", self.interval_s)
        check_positive(at, "missed_before_disconnect", self.missed_before_disconnect)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: Literal["kv", "json"] = "kv"

    def validate(self, at: str) -> None:
        if self.level.upper() not in LOG_LEVELS:
            fail(dotted_key(at, "level"), f"must be one of {', '.join(LOG_LEVELS)}")


#: Result fields exported as ``pipeline_snapshot_value{field}`` unless configured otherwise:
#: the numbers the Open UXI test programs report (speed, DNS, ping, Wi-Fi, web).
DEFAULT_SNAPSHOT_FIELDS = ("download_mbps", "upload_mbps", "latency_ms", "lookup_ms",
                           "rtt_ms", "loss_pct", "rssi_dbm", "ttfb_ms")
_SNAPSHOT_FIELD_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_SNAPSHOT_FIELDS = 64
_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")


@dataclass(frozen=True)
class MetricsConfig:
    """``snapshot_fields``: dotted paths into each sensor's latest snapshot (decoded JSON)
    exported as gauges; ``[]`` exports none. The list bounds the series count."""

    enabled: bool = True
    snapshot_fields: tuple[str, ...] = DEFAULT_SNAPSHOT_FIELDS
    # Remote-write metric names whose latest sample per series is exported the same way
    # (field = the series in Prometheus text form, see docs/remote-write.md).
    snapshot_metrics: tuple[str, ...] = ()

    def validate(self, at: str) -> None:
        if len(self.snapshot_metrics) > MAX_SNAPSHOT_FIELDS:
            fail(dotted_key(at, "snapshot_metrics"), f"at most {MAX_SNAPSHOT_FIELDS} names")
        for i, name in enumerate(self.snapshot_metrics):
            if not _METRIC_NAME_RE.fullmatch(name):
                fail(dotted_key(at, f"snapshot_metrics[{i}]"), "must be a metric name")
        if len(self.snapshot_fields) > MAX_SNAPSHOT_FIELDS:
            fail(dotted_key(at, "snapshot_fields"), f"at most {MAX_SNAPSHOT_FIELDS} fields")
        for i, name in enumerate(self.snapshot_fields):
            if not _SNAPSHOT_FIELD_RE.fullmatch(name) or len(name) > 200:
                fail(dotted_key(at, f"snapshot_fields[{i}]"),
                      "must be a field name or dotted path (letters, digits, _ and -)")



@dataclass(frozen=True)
class LimitsConfig:
    """Throttling and hostile-client limits (docs/security.md); 0 switches a limit off
    where noted in examples/server.yml."""

    chunk_rate: float = 200.0
    chunk_burst: int = 400
    auth_failures_before_ban: int = 20
    auth_failure_window_s: float = 60.0
    ban_s: float = 300.0
    max_connections_per_address: int = 256
    header_timeout_s: float = 15.0
    body_timeout_s: float = 30.0
    tls_handshake_timeout_s: float = 10.0
    ws_ping_interval_s: float = 30.0
    max_event_bytes: int = 64 * MIB
    throttle_delay_s: float = 1.0

    def validate(self, at: str) -> None:
        for name in ("chunk_rate", "auth_failures_before_ban", "auth_failure_window_s", "ban_s",
                     "max_connections_per_address", "ws_ping_interval_s", "throttle_delay_s"):
            check_non_negative(at, name, getattr(self, name))
        for name in ("chunk_burst", "header_timeout_s", "body_timeout_s",
                     "tls_handshake_timeout_s", "max_event_bytes"):
            check_positive(at, name, getattr(self, name))


LISTENER_NAMES = ("control", "ingest", "stream")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9-]+$")


@dataclass(frozen=True)
class ProxyConfig:
    """A TLS-terminating reverse proxy in front of the listeners (docs/tls-proxy.md).

    Requests whose TCP peer is in ``trusted_proxies`` (addresses or CIDRs) carry the client
    certificate the proxy verified and the client's real address in the named headers;
    from every other peer those headers are ignored and counted as forgery attempts.
    ``require_client_cert`` lists the listeners on which a client certificate (forwarded,
    or presented directly when the listener has ``tls.client_ca``) is mandatory."""

    trusted_proxies: tuple[str, ...] = ()
    require_client_cert: tuple[Literal["control", "ingest", "stream"], ...] = ()
    client_cert_header: str = "X-Client-Cert"
    client_verify_header: str = "X-Client-Verify"
    client_address_header: str = "X-Real-IP"

    def validate(self, at: str) -> None:
        for i, entry in enumerate(self.trusted_proxies):
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                fail(dotted_key(at, f"trusted_proxies[{i}]"),
                     f"must be an IP address or CIDR, e.g. 127.0.0.1 or 10.0.0.0/24, "
                     f"got {entry[:64]!r}")
        for name in ("client_cert_header", "client_verify_header", "client_address_header"):
            if not _HEADER_NAME_RE.fullmatch(getattr(self, name)):
                fail(dotted_key(at, name), "must be an HTTP header name (letters, digits, -)")
        if self.require_client_cert and not self.trusted_proxies:
            fail(dotted_key(at, "require_client_cert"),
                 "needs proxy.trusted_proxies: without a trusted proxy no forwarded client "
                 "certificate is ever accepted (for direct mutual TLS set "
                 "<listener>.tls.client_ca instead)")


@dataclass(frozen=True)
class DashboardSensorConfig:
    """Labels the UXI payload shows for one sensor (``dashboard.sensors.<id>``)."""

    name: str = ""
    site: str = ""
    region: str = ""
    isp: str = ""


@dataclass(frozen=True)
class DashboardConfig:
    """The operators' page, ``GET /v1/dashboard`` and the stream's dashboard messages
    (docs/dashboard.md). Thresholds colour the fleet and raise the pipeline's alerts."""

    sample_path: str = ""
    allow_origins: tuple[str, ...] = ("*",)
    reporting_window_s: float = 3600.0
    timeline_points: int = 12
    push_interval_s: float = 15.0
    heartbeat_stale_s: float = 90.0
    result_stale_s: float = 900.0
    queue_warning: int = 100
    queue_critical: int = 1000
    skew_warning_ms: float = 2000.0
    skew_critical_ms: float = 30000.0
    availability_warning_pct: float = 99.0
    availability_critical_pct: float = 95.0
    latency_warning_ms: float = 150.0
    max_samples: int = 500000
    sensors: dict[str, DashboardSensorConfig] = field(default_factory=dict)

    def validate(self, at: str) -> None:
        for name in ("reporting_window_s", "timeline_points", "heartbeat_stale_s",
                     "result_stale_s", "queue_warning", "queue_critical", "skew_warning_ms",
                     "skew_critical_ms", "latency_warning_ms", "max_samples"):
            check_positive(at, name, getattr(self, name))
        check_non_negative(at, "push_interval_s", self.push_interval_s)
        if self.timeline_points > 500:
            fail(dotted_key(at, "timeline_points"), "at most 500")
        for low, high in (("queue_warning", "queue_critical"),
                          ("skew_warning_ms", "skew_critical_ms"),
                          ("availability_critical_pct", "availability_warning_pct")):
            if getattr(self, low) > getattr(self, high):
                fail(dotted_key(at, low), f"must not be greater than {dotted_key(at, high)}")
        for name in ("availability_warning_pct", "availability_critical_pct"):
            if not 0 <= getattr(self, name) <= 100:
                fail(dotted_key(at, name), "must be a percentage between 0 and 100")
        for i, origin in enumerate(self.allow_origins):
            check_not_empty(at, f"allow_origins[{i}]", origin)
        for sensor_id in self.sensors:
            if not SENSOR_ID_RE.fullmatch(sensor_id):
                fail(dotted_key(at, f"sensors.{sensor_id[:140]}"), "invalid sensor id")


@dataclass(frozen=True)
class MemoryConfig:
    """Limits on what the server keeps in memory, so its resident size stays within a
    budget whatever the store size (docs/reliability.md has the budget and figures)."""

    sqlite_cache_kib: int = 16 * 1024       # SQLite page cache of each store connection
    slice_cache_kib: int = 16 * 1024        # gzip slices of incomplete events
    read_page_max_kib: int = 8 * 1024       # event bytes in one read-API page (>= 1 event)
    snapshot_payload_max_kib: int = 1024    # larger latest-event payloads are not cached
    ack_ledger_sequences: int = 4096        # per sensor, for re-acks (0 = no re-acks)

    def validate(self, at: str) -> None:
        for name in ("sqlite_cache_kib", "read_page_max_kib"):
            check_positive(at, name, getattr(self, name))
        for name in ("slice_cache_kib", "snapshot_payload_max_kib", "ack_ledger_sequences"):
            check_non_negative(at, name, getattr(self, name))


@dataclass(frozen=True)
class ProcessConfig:
    """``workers``: server processes on this host, each a replica sharing the listeners'
    ports (SO_REUSEPORT); more than 1 needs ``store.engine: postgres`` (docs/scaling.md)."""

    workers: int = 1

    def validate(self, at: str) -> None:
        check_positive(at, "workers", self.workers)


@dataclass(frozen=True)
class ServerConfig:
    server: ProcessConfig = field(default_factory=ProcessConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)

    def validate(self, at: str) -> None:
        if self.server.workers > 1 and self.store.engine != "postgres":
            fail(dotted_key(at, "server.workers"),
                 f"{self.server.workers} workers need store.engine: postgres (a SQLite file "
                 "has one writer process); set it to 1 or move the store to PostgreSQL")
