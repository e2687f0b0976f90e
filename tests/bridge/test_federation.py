"""Federation signing (bridge/federation.py) over peg-out plans recorded by the consensus rules (l2d/core/plans.py):
the coin choice and the fee split, the PSBT every member builds for a plan, every signer policy rule, the quorum
(m distinct registered keys; one signature, a duplicated key, an unregistered key or a tampered signature cannot
complete), never two non-conflicting transactions for one peg-out with RBF replacements allowed because they
conflict, the signer's record surviving a restart, and a finalized transaction that bitcoind accepts and mines.

Plans are recorded by apply_tx on a dict-backed state, exactly as a block would record them; signatures are real
libsecp256k1 ECDSA over BIP143 sighashes.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import pytest
from bitcoin.core import CTransaction
from bitcoinutils.psbt import PSBT
from bitcoinutils.script import Script
from coincurve import PrivateKey, PublicKey

from bridge.federation import (LocalSigner, PolicyViolation, QuorumError, add_signatures, build_psbt, finalize,
                               unsigned_txid)
from bridge.rpc import BitcoinRPC, hash_to_hex
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.params import REGTEST
from l2d.core.pegs import (CHANGE_CONTRACT, CoinKind, FedCoin, Federation, PegoutEntry, address_script, coin_key,
                           deposit_script_pubkey, federation_genesis, pegout_key, script_address, witness_script)
from l2d.core.pegs_tx import PegoutPlan, PegoutStatus, PlanSignature
from l2d.core.plans import (DUST_SAT, RBF_SEQUENCE, PegoutPlanned, PlanEntry, PlanStatus, PlanTx, PlanUnderfunded,
                            plan_entry, plan_signatures, plan_tx, price, select_coins, vsize_bound)
from l2d.core.rules import apply_tx
from l2d.core.state import FEDERATION_MEMBERS_KEY, Namespace, Rules, StateView, encode_members
from l2d.core.tx import public_key, sign
from regtest.harness import BitcoindNode, fund_wallet


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d federation test key %d" % n).digest()


SECRETS = [secret(i) for i in range(3)]
FED = Federation(2, tuple(sorted(PrivateKey(s).public_key.format() for s in SECRETS)), 6)
MEMBER = secret(20)  # the block-signing member that posts the plans
RULES = Rules(REGTEST, 1)
ZERO = bytes(32)
ALICE = PrivateKey(secret(10)).public_key_xonly.format()
DEST1 = bytes.fromhex("0014") + b"\x11" * 20
DEST2 = bytes.fromhex("0020") + b"\x22" * 32
ID1, ID2, ID3 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
IDS = [ID1, ID2]
PEGOUTS = {ID1: (DEST1, 300_000), ID2: (DEST2, 200_000)}
COIN_A = FedCoin(b"\xaa" * 32, 0, 1_000_000, CoinKind.DEPOSIT, ALICE, ZERO)
COIN_B = FedCoin(b"\xbb" * 32, 1, 400_000, CoinKind.CHANGE, CHANGE_CONTRACT, ZERO)
COIN_C = FedCoin(b"\xcc" * 32, 0, 250_000, CoinKind.DEPOSIT, ALICE, ZERO)  # with COIN_B: both needed for IDS
ANCHOR_H = 20


def key_index(n: int) -> int:
    """Signer n's index in the federation's (sorted) keys: what a PlanSignature names."""
    return FED.keys.index(PrivateKey(SECRETS[n]).public_key.format())


def state(pegouts: Optional[dict[bytes, tuple[bytes, int]]] = None,
          coins: Sequence[FedCoin] = (COIN_A, COIN_B, COIN_C),
          anchor_status: AnchorStatus = AnchorStatus.FINAL, l2_height: int = 10,
          status: PegoutStatus = PegoutStatus.PENDING) -> dict[bytes, bytes]:
    """A bridge chain's state: the federation, one member, an anchor at ANCHOR_H, peg-outs burned at l2_height,
    federation coins."""
    s = federation_genesis(FED)
    s[FEDERATION_MEMBERS_KEY] = encode_members([public_key(MEMBER)])
    submitted = anchor_status == AnchorStatus.SUBMITTED
    s[anchor_key(ANCHOR_H)] = AnchorEntry(ZERO, b"\1" * 32, ZERO if submitted else b"\2" * 32, 0 if submitted else 7,
                                          anchor_status).encode()
    for pid, (spk, amount) in (PEGOUTS if pegouts is None else pegouts).items():
        s[pegout_key(pid)] = PegoutEntry(status, amount, l2_height, ZERO, spk).encode()
    for c in coins:
        s[coin_key(c.btc_txid, c.vout)] = c.encode()
    return s


def post(st: dict[bytes, bytes], payload: PegoutPlan | PlanSignature) -> dict[bytes, Optional[bytes]]:
    """Apply a member's transaction by the consensus rules and commit its writes to st; return the writes."""
    view = StateView(st.get, height=ANCHOR_H + 5)
    account = view.account(public_key(MEMBER))
    apply_tx(view, sign(REGTEST, MEMBER, account.nonce if account else 0, 0, payload, ZERO), RULES)
    st.update({k: v for k, v in view.writes.items() if v is not None})
    return view.writes


def propose(st: dict[bytes, bytes], coins: Sequence[FedCoin], ids: Sequence[bytes], rate: int = 2,
            replaces: bytes = ZERO) -> PlanTx:
    """Record a PegoutPlan in st and return the transaction the state fixes for it."""
    writes = post(st, PegoutPlan(ANCHOR_H, rate, replaces, tuple((c.btc_txid, c.vout) for c in coins), tuple(ids)))
    [plan_id] = [k[1:] for k, v in writes.items()
                 if k[0] == Namespace.PLAN and v is not None and PlanEntry.decode(v).status == PlanStatus.PLANNED]
    entry = plan_entry(st.get, plan_id)
    assert entry is not None
    ptx = plan_tx(StateView(st.get), FED, REGTEST.id, entry)
    assert ptx.txid == plan_id
    return ptx


def signer(n: int, st: dict[bytes, bytes], tmp: Path, max_fee_share_ppm: Optional[int] = None) -> LocalSigner:
    """Signer n; by default with LocalSigner's own fee share bound (consensus's MAX_FEE_SHARE_PPM)."""
    path = tmp / f"signer{n}.json"
    if max_fee_share_ppm is None:
        return LocalSigner(SECRETS[n], FED, REGTEST, st.get, path)
    return LocalSigner(SECRETS[n], FED, REGTEST, st.get, path, max_fee_share_ppm)


def psbt_of(ptx: PlanTx) -> bytes:
    return build_psbt(FED, REGTEST, ptx)


def entries(pegouts: dict[bytes, tuple[bytes, int]]) -> list[PegoutEntry]:
    return [PegoutEntry(PegoutStatus.PENDING, amount, 10, ZERO, spk) for spk, amount in pegouts.values()]


def test_coin_choice_is_largest_first_and_never_leaves_dust_change() -> None:
    coins = [COIN_B, COIN_A]
    assert select_coins(coins, 500_000) == [COIN_A]
    assert select_coins(coins, 1_000_000) == [COIN_A]  # exact: no change
    assert select_coins(coins, 1_000_000 - DUST_SAT) == [COIN_A]  # change of exactly DUST_SAT
    assert select_coins(coins, 1_000_000 - DUST_SAT + 1) == [COIN_A, COIN_B]  # dust change: take the next coin
    assert select_coins(coins, 1_400_001) == [COIN_A, COIN_B]  # falls short: price refuses the plan
    twin = FedCoin(b"\xa0" * 32, 5, 1_000_000, CoinKind.DEPOSIT, ALICE, ZERO)
    assert select_coins([COIN_A, twin], 1) == [twin]  # ties by txid, then vout


def test_price_splits_the_fee_between_pegouts_and_returns_exact_change() -> None:
    pegs = entries({**PEGOUTS, ID3: (DEST1, 50_000)})
    p = price(FED, REGTEST.id, [COIN_A], pegs, 1)
    assert p.change_sat == 1_000_000 - 550_000  # inputs - amounts: the fee comes out of the peg-outs
    assert p.outputs[-1] == (deposit_script_pubkey(FED, REGTEST.id, CHANGE_CONTRACT), p.change_sat)
    assert p.fee_sat == vsize_bound(FED, REGTEST.id, [COIN_A], p.outputs) > 0
    assert sum(e.amount_sat - v for e, v in zip(pegs, p.payouts)) == p.fee_sat
    share, odd = divmod(p.fee_sat, 3)
    assert odd == 2  # equal shares; the first `fee mod n` peg-outs pay one satoshi more
    assert p.payouts == (300_000 - share - 1, 200_000 - share - 1, 50_000 - share)
    assert sum(v for _, v in p.outputs) == 1_000_000 - p.fee_sat
    assert price(FED, REGTEST.id, [COIN_A], pegs, 3).fee_sat == 3 * p.fee_sat  # fee = rate x vsize bound
    exact = price(FED, REGTEST.id, [COIN_A], entries({ID1: (DEST1, 1_000_000)}), 2)
    assert exact.change_sat == 0 and len(exact.outputs) == 1  # no change output
    with pytest.raises(PlanUnderfunded, match="do not cover"):
        price(FED, REGTEST.id, [COIN_A], entries({ID1: (DEST1, 1_000_001)}), 2)
    with pytest.raises(PlanUnderfunded, match="do not cover"):  # change would be dust
        price(FED, REGTEST.id, [COIN_A], entries({ID1: (DEST1, 1_000_000 - DUST_SAT + 1)}), 2)
    with pytest.raises(PlanUnderfunded, match="below"):  # the fee share leaves a dust payout
        price(FED, REGTEST.id, [COIN_A], entries({ID1: (DEST1, 10_000)}), 100)


def test_psbt_is_the_plans_transaction_and_carries_what_signers_need() -> None:
    st = state()
    ptx = propose(st, [COIN_C, COIN_B], IDS, rate=3)
    entry = plan_entry(st.get, ptx.txid)
    assert entry is not None
    raw = psbt_of(ptx)
    psbt = PSBT.from_bytes(raw)
    assert bytes(psbt.to_bytes()) == raw
    assert unsigned_txid(raw) == ptx.txid  # every member builds the same transaction: the plan id
    tx = ptx.tx
    assert (tx.nVersion, tx.nLockTime) == (2, 0) and all(i.nSequence == RBF_SEQUENCE for i in tx.vin)
    assert [(i.prevout.hash, i.prevout.n) for i in tx.vin] == [(COIN_C.btc_txid, 0), (COIN_B.btc_txid, 1)]
    assert [(bytes(o.scriptPubKey), o.nValue) for o in tx.vout] == [
        (DEST1, entry.payouts[0]), (DEST2, entry.payouts[1]),
        (deposit_script_pubkey(FED, REGTEST.id, CHANGE_CONTRACT), 650_000 - 500_000)]  # change at vout 2
    assert 650_000 - sum(o.nValue for o in tx.vout) == entry.fee_sat
    for psi, c in zip(psbt.inputs, (COIN_C, COIN_B)):
        assert psi.witness_script.to_bytes() == witness_script(FED, REGTEST.id, c.contract)
        assert psi.witness_utxo.script_pubkey.to_bytes() == deposit_script_pubkey(FED, REGTEST.id, c.contract)
        assert psi.witness_utxo.amount == c.amount_sat


def test_two_of_three_complete_and_one_does_not(tmp_path: Path) -> None:
    st = state()
    ptx = propose(st, [COIN_C, COIN_B], IDS)
    raw = psbt_of(ptx)
    s0 = signer(0, st, tmp_path).sign(raw, ptx.txid, IDS, ANCHOR_H)
    assert len(s0) == 2  # one per input
    one = add_signatures(FED, REGTEST, raw, {key_index(0): s0})
    with pytest.raises(QuorumError, match="1 distinct valid signatures, 2 required"):
        finalize(one)
    again = signer(0, st, tmp_path).sign(raw, ptx.txid, IDS, ANCHOR_H)
    with pytest.raises(QuorumError):  # the same key twice is still one key
        finalize(add_signatures(FED, REGTEST, one, {key_index(0): again}))
    s2 = signer(2, st, tmp_path).sign(raw, ptx.txid, IDS, ANCHOR_H)
    tx, txid = finalize(add_signatures(FED, REGTEST, raw, {key_index(0): s0, key_index(2): s2}))
    assert txid == ptx.txid and CTransaction.deserialize(tx).GetTxid() == ptx.txid

    # the signatures as the L2 state holds them: consensus accepts them, and any member finalizes from the state
    for n, sigs in ((0, s0), (2, s2)):
        post(st, PlanSignature(ptx.txid, key_index(n), sigs))
    held = {k: s for k in range(3) if (s := plan_signatures(st.get, ptx.txid, k)) is not None}
    assert held == {key_index(0): s0, key_index(2): s2}
    assert finalize(add_signatures(FED, REGTEST, raw, held)) == (tx, txid)


def test_unregistered_key_is_refused(tmp_path: Path) -> None:
    st = state()
    ptx = propose(st, [COIN_A], [ID1])
    psbt = PSBT.from_bytes(add_signatures(FED, REGTEST, psbt_of(ptx), {
        key_index(n): signer(n, st, tmp_path).sign(psbt_of(ptx), ptx.txid, [ID1], ANCHOR_H) for n in (0, 1)}))
    stranger = PrivateKey(secret(99))
    psbt.inputs[0].partial_sigs[stranger.public_key.format()] = stranger.sign(ptx.sighash(0), hasher=None) + b"\1"
    with pytest.raises(QuorumError, match="not a federation key"):
        finalize(bytes(psbt.to_bytes()))


@pytest.mark.parametrize("where", [0, 1, 6, -3, -2, -1])
def test_a_tampered_signature_is_refused(tmp_path: Path, where: int) -> None:
    """A byte flipped in a partial signature (its DER framing, r, s, its sighash byte) fails the quorum check."""
    st = state()
    ptx = propose(st, [COIN_A], [ID1])
    psbt = PSBT.from_bytes(add_signatures(FED, REGTEST, psbt_of(ptx), {
        key_index(n): signer(n, st, tmp_path).sign(psbt_of(ptx), ptx.txid, [ID1], ANCHOR_H) for n in (0, 1)}))
    pub, sig = next(iter(psbt.inputs[0].partial_sigs.items()))
    flipped = bytearray(sig)
    flipped[where] ^= 1
    psbt.inputs[0].partial_sigs[pub] = bytes(flipped)
    with pytest.raises(QuorumError, match="does not verify"):
        finalize(bytes(psbt.to_bytes()))


def test_more_than_m_signatures_finalize_to_exactly_m_in_key_order(tmp_path: Path) -> None:
    """The witness is [empty, sig, sig, witness script]: m signatures in the script's key order, as
    CHECKMULTISIG needs them, each valid for its key over the BIP143 sighash."""
    st = state()
    ptx = propose(st, [COIN_A], [ID1])
    raw = psbt_of(ptx)
    sigs = {key_index(n): signer(n, st, tmp_path).sign(raw, ptx.txid, [ID1], ANCHOR_H) for n in (2, 0, 1)}
    tx, _ = finalize(add_signatures(FED, REGTEST, raw, sigs))
    stack = list(CTransaction.deserialize(tx).wit.vtxinwit[0].scriptWitness.stack)
    ws = witness_script(FED, REGTEST.id, ALICE)
    assert len(stack) == 2 + FED.threshold and stack[0] == b"" and stack[-1] == ws
    script_keys = [ws[2 + 34 * k:2 + 34 * k + 33] for k in range(len(FED.keys))]
    for sig, pub in zip(stack[1:-1], script_keys):  # the first m keys of the script, in order
        assert sig[-1] == 1 and PublicKey(pub).verify(sig[:-1], ptx.sighash(0), hasher=None)


EXPECT = {"not-in-state": "not in the L2 state", "completed": "already completed", "unanchored": "no CONFIRMED anchor",
          "anchor-submitted": "no CONFIRMED anchor", "burn-after-anchor": "not covered by the anchor",
          "wrong-amount": "no output pays", "wrong-address": "no output pays", "fee-share-too-big": "no output pays",
          "extra-output": "neither a peg-out nor the change", "no-ids": "neither the change nor the funding rest", "repeated-id": "repeats",
          "change-elsewhere": "neither a peg-out nor the change", "not-the-plan": "is not plan"}


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_policy_refusals(tmp_path: Path, case: str) -> None:
    """The plan is recorded in the chain's state (planned); the signer checks it against its own view (seen). A
    refusal signs nothing and records nothing."""
    planned, seen = state(), state()
    ids, anchor, rate = IDS, ANCHOR_H, 2
    ppm: Optional[int] = None  # the signer's default: consensus's bound
    if case == "not-in-state":
        seen = state({ID1: PEGOUTS[ID1]})
    elif case == "completed":
        seen = state(status=PegoutStatus.COMPLETED)
    elif case == "unanchored":
        anchor = ANCHOR_H + 1
    elif case == "anchor-submitted":
        seen = state(anchor_status=AnchorStatus.SUBMITTED)
    elif case == "burn-after-anchor":
        seen = state(l2_height=ANCHOR_H + 1)
    elif case == "wrong-amount":
        planned = state({**PEGOUTS, ID1: (DEST1, 310_000)})
    elif case == "wrong-address":
        planned = state({**PEGOUTS, ID1: (DEST2, 300_000)})
    elif case == "fee-share-too-big":
        rate, ppm = 40, 10_000  # within the consensus bound (10%), beyond this signer's 1%
    elif case == "extra-output":
        planned = state({**PEGOUTS, ID3: (DEST1, 50_000)})
    elif case == "no-ids":
        ids = []
    elif case == "repeated-id":
        ids = [ID1, ID1, ID2]
    ptx = propose(planned, [COIN_A], [*PEGOUTS, ID3] if case == "extra-output" else IDS, rate)
    raw, plan_id = psbt_of(ptx), ptx.txid
    if case in ("change-elsewhere", "not-the-plan"):
        psbt = PSBT.from_bytes(raw)
        psbt.tx.outputs[-1].script_pubkey = Script.from_raw("0014" + "33" * 20)  # the change leaves the federation
        raw = bytes(psbt.to_bytes())
        if case == "change-elsewhere":  # even named by its own txid, the policy refuses it
            plan_id = unsigned_txid(raw)
    s = signer(0, seen, tmp_path, max_fee_share_ppm=ppm)
    with pytest.raises(PolicyViolation, match=EXPECT[case]):
        s.sign(raw, plan_id, ids, anchor)
    assert not (tmp_path / "signer0.json").exists()  # nothing recorded, nothing signed


def test_never_two_non_conflicting_transactions_for_one_pegout(tmp_path: Path) -> None:
    base = state()
    chain = dict(base)
    first = propose(chain, [COIN_A], [ID1])
    s = signer(0, chain, tmp_path)
    sigs = s.sign(psbt_of(first), first.txid, [ID1], ANCHOR_H)
    record = (tmp_path / "signer0.json").read_bytes()
    assert s.sign(psbt_of(first), first.txid, [ID1], ANCHOR_H) == sigs  # the same transaction again: idempotent
    assert (tmp_path / "signer0.json").read_bytes() == record
    # RBF: the consensus replacement spends the same coin for the same peg-out at a higher rate; it conflicts. Only a
    # version m keys signed (one that can be broadcast) is replaced: key 2 signs it too, and both post their signatures
    for n, sg in ((0, sigs), (2, signer(2, chain, tmp_path).sign(psbt_of(first), first.txid, [ID1], ANCHOR_H))):
        post(chain, PlanSignature(first.txid, key_index(n), sg))
    bump = propose(chain, [COIN_A], [ID1], rate=10, replaces=first.txid)
    assert bump.txid != first.txid
    assert bump.tx.vout[0].nValue < first.tx.vout[0].nValue
    s.sign(psbt_of(bump), bump.txid, [ID1], ANCHOR_H)
    # the state refuses a second plan for a planned peg-out ...
    with pytest.raises(PegoutPlanned):
        propose(chain, [COIN_B], [ID1])
    # ... and the signer refuses one too, however it is shown one: here, planned over a state without the first
    other = propose(dict(base), [COIN_B], [ID1])  # pays ID1 from another coin: both could confirm
    with pytest.raises(PolicyViolation, match="must conflict"):
        s.sign(psbt_of(other), other.txid, [ID1], ANCHOR_H)
    # the record survives a restart: a new signer object over the same file refuses too
    with pytest.raises(PolicyViolation, match="must conflict"):
        signer(0, chain, tmp_path).sign(psbt_of(other), other.txid, [ID1], ANCHOR_H)
    # another key (its own record) would sign it: the rule is per key, the quorum makes it federation-wide
    signer(1, chain, tmp_path).sign(psbt_of(other), other.txid, [ID1], ANCHOR_H)


async def _deposit(rpc: BitcoinRPC, w: BitcoinRPC, contract: bytes, amount: int, kind: CoinKind) -> FedCoin:
    spk = deposit_script_pubkey(FED, REGTEST.id, contract)
    address = script_address(spk, REGTEST)
    assert address is not None
    txid = await w.sendtoaddress(address, amount)
    [vout] = [n for n, o in enumerate(CTransaction.deserialize(await rpc.getrawtransaction(txid)).vout)
              if bytes(o.scriptPubKey) == spk]
    return FedCoin(txid, vout, amount, kind, contract, ZERO)


@pytest.mark.regtest
async def test_finalized_plan_is_accepted_and_mined_by_bitcoind(bitcoind: BitcoindNode, rpc: BitcoinRPC,
                                                                tmp_path: Path) -> None:
    """A plan over a real deposit and a real change coin, signed by all three keys (two are used): bitcoind
    accepts it with at least the plan's fee rate (the vsize bound holds) and mines it; the change is at vout 2."""
    w, mining = await fund_wallet(rpc, "fedtest", blocks=101)
    coins = [await _deposit(rpc, w, ALICE, 250_000, CoinKind.DEPOSIT),  # each is needed for the 500 000 sat
             await _deposit(rpc, w, CHANGE_CONTRACT, 400_000, CoinKind.CHANGE)]
    await rpc.generatetoaddress(1, mining)
    pegouts = {ID1: (address_script(await w.getnewaddress(), REGTEST), 300_000),
               ID2: (address_script(await w.getnewaddress(), REGTEST), 200_000)}
    st = state(pegouts, coins)
    ptx = propose(st, coins, IDS, rate=2)
    entry = plan_entry(st.get, ptx.txid)
    assert entry is not None
    raw = psbt_of(ptx)
    tx, txid = finalize(add_signatures(FED, REGTEST, raw, {
        key_index(n): signer(n, st, tmp_path).sign(raw, ptx.txid, IDS, ANCHOR_H) for n in range(3)}))
    [accept] = await rpc.testmempoolaccept([tx])
    assert accept.allowed, accept.reject_reason
    assert accept.fee_sat == entry.fee_sat and accept.vsize is not None
    assert accept.vsize <= vsize_bound(FED, REGTEST.id, ptx.coins, [(bytes(o.scriptPubKey), o.nValue)
                                                                     for o in ptx.tx.vout])
    assert await rpc.sendrawtransaction(tx) == txid
    await rpc.generatetoaddress(1, mining)
    change = await rpc.call("gettxout", [hash_to_hex(txid), len(IDS)])
    assert change["scriptPubKey"]["hex"] == deposit_script_pubkey(FED, REGTEST.id, CHANGE_CONTRACT).hex()
    assert change["confirmations"] == 1
