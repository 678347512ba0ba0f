"""The shipped Nginx configuration, for real: rendered and checked with the commands of
docs/tls-proxy.md, then run as a real ``nginx`` process terminating mutual TLS between a
real ``pipeline-sensor`` process and a real ``pipeline-server`` process.

Proved here: ``nginx -t`` accepts the shipped template as rendered by the documented
command; events arrive exactly once, under the identity the client certificate names; a
client cannot forge the forwarded identity, neither through Nginx (its headers are
replaced) nor by connecting to the server directly from another address (ignored, 403,
counted); a ban lands on the client's own address, not on Nginx's; ``nginx -s reload``
(the Certbot deploy hook) serves a renewed certificate."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import aiohttp
import pytest
import yaml

from pipeline.common.config import (
    HeartbeatConfig,
    IngestConfig,
    LimitsConfig,
    server_config_from_dict,
)
from pipeline.sensor.queue import DurableQueue
from pipeline.sim.processes import SensorProcess, ServerProcess, free_port
from pipeline.tests.conftest import require_tool
from pipeline.tests.security_support import Leaf, Pki, cert_der, make_pki, presented_cert
from pipeline.tests.server_support import eventually

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "tls-proxy.md"
NGINX_DIR = ROOT / "internet-monitoring" / "pipeline" / "nginx"
TOKENS = {"pi-01": "nginx-e2e-token-pi-01-0123456789",
          "pi-02": "nginx-e2e-token-pi-02-0123456789"}
ATTACKER = "127.0.0.2"     # a second client address on loopback (127.0.0.0/8 is all lo)
BYSTANDER = "127.0.0.3"
EVENTS = 12


SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def nginx_bin() -> str:
    """Debian installs nginx in /usr/sbin, which a non-root PATH may lack."""
    return shutil.which("nginx", path=SBIN_PATH) or require_tool("nginx")


def doc_blocks() -> list[str]:
    """The ```sh blocks of docs/tls-proxy.md, in order."""
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(), flags=re.S)


def run_block(block: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def deploy_hook() -> str:
    """The Certbot deploy hook command docs/tls-proxy.md gives."""
    match = re.search(r'--deploy-hook "([^"]+)"', DOC.read_text())
    assert match, "docs/tls-proxy.md shows no --deploy-hook"
    return match.group(1)


def template_variables() -> set[str]:
    return set(re.findall(r"\$\{(PIPELINE_[A-Z_]+)\}", (NGINX_DIR / "pipeline.vars").read_text()))


# -- the documented commands ------------------------------------------------------------


def test_the_documented_variables_are_exactly_the_templates():
    exports, _render = doc_blocks()
    done = run_block(exports + '\nenv | grep "^PIPELINE_" | cut -d= -f1\n',
                     {"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr
    documented = set(done.stdout.split())
    in_template = set(re.findall(r"\$\{(PIPELINE_[A-Z_]+)\}",
                                 (NGINX_DIR / "pipeline.conf.template").read_text()))
    assert documented == template_variables() == in_template


def test_the_documented_server_settings_load():
    (block,) = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    config = server_config_from_dict(yaml.safe_load(block))
    assert config.proxy.trusted_proxies == ("127.0.0.1",)
    assert config.proxy.require_client_cert == ("control", "ingest")
    assert (config.control.bind, config.control.port) == ("127.0.0.1", 8765)


def test_the_template_matches_the_servers_limits():
    """Body cap and deadlines as the server's defaults; the WebSocket outlives heartbeats."""
    text = (NGINX_DIR / "pipeline.conf.template").read_text()
    cap = IngestConfig().max_body_bytes
    assert re.search(r"client_max_body_size (\d+)m;", text).group(1) == str(cap // 2**20)
    assert f"larger than {cap} bytes" in text
    limits, heartbeat = LimitsConfig(), HeartbeatConfig()
    assert f"client_header_timeout {limits.header_timeout_s:g}s;" in text
    assert f"client_body_timeout {limits.body_timeout_s:g}s;" in text
    assert f"limit_conn pipeline_per_address {limits.max_connections_per_address};" in text
    control = re.search(r"location = /control \{(.*?)\}", text, flags=re.S).group(1)
    read = int(re.search(r"proxy_read_timeout (\d+)s;", control).group(1))
    assert read > heartbeat.interval_s * heartbeat.missed_before_disconnect
    assert read > limits.ws_ping_interval_s
    keepalive = int(re.search(r"keepalive_timeout (\d+)s;", text).group(1))
    assert keepalive < limits.header_timeout_s  # Nginx drops idle upstream links first


def render(tmp_path: Path, values: dict[str, str]) -> Path:
    """Run the documented render-and-check block; the rendered file's path."""
    nginx_bin()
    require_tool("envsubst")
    _exports, block = doc_blocks()
    env = {"PATH": SBIN_PATH, "TMPDIR": str(tmp_path), **values}
    done = run_block(block, env)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"checked: (\S+)", done.stdout)
    assert match, done.stdout
    rendered = Path(match.group(1))
    text = rendered.read_text()
    assert "${" not in text
    return rendered


def nginx_values(pki: Pki, cert_dir: Path, port: int, control: int, ingest: int
                 ) -> dict[str, str]:
    cert_dir.mkdir(exist_ok=True)
    shutil.copy(pki.server.cert, cert_dir / "fullchain.pem")
    shutil.copy(pki.server.key, cert_dir / "privkey.pem")
    return {"PIPELINE_NGINX_LISTEN": f"127.0.0.1:{port}",
            "PIPELINE_NGINX_SERVER_NAME": "localhost",
            "PIPELINE_NGINX_CERT": str(cert_dir / "fullchain.pem"),
            "PIPELINE_NGINX_KEY": str(cert_dir / "privkey.pem"),
            "PIPELINE_NGINX_CLIENT_CA": str(pki.ca),
            "PIPELINE_CONTROL_UPSTREAM": f"127.0.0.1:{control}",
            "PIPELINE_INGEST_UPSTREAM": f"127.0.0.1:{ingest}"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("pi-01", "pi-02"))


def test_nginx_t_rejects_a_broken_rendering(tmp_path, pki):
    """The check can fail: a certificate path that does not exist is refused."""
    values = nginx_values(pki, tmp_path / "certs", free_port(), 1, 2)
    render(tmp_path, values)
    values["PIPELINE_NGINX_CERT"] = str(tmp_path / "missing.pem")
    _exports, block = doc_blocks()
    done = run_block(block, {"PATH": SBIN_PATH, "TMPDIR": str(tmp_path), **values})
    assert done.returncode != 0 and "missing.pem" in done.stderr


# -- a running Nginx --------------------------------------------------------------------


@dataclass
class Nginx:
    prefix: Path
    port: int
    proc: subprocess.Popen[bytes]

    def argv(self, *extra: str) -> list[str]:
        return [nginx_bin(), "-p", f"{self.prefix}/", "-c",
                str(self.prefix / "nginx.conf"), *extra]

    def run_hook(self, command: str) -> None:
        """Run a shell command as Certbot runs a deploy hook, with ``nginx`` meaning this
        instance (a shim adds -p/-c; the command itself is run as written)."""
        shim_dir = self.prefix / "bin"
        shim_dir.mkdir(exist_ok=True)
        shim = shim_dir / "nginx"
        shim.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in self.argv()) + ' "$@"\n')
        shim.chmod(0o755)
        done = subprocess.run(["sh", "-c", command], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "PATH": f"{shim_dir}:{SBIN_PATH}"})
        assert done.returncode == 0, done.stdout + done.stderr

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def start_nginx(prefix: Path, rendered: Path, port: int) -> Nginx:
    """Nginx as a foreground process on the rendered shipped file; everything it writes
    (pid, logs, temp files) under ``prefix``."""
    prefix.mkdir()
    shutil.copy(rendered, prefix / "pipeline.conf")
    temp = "\n".join(f"    {kind}_temp_path {prefix}/{kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    # Workers run as root here only because pytest's tmp directories are root-only (0700).
    user = "user root;\n" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        f"{user}pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
        "worker_processes 1;\nevents { worker_connections 512; }\n"
        f"http {{\n    access_log {prefix}/access.log;\n{temp}\n    include pipeline.conf;\n}}\n")
    with (prefix / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(
            [nginx_bin(), "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=err)
    nginx = Nginx(prefix, port, proc)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise AssertionError("nginx exited: " + (prefix / "stderr.log").read_text()
                                 + nginx.error_log())
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return nginx
        except OSError:
            if time.monotonic() > deadline:
                stop_nginx(nginx)
                raise AssertionError("nginx did not listen: " + nginx.error_log()) from None
            time.sleep(0.05)


def stop_nginx(nginx: Nginx) -> None:
    if nginx.proc.poll() is None:
        nginx.proc.terminate()
        try:
            nginx.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.proc.kill()
            nginx.proc.wait(timeout=10)


@dataclass
class Stack:
    pki: Pki
    nginx: Nginx
    server: ServerProcess
    sensor: SensorProcess
    certs: Path

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.nginx.port}"


@pytest.fixture
def stack(tmp_path, pki) -> Iterator[Stack]:
    server = ServerProcess(tmp_path / "server", TOKENS, extra_config={
        "proxy": {"trusted_proxies": ["127.0.0.1"], "require_client_cert": ["control", "ingest"]},
        "limits": {"auth_failures_before_ban": 3, "ban_s": 120, "throttle_delay_s": 0},
        "heartbeat": {"interval_s": 2.0}})
    port = free_port()
    values = nginx_values(pki, tmp_path / "certs", port, server.control_port, server.ingest_port)
    rendered = render(tmp_path, values)
    tls = {"enabled": True, "ca_cert": str(pki.ca), "cert": str(pki.sensors["pi-01"].cert),
           "key": str(pki.sensors["pi-01"].key)}
    sensor = SensorProcess(tmp_path / "sensor", "pi-01", TOKENS["pi-01"],
                           control_url=f"wss://127.0.0.1:{port}/control",
                           ingest_url=f"https://127.0.0.1:{port}/v1/ingest/chunk",
                           extra_config={"control": {"tls": tls}, "ingest": {"tls": tls},
                                         "backoff": {"initial_s": 0.1, "max_s": 1.0}})
    nginx: Nginx | None = None
    try:
        server.start()
        nginx = start_nginx(tmp_path / "nginx", rendered, port)
        sensor.start()
        yield Stack(pki, nginx, server, sensor, tmp_path / "certs")
    finally:
        # Every process this fixture started is stopped, also when a later one failed.
        sensor.terminate()
        if nginx is not None:
            stop_nginx(nginx)
        code = server.terminate()
    assert code == 0, server.log_text()[-3000:]


def client_ssl(pki: Pki, leaf: Leaf | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if leaf is not None:
        ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    return ctx


def session(pki: Pki, leaf: Leaf | None, source: str = "127.0.0.1") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(
        ssl=client_ssl(pki, leaf), local_addr=(source, 0), force_close=True))


def submit(queue_path: Path, count: int, tag: str) -> set[str]:
    """Enqueue like a test program does: straight into the sensor's durable queue."""
    with DurableQueue(queue_path) as queue:
        return {queue.enqueue(f'{{"test":"ping","tag":"{tag}","i":{i}}}'.encode()).event_id
                for i in range(count)}


async def stored(server: ServerProcess) -> list[str]:
    events = await asyncio.to_thread(server.events, "pi-01")
    return [e["event_id"] for e in events]


def metric(server: ServerProcess, name: str) -> float:
    text = urllib_get(server.http_base + "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def urllib_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


async def ws_status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    try:
        ws = await http.ws_connect(url, headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        return exc.status
    await ws.close()
    return 101


def bearer(sensor_id: str, token: str | None = None, **extra: str) -> dict[str, Any]:
    return {"X-Sensor-ID": sensor_id,
            "Authorization": f"Bearer {token if token is not None else TOKENS[sensor_id]}",
            **extra}


async def test_real_agent_through_real_nginx_mutual_tls(stack: Stack):
    server, sensor, pki = stack.server, stack.sensor, stack.pki
    # 1. Exactly once, under the certificate's identity.
    sent = submit(sensor.queue_path, EVENTS, "first")

    async def all_stored() -> bool:
        return len(await stored(server)) >= EVENTS

    await eventually(all_stored, timeout=30, what="events through nginx")
    ids = await stored(server)
    assert sorted(ids) == sorted(sent) and len(ids) == len(set(ids))
    log = server.log_text()
    assert "control_connected sensor_id=pi-01 peer=127.0.0.1" in log
    sensors = await asyncio.to_thread(server.get_json, "/v1/sensors")
    assert {s["sensor_id"]: s["connected"] for s in sensors["sensors"]}["pi-01"] is True

    control = f"wss://127.0.0.1:{stack.nginx.port}/control"
    chunk = f"{stack.base}/v1/ingest/chunk"
    pi01_pem = quote(pki.sensors["pi-01"].cert.read_text(), safe="")
    # 2. The certificate decides who you are, whatever else you send through Nginx.
    async with session(pki, pki.sensors["pi-02"]) as pi02:
        # pi-02's certificate claiming pi-01, with pi-01's token and a smuggled copy of
        # pi-01's certificate in the forwarded header: Nginx replaces the header -> 403.
        smuggled = {"X-Client-Cert": pi01_pem, "X-Client-Verify": "SUCCESS",
                    "X-Real-IP": "10.9.9.9"}
        assert await ws_status(pi02, control, bearer("pi-01") | smuggled) == 403
        async with pi02.post(chunk, data=b"{}", headers=bearer("pi-01") | smuggled) as resp:
            assert resp.status == 403
        async with pi02.get(f"{stack.base}/v1/snapshots") as resp:
            assert resp.status == 404  # only the sensor routes are proxied
        too_big = b"x" * (4 * 2**20 + 1)
        async with pi02.post(chunk, data=too_big, headers=bearer("pi-02")) as resp:
            assert resp.status == 413 and (await resp.json())["error"] == "too_large"
    async with session(pki, None) as anonymous:
        async with anonymous.post(chunk, data=b"{}", headers=bearer("pi-01")) as resp:
            assert resp.status == 403
            assert (await resp.json())["field"] == "certificate"
    async with session(pki, pki.wrong_ca_sensor) as stranger:
        async with stranger.post(chunk, data=b"{}", headers=bearer("pi-01")) as resp:
            assert resp.status == 403

    # 3. Straight to the server from another address, forged headers: ignored -> 403.
    ignored_before = metric(server, "pipeline_forwarded_headers_ignored_total")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(ATTACKER, 0), force_close=True)) as direct:
        forged = {"X-Client-Cert": pi01_pem, "X-Client-Verify": "SUCCESS",
                  "X-Real-IP": "127.0.0.1"}
        assert await ws_status(direct, f"ws://127.0.0.1:{server.control_port}/control",
                               bearer("pi-01") | forged) == 403
        async with direct.post(f"{server.http_base}/v1/ingest/chunk", data=b"{}",
                               headers=bearer("pi-01") | forged) as resp:
            assert resp.status == 403
    assert metric(server, "pipeline_forwarded_headers_ignored_total") == ignored_before + 2
    assert f"forwarded_headers_ignored listener=control address={ATTACKER}" in server.log_text()

    # 4. Bans hit the client's own address, not Nginx's (which every request comes from).
    async with session(pki, pki.sensors["pi-02"], ATTACKER) as attacker:
        for _ in range(3):
            async with attacker.post(chunk, data=b"{}", headers=bearer("pi-02", "wrong")) as r:
                assert r.status == 401
        assert await ws_status(attacker, control, bearer("pi-02")) == 429  # right token, banned
    assert f"auth_ban address={ATTACKER}" in server.log_text()
    async with session(pki, pki.sensors["pi-02"], BYSTANDER) as bystander:
        assert await ws_status(bystander, control, bearer("pi-02")) == 101
    more = submit(sensor.queue_path, 4, "after-ban")  # the agent, via 127.0.0.1, goes on

    async def all_more() -> bool:
        return set(await stored(server)) >= sent | more

    await eventually(all_more, timeout=30, what="events after the ban")
    ids = await stored(server)
    assert len(ids) == len(set(ids)) == EVENTS + 4
    assert await asyncio.to_thread(sensor.queue_depth) == 0
    assert metric(server, "pipeline_events_completed_total") == EVENTS + 4

    # 5. Certbot renewal: new files in place, the documented deploy hook (nginx -t, then
    #    nginx -s reload), new handshakes see them.
    assert presented_cert(stack.nginx.port, pki.ca) == cert_der(pki.server.cert)
    shutil.copy(pki.rotated_server.cert, stack.certs / "fullchain.pem")
    shutil.copy(pki.rotated_server.key, stack.certs / "privkey.pem")
    await asyncio.to_thread(stack.nginx.run_hook, deploy_hook())
    renewed = cert_der(pki.rotated_server.cert)

    async def renewed_served() -> bool:
        return await asyncio.to_thread(presented_cert, stack.nginx.port, pki.ca) == renewed

    await eventually(renewed_served, timeout=10, what="renewed certificate served")
    final = submit(sensor.queue_path, 2, "after-renewal")

    async def all_final() -> bool:
        return set(await stored(server)) >= final

    await eventually(all_final, timeout=30, what="events after the renewal")
    assert metric(server, "pipeline_events_completed_total") == EVENTS + 6
