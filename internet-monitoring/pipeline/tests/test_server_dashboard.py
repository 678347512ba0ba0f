"""The dashboard page in a real headless browser: it loads its config, connects to the UI
stream (another port) under its CSP, and renders one card per sensor."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from pipeline.tests.server_support import TOKENS, chunk_docs, running_server, server_config, urls

async def dump_dom(browser: str, url: str, profile: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode()


async def test_dashboard_renders_live_snapshots_in_a_browser(tmp_path, chromium):
    async with running_server(server_config(tmp_path)) as server:
        async with aiohttp.ClientSession() as http:
            for sid, seq, doc in (("pi-01", 1, {"download_mbps": 93.5, "dns": {"lookup_ms": 4}}),
                                  ("pi-02", 1, {"rtt_ms": 12.25, "target": "gateway"})):
                _, (chunk,) = chunk_docs(sid, json.dumps(doc).encode(), seq)
                async with http.post(urls(server)["ingest"] + "/v1/ingest/chunk", json=chunk,
                                     headers={"Authorization": f"Bearer {TOKENS[sid]}"}) as r:
                    assert r.status == 200
        html = await dump_dom(chromium, urls(server)["ingest"] + "/", str(tmp_path / "profile"))
    assert re.search(r'id="stream-status" data-state="live"', html), html[:2000]
    cards = re.findall(r'<section class="sensor-card[^"]*" data-sensor-id="([^"]+)"', html)
    assert cards == ["pi-01", "pi-02"]
    assert re.search(r'data-field="download_mbps"><td class="name">download_mbps</td>'
                     r'<td class="value">93.50</td>', html)
    assert re.search(r'data-field="dns.lookup_ms">.*?<td class="value">4</td>', html)
    assert re.search(r'data-field="rtt_ms">.*?<td class="value">12.25</td>', html)
    assert 'data-field="target"' not in html  # only numeric fields are shown
    assert '<div id="sensor-count">2 sensors</div>' in html
