"""A round-robin TCP load balancer (no stickiness), for the simulator's replica sets.

Each accepted connection goes to the next backend in turn; a backend that refuses the
connection (a killed replica) is skipped for that connection, and the next one is tried.
HTTP keep-alive and WebSockets stay on the backend their connection reached, as with
any layer-4 balancer; nothing else ties a sensor to a replica. It runs its own event
loop in a thread, so blocking harness code can start and stop it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
PIPE_CHUNK = 64 * 1024


@dataclass
class BackendStats:
    connections: int = 0
    refused: int = 0


@dataclass
class RoundRobinBalancer:
    """``backends``: (host, port) pairs; ``port`` is the bound port after ``start()``."""

    name: str
    backends: list[tuple[str, int]]
    host: str = "127.0.0.1"
    port: int = 0
    stats: dict[tuple[str, int], BackendStats] = field(default_factory=dict)
    unroutable: int = 0
    _next: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port))
            self.port = int(self._server.sockets[0].getsockname()[1])
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"balancer-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"balancer {self.name} did not start")
        log.info("balancer_started name=%s port=%d backends=%d", self.name, self.port,
                 len(self.backends))

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = self._server = None

    def _pick(self) -> list[tuple[str, int]]:
        """Every backend once, starting with the next in turn."""
        count = len(self.backends)
        start, self._next = self._next % count, (self._next + 1) % count
        return [self.backends[(start + i) % count] for i in range(count)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for backend in self._pick():
            stats = self.stats.setdefault(backend, BackendStats())
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*backend), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError):
                stats.refused += 1
                continue
            stats.connections += 1
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer),
                                 return_exceptions=True)
            return
        self.unroutable += 1
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(PIPE_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # One side ended: close both ways (a killed replica's sockets die with it).
        try:
            writer.close()
        except (ConnectionError, OSError, RuntimeError):
            pass
