"""One simulation run: start the fleet, inject faults and crashes, drain, verify.

Phases::

    start      server (or an existing one), one FaultProxy pair per sensor, the sensors;
               wait until every sensor is connected (links still clean)
    run        install the profile on every link (its windows count from now), start the
               workload, SIGKILL sensors / the server on their periods and restart them;
               a progress line every second
    drain      after the last submit, until every queue is empty and the server holds every
               event (complete), or queues are empty and the server, readable, shows
               nothing new for ``settle_s`` (settled: something was lost), or
               ``drain_timeout_s`` (timeout); crashes stop once every queue is empty
    verify     stop the sensors, read what is left in their queue files, read every
               event back from the server, build the report
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from pipeline.common.aio import wait_event
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.sim.counters import RestartingCounters
from pipeline.sim.fleet import Fleet, FleetOptions
from pipeline.sim.processes import ProcessError
from pipeline.sim.profiles import Profile
from pipeline.sim.report import Report, RunFacts, ServerEvent, build_report
from pipeline.sim.soak import SoakMonitor, SoakSettings, Watched, flap_links
from pipeline.sim.workload import Workload, WorkloadSpec, derive_seed

log = logging.getLogger(__name__)

SCRAPED = ("server_ingest_duplicate_total", "sensor_chunk_retry_total",
           "pipeline_rejected_total")
READ_BACK_TIMEOUT_S = 60.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SimSettings:
    profile: Profile
    workload: WorkloadSpec
    fleet: FleetOptions
    kill_sensors_every_s: float = 0.0  # 0 = never
    kill_server_every_s: float = 0.0
    kill_fraction: float = 0.25  # of the sensors, at each sensor kill
    restart_delay_s: float = 1.0
    drain_timeout_s: float = 300.0
    settle_s: float = 5.0
    progress_interval_s: float = 1.0
    faults_for_s: float = 0.0  # > 0: links turn clean after this many seconds
    parameters: dict[str, Any] = field(default_factory=dict)  # recorded in the report
    soak: SoakSettings | None = None  # sample every process and judge growth

    def __post_init__(self) -> None:
        for name in ("kill_sensors_every_s", "kill_server_every_s", "restart_delay_s",
                     "drain_timeout_s", "settle_s", "faults_for_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}: must be a finite number >= 0", field=name)
        if not 0 < self.kill_fraction <= 1:
            raise ConfigError("kill_fraction: must be in (0, 1]", field="kill_fraction")
        if self.progress_interval_s <= 0:
            raise ConfigError("progress_interval_s: must be > 0", field="progress_interval_s")
        if self.kill_sensors_every_s and self.fleet.in_process:
            raise ConfigError("kill_sensors_every_s: in-process sensors cannot be SIGKILLed; "
                              "drop --in-process", field="kill_sensors_every_s")
        if self.kill_server_every_s and self.fleet.external:
            raise ConfigError("kill_server_every_s: an existing server (--server-url) is "
                              "never killed", field="kill_server_every_s")


class _Tail:
    """Follows the read API with one cursor per sensor: how many distinct events arrived."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.cursors = dict.fromkeys(fleet.sensor_ids, 0)
        self.seen: set[tuple[str, str]] = set()

    async def _poll_one(self, sensor_id: str) -> None:
        while True:
            events, next_after, highest = await self.fleet.events_page(
                sensor_id, self.cursors[sensor_id])
            self.seen.update((e.sensor_id, e.event_id) for e in events)
            self.cursors[sensor_id] = max(self.cursors[sensor_id], highest)
            if next_after is None:
                return

    async def poll(self) -> bool:
        results = await asyncio.gather(*(self._poll_one(s) for s in self.fleet.sensor_ids),
                                       return_exceptions=True)
        return not any(isinstance(r, BaseException) for r in results)


async def _stopped(stop: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout``; True when ``stop`` was set."""
    return await wait_event(stop, timeout)


class Simulation:
    def __init__(self, settings: SimSettings, progress: Progress | None = None) -> None:
        self.settings = settings
        self.progress = progress
        self.counters = RestartingCounters()
        self._stop_crashes = asyncio.Event()

    # -- crash loops ----------------------------------------------------------------------

    async def _crash_sensors(self, fleet: Fleet) -> None:
        s = self.settings
        rng = random.Random(derive_seed(s.fleet.seed, "kill-sensors"))
        count = max(1, math.ceil(s.kill_fraction * len(fleet.sensor_ids)))
        while not await _stopped(self._stop_crashes, s.kill_sensors_every_s):
            victims = rng.sample(fleet.sensor_ids, count)
            await asyncio.gather(*(fleet.kill_sensor(sid) for sid in victims))
            log.info("sim_sensors_killed sensors=%s", ",".join(victims))
            await asyncio.sleep(s.restart_delay_s)
            await asyncio.gather(*(fleet.start_sensor(sid) for sid in victims))

    async def _crash_server(self, fleet: Fleet) -> None:
        s = self.settings
        while not await _stopped(self._stop_crashes, s.kill_server_every_s):
            await fleet.kill_server()
            log.info("sim_server_killed kills=%d", fleet.kills()["server"])
            await asyncio.sleep(s.restart_delay_s)
            await fleet.start_server()

    async def _clear_faults_later(self, fleet: Fleet) -> None:
        """Recovery check: after ``faults_for_s`` every link turns clean (crash loops go
        on unless they have their own end); a healthy pipeline then drains completely."""
        if not await _stopped(self._stop_crashes, self.settings.faults_for_s):
            fleet.clear_faults()
            log.info("sim_faults_cleared after_s=%.1f", self.settings.faults_for_s)

    # -- monitoring -----------------------------------------------------------------------

    async def _scrape(self, fleet: Fleet) -> None:
        try:
            text = await fleet.metrics_text()
        except (TimeoutError, aiohttp.ClientError, OSError):
            return
        self.counters.observe_text(text, SCRAPED)

    async def _monitor(self, fleet: Fleet, workload: Workload,
                       started: float) -> tuple[str, _Tail]:
        s = self.settings
        loop = asyncio.get_running_loop()
        tail = _Tail(fleet)
        depths: dict[str, int] = {}
        submit_done_at: float | None = None
        delivered_before = -1
        changed_at = loop.time()
        tick = 0
        while True:
            await asyncio.sleep(s.progress_interval_s)
            tick += 1
            now = loop.time()
            try:
                depths = await fleet.queue_depths()
            except PipelineError as exc:  # a queue file busy during a crash: next tick
                log.info("sim_queue_probe_failed error=%s", exc)
            read_ok = await tail.poll()
            if tick % 2 == 0:
                await self._scrape(fleet)
            delivered = len(tail.seen)
            if delivered != delivered_before or not read_ok:
                # A server that could not be read (killed, restarting) is not a quiet one.
                delivered_before, changed_at = delivered, now
            in_queues = sum(depths.values())
            self._report_progress(fleet, workload, now - started, delivered, in_queues)
            if not workload.done():
                continue
            if submit_done_at is None:
                submit_done_at = now
            submitted = workload.submitted()
            if depths and in_queues == 0 and not self._stop_crashes.is_set():
                # Everything left the queues: crashes have nothing more to prove, and the
                # verdict is read from a server that stays up.
                self._stop_crashes.set()
                changed_at = now
            if depths and in_queues == 0 and delivered >= submitted:
                return "complete", tail
            if depths and in_queues == 0 and now - changed_at >= s.settle_s \
                    and now - submit_done_at >= s.settle_s:
                return "settled", tail
            if now - submit_done_at >= s.drain_timeout_s:
                return "timeout", tail

    def _report_progress(self, fleet: Fleet, workload: Workload, elapsed: float,
                         delivered: int, in_queues: int) -> None:
        kills = fleet.kills()
        faults = fleet.proxy_stats()
        line = (f"sim[{self.settings.profile.name}] t={elapsed:5.1f}s "
                f"submitted={workload.submitted()}/{workload.expected} delivered={delivered} "
                f"in_queues={in_queues} kills=sensors:{kills['sensors']},"
                f"server:{kills['server']} resets={faults['resets']}")
        log.debug("sim_progress %s", line)
        if self.progress is not None:
            self.progress(line)

    # -- read back ------------------------------------------------------------------------

    async def _read_back(self, fleet: Fleet) -> list[ServerEvent]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_BACK_TIMEOUT_S
        while True:
            try:
                pages = await asyncio.gather(*(fleet.all_events(s) for s in fleet.sensor_ids))
                return [e for page in pages for e in page]
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                if loop.time() > deadline:
                    raise ProcessError(f"cannot read events back from the server: {exc}") from exc
                await asyncio.sleep(1.0)

    def _start_soak(self, fleet: Fleet, stop: asyncio.Event,
                    tasks: list[asyncio.Task[None]]) -> SoakMonitor | None:
        """Soak mode: sample every process and flap links until ``stop``."""
        s = self.settings
        if s.soak is None:
            return None
        watched = []
        if fleet.server is not None:
            watched.append(Watched("server", fleet.server_pid, fleet.http_base + "/metrics"))
        for sid in fleet.sensor_ids:
            watched.append(Watched(sid, functools.partial(fleet.sensor_pid, sid),
                                   fleet.metrics_urls.get(sid)))
        monitor = SoakMonitor(s.soak, watched)
        tasks.append(asyncio.create_task(monitor.run(stop), name="sim-soak-monitor"))
        tasks.append(asyncio.create_task(
            flap_links(s.soak, fleet.proxies, stop, monitor.result,
                       derive_seed(s.fleet.seed, "soak")), name="sim-soak-flaps"))
        return monitor

    def _counters(self, fleet: Fleet) -> dict[str, float]:
        ours = set(fleet.sensor_ids)

        def mine(labels: Any) -> bool:
            return labels.get("sensor_id") in ours

        counters: dict[str, float] = {
            "server_duplicates_absorbed":
                self.counters.total("server_ingest_duplicate_total", mine)}
        retries = fleet.sensor_retries()
        if retries is not None:
            counters["sensor_retries"] = float(retries)
        elif self.counters.seen("sensor_chunk_retry_total"):
            counters["sensor_retries"] = self.counters.total("sensor_chunk_retry_total", mine)
        if not fleet.options.external:
            counters["server_rejected"] = self.counters.total("pipeline_rejected_total")
        return counters

    # -- the run --------------------------------------------------------------------------

    async def run(self) -> Report:
        s = self.settings
        fleet = Fleet(s.fleet)
        cpu_before = _cpu_seconds()
        try:
            report = await self._run(fleet)
        finally:
            self._stop_crashes.set()
            await fleet.close()
        cpu_after = _cpu_seconds()
        cpu = {k: round(cpu_after[k] - cpu_before[k], 2) for k in cpu_after}
        return dataclasses.replace(report, facts=dataclasses.replace(report.facts, cpu_s=cpu))

    async def _run(self, fleet: Fleet) -> Report:
        s = self.settings
        crashers: list[asyncio.Task[None]] = []
        workload: Workload | None = None
        try:
            await fleet.start()
            if not await fleet.wait_connected():
                log.warning("sim_sensors_not_connected action=continue")
            loop = asyncio.get_running_loop()
            fleet.install_profile(s.profile, s.fleet.seed)
            workload = Workload(s.workload, {sid: fleet.sensors[sid].queue_path
                                             for sid in fleet.sensor_ids})
            started = loop.time()
            wall_started = time.time()
            workload.start()
            if s.kill_sensors_every_s:
                crashers.append(asyncio.create_task(self._crash_sensors(fleet),
                                                    name="sim-kill-sensors"))
            if s.kill_server_every_s:
                crashers.append(asyncio.create_task(self._crash_server(fleet),
                                                    name="sim-kill-server"))
            if s.faults_for_s:
                crashers.append(asyncio.create_task(self._clear_faults_later(fleet),
                                                    name="sim-clear-faults"))
            soak_stop = asyncio.Event()
            monitor = self._start_soak(fleet, soak_stop, crashers)
            submit_watch = asyncio.create_task(asyncio.to_thread(workload.join))
            if monitor is not None:
                # Resources are judged while the load and the faults last, not during drain.
                crashers.append(asyncio.create_task(_set_after(submit_watch, soak_stop),
                                                    name="sim-soak-end"))
            drain, tail = await self._monitor(fleet, workload, started)
            await submit_watch
            submit_s = max(r.enqueued_at for r in workload.records()) - wall_started \
                if workload.records() else 0.0
            elapsed = loop.time() - started
            self._stop_crashes.set()
            for result in await asyncio.gather(*crashers, return_exceptions=True):
                if isinstance(result, BaseException):
                    log.error("sim_crash_loop_failed error=%r", result)
            crashers = []
            await fleet.stop_sensors()
            leftovers = await fleet.leftovers()
            stored = await self._read_back(fleet)
            log.info("sim_read_back events=%d seen_while_running=%d drain=%s", len(stored),
                     len(tail.seen), drain)
            await self._scrape(fleet)
            facts = RunFacts(
                profile=s.profile.name, seed=s.fleet.seed, sensors=len(fleet.sensor_ids),
                events_per_sensor=s.workload.events_per_sensor,
                mode="in-process" if s.fleet.in_process else "processes",
                server=fleet.server_label, submit_s=submit_s, elapsed_s=elapsed, drain=drain,
                kills=fleet.kills(), faults=fleet.proxy_stats(), counters=self._counters(fleet),
                workload_errors=tuple(workload.errors), parameters=dict(s.parameters))
            report = build_report(workload.records(), stored, leftovers, facts)
            if monitor is not None:
                report = dataclasses.replace(report, soak=monitor.finish())
            if not report.ok:
                log.warning("sim_failed profile=%s missing=%d duplicated=%d corrupted=%d "
                            "left_in_queues=%d workdir=%s", s.profile.name, report.missing,
                            report.duplicated, report.corrupted, report.left_in_queues_chunks,
                            s.fleet.workdir)
            return report
        finally:
            self._stop_crashes.set()
            if workload is not None:
                workload.stop()
            for task in crashers:
                task.cancel()
            await asyncio.gather(*crashers, return_exceptions=True)


async def _set_after(task: asyncio.Future[Any], event: asyncio.Event) -> None:
    try:
        await asyncio.shield(task)
    finally:
        event.set()


def _cpu_seconds() -> dict[str, float]:
    """CPU used by this process and by its reaped children (server and sensor processes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"simulator": me.ru_utime + me.ru_stime,
            "processes": children.ru_utime + children.ru_stime}
