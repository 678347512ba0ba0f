"""``pipeline-sim``: rehearse a fleet over flaky links and prove delivery (also
``python -m pipeline.sim``).

::

    pipeline-sim --profile chaos --sensors 20 --events 500 --report chaos.json
    pipeline-sim --profile lossy --compare clean --duration 0      # goodput vs clean
    pipeline-sim --profile satellite --set latency_ms=400 --set bandwidth_bps=1000000
    pipeline-sim --list-profiles
    pipeline-sim --replicas 3 --store postgres --kill-replica-every 20   # docs/scaling.md

It starts a real ``pipeline-server`` on a fresh SQLite file (or ``--replicas N`` of them on
a fresh PostgreSQL database behind round-robin balancers, or uses ``--server-url``), N
real ``pipeline-sensor`` processes each with its own queue file, and a seeded fault proxy
pair in front of every sensor's control and ingest connections; submits seeded events into
the queues, kills processes on the given periods, waits for the queues to drain, reads
every event back and prints the verification report (``--report FILE`` writes it as JSON).

Exit status: 0 every event delivered exactly once (and ``--min-goodput-ratio`` met);
1 something missing, duplicated or corrupted (or the ratio missed); 2 bad arguments;
3 the harness itself failed (a process would not start, the server could not be read).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from pipeline.common.config import DEFAULT_CAPABILITIES
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.common.logs import setup_logging
from pipeline.sim.faults import DirectionFaults
from pipeline.sim.fleet import FleetOptions
from pipeline.sim.processes import ProcessError
from pipeline.sim.replicas import DEFAULT_DSN
from pipeline.sim.profiles import (
    PROFILES,
    Profile,
    get_profile,
    override_names,
    parse_overrides,
    profile_names,
)
from pipeline.sim.report import Report, format_comparison, format_report, goodput_ratio
from pipeline.sim.runner import SimSettings, Simulation
from pipeline.sim.soak import SoakSettings, parse_duration
from pipeline.sim.workload import SizeSpec, WorkloadSpec

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_HARNESS = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-sim",
        description="Flaky-link simulator: a real server and sensor fleet behind seeded fault "
                    "proxies, crash injection, and a delivery verification report.",
        epilog=f"profiles: {', '.join(profile_names())}; --set names: "
               f"{', '.join(override_names())}")
    add = parser.add_argument
    add("--profile", default="clean", choices=profile_names(), help="link profile (clean)")
    add("--list-profiles", action="store_true", help="print the profiles' parameters and exit")
    add("--set", action="append", default=[], metavar="NAME=VALUE",
        help="override one profile parameter (repeatable), e.g. --set latency_ms=80")
    add("--sensors", type=int, default=5, help="sensors in the fleet (5)")
    add("--events", type=int, default=100, help="events per sensor (100)")
    add("--event-size", default="1k-8k",
        help="event size in bytes, or a range: 2000, 2k, 1m, 500-64k (1k-8k)")
    add("--rate", type=float, default=0.0,
        help="events per second per sensor (default: spread over --duration)")
    add("--duration", type=float, default=None,
        help="seconds over which each sensor submits its events (default: the profile's "
             "duration hint; 0 = as fast as possible)")
    add("--seed", type=int, default=1, help="seed of every random decision (1)")
    add("--kill-sensors-every", type=float, default=None, metavar="S",
        help="SIGKILL sensors every S seconds and restart them (default: the profile's)")
    add("--kill-server-every", type=float, default=None, metavar="S",
        help="SIGKILL the server every S seconds and restart it (default: the profile's)")
    add("--replicas", type=int, default=1,
        help="server replicas behind round-robin TCP balancers (1; more needs --store "
             "postgres)")
    add("--store", default="sqlite", choices=("sqlite", "postgres"),
        help="the embedded server's store (sqlite); postgres: a fresh database on --dsn, "
             "dropped afterwards")
    add("--dsn", default=DEFAULT_DSN,
        help=f"PostgreSQL server for --store postgres ({DEFAULT_DSN})")
    add("--kill-replica-every", type=float, default=None, metavar="S",
        help="SIGKILL one replica (each in turn) every S seconds and restart it")
    add("--kill-fraction", type=float, default=0.25,
        help="share of the sensors killed each time (0.25)")
    add("--restart-delay", type=float, default=1.0, help="seconds before a restart (1.0)")
    add("--drain-timeout", type=float, default=300.0,
        help="seconds to wait for the queues to drain after the last submit (300)")
    add("--settle", type=float, default=5.0,
        help="with every queue empty, seconds without a new event before judging (5)")
    add("--faults-for", type=float, default=0.0, metavar="S",
        help="links turn clean after S seconds (0 = faults for the whole run): checks that "
             "the fleet recovers and drains once the link heals")
    add("--in-process", action="store_true",
        help="run the sensor agents inside this process (no sensor kills)")
    add("--shared-proxies", action="store_true",
        help="one proxy pair for the whole fleet instead of one per sensor")
    add("--capabilities", default=None, metavar="LIST",
        help="capabilities the sensors announce, comma-separated (default: the sensor's "
             f"own default, {','.join(DEFAULT_CAPABILITIES)})")
    add("--server-url", default=None,
        help="use an existing server (its HTTP ingest base, e.g. http://10.0.0.5:8081) "
             "instead of starting one; server kills are then disabled")
    add("--control-url", default=None,
        help="control WebSocket of --server-url (default ws://<host>:8765/control)")
    add("--token", default=None, help="sensor or fleet token for --server-url")
    add("--read-token", default=None, help="read API token for --server-url, if it needs one")
    add("--compare", default=None, choices=profile_names(), metavar="PROFILE",
        help="run PROFILE first with the same fleet and workload, and report the goodput "
             "of --profile as a fraction of it")
    add("--min-goodput-ratio", type=float, default=None,
        help="with --compare: fail (exit 1) when the goodput ratio is below this")
    add("--workdir", default=None, help="where configs, databases and logs go "
                                        "(default: a temporary directory)")
    add("--keep-workdir", action="store_true", help="keep the workdir even when the run passes")
    add("--report", default=None, metavar="FILE", help="write the report as JSON")
    add("--soak", default=None, metavar="DURATION",
        help="soak mode: submit at --rate (default 1 event/s per sensor) for DURATION "
             "(90, 90s, 30m, 2h) with link flaps at random intervals, sample resident "
             "memory, open descriptors and asyncio tasks of every process, and fail on "
             "growth after warm-up")
    add("--soak-sample-every", type=float, default=5.0, metavar="S",
        help="soak: seconds between samples (5)")
    add("--soak-warmup", type=float, default=None, metavar="S",
        help="soak: seconds excluded from the growth check (default: a quarter of the "
             "soak, at most 300)")
    add("--soak-fault-every", type=float, default=15.0, metavar="S",
        help="soak: mean seconds between link flaps, exponential (15; 0 = none)")
    add("--max-rss-growth", type=float, default=0.25, metavar="FRACTION",
        help="soak: resident memory growth allowed after warm-up, as a fraction of the "
             "post-warm-up baseline, at least 16 MiB (0.25)")
    add("--max-fd-growth", type=int, default=16, help="soak: open descriptors (16)")
    add("--max-task-growth", type=int, default=32, help="soak: asyncio tasks (32)")
    add("--quiet", action="store_true", help="no progress lines")
    add("--log-level", default="WARNING", type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # Test-only: run another server module (the deliberately broken variant in
    # pipeline.sim.broken_server, which refuses to start without its environment flag).
    add("--server-module", default="pipeline.server", help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------------------------------
# Profiles table (docs/simulator.md and --list-profiles)


def _side(faults: Any, name: str, fmt: Any) -> str:
    up, down = getattr(faults.upstream, name), getattr(faults.downstream, name)
    return fmt(up) if up == down else f"up {fmt(up)} / down {fmt(down)}"


def _windows(profile: Profile) -> str:
    parts = [f"{d:g} s at {s:g} s" for s, d in profile.partitions]
    if profile.partition_every_s:
        first = (profile.partition_first_s if profile.partition_first_s is not None
                 else profile.partition_every_s)
        count = f"{profile.partition_count} x " if profile.partition_count else ""
        parts.append(f"{count}{profile.partition_duration_s:g} s every "
                     f"{profile.partition_every_s:g} s from {first:g} s")
    return "; ".join(parts) or "-"


def profile_row(profile: Profile) -> list[str]:
    f = profile.faults
    plain = DirectionFaults()

    def latency(d: DirectionFaults) -> str:
        return f"{d.latency_ms:g} ± {d.jitter_ms:g} ms" if d.latency_ms or d.jitter_ms else "-"

    latency_text = (latency(f.upstream) if f.upstream.latency_ms == f.downstream.latency_ms
                    and f.upstream.jitter_ms == f.downstream.jitter_ms
                    else f"up {latency(f.upstream)} / down {latency(f.downstream)}")
    bandwidth = _side(f, "bandwidth_bps",
                      lambda v: f"{v / 1e6:g} Mbit/s" if v else "-")
    per_segment = _side(f, "reset_mid_stream_p", lambda v: f"{100 * v:g} %" if v else "-")
    other = []
    if f.upstream.fragment_max_bytes != plain.fragment_max_bytes:
        other.append(f"fragments <= {f.upstream.fragment_max_bytes} B")
    if f.upstream.slow_close_ms:
        other.append(f"slow close {f.upstream.slow_close_ms:g} ms")
    if f.upstream.close_after_bytes:
        other.append(f"close after {f.upstream.close_after_bytes} B")
    kills = (f"{profile.kill_sensors_every_s:g} s / {profile.kill_server_every_s:g} s"
             if profile.kill_sensors_every_s or profile.kill_server_every_s else "-")
    blackholes = "; ".join(f"{d:g} s at {s:g} s" for s, d in profile.blackholes) or "-"
    return [f"`{profile.name}`", latency_text, bandwidth,
            f"{100 * f.reset_at_connect_p:g} %" if f.reset_at_connect_p else "-",
            per_segment, _windows(profile), blackholes, ", ".join(other) or "-", kills,
            f"{profile.duration_hint_s:g} s"]


def profiles_table() -> str:
    """The Markdown table of every profile's parameters (docs/simulator.md holds a copy)."""
    head = ["profile", "one-way latency", "bandwidth (each way)", "reset at connect",
            "reset per segment", "partitions", "black-holes", "other",
            "kill sensors / server every", "duration hint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for profile in PROFILES.values():
        lines.append("| " + " | ".join(profile_row(profile)) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Settings


def _profile(name: str, overrides: Sequence[str]) -> Profile:
    profile = get_profile(name)
    params = parse_overrides(overrides)
    return profile.with_overrides(**params) if params else profile


def _check_args(args: argparse.Namespace) -> None:
    if args.sensors < 1:
        raise ConfigError("--sensors must be >= 1", field="sensors")
    if args.events < 0:
        raise ConfigError("--events must be >= 0", field="events")
    if args.min_goodput_ratio is not None and args.compare is None:
        raise ConfigError("--min-goodput-ratio needs --compare", field="min_goodput_ratio")
    if args.server_url is None and (args.token or args.control_url or args.read_token):
        raise ConfigError("--token, --control-url and --read-token go with --server-url",
                          field="server_url")
    if args.replicas < 1 or (args.replicas > 1 and args.store != "postgres"):
        raise ConfigError("--replicas: 1, or more with --store postgres", field="replicas")
    if args.kill_replica_every is not None:
        if args.replicas < 2:
            raise ConfigError("--kill-replica-every needs --replicas 2 or more (with one "
                              "replica use --kill-server-every)", field="kill_replica_every")
        if args.kill_server_every is not None:
            raise ConfigError("--kill-replica-every and --kill-server-every: choose one",
                              field="kill_replica_every")
    if args.store == "postgres" and args.server_url is not None:
        raise ConfigError("--store postgres starts its own replicas: not with --server-url",
                          field="store")
    if args.soak is not None:
        if args.in_process or args.compare or args.server_url:
            raise ConfigError("--soak samples processes it starts: not with --in-process, "
                              "--compare or --server-url", field="soak")
        if args.rate < 0:
            raise ConfigError("--rate must be >= 0 (with --soak, 0 = one event per second)",
                              field="rate")


def soak_settings(args: argparse.Namespace) -> SoakSettings | None:
    if args.soak is None:
        return None
    return SoakSettings(duration_s=parse_duration(args.soak),
                        sample_every_s=args.soak_sample_every, warmup_s=args.soak_warmup,
                        fault_every_s=args.soak_fault_every,
                        max_rss_growth=args.max_rss_growth, max_fd_growth=args.max_fd_growth,
                        max_task_growth=args.max_task_growth)


def settings_for(args: argparse.Namespace, profile: Profile, workdir: Path,
                 workload: WorkloadSpec, soak: SoakSettings | None = None) -> SimSettings:
    kill_sensors = (args.kill_sensors_every if args.kill_sensors_every is not None
                    else profile.kill_sensors_every_s)
    kill_server = (args.kill_server_every if args.kill_server_every is not None
                   else profile.kill_server_every_s)
    if args.kill_replica_every is not None:  # a replica set's "server kill" is one replica
        kill_server = args.kill_replica_every
    if args.server_url is not None and args.kill_server_every is None:
        kill_server = 0.0  # an existing server is never killed: the profile's period is moot
    if args.in_process and args.kill_sensors_every is None:
        kill_sensors = 0.0
    fleet = FleetOptions(sensors=args.sensors, workdir=workdir, seed=args.seed,
                         in_process=args.in_process, shared_proxies=args.shared_proxies,
                         server_url=args.server_url, control_url=args.control_url,
                         token=args.token, read_token=args.read_token,
                         server_module=args.server_module,
                         capabilities=_capabilities(args.capabilities),
                         sensor_metrics=soak is not None, replicas=args.replicas,
                         store=args.store, dsn=args.dsn)
    parameters = {
        "profile": dataclasses.asdict(profile), "set": list(args.set),
        "event_size": args.event_size, "interval_s": workload.interval_s,
        "kill_sensors_every_s": kill_sensors, "kill_server_every_s": kill_server,
        "faults_for_s": args.faults_for, "kill_fraction": args.kill_fraction,
        "restart_delay_s": args.restart_delay, "replicas": args.replicas,
        "store": args.store, "kill_replica_every_s": args.kill_replica_every,
        "shared_proxies": args.shared_proxies, "server_module": args.server_module,
        "capabilities": list(fleet.capabilities or DEFAULT_CAPABILITIES)}
    return SimSettings(profile=profile, workload=workload, fleet=fleet,
                       kill_sensors_every_s=kill_sensors, kill_server_every_s=kill_server,
                       kill_fraction=args.kill_fraction, restart_delay_s=args.restart_delay,
                       drain_timeout_s=args.drain_timeout, settle_s=args.settle,
                       faults_for_s=args.faults_for,
                       parameters=parameters, soak=soak)


def _capabilities(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    caps = tuple(c.strip() for c in text.split(",") if c.strip())
    if not caps:
        raise ConfigError("--capabilities: give at least one capability", field="capabilities")
    return caps


def _workdir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The work directory and whether this run created it (then it may be removed)."""
    if args.workdir is None:
        return Path(tempfile.mkdtemp(prefix="pipeline-sim-")), True
    path = Path(args.workdir).resolve()
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"--workdir {path} is not empty (a previous run's queues and "
                          "database would be mixed in)", field="workdir")
    path.mkdir(parents=True, exist_ok=True)
    return path, False


def _progress(quiet: bool) -> Any:
    if quiet:
        return None

    def write(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return write


async def _run_all(runs: list[SimSettings], quiet: bool) -> list[Report]:
    """The runs in order; SIGTERM cancels them like Ctrl-C (every process is stopped)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    handled = False
    if task is not None:
        try:
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
            handled = True
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        return [await Simulation(settings, _progress(quiet)).run() for settings in runs]
    finally:
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        # "target unreachable" is what a killed server looks like from the proxy: expected.
        logging.getLogger("pipeline.sim.proxy").setLevel(logging.ERROR)
    if args.list_profiles:
        sys.stdout.write(profiles_table())
        return EXIT_OK
    try:
        _check_args(args)
        profile = _profile(args.profile, args.set)
        duration = args.duration if args.duration is not None else profile.duration_hint_s
        soak = soak_settings(args)
        events, rate = args.events, args.rate
        if soak is not None:
            rate = args.rate or 1.0  # a soak is paced: "as fast as possible" ends at once
            events = max(1, math.ceil(rate * soak.duration_s))
            duration = soak.duration_s
        workload = WorkloadSpec.paced(events, SizeSpec.parse(args.event_size),
                                      rate=rate, duration_s=duration, seed=args.seed)
        workdir, created = _workdir(args)
    except ConfigError as exc:
        sys.stderr.write(f"pipeline-sim: {exc.message}\n")
        return EXIT_USAGE
    try:
        runs = []
        if args.compare is not None:
            runs.append(settings_for(args, get_profile(args.compare),
                                     workdir / f"baseline-{args.compare}", workload))
        runs.append(settings_for(args, profile, workdir / f"run-{profile.name}", workload,
                                 soak))
        reports = asyncio.run(_run_all(runs, args.quiet))
    except ConfigError as exc:
        sys.stderr.write(f"pipeline-sim: {exc.message}\n")
        return EXIT_USAGE
    except (ProcessError, PipelineError, OSError) as exc:
        sys.stderr.write(f"pipeline-sim: harness failure: {exc}\nworkdir kept: {workdir}\n")
        return EXIT_HARNESS
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.stderr.write(f"pipeline-sim: interrupted; workdir kept: {workdir}\n")
        return 130
    return _finish(args, reports, workdir, created)


def _finish(args: argparse.Namespace, reports: list[Report], workdir: Path,
            created: bool) -> int:
    run = reports[-1]
    baseline = reports[0] if len(reports) > 1 else None
    ok = all(r.ok for r in reports)
    out = [format_report(r) for r in reports]
    doc: dict[str, Any] = run.to_json()
    if baseline is not None:
        ratio = goodput_ratio(run, baseline)
        out.append(format_comparison(run, baseline))
        doc = {"run": run.to_json(), "baseline": baseline.to_json(), "goodput_ratio": ratio,
               "ok": ok}
        if args.min_goodput_ratio is not None:
            met = ratio is not None and ratio >= args.min_goodput_ratio
            doc["min_goodput_ratio"] = args.min_goodput_ratio
            doc["goodput_ratio_met"] = met
            ok = ok and met
            doc["ok"] = ok
    sys.stdout.write("\n".join(out))
    sys.stdout.flush()
    if args.report:
        Path(args.report).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if ok and created and not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        sys.stderr.write(f"pipeline-sim: workdir {workdir}\n")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
