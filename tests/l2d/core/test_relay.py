"""NetFlow relay registry: payload codecs and the register / heartbeat / exit / withdraw / weights transitions on a
dict-backed ledger. Every rejection is typed and writes nothing; stakes are locked money (supply invariant)."""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import pytest
from coincurve import PrivateKey

from l2d.core.coin_tx import Transfer
from l2d.core.errors import (DecodeError, InsufficientBalance, InvalidTransaction, OutOfRange, Rejected, Unauthorized)
from l2d.core.params import LOCAL, MAX_MONEY
from l2d.core.payload import Payload
from l2d.core.relay import (EXIT_DELAY_BLOCKS, WEIGHT_CAP_KIB_S, RelayRecord, RelayStatus, RelayVote, get_relay,
                            relay_key, relay_weight, vote_key)
from l2d.core.relay_tx import (FLAG_ENTRY, FLAG_EXIT, Measurement, RelayExit, RelayHeartbeat, RelayRegister,
                               RelayWeights, RelayWithdraw)
from l2d.core.rules import apply_tx
from l2d.core.session import SessionRecord
from l2d.core.state import (SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key, genesis_state,
                            locked_sat)
from l2d.core.tree import KEY_SIZE
from l2d.core.tx import Transaction, sign
from l2d.core.work import WorkerRecord
from tests.l2d.core.payload_checks import check_round_trip, check_strict

FEE = 2
RULES = Rules(LOCAL, FEE)
FUNDS = 1_000_000
STAKE = 50_000
RELAY, RELAY2, OTHER, MEMBER, MEMBER2, MEMBER3 = 1, 2, 3, 9, 8, 7


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d relay test key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def register(rate: int = 10_000, flags: int = FLAG_ENTRY | FLAG_EXIT, stake: int = STAKE,
             operator: bytes = b"\1" * 32) -> RelayRegister:
    return RelayRegister(stake, hashlib.sha256(b"x25519").digest(), operator, flags, rate, 2_000_000,
                         b"127.0.0.1:9050")


class Chain:
    """A ledger in a dict: each apply is one block (height + 1), writes committed on success."""

    def __init__(self, members: tuple[int, ...] = (MEMBER, MEMBER2)) -> None:
        self.state = genesis_state([(pk(n), FUNDS) for n in (RELAY, RELAY2, OTHER)], None,
                                   tuple(pk(m) for m in members))
        self.height = 1

    def nonce(self, n: int) -> int:
        raw = self.state.get(account_key(pk(n)))
        return 0 if raw is None else Account.decode(raw).nonce

    def tx(self, n: int, payload: Payload, fee: Optional[int] = None) -> Transaction:
        return sign(LOCAL, secret(n), self.nonce(n), (0 if payload.FEELESS else FEE) if fee is None else fee,
                    payload, b"\0" * 32)

    def apply(self, n: int, payload: Payload, **kw: Any) -> Transaction:
        t = self.tx(n, payload, **kw)
        view = StateView(self.state.get, self.height)
        apply_tx(view, t, RULES)
        for k, v in view.writes.items():
            assert v is not None and len(k) == KEY_SIZE  # the state tree's keys are 33 bytes
            self.state[k] = v
        self.height += 1
        sup = Supply.decode(self.state[SUPPLY_KEY])
        balances = sum(Account.decode(v).balance_sat for k, v in self.state.items() if k[0] == Namespace.ACCOUNT)
        locked = locked_sat(StateView(self.state.get))
        assert balances + sup.fees_sat + locked == sup.minted_sat - sup.burned_sat
        stakes = sum(RelayRecord.decode(v).stake_sat for k, v in self.state.items() if k[0] == Namespace.RELAY)
        stakes += sum(WorkerRecord.decode(v).stake_sat for k, v in self.state.items() if k[0] == Namespace.WORKER)
        escrow = sum(SessionRecord.decode(v).escrow_sat for k, v in self.state.items() if k[0] == Namespace.SESSION)
        assert locked == stakes + escrow  # relays' stakes (and workers' and sessions', for the model tests)
        return t

    def reject(self, exc: type[Rejected], n: int, payload: Payload, match: Optional[str] = None, **kw: Any) -> None:
        t = self.tx(n, payload, **kw)
        frozen = dict(self.state)
        view = StateView(self.state.get, self.height)
        apply_tx(view, self.tx(OTHER, Transfer(pk(RELAY2), 1)), RULES)
        before = dict(view.writes)
        with pytest.raises(exc, match=match) as info:
            apply_tx(view, t, RULES)
        assert type(info.value) is exc
        assert view.writes == before and self.state == frozen

    def relay(self, n: int) -> RelayRecord:
        r = get_relay(StateView(self.state.get), pk(n))
        assert r is not None
        return r

    def balance(self, n: int) -> int:
        return Account.decode(self.state[account_key(pk(n))]).balance_sat


def sample_payloads() -> list[Payload]:
    return [register(), RelayHeartbeat(), RelayExit(), RelayWithdraw(),
            RelayWeights(7, tuple(sorted((Measurement(pk(n), 800 * n, 900_000) for n in (RELAY, RELAY2)),
                                         key=lambda m: m.relay)))]


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_signed_transactions(payload: Payload) -> None:
    check_round_trip(payload)


@pytest.mark.parametrize("payload", [p for p in sample_payloads() if p.encode()], ids=lambda p: type(p).__name__)
def test_decoders_are_strict(payload: Payload) -> None:
    check_strict(payload)


def test_empty_payloads_carry_nothing() -> None:
    for cls in (RelayHeartbeat, RelayExit, RelayWithdraw):
        with pytest.raises(DecodeError, match="expected 0"):
            cls.decode(b"\0")


@pytest.mark.parametrize("make, match", [
    (lambda: register(stake=0), "relay stake 0 is outside"),
    (lambda: register(stake=MAX_MONEY + 1), "relay stake"),
    (lambda: register(flags=4), "unknown bits"),
    (lambda: register(rate=0), "relay rate 0 KiB/s"),
    (lambda: RelayRegister(1, b"\1" * 31, b"\1" * 32, 0, 1, 1, b"h:1"), "X25519 key must be 32 bytes"),
    (lambda: RelayRegister(1, b"\1" * 32, b"\1" * 32, 0, 1, 1, b"no-port"), "endpoint"),
    (lambda: RelayRegister(1, b"\1" * 32, b"\1" * 32, 0, 1, 1, b"a" * 60 + b":9050"), "endpoint"),
    (lambda: RelayWeights(1, ()), "1..64 relays"),
    (lambda: RelayWeights(1, (Measurement(pk(2), 1, 1), Measurement(pk(1), 1, 1))
                          if pk(2) > pk(1) else (Measurement(pk(1), 1, 1), Measurement(pk(2), 1, 1))),
     "ascending order"),
    (lambda: Measurement(pk(1), 1, 1_000_001), "probe success"),
])
def test_invalid_payload_fields_are_refused(make: Any, match: str) -> None:
    with pytest.raises(OutOfRange, match=match):
        make()


def test_register_heartbeat_exit_withdraw() -> None:
    c = Chain()
    c.apply(RELAY, register())
    r = c.relay(RELAY)
    assert (r.status, r.stake_sat, r.weight, r.endpoint, r.flags) == (RelayStatus.ACTIVE, STAKE, 0, b"127.0.0.1:9050",
                                                                      FLAG_ENTRY | FLAG_EXIT)
    assert c.balance(RELAY) == FUNDS - STAKE - FEE and locked_sat(StateView(c.state.get)) == STAKE
    c.reject(InvalidTransaction, RELAY, register(), match="is registered")
    c.reject(InsufficientBalance, RELAY2, register(stake=FUNDS))
    c.apply(RELAY, RelayHeartbeat())
    assert c.relay(RELAY).last_heartbeat == c.height - 1
    c.reject(InvalidTransaction, RELAY2, RelayHeartbeat(), match="not a registered relay")
    c.reject(InvalidTransaction, RELAY, RelayWithdraw(), match="only an exited relay")
    c.apply(RELAY, RelayExit())
    exit_at = c.relay(RELAY).exit_height
    c.reject(InvalidTransaction, RELAY, RelayHeartbeat(), match="EXITING")
    c.reject(InvalidTransaction, RELAY, RelayExit(), match="not ACTIVE")
    c.reject(InvalidTransaction, RELAY, RelayWithdraw(), match=f"locked until height {exit_at + EXIT_DELAY_BLOCKS}")
    c.height = exit_at + EXIT_DELAY_BLOCKS
    c.apply(RELAY, RelayWithdraw())
    assert c.relay(RELAY).status == RelayStatus.WITHDRAWN and c.balance(RELAY) == FUNDS - 4 * FEE
    c.apply(RELAY, register(stake=STAKE // 2))  # a withdrawn relay may register again
    assert c.relay(RELAY).stake_sat == STAKE // 2


def test_a_relay_weighs_what_the_federation_measured_never_what_it_advertises() -> None:
    c = Chain((MEMBER,))  # one member: its vote decides
    c.apply(RELAY, register(rate=100_000))  # advertises 10x what it really carries
    c.apply(RELAY2, register(rate=5_000))  # advertises less than it carries
    ms = tuple(sorted((Measurement(pk(RELAY), 10_000, 1_000_000), Measurement(pk(RELAY2), 9_000, 500_000)),
                      key=lambda m: m.relay))
    epoch = c.height - 1
    c.apply(MEMBER, RelayWeights(epoch, ms))
    assert (c.relay(RELAY).weight, c.relay(RELAY2).weight) == (10_000, 2_500)
    assert (c.relay(RELAY).measured_kib_s, c.relay(RELAY).measured_height) == (10_000, epoch)
    assert relay_weight(2 * WEIGHT_CAP_KIB_S, 4 * WEIGHT_CAP_KIB_S, 1_000_000) == WEIGHT_CAP_KIB_S
    one = (Measurement(pk(RELAY), 1, 1),)
    c.reject(InvalidTransaction, MEMBER, RelayWeights(epoch, one), match=f"measured by this member at epoch {epoch}")
    c.reject(InvalidTransaction, MEMBER, RelayWeights(c.height + 1, one), match="above this block's height")
    c.reject(InvalidTransaction, MEMBER, RelayWeights(c.height, (Measurement(pk(OTHER), 1, 1),)),
             match="not a registered relay")
    c.reject(InvalidTransaction, MEMBER, RelayWeights(0, one), match="registered at height")
    c.reject(Unauthorized, OTHER, RelayWeights(c.height, one), fee=0)
    c.reject(InvalidTransaction, MEMBER, RelayWeights(c.height, one), fee=FEE, match="carries no fee")
    c.apply(MEMBER, RelayWeights(c.height, one))  # a later epoch replaces the member's measurement
    assert c.relay(RELAY).weight == 0  # 1 KiB/s x 1 ppm success
    assert RelayVote.decode(c.state[vote_key(pk(RELAY), pk(MEMBER))]) == RelayVote(c.height - 1, 1, 1)
    assert c.state[relay_key(pk(RELAY))] == c.relay(RELAY).encode()


def test_a_relay_weighs_the_median_of_the_members_votes_so_a_lying_minority_cannot_move_it() -> None:
    c = Chain((MEMBER, MEMBER2, MEMBER3))
    c.apply(RELAY, register(rate=100_000))

    def vote(member: int, kib_s: int, ppm: int = 1_000_000, epoch: Optional[int] = None) -> None:
        c.apply(member, RelayWeights(c.height if epoch is None else epoch, (Measurement(pk(RELAY), kib_s, ppm),)))
    vote(MEMBER, 100_000)  # one vote of three: a member that has not measured the relay counts 0
    assert (c.relay(RELAY).weight, c.relay(RELAY).measured_height) == (0, c.height - 1)
    vote(MEMBER2, 9_000, 900_000, epoch=c.height - 1)  # another member's vote at the same epoch is its own
    assert c.relay(RELAY).weight == 9_000 * 900_000 // 1_000_000  # the lower of the two, never the liar's
    vote(MEMBER3, 10_000)
    r = c.relay(RELAY)  # medians of (100,000, 9,000, 10,000) and (1, 0.9, 1): honest members' figures
    assert (r.measured_kib_s, r.success_ppm, r.weight) == (10_000, 1_000_000, 10_000)
    vote(MEMBER, 0, 0)  # the liar now says the relay is dead: still the median of the three
    assert c.relay(RELAY).weight == 9_000 * 900_000 // 1_000_000
    # a relay that withdraws and registers again starts afresh: earlier votes count for nothing
    c.apply(RELAY, RelayExit())
    c.height += EXIT_DELAY_BLOCKS
    c.apply(RELAY, RelayWithdraw())
    c.apply(RELAY, register(rate=100_000))
    vote(MEMBER3, 50_000)
    assert c.relay(RELAY).weight == 0
    vote(MEMBER2, 60_000)
    r = c.relay(RELAY)
    assert (r.measured_kib_s, r.weight, r.measured_height) == (50_000, 50_000, c.height - 1)
    vote(MEMBER3, 70_000)  # a member's later vote replaces its own earlier one
    assert c.relay(RELAY).weight == 60_000


def test_a_malformed_vote_record_is_a_decode_error() -> None:
    assert RelayVote.decode(RelayVote(1, 2, 3).encode()) == RelayVote(1, 2, 3)
    with pytest.raises(DecodeError, match="relay vote of 15 bytes"):
        RelayVote.decode(bytes(15))
