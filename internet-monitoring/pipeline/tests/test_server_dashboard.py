"""The dashboard page in a real headless browser: it loads its config, connects to the UI
stream (another port) under its CSP, and renders one card per sensor."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest

from pipeline.tests.server_support import TOKENS, chunk_docs, running_server, server_config, urls

READY_JS = ("document.querySelectorAll('.sensor-card').length >= 2 && "
            "document.getElementById('stream-status').dataset.state === 'live'")


async def dump_dom(browser: str, url: str, profile: str, timeout: float = 30.0) -> str:
    """The page's DOM once it has rendered both sensors (polled in real time through the
    DevTools protocol: a fixed virtual-time budget raced the stream's first message)."""
    proc = await asyncio.create_subprocess_exec(
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-quic",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--remote-debugging-port=0", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        return await asyncio.wait_for(_poll_dom(proc), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _poll_dom(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    port = None
    while port is None:
        line = (await proc.stderr.readline()).decode()
        assert line, "Chromium exited before opening DevTools"
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        port = found.group(1) if found else None
    async with aiohttp.ClientSession() as http:
        page_ws = None
        while page_ws is None:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in await r.json() if t.get("type") == "page"]
            page_ws = pages[0]["webSocketDebuggerUrl"] if pages else None
            await asyncio.sleep(0.1)
        async with http.ws_connect(page_ws, max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))

            async def evaluate(expression: str) -> object:
                call = next(ids)
                await ws.send_json({"id": call, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "returnByValue": True}})
                while True:
                    reply = await ws.receive_json()
                    if reply.get("id") == call:
                        return reply.get("result", {}).get("result", {}).get("value")

            while await evaluate(READY_JS) is not True:
                await asyncio.sleep(0.2)
            return str(await evaluate("document.documentElement.outerHTML"))


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
