"""The forwarder's HTTP edge: one remote-write 1.0 POST, answered by a status or None.

Everything about what to send and what an answer means is in ``plan``; this module only
builds the TLS context, the credentials and the request, and never raises for an answer
(a refused connection, a timeout or a TLS failure is ``None``: no answer, retried).
"""

from __future__ import annotations

import base64
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import aiohttp

from pipeline.common import remote_write
from pipeline.common.config import RemoteWriteForwardConfig
from pipeline.common.remote_write import Series
from pipeline.version import SOFTWARE_VERSION

log = logging.getLogger(__name__)

REASON_MAX_BYTES = 512


@dataclass(frozen=True)
class Answer:
    status: int | None
    reason: str


def client_ssl_context(config: RemoteWriteForwardConfig) -> ssl.SSLContext | None:
    """The TLS context for an https URL (None for http)."""
    if not config.url.lower().startswith("https://"):
        return None
    tls = config.tls
    ctx = ssl.create_default_context(cafile=tls.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class RemoteWriteClient:
    """POSTs ``WriteRequest`` bodies to one receiver over one connection pool."""

    def __init__(self, config: RemoteWriteForwardConfig) -> None:
        self.config = config
        self._ssl = client_ssl_context(config)
        self._session: aiohttp.ClientSession | None = None

    def _authorization(self) -> str | None:
        """``Basic ...`` from ``basic_auth`` (the password file is read at every send)."""
        basic = self.config.basic_auth
        if not basic.username:
            return None
        password = basic.password
        if basic.password_file:
            password = Path(basic.password_file).read_text(encoding="utf-8").strip()
        pair = f"{basic.username}:{password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _headers(self) -> dict[str, str]:
        headers = dict(self.config.headers)
        authorization = self._authorization()
        if authorization is not None:
            headers["Authorization"] = authorization
        headers.update({"Content-Type": remote_write.HTTP_CONTENT_TYPE,
                        "Content-Encoding": remote_write.HTTP_CONTENT_ENCODING,
                        remote_write.VERSION_HEADER: remote_write.VERSION,
                        "User-Agent": f"pipeline-server/{SOFTWARE_VERSION}"})
        return headers

    async def send(self, series: Sequence[Series]) -> Answer:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        body = remote_write.encode(remote_write.build(series))
        kwargs: dict[str, object] = {}
        if self._ssl is not None:
            kwargs["ssl"] = self._ssl
            if self.config.tls.server_name:
                kwargs["server_hostname"] = self.config.tls.server_name
        try:
            async with self._session.post(self.config.url, data=body, headers=self._headers(),
                                          **kwargs) as response:  # type: ignore[arg-type]
                text = (await response.content.read(REASON_MAX_BYTES)).decode(
                    "utf-8", "replace").strip()
                return Answer(response.status, text)
        except (TimeoutError, aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            # includes an unreadable password_file: retried, and logged by the caller
            return Answer(None, f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
