"""The first hour of a new user (issue 15): refusals that say why, single-instance locks,
start-up checks, ``token create --add-to``, a runtime-only ``make demo``.

Real server and sensor processes where the behaviour is a process's (what reaches a log,
what a second process does, exit codes); plain calls for the sans-I/O parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.common.config import load_server_config, load_sensor_config
from pipeline.common.errors import AlreadyRunning
from pipeline.common.instance_lock import InstanceLock
from pipeline.server.security.auth import TokenAuthenticator
from pipeline.server.main import main as server_main
from pipeline.server.main import warn_at_start_up
from pipeline.sensor.refusals import RefusalLog
from pipeline.sim.processes import SensorProcess, ServerProcess
from pipeline.tests.server_support import eventually

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "internet-monitoring" / "pipeline" / "examples"
TOKENS = {"pi-01": "tok-pi-01-" + "a" * 24, "pi-02": "tok-pi-02-" + "b" * 24}


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["HOME"] = str(tmp_path)
    return env


def _lines(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if f"msg={event} " in line]


# ---------------------------------------------------------------------------------------
# The examples work together


def test_example_sensor_is_accepted_by_the_example_server() -> None:
    server = load_server_config(EXAMPLES / "server.yml", env={})
    sensor = load_sensor_config(EXAMPLES / "sensor.yml", env={})
    auth = TokenAuthenticator.from_config(server)
    assert auth.authenticate(sensor.sensor_id, sensor.token, 0.0) == sensor.sensor_id
    assert f":{server.control.port}{server.control.path}" in sensor.control.url
    assert f":{server.ingest.port}/" in sensor.ingest.url


# ---------------------------------------------------------------------------------------
# Refusals: the reason reaches the sensor's log, once, never a token


async def test_refusal_reasons_reach_the_sensor_log_once_per_reason(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", TOKENS)
    server.start()
    unknown = SensorProcess(tmp_path / "s", "pi-09", "change-me-pi-09",
                            control_url=server.control_url, ingest_url=server.ingest_url)
    stolen = SensorProcess(tmp_path / "s", "pi-02", TOKENS["pi-01"],
                           control_url=server.control_url, ingest_url=server.ingest_url)
    try:
        unknown.start()
        stolen.start()
        # Backoff 0.2 s doubling to 2 s: several attempts each, one WARNING each.
        await eventually(lambda: len(_lines(server.log_text(), "auth_refused")) >= 8,
                         timeout=30, what="repeated refusals on the server")
    finally:
        for proc in (unknown, stolen):
            proc.terminate()
        server.terminate()
    unknown_log, stolen_log, server_log = unknown.log_text(), stolen.log_text(), \
        server.log_text()
    refused = _lines(unknown_log, "server_refused")
    assert len(refused) == 1, unknown_log
    assert "channel=control" in refused[0] and "status=401" in refused[0]
    assert "reason='unknown token'" in refused[0] and "level=warning" in refused[0]
    refused = _lines(stolen_log, "server_refused")
    assert len(refused) == 1, stolen_log
    assert "status=403" in refused[0]
    assert "reason='token belongs to sensor pi-01, not pi-02'" in refused[0]
    assert "check sensor_id" in refused[0]
    # A placeholder token is called out at start-up.
    assert _lines(unknown_log, "placeholder_token"), unknown_log
    assert not _lines(stolen_log, "placeholder_token")
    for text in (unknown_log, stolen_log, server_log):
        assert TOKENS["pi-01"] not in text and "change-me-pi-09" not in text


def _refusal(url: str, headers: dict[str, str], data: bytes | None = None
             ) -> tuple[int, str, dict]:
    request = urllib.request.Request(url, data=data, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    answer = refused.value
    return answer.code, answer.headers.get("WWW-Authenticate", ""), json.loads(answer.read())


def test_refusals_carry_the_reason_in_body_and_header_never_the_token(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", TOKENS)
    server.start()
    try:
        wrong = "x" * 40
        code, challenge, body = _refusal(server.ingest_url, {
            "Authorization": f"Bearer {wrong}", "Content-Type": "application/json"}, b"{}")
        assert (code, body["message"]) == (401, "unknown token")
        assert challenge == 'Bearer error="invalid_token", error_description="unknown token"'
        # The control handshake (what a WebSocket client sees: status and headers).
        ws_headers = {"Connection": "Upgrade", "Upgrade": "websocket",
                      "Sec-WebSocket-Version": "13",
                      "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                      "X-Sensor-ID": "pi-02", "Authorization": f"Bearer {TOKENS['pi-01']}"}
        code, challenge, body = _refusal(
            f"http://127.0.0.1:{server.control_port}/control", ws_headers)
        assert code == 403 and 'error="insufficient_scope"' in challenge
        assert 'error_description="token belongs to sensor pi-01, not pi-02"' in challenge
        assert TOKENS["pi-01"] not in challenge + json.dumps(body)
    finally:
        server.terminate()
    assert TOKENS["pi-01"] not in server.log_text() and wrong not in server.log_text()


async def test_a_revoked_sensor_logs_the_close_reason_then_the_refusal(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", TOKENS,
                           extra_config={"auth": {"reload_watch_s": 0.2}})
    server.start()
    agent = SensorProcess(tmp_path / "s", "pi-02", TOKENS["pi-02"],
                          control_url=server.control_url, ingest_url=server.ingest_url)
    try:
        agent.start()
        await eventually(lambda: "control_connected" in agent.log_text(), timeout=30,
                         what="agent connected")
        config = yaml.safe_load(server.config_path.read_text())
        config["auth"]["sensors"] = [e for e in config["auth"]["sensors"] if e["id"] != "pi-02"]
        server.config_path.write_text(yaml.safe_dump(config))
        await eventually(lambda: len(_lines(agent.log_text(), "server_refused")) >= 2,
                         timeout=30, what="close reason and refusal in the sensor log")
    finally:
        agent.terminate()
        server.terminate()
    closed, refused = _lines(agent.log_text(), "server_refused")[:2]
    assert "status=1008 reason='credential revoked'" in closed
    assert "status=401 reason='unknown token'" in refused


# ---------------------------------------------------------------------------------------
# Single-instance locks


async def test_a_second_server_on_the_same_store_refuses_to_start(tmp_path: Path) -> None:
    first = ServerProcess(tmp_path / "a", TOKENS)
    first.start()
    store = first.config["store"]["path"]
    second = ServerProcess(tmp_path / "b", TOKENS, extra_config={"store": {"path": store}})
    try:
        proc = subprocess.run(second.argv, capture_output=True, text=True, timeout=60,
                              env=_env(tmp_path))
        assert proc.returncode == 1, proc.stderr
        assert f"{store} (store.path) is in use by pid {first.pid}" in proc.stderr
        assert f"lock file {store}.lock" in proc.stderr and "Traceback" not in proc.stderr
        assert first.running and first.get_json("/readyz") is not None
        # The kernel drops the lock with its holder, even on SIGKILL: no stale lock.
        first.kill()
        second.start()
        assert second.running
    finally:
        first.terminate()
        second.terminate()


async def test_a_second_agent_on_the_same_queue_refuses_to_start(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "server", TOKENS)
    server.start()
    agent = SensorProcess(tmp_path / "s", "pi-01", TOKENS["pi-01"],
                          control_url=server.control_url, ingest_url=server.ingest_url)
    try:
        agent.start()
        await eventually(lambda: "control_connected" in agent.log_text(), timeout=30,
                         what="first agent connected")
        proc = subprocess.run(agent.argv, capture_output=True, text=True, timeout=60,
                              env=_env(tmp_path))
        assert proc.returncode == 1, proc.stderr
        assert f"{agent.queue_path} (queue.path) is in use by pid {agent.pid}" in proc.stderr
        # Test programs still submit while the agent runs, and it delivers.
        submit = subprocess.run([sys.executable, "-m", "pipeline.sensor", "submit", "--config",
                                 str(agent.config_path), "-"], input=b'{"test": "ping"}',
                                capture_output=True, timeout=60, env=_env(tmp_path))
        assert submit.returncode == 0, submit.stderr
        event_id = submit.stdout.decode().strip()
        await eventually(lambda: any(e["event_id"] == event_id for e in server.events("pi-01")),
                         timeout=30, what="the submitted event on the server")
        assert agent.running
    finally:
        agent.terminate()
        server.terminate()


def test_instance_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    held = InstanceLock(tmp_path / "queue.db", "queue.path")
    held.acquire()
    with pytest.raises(AlreadyRunning) as refused:
        InstanceLock(tmp_path / "queue.db", "queue.path").acquire()  # another descriptor
    assert f"pid {os.getpid()}" in refused.value.message and refused.value.field == "queue.path"
    held.release()
    with InstanceLock(tmp_path / "queue.db", "queue.path") as again:
        assert again.held


# ---------------------------------------------------------------------------------------
# Start-up checks


def _run_sensor(tmp_path: Path, doc: dict) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "sensor.yml"
    path.write_text(yaml.safe_dump({"sensor_id": "pi-01",
                                    "queue": {"path": str(tmp_path / "q.db")},
                                    "control": {"url": "ws://127.0.0.1:9/control"}, **doc}))
    return subprocess.run([sys.executable, "-m", "pipeline.sensor", "run", "--config",
                           str(path)], capture_output=True, text=True, timeout=60,
                          env=_env(tmp_path))


def test_a_missing_token_file_is_fatal_naming_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pi-01.token"
    proc = _run_sensor(tmp_path, {"token_file": str(missing)})
    assert proc.returncode == 2, proc.stderr
    assert f"configuration error: token_file {missing}: cannot read it" in proc.stderr
    assert "key=token_file" in proc.stderr
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    proc = _run_sensor(tmp_path, {"token_file": str(empty)})
    assert proc.returncode == 2 and "the file is empty" in proc.stderr, proc.stderr
    assert not (tmp_path / "q.db").exists()  # refused before the queue was touched


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_server_warns_about_placeholders_and_an_open_read_api(caplog) -> None:
    config = load_server_config(EXAMPLES / "server.yml", env={})
    with caplog.at_level(logging.WARNING):
        warn_at_start_up(config, demo=False)
    found = _warnings(caplog)
    keys = sorted(m.split()[1] for m in found if m.startswith("placeholder_token"))
    assert keys == ["key=auth.sensors[0].token", "key=auth.sensors[1].token_sha256",
                    "key=auth.sensors[1].tokens[1].token"]
    assert any(m.startswith("read_api_open key=stream.token") for m in found)
    caplog.clear()
    clean = load_server_config(None, env={"PIPELINE_STREAM_TOKEN": "s" * 32,
                                          "PIPELINE_SERVER__AUTH__FLEET_TOKEN": "f" * 32})
    with caplog.at_level(logging.WARNING):
        warn_at_start_up(clean, demo=False)
        warn_at_start_up(load_server_config(None, env={}), demo=True)  # demo: open is fine
    assert _warnings(caplog) == []


# ---------------------------------------------------------------------------------------
# token create --add-to


def _create(path: Path, sensor_id: str) -> tuple[int, str]:
    out = io.StringIO()
    code = server_main(["token", "create", sensor_id, "--add-to", str(path)], out=out)
    return code, out.getvalue()


def test_token_create_add_to_writes_the_hash_keeping_comments(tmp_path: Path) -> None:
    path = tmp_path / "server.yml"
    shutil.copy(EXAMPLES / "server.yml", path)
    path.chmod(0o640)
    comments = [line.strip() for line in path.read_text().splitlines()
                if line.strip().startswith("#")]
    code, out = _create(path, "pi-01")
    assert code == 0
    token = out.strip()
    assert re.fullmatch(r"oux_[A-Za-z0-9_-]{43}", token)
    text = path.read_text()
    assert token not in text and hashlib.sha256(token.encode()).hexdigest() in text
    assert "change-me-pi-01" not in text  # the placeholder no longer opens the door
    assert [line.strip() for line in text.splitlines()
            if line.strip().startswith("#")] == comments
    assert path.stat().st_mode & 0o777 == 0o640
    auth = TokenAuthenticator.from_config(load_server_config(path, env={}))
    assert auth.authenticate("pi-01", token, 0.0) == "pi-01"
    # Again for pi-01 (a real token is kept and the new one added) and a new sensor.
    code, out = _create(path, "pi-01")
    second = out.strip()
    code_new, out_new = _create(path, "pi-07")
    assert code == 0 and code_new == 0
    auth = TokenAuthenticator.from_config(load_server_config(path, env={}))
    assert {auth.authenticate("pi-01", t, 0.0) for t in (token, second)} == {"pi-01"}
    assert auth.authenticate("pi-07", out_new.strip(), 0.0) == "pi-07"
    assert [s.id for s in load_server_config(path, env={}).auth.sensors] == \
        ["pi-01", "pi-02", "pi-07"]


def test_token_create_add_to_leaves_a_broken_config_untouched(tmp_path: Path, capsys) -> None:
    path = tmp_path / "server.yml"
    path.write_text("ingest:\n  prot: 8081   # typo\n")
    before = path.read_bytes()
    code, out = _create(path, "pi-01")
    assert code == 2 and out == ""
    assert "ingest.prot" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.yml"]  # no leftovers
    fresh = tmp_path / "new.yml"  # a file that does not exist yet is created
    code, out = _create(fresh, "pi-03")
    assert code == 0 and load_server_config(fresh, env={}).auth.sensors[0].id == "pi-03"


# ---------------------------------------------------------------------------------------
# RefusalLog (sans-I/O)


def test_refusal_log_reports_each_reason_then_every_interval() -> None:
    refusals = RefusalLog(repeat_every_s=300)
    first = refusals.record("control", 401, "unknown token", 0.0)
    assert first is not None and first.repeated == 0 and "token_file" in first.hint
    assert refusals.record("control", 401, "unknown token", 10.0) is None
    assert refusals.record("control", 401, "unknown token", 20.0) is None
    assert refusals.record("ingest", 401, "unknown token", 20.0) is not None  # own channel
    later = refusals.record("control", 401, "unknown token", 301.0)
    assert later is not None and later.repeated == 2
    changed = refusals.record("control", 403, "token belongs to sensor pi-01, not pi-02", 302)
    assert changed is not None and changed.repeated == 0 and "sensor_id" in changed.hint
    assert refusals.clear("control") and not refusals.clear("control")
    assert refusals.record("control", 403, "token belongs to sensor pi-01, not pi-02",
                           303) is not None


# ---------------------------------------------------------------------------------------
# make demo: the runtime only

DEV_ONLY = ("pytest", "_pytest", "hypothesis", "trustme", "grpc_tools", "grpc",
            "opentelemetry", "schemathesis", "cryptography", "pytest_asyncio")

BLOCKER = textwrap.dedent(f"""
    # Test-only: makes every dev-only package unimportable in this process and its children.
    import sys
    BLOCKED = {DEV_ONLY!r}
    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"dev-only package {{name}} imported by the runtime")
            return None
    sys.meta_path.insert(0, _Blocker())
""")


def test_make_demo_installs_the_runtime_without_the_dev_extra() -> None:
    plan = subprocess.run(["make", "-n", "-B", "demo", "VENV=/nonexistent/venv"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    installs = [line for line in plan.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all("[dev]" not in line for line in installs), plan
    assert "-m pipeline.demo" in plan


async def test_demo_runs_with_no_dev_package_importable(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**_env(tmp_path), "PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import pytest"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "dev-only package pytest" in probe.stderr  # it bites
    proc = subprocess.run([sys.executable, "-m", "pipeline.demo", "--workdir",
                           str(tmp_path / "demo"), "--ephemeral-ports", "--interval", "0.3",
                           "--duration", "3"], env=env, capture_output=True, text=True,
                          timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"demo_stopped submitted=\d+ server_exit=0", output), output[-3000:]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "demo").rglob("*.log"))
    assert "dev-only package" not in logs and "Traceback" not in logs
    assert "events_completed" in logs  # results really went through server and sensors
