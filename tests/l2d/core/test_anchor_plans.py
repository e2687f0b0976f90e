"""Anchor plans (AnchorPlan; l2d/core/plans.py) without bitcoind: the transaction anchoring an L2 height is fixed by
the state, paid by funding coins, spends the previous Taproot anchor output by the federation's k-of-n leaf, is
signed by m keys (ECDSA for funding coins, BIP340 for the anchor output) and completed by AnchorUpdate FINAL.

States are built through apply_tx in the world of pegs_world.py (FED, 2-of-3; the 200 000 sat funding coin).
Every refusal asserts the exact exception class and that the view recorded no write.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import pytest
from bitcoinutils.transactions import Transaction as BuTransaction
from coincurve import PrivateKey, PublicKeyXOnly

from bridge.federation import signed_transaction
from l2d.core.anchor_format import NO_PREVIOUS, AnchorRecord, op_return_script
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.errors import DecodeError, DuplicateDuty, Rejected, Unauthorized
from l2d.core.kofn import FederationOutput, KofN, link_leaf
from l2d.core.params import REGTEST
from l2d.core.pegs import FUNDING_CONTRACT, CoinKind, FedCoin, deposit_script_pubkey
from l2d.core.pegs_tx import AnchorMode, AnchorPlan, PlanCompleted, PlanSignature
from l2d.core.plans import (ANCHOR_TIP_KEY, SUPERSEDE_AFTER, ZERO, AnchorInFlight, AnchorOutOfOrder, AnchorTip,
                            BadAnchorLink, BadPlanSignature, BadReplacement, PlanClosed, PlanStatus, PlanUnderfunded,
                            UnknownCoin, UnknownPlan, anchor_policy, anchor_tip, coin_script_pubkey, plan_tx,
                            signatures_by_key, vsize_bound)
from l2d.core.spv import parse_tx
from l2d.core.state import StateView
from tests.l2d.core.pegs_world import (AUTH, AUTH2, BOB, FED, FED_KEYS, FED_SECRETS, FUNDING_OUTPOINT, FUNDING_SAT,
                                       World, check_invariants, coin_world, key_index, outpoint, plan_of,
                                       post_signatures, sign_plan)

NET = REGTEST.id
ROOT1, ROOT2 = hashlib.sha256(b"root 1").digest(), hashlib.sha256(b"root 2").digest()


def world() -> World:
    w = coin_world()
    w.height = 20
    return w


def post_anchor(w: World, l2_height: int, inputs: Sequence[tuple[bytes, int]], root: bytes = ROOT1,
                prev: bytes = NO_PREVIOUS, mode: AnchorMode = AnchorMode.TAPROOT, rate: int = 2,
                replaces: bytes = ZERO) -> bytes:
    return plan_of(w.apply(w.sign(AUTH, AnchorPlan(l2_height, mode, root, prev, rate, replaces, tuple(inputs)))))


def refuse_anchor(w: World, err: type[Rejected], l2_height: int, inputs: Sequence[tuple[bytes, int]],
                  root: bytes = ROOT1, prev: bytes = NO_PREVIOUS, mode: AnchorMode = AnchorMode.TAPROOT,
                  rate: int = 2, replaces: bytes = ZERO, who: bytes = AUTH) -> Rejected:
    return w.refuse(w.sign(who, AnchorPlan(l2_height, mode, root, prev, rate, replaces, tuple(inputs))), err)


def final(w: World, l2_height: int, plan_id: bytes, root: bytes = ROOT1) -> None:
    w.do(AUTH2, AnchorUpdate(l2_height, root, plan_id, b"\x33" * 32, 150, AnchorStatus.FINAL))


def test_anchor_plan_payload_layout_and_strict_decoding() -> None:
    txid = hashlib.sha256(b"coin").digest()
    p = AnchorPlan(7, AnchorMode.TAPROOT, b"\x01" * 32, b"\x02" * 32, 25, b"\x09" * 32, ((txid, 1),))
    raw = p.encode()
    assert raw == ((7).to_bytes(8, "big") + b"\x02" + b"\x01" * 32 + b"\x02" * 32 + (25).to_bytes(4, "big")
                   + b"\x09" * 32 + b"\x01" + txid + (1).to_bytes(4, "big"))
    assert AnchorPlan.decode(raw) == p
    for bad in (raw[:-1], raw + b"\0", b"\0" * 8 + raw[8:], raw[:8] + b"\x03" + raw[9:], raw[:8] + b"\x00" + raw[9:],
                raw[:73] + b"\0\0\0\0" + raw[77:], raw[:109] + b"\x00"):
        with pytest.raises(DecodeError):
            AnchorPlan.decode(bad)


def test_a_taproot_anchor_is_signed_by_m_keys_completed_by_its_final_update_and_spent_by_the_next() -> None:
    w = world()
    first = post_anchor(w, 10, [FUNDING_OUTPOINT])
    entry = w.plan(first)
    record = AnchorRecord(NET, 10, ROOT1, NO_PREVIOUS)
    out = FederationOutput(KofN.of(2, [k[1:] for k in FED_KEYS]), link_leaf(record.link))
    assert anchor_policy(FED) == out.policy
    ptx = plan_tx(StateView(w.state.get), FED, NET, entry)
    assert [(bytes(o.scriptPubKey), o.nValue) for o in ptx.tx.vout] == [(out.script_pubkey,
                                                                         FUNDING_SAT - entry.fee_sat)]
    assert entry.fee_sat == 2 * vsize_bound(FED, NET, [w.coin(FUNDING_OUTPOINT)], [(out.script_pubkey, 0)])
    assert (entry.anchor_height, entry.pegouts, entry.change_sat) == (10, (), 0) and ptx.txid == first
    assert anchor_tip(w.state.get) == AnchorTip(open=first)
    # one anchor in flight at a time; completions of a roll or by a wrong root are refused
    refuse_anchor(w, AnchorInFlight, 12, [FUNDING_OUTPOINT])
    w.refuse(w.sign(AUTH, PlanCompleted(first)), UnknownPlan)
    post_signatures(w, first)
    w.refuse(w.sign(AUTH, AnchorUpdate(10, ROOT2, first, b"\x33" * 32, 150, AnchorStatus.FINAL)), BadAnchorLink)
    w.do(AUTH, AnchorUpdate(10, ROOT1, first, b"\x33" * 32, 149, AnchorStatus.CONFIRMED))
    assert w.plan(first).status == PlanStatus.PLANNED  # CONFIRMED can still be reorged out: not yet completed
    final(w, 10, first)
    assert w.plan(first).status == PlanStatus.COMPLETED
    coin = w.coin((first, 0))
    assert coin == FedCoin(first, 0, FUNDING_SAT - entry.fee_sat, CoinKind.ANCHOR, record.link, ZERO)
    assert coin_script_pubkey(FED, NET, coin) == out.script_pubkey
    assert w.coin(FUNDING_OUTPOINT).spent_by == first
    assert anchor_tip(w.state.get) == AnchorTip(10, record.link, first, 0, ZERO)
    check_invariants(w.state)

    # the next anchor: above height 10, naming its link, spending its output (by the k-of-n leaf, BIP340)
    refuse_anchor(w, AnchorOutOfOrder, 10, [(first, 0)], prev=record.link)
    refuse_anchor(w, BadAnchorLink, 12, [(first, 0)])  # the wrong previous link
    refuse_anchor(w, UnknownCoin, 12, [(first, 0), outpoint(0)], prev=record.link)  # the books never pay anchors
    second = post_anchor(w, 12, [(first, 0)], root=ROOT2, prev=record.link)
    ptx2 = plan_tx(StateView(w.state.get), FED, NET, w.plan(second))
    assert ptx2.witness_scripts == (anchor_policy(FED).script,)
    assert ptx2.script_pubkeys == (out.script_pubkey,)
    sec = FED_SECRETS[0]
    good = sign_plan(w, second, sec)
    assert len(good[0]) == 65 and good[0][-1] == 1
    assert PublicKeyXOnly(PrivateKey(sec).public_key_xonly.format()).verify(good[0][:64], ptx2.sighash(0))
    other = FED_SECRETS[1]
    w.refuse(w.sign(AUTH, PlanSignature(second, key_index(sec), sign_plan(w, second, other))), BadPlanSignature)
    der = PrivateKey(sec).sign(ptx2.sighash(0), hasher=None) + b"\x01"  # ECDSA where BIP340 is due
    w.refuse(w.sign(AUTH, PlanSignature(second, key_index(sec), (der,))), BadPlanSignature)
    w.do(AUTH, PlanSignature(second, key_index(sec), good))
    post_signatures(w, second, [FED_SECRETS[2]])
    # the fee was priced on a vsize bound; the signed transaction (2 BIP340 items of 65 bytes, 1 empty, the leaf,
    # the 65-byte control block) has exactly that vsize: Schnorr signatures have one size
    raw = signed_transaction(FED, REGTEST, ptx2, signatures_by_key(w.state.get, FED, second))
    assert raw is not None and parse_tx(raw).txid == second
    assert BuTransaction.from_raw(raw.hex()).get_vsize() == vsize_bound(FED, NET, [w.coin((first, 0))],
                                                                         [(bytes(o.scriptPubKey), o.nValue)
                                                                          for o in ptx2.tx.vout])
    final(w, 12, second, ROOT2)
    link2 = AnchorRecord(NET, 12, ROOT2, record.link).link
    assert anchor_tip(w.state.get) == AnchorTip(12, link2, second, 0, ZERO)
    assert w.coin((first, 0)).spent_by == second and w.coin((second, 0)).kind == CoinKind.ANCHOR
    w.refuse(w.sign(AUTH, AnchorUpdate(12, ROOT2, second, b"\x33" * 32, 150, AnchorStatus.FINAL)), DuplicateDuty)
    # a completed anchor is final: no member moves it back or names another transaction
    w.refuse(w.sign(AUTH, AnchorUpdate(12, ROOT2, second, ZERO, 0, AnchorStatus.SUBMITTED)), PlanClosed)
    w.refuse(w.sign(AUTH, AnchorUpdate(12, ROOT2, second, b"\x33" * 32, 150, AnchorStatus.CONFIRMED)), PlanClosed)
    w.refuse(w.sign(AUTH, AnchorUpdate(12, ROOT2, b"\x44" * 32, b"\x33" * 32, 150, AnchorStatus.FINAL)), PlanClosed)
    w.do(AUTH, AnchorUpdate(12, ROOT2, second, b"\x34" * 32, 151, AnchorStatus.FINAL))  # its block, corrected
    assert w.plan(second).status == PlanStatus.COMPLETED and anchor_tip(w.state.get).l2_height == 12
    check_invariants(w.state)


def test_an_op_return_anchor_returns_the_rest_to_the_funding_script() -> None:
    w = world()
    plan = post_anchor(w, 10, [FUNDING_OUTPOINT], mode=AnchorMode.OP_RETURN)
    entry = w.plan(plan)
    record = AnchorRecord(NET, 10, ROOT1, NO_PREVIOUS)
    ptx = plan_tx(StateView(w.state.get), FED, NET, entry)
    rest = FUNDING_SAT - entry.fee_sat
    assert [(bytes(o.scriptPubKey), o.nValue) for o in ptx.tx.vout] == [
        (op_return_script(record), 0), (deposit_script_pubkey(FED, NET, FUNDING_CONTRACT), rest)]
    post_signatures(w, plan)
    final(w, 10, plan)
    assert w.coin((plan, 1)) == FedCoin(plan, 1, rest, CoinKind.FUNDING, FUNDING_CONTRACT, ZERO)
    assert anchor_tip(w.state.get) == AnchorTip(10, record.link, ZERO, 0, ZERO)  # no output to spend next time
    nxt = post_anchor(w, 11, [(plan, 1)], prev=record.link, mode=AnchorMode.OP_RETURN)
    assert w.plan(nxt).status == PlanStatus.PLANNED
    check_invariants(w.state)


def test_anchor_plan_refusals_and_replacement() -> None:
    w = world()
    refuse_anchor(w, UnknownCoin, 10, [outpoint(0)])  # a deposit: the books never pay anchors
    refuse_anchor(w, UnknownCoin, 10, [(hashlib.sha256(b"nowhere").digest(), 0)])
    refuse_anchor(w, PlanUnderfunded, 10, [FUNDING_OUTPOINT], rate=10_000)
    for who in (BOB, FED_SECRETS[0]):
        refuse_anchor(w, Unauthorized, 10, [FUNDING_OUTPOINT], who=who)
    a = post_anchor(w, 10, [FUNDING_OUTPOINT])
    refuse_anchor(w, DuplicateDuty, 10, [FUNDING_OUTPOINT])  # another member posting the same plan
    refuse_anchor(w, BadReplacement, 10, [FUNDING_OUTPOINT], rate=3, replaces=a)  # not signed by m keys yet
    post_signatures(w, a)
    refuse_anchor(w, BadReplacement, 10, [FUNDING_OUTPOINT], root=ROOT2, rate=3, replaces=a)  # another record
    refuse_anchor(w, BadReplacement, 11, [FUNDING_OUTPOINT], rate=3, replaces=a)  # another height
    b = post_anchor(w, 10, [FUNDING_OUTPOINT], rate=3, replaces=a)
    assert anchor_tip(w.state.get).open == b and w.plan(a).status == PlanStatus.REPLACED
    assert w.plan(b).fee_sat > w.plan(a).fee_sat
    final(w, 10, a)  # the first version was mined after all: it completes the anchor, the newer one is REPLACED
    assert [w.plan(v).status for v in (a, b)] == [PlanStatus.COMPLETED, PlanStatus.REPLACED]
    assert w.coin((a, 0)).amount_sat == FUNDING_SAT - w.plan(a).fee_sat
    assert w.state.get(ANCHOR_TIP_KEY) == AnchorTip(10, AnchorRecord(NET, 10, ROOT1).link, a, 0, ZERO).encode()
    check_invariants(w.state)


def test_an_anchor_plan_nobody_can_broadcast_is_superseded_after_ten_blocks() -> None:
    """A plan the members will not sign (say, a wrong root) must not stop anchoring: while no version of its chain has
    m signatures, SUPERSEDE_AFTER blocks after it was recorded, a new version spending the same coins (so only one
    of them can ever be mined) replaces it, for a higher height or the same record. A chain with m signatures is
    replaced only by fee."""
    w = world()
    bad = post_anchor(w, 10, [FUNDING_OUTPOINT], root=ROOT2)
    post_signatures(w, bad, FED_SECRETS[:1])  # one member signed (say, a faulty one): not m
    refuse_anchor(w, AnchorInFlight, 12, [FUNDING_OUTPOINT])  # a fresh plan while one is in flight
    refuse_anchor(w, BadReplacement, 12, [FUNDING_OUTPOINT], replaces=bad)  # too soon
    w.height += SUPERSEDE_AFTER
    refuse_anchor(w, BadReplacement, 10, [FUNDING_OUTPOINT], rate=3, replaces=bad)  # the same height, another root
    refuse_anchor(w, BadReplacement, 9, [FUNDING_OUTPOINT], root=ROOT2, rate=3, replaces=bad)  # a lower height
    refuse_anchor(w, BadReplacement, 12, [outpoint(0)], replaces=bad)  # other coins: both could be mined
    good = post_anchor(w, 12, [FUNDING_OUTPOINT], replaces=bad)
    assert (w.plan(bad).status, w.plan(bad).replaced_by, w.plan(good).status) == (
        PlanStatus.REPLACED, good, PlanStatus.PLANNED)
    assert w.coin(FUNDING_OUTPOINT).spent_by == good and anchor_tip(w.state.get).open == good
    w.refuse(w.sign(AUTH, PlanSignature(bad, key_index(FED_SECRETS[1]), sign_plan(w, bad, FED_SECRETS[1]))),
             PlanClosed)
    post_signatures(w, good)
    w.height += SUPERSEDE_AFTER
    refuse_anchor(w, BadReplacement, 14, [FUNDING_OUTPOINT], replaces=good)  # m signatures: replaced by fee only
    final(w, 12, good)
    assert anchor_tip(w.state.get).l2_height == 12 and w.plan(bad).status == PlanStatus.REPLACED
    w.refuse(w.sign(AUTH, AnchorUpdate(10, ROOT2, bad, b"\x33" * 32, 150, AnchorStatus.FINAL)), PlanClosed)
    check_invariants(w.state)


def test_a_superseded_version_that_is_mined_after_all_completes_the_anchor_once() -> None:
    """Superseded versions spend the same coins, so at most one is mined; if it is the old one, its FINAL completes
    the chain (the newer version REPLACED, the coins spent by it, the tip at its height) and the newer one cannot."""
    w = world()
    old = post_anchor(w, 10, [FUNDING_OUTPOINT])
    w.height += SUPERSEDE_AFTER
    new = post_anchor(w, 12, [FUNDING_OUTPOINT], root=ROOT2, replaces=old)
    final(w, 10, old)
    assert [w.plan(v).status for v in (old, new)] == [PlanStatus.COMPLETED, PlanStatus.REPLACED]
    assert w.coin(FUNDING_OUTPOINT).spent_by == old
    assert anchor_tip(w.state.get) == AnchorTip(10, AnchorRecord(NET, 10, ROOT1).link, old, 0, ZERO)
    w.refuse(w.sign(AUTH, AnchorUpdate(12, ROOT2, new, b"\x33" * 32, 150, AnchorStatus.FINAL)), PlanClosed)
    check_invariants(w.state)


def test_a_roll_neither_spends_an_anchor_output_nor_replaces_an_anchor_plan() -> None:
    from l2d.core.pegs_tx import RollPlan
    from tests.l2d.core.pegs_world import FED_E, FUNDING_OUTPOINT_E
    w = coin_world(fed=FED_E)
    w.height = 20
    a = post_anchor(w, 10, [FUNDING_OUTPOINT_E])
    post_signatures(w, a)
    w.refuse(w.sign(AUTH, RollPlan(3, a, (FUNDING_OUTPOINT_E,))), BadReplacement)
    final(w, 10, a)
    w.refuse(w.sign(AUTH, RollPlan(3, ZERO, ((a, 0),))), UnknownCoin)
    check_invariants(w.state)
