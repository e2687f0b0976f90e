"""Chain tracker: reorg detection against a fake chain (unit) and a real bitcoind (regtest)."""
from __future__ import annotations

import asyncio
import hashlib
import struct
from dataclasses import dataclass
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.chain_tracker import (
    BadHeader,
    BlockRef,
    ChainEvent,
    ChainTracker,
    Connected,
    Disconnected,
    ReorgTooDeep,
)
from bridge.rpc import BitcoinRPC
from bridge.rpc_errors import RPCConnectionRefused
from bridge.zmq_sub import BlockHashEvent, ZmqSubscriber
from regtest.harness import BitcoindNode


def sha256d(b: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


@dataclass(frozen=True)
class Tip:
    blocks: int
    best_block_hash: bytes


class FakeChain:
    """Headers that really hash-link, a best chain, and the two RPCs the tracker uses."""

    def __init__(self) -> None:
        self._n = 0
        self.headers: dict[bytes, bytes] = {}
        self.best: list[bytes] = [self._make(b"\0" * 32, "genesis")]
        self.calls = 0
        self.fail_next: Optional[Exception] = None
        self.failed = asyncio.Event()

    def _make(self, prev: bytes, tag: str) -> bytes:
        self._n += 1
        header = struct.pack("<i32s32sIII", 4, prev, hashlib.sha256(f"{tag}{self._n}".encode()).digest(),
                             1_700_000_000 + self._n, 0x207FFFFF, self._n)
        h = sha256d(header)
        self.headers[h] = header
        return h

    @property
    def height(self) -> int:
        return len(self.best) - 1

    def mine(self, n: int, tag: str = "a") -> list[bytes]:
        new = []
        for _ in range(n):
            self.best.append(self._make(self.best[-1], tag))
            new.append(self.best[-1])
        return new

    def reorg(self, depth: int, n: int, tag: str = "b") -> tuple[list[bytes], list[bytes]]:
        """Drop ``depth`` tip blocks and mine ``n`` others; returns (dropped, new)."""
        dropped = self.best[len(self.best) - depth:]
        del self.best[len(self.best) - depth:]
        return dropped, self.mine(n, tag)

    async def getblockchaininfo(self) -> Tip:
        self.calls += 1
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            self.failed.set()
            raise e
        return Tip(self.height, self.best[-1])

    async def getblockheader(self, block_hash: bytes) -> bytes:
        self.calls += 1
        return self.headers[block_hash]


def refs(chain: FakeChain, first: int) -> list[tuple[int, bytes]]:
    return [(h, chain.best[h]) for h in range(first, chain.height + 1)]


async def test_first_sync_sets_baseline() -> None:
    chain = FakeChain()
    chain.mine(10)
    tracker = ChainTracker(chain, window=4)
    assert tracker.tip is None
    assert await tracker.sync() == []
    assert tracker.tip == BlockRef(10, chain.best[10])
    assert [(b.height, b.block_hash) for b in tracker.blocks] == refs(chain, 7)


async def test_baseline_at_genesis_and_short_chains() -> None:
    chain = FakeChain()
    tracker = ChainTracker(chain, window=100)
    assert await tracker.sync() == []
    assert tracker.blocks == (BlockRef(0, chain.best[0]),)
    new = chain.mine(2)
    assert await tracker.sync() == [Connected(1, new[0]), Connected(2, new[1])]


async def test_linear_growth() -> None:
    chain = FakeChain()
    chain.mine(5)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    new = chain.mine(3)
    assert await tracker.sync() == [Connected(6, new[0]), Connected(7, new[1]), Connected(8, new[2])]
    chain.calls = 0
    assert await tracker.sync() == []
    assert chain.calls == 1  # unchanged tip: one getblockchaininfo, no header walk
    (one,) = chain.mine(1)
    assert await tracker.sync() == [Connected(9, one)]


async def test_one_block_reorg() -> None:
    chain = FakeChain()
    chain.mine(5)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    dropped, new = chain.reorg(1, 1)
    assert await tracker.sync() == [Disconnected(5, dropped[0]), Connected(5, new[0])]
    assert tracker.tip == BlockRef(5, new[0])


async def test_three_block_reorg_to_longer_chain() -> None:
    chain = FakeChain()
    chain.mine(8)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    dropped, new = chain.reorg(3, 4)
    events = await tracker.sync()
    assert events == [
        Disconnected(8, dropped[2]),
        Disconnected(7, dropped[1]),
        Disconnected(6, dropped[0]),
        Connected(6, new[0]),
        Connected(7, new[1]),
        Connected(8, new[2]),
        Connected(9, new[3]),
    ]
    assert [(b.height, b.block_hash) for b in tracker.blocks] == refs(chain, 0)


async def test_reorg_to_shorter_chain_only_disconnects() -> None:
    chain = FakeChain()
    chain.mine(4)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    dropped, _ = chain.reorg(2, 0)
    assert await tracker.sync() == [Disconnected(4, dropped[1]), Disconnected(3, dropped[0])]
    assert tracker.tip == BlockRef(2, chain.best[2])


async def test_reorg_while_behind() -> None:
    chain = FakeChain()
    chain.mine(6)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    dropped, new = chain.reorg(2, 7)
    events = await tracker.sync()
    assert events[:2] == [Disconnected(6, dropped[1]), Disconnected(5, dropped[0])]
    assert events[2:] == [Connected(5 + i, h) for i, h in enumerate(new)]


async def test_reorg_deeper_than_window() -> None:
    chain = FakeChain()
    chain.mine(10)
    tracker = ChainTracker(chain, window=3)
    await tracker.sync()
    before = tracker.blocks
    chain.reorg(4, 5)
    with pytest.raises(ReorgTooDeep):
        await tracker.sync()
    assert tracker.blocks == before  # nothing changed


async def test_known_blocks_seed_the_window() -> None:
    chain = FakeChain()
    chain.mine(5)
    known = [BlockRef(h, chain.best[h]) for h in range(3, 6)]
    dropped, new = chain.reorg(1, 3)
    tracker = ChainTracker(chain, window=10, known=known)
    assert await tracker.sync() == [Disconnected(5, dropped[0])] + [Connected(5 + i, h) for i, h in enumerate(new)]
    with pytest.raises(ValueError, match="contiguous"):
        ChainTracker(chain, known=[known[0], known[2]])


async def test_header_that_does_not_hash_to_its_block_is_refused() -> None:
    chain = FakeChain()
    chain.mine(3)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    dropped, (new,) = chain.reorg(1, 1)
    chain.headers[new] = chain.headers[dropped[0]]
    with pytest.raises(BadHeader):
        await tracker.sync()


async def test_follow_survives_transient_errors() -> None:
    chain = FakeChain()
    chain.mine(2)
    tracker = ChainTracker(chain, window=10)
    await tracker.sync()
    chain.fail_next = RPCConnectionRefused("down")
    (new,) = chain.mine(1)
    wakeup = asyncio.Event()
    gen = tracker.follow(wakeup, poll_interval=60)
    first = asyncio.ensure_future(gen.__anext__())
    await asyncio.wait_for(chain.failed.wait(), 5)  # follow() ran its sync, which failed
    assert not first.done()
    wakeup.set()
    assert await asyncio.wait_for(first, 5) == Connected(3, new)
    await gen.aclose()


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[int, int]]:
    return draw(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5)), min_size=1, max_size=12))


@given(histories())
@settings(max_examples=60, deadline=None)
def test_events_replay_to_bitcoinds_chain(history: list[tuple[int, int]]) -> None:
    """Applying the reported events to the previous view always yields bitcoind's best chain."""

    async def run() -> None:
        chain = FakeChain()
        chain.mine(6)
        tracker = ChainTracker(chain, window=50)
        await tracker.sync()
        view = refs(chain, 0)
        for i, (depth, n) in enumerate(history):
            depth = min(depth, chain.height)  # never disconnect genesis
            chain.reorg(depth, n, tag=f"r{i}")
            events: list[ChainEvent] = await tracker.sync()
            for e in events:
                if isinstance(e, Disconnected):
                    assert view[-1] == (e.height, e.block_hash)
                    view.pop()
                else:
                    assert e.height == len(view)
                    view.append((e.height, e.block_hash))
            assert view == refs(chain, 0)

    asyncio.run(run())


# ---- real bitcoind ---------------------------------------------------------------------------------


@pytest.mark.regtest
async def test_invalidate_tip_then_mine_two(rpc: BitcoinRPC) -> None:
    await rpc.createwallet("miner")
    miner = rpc.for_wallet("miner")
    first = await miner.getnewaddress()
    old = await rpc.generatetoaddress(5, first)
    tracker = ChainTracker(rpc, window=20)
    assert await tracker.sync() == []
    assert tracker.tip == BlockRef(5, old[-1])

    await rpc.invalidateblock(old[-1])
    # A different address, so the replacement block cannot be identical to the invalidated one.
    new = await rpc.generatetoaddress(2, await miner.getnewaddress())
    events = await tracker.sync()
    assert events == [Disconnected(5, old[-1]), Connected(5, new[0]), Connected(6, new[1])]
    assert sum(isinstance(e, Disconnected) for e in events) == 1
    assert sum(isinstance(e, Connected) for e in events) == 2
    assert tracker.tip == BlockRef(6, await rpc.getbestblockhash())

    # reconsiderblock: the old branch (5 blocks to height 5) is shorter, so nothing changes.
    await rpc.reconsiderblock(old[-1])
    assert await tracker.sync() == []


class CountingRPC:
    """Wraps BitcoinRPC, counting tip reads (one per tracker sync)."""

    def __init__(self, rpc: BitcoinRPC) -> None:
        self.rpc = rpc
        self.tip_reads = 0

    async def getblockchaininfo(self) -> Any:
        info = await self.rpc.getblockchaininfo()
        self.tip_reads += 1  # counted once the tip has been read
        return info

    async def getblockheader(self, block_hash: bytes) -> bytes:
        return await self.rpc.getblockheader(block_hash)


@pytest.mark.regtest
async def test_follow_triggered_by_zmq_hashblock(bitcoind: BitcoindNode, rpc: BitcoinRPC, zmq_sync: Any,
                                                 poll_until: Any) -> None:
    await rpc.createwallet("miner")
    address = await rpc.for_wallet("miner").getnewaddress()
    counting = CountingRPC(rpc)
    tracker = ChainTracker(counting, window=20)
    wakeup = asyncio.Event()
    async with ZmqSubscriber({"hashblock": bitcoind.zmq_endpoint}, rpc) as sub:
        await zmq_sync(rpc, sub, address)
        await tracker.sync()

        async def pump() -> None:
            async for event in sub.events():
                if isinstance(event, BlockHashEvent):
                    wakeup.set()

        pump_task = asyncio.create_task(pump())
        follow = tracker.follow(wakeup, poll_interval=600)  # only ZMQ can wake it in time
        try:
            # Start following and let its first sync (nothing new) finish before mining, so
            # the blocks below can only be reported because a hashblock woke the tracker.
            first = asyncio.ensure_future(follow.__anext__())
            syncs = counting.tip_reads

            async def first_sync_done() -> bool:
                return counting.tip_reads > syncs

            await poll_until(first_sync_done, 5.0, "the first sync")
            hashes = await rpc.generatetoaddress(2, address)
            got = [await asyncio.wait_for(first, 10)]
            while len(got) < 2:
                got.append(await asyncio.wait_for(follow.__anext__(), 10))
            height = await rpc.getblockcount()
            assert got == [Connected(height - 1, hashes[0]), Connected(height, hashes[1])]
        finally:
            await follow.aclose()
            pump_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pump_task
