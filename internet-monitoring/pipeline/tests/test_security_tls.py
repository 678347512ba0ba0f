"""Mutual TLS bound to sensor identity, over real sockets, with certificates from trustme.

Refused: no certificate, a certificate from another CA, an expired certificate (all at the
TLS handshake), and a valid certificate naming another sensor than the one claimed (403 at
the HTTP layer, before any WebSocket upgrade). Accepted: the right certificate, end to end
with the real sensor agent over wss:// and https://. Certificates reload in place."""

from __future__ import annotations

import asyncio
import shutil
import ssl

import aiohttp
import pytest

from pipeline.common.errors import ConfigError
from pipeline.tests.security_support import (
    enqueue,
    make_pki,
    running_agent,
    sensor_config,
    stored_events,
)
from pipeline.tests.server_support import (
    TOKENS,
    chunk_docs,
    envelope,
    eventually,
    running_server,
    server_config,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ("pi-01", "pi-02"))


def mtls_config(tmp_path, pki, **auth):
    tls = {"enabled": True, "cert": str(pki.server.cert), "key": str(pki.server.key),
           "client_ca": str(pki.ca)}
    return server_config(tmp_path, control={"tls": tls}, ingest={"tls": tls},
                         auth=auth, limits={"auth_failures_before_ban": 0})


def client_ctx(pki, leaf=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if leaf is not None:
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    return ctx


def hs(sensor_id: str, token_of: str | None = None) -> dict[str, str]:
    headers = {"X-Sensor-ID": sensor_id}
    if token_of is not None:
        headers["Authorization"] = f"Bearer {TOKENS[token_of]}"
    return headers


def one_chunk(sensor_id: str, sequence: int = 1) -> dict:
    _, docs = chunk_docs(sensor_id, b'{"v": 1}', sequence)
    docs[0]["attributes"] = {"window_id": "w-tls"}
    return docs[0]


async def test_missing_wrong_ca_and_expired_certificates_fail_the_handshake(tmp_path, pki):
    async with running_server(mtls_config(tmp_path, pki)) as server:
        control = f"wss://127.0.0.1:{server.control_port}/control"
        ingest = f"https://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
        for leaf in (None, pki.wrong_ca_sensor, pki.expired_sensor):
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):
                    ws = await http.ws_connect(control, headers=hs("pi-01", "pi-01"),
                                               ssl=client_ctx(pki, leaf))
                    await ws.receive(timeout=5)  # TLS 1.3: the alert arrives on first read
                with pytest.raises(aiohttp.ClientError):
                    async with http.post(ingest, json=one_chunk("pi-01"),
                                         headers={"Authorization": f"Bearer {TOKENS['pi-01']}"},
                                         ssl=client_ctx(pki, leaf)) as resp:
                        await resp.read()
        assert not server.manager.connections
        assert server.store.chunk_count() == 0


async def test_a_certificate_only_speaks_for_the_sensor_it_names(tmp_path, pki):
    async with running_server(mtls_config(tmp_path, pki)) as server:
        control = f"wss://127.0.0.1:{server.control_port}/control"
        ingest = f"https://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
        a_cert = client_ctx(pki, pki.sensors["pi-01"])
        async with aiohttp.ClientSession() as http:
            # pi-01's certificate claiming pi-02, even with pi-02's own token: refused
            # before the upgrade.
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(control, headers=hs("pi-02", "pi-02"), ssl=a_cert)
            assert info.value.status == 403
            pi02_auth = {"Authorization": f"Bearer {TOKENS['pi-02']}"}
            async with http.post(ingest, json=one_chunk("pi-02"), headers=pi02_auth,
                                 ssl=a_cert) as resp:
                assert resp.status == 403
                doc = await resp.json()
                assert doc["error"] == "forbidden" and TOKENS["pi-02"] not in str(doc)
            async with http.post(ingest, json=one_chunk("pi-01"),
                                 headers={**pi02_auth, "X-Sensor-ID": "pi-02"},
                                 ssl=a_cert) as resp:
                assert resp.status == 403            # the header claim is checked too
            # A valid certificate does not replace the token (client_cert_only is off).
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(control, headers=hs("pi-01"), ssl=a_cert)
            assert info.value.status == 401
            # The right certificate and token: connected, and its chunks are stored.
            ws = await http.ws_connect(control, headers=hs("pi-01", "pi-01"), ssl=a_cert)
            await ws.send_str(envelope("pi-01", "heartbeat", {
                "software_version": "x", "last_committed_sequence": 0, "queue_depth": 0,
                "clock_skew_ms": 0.0}))
            await eventually(lambda: server.manager.is_connected("pi-01"), what="connected")
            assert server.manager.connections["pi-01"].cert_bound
            # An envelope naming another sensor on this socket closes it with 1008.
            await ws.send_str(envelope("pi-02", "heartbeat", {
                "software_version": "x", "last_committed_sequence": 0, "queue_depth": 0,
                "clock_skew_ms": 0.0}))
            msg = await ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008
            async with http.post(ingest, json=one_chunk("pi-01"),
                                 headers={"Authorization": f"Bearer {TOKENS['pi-01']}"},
                                 ssl=a_cert) as resp:
                assert resp.status == 200
        assert server.store.chunk_count() == 1


async def test_uri_san_and_certificate_only_mode(tmp_path, pki):
    config = mtls_config(tmp_path, pki, client_cert_only=True)
    async with running_server(config) as server:
        control = f"wss://127.0.0.1:{server.control_port}/control"
        ingest = f"https://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
        uri = client_ctx(pki, pki.uri_sensor)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(control, headers={"X-Sensor-ID": "pi-uri"}, ssl=uri)
            await eventually(lambda: server.manager.is_connected("pi-uri"), what="connected")
            async with http.post(ingest, json=one_chunk("pi-uri"), ssl=uri) as resp:
                assert resp.status == 200, await resp.text()
            async with http.post(ingest, json=one_chunk("pi-01", 5), ssl=uri) as resp:
                assert resp.status == 403
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await http.ws_connect(control, headers={"X-Sensor-ID": "pi-01"}, ssl=uri)
            assert info.value.status == 403
            await ws.close()
        assert server.store.chunk_count() == 1


async def test_real_agent_over_mutual_tls_end_to_end(tmp_path, pki):
    async with running_server(mtls_config(tmp_path, pki)) as server:
        leaf = pki.sensors["pi-02"]
        tls = {"enabled": True, "ca_cert": str(pki.ca), "cert": str(leaf.cert),
               "key": str(leaf.key)}
        config = sensor_config(server, tmp_path, "pi-02", token=TOKENS["pi-02"], tls=tls)
        async with running_agent(config) as (agent, queue):
            ids = enqueue(queue, agent, 5, size=100_000)  # two chunks each
            await eventually(lambda: ids <= stored_events(server, "pi-02"), timeout=20,
                             what="events stored over mTLS")
            await eventually(lambda: queue.queue_depth() == 0, what="queue drained")
            assert server.manager.connections["pi-02"].cert_bound


async def test_server_certificate_reloads_in_place(tmp_path, pki):
    cert, key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    tls = {"enabled": True, "cert": str(cert), "key": str(key)}
    config = server_config(tmp_path, ingest={"tls": tls}, control={"tls": tls},
                           auth={"reload_watch_s": 0})

    async def organization(port: int) -> str:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki))
        subject = writer.get_extra_info("peercert")["subject"]
        writer.close()
        names = {k: v for rdn in subject for k, v in rdn}
        return names.get("organizationName", "")

    async with running_server(config) as server:
        before = await organization(server.ingest_port)
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"wss://127.0.0.1:{server.control_port}/control",
                                       headers=hs("pi-01", "pi-01"), ssl=client_ctx(pki))
            await eventually(lambda: server.manager.is_connected("pi-01"), what="connected")
            shutil.copy(pki.rotated_server.cert, cert)
            shutil.copy(pki.rotated_server.key, key)
            result = await server.security.reload("test")
            assert result.closed_connections == 0
            after = await organization(server.ingest_port)
            assert before != after and after == "rotated"
            assert not ws.closed and server.manager.is_connected("pi-01")
            # A broken certificate file: the reload fails and the live one keeps serving.
            cert.write_text("not a certificate")
            with pytest.raises(ConfigError) as info:
                await server.security.reload("test")
            assert info.value.field == "ingest.tls.cert" or info.value.field == "control.tls.cert"
            assert await organization(server.ingest_port) == "rotated"
            await ws.close()
