"""Certificate renewal on the server's own TLS listener, without a restart (docs/tls-proxy.md).

A real ``pipeline-server`` process serves TLS from a Certbot-style layout (``live/``
symlinks into ``archive/``). Renewal switches the symlinks one by one, as Certbot does;
real TLS handshakes before and after show which certificate the listener presents:

* with the file watch on, the half-switched state (new certificate, old key) fails to load
  and the old pair keeps serving; once the key follows, the new pair is served;
* with the watch off, nothing changes until SIGHUP, then the new pair is served.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from pipeline.sim.processes import ServerProcess
from pipeline.tests.security_support import Leaf, Pki, cert_der, make_pki, presented_cert
from pipeline.tests.server_support import eventually

TOKENS = {"pi-01": "renewal-token-pi-01-0123456789"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ("pi-01",))


class CertbotLayout:
    """``live/fullchain.pem`` and ``live/privkey.pem`` as symlinks into ``archive/``."""

    def __init__(self, base: Path) -> None:
        self.archive = base / "archive"
        self.live = base / "live"
        self.archive.mkdir(parents=True)
        self.live.mkdir()
        self.version = 0

    @property
    def cert(self) -> Path:
        return self.live / "fullchain.pem"

    @property
    def key(self) -> Path:
        return self.live / "privkey.pem"

    def stage(self, leaf: Leaf) -> tuple[str, str]:
        """Write a new version into archive/ (what ``certbot renew`` does first)."""
        self.version += 1
        cert = self.archive / f"fullchain{self.version}.pem"
        key = self.archive / f"privkey{self.version}.pem"
        cert.write_bytes(leaf.cert.read_bytes())
        key.write_bytes(leaf.key.read_bytes())
        key.chmod(0o600)
        return f"../archive/{cert.name}", f"../archive/{key.name}"

    @staticmethod
    def point(link: Path, target: str) -> None:
        """Switch one symlink atomically (a new link renamed over the old one)."""
        tmp = link.with_name(link.name + ".new")
        os.symlink(target, tmp)
        os.replace(tmp, link)

    def install(self, leaf: Leaf) -> None:
        cert, key = self.stage(leaf)
        self.point(self.cert, cert)
        self.point(self.key, key)


def start_server(tmp_path: Path, layout: CertbotLayout, watch_s: float) -> ServerProcess:
    server = ServerProcess(tmp_path / "server", TOKENS, extra_config={
        "control": {"tls": {"enabled": True, "cert": str(layout.cert),
                            "key": str(layout.key)}},
        "auth": {"reload_watch_s": watch_s}})
    try:
        server.start()
    except BaseException:
        server.terminate()  # never leave a half-started server behind
        raise
    return server


def der(leaf: Leaf) -> bytes:
    return cert_der(leaf.cert)


async def serves(server: ServerProcess, pki: Pki, leaf: Leaf) -> bool:
    return await asyncio.to_thread(presented_cert, server.control_port, pki.ca) == der(leaf)


async def test_file_watch_picks_up_a_certbot_renewal(tmp_path, pki):
    layout = CertbotLayout(tmp_path / "letsencrypt")
    layout.install(pki.server)
    server = start_server(tmp_path, layout, watch_s=0.2)
    try:
        assert await serves(server, pki, pki.server)
        new_cert, new_key = layout.stage(pki.rotated_server)
        layout.point(layout.cert, new_cert)  # half-way: new certificate, old key
        await eventually(lambda: "reload_failed reason=file_changed" in server.log_text(),
                         what="the mismatched pair to be refused")
        assert await serves(server, pki, pki.server)  # the old pair keeps serving
        layout.point(layout.key, new_key)
        await eventually(lambda: serves(server, pki, pki.rotated_server), timeout=10,
                         what="the renewed certificate")
        assert "config_reloaded reason=file_changed" in server.log_text()
    finally:
        assert server.terminate() == 0, server.log_text()[-3000:]
    assert server.starts == 1


async def test_sighup_picks_up_renewed_files(tmp_path, pki):
    layout = CertbotLayout(tmp_path / "letsencrypt")
    layout.install(pki.server)
    server = start_server(tmp_path, layout, watch_s=0)
    try:
        assert await serves(server, pki, pki.server)
        layout.install(pki.rotated_server)
        await asyncio.sleep(0.3)
        assert await serves(server, pki, pki.server)  # no watch: nothing until told
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: serves(server, pki, pki.rotated_server), timeout=10,
                         what="the renewed certificate after SIGHUP")
        assert "config_reloaded reason=" in server.log_text()
    finally:
        assert server.terminate() == 0, server.log_text()[-3000:]
