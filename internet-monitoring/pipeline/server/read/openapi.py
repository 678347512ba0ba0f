"""``GET /openapi.json``: the OpenAPI 3.0 document of the ingest listener's HTTP API.

Built from the running server's state, so it tells the truth about credentials: the read
API declares a bearer requirement only when ``stream.token`` is set, the admin routes only
exist in practice when ``auth.admin_token`` is set (404 otherwise, documented). The
WebSocket channels (control, UI stream) are described in protocol.md, not here.

Every error answer shares one schema (``Error``: ``error``, ``message``, optional
``field``), which is what ``ingest.listener.error_middleware`` produces; a schemathesis test
fuzzes the live server against this document (no 5xx, every answer conforms).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pipeline.common.batch import MAX_BATCH_CHUNKS
from pipeline.common.messages import MAX_ATTRIBUTES, MAX_CHUNK_COUNT, MAX_SEQUENCE
from pipeline.server.security.gate import GATE_KEY
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
                "series": {"type": "array", "items": _ref("RemoteWriteSeries"),
                           "description": "latest sample of each remote-write series of "
                                          "the sensor (docs/remote-write.md)"},
            },
        },
        "RemoteWriteSeries": {
            "type": "object", "required": ["name", "labels", "value", "timestamp_ms"],
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "value": {"type": "number", "nullable": True}, "timestamp_ms": {"type": "integer"},
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
            "type": "object",
            "required": ["sensor_id", "connected", "committed_offset", "status", "conditions"],
            "properties": {
                "sensor_id": {"type": "string"}, "connected": {"type": "boolean"},
                "name": {"type": "string"}, "site": {"type": "string"},
                "last_heartbeat_at": {"type": "string", "nullable": True},
                "queue_depth": {"type": "integer", "nullable": True},
                "clock_skew_ms": {"type": "number", "nullable": True},
                "committed_offset": {"type": "integer"}, "backlog": {"type": "integer"},
                "software_version": {"type": "string", "nullable": True},
                "epoch": {"type": "string"}, "windows_open": {"type": "integer"},
                "retry_total": {"type": "integer", "nullable": True},
                "dropped_total": {"type": "integer", "nullable": True},
                "last_result_at": {"type": "string", "nullable": True},
                "status": {"type": "string", "enum": ["ok", "warning", "critical", "offline"]},
                "conditions": {"type": "array", "items": _ref("Condition")},
            },
        },
        "Condition": {
            "type": "object", "required": ["kind", "severity", "summary", "since"],
            "properties": {
                "kind": {"type": "string", "enum": ["offline", "heartbeat_stale", "queue",
                                                    "stale_results", "clock_skew"]},
                "severity": {"type": "string", "enum": ["warning", "critical"]},
                "summary": {"type": "string"},
                "since": {"type": "string", "nullable": True},
            },
        },
        "BatchRejection": {
            "type": "object", "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"},
                           "field": {"type": "string"}, "sequence": {"type": "integer"}},
        },
        "Series": {
            "type": "object",
            "required": ["sensor_id", "field", "test", "since", "until", "step_s", "points",
                         "sampled"],
            "properties": {
                "sensor_id": {"type": "string"}, "field": {"type": "string"},
                "test": {"type": "string", "nullable": True},
                "since": {"type": "integer", "description": "Unix milliseconds"},
                "until": {"type": "integer", "description": "Unix milliseconds"},
                "step_s": {"type": "integer"},
                "points": {"type": "array", "items": {
                    "type": "object", "required": ["t", "count", "avg", "min", "max", "last"],
                    "properties": {"t": {"type": "integer"}, "count": {"type": "integer"},
                                   "avg": {"type": "number"}, "min": {"type": "number"},
                                   "max": {"type": "number"}, "last": {"type": "number"}}}},
                "sampled": {"type": "number", "minimum": 0, "maximum": 1,
                            "description": "share of the range's results read (1 = all)"},
            },
        },
        "LatestResults": {
            "type": "object", "required": ["sensor_id", "results"],
            "properties": {"sensor_id": {"type": "string"}, "results": {
                "type": "array", "items": {
                    "type": "object",
                    "required": ["test", "event_id", "logical_timestamp_ms", "completed_at",
                                 "payload_json"],
                    "properties": {"test": {"type": "string"}, "event_id": {"type": "string"},
                                   "logical_timestamp_ms": {"type": "integer"},
                                   "completed_at": {"type": "string"},
                                   "payload_json": {"nullable": True}}}}},
        },
        "DashboardConfig": {
            "type": "object",
            "required": ["stream_scheme", "stream_port", "stream_path", "subprotocol",
                         "token_required"],
            "properties": {"stream_scheme": {"type": "string", "enum": ["ws", "wss"]},
                           "stream_port": {"type": "integer"},
                           "stream_path": {"type": "string"},
                           "subprotocol": {"type": "string"},
                           "token_required": {"type": "boolean"},
                           "thresholds": {"type": "object",
                                          "additionalProperties": {"type": "number"}}},
        },
        **_uxi_schemas(),
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


def _obj(required: list[str], props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _num() -> dict[str, Any]:
    return {"type": "number", "nullable": True}


def _uxi_schemas() -> dict[str, Any]:
    """The UXI dashboard payload (platform.md, last section; docs/dashboard.md)."""
    text = {"type": "string"}
    when = {"type": "string", "nullable": True}
    strings = {"type": "array", "items": text}
    kpis = ["globalAvailability", "availabilityChange", "medianLatency", "latencyChange",
            "activeIncidents", "incidentChange", "ingestRate", "ingestChange"]
    performance = ["timestamp", "availability", "latencyMs", "jitterMs", "packetLoss"]
    sensor = ["id", "name", "site", "region", "isp", "lastCheck", "availability", "latencyMs",
              "packetLoss", "status", "journeysImpacted", "performance"]
    journey = ["id", "name", "successRate", "responseTimeMs", "status", "impactedSites",
               "topImpactedSensors"]
    alert = ["id", "severity", "summary", "detectedAt", "impactedJourneys", "affectedSites",
             "acknowledged"]
    return {
        "Dashboard": _obj(
            ["generatedAt", "reportingWindow", "kpis", "timeline", "journeys", "sensors",
             "alerts"],
            {"generatedAt": text,
             "reportingWindow": {"type": "object"},
             "kpis": _obj(kpis, {name: _num() for name in kpis}),
             "timeline": {"type": "array", "items": _obj(
                 ["timestamp", "successRate", "latencyMs"],
                 {"timestamp": text, "successRate": _num(), "latencyMs": _num()})},
             "journeys": {"type": "array", "items": _obj(journey, {
                 "id": text, "name": text, "successRate": _num(), "responseTimeMs": _num(),
                 "status": text, "impactedSites": {"type": "integer"},
                 "topImpactedSensors": strings})},
             "sensors": {"type": "array", "items": _obj(sensor, {
                 "id": text, "name": text, "site": text, "region": text, "isp": text,
                 "lastCheck": when, "availability": _num(), "latencyMs": _num(),
                 "packetLoss": _num(), "status": text, "journeysImpacted": {"type": "integer"},
                 "performance": {"type": "array", "items": _obj(performance, {
                     "timestamp": text, "availability": _num(), "latencyMs": _num(),
                     "jitterMs": _num(), "packetLoss": _num()})}})},
             "alerts": {"type": "array", "items": _obj(alert, {
                 "id": text, "severity": text, "summary": text, "detectedAt": when,
                 "impactedJourneys": strings, "affectedSites": strings,
                 "acknowledged": {"type": "boolean"}})}}),
    }


def _sensor_param() -> dict[str, Any]:
    return {"name": "sensor_id", "in": "path", "required": True, "schema": _SENSOR_ID}


def _time_query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False,
            "description": f"{description}: ISO 8601 with offset (2026-12-05T03:00:00Z) "
                           "or Unix milliseconds",
            "schema": {"type": "string", "maxLength": 40}}


def document(read_protected: bool = True) -> dict[str, Any]:
    """The OpenAPI document; ``read_protected`` is whether ``stream.token`` is set."""
    read_security: list[dict[str, list[str]]] = [{"streamToken": []}] if read_protected else []
    list_security = read_security
    read_errors = _AUTH if read_protected else (400, 429)
    admin: list[dict[str, list[str]]] = [{"adminToken": []}]
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
        "/v1/ingest/batch": {"post": {
            "operationId": "ingestBatch",
            "summary": "Submit several chunks (capability batch); results[i] answers chunks[i]",
            "security": [{"sensorToken": []}],
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": {
                    "type": "object", "required": ["chunks"],
                    "properties": {"chunks": {"type": "array", "maxItems": MAX_BATCH_CHUNKS,
                                              "items": _ref("Chunk")}}}}}},
            "responses": {"200": _json({"type": "object", "required": ["results"],
                                        "properties": {"results": {
                                            "type": "array", "items": {"oneOf": [
                                                _ref("IngestResult"),
                                                _ref("BatchRejection")]}}}},
                                       "One result per chunk, after the commit is durable"),
                          **_errors(*_AUTH, 404, 408, 409, 413, 415, 422, 503, 507)},
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
            "operationId": "listEvents",
            "summary": "Completed events in arrival order (asc, or desc with order=desc), "
                       "filtered by the results' time",
            "security": read_security,
            "parameters": [
                _sensor_param(), _time_query("since", "results at or after this time"),
                _time_query("until", "results before this time"),
                {"name": "order", "in": "query", "required": False,
                 "schema": {"type": "string", "enum": ["asc", "desc"]}},
                {"name": "after", "in": "query", "required": False,
                 "description": "cursor: the next ascending page (next_after)",
                 "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQUENCE}},
                {"name": "before", "in": "query", "required": False,
                 "description": "cursor: the next descending page (next_before)",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SEQUENCE}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
            "responses": {"200": _json({"type": "object",
                                        "required": ["sensor_id", "order", "events",
                                                     "next_after", "next_before"],
                                        "properties": {
                                            "sensor_id": {"type": "string"},
                                            "order": {"type": "string"},
                                            "events": {"type": "array", "items": _ref("Event")},
                                            "next_after": {"type": "integer",
                                                           "nullable": True},
                                            "next_before": {"type": "integer",
                                                            "nullable": True}}},
                                       "A page of events"),
                          **_errors(*read_errors, 404, 503)},
        }},
        "/v1/sensors/{sensor_id}/series": {"get": {
            "operationId": "sensorSeries",
            "summary": "One result field over a time range, one point per step (charts)",
            "security": read_security,
            "parameters": [
                _sensor_param(),
                {"name": "field", "in": "query", "required": True,
                 "description": "field name or dotted path into the result JSON",
                 "schema": {"type": "string", "maxLength": 200,
                            "pattern": r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"}},
                {"name": "test", "in": "query", "required": False,
                 "description": "only results whose test field is this",
                 "schema": {"type": "string", "maxLength": 64}},
                _time_query("since", "default: one hour before until"),
                _time_query("until", "default: now"),
                {"name": "step", "in": "query", "required": False,
                 "description": "seconds per point; (until - since) / step <= 1000",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 2678400}}],
            "responses": {"200": _json(_ref("Series"), "The series"),
                          **_errors(*read_errors, 404, 503)},
        }},
        "/v1/sensors/{sensor_id}/latest": {"get": {
            "operationId": "sensorLatest",
            "summary": "The latest result of every test type of one sensor",
            "security": read_security, "parameters": [_sensor_param()],
            "responses": {"200": _json(_ref("LatestResults"), "Latest results"),
                          **_errors(*read_errors, 404, 503)},
        }},
        "/v1/dashboard": {
            "get": {
                "operationId": "dashboard",
                "summary": "The UXI dashboard payload over the reporting window",
                "security": read_security,
                "responses": {"200": _json(_ref("Dashboard"), "The payload"),
                              **_errors(*read_errors, 503)},
            },
            "options": {
                "operationId": "dashboardPreflight", "summary": "CORS preflight",
                "security": [],
                "responses": {"204": {"description": "Allowed methods and headers"}},
            },
        },
        "/v1/dashboard/config": {"get": {
            "operationId": "dashboardConfig",
            "summary": "Where the dashboard page finds the UI stream", "security": [],
            "responses": {"200": _json(_ref("DashboardConfig"), "Stream location")},
        }},
        "/": {"get": {
            "operationId": "dashboardPage", "summary": "The operators' dashboard page",
            "security": [],
            "responses": {"200": {"description": "HTML page",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}},
        }},
        "/dashboard": {"get": {
            "operationId": "dashboardPageAlias", "summary": "The dashboard page (same as /)",
            "security": [],
            "responses": {"200": {"description": "HTML page",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}},
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
                          **_errors(*read_errors, 404, 409)},
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
    protected = request.app[GATE_KEY].read_token_sha256 is not None
    return web.json_response(document(read_protected=protected))
