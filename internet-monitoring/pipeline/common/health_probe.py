"""``health`` subcommands: one GET against a local health endpoint, for container
HEALTHCHECKs and scripts (images carry no curl). Exit 0 when it answers 200, 1 otherwise.

Standard library only, so a probe costs no more than the interpreter's start.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from typing import TextIO

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
DEFAULT_TIMEOUT_S = 5.0


def local_url(scheme: str, bind: str, port: int, path: str) -> str:
    """The URL of a listener on this host: a wildcard bind is reached on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def probe(url: str, out: TextIO, timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """GET ``url``; a loopback https listener is probed without verifying its certificate
    (its name is the public one, not 127.0.0.1; the probe checks liveness, not identity)."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        out.write(f"unhealthy: {url}: {reason}\n")
        return EXIT_UNHEALTHY
    if status != 200:
        out.write(f"unhealthy: {url}: HTTP {status}\n")
        return EXIT_UNHEALTHY
    out.write(f"healthy: {url}\n")
    return EXIT_HEALTHY
