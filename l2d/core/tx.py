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
from functools import lru_cache
from typing import Mapping

from coincurve import PrivateKey, PublicKeyXOnly

from .anchor_tx import AnchorUpdate
from .codec import Reader, write_bytes
from .coin_tx import Burn, Mint, Transfer
from .errors import BadSignature, OutOfRange, TrailingBytes, Truncated, UnknownType, UnknownVersion
from .fl_tx import FlFinish, FlJobPost, FlReclaim, FlRegister, FlRound
from .hashing import H_TX_SIG, H_TXID
from .model_tx import Completion, CompletionChallenge, CompletionReferee, ModelRegister, ModelServe
from .params import MAX_MONEY, Network
from .payload import Payload, PayloadClass, TxType
from .pegs_tx import (AnchorPlan, BtcHeaders, FederationFund, PeginClaim, PegoutPlan, PegoutUpdate, PlanCompleted,
                      PlanSignature, RollPlan)
from .relay_tx import RelayExit, RelayHeartbeat, RelayRegister, RelayWeights, RelayWithdraw
from .session_tx import SessionClose, SessionOpen, SessionSettle
from .work_tx import (TaskAssign, TaskCancel, TaskDispute, TaskReassign, TaskResolve, TaskResult, TaskSettle,
                      TaskSubmit, WorkerExit, WorkerHeartbeat, WorkerRegister, WorkerWithdraw)

TX_VERSION = 1
MAX_PAYLOAD = 4096  # room for a peg-in claim: a Bitcoin transaction and its merkle proof
MAX_TX_SIZE = 3 + 32 + 8 + 8 + 3 + MAX_PAYLOAD + 64
_HEAD = struct.Struct(">BBB32sQQ")

# Every transaction type and the class that decodes its payload (a test checks that no TxType is missing).
_PAYLOAD_CLASSES: tuple[PayloadClass, ...] = (
    Transfer, Mint, Burn, AnchorUpdate,
    PeginClaim, PegoutUpdate, BtcHeaders, FederationFund, PegoutPlan, PlanSignature, RollPlan, PlanCompleted,
    AnchorPlan,
    WorkerRegister, WorkerHeartbeat, WorkerExit, WorkerWithdraw,
    TaskSubmit, TaskAssign, TaskResult, TaskReassign, TaskSettle, TaskDispute, TaskResolve, TaskCancel,
    FlJobPost, FlRegister, FlRound, FlFinish, FlReclaim,
    SessionOpen, SessionSettle, SessionClose,
    RelayRegister, RelayHeartbeat, RelayExit, RelayWithdraw, RelayWeights,
    ModelRegister, ModelServe, Completion, CompletionChallenge, CompletionReferee,
)
PAYLOAD_TYPES: Mapping[int, PayloadClass] = {cls.TYPE: cls for cls in _PAYLOAD_CLASSES}


@dataclass(frozen=True, slots=True)
class Transaction:
    network_id: int
    sender: bytes  # 32-byte x-only public key
    nonce: int
    fee_sat: int
    payload: Payload
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


def encode_body(network_id: int, sender: bytes, nonce: int, fee_sat: int, payload: Payload) -> bytes:
    if len(sender) != 32:
        raise OutOfRange(f"sender key is {len(sender)} bytes, expected 32")
    if not 0 <= nonce < 2**64 or not 0 <= fee_sat <= MAX_MONEY:
        raise OutOfRange(f"nonce {nonce} or fee {fee_sat} out of range")
    p = payload.encode()
    if len(p) > MAX_PAYLOAD:
        raise OutOfRange(f"payload is {len(p)} bytes, limit {MAX_PAYLOAD}")
    return _HEAD.pack(TX_VERSION, network_id, payload.TYPE, sender, nonce, fee_sat) + write_bytes(p)


def sign(network: Network, secret: bytes, nonce: int, fee_sat: int, payload: Payload, aux: bytes) -> Transaction:
    """Build and sign a transaction. aux is BIP340 auxiliary randomness (32 bytes; the caller's RNG)."""
    key = PrivateKey(secret)
    sender = key.public_key_xonly.format()
    body = encode_body(network.id, sender, nonce, fee_sat, payload)
    sig = key.sign_schnorr(H_TX_SIG(body), aux)
    return Transaction(network.id, sender, nonce, fee_sat, payload, sig, body + sig)


def public_key(secret: bytes) -> bytes:
    """The x-only public key of a secret: the account id its transactions are sent from."""
    return bytes(PrivateKey(secret).public_key_xonly.format())


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

