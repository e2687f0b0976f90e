"""wait_event: set, timed out, and a cancellation that arrives as the event is set is never swallowed."""
from __future__ import annotations

import asyncio

import pytest

from l2d.aio import wait_event


async def test_set_and_timed_out() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    ev.set()
    assert await wait_event(ev, 10) is True


async def test_a_cancellation_arriving_with_the_event_stops_a_waiting_loop() -> None:
    """Python 3.11's asyncio.wait_for returns the result instead of raising when the cancellation and the event
    arrive in one loop iteration: a loop waiting that way never stops (a daemon's shutdown hung on it)."""
    ev = asyncio.Event()
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            ev.clear()
            rounds += 1
            await wait_event(ev, 10)

    t = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    ev.set()
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(t), 5)  # a swallowed cancellation shows as TimeoutError here
    assert rounds == 1
