"""``pipeline-server``: the command line (also ``python -m pipeline.server``).

::

    pipeline-server [--config server.yml]     serve until SIGTERM / SIGINT
    pipeline-server token create SENSOR_ID    mint a sensor token and its config entry

Without ``--config`` the server runs on embedded defaults (SQLite under ``./var/``, loopback
binds) and, unless the environment configures credentials, generates a demo fleet token
that is printed once to stdout as ``demo token: oux_demo_<base64url>``. Stdout carries only
such deliberate output; logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Sequence, TextIO

from pipeline.common.config import ServerConfig, load_server_config
from pipeline.common.errors import ConfigError, PipelineError
from pipeline.common.logs import setup_logging
from pipeline.common.messages import SENSOR_ID_RE
from pipeline.server.auth import DEMO_TOKEN_PREFIX, hash_token, mint_token

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
    return parser


def token_create(sensor_id: str, out: TextIO) -> int:
    if not SENSOR_ID_RE.fullmatch(sensor_id):
        sys.stderr.write(f"pipeline-server: invalid sensor id {sensor_id[:140]!r}\n")
        return EXIT_CONFIG
    token = mint_token()
    out.write(f"token: {token}\n\n"
              "# server.yml (auth.sensors); the file keeps only the hash:\n"
              f"- id: {sensor_id}\n"
              f"  token_sha256: {hash_token(token)}\n")
    return 0


def with_demo_token(config: ServerConfig) -> tuple[ServerConfig, str | None]:
    """Add a generated fleet token unless credentials are already configured."""
    auth = config.auth
    if auth.sensors or auth.fleet_token or auth.fleet_token_sha256:
        return config, None
    token = mint_token(DEMO_TOKEN_PREFIX)
    return dataclasses.replace(config, auth=dataclasses.replace(auth, fleet_token=token)), token


async def serve(config: ServerConfig, demo_token: str | None, out: TextIO) -> None:
    from pipeline.server.app import PipelineServer  # heavy imports only when serving

    server = PipelineServer(config)

    def announce() -> None:
        if demo_token is not None:
            out.write(f"demo token: {demo_token}\n")
        out.write(f"dashboard: http://{config.ingest.bind}:{server.ingest_port}/\n")
        out.flush()

    await server.run_forever(on_started=announce)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    stdout = out or sys.stdout
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return token_create(args.sensor_id, stdout)
    try:
        config = load_server_config(args.config)
        demo_token = None
        if args.config is None:
            config, demo_token = with_demo_token(config)
        setup_logging(config.logging.level, config.logging.format)
        asyncio.run(serve(config, demo_token, stdout))
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
