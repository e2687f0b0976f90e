"""Paid-session state transitions: open (escrow), settle (redeem the highest receipt), close (refund the rest).

State value (canonical, big-endian), docs/sessions.md:
  session_key(id) = 0x0F || session id (the opening txid) -> SessionRecord (205 bytes)
The deposit is locked money (add_locked) from the open until it is paid out: to the server by settlements, to the
client by the close. So sum(balances) + fees + locked == minted - burned holds throughout, and locked counts every
OPEN session's deposit less what was settled. Every handler checks everything before its first write.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Optional

from .errors import DecodeError, InvalidTransaction, Rejected, Unauthorized
from .session_tx import Receipt, SessionClose, SessionOpen, SessionSettle, quote_sat
from .state import Namespace, Rules, StateView, add_locked, charge_sender, credit
from .tx import Transaction, is_valid_key, xonly_key

MAX_SESSION_BLOCKS = 1 << 24  # an expiry at most this many L2 blocks ahead (a deposit is never locked for ever)
_S = bytes((Namespace.SESSION,))
_RECORD = struct.Struct(">B32s32s32sQQIQQQQQ32sQQ")


# -- errors ---------------------------------------------------------------------------------------------------------
class SessionRejected(Rejected):
    reason = "session"


class UnknownSession(SessionRejected):
    reason = "unknown-session"


class SessionClosed(SessionRejected):
    reason = "session-closed"


class SessionExpired(SessionRejected):
    reason = "session-expired"


class SessionNotExpired(SessionRejected):
    reason = "session-not-expired"


class StaleReceipt(SessionRejected):
    """A receipt whose seq is not above the last settled one: an older receipt, or the same one again."""

    reason = "stale-receipt"


class ReceiptNotCumulative(SessionRejected):
    reason = "receipt-not-cumulative"


class ReceiptOverEscrow(SessionRejected):
    reason = "receipt-over-escrow"


class ReceiptOverQuote(SessionRejected):
    reason = "receipt-over-quote"


class BadReceiptSignature(SessionRejected):
    reason = "bad-receipt-signature"


class SessionStatus(IntEnum):
    OPEN = 1  # receipts may be settled (at or below the expiry height)
    CLOSED = 2  # the rest was refunded to the client; nothing more moves


def session_key(session_id: bytes) -> bytes:
    return _S + session_id


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """Value under session_key: status u8 | client 32 | server 32 | session_key 32 | deposit u64 | price_msat u64 |
    unit u32 | expiry_height u64 | open_height u64 | seq u64 | settled_sat u64 | units u64 | receipt_id 32 |
    refunded_sat u64 | close_height u64 (seq, settled, units and receipt_id: the last settled receipt, 0 before)."""

    status: SessionStatus
    client: bytes
    server: bytes
    session_key: bytes
    deposit_sat: int
    price_msat: int
    unit: int
    expiry_height: int
    open_height: int
    seq: int
    settled_sat: int
    units: int
    receipt_id: bytes
    refunded_sat: int
    close_height: int

    SIZE = _RECORD.size

    @property
    def escrow_sat(self) -> int:
        """What the session still locks: the deposit less settlements, 0 once closed."""
        return self.deposit_sat - self.settled_sat if self.status == SessionStatus.OPEN else 0

    def encode(self) -> bytes:
        return _RECORD.pack(self.status, self.client, self.server, self.session_key, self.deposit_sat,
                            self.price_msat, self.unit, self.expiry_height, self.open_height, self.seq,
                            self.settled_sat, self.units, self.receipt_id, self.refunded_sat, self.close_height)

    @classmethod
    def decode(cls, b: bytes) -> "SessionRecord":
        if len(b) != _RECORD.size:
            raise DecodeError(f"session record of {len(b)} bytes, expected {_RECORD.size}")
        v = _RECORD.unpack(b)
        if v[0] not in (1, 2):
            raise DecodeError(f"session record status {v[0]}")
        rec = cls(SessionStatus(v[0]), *v[1:])
        if not rec.settled_sat + rec.refunded_sat <= rec.deposit_sat:
            raise DecodeError("session record pays out more than its deposit")
        return rec


def get_session(view: StateView, session_id: bytes) -> Optional[SessionRecord]:
    raw = view.get(session_key(session_id))
    return None if raw is None else SessionRecord.decode(raw)


def open_session(view: StateView, session_id: bytes) -> SessionRecord:
    rec = get_session(view, session_id)
    if rec is None:
        raise UnknownSession(f"no session {session_id.hex()}")
    if rec.status != SessionStatus.OPEN:
        raise SessionClosed(f"session {session_id.hex()} was closed at L2 height {rec.close_height}")
    return rec


def check_receipt(rec: SessionRecord, r: Receipt, network_id: int, height: int) -> None:
    """Every rule a receipt must meet to be settled against the session record (raises; writes nothing). The
    server runs the same check before accepting a receipt off-chain."""
    if height > rec.expiry_height:
        raise SessionExpired(f"the session expired at L2 height {rec.expiry_height}; this is {height}")
    if r.seq <= rec.seq:
        raise StaleReceipt(f"receipt seq {r.seq} is not above the settled seq {rec.seq}")
    if r.amount_sat < rec.settled_sat or r.units < rec.units:
        raise ReceiptNotCumulative(f"receipt pays {r.amount_sat} sat for {r.units} units, less than the "
                                   f"{rec.settled_sat} sat for {rec.units} units already settled")
    if r.amount_sat > rec.deposit_sat:
        raise ReceiptOverEscrow(f"receipt pays {r.amount_sat} sat, the deposit is {rec.deposit_sat} sat")
    quote = quote_sat(r.units, rec.price_msat, rec.unit)
    if r.amount_sat > quote:
        raise ReceiptOverQuote(f"receipt pays {r.amount_sat} sat for {r.units} units; the quote is {quote} sat "
                               f"({rec.price_msat} msat per {rec.unit} units)")
    if not xonly_key(rec.session_key).verify(r.signature, r.digest(network_id)):
        raise BadReceiptSignature(f"receipt {r.seq} is not signed by the session key {rec.session_key.hex()}")


def apply_open(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, SessionOpen)
    if not is_valid_key(p.server) or not is_valid_key(p.session_key):
        raise InvalidTransaction("the session's server and session key must be valid x-only public keys")
    if p.server == tx.sender:
        raise InvalidTransaction("a session with oneself pays nobody")
    if p.expiry_height <= view.height:
        raise SessionExpired(f"expiry height {p.expiry_height} is not above this block's height {view.height}")
    if p.expiry_height - view.height > MAX_SESSION_BLOCKS:
        raise InvalidTransaction(f"expiry height {p.expiry_height} is more than {MAX_SESSION_BLOCKS} blocks ahead")
    charge_sender(view, tx, rules, p.deposit_sat)
    add_locked(view, p.deposit_sat)
    view.put(session_key(tx.txid), SessionRecord(
        SessionStatus.OPEN, tx.sender, p.server, p.session_key, p.deposit_sat, p.price_msat, p.unit,
        p.expiry_height, view.height, 0, 0, 0, b"\0" * 32, 0, 0).encode())


def apply_settle(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, SessionSettle)
    r = p.receipt
    rec = open_session(view, r.session_id)
    if tx.sender != rec.server:
        raise Unauthorized(f"only the session's server {rec.server.hex()} settles its receipts")
    check_receipt(rec, r, rules.network.id, view.height)
    charge_sender(view, tx, rules, 0)
    delta = r.amount_sat - rec.settled_sat
    if delta:
        credit(view, rec.server, delta)
        add_locked(view, -delta)
    view.put(session_key(r.session_id), replace(rec, seq=r.seq, settled_sat=r.amount_sat, units=r.units,
                                                receipt_id=r.receipt_id).encode())


def apply_close(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, SessionClose)
    rec = open_session(view, p.session_id)
    if tx.sender == rec.client:
        if view.height <= rec.expiry_height:
            raise SessionNotExpired(f"the client may close the session after L2 height {rec.expiry_height}; this "
                                    f"is {view.height} (its server may close it at any time)")
    elif tx.sender != rec.server:
        raise Unauthorized("only the session's client or server closes it")
    charge_sender(view, tx, rules, 0)
    rest = rec.deposit_sat - rec.settled_sat
    if rest:
        credit(view, rec.client, rest)
        add_locked(view, -rest)
    view.put(session_key(p.session_id), replace(rec, status=SessionStatus.CLOSED, refunded_sat=rest,
                                                close_height=view.height).encode())
