"""Real headless Chromium driven through the DevTools protocol (no browser download, no
driver library): start it on an empty profile, evaluate JavaScript in the page, wait for a
condition, reload, take screenshots. The tests' artefacts (screenshots) go to
``$PIPELINE_TEST_ARTIFACTS`` when set, else to the test's ``tmp_path``."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--window-size=1440,1000", "--remote-debugging-port=0")


def artifacts_dir(tmp_path: Path, name: str) -> Path:
    root = os.environ.get("PIPELINE_TEST_ARTIFACTS")
    path = Path(root) / name if root else tmp_path / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Page:
    """One page target over its DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            reply = await self.ws.receive_json()
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"page error in {expression!r}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 15.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        error = ""
        while True:
            try:
                value = await self.evaluate(expression)
            except AssertionError as exc:  # the page is (re)loading: no document yet
                value, error = None, str(exc)
            if value:
                return value
            if time.monotonic() > deadline:
                body = await self.evaluate("document.body && document.body.innerText"
                                           ".slice(0, 1500)")
                raise AssertionError(f"timed out waiting for {what or expression}; "
                                     f"last error: {error or '-'}; page: {body}")
            await asyncio.sleep(0.1)

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def reload(self) -> None:
        await self.call("Page.reload", ignoreCache=True)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {path}")
        return path


@asynccontextmanager
async def chromium_page(browser: str, profile: Path, url: str = "about:blank"
                        ) -> AsyncIterator[Page]:
    """A fresh Chromium on an empty profile, and its first page."""
    proc = await asyncio.create_subprocess_exec(
        browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        port = await asyncio.wait_for(_devtools_port(proc), 20)
        async with aiohttp.ClientSession() as http:
            page_ws = await asyncio.wait_for(_page_socket(http, port), 20)
            async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                yield page
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _devtools_port(proc: asyncio.subprocess.Process) -> str:
    assert proc.stderr is not None
    while True:
        line = (await proc.stderr.readline()).decode()
        assert line, "Chromium exited before opening DevTools"
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return found.group(1)


async def _page_socket(http: aiohttp.ClientSession, port: str) -> str:
    while True:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in json.loads(await r.text()) if t.get("type") == "page"]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        await asyncio.sleep(0.1)
