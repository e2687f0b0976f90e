"""run_steps: the step loop of the anchor service and the bridge service (wake or poll, failures survived)."""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, Awaitable, Callable, Optional

import pytest

from bridge.rpc_errors import RPCConnectionRefused, RPCTransient
from bridge.steps import run_steps

LONG = 3600.0  # a poll interval no test waits out


class Loop:
    """run_steps on a scripted step; ``runs`` yields once per step started."""

    def __init__(self, poll_s: float, script: Optional[Callable[[int], Awaitable[None]]] = None) -> None:
        self.wake = asyncio.Event()
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.transients: list[RPCTransient] = []
        self.n = 0
        self.script = script
        self.task = asyncio.create_task(run_steps(self.step, self.wake, poll_s, "test", self.transients.append))

    async def step(self) -> None:
        self.n += 1
        self.started.put_nowait(self.n)
        if self.script is not None:
            await self.script(self.n)

    async def next_run(self) -> int:
        return await asyncio.wait_for(self.started.get(), 5.0)

    async def no_run_for(self, seconds: float) -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.started.get(), seconds)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def loops() -> AsyncIterator[list[Loop]]:
    started: list[Loop] = []
    yield started
    for loop in started:
        if not loop.task.done():
            await loop.stop()


async def test_wake_runs_the_next_step_at_once(loops: list[Loop]) -> None:
    loop = Loop(LONG)
    loops.append(loop)
    assert await loop.next_run() == 1
    await loop.no_run_for(0.05)  # nothing happens until woken (the poll interval is an hour)
    loop.wake.set()
    assert await loop.next_run() == 2
    loop.wake.set()
    assert await loop.next_run() == 3


async def test_without_a_wake_the_step_reruns_every_poll_interval(loops: list[Loop]) -> None:
    loop = Loop(0.01)
    loops.append(loop)
    assert [await loop.next_run() for _ in range(3)] == [1, 2, 3]
    assert not loop.wake.is_set()


async def test_a_wake_during_a_step_is_not_lost(loops: list[Loop]) -> None:
    # The wake is cleared before the step, not after: news that arrives while a step runs
    # gets a step of its own.
    async def script(n: int) -> None:
        if n == 1:
            loop.wake.set()

    loop = Loop(LONG, script)
    loops.append(loop)
    assert await loop.next_run() == 1
    assert await loop.next_run() == 2
    await loop.no_run_for(0.05)


async def test_transient_error_goes_to_on_transient_and_the_loop_goes_on(
    loops: list[Loop], caplog: pytest.LogCaptureFixture
) -> None:
    refused = RPCConnectionRefused("cannot connect", method="getblockcount")

    async def script(n: int) -> None:
        if n == 1:
            raise refused

    with caplog.at_level(logging.DEBUG, logger="bridge.steps"):
        loop = Loop(0.01, script)
        loops.append(loop)
        assert [await loop.next_run() for _ in range(2)] == [1, 2]
    assert loop.transients == [refused]
    assert not [r for r in caplog.records if r.name == "bridge.steps"]


async def test_other_failure_is_logged_with_traceback_and_the_step_retried(
    loops: list[Loop], caplog: pytest.LogCaptureFixture
) -> None:
    async def script(n: int) -> None:
        if n == 1:
            raise ValueError("bad state")

    with caplog.at_level(logging.DEBUG, logger="bridge.steps"):
        loop = Loop(0.01, script)
        loops.append(loop)
        assert [await loop.next_run() for _ in range(2)] == [1, 2]
    assert loop.transients == []
    errors = [r for r in caplog.records if r.name == "bridge.steps"]
    assert [(r.levelno, r.getMessage()) for r in errors] == [(logging.ERROR, "test step failed; retrying")]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], ValueError)


async def test_cancel_stops_the_loop_during_a_step_and_during_the_wait() -> None:
    in_step = asyncio.Event()

    async def script(n: int) -> None:
        in_step.set()
        await asyncio.Event().wait()  # a step that never finishes

    loop = Loop(LONG, script)
    await asyncio.wait_for(in_step.wait(), 5.0)
    await loop.stop()

    waiting = Loop(LONG)
    assert await waiting.next_run() == 1
    await waiting.stop()


async def test_a_stop_arriving_with_a_wake_up_stops_the_loop() -> None:
    """The service is cancelled (node shutdown) in the same loop iteration as a wake-up: the loop must end, not
    swallow the cancellation and run on (a daemon's shutdown hung on this under load)."""
    loop = Loop(LONG)
    assert await loop.next_run() == 1
    await asyncio.sleep(0)  # the loop is now waiting for a wake-up
    loop.wake.set()
    loop.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(loop.task), 5.0)
