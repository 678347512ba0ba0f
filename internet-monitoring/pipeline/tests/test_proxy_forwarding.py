"""Identity forwarded by a trusted reverse proxy (``proxy.*``, docs/tls-proxy.md).

Sans-I/O first (``server/forwarded.py``): which peers are believed, how a forwarded
certificate becomes the ``getpeercert()`` shape ``identity.py`` binds, what is ignored.
Then the gate in a real in-process server over real sockets: a forwarded certificate binds
the sensor id like direct mutual TLS, forged headers from another peer are ignored,
counted and logged once, bans and the per-address cap follow the real client address.
(The end-to-end run through a real Nginx and real processes is test_proxy_nginx.py.)"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from pipeline.common.config import ProxyConfig, ServerConfig, server_config_from_dict
from pipeline.common.errors import ConfigError, Forbidden
from pipeline.server.app import PipelineServer
from pipeline.server.security.forwarded import (
    LogThrottle,
    ProxyTrust,
    client_view,
    parse_forwarded_cert,
)
from pipeline.server.security.identity import certificate_identities
from pipeline.server.security.throttle import ConnectionLimiter
from pipeline.tests.security_support import make_pki
from pipeline.tests.server_support import TOKENS, eventually, running_server, server_config

NOW = time.time()
TRUST = ProxyTrust.from_config(ProxyConfig(trusted_proxies=("127.0.0.1", "10.8.0.0/24")))
UNTRUSTED_SOURCE = "127.0.0.2"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), ("pi-01", "pi-02"))


def escaped(path) -> str:
    """What Nginx puts in the header: ``$ssl_client_escaped_cert`` (URL-encoded PEM)."""
    return quote(path.read_text(), safe="")


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


# -- sans-I/O -----------------------------------------------------------------------------


def test_who_is_trusted():
    assert TRUST.trusts("127.0.0.1") and TRUST.trusts("10.8.0.77")
    assert TRUST.trusts("::ffff:127.0.0.1")  # a dual-stack listener's view of an IPv4 peer
    assert not TRUST.trusts("127.0.0.2") and not TRUST.trusts("10.8.1.1")
    assert not TRUST.trusts("") and not TRUST.trusts("not-an-ip")
    nobody = ProxyTrust.from_config(ProxyConfig())
    assert not nobody.trusts("127.0.0.1") and not nobody.trusts("::1")


def test_a_forwarded_certificate_names_the_sensors_direct_mtls_would(pki):
    view = client_view(TRUST, "127.0.0.1", headers(
        X_Client_Cert=escaped(pki.sensors["pi-01"].cert), X_Client_Verify="SUCCESS",
        X_Real_IP="203.0.113.9"), None, NOW)
    assert view.via_proxy and view.address == "203.0.113.9" and not view.ignored_headers
    assert certificate_identities(view.peercert) == {"pi-01"}
    uri = client_view(TRUST, "10.8.0.5", headers(
        X_Client_Cert=escaped(pki.uri_sensor.cert), X_Client_Verify="SUCCESS",
        X_Real_IP="2001:db8::7"), None, NOW)
    assert certificate_identities(uri.peercert) == {"pi-uri"}
    assert uri.address == "2001:db8::7"
    # Plain (unescaped) PEM is read too.
    plain = parse_forwarded_cert(pki.sensors["pi-02"].cert.read_text())
    assert certificate_identities(plain.peercert) == {"pi-02"}


def test_only_a_verified_certificate_counts(pki):
    for verify in ("FAILED:certificate has expired", "NONE", ""):
        view = client_view(TRUST, "127.0.0.1", headers(
            X_Client_Cert=escaped(pki.sensors["pi-01"].cert), X_Client_Verify=verify,
            X_Real_IP="203.0.113.9"), None, NOW)
        assert view.peercert is None, verify
    # The connection's own TLS certificate is the proxy's: never used for a proxied request.
    direct = {"subjectAltName": (("DNS", "pi-02"),)}
    view = client_view(TRUST, "127.0.0.1", headers(X_Real_IP="203.0.113.9"), direct, NOW)
    assert view.peercert is None


def test_unreadable_or_expired_forwarded_certificates_are_refused(pki):
    with pytest.raises(Forbidden):
        client_view(TRUST, "127.0.0.1", headers(X_Client_Cert="-----BEGIN%20junk",
                                                X_Client_Verify="SUCCESS"), None, NOW)
    with pytest.raises(Forbidden):
        client_view(TRUST, "127.0.0.1", headers(X_Client_Cert="A" * 20_000,
                                                X_Client_Verify="SUCCESS"), None, NOW)
    with pytest.raises(Forbidden):
        client_view(TRUST, "127.0.0.1", headers(
            X_Client_Cert=escaped(pki.expired_sensor.cert), X_Client_Verify="SUCCESS"),
            None, NOW)


def test_a_trusted_proxy_without_a_usable_address_falls_back_to_its_own(pki):
    for value in ("", "203.0.113.9, 10.0.0.1", "evil"):
        view = client_view(TRUST, "127.0.0.1", headers(X_Real_IP=value), None, NOW)
        assert view.address == "127.0.0.1" and view.bad_address, value
    proxied = headers(X_Client_Cert=escaped(pki.sensors["pi-01"].cert),
                      X_Client_Verify="SUCCESS")
    view = client_view(TRUST, "127.0.0.1", proxied, None, NOW)
    assert view.address == "127.0.0.1" and view.bad_address and view.peercert
    # A local tool on the proxy's host sends no forwarded header at all: not a problem.
    view = client_view(TRUST, "127.0.0.1", headers(), None, NOW)
    assert view.address == "127.0.0.1" and not view.bad_address and view.peercert is None


def test_headers_from_anyone_else_are_ignored_and_named(pki):
    forged = headers(X_Client_Cert=escaped(pki.sensors["pi-01"].cert),
                     X_Client_Verify="SUCCESS", X_Real_IP="198.51.100.1")
    own = {"subjectAltName": (("DNS", "pi-02"),)}
    view = client_view(TRUST, "192.0.2.50", forged, own, NOW)
    assert not view.via_proxy and view.address == "192.0.2.50" and view.peercert is own
    assert view.ignored_headers == ("X-Client-Cert", "X-Client-Verify", "X-Real-IP")
    # Nobody is trusted when trusted_proxies is empty, not even loopback.
    empty = ProxyTrust()
    view = client_view(empty, "127.0.0.1", forged, None, NOW)
    assert view.address == "127.0.0.1" and view.peercert is None and view.ignored_headers
    # Header names are configurable.
    custom = ProxyTrust.from_config(ProxyConfig(trusted_proxies=("127.0.0.1",),
                                                client_address_header="X-Client-IP"))
    view = client_view(custom, "127.0.0.1", headers(X_Client_IP="198.51.100.2",
                                                    X_Real_IP="198.51.100.3"), None, NOW)
    assert view.address == "198.51.100.2"


def test_log_throttle_says_how_much_it_held_back():
    throttle = LogThrottle(10.0)
    assert throttle.allow(100.0) == 0
    assert throttle.allow(101.0) is None and throttle.allow(105.0) is None
    assert throttle.allow(110.0) == 2
    assert throttle.allow(110.5) is None


def test_trusted_proxies_are_not_capped_per_address():
    limiter = ConnectionLimiter(2, exempt=TRUST.trusts)
    assert all(limiter.acquire("127.0.0.1") for _ in range(5))
    assert limiter.acquire("192.0.2.1") and limiter.acquire("192.0.2.1")
    assert not limiter.acquire("192.0.2.1")
    assert limiter.count("127.0.0.1") == 5


@pytest.mark.parametrize(("doc", "key"), [
    ({"trusted_proxies": ["127.0.0.1", "10.0.0.0/33"]}, "proxy.trusted_proxies[1]"),
    ({"trusted_proxies": ["nginx"]}, "proxy.trusted_proxies[0]"),
    ({"require_client_cert": ["control"]}, "proxy.require_client_cert"),
    ({"trusted_proxies": ["::1"], "require_client_cert": ["dashboard"]},
     "proxy.require_client_cert[0]"),
    ({"client_cert_header": "X Client: Cert"}, "proxy.client_cert_header"),
])
def test_proxy_config_errors_name_the_key(doc, key):
    with pytest.raises(ConfigError) as info:
        server_config_from_dict({"proxy": doc})
    assert info.value.field == key


def test_trusting_a_proxy_without_cryptography_stops_start_up(monkeypatch):
    """cryptography (server extra) is imported only when a proxy is trusted."""
    monkeypatch.setitem(sys.modules, "cryptography.x509", None)  # import -> ImportError
    assert not ProxyTrust.from_config(ProxyConfig()).networks  # no proxy: not needed
    with pytest.raises(ConfigError) as info:
        ProxyTrust.from_config(ProxyConfig(trusted_proxies=("127.0.0.1",)))
    assert info.value.field == "proxy.trusted_proxies"
    assert "openuxi-pipeline[server]" in info.value.message


def test_proxy_config_from_the_environment():
    config = server_config_from_dict({}, env={
        "PIPELINE_SERVER__PROXY__TRUSTED_PROXIES": "[127.0.0.1, '::1']",
        "PIPELINE_SERVER__PROXY__REQUIRE_CLIENT_CERT": "[control, ingest]"})
    assert config.proxy.trusted_proxies == ("127.0.0.1", "::1")
    assert config.proxy.require_client_cert == ("control", "ingest")


# -- the gate in a running server ---------------------------------------------------------


def _source(address: str) -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(local_addr=(address, 0), force_close=True)


def _hs(sensor_id: str, token_of: str, **extra: str) -> dict[str, str]:
    return {"X-Sensor-ID": sensor_id, "Authorization": f"Bearer {TOKENS[token_of]}", **extra}


def _forwarded(pki, name: str, address: str) -> dict[str, str]:
    return {"X-Client-Cert": escaped(pki.sensors[name].cert), "X-Client-Verify": "SUCCESS",
            "X-Real-IP": address}


async def test_gate_binds_forwarded_identity_and_ignores_forgeries(tmp_path, pki, caplog):
    config = server_config(tmp_path, proxy={"trusted_proxies": ["127.0.0.1"],
                                            "require_client_cert": ["control", "ingest"]},
                           limits={"auth_failures_before_ban": 2, "throttle_delay_s": 0})
    caplog.set_level(logging.WARNING, logger="pipeline.server.security.gate")
    async with running_server(config) as server:
        control = f"ws://127.0.0.1:{server.control_port}/control"
        metric = ("pipeline_forwarded_headers_ignored_total", {"listener": "control"})
        async with aiohttp.ClientSession() as proxy:  # from 127.0.0.1: the trusted proxy
            ws = await proxy.ws_connect(control, headers=_hs(
                "pi-01", "pi-01", **_forwarded(pki, "pi-01", "198.51.100.7")))
            await eventually(lambda: "pi-01" in server.manager.connections, what="pi-01 up")
            conn = server.manager.connections["pi-01"]
            assert conn.peer == "198.51.100.7" and conn.cert_bound
            await ws.close()
            # A forwarded certificate naming another sensor: 403, as with direct mTLS.
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await proxy.ws_connect(control, headers=_hs(
                    "pi-02", "pi-02", **_forwarded(pki, "pi-01", "198.51.100.7")))
            assert info.value.status == 403
            # The proxy forwarded no certificate: 403 on a require_client_cert listener.
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await proxy.ws_connect(control, headers=_hs("pi-01", "pi-01",
                                                            **{"X-Real-IP": "198.51.100.7"}))
            assert info.value.status == 403
        assert server.registry.get_sample_value(*metric) is None
        async with aiohttp.ClientSession(connector=_source(UNTRUSTED_SOURCE)) as forger:
            for _ in range(3):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await forger.ws_connect(control, headers=_hs(
                        "pi-01", "pi-01", **_forwarded(pki, "pi-01", "198.51.100.7")))
                assert info.value.status == 403
            assert "pi-01" not in server.manager.connections
        assert server.registry.get_sample_value(*metric) == 3
        lines = [r.getMessage() for r in caplog.records
                 if r.getMessage().startswith("forwarded_headers_ignored")]
        assert len(lines) == 1  # rate-limited: one line for the three attempts
        assert f"address={UNTRUSTED_SOURCE}" in lines[0] and "listener=control" in lines[0]
        assert "X-Client-Cert,X-Client-Verify,X-Real-IP" in lines[0]


async def test_bans_follow_the_forwarded_client_address(tmp_path, pki):
    config = server_config(tmp_path, proxy={"trusted_proxies": ["127.0.0.1"]},
                           limits={"auth_failures_before_ban": 2, "throttle_delay_s": 0})
    async with running_server(config) as server:
        url = f"http://127.0.0.1:{server.ingest_port}/v1/snapshots"
        bad = {"Authorization": "Bearer wrong", "X-Real-IP": "198.51.100.66"}
        async with aiohttp.ClientSession() as proxy:
            chunk = f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
            for _ in range(2):
                async with proxy.post(chunk, data=b"{}", headers=bad) as resp:
                    assert resp.status == 401
            async with proxy.post(chunk, data=b"{}", headers=bad) as resp:
                assert resp.status == 429  # 198.51.100.66 is banned ...
            async with proxy.get(url, headers={"X-Real-IP": "198.51.100.67"}) as resp:
                assert resp.status == 200  # ... not the proxy, nor its other clients
        # A peer that is not trusted cannot pin the ban on someone else's address.
        async with aiohttp.ClientSession(connector=_source(UNTRUSTED_SOURCE)) as other:
            for _ in range(2):
                async with other.post(chunk, data=b"{}", headers={
                        "Authorization": "Bearer wrong", "X-Real-IP": "198.51.100.67"}) as resp:
                    assert resp.status == 401
        async with aiohttp.ClientSession() as proxy:
            async with proxy.get(url, headers={"X-Real-IP": "198.51.100.67"}) as resp:
                assert resp.status == 200
            async with proxy.get(url, headers={"X-Real-IP": UNTRUSTED_SOURCE}) as resp:
                assert resp.status == 429  # the forger's own address took the ban



async def test_stream_listener_behind_the_proxy_needs_a_forwarded_certificate(tmp_path, pki):
    config = server_config(tmp_path, proxy={"trusted_proxies": ["127.0.0.1"],
                                            "require_client_cert": ["stream"]})
    async with running_server(config) as server:
        url = f"ws://127.0.0.1:{server.stream_port}/"
        async with aiohttp.ClientSession() as proxy:
            ws = await proxy.ws_connect(url, headers=_forwarded(pki, "pi-02", "198.51.100.8"))
            assert (await ws.receive_json(timeout=5))["type"] == "snapshot_batch"
            await ws.close()
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await proxy.ws_connect(url, headers={"X-Real-IP": "198.51.100.8"})
            assert info.value.status == 403
        async with aiohttp.ClientSession(connector=_source(UNTRUSTED_SOURCE)) as forger:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await forger.ws_connect(url, headers=_forwarded(pki, "pi-02", "198.51.100.8"))
            assert info.value.status == 403
        assert server.registry.get_sample_value(
            "pipeline_forwarded_headers_ignored_total", {"listener": "stream"}) == 1


async def test_trusted_proxies_reload_without_a_restart(tmp_path, pki):
    holder = {"proxy": {"trusted_proxies": []}}

    def loader() -> ServerConfig:
        return server_config(tmp_path, proxy=holder["proxy"],
                             limits={"auth_failures_before_ban": 1, "throttle_delay_s": 0})

    server = PipelineServer(loader(), registry=CollectorRegistry(), config_loader=loader)
    await server.start()
    try:
        chunk = f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
        snapshots = f"http://127.0.0.1:{server.ingest_port}/v1/snapshots"
        bad = {"Authorization": "Bearer wrong", "X-Real-IP": "198.51.100.70"}
        async with aiohttp.ClientSession() as http:
            holder["proxy"] = {"trusted_proxies": ["127.0.0.0/8"],
                               "require_client_cert": ["stream"]}
            result = await server.security.reload("test")
            # Which listeners need certificates is fixed at start-up (as tls.client_ca is).
            assert result.warnings == ("proxy.require_client_cert",)
            async with http.post(chunk, data=b"{}", headers=bad) as resp:
                assert resp.status == 401  # bans 198.51.100.70, believed now
            async with http.get(snapshots, headers={"X-Real-IP": "198.51.100.70"}) as resp:
                assert resp.status == 429
            holder["proxy"] = {"trusted_proxies": []}
            await server.security.reload("test")
            async with http.get(snapshots, headers={"X-Real-IP": "198.51.100.70"}) as resp:
                assert resp.status == 200  # the header means nothing any more
    finally:
        await server.stop()


async def _healthz(port: int, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(1024), timeout=3)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_the_trusted_proxy_is_not_capped_per_address(tmp_path):
    config = server_config(tmp_path, proxy={"trusted_proxies": ["127.0.0.1"]},
                           limits={"max_connections_per_address": 2})
    async with running_server(config) as server:
        port = server.ingest_port
        held = [await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1",
                               UNTRUSTED_SOURCE, UNTRUSTED_SOURCE)]
        await asyncio.sleep(0.1)
        try:
            assert (await _healthz(port, "127.0.0.1")).startswith(b"HTTP/1.1 200")
            assert await _healthz(port, UNTRUSTED_SOURCE) == b""  # over its cap of 2
        finally:
            for _, writer in held:
                writer.close()


async def test_a_forwarded_certificate_binds_even_where_it_is_optional(tmp_path, pki):
    """trusted_proxies without require_client_cert: tokens authenticate, and a certificate
    the proxy did forward must still name the sensor (pi-01's certificate never carries
    pi-02's token)."""
    config = server_config(tmp_path, proxy={"trusted_proxies": ["127.0.0.1"]})
    async with running_server(config) as server:
        control = f"ws://127.0.0.1:{server.control_port}/control"
        chunk = f"http://127.0.0.1:{server.ingest_port}/v1/ingest/chunk"
        async with aiohttp.ClientSession() as proxy:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await proxy.ws_connect(control, headers=_hs(
                    "pi-02", "pi-02", **_forwarded(pki, "pi-01", "198.51.100.9")))
            assert info.value.status == 403
            async with proxy.post(chunk, data=b"{}", headers=_hs(
                    "pi-02", "pi-02", **_forwarded(pki, "pi-01", "198.51.100.9"))) as resp:
                assert resp.status == 403
            ws = await proxy.ws_connect(control, headers=_hs("pi-02", "pi-02"))
            await eventually(lambda: "pi-02" in server.manager.connections, what="pi-02 up")
            assert not server.manager.connections["pi-02"].cert_bound
            await ws.close()
