"""L2 transactions: one versioned envelope for every type, BIP340-signed over a tagged hash.

Envelope (big-endian integers; see docs/transaction-format.md):
    version u8 | network u8 | type u8 | sender 32 (x-only key) | nonce u64 | fee_sat u64
    | payload (CompactSize length + bytes) | signature 64 (BIP340 Schnorr)
The signature commits to every byte before it (sighash = H("l2d/tx/sighash", body)).
The txid is H("l2d/tx/id", whole encoding).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import ClassVar, Protocol, Union

from coincurve import PrivateKey, PublicKeyXOnly

from .codec import Reader, write_bytes
from .errors import BadSignature, DecodeError, OutOfRange, TrailingBytes, Truncated, UnknownType, UnknownVersion
from .hashing import H_TX_SIG, H_TXID
from .params import MAX_MONEY, Network

TX_VERSION = 1
MAX_PAYLOAD = 4096  # room for a peg-in claim: a Bitcoin transaction and its merkle proof
MAX_TX_SIZE = 3 + 32 + 8 + 8 + 3 + MAX_PAYLOAD + 64
MAX_BURN_DESTINATION = 128
_HEAD = struct.Struct(">BBB32sQQ")
_DEST_AMOUNT = struct.Struct(">32sQ")
_AMOUNT = struct.Struct(">Q")
_ANCHOR = struct.Struct(">Q32s32s32sIB")


class AnchorStatus(IntEnum):
    """Where a Bitcoin anchor of an L2 height stands (recorded in the state by AnchorUpdate)."""

    SUBMITTED = 1
    CONFIRMED = 2
    FINAL = 3


class TxType(IntEnum):
    """Every transaction type number, in one place so none is ever reused.

    Ranges: 1-15 ledger, anchoring and bridge; 16-31 orchestration (workers, tasks); 32-47 federated learning.
    The payload classes of a subsystem live in its own module (l2d/core/*_tx.py), its state transition in
    another (l2d/core/<subsystem>.py); both are registered at the bottom of tx.py and state.py.
    """

    TRANSFER = 1
    MINT = 2
    BURN = 3
    ANCHOR = 4
    PEGIN_CLAIM = 5
    PEGOUT_UPDATE = 6
    BTC_HEADERS = 7
    WORKER_REGISTER = 16
    WORKER_HEARTBEAT = 17
    WORKER_EXIT = 18
    WORKER_WITHDRAW = 19
    TASK_SUBMIT = 20
    TASK_ASSIGN = 21
    TASK_RESULT = 22
    TASK_REASSIGN = 23
    TASK_SETTLE = 24
    TASK_DISPUTE = 25
    TASK_RESOLVE = 26
    TASK_CANCEL = 27
    FL_JOB_POST = 32
    FL_REGISTER = 33
    FL_ROUND = 34
    FL_FINISH = 35
    FL_RECLAIM = 36


def _check_amount(amount: int, what: str) -> None:
    if not 0 < amount <= MAX_MONEY:
        raise OutOfRange(f"{what} {amount} is outside 1..{MAX_MONEY}")


class Payload(Protocol):
    TYPE: ClassVar[TxType]
    # True for types posted by an authority (mint, anchor, relay...): they carry fee 0 and no fee floor applies.
    FEELESS: ClassVar[bool]

    def encode(self) -> bytes: ...

    def debit_sat(self) -> int:
        """What the transaction takes from its sender's balance besides the fee (0 if nothing)."""
        ...


@dataclass(frozen=True, slots=True)
class Transfer:
    """Move amount_sat from the sender to recipient."""

    TYPE: ClassVar[TxType] = TxType.TRANSFER
    FEELESS: ClassVar[bool] = False
    recipient: bytes
    amount_sat: int

    def __post_init__(self) -> None:
        if len(self.recipient) != 32:
            raise OutOfRange(f"recipient key is {len(self.recipient)} bytes, expected 32")
        _check_amount(self.amount_sat, f"{self.TYPE.name.lower()} amount")

    def encode(self) -> bytes:
        return _DEST_AMOUNT.pack(self.recipient, self.amount_sat)

    def debit_sat(self) -> int:
        return self.amount_sat

    @classmethod
    def decode(cls, b: bytes) -> "Transfer":
        if len(b) != _DEST_AMOUNT.size:
            raise DecodeError(f"{cls.TYPE.name.lower()} payload is {len(b)} bytes, expected {_DEST_AMOUNT.size}")
        return cls(*_DEST_AMOUNT.unpack(b))


@dataclass(frozen=True, slots=True)
class Mint(Transfer):
    """Create amount_sat for recipient (mint authority only, on networks that allow it)."""

    TYPE: ClassVar[TxType] = TxType.MINT
    FEELESS: ClassVar[bool] = True

    def debit_sat(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class Burn:
    """Destroy amount_sat of the sender's balance; destination names where it is paid out (peg-out)."""

    TYPE: ClassVar[TxType] = TxType.BURN
    FEELESS: ClassVar[bool] = False
    amount_sat: int
    destination: bytes = b""

    def __post_init__(self) -> None:
        _check_amount(self.amount_sat, "burn amount")
        if len(self.destination) > MAX_BURN_DESTINATION:
            raise OutOfRange(f"burn destination is {len(self.destination)} bytes, limit {MAX_BURN_DESTINATION}")

    def encode(self) -> bytes:
        return _AMOUNT.pack(self.amount_sat) + write_bytes(self.destination)

    def debit_sat(self) -> int:
        return self.amount_sat

    @classmethod
    def decode(cls, b: bytes) -> "Burn":
        r = Reader(b, "burn payload")
        amount = r.u64()
        dest = r.var_bytes(MAX_BURN_DESTINATION)
        r.end()
        return cls(amount, dest)


@dataclass(frozen=True, slots=True)
class AnchorUpdate:
    """Record where the Bitcoin anchor of L2 height l2_height stands (anchor authority only, fee 0).

    btc_block_hash (internal byte order) and btc_height are zero while the anchor is SUBMITTED.
    """

    TYPE: ClassVar[TxType] = TxType.ANCHOR
    FEELESS: ClassVar[bool] = True
    l2_height: int
    state_root: bytes
    btc_txid: bytes  # internal byte order
    btc_block_hash: bytes
    btc_height: int
    status: AnchorStatus

    def __post_init__(self) -> None:
        for name in ("state_root", "btc_txid", "btc_block_hash"):
            n = len(getattr(self, name))
            if n != 32:
                raise OutOfRange(f"anchor update {name} is {n} bytes, expected 32")
        if not 0 <= self.l2_height < 2**64:
            raise OutOfRange(f"anchor update L2 height {self.l2_height} outside u64")
        if not 0 <= self.btc_height < 2**32:
            raise OutOfRange(f"anchor update Bitcoin height {self.btc_height} outside u32")
        if isinstance(self.status, bool) or not isinstance(self.status, int) or self.status not in (1, 2, 3):
            raise OutOfRange(f"anchor update status {self.status!r} is not 1, 2 or 3")
        object.__setattr__(self, "status", AnchorStatus(self.status))
        confirmed = self.status != AnchorStatus.SUBMITTED
        if confirmed != (self.btc_block_hash != _ZERO32) or confirmed != (self.btc_height != 0):
            raise OutOfRange("anchor update: block hash and height must be set exactly when the status is "
                             f"CONFIRMED or FINAL (status {self.status.name}, height {self.btc_height})")

    def encode(self) -> bytes:
        return _ANCHOR.pack(self.l2_height, self.state_root, self.btc_txid, self.btc_block_hash, self.btc_height,
                            self.status)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "AnchorUpdate":
        if len(b) != _ANCHOR.size:
            raise DecodeError(f"anchor update payload is {len(b)} bytes, expected {_ANCHOR.size}")
        return cls(*_ANCHOR.unpack(b))


class PayloadClass(Protocol):
    """What the decoder needs of a payload class: its type number and its strict decode."""

    @property
    def TYPE(self) -> TxType: ...

    def decode(self, b: bytes) -> Payload: ...


_ZERO32 = b"\0" * 32
AnyPayload = Payload
# Filled in at the bottom of this module with the subsystems' payload classes.
PAYLOAD_TYPES: dict[int, PayloadClass] = {
    TxType.TRANSFER: Transfer, TxType.MINT: Mint, TxType.BURN: Burn, TxType.ANCHOR: AnchorUpdate}


@dataclass(frozen=True, slots=True)
class Transaction:
    network_id: int
    sender: bytes  # 32-byte x-only public key
    nonce: int
    fee_sat: int
    payload: AnyPayload
    signature: bytes
    raw: bytes  # the canonical encoding; kept so hashing never re-encodes

    @property
    def type(self) -> TxType:
        return self.payload.TYPE

    @property
    def txid(self) -> bytes:
        return H_TXID(self.raw)

    @property
    def sighash(self) -> bytes:
        return H_TX_SIG(self.raw[:-64])

    def encode(self) -> bytes:
        return self.raw


def encode_body(network_id: int, sender: bytes, nonce: int, fee_sat: int, payload: AnyPayload) -> bytes:
    if len(sender) != 32:
        raise OutOfRange(f"sender key is {len(sender)} bytes, expected 32")
    if not 0 <= nonce < 2**64 or not 0 <= fee_sat <= MAX_MONEY:
        raise OutOfRange(f"nonce {nonce} or fee {fee_sat} out of range")
    p = payload.encode()
    if len(p) > MAX_PAYLOAD:
        raise OutOfRange(f"payload is {len(p)} bytes, limit {MAX_PAYLOAD}")
    return _HEAD.pack(TX_VERSION, network_id, payload.TYPE, sender, nonce, fee_sat) + write_bytes(p)


def sign(network: Network, secret: bytes, nonce: int, fee_sat: int, payload: AnyPayload, aux: bytes) -> Transaction:
    """Build and sign a transaction. aux is BIP340 auxiliary randomness (32 bytes; the caller's RNG)."""
    key = PrivateKey(secret)
    sender = key.public_key_xonly.format()
    body = encode_body(network.id, sender, nonce, fee_sat, payload)
    sig = key.sign_schnorr(H_TX_SIG(body), aux)
    return Transaction(network.id, sender, nonce, fee_sat, payload, sig, body + sig)


def decode(raw: bytes, network: Network) -> Transaction:
    """Strictly decode one transaction for network; raises a DecodeError subclass on anything else."""
    n = len(raw)
    if n > MAX_TX_SIZE:
        raise OutOfRange(f"transaction is {n} bytes, limit {MAX_TX_SIZE}")
    if n < _HEAD.size + 1:
        raise Truncated(f"transaction: {n} bytes is shorter than the {_HEAD.size + 1}-byte header")
    version, net, typ, sender, nonce, fee = _HEAD.unpack_from(raw, 0)
    if version != TX_VERSION:
        raise UnknownVersion(f"transaction version {version} (this code knows {TX_VERSION})")
    network.check(net, "transaction")
    cls = PAYLOAD_TYPES.get(typ)
    if cls is None:
        raise UnknownType(f"transaction type {typ}")
    if fee > MAX_MONEY:
        raise OutOfRange(f"fee {fee} exceeds {MAX_MONEY}")
    plen = raw[_HEAD.size]
    if plen < 0xFD:  # the common case, read without a Reader: this is the ledger's hot path
        start = _HEAD.size + 1
        if n != start + plen + 64:
            if n < start + plen + 64:
                raise Truncated(f"transaction: {n} bytes, payload and signature need {start + plen + 64}")
            raise TrailingBytes(f"transaction: {n - start - plen - 64} trailing bytes after the signature")
        payload_raw = raw[start:start + plen]
    else:
        r = Reader(raw, "transaction")
        r.pos = _HEAD.size
        payload_raw = r.var_bytes(MAX_PAYLOAD)
        r.take(64)
        r.end()
    return Transaction(net, sender, nonce, fee, cls.decode(payload_raw), raw[-64:], raw)


@lru_cache(maxsize=1 << 16)
def xonly_key(key: bytes) -> PublicKeyXOnly:
    """Parse (and cache) an x-only key; raises ValueError if it is not a point on the curve."""
    return PublicKeyXOnly(key)


def is_valid_key(key: bytes) -> bool:
    if len(key) != 32:
        return False
    try:
        xonly_key(key)
    except ValueError:
        return False
    return True


def check_signature(tx: Transaction) -> None:
    """Raise BadSignature unless tx carries a valid BIP340 signature by its sender."""
    try:
        pk = xonly_key(tx.sender)
    except ValueError:
        raise BadSignature("sender is not a valid x-only public key") from None
    if not pk.verify(tx.signature, H_TX_SIG(tx.raw[:-64])):
        raise BadSignature(f"signature does not verify for sender {tx.sender.hex()}")


def signature_ok(raw: bytes) -> bool:
    """Process-pool friendly check on raw bytes (sender at offset 3, signature last)."""
    try:
        return bool(xonly_key(raw[3:35]).verify(raw[-64:], H_TX_SIG(raw[:-64])))
    except ValueError:
        return False


def register_payloads(*classes: PayloadClass) -> None:
    """Add a subsystem's payload classes to the decoder (each type number once)."""
    for cls in classes:
        if cls.TYPE in PAYLOAD_TYPES:
            raise RuntimeError(f"transaction type {cls.TYPE!r} registered twice")
        PAYLOAD_TYPES[cls.TYPE] = cls


# The subsystems' payload modules import the names above; they register themselves when imported here.
from . import pegs_tx  # noqa: E402,F401
from . import work_tx  # noqa: E402,F401
from . import fl_tx  # noqa: E402,F401
