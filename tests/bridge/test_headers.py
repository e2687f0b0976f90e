"""Header store: synthetic chains ground to real proof of work (unit), the header file and l2-verify headers, and a
real bitcoind with invalidateblock reorgs (regtest). Real LMDB throughout."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bridge.headers as headers_mod
from bridge.chain_tracker import Connected, Disconnected
from bridge.headers import (ConcurrentSync, HeaderSourceError, HeaderStore, HeaderStoreFull, ReorgTooDeep,
                            StartNotInChain, StoreMismatch, UnknownHeight)
from bridge.rpc import BitcoinRPC
from bridge.rpc_errors import RPCConnectionRefused, RPCInvalidParameter
from bridge.zmq_sub import BlockHashEvent, ZmqSubscriber
from l2d.core.header_file import (MAGIC, CheckpointNotInFile, HeaderFileChecksum, HeaderFileEmpty,
                                  HeaderFileTrailingBytes, HeaderFileTruncated, HeaderFileUnknownChain,
                                  HeaderFileVersionError, HeaderFileWrongChain, NotAHeaderFile, load_header_file,
                                  write_header_file)
from l2d.core.spv import (BITCOIN_REGTEST, BadDifficulty, BadLink, BadProofOfWork, ChainParams, CheckpointMismatch,
                          Header, NegativeTarget, SpvError, TargetAboveLimit, TargetOverflow, TimeTooNew, TimeTooOld,
                          ZeroTarget, bits_to_target, block_work, calculate_next_bits, make_header, target_to_bits)
from regtest.harness import BitcoindNode
from verify_tool import cli

REPO = Path(__file__).resolve().parents[2]
_PACK = struct.Struct("<i32s32sIII")
LOW_LIMIT = BITCOIN_REGTEST.pow_limit
GENESIS_BITS = target_to_bits(LOW_LIMIT // 16)
T0 = 1_700_000_000
NOW = T0 + 10_000_000  # the "now" passed to every unit sync: well after every synthetic header


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


def grind(prev: bytes, root: bytes, t: int, bits: int, version: int = 4) -> Header:
    """A header that meets its own nBits."""
    target = bits_to_target(bits)
    base = _PACK.pack(version, prev, root, t, bits, 0)[:76]
    nonce = 0
    while True:
        raw = base + nonce.to_bytes(4, "little")
        h = _sha(raw)
        if int.from_bytes(h, "little") <= target:
            return Header(version, prev, root, t, bits, nonce, h)
        nonce += 1


def miss(prev: bytes, root: bytes, t: int, bits: int) -> Header:
    """A header whose hash is above the target of its nBits."""
    target = bits_to_target(bits)
    nonce = 0
    while True:
        h = make_header(4, prev, root, t, bits, nonce)
        if int.from_bytes(h.hash, "little") > target:
            return h
        nonce += 1


@pytest.fixture(scope="module")
def genesis() -> Header:
    return grind(b"\0" * 32, b"\x42" * 32, T0, GENESIS_BITS, version=1)


@pytest.fixture(scope="module")
def params(genesis: Header) -> ChainParams:
    """Mainnet's retarget rules with a 10-block period (so forks cross retargets) and a low proof-of-work limit.

    Named "regtest" only so that the header file can carry a chain name; the rules are the parameters'."""
    return ChainParams("regtest", LOW_LIMIT, genesis.hash, target_timespan=10 * 600, target_spacing=600)


def extend(params: ChainParams, chain: list[Header], count: int, spacing: int = 667, tag: bytes = b"a",
           bits_at: Optional[Callable[[int, int], int]] = None) -> list[Header]:
    """count headers after chain (chain[h] is the header at height h), following the retarget rules; bits_at may
    override the nBits at a height (given the correct value)."""
    full = list(chain)
    for _ in range(count):
        height = len(full)
        prev = full[-1]
        bits = prev.bits
        if height % params.interval == 0:
            bits = calculate_next_bits(params, prev.bits, prev.time - full[height - params.interval].time)
        if bits_at is not None:
            bits = bits_at(height, bits)
        full.append(grind(prev.hash, hashlib.sha256(tag + height.to_bytes(4, "big")).digest(), prev.time + spacing,
                          bits))
    return full[len(chain):]


@dataclass(frozen=True)
class Tip:
    blocks: int
    best_block_hash: bytes


class FakeBitcoind:
    """Serves a best chain of real (ground) headers through the three RPCs a sync uses."""

    def __init__(self, chain: list[Header]) -> None:
        self.raw: dict[bytes, bytes] = {}
        self.best: list[bytes] = []
        self.set_best(chain)
        self.fail_after: Optional[int] = None  # raise a transient RPC error after this many header reads
        self.header_reads = 0
        self.failures = 0

    def set_best(self, chain: list[Header]) -> None:
        for h in chain:
            self.raw[h.hash] = h.serialize()
        self.best = [h.hash for h in chain]

    async def getblockchaininfo(self) -> Tip:
        return Tip(len(self.best) - 1, self.best[-1])

    async def getblockheader(self, block_hash: bytes) -> bytes:
        self.header_reads += 1
        if self.fail_after is not None and self.header_reads > self.fail_after:
            self.failures += 1
            raise RPCConnectionRefused("bitcoind went away", method="getblockheader")
        return self.raw[block_hash]

    async def getblockhash(self, height: int) -> bytes:
        if not 0 <= height < len(self.best):
            raise RPCInvalidParameter("Block height out of range", code=-8, method="getblockhash")
        return self.best[height]


@pytest.fixture(scope="module")
def main_chain(genesis: Header, params: ChainParams) -> list[Header]:
    """Genesis and 40 headers: four retargets."""
    return [genesis] + extend(params, [genesis], 40)


@pytest.fixture
def store_factory(tmp_path: Path) -> Iterator[Callable[..., HeaderStore]]:
    opened: list[HeaderStore] = []

    def make(params: ChainParams, name: str = "btc_headers", **kw: object) -> HeaderStore:
        s = HeaderStore(tmp_path / name, params, **kw)  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield make
    for s in opened:
        try:
            s.close()
        except lmdb.Error:
            pass


def snapshot(store: HeaderStore) -> tuple[object, ...]:
    """Everything the read API shows, to compare before and after a failed sync."""
    tip = store.tip()
    if tip is None:
        return (None,)
    start = store.start
    assert start is not None
    return (tip, start, tuple(store.headers(start.height, tip.height)))


def assert_mirrors(store: HeaderStore, chain: list[Header]) -> None:
    tip = store.tip()
    assert tip is not None
    assert tip.height == len(chain) - 1
    assert tip.block_hash == chain[-1].hash
    assert tip.work == sum(block_work(bits_to_target(h.bits)) for h in chain)
    for height, h in enumerate(chain):
        assert store.hash_at(height) == h.hash
        assert store.header_at(height) == h.serialize()
        assert store.height_of(h.hash) == height
        assert store.depth(h.hash) == tip.height - height + 1
    assert store.headers(0, tip.height) == [h.serialize() for h in chain]
    assert store.hash_at(tip.height + 1) is None


# -- a valid chain ---------------------------------------------------------------------------------------------------
async def test_valid_chain_is_stored_and_persists(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                                  main_chain: list[Header]) -> None:
    btc = FakeBitcoind(main_chain[:21])
    store = store_factory(params)
    assert store.tip() is None and store.start is None
    r = await store.sync(btc, now=NOW)
    assert r.disconnected == ()
    assert r.connected == tuple(Connected(h, main_chain[h].hash) for h in range(1, 21))
    assert_mirrors(store, main_chain[:21])
    assert (await store.sync(btc, now=NOW)).connected == ()  # nothing new

    btc.set_best(main_chain)  # grows across two more retargets
    r = await store.sync(btc, now=NOW)
    assert [c.height for c in r.connected] == list(range(21, 41))
    assert_mirrors(store, main_chain)
    assert store.headers(5, 7) == [h.serialize() for h in main_chain[5:8]]
    with pytest.raises(UnknownHeight):
        store.header_at(41)
    with pytest.raises(UnknownHeight):
        store.headers(30, 41)
    with pytest.raises(UnknownHeight):
        store.headers(7, 5)
    assert store.height_of(b"\x11" * 32) is None and store.depth(b"\x11" * 32) == 0
    assert store.hash_at(-1) is None

    store.close()
    again = store_factory(params)
    assert_mirrors(again, main_chain)


async def test_start_at_a_checkpoint(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                     main_chain: list[Header]) -> None:
    btc = FakeBitcoind(main_chain)
    cp = main_chain[23]
    store = store_factory(params, start_height=23, start_hash=cp.hash)
    await store.sync(btc, now=NOW)
    tip = store.tip()
    assert tip is not None and tip.height == 40
    assert tip.work == sum(block_work(bits_to_target(h.bits)) for h in main_chain[23:])  # from the start, inclusive
    assert store.hash_at(22) is None and store.height_of(main_chain[22].hash) is None
    assert store.headers(23, 40) == [h.serialize() for h in main_chain[23:]]
    store.close()
    with pytest.raises(StoreMismatch):  # another start for the same database
        store_factory(params, start_height=0)
    with pytest.raises(StoreMismatch):
        store_factory(params, start_height=23, start_hash=main_chain[24].hash)
    with pytest.raises(StoreMismatch):  # another chain
        store_factory(BITCOIN_REGTEST, start_height=23)


async def test_checkpoint_start_keeps_the_context_below_it(
        store_factory: Callable[..., HeaderStore], params: ChainParams, main_chain: list[Header]) -> None:
    """Headers right after a checkpoint start meet the full median-time-past and exact-retarget rules: the store
    kept the timestamps below the start (authenticated by prev-hash from the trusted hash) when it was written."""
    btc = FakeBitcoind(main_chain[:24])
    store = store_factory(params, start_height=23, start_hash=main_chain[23].hash)  # period 20..29
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    stale = grind(main_chain[23].hash, b"\x56" * 32, _mtp(main_chain[:24]), main_chain[23].bits)
    btc.set_best(main_chain[:24] + [stale])
    with pytest.raises(TimeTooOld) as info:  # the median of heights 13..23: ten of them below the start
        await store.sync(btc, now=NOW)
    assert info.value.height == 24 and snapshot(store) == before
    wrong = main_chain[:30] + extend(params, main_chain[:30], 1, bits_at=lambda h, b: target_to_bits(
        bits_to_target(b) * 2))
    btc.set_best(wrong)
    with pytest.raises(BadDifficulty) as info2:  # exact retarget at 30 needs the time of height 20, below the start
        await store.sync(btc, now=NOW)
    assert info2.value.height == 30 and snapshot(store) == before
    btc.set_best(main_chain)
    await store.sync(btc, now=NOW)
    assert store.headers(23, 40) == [h.serialize() for h in main_chain[23:]]
    at_tip = store_factory(params, "at_tip", start_height=40, start_hash=main_chain[40].hash)
    r = await at_tip.sync(btc, now=NOW)  # the start is bitcoind's tip: only the start is written
    assert r.connected == () and at_tip.tip() == type(r.tip)(40, main_chain[40].hash,
                                                              block_work(bits_to_target(main_chain[40].bits)))
    assert at_tip.headers(40, 40) == [main_chain[40].serialize()]


async def test_start_must_be_bitcoinds(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                       genesis: Header, main_chain: list[Header]) -> None:
    btc = FakeBitcoind(main_chain)
    with pytest.raises(StartNotInChain):  # a checkpoint hash that is not bitcoind's block there
        await store_factory(params, "a", start_height=10, start_hash=main_chain[11].hash).sync(btc, now=NOW)
    with pytest.raises(StartNotInChain):  # above bitcoind's tip
        await store_factory(params, "b", start_height=41).sync(btc, now=NOW)
    other = grind(b"\0" * 32, b"\x43" * 32, T0, GENESIS_BITS, version=1)
    store = store_factory(params, "c")
    with pytest.raises(CheckpointMismatch):  # bitcoind on another chain: its genesis is not ours
        await store.sync(FakeBitcoind([other] + extend(params, [other], 3)), now=NOW)
    assert store.tip() is None and store.start is None


# -- invalid headers -------------------------------------------------------------------------------------------------
def _mtp(chain: list[Header]) -> int:
    return sorted(h.time for h in chain[-11:])[5]


def bad_headers(params: ChainParams, chain: list[Header]) -> list[tuple[str, type[SpvError], Header]]:
    """Each a header for the height after chain that breaks exactly one rule."""
    p = chain[-1]
    root = b"\x99" * 32
    t = p.time + 600
    mtp = _mtp(chain)
    return [
        ("hash above target", BadProofOfWork, miss(p.hash, root, t, p.bits)),
        ("target above limit", TargetAboveLimit, make_header(4, p.hash, root, t, 0x2100FFFF, 0)),
        ("negative target", NegativeTarget, make_header(4, p.hash, root, t, 0x20800001, 0)),
        ("zero target", ZeroTarget, make_header(4, p.hash, root, t, 0x20000000, 0)),
        ("overflowing target", TargetOverflow, make_header(4, p.hash, root, t, 0xFF123456, 0)),
        ("nBits changed mid-period", BadDifficulty,
         grind(p.hash, root, t, target_to_bits(bits_to_target(p.bits) // 2))),
        ("time = median time past", TimeTooOld, grind(p.hash, root, mtp, p.bits)),
        ("time > now + 2h", TimeTooNew, grind(p.hash, root, NOW + 7201, p.bits)),
    ]


async def test_every_invalid_header_is_rejected_and_nothing_stored(
        store_factory: Callable[..., HeaderStore], params: ChainParams, main_chain: list[Header]) -> None:
    base = main_chain[:16]
    btc = FakeBitcoind(base)
    store = store_factory(params)
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    good = main_chain[16:22]  # valid headers before the bad one, in the same sync: not stored either
    cases = bad_headers(params, main_chain[:22])
    assert 22 % params.interval != 0  # a mid-period height: the nBits rule is "unchanged"
    for name, error, bad in cases:
        btc.set_best(base + good + [bad])
        with pytest.raises(error) as info:
            await store.sync(btc, now=NOW)
        assert info.value.height == 22, name
        assert snapshot(store) == before, name
        assert store.height_of(good[0].hash) is None, name
        assert store.header_by_hash(bad.hash) is None and store.header_by_hash(good[-1].hash) is None, name
    # the retarget at height 30 after a sync that ended mid-period (25): nBits within the x4 bounds but not the
    # exact value, so only a store that rebuilt the period's first timestamp (height 20) from its own headers
    # catches it
    btc.set_best(main_chain[:26])
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    btc.set_best(main_chain[:30] + extend(params, main_chain[:30], 1, bits_at=lambda h, b: target_to_bits(
        bits_to_target(b) * 2)))
    with pytest.raises(BadDifficulty) as info:
        await store.sync(btc, now=NOW)
    assert info.value.height == 30
    assert snapshot(store) == before
    # and the valid chain is then accepted
    btc.set_best(main_chain)
    await store.sync(btc, now=NOW)
    assert_mirrors(store, main_chain)


async def test_checkpoint_link_and_source_errors(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                                 main_chain: list[Header]) -> None:
    fork = extend(params, main_chain[:12], 8, tag=b"fork")
    store = store_factory(params, checkpoints={15: main_chain[15].hash})
    btc = FakeBitcoind(main_chain[:12] + fork)  # a chain that passes every rule but the checkpoint at 15
    with pytest.raises(CheckpointMismatch):
        await store.sync(btc, now=NOW)
    assert store.tip() is None
    btc.set_best(main_chain[:12])
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    with pytest.raises(BadLink):  # apply() is the store's own entry point: headers must extend the fork point
        store.apply(11, [main_chain[13].serialize()], now=NOW)
    with pytest.raises(CheckpointMismatch):
        store.apply(11, [h.serialize() for h in fork], now=NOW)
    with pytest.raises(ConcurrentSync):
        store.apply(11, [main_chain[12].serialize()], now=NOW, expected_tip=main_chain[10].hash)
    with pytest.raises(UnknownHeight):
        store.apply(12, [], now=NOW)
    assert snapshot(store) == before
    btc.set_best(main_chain[:14])
    btc.raw[main_chain[13].hash] = main_chain[12].serialize()  # bitcoind answers with the wrong header
    with pytest.raises(HeaderSourceError):
        await store.sync(btc, now=NOW)
    assert snapshot(store) == before


# -- reorgs ----------------------------------------------------------------------------------------------------------
async def test_reorg_to_heavier_branch_rolls_back_and_replaces(
        store_factory: Callable[..., HeaderStore], params: ChainParams, main_chain: list[Header]) -> None:
    store = store_factory(params)
    old = main_chain[:31]
    btc = FakeBitcoind(old)
    await store.sync(btc, now=NOW)
    branch = extend(params, main_chain[:25], 10, spacing=600, tag=b"b")  # forks at 24, retargets at 30
    new = main_chain[:25] + branch
    btc.set_best(new)
    r = await store.sync(btc, now=NOW)
    assert r.disconnected == tuple(Disconnected(h, old[h].hash) for h in range(30, 24, -1))
    assert r.connected == tuple(Connected(h, new[h].hash) for h in range(25, 35))
    assert r.tip == store.tip()
    assert_mirrors(store, new)
    for h in old[25:]:
        assert store.height_of(h.hash) is None and store.depth(h.hash) == 0
        assert store.header_by_hash(h.hash) is not None  # kept, just not on the best chain
    # back to the first branch, grown heavier: the same headers connect again
    btc.set_best(main_chain)
    r = await store.sync(btc, now=NOW)
    assert [d.height for d in r.disconnected] == list(range(34, 24, -1))
    assert_mirrors(store, main_chain)
    # bitcoind drops its tip (invalidateblock): disconnect only, followed although the work is less
    btc.set_best(main_chain[:38])
    r = await store.sync(btc, now=NOW)
    assert r.connected == () and [d.height for d in r.disconnected] == [40, 39, 38]
    assert_mirrors(store, main_chain[:38])


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 8)), min_size=1, max_size=8))
@settings(max_examples=25, deadline=None)
def test_any_history_of_reorgs_is_mirrored(params: ChainParams, main_chain: list[Header],
                                           history: list[tuple[int, int]]) -> None:
    """After every sync, through any sequence of reorgs (drop depth blocks, mine n others), the store holds
    exactly bitcoind's best chain, the work of every header, and nothing of the abandoned branches."""

    async def run(d: Path) -> None:
        best = main_chain[:12]
        btc = FakeBitcoind(best)
        store = HeaderStore(d / "h", params)
        try:
            await store.sync(btc, now=NOW)
            for i, (depth, n) in enumerate(history):
                depth = min(depth, len(best) - 1)
                base = best[:len(best) - depth]
                best = base + extend(params, base, n, spacing=500 + 97 * i, tag=b"r%d" % i)
                btc.set_best(best)
                r = await store.sync(btc, now=NOW)
                assert r.tip == store.tip()
                assert_mirrors(store, best)
        finally:
            store.close()

    with tempfile.TemporaryDirectory() as d:
        asyncio.run(run(Path(d)))


async def test_reorg_branch_held_to_context_from_before_the_fork(
        store_factory: Callable[..., HeaderStore], params: ChainParams, main_chain: list[Header]) -> None:
    """The first header after a fork point must beat the median time past of the 11 stored headers before it."""
    store = store_factory(params)
    btc = FakeBitcoind(main_chain[:30])
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    stale = grind(main_chain[24].hash, b"\x55" * 32, _mtp(main_chain[:25]), main_chain[24].bits)
    btc.set_best(main_chain[:25] + [stale] + extend(params, main_chain[:25] + [stale], 6))
    with pytest.raises(TimeTooOld) as info:
        await store.sync(btc, now=NOW)
    assert info.value.height == 25
    assert snapshot(store) == before


async def test_min_difficulty_context_after_a_special_block(store_factory: Callable[..., HeaderStore],
                                                            genesis: Header) -> None:
    """Testnet's 20-minute rule: after a min-difficulty block, nBits return to the last normal value, which the
    store must find by walking back over its own headers when a sync starts right after the special block."""
    params = ChainParams("testnet", LOW_LIMIT, genesis.hash, target_timespan=10 * 600, target_spacing=600,
                         allow_min_difficulty=True)
    chain = [genesis] + extend(params, [genesis], 22)
    special = grind(chain[-1].hash, b"\x23" * 32, chain[-1].time + 1201, params.pow_limit_bits)  # 20 min later
    chain.append(special)
    store = store_factory(params)
    btc = FakeBitcoind(chain)
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    normal = chain[22].bits
    assert normal != params.pow_limit_bits
    easier = grind(special.hash, b"\x24" * 32, special.time + 600, target_to_bits(bits_to_target(normal) * 2))
    btc.set_best(chain + [easier])
    with pytest.raises(BadDifficulty) as info:
        await store.sync(btc, now=NOW)
    assert info.value.height == 24 and snapshot(store) == before
    good = grind(special.hash, b"\x24" * 32, special.time + 600, normal)
    btc.set_best(chain + [good])
    await store.sync(btc, now=NOW)
    assert_mirrors(store, chain + [good])


async def test_reorg_deeper_than_the_window(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                            main_chain: list[Header]) -> None:
    store = store_factory(params, reorg_window=5)
    btc = FakeBitcoind(main_chain[:31])
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    btc.set_best(main_chain[:21] + extend(params, main_chain[:21], 15, tag=b"deep"))
    with pytest.raises(ReorgTooDeep):
        await store.sync(btc, now=NOW)
    assert snapshot(store) == before


# -- crash safety ----------------------------------------------------------------------------------------------------
async def test_failures_mid_sync_leave_the_previous_tip(
        store_factory: Callable[..., HeaderStore], params: ChainParams, main_chain: list[Header],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = store_factory(params)
    old = main_chain[:31]
    btc = FakeBitcoind(old)
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    new = main_chain[:25] + extend(params, main_chain[:25], 12, tag=b"c")
    btc.set_best(new)

    # bitcoind goes away halfway through the walk back
    btc.header_reads, btc.fail_after = 0, 5
    with pytest.raises(RPCConnectionRefused):
        await store.sync(btc, now=NOW)
    assert snapshot(store) == before
    btc.fail_after = None

    # an exception inside the write transaction, after the disconnects and three connects were written
    real_entry = headers_mod._entry
    calls = []

    def failing_entry(raw: bytes, height: int, work: int) -> bytes:
        calls.append(height)
        if len(calls) > 3:
            raise OSError("disk on fire")
        return real_entry(raw, height, work)

    monkeypatch.setattr(headers_mod, "_entry", failing_entry)
    with pytest.raises(OSError, match="disk on fire"):
        await store.sync(btc, now=NOW)
    assert calls == [25, 26, 27, 28]
    assert snapshot(store) == before
    assert all(store.header_by_hash(h.hash) is None for h in new[25:])
    monkeypatch.undo()

    await store.sync(btc, now=NOW)
    assert_mirrors(store, new)


async def test_cancelled_sync_finishes_its_write(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                                main_chain: list[Header]) -> None:
    """Cancellation (shutdown) while the write is under way does not abandon it halfway: the caller sees
    CancelledError, the writer thread still commits the whole sync."""
    store = store_factory(params)
    btc = FakeBitcoind(main_chain[:11])
    await store.sync(btc, now=NOW)
    btc.set_best(main_chain)
    entered, release = threading.Event(), threading.Event()
    real_write = store._write

    def gated_write(*args: object) -> object:
        entered.set()
        release.wait(60)
        return real_write(*args)  # type: ignore[arg-type]

    store._write = gated_write  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(store.sync(btc, now=NOW))
    deadline = time.monotonic() + 30
    while not entered.is_set():  # the writer thread has the sync's write in hand
        assert time.monotonic() < deadline, "the sync never reached its write"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.get_running_loop().run_in_executor(store._writer, lambda: None)  # the writer's queue is FIFO
    assert_mirrors(store, main_chain)


async def test_map_full_aborts_the_whole_sync(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                              genesis: Header) -> None:
    """A real LMDB failure (the map is full) in the middle of a large sync: all of it or none of it."""
    chain = [genesis] + extend(params, [genesis], 1500, tag=b"big")
    btc = FakeBitcoind(chain[:11])
    store = store_factory(params, map_size=128 << 10)
    await store.sync(btc, now=NOW)
    before = snapshot(store)
    btc.set_best(chain)
    with pytest.raises(HeaderStoreFull, match=r"store\.map_size") as exc:
        await store.sync(btc, now=NOW)
    assert isinstance(exc.value.__cause__, lmdb.MapFullError)
    assert snapshot(store) == before
    store.close()
    bigger = store_factory(params, map_size=64 << 20)
    assert snapshot(bigger) == before
    await bigger.sync(btc, now=NOW)
    assert_mirrors(bigger, chain)


# -- export and load -------------------------------------------------------------------------------------------------
async def _synced(store_factory: Callable[..., HeaderStore], params: ChainParams,
                  chain: list[Header]) -> HeaderStore:
    store = store_factory(params)
    await store.sync(FakeBitcoind(chain), now=NOW)
    return store


async def test_export_load_round_trip(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                      main_chain: list[Header], tmp_path: Path) -> None:
    store = await _synced(store_factory, params, main_chain)
    tip = store.tip()
    assert tip is not None
    path = tmp_path / "all.hdrs"
    ex = store.export(path)
    assert (ex.start_height, ex.count, ex.tip_hash) == (0, 41, tip.block_hash)
    data = path.read_bytes()
    assert data.startswith(MAGIC) and len(data) == 8 + 2 + len("regtest") + 16 + 41 * 80 + 32
    for batch in (1, 3, 2000):  # streamed in batches: the result does not depend on the batch size
        loaded = load_header_file(io.BytesIO(data), now=NOW, params=params, batch=batch)
        assert (loaded.tip_height, loaded.tip_hash, loaded.work, loaded.count) == (40, tip.block_hash, tip.work, 41)
        assert loaded.checksum == ex.checksum == hashlib.sha256(data[:-32]).digest()
    # a middle range, from a checkpoint
    part = tmp_path / "part.hdrs"
    store.export(part, 12, 33)
    loaded = load_header_file(io.BytesIO(part.read_bytes()), now=NOW, params=params,
                              checkpoint=(12, main_chain[12].hash))
    assert (loaded.start_height, loaded.start_hash, loaded.tip_height) == (12, main_chain[12].hash, 33)
    assert loaded.work == sum(block_work(bits_to_target(h.bits)) for h in main_chain[12:34])
    load_header_file(io.BytesIO(part.read_bytes()), now=NOW, params=params, checkpoint=(20, main_chain[20].hash))
    with pytest.raises(CheckpointMismatch):
        load_header_file(io.BytesIO(part.read_bytes()), now=NOW, params=params, checkpoint=(20, main_chain[21].hash))
    with pytest.raises(CheckpointNotInFile):
        load_header_file(io.BytesIO(part.read_bytes()), now=NOW, params=params, checkpoint=(34, main_chain[34].hash))
    with pytest.raises(TimeTooNew):  # "now" is the loader's argument too
        load_header_file(io.BytesIO(part.read_bytes()), now=T0, params=params)
    with pytest.raises(UnknownHeight):
        store.export(tmp_path / "x.hdrs", 30, 41)
    assert not (tmp_path / "x.hdrs").exists() and not (tmp_path / "x.hdrs.tmp").exists()


async def test_damaged_files_fail_with_typed_errors(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                                    main_chain: list[Header], tmp_path: Path) -> None:
    store = await _synced(store_factory, params, main_chain[:13])
    path = tmp_path / "h.hdrs"
    store.export(path)
    data = path.read_bytes()
    pre = 8 + 2 + 7 + 16

    def load(b: bytes, **kw: object) -> object:
        return load_header_file(io.BytesIO(b), now=NOW, params=params, **kw)  # type: ignore[arg-type]

    for n in range(len(data)):  # every truncation
        with pytest.raises(HeaderFileTruncated):
            load(data[:n])
    with pytest.raises(HeaderFileTrailingBytes):
        load(data + b"\0")
    for pos in range(pre, len(data) - 32, 7):  # a flipped bit in any header breaks a consensus rule
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(SpvError):
            load(bytes(bad))
    bad = bytearray(data)
    bad[-1] ^= 0x80
    with pytest.raises(HeaderFileChecksum):
        load(bytes(bad))
    with pytest.raises(NotAHeaderFile):
        load(b"L2DSNAP\0" + data[8:])
    with pytest.raises(HeaderFileVersionError):
        load(data[:8] + b"\x02" + data[9:])
    with pytest.raises(HeaderFileUnknownChain):
        load(data[:10] + b"regtesu" + data[17:])
    with pytest.raises(HeaderFileWrongChain):
        load(data, require_chain="mainnet")
    with pytest.raises(HeaderFileEmpty):
        load(data[:pre - 8] + bytes(8) + data[-32:])
    with pytest.raises(HeaderFileTrailingBytes):  # count one lower: the last header reads as checksum, then extra
        load(data[:pre - 8] + (12).to_bytes(8, "big") + data[pre:])


# -- l2-verify headers -----------------------------------------------------------------------------------------------
REGTEST_GENESIS = make_header(1, b"\0" * 32, bytes.fromhex(
    "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")[::-1], 1296688602, 0x207FFFFF, 2)


@pytest.fixture(scope="module")
def regtest_chain() -> list[Header]:
    """Bitcoin's regtest genesis and 30 headers under BITCOIN_REGTEST's own rules (real chain parameters)."""
    chain = [REGTEST_GENESIS]
    for height in range(1, 31):
        chain.append(grind(chain[-1].hash, height.to_bytes(32, "little"), REGTEST_GENESIS.time + 600 * height,
                           0x207FFFFF))
    return chain


def run_cli(*args: str) -> tuple[int, dict[str, object]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([*args, "--json"])
    return code, json.loads(out.getvalue())


async def test_l2_verify_headers(store_factory: Callable[..., HeaderStore], regtest_chain: list[Header],
                                 tmp_path: Path) -> None:
    store = await _synced(store_factory, BITCOIN_REGTEST, regtest_chain)
    path = tmp_path / "r.hdrs"
    store.export(path)
    tip = regtest_chain[-1]
    code, out = run_cli("headers", str(path))
    assert code == 0 and out["ok"] is True
    assert (out["chain"], out["start_height"], out["tip_height"], out["count"]) == ("regtest", 0, 30, 31)
    assert out["tip_hash"] == tip.hash_hex and out["trusted_start"] == "genesis"
    assert int(str(out["work"]), 16) == 31 * block_work(bits_to_target(0x207FFFFF))
    code, out = run_cli("headers", str(path), "--chain", "regtest", "--checkpoint", f"20:{regtest_chain[20].hash_hex}")
    assert code == 0, out

    part = tmp_path / "p.hdrs"
    store.export(part, 10, 30)
    assert run_cli("headers", str(part), "--checkpoint", f"10:{regtest_chain[10].hash_hex}")[0] == 0
    code, out = run_cli("headers", str(part), "--checkpoint", f"12:{regtest_chain[11].hash_hex}")
    assert (code, out["error_type"], out["height"]) == (1, "CheckpointMismatch", 12)
    code, out = run_cli("headers", str(part), "--checkpoint", f"5:{regtest_chain[5].hash_hex}")
    assert (code, out["error_type"]) == (1, "CheckpointNotInFile")

    data = path.read_bytes()
    at = 33 + 5 * 80 + 40  # in the merkle root of the header at height 5
    (tmp_path / "pow.hdrs").write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    code, out = run_cli("headers", str(tmp_path / "pow.hdrs"))
    assert code == 1 and out["error_type"] in ("BadProofOfWork", "BadLink")
    assert out["height"] in (5, 6)  # its own proof of work, or the next header's link to it
    (tmp_path / "gen.hdrs").write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    assert run_cli("headers", str(tmp_path / "gen.hdrs"))[1]["error_type"] == "CheckpointMismatch"  # not genesis
    (tmp_path / "sum.hdrs").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert run_cli("headers", str(tmp_path / "sum.hdrs"))[1]["error_type"] == "HeaderFileChecksum"
    (tmp_path / "cut.hdrs").write_bytes(data[:-40])
    code, out = run_cli("headers", str(tmp_path / "cut.hdrs"))
    assert (code, out["error_type"]) == (2, "HeaderFileTruncated")
    assert run_cli("headers", str(path), "--chain", "mainnet")[0] == 2
    assert run_cli("headers", str(tmp_path / "absent.hdrs"))[1]["error_type"] == "io-error"
    code, out = run_cli("headers", str(path), "--checkpoint", "20:zz")
    assert (code, out["error_type"]) == (2, "bad-argument")
    code, out = run_cli("headers")
    assert (code, out["command"], out["error_type"]) == (2, "headers", "usage")


def test_l2_verify_headers_imports_no_database_or_network(tmp_path: Path, regtest_chain: list[Header]) -> None:
    path = tmp_path / "r.hdrs"
    with path.open("wb") as f:
            write_header_file(f, "regtest", 0, len(regtest_chain), (h.serialize() for h in regtest_chain))
    code = ("import sys; from verify_tool import cli; rc = cli.main(['headers', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('lmdb', 'aiohttp', 'zmq', 'bridge.headers', 'bridge.rpc', 'l2d.store') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 []"


# -- real bitcoind ---------------------------------------------------------------------------------------------------
@pytest.mark.regtest
async def test_follows_bitcoind_through_invalidateblock(rpc: BitcoinRPC, tmp_path: Path) -> None:
    await rpc.createwallet("miner")
    miner = rpc.for_wallet("miner")
    await rpc.generatetoaddress(150, await miner.getnewaddress())  # crosses regtest's 144-block period
    store = HeaderStore(tmp_path / "btc_headers", BITCOIN_REGTEST)
    try:
        async def check_mirrors_bitcoind() -> int:
            info = await rpc.getblockchaininfo()
            tip = store.tip()
            assert tip is not None and (tip.height, tip.block_hash) == (info.blocks, info.best_block_hash)
            for h in range(info.blocks + 1):
                assert store.hash_at(h) == await rpc.getblockhash(h), h
            verbose = await rpc.call("getblockheader", [info.best_block_hash_hex, True])
            assert tip.work == int(verbose["chainwork"], 16)  # from genesis: bitcoind's own chainwork
            return info.blocks

        r = await store.sync(rpc, now=int(time.time()))
        assert len(r.connected) == 150
        assert await check_mirrors_bitcoind() == 150

        victim = await rpc.getblockhash(146)
        await rpc.invalidateblock(victim)  # 146..150 leave bitcoind's best chain
        r = await store.sync(rpc, now=int(time.time()))
        assert [d.height for d in r.disconnected] == [150, 149, 148, 147, 146] and r.connected == ()
        assert await check_mirrors_bitcoind() == 145
        new = await rpc.generatetoaddress(8, await miner.getnewaddress())  # a longer branch
        r = await store.sync(rpc, now=int(time.time()))
        assert r.connected == tuple(Connected(146 + i, h) for i, h in enumerate(new))
        assert await check_mirrors_bitcoind() == 153
        assert store.height_of(victim) is None and store.depth(victim) == 0
        assert store.depth(new[0]) == 8

        # a reorg in one sync: invalidate two, mine three
        old_tip = await rpc.getbestblockhash()
        await rpc.invalidateblock(new[-2])
        newer = await rpc.generatetoaddress(3, await miner.getnewaddress())
        r = await store.sync(rpc, now=int(time.time()))
        assert r.disconnected == (Disconnected(153, old_tip), Disconnected(152, new[-2]))
        assert [c.block_hash for c in r.connected] == newer
        assert await check_mirrors_bitcoind() == 154
        assert store.height_of(old_tip) is None

        path = tmp_path / "regtest.hdrs"
        store.export(path)
        cp = f"100:{(await rpc.getblockhash(100))[::-1].hex()}"
        res = subprocess.run([sys.executable, "-m", "verify_tool.cli", "headers", str(path), "--chain", "regtest",
                              "--checkpoint", cp, "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        out = json.loads(res.stdout)
        tip = store.tip()
        assert tip is not None
        assert (out["tip_height"], out["tip_hash"], int(out["work"], 16)) == (154, tip.block_hash_hex, tip.work)

        # a second store from a checkpoint: the same chain from there, work counted from the checkpoint
        cp_hash = await rpc.getblockhash(140)
        wrong = HeaderStore(tmp_path / "wrong", BITCOIN_REGTEST, start_height=140,
                            start_hash=await rpc.getblockhash(141))
        try:
            with pytest.raises(StartNotInChain):
                await wrong.sync(rpc, now=int(time.time()))
            assert wrong.tip() is None
        finally:
            wrong.close()
        from_cp = HeaderStore(tmp_path / "from_cp", BITCOIN_REGTEST, start_height=140, start_hash=cp_hash)
        try:
            await from_cp.sync(rpc, now=int(time.time()))
            assert from_cp.headers(140, 154) == store.headers(140, 154)
            assert from_cp.hash_at(139) is None
            below = await rpc.call("getblockheader", [(await rpc.getblockhash(139))[::-1].hex(), True])
            cp_tip = from_cp.tip()
            assert cp_tip is not None and cp_tip.work == tip.work - int(below["chainwork"], 16)
        finally:
            from_cp.close()
    finally:
        store.close()


def test_docs_worked_example(tmp_path: Path) -> None:
    """docs/header-file.md's example is what write_header_file produces, and l2-verify accepts it as documented."""
    doc = (REPO / "docs" / "header-file.md").read_text()
    block = doc.split("## Worked example", 1)[1].split("```", 2)[1]
    example = bytes.fromhex("".join(block.split()))
    out = io.BytesIO()
    write_header_file(out, "regtest", 0, 1, [REGTEST_GENESIS.serialize()])
    assert out.getvalue() == example and len(example) == 145
    assert REGTEST_GENESIS.hash == BITCOIN_REGTEST.genesis_hash
    path = tmp_path / "genesis.hdrs"
    path.write_bytes(example)
    code, res = run_cli("headers", str(path))
    assert code == 0 and res["work"] == "0x2" and res["tip_hash"] == REGTEST_GENESIS.hash_hex
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["headers", str(path)]) == 0
    assert buf.getvalue().strip() == (f"OK headers regtest 0..0 (1 headers, tip {REGTEST_GENESIS.hash_hex}, work 0x2) "
                                      f"linked from genesis")


async def test_follow_syncs_on_each_wakeup(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                           main_chain: list[Header]) -> None:
    store = store_factory(params)
    btc = FakeBitcoind(main_chain[:6])
    wakeup = asyncio.Event()
    clock_reads: list[int] = []

    def clock() -> float:
        clock_reads.append(NOW)
        return NOW

    gen = store.follow(btc, wakeup, clock, poll_interval=3600)
    first = await gen.__anext__()  # the first sync runs at once
    assert first.tip.height == 5
    btc.set_best(main_chain[:9])
    btc.fail_after, btc.header_reads = 0, 0  # a transient failure: logged, retried on the next wake-up
    wakeup.set()

    async def heal() -> None:
        deadline = time.monotonic() + 30
        while not btc.failures:
            assert time.monotonic() < deadline, "the failing sync never ran"
            await asyncio.sleep(0.01)
        btc.fail_after = None
        wakeup.set()

    healer = asyncio.create_task(heal())
    second = await gen.__anext__()
    await healer
    assert btc.failures == 1 and [c.height for c in second.connected] == [6, 7, 8]
    assert len(clock_reads) == 3  # one "now" per sync, read at the boundary
    btc.set_best(main_chain[:9] + [miss(main_chain[8].hash, b"\x01" * 32, main_chain[8].time + 600,
                                        main_chain[8].bits)])
    wakeup.set()
    with pytest.raises(BadProofOfWork):  # a rule failure ends the iteration
        await gen.__anext__()
    tip = store.tip()
    assert tip is not None and tip.height == 8
    await gen.aclose()


@pytest.mark.regtest
async def test_follow_woken_by_zmq_hashblock(bitcoind: BitcoindNode, rpc: BitcoinRPC, zmq_sync: Any,
                                             tmp_path: Path) -> None:
    """ZMQ is only the trigger: a hashblock wakes follow(), which re-reads the chain over RPC."""
    await rpc.createwallet("miner")
    address = await rpc.for_wallet("miner").getnewaddress()
    store = HeaderStore(tmp_path / "btc_headers", BITCOIN_REGTEST)
    wakeup = asyncio.Event()
    async with ZmqSubscriber({"hashblock": bitcoind.zmq_endpoint}, rpc) as sub:
        await zmq_sync(rpc, sub, address)

        async def pump() -> None:
            async for event in sub.events():
                if isinstance(event, BlockHashEvent):
                    wakeup.set()

        pump_task = asyncio.create_task(pump())
        follow = store.follow(rpc, wakeup, time.time, poll_interval=600)  # only ZMQ can wake it in time
        try:
            first = await asyncio.wait_for(follow.__anext__(), 30)  # the initial sync, at once
            assert first.tip.height == await rpc.getblockcount()
            hashes = await rpc.generatetoaddress(3, address)
            got: list[Connected] = []
            while len(got) < 3:
                got += (await asyncio.wait_for(follow.__anext__(), 30)).connected
            assert [c.block_hash for c in got] == hashes
            tip = store.tip()
            assert tip is not None and tip.block_hash == hashes[-1]
        finally:
            await follow.aclose()
            pump_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pump_task
            store.close()


async def test_a_long_sync_logs_its_progress(store_factory: Callable[..., HeaderStore], params: ChainParams,
                                             main_chain: list[Header], monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Each header fetched past PROGRESS_EVERY_S of (a fake) clock logs how many of how many."""
    ticks = iter(range(0, 10_000, 5))
    monkeypatch.setattr(headers_mod, "_now", lambda: float(next(ticks)))
    store = store_factory(params)
    with caplog.at_level(logging.INFO, logger="bridge.headers"):
        await store.sync(FakeBitcoind(main_chain), now=NOW)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("header sync:")]
    assert progress and all("headers fetched" in m for m in progress)
    assert f"bitcoind's tip at height {len(main_chain) - 1}" in progress[-1]
