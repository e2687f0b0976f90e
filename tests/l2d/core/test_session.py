"""Paid sessions: payload and receipt codecs, and the open / settle / close state transitions on a dict-backed ledger.

Every rejection is a typed error that leaves the view (and the committed state) untouched; every accepted
transaction keeps sum(balances) + fees + locked == minted - burned, and locked == the open sessions' escrow.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.coin_tx import Transfer
from l2d.core.errors import (InsufficientBalance, InvalidTransaction, OutOfRange, Rejected, Unauthorized)
from l2d.core.params import LOCAL, MAX_MONEY, REGTEST
from l2d.core.payload import Payload
from l2d.core.rules import apply_tx
from l2d.core.session import (MAX_SESSION_BLOCKS, BadReceiptSignature, ReceiptNotCumulative, ReceiptOverEscrow,
                              ReceiptOverQuote, SessionClosed, SessionExpired, SessionNotExpired, SessionRecord,
                              SessionStatus, StaleReceipt, UnknownSession, get_session, session_key)
from l2d.core.session_tx import Receipt, SessionClose, SessionOpen, SessionSettle, quote_sat
from l2d.core.state import (SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key, genesis_state,
                            locked_sat)
from l2d.core.tx import Transaction, sign
from tests.l2d.core.payload_checks import check_round_trip, check_strict

FEE = 2
RULES = Rules(LOCAL, FEE)
FUNDS = 10_000_000
DEPOSIT = 1_000_000
PRICE_MSAT, UNIT = 2_000_000, 1 << 20  # 2,000 sat per MiB, units are bytes
CLIENT, SERVER, OTHER, CLIENT2 = 1, 2, 3, 4
SESSION_SECRET = hashlib.sha256(b"l2d session test session key").digest()
SESSION_PK = PrivateKey(SESSION_SECRET).public_key_xonly.format()


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d session test key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def check_supply(state: dict[bytes, bytes]) -> None:
    sup = Supply.decode(state[SUPPLY_KEY])
    balances = sum(Account.decode(v).balance_sat for k, v in state.items() if k[0] == Namespace.ACCOUNT)
    locked = locked_sat(StateView(state.get))
    assert balances + sup.fees_sat + locked == sup.minted_sat - sup.burned_sat
    assert locked == sum(SessionRecord.decode(v).escrow_sat for k, v in state.items() if k[0] == Namespace.SESSION)


class Chain:
    """A ledger in a dict: each apply is one block (height + 1), writes committed on success."""

    def __init__(self) -> None:
        self.state = genesis_state([(pk(n), FUNDS) for n in (CLIENT, SERVER, OTHER, CLIENT2)], None, (pk(9),))
        self.height = 1

    def nonce(self, n: int) -> int:
        raw = self.state.get(account_key(pk(n)))
        return 0 if raw is None else Account.decode(raw).nonce

    def tx(self, n: int, payload: Payload) -> Transaction:
        return sign(LOCAL, secret(n), self.nonce(n), FEE, payload, b"\0" * 32)

    def commit(self, t: Transaction) -> Transaction:
        view = StateView(self.state.get, self.height)
        apply_tx(view, t, RULES)
        for k, v in view.writes.items():
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v
        self.height += 1
        check_supply(self.state)
        return t

    def apply(self, n: int, payload: Payload) -> Transaction:
        return self.commit(self.tx(n, payload))

    def reject(self, exc: type[Rejected], n: int, payload: Payload, match: Optional[str] = None) -> None:
        """apply must raise exactly exc and write nothing (checked on a view that already holds a write)."""
        t = self.tx(n, payload)
        frozen = dict(self.state)
        view = StateView(self.state.get, self.height)
        apply_tx(view, self.tx(OTHER, Transfer(pk(CLIENT2), 1)), RULES)
        before = dict(view.writes)
        with pytest.raises(exc, match=match) as info:
            apply_tx(view, t, RULES)
        assert type(info.value) is exc
        assert view.writes == before
        assert self.state == frozen

    def balance(self, n: int) -> int:
        return Account.decode(self.state[account_key(pk(n))]).balance_sat

    def session(self, sid: bytes) -> SessionRecord:
        rec = get_session(StateView(self.state.get), sid)
        assert rec is not None
        return rec

    def open(self, deposit: int = DEPOSIT, expiry_in: int = 100, client: int = CLIENT) -> bytes:
        return self.apply(client, SessionOpen(pk(SERVER), SESSION_PK, deposit, PRICE_MSAT, UNIT,
                                              self.height + expiry_in)).txid


def receipt(sid: bytes, seq: int, amount: int, units: int, secret_: bytes = SESSION_SECRET,
            network_id: int = LOCAL.id) -> Receipt:
    return Receipt.sign(network_id, PrivateKey(secret_), sid, seq, amount, units)


MIB = 1 << 20


# -- codecs -------------------------------------------------------------------------------------------------------
def sample_payloads() -> list[Payload]:
    sid = hashlib.sha256(b"session").digest()
    return [SessionOpen(pk(SERVER), SESSION_PK, DEPOSIT, PRICE_MSAT, UNIT, 1234),
            SessionSettle(receipt(sid, 7, 4000, 2 * MIB)), SessionClose(sid)]


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_signed_transactions(payload: Payload) -> None:
    check_round_trip(payload)


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_decoders_are_strict(payload: Payload) -> None:
    check_strict(payload)


def test_layouts_are_the_documented_sizes() -> None:
    opened, settle, close = sample_payloads()
    assert (len(opened.encode()), len(settle.encode()), len(close.encode())) == (92, 120, 32)
    assert Receipt.SIZE == 120 and SessionRecord.SIZE == 205


@pytest.mark.parametrize("make, match", [
    (lambda: SessionOpen(b"\0" * 32, SESSION_PK, 1, 1, 1, 9), "session server must not be all zero"),
    (lambda: SessionOpen(pk(SERVER), SESSION_PK[:31], 1, 1, 1, 9), "session key must be 32 bytes"),
    (lambda: SessionOpen(pk(SERVER), SESSION_PK, 0, 1, 1, 9), "session deposit 0 is outside"),
    (lambda: SessionOpen(pk(SERVER), SESSION_PK, MAX_MONEY + 1, 1, 1, 9), "session deposit"),
    (lambda: SessionOpen(pk(SERVER), SESSION_PK, 1, MAX_MONEY * 1000 + 1, 1, 9), "session price"),
    (lambda: SessionOpen(pk(SERVER), SESSION_PK, 1, 1, 0, 9), "session unit must be at least 1"),
    (lambda: SessionOpen(pk(SERVER), SESSION_PK, 1, 1, 2**32, 9), "session unit"),
    (lambda: Receipt(b"\1" * 32, 0, 1, 1, b"\0" * 64), "receipt seq must be at least 1"),
    (lambda: Receipt(b"\1" * 32, 1, MAX_MONEY + 1, 1, b"\0" * 64), "receipt amount"),
    (lambda: Receipt(b"\1" * 32, 1, 1, 1, b"\0" * 63), "receipt signature must be 64 bytes"),
    (lambda: SessionClose(b"\0" * 32), "session id must not be all zero"),
])
def test_invalid_payload_fields_are_refused(make: Any, match: str) -> None:
    with pytest.raises(OutOfRange, match=match):
        make()


def test_a_receipt_signature_covers_network_session_and_every_amount() -> None:
    sid = hashlib.sha256(b"s").digest()
    r = receipt(sid, 3, 100, 200)
    key = PrivateKey(SESSION_SECRET).public_key_xonly
    assert key.verify(r.signature, r.digest(LOCAL.id))
    for other in (Receipt.message(REGTEST.id, sid, 3, 100, 200), Receipt.message(LOCAL.id, b"\2" * 32, 3, 100, 200),
                  Receipt.message(LOCAL.id, sid, 4, 100, 200), Receipt.message(LOCAL.id, sid, 3, 101, 200),
                  Receipt.message(LOCAL.id, sid, 3, 100, 201)):
        assert not key.verify(r.signature, other)
    assert r.receipt_id != receipt(sid, 3, 100, 200, aux_secret()).receipt_id  # the signature is part of the id


def aux_secret() -> bytes:
    return hashlib.sha256(b"another session key").digest()


def test_quote_rounds_up_to_whole_satoshis() -> None:
    assert quote_sat(0, PRICE_MSAT, UNIT) == 0
    assert quote_sat(MIB, PRICE_MSAT, UNIT) == 2000
    assert quote_sat(1, PRICE_MSAT, UNIT) == 1  # a byte costs a fraction of a satoshi: rounded up
    assert quote_sat(1000, 1, 1) == 1 and quote_sat(1001, 1, 1) == 2


# -- the lifecycle -------------------------------------------------------------------------------------------------
def test_receipts_pay_the_server_once_each_and_the_close_refunds_the_rest() -> None:
    c = Chain()
    before = {n: c.balance(n) for n in (CLIENT, SERVER)}
    sid = c.open()
    rec = c.session(sid)
    assert (rec.status, rec.client, rec.server, rec.session_key, rec.deposit_sat) == (
        SessionStatus.OPEN, pk(CLIENT), pk(SERVER), SESSION_PK, DEPOSIT)
    assert c.balance(CLIENT) == before[CLIENT] - DEPOSIT - FEE and locked_sat(StateView(c.state.get)) == DEPOSIT
    # any number of off-chain receipts; the server redeems the highest it holds
    receipts = [receipt(sid, i, 2000 * i, i * MIB) for i in range(1, 51)]
    c.apply(SERVER, SessionSettle(receipts[9]))
    assert c.balance(SERVER) == before[SERVER] + 20_000 - FEE
    c.apply(SERVER, SessionSettle(receipts[49]))  # a later settlement pays only the difference
    assert c.balance(SERVER) == before[SERVER] + 100_000 - 2 * FEE
    rec = c.session(sid)
    assert (rec.seq, rec.settled_sat, rec.units, rec.receipt_id) == (50, 100_000, 50 * MIB, receipts[49].receipt_id)
    assert locked_sat(StateView(c.state.get)) == DEPOSIT - 100_000
    c.apply(SERVER, SessionClose(sid))  # the server may close at any time
    rec = c.session(sid)
    assert rec.status == SessionStatus.CLOSED and rec.refunded_sat == DEPOSIT - 100_000
    assert c.balance(CLIENT) == before[CLIENT] - 100_000 - FEE and locked_sat(StateView(c.state.get)) == 0
    assert c.state[session_key(sid)] == rec.encode() and SessionRecord.decode(rec.encode()) == rec


def test_the_client_closes_only_after_the_expiry_and_the_server_settles_only_until_it() -> None:
    c = Chain()
    sid = c.open(expiry_in=3)
    expiry = c.session(sid).expiry_height
    c.reject(SessionNotExpired, CLIENT, SessionClose(sid), match=f"after L2 height {expiry}")
    c.apply(SERVER, SessionSettle(receipt(sid, 1, 2000, MIB)))
    while c.height <= expiry:
        c.apply(OTHER, Transfer(pk(CLIENT2), 1))  # blocks pass
    c.reject(SessionExpired, SERVER, SessionSettle(receipt(sid, 2, 4000, 2 * MIB)), match=f"expired at L2 height "
             f"{expiry}")
    c.apply(CLIENT, SessionClose(sid))
    assert c.session(sid).refunded_sat == DEPOSIT - 2000
    c.reject(SessionClosed, SERVER, SessionSettle(receipt(sid, 2, 4000, 2 * MIB)))
    c.reject(SessionClosed, CLIENT, SessionClose(sid))


def test_every_receipt_rule_is_a_typed_rejection_that_writes_nothing() -> None:
    c = Chain()
    sid = c.open()
    c.apply(SERVER, SessionSettle(receipt(sid, 5, 10_000, 5 * MIB)))
    c.reject(StaleReceipt, SERVER, SessionSettle(receipt(sid, 5, 10_000, 5 * MIB)), match="not above the settled seq 5")
    c.reject(StaleReceipt, SERVER, SessionSettle(receipt(sid, 4, 8000, 4 * MIB)))  # lower seq
    c.reject(ReceiptNotCumulative, SERVER, SessionSettle(receipt(sid, 6, 9999, 6 * MIB)))  # pays less than before
    c.reject(ReceiptNotCumulative, SERVER, SessionSettle(receipt(sid, 6, 10_000, 5 * MIB - 1)))  # fewer units
    c.reject(ReceiptOverEscrow, SERVER, SessionSettle(receipt(sid, 6, DEPOSIT + 1, 10**9)))
    c.reject(ReceiptOverQuote, SERVER, SessionSettle(receipt(sid, 6, 12_001, 6 * MIB)), match="the quote is 12000")
    c.reject(BadReceiptSignature, SERVER, SessionSettle(receipt(sid, 6, 12_000, 6 * MIB, aux_secret())))  # wrong key
    c.reject(BadReceiptSignature, SERVER, SessionSettle(receipt(sid, 6, 12_000, 6 * MIB, network_id=REGTEST.id)))
    forged = receipt(sid, 6, 12_000, 6 * MIB)
    tampered = Receipt(sid, 6, 12_000, 7 * MIB, forged.signature)  # more units than were signed for
    c.reject(BadReceiptSignature, SERVER, SessionSettle(tampered))
    c.reject(Unauthorized, OTHER, SessionSettle(forged), match="only the session's server")
    c.reject(Unauthorized, CLIENT, SessionSettle(forged))
    c.reject(UnknownSession, SERVER, SessionSettle(receipt(b"\7" * 32, 1, 1, MIB)))
    c.reject(Unauthorized, OTHER, SessionClose(sid), match="client or server")
    c.reject(UnknownSession, CLIENT, SessionClose(b"\7" * 32))
    # a receipt of one session settles nothing in another (the signature covers the session id)
    sid2 = c.open(client=CLIENT2)
    moved = receipt(sid, 7, 14_000, 7 * MIB)
    c.reject(BadReceiptSignature, SERVER, SessionSettle(Receipt(sid2, 7, 14_000, 7 * MIB, moved.signature)))
    c.apply(SERVER, SessionSettle(moved))
    assert c.session(sid).settled_sat == 14_000 and c.session(sid2).settled_sat == 0


def test_open_rules() -> None:
    c = Chain()
    c.reject(InvalidTransaction, CLIENT, SessionOpen(pk(CLIENT), SESSION_PK, DEPOSIT, 1, 1, 100), match="oneself")
    not_a_point = b"\xff" * 32
    c.reject(InvalidTransaction, CLIENT, SessionOpen(pk(SERVER), not_a_point, DEPOSIT, 1, 1, 100))
    c.reject(InvalidTransaction, CLIENT, SessionOpen(not_a_point, SESSION_PK, DEPOSIT, 1, 1, 100))
    c.reject(SessionExpired, CLIENT, SessionOpen(pk(SERVER), SESSION_PK, DEPOSIT, 1, 1, c.height))
    c.reject(InvalidTransaction, CLIENT, SessionOpen(pk(SERVER), SESSION_PK, DEPOSIT, 1, 1,
                                                     c.height + MAX_SESSION_BLOCKS + 1), match="blocks ahead")
    c.reject(InsufficientBalance, CLIENT, SessionOpen(pk(SERVER), SESSION_PK, FUNDS, 1, 1, c.height + 5))
    c.open(deposit=FUNDS - FEE)  # the whole balance may be escrowed


def test_a_fully_settled_session_closes_with_nothing_to_refund() -> None:
    c = Chain()
    sid = c.open(deposit=4000)
    c.apply(SERVER, SessionSettle(receipt(sid, 1, 4000, 2 * MIB)))
    c.reject(ReceiptOverEscrow, SERVER, SessionSettle(receipt(sid, 2, 4001, 3 * MIB)))
    c.apply(SERVER, SessionClose(sid))
    assert c.session(sid).refunded_sat == 0 and locked_sat(StateView(c.state.get)) == 0


# -- properties ----------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "pay", "settle", "close", "expire"]), st.integers(0, 3),
                          st.integers(0, 5_000), st.integers(0, 3 * MIB)), max_size=40))
def test_money_is_conserved_and_the_server_gets_exactly_the_settled_receipts(ops: list[tuple[str, int, int, int]]
                                                                             ) -> None:
    """Random interleavings of opens, off-chain payments, settlements (of the highest receipt, or a stale one),
    closes and passing blocks: every transaction either applies or is refused with a typed error and no write;
    the supply invariant holds with the escrow locked (Chain.commit checks it after every block); the server is paid
    exactly what the settled receipts say; each client gets back its deposit less that."""
    c = Chain()
    start = {n: c.balance(n) for n in (CLIENT, SERVER)}
    sessions: list[bytes] = []
    issued: dict[bytes, list[Receipt]] = {}
    fees = {CLIENT: 0, SERVER: 0}
    for op, i, amount, units in ops:
        sid = sessions[i % len(sessions)] if sessions else None
        try:
            if op == "open" or sid is None:
                sid = c.open(deposit=50_000, expiry_in=20)
                sessions.append(sid)
                issued[sid] = []
                fees[CLIENT] += FEE
            elif op == "pay":  # the client signs a higher receipt (cumulative, within the quote)
                last = issued[sid][-1] if issued[sid] else None
                u = (last.units if last else 0) + units
                a = min((last.amount_sat if last else 0) + amount, quote_sat(u, PRICE_MSAT, UNIT), 50_000)
                a = max(a, last.amount_sat if last else 0)
                issued[sid].append(receipt(sid, len(issued[sid]) + 1, a, u))
            elif op == "settle" and issued[sid]:
                pick = issued[sid][-1] if amount % 3 else issued[sid][amount % len(issued[sid])]
                c.apply(SERVER, SessionSettle(pick))
                fees[SERVER] += FEE
            elif op == "close":
                c.apply(SERVER if amount % 2 else CLIENT, SessionClose(sid))
                fees[SERVER if amount % 2 else CLIENT] += FEE
            elif op == "expire":
                c.apply(OTHER, Transfer(pk(CLIENT2), 1))
        except Rejected:
            pass  # refused (stale receipt, closed, expired...): Chain.commit wrote nothing
    recs = [c.session(s) for s in sessions]
    settled = sum(r.settled_sat for r in recs)
    assert c.balance(SERVER) == start[SERVER] + settled - fees[SERVER]
    assert c.balance(CLIENT) == start[CLIENT] - sum(r.deposit_sat - r.refunded_sat for r in recs) - fees[CLIENT]
    for r, s in zip(recs, sessions):
        assert r.settled_sat + r.refunded_sat == (r.deposit_sat if r.status == SessionStatus.CLOSED else r.settled_sat)
        if r.seq:  # the record names the receipt that was settled, and it is one the client signed
            assert r.receipt_id in [x.receipt_id for x in issued[s]]
            assert r.settled_sat == issued[s][r.seq - 1].amount_sat
