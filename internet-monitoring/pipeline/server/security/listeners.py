"""Listening sockets with hostile-client limits aiohttp's ``TCPSite`` does not offer.

``GuardedSite`` is a ``TCPSite`` replacement that adds:

* a TLS handshake deadline (``ssl_handshake_timeout``; asyncio's default is 60 s);
* a cap on concurrent connections per client address (``ConnectionLimiter``): the
  connection over the cap is aborted before aiohttp sees a byte of it.

The other deadlines are aiohttp's own and are set on the runner by the app
(``keepalive_timeout``: request headers must be complete within it, measured from the
connection start or the previous response, which is what stops a client sending one
header byte per second; it is also the keep-alive idle timeout) or in the handlers (the
body read deadline).

TLS contexts are created once per listener and reloaded in place (``reload_ssl_context``):
the listening socket keeps its context object, so a reloaded certificate is used by every
handshake that starts after the reload, and open connections keep going.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, Callable

from aiohttp import web

from pipeline.common.config import TlsConfig
from pipeline.common.errors import ConfigError
from pipeline.server.security.throttle import ConnectionLimiter

log = logging.getLogger(__name__)


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return str(peer or "")


class _GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: admits or aborts the connection, and
    releases its slot when it ends. Everything else is passed through unchanged."""

    def __init__(self, inner: asyncio.Protocol, limiter: ConnectionLimiter, listener: str,
                 on_refused: Callable[[str, str], None] | None) -> None:
        self._inner = inner
        self._limiter = limiter
        self._listener = listener
        self._on_refused = on_refused
        self._host: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = _peer_host(transport)
        if not self._limiter.acquire(host):
            log.warning("connection_refused listener=%s address=%s reason=per_address_cap "
                        "cap=%d", self._listener, host, self._limiter.max_per_address)
            if self._on_refused is not None:
                self._on_refused(self._listener, host)
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                transport.close()
            return
        self._host = host
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._host is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._host is not None:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._host is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._host is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._host is None:
            return
        self._limiter.release(self._host)
        self._host = None
        self._inner.connection_lost(exc)


class GuardedSite(web.BaseSite):
    """``TCPSite`` with a per-address connection cap and a TLS handshake deadline."""

    __slots__ = ("_host", "_port", "_bound_port", "_limiter", "_handshake_timeout",
                 "_listener", "_on_refused", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *,
                 ssl_context: ssl.SSLContext | None = None, limiter: ConnectionLimiter,
                 handshake_timeout: float = 10.0, listener: str = "",
                 on_refused: Callable[[str, str], None] | None = None,
                 backlog: int = 128, reuse_port: bool = False) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._reuse_port = reuse_port  # server.workers > 1: N processes share the port
        self._host = host
        self._port = port
        self._bound_port: int | None = None
        self._limiter = limiter
        self._handshake_timeout = handshake_timeout
        self._listener = listener
        self._on_refused = on_refused

    @property
    def port(self) -> int:
        return self._bound_port if self._bound_port is not None else self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def factory() -> asyncio.Protocol:
            return _GuardedProtocol(server(), self._limiter, self._listener, self._on_refused)

        kwargs: dict[str, Any] = {"ssl": self._ssl_context, "backlog": self._backlog}
        if self._reuse_port:
            kwargs["reuse_port"] = True
        if self._ssl_context is not None:
            kwargs["ssl_handshake_timeout"] = self._handshake_timeout
        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, **kwargs)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def reload_ssl_context(ctx: ssl.SSLContext, tls: TlsConfig, at: str) -> None:
    """Load the listener's certificate, key and client CA again into the live context.

    New handshakes use the new certificate at once. ``client_ca`` is *added* to the trusted
    set (OpenSSL offers no way to remove a CA from a live context): dropping a client CA
    needs a restart, which docs/security.md says."""
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{at}.tls: cannot load cert/key: {exc}",
                          field=f"{at}.tls.cert") from exc
    if tls.client_ca:
        try:
            ctx.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{at}.tls: cannot load client_ca: {exc}",
                              field=f"{at}.tls.client_ca") from exc
