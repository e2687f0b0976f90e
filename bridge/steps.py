"""The service step loop shared by the anchor service and the bridge service: step, then wait for a wake-up or poll."""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from bridge.rpc_errors import RPCTransient
from l2d.aio import wait_event

log = logging.getLogger(__name__)


async def run_steps(step: Callable[[], Awaitable[None]], wake: asyncio.Event, poll_s: float, what: str,
                    on_transient: Callable[[RPCTransient], None]) -> None:
    """Run step() forever; after each, wait until wake is set or poll_s seconds pass.

    bitcoind being unreachable (RPCTransient) goes to on_transient; any other failure is logged with its
    traceback and the step retried: a service beside the ledger never takes the ledger down with it.
    """
    while True:
        wake.clear()
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except RPCTransient as e:
            on_transient(e)
        except Exception:
            log.exception("%s step failed; retrying", what)
        await wait_event(wake, poll_s)
