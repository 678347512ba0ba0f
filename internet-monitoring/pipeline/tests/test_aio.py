"""``wait_event`` keeps an outside cancel even when the event is set at the same moment
(``asyncio.wait_for`` on Python 3.11 returns normally instead; the agent's heartbeat loop
then never stopped)."""

from __future__ import annotations

import asyncio

from pipeline.common.aio import wait_event


async def _cancel_while_setting(waiter) -> asyncio.Task:
    event = asyncio.Event()
    task = asyncio.ensure_future(waiter(event))
    await asyncio.sleep(0)  # the task is now waiting on the event
    event.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return task


async def test_a_cancel_that_meets_the_event_being_set_is_not_lost():
    task = await _cancel_while_setting(lambda event: wait_event(event, 10.0))
    assert task.cancelled()


async def test_set_event_and_timeout_answers():
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True
    assert await wait_event(event, 0) is True


async def test_an_event_set_before_the_deadline_wakes_the_waiter():
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 10.0) is True


async def test_the_race_is_real_for_wait_for_on_this_python():
    """Documents why the helper exists; on Python >= 3.12 wait_for is fixed too."""
    import sys

    task = await _cancel_while_setting(
        lambda event: asyncio.wait_for(event.wait(), timeout=10.0))
    if sys.version_info < (3, 12):
        assert not task.cancelled()  # the cancel was swallowed
    else:
        assert task.cancelled()
