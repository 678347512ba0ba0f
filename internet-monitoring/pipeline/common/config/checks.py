"""Constants and value checks shared by the configuration schemas.

A check names the dotted key of the value it refuses (``ingest.tls.cert``): ``fail``
raises a ``ConfigError`` whose ``field`` is that key.
"""

from __future__ import annotations

import re
import types
from dataclasses import field
from datetime import datetime
from typing import Any, Literal, Mapping, NoReturn
from urllib.parse import urlsplit

from pipeline.common.errors import ConfigError

MIB = 1024 * 1024
KIB = 1024
SERVER_ENV_PREFIX = "PIPELINE_SERVER"
SENSOR_ENV_PREFIX = "PIPELINE_SENSOR"
SENSOR_TOKEN_ENV = "PIPELINE_SENSOR_TOKEN"
STREAM_TOKEN_ENV = "PIPELINE_STREAM_TOKEN"
MIN_SLICE_SIZE = 64 * KIB
MAX_SLICE_SIZE = 256 * KIB
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
NO_ENV: Mapping[str, str] = types.MappingProxyType({})

Synchronous = Literal["FULL", "NORMAL"]

#: Field metadata marking a key the platform's playbook renders but this pipeline does not
#: use: accepted, documented in the examples, logged once as ignored (common/config_check.py).
IGNORED = "ignored"


def ignored_field(default: Any, reason: str) -> Any:
    """A key accepted for compatibility with rendered platform configs, and not used."""
    return field(default=default, metadata={IGNORED: reason})


# ---------------------------------------------------------------------------------------
# Value checks used by the validate() methods


def dotted_key(at: str, name: str) -> str:
    """``name`` under the section at ``at`` (``""``: the top level)."""
    return f"{at}.{name}" if at else name


def fail(key: str, problem: str) -> NoReturn:
    """Refuse the value at ``key``."""
    raise ConfigError(f"{key}: {problem}", field=key or None)


def check_port(at: str, name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        fail(dotted_key(at, name), f"must be a port number between 0 and 65535, got {value}")


def check_positive(at: str, name: str, value: float) -> None:
    if value <= 0:
        fail(dotted_key(at, name), f"must be greater than 0, got {value}")


def check_non_negative(at: str, name: str, value: float) -> None:
    if value < 0:
        fail(dotted_key(at, name), f"must not be negative, got {value}")


def check_not_empty(at: str, name: str, value: str) -> None:
    if not value.strip():
        fail(dotted_key(at, name), "must not be empty")


def check_url(at: str, name: str, value: str, schemes: tuple[str, ...]) -> str:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        wanted = " or ".join(f"{s}://" for s in schemes)
        fail(dotted_key(at, name), f"must be a {wanted} URL")
    return parts.scheme


def check_listen(at: str, name: str, value: str) -> None:
    """``""`` (off) or ``host:port``; IPv6 hosts in brackets (``[::1]:9000``)."""
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fail(dotted_key(at, name), "must be empty or host:port, e.g. 127.0.0.1:8089")


def check_tls_scheme(at: str, scheme: str, tls_enabled: bool, secure: str) -> None:
    if tls_enabled and scheme != secure:
        fail(dotted_key(at, "url"), f"tls.enabled is true but the URL is not {secure}://")


def parse_not_after(value: str) -> datetime | None:
    """``""`` means no expiry; otherwise an ISO 8601 time with a UTC offset."""
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("no UTC offset")
    return moment

