"""Anchor payloads: the 78-byte anchor record, its OP_RETURN script and its BIP341 Taproot commitment.

Byte layouts are in docs/anchor-format.md. Everything here is pure (consensus-critical): the verifier
imports it. Taproot tree hashing reuses bitcoin-utils; the key tweak is libsecp256k1 (coincurve).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from bitcoinutils.utils import tagged_hash, tapbranch_tagged_hash
from coincurve import PublicKeyXOnly

from .codec import write_varint
from .errors import DecodeError, OutOfRange, UnknownVersion
from .hashing import tagged_hash as l2_tagged_hash
from .params import Network

MAGIC = b"L2DA"
RECORD_VERSION = 1
_RECORD = struct.Struct(">4sBBQ32s32s")
RECORD_SIZE = _RECORD.size  # 78
NO_PREVIOUS = b"\0" * 32
LEAF_VERSION_TAPSCRIPT = 0xC0
OP_RETURN, OP_PUSHDATA1, OP_DROP, OP_CHECKSIG = 0x6A, 0x4C, 0x75, 0xAC
_OP_RETURN_PREFIX = bytes((OP_RETURN, OP_PUSHDATA1, RECORD_SIZE))


class AnchorFormatError(DecodeError):
    """Bytes that are not a canonical anchor record or anchor script."""


@dataclass(frozen=True, slots=True)
class AnchorRecord:
    """What an anchor commits to: an L2 state root at a height, chained to the previous anchor."""

    network_id: int
    l2_height: int
    state_root: bytes
    prev_link: bytes = NO_PREVIOUS  # link of the previous anchor record; zeros for the first

    def __post_init__(self) -> None:
        if len(self.state_root) != 32 or len(self.prev_link) != 32:
            raise OutOfRange("anchor state root and previous link must be 32 bytes each")
        if not 0 <= self.l2_height < 2**64 or not 0 <= self.network_id < 256:
            raise OutOfRange(f"anchor height {self.l2_height} or network {self.network_id} out of range")

    def encode(self) -> bytes:
        return _RECORD.pack(MAGIC, RECORD_VERSION, self.network_id, self.l2_height, self.state_root, self.prev_link)

    @property
    def link(self) -> bytes:
        """H("l2d/anchor", record): what the next anchor names as its predecessor and the Taproot leaf holds."""
        return l2_tagged_hash("l2d/anchor", self.encode())

    @classmethod
    def decode(cls, b: bytes, network: Network) -> "AnchorRecord":
        if len(b) != RECORD_SIZE:
            raise AnchorFormatError(f"anchor record is {len(b)} bytes, expected {RECORD_SIZE}")
        magic, version, net, height, root, prev = _RECORD.unpack(b)
        if magic != MAGIC:
            raise AnchorFormatError(f"anchor magic {magic!r}, expected {MAGIC!r}")
        if version != RECORD_VERSION:
            raise UnknownVersion(f"anchor record version {version}")
        network.check(net, "anchor record")
        return cls(net, height, root, prev)


def op_return_script(record: AnchorRecord) -> bytes:
    """OP_RETURN OP_PUSHDATA1 78 <record>: 81 bytes, the minimal push for 78 bytes."""
    return _OP_RETURN_PREFIX + record.encode()


def parse_op_return(script: bytes, network: Network) -> AnchorRecord:
    """The anchor record in an OP_RETURN script; anything but the one canonical form is refused."""
    if script[:3] != _OP_RETURN_PREFIX or len(script) != 3 + RECORD_SIZE:
        raise AnchorFormatError("script is not OP_RETURN OP_PUSHDATA1 78 <anchor record>")
    return AnchorRecord.decode(script[3:], network)


# -- Taproot (BIP341) -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Leaf:
    """A tapscript leaf: leaf version and script bytes."""

    version: int
    script: bytes


ScriptTree = Union[Leaf, Sequence["ScriptTree"]]  # a leaf, or [left, right]


def tapleaf_hash(leaf: Leaf) -> bytes:
    return bytes(tagged_hash(bytes((leaf.version,)) + write_varint(len(leaf.script)) + leaf.script, "TapLeaf"))


def tree_root(tree: Optional[ScriptTree]) -> Optional[bytes]:
    """BIP341 Merkle root of a script tree (None for a key-path-only output)."""
    if tree is None:
        return None
    return _root(tree)


def _root(tree: ScriptTree) -> bytes:
    if isinstance(tree, Leaf):
        return tapleaf_hash(tree)
    if len(tree) == 1:
        return _root(tree[0])
    if len(tree) != 2:
        raise OutOfRange("a script tree branch has exactly two children")
    return bytes(tapbranch_tagged_hash(_root(tree[0]), _root(tree[1])))


def merkle_path(tree: ScriptTree, target: Leaf) -> Optional[bytes]:
    """Concatenated sibling hashes from target's leaf up to the root, or None if target is not in tree."""
    if isinstance(tree, Leaf):
        return b"" if tree == target else None
    if len(tree) == 1:
        return merkle_path(tree[0], target)
    for i in (0, 1):
        p = merkle_path(tree[i], target)
        if p is not None:
            return p + _root(tree[1 - i])
    return None


def taptweak(internal_key: bytes, merkle_root: Optional[bytes]) -> bytes:
    return bytes(tagged_hash(internal_key + (merkle_root or b""), "TapTweak"))


def output_key(internal_key: bytes, merkle_root: Optional[bytes]) -> tuple[bytes, int]:
    """(tweaked x-only output key, its parity bit) for internal_key committed to merkle_root."""
    try:
        pk = PublicKeyXOnly(internal_key)
        pk.tweak_add(taptweak(internal_key, merkle_root))
    except ValueError as e:
        raise OutOfRange(f"taproot tweak of {internal_key.hex()}: {e}") from None
    return pk.format(), int(pk.parity)


def p2tr_script(output_xonly: bytes) -> bytes:
    return b"\x51\x20" + output_xonly


def control_block(internal_key: bytes, tree: ScriptTree, leaf: Leaf) -> bytes:
    path = merkle_path(tree, leaf)
    if path is None:
        raise OutOfRange("leaf is not in the script tree")
    _, parity = output_key(internal_key, tree_root(tree))
    return bytes((leaf.version | parity,)) + internal_key + path


def anchor_leaf(record: AnchorRecord, federation_key: bytes) -> Leaf:
    """<link> OP_DROP <federation key> OP_CHECKSIG: commits to the record, spendable only by the federation."""
    if len(federation_key) != 32:
        raise OutOfRange("federation key must be a 32-byte x-only key")
    script = bytes((32,)) + record.link + bytes((OP_DROP, 32)) + federation_key + bytes((OP_CHECKSIG,))
    return Leaf(LEAF_VERSION_TAPSCRIPT, script)


@dataclass(frozen=True, slots=True)
class TaprootAnchor:
    """A P2TR output whose internal key is the federation's and whose only leaf commits to the record."""

    record: AnchorRecord
    federation_key: bytes

    @property
    def leaf(self) -> Leaf:
        return anchor_leaf(self.record, self.federation_key)

    @property
    def merkle_root(self) -> bytes:
        return tapleaf_hash(self.leaf)

    @property
    def output_key(self) -> bytes:
        return output_key(self.federation_key, self.merkle_root)[0]

    @property
    def script_pubkey(self) -> bytes:
        return p2tr_script(self.output_key)

    @property
    def control_block(self) -> bytes:
        return control_block(self.federation_key, self.leaf, self.leaf)

    def matches(self, script_pubkey: bytes) -> bool:
        return script_pubkey == self.script_pubkey
