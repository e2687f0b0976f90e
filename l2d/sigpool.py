"""Transaction signature checks in worker processes, off the event loop (the batch submission path).

A batch of raw transactions is split into one chunk per worker; each worker answers, per transaction, whether its
BIP340 signature verifies (`l2d.core.tx.signature_ok`: the sender's x-only key at bytes 3..35, the signature last,
over H_TX_SIG of the rest). Admission then runs every other check with `signature_checked=True`; a transaction
whose bytes do not even decode is refused by admission's decoder, whatever its worker said. With no workers
(`api.signature_workers = 0`), or for a batch too small to be worth the round trip, the checks run inline.

The workers are started (spawn: a fresh interpreter, never a fork of a process with LMDB and threads) at the
first batch large enough, and stopped with the node; a worker whose node died without stopping it (SIGKILL, a
crash) exits by itself within a second (it would otherwise wait on its queue forever). A worker that dies (the OOM
killer, say) breaks the pool: the batch it was checking is checked inline and the next one starts a fresh pool.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Optional, Sequence

from .core.tx import signature_ok

log = logging.getLogger(__name__)

INLINE_BELOW = 16  # transactions: a smaller batch is checked in the event loop (cheaper than the round trip)


def _check(raws: Sequence[bytes]) -> list[bool]:
    return [signature_ok(r) for r in raws]


def exit_with(parent: int) -> None:
    """A worker's initializer: exit once the node that started it is gone (its parent is no longer that pid)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class SignaturePool:
    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Optional[ProcessPoolExecutor] = None

    async def check(self, raws: Sequence[bytes]) -> list[bool]:
        """Whether each transaction's signature verifies, in order."""
        if self.workers <= 0 or len(raws) < INLINE_BELOW:
            return _check(raws)
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=exit_with, initargs=(os.getpid(),))
        loop = asyncio.get_running_loop()
        size = -(-len(raws) // self.workers)
        try:
            parts = await asyncio.gather(*(loop.run_in_executor(self._pool, _check, list(raws[i:i + size]))
                                           for i in range(0, len(raws), size)))
        except BrokenProcessPool as e:
            log.error("a signature worker died (%s): this batch is checked inline, the next starts new workers", e)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            return _check(raws)
        return [ok for part in parts for ok in part]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # idle workers: they stop at once
            self._pool = None
