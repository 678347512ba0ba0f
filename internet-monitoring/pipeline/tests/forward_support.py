"""Real processes for the remote-write acceptance tests: a test exporter whose values
change every scrape (served with explicit timestamps, each one recorded), Prometheus in
agent mode and as a remote-write receiver (Debian's /usr/bin/prometheus), and a TCP proxy
whose link can be cut (every connection reset, new ones refused) and restored."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.sim.processes import ManagedProcess, free_port

METRIC = "rw_test_value"


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                           if os.path.exists("/usr/bin/prometheus") else None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (make tools)")
        pytest.skip("prometheus is not installed (make tools)")
    return found


class Exporter:
    """Serves ``rw_test_value{case="a"|"b"}`` with a new value and an explicit, strictly
    increasing timestamp on each of its first ``scrapes`` scrapes, then nothing."""

    def __init__(self, scrapes: int) -> None:
        self.scrapes = scrapes
        self.served: dict[str, list[tuple[int, float]]] = {"a": [], "b": []}
        self._lock = threading.Lock()
        self._last_ts = 0
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = exporter.next_body().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def next_body(self) -> str:
        with self._lock:
            count = len(self.served["a"])
            if count >= self.scrapes:
                return ""
            ts = max(int(time.time() * 1000), self._last_ts + 1)
            self._last_ts = ts
            lines = [f"# TYPE {METRIC} gauge"]
            for case, scale in (("a", 1.5), ("b", -0.25)):
                value = (count + 1) * scale
                self.served[case].append((ts, value))
                lines.append(f'{METRIC}{{case="{case}"}} {value} {ts}')
            return "\n".join(lines) + "\n"

    def done(self) -> bool:
        with self._lock:
            return len(self.served["a"]) >= self.scrapes

    def __enter__(self) -> Exporter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Prometheus(ManagedProcess):
    """One Prometheus on an ephemeral port, its storage in ``workdir``."""

    def __init__(self, workdir: Path, name: str, config: dict[str, Any], *,
                 agent: bool) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / f"{name}.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        argv = [prometheus_binary(), f"--config.file={self.config_path}",
                f"--web.listen-address=127.0.0.1:{self.port}"]
        if agent:
            argv += ["--enable-feature=agent", f"--storage.agent.path={workdir / 'wal'}"]
        else:
            argv += ["--web.enable-remote-write-receiver",
                     f"--storage.tsdb.path={workdir / 'tsdb'}",
                     "--storage.tsdb.retention.time=1d"]
        super().__init__(name=name, argv=argv, log_path=workdir / f"{name}.log")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"{self.name} exited:\n{self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready:\n{self.log_text()[-3000:]}")

    def raw_samples(self, selector: str, at_s: float, window: str = "10m"
                    ) -> list[dict[str, Any]]:
        """``selector[window]`` evaluated at ``at_s``: every raw sample, per series."""
        query = urllib.parse.urlencode({"query": f"{selector}[{window}]", "time": f"{at_s:.3f}"})
        with urllib.request.urlopen(f"{self.base}/api/v1/query?{query}", timeout=10) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result


def receiver_config() -> dict[str, Any]:
    """The cloud side's settings for backfilled samples (docs/remote-write.md)."""
    return {"global": {"scrape_interval": "15s"},
            "storage": {"tsdb": {"out_of_order_time_window": "1d"}}}


def agent_config(exporter_port: int, write_url: str, sensor: str) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "external_labels": {"sensor": sensor}},
        "scrape_configs": [{"job_name": "exporter",
                            "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
        "remote_write": [{"url": write_url,
                          "queue_config": {"batch_send_deadline": "1s", "min_backoff": "100ms",
                                           "max_backoff": "1s"}}],
    }


class CutProxy:
    """A threaded TCP proxy to ``target_port``; ``cut()`` resets every connection and
    refuses new ones until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self._cut.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except OSError:
            _reset(sink)
            _reset(source)

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            live, self._sockets = self._sockets, set()
        for sock in live:
            _reset(sock)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass


def forwarded(receiver: Prometheus, at_s: float) -> dict[str, list[tuple[int, float]]]:
    """What the receiver holds of the test metric: case -> [(timestamp ms, value)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for series in receiver.raw_samples(METRIC, at_s):
        case = series["metric"]["case"]
        out.setdefault(case, []).extend(
            (round(float(ts) * 1000), float(value)) for ts, value in series["values"])
    return out


def labels_of(receiver: Prometheus, at_s: float) -> list[dict[str, str]]:
    return [series["metric"] for series in receiver.raw_samples(METRIC, at_s)]
