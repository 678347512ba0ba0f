"""An in-process asyncio TCP proxy that applies a ``FaultPlan`` to real connections.

Byte-level, so HTTP keep-alive, WebSocket and anything else over TCP go through it alike.
The decisions come from ``pipeline.sim.faults`` (pure, seeded); this module only reads,
waits and writes. Per connection and direction there is a reader task (reads segments,
asks the ``LinkSession`` what to do, queues them) and a writer task (waits for each
segment's release time, writes its fragments with a drain between them); the queue keeps
the byte order, and its bound pushes back on a sender faster than the link.

Resets are real TCP RSTs (``SO_LINGER`` 0, then abort). A RST or a connection error on one
side is passed on as a RST to the other. An end of stream (FIN) is passed on as a
half-close behind the data. Partition windows reset every live connection when they begin
and reset new connections while they last. Black-holed bytes are discarded and the
connection goes silent (see ``pipeline.sim.faults``).

This is a test tool: it listens on and connects to loopback only unless
``allow_remote=True``, so test traffic never leaves the machine by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pipeline.common.errors import ConfigError
from pipeline.sim.faults import Direction, FaultPlan, LinkSession, StepKind

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
QUEUE_SEGMENTS = 32  # per direction; beyond this the reader stops reading (back-pressure)
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class ProxyStats:
    """Counters since ``start()``. ``resets`` counts the RSTs the proxy injected (at
    connect, mid-stream, partition); ``peer_errors`` the connections an endpoint broke."""

    connections: int = 0
    active: int = 0
    resets: int = 0
    resets_at_connect: int = 0
    resets_mid_stream: int = 0
    resets_partition: int = 0
    closed_after_bytes: int = 0
    target_connect_failures: int = 0
    peer_errors: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    blackholed_bytes: int = 0
    hangs: int = 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: we do not resolve it, so refuse


def _check_port(name: str, port: object, *, allow_zero: bool) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ConfigError(f"{name}: expected an integer port", field=name)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"{name}: port out of range: {port}", field=name)
    return port


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN (``SO_LINGER`` on, timeout 0)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


async def _wait_closed(writer: asyncio.StreamWriter, timeout_s: float = 1.0) -> None:
    """Wait for a closing transport to finish; abort it if a peer does not read its data."""
    try:
        await asyncio.wait_for(writer.wait_closed(), timeout=timeout_s)
    except TimeoutError:
        writer.transport.abort()
    except (OSError, ConnectionError):
        pass


@dataclass
class _Segment:
    release_at: float
    data: bytes
    fragments: tuple[int, ...]
    close_after: bool


@dataclass
class _Eof:
    release_at: float


class _ProxiedConnection:
    """The asyncio shell around one ``LinkSession``: four tasks, two queues."""

    def __init__(self, proxy: FaultProxy, index: int, session: LinkSession,
                 client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.proxy = proxy
        self.index = index
        self.session = session
        self._readers = {Direction.UPSTREAM: client[0], Direction.DOWNSTREAM: server[0]}
        self._writers = {Direction.UPSTREAM: server[1], Direction.DOWNSTREAM: client[1]}
        self._queues: dict[Direction, asyncio.Queue[_Segment | _Eof]] = {
            d: asyncio.Queue(QUEUE_SEGMENTS) for d in Direction}
        self._eofs_delivered: set[Direction] = set()
        self._done = asyncio.Event()
        self.ended_by: str | None = None

    # -- endings ------------------------------------------------------------------------

    def reset(self, reason: str, *, injected: bool) -> None:
        """RST both sides now; queued bytes are lost, as with a real RST."""
        if self._done.is_set():
            return
        self.ended_by = reason
        stats = self.proxy._stats
        if injected:
            stats.resets += 1
            if reason == "partition":
                stats.resets_partition += 1
            elif reason == "reset_mid_stream":
                stats.resets_mid_stream += 1
        elif reason.startswith("peer"):
            stats.peer_errors += 1
        log.debug("proxy_conn_reset conn=%d reason=%s injected=%s", self.index, reason, injected)
        for writer in self._writers.values():
            _rst(writer)
        self._done.set()

    def close(self, reason: str) -> None:
        """Close both sides with a FIN after what was already written."""
        if self._done.is_set():
            return
        self.ended_by = reason
        log.debug("proxy_conn_closed conn=%d reason=%s", self.index, reason)
        for writer in self._writers.values():
            writer.close()
        self._done.set()

    # -- pumps --------------------------------------------------------------------------

    async def _read(self, direction: Direction) -> None:
        reader = self._readers[direction]
        queue = self._queues[direction]
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except (ConnectionError, OSError) as exc:
                self.reset(f"peer_error:{type(exc).__name__}", injected=False)
                return
            now = loop.time()
            if not data and self.session.hung and direction is Direction.DOWNSTREAM:
                return  # a hung link passes no FIN either: the client waits for its timeout
            if not data:
                release = self.session.on_eof(direction, now)
                if release is None:
                    self.close(f"eof_while_{self.session.reset_reason or 'stalled'}")
                    return
                await queue.put(_Eof(release))
                return
            step = self.session.on_segment(direction, len(data), now)
            if step.kind is StepKind.RESET:
                self.reset(step.reason or "reset", injected=True)
                return
            if step.kind is StepKind.DISCARD:
                if step.reason in ("blackhole", "stalled", "hang"):
                    self.proxy._stats.blackholed_bytes += len(data)
                continue
            await queue.put(_Segment(step.release_at_s, data[:step.nbytes], step.fragments,
                                     step.close_after))

    async def _write(self, direction: Direction) -> None:
        writer = self._writers[direction]
        queue = self._queues[direction]
        loop = asyncio.get_running_loop()
        stats = self.proxy._stats
        try:
            while True:
                item = await queue.get()
                wait = item.release_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if isinstance(item, _Eof):
                    if writer.can_write_eof():
                        writer.write_eof()
                    self._eof_delivered(direction)
                    return
                offset = 0
                fragmented = len(item.fragments) > 1
                for size in item.fragments:
                    writer.write(item.data[offset:offset + size])
                    offset += size
                    await writer.drain()
                    if fragmented:
                        # One loop turn per fragment, so each leaves as its own send() and
                        # the receiver gets a chance to read it alone.
                        await asyncio.sleep(0)
                if direction is Direction.UPSTREAM:
                    stats.bytes_upstream += offset
                else:
                    stats.bytes_downstream += offset
                if item.close_after:
                    stats.closed_after_bytes += 1
                    self.close(f"close_after_bytes:{direction.value}")
                    return
        except (ConnectionError, OSError) as exc:
            self.reset(f"peer_error:{type(exc).__name__}", injected=False)

    def _eof_delivered(self, direction: Direction) -> None:
        self._eofs_delivered.add(direction)
        if self.session.hung and direction is Direction.UPSTREAM:
            self.close("hang_client_gone")  # the client gave up; nothing more can cross
        elif len(self._eofs_delivered) == len(Direction):
            self.close("eof_both_ways")

    async def run(self) -> None:
        name = f"faultproxy-{self.proxy.port}-c{self.index}"
        tasks = []
        for d in Direction:
            tasks.append(asyncio.create_task(self._read(d), name=f"{name}-{d.value}-read"))
            tasks.append(asyncio.create_task(self._write(d), name=f"{name}-{d.value}-write"))
        try:
            await self._done.wait()
        finally:
            if not self._done.is_set():  # cancelled from outside (stop())
                self.reset("proxy_stopped", injected=False)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in self._writers.values():
                await _wait_closed(writer)


class FaultProxy:
    """A TCP proxy from ``listen_host:listen_port`` to ``target_host:target_port`` that
    applies a ``FaultPlan``. Use ``await start()``/``await stop()`` or ``async with``."""

    def __init__(self, listen_host: str = "127.0.0.1", listen_port: int = 0,
                 target_host: str = "127.0.0.1", target_port: int = 0,
                 plan: FaultPlan | None = None, *, allow_remote: bool = False,
                 connect_timeout_s: float = 5.0, name: str = "proxy") -> None:
        for field_name, host in (("listen_host", listen_host), ("target_host", target_host)):
            if not allow_remote and not _is_loopback(host):
                raise ConfigError(f"{field_name}: {host!r} is not a loopback address; the fault "
                                  "proxy stays on this machine unless allow_remote=True",
                                  field=field_name)
        self.listen_host = listen_host
        self.listen_port = _check_port("listen_port", listen_port, allow_zero=True)
        self.target_host = target_host
        self.target_port = _check_port("target_port", target_port, allow_zero=False)
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self._plan = plan if plan is not None else FaultPlan()
        self._plan_origin = 0.0
        self._stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._next_index = 0
        self._closing = False
        self._connections: set[_ProxiedConnection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._watchers: set[asyncio.Task[None]] = set()

    # -- properties ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (useful with ``listen_port=0``)."""
        if self._port is None:
            raise RuntimeError("FaultProxy.port is known only after start()")
        return self._port

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats, active=len(self._connections))

    def url(self, scheme: str = "http", path: str = "") -> str:
        return f"{scheme}://{self.listen_host}:{self.port}{path}"

    def plan_time(self) -> float:
        """Seconds since the current plan was installed (the clock of its windows)."""
        return asyncio.get_running_loop().time() - self._plan_origin

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("FaultProxy already started")
        self._closing = False
        self._server = await asyncio.start_server(self._on_client, self.listen_host,
                                                  self.listen_port)
        self._port = self._server.sockets[0].getsockname()[1]
        self._plan_origin = asyncio.get_running_loop().time()
        self._restart_watcher()
        log.info("proxy_started name=%s listen=%s:%d target=%s:%d seed=%d", self.name,
                 self.listen_host, self._port, self.target_host, self.target_port,
                 self._plan.seed)

    async def stop(self) -> None:
        """Stop listening, reset every connection and await every task started."""
        if self._server is None:
            return
        self._closing = True
        self._server.close()
        for conn in list(self._connections):
            conn.reset("proxy_stopped", injected=False)
        # Let handlers of connections accepted just before close() start and see _closing.
        for _ in range(3):
            await asyncio.sleep(0)
        pending = list(self._handlers) + list(self._watchers)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        log.info("proxy_stopped name=%s connections=%d resets=%d", self.name,
                 self._stats.connections, self._stats.resets)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def set_plan(self, plan: FaultPlan) -> None:
        """Install a new plan now; its windows count from this moment. Live connections
        switch to it for their next segments."""
        self._plan = plan
        if self._server is None:
            return
        self._plan_origin = asyncio.get_running_loop().time()
        for conn in self._connections:
            conn.session.set_plan(plan, self._plan_origin)
        self._restart_watcher()
        log.info("proxy_plan_changed name=%s seed=%d partitions=%d blackholes=%d", self.name,
                 plan.seed, len(plan.partitions), len(plan.blackholes))

    def reset_all(self, reason: str = "partition") -> int:
        """Reset every live connection now (what a partition does when it begins)."""
        conns = list(self._connections)
        for conn in conns:
            conn.reset(reason, injected=True)
        return len(conns)

    # -- internals ----------------------------------------------------------------------

    def _restart_watcher(self) -> None:
        for task in self._watchers:
            task.cancel()  # awaited by stop(); removed from the set when done
        task = asyncio.create_task(self._watch_partitions(self._plan, self._plan_origin),
                                   name=f"faultproxy-{self._port}-partitions")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch_partitions(self, plan: FaultPlan, origin: float) -> None:
        """Reset live connections at the start of each partition window."""
        loop = asyncio.get_running_loop()
        cursor = loop.time() - origin
        if plan.partitioned(cursor):
            self._partition_begins(cursor)
        while True:
            start = plan.next_partition_start(cursor)
            if start is None:
                return
            await asyncio.sleep(max(0.0, start - (loop.time() - origin)))
            cursor = start
            self._partition_begins(start)

    def _partition_begins(self, at: float) -> None:
        count = self.reset_all("partition")
        log.info("proxy_partition name=%s at_s=%.3f until_s=%s reset_connections=%d",
                 self.name, at, self._plan.partition_end(at), count)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            if not self._closing:
                raise
            # Cancelled by stop(): end normally, because asyncio's stream callback reports
            # a cancelled client_connected_cb task as an unhandled error (Python 3.11).
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            _rst(writer)
            return
        index = self._next_index
        self._next_index += 1
        self._stats.connections += 1
        fate = self._plan.decide_connection(index, self.plan_time())
        if fate.reset:
            self._stats.resets += 1
            if fate.reason == "partition":
                self._stats.resets_partition += 1
            else:
                self._stats.resets_at_connect += 1
            log.debug("proxy_conn_refused conn=%d reason=%s", index, fate.reason)
            _rst(writer)
            await _wait_closed(writer)
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                timeout=self.connect_timeout_s)
        except (TimeoutError, OSError) as exc:
            self._stats.target_connect_failures += 1
            log.warning("proxy_target_unreachable name=%s conn=%d target=%s:%d error=%s",
                        self.name, index, self.target_host, self.target_port,
                        type(exc).__name__)
            _rst(writer)
            await _wait_closed(writer)
            return
        session = LinkSession(self._plan, index, self._plan_origin)
        if session.hung:
            self._stats.hangs += 1
        conn = _ProxiedConnection(self, index, session, (reader, writer), upstream)
        if self._closing or self._plan.partitioned(self.plan_time()):
            # Stopped or partitioned while we were connecting to the target.
            conn.reset("partition" if not self._closing else "proxy_stopped",
                       injected=not self._closing)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
