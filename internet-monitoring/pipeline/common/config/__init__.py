"""Typed configuration of the server and the sensor: a YAML file, then environment overrides.

One tree of frozen dataclasses per program (``server_schema``, ``sensor_schema``, sections
both use in ``shared_schema``). The generic loader (``loader``) walks the dataclass fields
and the YAML mapping (``yaml_reader``) together, so an unknown key, a wrong type or a bad
value stops start-up with a ``ConfigError`` whose ``field`` is the dotted key
(``ingest.tls.cert``, ``auth.sensors[1].token``). Value checks (``checks``) live in each
section's ``validate(at)`` method.
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

This package exports what callers import: ``from pipeline.common.config import ...``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.config.checks import (
    IGNORED,
    KIB,
    LOG_LEVELS,
    MAX_SLICE_SIZE,
    MIB,
    MIN_SLICE_SIZE,
    NO_ENV,
    SENSOR_ENV_PREFIX,
    SENSOR_TOKEN_ENV,
    SERVER_ENV_PREFIX,
    STREAM_TOKEN_ENV,
    Synchronous,
    ignored_field,
    parse_not_after,
)
from pipeline.common.config.loader import load_tree
from pipeline.common.config.sensor_schema import (
    BASE_CAPABILITIES,
    DEFAULT_CAPABILITIES,
    BackoffConfig,
    SensorConfig,
    SensorControlConfig,
    SensorIngestConfig,
    SensorMetricsConfig,
    SensorQueueConfig,
    SensorTlsConfig,
    SubmitConfig,
    TimeSyncConfig,
    exact_capabilities,
    expand_capabilities,
)
from pipeline.common.config.server_schema import (
    DEFAULT_SNAPSHOT_FIELDS,
    LISTENER_NAMES,
    MAX_SNAPSHOT_FIELDS,
    AuthConfig,
    ControlConfig,
    DashboardConfig,
    DashboardSensorConfig,
    HeartbeatConfig,
    IngestConfig,
    LimitsConfig,
    LoggingConfig,
    MemoryConfig,
    MetricsConfig,
    ProxyConfig,
    SchedulerConfig,
    SensorAuthConfig,
    ServerConfig,
    StoreConfig,
    StreamConfig,
    TlsConfig,
    TokenConfig,
)
from pipeline.common.config.forward_schema import (
    BasicAuthConfig,
    ForwardConfig,
    ForwardTlsConfig,
    RemoteWriteForwardConfig,
)
from pipeline.common.config.shared_schema import TracingConfig
from pipeline.common.config.sources_schema import (
    RemoteWriteSourceConfig,
    ScrapeTargetConfig,
    SourcesConfig,
)
from pipeline.common.config.yaml_reader import read_yaml_file

log = logging.getLogger(__name__)

#: Kept for callers that import it by this name (common/config_check.py).
_read_yaml_file = read_yaml_file

_SERVER_CONVENIENCES = {STREAM_TOKEN_ENV: ("stream", "token")}
_SENSOR_CONVENIENCES = {SENSOR_TOKEN_ENV: ("token",)}


def server_config_from_dict(doc: Any, env: Mapping[str, str] = NO_ENV) -> ServerConfig:
    """Build the server config from an already parsed document (tests, check-config)."""
    return load_tree(ServerConfig, doc, env, SERVER_ENV_PREFIX, _SERVER_CONVENIENCES)[0]


def sensor_config_from_dict(doc: Any, env: Mapping[str, str] = NO_ENV) -> SensorConfig:
    """Build the sensor config from an already parsed document."""
    return load_tree(SensorConfig, doc, env, SENSOR_ENV_PREFIX, _SENSOR_CONVENIENCES)[0]


def load_server_config(path: str | Path | None,
                       env: Mapping[str, str] = os.environ) -> ServerConfig:
    """Read ``path`` (``None``: defaults only), apply ``env``, validate."""
    doc = read_yaml_file(path) if path is not None else None
    config, sources = load_tree(ServerConfig, doc, env, SERVER_ENV_PREFIX, _SERVER_CONVENIENCES)
    log.info("config_loaded program=server path=%s env_overrides=%s",
             path or "-", ",".join(sorted(sources)) or "-")
    return config


def load_sensor_config(path: str | Path | None,
                       env: Mapping[str, str] = os.environ) -> SensorConfig:
    """Read ``path`` (``None``: environment only), apply ``env``, validate."""
    doc = read_yaml_file(path) if path is not None else None
    config, sources = load_tree(SensorConfig, doc, env, SENSOR_ENV_PREFIX, _SENSOR_CONVENIENCES)
    log.info("config_loaded program=sensor path=%s sensor_id=%s env_overrides=%s",
             path or "-", config.sensor_id, ",".join(sorted(sources)) or "-")
    return config


__all__ = [
    "BASE_CAPABILITIES", "DEFAULT_CAPABILITIES", "DEFAULT_SNAPSHOT_FIELDS", "IGNORED", "KIB",
    "LISTENER_NAMES", "LOG_LEVELS", "MAX_SLICE_SIZE", "MAX_SNAPSHOT_FIELDS", "MIB",
    "MIN_SLICE_SIZE", "SENSOR_ENV_PREFIX", "SENSOR_TOKEN_ENV", "SERVER_ENV_PREFIX",
    "STREAM_TOKEN_ENV", "Synchronous", "RemoteWriteSourceConfig", "ScrapeTargetConfig",
    "SourcesConfig", "AuthConfig", "BackoffConfig", "BasicAuthConfig",
    "ControlConfig", "ForwardConfig", "ForwardTlsConfig", "RemoteWriteForwardConfig",
    "DashboardConfig", "DashboardSensorConfig", "HeartbeatConfig", "IngestConfig",
    "LimitsConfig", "LoggingConfig", "MemoryConfig", "MetricsConfig", "ProxyConfig",
    "SchedulerConfig", "SensorAuthConfig", "SensorConfig", "SensorControlConfig",
    "SensorIngestConfig", "SensorMetricsConfig", "SensorQueueConfig", "SensorTlsConfig",
    "ServerConfig", "StoreConfig", "StreamConfig", "SubmitConfig", "TimeSyncConfig",
    "TlsConfig", "TokenConfig", "TracingConfig", "exact_capabilities", "expand_capabilities",
    "ignored_field", "load_sensor_config", "load_server_config", "parse_not_after",
    "sensor_config_from_dict", "server_config_from_dict"
]
