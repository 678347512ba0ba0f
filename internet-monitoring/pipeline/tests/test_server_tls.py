"""TLS listeners: server certificates, and client certificates required by ``client_ca``."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
import trustme

from pipeline.common.errors import ConfigError
from pipeline.tests.server_support import TOKENS, envelope, running_server, server_config


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("pi-01.sensors.example")
    paths = {name: base / f"{name}.pem" for name in ("ca", "cert", "key", "client")}
    ca.cert_pem.write_to_path(paths["ca"])
    server.cert_chain_pems[0].write_to_path(paths["cert"])
    server.private_key_pem.write_to_path(paths["key"])
    client.private_key_and_cert_chain_pem.write_to_path(paths["client"])
    return paths


def client_context(pki, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if with_cert:
        ctx.load_cert_chain(str(pki["client"]))
    return ctx


async def test_tls_listeners_and_client_certificates(tmp_path, pki):
    tls = {"enabled": True, "cert": str(pki["cert"]), "key": str(pki["key"])}
    # The certificate names pi-01 as the DNS SAN pi-01.sensors.example (docs/security.md).
    config = server_config(tmp_path, control={"tls": {**tls, "client_ca": str(pki["ca"])}},
                           ingest={"tls": tls},
                           auth={"client_cert_dns_suffix": ".sensors.example"})
    async with running_server(config) as server:
        async with aiohttp.ClientSession() as http:
            ok = client_context(pki, with_cert=False)
            async with http.get(f"https://127.0.0.1:{server.ingest_port}/healthz", ssl=ok) as r:
                assert r.status == 200
            url = f"wss://127.0.0.1:{server.control_port}/control"
            headers = {"X-Sensor-ID": "pi-01", "Authorization": f"Bearer {TOKENS['pi-01']}"}
            with pytest.raises(aiohttp.ClientError):  # client_ca: a certificate is required
                ws = await http.ws_connect(url, headers=headers, ssl=ok)
                await ws.receive(timeout=5)
            ws = await http.ws_connect(url, headers=headers, ssl=client_context(pki, True))
            await ws.send_str(envelope("pi-01", "heartbeat", {
                "software_version": "x", "last_committed_sequence": 0, "queue_depth": 0,
                "clock_skew_ms": 0.0}))
            for _ in range(100):
                conn = server.manager.connection("pi-01")
                if conn is not None:
                    break
                await asyncio.sleep(0.02)
            assert conn is not None and conn.peer_certificate is not None
            assert ("DNS", "pi-01.sensors.example") in conn.peer_certificate["subjectAltName"]
            await ws.close()


async def test_unreadable_certificate_is_a_config_error(tmp_path):
    config = server_config(tmp_path, ingest={"tls": {"enabled": True,
                                                     "cert": str(tmp_path / "missing.pem"),
                                                     "key": str(tmp_path / "missing.key")}})
    with pytest.raises(ConfigError) as info:
        async with running_server(config):
            pass
    assert info.value.field == "ingest.tls.cert"
