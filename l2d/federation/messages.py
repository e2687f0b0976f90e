"""The member protocol's messages: a strict binary codec, each message signed by its sender's member key.

Byte layout (docs/federation.md):
    version u8 (1) | network id u8 | kind u8 | sender u8 (member index) | height u64 | round u32 | body
    | BIP340 signature 64 over H("l2d/federation/message", every byte before it)
Bodies by kind:
    STATUS     1  head hash 32 | final height u64
    PROPOSAL   2  block header 118 | txid count varint | 32-byte txids
    PRECOMMIT  3  block hash 32
    SIGNATURE  4  block hash 32 | block signature 64 (BIP340 over the commit sighash, l2d/core/commit.py)
    BLOCK      5  block header 118 | txid count varint | 32-byte txids | commit length varint | commit
    TIMEOUT    6  head hash 32 | final height u64 (as STATUS: my round's timer ran out)
decode_message() refuses, with a typed error and before anything else looks at the message: a truncated or
oversized encoding, an unknown version or kind, another network, a sender index outside the membership, a signature
that does not verify for that member's key, and fields that contradict each other.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, Union

from coincurve import PrivateKey

from ..core.block import MAX_BLOCK_TXS, BlockHeader, tx_root
from ..core.codec import U64, Reader, write_bytes, write_varint
from ..core.commit import SIG_SIZE, Commit, signature_valid
from ..core.errors import OutOfRange, UnknownType, UnknownVersion
from ..core.hashing import H_FED_MESSAGE
from ..core.members import MAX_MEMBERS, Membership
from ..core.params import Network
from ..core.tx import xonly_key
from .errors import BadBlockSignature, BadEvidence, BadMessageSignature, InconsistentMessage, UnknownMember

MESSAGE_VERSION = 1
MAX_ROUND = 0xFFFFFFFF
MAX_COMMIT_SIZE = 1 + MAX_MEMBERS // 8 + SIG_SIZE * MAX_MEMBERS
_HEAD = struct.Struct(">BBBBQI")
HEAD_SIZE = _HEAD.size  # 16
AUX = bytes(32)  # BIP340 auxiliary data: none (the nonce still derives from key and message); signing is reproducible


class Kind(IntEnum):
    STATUS = 1
    PROPOSAL = 2
    PRECOMMIT = 3
    SIGNATURE = 4
    BLOCK = 5
    TIMEOUT = 6


@dataclass(frozen=True, slots=True)
class Candidate:
    """A block as the protocol moves it: the header and its transaction ids (bodies travel separately)."""

    header: BlockHeader
    txids: tuple[bytes, ...]
    hash: bytes = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", self.header.hash)

    @property
    def height(self) -> int:
        return self.header.height

    @property
    def parent(self) -> bytes:
        return self.header.prev_hash

    def check(self) -> None:
        """InconsistentMessage unless the txids are the ones the header commits to."""
        if len(self.txids) != self.header.tx_count:
            raise InconsistentMessage(f"block {self.height} header counts {self.header.tx_count} transactions, "
                                      f"{len(self.txids)} txids given")
        if tx_root(list(self.txids)) != self.header.tx_root:
            raise InconsistentMessage(f"block {self.height}: the txids do not hash to the header's transaction root")

    def encode(self) -> bytes:
        return self.header.encode() + write_varint(len(self.txids)) + b"".join(self.txids)

    @classmethod
    def read(cls, r: Reader, network: Network) -> "Candidate":
        header = BlockHeader.read(r, network)
        count = r.varint()
        if count > MAX_BLOCK_TXS:
            raise OutOfRange(f"{r.what}: {count} txids, the block limit is {MAX_BLOCK_TXS}")
        return cls(header, tuple(r.take(32) for _ in range(count)))


@dataclass(frozen=True, slots=True)
class Status:
    """My position: the height I work on (envelope), the head I build on (at height - 1), my final height."""

    KIND: ClassVar[Kind] = Kind.STATUS
    head_hash: bytes
    final_height: int

    def encode(self) -> bytes:
        return self.head_hash + U64.pack(self.final_height)


@dataclass(frozen=True, slots=True)
class Timeout:
    """My timer for (height, round) ran out: I move on once m members have (a timeout certificate)."""

    KIND: ClassVar[Kind] = Kind.TIMEOUT
    head_hash: bytes
    final_height: int

    def encode(self) -> bytes:
        return self.head_hash + U64.pack(self.final_height)


@dataclass(frozen=True, slots=True)
class Proposal:
    """The proposer's block for (height, round)."""

    KIND: ClassVar[Kind] = Kind.PROPOSAL
    block: Candidate

    def encode(self) -> bytes:
        return self.block.encode()


@dataclass(frozen=True, slots=True)
class Precommit:
    """I validated this proposal of (height, round) and would sign it."""

    KIND: ClassVar[Kind] = Kind.PRECOMMIT
    block_hash: bytes

    def encode(self) -> bytes:
        return self.block_hash


@dataclass(frozen=True, slots=True)
class BlockSignature:
    """My commit signature of a block (it goes into the block's Commit as it is)."""

    KIND: ClassVar[Kind] = Kind.SIGNATURE
    block_hash: bytes
    signature: bytes

    def encode(self) -> bytes:
        return self.block_hash + self.signature


@dataclass(frozen=True, slots=True)
class CompleteBlock:
    """A block with a commit of at least m signatures (relayed when stored; served to members catching up)."""

    KIND: ClassVar[Kind] = Kind.BLOCK
    block: Candidate
    commit: Commit

    def encode(self) -> bytes:
        return self.block.encode() + write_bytes(self.commit.encode())


Body = Union[Status, Timeout, Proposal, Precommit, BlockSignature, CompleteBlock]


@dataclass(frozen=True, slots=True)
class Message:
    network_id: int
    sender: int
    height: int
    round: int
    body: Body
    signature: bytes
    raw: bytes  # the exact signed encoding (kept as evidence and for relaying)

    @property
    def kind(self) -> Kind:
        return self.body.KIND


def sign_message(key: PrivateKey, network: Network, sender: int, height: int, round_: int, body: Body) -> Message:
    """The signed message; OutOfRange for a field its encoding cannot hold."""
    if not 0 <= sender < MAX_MEMBERS:
        raise OutOfRange(f"sender index {sender} outside 0..{MAX_MEMBERS - 1}")
    if not 1 <= height <= 0xFFFFFFFFFFFFFFFF or not 0 <= round_ <= MAX_ROUND:
        raise OutOfRange(f"height {height} / round {round_} outside the message's fields")
    unsigned = _HEAD.pack(MESSAGE_VERSION, network.id, body.KIND, sender, height, round_) + body.encode()
    sig = key.sign_schnorr(H_FED_MESSAGE(unsigned), AUX)
    return Message(network.id, sender, height, round_, body, sig, unsigned + sig)


def decode_message(raw: bytes, network: Network, members: Membership) -> Message:
    """The verified message; a typed L2Error (DecodeError or FederationError subclass) for anything else."""
    r = Reader(raw, "federation message")
    version, net, kind_no, sender, height, round_ = _HEAD.unpack(r.take(HEAD_SIZE))
    if version != MESSAGE_VERSION:
        raise UnknownVersion(f"federation message version {version} (this code knows {MESSAGE_VERSION})")
    network.check(net, "federation message")
    try:
        kind = Kind(kind_no)
    except ValueError:
        raise UnknownType(f"federation message kind {kind_no}") from None
    if sender >= members.n:
        raise UnknownMember(f"federation message from member {sender}; the federation has {members.n} members")
    if height < 1:
        raise OutOfRange("federation message for height 0 (genesis is never proposed)")
    body = _read_body(kind, r, network)
    sig = r.take(SIG_SIZE)
    r.end()
    key = members.keys[sender]
    if not xonly_key(key).verify(sig, H_FED_MESSAGE(raw[:-SIG_SIZE])):
        raise BadMessageSignature(f"{kind.name} message does not verify for member {sender}")
    _check_body(body, height, round_, sender, network, members)
    return Message(net, sender, height, round_, body, sig, raw)


def _read_body(kind: Kind, r: Reader, network: Network) -> Body:
    if kind is Kind.STATUS:
        return Status(r.take(32), r.u64())
    if kind is Kind.TIMEOUT:
        return Timeout(r.take(32), r.u64())
    if kind is Kind.PROPOSAL:
        return Proposal(Candidate.read(r, network))
    if kind is Kind.PRECOMMIT:
        return Precommit(r.take(32))
    if kind is Kind.SIGNATURE:
        return BlockSignature(r.take(32), r.take(SIG_SIZE))
    block = Candidate.read(r, network)
    return CompleteBlock(block, Commit.decode(r.var_bytes(MAX_COMMIT_SIZE)))


def _check_body(body: Body, height: int, round_: int, sender: int, network: Network, members: Membership) -> None:
    if isinstance(body, (Status, Timeout)):
        if body.final_height >= height:
            raise InconsistentMessage(f"{body.KIND.name} for height {height} claims final height "
                                      f"{body.final_height}")
    elif isinstance(body, (Proposal, CompleteBlock)):
        if body.block.height != height:
            raise InconsistentMessage(f"{body.KIND.name} message for height {height} carries block "
                                      f"{body.block.height}")
        body.block.check()
        if isinstance(body, CompleteBlock):
            if round_ != 0:
                raise InconsistentMessage(f"BLOCK message with round {round_} (a complete block has no round: 0)")
            if body.commit.n != members.n:
                raise InconsistentMessage(f"commit for {body.commit.n} members, the federation has {members.n}")
    elif isinstance(body, BlockSignature):
        if not signature_valid(members.keys[sender], network, body.block_hash, body.signature):
            raise BadBlockSignature(f"member {sender}'s block signature does not verify for block "
                                    f"{body.block_hash.hex()}")


@dataclass(frozen=True, slots=True)
class Equivocation:
    """Two different proposals signed by one member for one height and round: both messages, as received."""

    first: Message
    second: Message

    @property
    def proposer(self) -> int:
        return self.first.sender

    @property
    def height(self) -> int:
        return self.first.height

    @property
    def round(self) -> int:
        return self.first.round

    def check(self) -> None:
        """BadEvidence unless the two messages are conflicting proposals of one sender, height and round."""
        a, b = self.first, self.second
        if not isinstance(a.body, Proposal) or not isinstance(b.body, Proposal):
            raise BadEvidence("equivocation evidence must be two PROPOSAL messages")
        if (a.network_id, a.sender, a.height, a.round) != (b.network_id, b.sender, b.height, b.round):
            raise BadEvidence("the two proposals are not from one member for one height and round")
        if a.body.block.hash == b.body.block.hash:
            raise BadEvidence("the two proposals carry the same block")

    @classmethod
    def from_raw(cls, first: bytes, second: bytes, network: Network, members: Membership) -> "Equivocation":
        """Decode and verify both signed messages (typed errors) and check that they conflict (BadEvidence)."""
        ev = cls(decode_message(first, network, members), decode_message(second, network, members))
        ev.check()
        return ev
