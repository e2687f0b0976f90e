"""Chain-tip tracker: follows bitcoind's best chain and reports block connects and disconnects.

The tracker keeps a window of the most recent (height, hash) pairs of the best chain it has
seen. :meth:`ChainTracker.sync` reads bitcoind's tip (height and hash from one
``getblockchaininfo``, so they agree) and walks back from it by header prev-hashes until it
meets a block in the window (the fork point). Blocks of ours above the fork point are
reported as :class:`Disconnected` (tip first), then the new blocks as :class:`Connected`
(oldest first). Walking by prev-hash, not ``getblockhash`` per height, means a reorg that
happens *during* a sync cannot splice two chains together: the result is always one linked
chain that was bitcoind's best at the start of the sync.

ZMQ ``hashblock``/``sequence`` notifications are only the trigger (:meth:`ChainTracker.follow`
also polls as a fallback); the truth is always re-read over RPC. Hashes are internal order.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import AsyncGenerator, Optional, Protocol, Sequence, Union

from bridge.rpc_errors import RPCTransient
from l2d.aio import wait_event

log = logging.getLogger(__name__)

_NULL_HASH = b"\0" * 32


class ChainTrackerError(Exception):
    """The tracker cannot reconcile its view with bitcoind's chain."""


class ReorgTooDeep(ChainTrackerError):
    """The fork point lies below the tracked window (or the node is on another chain)."""


class BadHeader(ChainTrackerError):
    """bitcoind returned a header that does not hash to the requested block hash."""


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A block on the best chain: height and internal-order hash."""

    height: int
    block_hash: bytes

    @property
    def block_hash_hex(self) -> str:
        return self.block_hash[::-1].hex()


@dataclass(frozen=True, slots=True)
class Connected(BlockRef):
    """A block joined the best chain."""


@dataclass(frozen=True, slots=True)
class Disconnected(BlockRef):
    """A block left the best chain (reorg)."""


ChainEvent = Union[Connected, Disconnected]


class _TipInfo(Protocol):
    @property
    def blocks(self) -> int: ...

    @property
    def best_block_hash(self) -> bytes: ...


class ChainSource(Protocol):
    """The two RPCs the tracker needs (BitcoinRPC satisfies this; tests use a fake)."""

    async def getblockchaininfo(self) -> _TipInfo: ...

    async def getblockheader(self, block_hash: bytes) -> bytes: ...


def _sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


class ChainTracker:
    """Tracks bitcoind's best chain and turns tip changes into connect/disconnect events.

    ``window`` is how many recent blocks are remembered, i.e. the deepest reorg that can be
    resolved. ``known`` seeds the window (contiguous, ascending), e.g. from persisted state,
    so the first sync reports what changed since; without it the first sync sets the baseline
    at bitcoind's current tip and reports nothing.
    """

    def __init__(self, rpc: ChainSource, *, window: int = 144, known: Sequence[BlockRef] = ()) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        for a, b in zip(known, known[1:]):
            if b.height != a.height + 1:
                raise ValueError(f"known blocks must be contiguous: height {a.height} then {b.height}")
        self._rpc = rpc
        self._window_size = window
        self._window: list[BlockRef] = list(known)[-window:]
        self._lock = asyncio.Lock()

    @property
    def tip(self) -> Optional[BlockRef]:
        return self._window[-1] if self._window else None

    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        """The tracked window, oldest first."""
        return tuple(self._window)

    async def sync(self) -> list[ChainEvent]:
        """Reconcile with bitcoind's best chain; events are disconnects (tip first) then connects."""
        async with self._lock:
            info = await self._rpc.getblockchaininfo()
            if not self._window:
                await self._baseline(info.blocks, info.best_block_hash)
                return []
            tip = self._window[-1]
            if info.best_block_hash == tip.block_hash:
                return []
            fork_height, new_blocks = await self._walk_back(info.blocks, info.best_block_hash)
            events: list[ChainEvent] = [
                Disconnected(b.height, b.block_hash) for b in reversed(self._window) if b.height > fork_height
            ]
            events += [Connected(b.height, b.block_hash) for b in new_blocks]
            keep = fork_height - self._window[0].height + 1
            self._window = (self._window[:keep] + new_blocks)[-self._window_size:]
            n_disc = sum(isinstance(e, Disconnected) for e in events)
            if n_disc:
                log.warning("reorg: %d block(s) disconnected down to height %d, %d connected; tip %s at %d",
                            n_disc, fork_height, len(new_blocks), self._window[-1].block_hash_hex,
                            self._window[-1].height)
            else:
                log.debug("%d block(s) connected; tip %s at %d", len(new_blocks),
                          self._window[-1].block_hash_hex, self._window[-1].height)
            return events

    async def _baseline(self, height: int, best: bytes) -> None:
        refs = [BlockRef(height, best)]
        cur = best
        while len(refs) < self._window_size and refs[-1].height > 0:
            prev = self._prev_of(cur, await self._rpc.getblockheader(cur))
            refs.append(BlockRef(refs[-1].height - 1, prev))
            cur = prev
        self._window = refs[::-1]
        log.info("chain tracker baseline: tip %s at height %d (%d blocks tracked)",
                 self._window[-1].block_hash_hex, height, len(refs))

    async def _walk_back(self, height: int, best: bytes) -> tuple[int, list[BlockRef]]:
        """Follow prev-hashes from bitcoind's tip to a block in the window."""
        start = self._window[0].height
        top = self._window[-1].height
        new_blocks: list[BlockRef] = []  # tip first while walking
        cur, cur_h = best, height
        while True:
            if cur_h < start:
                raise ReorgTooDeep(
                    f"no common ancestor with the {len(self._window)} tracked blocks (heights {start}..{top}); "
                    f"bitcoind's tip is {best[::-1].hex()} at height {height}"
                )
            if cur_h <= top and self._window[cur_h - start].block_hash == cur:
                new_blocks.reverse()
                return cur_h, new_blocks
            new_blocks.append(BlockRef(cur_h, cur))
            cur = self._prev_of(cur, await self._rpc.getblockheader(cur))
            cur_h -= 1

    @staticmethod
    def _prev_of(block_hash: bytes, header: bytes) -> bytes:
        if len(header) != 80 or _sha256d(header) != block_hash:
            raise BadHeader(f"header returned for {block_hash[::-1].hex()} does not hash to it")
        prev = header[4:36]
        if prev == _NULL_HASH:
            raise ReorgTooDeep(f"walked back to a genesis block ({block_hash[::-1].hex()}) without a common ancestor")
        return prev

    async def follow(self, wakeup: asyncio.Event, poll_interval: float = 30.0) -> AsyncGenerator[ChainEvent, None]:
        """Sync whenever ``wakeup`` is set (e.g. on a ZMQ hashblock) or every ``poll_interval``.

        Transient RPC failures are logged and retried on the next wake-up or poll; a
        :class:`ChainTrackerError` ends the iteration (operator attention needed).
        """
        while True:
            wakeup.clear()  # before syncing: a wake-up during the sync triggers another one
            try:
                events = await self.sync()
            except RPCTransient as e:
                log.warning("chain tracker: bitcoind unavailable (%s); retrying on next trigger", e)
                events = []
            for event in events:
                yield event
            await wait_event(wakeup, poll_interval)
