"""Issue 14 acceptance over real processes: a Prometheus agent scrapes a test exporter and
remote-writes into a real sensor agent, which delivers to a real server, which forwards to
a second real Prometheus (remote-write receiver). The receiver must hold exactly the
samples the exporter served, each once, with their timestamps and values.

1. straight through (about 30 s);
2. with the sensor-to-server link cut for three minutes mid-run and the server SIGKILLed
   once while the backlog drains (marked wallclock: mostly waiting)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from pipeline.sim.processes import ServerProcess, SensorProcess, free_port
from pipeline.tests.forward_support import (
    CutProxy,
    Exporter,
    Prometheus,
    agent_config,
    forwarded,
    labels_of,
    receiver_config,
)

SENSOR_ID = "rw-sensor-1"
TOKEN = "token-rw-sensor-1-" + "r" * 24


class Chain:
    def __init__(self, workdir: Path, scrapes: int, *, proxied: bool) -> None:
        self.exporter = Exporter(scrapes)
        self.receiver = Prometheus(workdir / "cloud", "cloud", receiver_config(), agent=False)
        self.server = ServerProcess(workdir / "server", {SENSOR_ID: TOKEN}, extra_config={
            "forward": {"remote_write": {
                "url": f"http://127.0.0.1:{self.receiver.port}/api/v1/write",
                "min_backoff_s": 0.2, "max_backoff_s": 2.0, "poll_interval_s": 0.2,
                "samples_per_send": 500}}})
        self.proxies = ([CutProxy(self.server.control_port), CutProxy(self.server.ingest_port)]
                        if proxied else [])
        control, ingest = ((f"ws://127.0.0.1:{self.proxies[0].port}/control",
                            f"http://127.0.0.1:{self.proxies[1].port}/v1/ingest/chunk")
                           if proxied else (self.server.control_url, self.server.ingest_url))
        self.rw_port = free_port()
        self.sensor = SensorProcess(workdir / "sensor", SENSOR_ID, TOKEN, control_url=control,
                                    ingest_url=ingest, extra_config={
                                        "sources": {"remote_write": {
                                            "listen": f"127.0.0.1:{self.rw_port}"}}})
        self.agent = Prometheus(workdir / "agent", "agent", agent_config(
            self.exporter.port, f"http://127.0.0.1:{self.rw_port}/api/v1/write", SENSOR_ID),
            agent=True)

    def start(self) -> None:
        self.exporter.__enter__()
        self.receiver.start()
        self.receiver.wait_ready()
        self.server.start()
        self.sensor.start()
        self.agent.start()
        self.agent.wait_ready()

    def stop(self) -> None:
        for proc in (self.agent, self.sensor, self.server, self.receiver):
            proc.terminate()
        for proxy in self.proxies:
            proxy.close()
        self.exporter.__exit__()

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()

    def restore(self) -> None:
        for proxy in self.proxies:
            proxy.restore()

    def wait_all_forwarded(self, timeout: float) -> dict[str, list[tuple[int, float]]]:
        deadline = time.monotonic() + timeout
        want = sum(len(v) for v in self.exporter.served.values())
        held: dict[str, list[tuple[int, float]]] = {}
        while time.monotonic() < deadline:
            held = forwarded(self.receiver, time.time())
            if self.exporter.done() and sum(len(v) for v in held.values()) >= want:
                time.sleep(3.0)  # anything late (a duplicate) would show up now
                return forwarded(self.receiver, time.time())
            time.sleep(1.0)
        raise AssertionError(
            f"receiver holds {sum(len(v) for v in held.values())} of {want} samples;\n"
            f"server log:\n{self.server.log_text()[-2500:]}\n"
            f"sensor log:\n{self.sensor.log_text()[-1500:]}")

    def check_exact(self, held: dict[str, list[tuple[int, float]]]) -> None:
        for case, served in self.exporter.served.items():
            assert held.get(case) == served, (case, len(held.get(case, [])), len(served))
        for labels in labels_of(self.receiver, time.time()):
            assert labels["sensor"] == SENSOR_ID
            assert "exported_sensor" not in labels
            assert labels["job"] == "exporter"


@pytest.fixture
def chain_factory(tmp_path: Path) -> Iterator[list[Chain]]:
    made: list[Chain] = []
    yield made
    for chain in made:
        chain.stop()


def test_samples_reach_the_cloud_prometheus_exactly_once(
        tmp_path: Path, chain_factory: list[Chain]) -> None:
    chain = Chain(tmp_path, scrapes=15, proxied=False)
    chain_factory.append(chain)
    chain.start()
    held = chain.wait_all_forwarded(timeout=90.0)
    chain.check_exact(held)
    assert sum(len(v) for v in held.values()) == 30
    # The snapshot shows the latest sample of each series (read/rw_snapshot.py).
    snapshot = chain.server.get_json("/v1/snapshots/" + SENSOR_ID)
    assert snapshot["payload_json"] == {}  # protobuf, not JSON: the rule is kept
    latest = {s["labels"]["case"]: (s["timestamp_ms"], s["value"])
              for s in snapshot["series"] if s["name"] == "rw_test_value"}
    assert latest == {case: served[-1] for case, served in chain.exporter.served.items()}


@pytest.mark.wallclock
def test_link_cut_for_three_minutes_and_server_sigkill_fill_the_gap(
        tmp_path: Path, chain_factory: list[Chain]) -> None:
    scrapes = 240  # one a second: 20 s before the cut, 180 s during it, 40 s after
    chain = Chain(tmp_path, scrapes=scrapes, proxied=True)
    chain_factory.append(chain)
    chain.start()
    time.sleep(20.0)
    before = sum(len(v) for v in forwarded(chain.receiver, time.time()).values())
    assert before > 0, chain.server.log_text()[-2000:]
    chain.cut()
    time.sleep(180.0)
    during = sum(len(v) for v in forwarded(chain.receiver, time.time()).values())
    chain.restore()
    time.sleep(4.0)
    chain.server.kill()  # SIGKILL while the backlog comes in and is forwarded
    chain.server.start()
    held = chain.wait_all_forwarded(timeout=240.0)
    chain.check_exact(held)
    assert sum(len(v) for v in held.values()) == 2 * scrapes
    assert during < 2 * scrapes - 200  # the cut did hold samples back
