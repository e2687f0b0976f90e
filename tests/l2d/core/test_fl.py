"""FL ledger: payload codecs and the job / registration / round / finish state transitions on a dict-backed ledger.

Every rejection is a typed error that leaves the view (and the committed state) untouched; every accepted
transaction keeps sum(balances) + fees + locked == minted - burned, and locked == the open jobs' pools.
"""
from __future__ import annotations

import base64
import hashlib
from typing import Any, Optional

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.coin_tx import Transfer
from l2d.core.errors import (BadNonce, DecodeError, DuplicateDuty, InsufficientBalance, InvalidTransaction,
                             NonMinimalVarint, OutOfRange, Rejected, Unauthorized,
                             UnknownSender)
from l2d.core.fl import (JobParticipant, JobRecord, JobStatus, RoundRecord, fl_job_key, fl_round_key, get_job,
                         get_round, reward_split)
from l2d.core.fl_tx import (MAX_PARTICIPANTS, RECLAIM_BLOCKS, ZERO32, FlFinish, FlJobPost, FlReclaim, FlRegister,
                            FlRound, RoundParticipant)
from l2d.core.params import LOCAL, MAX_MONEY
from l2d.core.payload import Payload
from l2d.core.rules import apply_tx
from l2d.core.state import (SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key, genesis_state,
                            locked_sat)
from l2d.core.tx import Transaction, sign
from tests.l2d.core.payload_checks import check_round_trip, check_strict

FEE = 2
RULES = Rules(LOCAL, FEE)
FUNDS = 1_000_000
POOL = 100_000
AUTH, POSTER, P1, P2, P3, P4, OTHER = 0, 9, 1, 2, 3, 4, 5
AUTH2 = 8  # a second federation member


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d fl test key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def node_key(n: int) -> bytes:
    return b"ecdsa-sha2-nistp384 " + base64.b64encode(hashlib.sha512(b"node %d" % n).digest())


def h(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def check_supply(state: dict[bytes, bytes]) -> None:
    sup = Supply.decode(state[SUPPLY_KEY])
    balances = sum(Account.decode(v).balance_sat for k, v in state.items() if k[0] == Namespace.ACCOUNT)
    locked = locked_sat(StateView(state.get))
    assert balances + sup.fees_sat + locked == sup.minted_sat - sup.burned_sat
    pools = sum(j.reward_pool_sat for k, v in state.items() if k[0] == Namespace.FL_JOB
                for j in [JobRecord.decode(v)] if j.status == JobStatus.OPEN)
    assert locked == pools


class Chain:
    """A ledger in a dict: each apply is one block (height + 1), writes committed on success."""

    def __init__(self) -> None:
        self.state = genesis_state([(pk(n), FUNDS) for n in (P1, P2, P3, P4, POSTER, OTHER)], None, (pk(AUTH), pk(AUTH2)))
        self.height = 1

    def nonce(self, n: int) -> int:
        raw = self.state.get(account_key(pk(n)))
        return 0 if raw is None else Account.decode(raw).nonce

    def tx(self, n: int, payload: Payload, nonce: Optional[int] = None, fee: Optional[int] = None) -> Transaction:
        return sign(LOCAL, secret(n), self.nonce(n) if nonce is None else nonce,
                    (0 if payload.FEELESS else FEE) if fee is None else fee, payload, b"\0" * 32)

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

    def apply(self, n: int, payload: Payload, **kw: Any) -> Transaction:
        return self.commit(self.tx(n, payload, **kw))

    def reject(self, exc: type[Rejected], n: int, payload: Payload, match: Optional[str] = None,
               t: Optional[Transaction] = None, **kw: Any) -> None:
        """apply must raise exactly exc and write nothing (checked on a view that already holds a write)."""
        t = t or self.tx(n, payload, **kw)
        frozen = dict(self.state)
        view = StateView(self.state.get, self.height)
        apply_tx(view, self.tx(OTHER, Transfer(pk(POSTER), 1)), RULES)
        before = dict(view.writes)
        with pytest.raises(exc, match=match) as info:
            apply_tx(view, t, RULES)
        assert type(info.value) is exc
        assert view.writes == before
        assert self.state == frozen

    def balance(self, n: int) -> int:
        raw = self.state.get(account_key(pk(n)))
        return 0 if raw is None else Account.decode(raw).balance_sat

    def job(self, jid: bytes) -> JobRecord:
        j = get_job(StateView(self.state.get), jid)
        assert j is not None
        return j

    def post(self, pool: int = POOL, rounds: int = 3, lo: int = 2, hi: int = 4) -> bytes:
        return self.apply(POSTER, FlJobPost(pool, h("config"), rounds, lo, hi)).txid

    def round(self, jid: bytes, rnd: int, accepted: dict[int, int], rejected: tuple[int, ...] = (),
              prev: Optional[bytes] = None, **kw: Any) -> FlRound:
        parts = [RoundParticipant(pk(n), ex, True) for n, ex in accepted.items()]
        parts += [RoundParticipant(pk(n), 50, False) for n in rejected]
        prev = h(f"params {rnd - 1}") if prev is None else prev
        return FlRound(jid, rnd, h(f"params {rnd}"), prev, 900_000, 350_000, 9640, 0,
                       tuple(sorted(parts, key=lambda p: p.key)), **kw)


def setup_job(c: Chain, **kw: Any) -> bytes:
    jid = c.post(**kw)
    for n in (P1, P2, P3, P4):
        c.apply(n, FlRegister(jid, node_key(n)))
    return jid


# -- codecs -------------------------------------------------------------------------------------------------------
def sample_payloads() -> list[Payload]:
    parts = tuple(sorted((RoundParticipant(pk(n), 100 + n, n != P4) for n in (P1, P2, P3, P4)),
                         key=lambda p: p.key))
    return [FlJobPost(POOL, h("c"), 3, 2, 4), FlRegister(h("job"), node_key(1)),
            FlRound(h("job"), 2, h("p2"), h("p1"), 912_345, 301_000, 9640, 1_234_567, parts),
            FlFinish(h("job"), h("p3"), tuple(sorted(((pk(P1), 10), (pk(P2), 20))))), FlReclaim(h("job"))]


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_signed_transactions(payload: Payload) -> None:
    check_round_trip(payload)


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_decoders_are_strict(payload: Payload) -> None:
    check_strict(payload)


def test_bad_fields_are_typed_decode_errors() -> None:
    rnd = sample_payloads()[2]
    assert isinstance(rnd, FlRound)
    raw = bytearray(rnd.encode())
    flag_at = len(raw) - 1  # last participant's accepted flag
    raw[flag_at] = 2
    with pytest.raises(OutOfRange, match="accepted flag"):
        FlRound.decode(bytes(raw))
    n = len(rnd.participants)
    head = rnd.encode()[:len(rnd.encode()) - 1 - 37 * n]
    body = rnd.encode()[len(head) + 1:]
    with pytest.raises(OutOfRange, match="exceed the limit"):
        FlRound.decode(head + bytes((MAX_PARTICIPANTS + 1,)))
    with pytest.raises(NonMinimalVarint):
        FlRound.decode(head + b"\xfd\x01\x00")
    swapped = head + b"\x02" + body[37:74] + body[:37]
    with pytest.raises(OutOfRange, match="sorted"):
        FlRound.decode(swapped)
    fin = sample_payloads()[3]
    assert isinstance(fin, FlFinish)
    dup = fin.encode()[:64] + b"\x02" + fin.encode()[65:65 + 40] * 2
    with pytest.raises(OutOfRange, match="sorted"):
        FlFinish.decode(dup)
    zero_reward = fin.encode()[:65 + 32] + bytes(8) + fin.encode()[65 + 40:]
    with pytest.raises(OutOfRange, match="reward 0"):
        FlFinish.decode(zero_reward)


@pytest.mark.parametrize("make, match", [
    (lambda: FlJobPost(0, h("c"), 3, 2, 4), "reward pool"),
    (lambda: FlJobPost(MAX_MONEY + 1, h("c"), 3, 2, 4), "reward pool"),
    (lambda: FlJobPost(POOL, b"short", 3, 2, 4), "config hash"),
    (lambda: FlJobPost(POOL, h("c"), 0, 2, 4), "rounds"),
    (lambda: FlJobPost(POOL, h("c"), 3, 3, 2), "min"),
    (lambda: FlJobPost(POOL, h("c"), 3, 0, 2), "min"),
    (lambda: FlJobPost(POOL, h("c"), 3, 2, MAX_PARTICIPANTS + 1), "max"),
    (lambda: FlRegister(ZERO32, node_key(1)), "job id"),
    (lambda: FlRegister(h("j"), b"ssh-rsa AAAA"), "node key"),
    (lambda: FlRegister(h("j"), node_key(1) + b" comment"), "node key"),
    (lambda: FlRegister(h("j"), b"ecdsa-sha2-nistp384 " + b"A" * 300), "node key"),
    (lambda: RoundParticipant(pk(1), 0, True), "at least one example"),
    (lambda: RoundParticipant(pk(1), 2**32, True), "u32"),
    (lambda: FlRound(h("j"), 0, h("a"), h("b"), 0, 0, 0, 0, (RoundParticipant(pk(1), 1, True),)), "start at 1"),
    (lambda: FlRound(h("j"), 1, h("a"), h("b"), 1_000_001, 0, 0, 0, (RoundParticipant(pk(1), 1, True),)), "accuracy"),
    (lambda: FlRound(h("j"), 1, h("a"), h("b"), 0, 0, 0, 0, ()), "participants"),
    (lambda: FlFinish(h("j"), h("a"), ((pk(1), 0),)), "reward 0"),
])
def test_invalid_payload_fields_are_refused(make: Any, match: str) -> None:
    with pytest.raises(OutOfRange, match=match):
        make()


# -- state transitions -------------------------------------------------------------------------------------------
def test_job_lifecycle_pays_by_accepted_examples_and_refunds_the_rest() -> None:
    c = Chain()
    before = c.balance(POSTER)
    jid = setup_job(c)
    assert c.balance(POSTER) == before - POOL - FEE
    assert locked_sat(StateView(c.state.get)) == POOL
    assert [p.key for p in c.job(jid).participants] == sorted(pk(n) for n in (P1, P2, P3, P4))
    # P4 is the poisoner: in every round, the robust aggregator rejects it.
    for rnd in (1, 2, 3):
        c.apply(AUTH, c.round(jid, rnd, {P1: 100, P2: 200, P3: 400}, rejected=(P4,)))
    job = c.job(jid)
    assert job.rounds_done == 3 and job.last_params_hash == h("params 3")
    rec = get_round(StateView(c.state.get), jid, 2)
    assert rec is not None and rec.commitment.params_hash == h("params 2") and rec.height == 7
    assert RoundRecord.decode(c.state[fl_round_key(jid, 2)]) == rec
    split = reward_split(job)
    assert split == tuple(sorted(((pk(P1), POOL * 300 // 2100), (pk(P2), POOL * 600 // 2100),
                                  (pk(P3), POOL * 1200 // 2100))))
    bal = {n: c.balance(n) for n in (P1, P2, P3, P4, POSTER)}
    c.apply(AUTH, FlFinish(jid, h("params 3"), split))
    paid = sum(a for _, a in split)
    assert c.balance(P4) == bal[P4]  # the poisoner gets nothing
    for n, ex in ((P1, 300), (P2, 600), (P3, 1200)):
        assert c.balance(n) == bal[n] + POOL * ex // 2100
    assert c.balance(POSTER) == bal[POSTER] + POOL - paid  # rounding remainder goes back
    assert locked_sat(StateView(c.state.get)) == 0
    job = c.job(jid)
    assert job.status == JobStatus.FINISHED and job.paid_sat == paid and job.refunded_sat == POOL - paid
    assert {p.key: p.reward_sat for p in job.participants}[pk(P4)] == 0
    assert JobRecord.decode(job.encode()) == job


def test_finish_without_accepted_work_refunds_the_whole_pool() -> None:
    c = Chain()
    jid = setup_job(c)
    bal = c.balance(POSTER)
    c.apply(AUTH, FlFinish(jid, ZERO32, ()))
    assert c.balance(POSTER) == bal + POOL
    assert c.job(jid).status == JobStatus.FINISHED


def test_unfunded_pool_and_unknown_poster_are_refused() -> None:
    c = Chain()
    c.reject(InsufficientBalance, POSTER, FlJobPost(FUNDS, h("c"), 3, 2, 4))
    c.reject(UnknownSender, 42, FlJobPost(10, h("c"), 3, 2, 4))
    t = c.apply(POSTER, FlJobPost(10, h("c"), 3, 2, 4))
    c.reject(InvalidTransaction, POSTER, t.payload, t=t, match="exists")  # replay
    c.reject(BadNonce, POSTER, FlJobPost(10, h("c"), 3, 2, 4), nonce=5)


def test_bad_registrations_are_refused_and_change_nothing() -> None:
    c = Chain()
    jid = c.post(hi=2)
    c.reject(InvalidTransaction, P1, FlRegister(h("no such job"), node_key(1)), match="no FL job")
    c.reject(UnknownSender, 42, FlRegister(jid, node_key(42)))
    c.apply(P1, FlRegister(jid, node_key(1)))
    c.reject(InvalidTransaction, P1, FlRegister(jid, node_key(7)), match="already registered")
    c.reject(InvalidTransaction, P2, FlRegister(jid, node_key(1)), match="node key is already registered")
    c.apply(P2, FlRegister(jid, node_key(2)))
    c.reject(InvalidTransaction, P3, FlRegister(jid, node_key(3)), match="full")


def test_round_commitments_only_from_the_authority_in_order_from_the_last_params() -> None:
    c = Chain()
    jid = setup_job(c, rounds=2)
    r1 = c.round(jid, 1, {P1: 10, P2: 20})
    c.reject(Unauthorized, POSTER, r1, fee=0)
    c.reject(Unauthorized, P1, r1, fee=0)
    c.reject(InvalidTransaction, AUTH, r1, fee=5, match="no fee")
    c.reject(InvalidTransaction, AUTH, c.round(jid, 2, {P1: 10}), match="expects round 1")
    c.reject(InvalidTransaction, AUTH, c.round(jid, 1, {P1: 10, OTHER: 5}), match="not registered")
    c.reject(InvalidTransaction, AUTH, FlRound(h("nope"), 1, h("a"), h("b"), 0, 0, 0, 0, r1.participants),
             match="no FL job")
    t1 = c.apply(AUTH, r1)
    c.reject(BadNonce, AUTH, r1, t=t1, match="expected at least 1")  # replay of the signed commitment
    c.reject(DuplicateDuty, AUTH, r1, match="committed already")  # same round, fresh nonce: done already
    # another member's commitment of round 1 (its own aggregate, even) is refused the same way; a non-member's
    # is unauthorized; that member commits round 2 below, with its own nonce 0
    c.reject(DuplicateDuty, AUTH2, c.round(jid, 1, {P1: 11, P2: 20}), match="committed already")
    c.reject(Unauthorized, P1, c.round(jid, 1, {P1: 11, P2: 20}), fee=0)
    c.reject(InvalidTransaction, AUTH, c.round(jid, 2, {P1: 10}, prev=h("elsewhere")), match="does not start")
    c.apply(AUTH2, c.round(jid, 2, {P1: 10}))
    assert c.nonce(AUTH2) == 1 and c.nonce(AUTH) == 1
    c.reject(InvalidTransaction, AUTH, c.round(jid, 3, {P1: 10}), match="has 2 rounds")
    c.reject(InvalidTransaction, P1, FlRegister(jid, node_key(11)), match="run all its rounds")


def test_bad_finishes_are_refused_and_change_nothing() -> None:
    c = Chain()
    jid = setup_job(c, rounds=1)
    c.apply(AUTH, c.round(jid, 1, {P1: 100, P2: 300}, rejected=(P4,)))
    good = reward_split(c.job(jid))
    c.reject(Unauthorized, POSTER, FlFinish(jid, h("params 1"), good), fee=0)
    c.reject(InvalidTransaction, AUTH, FlFinish(jid, h("params 0"), good), match="last committed")
    c.reject(InvalidTransaction, AUTH, FlFinish(jid, h("params 1"), tuple(sorted(good + ((pk(P4), 1),)))),
             match="never accepted")
    c.reject(InvalidTransaction, AUTH, FlFinish(jid, h("params 1"), tuple(sorted(good + ((pk(OTHER), 1),)))),
             match="not a participant")
    c.reject(InvalidTransaction, AUTH, FlFinish(jid, h("params 1"), tuple(sorted(((pk(P1), POOL), (pk(P2), POOL))))),
             match="exceed the pool")
    c.reject(InvalidTransaction, AUTH, FlFinish(jid, h("params 1"), good[:1]), match="differ")
    c.reject(InvalidTransaction, AUTH, FlFinish(h("nope"), h("params 1"), good), match="no FL job")
    c.apply(AUTH, FlFinish(jid, h("params 1"), good))
    c.reject(DuplicateDuty, AUTH, FlFinish(jid, h("params 1"), good), match="finished already")
    c.reject(DuplicateDuty, AUTH2, FlFinish(jid, h("params 1"), good), match="finished already")  # the other member
    c.reject(InvalidTransaction, AUTH, c.round(jid, 2, {P1: 1}), match="finished")
    c.reject(InvalidTransaction, P3, FlRegister(jid, node_key(33)), match="finished")


@settings(max_examples=200, deadline=None)
@given(pool=st.integers(1, MAX_MONEY), contrib=st.lists(st.integers(0, 2**40), min_size=1, max_size=MAX_PARTICIPANTS))
def test_reward_split_never_exceeds_the_pool_and_skips_zero_contributions(pool: int, contrib: list[int]) -> None:
    parts = tuple(JobParticipant(i.to_bytes(32, "big"), ex, 1, 0, 0, node_key(i)) for i, ex in enumerate(contrib, 1))
    job = JobRecord(JobStatus.OPEN, pk(POSTER), pool, h("c"), 1, 1, len(parts), 0, 1, h("p"), 0, 0, 0, parts)
    split = reward_split(job)
    assert sum(a for _, a in split) <= pool
    total = sum(contrib)
    for key, amount in split:
        ex = contrib[int.from_bytes(key, "big") - 1]
        assert ex > 0 and amount == pool * ex // total
    if total:
        assert pool - sum(a for _, a in split) < len(parts)  # the refund is only rounding
    assert JobRecord.decode(job.encode()) == job
    assert fl_job_key(b"\1" * 32)[0] == Namespace.FL_JOB and fl_round_key(b"\1" * 32, 1)[0] == Namespace.FL_ROUND


def test_encodings_are_pinned() -> None:
    """Consensus bytes: a change to any layout (docs/federated.md) must be deliberate."""
    post, reg, rnd, fin, rec = (p.encode() for p in sample_payloads())
    assert rec == h("job")
    assert post.hex() == ("00000000000186a02e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6"
                          "000300020004")
    pinned = {"FlRegister": (reg, "0ada09c5fe8bfc167f9bfe82b8a5db5a72dbe57ebf8369576a24fcded213ab50", 141),
              "FlRound": (rnd, "987fc860f0fdb2afc3a316303aafc010238cf24cfa4c9ca1b6ee366fc1ddc23f", 275),
              "FlFinish": (fin, "fe66958c82079227f78e2ed5a3edf1ed19be1843fe8ee47f57eee2f7eeadf659", 145)}
    for name, (raw, digest, size) in pinned.items():
        assert (len(raw), hashlib.sha256(raw).hexdigest()) == (size, digest), name
    assert fl_round_key(h("job"), 2).hex() == "07d571993294f04134c88069e13dddccf9bd467447443e028e1ece197f73fe1f71"
    job = JobRecord(JobStatus.OPEN, pk(POSTER), 100_000, h("c"), 3, 2, 4, 5, 1, h("p1"), 0, 0, 0,
                    (JobParticipant(pk(P1), 300, 1, 0, 6, node_key(1)),))
    assert len(job.encode()) == 313
    assert hashlib.sha256(job.encode()).hexdigest() == "ff1c5074b12660145c87233f6fef0bfd0d2b3a438c87ac8c2c81f9e057de2ff4"


@pytest.mark.parametrize("raw, match", [
    (b"", "job record"),
    (bytes([4]) + bytes(144) + b"\0", "status 4"),
    (bytes([1]) + bytes(144) + bytes([MAX_PARTICIPANTS + 1]), "participants"),
])
def test_job_record_decoding_is_strict(raw: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        JobRecord.decode(raw)
    with pytest.raises(DecodeError):
        RoundRecord.decode(b"\0" * 7)


def test_poster_reclaims_an_idle_job_paying_contributions_so_far() -> None:
    c = Chain()
    jid = setup_job(c)
    c.apply(AUTH, c.round(jid, 1, {P1: 100, P2: 300}, rejected=(P4,)))
    active = c.height - 1  # the block the round was committed in
    c.reject(Unauthorized, P1, FlReclaim(jid), match="only the poster")
    c.reject(InvalidTransaction, POSTER, FlReclaim(jid), match=f"from height {active + RECLAIM_BLOCKS}")
    c.reject(InvalidTransaction, POSTER, FlReclaim(h("nope")), match="no FL job")
    c.height = active + RECLAIM_BLOCKS - 1
    c.reject(InvalidTransaction, POSTER, FlReclaim(jid), match="may be reclaimed")
    c.height = active + RECLAIM_BLOCKS
    bal = {n: c.balance(n) for n in (P1, P2, P4, POSTER)}
    c.apply(POSTER, FlReclaim(jid))
    assert c.balance(P1) == bal[P1] + POOL * 100 // 400 and c.balance(P2) == bal[P2] + POOL * 300 // 400
    assert c.balance(P4) == bal[P4]
    assert c.balance(POSTER) == bal[POSTER] - FEE  # the whole pool went to the accepted participants
    job = c.job(jid)
    assert job.status == JobStatus.RECLAIMED and job.paid_sat == POOL and locked_sat(StateView(c.state.get)) == 0
    c.reject(InvalidTransaction, POSTER, FlReclaim(jid), match="reclaimed")
    c.reject(InvalidTransaction, AUTH, c.round(jid, 2, {P1: 1}), match="reclaimed")
    c.reject(InvalidTransaction, AUTH, FlFinish(jid, h("params 1"), ()), match="reclaimed")


def test_reclaim_of_a_job_that_never_ran_refunds_the_pool() -> None:
    c = Chain()
    jid = c.post()
    c.height += RECLAIM_BLOCKS
    bal = c.balance(POSTER)
    c.apply(POSTER, FlReclaim(jid))
    assert c.balance(POSTER) == bal + POOL - FEE
    assert c.job(jid).refunded_sat == POOL
