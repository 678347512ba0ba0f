"""docs/remote-write.md, "## Server": the receiver settings it shows work as written.

The page's Prometheus configuration is written to a fresh directory, and its `sh` block
runs there in a private network namespace (its documented port 9090 cannot collide): the
config passes ``promtool check config``, the receiver starts with the page's flags, and a
sample two hours older than the newest of its series (a backfilled sample) is accepted
with 2xx, which needs the page's out-of-order window. A copy without the window must
refuse it, so the check can fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.tests.conftest import on_ci, require_tool
from pipeline.tests.test_docs_commands import FENCE_RE, REPO, _netns_available, section

DOC = REPO / "docs" / "remote-write.md"

CHECK = r'''
import sys, time, urllib.request
from pipeline.common import remote_write as rw

def post(ts_ms):
    body = rw.encode(rw.build([rw.Series((("__name__", "backfill_test"),), ((ts_ms, 1.0),))]))
    req = urllib.request.Request("http://127.0.0.1:9090/api/v1/write", data=body, headers={
        "Content-Type": rw.HTTP_CONTENT_TYPE, "Content-Encoding": "snappy",
        rw.VERSION_HEADER: rw.VERSION})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code

for _ in range(150):
    try:
        with urllib.request.urlopen("http://127.0.0.1:9090/-/ready", timeout=2) as resp:
            if resp.status == 200:
                break
    except OSError:
        time.sleep(0.2)
now = int(time.time() * 1000)
print("new", post(now))
print("backfilled", post(now - 2 * 3600 * 1000))
'''


def server_blocks() -> tuple[str, list[str]]:
    text = section(DOC.read_text(), "Server")
    blocks = FENCE_RE.findall(text)
    [config] = [body for lang, body in blocks
                if lang == "yaml" and "out_of_order_time_window" in body]
    [commands] = [body for lang, body in blocks if lang == "sh"]
    return config, [line for line in commands.splitlines() if line.strip()]


def run_page(tmp_path: Path, config: str) -> str:
    require_tool("prometheus")
    require_tool("promtool")
    why = _netns_available()
    if why is not None:
        if on_ci():
            pytest.fail(f"needs an unprivileged network namespace: {why}")
        pytest.skip(f"needs an unprivileged network namespace: {why}")
    _, commands = server_blocks()
    assert [c.split()[0] for c in commands] == ["promtool", "prometheus"]
    (tmp_path / "prometheus.yml").write_text(config)
    (tmp_path / "check.py").write_text(CHECK)
    script = tmp_path / "page.sh"
    script.write_text(f"{commands[0]}\n{commands[1]} > prometheus.log 2>&1 &\n"
                      f"PROM=$!\n{sys.executable} check.py\nkill $PROM\nwait $PROM || true\n")
    out_path = tmp_path / "out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--net", "bash", "-c",
             'ip link set lo up && exec bash -e "$0"', str(script)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO / "internet-monitoring")},
            start_new_session=True)
    try:
        proc.wait(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = out_path.read_text()
    assert proc.returncode == 0, text
    return text


def test_receiver_settings_accept_backfilled_samples(tmp_path: Path) -> None:
    config, _ = server_blocks()
    out = run_page(tmp_path, config)
    assert "SUCCESS" in out
    assert "new 204" in out and "backfilled 204" in out, out


def test_without_the_window_the_backfilled_sample_is_refused(tmp_path: Path) -> None:
    config, _ = server_blocks()
    without = "\n".join(line for line in config.splitlines()
                        if "storage" not in line and "tsdb" not in line
                        and "out_of_order" not in line)
    out = run_page(tmp_path, without)
    assert "new 204" in out and "backfilled 400" in out, out
