"""The control listener: ``GET /control``, the aiohttp edge of the control channel.

The handshake is authenticated by the security gate BEFORE the WebSocket upgrade (the
refusals are in ``pipeline.server.control.channel``'s docstring); after it each frame is
decoded here and handed to ``ControlManager.on_envelope``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from aiohttp import WSMsgType, web

from pipeline.common import capabilities
from pipeline.common.errors import (
    FieldValueError,
    MissingField,
    ProtocolError,
    UnsupportedSchemaVersion,
)
from pipeline.common.messages import CAP_PROTO, SENSOR_ID_RE, decode_envelope
from pipeline.common.proto_codec import decode_envelope_proto
from pipeline.server.control.channel import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    CLOSE_PROTOCOL,
    CLOSE_UNSUPPORTED_DATA,
    MAX_FRAME,
    ControlConnection,
    ControlManager,
)
from pipeline.server.security.auth import bearer_token
from pipeline.server.security.gate import GATE_KEY, SensorPrincipal

log = logging.getLogger("pipeline.server.control.channel")  # the control channel's log

MANAGER_KEY: web.AppKey[ControlManager] = web.AppKey("control_manager", ControlManager)


def authenticate_handshake(request: web.Request) -> SensorPrincipal:
    """Check X-Sensor-ID, the client certificate (mTLS) and the bearer token before any
    upgrade; raises PipelineError."""
    sensor_id = request.headers.get("X-Sensor-ID", "").strip()
    if not sensor_id:
        raise MissingField("missing X-Sensor-ID header", field="X-Sensor-ID")
    if not SENSOR_ID_RE.fullmatch(sensor_id):
        raise FieldValueError("X-Sensor-ID is not a valid sensor id", field="X-Sensor-ID")
    token = bearer_token(request.headers.get("Authorization"))
    return request.app[GATE_KEY].authenticate_sensor(request, "control", sensor_id, token)


async def control_handler(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER_KEY]
    principal = authenticate_handshake(request)
    sensor_id = principal.sensor_id
    gate = request.app[GATE_KEY]
    ping = gate.ws_ping_interval_s if gate.ws_ping_interval_s > 0 else None
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, timeout=2.0, autoping=True,
                               heartbeat=ping)
    if not ws.can_prepare(request).ok:
        raise ProtocolError("expected a WebSocket upgrade", field="Upgrade")
    await ws.prepare(request)
    # Behind a trusted proxy: the sensor's address and the certificate the proxy verified.
    peer = gate.address(request)
    conn = ControlConnection(sensor_id, ws, connected_at=manager.clock(), peer=peer)
    conn.peer_certificate = gate.peercert(request)
    conn.token_sha256 = principal.token_sha256
    conn.cert_bound = principal.cert_bound
    conn.start()
    await manager.register(sensor_id, conn)
    try:
        await _read_frames(manager, conn)
    except Exception:  # after the upgrade no HTTP error can be answered
        log.exception("control_handler_crashed sensor_id=%s", sensor_id)
        await conn.close(1011, "internal error")
    finally:
        manager.unregister(sensor_id, conn)
        await conn.stop_sender()
        if not ws.closed:
            await ws.close()
    return ws


async def _read_frames(manager: ControlManager, conn: ControlConnection) -> None:
    async for msg in conn.ws:
        binary = msg.type is WSMsgType.BINARY
        if binary and CAP_PROTO not in capabilities.SERVER_CAPABILITIES:
            await conn.close(CLOSE_UNSUPPORTED_DATA, "binary frames were not negotiated")
            return
        if msg.type is WSMsgType.TEXT or binary:
            try:
                # Capability proto: a binary frame is one Protobuf envelope.
                env = decode_envelope_proto(msg.data) if binary else decode_envelope(msg.data)
            except UnsupportedSchemaVersion as exc:
                log.warning("control_refused sensor_id=%s reason=%s", conn.sensor_id, exc.message)
                await conn.close(CLOSE_PROTOCOL, exc.message)
                return
            except ProtocolError as exc:
                log.warning("control_malformed sensor_id=%s error=%s field=%s", conn.sensor_id,
                            exc.code, exc.field)
                await conn.close(CLOSE_PROTOCOL, f"{exc.code}: {exc.message}")
                return
            if env.sensor_id != conn.sensor_id:
                log.warning("control_refused sensor_id=%s reason=sensor_id_mismatch",
                            conn.sensor_id)
                await conn.close(CLOSE_POLICY, "envelope sensor_id does not match X-Sensor-ID")
                return
            manager.on_envelope(conn, env)
        elif msg.type is WSMsgType.ERROR:
            log.info("control_socket_error sensor_id=%s error=%s", conn.sensor_id,
                     type(conn.ws.exception()).__name__)
            return


def control_server(manager: ControlManager, *, middlewares: Sequence[Any] = (),
                   path: str = "/control") -> web.Application:
    """The control listener's application: ``GET /control`` (WebSocket)."""
    app = web.Application(middlewares=list(middlewares))
    app[MANAGER_KEY] = manager
    app.router.add_get(path, control_handler)

    async def _on_shutdown(_: web.Application) -> None:
        await manager.close(CLOSE_GOING_AWAY, "server shutdown")

    app.on_shutdown.append(_on_shutdown)
    return app
