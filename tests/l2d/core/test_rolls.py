"""Rolls (RollPlan, PlanCompleted; l2d/core/plans.py) without bitcoind: coins nearing the emergency timelock move to
fresh federation outputs, the funding coins pay the fee, the books do not move.

States are built through apply_tx in the world of pegs_world.py with FED_E, the 2-of-3 federation whose scripts have
an emergency path: relayed regtest headers, deposits claimed with real SPV proofs, the funding deposit recorded.
Every refusal asserts the exact exception class and that the view recorded no write.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import pytest

from bridge.federation import LocalSigner, PolicyViolation, add_signatures, build_psbt, finalize
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.errors import DecodeError, DuplicateDuty, Rejected, Unauthorized
from l2d.core.params import REGTEST
from l2d.core.pegs import CHANGE_CONTRACT, FUNDING_CONTRACT, CoinKind, FedCoin, deposit_script_pubkey
from l2d.core.pegs_tx import PlanCompleted, RollPlan
from l2d.core.plans import (DUST_SAT, ZERO, BadReplacement, CoinSpent, NothingToRoll, PlanClosed, PlanStatus,
                            PlanUnderfunded, UnknownCoin, UnknownPlan, plan_signatures, plan_tx, price_recorded,
                            price_roll, vsize_bound)
from l2d.core.spv import parse_tx
from l2d.core.state import StateView
from tests.l2d.core.pegs_world import (ALICE, ANCHOR_HEIGHT, AUTH, AUTH2, BOB, COIN_BLOCK_E, FED_E, FED_SECRETS,
                                       FUNDING_OUTPOINT, FUNDING_OUTPOINT_E, FUNDING_SAT, PAYOUTS, World, burn,
                                       check_invariants, coin_world, holdings, key_index, outpoint, plan_of, post_plan,
                                       post_signatures, record_anchor)

NET = REGTEST.id
HEIGHT = 20


def roll_world() -> World:
    """coin_world of FED_E (every deposit claimed, the 200 000 sat funding coin recorded) at L2 height HEIGHT."""
    w = coin_world(fed=FED_E)
    w.height = HEIGHT
    return w


def o(deposit: int) -> tuple[bytes, int]:
    return outpoint(deposit, COIN_BLOCK_E)


def post_roll(w: World, inputs: Sequence[tuple[bytes, int]], rate: int = 2, replaces: bytes = ZERO,
              who: bytes = AUTH) -> bytes:
    return plan_of(w.apply(w.sign(who, RollPlan(rate, replaces, tuple(inputs)))))


def refuse_roll(w: World, err: type[Rejected], inputs: Sequence[tuple[bytes, int]], rate: int = 2,
                replaces: bytes = ZERO, who: bytes = AUTH) -> Rejected:
    return w.refuse(w.sign(who, RollPlan(rate, replaces, tuple(inputs))), err)


def view(w: World) -> StateView:
    return StateView(w.state.get, w.height)


# == payloads ======================================================================================================
def test_roll_payload_layouts_round_trip_and_decode_strictly() -> None:
    txid = hashlib.sha256(b"coin").digest()
    roll = RollPlan(25, b"\x09" * 32, ((txid, 1), (txid, 2**32 - 1)))
    raw = roll.encode()
    assert raw == (25).to_bytes(4, "big") + b"\x09" * 32 + b"\x02" + txid + (1).to_bytes(4, "big") + txid + b"\xff" * 4
    assert RollPlan.decode(raw) == roll
    done = PlanCompleted(b"\x05" * 32)
    assert done.encode() == b"\x05" * 32 and PlanCompleted.decode(done.encode()) == done
    for bad in (raw[:-1], raw + b"\0", b"\0\0\0\0" + raw[4:], raw[:36] + b"\x00", raw[:36] + b"\x02" + raw[37:73] * 2):
        with pytest.raises(DecodeError):
            RollPlan.decode(bad)
    for bad in (b"\x05" * 31, b"\x05" * 33):
        with pytest.raises(DecodeError):
            PlanCompleted.decode(bad)


# == the transaction a roll stands for ===============================================================================
def test_a_roll_keeps_the_held_coins_whole_and_the_funding_coin_pays_the_fee(tmp_path: Path) -> None:
    w = roll_world()
    before = holdings(w.state)
    inputs = [o(0), o(2), FUNDING_OUTPOINT_E]  # Alice's 400 000, Carol's 300 000, the funding 200 000
    roll = post_roll(w, inputs, rate=3)
    entry = w.plan(roll)
    assert (entry.status, entry.pegouts, entry.payouts, entry.anchor_height) == (PlanStatus.PLANNED, (), (), 0)
    assert entry.change_sat == 700_000
    change_spk = deposit_script_pubkey(FED_E, NET, CHANGE_CONTRACT)
    funding_spk = deposit_script_pubkey(FED_E, NET, FUNDING_CONTRACT)
    coins = [w.coin(x) for x in inputs]
    bound = vsize_bound(FED_E, NET, coins, [(change_spk, 700_000), (funding_spk, FUNDING_SAT)])
    assert entry.fee_sat == 3 * bound
    ptx = plan_tx(view(w), FED_E, NET, entry)
    assert ptx.txid == roll
    assert [(bytes(x.scriptPubKey), x.nValue) for x in ptx.tx.vout] == [
        (change_spk, 700_000), (funding_spk, FUNDING_SAT - entry.fee_sat)]
    assert all(w.coin(x).spent_by == roll for x in inputs)
    assert holdings(w.state) == before  # reserved, not spent: the books hold the coins until the roll is mined
    # the members sign it as any plan (the signer's roll policy), the quorum finalizes it
    psbt = build_psbt(FED_E, REGTEST, ptx)
    sigs = {}
    for n, secret in enumerate(FED_SECRETS[:FED_E.threshold]):
        signer = LocalSigner(secret, FED_E, REGTEST, w.state.get, tmp_path / f"signer{n}.json")
        sigs[key_index(secret)] = signer.sign(psbt, roll, (), 0)
    post_signatures(w, roll)
    assert {i: plan_signatures(w.state.get, roll, i) for i in sigs} == sigs
    raw, txid = finalize(add_signatures(FED_E, REGTEST, psbt, sigs))
    assert txid == roll == parse_tx(raw).txid
    # mined: the held coins are one CHANGE coin at vout 0, the funding rest a FUNDING coin at vout 1
    w.do(AUTH2, PlanCompleted(roll))
    assert w.plan(roll).status == PlanStatus.COMPLETED
    assert w.coin((roll, 0)) == FedCoin(roll, 0, 700_000, CoinKind.CHANGE, CHANGE_CONTRACT, ZERO)
    assert w.coin((roll, 1)) == FedCoin(roll, 1, FUNDING_SAT - entry.fee_sat, CoinKind.FUNDING, FUNDING_CONTRACT,
                                        ZERO)
    assert holdings(w.state) == before
    check_invariants(w.state)
    # the fresh coins are coins like any other: rolled again later, or spent by a peg-out
    again = post_roll(w, [(roll, 0), (roll, 1)])
    assert w.plan(again).change_sat == 700_000
    w.refuse(w.sign(AUTH, PlanCompleted(roll)), DuplicateDuty)


def test_a_roll_of_funding_coins_alone_has_one_output() -> None:
    w = roll_world()
    roll = post_roll(w, [FUNDING_OUTPOINT_E], rate=1)
    entry = w.plan(roll)
    assert entry.change_sat == 0
    ptx = plan_tx(view(w), FED_E, NET, entry)
    assert [(bytes(x.scriptPubKey), x.nValue) for x in ptx.tx.vout] == [
        (deposit_script_pubkey(FED_E, NET, FUNDING_CONTRACT), FUNDING_SAT - entry.fee_sat)]
    w.do(AUTH, PlanCompleted(roll))
    assert w.coin((roll, 0)).kind == CoinKind.FUNDING and w.coin((roll, 0)).amount_sat == FUNDING_SAT - entry.fee_sat
    check_invariants(w.state)


# == refusals ======================================================================================================
def test_roll_refusals() -> None:
    w = roll_world()
    # held coins need a funding coin to pay the fee: the books never pay Bitcoin fees for a roll
    assert refuse_roll(w, PlanUnderfunded, [o(0)]).reason == "plan-underfunded"
    # a funding rest above zero but below dust, and a fee above the funding
    coins = [w.coin(o(0)), w.coin(FUNDING_OUTPOINT_E)]
    size = price_roll(FED_E, NET, coins, 1).fee_sat  # the vsize bound, at 1 sat/vB
    assert size < DUST_SAT
    dusty = (FUNDING_SAT - 1) // size  # leaves 1..size sat
    assert 0 < FUNDING_SAT - dusty * size < DUST_SAT
    refuse_roll(w, PlanUnderfunded, [o(0), FUNDING_OUTPOINT_E], rate=dusty)
    refuse_roll(w, PlanUnderfunded, [o(0), FUNDING_OUTPOINT_E], rate=dusty + 1)  # the fee exceeds the funding
    fits = (FUNDING_SAT - DUST_SAT) // size
    assert FUNDING_SAT - price_roll(FED_E, NET, coins, fits).fee_sat >= DUST_SAT  # a lower rate fits
    refuse_roll(w, UnknownCoin, [o(0), (hashlib.sha256(b"nowhere").digest(), 0)])
    for who in (BOB, ALICE, FED_SECRETS[0]):
        refuse_roll(w, Unauthorized, [FUNDING_OUTPOINT_E], who=who)
    roll = post_roll(w, [o(0), FUNDING_OUTPOINT_E])
    refuse_roll(w, CoinSpent, [o(1), FUNDING_OUTPOINT_E])  # the funding coin is reserved by the first roll
    refuse_roll(w, DuplicateDuty, [o(0), FUNDING_OUTPOINT_E], who=AUTH2)
    # a federation without an emergency path has nothing to roll
    plain = coin_world()
    assert plain.refuse(plain.sign(AUTH, RollPlan(2, ZERO, (FUNDING_OUTPOINT,))), NothingToRoll).reason == \
        "nothing-to-roll"
    # completion: an unknown plan, a peg-out plan (completed by PegoutUpdate), a roll twice
    w.refuse(w.sign(AUTH, PlanCompleted(b"\x07" * 32)), UnknownPlan)
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    pegout = burn(w, 300_000, PAYOUTS[0])
    w.height = HEIGHT
    pay = post_plan(w, [o(2)], [pegout])
    w.refuse(w.sign(AUTH, PlanCompleted(pay)), UnknownPlan)
    w.do(AUTH, PlanCompleted(roll))
    w.refuse(w.sign(AUTH2, PlanCompleted(roll)), DuplicateDuty)
    check_invariants(w.state)


def test_a_starved_roll_is_replaced_and_the_version_mined_completes_it() -> None:
    w = roll_world()
    inputs = [o(0), FUNDING_OUTPOINT_E]
    a = post_roll(w, inputs, rate=2)
    refuse_roll(w, BadReplacement, inputs, rate=3, replaces=a)  # not signed by m keys: it was never broadcast
    post_signatures(w, a)
    refuse_roll(w, BadReplacement, inputs, rate=1, replaces=a)  # the rate must rise
    refuse_roll(w, BadReplacement, [o(1), FUNDING_OUTPOINT_E], rate=3, replaces=a)  # the same coins
    b = post_roll(w, inputs, rate=3, replaces=a)
    assert w.plan(b).fee_sat > w.plan(a).fee_sat and w.plan(b).change_sat == w.plan(a).change_sat
    assert price_recorded(view(w), FED_E, NET, w.plan(a), 3).fee_sat == w.plan(b).fee_sat
    assert (w.plan(a).status, w.plan(a).replaced_by, w.plan(b).status) == (
        PlanStatus.REPLACED, b, PlanStatus.PLANNED)
    # a payout's plan cannot be replaced by a roll
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    pegout = burn(w, 300_000, PAYOUTS[0])
    w.height = HEIGHT
    pay = post_plan(w, [o(2)], [pegout])
    post_signatures(w, pay)
    refuse_roll(w, BadReplacement, [o(2)], rate=5, replaces=pay)
    # the first version was mined after all: it completes the roll, the newer one is REPLACED; no second completion
    w.do(AUTH, PlanCompleted(a))
    assert [w.plan(v).status for v in (a, b)] == [PlanStatus.COMPLETED, PlanStatus.REPLACED]
    assert w.coin((a, 0)).amount_sat == 400_000 and w.coin((a, 1)).amount_sat == FUNDING_SAT - w.plan(a).fee_sat
    assert all(w.coin(x).spent_by == a for x in inputs)
    assert w.refuse(w.sign(AUTH, PlanCompleted(b)), PlanClosed).reason == "plan-not-open"
    check_invariants(w.state)


def test_the_signer_signs_a_roll_only_when_it_moves_the_coins_to_the_federation(tmp_path: Path) -> None:
    """LocalSigner's roll policy: no peg-out, the held coins whole to the CHANGE script, the rest to FUNDING."""
    w = roll_world()
    roll = post_roll(w, [o(0), FUNDING_OUTPOINT_E])
    ptx = plan_tx(view(w), FED_E, NET, w.plan(roll))
    signer = LocalSigner(FED_SECRETS[0], FED_E, REGTEST, w.state.get, tmp_path / "signer.json")
    assert len(signer.sign(build_psbt(FED_E, REGTEST, ptx), roll, (), 0)) == 2
    # a transaction that sends the held coins elsewhere is no roll
    from bitcoin.core import CMutableTransaction, CTxOut
    from bitcoin.core.script import CScript

    from l2d.core.plans import PlanTx
    thief = CMutableTransaction.from_tx(ptx.tx)
    thief.vout[0] = CTxOut(thief.vout[0].nValue, CScript(PAYOUTS[0]))
    bad = PlanTx(thief, ptx.coins, ptx.witness_scripts)
    with pytest.raises(PolicyViolation, match="neither"):
        signer.sign(build_psbt(FED_E, REGTEST, bad), bad.txid, (), 0)
    short = CMutableTransaction.from_tx(ptx.tx)
    short.vout[0] = CTxOut(short.vout[0].nValue - 1000, short.vout[0].scriptPubKey)
    bad = PlanTx(short, ptx.coins, ptx.witness_scripts)
    with pytest.raises(PolicyViolation, match="held"):
        signer.sign(build_psbt(FED_E, REGTEST, bad), bad.txid, (), 0)


# == the duty's choice of inputs (bridge.service.choose_roll) =========================================================
def test_the_duty_pays_a_roll_of_held_coins_with_younger_funding_coins_but_never_locks_funding_coins_alone() -> None:
    from bridge.service import choose_roll
    w = roll_world()
    dep, small, big = w.coin(o(0)), FedCoin(b"\x51" * 32, 0, 900, CoinKind.FUNDING, FUNDING_CONTRACT), \
        w.coin(FUNDING_OUTPOINT_E)
    # a due deposit and a due funding coin too small for the fee: the largest younger funding coin joins
    take, why = choose_roll(FED_E, NET, [dep, small], [big], 2)
    assert take == [dep, small, big] and why == ""
    assert price_roll(FED_E, NET, take, 2).change_sat == dep.amount_sat
    # a due funding coin alone that cannot pay for itself waits: a younger payer would make a roll the signers
    # refuse (a roll of funding coins alone is signed only when all of them are due), locking both coins
    take, why = choose_roll(FED_E, NET, [small], [big], 2)
    assert take is None and "do not pay for rolling themselves" in why
    # held coins and no funding coin at all
    take, why = choose_roll(FED_E, NET, [dep], [], 2)
    assert take is None and "fund the federation" in why
    # 20 due held coins and a payer: the youngest held coin waits for the next roll
    held = [FedCoin(bytes([i]) * 32, 0, 100_000, CoinKind.DEPOSIT, b"\x02" * 32) for i in range(1, 21)]
    take, why = choose_roll(FED_E, NET, held, [big], 1)
    assert take == held[:19] + [big] and why == ""
