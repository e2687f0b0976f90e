"""The state transition (apply_tx over the RULES table): each rejection changes nothing, accepted transactions
have exactly their effects, and supply, nonce and replay invariants hold over random transaction sequences."""
from __future__ import annotations

import hashlib
from typing import Optional

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core import rules as rules_table
from l2d.core.coin_tx import Burn, Mint, Transfer
from l2d.core.errors import (BadNonce, BadSignature, DecodeError, FeeTooLow, ForeignNetwork, InsufficientBalance,
                             InvalidTransaction, Overflow, Rejected, Unauthorized, UnknownSender)
from l2d.core.params import LOCAL, MAINNET, MAX_MONEY, REGTEST, SIGNET, Network
from l2d.core.payload import Payload, TxType
from l2d.core.rules import apply_tx
from l2d.core.state import (MINT_AUTHORITY_KEY, SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key,
                            genesis_state, meta_key)
from l2d.core.tx import Transaction, decode, sign

AUX0 = b"\0" * 32
NOT_ON_CURVE = (5).to_bytes(32, "big")  # 5**3 + 7 is a non-residue mod p: no point has x = 5


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


AUTH, A, B, C, P, Q = (pubkey(i) for i in (0, 1, 2, 3, 9, 8))  # C has no account; P primes views
MIN_FEE = 2
RULES = Rules(LOCAL, MIN_FEE)


def tx(n: int, nonce: int, fee: int, payload: Payload, net: Network = LOCAL) -> Transaction:
    return sign(net, secret(n), nonce, fee, payload, AUX0)


def genesis() -> dict[bytes, bytes]:
    return genesis_state([(A, 10_000), (B, 5_000), (P, 1_000)], AUTH)


def acc(bal: int, nonce: int) -> bytes:
    return Account(bal, nonce).encode()


def primed_view(base: dict[bytes, bytes], net: Network) -> StateView:
    """A view that already holds one accepted transaction, so 'nothing changed' is checked on real writes."""
    view = StateView(base.get)
    apply_tx(view, tx(9, 0, MIN_FEE, Transfer(Q, 1), net), Rules(net, MIN_FEE))
    assert view.writes
    return view


def assert_rejected(exc: type[Exception], t: Transaction, *, base: Optional[dict[bytes, bytes]] = None,
                    rules: Rules = RULES) -> None:
    base = genesis() if base is None else base
    frozen = dict(base)
    view = primed_view(base, rules.network)
    before = dict(view.writes)
    with pytest.raises(exc) as info:
        apply_tx(view, t, rules)
    assert type(info.value) is exc
    assert view.writes == before
    assert base == frozen


def flip_last_bit(t: Transaction) -> Transaction:
    raw = t.raw[:-1] + bytes((t.raw[-1] ^ 1,))
    return decode(raw, LOCAL)


# ---------------------------------------------------------------------------------------------- rejections

def _overflow_base() -> dict[bytes, bytes]:
    """Deliberately inconsistent state: B already holds MAX_MONEY (as if balances were corrupted)."""
    return {account_key(A): acc(10_000, 0), account_key(B): acc(MAX_MONEY, 0), account_key(P): acc(1_000, 0),
            SUPPLY_KEY: Supply(11_000, 0, 0).encode(), MINT_AUTHORITY_KEY: AUTH}


def _with_nonce(n: int) -> dict[bytes, bytes]:
    g = genesis()
    g[account_key(A)] = acc(10_000, n)
    return g


REJECTIONS = {
    "bad-signature": (BadSignature, lambda: flip_last_bit(tx(1, 0, 2, Transfer(B, 1))), None, RULES),
    "bad-signature-mint": (BadSignature, lambda: flip_last_bit(tx(0, 0, 0, Mint(B, 1))), None, RULES),
    "signed-by-other-key": (BadSignature, lambda: decode(tx(1, 0, 2, Transfer(B, 1)).raw[:-64]
                                                         + tx(2, 0, 2, Transfer(B, 1)).signature, LOCAL), None, RULES),
    "nonce-too-low": (BadNonce, lambda: tx(1, 2, 2, Transfer(B, 1)), _with_nonce(3), RULES),
    "nonce-too-high": (BadNonce, lambda: tx(1, 4, 2, Transfer(B, 1)), _with_nonce(3), RULES),
    "nonce-too-high-from-zero": (BadNonce, lambda: tx(1, 1, 2, Burn(1)), None, RULES),
    "mint-bad-nonce": (BadNonce, lambda: tx(0, 1, 0, Mint(B, 1)), None, RULES),
    "insufficient-transfer": (InsufficientBalance, lambda: tx(1, 0, 2, Transfer(B, 9_999)), None, RULES),
    "insufficient-burn": (InsufficientBalance, lambda: tx(1, 0, 3, Burn(9_998)), None, RULES),
    "insufficient-fee-only": (InsufficientBalance, lambda: tx(1, 0, 10_000, Transfer(B, 1)), None, RULES),
    "mint-beyond-max-money": (Overflow, lambda: tx(0, 0, 0, Mint(B, MAX_MONEY - 16_000 + 1)), None, RULES),
    "recipient-balance-overflow": (Overflow, lambda: tx(1, 0, 2, Transfer(B, 1)), _overflow_base(), RULES),
    "fee-below-floor": (FeeTooLow, lambda: tx(1, 0, MIN_FEE - 1, Transfer(B, 1)), None, RULES),
    "fee-zero-burn": (FeeTooLow, lambda: tx(1, 0, 0, Burn(1)), None, RULES),
    "fee-below-raised-floor": (FeeTooLow, lambda: tx(1, 0, 99, Transfer(B, 1)), None, Rules(LOCAL, 100)),
    "unknown-sender-transfer": (UnknownSender, lambda: tx(3, 0, 2, Transfer(B, 1)), None, RULES),
    "unknown-sender-burn": (UnknownSender, lambda: tx(3, 0, 2, Burn(1)), None, RULES),
    "mint-by-non-authority": (Unauthorized, lambda: tx(1, 0, 0, Mint(B, 1)), None, RULES),
    "mint-on-signet": (Unauthorized, lambda: tx(0, 0, 0, Mint(B, 1), SIGNET), None, Rules(SIGNET, MIN_FEE)),
    "mint-on-mainnet": (Unauthorized, lambda: tx(0, 0, 0, Mint(B, 1), MAINNET), None, Rules(MAINNET, MIN_FEE)),
    "mint-without-authority": (Unauthorized, lambda: tx(0, 0, 0, Mint(B, 1)),
                               genesis_state([(A, 10_000), (P, 1_000)], None), RULES),
    "self-transfer": (InvalidTransaction, lambda: tx(1, 0, 2, Transfer(A, 1)), None, RULES),
    "recipient-not-on-curve": (InvalidTransaction, lambda: tx(1, 0, 2, Transfer(NOT_ON_CURVE, 1)), None, RULES),
    "mint-recipient-not-on-curve": (InvalidTransaction, lambda: tx(0, 0, 0, Mint(NOT_ON_CURVE, 1)), None, RULES),
    "mint-with-fee": (InvalidTransaction, lambda: tx(0, 0, 1, Mint(B, 1)), None, RULES),
    "wrong-network": (ForeignNetwork, lambda: tx(1, 0, 2, Transfer(B, 1), REGTEST), None, RULES),
    "wrong-network-mint": (ForeignNetwork, lambda: tx(0, 0, 0, Mint(B, 1), REGTEST), None, RULES),
}


@pytest.mark.parametrize("name", REJECTIONS)
def test_rejection_changes_nothing(name: str) -> None:
    exc, make, base, rules = REJECTIONS[name]
    assert_rejected(exc, make(), base=None if base is None else dict(base), rules=rules)


def test_every_apply_tx_refusal_is_a_rejected() -> None:
    view = StateView(genesis().get)
    with pytest.raises(Rejected):
        apply_tx(view, tx(1, 0, 2, Transfer(B, 1), REGTEST), RULES)


def test_nonce_exhaustion_is_a_rejection() -> None:
    base = genesis()
    base[account_key(A)] = acc(10_000, 2**64 - 1)
    view = StateView(base.get)
    with pytest.raises(Rejected):
        apply_tx(view, tx(1, 2**64 - 1, 2, Transfer(B, 1)), RULES)
    assert view.writes == {}


# ---------------------------------------------------------------------------------------------- effects

def apply_fresh(t: Transaction, base: Optional[dict[bytes, bytes]] = None,
                rules: Rules = RULES) -> dict[bytes, Optional[bytes]]:
    base = genesis() if base is None else base
    frozen = dict(base)
    view = StateView(base.get)
    apply_tx(view, t, rules)
    assert base == frozen
    return view.writes


def test_transfer_effects() -> None:
    assert apply_fresh(tx(1, 0, 2, Transfer(B, 1_000))) == {
        account_key(A): acc(8_998, 1), account_key(B): acc(6_000, 0), SUPPLY_KEY: Supply(16_000, 0, 2).encode()}


def test_transfer_to_new_account_and_whole_balance() -> None:
    assert apply_fresh(tx(1, 0, 5, Transfer(C, 9_995))) == {
        account_key(A): acc(0, 1), account_key(C): acc(9_995, 0), SUPPLY_KEY: Supply(16_000, 0, 5).encode()}


def test_transfer_at_the_fee_floor_and_recipient_at_max_money() -> None:
    base = _overflow_base()
    base[account_key(B)] = acc(MAX_MONEY - 1, 7)
    assert apply_fresh(tx(1, 0, MIN_FEE, Transfer(B, 1)), base) == {
        account_key(A): acc(10_000 - 1 - MIN_FEE, 1), account_key(B): acc(MAX_MONEY, 7),
        SUPPLY_KEY: Supply(11_000, 0, MIN_FEE).encode()}


def test_burn_effects() -> None:
    assert apply_fresh(tx(1, 0, 3, Burn(500, b"bc1qdest"))) == {
        account_key(A): acc(9_497, 1), SUPPLY_KEY: Supply(16_000, 500, 3).encode()}
    assert apply_fresh(tx(1, 0, 3, Burn(9_997))) == {
        account_key(A): acc(0, 1), SUPPLY_KEY: Supply(16_000, 9_997, 3).encode()}


def test_mint_effects() -> None:
    assert apply_fresh(tx(0, 0, 0, Mint(C, 700))) == {
        account_key(AUTH): acc(0, 1), account_key(C): acc(700, 0), SUPPLY_KEY: Supply(16_700, 0, 0).encode()}
    assert apply_fresh(tx(0, 0, 0, Mint(A, 700))) == {
        account_key(AUTH): acc(0, 1), account_key(A): acc(10_700, 0), SUPPLY_KEY: Supply(16_700, 0, 0).encode()}


def test_mint_to_self_and_up_to_max_money() -> None:
    assert apply_fresh(tx(0, 0, 0, Mint(AUTH, MAX_MONEY - 16_000))) == {
        account_key(AUTH): acc(MAX_MONEY - 16_000, 1), SUPPLY_KEY: Supply(MAX_MONEY, 0, 0).encode()}


def test_mint_allowed_on_regtest_and_exempt_from_fee_floor() -> None:
    writes = apply_fresh(tx(0, 0, 0, Mint(B, 1), REGTEST), rules=Rules(REGTEST, 1_000))
    assert writes[account_key(B)] == acc(5_001, 0)


def test_signature_checked_flag_skips_only_the_signature() -> None:
    bad = flip_last_bit(tx(1, 0, 2, Transfer(B, 1)))
    view = StateView(genesis().get)
    apply_tx(view, bad, RULES, signature_checked=True)
    assert view.writes[account_key(A)] == acc(9_997, 1)
    with pytest.raises(BadNonce):
        apply_tx(view, bad, RULES, signature_checked=True)


def test_view_overlay_reads_its_own_writes() -> None:
    base = genesis()
    view = StateView(base.get)
    apply_tx(view, tx(1, 0, 2, Transfer(C, 100)), RULES)
    apply_tx(view, tx(3, 0, 2, Transfer(B, 50)), RULES)  # C exists only in the overlay
    assert view.account(C) == Account(48, 1)
    assert view.account(A) == Account(9_898, 1)
    view.delete(account_key(C))
    assert view.get(account_key(C)) is None and view.account(C) is None
    assert account_key(C) not in base


# ---------------------------------------------------------------------------------------------- layout

def test_state_keys_and_values_layout() -> None:
    assert account_key(A) == b"\x01" + A and len(account_key(A)) == 33
    assert SUPPLY_KEY == b"\x00" + b"supply" + b"\0" * 26
    assert MINT_AUTHORITY_KEY == b"\x00" + b"mint_authority" + b"\0" * 18
    assert len(meta_key("x" * 32)) == 33
    with pytest.raises(ValueError):
        meta_key("x" * 33)
    assert Account(0x0102, 0x03).encode() == bytes.fromhex("0000000000000102" "0000000000000003")
    assert Supply(1, 2, 3).encode() == bytes.fromhex("0000000000000001" "0000000000000002" "0000000000000003")
    assert Account.decode(Account(5, 6).encode()) == Account(5, 6)
    assert Supply.decode(Supply(5, 6, 7).encode()) == Supply(5, 6, 7)
    for bad in (b"", b"\0" * 15, b"\0" * 17, b"\0" * 24):
        with pytest.raises(DecodeError):
            Account.decode(bad)
    for bad in (b"", b"\0" * 16, b"\0" * 23, b"\0" * 25):
        with pytest.raises(DecodeError):
            Supply.decode(bad)
    assert [int(n) for n in Namespace] == list(range(22))  # ... 0x13 challenges, 0x14 servers, 0x15 relay votes


# ---------------------------------------------------------------------------------------------- genesis

def test_genesis_state_contents() -> None:
    g = genesis_state([(A, 10_000), (B, MAX_MONEY - 10_000)], AUTH)
    assert g == {account_key(A): acc(10_000, 0), account_key(B): acc(MAX_MONEY - 10_000, 0),
                 SUPPLY_KEY: Supply(MAX_MONEY, 0, 0).encode(), MINT_AUTHORITY_KEY: AUTH}
    assert genesis_state([], None) == {SUPPLY_KEY: Supply(0, 0, 0).encode()}


@pytest.mark.parametrize("alloc,authority,exc", [
    ([(NOT_ON_CURVE, 1)], None, InvalidTransaction),
    ([(A[:31], 1)], None, InvalidTransaction),
    ([(A, 0)], None, InvalidTransaction),
    ([(A, -1)], None, InvalidTransaction),
    ([(A, MAX_MONEY + 1)], None, InvalidTransaction),
    ([(A, 1), (A, 2)], None, InvalidTransaction),
    ([(A, MAX_MONEY), (B, 1)], None, Overflow),
    ([(A, 1)], NOT_ON_CURVE, InvalidTransaction),
    ([(A, 1)], A + b"\0", InvalidTransaction),
], ids=["key-not-on-curve", "short-key", "zero", "negative", "above-max-money", "repeated", "total-overflow",
        "authority-not-on-curve", "authority-33-bytes"])
def test_genesis_state_validation(alloc: list[tuple[bytes, int]], authority: Optional[bytes],
                                  exc: type[Exception]) -> None:
    with pytest.raises(exc):
        genesis_state(alloc, authority)


# ---------------------------------------------------------------------------------------------- properties

USERS = 4  # index 0 is the mint authority
step_st = st.tuples(
    st.sampled_from(["transfer", "transfer", "transfer", "burn", "mint"]),
    st.sampled_from([1, 1, 2, 2, 0, 3]),                             # sender (3 never has an account)
    st.integers(0, USERS - 1),                                       # recipient
    st.one_of(st.integers(1, 500), st.integers(1, 500), st.integers(1, 20_000), st.just(MAX_MONEY)),  # amount
    st.sampled_from([MIN_FEE, MIN_FEE, MIN_FEE + 1, MIN_FEE + 5, 0, 1]),  # fee
    st.sampled_from([0, 0, 0, 0, 0, -1, 1]),                         # nonce offset from the expected one
    st.booleans(),                                                   # commit the view into the base after
)


class Model:
    """Independent bookkeeping of what apply_tx must do, in its documented order of checks."""

    def __init__(self, balances: dict[int, int]) -> None:
        self.bal = dict(balances)
        self.nonce = {i: 0 for i in balances}
        self.minted, self.burned, self.fees = sum(balances.values()), 0, 0

    def expect(self, kind: str, s: int, r: int, amount: int, fee: int, nonce: int) -> Optional[type[Exception]]:
        if kind == "mint":
            if s != 0:
                return Unauthorized
            if fee:
                return InvalidTransaction
            if nonce != self.nonce.get(s, 0):
                return BadNonce
            if self.minted + amount > MAX_MONEY:
                return Overflow
            return None
        if s not in self.bal:
            return UnknownSender
        if nonce != self.nonce[s]:
            return BadNonce
        if fee < MIN_FEE:
            return FeeTooLow
        if amount + fee > self.bal[s]:
            return InsufficientBalance
        if kind == "transfer" and r == s:
            return InvalidTransaction
        if kind == "transfer" and self.bal.get(r, 0) + amount > MAX_MONEY:
            return Overflow
        return None

    def accept(self, kind: str, s: int, r: int, amount: int, fee: int) -> None:
        self.bal.setdefault(s, 0)
        self.nonce[s] = self.nonce.get(s, 0) + 1
        if kind == "mint":
            self.bal[r] = self.bal.get(r, 0) + amount
            self.nonce.setdefault(r, 0)
            self.minted += amount
            return
        self.bal[s] -= amount + fee
        self.fees += fee
        if kind == "burn":
            self.burned += amount
        else:
            self.bal[r] = self.bal.get(r, 0) + amount
            self.nonce.setdefault(r, 0)


def full_state(base: dict[bytes, bytes], view: StateView) -> dict[bytes, bytes]:
    state = dict(base)
    for k, v in view.writes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    return state


def check_supply(state: dict[bytes, bytes]) -> Supply:
    supply = Supply.decode(state[SUPPLY_KEY])
    balances = sum(Account.decode(v).balance_sat for k, v in state.items() if k[0] == Namespace.ACCOUNT)
    assert balances + supply.fees_sat == supply.minted_sat - supply.burned_sat
    return supply


@settings(max_examples=300, deadline=None)
@given(bal1=st.integers(1, 100_000), bal2=st.integers(1_000, 100_000),
       steps=st.lists(step_st, min_size=3, max_size=30))
def test_random_sequences_keep_invariants(bal1: int, bal2: int, steps: list[tuple]) -> None:  # type: ignore[type-arg]
    keys = [pubkey(i) for i in range(USERS)]
    model = Model({1: bal1, 2: bal2})
    base = genesis_state([(keys[1], bal1), (keys[2], bal2)], keys[0])
    view = StateView(base.get)
    accepted: list[Transaction] = []
    for kind, s, r, amount, fee, offset, commit in steps:
        if kind == "mint" and fee != 1:
            fee = 0
        nonce = max(0, model.nonce.get(s, 0) + offset)
        payload: Payload = (Burn(amount) if kind == "burn" else
                               Mint(keys[r], amount) if kind == "mint" else Transfer(keys[r], amount))
        t = tx(s, nonce, fee, payload)
        expected = model.expect(kind, s, r, amount, fee, nonce)
        before_state = full_state(base, view)
        before_writes, frozen_base = dict(view.writes), dict(base)
        try:
            apply_tx(view, t, RULES)
        except Rejected as e:
            assert type(e) is expected, (kind, s, r, amount, fee, nonce)
            assert view.writes == before_writes and base == frozen_base  # (b) rejected: nothing changed
        else:
            assert expected is None, (kind, s, r, amount, fee, nonce, expected)
            model.accept(kind, s, r, amount, fee)
            accepted.append(t)
            after = full_state(base, view)
            # (b) accepted: the sender's nonce went up by exactly one, nobody else's moved
            for i, k in enumerate(keys):
                old = before_state.get(account_key(k))
                new = after.get(account_key(k))
                old_nonce = Account.decode(old).nonce if old else 0
                new_nonce = Account.decode(new).nonce if new else 0
                assert new_nonce == old_nonce + (i == s)
            # (c) replaying it right away is refused, and changes nothing
            writes = dict(view.writes)
            with pytest.raises(BadNonce):
                apply_tx(view, t, RULES)
            assert view.writes == writes
        state = full_state(base, view)
        supply = check_supply(state)  # (a) sum(balances) + fees == minted - burned, after every step
        assert (supply.minted_sat, supply.burned_sat, supply.fees_sat) == (model.minted, model.burned, model.fees)
        for i, k in enumerate(keys):
            raw = state.get(account_key(k))
            got = Account.decode(raw) if raw is not None else None
            want = Account(model.bal[i], model.nonce[i]) if i in model.bal else None
            assert got == want
        if commit:
            base.update(view.writes)  # type: ignore[arg-type]  # this model never deletes
            view = StateView(base.get)
    for t in accepted:  # (c) and later still: every accepted transaction stays unreplayable
        with pytest.raises(BadNonce):
            apply_tx(view, t, RULES)


def test_every_type_has_a_rule() -> None:
    assert set(rules_table.RULES) == set(TxType)
    assert all(callable(rule) for rule in rules_table.RULES.values())
