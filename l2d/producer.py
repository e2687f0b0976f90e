"""The block producer: every block interval (or as soon as the mempool holds a full block) it builds a block
from the mempool, commits it to LMDB and tells whoever listens.

A build+commit runs as its own task, shielded: cancelling the producer never interrupts a commit, and the
node's shutdown waits for it before closing the store.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

from .admission import Admission
from .aio import wait_event
from .core.block import BlockHeader
from .core.state import Account, account_key
from .core.tx import Transaction
from .ledger import BuiltBlock, Ledger
from .mempool import Mempool
from .metrics import Metrics
from .store import Store

log = logging.getLogger(__name__)


def _nonce_reader(get: Callable[[bytes], Optional[bytes]]) -> Callable[[bytes], int]:
    """committed_nonce_of for the mempool, over one read view."""

    def nonce_of(sender: bytes) -> int:
        raw = get(account_key(sender))
        return 0 if raw is None else Account.decode(bytes(raw)).nonce

    return nonce_of


class BlockProducer:
    """Builds and commits blocks. Listeners: committed_locked runs while the tree lock is still held (the new
    block is the tip), each of after_commit runs once the block is committed and the mempool updated."""

    def __init__(self, ledger: Ledger, store: Store, mempool: Mempool, admission: Admission, metrics: Metrics,
                 tree_lock: asyncio.Lock, *, max_txs: int, interval_ms: int,
                 track: Callable[["asyncio.Future[Any]"], None]) -> None:
        self.ledger = ledger
        self.store = store
        self.mempool = mempool
        self.admission = admission
        self.metrics = metrics
        self.tree_lock = tree_lock
        self.max_txs = max_txs
        self.interval_s = interval_ms / 1000
        self._track = track
        self._wake = asyncio.Event()
        self.committed_locked: Optional[Callable[[BlockHeader], Awaitable[None]]] = None
        self.after_commit: list[Callable[[BlockHeader], None]] = []

    def wake(self) -> None:
        """Build the next block now rather than at the end of the interval."""
        self._wake.set()

    async def produce_once(self) -> Optional[BuiltBlock]:
        """Build and commit one block from the mempool; None if there was nothing to include."""
        with self.store.reader() as r:  # one read transaction for every sender's nonce
            txs = self.mempool.select(self.max_txs, _nonce_reader(r.get_state))
        if not txs:
            return None
        fut = asyncio.ensure_future(self._build_and_commit(txs))
        self._track(fut)
        return await asyncio.shield(fut)

    async def _build_and_commit(self, txs: list[Transaction]) -> Optional[BuiltBlock]:
        t0 = time.perf_counter()
        async with self.tree_lock:
            built = await asyncio.to_thread(self.ledger.build_block, txs, int(time.time() * 1000),
                                            signatures_checked=True)
            if built.block.txs:
                await self.ledger.commit_async(built)
                if self.committed_locked is not None:
                    await self.committed_locked(built.block.header)
        ms = (time.perf_counter() - t0) * 1000
        rejected = [t for t, _ in built.rejected]
        self.mempool.remove_committed(built.block.txs)
        self.mempool.drop(rejected)
        for t, e in built.rejected:
            self.metrics.txs_rejected.inc(stage="block", reason=e.reason)
            self.admission.remember(t.txid, e.reason)
            log.debug("transaction rejected in block", extra={"txid": t.txid.hex(), "reason": e.reason,
                                                                 "detail": str(e)})
        with self.store.reader() as r:
            pruned = self.mempool.prune(_nonce_reader(r.get_state))
        for t in pruned:
            self.admission.remember(t.txid, "stale-nonce")
        if not built.block.txs:  # every candidate was rejected: nothing was written, no empty block
            log.info("no block: every candidate rejected", extra={"rejected": len(rejected)})
            return None
        h = built.block.header
        self.metrics.blocks_committed.inc()
        self.metrics.txs_committed.inc(len(built.block.txs))
        self.metrics.block_build.observe(ms / 1000)
        log.info("block committed", extra={"height": h.height, "txs": h.tx_count, "rejected": len(rejected),
                                           "root": h.state_root.hex(), "hash": h.hash.hex(), "ms": round(ms, 2)})
        for listener in self.after_commit:
            listener(h)
        return built

    async def run(self, stop: asyncio.Event) -> None:
        """Produce until stop is set; the stop is checked between blocks, so the block at hand completes."""
        while not stop.is_set():
            if not self._wake.is_set():
                await wait_event(self._wake, self.interval_s)
            self._wake.clear()
            if stop.is_set():
                break
            await self.produce_once()
            if len(self.mempool) >= self.max_txs:
                self._wake.set()
