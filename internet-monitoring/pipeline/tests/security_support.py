"""Shared pieces of the security tests: a PKI made with trustme (plus one URI-SAN leaf made
with ``cryptography`` from the trustme CA's public PEMs), a real sensor agent wired to a
running server, and small waiting helpers."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.common.config import SensorConfig, sensor_config_from_dict
from pipeline.sensor.agent import SensorAgent
from pipeline.sensor.queue import DurableQueue
from pipeline.sensor.submit import open_queue
from pipeline.server.app import PipelineServer


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Leaf
    sensors: dict[str, Leaf]
    wrong_ca_sensor: Leaf
    expired_sensor: Leaf
    uri_sensor: Leaf          # SAN URI urn:openuxi:sensor:pi-uri only
    other_ca: Path
    rotated_server: Leaf      # a second server certificate (reload test)


def _write_leaf(leaf: trustme.LeafCert, base: Path, name: str) -> Leaf:
    cert, key = base / f"{name}.crt", base / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    return Leaf(cert, key)


def _uri_leaf(ca: trustme.CA, uri: str, base: Path, name: str) -> Leaf:
    """A client certificate whose only name is a SAN URI (trustme issues none)."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    cert_path, key_path = base / f"{name}.crt", base / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Leaf(cert_path, key_path)


def make_pki(base: Path, sensor_ids: tuple[str, ...] = ("pi-01", "pi-02")) -> Pki:
    ca = trustme.CA()
    other = trustme.CA()
    ca_path, other_path = base / "ca.pem", base / "other-ca.pem"
    ca.cert_pem.write_to_path(ca_path)
    other.cert_pem.write_to_path(other_path)
    now = dt.datetime.now(dt.timezone.utc)
    return Pki(
        ca=ca_path,
        server=_write_leaf(ca.issue_cert("127.0.0.1", "localhost"), base, "server"),
        sensors={sid: _write_leaf(ca.issue_cert(sid), base, sid) for sid in sensor_ids},
        wrong_ca_sensor=_write_leaf(other.issue_cert(sensor_ids[0]), base, "wrong-ca"),
        expired_sensor=_write_leaf(
            ca.issue_cert(sensor_ids[0], not_before=now - dt.timedelta(days=10),
                          not_after=now - dt.timedelta(days=1)), base, "expired"),
        uri_sensor=_uri_leaf(ca, "urn:openuxi:sensor:pi-uri", base, "uri"),
        other_ca=other_path,
        rotated_server=_write_leaf(ca.issue_cert("127.0.0.1", "localhost",
                                                 organization_name="rotated"), base, "server2"),
    )


def sensor_config(server: PipelineServer, tmp_path: Path, sensor_id: str, *,
                  token: str | None = None, token_file: Path | None = None,
                  tls: dict[str, Any] | None = None,
                  capabilities: tuple[str, ...] = ("chunks", "heartbeats", "epoch"),
                  **extra: Any) -> SensorConfig:
    """A real agent's configuration pointing at ``server`` (wss/https when ``tls``)."""
    secure = tls is not None
    doc: dict[str, Any] = {
        "sensor_id": sensor_id,
        "heartbeat_interval": 2.0,
        "capabilities": list(capabilities),
        "queue": {"path": str(tmp_path / f"queue-{sensor_id}.db"), "slice_size": 65536},
        "control": {"url": f"{'wss' if secure else 'ws'}://127.0.0.1:{server.control_port}"
                           "/control", "ping_interval": 5, "ping_timeout": 5,
                    **({"tls": tls} if secure else {})},
        "ingest": {"url": f"{'https' if secure else 'http'}://127.0.0.1:{server.ingest_port}"
                          "/v1/ingest/chunk", "timeout": 5, "max_parallel": 4,
                   **({"tls": tls} if secure else {})},
        "backoff": {"initial_s": 0.05, "max_s": 0.3, "jitter": 0.1},
    }
    if token is not None:
        doc["token"] = token
    if token_file is not None:
        doc["token_file"] = str(token_file)
    doc.update(extra)
    return sensor_config_from_dict(doc)


@asynccontextmanager
async def running_agent(config: SensorConfig) -> AsyncIterator[tuple[SensorAgent, DurableQueue]]:
    queue = open_queue(config)
    agent = SensorAgent(config, queue)
    task = asyncio.create_task(agent.run())
    try:
        yield agent, queue
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
        queue.close()


def enqueue(queue: DurableQueue, agent: SensorAgent, count: int, size: int = 2000) -> set[str]:
    ids = {queue.enqueue(os.urandom(size)).event_id for _ in range(count)}
    agent.notify_enqueued()
    return ids


def stored_events(server: PipelineServer, sensor_id: str) -> set[str]:
    assert server.store is not None
    return {e.event_id for e in server.store.events(sensor_id, after=0, limit=10_000)}


def presented_cert(port: int, ca: Path) -> bytes:
    """The certificate (DER) a TLS listener on 127.0.0.1:``port`` presents in a fresh
    handshake verified against ``ca``: what a sensor connecting now would see."""
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def cert_der(path: Path) -> bytes:
    """A PEM certificate file as DER, to compare with ``presented_cert``."""
    return ssl.PEM_cert_to_DER_cert(path.read_text())
