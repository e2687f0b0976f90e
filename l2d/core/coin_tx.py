"""Payloads of the coin itself: transfer, mint and burn (a burn to a Bitcoin address is a peg-out request).

Byte layouts (big-endian integers) are in docs/transaction-format.md.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .codec import Reader, write_bytes
from .errors import DecodeError, OutOfRange
from .payload import TxType, check_amount

MAX_BURN_DESTINATION = 128
_DEST_AMOUNT = struct.Struct(">32sQ")
_AMOUNT = struct.Struct(">Q")


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
        check_amount(self.amount_sat, f"{self.TYPE.name.lower()} amount")

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
        check_amount(self.amount_sat, "burn amount")
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

