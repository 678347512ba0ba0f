"""A simulated fleet: N sensors running the real agent, each behind its own flaky links.

::

    sensor i --ws--> FaultProxy "i-control" --> server control port (/control)
             --http-> FaultProxy "i-ingest"  --> server ingest port (/v1/ingest/chunk)

Every sensor has its own queue file and, by default, its own pair of fault proxies (seeded
per sensor and channel, so resets differ while partition windows, which are times, hit
every link at once); ``shared_proxies`` puts the whole fleet behind one pair. Sensors are
real ``pipeline-sensor run`` processes (``SensorProcess``), or ``SensorAgent`` objects in
this process (``in_process``: cheaper, but they cannot be SIGKILLed). The server is a real
``pipeline-server`` process on a fresh SQLite file (``ServerProcess``), or an existing
server given by URL and token (then it is never killed).

Crash injection is ``SIGKILL`` of the real processes; a restarted server keeps its SQLite
file and ports, a restarted sensor its queue file, so what each promised survives.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import secrets
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Protocol
from urllib.parse import urlsplit

import aiohttp

from pipeline.common.config import exact_capabilities
from pipeline.common.errors import ConfigError
from pipeline.sensor.queue import DurableQueue
from pipeline.sim.faults import FaultPlan
from pipeline.sim.processes import ProcessError, SensorProcess, ServerProcess, free_port
from pipeline.sim.replicas import DEFAULT_DSN, ReplicaSet
from pipeline.sim.profiles import Profile
from pipeline.sim.proxy import FaultProxy, ProxyStats
from pipeline.sim.report import QueueLeftovers, ServerEvent
from pipeline.sim.workload import derive_seed

log = logging.getLogger(__name__)

#: Sensor settings for simulated links: short timeouts so black-holed or partitioned
#: connections are noticed in seconds, and quick retries. Capabilities stay the sensor's
#: defaults (``--capabilities`` changes them); with ``heartbeat_stats`` among them the
#: server's ``/metrics`` mirrors each sensor's retry counter.
SIM_SENSOR_CONFIG: dict[str, Any] = {
    "heartbeat_interval": 2.0,
    "control": {"ping_interval": 3.0, "ping_timeout": 3.0},
    "ingest": {"timeout": 10.0},
    "backoff": {"initial_s": 0.2, "max_s": 2.0},
}
#: Server settings for the embedded server: re-request stuck windows after 3 s.
SIM_SERVER_CONFIG: dict[str, Any] = {
    "scheduler": {"window_timeout_s": 3.0, "quiet_s": 0.5},
    "heartbeat": {"interval_s": 5.0},
}
READ_PAGE = 500
HTTP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class FleetOptions:
    sensors: int
    workdir: Path
    seed: int = 1
    in_process: bool = False
    shared_proxies: bool = False
    server_url: str | None = None  # an existing server (its ingest listener); None = start one
    control_url: str | None = None  # default: ws://<server host>:8765/control
    token: str | None = None  # sensor (or fleet) token for an existing server
    read_token: str | None = None  # read API token for an existing server, if it needs one
    server_module: str = "pipeline.server"  # what ``python -m`` runs (tests swap it)
    server_env: Mapping[str, str] = field(default_factory=dict)
    id_prefix: str = "sim"
    capabilities: tuple[str, ...] | None = None  # sensor capabilities; None = their defaults
    sensor_metrics: bool = False  # give each sensor a loopback /metrics (soak: task counts)
    replicas: int = 1  # > 1 or store "postgres": a ReplicaSet behind round-robin balancers
    store: str = "sqlite"
    dsn: str = DEFAULT_DSN  # the PostgreSQL server (store "postgres"); a fresh db on it

    def __post_init__(self) -> None:
        if self.sensors < 1:
            raise ConfigError("sensors: need at least one sensor", field="sensors")
        if self.replicas > 1 and self.store != "postgres":
            raise ConfigError("replicas: more than one replica needs --store postgres",
                              field="replicas")
        if self.store == "postgres" and self.server_url is not None:
            raise ConfigError("store: an existing server (--server-url) keeps its own store",
                              field="store")
        if self.server_url is not None and not self.token:
            raise ConfigError("token: a token is needed to use an existing server",
                              field="token")

    @property
    def external(self) -> bool:
        return self.server_url is not None


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str


def parse_endpoint(url: str, schemes: tuple[str, ...], default_port: int,
                   default_path: str, what: str) -> Endpoint:
    """Host, port and path of a plain (non-TLS) URL; the proxy passes bytes, and TLS
    through a 127.0.0.1 proxy would fail the sensor's host-name check."""
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        raise ConfigError(f"{what}: expected a {' or '.join(schemes)} URL, got {url!r} "
                          "(TLS endpoints are not supported by the simulator)", field=what)
    if not parts.hostname:
        raise ConfigError(f"{what}: no host in {url!r}", field=what)
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise ConfigError(f"{what}: bad port in {url!r}", field=what) from exc
    return Endpoint(parts.hostname, port, parts.path.rstrip("/") or default_path)


def _iso_to_epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def server_event_from_json(doc: Mapping[str, Any]) -> ServerEvent:
    """A read-API event as the report sees it (the simulator hashes the bytes itself)."""
    data = base64.b64decode(doc["payload_base64"])
    return ServerEvent(sensor_id=str(doc["sensor_id"]), event_id=str(doc["event_id"]),
                       sha256=hashlib.sha256(data).hexdigest(),
                       declared_sha256=base64.b64decode(doc["event_sha256"]).hex(),
                       size=len(data), completed_at=_iso_to_epoch(str(doc["completed_at"])))


# ---------------------------------------------------------------------------------------
# Sensors


class SimSensor(Protocol):
    sensor_id: str
    queue_path: Path

    @property
    def kills(self) -> int: ...

    async def start(self) -> None: ...
    async def kill(self) -> None: ...
    async def stop(self) -> None: ...
    def retries(self) -> int | None: ...
    def log_tail(self) -> str: ...


class ProcessSensor:
    """A ``pipeline-sensor run`` process."""

    def __init__(self, process: SensorProcess) -> None:
        self.process = process
        self.sensor_id = process.sensor_id
        self.queue_path = process.queue_path

    @property
    def kills(self) -> int:
        return self.process.kills

    async def start(self) -> None:
        await asyncio.to_thread(self.process.start)

    async def kill(self) -> None:
        await asyncio.to_thread(self.process.kill)

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.terminate)

    def retries(self) -> int | None:
        return None  # read from the server's /metrics (heartbeat_stats)

    def log_tail(self) -> str:
        return self.process.log_text()[-2000:]


class InProcessSensor:
    """A ``SensorAgent`` on this event loop, configured from the same YAML file."""

    def __init__(self, process: SensorProcess) -> None:
        self.config_path = process.config_path
        self.sensor_id = process.sensor_id
        self.queue_path = process.queue_path
        self.kills = 0
        self._agent: Any = None
        self._queue: DurableQueue | None = None
        self._task: asyncio.Task[None] | None = None
        self._retries_before = 0

    async def start(self) -> None:
        from pipeline.common.config import load_sensor_config
        from pipeline.sensor.agent import SensorAgent
        from pipeline.sensor.submit import open_queue

        config = load_sensor_config(self.config_path)
        self._queue = await asyncio.to_thread(open_queue, config)
        self._agent = SensorAgent(config, self._queue)
        self._task = asyncio.create_task(self._agent.run(), name=f"agent-{self.sensor_id}")

    async def kill(self) -> None:
        raise ConfigError("in-process sensors cannot be SIGKILLed; run them as processes",
                          field="in_process")

    async def stop(self) -> None:
        if self._agent is not None and self._task is not None:
            self._agent.stop()
            await asyncio.gather(self._task, return_exceptions=True)
            self._retries_before += int(self._agent.retries)
            self._agent, self._task = None, None
        if self._queue is not None:
            await asyncio.to_thread(self._queue.close)
            self._queue = None

    def retries(self) -> int | None:
        live = int(self._agent.retries) if self._agent is not None else 0
        return self._retries_before + live

    def log_tail(self) -> str:
        return ""


# ---------------------------------------------------------------------------------------
# The fleet


class Fleet:
    """Server, proxies and sensors of one simulation run (see the module docstring)."""

    def __init__(self, options: FleetOptions) -> None:
        self.options = options
        workdir = options.workdir
        prefix = options.id_prefix
        if options.external:
            prefix = f"{prefix}-{secrets.token_hex(4)}"  # fresh ids on a shared server
        self.sensor_ids = [f"{prefix}-{i:03d}" for i in range(options.sensors)]
        self.tokens = {sid: options.token or f"sim-{secrets.token_urlsafe(24)}"
                       for sid in self.sensor_ids}
        self.server: ServerProcess | ReplicaSet | None = None
        if options.external:
            assert options.server_url is not None
            ingest = parse_endpoint(options.server_url, ("http",), 80, "", "server_url")
            self.http_base = f"http://{ingest.host}:{ingest.port}"
            control = parse_endpoint(options.control_url or f"ws://{ingest.host}:8765/control",
                                     ("ws",), 80, "/control", "control_url")
            self._control_target = control
            self._ingest_target = Endpoint(ingest.host, ingest.port, "/v1/ingest/chunk")
            self.server_label = self.http_base
        elif options.store == "postgres":
            self.server = ReplicaSet(workdir / "server", self.tokens, replicas=options.replicas,
                                     dsn=options.dsn, extra_config=SIM_SERVER_CONFIG,
                                     env=options.server_env)
            self.http_base = self.server.http_base
            self._control_target = Endpoint("127.0.0.1", self.server.control_port, "/control")
            self._ingest_target = Endpoint("127.0.0.1", self.server.ingest_port,
                                           "/v1/ingest/chunk")
            self.server_label = f"{options.replicas} replica(s) on PostgreSQL"
        else:
            self.server = ServerProcess(workdir / "server", self.tokens,
                                        extra_config=SIM_SERVER_CONFIG)
            if options.server_module != "pipeline.server":
                self.server.argv = [sys.executable, "-m", options.server_module, "--config",
                                    str(self.server.config_path)]
            self.server.env = dict(options.server_env)
            self.http_base = self.server.http_base
            self._control_target = Endpoint("127.0.0.1", self.server.control_port, "/control")
            self._ingest_target = Endpoint("127.0.0.1", self.server.ingest_port,
                                           "/v1/ingest/chunk")
            self.server_label = "embedded" if options.server_module == "pipeline.server" \
                else f"embedded ({options.server_module})"
        self.proxies: dict[str, tuple[FaultProxy, FaultProxy]] = {}
        self.sensors: dict[str, SimSensor] = {}
        self.metrics_urls: dict[str, str] = {}  # sensor id -> its /metrics (sensor_metrics)
        self._probes: dict[str, DurableQueue] = {}
        self._session: aiohttp.ClientSession | None = None

    # -- life cycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.start)
        allow_remote = self.options.external
        shared: tuple[FaultProxy, FaultProxy] | None = None
        for sid in self.sensor_ids:
            if shared is not None:
                self.proxies[sid] = shared
                continue
            name = "fleet" if self.options.shared_proxies else sid
            pair = (FaultProxy(target_host=self._control_target.host,
                               target_port=self._control_target.port,
                               allow_remote=allow_remote, name=f"{name}-control"),
                    FaultProxy(target_host=self._ingest_target.host,
                               target_port=self._ingest_target.port,
                               allow_remote=allow_remote, name=f"{name}-ingest"))
            for proxy in pair:
                await proxy.start()
            self.proxies[sid] = pair
            if self.options.shared_proxies:
                shared = pair
        sensor_dir = self.options.workdir / "sensors"
        for sid in self.sensor_ids:
            control, ingest = self.proxies[sid]
            process = SensorProcess(
                sensor_dir, sid, self.tokens[sid],
                control_url=control.url("ws", self._control_target.path),
                ingest_url=ingest.url("http", self._ingest_target.path),
                extra_config=self._sensor_config(sid))
            self.sensors[sid] = (InProcessSensor(process) if self.options.in_process
                                 else ProcessSensor(process))
        await asyncio.gather(*(s.start() for s in self.sensors.values()))
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        self._session = aiohttp.ClientSession(timeout=timeout)

    def _sensor_config(self, sensor_id: str) -> dict[str, Any]:
        config = dict(SIM_SENSOR_CONFIG)
        if self.options.capabilities is not None:
            config.update(exact_capabilities(self.options.capabilities))
        if self.options.sensor_metrics:
            listen = f"127.0.0.1:{free_port()}"  # kept across restarts of the sensor
            config["metrics"] = {"listen": listen}
            self.metrics_urls[sensor_id] = f"http://{listen}/metrics"
        return config

    def sensor_pid(self, sensor_id: str) -> int | None:
        """The sensor's process id (None for in-process agents or while it is down)."""
        sensor = self.sensors.get(sensor_id)
        process = getattr(sensor, "process", None)
        return process.pid if process is not None and process.running else None

    def server_pid(self) -> int | None:
        return self.server.pid if self.server is not None and self.server.running else None

    def unique_proxies(self) -> list[FaultProxy]:
        seen: dict[int, FaultProxy] = {}
        for pair in self.proxies.values():
            for proxy in pair:
                seen[id(proxy)] = proxy
        return list(seen.values())

    def install_profile(self, profile: Profile, seed: int) -> None:
        """Put every link under ``profile`` now: its windows count from this moment."""
        for index, sid in enumerate(self.sensor_ids):
            pair = self.proxies[sid]
            if self.options.shared_proxies and index > 0:
                break
            for channel, proxy in zip(("control", "ingest"), pair):
                proxy.set_plan(profile.to_plan(derive_seed(seed, "link", index, channel)))

    def clear_faults(self) -> None:
        for proxy in self.unique_proxies():
            proxy.set_plan(FaultPlan(seed=proxy.plan.seed))

    async def wait_connected(self, timeout_s: float = 30.0) -> bool:
        """Until the server lists every simulated sensor as connected."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            try:
                # Replicas: each knows the sockets it holds; ask each of them directly.
                bases = self.server.replica_bases if isinstance(self.server, ReplicaSet) \
                    else [self.http_base]
                connected: set[str] = set()
                for base in bases:
                    doc = await self._get_json("/v1/sensors", base=base)
                    connected |= {s["sensor_id"] for s in doc.get("sensors", [])
                                  if s.get("connected")}
                if connected >= set(self.sensor_ids):
                    return True
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.25)
        return False

    async def stop_sensors(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.sensors.values()),
                             return_exceptions=True)

    async def close(self) -> None:
        """Stop everything started (idempotent)."""
        await self.stop_sensors()
        if self.server is not None:
            await asyncio.to_thread(self.server.terminate)
        for proxy in self.unique_proxies():
            await proxy.stop()
        for queue in self._probes.values():
            queue.close()
        self._probes.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- crashes --------------------------------------------------------------------------

    @property
    def server_killable(self) -> bool:
        return self.server is not None

    async def kill_sensor(self, sensor_id: str) -> None:
        await self.sensors[sensor_id].kill()

    async def start_sensor(self, sensor_id: str) -> None:
        await self.sensors[sensor_id].start()

    async def kill_server(self) -> None:
        if self.server is None:
            raise ConfigError("an existing server is never killed by the simulator",
                              field="kill_server_every_s")
        await asyncio.to_thread(self.server.kill)

    async def start_server(self, attempts: int = 5) -> None:
        """Start the (killed) server again on the same SQLite file and ports."""
        assert self.server is not None
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.to_thread(self.server.start)
                return
            except ProcessError as exc:
                log.error("sim_server_restart_failed attempt=%d error=%s", attempt,
                          str(exc).splitlines()[0])
                await asyncio.to_thread(self.server.kill)
                await asyncio.sleep(1.0)
        raise ProcessError(f"server did not restart after {attempts} attempts")

    def kills(self) -> dict[str, int]:
        return {"sensors": sum(s.kills for s in self.sensors.values()),
                "server": self.server.kills if self.server is not None else 0}

    # -- queues ---------------------------------------------------------------------------

    def _probe(self, sensor_id: str) -> DurableQueue:
        queue = self._probes.get(sensor_id)
        if queue is None:
            queue = DurableQueue(self.sensors[sensor_id].queue_path, verify_on_open=False)
            self._probes[sensor_id] = queue
        return queue

    def _depths(self) -> dict[str, int]:
        return {sid: self._probe(sid).queue_depth() for sid in self.sensor_ids}

    async def queue_depths(self) -> dict[str, int]:
        """Chunks waiting in each sensor's queue file."""
        return await asyncio.to_thread(self._depths)

    def _leftovers(self) -> list[QueueLeftovers]:
        out = []
        for sid in self.sensor_ids:
            queue = self._probe(sid)
            metas = queue.list_after(0, 10_000_000)
            queued: set[str] = set()
            sequences = [m.sequence for m in metas]
            for start in range(0, len(sequences), 500):
                queued.update(c.event_id for c in queue.get(sequences[start:start + 500]))
            quarantined = queue.quarantined()
            dropped = queue.dropped_counts()
            out.append(QueueLeftovers(
                sensor_id=sid, queued_event_ids=frozenset(queued), queued_chunks=len(metas),
                quarantined_event_ids=frozenset(c.event_id for c, _ in quarantined),
                quarantined_chunks=len(quarantined),
                dropped_events=sum(v.get("events", 0) for v in dropped.values()),
                dropped_chunks=sum(v.get("chunks", 0) for v in dropped.values())))
        return out

    async def leftovers(self) -> list[QueueLeftovers]:
        return await asyncio.to_thread(self._leftovers)

    # -- the server's read API and metrics ------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self.options.read_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _get_json(self, path: str, base: str | None = None) -> Any:
        assert self._session is not None
        async with self._session.get((base or self.http_base) + path,
                                     headers=self._headers()) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def events_page(self, sensor_id: str, after: int) -> tuple[list[ServerEvent], int | None,
                                                                       int]:
        """One page of a sensor's events after ``after``: (events, next cursor or None when
        this was the last page, highest cursor seen)."""
        doc = await self._get_json(f"/v1/sensors/{sensor_id}/events?after={after}"
                                   f"&limit={READ_PAGE}")
        items = doc.get("events", [])
        events = [server_event_from_json(item) for item in items]
        highest = max((int(item["cursor"]) for item in items), default=after)
        next_after = doc.get("next_after")
        return events, (int(next_after) if next_after is not None else None), highest

    async def all_events(self, sensor_id: str) -> list[ServerEvent]:
        events: list[ServerEvent] = []
        after = 0
        while True:
            page, next_after, _ = await self.events_page(sensor_id, after)
            events.extend(page)
            if next_after is None or next_after == after:
                return events
            after = next_after

    async def metrics_text(self) -> str:
        assert self._session is not None
        async with self._session.get(self.http_base + "/metrics") as resp:
            resp.raise_for_status()
            return await resp.text()

    # -- faults ---------------------------------------------------------------------------

    def proxy_stats(self) -> dict[str, int]:
        totals = dict.fromkeys((f.name for f in fields(ProxyStats)), 0)
        for proxy in self.unique_proxies():
            stats = proxy.stats
            for name in totals:
                totals[name] += int(getattr(stats, name))
        totals.pop("active", None)
        return totals

    def sensor_retries(self) -> int | None:
        values = [s.retries() for s in self.sensors.values()]
        if any(v is None for v in values):
            return None
        return sum(int(v or 0) for v in values)

    def diagnostics(self) -> str:
        parts = []
        if self.server is not None:
            parts.append(f"--- server log tail\n{self.server.log_text()[-3000:]}")
        for sid, sensor in list(self.sensors.items())[:3]:
            parts.append(f"--- {sid} log tail\n{sensor.log_tail()}")
        return "\n".join(parts)


__all__ = ["Fleet", "FleetOptions", "InProcessSensor", "ProcessSensor", "SIM_SENSOR_CONFIG",
           "SIM_SERVER_CONFIG", "parse_endpoint", "server_event_from_json"]
