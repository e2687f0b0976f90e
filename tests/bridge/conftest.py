"""Fixtures for the bridge tests: ZMQ sync-up and polling (bitcoind and rpc come from tests/conftest.py)."""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, TypeVar

import pytest

from bridge.rpc import BitcoinRPC
from bridge.zmq_sub import BlockHashEvent, ZmqEvent, ZmqSubscriber

T = TypeVar("T")


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll an async predicate until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def zmq_sync_up(
    rpc: BitcoinRPC, sub: ZmqSubscriber, address: str, timeout: float = 10.0
) -> list[ZmqEvent]:
    """Mine blocks until the subscriber sees a hashblock (ZMQ subscriptions connect lazily).

    As Bitcoin Core's functional tests do: a SUB socket misses whatever is published before
    its subscription reaches the publisher, so generate a block, wait briefly for its
    notification, and repeat. Returns every event received meanwhile.
    """
    deadline = time.monotonic() + timeout
    seen: list[ZmqEvent] = []
    while time.monotonic() < deadline:
        await rpc.generatetoaddress(1, address)
        round_end = time.monotonic() + 0.5
        while (left := round_end - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(sub.recv(), left)
            except TimeoutError:
                break
            seen.append(event)
            if isinstance(event, BlockHashEvent):
                return seen
    pytest.fail(f"ZMQ subscriber saw no hashblock within {timeout}s")


@pytest.fixture
def zmq_sync() -> Callable[..., Awaitable[list[ZmqEvent]]]:
    """The :func:`zmq_sync_up` helper (tests get helpers as fixtures under --import-mode=importlib)."""
    return zmq_sync_up


@pytest.fixture
def poll_until() -> Callable[..., Awaitable[None]]:
    """The :func:`wait_for` helper: ``await poll_until(async_predicate, timeout, what)``."""
    return wait_for
