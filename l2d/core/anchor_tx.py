"""The anchor update payload: where the Bitcoin anchor of an L2 height stands (docs/anchoring.md)."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from .errors import DecodeError, OutOfRange
from .payload import TxType

_ANCHOR = struct.Struct(">Q32s32s32sIB")
_ZERO32 = b"\0" * 32


class AnchorStatus(IntEnum):
    """Where a Bitcoin anchor of an L2 height stands (recorded in the state by AnchorUpdate)."""

    SUBMITTED = 1
    CONFIRMED = 2
    FINAL = 3


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

