"""``GET /openapi.json``: the OpenAPI 3.0 document of the ingest listener's HTTP API.

Built from the running server's state, so it tells the truth about credentials: the read
API declares a bearer requirement only when ``stream.token`` is set, the admin routes only
exist in practice when ``auth.admin_token`` is set (404 otherwise, documented). The
WebSocket channels (control, UI stream) are described in protocol.md, not here.

Every error answer shares one schema (``Error``: ``error``, ``message``, optional
``field``), which is what ``http_ingest.error_middleware`` produces; a schemathesis test
fuzzes the live server against this document (no 5xx, every answer conforms).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pipeline.common.messages import MAX_ATTRIBUTES, MAX_CHUNK_COUNT, MAX_SEQUENCE
from pipeline.server.gate import GATE_KEY
from pipeline.version import SOFTWARE_VERSION

_ERROR_TEXT = {
    400: "Malformed request; the error names the field",
    401: "Missing, unknown or expired credential",
    403: "Credential valid but not allowed here (another sensor's, certificate mismatch)",
    404: "Not found",
    405: "Method not allowed",
    408: "Request body not received in time",
    409: "Conflict",
    413: "Body or decompressed payload too large",
    415: "Unsupported Content-Type or Content-Encoding",
    422: "Integrity check failed (hash, compression)",
    429: "Over the rate limit, or the address is banned; see Retry-After",
    503: "Store unavailable or server not ready",
    507: "Storage full",
}

_SENSOR_ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"}
_B64 = {"type": "string", "format": "byte"}
_SHA256_B64 = {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$",
               "description": "base64 of a 32-byte SHA-256"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        entry = _json(_ref("Error"), _ERROR_TEXT[code])
        if code == 429:
            entry["headers"] = {"Retry-After": {"description": "seconds to wait",
                                                "schema": {"type": "integer", "minimum": 1}}}
        out[str(code)] = entry
    return out


# Statuses any authenticated route may answer: bad request, credentials, ban.
_AUTH = (400, 401, 403, 429)


def _schemas() -> dict[str, Any]:
    return {
        "Error": {
            "type": "object", "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                           "field": {"type": "string"}},
        },
        "Chunk": {
            "type": "object",
            "required": ["schema_version", "sensor_id", "event_id", "sequence", "chunk_index",
                         "chunk_count", "compression", "payload", "chunk_sha256",
                         "event_sha256", "created_at", "logical_timestamp_ms"],
            "properties": {
                "schema_version": {"type": "string", "pattern": r"^1\.[0-9]{1,6}\.[0-9]{1,6}$",
                                   "example": "1.0.0"},
                "sensor_id": _SENSOR_ID,
                "event_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                "sequence": {"type": "integer", "minimum": 0, "maximum": MAX_SEQUENCE},
                "chunk_index": {"type": "integer", "minimum": 0, "maximum": MAX_CHUNK_COUNT,
                                "description": "below chunk_count (400 otherwise)"},
                "chunk_count": {"type": "integer", "minimum": 1, "maximum": MAX_CHUNK_COUNT},
                "compression": {"type": "string", "enum": ["gzip"]},
                "payload": {**_B64, "description": "base64 of the gzip-compressed slice; "
                                                   "at most 1 MiB decoded"},
                "chunk_sha256": _SHA256_B64,
                "event_sha256": _SHA256_B64,
                "created_at": {"type": "string", "maxLength": 64},
                "logical_timestamp_ms": {"type": "integer", "minimum": 0,
                                         "maximum": MAX_SEQUENCE},
                "clock_skew_ms": {"type": "number"},
                "attributes": {"type": "object", "maxProperties": MAX_ATTRIBUTES,
                               "additionalProperties": {"type": "string", "maxLength": 1024}},
                "queue_epoch": {"type": "string", "pattern": "^[0-9a-f]{8,64}$"},
            },
        },
        "IngestResult": {
            "type": "object",
            "required": ["stored", "duplicate", "sequence", "event_id", "sensor_id",
                         "event_complete", "last_committed_sequence"],
            "additionalProperties": False,
            "properties": {
                "stored": {"type": "boolean"}, "duplicate": {"type": "boolean"},
                "sequence": {"type": "integer"}, "event_id": {"type": "string"},
                "sensor_id": {"type": "string"}, "event_complete": {"type": "boolean"},
                "last_committed_sequence": {"type": "integer"},
            },
        },
        "Snapshot": {
            "type": "object",
            "required": ["sensor_id", "event_id", "logical_timestamp_ms", "updated_at",
                         "payload_base64", "payload_json"],
            "properties": {
                "sensor_id": {"type": "string"}, "event_id": {"type": "string"},
                "logical_timestamp_ms": {"type": "integer"}, "updated_at": {"type": "string"},
                "payload_base64": {"type": "string"}, "payload_json": {},
            },
        },
        "Event": {
            "type": "object",
            "required": ["cursor", "sensor_id", "event_id", "epoch", "logical_timestamp_ms",
                         "created_at", "completed_at", "first_sequence", "last_sequence",
                         "size", "event_sha256", "attributes", "payload_base64",
                         "payload_json"],
            "properties": {
                "cursor": {"type": "integer"}, "sensor_id": {"type": "string"},
                "event_id": {"type": "string"}, "epoch": {"type": "string"},
                "logical_timestamp_ms": {"type": "integer"}, "created_at": {"type": "string"},
                "completed_at": {"type": "string"}, "first_sequence": {"type": "integer"},
                "last_sequence": {"type": "integer"}, "size": {"type": "integer"},
                "event_sha256": {"type": "string"},
                "attributes": {"type": "object", "additionalProperties": {"type": "string"}},
                "payload_base64": {"type": "string"}, "payload_json": {},
            },
        },
        "SensorState": {
            "type": "object", "required": ["sensor_id", "connected", "committed_offset"],
            "properties": {
                "sensor_id": {"type": "string"}, "connected": {"type": "boolean"},
                "last_heartbeat_at": {"type": "string", "nullable": True},
                "queue_depth": {"type": "integer", "nullable": True},
                "clock_skew_ms": {"type": "number", "nullable": True},
                "committed_offset": {"type": "integer"}, "backlog": {"type": "integer"},
                "software_version": {"type": "string", "nullable": True},
                "epoch": {"type": "string"}, "windows_open": {"type": "integer"},
            },
        },
        "RotateRequest": {
            "type": "object",
            "properties": {"overlap_s": {"type": "number", "minimum": 0,
                                         "maximum": 31536000}},
        },
        "RotateResult": {
            "type": "object",
            "required": ["sensor_id", "command_id", "token_hint", "confirmed"],
            "properties": {
                "sensor_id": {"type": "string"}, "command_id": {"type": "string"},
                "token_hint": {"type": "string"}, "confirmed": {"type": "boolean"},
                "previous_not_after": {"type": "string", "nullable": True},
            },
        },
        "ReloadResult": {
            "type": "object", "required": ["reloaded", "sensors", "closed_connections"],
            "properties": {"reloaded": {"type": "boolean"}, "sensors": {"type": "integer"},
                           "closed_connections": {"type": "integer"},
                           "warnings": {"type": "array", "items": {"type": "string"}}},
        },
        "Status": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string"}}},
    }


def _sensor_param() -> dict[str, Any]:
    return {"name": "sensor_id", "in": "path", "required": True, "schema": _SENSOR_ID}


def document(read_protected: bool = True) -> dict[str, Any]:
    """The OpenAPI document; ``read_protected`` is whether ``stream.token`` is set."""
    read_security: list[dict[str, list[str]]] = [{"streamToken": []}] if read_protected else []
    list_security = read_security
    read_errors = _AUTH if read_protected else (400, 429)
    admin = [{"adminToken": []}]
    paths: dict[str, Any] = {
        "/v1/ingest/chunk": {"post": {
            "operationId": "ingestChunk",
            "summary": "Submit one chunk (protocol 1.0, section 2)",
            "security": [{"sensorToken": []}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("Chunk")}}},
            "responses": {"200": _json(_ref("IngestResult"), "Stored or duplicate"),
                          **_errors(*_AUTH, 408, 409, 413, 415, 422, 503, 507)},
        }},
        "/v1/snapshots": {"get": {
            "operationId": "listSnapshots", "summary": "Latest snapshot of every sensor",
            "security": list_security,
            "responses": {"200": _json({"type": "object", "required": ["snapshots"],
                                        "properties": {"snapshots": {
                                            "type": "array", "items": _ref("Snapshot")}}},
                                       "Snapshots"),
                          **_errors(*read_errors)},
        }},
        "/v1/snapshots/{sensor_id}": {"get": {
            "operationId": "getSnapshot", "summary": "Latest snapshot of one sensor",
            "security": read_security, "parameters": [_sensor_param()],
            "responses": {"200": _json(_ref("Snapshot"), "Snapshot"),
                          **_errors(*read_errors, 404)},
        }},
        "/v1/sensors": {"get": {
            "operationId": "listSensors", "summary": "Known sensors and their state",
            "security": list_security,
            "responses": {"200": _json({"type": "object", "required": ["sensors"],
                                        "properties": {"sensors": {
                                            "type": "array", "items": _ref("SensorState")}}},
                                       "Sensors"),
                          **_errors(*read_errors, 503)},
        }},
        "/v1/sensors/{sensor_id}/events": {"get": {
            "operationId": "listEvents", "summary": "Completed events, oldest first",
            "security": read_security,
            "parameters": [
                _sensor_param(),
                {"name": "after", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQUENCE}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
            "responses": {"200": _json({"type": "object",
                                        "required": ["sensor_id", "events", "next_after"],
                                        "properties": {
                                            "sensor_id": {"type": "string"},
                                            "events": {"type": "array", "items": _ref("Event")},
                                            "next_after": {"type": "integer",
                                                           "nullable": True}}},
                                       "A page of events"),
                          **_errors(*read_errors, 503)},
        }},
        "/v1/sensors/{sensor_id}/request": {"post": {
            "operationId": "requestSensor",
            "summary": "Ask a connected sensor for its data now (stream token; writes nothing)",
            "security": list_security, "parameters": [_sensor_param()],
            "responses": {"202": _json({"type": "object", "required": ["sensor_id"],
                                        "properties": {
                                            "sensor_id": {"type": "string"},
                                            "window_id": {"type": "string", "nullable": True},
                                            "already_open": {"type": "boolean"}}},
                                       "Window opened"),
                          **_errors(*read_errors, 409)},
        }},
        "/v1/sensors/{sensor_id}/rotate": {"post": {
            "operationId": "rotateToken",
            "summary": "Rotate a connected sensor's token over its control channel",
            "security": admin, "parameters": [_sensor_param()],
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": _ref("RotateRequest")}}},
            "responses": {"200": _json(_ref("RotateResult"), "Rotated and confirmed"),
                          "202": _json(_ref("RotateResult"), "Sent, not confirmed in time"),
                          **_errors(*_AUTH, 404, 409)},
        }},
        "/v1/admin/reload": {"post": {
            "operationId": "reload",
            "summary": "Reload sensors, tokens, limits and certificates (like SIGHUP)",
            "security": admin,
            "responses": {"200": _json(_ref("ReloadResult"), "Reloaded"),
                          **_errors(*_AUTH, 404),
                          "422": _json(_ref("Error"), "The new configuration is invalid; "
                                                      "nothing changed")},
        }},
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Liveness", "security": [],
            "responses": {"200": _json(_ref("Status"), "Alive")},
        }},
        "/readyz": {"get": {
            "operationId": "readyz", "summary": "Readiness (listeners up, store writable)",
            "security": [],
            "responses": {"200": _json(_ref("Status"), "Ready"), **_errors(503)},
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus metrics", "security": [],
            "responses": {"200": {"description": "Prometheus text format",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_errors(404)},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "security": [],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0 document")},
        }},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Open UXI pipeline server", "version": SOFTWARE_VERSION,
                 "description": "HTTP API of the ingest listener. The control channel and "
                                "the UI stream are WebSockets described in protocol.md. "
                                "Credentials and limits: docs/security.md."},
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "sensorToken": {"type": "http", "scheme": "bearer",
                                "description": "A sensor's token (auth.sensors)"},
                "streamToken": {"type": "http", "scheme": "bearer",
                                "description": "The read-only stream token (stream.token)"},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "The admin token (auth.admin_token)"},
            },
        },
    }


async def openapi_handler(request: web.Request) -> web.Response:
    gate = request.app.get(GATE_KEY)
    protected = gate is not None and gate.read_token_sha256 is not None
    return web.json_response(document(read_protected=protected))
