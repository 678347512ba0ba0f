"""The cluster's PostgreSQL transport on a real PostgreSQL (``pg_dsn``): NOTIFY payloads
up to our limit cross between two buses, a session lock is held by one connection only
and freed when that connection's session ends, and clusters on other schemas of the same
database neither hear us nor share our locks."""

from __future__ import annotations

import asyncio

from pipeline.server.cluster.messages import MAX_PAYLOAD_BYTES, EventsCommitted, decode, encode
from pipeline.server.cluster.ownership import lock_key
from pipeline.server.cluster.pg_bus import PgBus
from pipeline.tests.pg_support import create_schema, drop_schema, dsn_for


class Inbox:
    def __init__(self) -> None:
        self.payloads: list[str] = []
        self.arrived = asyncio.Event()

    def __call__(self, payload: str) -> None:
        self.payloads.append(payload)
        self.arrived.set()


async def _wait_for(inbox: Inbox, count: int) -> None:
    async with asyncio.timeout(10):
        while len(inbox.payloads) < count:
            inbox.arrived.clear()
            await inbox.arrived.wait()


async def test_notify_crosses_between_buses_and_large_messages_split(pg_dsn: str) -> None:
    inbox_a, inbox_b = Inbox(), Inbox()
    a, b = PgBus(pg_dsn, on_payload=inbox_a), PgBus(pg_dsn, on_payload=inbox_b)
    await a.start()
    await b.start()
    try:
        events = tuple((f"sensor-{i:03d}", f"{i:032x}") for i in range(400))
        payloads = encode(EventsCommitted("a", events))
        assert len(payloads) >= 3
        assert max(len(p.encode()) for p in payloads) > MAX_PAYLOAD_BYTES - 200
        a.publish(payloads)
        await _wait_for(inbox_b, len(payloads))
        got = [e for p in inbox_b.payloads for e in decode(p).events]
        assert tuple(got) == events
        await _wait_for(inbox_a, len(payloads))  # NOTIFY echoes to the sender too
    finally:
        await a.close()
        await b.close()


async def test_session_lock_is_exclusive_and_freed_with_its_connection(pg_dsn: str) -> None:
    a, b = PgBus(pg_dsn, on_payload=Inbox()), PgBus(pg_dsn, on_payload=Inbox())
    await a.start()
    await b.start()
    key = lock_key("pi-01", a.namespace)
    try:
        assert await a.try_lock(key)
        assert not await b.try_lock(key)
        await a.close()  # the process dies: its session ends
        # The backend ends a moment after the client hangs up (as a claim does, retry).
        async with asyncio.timeout(5):
            # Polls PostgreSQL's lock table: there is no event to wait for.
            while not await b.try_lock(key):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    finally:
        await b.close()


async def test_clusters_on_other_schemas_are_apart(pg_dsn: str) -> None:
    other_schema = create_schema("rep16other")
    try:
        mine, theirs = Inbox(), Inbox()
        a = PgBus(pg_dsn, on_payload=mine)
        other = PgBus(dsn_for(other_schema), on_payload=theirs)
        await a.start()
        await other.start()
        try:
            assert a.channel != other.channel
            assert await a.try_lock(lock_key("pi-01", a.namespace))
            assert await other.try_lock(lock_key("pi-01", other.namespace))
            other.publish(encode(EventsCommitted("x", (("pi-01", "e"),))))
            await _wait_for(theirs, 1)
            await asyncio.sleep(0.3)
            assert mine.payloads == []
        finally:
            await a.close()
            await other.close()
    finally:
        drop_schema(other_schema)
