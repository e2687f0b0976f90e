"""Recovery (l2d/core/recovery.py): what the federation owes at an anchored state and how its Bitcoin pays it.

The state is built from real applied transactions (apply_tx over a dict, as a block applies them): peg-in claims
proven against a relayed regtest chain, a funding deposit, a worker stake, an open task, an open FL job, peg-outs
PENDING, BROADCAST (planned, then replaced by fee) and COMPLETED (its plan's change becomes a coin), and the
records that must not count (a withdrawn worker, a cancelled task, the completed peg-out, the spent coin). It is
then anchored in an audit bundle (tests/l2d/core/test_audit.py's builder), verified, and recovered from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
from coincurve import PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.audit import AnchorKind, AuditBundle, verify_bundle
from l2d.core.coin_tx import Burn
from l2d.core.errors import DecodeError, L2Error
from l2d.core.fl_tx import RECLAIM_BLOCKS, FlJobPost, FlReclaim
from l2d.core.params import REGTEST
from l2d.core.pegs import (BRIDGE_TOTALS_KEY, FEDERATION_KEY, CoinKind, FedCoin, PegoutEntry, coin_key, pegout_key,
                           script_address)
from l2d.core.pegs_tx import FederationFund, PegoutPlan, PegoutStatus, PegoutUpdate
from l2d.core.plans import PlanEntry, PlanStatus, plan_key
from l2d.core.recovery import (ClaimKind, NoSnapshotEvidence, NotABridgeChain, RecordMalformed, RecoveryError,
                               bundle_recovery, recover, snapshot_recovery)
from l2d.core.relay_tx import RelayRegister
from l2d.core.session_tx import Receipt, SessionClose, SessionOpen, SessionSettle
from l2d.core.snapshot import ChecksumMismatch
from l2d.core.spv import BITCOIN_REGTEST
from l2d.core.state import LOCKED_KEY, Namespace, account_key
from l2d.core.work import task_key, worker_key
from l2d.core.work_tx import TaskCancel, TaskSubmit, WorkerCaps, WorkerExit, WorkerRegister, WorkerWithdraw
from tests.l2d.core.pegs_world import post_signatures, secret
from tests.l2d.core.test_audit import L2_HEIGHT, make_world, snapshot_bytes, tree_of
from tests.l2d.core.test_pegs import (ALICE, AUTH, AUTH2, BASE, BOB, CAROL, DEPOSIT_ALICE, DEPOSIT_CAROL,
                                      FUNDING_DEPOSIT, Chain, World, check_invariants, xonly)

ZERO = b"\0" * 32
BURN_HEIGHT, ANCHOR_HEIGHT = 10, 20
ADDR1, ADDR2, ADDR3 = (script_address(b"\x00\x14" + bytes([i]) * 20, REGTEST) or "" for i in (1, 2, 3))
CAPS = WorkerCaps(0, 0, 10, 500_000, 100, 2, b"eu", (b"digits-mlp",), b"127.0.0.1:1")
IMAGES = bytes(range(16)) * 4  # one 8x8 image
TOY_FUNDS = 100  # Bob's genesis money when the pegged-in Bitcoin covers every claim (fees exceed it)
MINTED_FUNDS = 1_000_000  # ... and when minted money makes the claims exceed the holdings


def _chain() -> Chain:
    c = Chain(b"recovery")
    c.mine()
    c.mine((DEPOSIT_ALICE, DEPOSIT_CAROL, FUNDING_DEPOSIT))
    c.mine()
    c.mine()
    return c


CHAIN = _chain()
DEP = CHAIN.blocks[BASE + 1]


@dataclass
class Scenario:
    state: dict[bytes, bytes]
    worker: bytes  # Alice's worker key (stake claim)
    task: bytes  # Carol's open task
    job: bytes  # Alice's open FL job
    pegouts: tuple[bytes, bytes, bytes]  # completed, broadcast, pending
    plans: tuple[bytes, bytes, bytes]  # the completed plan, the broadcast (replaced) plan, its replacement


def _plan_id(writes: dict[bytes, Optional[bytes]]) -> bytes:
    [pid] = [k[1:] for k, v in writes.items()
             if k[0] == Namespace.PLAN and v is not None and PlanEntry.decode(v).status == PlanStatus.PLANNED]
    return pid


def scenario(bob_funds: int) -> Scenario:
    w = World(bob_funds=bob_funds)
    w.do(AUTH, CHAIN.relay(BASE))
    w.do(ALICE, DEP.claim(1, 0), fee=500)  # 250,000
    w.do(CAROL, DEP.claim(2, 1), fee=100)  # 70,000
    w.do(CAROL, DEP.claim(2, 2), fee=100)  # 30,000
    f = DEP.claim(3, 0)
    w.do(AUTH2, FederationFund(f.btc_height, f.vout, f.btc_tx, f.merkle_block))  # a 400,000 funding coin
    w.do(ALICE, WorkerRegister(20_000, CAPS), fee=10)
    task = w.do(CAROL, TaskSubmit(5_000, 0, 0, b"digits-mlp", b"", IMAGES), fee=10).txid
    job = w.do(ALICE, FlJobPost(7_000, b"\x05" * 32, 3, 1, 4), fee=10).txid
    # not owed: a worker that exited and withdrew its stake, a task cancelled (its bounty refunded)
    w.do(CAROL, WorkerRegister(3_000, CAPS), fee=10, height=1)
    w.do(CAROL, WorkerExit(), fee=10, height=1)
    w.do(CAROL, WorkerWithdraw(), fee=10, height=500)
    gone = w.do(CAROL, TaskSubmit(1_000, 0, 0, b"digits-mlp", b"", IMAGES), fee=10).txid
    w.do(CAROL, TaskCancel(gone), fee=10)
    idle = w.do(CAROL, FlJobPost(2_000, b"\x06" * 32, 3, 1, 4), fee=10, height=1).txid  # ... and a job reclaimed
    w.do(CAROL, FlReclaim(idle), fee=10, height=1 + RECLAIM_BLOCKS)
    # three peg-outs, an anchor covering them
    p1 = w.do(ALICE, Burn(100_000, ADDR1.encode()), fee=10, height=BURN_HEIGHT).txid
    p2 = w.do(CAROL, Burn(20_000, ADDR2.encode()), fee=10, height=BURN_HEIGHT).txid
    p3 = w.do(CAROL, Burn(10_000, ADDR3.encode()), fee=10, height=BURN_HEIGHT).txid
    w.do(AUTH, AnchorUpdate(ANCHOR_HEIGHT, b"\x11" * 32, b"\x22" * 32, b"\x33" * 32, 150, AnchorStatus.FINAL))
    # p1 is paid from Alice's deposit: its plan is completed, the deposit spent, the change (150,000) a coin
    alice_coin = (DEP.txids[1], 0)
    plan1 = _plan_id(w.apply(w.sign(AUTH, PegoutPlan(ANCHOR_HEIGHT, 1, ZERO, (alice_coin,), (p1,)))))
    w.do(AUTH, PegoutUpdate(p1, PegoutStatus.BROADCAST, plan1, ANCHOR_HEIGHT))
    w.do(AUTH, PegoutUpdate(p1, PegoutStatus.COMPLETED, plan1, ANCHOR_HEIGHT))
    # p2 is broadcast from Carol's 70,000 deposit, then replaced by fee: either version may be mined
    carol_coin = (DEP.txids[2], 1)
    plan2 = _plan_id(w.apply(w.sign(AUTH, PegoutPlan(ANCHOR_HEIGHT, 1, ZERO, (carol_coin,), (p2,)))))
    w.do(AUTH, PegoutUpdate(p2, PegoutStatus.BROADCAST, plan2, ANCHOR_HEIGHT))
    post_signatures(w, plan2)  # only a version with m signatures (one that can be broadcast) is replaced
    plan2b = _plan_id(w.apply(w.sign(AUTH, PegoutPlan(ANCHOR_HEIGHT, 2, plan2, (carol_coin,), (p2,)))))
    check_invariants(w.state)
    return Scenario(w.state, xonly(ALICE), task, job, (p1, p2, p3), (plan1, plan2, plan2b))


@pytest.fixture(scope="module")
def full() -> Scenario:
    return scenario(TOY_FUNDS)


@pytest.fixture(scope="module")
def minted() -> Scenario:
    return scenario(MINTED_FUNDS)


def anchored(items: dict[bytes, bytes], evidence: str = "snapshot") -> AuditBundle:
    """A verified audit bundle anchoring items at L2_HEIGHT."""
    bundle = make_world(AnchorKind.OP_RETURN, evidence, items=items).bundle
    bundle = AuditBundle.decode(bundle.encode())
    verify_bundle(bundle, REGTEST, BITCOIN_REGTEST, None, 1)
    return bundle


# Alice: 250,000 - 500 (claim fee) - 20,010 (stake) - 7,010 (pool) - 100,010 (peg-out)
ALICE_SAT = 122_470
# Carol: 100,000 - 200 (claim fees) - 5,010 (task) - 30 (register, exit, withdraw) - 20 (task, cancel)
#        - 20 (job, reclaim) - 20,010 - 10,010 (peg-outs)
CAROL_SAT = 64_700
HOLDINGS = 70_000 + 30_000 + 150_000  # Carol's two deposits (one planned, not spent), the completed plan's change


def expected_claims(s: Scenario, bob: int) -> list[tuple[ClaimKind, bytes, int, str]]:
    accounts = sorted([(xonly(ALICE), ALICE_SAT), (xonly(BOB), bob), (xonly(CAROL), CAROL_SAT)])
    return ([(ClaimKind.ACCOUNT, k, v, "") for k, v in accounts]
            + [(ClaimKind.STAKE, s.worker, 20_000, "ACTIVE"), (ClaimKind.BOUNTY, s.task, 5_000, "SUBMITTED"),
               (ClaimKind.FL_POOL, s.job, 7_000, "OPEN")]
            + sorted([(ClaimKind.PEGOUT, s.pegouts[1], 20_000, "BROADCAST"),
                      (ClaimKind.PEGOUT, s.pegouts[2], 10_000, "PENDING")]))


# -- the computation -------------------------------------------------------------------------------------------------
def test_every_obligation_at_the_anchored_state_paid_in_full(full: Scenario) -> None:
    bundle = anchored(full.state)
    r = bundle_recovery(bundle, REGTEST)
    assert (r.l2_height, r.state_root, r.network) == (L2_HEIGHT, bundle.record.state_root, REGTEST)
    assert [(c.kind, c.record_id, c.amount_sat, c.status) for c in r.claims] == expected_claims(full, TOY_FUNDS)
    owners = {c.record_id: c.owner for c in r.claims}
    assert owners[full.worker] == xonly(ALICE) and owners[full.job] == xonly(ALICE)
    assert owners[full.task] == xonly(CAROL)  # a bounty goes back to its submitter
    assert r.claims_sat == 249_270 and r.holdings_sat == HOLDINGS
    assert not r.pro_rata and all(c.payout_sat == c.amount_sat for c in r.claims)
    assert r.unallocated_sat == HOLDINGS - 249_270 == 730  # the fees collected (830), less Bob's minted 100
    # the coins by the books: Carol's two deposits and the change; Alice's deposit was spent by the completed plan
    plan1, plan2, plan2b = full.plans
    assert [(c.btc_txid, c.vout, c.amount_sat, c.kind, c.spent_by) for c in r.coins] == sorted([
        (DEP.txids[2], 1, 70_000, CoinKind.DEPOSIT, plan2b),  # reserved by the plan in flight, not spent
        (DEP.txids[2], 2, 30_000, CoinKind.DEPOSIT, ZERO),
        (plan1, 1, 150_000, CoinKind.CHANGE, ZERO)])
    assert [(c.btc_txid, c.amount_sat, c.kind) for c in r.funding] == [(DEP.txids[3], 400_000, CoinKind.FUNDING)]
    assert r.funding_sat == 400_000  # listed, not counted
    assert (r.totals.pegged_in_sat, r.totals.paid_out_sat, r.books_sat) == (350_000, 100_000, HOLDINGS)
    assert r.books_agree
    assert (r.locked_sat, r.locked_claims_sat, r.locked_agrees) == (32_000, 32_000, True)
    # peg-outs: owed to their scripts; the broadcast one names both versions of its plan, the broadcast one first
    pegs = {c.record_id: c for c in r.claims if c.kind == ClaimKind.PEGOUT}
    broadcast, pending = pegs[full.pegouts[1]], pegs[full.pegouts[2]]
    assert (broadcast.address, broadcast.check_txids) == (ADDR2, (plan2, plan2b))
    assert (pending.address, pending.check_txids, pending.owner) == (ADDR3, (), b"")
    assert broadcast.script_pubkey == b"\x00\x14" + b"\x02" * 20


def test_claims_beyond_the_holdings_share_them_pro_rata(minted: Scenario) -> None:
    r = bundle_recovery(anchored(minted.state), REGTEST)
    assert [(c.kind, c.record_id, c.amount_sat) for c in r.claims] == [
        (k, i, a) for k, i, a, _ in expected_claims(minted, MINTED_FUNDS)]
    total = 249_270 - TOY_FUNDS + MINTED_FUNDS
    assert r.pro_rata and r.claims_sat == total and r.holdings_sat == HOLDINGS
    assert [c.payout_sat for c in r.claims] == [c.amount_sat * HOLDINGS // total for c in r.claims]
    assert r.payout_sat + r.unallocated_sat == HOLDINGS and 0 <= r.unallocated_sat < len(r.claims)
    bob = next(c for c in r.claims if c.record_id == xonly(BOB))
    assert bob.payout_sat == 200_132  # 1,000,000 x 250,000 / 1,249,170, rounded down


def test_the_result_is_deterministic_and_its_json_names_everything(full: Scenario) -> None:
    r = bundle_recovery(anchored(full.state), REGTEST)
    shuffled = dict(sorted(full.state.items(), reverse=True))
    again = recover(shuffled, REGTEST, r.l2_height, r.state_root)
    assert again == r and again.to_dict() == r.to_dict()
    d = r.to_dict()
    assert [c["kind"] for c in d["claims"]] == ["account"] * 3 + ["stake", "bounty", "fl-pool", "pegout", "pegout"]
    peg = next(c for c in d["claims"] if c["id"] == full.pegouts[1].hex())
    assert peg["check_txids"] == [full.plans[1][::-1].hex(), full.plans[2][::-1].hex()]  # display order
    assert peg["address"] == ADDR2 and "owner" not in peg
    coin = next(c for c in d["coins"] if c["kind"] == "change")
    assert coin["txid"] == full.plans[0][::-1].hex() and coin["planned_spend"] is None
    assert coin["address"].startswith("bcrt1q")  # the change contract's deposit address
    assert d["books"] == {"pegged_in_sat": 350_000, "paid_out_sat": 100_000, "pending_out_sat": 30_000,
                          "books_sat": HOLDINGS, "agree": True}
    assert d["locked"] == {"state_sat": 32_000, "claims_sat": 32_000, "agree": True}
    assert (d["holdings_sat"], d["claims_sat"], d["payout_sat"], d["unallocated_sat"], d["pro_rata"]) == (
        HOLDINGS, 249_270, 249_270, 730, False)


def test_disagreements_are_reported(full: Scenario) -> None:
    """A locked total or bridge totals that the records do not add up to are reported, not hidden."""
    items = dict(full.state)
    items[LOCKED_KEY] = (32_001).to_bytes(8, "big")
    items[BRIDGE_TOTALS_KEY] = bytes.fromhex("%016x%016x%016x" % (350_000, 30_000, 99_999))
    r = bundle_recovery(anchored(items), REGTEST)
    assert (r.locked_sat, r.locked_claims_sat, r.locked_agrees) == (32_001, 32_000, False)
    assert (r.books_sat, r.holdings_sat, r.books_agree) == (250_001, HOLDINGS, False)
    assert r.to_dict()["locked"]["agree"] is False and r.to_dict()["books"]["agree"] is False


# -- refusals ------------------------------------------------------------------------------------------------------
def test_a_bundle_with_proofs_is_refused(full: Scenario) -> None:
    bundle = anchored(full.state, evidence="proofs")
    with pytest.raises(NoSnapshotEvidence, match="not a snapshot") as info:
        bundle_recovery(bundle, REGTEST)
    assert isinstance(info.value, RecoveryError) and isinstance(info.value, L2Error)


def test_a_chain_without_a_bridge_is_refused(full: Scenario) -> None:
    items = {k: v for k, v in full.state.items() if k != FEDERATION_KEY}
    with pytest.raises(NotABridgeChain, match="no federation record"):
        bundle_recovery(anchored(items), REGTEST)


def _coin(state: dict[bytes, bytes], txid: bytes, vout: int) -> FedCoin:
    return FedCoin.decode(state[coin_key(txid, vout)])


def _malformed(s: Scenario) -> dict[str, dict[bytes, bytes]]:
    p1 = s.pegouts[1]
    carol = _coin(s.state, DEP.txids[2], 2)
    return {
        "federation": {FEDERATION_KEY: s.state[FEDERATION_KEY][:-1]},
        "totals": {BRIDGE_TOTALS_KEY: s.state[BRIDGE_TOTALS_KEY] + b"\0"},
        "locked": {LOCKED_KEY: b"\0" * 7},
        "account": {account_key(xonly(ALICE)): b"\0" * 15},
        "worker": {worker_key(s.worker): b"\x09" + s.state[worker_key(s.worker)][1:]},  # status 9
        "task": {task_key(s.task): s.state[task_key(s.task)][:100]},
        "job": {bytes((Namespace.FL_JOB,)) + s.job: b"\x01"},
        "pegout": {pegout_key(p1): PegoutEntry.decode(s.state[pegout_key(p1)]).encode() + b"\0"},
        "coin": {coin_key(carol.btc_txid, carol.vout): carol.encode()[:-1]},
        "coin-kind": {coin_key(carol.btc_txid, carol.vout): carol.encode()[:44] + b"\x07" + carol.encode()[45:]},
        "plan": {plan_key(s.plans[0]): s.state[plan_key(s.plans[0])] + b"\0"},
        "unknown-plan": {coin_key(carol.btc_txid, carol.vout): FedCoin(
            carol.btc_txid, carol.vout, carol.amount_sat, carol.kind, carol.contract, b"\x66" * 32).encode()},
    }


MALFORMED = ("federation", "totals", "locked", "account", "worker", "task", "job", "pegout", "coin", "coin-kind",
             "plan", "unknown-plan")


@pytest.mark.parametrize("case", MALFORMED)
def test_records_that_do_not_decode_are_refused(full: Scenario, case: str) -> None:
    assert set(_malformed(full)) == set(MALFORMED)
    items = {**full.state, **_malformed(full)[case]}
    with pytest.raises(RecordMalformed) as info:
        recover(items, REGTEST, L2_HEIGHT, tree_of(items).root())
    assert isinstance(info.value, DecodeError) and isinstance(info.value, RecoveryError)
    key = next(iter(_malformed(full)[case]))
    assert key.hex() in str(info.value) or (case == "unknown-plan" and "66" * 32 in str(info.value))


def test_a_malformed_record_in_an_anchored_snapshot(full: Scenario) -> None:
    """The same refusal from the snapshot bytes: the snapshot verifies (its root is its records'), its record not."""
    items = {**full.state, **_malformed(full)["worker"]}
    bundle = anchored(items)
    with pytest.raises(RecordMalformed, match="worker record"):
        bundle_recovery(bundle, REGTEST)
    with pytest.raises(RecordMalformed):
        snapshot_recovery(snapshot_bytes(items), REGTEST)


def test_a_state_with_a_bridge_and_nothing_else() -> None:
    """A fresh bridge chain: nothing owed, nothing held, the books and the locked total agree (all zero)."""
    w = World(bob_funds=1)
    items = {k: v for k, v in w.state.items() if k[0] != Namespace.ACCOUNT}
    r = recover(items, REGTEST, 0, tree_of(items).root())
    assert (r.claims, r.coins, r.funding, r.pro_rata, r.unallocated_sat) == ((), (), (), False, 0)
    assert r.books_agree and r.locked_agrees
    # and a state without the bridge totals or the locked total reads them as zero
    assert LOCKED_KEY not in items and BRIDGE_TOTALS_KEY in items
    del items[BRIDGE_TOTALS_KEY]
    assert recover(items, REGTEST, 0, ZERO).totals.pegged_in_sat == 0


def test_zero_claims_are_not_listed(full: Scenario) -> None:
    """Accounts with nothing (the members' nonce-only accounts) are no claims."""
    r = recover(full.state, REGTEST, L2_HEIGHT, ZERO)
    assert xonly(AUTH) not in {c.record_id for c in r.claims}
    assert account_key(xonly(AUTH)) in full.state
    assert all(c.amount_sat > 0 for c in r.claims)


def test_snapshot_bytes_are_read_to_the_end(full: Scenario) -> None:
    raw = bytearray(snapshot_bytes(full.state))
    raw[-1] ^= 1  # the trailer: the records are intact, the file is not
    with pytest.raises(ChecksumMismatch):
        snapshot_recovery(bytes(raw), REGTEST)


_SCENARIO = scenario(TOY_FUNDS)
_KEYS = sorted(_SCENARIO.state)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_KEYS), st.integers(0, 400), st.binary(max_size=4), st.integers(0, 400))
def test_any_damaged_record_gives_a_result_or_a_typed_refusal(key: bytes, at: int, insert: bytes, cut: int) -> None:
    """Whatever one record holds, recover returns a consistent result or raises a RecoveryError, nothing else."""
    old = _SCENARIO.state[key]
    items = dict(_SCENARIO.state)
    items[key] = (old[:at] + insert + old[at + len(insert):])[:max(cut, at)]
    try:
        r = recover(items, REGTEST, L2_HEIGHT, ZERO)
    except RecoveryError:
        return
    assert r.payout_sat + r.unallocated_sat == r.holdings_sat and r.unallocated_sat >= 0
    assert all(0 <= c.payout_sat <= c.amount_sat for c in r.claims)
    assert [(c.kind, c.record_id) for c in r.claims] == sorted((c.kind, c.record_id) for c in r.claims)


def test_an_open_session_is_owed_to_its_client_less_what_its_server_settled() -> None:
    """A paid session's escrow is locked money: while OPEN, its deposit less the settled receipts is owed to its
    client (the server was paid the settled part); a CLOSED one is owed nothing."""
    w = World(bob_funds=TOY_FUNDS)  # the fees exceed it: the pegged-in Bitcoin covers every claim
    w.do(AUTH, CHAIN.relay(BASE))
    w.do(ALICE, DEP.claim(1, 0), fee=500)
    key = secret("session key")
    opened = w.do(ALICE, SessionOpen(xonly(BOB), xonly(key), 9_000, 1_000, 1, 500), fee=10)
    w.do(BOB, SessionSettle(Receipt.sign(REGTEST.id, PrivateKey(key), opened.txid, 1, 2_500, 2_500)), fee=10)
    closed = w.do(ALICE, SessionOpen(xonly(BOB), xonly(key), 1_000, 1_000, 1, 500), fee=10)
    w.do(BOB, SessionClose(closed.txid), fee=10)
    r = bundle_recovery(anchored(w.state), REGTEST)
    sessions = [c for c in r.claims if c.kind == ClaimKind.SESSION]
    assert [(c.record_id, c.owner, c.amount_sat, c.status) for c in sessions] == [
        (opened.txid, xonly(ALICE), 6_500, "OPEN")]
    assert (r.locked_sat, r.locked_claims_sat, r.locked_agrees) == (6_500, 6_500, True)
    assert r.to_dict()["claims"][-1] == {"kind": "session", "id": opened.txid.hex(), "status": "OPEN",
                                         "amount_sat": 6_500, "payout_sat": 6_500, "owner": xonly(ALICE).hex()}


def test_a_relay_stake_is_owed_to_the_relay_until_it_withdraws() -> None:
    w = World(bob_funds=TOY_FUNDS)
    w.do(AUTH, CHAIN.relay(BASE))
    w.do(ALICE, DEP.claim(1, 0), fee=500)
    w.do(ALICE, RelayRegister(4_000, b"\x05" * 32, b"\x06" * 32, 3, 1_000, 2_000, b"127.0.0.1:9050"), fee=10)
    r = bundle_recovery(anchored(w.state), REGTEST)
    [c] = [c for c in r.claims if c.kind == ClaimKind.RELAY_STAKE]
    assert (c.record_id, c.owner, c.amount_sat, c.status) == (xonly(ALICE), xonly(ALICE), 4_000, "ACTIVE")
    assert (r.locked_sat, r.locked_claims_sat, r.locked_agrees) == (4_000, 4_000, True)
    assert r.to_dict()["claims"][-1]["kind"] == "relay-stake"
