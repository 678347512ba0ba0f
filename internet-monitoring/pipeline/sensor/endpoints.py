"""Where and how the sensor reaches the server: endpoint URLs and the client TLS context."""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.common.errors import ConfigError

log = logging.getLogger(__name__)

INGEST_PATH = "/v1/ingest/chunk"
CONTROL_PATH = "/control"


def build_ssl_context(tls: Any, url: str, section: str) -> ssl.SSLContext | None:
    """The client TLS context for ``url`` from a ``tls`` config section, or None for
    plain ``ws://`` / ``http://``.

    ``ca_cert`` pins the server's CA (instead of the system store); ``cert``/``key`` give
    a client certificate; ``skip_verify`` turns verification off and says so loudly on
    every start.
    """
    scheme = urlsplit(url).scheme.lower()
    secure = scheme in ("wss", "https")
    enabled = bool(getattr(tls, "enabled", False)) if tls is not None else False
    if enabled and not secure:
        raise ConfigError(f"{section}.tls.enabled is true but {section}.url uses {scheme}://",
                          field=f"{section}.tls.enabled")
    if not secure:
        return None
    # With tls.enabled false a wss:// or https:// URL uses the system store and no client
    # certificate: the platform renders TLS paths whose files it did not write.
    files = tls if enabled else None
    ca_cert = getattr(files, "ca_cert", None) if files is not None else None
    cert = getattr(files, "cert", None) if files is not None else None
    key = getattr(files, "key", None) if files is not None else None
    skip_verify = bool(getattr(tls, "skip_verify", False)) if tls is not None else False
    try:
        context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
        if cert:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}.tls: cannot load certificates: {exc}",
                          field=f"{section}.tls") from exc
    if key and not cert:
        raise ConfigError(f"{section}.tls.key is set without {section}.tls.cert",
                          field=f"{section}.tls.cert")
    if skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning("tls_verification_disabled section=%s url=%s "
                    "note=server_certificate_NOT_checked_do_not_use_in_production",
                    section, redact_url(url))
    return context


def redact_url(url: str) -> str:
    """Drop any userinfo and query from a URL before it is logged."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def ingest_endpoint(url: str) -> str:
    """The chunk endpoint: a bare base URL (``http://host:8081``) gets ``/v1/ingest/chunk``."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, INGEST_PATH, parts.query, ""))
    return url


def batch_endpoint(chunk_url: str) -> str:
    """The batch endpoint next to the chunk endpoint: ``.../chunk`` -> ``.../batch``."""
    parts = urlsplit(chunk_url)
    base, _, last = parts.path.rpartition("/")
    path = f"{base}/batch" if last == "chunk" else f"{parts.path.rstrip('/')}/batch"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def control_endpoint(url: str) -> str:
    """The control URL: a bare base URL (``ws://host:8765``) gets ``/control``."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit((parts.scheme, parts.netloc, CONTROL_PATH, parts.query, ""))
    return url
