"""Typed configuration of the server and the sensor: a YAML file, then environment overrides.

One tree of frozen dataclasses per program. A small generic loader walks the dataclass fields
and the YAML mapping together, so an unknown key, a wrong type or a bad value stops start-up
with a ``ConfigError`` whose ``field`` is the dotted key (``ingest.tls.cert``,
``auth.sensors[1].token``). Value checks live in each section's ``validate(at)`` method.

Environment overrides, applied over the file in this order (later wins):

1. conveniences: ``PIPELINE_SENSOR_TOKEN`` (sensor ``token``) and ``PIPELINE_STREAM_TOKEN``
   (server ``stream.token``);
2. generic: ``PIPELINE_SERVER__STREAM__TOKEN=x``, ``PIPELINE_SENSOR__QUEUE__MAX_BYTES=null``:
   the prefix, then one segment per key joined by ``__``; a number selects a list item
   (``PIPELINE_SERVER__AUTH__SENSORS__0__TOKEN``). A value for a text key is taken verbatim
   (so a token ``0123`` stays text); any other value is parsed as YAML (``true``, ``8080``,
   ``[a, b]``, ``null``).

YAML timestamps are read as plain strings (``not_after: 2027-01-01T00:00:00Z`` stays text)
and a key repeated in one mapping is an error, not a silent "last one wins".
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import logging
import math
import os
import re
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Mapping, NoReturn, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from pipeline.common.errors import ConfigError
from pipeline.common.messages import SENSOR_ID_RE
from pipeline.version import SOFTWARE_VERSION

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1024 * 1024
KIB = 1024
SERVER_ENV_PREFIX = "PIPELINE_SERVER"
SENSOR_ENV_PREFIX = "PIPELINE_SENSOR"
SENSOR_TOKEN_ENV = "PIPELINE_SENSOR_TOKEN"
STREAM_TOKEN_ENV = "PIPELINE_STREAM_TOKEN"
MIN_SLICE_SIZE = 64 * KIB
MAX_SLICE_SIZE = 256 * KIB
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_NO_ENV: Mapping[str, str] = types.MappingProxyType({})

Synchronous = Literal["FULL", "NORMAL"]

#: Field metadata marking a key the platform's playbook renders but this pipeline does not
#: use: accepted, documented in the examples, logged once as ignored (common/config_check.py).
IGNORED = "ignored"


def ignored_field(default: Any, reason: str) -> Any:
    """A key accepted for compatibility with rendered platform configs, and not used."""
    return field(default=default, metadata={IGNORED: reason})


# ---------------------------------------------------------------------------------------
# Value checks used by the validate() methods


def _key(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


def _fail(key: str, problem: str) -> NoReturn:
    raise ConfigError(f"{key}: {problem}", field=key or None)


def _check_port(at: str, name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        _fail(_key(at, name), f"must be a port number between 0 and 65535, got {value}")


def _check_positive(at: str, name: str, value: float) -> None:
    if value <= 0:
        _fail(_key(at, name), f"must be greater than 0, got {value}")


def _check_non_negative(at: str, name: str, value: float) -> None:
    if value < 0:
        _fail(_key(at, name), f"must not be negative, got {value}")


def _check_not_empty(at: str, name: str, value: str) -> None:
    if not value.strip():
        _fail(_key(at, name), "must not be empty")


def _check_url(at: str, name: str, value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        wanted = " or ".join(f"{s}://" for s in schemes)
        _fail(_key(at, name), f"must be a {wanted} URL")
    return parts.scheme


def _check_listen(at: str, name: str, value: str) -> None:
    """``""`` (off) or ``host:port``; IPv6 hosts in brackets (``[::1]:9000``)."""
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        _fail(_key(at, name), "must be empty or host:port, e.g. 127.0.0.1:8089")


def _check_tls_scheme(at: str, scheme: str, tls_enabled: bool, secure: str) -> None:
    if tls_enabled and scheme != secure:
        _fail(_key(at, "url"), f"tls.enabled is true but the URL is not {secure}://")


def parse_not_after(value: str) -> datetime | None:
    """``""`` means no expiry; otherwise an ISO 8601 time with a UTC offset."""
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("no UTC offset")
    return moment


# ---------------------------------------------------------------------------------------
# Server sections


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
                    _fail(_key(at, name), "required when enabled is true")


@dataclass(frozen=True)
class StoreConfig:
    path: str = "./var/server.db"
    retention_hours: int = 720
    engine: Literal["sqlite", "postgres"] = "sqlite"
    dsn: str = field(default="", repr=False)
    synchronous: Synchronous = "FULL"
    # Disk held back so checkpoints, control state and retention work on a full disk.
    reserve_bytes: int = 64 * MIB

    def validate(self, at: str) -> None:
        _check_positive(at, "retention_hours", self.retention_hours)
        if self.reserve_bytes < 0:
            _fail(_key(at, "reserve_bytes"), "must be 0 (off) or a number of bytes")
        if self.engine == "sqlite":
            _check_not_empty(at, "path", self.path)
        elif not self.dsn:
            _fail(_key(at, "dsn"), "required when engine is postgres")


@dataclass(frozen=True)
class ControlConfig:
    bind: str = "127.0.0.1"
    port: int = 8765
    path: str = "/control"
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, at: str) -> None:
        _check_not_empty(at, "bind", self.bind)
        _check_port(at, "port", self.port)
        if not self.path.startswith("/"):
            _fail(_key(at, "path"), "must start with /")


@dataclass(frozen=True)
class IngestConfig:
    bind: str = "127.0.0.1"
    port: int = 8081
    max_body_bytes: int = 4 * MIB
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, at: str) -> None:
        _check_not_empty(at, "bind", self.bind)
        _check_port(at, "port", self.port)
        _check_positive(at, "max_body_bytes", self.max_body_bytes)


@dataclass(frozen=True)
class StreamConfig:
    """``token`` empty = open stream; ``allowed_origins`` empty = any origin."""

    bind: str = "127.0.0.1"
    port: int = 8766
    token: str = field(default="", repr=False)
    allowed_origins: tuple[str, ...] = ()
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self, at: str) -> None:
        _check_not_empty(at, "bind", self.bind)
        _check_port(at, "port", self.port)
        for i, origin in enumerate(self.allowed_origins):
            _check_not_empty(at, f"allowed_origins[{i}]", origin)


def _check_token_forms(at: str, token: str, token_sha256: str, has_other: bool,
                       forms: str) -> None:
    if token_sha256 and not _SHA256_HEX_RE.fullmatch(token_sha256):
        _fail(_key(at, "token_sha256"), "must be 64 hexadecimal characters (SHA-256 of the token)")
    if not (token or token_sha256 or has_other):
        _fail(_key(at, "token"), f"set {forms}")


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
            _fail(_key(at, "not_after"),
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
            _fail(_key(at, "id"), f"invalid sensor id {self.id[:140]!r}")
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
            if value and not _SHA256_HEX_RE.fullmatch(value):
                _fail(_key(at, name), "must be 64 hexadecimal characters (SHA-256 of the token)")
        _check_non_negative(at, "rotation_overlap_s", self.rotation_overlap_s)
        _check_non_negative(at, "reload_watch_s", self.reload_watch_s)
        first: dict[str, int] = {}
        for i, sensor in enumerate(self.sensors):
            if sensor.id in first:
                _fail(_key(at, f"sensors[{i}].id"),
                      f"duplicate sensor id {sensor.id!r} (first at "
                      f"{_key(at, f'sensors[{first[sensor.id]}]')})")
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
            _check_positive(at, name, getattr(self, name))
        _check_non_negative(at, "quiet_s", self.quiet_s)


@dataclass(frozen=True)
class HeartbeatConfig:
    interval_s: float = 30.0
    missed_before_disconnect: int = 2

    def validate(self, at: str) -> None:
        _check_positive(at, "interval_s", self.interval_s)
        _check_positive(at, "missed_before_disconnect", self.missed_before_disconnect)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: Literal["kv", "json"] = "kv"

    def validate(self, at: str) -> None:
        if self.level.upper() not in LOG_LEVELS:
            _fail(_key(at, "level"), f"must be one of {', '.join(LOG_LEVELS)}")


#: Result fields exported as ``pipeline_snapshot_value{field}`` unless configured otherwise:
#: the numbers the Open UXI test programs report (speed, DNS, ping, Wi-Fi, web).
DEFAULT_SNAPSHOT_FIELDS = ("download_mbps", "upload_mbps", "latency_ms", "lookup_ms",
                           "rtt_ms", "loss_pct", "rssi_dbm", "ttfb_ms")
_SNAPSHOT_FIELD_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_SNAPSHOT_FIELDS = 64


@dataclass(frozen=True)
class MetricsConfig:
    """``snapshot_fields``: dotted paths into each sensor's latest snapshot (decoded JSON)
    exported as gauges; ``[]`` exports none. The list bounds the series count."""

    enabled: bool = True
    snapshot_fields: tuple[str, ...] = DEFAULT_SNAPSHOT_FIELDS

    def validate(self, at: str) -> None:
        if len(self.snapshot_fields) > MAX_SNAPSHOT_FIELDS:
            _fail(_key(at, "snapshot_fields"), f"at most {MAX_SNAPSHOT_FIELDS} fields")
        for i, name in enumerate(self.snapshot_fields):
            if not _SNAPSHOT_FIELD_RE.fullmatch(name) or len(name) > 200:
                _fail(_key(at, f"snapshot_fields[{i}]"),
                      "must be a field name or dotted path (letters, digits, _ and -)")


@dataclass(frozen=True)
class TracingConfig:
    """OpenTelemetry tracing (optional extra ``openuxi-pipeline[otel]``). Enabled without
    the extra installed, the process logs a warning and runs with a no-op tracer."""

    enabled: bool = False
    otlp_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    service_name: str = ""

    def validate(self, at: str) -> None:
        if self.otlp_endpoint:
            _check_url(at, "otlp_endpoint", self.otlp_endpoint, ("http", "https"))


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
            _check_non_negative(at, name, getattr(self, name))
        for name in ("chunk_burst", "header_timeout_s", "body_timeout_s",
                     "tls_handshake_timeout_s", "max_event_bytes"):
            _check_positive(at, name, getattr(self, name))


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
                _fail(_key(at, f"trusted_proxies[{i}]"),
                      f"must be an IP address or CIDR, e.g. 127.0.0.1 or 10.0.0.0/24, "
                      f"got {entry[:64]!r}")
        for name in ("client_cert_header", "client_verify_header", "client_address_header"):
            if not _HEADER_NAME_RE.fullmatch(getattr(self, name)):
                _fail(_key(at, name), "must be an HTTP header name (letters, digits, -)")
        if self.require_client_cert and not self.trusted_proxies:
            _fail(_key(at, "require_client_cert"),
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
            _check_positive(at, name, getattr(self, name))
        _check_non_negative(at, "push_interval_s", self.push_interval_s)
        if self.timeline_points > 500:
            _fail(_key(at, "timeline_points"), "at most 500")
        for low, high in (("queue_warning", "queue_critical"),
                          ("skew_warning_ms", "skew_critical_ms"),
                          ("availability_critical_pct", "availability_warning_pct")):
            if getattr(self, low) > getattr(self, high):
                _fail(_key(at, low), f"must not be greater than {_key(at, high)}")
        for name in ("availability_warning_pct", "availability_critical_pct"):
            if not 0 <= getattr(self, name) <= 100:
                _fail(_key(at, name), "must be a percentage between 0 and 100")
        for i, origin in enumerate(self.allow_origins):
            _check_not_empty(at, f"allow_origins[{i}]", origin)
        for sensor_id in self.sensors:
            if not SENSOR_ID_RE.fullmatch(sensor_id):
                _fail(_key(at, f"sensors.{sensor_id[:140]}"), "invalid sensor id")


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
            _check_positive(at, name, getattr(self, name))
        for name in ("slice_cache_kib", "snapshot_payload_max_kib", "ack_ledger_sequences"):
            _check_non_negative(at, name, getattr(self, name))


@dataclass(frozen=True)
class ServerConfig:
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


# ---------------------------------------------------------------------------------------
# Sensor sections


@dataclass(frozen=True)
class SensorTlsConfig:
    enabled: bool = False
    ca_cert: str = ""
    cert: str = ""
    key: str = ""
    skip_verify: bool = False

    def validate(self, at: str) -> None:
        if self.cert and not self.key:
            _fail(_key(at, "key"), "required when cert is set")
        if self.key and not self.cert:
            _fail(_key(at, "cert"), "required when key is set")


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
        _check_positive(at, "retention_hours", self.retention_hours)
        _check_positive(at, "cache_kib", self.cache_kib)
        if self.max_bytes is not None:
            _check_positive(at, "max_bytes", self.max_bytes)
        if self.reserve_bytes < 0:
            _fail(_key(at, "reserve_bytes"), "must be 0 (off) or a number of bytes")
        if not MIN_SLICE_SIZE <= self.slice_size <= MAX_SLICE_SIZE:
            _fail(_key(at, "slice_size"),
                  f"must be between {MIN_SLICE_SIZE} and {MAX_SLICE_SIZE} bytes (64-256 KiB)")


@dataclass(frozen=True)
class SensorControlConfig:
    url: str = "ws://127.0.0.1:8765/control"
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    headers: dict[str, str] = field(default_factory=dict)
    tls: SensorTlsConfig = field(default_factory=SensorTlsConfig)

    def validate(self, at: str) -> None:
        scheme = _check_url(at, "url", self.url, ("ws", "wss"))
        _check_tls_scheme(at, scheme, self.tls.enabled, "wss")
        _check_positive(at, "ping_interval", self.ping_interval)
        _check_positive(at, "ping_timeout", self.ping_timeout)


@dataclass(frozen=True)
class SensorIngestConfig:
    url: str = "http://127.0.0.1:8081/v1/ingest/chunk"
    timeout: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)
    tls: SensorTlsConfig = field(default_factory=SensorTlsConfig)
    max_parallel: int = 8

    def validate(self, at: str) -> None:
        scheme = _check_url(at, "url", self.url, ("http", "https"))
        _check_tls_scheme(at, scheme, self.tls.enabled, "https")
        _check_positive(at, "timeout", self.timeout)
        _check_positive(at, "max_parallel", self.max_parallel)


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
        _check_non_negative(at, "max_skew_ms", self.max_skew_ms)


@dataclass(frozen=True)
class BackoffConfig:
    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.1

    def validate(self, at: str) -> None:
        _check_positive(at, "initial_s", self.initial_s)
        if self.max_s < self.initial_s:
            _fail(_key(at, "max_s"), "must not be smaller than initial_s")
        if not 0 <= self.jitter < 1:
            _fail(_key(at, "jitter"), "must be at least 0 and below 1")


@dataclass(frozen=True)
class SubmitConfig:
    """Optional local HTTP endpoint where test programs hand events to the sensor."""

    listen: str = ""

    def validate(self, at: str) -> None:
        _check_listen(at, "listen", self.listen)


@dataclass(frozen=True)
class SensorMetricsConfig:
    listen: str = ""

    def validate(self, at: str) -> None:
        _check_listen(at, "listen", self.listen)


# proto, batch, http_ack: used only with a server that announces them too (1.0 servers
# get JSON single-chunk POSTs and ChunkAck deletes, as before).
DEFAULT_CAPABILITIES = ("chunks", "heartbeats", "epoch", "server_time", "heartbeat_stats",
                        "proto", "batch", "http_ack")
#: The protocol 1.0 base set. A ``capabilities`` list naming nothing beyond it (the
#: platform's old default ``[chunks, heartbeats]``) means "the base set and every
#: extension", minus ``capabilities_exclude``; a list naming any extension is taken as is.
BASE_CAPABILITIES = frozenset({"chunks", "heartbeats"})


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

    def __post_init__(self) -> None:
        if not self.queue.path:
            path = f"./var/sensor-{self.sensor_id}.db"
            object.__setattr__(self, "queue", replace(self.queue, path=path))
        object.__setattr__(self, "capabilities",
                           expand_capabilities(self.capabilities, self.capabilities_exclude))

    def validate(self, at: str) -> None:
        if not SENSOR_ID_RE.fullmatch(self.sensor_id):
            _fail(_key(at, "sensor_id"), f"invalid sensor id {self.sensor_id[:140]!r}")
        _check_not_empty(at, "software_version", self.software_version)
        if not self.token and not self.token_file:
            _fail(_key(at, "token"), f"set token or token_file (or {SENSOR_TOKEN_ENV})")
        _check_positive(at, "heartbeat_interval", self.heartbeat_interval)
        for i, capability in enumerate(self.capabilities):
            _check_not_empty(at, f"capabilities[{i}]", capability)
        for i, capability in enumerate(self.capabilities_exclude):
            if capability in BASE_CAPABILITIES:
                _fail(_key(at, f"capabilities_exclude[{i}]"),
                      f"{capability!r} is part of protocol 1.0 and cannot be excluded")


# ---------------------------------------------------------------------------------------
# YAML reading


class _Loader(yaml.SafeLoader):
    """Safe loader without timestamps (kept as text) and with duplicate-key detection."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader derives from SafeLoader
    except yaml.YAMLError as exc:
        # Only problem and position: the offending line may hold a secret.
        problem = getattr(exc, "problem", None) or "invalid YAML"
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: {problem}{where}") from exc


def _read_yaml_file(path: str | Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{path}: cannot read configuration file: {reason}") from exc
    return _parse_yaml(text, str(path))


# ---------------------------------------------------------------------------------------
# Generic loader: dataclass fields and the YAML mapping walked together


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (list, "list"), (tuple, "list"), (Mapping, "mapping")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _expected(tp: Any) -> str:
    origin = get_origin(tp)
    if _is_union(tp):
        return " or ".join(_expected(arg) for arg in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(tp))
    if origin in (list, tuple):
        return f"list of {_expected(get_args(tp)[0])}"
    if origin is dict or is_dataclass(tp):
        return "mapping"
    names = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _wrong_type(key: str, tp: Any, value: Any) -> NoReturn:
    _fail(key, f"expected {_expected(tp)}, got {_kind(value)}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        return _convert_union(tp, value, key)
    if origin is Literal:
        if not any(type(value) is type(arg) and value == arg for arg in get_args(tp)):
            got = repr(value[:64]) if isinstance(value, str) else _kind(value)
            _fail(key, f"expected {_expected(tp)}, got {got}")
        return value
    if is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _wrong_type(key, tp, value)
        item_type = get_args(tp)[0]
        items = [_convert(item_type, item, f"{key}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            _wrong_type(key, tp, value)
        key_type, value_type = get_args(tp)
        return {_convert(key_type, k, key): _convert(value_type, v, f"{key}.{k}")
                for k, v in value.items()}
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    options = get_args(tp)
    if value is None and type(None) in options:
        return None
    real = [arg for arg in options if arg is not type(None)]
    if len(real) == 1:
        inner = real[0]
        if is_dataclass(inner) or get_origin(inner) in (list, tuple, dict, Literal):
            return _convert(inner, value, key)  # its own errors name nested keys
        try:
            return _convert(inner, value, key)
        except ConfigError:
            _wrong_type(key, tp, value)
    for option in real:
        try:
            return _convert(option, value, key)
        except ConfigError:
            continue
    _wrong_type(key, tp, value)


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                value = float(value)
            except OverflowError:
                _fail(key, "number is too large")
            if not math.isfinite(value):
                _fail(key, "must be a finite number")
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"config field {key} has an unsupported type {tp!r}")
    if not ok:
        _wrong_type(key, tp, value)
    return value


def _build(cls: type[T], doc: Any, at: str) -> T:
    """Build and validate one dataclass from a mapping; ``at`` is its dotted key."""
    if doc is None:
        doc = {}  # an empty section (every sub-key commented out) means all defaults
    if not isinstance(doc, Mapping):
        _fail(at, f"expected mapping, got {_kind(doc)}")
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    for name in doc:
        if not isinstance(name, str):
            _fail(_key(at, str(name)), "keys must be strings")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            _fail(_key(at, name), f"unknown key{hint}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name in doc:
            values[name] = _convert(hints[name], doc[name], _key(at, name))
        elif spec.default is MISSING and spec.default_factory is MISSING:
            _fail(_key(at, name), "required key is missing")
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(at)
    return obj


def _plain(value: Any) -> Any:
    """A deep copy with plain dicts and lists, so overrides never touch the caller's data."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# Environment overrides


def _is_text(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(arg, str) for arg in get_args(tp))
    if _is_union(tp):
        real = [arg for arg in get_args(tp) if arg is not type(None)]
        return len(real) == 1 and _is_text(real[0])
    return False


def _resolve(cls: type, segments: list[str], env_name: str) -> tuple[str, list[str | int], Any]:
    """Map variable-name segments to (dotted key, path steps, target type)."""
    tp: Any = cls
    dotted = ""
    steps: list[str | int] = []
    for segment in segments:
        real = [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
        tp = real[0] if len(real) == 1 else tp
        if is_dataclass(tp):
            name = segment.lower()
            if not name:
                _fail(dotted, f"{env_name} has an empty key segment (a stray '__')")
            if name not in _hints(tp):
                _fail(_key(dotted, name), f"unknown key (from {env_name})")
            dotted, tp = _key(dotted, name), _hints(tp)[name]
            steps.append(name)
        elif get_origin(tp) in (list, tuple) and segment.isdigit():
            dotted, tp = f"{dotted}[{int(segment)}]", get_args(tp)[0]
            steps.append(int(segment))
        else:
            _fail(dotted, f"cannot set part of this value from {env_name}; set {dotted} as a whole")
    return dotted, steps, tp


def _assign(doc: dict[str, Any], steps: list[str | int], value: Any, env_name: str) -> None:
    node: Any = doc
    where = ""
    for i, step in enumerate(steps):
        if isinstance(step, int):
            if not isinstance(node, list):
                _fail(where, f"expected list, got {_kind(node)}")
            where = f"{where}[{step}]"
            if step >= len(node):
                _fail(where, f"no such list item to override (from {env_name})")
        else:
            if not isinstance(node, dict):
                _fail(where, f"expected mapping, got {_kind(node)}")
            where = _key(where, step)
        if i == len(steps) - 1:
            node[step] = value
            return
        child = node[step] if isinstance(step, int) else node.get(step)
        if child is None:
            child = [] if isinstance(steps[i + 1], int) else {}
            node[step] = child
        node = child


def _apply_env(cls: type, doc: dict[str, Any], env: Mapping[str, str], prefix: str,
               conveniences: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Apply overrides to ``doc`` in place; returns dotted key -> variable name."""
    overrides = [(name, list(path)) for name, path in conveniences.items() if name in env]
    start = prefix + "__"
    overrides += [(name, name[len(start):].split("__"))
                  for name in sorted(env) if name.startswith(start)]
    sources: dict[str, str] = {}
    for env_name, segments in overrides:
        dotted, steps, tp = _resolve(cls, segments, env_name)
        raw = env[env_name]
        if _is_text(tp):
            value: Any = raw
        else:
            try:
                value = yaml.load(raw, Loader=_Loader)  # noqa: S506
            except yaml.YAMLError as exc:
                raise ConfigError(f"{dotted}: {env_name} is not a valid YAML value",
                                  field=dotted) from exc
        _assign(doc, steps, value, env_name)
        sources[dotted] = env_name
    return sources


def _source_of(key: str | None, sources: Mapping[str, str]) -> str | None:
    if key is None:
        return None
    best = None
    for dotted, env_name in sources.items():
        if key == dotted or key.startswith(dotted + ".") or key.startswith(dotted + "["):
            if best is None or len(dotted) > len(best[0]):
                best = (dotted, env_name)
    return best[1] if best else None


def _load(cls: type[T], doc: Any, env: Mapping[str, str], prefix: str,
          conveniences: Mapping[str, tuple[str, ...]]) -> tuple[T, dict[str, str]]:
    if doc is None:
        doc = {}  # an empty file: defaults and environment only
    if not isinstance(doc, Mapping):
        raise ConfigError(f"configuration: expected a mapping at the top level, got {_kind(doc)}")
    data = _plain(doc)
    sources: dict[str, str] = {}
    try:
        sources = _apply_env(cls, data, env, prefix, conveniences)
        return _build(cls, data, ""), sources
    except ConfigError as exc:
        origin = _source_of(exc.field, sources)
        if origin is None:
            raise
        raise ConfigError(f"{exc.message} (set by {origin})", field=exc.field) from exc


# ---------------------------------------------------------------------------------------
# Public API

_SERVER_CONVENIENCES = {STREAM_TOKEN_ENV: ("stream", "token")}
_SENSOR_CONVENIENCES = {SENSOR_TOKEN_ENV: ("token",)}


def server_config_from_dict(doc: Any, env: Mapping[str, str] = _NO_ENV) -> ServerConfig:
    return _load(ServerConfig, doc, env, SERVER_ENV_PREFIX, _SERVER_CONVENIENCES)[0]


def sensor_config_from_dict(doc: Any, env: Mapping[str, str] = _NO_ENV) -> SensorConfig:
    return _load(SensorConfig, doc, env, SENSOR_ENV_PREFIX, _SENSOR_CONVENIENCES)[0]


def load_server_config(path: str | Path | None,
                       env: Mapping[str, str] = os.environ) -> ServerConfig:
    """Read ``path`` (``None``: defaults only), apply ``env``, validate."""
    doc = _read_yaml_file(path) if path is not None else None
    config, sources = _load(ServerConfig, doc, env, SERVER_ENV_PREFIX, _SERVER_CONVENIENCES)
    log.info("config_loaded program=server path=%s env_overrides=%s",
             path or "-", ",".join(sorted(sources)) or "-")
    return config


def load_sensor_config(path: str | Path | None,
                       env: Mapping[str, str] = os.environ) -> SensorConfig:
    """Read ``path`` (``None``: environment only), apply ``env``, validate."""
    doc = _read_yaml_file(path) if path is not None else None
    config, sources = _load(SensorConfig, doc, env, SENSOR_ENV_PREFIX, _SENSOR_CONVENIENCES)
    log.info("config_loaded program=sensor path=%s sensor_id=%s env_overrides=%s",
             path or "-", config.sensor_id, ",".join(sorted(sources)) or "-")
    return config


__all__ = [
    "AuthConfig", "BackoffConfig", "ControlConfig", "DashboardConfig",
    "DashboardSensorConfig", "HeartbeatConfig", "IngestConfig",
    "LimitsConfig", "LoggingConfig", "MemoryConfig", "MetricsConfig", "ProxyConfig",
    "SchedulerConfig", "SensorAuthConfig",
    "SensorConfig",
    "SensorControlConfig", "SensorIngestConfig", "SensorMetricsConfig", "SensorQueueConfig",
    "SensorTlsConfig", "ServerConfig", "StoreConfig", "StreamConfig", "SubmitConfig",
    "TimeSyncConfig", "TlsConfig", "TokenConfig", "exact_capabilities", "expand_capabilities",
    "load_sensor_config", "load_server_config",
    "parse_not_after", "sensor_config_from_dict", "server_config_from_dict",
]
