"""The sensor's network edges: the control WebSocket and the HTTP ingest client.

Thin aiohttp shells, no decisions: they encode, send, receive and decode, and translate
library errors at the boundary (endpoint URLs and TLS contexts: ``sensor/endpoints.py``).
The agent sees them only through the ``ControlTransport`` / ``ControlChannel`` /
``IngestTransport`` protocols, so tests and the simulator can wrap them (fault injection:
drop, delay, cut) without touching the agent.

Errors crossing these seams:

* network trouble (refused, reset, DNS, TLS handshake, timeouts) -> built-in
  ``ConnectionError`` / ``TimeoutError`` (retryable, see ``backoff.is_retryable``);
* a refused control handshake -> ``Unauthenticated`` (401) / ``Forbidden`` (403);
* an unreadable control frame -> a ``ProtocolError`` subclass; the channel stays usable;
* an HTTP answer, whatever its status, is *not* an error: ``PostResult`` carries it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping, Protocol, Self, Sequence

import aiohttp

from pipeline.common.aio import wait_event
from pipeline.common.errors import (
    FieldTypeError,
    Forbidden,
    ProtocolError,
    Unauthenticated,
)
from pipeline.common.batch import BatchOutcome, decode_batch_result, encode_batch
from pipeline.common.messages import (
    Chunk,
    Envelope,
    IngestResult,
    decode_envelope,
    encode_chunk,
    encode_envelope,
    ingest_result_from_json,
)
from pipeline.common.proto_codec import (
    PROTO_CONTENT_TYPE,
    decode_batch_result_proto,
    decode_envelope_proto,
    decode_ingest_result_proto,
    encode_batch_proto,
    encode_chunk_proto,
    encode_envelope_proto,
)
from pipeline.sensor.endpoints import (
    batch_endpoint,
    build_ssl_context,
    control_endpoint,
    ingest_endpoint,
)

log = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT_S = 10.0
MAX_CONTROL_FRAME = 4 * 1024 * 1024
_MAX_ERROR_BODY = 64 * 1024


# ---------------------------------------------------------------------------------------
# Seams


class ControlChannel(Protocol):
    """One open control connection."""

    @property
    def closed(self) -> bool: ...

    @property
    def close_code(self) -> int | None: ...

    #: The server's close reason (e.g. "credential revoked"), "" when none was given.
    close_reason: str

    def use_proto(self, *, send: bool, receive: bool) -> None:
        """Binary (Protobuf) frames: ``send`` them, accept them when ``receive``."""

    async def send(self, envelope: Envelope) -> None:
        """Send one envelope; ``ConnectionError`` when the channel is gone."""

    async def receive(self) -> Envelope | None:
        """The next envelope; None once the channel is closed. A frame that cannot be
        decoded raises a ``ProtocolError`` and the channel stays usable."""

    async def close(self) -> None: ...


class ControlTransport(Protocol):
    """Opens control connections (one at a time)."""

    async def connect(self) -> ControlChannel: ...

    def refresh_credentials(self, config: Any) -> None:
        """Use ``config``'s token and TLS files from the next connection on."""

    async def close(self) -> None: ...


class _ErrorBody:
    """The JSON error body of a refused POST, read the same way for one chunk or a batch."""

    error: Mapping[str, Any] | None

    @property
    def error_code(self) -> str:
        if self.error and isinstance(self.error.get("error"), str):
            return str(self.error["error"])[:64]
        return ""

    @property
    def error_message(self) -> str:
        """The server's reason (``message`` of the JSON error body), or ""."""
        if self.error and isinstance(self.error.get("message"), str):
            return str(self.error["message"])[:200]
        return ""


@dataclass(frozen=True)
class PostResult(_ErrorBody):
    """The server's answer to one chunk POST.

    ``result`` is the parsed 200 body (None if it could not be read); ``error`` the JSON
    error body of a non-2xx answer (``{"error": code, "message": ...}``) when there was one;
    ``retry_after`` the ``Retry-After`` header in seconds.
    """

    status: int
    result: IngestResult | None = None
    error: Mapping[str, Any] | None = None
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class BatchPostResult(_ErrorBody):
    """The server's answer to one batch POST (capability ``batch``).

    ``outcomes`` (200 only) answers the batch's chunks in order: an ``IngestResult`` or a
    ``ChunkRejection``; None when the answer could not be read (then nothing is known
    about any chunk). A non-200 answer concerns the whole batch: ``error`` and
    ``retry_after`` as in ``PostResult``.
    """

    status: int
    outcomes: tuple[BatchOutcome, ...] | None = None
    error: Mapping[str, Any] | None = None
    retry_after: float | None = None


class IngestTransport(Protocol):
    """Posts chunks to the data channel.

    ``post_chunk(chunk, proto=True)`` and ``post_batch(chunks, proto=...)`` are used only
    when both sides announced ``proto`` / ``batch``.
    """

    async def post_chunk(self, chunk: Chunk, *, proto: bool = False) -> PostResult:
        """One POST; network failures raise ``ConnectionError`` / ``TimeoutError``."""

    async def post_batch(self, chunks: Sequence[Chunk], *, proto: bool = True
                         ) -> BatchPostResult:
        """One batch POST (capability ``batch``); failures as for ``post_chunk``."""

    def refresh_credentials(self, config: Any) -> None:
        """Use ``config``'s token and TLS files from the next POST on."""

    async def close(self) -> None: ...


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:
        return None
    return min(max(seconds, 0.0), 3600.0)


# ---------------------------------------------------------------------------------------
# Control channel (aiohttp WebSocket)


class ControlConnection:
    """One open control WebSocket: JSON text frames, and a ping every ``ping_interval``
    seconds that must be answered within ``ping_timeout`` or the socket is closed.

    aiohttp's own ``heartbeat`` waits ``interval / 2`` for the pong; the deployed key
    ``ping_timeout`` needs its own loop, hence ``autoping=False`` and pings answered here.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, *, ping_interval: float,
                 ping_timeout: float) -> None:
        self._ws = ws
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._pong = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._close_code: int | None = None
        self.close_reason = ""  # the server's close reason (e.g. "credential revoked")
        self._keepalive: asyncio.Task[None] | None = None
        # Capability proto: binary frames are Protobuf envelopes. Received once this side
        # announced proto; sent once the server announced it too (``use_proto``).
        self.send_proto = False
        self.receive_proto = False
        if ping_interval and ping_interval > 0:
            self._keepalive = asyncio.create_task(self._ping_loop(), name="control-ping")

    @property
    def closed(self) -> bool:
        return self._ws.closed

    @property
    def close_code(self) -> int | None:
        return self._close_code if self._close_code is not None else self._ws.close_code

    def use_proto(self, *, send: bool, receive: bool) -> None:
        """Switch the frame encoding (the agent calls this as capabilities are learnt)."""
        self.send_proto = send
        self.receive_proto = receive

    async def send(self, envelope: Envelope) -> None:
        frame: str | bytes = (encode_envelope_proto(envelope) if self.send_proto
                              else encode_envelope(envelope))
        async with self._send_lock:
            if self._ws.closed:
                raise ConnectionError("control channel is closed")
            try:
                if isinstance(frame, bytes):
                    await self._ws.send_bytes(frame)
                else:
                    await self._ws.send_str(frame)
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                raise ConnectionError(f"control send failed: {exc}") from exc

    async def receive(self) -> Envelope | None:
        while True:
            try:
                msg = await self._ws.receive()
            except (aiohttp.ClientError, OSError) as exc:
                log.info("control_receive_failed error=%s", exc)
                return None
            kind = msg.type
            if kind is aiohttp.WSMsgType.TEXT:
                return decode_envelope(msg.data)
            if kind is aiohttp.WSMsgType.PING:
                await self._answer_ping(msg.data)
                continue
            if kind is aiohttp.WSMsgType.PONG:
                self._pong.set()
                continue
            if kind is aiohttp.WSMsgType.BINARY:
                if self.receive_proto:
                    return decode_envelope_proto(msg.data)
                raise FieldTypeError("binary control frame received but proto was not "
                                     "negotiated", field="frame")
            if kind is aiohttp.WSMsgType.CLOSE:
                self._close_code = msg.data if isinstance(msg.data, int) else None
                self.close_reason = str(msg.extra or "")[:200]
            return None

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            try:
                await self._keepalive
            except asyncio.CancelledError:
                pass
            self._keepalive = None
        if not self._ws.closed:
            try:
                await asyncio.wait_for(self._ws.close(), timeout=2.0)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("control_close_failed error=%s", exc)

    async def _answer_ping(self, data: bytes) -> None:
        async with self._send_lock:
            try:
                await self._ws.pong(data)
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                log.debug("control_pong_failed error=%s", exc)

    async def _ping_loop(self) -> None:
        while not self._ws.closed:
            await asyncio.sleep(self._ping_interval)
            self._pong.clear()
            try:
                async with self._send_lock:
                    await self._ws.ping()
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:
                log.info("control_ping_failed error=%s", exc)
                return
            if not await wait_event(self._pong, self._ping_timeout):
                log.warning("control_ping_timeout ping_timeout_s=%.1f action=close",
                            self._ping_timeout)
                self._close_code = 1011
                # Closing wakes ``receive()``, which then reports the channel closed.
                try:
                    await asyncio.wait_for(self._ws.close(code=1011, message=b"ping timeout"),
                                           timeout=1.0)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
                return


class ControlClient:
    """Opens ``ControlConnection``s to ``control.url`` with the 1.0 handshake headers."""

    def __init__(self, *, url: str, sensor_id: str, token: str | Callable[[], str],
                 headers: Mapping[str, str] | None = None, tls: Any = None,
                 ping_interval: float = 20.0, ping_timeout: float = 20.0,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        self._url = control_endpoint(url)
        self._sensor_id = sensor_id
        self._token = token
        self._headers = dict(headers or {})
        self._ssl = build_ssl_context(tls, self._url, "control")
        self._ping_interval = float(ping_interval)
        self._ping_timeout = float(ping_timeout)
        self._connect_timeout = float(connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, config: Any) -> Self:
        control = config.control
        return cls(url=control.url, sensor_id=config.sensor_id, token=_token_source(config),
                   headers=control.headers, tls=control.tls,
                   ping_interval=control.ping_interval, ping_timeout=control.ping_timeout)

    @property
    def url(self) -> str:
        return self._url

    def refresh_credentials(self, config: Any) -> None:
        """SIGHUP: the next connection uses ``config``'s token and TLS files."""
        self._ssl = build_ssl_context(config.control.tls, self._url, "control")
        self._token = _token_source(config)

    def _current_token(self) -> str:
        return self._token() if callable(self._token) else self._token

    async def connect(self) -> ControlConnection:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        headers = dict(self._headers)
        headers["X-Sensor-ID"] = self._sensor_id
        headers["Authorization"] = f"Bearer {self._current_token()}"
        try:
            ws = await asyncio.wait_for(self._open(self._session, headers),
                                        timeout=self._connect_timeout)
        except aiohttp.WSServerHandshakeError as exc:
            # The server's reason rides in the WWW-Authenticate header (the WebSocket
            # client never reads the refusal's body).
            reason = refusal_reason(exc.headers) or f"HTTP {exc.status}"
            if exc.status == 401:
                raise Unauthenticated(reason, field="control") from exc
            if exc.status == 403:
                raise Forbidden(reason, field="control") from exc
            raise ConnectionError(f"control handshake failed: HTTP {exc.status}") from exc
        except TimeoutError as exc:
            raise TimeoutError(f"control connect timed out after {self._connect_timeout}s") from exc
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise ConnectionError(f"control connect failed: {exc}") from exc
        return ControlConnection(ws, ping_interval=self._ping_interval,
                                 ping_timeout=self._ping_timeout)

    async def _open(self, session: aiohttp.ClientSession,
                    headers: Mapping[str, str]) -> aiohttp.ClientWebSocketResponse:
        return await session.ws_connect(
            self._url, headers=headers, autoping=False, autoclose=True,
            ssl=self._ssl if self._ssl is not None else True, max_msg_size=MAX_CONTROL_FRAME)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# ---------------------------------------------------------------------------------------
# Ingest (aiohttp keep-alive session)


@dataclass
class IngestClient:
    """POSTs chunks over one keep-alive ``ClientSession`` (at most ``max_parallel``
    connections)."""

    url: str
    token: str | Callable[[], str]
    timeout: float = 30.0
    headers: Mapping[str, str] = field(default_factory=dict)
    tls: Any = None
    max_parallel: int = 4
    batch_url: str = field(default="", init=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)
    _ssl: ssl.SSLContext | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.url = ingest_endpoint(self.url)
        self.batch_url = batch_endpoint(self.url)
        self._ssl = build_ssl_context(self.tls, self.url, "ingest")

    @classmethod
    def from_config(cls, config: Any) -> Self:
        ingest = config.ingest
        return cls(url=ingest.url, token=_token_source(config), timeout=ingest.timeout,
                   headers=dict(ingest.headers or {}), tls=ingest.tls,
                   max_parallel=ingest.max_parallel)

    def refresh_credentials(self, config: Any) -> None:
        """SIGHUP: later POSTs use ``config``'s token; new connections its TLS files."""
        self._ssl = build_ssl_context(config.ingest.tls, self.url, "ingest")
        self.token = _token_source(config)

    def _current_token(self) -> str:
        return self.token() if callable(self.token) else self.token

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=max(1, int(self.max_parallel)),
                ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def post_chunk(self, chunk: Chunk, *, proto: bool = False) -> PostResult:
        """POST one chunk: JSON 1.0, or Protobuf (capability ``proto``)."""
        body = encode_chunk_proto(chunk) if proto else encode_chunk(chunk).encode("utf-8")
        status, raw, content_type, retry_after = await self._post(self.url, body, proto)
        if proto and status == 200 and content_type == PROTO_CONTENT_TYPE:
            try:
                return PostResult(status=status, result=decode_ingest_result_proto(raw))
            except ProtocolError as exc:
                log.warning("ingest_answer_unreadable status=%d error=%s", status, exc.message)
                return PostResult(status=status)
        return _post_result(status, raw, retry_after)

    async def post_batch(self, chunks: Sequence[Chunk], *, proto: bool = True
                         ) -> BatchPostResult:
        """POST several chunks to ``/v1/ingest/batch`` (capability ``batch``); the answer
        holds one outcome per chunk, in order."""
        body = (encode_batch_proto(chunks) if proto
                else encode_batch(chunks).encode("utf-8"))
        status, raw, content_type, retry_after = await self._post(self.batch_url, body, proto)
        if status != 200:
            error = _post_result(status, raw, retry_after)
            return BatchPostResult(status=status, error=error.error,
                                   retry_after=error.retry_after)
        try:
            if content_type == PROTO_CONTENT_TYPE:
                outcomes = decode_batch_result_proto(raw)
            else:
                outcomes = decode_batch_result(raw)
        except ProtocolError as exc:
            log.warning("ingest_batch_answer_unreadable error=%s", exc.message)
            return BatchPostResult(status=status)
        if len(outcomes) != len(chunks):
            log.warning("ingest_batch_answer_mismatch chunks=%d results=%d", len(chunks),
                        len(outcomes))
            return BatchPostResult(status=status)
        return BatchPostResult(status=status, outcomes=tuple(outcomes))

    async def _post(self, url: str, body: bytes, proto: bool
                    ) -> tuple[int, bytes, str, str | None]:
        session = self._session_or_new()
        headers = dict(self.headers)
        kind = PROTO_CONTENT_TYPE if proto else "application/json"
        headers["Content-Type"] = kind
        if proto:
            headers["Accept"] = PROTO_CONTENT_TYPE
        headers["Authorization"] = f"Bearer {self._current_token()}"
        try:
            async with session.post(url, data=body, headers=headers) as response:
                raw = await response.content.read(_MAX_ERROR_BODY if response.status != 200
                                                  else -1)
                return (response.status, raw, response.content_type,
                        response.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise TimeoutError(f"ingest POST timed out after {self.timeout}s") from exc
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise ConnectionError(f"ingest POST failed: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _post_result(status: int, raw: bytes, retry_after: str | None) -> PostResult:
    doc: Any = None
    try:
        doc = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    if 200 <= status < 300:
        result: IngestResult | None = None
        if isinstance(doc, dict):
            try:
                result = ingest_result_from_json(doc)
            except ProtocolError as exc:
                log.warning("ingest_answer_unreadable status=%d error=%s", status, exc.message)
        return PostResult(status=status, result=result)
    return PostResult(status=status, error=doc if isinstance(doc, dict) else None,
                      retry_after=parse_retry_after(retry_after))


_DESCRIPTION_RE = re.compile(r'error_description="([^"]*)"')


def refusal_reason(headers: Mapping[str, str] | None) -> str:
    """The reason of a refused request from its RFC 6750 ``WWW-Authenticate`` header."""
    if not headers:
        return ""
    found = _DESCRIPTION_RE.search(headers.get("WWW-Authenticate", ""))
    return found.group(1)[:200] if found else ""


def _token_source(config: Any) -> Callable[[], str]:
    """The credential, re-read from ``token_file`` on every use when one is configured,
    so an operator can rotate it without restarting the agent."""
    token_file = getattr(config, "token_file", None)
    fallback = str(getattr(config, "token", "") or "")
    if not token_file:
        return lambda: fallback

    def read() -> str:
        try:
            with open(token_file, encoding="utf-8") as handle:
                value = handle.read().strip()
        except OSError as exc:
            log.warning("token_file_unreadable path=%s error=%s", token_file, exc)
            return fallback
        return value or fallback

    return read
