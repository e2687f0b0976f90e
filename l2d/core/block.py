"""Blocks: a fixed-size header committing to parent, transactions and state root; strict codec."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .codec import U32, Reader, write_bytes, write_varint
from .errors import InvalidBlock, OutOfRange, UnknownVersion
from .hashing import H_BLOCK, H_TXROOT, H_TXROOT_NODE
from .params import Network
from .tx import MAX_TX_SIZE, Transaction, decode

BLOCK_VERSION = 1
MAX_BLOCK_TXS = 100_000
ZERO_HASH = b"\0" * 32
_HEADER = struct.Struct(">BBQ32sQI32s32s")
HEADER_SIZE = _HEADER.size  # 118


def tx_root(txids: list[bytes]) -> bytes:
    """Merkle root over txids; an odd node is promoted (never duplicated), and the count is committed."""
    level = txids
    while len(level) > 1:
        nxt = [H_TXROOT_NODE(level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return H_TXROOT(U32.pack(len(txids)) + (level[0] if level else b""))


@dataclass(frozen=True, slots=True)
class BlockHeader:
    network_id: int
    height: int
    prev_hash: bytes
    timestamp_ms: int  # data only: the state transition never reads it
    tx_count: int
    tx_root: bytes
    state_root: bytes
    version: int = BLOCK_VERSION

    def encode(self) -> bytes:
        return _HEADER.pack(self.version, self.network_id, self.height, self.prev_hash, self.timestamp_ms,
                            self.tx_count, self.tx_root, self.state_root)

    @property
    def hash(self) -> bytes:
        return H_BLOCK(self.encode())

    @classmethod
    def decode(cls, b: bytes, network: Network) -> "BlockHeader":
        r = Reader(b, "block header")
        h = cls.read(r, network)
        r.end()
        return h

    @classmethod
    def read(cls, r: Reader, network: Network) -> "BlockHeader":
        version, net, height, prev, ts, count, txr, sr = _HEADER.unpack(r.take(HEADER_SIZE))
        if version != BLOCK_VERSION:
            raise UnknownVersion(f"block version {version}")
        network.check(net, "block")
        return cls(net, height, prev, ts, count, txr, sr, version)


@dataclass(frozen=True, slots=True)
class Block:
    header: BlockHeader
    txs: tuple[Transaction, ...]

    def encode(self) -> bytes:
        return b"".join([self.header.encode(), write_varint(len(self.txs))] + [write_bytes(t.raw) for t in self.txs])

    @classmethod
    def decode(cls, b: bytes, network: Network) -> "Block":
        r = Reader(b, "block")
        header = BlockHeader.read(r, network)
        n = r.varint()
        if n > MAX_BLOCK_TXS or n != header.tx_count:
            raise OutOfRange(f"block has {n} transactions, header says {header.tx_count} (limit {MAX_BLOCK_TXS})")
        txs = tuple(decode(r.var_bytes(MAX_TX_SIZE), network) for _ in range(n))
        r.end()
        if tx_root([t.txid for t in txs]) != header.tx_root:
            raise InvalidBlock(f"block {header.height}: transaction root does not match its transactions")
        return cls(header, txs)


def check_link(parent: BlockHeader, child: BlockHeader) -> None:
    """Raise InvalidBlock unless child extends parent."""
    if child.network_id != parent.network_id:
        raise InvalidBlock(f"block {child.height} is for network {child.network_id}, parent for {parent.network_id}")
    if child.height != parent.height + 1:
        raise InvalidBlock(f"block height {child.height} does not follow {parent.height}")
    if child.prev_hash != parent.hash:
        raise InvalidBlock(f"block {child.height} does not link to the hash of block {parent.height}")
    if child.timestamp_ms < parent.timestamp_ms:
        raise InvalidBlock(f"block {child.height} timestamp goes backwards")


def genesis_header(network: Network, timestamp_ms: int, state_root: bytes) -> BlockHeader:
    return BlockHeader(network.id, 0, ZERO_HASH, timestamp_ms, 0, tx_root([]), state_root)
