"""The HTTP API fuzzed against its own OpenAPI document with schemathesis.

A real ``pipeline-server`` process (real sockets, real SQLite) serves ``/openapi.json``;
schemathesis loads it from there, generates schema-valid and schema-violating requests
for every operation, sends them with the credential each operation declares, and checks
every answer: never a 5xx, a documented status, a documented content type, a body that
matches the documented schema. Bounded: ``EXAMPLES`` cases per operation and mode."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (  # registered checks, looked up by name
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 25
# Conformance, not semantics. Left out: "positive_data_acceptance" (schema-valid => 2xx)
# cannot hold for an API that verifies content (a schema-valid chunk with a random payload
# is a 422 hash mismatch, another sensor's id a 403); "negative_data_rejection" would
# demand refusing unknown query parameters, which protocol.md tells receivers to ignore.
# Schema-violating requests are still generated (NEGATIVE mode) and must get conforming,
# non-5xx answers.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
SENSOR = "fuzz-sensor-token-0123456789"
STREAM = "fuzz-stream-token-0123456789"
ADMIN = "fuzz-admin-token-0123456789"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    config = {
        "store": {"path": str(base / "server.db")},
        "control": {"port": 0}, "ingest": {"port": 0}, "stream": {"port": 0, "token": STREAM},
        "auth": {"sensors": [{"id": "pi-01", "token": SENSOR}], "admin_token": ADMIN,
                 "reload_watch_s": 0},
        "limits": {"auth_failures_before_ban": 0, "chunk_rate": 0},
        "logging": {"level": "INFO"},
    }
    path = base / "server.yml"
    path.write_text(yaml.safe_dump(config))
    log = (base / "server.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.server", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"http://[0-9.]+:(\d+)/", line)
    assert match, f"server did not start: {line!r} {(base / 'server.log').read_text()[-2000:]}"
    url = f"http://127.0.0.1:{match.group(1)}"
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    log.seek(0)
    text = log.read()
    assert "Traceback" not in text and "level=error" not in text, text[-3000:]


def credential_for(path: str) -> dict[str, str]:
    if path == "/v1/ingest/chunk":
        token = SENSOR
    elif path.endswith("/rotate") or path.startswith("/v1/admin"):
        token = ADMIN
    elif path.startswith("/v1/"):
        token = STREAM
    else:
        return {}
    return {"Authorization": f"Bearer {token}"}


def test_every_operation_conforms_under_fuzzing(server_url):
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/ingest/chunk", "/v1/ingest/batch",
                                              "/v1/snapshots",
                                              "/v1/sensors/{sensor_id}/events",
                                              "/v1/sensors/{sensor_id}/series",
                                              "/v1/sensors/{sensor_id}/latest",
                                              "/v1/dashboard", "/v1/dashboard/config", "/",
                                              "/dashboard", "/healthz",
                                              "/metrics", "/v1/sensors/{sensor_id}/rotate"}
    session = requests.Session()
    statuses: dict[str, set[int]] = {}

    def fuzzer(operation, mode):
        headers = credential_for(operation.path)
        label = operation.label

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(base_url=server_url, session=session, headers=headers,
                                 timeout=10)
            statuses.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, (label, response.text[:500])
            case.validate_response(response, headers=headers, checks=CHECKS)

        return fuzz

    nothing_to_negate = set()
    for operation in operations:
        fuzzer(operation, GenerationMode.POSITIVE)()
        try:
            fuzzer(operation, GenerationMode.NEGATIVE)()
        except Unsatisfiable:
            nothing_to_negate.add(operation.label)
    # Only operations without parameters or body have no schema-violating variant.
    assert nothing_to_negate <= {"GET /healthz", "GET /readyz", "GET /metrics",
                                 "GET /openapi.json", "GET /v1/snapshots", "GET /v1/sensors",
                                 "POST /v1/admin/reload", "GET /v1/dashboard",
                                 "OPTIONS /v1/dashboard", "GET /v1/dashboard/config", "GET /",
                                 "GET /dashboard"}, nothing_to_negate
    elapsed = time.monotonic() - started
    print(f"fuzzed {len(operations)} operations in {elapsed:.1f}s: {statuses}")
    # The fuzzing reached past the front door: accepted and refused answers alike.
    assert 200 in statuses["GET /v1/snapshots"]
    assert statuses["POST /v1/ingest/chunk"] & {400, 403, 422}
    assert 200 in statuses["GET /v1/dashboard"]
    # Generated sensor ids are unknown to the server: every sensor route answers 404.
    assert 404 in statuses["GET /v1/sensors/{sensor_id}/series"]
    assert 404 in statuses["GET /v1/sensors/{sensor_id}/events"]
    assert elapsed < 60
    assert requests.get(f"{server_url}/healthz", timeout=5).status_code == 200


def test_the_document_is_served_and_describes_credentials(server_url):
    doc = requests.get(f"{server_url}/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.0")
    ops = doc["paths"]
    assert ops["/v1/ingest/chunk"]["post"]["security"] == [{"sensorToken": []}]
    assert ops["/v1/snapshots"]["get"]["security"] == [{"streamToken": []}]
    assert ops["/healthz"]["get"]["security"] == []
    assert set(doc["components"]["securitySchemes"]) == {"sensorToken", "streamToken",
                                                         "adminToken"}


def test_documented_statuses_are_real(server_url):
    """Spot checks that the document's claims hold (401 without a credential, 429 has
    Retry-After in the schema), so the fuzzing above is checking something real."""
    r = requests.post(f"{server_url}/v1/ingest/chunk", json={}, timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"
    doc = requests.get(f"{server_url}/openapi.json", timeout=5).json()
    responses = doc["paths"]["/v1/ingest/chunk"]["post"]["responses"]
    assert "Retry-After" in responses["429"]["headers"]
