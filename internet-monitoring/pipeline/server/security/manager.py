"""The asyncio shell of the server's security: reload, revocation, rotation, admin API.

``SecurityManager`` owns what changes while the server runs:

* the credentials: ``auth.sensors`` merged with the rotation overlay
  (``pipeline.server.security.credentials``) into the one shared ``TokenAuthenticator``;
* the ``SecurityGate`` the listeners consult (``pipeline.server.security.gate``) and its limits;
* the listeners' TLS contexts (reloaded in place, ``listeners.reload_ssl_context``).

Reload (SIGHUP, ``POST /v1/admin/reload``, or the file watch noticing a changed
configuration, overlay or certificate file)::

    read config (+ env) -> build credentials -> check certificates in scratch contexts
      any ConfigError: nothing changes, the old state keeps serving, the error is logged
    -> swap credentials / gate / stream token + origins / limits -> reload TLS contexts
    -> sweep: close every control socket (1008 "credential revoked") and stream socket
       whose credential is no longer valid; the others keep going

Listener addresses, ports, TLS on/off and the store are not reloadable (a warning says so).
The sweep also runs every ``SWEEP_INTERVAL_S``, so a token whose ``not_after`` passes
closes its connection without a reload.

Rotation (``POST /v1/sensors/{id}/rotate``, admin token; ``pipeline-server token rotate``)::

    sensor connected, announced "rotation", has own credentials   else 409
    mint token T, add sha256(T) to the overlay (saved) ........... both tokens now valid
    Command(rotate_token, {token: T, not_after: "", previous_not_after: <iso>})
    CommandResponse success=true  -> cap the sensor's other tokens at now + overlap (saved),
                                     the connection now counts as authenticated by T; 200
    success=false                 -> remove sha256(T) again; 409 with the sensor's message
    no answer within the timeout  -> 202 {"confirmed": false}: T stays valid next to the old
                                     tokens (the sensor may have switched), nothing expires

The new token travels only inside the control channel to the authenticated sensor: it is
never logged, never in an HTTP answer (only its 8-character hint is).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from aiohttp import web

from pipeline.common.config import ServerConfig
from pipeline.common.errors import (
    ConfigError,
    ConflictError,
    FieldTypeError,
    FieldValueError,
    PipelineError,
    ProtocolError,
)
from pipeline.common.logs import token_hint
from pipeline.common.messages import CAP_ROTATION, SENSOR_ID_RE, Command, CommandResponse
from pipeline.server.security.auth import (
    TokenAuthenticator,
    credentials_from_entries,
    fleet_digest,
    hash_token,
    mint_token,
)
from pipeline.server.security.credentials import CredentialOverlay, overlay_path
from pipeline.server.security.forwarded import ProxyTrust
from pipeline.server.security.gate import SecurityGate
from pipeline.server.security.identity import IdentityPolicy
from pipeline.server.security.listeners import reload_ssl_context
from pipeline.server.metrics import ServerMetrics
from pipeline.server.security.throttle import AuthFailureBans, ConnectionLimiter, RateLimiter

log = logging.getLogger(__name__)

LISTENERS = ("control", "ingest", "stream")
SWEEP_INTERVAL_S = 1.0
ROTATION_TIMEOUT_S = 10.0
ROTATE_COMMAND = "rotate_token"
CLOSE_POLICY = 1008
MAX_ADMIN_BODY = 4096


def build_authenticator(config: ServerConfig, overlay: CredentialOverlay) -> TokenAuthenticator:
    auth = config.auth
    creds = overlay.merge(credentials_from_entries(auth.sensors))
    return TokenAuthenticator(creds, fleet_token_sha256=fleet_digest(
        auth.fleet_token or None, auth.fleet_token_sha256 or None))


def _token_digest(token: str, digest: str) -> str | None:
    if token:
        return hash_token(token)
    return digest.lower() if digest else None


def gate_settings(config: ServerConfig) -> dict[str, Any]:
    """The gate's reloadable fields from a configuration."""
    auth = config.auth
    return {
        "identity": IdentityPolicy(dns_suffix=auth.client_cert_dns_suffix,
                                   cn_fallback=auth.client_cert_cn_fallback),
        "cert_only": auth.client_cert_only,
        "mtls_listeners": frozenset(
            name for name in LISTENERS
            if (getattr(config, name).tls.enabled and getattr(config, name).tls.client_ca)
            or name in config.proxy.require_client_cert),
        "proxy": ProxyTrust.from_config(config.proxy),
        "read_token_sha256": hash_token(config.stream.token) if config.stream.token else None,
        "admin_token_sha256": _token_digest(auth.admin_token, auth.admin_token_sha256),
        "body_timeout_s": config.limits.body_timeout_s,
        "ws_ping_interval_s": config.limits.ws_ping_interval_s,
        "throttle_delay_s": config.limits.throttle_delay_s,
    }


def iso_utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class ReloadResult:
    sensors: int
    closed_connections: int
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"reloaded": True, "sensors": self.sensors,
                "closed_connections": self.closed_connections, "warnings": list(self.warnings)}


class SecurityManager:
    """See the module docstring. ``attach`` is called once the listeners exist."""

    def __init__(self, config: ServerConfig, *, authenticator: TokenAuthenticator,
                 metrics: ServerMetrics,
                 config_loader: Callable[[], ServerConfig] | None = None,
                 watch_paths: Iterable[str] = ()) -> None:
        self.config = config
        self.authenticator = authenticator
        self.metrics = metrics
        self._loader = config_loader
        self._watch_extra = [Path(p) for p in watch_paths]
        self.overlay = CredentialOverlay.load(overlay_path(config))
        authenticator.replace_with(build_authenticator(config, self.overlay))
        limits = config.limits
        self.gate = SecurityGate(
            authenticator=authenticator, metrics=metrics,
            limiter=RateLimiter(limits.chunk_rate, limits.chunk_burst),
            bans=AuthFailureBans(limits.auth_failures_before_ban, limits.auth_failure_window_s,
                                 limits.ban_s),
            **gate_settings(config))
        # A trusted proxy carries many clients on its connections: not capped per address
        # (the proxy caps its clients; see the shipped Nginx configuration).
        self.connection_limiters = {
            name: ConnectionLimiter(limits.max_connections_per_address,
                                    exempt=lambda host: self.gate.proxy.trusts(host))
            for name in LISTENERS}
        self.contexts: dict[str, ssl.SSLContext | None] = {}
        self.manager: Any = None
        self.hub: Any = None
        self.reloads = 0
        self._lock = asyncio.Lock()
        self._rotating: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._mtimes: dict[Path, float | None] = {}

    # -- life cycle ---------------------------------------------------------------------

    def attach(self, *, manager: Any, hub: Any, contexts: dict[str, ssl.SSLContext | None]
               ) -> None:
        self.manager = manager
        self.hub = hub
        self.contexts = dict(contexts)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._sweep_loop(), name="security-sweep"))
        if self.config.auth.reload_watch_s > 0:
            self._mtimes = self._stat_all()
            self._tasks.append(loop.create_task(self._watch_loop(), name="security-watch"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def on_connection_refused(self, listener: str, address: str) -> None:
        self.metrics.on_throttled("")

    # -- reload -------------------------------------------------------------------------

    async def reload(self, reason: str = "api") -> ReloadResult:
        """Re-read everything reloadable; raises ConfigError and changes nothing on error."""
        async with self._lock:
            try:
                new = await asyncio.to_thread(self._load_config)
                overlay = await asyncio.to_thread(CredentialOverlay.load, overlay_path(new))
                authenticator = build_authenticator(new, overlay)
                await asyncio.to_thread(self._check_certificates, new)
            except ConfigError as exc:
                log.warning("reload_failed reason=%s error=%s field=%s", reason, exc.message,
                            exc.field or "-")
                raise
            warnings = self._unreloadable_changes(new)
            for text in warnings:
                log.warning("reload_needs_restart change=%s", text)
            self.authenticator.replace_with(authenticator)
            self.overlay = overlay
            self._apply_gate(new)
            for name in LISTENERS:
                ctx = self.contexts.get(name)
                if ctx is not None and getattr(new, name).tls.enabled:
                    reload_ssl_context(ctx, getattr(new, name).tls, name)
            self.config = new
            self.reloads += 1
            self._mtimes = self._stat_all()
            closed = await self.sweep()
            log.info("config_reloaded reason=%s sensors=%d closed_connections=%d", reason,
                     len(self.authenticator.sensor_ids), closed)
            return ReloadResult(len(self.authenticator.sensor_ids), closed, tuple(warnings))

    def _load_config(self) -> ServerConfig:
        return self._loader() if self._loader is not None else self.config

    @staticmethod
    def _check_certificates(config: ServerConfig) -> None:
        """Load every enabled listener's files into a scratch context first, so a broken
        certificate leaves the live contexts untouched."""
        for name in LISTENERS:
            tls = getattr(config, name).tls
            if tls.enabled:
                reload_ssl_context(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), tls, name)

    def _unreloadable_changes(self, new: ServerConfig) -> list[str]:
        old = self.config
        changes: list[str] = []
        for name in LISTENERS:
            a, b = getattr(old, name), getattr(new, name)
            if (a.bind, a.port) != (b.bind, b.port):
                changes.append(f"{name}.bind/port")
            if a.tls.enabled != b.tls.enabled or bool(a.tls.client_ca) != bool(b.tls.client_ca):
                changes.append(f"{name}.tls.enabled/client_ca on-off")
        if old.proxy.require_client_cert != new.proxy.require_client_cert:
            changes.append("proxy.require_client_cert")
        if old.store != new.store:
            changes.append("store")
        return changes

    def _apply_gate(self, config: ServerConfig) -> None:
        gate = self.gate
        settings = gate_settings(config)
        # mTLS cannot be switched on or off without new listeners: keep the live set.
        settings["mtls_listeners"] = gate.mtls_listeners
        for key, value in settings.items():
            setattr(gate, key, value)
        limits = config.limits
        gate.limiter.reconfigure(limits.chunk_rate, limits.chunk_burst)
        gate.bans.reconfigure(limits.auth_failures_before_ban, limits.auth_failure_window_s,
                              limits.ban_s)
        for limiter in self.connection_limiters.values():
            limiter.max_per_address = limits.max_connections_per_address
        if self.hub is not None:
            self.hub.token_sha256 = settings["read_token_sha256"]
            self.hub.allowed_origins = tuple(config.stream.allowed_origins)

    # -- revocation ---------------------------------------------------------------------

    def _control_still_valid(self, sensor_id: str, conn: Any, now: float) -> bool:
        digest = getattr(conn, "token_sha256", None)
        if digest is not None:
            return self.authenticator.still_valid(sensor_id, digest, now)
        if getattr(conn, "cert_bound", False):
            return self.gate.cert_only
        return True  # authenticated before the gate existed (tests building parts alone)

    async def sweep(self) -> int:
        """Close every connection whose credential is no longer valid; returns how many."""
        now = time.time()
        closing: list[Any] = []
        if self.manager is not None:
            for sensor_id, conn in list(self.manager.connections.items()):
                if conn.closing or self._control_still_valid(sensor_id, conn, now):
                    continue
                log.warning("connection_revoked listener=control sensor_id=%s", sensor_id)
                self.manager.unregister(sensor_id, conn)
                closing.append(conn.close(CLOSE_POLICY, "credential revoked"))
        if self.hub is not None and self.hub.token_sha256 is not None:
            tokens = getattr(self.hub, "socket_tokens", {})
            for ws, digest in list(tokens.items()):
                if ws.closed or digest == self.hub.token_sha256:
                    continue
                log.warning("connection_revoked listener=stream")
                tokens.pop(ws, None)
                closing.append(ws.close(code=CLOSE_POLICY, message=b"credential revoked"))
        if closing:
            await asyncio.gather(*closing, return_exceptions=True)
        return len(closing)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
            except (PipelineError, OSError, RuntimeError) as exc:
                log.warning("sweep_failed error=%s", type(exc).__name__)

    # -- file watch ---------------------------------------------------------------------

    def _watched(self) -> list[Path]:
        paths = [*list(self._watch_extra), overlay_path(self.config)]
        for name in LISTENERS:
            tls = getattr(self.config, name).tls
            if tls.enabled:
                paths += [Path(p) for p in (tls.cert, tls.key, tls.client_ca) if p]
        return paths

    def _stat_all(self) -> dict[Path, float | None]:
        out: dict[Path, float | None] = {}
        for path in self._watched():
            try:
                stat = os.stat(path)
                out[path] = stat.st_mtime_ns + stat.st_size
            except OSError:
                out[path] = None
        return out

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.1, self.config.auth.reload_watch_s))
            current = await asyncio.to_thread(self._stat_all)
            if current == self._mtimes:
                continue
            self._mtimes = current
            try:
                await self.reload("file_changed")
            except ConfigError:
                pass  # logged; the old state keeps serving until the file is fixed

    # -- rotation -----------------------------------------------------------------------

    async def _save_overlay(self) -> None:
        await asyncio.to_thread(self.overlay.save)
        self.authenticator.replace_with(build_authenticator(self.config, self.overlay))
        self._mtimes = self._stat_all()

    async def rotate(self, sensor_id: str, *, overlap_s: float | None = None,
                     timeout_s: float = ROTATION_TIMEOUT_S) -> tuple[int, dict[str, Any]]:
        """Rotate one sensor's token over its control channel; (HTTP status, answer)."""
        manager = self.manager
        if sensor_id not in self.authenticator.sensor_ids:
            raise ConflictError(f"sensor {sensor_id} has no credentials of its own "
                                "(fleet-token sensors cannot rotate)", field="sensor_id")
        conn = manager.connection(sensor_id) if manager is not None else None
        if conn is None:
            raise ConflictError(f"sensor {sensor_id} is not connected", field="sensor_id")
        if CAP_ROTATION not in conn.capabilities:
            raise ConflictError(f"sensor {sensor_id} did not announce the rotation capability",
                                field="sensor_id")
        if sensor_id in self._rotating:
            raise ConflictError(f"a rotation of sensor {sensor_id} is already running",
                                field="sensor_id")
        overlap = self.config.auth.rotation_overlap_s if overlap_s is None else overlap_s
        self._rotating.add(sensor_id)
        try:
            return await self._rotate(sensor_id, conn, overlap, timeout_s)
        finally:
            self._rotating.discard(sensor_id)

    async def _rotate(self, sensor_id: str, conn: Any, overlap: float, timeout_s: float
                      ) -> tuple[int, dict[str, Any]]:
        manager = self.manager
        token = mint_token()
        digest = hash_token(token)
        started = time.time()
        previous = [c.token_sha256 for c in self.authenticator.credentials(sensor_id)]
        self.overlay.add(sensor_id, digest, None, started)
        await self._save_overlay()  # durable BEFORE the sensor can switch to it
        command_id = uuid.uuid4().hex
        old_until = started + overlap
        command = Command(command_id=command_id, name=ROTATE_COMMAND,
                          args={"token": token, "not_after": "",
                                "previous_not_after": iso_utc(old_until)})
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[CommandResponse] = loop.create_future()
        manager.pending_commands[(sensor_id, command_id)] = waiter
        answer: dict[str, Any] = {"sensor_id": sensor_id, "command_id": command_id,
                                  "token_hint": token_hint(token)}
        try:
            if not conn.send_nowait(conn.envelope(command, started)):
                await self._forget(sensor_id, digest)
                raise ConflictError(f"sensor {sensor_id} is not connected", field="sensor_id")
            try:
                response = await asyncio.wait_for(waiter, timeout=timeout_s)
            except TimeoutError:
                log.warning("token_rotation_unconfirmed sensor_id=%s command_id=%s new=%s",
                            sensor_id, command_id, token_hint(token))
                return 202, {**answer, "confirmed": False, "previous_not_after": None}
        finally:
            manager.pending_commands.pop((sensor_id, command_id), None)
        if not response.success:
            await self._forget(sensor_id, digest)
            log.warning("token_rotation_refused sensor_id=%s command_id=%s message=%r",
                        sensor_id, command_id, response.message[:200])
            raise ConflictError(f"sensor refused the rotation: {response.message[:200]}",
                                field="sensor_id")
        now = time.time()
        for old in previous:
            if old != digest:
                self.overlay.cap(sensor_id, old, old_until, now)
        self.overlay.prune(credentials_from_entries(self.config.auth.sensors), now)
        await self._save_overlay()
        current = manager.connections.get(sensor_id)
        if current is conn:
            conn.token_sha256 = digest
        log.info("token_rotated sensor_id=%s command_id=%s new=%s previous=%d "
                 "previous_not_after=%s", sensor_id, command_id, token_hint(token),
                 len(previous), iso_utc(old_until))
        return 200, {**answer, "confirmed": True, "previous_not_after": iso_utc(old_until)}

    async def _forget(self, sensor_id: str, digest: str) -> None:
        if self.overlay.remove(sensor_id, digest):
            await self._save_overlay()


# ---------------------------------------------------------------------------------------
# Admin routes (ingest listener)

SECURITY_KEY: web.AppKey[SecurityManager] = web.AppKey("security_manager", SecurityManager)


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_ADMIN_BODY:
        raise ProtocolError("admin request body too large", field="body")
    raw = await request.content.read(MAX_ADMIN_BODY + 1)
    if len(raw) > MAX_ADMIN_BODY:
        raise ProtocolError("admin request body too large", field="body")
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("body is not valid JSON", field="body") from exc
    if not isinstance(doc, dict):
        raise FieldTypeError("body must be a JSON object", field="body")
    return doc


async def rotate_handler(request: web.Request) -> web.Response:
    security = request.app[SECURITY_KEY]
    security.gate.authorize_admin(request)
    sensor_id = request.match_info["sensor_id"]
    if not SENSOR_ID_RE.fullmatch(sensor_id):
        raise FieldValueError("invalid sensor id", field="sensor_id")
    doc = await _json_body(request)
    overlap = doc.get("overlap_s")
    if overlap is not None:
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)):
            raise FieldTypeError("field overlap_s must be a number", field="overlap_s")
        if not 0 <= overlap <= 365 * 86400:
            raise FieldValueError("field overlap_s must be between 0 and 31536000",
                                  field="overlap_s")
    status, answer = await security.rotate(sensor_id, overlap_s=overlap)
    return web.json_response(answer, status=status)


async def reload_handler(request: web.Request) -> web.Response:
    security = request.app[SECURITY_KEY]
    security.gate.authorize_admin(request)
    try:
        result = await security.reload("api")
    except ConfigError as exc:
        return web.json_response({"error": exc.code, "message": exc.message,
                                  **({"field": exc.field} if exc.field else {})}, status=422)
    return web.json_response(result.to_json())


def add_security_routes(app: web.Application, security: SecurityManager) -> None:
    """Admin API and the OpenAPI document on the ingest listener."""
    from pipeline.server.read.openapi import openapi_handler

    app[SECURITY_KEY] = security
    app.router.add_post("/v1/sensors/{sensor_id}/rotate", rotate_handler)
    app.router.add_post("/v1/admin/reload", reload_handler)
    app.router.add_get("/openapi.json", openapi_handler)

