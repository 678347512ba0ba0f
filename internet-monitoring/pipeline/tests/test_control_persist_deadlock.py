"""Found by ``pipeline-sim``: window persistence must not deadlock with read-API requests.

``ControlManager`` persists windows by running the statements on the loop
(``store.begin_control_state``, which takes the store's lock) and the COMMIT, which releases
that lock, in a worker thread. When that worker comes from the same bounded pool as the
read API's store calls (``executor=None`` is asyncio's default pool: 6 threads on 2 CPUs),
readers waiting for the lock can fill the pool, so the COMMIT never runs and the server
stops committing and answering for good. Seen with 20 simulated sensors whose progress
polling read events concurrently (``pipeline-sim --profile lossy --sensors 20 --events 300
--duration 0 --seed 1``: ingest stopped after ~5,800 events; the thread dump showed six
pool threads in ``store._read`` and the store thread in ``begin_ingest``).

The scenario runs in a child process: a deadlocked one cannot be cleaned up in-process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCENARIO = textwrap.dedent("""
    import asyncio, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from prometheus_client import CollectorRegistry
    from pipeline.common.messages import ChunkRequest
    from pipeline.server.security.auth import TokenAuthenticator
    from pipeline.server.control.channel import ControlManager
    from pipeline.server.metrics import ServerMetrics
    from pipeline.server.control.scheduler import Outgoing, RequestScheduler
    from pipeline.common.config import StoreConfig
    from pipeline.server.store import open_store

    async def main(path):
        store = open_store(StoreConfig(path=path, reserve_bytes=0))
        pool = ThreadPoolExecutor(max_workers=2)  # the shared pool, small for the test
        manager = ControlManager(RequestScheduler(), TokenAuthenticator(),
                                 metrics=ServerMetrics(CollectorRegistry()), store=store,
                                 executor=pool)
        request = ChunkRequest(since_sequence=0, max_chunks=8, max_bytes=65536,
                               window_id="pi-01-w1", max_in_flight=16)
        manager.dispatch([Outgoing("pi-01", request)])  # sensor state to persist first

        def read_soon():
            time.sleep(0.3)  # a read-API request arriving while the persist holds the lock
            return len(store.events("pi-01"))

        readers = [pool.submit(read_soon) for _ in range(2)]  # fills the shared pool
        await manager.persist_now()
        assert [r.result() for r in readers] == [0, 0]
        states = await asyncio.to_thread(store.load_sensor_states)
        assert "pi-01" in states, states  # the persist really committed
        await manager.close()
        store.close()
        pool.shutdown()
        print("persisted")

    asyncio.run(main(sys.argv[1]))
""")


def test_window_persistence_completes_while_readers_fill_the_shared_pool(
        tmp_path: Path) -> None:
    try:
        proc = subprocess.run([sys.executable, "-c", SCENARIO, str(tmp_path / "server.db")],
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("persist_now deadlocked: its COMMIT waited behind readers "
                             "blocked on the store lock it was to release") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "persisted"
