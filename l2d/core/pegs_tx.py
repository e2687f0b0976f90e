"""Bridge transaction payloads: Bitcoin header relay, peg-in claims, federation funding, peg-out updates.

Byte layouts (big-endian integers) are in docs/transaction-format.md and docs/bridge.md. A peg-out request is
an ordinary Burn whose destination is a Bitcoin address (see l2d/core/pegs.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from .codec import Reader, write_bytes
from .errors import DecodeError, OutOfRange
from .payload import TxType

BTC_HEADER_SIZE = 80
MAX_RELAY_HEADERS = 50  # 4 + 1 + 50 * 80 = 4005 bytes, inside MAX_PAYLOAD
MAX_CLAIM_TX = 3000  # a deposit transaction (with witness)
MAX_MERKLE_BLOCK = 1000  # gettxoutproof: 80-byte header + partial merkle tree (one match in 16666 txs is ~620)
_U32_U8 = struct.Struct(">IB")
_U32_U32 = struct.Struct(">II")
_PEGOUT_UPDATE = struct.Struct(">32sB32sQ")


class PegoutStatus(IntEnum):
    PENDING = 1  # burned on the L2, waiting for the federation
    BROADCAST = 2  # a signed Bitcoin transaction paying it was broadcast (its txid recorded; RBF may replace it)
    COMPLETED = 3  # that transaction is confirmed on Bitcoin


def _u32(value: int, what: str) -> None:
    if not 0 <= value < 2**32:
        raise OutOfRange(f"{what} {value} outside u32")


@dataclass(frozen=True, slots=True)
class BtcHeaders:
    """Bitcoin block headers of the federation's best chain from start_height on (federation authority, fee 0).

    Layout: start_height u32 | count u8 (1..50) | count x 80-byte headers.
    """

    TYPE: ClassVar[TxType] = TxType.BTC_HEADERS
    FEELESS: ClassVar[bool] = True
    start_height: int
    headers: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _u32(self.start_height, "relay start height")
        if not 1 <= len(self.headers) <= MAX_RELAY_HEADERS:
            raise OutOfRange(f"header relay carries {len(self.headers)} headers, expected 1..{MAX_RELAY_HEADERS}")
        for i, h in enumerate(self.headers):
            if not isinstance(h, bytes) or len(h) != BTC_HEADER_SIZE:
                raise OutOfRange(f"relayed header {i} is not {BTC_HEADER_SIZE} bytes")
        if self.start_height + len(self.headers) > 2**32:
            raise OutOfRange("relayed headers run past height 2**32 - 1")

    def encode(self) -> bytes:
        return _U32_U8.pack(self.start_height, len(self.headers)) + b"".join(self.headers)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "BtcHeaders":
        r = Reader(b, "header relay payload")
        start, count = _U32_U8.unpack(r.take(_U32_U8.size))
        if not 1 <= count <= MAX_RELAY_HEADERS:
            raise OutOfRange(f"header relay carries {count} headers, expected 1..{MAX_RELAY_HEADERS}")
        headers = tuple(r.take(BTC_HEADER_SIZE) for _ in range(count))
        r.end()
        return cls(start, headers)


@dataclass(frozen=True, slots=True)
class PeginClaim:
    """Claim a deposit to the federation: the sender is the L2 recipient the deposit address was tweaked for.

    Layout: btc_height u32 | vout u32 | btc_tx (CompactSize + bytes, <= 3000) | merkle_block (CompactSize + bytes,
    <= 1000: the output of bitcoind's gettxoutproof). The fee is taken from the claimed amount.
    """

    TYPE: ClassVar[TxType] = TxType.PEGIN_CLAIM
    FEELESS: ClassVar[bool] = False
    btc_height: int
    vout: int
    btc_tx: bytes
    merkle_block: bytes

    def __post_init__(self) -> None:
        _u32(self.btc_height, "claim Bitcoin height")
        _u32(self.vout, "claim output index")
        if not 0 < len(self.btc_tx) <= MAX_CLAIM_TX:
            raise OutOfRange(f"claimed transaction is {len(self.btc_tx)} bytes, expected 1..{MAX_CLAIM_TX}")
        if not BTC_HEADER_SIZE < len(self.merkle_block) <= MAX_MERKLE_BLOCK:
            raise OutOfRange(f"merkle block is {len(self.merkle_block)} bytes, expected "
                             f"{BTC_HEADER_SIZE + 1}..{MAX_MERKLE_BLOCK}")

    def encode(self) -> bytes:
        return _U32_U32.pack(self.btc_height, self.vout) + write_bytes(self.btc_tx) + write_bytes(self.merkle_block)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "PeginClaim":
        r = Reader(b, "peg-in claim payload")
        height, vout = _U32_U32.unpack(r.take(_U32_U32.size))
        btc_tx = r.var_bytes(MAX_CLAIM_TX)
        merkle_block = r.var_bytes(MAX_MERKLE_BLOCK)
        r.end()
        return cls(height, vout, btc_tx, merkle_block)


@dataclass(frozen=True, slots=True)
class FederationFund(PeginClaim):
    """A member records a deposit to the federation's funding address (coins for Bitcoin fees, e.g. anchors):
    the same proof as a peg-in claim, no L2 money is made (federation members only, fee 0).

    Layout: as PeginClaim.
    """

    TYPE: ClassVar[TxType] = TxType.FEDERATION_FUND
    FEELESS: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class PegoutUpdate:
    """The federation records the Bitcoin transaction paying a peg-out (federation authority, fee 0).

    Layout: pegout_id 32 (the burn's txid) | status u8 (2 BROADCAST, 3 COMPLETED) | btc_txid 32 (internal order)
    | anchor_height u64 (an L2 height >= the burn's whose anchor is CONFIRMED or FINAL).
    """

    TYPE: ClassVar[TxType] = TxType.PEGOUT_UPDATE
    FEELESS: ClassVar[bool] = True
    pegout_id: bytes
    status: PegoutStatus
    btc_txid: bytes
    anchor_height: int

    def __post_init__(self) -> None:
        if len(self.pegout_id) != 32 or len(self.btc_txid) != 32:
            raise OutOfRange("peg-out update: pegout id and Bitcoin txid are 32 bytes each")
        if isinstance(self.status, bool) or self.status not in (PegoutStatus.BROADCAST, PegoutStatus.COMPLETED):
            raise OutOfRange(f"peg-out update status {self.status!r} is not 2 (BROADCAST) or 3 (COMPLETED)")
        object.__setattr__(self, "status", PegoutStatus(self.status))
        if not 0 <= self.anchor_height < 2**64:
            raise OutOfRange(f"peg-out update anchor height {self.anchor_height} outside u64")
        if self.btc_txid == b"\0" * 32:
            raise OutOfRange("peg-out update: Bitcoin txid is zero")

    def encode(self) -> bytes:
        return _PEGOUT_UPDATE.pack(self.pegout_id, self.status, self.btc_txid, self.anchor_height)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "PegoutUpdate":
        if len(b) != _PEGOUT_UPDATE.size:
            raise DecodeError(f"peg-out update payload is {len(b)} bytes, expected {_PEGOUT_UPDATE.size}")
        return cls(*_PEGOUT_UPDATE.unpack(b))


MAX_PLAN_INPUTS = 20  # coins one plan spends
MAX_PLAN_PEGOUTS = 20  # peg-outs one plan pays
MAX_FEERATE = 10_000  # sat/vB: a bound on the field; each member's signing policy sets its own, lower cap
_PLAN_HEAD = struct.Struct(">QI32s")  # anchor height, fee rate, replaces
_ROLL_HEAD = struct.Struct(">I32s")  # fee rate, replaces
_ANCHOR_PLAN_HEAD = struct.Struct(">QB32s32sI32s")  # l2 height, mode, state root, previous link, fee rate, replaces
OUTPOINT = struct.Struct(">32sI")  # a Bitcoin outpoint: txid (internal order) | vout


def _check_plan_head(feerate_sat_vb: int, replaces: bytes, inputs: tuple[tuple[bytes, int], ...]) -> None:
    """The fields every plan shares: a fee rate of 1..MAX_FEERATE, replaces 32 bytes, 1..MAX_PLAN_INPUTS distinct
    outpoints."""
    if not 1 <= feerate_sat_vb <= MAX_FEERATE:
        raise OutOfRange(f"plan fee rate {feerate_sat_vb} sat/vB outside 1..{MAX_FEERATE}")
    if len(replaces) != 32:
        raise OutOfRange("plan: replaces is 32 bytes")
    if not 1 <= len(inputs) <= MAX_PLAN_INPUTS or len(set(inputs)) != len(inputs):
        raise OutOfRange(f"plan spends {len(inputs)} coins, expected 1..{MAX_PLAN_INPUTS} distinct ones")
    for txid, vout in inputs:
        if len(txid) != 32:
            raise OutOfRange("plan input txid is not 32 bytes")
        _u32(vout, "plan input index")


def _read_inputs(r: Reader) -> tuple[tuple[bytes, int], ...]:
    return tuple(OUTPOINT.unpack(r.take(OUTPOINT.size)) for _ in range(r.take(1)[0]))


def _encode_inputs(inputs: tuple[tuple[bytes, int], ...]) -> bytes:
    return bytes((len(inputs),)) + b"".join(OUTPOINT.pack(t, v) for t, v in inputs)


@dataclass(frozen=True, slots=True)
class PegoutPlan:
    """A member proposes the Bitcoin transaction paying peg-outs from federation coins (federation members only,
    fee 0). Everything else (payouts, change, fee, the transaction and its txid, the plan's id) follows from the
    state (l2d/core/plans.py).

    Layout: anchor_height u64 (a FINAL anchor covering every burn) | feerate u32 (sat/vB, 1..10000) | replaces 32
    (the plan this one replaces by fee, zero for none) | n_in u8 (1..20) | n_in x (btc txid 32, internal order |
    vout u32) | n_pegouts u8 (1..20) | n_pegouts x pegout id 32 (the burns' L2 txids). Inputs and peg-outs are
    distinct; the transaction spends the inputs in this order and pays the peg-outs in this order, change last.
    """

    TYPE: ClassVar[TxType] = TxType.PEGOUT_PLAN
    FEELESS: ClassVar[bool] = True
    anchor_height: int
    feerate_sat_vb: int
    replaces: bytes
    inputs: tuple[tuple[bytes, int], ...]
    pegouts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.anchor_height < 2**64:
            raise OutOfRange(f"plan anchor height {self.anchor_height} outside u64")
        _check_plan_head(self.feerate_sat_vb, self.replaces, self.inputs)
        if not 1 <= len(self.pegouts) <= MAX_PLAN_PEGOUTS or len(set(self.pegouts)) != len(self.pegouts):
            raise OutOfRange(f"plan pays {len(self.pegouts)} peg-outs, expected 1..{MAX_PLAN_PEGOUTS} distinct ones")
        if any(len(p) != 32 for p in self.pegouts):
            raise OutOfRange("plan peg-out id is not 32 bytes")

    def encode(self) -> bytes:
        return (_PLAN_HEAD.pack(self.anchor_height, self.feerate_sat_vb, self.replaces)
                + _encode_inputs(self.inputs) + bytes((len(self.pegouts),)) + b"".join(self.pegouts))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "PegoutPlan":
        r = Reader(b, "peg-out plan payload")
        anchor_height, rate, replaces = _PLAN_HEAD.unpack(r.take(_PLAN_HEAD.size))
        inputs = _read_inputs(r)
        n_out = r.take(1)[0]
        pegouts = tuple(r.take(32) for _ in range(n_out))
        r.end()
        return cls(anchor_height, rate, replaces, inputs, pegouts)


@dataclass(frozen=True, slots=True)
class RollPlan:
    """A member proposes to roll federation coins nearing their emergency timelock into fresh outputs (federation
    members only, fee 0; l2d/core/plans.py, docs/bridge.md "Rolling coins"). Everything else follows from the
    state: the held coins (deposits, change) go whole to one CHANGE output, the funding coins pay the fee and
    their rest goes to one funding output.

    Layout: feerate u32 (sat/vB, 1..10000) | replaces 32 (the roll this one replaces by fee, zero for none) |
    n_in u8 (1..20) | n_in x (btc txid 32, internal order | vout u32). Inputs are distinct and spent in this order.
    """

    TYPE: ClassVar[TxType] = TxType.ROLL_PLAN
    FEELESS: ClassVar[bool] = True
    feerate_sat_vb: int
    replaces: bytes
    inputs: tuple[tuple[bytes, int], ...]

    def __post_init__(self) -> None:
        _check_plan_head(self.feerate_sat_vb, self.replaces, self.inputs)

    def encode(self) -> bytes:
        return _ROLL_HEAD.pack(self.feerate_sat_vb, self.replaces) + _encode_inputs(self.inputs)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "RollPlan":
        r = Reader(b, "roll plan payload")
        rate, replaces = _ROLL_HEAD.unpack(r.take(_ROLL_HEAD.size))
        inputs = _read_inputs(r)
        r.end()
        return cls(rate, replaces, inputs)


@dataclass(frozen=True, slots=True)
class PlanCompleted:
    """A member records that a version of a plan without peg-outs (a roll) is mined deep enough: the plan is
    COMPLETED (peg-out plans complete through PegoutUpdate COMPLETED). Federation members only, fee 0.

    Layout: plan_id 32 (the mined version's txid, internal order).
    """

    TYPE: ClassVar[TxType] = TxType.PLAN_COMPLETED
    FEELESS: ClassVar[bool] = True
    plan_id: bytes

    def __post_init__(self) -> None:
        if len(self.plan_id) != 32:
            raise OutOfRange("plan completion: plan id is 32 bytes")

    def encode(self) -> bytes:
        return self.plan_id

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "PlanCompleted":
        if len(b) != 32:
            raise DecodeError(f"plan completion payload is {len(b)} bytes, expected 32")
        return cls(b)


class AnchorMode(IntEnum):
    """How an anchor plan's transaction commits the record (docs/anchoring.md)."""

    OP_RETURN = 1  # OP_RETURN <record>, the funding rest back to the funding script
    TAPROOT = 2  # one k-of-n Taproot output of the federation committing the record's link, holding the rest


@dataclass(frozen=True, slots=True)
class AnchorPlan:
    """A member proposes the Bitcoin transaction that anchors the state root of an L2 height, paid by the
    federation's funding coins (and spending the previous Taproot anchor output), to be signed by m members like
    any plan (federation members only, fee 0; l2d/core/plans.py, docs/anchoring.md "Anchor plans").

    Layout: l2_height u64 | mode u8 (1 OP_RETURN, 2 Taproot) | state_root 32 | prev_link 32 (the previous anchor
    record's link, zeros for the first) | feerate u32 (1..10000) | replaces 32 (zero for a first version) | n_in u8
    (1..20) | n_in x (btc txid 32, internal order | vout u32).
    """

    TYPE: ClassVar[TxType] = TxType.ANCHOR_PLAN
    FEELESS: ClassVar[bool] = True
    l2_height: int
    mode: AnchorMode
    state_root: bytes
    prev_link: bytes
    feerate_sat_vb: int
    replaces: bytes
    inputs: tuple[tuple[bytes, int], ...]

    def __post_init__(self) -> None:
        if not 0 < self.l2_height < 2**64:
            raise OutOfRange(f"anchor plan L2 height {self.l2_height} outside 1..2^64-1")
        if isinstance(self.mode, bool) or self.mode not in (1, 2):
            raise OutOfRange(f"anchor plan mode {self.mode!r} is not 1 (OP_RETURN) or 2 (Taproot)")
        object.__setattr__(self, "mode", AnchorMode(self.mode))
        if len(self.state_root) != 32 or len(self.prev_link) != 32:
            raise OutOfRange("anchor plan: state root and previous link are 32 bytes each")
        _check_plan_head(self.feerate_sat_vb, self.replaces, self.inputs)

    def encode(self) -> bytes:
        return (_ANCHOR_PLAN_HEAD.pack(self.l2_height, self.mode, self.state_root, self.prev_link,
                                       self.feerate_sat_vb, self.replaces) + _encode_inputs(self.inputs))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "AnchorPlan":
        r = Reader(b, "anchor plan payload")
        height, mode, root, prev, rate, replaces = _ANCHOR_PLAN_HEAD.unpack(r.take(_ANCHOR_PLAN_HEAD.size))
        inputs = _read_inputs(r)
        r.end()
        return cls(height, mode, root, prev, rate, replaces, inputs)


MAX_DER_SIG = 73  # a DER ECDSA signature (at most 72 bytes) and its sighash byte


@dataclass(frozen=True, slots=True)
class PlanSignature:
    """A federation key's signatures of a plan's Bitcoin transaction, one per input (BIP143, SIGHASH_ALL, by the
    key tweaked for the input's contract). Posted by any member (fee 0): the signatures themselves are what is
    checked, against the key at key_index of the federation.

    Layout: plan_id 32 (the transaction's txid, internal order) | key_index u8 | n u8 (1..20, the plan's inputs)
    | n x (len u8 (9..73) | DER signature | sighash byte 0x01).
    """

    TYPE: ClassVar[TxType] = TxType.PLAN_SIGNATURE
    FEELESS: ClassVar[bool] = True
    plan_id: bytes
    key_index: int
    signatures: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.plan_id) != 32:
            raise OutOfRange("plan signature: plan id is 32 bytes")
        if not 0 <= self.key_index < 256:
            raise OutOfRange(f"plan signature key index {self.key_index} outside u8")
        if not 1 <= len(self.signatures) <= MAX_PLAN_INPUTS:
            raise OutOfRange(f"plan signature carries {len(self.signatures)} signatures, expected "
                             f"1..{MAX_PLAN_INPUTS}")
        for s in self.signatures:
            if not 9 <= len(s) <= MAX_DER_SIG or s[-1] != 0x01:
                raise OutOfRange("plan signature: each is a 9..73-byte DER signature ending in SIGHASH_ALL (0x01)")

    def encode(self) -> bytes:
        return (self.plan_id + bytes((self.key_index, len(self.signatures)))
                + b"".join(bytes((len(s),)) + s for s in self.signatures))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "PlanSignature":
        r = Reader(b, "plan signature payload")
        plan_id = r.take(32)
        index, n = r.take(2)
        sigs = tuple(r.take(r.take(1)[0]) for _ in range(n))
        r.end()
        return cls(plan_id, index, sigs)
