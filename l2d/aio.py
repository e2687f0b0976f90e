"""asyncio helpers every long-running loop of the project shares."""
from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until event is set or timeout_s seconds pass; True if it was set.

    Not asyncio.wait_for: on Python 3.11, a cancellation that arrives while the event is being set is swallowed
    (wait_for returns the result), so a loop waiting this way may never stop (seen as a daemon whose shutdown hung
    under load). asyncio.timeout delivers the cancellation.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True
