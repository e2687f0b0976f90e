"""asyncio helpers every long-running loop of the project shares."""
from __future__ import annotations

import asyncio
import signal

from aiohttp import web


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


async def until_signalled() -> None:
    """Return once the process gets SIGINT or SIGTERM (the helper processes' main wait: l2-relay, l2-netflow,
    l2-llm-worker, l2-gateway; each cleans up after it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve_app(app: web.Application, listen: str) -> tuple[web.AppRunner, str]:
    """Serve an aiohttp app on host:port (port 0: any free one): its runner (clean it up) and the bound host:port."""
    host, _, port = listen.rpartition(":")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, int(port))
    await site.start()
    bound = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
    return runner, f"{bound[0]}:{bound[1]}"
