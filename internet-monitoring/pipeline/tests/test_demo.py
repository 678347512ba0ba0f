"""`make demo` really runs: server and three sensors deliver snapshots, Ctrl-C stops it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_make_demo_shows_snapshots_from_three_sensors_and_stops_on_ctrl_c(tmp_path):
    args = f"--workdir {tmp_path} --ephemeral-ports --interval 0.5"
    proc = subprocess.Popen(["make", "-s", "demo", f"DEMO_ARGS={args}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output: list[str] = []
    try:
        base = None
        deadline = time.monotonic() + 60
        while base is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "demo exited early:\n" + "".join(output)
            output.append(line)
            found = re.search(r"dashboard:\s+(http://\S+)/", line)
            if found:
                base = found.group(1)
        assert base, "no dashboard URL printed:\n" + "".join(output)
        sensors: set[str] = set()
        while time.monotonic() < deadline and len(sensors) < 3:
            with urllib.request.urlopen(base + "/v1/snapshots", timeout=5) as resp:
                snapshots = json.loads(resp.read())["snapshots"]
            sensors = {s["sensor_id"] for s in snapshots if s["payload_json"].get("test")}
            time.sleep(0.3)
        assert sensors == {"pi-lobby", "pi-office", "pi-warehouse"}
        with urllib.request.urlopen(base + "/", timeout=5) as resp:
            assert resp.status == 200 and "<html" in resp.read().decode().lower()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest or "")
    # Ctrl-C reaches make too, which then exits by SIGINT as it always does; the demo
    # itself must have stopped cleanly, with the server exiting 0.
    assert proc.returncode in (0, -signal.SIGINT), "".join(output)
    assert re.search(r"demo_stopped submitted=\d+ server_exit=0", "".join(output)), "".join(output)
