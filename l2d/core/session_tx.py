"""Paid-session transaction payloads and the off-chain receipt (docs/sessions.md).

A client escrows a deposit for a server and authorizes an ephemeral session key (SessionOpen); it then pays the
server off-chain with receipts, each signed by the session key and cumulative (the highest one is worth all the
earlier ones); the server redeems the highest it holds (SessionSettle, any number of times, seq increasing); the
session is closed by the server at any time, or by the client once it has expired (SessionClose), which returns
the unsettled rest of the deposit to the client.

Byte layouts (big-endian integers):
    SessionOpen   server 32 | session_key 32 | deposit_sat u64 | price_msat u64 | unit u32 | expiry_height u64 (92)
    Receipt       session_id 32 | seq u64 | amount_sat u64 | units u64 | signature 64                        (120)
    SessionSettle the Receipt                                                                               (120)
    SessionClose  session_id 32                                                                              (32)
The receipt's signature is BIP340 by the session key over
    H_RECEIPT(network_id u8 | session_id 32 | seq u64 | amount_sat u64 | units u64)
with H_RECEIPT the tagged hash "l2d/session/receipt": a receipt is valid on one network, for one session.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from coincurve import PrivateKey

from .codec import Reader
from .errors import OutOfRange
from .hashing import H_RECEIPT, H_RECEIPT_ID
from .params import MAX_MONEY
from .payload import TxType, check_amount

MSAT = 1000
MAX_PRICE_MSAT = MAX_MONEY * MSAT
_ZERO = b"\0" * 32

_OPEN = struct.Struct(">32s32sQQIQ")
_RECEIPT_BODY = struct.Struct(">32sQQQ")
_MESSAGE = struct.Struct(">B32sQQQ")


def _key(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise OutOfRange(f"{what} must be 32 bytes")
    if value == _ZERO:
        raise OutOfRange(f"{what} must not be all zero")


def _u(value: int, bits: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise OutOfRange(f"{what} {value!r} is outside u{bits}")


def quote_sat(units: int, price_msat: int, unit: int) -> int:
    """What `units` cost at price_msat per `unit` units, in whole satoshis rounded up."""
    return -(-units * price_msat // (unit * MSAT))


@dataclass(frozen=True, slots=True)
class SessionOpen:
    """Open a session (session id = this transaction's txid): escrow deposit_sat of the sender's balance for
    `server`, at price_msat per `unit` units (a receipt never charges more than its units' quote), until
    expiry_height (the server settles at or below it; the client may close after it); receipts are signed by
    session_key."""

    TYPE: ClassVar[TxType] = TxType.SESSION_OPEN
    FEELESS: ClassVar[bool] = False
    server: bytes
    session_key: bytes
    deposit_sat: int
    price_msat: int
    unit: int
    expiry_height: int

    def __post_init__(self) -> None:
        _key(self.server, "session server")
        _key(self.session_key, "session key")
        _u(self.deposit_sat, 64, "session deposit")
        check_amount(self.deposit_sat, "session deposit")
        _u(self.price_msat, 64, "session price")
        if self.price_msat > MAX_PRICE_MSAT:
            raise OutOfRange(f"session price {self.price_msat} msat exceeds {MAX_PRICE_MSAT}")
        _u(self.unit, 32, "session unit")
        if self.unit == 0:
            raise OutOfRange("session unit must be at least 1")
        _u(self.expiry_height, 64, "session expiry height")

    def encode(self) -> bytes:
        return _OPEN.pack(self.server, self.session_key, self.deposit_sat, self.price_msat, self.unit,
                          self.expiry_height)

    def debit_sat(self) -> int:
        return self.deposit_sat

    @classmethod
    def decode(cls, b: bytes) -> "SessionOpen":
        r = Reader(b, "session open payload")
        v = _OPEN.unpack(r.take(_OPEN.size))
        r.end()
        return cls(*v)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The client's off-chain payment: everything paid in the session so far (amount_sat, for `units` units),
    numbered by seq (1, 2, ...), signed by the session key. Cumulative: the highest receipt replaces the others."""

    session_id: bytes
    seq: int
    amount_sat: int
    units: int
    signature: bytes

    SIZE: ClassVar[int] = _RECEIPT_BODY.size + 64

    def __post_init__(self) -> None:
        _key(self.session_id, "receipt session id")
        _u(self.seq, 64, "receipt seq")
        if self.seq == 0:
            raise OutOfRange("receipt seq must be at least 1")
        _u(self.amount_sat, 64, "receipt amount")
        if self.amount_sat > MAX_MONEY:
            raise OutOfRange(f"receipt amount {self.amount_sat} exceeds {MAX_MONEY}")
        _u(self.units, 64, "receipt units")
        if not isinstance(self.signature, bytes) or len(self.signature) != 64:
            raise OutOfRange("receipt signature must be 64 bytes")

    @staticmethod
    def message(network_id: int, session_id: bytes, seq: int, amount_sat: int, units: int) -> bytes:
        """The 32-byte digest the session key signs."""
        return H_RECEIPT(_MESSAGE.pack(network_id, session_id, seq, amount_sat, units))

    @classmethod
    def sign(cls, network_id: int, key: PrivateKey, session_id: bytes, seq: int, amount_sat: int, units: int,
             aux: bytes = _ZERO) -> "Receipt":
        """Signed by the session key (a PrivateKey the payer keeps: making one from its secret derives the public
        key, a third of a receipt's signing time)."""
        sig = key.sign_schnorr(cls.message(network_id, session_id, seq, amount_sat, units), aux)
        return cls(session_id, seq, amount_sat, units, sig)

    def digest(self, network_id: int) -> bytes:
        return self.message(network_id, self.session_id, self.seq, self.amount_sat, self.units)

    @property
    def receipt_id(self) -> bytes:
        """The hash of the whole receipt, signature included (recorded in the state once settled)."""
        return H_RECEIPT_ID(self.encode())

    def encode(self) -> bytes:
        return _RECEIPT_BODY.pack(self.session_id, self.seq, self.amount_sat, self.units) + self.signature

    @classmethod
    def decode(cls, b: bytes) -> "Receipt":
        r = Reader(b, "receipt")
        sid, seq, amount, units = _RECEIPT_BODY.unpack(r.take(_RECEIPT_BODY.size))
        sig = r.take(64)
        r.end()
        return cls(sid, seq, amount, units, sig)


@dataclass(frozen=True, slots=True)
class SessionSettle:
    """The server redeems a receipt: it is paid the receipt's amount less what earlier settlements paid."""

    TYPE: ClassVar[TxType] = TxType.SESSION_SETTLE
    FEELESS: ClassVar[bool] = False
    receipt: Receipt

    def encode(self) -> bytes:
        return self.receipt.encode()

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "SessionSettle":
        return cls(Receipt.decode(b))


@dataclass(frozen=True, slots=True)
class SessionClose:
    """Close a session: by its server at any time, by its client once it has expired; the deposit's unsettled
    rest goes back to the client."""

    TYPE: ClassVar[TxType] = TxType.SESSION_CLOSE
    FEELESS: ClassVar[bool] = False
    session_id: bytes

    def __post_init__(self) -> None:
        _key(self.session_id, "session id")

    def encode(self) -> bytes:
        return self.session_id

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "SessionClose":
        r = Reader(b, "session close payload")
        sid = r.take(32)
        r.end()
        return cls(sid)
