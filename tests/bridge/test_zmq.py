"""ZMQ subscriber: pure frame parsing and sequence checks, a local publisher, and a real bitcoind."""
from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import zmq
import zmq.asyncio
from bitcoin.core import CBlock

from bridge.rpc import BitcoinRPC
from bridge.zmq_sub import (
    BlockHashEvent,
    RawBlockEvent,
    RawTxEvent,
    ResyncEvent,
    SeqStatus,
    SequenceEvent,
    SequenceLabel,
    TxHashEvent,
    ZmqDecoder,
    ZmqEvent,
    ZmqMessageError,
    ZmqSubscriber,
    check_sequence,
    parse_message,
    sha256d,
)
from regtest.harness import BitcoindNode, fund_wallet, free_ports


def seq(n: int) -> bytes:
    return struct.pack("<I", n)


H = bytes(range(32))  # internal order; bitcoind sends it reversed


# ---- pure parsing --------------------------------------------------------------------------------


def test_parse_each_topic() -> None:
    _, e = parse_message([b"hashblock", H[::-1], seq(7)])
    assert e == BlockHashEvent(H, 7) and e.block_hash_hex == H[::-1].hex()
    _, e = parse_message([b"hashtx", H[::-1], seq(0)])
    assert e == TxHashEvent(H, 0)
    header = bytes(80)
    _, e = parse_message([b"rawblock", header + b"\x00", seq(1)])
    assert isinstance(e, RawBlockEvent) and e.header == header and e.block_hash == sha256d(header)
    _, e = parse_message([b"rawtx", bytes(60), seq(2)])
    assert isinstance(e, RawTxEvent) and e.raw_tx == bytes(60)
    _, e = parse_message([b"sequence", H[::-1] + b"C", seq(3)])
    assert e == SequenceEvent(H, SequenceLabel.BLOCK_CONNECTED, None, 3)
    _, e = parse_message([b"sequence", H[::-1] + b"A" + struct.pack("<Q", 99), seq(4)])
    assert e == SequenceEvent(H, SequenceLabel.TX_ADDED, 99, 4)
    topic, e = parse_message([b"sequence", H[::-1] + b"R" + struct.pack("<Q", 2**64 - 1), seq(2**32 - 1)])
    assert topic == "sequence" and e == SequenceEvent(H, SequenceLabel.TX_REMOVED, 2**64 - 1, 2**32 - 1)


@pytest.mark.parametrize(
    "frames",
    [
        [b"hashblock", H],  # two frames
        [b"hashblock", H, seq(1), b"extra"],  # four frames
        [b"hashblock", H, b"\x01\x00\x00"],  # 3-byte sequence
        [b"hashblock", H[:31], seq(1)],
        [b"hashtx", H + b"\x00", seq(1)],
        [b"rawblock", bytes(80), seq(1)],
        [b"rawtx", b"\x01", seq(1)],
        [b"sequence", H, seq(1)],  # no label
        [b"sequence", H + b"X", seq(1)],  # unknown label
        [b"sequence", H + b"C" + bytes(8), seq(1)],  # C carries no mempool sequence
        [b"sequence", H + b"A", seq(1)],  # A needs one
        [b"hashwhat", H, seq(1)],
        [b"\xff\xfe", H, seq(1)],
    ],
)
def test_malformed_messages_rejected(frames: list[bytes]) -> None:
    with pytest.raises(ZmqMessageError):
        parse_message(frames)


def test_check_sequence() -> None:
    assert check_sequence(None, 5).status is SeqStatus.FIRST
    assert check_sequence(5, 6).status is SeqStatus.OK
    gap = check_sequence(5, 9)
    assert gap.status is SeqStatus.GAP and gap.expected == 6 and gap.missed == 3
    assert check_sequence(2**32 - 1, 0).status is SeqStatus.OK  # wraps
    assert check_sequence(2**32 - 2, 1).missed == 2
    assert check_sequence(5, 5).status is SeqStatus.RESET  # duplicate
    assert check_sequence(500, 0).status is SeqStatus.RESET  # publisher restarted


def test_decoder_tracks_sequences_per_topic_and_flags_gaps() -> None:
    d = ZmqDecoder()
    ok = [
        [b"hashblock", H, seq(10)],
        [b"rawtx", bytes(60), seq(0)],
        [b"hashblock", H, seq(11)],
        [b"rawtx", bytes(60), seq(1)],
    ]
    for frames in ok:
        r = d.feed(frames)
        assert r.event is not None and r.resync_reason is None
    r = d.feed([b"hashblock", H, seq(13)])  # 12 lost
    assert isinstance(r.event, BlockHashEvent) and r.resync_reason and "gap" in r.resync_reason
    assert d.feed([b"hashblock", H, seq(14)]).resync_reason is None  # continues from the new number
    r = d.feed([b"rawtx", b"", seq(2)])
    assert r.event is None and r.topic == "rawtx" and "malformed" in (r.resync_reason or "")
    r = d.feed([b"rawtx", bytes(60)])
    assert r.event is None and r.resync_reason


# ---- the subscriber against a local publisher (no bitcoind) --------------------------------------------


@dataclass(frozen=True)
class FakeTip:
    blocks: int
    best_block_hash: bytes


class FakeRPC:
    def __init__(self) -> None:
        self.calls = 0

    async def getblockchaininfo(self) -> FakeTip:
        self.calls += 1
        return FakeTip(123, H)


async def recv_within(sub: ZmqSubscriber, timeout: float = 5.0) -> ZmqEvent:
    return await asyncio.wait_for(sub.recv(), timeout)


async def test_subscriber_resyncs_over_rpc_after_gap_and_garbage() -> None:
    (port,) = free_ports(1)
    endpoint = f"tcp://127.0.0.1:{port}"
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(endpoint)
    rpc = FakeRPC()
    resyncs: list[ResyncEvent] = []

    async def on_resync(e: ResyncEvent) -> None:
        resyncs.append(e)

    try:
        async with ZmqSubscriber({"hashblock": endpoint}, rpc, on_resync=on_resync) as sub:
            # Sync up: publish until the subscription has reached the publisher.
            n = 0
            deadline = time.monotonic() + 5
            while True:
                await pub.send_multipart([b"hashblock", H, seq(n)])
                n += 1
                try:
                    first = await asyncio.wait_for(sub.recv(), 0.1)
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "subscriber never connected"
            assert isinstance(first, BlockHashEvent)
            last = first.seq
            # Drain probes that were already in flight.
            while last < n - 1:
                e = await recv_within(sub)
                assert isinstance(e, BlockHashEvent) and e.seq == last + 1
                last = e.seq
            await pub.send_multipart([b"hashblock", H, seq(last + 1)])
            assert await recv_within(sub) == BlockHashEvent(H[::-1], last + 1)
            # Lose two messages: a resync (tip re-read over RPC) comes before the event.
            await pub.send_multipart([b"hashblock", H, seq(last + 4)])
            r = await recv_within(sub)
            assert isinstance(r, ResyncEvent) and "gap" in r.reason
            assert r.best_block_hash == H and r.height == 123 and rpc.calls == 1
            assert await recv_within(sub) == BlockHashEvent(H[::-1], last + 4)
            # A two-frame message: resync, and nothing else yielded for it.
            await pub.send_multipart([b"hashblock", H])
            await pub.send_multipart([b"hashblock", H, seq(last + 5)])
            r = await recv_within(sub)
            assert isinstance(r, ResyncEvent) and "malformed" in r.reason
            assert await recv_within(sub) == BlockHashEvent(H[::-1], last + 5)
            assert resyncs and len(resyncs) == 2 == sub.resyncs
    finally:
        pub.close(linger=0)
        ctx.term()


async def test_subscriber_with_two_endpoints() -> None:
    ports = free_ports(2)
    endpoints = {"hashblock": f"tcp://127.0.0.1:{ports[0]}", "rawtx": f"tcp://127.0.0.1:{ports[1]}"}
    ctx = zmq.asyncio.Context()
    pubs = {}
    for topic, endpoint in endpoints.items():
        pubs[topic] = ctx.socket(zmq.PUB)
        pubs[topic].setsockopt(zmq.LINGER, 0)
        pubs[topic].bind(endpoint)
    bodies = {"hashblock": H, "rawtx": bytes(60)}
    try:
        async with ZmqSubscriber(endpoints, FakeRPC()) as sub:
            seen: set[type] = set()
            counters = {"hashblock": 0, "rawtx": 0}
            deadline = time.monotonic() + 5
            while len(seen) < 2:  # sync up both sockets
                assert time.monotonic() < deadline, "subscriber never connected to both publishers"
                for topic, pub in pubs.items():
                    await pub.send_multipart([topic.encode(), bodies[topic], seq(counters[topic])])
                    counters[topic] += 1
                try:
                    e = await asyncio.wait_for(sub.recv(), 0.1)
                except TimeoutError:
                    continue
                assert not isinstance(e, ResyncEvent)
                seen.add(type(e))
            assert seen == {BlockHashEvent, RawTxEvent}
    finally:
        for pub in pubs.values():
            pub.close(linger=0)
        ctx.term()


def test_unknown_topic_refused() -> None:
    with pytest.raises(ValueError, match="unknown ZMQ topics"):
        ZmqSubscriber({"hashfoo": "tcp://127.0.0.1:1"}, FakeRPC())


# ---- real bitcoind ------------------------------------------------------------------------------------


async def collect_until(sub: ZmqSubscriber, done: Callable[[list[ZmqEvent]], bool],
                        timeout: float = 10.0) -> list[ZmqEvent]:
    events: list[ZmqEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out; got {[type(e).__name__ for e in events]}")
        try:
            events.append(await asyncio.wait_for(sub.recv(), left))
        except TimeoutError:
            continue
    return events


def assert_contiguous(events: list[ZmqEvent]) -> None:
    last: dict[type, int] = {}
    for e in events:
        assert not isinstance(e, ResyncEvent), e
        t = type(e)
        if t in last:
            assert e.seq == last[t] + 1, f"{t.__name__}: {last[t]} then {e.seq}"
        last[t] = e.seq


@pytest.mark.regtest
async def test_blocks_seen_on_all_topics(bitcoind: BitcoindNode, rpc: BitcoinRPC, zmq_sync: Any) -> None:
    await rpc.createwallet("miner")
    address = await rpc.for_wallet("miner").getnewaddress()
    async with ZmqSubscriber(bitcoind.zmq_endpoints, rpc) as sub:
        before = await zmq_sync(rpc, sub, address)
        hashes = await rpc.generatetoaddress(3, address)

        def all_seen(evs: list[ZmqEvent]) -> bool:
            hb = {e.block_hash for e in evs if isinstance(e, BlockHashEvent)}
            rb = {e.block_hash for e in evs if isinstance(e, RawBlockEvent)}
            sc = {e.hash for e in evs if isinstance(e, SequenceEvent)}
            return set(hashes) <= hb & rb & sc

        events = await collect_until(sub, all_seen)
    assert_contiguous(before + events)

    hashblocks = [e.block_hash for e in events if isinstance(e, BlockHashEvent)]
    assert hashblocks[-3:] == hashes
    for e in events:
        if isinstance(e, RawBlockEvent) and e.block_hash in hashes:
            assert e.header == await rpc.getblockheader(e.block_hash)
            block = CBlock.deserialize(e.raw_block)
            coinbase_txid = bytes(block.vtx[0].GetTxid())
            raw_txids = [r.txid() for r in events if isinstance(r, RawTxEvent)]
            assert coinbase_txid in raw_txids
        if isinstance(e, SequenceEvent) and e.hash in hashes:
            assert e.label is SequenceLabel.BLOCK_CONNECTED and e.mempool_seq is None
    assert sub.resyncs == 0


@pytest.mark.regtest
async def test_mempool_transaction_seen(bitcoind: BitcoindNode, rpc: BitcoinRPC, zmq_sync: Any) -> None:
    wallet, address = await fund_wallet(rpc, "federation", 101)
    async with ZmqSubscriber({"rawtx": bitcoind.zmq_endpoint, "sequence": bitcoind.zmq_endpoint,
                              "hashblock": bitcoind.zmq_endpoint}, rpc) as sub:
        before = await zmq_sync(rpc, sub, address)
        txid = await wallet.sendtoaddress(address, 1_000_000)

        def seen(evs: list[ZmqEvent]) -> bool:
            return any(isinstance(e, SequenceEvent) and e.hash == txid for e in evs) and any(
                isinstance(e, RawTxEvent) and e.txid() == txid for e in evs)

        events = await collect_until(sub, seen)
    assert_contiguous(before + events)
    (added,) = [e for e in events if isinstance(e, SequenceEvent) and e.hash == txid]
    assert added.label is SequenceLabel.TX_ADDED and isinstance(added.mempool_seq, int)
