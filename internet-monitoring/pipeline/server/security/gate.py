"""The security gate: who may do what, checked in one place for all three listeners.

``SecurityGate`` is shared by the control, ingest and stream applications (``GATE_KEY``)
and holds the credentials and the limits they enforce. The handlers ask it questions and
raise what it raises; ``security_middleware`` adds what no handler should repeat: the
per-address ban check before any authenticated route, and counting refused credentials
toward a ban. Reload (``pipeline.server.security.manager``) updates the gate in place.

Credentials and what they may do (docs/security.md)::

    sensor token (or bound client cert)   write its own chunks; open its own control
                                          channel; read nothing (401 on the read API when a
                                          stream token is set)
    stream token (stream.token)           read: the UI stream and the whole read API; and
                                          POST /v1/sensors/{id}/request (asks a sensor for
                                          data it already holds; writes nothing)
    admin token (auth.admin_token)        POST /v1/sensors/{id}/rotate, POST /v1/admin/reload
    none                                  /healthz /readyz /metrics /openapi.json; the read
                                          API and the stream when stream.token is empty

Mutual TLS (a listener with ``tls.client_ca``): the TLS layer refuses a missing, unknown-CA
or expired certificate; the gate then requires that the certificate name the sensor the
request claims (``X-Sensor-ID``, every chunk's ``sensor_id``), else 403. The token is still
checked unless ``auth.client_cert_only`` is true.

Behind a TLS-terminating proxy (``proxy.*``, docs/tls-proxy.md) the same checks run on the
certificate and address the proxy forwarded, believed only from ``proxy.trusted_proxies``
(``pipeline.server.security.forwarded``); listeners in ``proxy.require_client_cert`` count as
mutual-TLS listeners.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from aiohttp import web

from pipeline.common.errors import (
    AuthError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Throttled,
    Unauthenticated,
    UnsupportedMediaType,
)
from pipeline.server.security.auth import TokenAuthenticator, bearer_token, check_bearer, hash_token
from pipeline.server.security.forwarded import ClientView, LogThrottle, ProxyTrust, client_view
from pipeline.server.security.identity import IdentityPolicy, bind_identity
from pipeline.server.metrics import ServerMetrics
from pipeline.server.security.throttle import AuthFailureBans, RateLimiter

log = logging.getLogger(__name__)

#: Routes that need no credential: never banned, never counted.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})
SENSOR_ID_HEADER = "X-Sensor-ID"


@dataclass(frozen=True)
class SensorPrincipal:
    """An authenticated sensor: which credential let it in (for revocation sweeps)."""

    sensor_id: str
    token_sha256: str | None
    cert_bound: bool


@dataclass
class SecurityGate:
    authenticator: TokenAuthenticator
    metrics: ServerMetrics
    identity: IdentityPolicy = field(default_factory=IdentityPolicy)
    cert_only: bool = False
    mtls_listeners: frozenset[str] = frozenset()
    read_token_sha256: str | None = None
    admin_token_sha256: str | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0.0, 1.0))
    bans: AuthFailureBans = field(default_factory=lambda: AuthFailureBans(0, 60.0, 0.0))
    body_timeout_s: float = 30.0
    ws_ping_interval_s: float = 0.0
    throttle_delay_s: float = 0.0
    proxy: ProxyTrust = field(default_factory=ProxyTrust)
    forgery_log: LogThrottle = field(default_factory=LogThrottle)
    proxy_log: LogThrottle = field(default_factory=LogThrottle)
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic

    # -- request facts ------------------------------------------------------------------

    def client(self, request: web.Request) -> ClientView:
        """The real client of the request: behind a trusted proxy, the address and the
        certificate it forwarded; otherwise the TCP peer and its own TLS certificate
        (``forwarded.client_view``; cheap: the certificate parse is cached)."""
        transport = request.transport
        direct = transport.get_extra_info("peercert") if transport is not None else None
        return client_view(self.proxy, request.remote or "", request.headers, direct or None,
                           self.clock())

    def address(self, request: web.Request) -> str:
        return self.client(request).address

    def peercert(self, request: web.Request) -> Mapping[str, Any] | None:
        return self.client(request).peercert

    def note_forwarding(self, request: web.Request, listener: str) -> None:
        """Count and log (rate-limited) forwarded headers from a peer that is not a
        trusted proxy, and a trusted proxy that forwards no usable client address."""
        view = self.client(request)
        if view.ignored_headers:
            self.metrics.on_forwarded_ignored(listener)
            held = self.forgery_log.allow(self.monotonic())
            if held is not None:
                log.warning("forwarded_headers_ignored listener=%s address=%s headers=%s "
                            "reason=peer_not_in_proxy.trusted_proxies suppressed=%d",
                            listener, view.address, ",".join(view.ignored_headers), held)
        elif view.via_proxy and view.bad_address:
            held = self.proxy_log.allow(self.monotonic())
            if held is not None:
                log.warning("forwarded_address_missing listener=%s proxy=%s header=%s "
                            "suppressed=%d", listener, request.remote or "",
                            self.proxy.address_header, held)

    def require_certificate(self, request: web.Request, listener: str) -> None:
        """On a mutual-TLS control or stream listener every authenticated route needs a
        client certificate. Direct TLS enforces that in the handshake; behind a proxy (or
        from a peer that bypassed it) this is where a request without one is refused. The
        ingest listener checks its sensor routes in ``precheck_ingest``; its read, admin and
        dashboard routes keep their own credentials, so local tools (``token rotate``)
        work behind a proxy."""
        if listener == "ingest":
            return
        if self.requires_cert(listener) and self.peercert(request) is None:
            raise Forbidden("a client certificate is required", field="certificate")

    def requires_cert(self, listener: str) -> bool:
        return listener in self.mtls_listeners

    def binds_cert(self, request: web.Request, listener: str) -> bool:
        """Whether the request's certificate must name the sensor it claims: always on a
        mutual-TLS listener, and whenever a trusted proxy forwarded a verified certificate
        (a proxy that checks certificates makes them count even where they are optional,
        so one sensor's certificate never carries another sensor's token)."""
        if self.requires_cert(listener):
            return True
        view = self.client(request)
        return view.via_proxy and view.peercert is not None

    def cert_suffices(self, listener: str) -> bool:
        return self.cert_only and self.requires_cert(listener)

    # -- bans ---------------------------------------------------------------------------

    def check_ban(self, request: web.Request) -> None:
        left = self.bans.banned_for(self.address(request), self.monotonic())
        if left > 0:
            self.metrics.on_throttled("")
            raise Throttled("too many failed authentication attempts from this address",
                            retry_after=left)

    def auth_failed(self, request: web.Request) -> None:
        """One refused credential from the request's address (may start a ban)."""
        address = self.address(request)
        if self.bans.record_failure(address, self.monotonic()):
            self.metrics.on_auth_ban()
            log.warning("auth_ban address=%s ban_s=%.0f failures=%d window_s=%.0f", address,
                        self.bans.ban_s, self.bans.max_failures, self.bans.window_s)

    # -- sensors ------------------------------------------------------------------------

    def authenticate_sensor(self, request: web.Request, listener: str, sensor_id: str,
                            token: str | None) -> SensorPrincipal:
        """The full check for one claimed sensor id: certificate binding (mTLS listeners),
        then the token (unless certificate-only). Raises Unauthenticated / Forbidden."""
        cert_bound = False
        if self.binds_cert(request, listener):
            bind_identity(sensor_id, self.peercert(request), self.identity)
            cert_bound = True
            if self.cert_suffices(listener):
                return SensorPrincipal(sensor_id, None, True)
        try:
            self.authenticator.authenticate(sensor_id, token, self.clock())
        except AuthError:
            self.metrics.on_auth_failure()
            raise
        return SensorPrincipal(sensor_id, hash_token(token or ""), cert_bound)

    def precheck_ingest(self, request: web.Request, token: str | None) -> str | None:
        """Before a body is read: refuse strangers, and return the token's owner (None for
        the fleet token or a certificate-only request) so throttling can start early."""
        if self.binds_cert(request, "ingest"):
            claimed = request.headers.get(SENSOR_ID_HEADER)
            if claimed is not None:
                bind_identity(claimed.strip(), self.peercert(request), self.identity,
                              field=SENSOR_ID_HEADER)
            elif self.peercert(request) is None:
                raise Forbidden("a client certificate is required", field="certificate")
            if self.cert_suffices("ingest"):
                return None
        try:
            return self.authenticator.identify(token, self.clock())
        except AuthError:
            self.metrics.on_auth_failure()
            raise

    def admit_ingest(self, request: web.Request) -> IngestAdmission:
        """The ingest listener's one admission, before the body is read (401/403)."""
        token = bearer_token(request.headers.get("Authorization"))
        return IngestAdmission(self, request, token, self.precheck_ingest(request, token))

    # -- throttling ---------------------------------------------------------------------

    def throttle_chunks(self, sensor_id: str, n: int = 1) -> None:
        """Take ``n`` chunk submissions from the sensor's bucket or raise Throttled (429)."""
        wait = self.limiter.acquire(sensor_id, self.monotonic(), n)
        if wait > 0:
            self.metrics.on_throttled(sensor_id)
            raise Throttled(f"sensor {sensor_id} is over its chunk rate", retry_after=wait)

    # -- readers and admins -------------------------------------------------------------

    def authorize_read(self, request: web.Request) -> None:
        """Read API: open without a stream token, else only the stream token. Sensor tokens
        read nothing (a sensor never needs to; least privilege), so no sensor can read
        another's data through the read API."""
        if self.read_token_sha256 is None:
            return
        if check_bearer(self.read_token_sha256,
                        bearer_token(request.headers.get("Authorization"))):
            return
        self.metrics.on_auth_failure()
        raise Unauthenticated("the read API needs the stream token")

    def authorize_admin(self, request: web.Request) -> None:
        if self.admin_token_sha256 is None:
            raise NotFound("the admin API is disabled (auth.admin_token is not set)")
        if not check_bearer(self.admin_token_sha256,
                            bearer_token(request.headers.get("Authorization"))):
            self.metrics.on_auth_failure()
            raise Unauthenticated("the admin API needs the admin token")


@dataclass(frozen=True)
class IngestAdmission:
    """What the gate established for one ingest request before its body was read; the
    ingest handler asks it about the decoded chunks' sensors, it never calls back."""

    gate: SecurityGate
    request: web.Request
    token: str | None
    owner: str | None  # the token's sensor; None for the fleet token or certificate-only

    def authorize(self, sensor_id: str) -> None:
        """The chunk's sensor must be the authenticated identity (token owner, and the
        client certificate on an mTLS listener): Unauthenticated / Forbidden otherwise."""
        self.gate.authenticate_sensor(self.request, "ingest", sensor_id, self.token)

    def charge(self, sensor_id: str, n: int = 1) -> None:
        """Take ``n`` chunks from the sender's rate (the token's owner when known)."""
        self.gate.throttle_chunks(self.owner or sensor_id, n)


GATE_KEY: web.AppKey[SecurityGate] = web.AppKey("security_gate", SecurityGate)
#: Which listener an application serves (``control``, ``ingest``, ``stream``): metric label.
LISTENER_KEY: web.AppKey[str] = web.AppKey("listener_name", str)


@web.middleware
async def security_middleware(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
    """Ban check before any authenticated route; a 401 counts toward a ban (a 403 does
    not: the caller proved who it is and asked for something it may not have). Bans and
    counts are keyed on the real client address (``SecurityGate.client``); forwarded
    headers from a peer that is not a trusted proxy are counted and logged first.

    A 429 (over the rate, or banned) is answered only after ``throttle_delay_s`` (at most
    the whole seconds Retry-After would announce), with Retry-After reduced by the time
    already waited: a client that honours Retry-After loses (almost) nothing, one that
    hammers regardless can make at most one request per connection per delay, so its flood
    cannot crowd the event loop that serves everyone else (test_security_flood.py)."""
    gate = request.app[GATE_KEY]
    if request.path in OPEN_PATHS:
        return await handler(request)
    listener = request.app.get(LISTENER_KEY, "")
    gate.note_forwarding(request, listener)
    try:
        gate.check_ban(request)
        gate.require_certificate(request, listener)
        try:
            return await handler(request)
        except Unauthenticated:
            gate.auth_failed(request)
            raise
    except Throttled as exc:
        delay = min(gate.throttle_delay_s, max(1.0, math.ceil(exc.retry_after)))
        if delay > 0:
            await asyncio.sleep(delay)
            exc.retry_after = max(0.0, exc.retry_after - delay)
        raise


async def read_body(request: web.Request, max_bytes: int, timeout_s: float | None) -> bytes:
    """A request body within limits, refusing as early as possible:

    * ``Content-Encoding`` other than identity -> 415 (no decompression bombs through HTTP:
      the listeners run with ``auto_decompress=False``);
    * ``Content-Length`` above ``max_bytes`` -> 413 before a byte of the body is read;
    * a body growing past ``max_bytes`` (chunked) -> 413 after at most ``max_bytes``;
    * a body not complete within ``timeout_s`` -> 408.

    408 and 413 answers close the connection (``error_middleware``), so the rest of a huge
    or dribbling body is never read."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType("Content-Encoding is not supported; send the body as is",
                                   field="Content-Encoding")
    length = request.content_length
    if length is not None and length > max_bytes:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes", field="body")
    try:
        if timeout_s is None:
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"request body is larger than {max_bytes} bytes",
                              field="body") from exc
    except TimeoutError as exc:
        raise RequestTimeout(f"request body not received within {timeout_s:g} s",
                             field="body") from exc
