"""``pipeline-server``: the command line (also ``python -m pipeline.server``).

::

    pipeline-server [--config server.yml]     serve until SIGTERM / SIGINT; SIGHUP reloads
    pipeline-server token create SENSOR_ID [--add-to server.yml]
                                              mint a sensor token; print its config entry,
                                              or write the entry (hash only) into the file
                                              and print just the token
    pipeline-server check-config FILE [--tls-dir DIR]
                                              validate without starting (exit 0 or 2)
    pipeline-server health [--config FILE] [--url URL]
                                              GET /readyz of the local server (exit 0 or 1)
    pipeline-server backup [--config FILE] DEST
                                              online copy of the SQLite store to DEST
    pipeline-server [--config server.yml] token rotate SENSOR_ID [--url URL]
                                              rotate a connected sensor's token through the
                                              running server (admin token from
                                              PIPELINE_ADMIN_TOKEN; docs/security.md)

Without ``--config`` the server runs on embedded defaults (SQLite under ``./var/``, loopback
binds) and, unless the environment configures credentials, generates a demo fleet token
that is printed once to stdout as ``demo token: oux_demo_<base64url>``. Stdout carries only
such deliberate output; logs go to stderr.

Serving takes the store's single-instance lock (``<store.path>.lock``): a second server on
the same SQLite file exits 1 naming the file and the running server's pid. Start-up warns
about placeholder credentials (``change-me…``) and, outside the demo, an open read API.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from pipeline.common.config import ServerConfig, load_server_config
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.common.instance_lock import InstanceLock
from pipeline.common.logs import setup_logging
from pipeline.common.placeholders import placeholder_keys
from pipeline.common.messages import SENSOR_ID_RE
from pipeline.server.security.auth import DEMO_TOKEN_PREFIX, hash_token, mint_token
from pipeline.server.workers import is_worker, supervise

log = logging.getLogger("pipeline.server.main")

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline-server",
                                     description="Open UXI pipeline server")
    parser.add_argument("--config", metavar="FILE", help="server YAML configuration")
    sub = parser.add_subparsers(dest="command")
    token = sub.add_parser("token", help="manage sensor tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="mint a token for a sensor")
    create.add_argument("sensor_id")
    create.add_argument("--add-to", metavar="SERVER_YML",
                        help="write the entry (token_sha256) into this server config and "
                             "print only the token")
    rotate = token_sub.add_parser(
        "rotate", help="rotate a connected sensor's token through the running server")
    rotate.add_argument("sensor_id")
    rotate.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="server YAML configuration (finds the ingest listener)")
    rotate.add_argument("--url", help="ingest base URL (default: from the configuration)")
    rotate.add_argument("--overlap-s", type=float, default=None,
                        help="how long the old token stays valid (default: "
                             "auth.rotation_overlap_s)")
    rotate.add_argument("--admin-token-file", help="file holding the admin token "
                                                   "(default: $PIPELINE_ADMIN_TOKEN)")
    rotate.add_argument("--cafile", help="CA bundle to verify an https ingest listener")
    rotate.add_argument("--cert", help="client certificate (mTLS ingest listener)")
    rotate.add_argument("--key", help="client key (mTLS ingest listener)")
    check = sub.add_parser("check-config", help="validate a configuration without starting")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--tls-dir", metavar="DIR",
                       help="where the files the config names under /tls/ are on this host")
    health = sub.add_parser("health", help="GET /readyz of the local server (exit 0 or 1)")
    health.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS)
    health.add_argument("--url", help="readiness URL (default: from the configuration)")
    backup = sub.add_parser("backup", help="online copy of the SQLite store")
    backup.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS)
    backup.add_argument("destination", metavar="DEST")
    return parser


def check_config(args: argparse.Namespace, out: TextIO) -> int:
    from pipeline.common.config_check import check_config_command

    return check_config_command(args.file, args.tls_dir, out, sys.stderr, "pipeline-server",
                                load_server_config, ServerConfig)


def health(args: argparse.Namespace, out: TextIO) -> int:
    from pipeline.common.health_probe import local_url, probe

    url = args.url
    if not url:
        try:
            ingest = load_server_config(getattr(args, "config", None)).ingest
        except ConfigError as exc:
            sys.stderr.write(f"pipeline-server: configuration error: {exc.message}\n")
            return EXIT_CONFIG
        scheme = "https" if ingest.tls.enabled else "http"
        url = local_url(scheme, ingest.bind, ingest.port, "/readyz")
    return probe(url, out)


def backup(args: argparse.Namespace, out: TextIO) -> int:
    from pipeline.common.backup import backup_sqlite

    try:
        store = load_server_config(getattr(args, "config", None)).store
        if store.engine != "sqlite":
            raise ConfigError("store.engine: backup copies SQLite stores; back PostgreSQL "
                              "up with pg_dump", field="store.engine")
        pages = backup_sqlite(store.path, args.destination)
    except ConfigError as exc:
        sys.stderr.write(f"pipeline-server: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    except PipelineError as exc:
        sys.stderr.write(f"pipeline-server: {exc.message}\n")
        return EXIT_FAILURE
    out.write(f"backup: {store.path} -> {args.destination} ({pages} pages)\n")
    return 0


def token_rotate(args: argparse.Namespace, out: TextIO) -> int:
    """Ask the running server to rotate ``args.sensor_id``; prints the (secret-free) answer."""
    from pipeline.server.security.admin_client import (
        ingest_base_url,
        post_admin,
        read_admin_token,
        rotate_url,
    )

    if not SENSOR_ID_RE.fullmatch(args.sensor_id):
        sys.stderr.write(f"pipeline-server: invalid sensor id {args.sensor_id[:140]!r}\n")
        return EXIT_CONFIG
    try:
        base = args.url or ingest_base_url(load_server_config(getattr(args, "config", None)))
        token = read_admin_token(args.admin_token_file)
        body = {} if args.overlap_s is None else {"overlap_s": args.overlap_s}
        answer = post_admin(rotate_url(base, args.sensor_id), token, body, cafile=args.cafile,
                            cert=args.cert, key=args.key)
    except ConfigError as exc:
        sys.stderr.write(f"pipeline-server: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    except ConnectionError as exc:
        sys.stderr.write(f"pipeline-server: {exc}\n")
        return EXIT_FAILURE
    out.write(json.dumps({"status": answer.status, **answer.doc}, sort_keys=True) + "\n")
    if answer.status != 200:
        sys.stderr.write(f"pipeline-server: rotation not confirmed (HTTP {answer.status}): "
                         f"{answer.doc.get('message', '')}\n")
        return EXIT_FAILURE
    return 0


def token_create(sensor_id: str, out: TextIO, add_to: str | None = None) -> int:
    if not SENSOR_ID_RE.fullmatch(sensor_id):
        sys.stderr.write(f"pipeline-server: invalid sensor id {sensor_id[:140]!r}\n")
        return EXIT_CONFIG
    token = mint_token()
    if add_to is not None:
        return _token_add_to(sensor_id, token, add_to, out)
    out.write(f"token: {token}\n\n"
              "# server.yml (auth.sensors); the file keeps only the hash:\n"
              f"- id: {sensor_id}\n"
              f"  token_sha256: {hash_token(token)}\n")
    return 0


def _token_add_to(sensor_id: str, token: str, path: str, out: TextIO) -> int:
    """Write the hash into ``path``; stdout gets the token alone (``> pi-01.token``)."""
    from pipeline.server.security.config_edit import add_sensor_token

    try:
        added = add_sensor_token(path, sensor_id, token)
    except ConfigError as exc:
        sys.stderr.write(f"pipeline-server: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    out.write(token + "\n")
    out.flush()
    removed = (f"; removed placeholders {', '.join(added.removed_placeholders)}"
               if added.removed_placeholders else "")
    what = "added sensor" if added.new_entry else "added a token for"
    sys.stderr.write(f"pipeline-server: {what} {sensor_id} to {path} ({added.key}, the hash "
                     f"only{removed}). The token is printed once, on stdout: give it to the "
                     "sensor (token_file or"
                     " PIPELINE_SENSOR_TOKEN). A running server picks the change up"
                     " (auth.reload_watch_s, or SIGHUP).\n")
    return 0


def check_start_up(config: ServerConfig, path: str) -> None:
    """Start-up only: enabled TLS files must exist; ignored platform keys logged once."""
    from pipeline.common.config_check import check_tls_files, read_document, report_ignored

    check_tls_files(config)
    report_ignored(ServerConfig, read_document(path), "server")


def with_demo_token(config: ServerConfig) -> tuple[ServerConfig, str | None]:
    """Add a generated fleet token unless credentials are already configured."""
    auth = config.auth
    if auth.sensors or auth.fleet_token or auth.fleet_token_sha256:
        return config, None
    token = mint_token(DEMO_TOKEN_PREFIX)
    return dataclasses.replace(config, auth=dataclasses.replace(auth, fleet_token=token)), token


def is_demo(config: ServerConfig, demo_token: str | None) -> bool:
    """The demo: ``pipeline-server`` without ``--config`` or ``make demo``, both of which
    mint a ``oux_demo_`` fleet token (nothing to protect but synthetic results)."""
    return demo_token is not None or config.auth.fleet_token.startswith(DEMO_TOKEN_PREFIX)


def warn_at_start_up(config: ServerConfig, *, demo: bool) -> None:
    """Log what a deployment must not run with but the server can still serve."""
    for key in placeholder_keys(config.auth, config.stream.token):
        log.warning("placeholder_token key=%s message=%r", key,
                    "an example placeholder (change-me...) is accepted as a credential: "
                    "replace it (pipeline-server token create ID --add-to FILE)")
    if not demo and not config.stream.token:
        log.warning("read_api_open key=stream.token bind=%s message=%r", config.ingest.bind,
                    "anyone who reaches the ingest listener can read every result and the "
                    "UI stream: set stream.token (or PIPELINE_STREAM_TOKEN)")


@contextmanager
def store_lock(config: ServerConfig) -> Iterator[None]:
    """One server per SQLite store file (``<store.path>.lock``); PostgreSQL needs none."""
    if config.store.engine != "sqlite":
        yield
        return
    path = Path(config.store.path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"store.path: cannot create {path.parent}: {exc.strerror}",
                          field="store.path") from exc
    with InstanceLock(path, "store.path"):
        yield


async def serve(config: ServerConfig, demo_token: str | None, out: TextIO,
                config_path: str | None = None) -> None:
    from pipeline.server.app import PipelineServer  # heavy imports only when serving

    def reload_config() -> ServerConfig:
        """SIGHUP / file watch: the file and environment again (the demo token stays)."""
        fresh = load_server_config(config_path)
        if config_path is not None:
            check_start_up(fresh, config_path)
        auth = fresh.auth
        if demo_token is not None and not (auth.sensors or auth.fleet_token
                                           or auth.fleet_token_sha256):
            fresh = dataclasses.replace(fresh, auth=dataclasses.replace(
                auth, fleet_token=demo_token))
        return fresh

    server = PipelineServer(config, config_loader=reload_config, config_path=config_path)

    def announce() -> None:
        from pipeline.server.tuning import tune_gc

        tune_gc()  # this process only: embedders and tests keep the defaults
        if demo_token is not None:
            out.write(f"demo token: {demo_token}\n")
        out.write(f"dashboard: http://{config.ingest.bind}:{server.ingest_port}/\n")
        out.flush()

    await server.run_forever(on_started=announce)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    args = build_parser().parse_args(argv)
    if args.command == "token":
        if args.token_command == "rotate":
            return token_rotate(args, stdout)
        return token_create(args.sensor_id, stdout, args.add_to)
    commands = {"check-config": check_config, "health": health, "backup": backup}
    if args.command in commands:
        setup_logging("INFO" if args.command == "backup" else "WARNING", "kv")
        return commands[args.command](args, stdout)
    try:
        config = load_server_config(args.config)
        demo_token = None
        if args.config is None:
            config, demo_token = with_demo_token(config)
        setup_logging(config.logging.level, config.logging.format)
        warn_at_start_up(config, demo=is_demo(config, demo_token))
        if args.config is not None:
            check_start_up(config, args.config)
        if config.server.workers > 1 and not is_worker():
            if demo_token is not None:
                stdout.write(f"demo token: {demo_token}\n")
                stdout.flush()
            return supervise(config, args.config, demo_token)
        with store_lock(config):
            asyncio.run(serve(config, None if is_worker() else demo_token, stdout,
                              args.config))
    except ConfigError as exc:
        sys.stderr.write(f"pipeline-server: configuration error: {exc.message}\n")
        return EXIT_CONFIG
    except PipelineError as exc:  # e.g. the store cannot be opened
        sys.stderr.write(f"pipeline-server: {exc.code}: {exc.message}\n")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
