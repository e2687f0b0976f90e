"""Blocks: 118-byte header, transaction root (odd node promoted, count committed), strict block codec, links."""
from __future__ import annotations

import dataclasses
import hashlib
import struct

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.block import (BLOCK_VERSION, HEADER_SIZE, MAX_BLOCK_TXS, ZERO_HASH, Block, BlockHeader, check_link,
                            genesis_header, tx_root)
from l2d.core.codec import write_varint
from l2d.core.coin_tx import Burn, Transfer
from l2d.core.errors import (DecodeError, InvalidBlock, NonMinimalVarint, OutOfRange, TrailingBytes, Truncated,
                             UnknownVersion, WrongNetwork)
from l2d.core.hashing import EMPTY_ROOT, tagged_hash
from l2d.core.params import LOCAL, REGTEST
from l2d.core.tx import MAX_TX_SIZE, sign

AUX0 = b"\0" * 32


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def h(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def node(a: bytes, b: bytes) -> bytes:
    return tagged_hash("l2d/txroot/node", a + b)


def committed(n: int, top: bytes) -> bytes:
    return tagged_hash("l2d/txroot", struct.pack(">I", n) + top)


def rfc6962_top(ids: list[bytes]) -> bytes:
    """The same tree built top-down: split at the largest power of two below n (RFC 6962 shape)."""
    if len(ids) == 1:
        return ids[0]
    k = 1 << ((len(ids) - 1).bit_length() - 1)
    return node(rfc6962_top(ids[:k]), rfc6962_top(ids[k:]))


TXS = (
    sign(LOCAL, secret(1), 0, 2, Transfer(pubkey(2), 100), AUX0),
    sign(LOCAL, secret(2), 0, 2, Transfer(pubkey(3), 50), AUX0),
    sign(LOCAL, secret(1), 1, 3, Burn(10, b"dest"), AUX0),
)
GENESIS = genesis_header(LOCAL, 1_700_000_000_000, h("genesis state"))


def header(**kw: object) -> BlockHeader:
    fields = dict(network_id=LOCAL.id, height=1, prev_hash=GENESIS.hash, timestamp_ms=1_700_000_001_000,
                  tx_count=len(TXS), tx_root=tx_root([t.txid for t in TXS]), state_root=h("state 1"))
    fields.update(kw)
    return BlockHeader(**fields)  # type: ignore[arg-type]


BLOCK = Block(header(), TXS)


# ---------------------------------------------------------------------------------------------- header


def test_header_layout_and_round_trip() -> None:
    hd = header()
    raw = hd.encode()
    assert HEADER_SIZE == 118 and len(raw) == 118
    assert raw == (bytes((BLOCK_VERSION, LOCAL.id)) + (1).to_bytes(8, "big") + GENESIS.hash
                   + (1_700_000_001_000).to_bytes(8, "big") + (3).to_bytes(4, "big") + hd.tx_root + hd.state_root)
    assert BlockHeader.decode(raw, LOCAL) == hd
    assert hd.hash == tagged_hash("l2d/block", raw)


def test_header_decode_strictness() -> None:
    raw = header().encode()
    for cut in range(len(raw)):
        with pytest.raises(Truncated):
            BlockHeader.decode(raw[:cut], LOCAL)
    with pytest.raises(TrailingBytes):
        BlockHeader.decode(raw + b"\0", LOCAL)
    for v in (0, 2):
        with pytest.raises(UnknownVersion):
            BlockHeader.decode(bytes((v,)) + raw[1:], LOCAL)
    with pytest.raises(WrongNetwork):
        BlockHeader.decode(raw, REGTEST)


def test_header_hash_commits_to_every_field() -> None:
    base = header()
    variants = [dataclasses.replace(base, **{f: v}) for f, v in [
        ("network_id", REGTEST.id), ("height", 2), ("prev_hash", ZERO_HASH), ("timestamp_ms", 0), ("tx_count", 4),
        ("tx_root", ZERO_HASH), ("state_root", ZERO_HASH), ("version", 2)]]
    assert len({base.hash} | {v.hash for v in variants}) == 1 + len(variants)


def test_genesis_header() -> None:
    g = genesis_header(REGTEST, 5, EMPTY_ROOT)
    assert (g.network_id, g.height, g.prev_hash, g.timestamp_ms, g.tx_count, g.state_root) == (
        REGTEST.id, 0, ZERO_HASH, 5, 0, EMPTY_ROOT)
    assert g.tx_root == tx_root([]) == committed(0, b"")
    assert BlockHeader.decode(g.encode(), REGTEST) == g


# ---------------------------------------------------------------------------------------------- tx root


def test_tx_root_small_cases() -> None:
    a, b, c, d = h("a"), h("b"), h("c"), h("d")
    assert tx_root([]) == tagged_hash("l2d/txroot", b"\0\0\0\0")
    assert tx_root([a]) == committed(1, a)
    assert tx_root([a, b]) == committed(2, node(a, b))
    assert tx_root([a, b, c]) == committed(3, node(node(a, b), c))  # c is promoted, not paired with itself
    assert tx_root([a, b, c, d]) == committed(4, node(node(a, b), node(c, d)))
    assert tx_root([a, b, c]) != tx_root([a, b, c, c])
    assert tx_root([a, b]) != tx_root([node(a, b)])  # the count tells a leaf from an inner node
    assert tx_root([a, b]) != tx_root([b, a])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70))
def test_tx_root_many_matches_top_down_construction(n: int) -> None:
    ids = [h(f"tx {i}") for i in range(n)]
    root = tx_root(ids)
    assert root == committed(n, rfc6962_top(ids))
    assert root != tx_root(ids + [ids[-1]])
    assert root != tx_root(ids[:-1])
    for i in range(n):
        changed = list(ids)
        changed[i] = h(f"other {i}")
        assert tx_root(changed) != root


# ---------------------------------------------------------------------------------------------- block


def test_block_round_trip() -> None:
    raw = BLOCK.encode()
    assert raw[:HEADER_SIZE] == BLOCK.header.encode()
    assert raw[HEADER_SIZE:] == write_varint(3) + b"".join(write_varint(len(t.raw)) + t.raw for t in TXS)
    got = Block.decode(raw, LOCAL)
    assert got == BLOCK
    empty = Block(GENESIS, ())
    assert empty.encode() == GENESIS.encode() + b"\0"
    assert Block.decode(empty.encode(), LOCAL) == empty


def test_block_decode_every_truncation() -> None:
    raw = BLOCK.encode()
    for cut in range(len(raw)):
        with pytest.raises(DecodeError):
            Block.decode(raw[:cut], LOCAL)


def test_block_trailing_bytes() -> None:
    with pytest.raises(TrailingBytes):
        Block.decode(BLOCK.encode() + b"\0", LOCAL)


def test_block_count_mismatch() -> None:
    for count in (2, 4, 0):
        raw = Block(dataclasses.replace(BLOCK.header, tx_count=count), TXS).encode()
        with pytest.raises(OutOfRange):
            Block.decode(raw, LOCAL)


def test_block_count_limit_checked_before_reading() -> None:
    n = MAX_BLOCK_TXS + 1
    raw = dataclasses.replace(BLOCK.header, tx_count=n).encode() + write_varint(n)
    with pytest.raises(OutOfRange):
        Block.decode(raw, LOCAL)


def test_block_non_minimal_count() -> None:
    raw = BLOCK.encode()
    with pytest.raises(NonMinimalVarint):
        Block.decode(raw[:HEADER_SIZE] + b"\xfd\x03\x00" + raw[HEADER_SIZE + 1:], LOCAL)


def test_block_tx_root_mismatch() -> None:
    for txs in (TXS[::-1], TXS[:2] + (TXS[0],), (TXS[0], TXS[2], TXS[1])):
        raw = Block(BLOCK.header, txs).encode()
        with pytest.raises(InvalidBlock):
            Block.decode(raw, LOCAL)
    raw = Block(dataclasses.replace(BLOCK.header, tx_root=tx_root([t.txid for t in TXS] + [TXS[2].txid]),
                                    tx_count=3), TXS).encode()
    with pytest.raises(InvalidBlock):
        Block.decode(raw, LOCAL)


def test_block_wrong_network() -> None:
    with pytest.raises(WrongNetwork):
        Block.decode(BLOCK.encode(), REGTEST)
    # header for REGTEST carrying a LOCAL transaction
    hd = dataclasses.replace(BLOCK.header, network_id=REGTEST.id)
    with pytest.raises(WrongNetwork):
        Block.decode(Block(hd, TXS).encode(), REGTEST)


def test_block_with_an_invalid_transaction() -> None:
    bad = TXS[0].raw + b"\0"  # trailing byte inside the length-prefixed transaction
    raw = BLOCK.header.encode() + write_varint(1) + write_varint(len(bad)) + bad
    hd = dataclasses.replace(BLOCK.header, tx_count=1)
    with pytest.raises(TrailingBytes):
        Block.decode(hd.encode() + raw[HEADER_SIZE:], LOCAL)
    huge = hd.encode() + write_varint(1) + write_varint(MAX_TX_SIZE + 1) + b"\0" * (MAX_TX_SIZE + 1)
    with pytest.raises(OutOfRange):
        Block.decode(huge, LOCAL)


# ---------------------------------------------------------------------------------------------- links


def test_check_link_accepts_a_child() -> None:
    check_link(GENESIS, header())
    check_link(GENESIS, header(timestamp_ms=GENESIS.timestamp_ms))  # equal timestamps are fine


@pytest.mark.parametrize("change", [
    dict(network_id=REGTEST.id), dict(height=0), dict(height=2), dict(prev_hash=ZERO_HASH),
    dict(prev_hash=GENESIS.encode()[:32]), dict(timestamp_ms=GENESIS.timestamp_ms - 1),
], ids=["network", "same-height", "skipped-height", "zero-prev", "wrong-prev", "time-backwards"])
def test_check_link_rejections(change: dict[str, object]) -> None:
    with pytest.raises(InvalidBlock):
        check_link(GENESIS, header(**change))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_block_decode_of_mutated_bytes(data: st.DataObject) -> None:
    raw = bytearray(BLOCK.encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[i] = data.draw(st.integers(0, 255))
        else:
            raw[i:i + data.draw(st.integers(0, 3))] = data.draw(st.binary(max_size=3))
    try:
        b = Block.decode(bytes(raw), LOCAL)
    except (DecodeError, InvalidBlock):
        return
    assert b.encode() == bytes(raw)
