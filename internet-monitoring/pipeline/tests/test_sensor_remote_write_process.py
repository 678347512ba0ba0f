"""The receiver in a real ``pipeline-sensor run`` process: a 204 means durable, even when
the process is SIGKILLed right after it answered."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import yaml

from pipeline.common import remote_write as rw
from pipeline.sensor.queue import DurableQueue
from pipeline.tests.remote_write_support import HEADERS, queued_writes, request_of

PORT_RE = re.compile(rb"remote_write_listening .*port=(\d+)")


async def _start_agent(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The agent as a plain child process: its exit status is read with our own waitpid
    (asyncio's child watcher has reported 255 for a SIGKILLed child on a loaded machine)."""
    config = {"sensor_id": "pi-rw-kill", "token": "k" * 32,
              "queue": {"path": str(tmp_path / "queue.db")},
              # Nothing listens there: the agent keeps retrying; delivery is not tested here.
              "control": {"url": "ws://127.0.0.1:9/control"},
              "sources": {"remote_write": {"listen": "127.0.0.1:0", "batch_delay_ms": 5}}}
    path = tmp_path / "sensor.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sensor", "run", "--config", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr = proc.stderr
    assert stderr is not None
    while True:
        line = await asyncio.wait_for(asyncio.to_thread(stderr.readline), timeout=30)
        assert line, "the agent exited before listening"
        found = PORT_RE.search(line)
        if found:
            return proc, int(found.group(1))


async def test_every_request_answered_204_survives_sigkill_right_after(tmp_path: Path
                                                                        ) -> None:
    proc, port = await _start_agent(tmp_path)
    url = f"http://127.0.0.1:{port}/api/v1/write"
    requests = [request_of(i, samples=500) for i in range(16)]
    accepted: list[int] = []
    killed = asyncio.Event()

    async def send(index: int, session: aiohttp.ClientSession) -> None:
        try:
            async with session.post(url, data=requests[index], headers=HEADERS) as response:
                if response.status == 204:
                    accepted.append(index)
                    if not killed.is_set():  # the first 204: kill at once
                        killed.set()
                        proc.send_signal(signal.SIGKILL)
        except aiohttp.ClientError:
            pass  # cut by the kill: not answered, so the sender would retry it

    try:
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(send(i, session) for i in range(len(requests))))
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, 30)
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert accepted
    queue = DurableQueue(tmp_path / "queue.db")
    try:
        writes = queued_writes(queue)  # asserts every event is whole
    finally:
        queue.close()
    queued = b"".join(w.data for w in writes)
    for index in accepted:
        raw = rw.decode(requests[index], content_type=rw.HTTP_CONTENT_TYPE,
                        content_encoding="snappy", max_bytes=1 << 30).raw
        assert raw in queued, f"request {index} answered 204 but not in the queue"
    assert all(w.attributes[rw.CONTENT_TYPE_ATTRIBUTE] == rw.EVENT_CONTENT_TYPE for w in writes)
