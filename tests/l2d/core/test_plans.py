"""Peg-out plans (l2d/core/plans.py; payloads PegoutPlan and PlanSignature of l2d/core/pegs_tx.py) without bitcoind.

States are built through apply_tx in the world of pegs_world.py: relayed regtest headers, deposits claimed with real
SPV proofs, peg-outs burned to Bitcoin addresses, anchors recorded. Every refusal asserts the exact exception class
and that the view recorded no write.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Sequence

import pytest
from bitcoinutils.script import Script
from bitcoinutils.transactions import Transaction as BuTransaction
from bitcoinutils.transactions import TxInput, TxOutput, TxWitnessInput
from coincurve import PrivateKey, PublicKey
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bridge.federation import LocalSigner, add_signatures, build_psbt, finalize
from l2d.core import plans as core_plans
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.coin_tx import Burn
from l2d.core.errors import BadNonce, DecodeError, DuplicateDuty, InvalidTransaction, Rejected, Unauthorized
from l2d.core.params import REGTEST
from l2d.core.pegs import (CHANGE_CONTRACT, PEGOUT_MIN_SAT, SECP256K1_N, BadPegoutTransition, BridgeTotals, CoinKind,
                           FedCoin, Federation, PegoutEntry, PegoutNotAnchored, UnknownPegout, coin_key,
                           deposit_script_pubkey, pegout_key, witness_script)
from l2d.core.pegs_tx import MAX_FEERATE, MAX_PLAN_INPUTS, PegoutPlan, PegoutStatus, PegoutUpdate, PlanSignature
from l2d.core.plans import (DUST_SAT, MAX_FEE_SHARE_PPM, RBF_SEQUENCE, ZERO, BadPlanSignature, BadReplacement,
                            CoinSpent, PegoutPlanned, PlanClosed, PlanEntry, PlanStatus, PlanUnderfunded,
                            SuperfluousCoin, UnknownCoin, UnknownPlan, plan_key, plan_sig_key, plan_signatures,
                            plan_tx, price, select_coins, superfluous, vsize_bound)
from l2d.core.spv import parse_tx
from l2d.core.state import Namespace, StateView, account_key
from l2d.core.tx import Transaction
from tests.l2d.core.pegs_world import (ALICE, ANCHOR_HEIGHT, AUTH, AUTH2, BOB, BURN_HEIGHT, CAROL, COIN_BLOCK,
                                       DEPOSITS, FED, FED_KEYS, FED_SECRETS, FUNDING_OUTPOINT, PAYOUTS, World, address,
                                       burn, check_invariants, coin_world, complete, key_index, outpoint, plan_of,
                                       post_plan, post_signatures, record_anchor, sign_plan, xonly)

NET = REGTEST.id
HEIGHT = 20  # the L2 height plans are recorded at (after the burns and the anchor)
A1, A2 = 300_000, 120_000  # the two peg-outs of plans_world


def plans_world() -> tuple[World, bytes, bytes]:
    """coin_world, Bob's peg-outs of A1 (to a P2WPKH) and A2 (to a P2TR) burned at BURN_HEIGHT, a FINAL anchor at
    ANCHOR_HEIGHT; returns (world, first peg-out id, second)."""
    w = coin_world()
    p1, p2 = burn(w, A1, PAYOUTS[0]), burn(w, A2, PAYOUTS[2])
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    w.height = HEIGHT
    return w, p1, p2


INPUTS = (outpoint(0), outpoint(3))  # Alice's 400 000 and Carol's 90 000 sat: 70 000 of change for A1 + A2


def view(w: World) -> StateView:
    return StateView(w.state.get, w.height)


def coins(w: World, inputs: Sequence[tuple[bytes, int]]) -> list[FedCoin]:
    return [w.coin(o) for o in inputs]


def high_s(sig: bytes) -> bytes:
    """The same ECDSA signature with S replaced by N - S (Bitcoin's consensus accepts it, its relay policy does not)."""
    r_len = sig[3]
    r, s = sig[4:4 + r_len], int.from_bytes(sig[6 + r_len:-1], "big")
    s2 = (SECP256K1_N - s).to_bytes(33, "big").lstrip(b"\0")
    s2 = b"\0" + s2 if s2[0] & 0x80 else s2
    body = b"\x02" + bytes((r_len,)) + r + b"\x02" + bytes((len(s2),)) + s2
    return b"\x30" + bytes((len(body),)) + body + b"\x01"


def post_signature(w: World, plan_id: bytes, secret: bytes, who: bytes = AUTH) -> None:
    post_signatures(w, plan_id, [secret], who)


# == payload layouts ===============================================================================================
def test_plan_payload_layouts_round_trip() -> None:
    txid = hashlib.sha256(b"coin").digest()
    plan = PegoutPlan(7, 25, b"\x09" * 32, ((txid, 1), (txid, 2**32 - 1)), (b"\x01" * 32, b"\x02" * 32))
    raw = plan.encode()
    assert raw == ((7).to_bytes(8, "big") + (25).to_bytes(4, "big") + b"\x09" * 32 + b"\x02" + txid
                   + (1).to_bytes(4, "big") + txid + b"\xff" * 4 + b"\x02" + b"\x01" * 32 + b"\x02" * 32)
    assert PegoutPlan.decode(raw) == plan
    sig = PlanSignature(b"\x05" * 32, 2, (b"\x30" * 8 + b"\x01", b"\x31" * 72 + b"\x01"))
    raw = sig.encode()
    assert raw == b"\x05" * 32 + b"\x02\x02" + b"\x09" + b"\x30" * 8 + b"\x01" + b"\x49" + b"\x31" * 72 + b"\x01"
    assert PlanSignature.decode(raw) == sig


_P = PegoutPlan(7, 25, ZERO, ((b"\x0a" * 32, 0),), (b"\x01" * 32,)).encode()
_S = PlanSignature(b"\x05" * 32, 0, (b"\x30" * 8 + b"\x01",)).encode()


@pytest.mark.parametrize("cls,raw", [
    (PegoutPlan, _P[:-1]),  # truncated
    (PegoutPlan, _P + b"\0"),  # trailing byte
    (PegoutPlan, _P[:8] + b"\0\0\0\0" + _P[12:]),  # fee rate 0
    (PegoutPlan, _P[:8] + (MAX_FEERATE + 1).to_bytes(4, "big") + _P[12:]),
    (PegoutPlan, _P[:44] + b"\x00" + _P[44 + 1 + 36:]),  # no inputs
    (PegoutPlan, _P[:44] + b"\x02" + _P[45:81] * 2 + _P[81:]),  # one input twice
    (PegoutPlan, _P[:44] + bytes((MAX_PLAN_INPUTS + 1,)) + _P[45:81] * (MAX_PLAN_INPUTS + 1) + _P[81:]),
    (PegoutPlan, _P[:81] + b"\x00"),  # no peg-outs
    (PegoutPlan, _P[:81] + b"\x02" + _P[82:] * 2),  # one peg-out twice
    (PlanSignature, _S[:-1]),
    (PlanSignature, _S + b"\0"),
    (PlanSignature, _S[:33] + b"\x00"),  # no signatures
    (PlanSignature, _S[:34] + b"\x08" + b"\x30" * 7 + b"\x01"),  # 8 bytes: shorter than any DER signature
    (PlanSignature, _S[:34] + b"\x4a" + b"\x30" * 73 + b"\x01"),  # 74 bytes
    (PlanSignature, _S[:-1] + b"\x02"),  # sighash type other than ALL
    (PlanSignature, _S[:34] + b"\x00"),  # an empty signature
])
def test_plan_payloads_decode_strictly(cls: type[PegoutPlan] | type[PlanSignature], raw: bytes) -> None:
    with pytest.raises(DecodeError):
        cls.decode(raw)


def test_plan_entry_layout() -> None:
    e = PlanEntry(PlanStatus.REPLACED, b"\x01" * 32, b"\x02" * 32, 5, 6, 7, 8, 9, ((b"\x03" * 32, 4),),
                  (b"\x05" * 32, b"\x06" * 32), (10, 11))
    raw = e.encode()
    assert len(raw) == 1 + 32 + 32 + 8 + 8 + 4 + 8 + 8 + 1 + 36 + 1 + 2 * 40
    assert PlanEntry.decode(raw) == e
    for bad in (raw[:-1], raw + b"\0", b"\x04" + raw[1:], b"\x00" + raw[1:]):
        with pytest.raises(DecodeError):
            PlanEntry.decode(bad)
    assert plan_key(b"\x07" * 32) == b"\x0c" + b"\x07" * 32
    assert len(plan_sig_key(b"\x07" * 32, 1)) == 33 and plan_sig_key(b"\x07" * 32, 1)[0] == Namespace.PLAN_SIG
    assert plan_sig_key(b"\x07" * 32, 1) != plan_sig_key(b"\x07" * 32, 2)


# == the transaction a plan stands for =============================================================================
def test_a_plan_records_what_price_derives_and_its_id_is_the_transactions_txid() -> None:
    w, p1, p2 = plans_world()
    totals = w.totals()
    writes = w.apply(w.sign(AUTH, PegoutPlan(ANCHOR_HEIGHT, 3, ZERO, INPUTS, (p1, p2))))
    plan_id = plan_of(writes)
    assert set(writes) == {plan_key(plan_id), pegout_key(p1), pegout_key(p2), coin_key(*INPUTS[0]),
                           coin_key(*INPUTS[1]), account_key(xonly(AUTH))}
    priced = price(FED, NET, coins(w, INPUTS), [w.pegout(p1), w.pegout(p2)], 3)
    e = w.plan(plan_id)
    assert e == PlanEntry(PlanStatus.PLANNED, ZERO, ZERO, HEIGHT, ANCHOR_HEIGHT, 3, priced.fee_sat, priced.change_sat,
                          INPUTS, (p1, p2), priced.payouts)
    # the arithmetic: change = inputs - peg-outs, fee = rate x vsize, split equally (the first fee % n pay 1 more)
    fee = 3 * vsize_bound(FED, NET, coins(w, INPUTS), priced.outputs)
    assert (e.change_sat, e.fee_sat) == (400_000 + 90_000 - A1 - A2, fee)
    assert e.payouts == (A1 - fee // 2 - fee % 2, A2 - fee // 2) and sum(e.payouts) == A1 + A2 - fee
    change_spk = deposit_script_pubkey(FED, NET, CHANGE_CONTRACT)
    assert priced.outputs == ((PAYOUTS[0], e.payouts[0]), (PAYOUTS[2], e.payouts[1]), (change_spk, e.change_sat))
    # the transaction: version 2, locktime 0, the inputs in order with RBF sequences, the outputs above
    ptx = plan_tx(view(w), FED, NET, e)
    assert ptx.txid == plan_id
    assert (ptx.tx.nVersion, ptx.tx.nLockTime) == (2, 0)
    assert [(i.prevout.hash, i.prevout.n, i.nSequence) for i in ptx.tx.vin] == [(t, v, RBF_SEQUENCE) for t, v in INPUTS]
    assert [(bytes(o.scriptPubKey), o.nValue) for o in ptx.tx.vout] == list(priced.outputs)
    assert ptx.witness_scripts == (witness_script(FED, NET, xonly(ALICE)), witness_script(FED, NET, xonly(CAROL)))
    assert parse_tx(ptx.tx.serialize()).txid == plan_id  # the core's own Bitcoin parser agrees
    # the plan takes the coins and names itself on the peg-outs; no money moves yet
    assert all(w.coin(o).spent_by == plan_id for o in INPUTS)
    assert [(w.pegout(p).status, w.pegout(p).btc_txid) for p in (p1, p2)] == [(PegoutStatus.PENDING, plan_id)] * 2
    assert w.totals() == totals
    check_invariants(w.state)


def test_a_plan_without_change_has_no_change_output() -> None:
    w = coin_world()
    pid = burn(w, 150_000)
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    plan_id = post_plan(w, [outpoint(1)], [pid], rate=2)  # Alice's 150 000 sat coin, exactly
    e = w.plan(plan_id)
    ptx = plan_tx(view(w), FED, NET, e)
    assert e.change_sat == 0 and len(ptx.tx.vout) == 1 and ptx.txid == plan_id
    assert e.payouts == (150_000 - e.fee_sat,) and e.fee_sat == 2 * vsize_bound(FED, NET, coins(w, [outpoint(1)]),
                                                                                   [(PAYOUTS[1], 150_000)])


def _bu_vsize(fed: Federation, cs: Sequence[FedCoin], outputs: Sequence[tuple[bytes, int]]) -> int:
    """bitcoin-utils' vsize of the transaction with m dummy 72-byte signatures per input and, when the federation has
    an emergency path, the branch selector 01 (OP_IF: the federation's branch), as bridge/federation.py finalizes it
    (how it computed the size before the plan's fee moved into consensus)."""
    ins = [TxInput(c.btc_txid[::-1].hex(), c.vout, sequence=RBF_SEQUENCE.to_bytes(4, "little")) for c in cs]
    outs = [TxOutput(v, Script.from_raw(s.hex())) for s, v in outputs]
    branch = ["01"] if fed.emergency_keys else []
    wits = [TxWitnessInput([""] + ["00" * 72] * fed.threshold + branch + [witness_script(fed, NET, c.contract).hex()])
            for c in cs]
    return int(BuTransaction(ins, outs, has_segwit=True, witnesses=wits).get_vsize())


def _keys(n: int, tag: bytes) -> tuple[bytes, ...]:
    return tuple(sorted(PrivateKey(hashlib.sha256(tag + b" %d" % i).digest()).public_key.format() for i in range(n)))


# (m, n, e, ne, delay): the federation's m-of-n keys and, when e, its emergency path of e-of-ne keys after delay
# blocks; the largest makes a witness script of over 253 bytes (a 3-byte length) and a 4-byte delay push
VSIZE_FEDERATIONS = [(1, 3, 0, 0, 0), (2, 3, 0, 0, 0), (3, 3, 0, 0, 0), (2, 3, 2, 2, 1000), (8, 15, 8, 15, 65535),
                     (1, 1, 1, 1, 1), (15, 15, 15, 15, 16)]


@pytest.mark.parametrize("m,n,e,ne,delay", VSIZE_FEDERATIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("n_inputs", [1, 2, 3])
def test_vsize_bound_is_bitcoin_utils_vsize_with_dummy_signatures(m: int, n: int, e: int, ne: int, delay: int,
                                                                  n_inputs: int) -> None:
    keys = FED_KEYS if n == 3 else _keys(n, b"vsize federation")
    fed = Federation(m, keys, 3, e, _keys(ne, b"vsize emergency") if e else (), delay)
    contracts = (xonly(ALICE), CHANGE_CONTRACT, xonly(CAROL))
    cs = [FedCoin(hashlib.sha256(b"coin %d" % i).digest(), i * 7, 100_000, CoinKind.DEPOSIT, contracts[i])
          for i in range(n_inputs)]
    change = (deposit_script_pubkey(fed, NET, CHANGE_CONTRACT), 5_000)
    for outputs in ([(PAYOUTS[0], 50_000)], [(PAYOUTS[1], 50_000), change],
                    [(PAYOUTS[2], 10_000), (PAYOUTS[0], 20_000), (b"\x76\xa9\x14" + b"\x01" * 20 + b"\x88\xac", 1)]):
        assert vsize_bound(fed, NET, cs, outputs) == _bu_vsize(fed, cs, outputs)


def test_select_coins_takes_the_largest_first_and_avoids_dust_change() -> None:
    def c(n: int, amount: int) -> FedCoin:
        return FedCoin(bytes((n,)) * 32, 0, amount, CoinKind.DEPOSIT, CHANGE_CONTRACT)

    pool = [c(1, 50_000), c(2, 200_000), c(3, 100_000), c(4, 100_000), c(5, 1_000)]
    assert select_coins(pool, 150_000) == [pool[1]]
    assert select_coins(pool, 200_000) == [pool[1]]  # no change at all
    assert select_coins(pool, 250_000) == [pool[1], pool[2]]  # ties by txid: coin 3 before coin 4
    assert select_coins(pool, 300_000) == [pool[1], pool[2]]  # no change
    assert select_coins(pool, 400_000 - DUST_SAT) == [pool[1], pool[2], pool[3]]  # a change of exactly the dust limit
    assert select_coins(pool, 400_000 - DUST_SAT + 1) == [pool[1], pool[2], pool[3], pool[0]]  # not below it
    assert select_coins(pool, 1_000_000) == sorted(pool, key=lambda x: (-x.amount_sat, x.btc_txid))  # falls short
    assert select_coins(pool[::-1], 250_000) == [pool[1], pool[2]]  # the order given does not matter
    # largest first takes 60 000, then 40 100 (a change of 100: dust), then 40 000; without the 40 100 sat coin the
    # others pay exactly 100 000, so it is dropped again (consensus would refuse it as superfluous)
    more = [c(6, 60_000), c(7, 40_100), c(8, 40_000)]
    assert select_coins(more, 100_000) == [more[0], more[2]]
    assert superfluous(more, 100_000) == more[1] and superfluous([more[0], more[2]], 100_000) is None


def _covers(total: int, need: int) -> bool:
    """A plan's coins cover its peg-outs: a change of 0 or at least DUST_SAT (docs/bridge.md)."""
    return total == need or total - need >= DUST_SAT


_OFFSETS = (0, 1, 100, DUST_SAT - 1, DUST_SAT, DUST_SAT + 1)  # differences around the dust limit


@st.composite
def _pool_and_need(draw: st.DrawFn) -> tuple[list[int], int]:
    """Coin amounts (any, near the dust limit, or 40 000 plus one of _OFFSETS) and a need: any, or a sum of the
    largest coins less one of _OFFSETS or less the difference of two coins (where largest first goes past a dusty
    change and a coin it took before may be dropped again)."""
    amounts = draw(st.lists(st.one_of(st.integers(1, 300_000), st.integers(1, 2 * DUST_SAT),
                                      st.sampled_from(_OFFSETS).map(lambda d: 40_000 + d)), max_size=9))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return amounts, draw(st.integers(1, 700_000))
    largest = sorted(amounts, reverse=True)[:draw(st.integers(0, len(amounts)))]
    close = sorted({a - b for a in amounts for b in amounts if 0 < a - b < DUST_SAT})
    offset = draw(st.sampled_from(close if kind == 2 and close else _OFFSETS))
    return amounts, max(1, sum(largest) - offset)


@settings(max_examples=400, deadline=None)
@example(pool_need=([60_000, 40_100, 40_000], 100_000), perm=list(range(9)))
@given(pool_need=_pool_and_need(), perm=st.permutations(list(range(9))))
def test_select_coins_covers_need_without_a_coin_it_does_not_need(pool_need: tuple[list[int], int],
                                                                   perm: list[int]) -> None:
    """select_coins is deterministic (the order of the pool does not matter), covers need whenever the whole pool
    does, takes its coins largest first, and what covers has no coin without which the rest still covers (so
    consensus accepts the choice: no SuperfluousCoin); what does not cover is the whole pool."""
    amounts, need = pool_need
    pool = [FedCoin(hashlib.sha256(b"pool %d" % (i // 2)).digest(), i % 2, a, CoinKind.DEPOSIT, CHANGE_CONTRACT)
            for i, a in enumerate(amounts)]
    chosen = select_coins(pool, need)
    assert select_coins([pool[i] for i in perm if i < len(pool)], need) == chosen
    order = sorted(pool, key=lambda x: (-x.amount_sat, x.btc_txid, x.vout))
    assert [x for x in order if x in chosen] == chosen and len(set(chosen)) == len(chosen)
    total = sum(x.amount_sat for x in chosen)
    if not _covers(total, need):
        assert chosen == order and not _covers(sum(amounts), need)
        event("falls short")
        return
    assert not any(_covers(total - x.amount_sat, need) for x in chosen)
    assert superfluous(chosen, need) is None
    first_pass = next(k for k in range(len(order) + 1) if _covers(sum(x.amount_sat for x in order[:k]), need))
    event("covers, a coin dropped again" if len(chosen) < first_pass else "covers")


# == signatures: consensus checks what signers and the quorum produce ==============================================
def test_signatures_of_m_keys_are_accepted_and_assemble_the_plans_transaction(tmp_path: Path) -> None:
    w, p1, p2 = plans_world()
    plan_id = post_plan(w, INPUTS, (p1, p2), rate=3)
    ptx = plan_tx(view(w), FED, NET, w.plan(plan_id))
    psbt = build_psbt(FED, REGTEST, ptx)
    indexes = []
    for n, secret in enumerate(FED_SECRETS[:FED.threshold]):
        signer = LocalSigner(secret, FED, REGTEST, w.state.get, tmp_path / f"signer{n}.json")
        sigs = signer.sign(psbt, plan_id, (p1, p2), ANCHOR_HEIGHT)
        index = key_index(secret)
        writes = w.apply(w.sign(AUTH2 if n else AUTH, PlanSignature(plan_id, index, sigs)))
        assert set(writes) == {plan_sig_key(plan_id, index), account_key(xonly(AUTH2 if n else AUTH))}
        assert plan_signatures(w.state.get, plan_id, index) == sigs
        indexes.append(index)
    # what the state holds is enough to finalize: m signatures per input, the txid is the plan's id
    held = {i: plan_signatures(w.state.get, plan_id, i) or () for i in indexes}
    raw, txid = finalize(add_signatures(FED, REGTEST, psbt, held))
    assert txid == plan_id == parse_tx(raw).txid
    info = parse_tx(raw)
    assert info.tx.has_witness() and len(info.tx.wit.vtxinwit) == 2
    for i, wit in enumerate(info.tx.wit.vtxinwit):
        stack = list(wit.scriptWitness.stack)
        assert stack[0] == b"" and stack[-1] == ptx.witness_scripts[i] and len(stack) == FED.threshold + 2
        # OP_CHECKMULTISIG's walk: the signatures verify against the script's keys in the script's order
        keys = iter(ptx.witness_scripts[i][2 + 34 * k:35 + 34 * k] for k in range(len(FED_KEYS)))
        assert all(any(PublicKey(k).verify(s[:-1], ptx.sighash(i), hasher=None) for k in keys) for s in stack[1:-1])
    # the third key may sign too (any key's valid signatures are kept), directly with coincurve
    third = FED_SECRETS[FED.threshold]
    post_signature(w, plan_id, third)
    assert plan_signatures(w.state.get, plan_id, key_index(third)) == sign_plan(w, plan_id, third)
    assert plan_signatures(w.state.get, plan_id, 3) is None


def test_plan_signature_refusals() -> None:
    w, p1, p2 = plans_world()
    plan_id = post_plan(w, INPUTS, (p1, p2), rate=3)
    k0, k1 = FED_SECRETS[0], FED_SECRETS[1]
    good = sign_plan(w, plan_id, k0)
    i0 = key_index(k0)

    def refuse(p: PlanSignature, err: type[Rejected], who: bytes = AUTH) -> None:
        w.refuse(w.sign(who, p), err)

    refuse(PlanSignature(b"\x77" * 32, i0, good), UnknownPlan)
    refuse(PlanSignature(plan_id, len(FED_KEYS), good), BadPlanSignature)  # key index out of range
    refuse(PlanSignature(plan_id, 255, good), BadPlanSignature)
    refuse(PlanSignature(plan_id, i0, good[:1]), BadPlanSignature)  # one signature for two inputs
    refuse(PlanSignature(plan_id, i0, good + good[:1]), BadPlanSignature)  # three
    refuse(PlanSignature(plan_id, key_index(k1), good), BadPlanSignature)  # key 0's signatures as key 1's
    refuse(PlanSignature(plan_id, i0, good[::-1]), BadPlanSignature)  # each signs its own input's sighash
    untweaked = tuple(PrivateKey(k0).sign(plan_tx(view(w), FED, NET, w.plan(plan_id)).sighash(i), hasher=None)
                      + b"\x01" for i in range(2))
    refuse(PlanSignature(plan_id, i0, untweaked), BadPlanSignature)  # the federation key itself, not tweaked
    for pos in range(len(good[0]) - 1):  # every byte of the DER signature flipped: tampered or not DER at all
        flipped = good[0][:pos] + bytes((good[0][pos] ^ 0x01,)) + good[0][pos + 1:]
        refuse(PlanSignature(plan_id, i0, (flipped, good[1])), BadPlanSignature)
    refuse(PlanSignature(plan_id, i0, (high_s(good[0]), good[1])), BadPlanSignature)  # malleated: not low-S
    for junk in (b"\x30" * 8 + b"\x01", b"\x00" * 70 + b"\x01", b"\x30\x06\x02\x01\x01\x02\x01\x01\x01"):
        refuse(PlanSignature(plan_id, i0, (junk, good[1])), BadPlanSignature)  # not DER / R = S = 1
    refuse(PlanSignature(plan_id, i0, good), Unauthorized, who=BOB)
    refuse(PlanSignature(plan_id, i0, good), Unauthorized, who=k0)  # a federation Bitcoin key is no L2 member
    w.refuse(w.sign(AUTH, PlanSignature(plan_id, i0, good), fee=1), InvalidTransaction)
    w.do(AUTH, PlanSignature(plan_id, i0, good))
    refuse(PlanSignature(plan_id, i0, good), DuplicateDuty, who=AUTH2)  # another member posting the same duty
    refuse(PlanSignature(plan_id, i0, sign_plan(w, plan_id, k0)), DuplicateDuty)  # (ECDSA here is deterministic)


def test_signatures_of_a_replaced_or_completed_plan_are_refused() -> None:
    w, p1, p2 = plans_world()
    a = post_plan(w, INPUTS, (p1, p2), rate=3)
    sigs_a = sign_plan(w, a, FED_SECRETS[0])
    post_signatures(w, a, FED_SECRETS[1:])  # the two other keys sign it: it may be replaced
    b = post_plan(w, INPUTS, (p1, p2), rate=4, replaces=a)
    err = w.refuse(w.sign(AUTH, PlanSignature(a, key_index(FED_SECRETS[0]), sigs_a)), PlanClosed)
    assert err.reason == "plan-not-open"
    post_signature(w, b, FED_SECRETS[0])  # the current version is signed
    complete(w, b, p1)
    w.refuse(w.sign(AUTH, PlanSignature(b, key_index(FED_SECRETS[1]), sign_plan(w, b, FED_SECRETS[1]))), PlanClosed)


# == plan refusals =================================================================================================
def refuse_plan(w: World, err: type[Rejected], inputs: Sequence[tuple[bytes, int]], pegouts: Sequence[bytes],
                rate: int = 3, replaces: bytes = ZERO, anchor_height: int = ANCHOR_HEIGHT, who: bytes = AUTH
                ) -> Rejected:
    return w.refuse(w.sign(who, PegoutPlan(anchor_height, rate, replaces, tuple(inputs), tuple(pegouts))), err)


def test_plan_of_an_unknown_coin() -> None:
    w, p1, _ = plans_world()
    err = refuse_plan(w, UnknownCoin, [outpoint(0), (hashlib.sha256(b"nowhere").digest(), 0)], [p1])
    assert err.reason == "unknown-coin"
    refuse_plan(w, UnknownCoin, [(outpoint(0)[0], 7)], [p1])  # a known transaction, no such output
    fresh = coin_world(claimed=[1, 2, 3, 4, 5])  # Alice's 400 000 sat deposit is not claimed: no coin
    fresh_p = burn(fresh, A1)
    record_anchor(fresh, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    refuse_plan(fresh, UnknownCoin, [outpoint(0)], [fresh_p])


def test_plan_of_a_funding_coin() -> None:
    w, p1, p2 = plans_world()
    assert w.coin(FUNDING_OUTPOINT).kind == CoinKind.FUNDING
    # Alice's 150 000 sat coin and the 200 000 sat funding coin: each is needed for the 300 000 sat peg-out
    refuse_plan(w, UnknownCoin, [outpoint(1), FUNDING_OUTPOINT], [p1])
    refuse_plan(w, UnknownCoin, [FUNDING_OUTPOINT, outpoint(1)], [p1])
    refuse_plan(w, UnknownCoin, [FUNDING_OUTPOINT], [p2])  # alone, for the 120 000 sat one


def test_plan_of_a_coin_spent_by_another_plan() -> None:
    w, p1, p2 = plans_world()
    a = post_plan(w, [outpoint(0)], [p1])
    err = refuse_plan(w, CoinSpent, [outpoint(0)], [p2])
    assert err.reason == "coin-spent" and a[::-1].hex() in str(err)
    big = burn(w, 450_000)  # Alice's 150 000 and 400 000 sat coins are both needed for it
    refuse_plan(w, CoinSpent, [outpoint(1), outpoint(0)], [big])
    complete(w, a, p1)  # spent for good now
    refuse_plan(w, CoinSpent, [outpoint(0)], [p2])
    refuse_plan(w, CoinSpent, [outpoint(1), outpoint(0)], [big])
    post_plan(w, [outpoint(2)], [p2])


def test_plan_of_an_unknown_pegout() -> None:
    w, p1, _ = plans_world()
    refuse_plan(w, UnknownPegout, [outpoint(0)], [p1, b"\x66" * 32])
    plain_burn = w.do(BOB, Burn(50_000), fee=10).txid
    refuse_plan(w, UnknownPegout, [outpoint(0)], [plain_burn])  # a burn without a destination is no peg-out


def test_plan_of_a_pegout_planned_already() -> None:
    w, p1, p2 = plans_world()
    a = post_plan(w, [outpoint(0)], [p1])
    err = refuse_plan(w, PegoutPlanned, [outpoint(4)], [p1])  # another plan for it, from other coins
    assert err.reason == "pegout-planned"
    refuse_plan(w, PegoutPlanned, [outpoint(4)], [p2, p1])
    w.do(AUTH, PegoutUpdate(p1, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT))
    refuse_plan(w, PegoutPlanned, [outpoint(4)], [p1])  # BROADCAST
    w.do(AUTH, PegoutUpdate(p1, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT))
    refuse_plan(w, PegoutPlanned, [outpoint(4)], [p1])  # COMPLETED


def test_plan_of_a_pegout_the_anchor_does_not_cover() -> None:
    w, p1, _ = plans_world()
    late = burn(w, A1, height=ANCHOR_HEIGHT + 3)  # burned after the FINAL anchor
    err = refuse_plan(w, PegoutNotAnchored, [outpoint(4)], [p1, late])
    assert err.reason == "pegout-not-anchored"
    record_anchor(w, ANCHOR_HEIGHT + 3, AnchorStatus.CONFIRMED)  # covers it, but is not FINAL
    refuse_plan(w, PegoutNotAnchored, [outpoint(4)], [late], anchor_height=ANCHOR_HEIGHT + 3)
    record_anchor(w, ANCHOR_HEIGHT + 4, AnchorStatus.SUBMITTED)
    refuse_plan(w, PegoutNotAnchored, [outpoint(4)], [late], anchor_height=ANCHOR_HEIGHT + 4)
    refuse_plan(w, PegoutNotAnchored, [outpoint(4)], [late], anchor_height=ANCHOR_HEIGHT + 5)  # no anchor
    refuse_plan(w, PegoutNotAnchored, [outpoint(4)], [p1], anchor_height=BURN_HEIGHT + 1)  # no anchor there
    record_anchor(w, BURN_HEIGHT - 1, AnchorStatus.FINAL)
    refuse_plan(w, PegoutNotAnchored, [outpoint(4)], [p1], anchor_height=BURN_HEIGHT - 1)  # FINAL, before the burn
    record_anchor(w, ANCHOR_HEIGHT + 3, AnchorStatus.FINAL)
    post_plan(w, [outpoint(4)], [p1, late], anchor_height=ANCHOR_HEIGHT + 3)


def test_underfunded_plans() -> None:
    w, p1, p2 = plans_world()
    err = refuse_plan(w, PlanUnderfunded, [outpoint(3)], [p1])  # 90 000 sat for 300 000
    assert err.reason == "plan-underfunded"
    refuse_plan(w, PlanUnderfunded, [outpoint(0)], [p1, p2])  # 400 000 for 420 000
    dusty = burn(w, 150_000 - DUST_SAT + 1)  # Alice's 150 000 sat coin would leave 545 sat of change
    refuse_plan(w, PlanUnderfunded, [outpoint(1)], [dusty])
    post_plan(w, [outpoint(1), outpoint(5)], [dusty])  # with her 60 000 sat coin the change is fine


def _named(coin: tuple[bytes, int]) -> str:
    return f"{coin[0][::-1].hex()}:{coin[1]}"


def test_a_plan_with_a_coin_it_does_not_need_is_refused() -> None:
    """A fresh plan without one of whose coins the others still cover the peg-outs (a change of 0 or at least
    DUST_SAT) is refused: peg-outs do not pay the fee of consolidating the federation's coins. The error names the
    first such coin; nothing is written."""
    w, p1, p2 = plans_world()
    err = refuse_plan(w, SuperfluousCoin, [outpoint(0), outpoint(4)], [p1])  # 1 000 000 alone pay 300 000
    assert err.reason == "superfluous-coin" and _named(outpoint(0)) in str(err)
    err = refuse_plan(w, SuperfluousCoin, [outpoint(4), outpoint(0)], [p1])  # the other way round: 400 000 do too
    assert _named(outpoint(4)) in str(err)
    err = refuse_plan(w, SuperfluousCoin, [outpoint(2), outpoint(3)], [p1])  # Carol's 300 000 pay exactly 300 000
    assert _named(outpoint(3)) in str(err)
    for extra in ([outpoint(5)], [outpoint(5), outpoint(1)]):  # more coins than the 490 000 of INPUTS for 420 000
        refuse_plan(w, SuperfluousCoin, list(INPUTS) + extra, (p1, p2))
        refuse_plan(w, SuperfluousCoin, extra + list(INPUTS), (p1, p2))
    # the choice a member makes is accepted: select_coins takes no coin it does not need
    free = coins(w, [outpoint(i) for i in range(len(DEPOSITS))])
    chosen = [(c.btc_txid, c.vout) for c in select_coins(free, A1 + A2)]
    assert chosen == [outpoint(4)]
    post_plan(w, chosen, (p1, p2))


@pytest.mark.parametrize("change", [0, 1, DUST_SAT - 1, DUST_SAT, DUST_SAT + 1])
def test_a_coin_is_needed_when_the_others_would_leave_a_dust_change(change: int) -> None:
    """Alice's 150 000 sat coin alone would pay a peg-out of 150 000 - change sat with that change: her 60 000 sat
    coin is needed beside it when that change is dust (1..545, which price refuses), and superfluous when it is 0 or
    at least DUST_SAT (the one coin is then the plan)."""
    w = coin_world()
    pid = burn(w, 150_000 - change)
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    both = [outpoint(1), outpoint(5)]
    needed = 0 < change < DUST_SAT
    assert [(c.btc_txid, c.vout) for c in select_coins(coins(w, both), 150_000 - change)] == (
        both if needed else both[:1])
    if needed:
        plan_id = post_plan(w, both, [pid])
        assert w.plan(plan_id).change_sat == 60_000 + change
        return
    err = refuse_plan(w, SuperfluousCoin, both, [pid])
    assert _named(outpoint(5)) in str(err)
    refuse_plan(w, SuperfluousCoin, both[::-1], [pid])
    assert w.plan(post_plan(w, both[:1], [pid])).change_sat == change


def test_a_replacement_keeps_the_coins_of_the_version_it_replaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule is for fresh plans: a replacement spends exactly the coins of the plan it replaces. A plan recorded
    before the rule existed may hold a coin it does not need (no real part can record one now, so the rule is
    switched off to record it); it is still signed and replaced, and its coins and peg-out move to the new version."""
    w, p1, p2 = plans_world()
    inputs = [outpoint(0), outpoint(4)]  # either pays p1 alone
    monkeypatch.setattr(core_plans, "superfluous", lambda coins, need: None)
    a = post_plan(w, inputs, [p1], rate=2)
    monkeypatch.undo()
    refuse_plan(w, SuperfluousCoin, [outpoint(2), outpoint(3)], [p2])  # the rule is back for fresh plans
    post_signatures(w, a)
    b = post_plan(w, inputs, [p1], rate=3, replaces=a)
    assert w.plan(b).inputs == tuple(inputs) and w.plan(a).status == PlanStatus.REPLACED
    assert all(w.coin(o).spent_by == b for o in inputs) and w.pegout(p1).btc_txid == b
    check_invariants(w.state)


def test_a_peg_out_pays_at_most_a_tenth_of_its_amount_in_fees() -> None:
    """The fee share bound (MAX_FEE_SHARE_PPM, 10%) also keeps every payout far above dust: a peg-out is at least
    PEGOUT_MIN_SAT, so its payout is at least 9000 sat."""
    w = coin_world()
    rate = 40
    vsize = vsize_bound(FED, NET, coins(w, [outpoint(3)]),
                        [(PAYOUTS[0], 1), (deposit_script_pubkey(FED, NET, CHANGE_CONTRACT), 1)])
    amount = 10 * rate * vsize  # at this rate the fee is exactly a tenth of the peg-out
    assert PEGOUT_MIN_SAT <= amount <= 90_000 - DUST_SAT  # the coin (90000 sat) covers it with a change
    pid = burn(w, amount, PAYOUTS[0])
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    err = refuse_plan(w, PlanUnderfunded, [outpoint(3)], [pid], rate=rate + 1)
    assert f"more than 10% of a peg-out of {amount} sat" in str(err)
    refuse_plan(w, PlanUnderfunded, [outpoint(3)], [pid], rate=MAX_FEERATE)
    plan_id = post_plan(w, [outpoint(3)], [pid], rate=rate)
    assert w.plan(plan_id).payouts == (amount - rate * vsize,)
    assert min(PEGOUT_MIN_SAT * (1_000_000 - MAX_FEE_SHARE_PPM) // 1_000_000, 9000) > DUST_SAT


def test_plan_by_a_non_member_and_the_member_rules() -> None:
    w, p1, _ = plans_world()
    for who in (BOB, ALICE, FED_SECRETS[0]):
        refuse_plan(w, Unauthorized, [outpoint(0)], [p1], who=who)
    plan = PegoutPlan(ANCHOR_HEIGHT, 3, ZERO, (outpoint(0),), (p1,))
    w.refuse(w.sign(AUTH, plan, fee=1), InvalidTransaction)
    w.refuse(w.sign(AUTH, plan, nonce=0), BadNonce)  # the member relayed and anchored before


def test_the_same_plan_twice_is_a_duplicate_duty() -> None:
    w, p1, p2 = plans_world()
    post_plan(w, INPUTS, (p1, p2), rate=3)
    err = refuse_plan(w, DuplicateDuty, INPUTS, (p1, p2), rate=3, who=AUTH2)
    assert err.reason == "duplicate-duty"
    record_anchor(w, ANCHOR_HEIGHT + 1, AnchorStatus.FINAL)  # naming another anchor: still the same transaction
    refuse_plan(w, DuplicateDuty, INPUTS, (p1, p2), rate=3, anchor_height=ANCHOR_HEIGHT + 1)


# == replacements ==================================================================================================
def test_replacement_refusals() -> None:
    w, p1, p2 = plans_world()
    a = post_plan(w, INPUTS, (p1, p2), rate=5)
    post_signatures(w, a)
    err = refuse_plan(w, UnknownPlan, INPUTS, (p1, p2), rate=6, replaces=b"\x42" * 32)
    assert err.reason == "unknown-plan"
    err = refuse_plan(w, BadReplacement, INPUTS[::-1], (p1, p2), rate=6, replaces=a)  # the inputs in another order
    assert err.reason == "bad-replacement"
    refuse_plan(w, BadReplacement, INPUTS + (outpoint(1),), (p1, p2), rate=6, replaces=a)  # one coin more
    refuse_plan(w, BadReplacement, INPUTS[:1] + (outpoint(2),), (p1, p2), rate=6, replaces=a)  # another coin
    refuse_plan(w, BadReplacement, INPUTS, (p1,), rate=6, replaces=a)  # fewer peg-outs
    refuse_plan(w, BadReplacement, INPUTS, (p2, p1), rate=6, replaces=a)  # another order
    refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=4, replaces=a)  # a lower fee rate
    # the same rate is the same transaction: the plan itself, recorded already
    refuse_plan(w, DuplicateDuty, INPUTS, (p1, p2), rate=5, replaces=a)
    b = post_plan(w, INPUTS, (p1, p2), rate=6, replaces=a)
    assert (w.plan(a).status, w.plan(a).replaced_by, w.plan(b).replaces) == (PlanStatus.REPLACED, b, a)
    refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=7, replaces=a)  # a is not the current version
    post_signatures(w, b)
    complete(w, b, p2)
    refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=7, replaces=b)  # b is COMPLETED
    refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=8, replaces=a)


def test_a_replacement_moves_the_coins_and_peg_outs_to_the_new_version() -> None:
    w, p1, p2 = plans_world()
    a = post_plan(w, INPUTS, (p1, p2), rate=5)
    post_signatures(w, a)
    writes = w.apply(w.sign(AUTH2, PegoutPlan(ANCHOR_HEIGHT, 9, a, INPUTS, (p1, p2))))
    b = plan_of(writes)
    assert set(writes) == {plan_key(a), plan_key(b), pegout_key(p1), pegout_key(p2), coin_key(*INPUTS[0]),
                           coin_key(*INPUTS[1]), account_key(xonly(AUTH2))}
    ea, eb = w.plan(a), w.plan(b)
    assert (ea.status, ea.replaced_by, eb.status, eb.replaces, eb.feerate_sat_vb) == (
        PlanStatus.REPLACED, b, PlanStatus.PLANNED, a, 9)
    assert eb.fee_sat == 9 * ea.fee_sat // 5 and (eb.change_sat, eb.inputs, eb.pegouts) == (ea.change_sat, ea.inputs,
                                                                                           ea.pegouts)
    assert all(w.coin(o).spent_by == b for o in INPUTS)
    assert all(w.pegout(p).btc_txid == b for p in (p1, p2))
    assert plan_tx(view(w), FED, NET, eb).txid == b != a


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_only_a_version_m_keys_signed_is_replaced(order: tuple[int, int, int]) -> None:
    """A replacement is refused (BadReplacement, nothing written) until the state holds the signatures of m = 2
    federation keys for the version it replaces (it could then be broadcast): with 0 and with m - 1 signatures; the
    signatures of another plan do not count. At m it is accepted, and the new version needs its own m."""
    w, p1, p2 = plans_world()
    other = post_plan(w, [outpoint(5)], [burn(w, 50_000)])
    post_signatures(w, other, FED_SECRETS)  # every key signed another plan
    a = post_plan(w, INPUTS, (p1, p2), rate=5)
    for n, k in enumerate(order[:FED.threshold]):
        err = refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=6, replaces=a)
        assert f"has {n} of the {FED.threshold} signatures" in str(err)
        post_signatures(w, a, [FED_SECRETS[k]])
    b = post_plan(w, INPUTS, (p1, p2), rate=6, replaces=a)
    assert (w.plan(a).status, w.plan(b).replaces) == (PlanStatus.REPLACED, a)
    err = refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=7, replaces=b)
    assert f"has 0 of the {FED.threshold} signatures" in str(err)
    post_signatures(w, b, [FED_SECRETS[k] for k in order])  # all three keys: more than m is fine
    post_plan(w, INPUTS, (p1, p2), rate=7, replaces=b)


# == peg-out updates against plans =================================================================================
def test_pegout_update_refusals_against_plans() -> None:
    w, p1, p2 = plans_world()
    a = post_plan(w, [outpoint(0)], [p1])
    b = post_plan(w, [outpoint(2)], [p2])
    err = w.refuse(w.sign(AUTH, PegoutUpdate(p1, PegoutStatus.BROADCAST, b"\x5a" * 32, ANCHOR_HEIGHT)), UnknownPlan)
    assert "pays peg-out" in str(err)  # a txid that is no plan
    w.refuse(w.sign(AUTH, PegoutUpdate(p1, PegoutStatus.BROADCAST, b, ANCHOR_HEIGHT)), UnknownPlan)  # not p1's plan
    w.refuse(w.sign(AUTH, PegoutUpdate(p2, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), UnknownPlan)
    w.refuse(w.sign(AUTH, PegoutUpdate(p1, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), BadPegoutTransition)  # unseen
    w.refuse(w.sign(BOB, PegoutUpdate(p1, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)), Unauthorized)
    complete(w, a, p1)
    w.refuse(w.sign(AUTH, PegoutUpdate(p1, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), DuplicateDuty)  # twice
    w.refuse(w.sign(AUTH2, PegoutUpdate(p1, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), DuplicateDuty)
    w.refuse(w.sign(AUTH, PegoutUpdate(p1, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)), BadPegoutTransition)


@pytest.mark.parametrize("winner", [0, 1, 2], ids=["earliest", "middle", "latest"])
def test_the_first_completed_version_of_an_rbf_chain_completes_the_plan(winner: int) -> None:
    """A -> B -> C; the version `winner` was mined: every peg-out COMPLETED with it, the other versions REPLACED,
    the coins spent by it, its change a coin at vout n, the totals moved once."""
    w, p1, p2 = plans_world()
    a = post_plan(w, INPUTS, (p1, p2), rate=2)
    post_signatures(w, a)
    b = post_plan(w, INPUTS, (p1, p2), rate=3, replaces=a)
    post_signatures(w, b)
    c = post_plan(w, INPUTS, (p1, p2), rate=4, replaces=b)
    versions = [a, b, c]
    won = versions[winner]
    # every version was broadcast in turn (as the bridge bumps the fee); the winner's was mined
    for v in versions:
        w.do(AUTH, PegoutUpdate(p2, PegoutStatus.BROADCAST, v, ANCHOR_HEIGHT))
    if won != c:
        w.do(AUTH, PegoutUpdate(p2, PegoutStatus.BROADCAST, won, ANCHOR_HEIGHT))
    before = w.totals()
    entry = w.plan(won)
    assert core_plans.pegout_paid_sat(w.state.get, p2, w.pegout(p2)) is None  # BROADCAST: not paid yet
    writes = w.apply(w.sign(AUTH, PegoutUpdate(p2, PegoutStatus.COMPLETED, won, ANCHOR_HEIGHT)))
    # what each peg-out was paid is the value of its output in the mined version: its amount less its fee share
    won_tx = plan_tx(view(w), FED, NET, entry).tx
    paid = [core_plans.pegout_paid_sat(w.state.get, p, w.pegout(p)) for p in (p1, p2)]
    assert paid == [won_tx.vout[0].nValue, won_tx.vout[1].nValue]
    assert sum(a - v for a, v in zip((A1, A2), paid)) == entry.fee_sat  # the fee shares add up to the fee
    assert [w.plan(v).status for v in versions] == [PlanStatus.COMPLETED if v == won else PlanStatus.REPLACED
                                                     for v in versions]
    assert [w.plan(v).replaced_by for v in versions] == [b, c, ZERO]  # the chain itself is kept
    for p in (p1, p2):
        assert (w.pegout(p).status, w.pegout(p).btc_txid) == (PegoutStatus.COMPLETED, won)
    assert all(w.coin(o).spent_by == won for o in INPUTS)
    change = w.coin((won, 2))
    assert change == FedCoin(won, 2, 400_000 + 90_000 - A1 - A2, CoinKind.CHANGE, CHANGE_CONTRACT, ZERO)
    assert change.amount_sat == entry.change_sat
    ptx = plan_tx(view(w), FED, NET, entry)
    assert bytes(ptx.tx.vout[2].scriptPubKey) == deposit_script_pubkey(FED, NET, change.contract)
    assert ptx.tx.vout[2].nValue == change.amount_sat
    assert w.totals() == BridgeTotals(before.pegged_in_sat, before.pending_out_sat - A1 - A2,
                                      before.paid_out_sat + A1 + A2)
    assert coin_key(won, 2) in writes and pegout_key(p1) in writes
    check_invariants(w.state)
    # nothing completes it again, by any version or peg-out
    totals = w.totals()
    for p, v in [(p2, won), (p1, won)]:
        w.refuse(w.sign(AUTH, PegoutUpdate(p, PegoutStatus.COMPLETED, v, ANCHOR_HEIGHT)), DuplicateDuty)
    for p in (p1, p2):
        for v in versions:
            if v != won:
                for status in (PegoutStatus.BROADCAST, PegoutStatus.COMPLETED):
                    w.refuse(w.sign(AUTH, PegoutUpdate(p, status, v, ANCHOR_HEIGHT)), BadPegoutTransition)
    assert w.totals() == totals
    # the versions are closed; the change is a coin like any other, the spent coins are gone
    w.refuse(w.sign(AUTH, PlanSignature(c, 0, (b"\x30" * 8 + b"\x01",) * 2)), PlanClosed)
    refuse_plan(w, BadReplacement, INPUTS, (p1, p2), rate=9, replaces=c)
    late = burn(w, 50_000)
    refuse_plan(w, CoinSpent, [outpoint(0)], [late])
    d = post_plan(w, [(won, 2)], [late])
    assert w.coin((won, 2)).spent_by == d
    check_invariants(w.state)


# == invariants over random sequences ==============================================================================
PROP_ANCHOR = 60
PROP_BASE = coin_world(claimed=(0, 2))  # Alice's 400 000 and Carol's 300 000 sat; the others are claimed as steps
record_anchor(PROP_BASE, PROP_ANCHOR, AnchorStatus.FINAL)

op = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, len(DEPOSITS) - 1), st.just(0), st.just(0)),
    st.tuples(st.just("burn"), st.integers(PEGOUT_MIN_SAT, 400_000), st.integers(0, len(PAYOUTS) - 1), st.just(0)),
    st.tuples(st.just("plan"), st.integers(1, 3), st.integers(1, 30), st.sampled_from([0, 0, 0, 1, 2, 3, 4])),
    st.tuples(st.just("sign"), st.integers(0, 20), st.integers(1, len(FED_SECRETS)), st.integers(0, 2)),
    st.tuples(st.just("replace"), st.integers(0, 20), st.integers(-1, 5), st.sampled_from([0, 1, 1])),
    st.tuples(st.just("mined"), st.integers(0, 20), st.integers(0, 2), st.sampled_from([0, 0, 1])),
    st.tuples(st.just("mined"), st.integers(0, 20), st.integers(0, 2), st.just(0)),
)


def _records(state: dict[bytes, bytes], ns: Namespace) -> dict[bytes, bytes]:
    return {k[1:]: v for k, v in state.items() if k[0] == ns}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=8, max_size=30))
def test_holdings_and_completions_over_random_sequences(ops: list[tuple[str, int, int, int]]) -> None:
    """After every step: the federation's deposit and change coins not spent by a COMPLETED plan add up to
    pegged_in - paid_out (and check_invariants' ledger and totals); a peg-out is COMPLETED at most once, with one
    txid, for good; no coin is held by a REPLACED plan; no plan holds a coin it does not need; every replaced
    version was signed by m keys; a refused step changes nothing."""
    w = World()
    w.state = dict(PROP_BASE.state)
    w.nonce = Counter(PROP_BASE.nonce)
    completed: dict[bytes, bytes] = {}
    for step, (kind, a, b, c) in enumerate(ops):
        w.height = 2 + step  # below the FINAL anchor
        pegouts = {k: PegoutEntry.decode(v) for k, v in _records(w.state, Namespace.PEGOUT).items()}
        plans = {k: PlanEntry.decode(v) for k, v in _records(w.state, Namespace.PLAN).items()}
        fed_coins = [FedCoin.decode(v) for v in _records(w.state, Namespace.FED_COIN).values()]
        txs = []
        if kind == "claim":
            tx, vout, who, _ = DEPOSITS[a]
            txs.append(w.sign(who, COIN_BLOCK.claim(tx, vout), fee=100))
        elif kind == "burn":
            txs.append(w.sign(BOB, Burn(a, address(PAYOUTS[b])), fee=10))
        elif kind == "plan":  # c == 0: a plan a member would make; 1: with a spent coin, 2: with any peg-outs,
            # 3: with the funding coin (mostly refused), 4: with one more free coin than it needs (refused)
            todo = sorted(k for k, e in pegouts.items()
                          if c == 2 or (e.status == PegoutStatus.PENDING and e.btc_txid == ZERO))[:a]
            if not todo:
                continue
            need = sum(pegouts[k].amount_sat for k in todo)
            free = [x for x in fed_coins if x.kind != CoinKind.FUNDING and x.spent_by == ZERO]
            taken = sorted((x for x in fed_coins if (x.spent_by != ZERO if c == 1 else c == 3 and
                                                     x.kind == CoinKind.FUNDING)), key=lambda x: x.btc_txid)[:1]
            rest = need - sum(x.amount_sat for x in taken)
            chosen = taken + (select_coins(free, rest) if rest > 0 else [])
            if c == 4:
                chosen += sorted((x for x in free if x not in chosen), key=lambda x: x.btc_txid)[:1]
            if not chosen:
                continue
            txs.append(w.sign(AUTH, PegoutPlan(PROP_ANCHOR, b, ZERO, tuple((x.btc_txid, x.vout) for x in chosen),
                                               tuple(todo))))
        elif kind in ("sign", "replace"):  # mostly a current version
            current = sorted(k for k, e in plans.items() if e.status == PlanStatus.PLANNED)
            some = current if a % 3 and current else sorted(plans)
            if not some:
                continue
            pid = some[a % len(some)]
            # sign: the b keys from the c-th sign it; replace: with c, the first m keys sign it first (each signature
            # is refused if the key signed already)
            signers = [(c + k) % len(FED_SECRETS) for k in range(b)] if kind == "sign" else range(FED.threshold * c)
            txs.extend(PlanSignature(pid, key_index(FED_SECRETS[k]), sign_plan(w, pid, FED_SECRETS[k]))
                       for k in signers)
            if kind == "replace":
                e = plans[pid]
                txs.append(PegoutPlan(PROP_ANCHOR, max(1, e.feerate_sat_vb + b), pid, e.inputs, e.pegouts))
        else:  # a version of a plan is broadcast (c: not first) and mined
            if not plans:
                continue
            pid = sorted(plans)[a % len(plans)]
            target = plans[pid].pegouts[b % len(plans[pid].pegouts)]
            if c:
                txs.append(w.sign(AUTH, PegoutUpdate(target, PegoutStatus.COMPLETED, pid, PROP_ANCHOR)))
            else:
                txs.append(w.sign(AUTH, PegoutUpdate(target, PegoutStatus.BROADCAST, pid, PROP_ANCHOR)))
                txs.append(PegoutUpdate(target, PegoutStatus.COMPLETED, pid, PROP_ANCHOR))
        for t in txs:
            before = dict(w.state)
            try:
                w.apply(t if isinstance(t, Transaction) else w.sign(AUTH, t))  # (signed at the nonce it will use)
            except Rejected as e:
                event(f"{kind}: {type(e).__name__}")
                assert w.state == before
                continue
            event(f"{kind}: applied")
        check_invariants(w.state)
        for k, e in ((k, PegoutEntry.decode(v)) for k, v in _records(w.state, Namespace.PEGOUT).items()):
            if k in completed:
                assert (e.status, e.btc_txid) == (PegoutStatus.COMPLETED, completed[k])
            elif e.status == PegoutStatus.COMPLETED:
                completed[k] = e.btc_txid
        plans = {k: PlanEntry.decode(v) for k, v in _records(w.state, Namespace.PLAN).items()}
        for x in (FedCoin.decode(v) for v in _records(w.state, Namespace.FED_COIN).values()):
            assert x.spent_by == ZERO or plans[x.spent_by].status != PlanStatus.REPLACED
        for pid, e in plans.items():
            amounts = [FedCoin.decode(w.state[coin_key(*o)]).amount_sat for o in e.inputs]
            need = sum(PegoutEntry.decode(w.state[pegout_key(p)]).amount_sat for p in e.pegouts)
            assert not any(_covers(sum(amounts) - x, need) for x in amounts)
            if e.replaced_by != ZERO:
                signed = sum(plan_signatures(w.state.get, pid, i) is not None for i in range(len(FED_KEYS)))
                assert signed >= FED.threshold
        holders: Counter[bytes] = Counter()
        for pid, e in plans.items():
            if e.status == PlanStatus.COMPLETED:
                assert all(completed.get(p) == pid for p in e.pegouts)
            if e.status != PlanStatus.REPLACED:  # the current or the mined version holds the coins
                assert all(FedCoin.decode(w.state[coin_key(*o)]).spent_by == pid for o in e.inputs)
                holders.update(e.pegouts)
            if e.status == PlanStatus.PLANNED:
                assert not any(p in completed for p in e.pegouts)
        assert max(holders.values(), default=0) <= 1  # one payment in progress (or made) per peg-out
