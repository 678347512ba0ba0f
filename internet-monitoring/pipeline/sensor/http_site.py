"""Binding the agent's small HTTP listeners (``metrics.listen``,
``sources.remote_write.listen``): start an aiohttp runner on host:port, a failure to bind
being a ConfigError that names the config key, and the port it got (port 0 picks one)."""

from __future__ import annotations

from aiohttp import web

from pipeline.common.errors import ConfigError


async def start_site(runner: web.AppRunner, host: str, port: int, key: str) -> None:
    """Set ``runner`` up and listen on ``host:port``; on a bind failure the runner is
    cleaned up and ConfigError names ``key``."""
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"{key} {host}:{port}: cannot bind: {exc.strerror or exc}",
                          field=key) from exc


def bound_port(runner: web.AppRunner | None) -> int | None:
    """The port ``runner`` listens on; None before it started or after it closed."""
    if runner is None or not runner.addresses:
        return None
    return int(runner.addresses[0][1])
