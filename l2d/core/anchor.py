"""Anchors in the state: the record of where the Bitcoin anchor of an L2 height stands, and its rule."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import cast

from .anchor_tx import AnchorStatus, AnchorUpdate
from .errors import DecodeError, DuplicateDuty
from .state import Namespace, Rules, StateView, bump_member_nonce, check_member
from .tx import Transaction

_ANCHOR_VALUE = struct.Struct(">32s32s32sIB")


def anchor_key(l2_height: int) -> bytes:
    """0x04 || l2_height as a 32-byte big-endian integer."""
    return bytes((Namespace.ANCHOR,)) + l2_height.to_bytes(32, "big")



@dataclass(frozen=True, slots=True)
class AnchorEntry:
    """State value under anchor_key(h): the anchored root and where its Bitcoin anchor stands (101 bytes)."""

    state_root: bytes
    btc_txid: bytes
    btc_block_hash: bytes
    btc_height: int
    status: AnchorStatus

    def encode(self) -> bytes:
        return _ANCHOR_VALUE.pack(self.state_root, self.btc_txid, self.btc_block_hash, self.btc_height, self.status)

    @classmethod
    def decode(cls, b: bytes) -> "AnchorEntry":
        if len(b) != _ANCHOR_VALUE.size:
            raise DecodeError(f"anchor value is {len(b)} bytes, expected {_ANCHOR_VALUE.size}")
        root, txid, block, height, status = _ANCHOR_VALUE.unpack(b)
        if status not in (1, 2, 3):
            raise DecodeError(f"anchor value status {status}")
        return cls(root, txid, block, height, AnchorStatus(status))



def apply_anchor(view: StateView, tx: Transaction, rules: Rules) -> None:
    """AnchorUpdate: a federation member records (or moves) the Bitcoin anchor of one L2 height. Recording exactly
    what is recorded already is a DuplicateDuty (another member, or an earlier run, posted it first)."""
    check_member(view, tx)
    p = cast(AnchorUpdate, tx.payload)
    entry = AnchorEntry(p.state_root, p.btc_txid, p.btc_block_hash, p.btc_height, p.status).encode()
    if view.get(anchor_key(p.l2_height)) == entry:
        raise DuplicateDuty(f"the anchor of L2 height {p.l2_height} is already recorded as {p.status.name} with "
                            f"transaction {p.btc_txid[::-1].hex()}")
    bump_member_nonce(view, tx)
    view.put(anchor_key(p.l2_height), entry)
