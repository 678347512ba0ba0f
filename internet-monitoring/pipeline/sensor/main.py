"""``pipeline-sensor``: run the sensor agent, or submit one event to its queue.

::

    pipeline-sensor run    --config sensor.yml
    pipeline-sensor submit --config sensor.yml [FILE|-] [--attr key=value ...]
    pipeline-sensor check-config FILE [--tls-dir DIR]   validate without starting (0 or 2)
    pipeline-sensor health --config sensor.yml          GET the agent's /healthz (0 or 1)
    pipeline-sensor backup --config sensor.yml DEST     online copy of the queue file

``run`` stops gracefully on SIGTERM or SIGINT: running POSTs get a short grace period,
retries waiting on backoff are abandoned (their chunks stay queued), the queue is closed.
SIGHUP re-reads the file and takes over the token and the TLS files (the control channel
reconnects with them); other changed keys are logged as needing a restart.
``submit`` prints the new event id on stdout. A configuration problem exits with status 2
and a message naming the key (also a ``token_file`` that cannot be read when no ``token``
is set); a queue that cannot be opened, or that another agent already runs on (its
``<queue>.lock`` is held), exits with status 1. ``submit`` takes no lock: test programs
submit while the agent runs. A ``submit`` refused because the queue's disk is full exits
with 75 (EX_TEMPFAIL: try again later, docs/reliability-disk.md).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from pipeline.common.errors import ConfigError, PipelineError, QueueFull
from pipeline.common.instance_lock import InstanceLock
from pipeline.common.logs import setup_logging
from pipeline.common.placeholders import is_placeholder
from pipeline.version import SOFTWARE_VERSION

if TYPE_CHECKING:
    from pipeline.common.config import SensorConfig
    from pipeline.sensor.agent import SensorAgent

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_TEMPFAIL = 75  # sysexits EX_TEMPFAIL: the disk is full for now; submit again later


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline-sensor",
        description="Open UXI pipeline sensor: durable queue, control channel, chunk upload.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {SOFTWARE_VERSION}")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), type=str.upper)
    parser.add_argument("--log-format", default="kv", choices=("kv", "json"))
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent until SIGTERM/SIGINT")
    run.add_argument("--config", "-c", type=Path, default=None,
                     help="sensor YAML file (default: environment variables only)")

    submit = commands.add_parser("submit", help="enqueue one event; prints its id")
    submit.add_argument("--config", "-c", type=Path, default=None,
                        help="sensor YAML file (default: environment variables only)")
    submit.add_argument("file", nargs="?", default="-",
                        help="file holding the event, or - for standard input (default)")
    submit.add_argument("--attr", "-a", action="append", default=[], metavar="KEY=VALUE",
                        help="an attribute of the event (repeatable)")

    check = commands.add_parser("check-config", help="validate a configuration; exit 0 or 2")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--tls-dir", metavar="DIR",
                       help="where the files the config names under /tls/ are on this host")

    health = commands.add_parser("health", help="GET the running agent's /healthz")
    health.add_argument("--config", "-c", type=Path, default=None)
    health.add_argument("--url", help="health URL (default: metrics.listen of the config)")

    backup = commands.add_parser("backup", help="online copy of the queue file")
    backup.add_argument("--config", "-c", type=Path, default=None)
    backup.add_argument("destination", metavar="DEST")
    return parser


def check_config(args: argparse.Namespace) -> int:
    from pipeline.common.config import SensorConfig, load_sensor_config
    from pipeline.common.config_check import check_config_command

    return check_config_command(args.file, args.tls_dir, sys.stdout, sys.stderr,
                                "pipeline-sensor", load_sensor_config, SensorConfig)


def health(args: argparse.Namespace) -> int:
    from pipeline.common.config import load_sensor_config
    from pipeline.common.health_probe import local_url, probe
    from pipeline.sensor.metrics import HEALTH_PATH, parse_listen

    url = args.url
    if not url:
        listen = load_sensor_config(args.config).metrics.listen
        if not listen:
            raise ConfigError("metrics.listen: the health endpoint needs a listen address, "
                              "e.g. 127.0.0.1:9119", field="metrics.listen")
        host, port = parse_listen(listen)
        url = local_url("http", host, port, HEALTH_PATH)
    return probe(url, sys.stdout)


def backup(args: argparse.Namespace) -> int:
    from pipeline.common.backup import backup_sqlite
    from pipeline.common.config import load_sensor_config

    path = load_sensor_config(args.config).queue.path
    pages = backup_sqlite(path, args.destination)
    sys.stdout.write(f"backup: {path} -> {args.destination} ({pages} pages)\n")
    return EXIT_OK


def _parse_attrs(items: Sequence[str]) -> dict[str, str]:
    attrs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--attr expects KEY=VALUE, got {item!r}", field="--attr")
        attrs[key] = value
    return attrs


def _read_event(source: str) -> bytes:
    if source == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read event file {source}: {exc.strerror or exc}",
                          field="file") from exc


def check_token_source(config: SensorConfig) -> None:
    """Fail at start-up on a credential the agent could never use, instead of retrying a
    401 for ever; warn on a placeholder. A ``token_file`` that cannot be read is fatal
    unless ``token`` is set too (then ``token`` is used until a rotation writes the file)."""
    token = config.token
    if config.token_file:
        try:
            token = Path(config.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            if not config.token:
                raise ConfigError(f"token_file {config.token_file}: cannot read it "
                                  f"({exc.strerror or exc})", field="token_file") from exc
            log.warning("token_file_missing key=token_file path=%s error=%s action=use_token",
                        config.token_file, exc.strerror or exc)
            token = config.token
        else:
            if not token and not config.token:
                raise ConfigError(f"token_file {config.token_file}: the file is empty",
                                  field="token_file")
            token = token or config.token
    if is_placeholder(token):
        log.warning("placeholder_token key=%s sensor_id=%s message=%r",
                    "token_file" if config.token_file and token != config.token else "token",
                    config.sensor_id, "the token is an example placeholder (change-me...): "
                    "create a real one with pipeline-server token create")


def _make_parent(path: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"queue.path {path}: cannot create directory: "
                          f"{exc.strerror or exc}", field="queue.path") from exc


async def run_agent(config_path: Path | None) -> int:
    """Load the config, lock and open the queue, run the agent until a signal; returns an
    exit code."""
    from pipeline.common.config import load_sensor_config

    config = load_sensor_config(config_path)
    check_token_source(config)
    if config_path is not None:
        _check_start_up(config, config_path)
    lock = InstanceLock(config.queue.path, "queue.path")
    _make_parent(config.queue.path)
    lock.acquire()
    try:
        return await _run_locked(config, config_path)
    finally:
        lock.release()


async def _run_locked(config: SensorConfig, config_path: Path | None) -> int:
    from pipeline.sensor.agent import SensorAgent
    from pipeline.sensor.submit import open_queue

    queue = await asyncio.to_thread(functools.partial(open_queue, config,
                                                      open_with_reserve=True))
    try:
        agent = SensorAgent(config, queue)
        loop = asyncio.get_running_loop()
        installed = []
        handlers = ((signal.SIGTERM, _on_signal, (agent, signal.SIGTERM)),
                    (signal.SIGINT, _on_signal, (agent, signal.SIGINT)),
                    (signal.SIGHUP, _on_hangup, (agent, config_path)))
        for signum, handler, handler_args in handlers:
            try:
                loop.add_signal_handler(signum, handler, *handler_args)
                installed.append(signum)
            except (NotImplementedError, RuntimeError):  # not the main thread / platform
                log.debug("signal_handler_unavailable signal=%s", signum)
        try:
            await agent.run()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
    finally:
        queue.close()
    return EXIT_OK


def _check_start_up(config: Any, path: Path) -> None:
    """Enabled TLS files must exist; platform keys this agent ignores are logged once."""
    from pipeline.common.config import SensorConfig
    from pipeline.common.config_check import check_tls_files, read_document, report_ignored

    check_tls_files(config)
    report_ignored(SensorConfig, read_document(path), "sensor")


def _on_hangup(agent: SensorAgent, config_path: Path | None) -> None:
    """SIGHUP: re-read the file; a bad file is logged and the running config kept."""
    from pipeline.common.config import load_sensor_config

    log.info("sensor_reload_requested signal=SIGHUP")
    try:
        fresh = load_sensor_config(config_path)
        check_token_source(fresh)
        if config_path is not None:
            _check_start_up(fresh, config_path)
        agent.reload_credentials(fresh)
    except ConfigError as exc:
        log.error("sensor_reload_failed key=%s message=%s", exc.field or "-", exc.message)


def _on_signal(agent: SensorAgent, signum: int) -> None:
    log.info("sensor_stopping signal=%s", signal.Signals(signum).name)
    agent.stop()


def submit_command(config_path: Path | None, source: str, attr_items: Sequence[str]) -> int:
    """Enqueue one event from FILE or stdin and print its id."""
    from pipeline.common.config import load_sensor_config
    from pipeline.sensor.submit import submit_event

    attrs = _parse_attrs(attr_items)
    config = load_sensor_config(config_path)
    data = _read_event(source)
    event_id = submit_event(config, data, attributes=attrs)
    sys.stdout.write(event_id + "\n")
    sys.stdout.flush()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        if args.command == "run":
            return asyncio.run(run_agent(args.config))
        if args.command == "check-config":
            return check_config(args)
        if args.command == "health":
            return health(args)
        if args.command == "backup":
            return backup(args)
        return submit_command(args.config, args.file, args.attr)
    except ConfigError as exc:
        log.error("config_error key=%s message=%s", exc.field or "-", exc.message)
        sys.stderr.write(f"pipeline-sensor: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    except QueueFull as exc:
        sys.stderr.write(f"pipeline-sensor: {exc.message}\n")
        return EXIT_TEMPFAIL
    except PipelineError as exc:
        log.error("sensor_failed error=%s message=%s", exc.code, exc.message)
        sys.stderr.write(f"pipeline-sensor: {exc.message}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
