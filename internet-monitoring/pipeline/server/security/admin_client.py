"""Client side of the admin API, for ``pipeline-server token rotate`` (docs/security.md).

The admin token is read from ``PIPELINE_ADMIN_TOKEN`` or a file (``--admin-token-file``),
never from the command line, where ``ps`` would show it. The server's answer holds no
secret (the new token goes only to the sensor; the answer carries its 8-character hint).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline.common.config import ServerConfig
from pipeline.common.errors import ConfigError

ADMIN_TOKEN_ENV = "PIPELINE_ADMIN_TOKEN"
DEFAULT_TIMEOUT_S = 30.0
_WILDCARD_BINDS = ("", "0.0.0.0", "::", "[::]")


def ingest_base_url(config: ServerConfig) -> str:
    """Where this configuration's ingest listener answers, seen from the same host."""
    ingest = config.ingest
    host = "127.0.0.1" if ingest.bind in _WILDCARD_BINDS else ingest.bind
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    scheme = "https" if ingest.tls.enabled else "http"
    return f"{scheme}://{host}:{ingest.port}"


def read_admin_token(token_file: str | None) -> str:
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the admin token file: {exc.strerror or exc}",
                              field="--admin-token-file") from exc
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no admin token: set {ADMIN_TOKEN_ENV} or --admin-token-file",
                          field=ADMIN_TOKEN_ENV)
    return token


@dataclass(frozen=True)
class AdminAnswer:
    status: int
    doc: dict[str, Any]


def _ssl_context(cafile: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=cafile or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}", field="--cafile") from exc
    return ctx


def post_admin(url: str, admin_token: str, body: dict[str, Any] | None = None, *,
               cafile: str | None = None, cert: str | None = None, key: str | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> AdminAnswer:
    """POST a JSON body with the admin token; network failures raise ``ConnectionError``."""
    data = json.dumps(body or {}).encode("utf-8")
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"})
    context = _ssl_context(cafile, cert, key) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return AdminAnswer(response.status, _json(response.read()))
    except urllib.error.HTTPError as exc:
        return AdminAnswer(exc.code, _json(exc.read()))
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc


def _json(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def rotate_url(base_url: str, sensor_id: str) -> str:
    return f"{base_url.rstrip('/')}/v1/sensors/{quote(sensor_id, safe='')}/rotate"
