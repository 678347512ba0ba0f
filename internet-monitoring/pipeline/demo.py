"""``make demo``: the real pipeline on one machine, on the embedded SQLite default.

Starts ``pipeline-server`` and three ``pipeline-sensor`` processes, then plays the test
programs of three Raspberry Pi sensors: every few seconds each sensor gets a synthetic
speed, DNS, ping, Wi-Fi or web result submitted to its queue. Prints where to look and
stops everything cleanly on Ctrl-C (or after ``--duration`` seconds).

The credential is a fleet token minted at start and kept only in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.common.logs import setup_logging
from pipeline.sensor.queue import DurableQueue
from pipeline.server.security.auth import DEMO_TOKEN_PREFIX, mint_token
from pipeline.sim.processes import ProcessError, SensorProcess, ServerProcess

log = logging.getLogger("pipeline.demo")

SENSOR_IDS = ("pi-lobby", "pi-office", "pi-warehouse")
TESTS = ("speed", "dns", "ping", "wifi", "web")
DEFAULT_PORTS = (8765, 8081, 8766)


def synthetic_result(rng: random.Random, sensor_id: str, test: str) -> dict[str, Any]:
    """One measurement in the shape the sensors' test programs produce."""
    base: dict[str, Any] = {"sensor_id": sensor_id, "test": test, "ts": time.time()}
    if test == "speed":
        base.update(download_mbps=round(rng.uniform(50, 900), 1),
                    upload_mbps=round(rng.uniform(10, 300), 1),
                    latency_ms=round(rng.uniform(4, 40), 1))
    elif test == "dns":
        base.update(resolver="192.0.2.53", lookup_ms=round(rng.uniform(2, 80), 1),
                    success=rng.random() > 0.02)
    elif test == "ping":
        base.update(target="gateway", rtt_ms=round(rng.uniform(1, 30), 2),
                    loss_pct=round(max(0.0, rng.gauss(0.2, 0.5)), 2))
    elif test == "wifi":
        base.update(ssid="corp", rssi_dbm=rng.randint(-80, -35),
                    channel=rng.choice([1, 6, 11, 36, 149]))
    else:
        base.update(url="https://intranet.example/", ttfb_ms=round(rng.uniform(40, 600), 1),
                    status=200)
    return base


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="var/demo",
                        help="where databases, configs and logs go")
    parser.add_argument("--interval", type=float, default=3.0,
                        help="seconds between results per sensor")
    parser.add_argument("--duration", type=float, default=0.0,
                        help="stop after this many seconds (0 = until Ctrl-C)")
    parser.add_argument("--ephemeral-ports", action="store_true",
                        help="use free ports instead of 8765/8081/8766 (for tests)")
    return parser.parse_args(argv)


def start_fleet(workdir: Path, ephemeral: bool) -> tuple[ServerProcess, list[SensorProcess]]:
    token = mint_token(DEMO_TOKEN_PREFIX)
    server = ServerProcess(workdir / "server", {}, ports=None if ephemeral else DEFAULT_PORTS,
                           extra_config={"auth": {"sensors": [], "fleet_token": token},
                                         "scheduler": {"window_timeout_s": 10.0, "quiet_s": 1.0},
                                         "heartbeat": {"interval_s": 30.0}})
    server.start()
    sensors = [SensorProcess(workdir / "sensors", sid, token, control_url=server.control_url,
                             ingest_url=server.ingest_url, extra_config={"heartbeat_interval": 5.0})
               for sid in SENSOR_IDS]
    for sensor in sensors:
        sensor.start()
    return server, sensors


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("INFO")
    workdir = Path(args.workdir).resolve()
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        server, sensors = start_fleet(workdir, args.ephemeral_ports)
    except ProcessError as exc:
        log.error("demo_start_failed error=%s", str(exc).splitlines()[0])
        return 1
    sys.stdout.write(
        "\nOpen UXI pipeline demo is running\n"
        f"  dashboard:  {server.http_base}/\n"
        f"  snapshots:  {server.http_base}/v1/snapshots\n"
        f"  sensors:    {server.http_base}/v1/sensors\n"
        f"  stream:     {server.stream_url}\n"
        f"  metrics:    {server.http_base}/metrics\n"
        f"  logs:       {workdir}\n"
        "Press Ctrl-C to stop.\n\n")
    sys.stdout.flush()
    rng = random.Random()
    queues = {s.sensor_id: DurableQueue(s.queue_path) for s in sensors}
    started = time.monotonic()
    submitted = 0
    try:
        while not stopping:
            for sensor_id, queue in queues.items():
                result = synthetic_result(rng, sensor_id, rng.choice(TESTS))
                queue.enqueue(json.dumps(result).encode(), attributes={"test": result["test"]})
                submitted += 1
            if submitted % (len(queues) * 10) == 0:
                log.info("demo_progress submitted=%d elapsed_s=%.0f", submitted,
                         time.monotonic() - started)
            if args.duration and time.monotonic() - started >= args.duration:
                break
            deadline = time.monotonic() + args.interval
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        for queue in queues.values():
            queue.close()
        for sensor in sensors:
            sensor.terminate()
        code = server.terminate()
        log.info("demo_stopped submitted=%d server_exit=%d", submitted, code)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
