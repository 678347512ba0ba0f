"""Asyncio helpers that stay correct on Python 3.11.

``asyncio.wait_for(event.wait(), timeout)`` loses a cancellation on 3.11 when the event
is set in the same loop iteration as the cancel (CPython gh-86296, fixed in 3.12): the
caller gets ``True`` back and keeps running, so a task told to stop never stops. A loop
that waits on an event which other tasks set often (the agent's heartbeat nudge) hits
this. ``asyncio.timeout`` tells its own deadline apart from an outside cancel.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``; True if it was set, False on timeout.
    An outside cancel is always re-raised."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(max(0.0, timeout)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True
