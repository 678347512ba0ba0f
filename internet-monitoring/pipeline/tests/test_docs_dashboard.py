"""docs/dashboard.md: every shell example runs as written against a real server (curl over
a real socket, real SQLite store), answers 2xx and prints JSON; and every config key the
document names exists with the default it states."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from pathlib import Path

import aiohttp

from pipeline.common.config import DashboardConfig
from pipeline.tests.conftest import require_tool
from pipeline.tests.dashboard_support import ResultPoster
from pipeline.tests.server_support import STREAM_TOKEN, running_server, server_config, urls

DOC = Path(__file__).resolve().parents[3] / "docs" / "dashboard.md"


def shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def commands(block: str) -> list[str]:
    """One command per entry, continuation lines joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


async def test_every_example_runs_as_written(tmp_path):
    curl = require_tool("curl")
    blocks = shell_blocks()
    setup, examples = blocks[0], blocks[1:]
    assert "export PIPELINE_URL" in setup and len(examples) >= 6
    async with running_server(server_config(tmp_path, stream={"token": STREAM_TOKEN})) as server:
        async with aiohttp.ClientSession() as http:
            post = ResultPoster(http, server)
            for n in range(3):
                await post.post("pi-01", {"test": "speed", "download_mbps": 100.0 + n},
                                ago_s=170 - n * 70)  # 70 s apart: one per step
        env = {**os.environ, "PIPELINE_URL": urls(server)["ingest"],
               "PIPELINE_STREAM_TOKEN": STREAM_TOKEN, "PATH": f"{Path(curl).parent}:"
               f"{os.environ.get('PATH', '')}"}
        checked = set()
        for block in examples:
            for command in commands(block):
                proc = await asyncio.create_subprocess_exec(
                    "bash", "-euo", "pipefail", "-c", f"{setup}\n{command}",
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, (command, err.decode())
                doc = json.loads(out)
                assert doc, command
                if "/series" in command:
                    assert [p["avg"] for p in doc["points"]] == [100.0, 101.0, 102.0]
                    checked.add("series")
                if command.endswith('/v1/dashboard"'):
                    assert doc["kpis"]["globalAvailability"] == 100.0
                    checked.add("dashboard")
                if "order=desc&limit=5\"" in command:
                    assert [e["payload_json"]["download_mbps"] for e in doc["events"]] == [
                        102.0, 101.0, 100.0]
                    checked.add("events")
        assert checked == {"series", "dashboard", "events"}


def test_documented_keys_and_defaults_are_real():
    text = DOC.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_]+)` \| `([^`]*)` \|", text, flags=re.M)
    defaults = dataclasses.asdict(DashboardConfig())
    assert {name for name, _ in rows} == set(defaults)
    for name, shown in rows:
        value = defaults[name]
        expected = json.dumps(list(value)) if isinstance(value, tuple) else (
            "{}" if value == {} else json.dumps(value) if isinstance(value, str) else str(value))
        assert shown == expected, (name, shown, expected)
