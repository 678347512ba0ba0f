"""``POST /api/v1/write``: Prometheus remote write 1.0 into the sensor's queue.

The thin HTTP shell around ``common/remote_write.decode`` (every check, no I/O) and the
``GroupCommitter`` (durable queueing). Answers::

    204  the samples are committed (fsynced) in the queue
    400  not a remote-write 1.0 request; the JSON body says why (Prometheus drops it)
    413  body over sources.remote_write.max_body_bytes, or announcing more than
         max_decompressed_bytes once decompressed (Prometheus drops it)
    503  the queue cannot take it now (disk full, queue error, agent stopping), with
         Retry-After: Prometheus 2.42 retries every 5xx with backoff (429 only when its
         queue_config sets retry_on_http_429), so nothing is lost

The endpoint has no authentication: the configuration refuses a listen address that is
not loopback unless ``sources.remote_write.allow_remote`` is true.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from pipeline.common.config.sources_schema import RemoteWriteSourceConfig, is_loopback_host
from pipeline.common.errors import ConfigError, PayloadTooLarge, PipelineError, QueueError
from pipeline.common.remote_write import (
    DecodedWrite,
    RemoteWriteMalformed,
    check_headers,
    decode,
)
from pipeline.sensor.group_commit import GroupCommitter
from pipeline.sensor.http_site import bound_port, start_site
from pipeline.sensor.metrics import parse_listen

log = logging.getLogger(__name__)

WRITE_PATH = "/api/v1/write"
KEY = "sources.remote_write.listen"

#: Outcomes counted in ``sensor_remote_write_requests_total{outcome}``.
OUTCOMES = ("accepted", "malformed", "too_large", "unavailable")


@dataclass(frozen=True)
class Refusal:
    """A request answered without queueing anything."""

    status: int
    outcome: str
    code: str
    message: str
    retry_after: int | None = None

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        return web.json_response({"error": self.code, "message": self.message},
                                 status=self.status, headers=headers)


def refusal_for(exc: PipelineError, retry_after: int) -> Refusal:
    """How a failed request is answered (pure: unit-tested without sockets)."""
    if isinstance(exc, PayloadTooLarge) or exc.http_status == 413:
        return Refusal(413, "too_large", exc.code, exc.message)
    if isinstance(exc, QueueError):
        return Refusal(503, "unavailable", exc.code, exc.message, retry_after)
    if isinstance(exc, RemoteWriteMalformed) or 400 <= exc.http_status < 500:
        return Refusal(400, "malformed", exc.code, exc.message)
    return Refusal(503, "unavailable", exc.code, exc.message, retry_after)


class RemoteWriteServer:
    """The receiver on ``sources.remote_write.listen`` (port 0 picks a free port)."""

    def __init__(self, settings: RemoteWriteSourceConfig, committer: GroupCommitter) -> None:
        self._settings = settings
        self._committer = committer
        self._host, self._port = parse_listen(settings.listen)
        self._runner: web.AppRunner | None = None
        self.outcomes: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self.samples = 0
        self.series = 0

    @property
    def port(self) -> int | None:
        return bound_port(self._runner)

    async def start(self) -> None:
        if not (self._settings.allow_remote or is_loopback_host(self._host)):
            raise ConfigError(f"{KEY}: {self._host} is not loopback (set "
                              "sources.remote_write.allow_remote: true)", field=KEY)
        # The body cap is enforced while reading (aiohttp stops at client_max_size).
        app = web.Application(client_max_size=self._settings.max_body_bytes)
        app.router.add_post(WRITE_PATH, self._handle)
        # auto_decompress off: a gzip/deflate body is refused by its header, never inflated.
        runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await start_site(runner, self._host, self._port, KEY)
        self._runner = runner
        log.info("remote_write_listening host=%s port=%s path=%s", self._host, self.port,
                 WRITE_PATH)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            decoded = await self._read(request)
            if decoded.series:  # metadata only: nothing the pipeline keeps
                await self._committer.write(decoded.raw)
        except PipelineError as exc:
            return self._refuse(refusal_for(exc, self._settings.retry_after_s))
        self.outcomes["accepted"] += 1
        self.samples += decoded.samples
        self.series += decoded.series
        return web.Response(status=204)

    async def _read(self, request: web.Request) -> DecodedWrite:
        content_type = request.headers.get("Content-Type")
        content_encoding = request.headers.get("Content-Encoding")
        check_headers(content_type, content_encoding)
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"body of {request.content_length} bytes is over the limit"
                                  f" of {limit} (sources.remote_write.max_body_bytes)")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes "
                                  "(sources.remote_write.max_body_bytes)") from exc
        except (web.HTTPException, aiohttp.ClientPayloadError, ValueError) as exc:
            raise RemoteWriteMalformed(f"body could not be read: {exc}") from exc
        return decode(body, content_type=content_type, content_encoding=content_encoding,
                      max_bytes=self._settings.max_decompressed_bytes)

    def _refuse(self, refusal: Refusal) -> web.Response:
        self.outcomes[refusal.outcome] += 1
        level = logging.WARNING if refusal.status < 500 else logging.ERROR
        log.log(level, "remote_write_refused status=%d error=%s message=%r", refusal.status,
                refusal.code, refusal.message[:300])
        return refusal.response()
