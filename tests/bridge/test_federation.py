"""Federation signing without bitcoind: batch planning and fee split, PSBT round trip, every signer policy rule,
the quorum (m distinct registered keys; one signature, a duplicated key or an unregistered key cannot complete),
the never-two-transactions rule with RBF replacements allowed only when they conflict, and the signer's record
surviving a restart. Signatures are real libsecp256k1 ECDSA over BIP143 sighashes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import pytest
from bitcoinutils.psbt import PSBT
from coincurve import PrivateKey

from bridge.federation import (DUST_SAT, Coin, InsufficientFunds, LocalSigner, Pegout, PolicyViolation, QuorumError,
                               build_psbt, combine, finalize, plan_batch, unsigned_txid)
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.params import REGTEST
from l2d.core.pegs import CHANGE_CONTRACT, Federation, PegoutEntry, deposit_script_pubkey, pegout_key, witness_script
from l2d.core.pegs_tx import PegoutStatus


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d federation test key %d" % n).digest()


SECRETS = [secret(i) for i in range(3)]
FED = Federation(2, tuple(sorted(PrivateKey(s).public_key.format() for s in SECRETS)), 6)
ALICE = PrivateKey(secret(10)).public_key_xonly.format()
DEST1 = bytes.fromhex("0014") + b"\x11" * 20
DEST2 = bytes.fromhex("0020") + b"\x22" * 32
P1 = Pegout(b"\x01" * 32, DEST1, 300_000)
P2 = Pegout(b"\x02" * 32, DEST2, 200_000)
COINS = [Coin(b"\xaa" * 32, 0, 1_000_000, ALICE), Coin(b"\xbb" * 32, 1, 400_000, CHANGE_CONTRACT)]
ANCHOR_H = 20


def state(*pegouts: Pegout, anchor_status: AnchorStatus = AnchorStatus.CONFIRMED, l2_height: int = 10,
          status: PegoutStatus = PegoutStatus.PENDING) -> dict[bytes, bytes]:
    s = {anchor_key(ANCHOR_H): AnchorEntry(b"\0" * 32, b"\1" * 32, b"\2" * 32 if anchor_status != 1 else b"\0" * 32,
                                           7 if anchor_status != 1 else 0, anchor_status).encode()}
    for p in pegouts:
        s[pegout_key(p.pegout_id)] = PegoutEntry(status, p.amount_sat, l2_height, b"\0" * 32,
                                                 p.script_pubkey).encode()
    return s


def signer(n: int, st: dict[bytes, bytes], tmp: Path, max_fee_share_ppm: int = 100_000) -> LocalSigner:
    return LocalSigner(SECRETS[n], FED, REGTEST, st.get, tmp / f"signer{n}.json", max_fee_share_ppm)


def psbt_for(pegouts: list[Pegout], rate: int = 2, coins: Optional[list[Coin]] = None) -> bytes:
    return build_psbt(FED, REGTEST, plan_batch(FED, REGTEST, coins or COINS, pegouts, rate))


IDS = [P1.pegout_id, P2.pegout_id]


def test_plan_splits_the_fee_between_pegouts_and_returns_exact_change() -> None:
    plan = plan_batch(FED, REGTEST, COINS, [P1, P2], 3)
    assert plan.coins == (COINS[0],)  # largest first covers 500k
    assert plan.change_sat == 1_000_000 - 500_000  # inputs - amounts: the fee comes out of the peg-outs
    assert sum(a.amount_sat - p for a, p in zip(plan.pegouts, plan.payouts)) == plan.fee_sat
    assert abs((P1.amount_sat - plan.payouts[0]) - (P2.amount_sat - plan.payouts[1])) <= 1
    assert plan.fee_sat % 3 == 0 and plan.fee_sat > 0
    with pytest.raises(InsufficientFunds):
        plan_batch(FED, REGTEST, COINS[:1], [Pegout(b"\3" * 32, DEST1, 1_000_001)], 2)
    with pytest.raises(InsufficientFunds):  # change would be dust
        plan_batch(FED, REGTEST, COINS[:1], [Pegout(b"\3" * 32, DEST1, 1_000_000 - DUST_SAT + 1)], 2)


def test_psbt_carries_what_signers_need() -> None:
    raw = psbt_for([P1, P2])
    psbt = PSBT.from_bytes(raw)
    assert bytes(psbt.to_bytes()) == raw
    psi = psbt.inputs[0]
    assert psi.witness_script.to_bytes() == witness_script(FED, REGTEST.id, ALICE)
    assert psi.witness_utxo.script_pubkey.to_bytes() == deposit_script_pubkey(FED, REGTEST.id, ALICE)


def test_two_of_three_complete_and_one_does_not(tmp_path: Path) -> None:
    st = state(P1, P2)
    raw = psbt_for([P1, P2])
    s0 = signer(0, st, tmp_path).sign(raw, IDS, ANCHOR_H)
    with pytest.raises(QuorumError, match="1 distinct valid signatures, 2 required"):
        finalize(s0)
    with pytest.raises(QuorumError):  # the same signer twice is still one key
        finalize(combine([s0, signer(0, st, tmp_path).sign(raw, IDS, ANCHOR_H)]))
    s2 = signer(2, st, tmp_path).sign(raw, IDS, ANCHOR_H)
    tx, txid = finalize(combine([s0, s2]))
    assert txid == unsigned_txid(raw)
    assert len(tx) > 200


def test_unregistered_key_is_refused(tmp_path: Path) -> None:
    st = state(P1)
    raw = psbt_for([P1])
    good = signer(0, st, tmp_path).sign(raw, [P1.pegout_id], ANCHOR_H)
    psbt = PSBT.from_bytes(good)
    stranger = PrivateKey(secret(99))
    from bridge.federation import _sighash  # the BIP143 digest the federation signs

    psbt.inputs[0].partial_sigs[stranger.public_key.format()] = stranger.sign(_sighash(psbt, 0), hasher=None) + b"\1"
    with pytest.raises(QuorumError, match="not a federation key"):
        finalize(bytes(psbt.to_bytes()))


def test_a_forged_signature_is_refused(tmp_path: Path) -> None:
    st = state(P1)
    raw = psbt_for([P1])
    psbt = PSBT.from_bytes(combine([signer(0, st, tmp_path).sign(raw, [P1.pegout_id], ANCHOR_H),
                                    signer(1, st, tmp_path).sign(raw, [P1.pegout_id], ANCHOR_H)]))
    pub, sig = next(iter(psbt.inputs[0].partial_sigs.items()))
    psbt.inputs[0].partial_sigs[pub] = sig[:-3] + bytes([sig[-3] ^ 1]) + sig[-2:]
    with pytest.raises(QuorumError, match="does not verify"):
        finalize(bytes(psbt.to_bytes()))


EXPECT = {"not-in-state": "not in the L2 state", "completed": "already completed", "unanchored": "no CONFIRMED anchor",
          "anchor-submitted": "no CONFIRMED anchor", "burn-after-anchor": "not covered by the anchor",
          "wrong-amount": "no output pays", "wrong-address": "no output pays", "fee-share-too-big": "no output pays",
          "extra-output": "neither a peg-out nor the change", "no-ids": "empty",
          "change-elsewhere": "neither a peg-out nor the change"}


@pytest.mark.parametrize("case", ["not-in-state", "completed", "unanchored", "anchor-submitted", "burn-after-anchor",
                                  "wrong-amount", "wrong-address", "fee-share-too-big", "extra-output", "no-ids",
                                  "change-elsewhere"])
def test_policy_refusals(tmp_path: Path, case: str) -> None:
    st = state(P1, P2)
    ids, anchor, pegouts = IDS, ANCHOR_H, [P1, P2]
    if case == "not-in-state":
        st = state(P1)
    elif case == "completed":
        st = state(P1, P2, status=PegoutStatus.COMPLETED)
    elif case == "unanchored":
        anchor = ANCHOR_H + 1
    elif case == "anchor-submitted":
        st = state(P1, P2, anchor_status=AnchorStatus.SUBMITTED)
    elif case == "burn-after-anchor":
        st = state(P1, P2, l2_height=ANCHOR_H + 1)
    elif case == "wrong-amount":
        pegouts = [Pegout(P1.pegout_id, DEST1, 310_000), P2]
    elif case == "wrong-address":
        pegouts = [Pegout(P1.pegout_id, DEST2, 300_000), P2]
    elif case == "fee-share-too-big":
        pegouts, st = [P1, P2], state(P1, P2)
    elif case == "extra-output":
        pegouts = [P1, P2, Pegout(b"\x09" * 32, DEST1, 50_000)]
    elif case == "no-ids":
        ids = []
    raw = psbt_for(pegouts, rate=500 if case == "fee-share-too-big" else 2)
    if case == "change-elsewhere":
        psbt = PSBT.from_bytes(raw)
        change = psbt.tx.outputs[-1]
        from bitcoinutils.script import Script

        change.script_pubkey = Script.from_raw("0014" + "33" * 20)
        raw = bytes(psbt.to_bytes())
    s = signer(0, st, tmp_path, max_fee_share_ppm=10_000 if case == "fee-share-too-big" else 100_000)
    with pytest.raises(PolicyViolation, match=EXPECT[case]):
        s.sign(raw, ids, anchor)
    assert not (tmp_path / "signer0.json").exists()  # nothing recorded, nothing signed


def test_never_two_non_conflicting_transactions_for_one_pegout(tmp_path: Path) -> None:
    st = state(P1, P2)
    first = psbt_for([P1], coins=[COINS[0]])
    s = signer(0, st, tmp_path)
    s.sign(first, [P1.pegout_id], ANCHOR_H)
    s.sign(first, [P1.pegout_id], ANCHOR_H)  # the same transaction again: fine (idempotent)
    bump = psbt_for([P1], rate=10, coins=[COINS[0]])  # RBF: same input, higher fee
    assert unsigned_txid(bump) != unsigned_txid(first)
    s.sign(bump, [P1.pegout_id], ANCHOR_H)
    other = psbt_for([P1], coins=[COINS[1]])  # pays P1 again from another coin: both could confirm
    with pytest.raises(PolicyViolation, match="must conflict"):
        s.sign(other, [P1.pegout_id], ANCHOR_H)
    # the record survives a restart: a new signer object over the same file refuses too
    again = signer(0, st, tmp_path)
    with pytest.raises(PolicyViolation, match="must conflict"):
        again.sign(other, [P1.pegout_id], ANCHOR_H)
    # another signer (own record) would sign it: the rule is per key, the quorum makes it federation-wide
    signer(1, st, tmp_path).sign(other, [P1.pegout_id], ANCHOR_H)


def test_signed_transaction_is_valid_for_bitcoin_script(tmp_path: Path) -> None:
    """The finalized witness is [empty, sig, sig, witness script] in key order (CHECKMULTISIG's order)."""
    st = state(P1)
    raw = psbt_for([P1])
    tx, _ = finalize(combine([signer(n, st, tmp_path).sign(raw, [P1.pegout_id], ANCHOR_H) for n in (2, 0)]))
    from bitcoin.core import CTransaction

    t = CTransaction.deserialize(tx)
    stack = list(t.wit.vtxinwit[0].scriptWitness.stack)
    assert stack[0] == b"" and stack[-1] == witness_script(FED, REGTEST.id, ALICE) and len(stack) == 4
