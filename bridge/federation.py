"""The federation's Bitcoin side: peg-out batches as PSBTs (BIP174), signers with their own policy, the quorum.

- plan_batch picks federation coins for a set of anchored peg-outs and splits the Bitcoin fee between the
  peg-outs (documented in docs/bridge.md: each payout is its amount minus an equal share of the fee; the
  change is exactly inputs - sum(amounts), so the federation's holdings fall by exactly what was burned).
- build_psbt turns a plan into a BIP174 PSBT (bitcoin-utils' PSBT class) whose inputs carry the witness UTXO,
  the witness script and, as a proprietary field, the peg-in contract (the L2 account the deposit was tweaked
  for) so that every signer can derive its tweaked key.
- LocalSigner signs with one federation key after checking its policy against the L2 state: every peg-out
  exists with matching amount and address, is covered by a CONFIRMED anchor, the fee share is bounded, the
  change returns exactly to the federation, and it never signs two different, non-conflicting transactions
  for one peg-out (its record is written to disk before the signatures leave it).
- finalize checks the quorum: every partial signature verifies for a key of that input's script; m distinct
  keys per input, unknown keys refused.
ECDSA signing and verification are libsecp256k1 (coincurve); sighashes (BIP143) come from bitcoin-utils.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from bitcoinutils.constants import SIGHASH_ALL
from bitcoinutils.psbt import PSBT
from bitcoinutils.script import Script
from bitcoinutils.transactions import Transaction, TxInput, TxOutput
from coincurve import PrivateKey, PublicKey

from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.params import Network
from l2d.core.pegs import (CHANGE_CONTRACT, SECP256K1_N, Federation, PegoutEntry, deposit_script_pubkey, pegin_tweak,
                           pegout_key, witness_script)
from l2d.core.pegs_tx import PegoutStatus

RBF_SEQUENCE = 0xFFFFFFFD
DUST_SAT = 546  # the largest standard dust threshold (P2PKH); payouts and change stay above it
PROPRIETARY = 0xFC
_CONTRACT_KEY = bytes((PROPRIETARY, 3)) + b"l2d" + b"\x00"  # PSBT_IN_PROPRIETARY, prefix "l2d", subtype 0

StateGet = Callable[[bytes], Optional[bytes]]


class FederationError(Exception):
    """Base of the federation's Bitcoin-side errors."""


class InsufficientFunds(FederationError):
    """The federation's coins do not cover the peg-outs."""


class PolicyViolation(FederationError):
    """A signer refuses: the PSBT breaks its policy (the message says which rule)."""


class QuorumError(FederationError):
    """Not enough distinct, valid signatures from registered keys (or a signature from an unknown key)."""


@dataclass(frozen=True, slots=True)
class Coin:
    """A federation UTXO: txid (internal order), vout, value, and the contract its script is tweaked for."""

    txid: bytes
    vout: int
    amount_sat: int
    contract: bytes

    @property
    def outpoint(self) -> str:
        return f"{self.txid[::-1].hex()}:{self.vout}"


@dataclass(frozen=True, slots=True)
class Pegout:
    pegout_id: bytes  # the burn's L2 txid
    script_pubkey: bytes
    amount_sat: int


@dataclass(frozen=True, slots=True)
class BatchPlan:
    coins: tuple[Coin, ...]
    pegouts: tuple[Pegout, ...]
    payouts: tuple[int, ...]  # per peg-out: amount - fee share
    change_sat: int  # inputs - sum(amounts); 0 means no change output
    fee_sat: int
    feerate_sat_vb: int


def _dummy_vsize(fed: Federation, network: Network, coins: Sequence[Coin], outputs: Sequence[TxOutput]) -> int:
    """vsize of the transaction with m 72-byte signatures per input (an upper bound on DER signatures)."""
    from bitcoinutils.transactions import TxWitnessInput

    inputs = [TxInput(c.txid[::-1].hex(), c.vout, sequence=struct.pack("<I", RBF_SEQUENCE)) for c in coins]
    wits = [TxWitnessInput([""] + ["00" * 72] * fed.threshold + [witness_script(fed, network.id, c.contract).hex()])
            for c in coins]
    return int(Transaction(inputs, outputs, has_segwit=True, witnesses=wits).get_vsize())


def _script(raw: bytes) -> Script:
    return Script.from_raw(raw.hex())


def plan_batch(fed: Federation, network: Network, coins: Sequence[Coin], pegouts: Sequence[Pegout],
               feerate_sat_vb: int) -> BatchPlan:
    """Pick coins (largest first) covering the peg-outs; split the fee equally between the peg-outs."""
    if not pegouts:
        raise ValueError("a batch needs peg-outs")
    need = sum(p.amount_sat for p in pegouts)
    chosen: list[Coin] = []
    total = 0
    for c in sorted(coins, key=lambda c: (-c.amount_sat, c.txid, c.vout)):
        if total >= need and (total == need or total - need >= DUST_SAT):
            break
        chosen.append(c)
        total += c.amount_sat
    change = total - need
    if total < need or 0 < change < DUST_SAT:
        raise InsufficientFunds(f"federation coins ({total} sat in {len(chosen)}) do not cover peg-outs of "
                                f"{need} sat with a change of 0 or at least {DUST_SAT}")
    change_spk = deposit_script_pubkey(fed, network.id, CHANGE_CONTRACT)
    outs = [TxOutput(p.amount_sat, _script(p.script_pubkey)) for p in pegouts]
    if change:
        outs.append(TxOutput(change, _script(change_spk)))
    fee = feerate_sat_vb * _dummy_vsize(fed, network, chosen, outs)
    n = len(pegouts)
    shares = [fee // n + (1 if i < fee % n else 0) for i in range(n)]
    payouts = tuple(p.amount_sat - s for p, s in zip(pegouts, shares))
    if min(payouts) < DUST_SAT:
        raise InsufficientFunds(f"a fee of {fee} sat leaves a payout below dust")
    return BatchPlan(tuple(chosen), tuple(pegouts), payouts, change, fee, feerate_sat_vb)


def build_psbt(fed: Federation, network: Network, plan: BatchPlan) -> bytes:
    seq = struct.pack("<I", RBF_SEQUENCE)
    inputs = [TxInput(c.txid[::-1].hex(), c.vout, sequence=seq) for c in plan.coins]
    outs = [TxOutput(v, _script(p.script_pubkey)) for p, v in zip(plan.pegouts, plan.payouts)]
    if plan.change_sat:
        outs.append(TxOutput(plan.change_sat, _script(deposit_script_pubkey(fed, network.id, CHANGE_CONTRACT))))
    psbt = PSBT(Transaction(inputs, outs, has_segwit=True))
    for i, c in enumerate(plan.coins):
        psbt.update_input(i, witness_utxo=TxOutput(c.amount_sat, _script(deposit_script_pubkey(fed, network.id,
                                                                                             c.contract))),
                          witness_script=_script(witness_script(fed, network.id, c.contract)),
                          sighash_type=SIGHASH_ALL)
        psbt.inputs[i].unknown[_CONTRACT_KEY] = c.contract
    return bytes(psbt.to_bytes())


def unsigned_txid(psbt_bytes: bytes) -> bytes:
    """txid (internal order) of the PSBT's transaction: signatures do not change it (segwit)."""
    return bytes.fromhex(PSBT.from_bytes(psbt_bytes).tx.get_txid())[::-1]


def _inputs(psbt: PSBT) -> list[tuple[bytes, int]]:
    return [(bytes.fromhex(i.txid)[::-1], i.txout_index) for i in psbt.tx.inputs]


def _sighash(psbt: PSBT, i: int) -> bytes:
    psi = psbt.inputs[i]
    return bytes(psbt.tx.get_transaction_segwit_digest(i, psi.witness_script, psi.witness_utxo.amount, SIGHASH_ALL))


def tweaked_secret(secret: bytes, network_id: int, contract: bytes) -> bytes:
    pub = PrivateKey(secret).public_key.format(compressed=True)
    t = int.from_bytes(pegin_tweak(pub, network_id, contract), "big")
    return ((int.from_bytes(secret, "big") + t) % SECP256K1_N).to_bytes(32, "big")


class LocalSigner:
    """One federation member's key and policy. The federation may run n of these in one daemon; each keeps
    its own record file, so the interface is the one a remote signer would offer (PSBT in, PSBT out)."""

    def __init__(self, secret: bytes, fed: Federation, network: Network, state_get: StateGet, record_path: Path,
                 max_fee_share_ppm: int = 100_000) -> None:
        self._secret = secret
        self.pubkey = PrivateKey(secret).public_key.format(compressed=True)
        self.fed = fed
        self.network = network
        self._get = state_get
        self.record_path = record_path
        self.max_fee_share_ppm = max_fee_share_ppm
        # pegout id hex -> {txid hex: [outpoint strings]}: every transaction this key signed for it
        self._record: dict[str, dict[str, list[str]]] = (
            json.loads(record_path.read_text()) if record_path.exists() else {})

    def _save(self) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._record, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.record_path)
        dfd = os.open(self.record_path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def check(self, psbt: PSBT, pegout_ids: Sequence[bytes], anchor_height: int) -> None:
        """Raise PolicyViolation unless this key may sign psbt for these peg-outs."""
        net = self.network.id
        if len(set(pegout_ids)) != len(pegout_ids) or not pegout_ids:
            raise PolicyViolation("the peg-out list is empty or repeats a peg-out")
        anchor = self._get(anchor_key(anchor_height))
        if anchor is None or AnchorEntry.decode(anchor).status not in (AnchorStatus.CONFIRMED, AnchorStatus.FINAL):
            raise PolicyViolation(f"no CONFIRMED anchor at L2 height {anchor_height}")
        in_total = 0
        for i, psi in enumerate(psbt.inputs):
            contract = psi.unknown.get(_CONTRACT_KEY)
            if contract is None or len(contract) != 32 or psi.witness_utxo is None or psi.witness_script is None:
                raise PolicyViolation(f"input {i} lacks its witness UTXO, witness script or contract")
            if psi.sighash_type not in (None, SIGHASH_ALL):
                raise PolicyViolation(f"input {i} asks for sighash type {psi.sighash_type}")
            ws = witness_script(self.fed, net, contract)
            if (psi.witness_script.to_bytes() != ws
                    or psi.witness_utxo.script_pubkey.to_bytes() != deposit_script_pubkey(self.fed, net, contract)):
                raise PolicyViolation(f"input {i} is not a federation coin for its contract")
            in_total += psi.witness_utxo.amount
        outs = [(o.script_pubkey.to_bytes(), o.amount) for o in psbt.tx.outputs]
        change_spk = deposit_script_pubkey(self.fed, net, CHANGE_CONTRACT)
        want = 0
        for pid in pegout_ids:
            raw = self._get(pegout_key(pid))
            if raw is None:
                raise PolicyViolation(f"peg-out {pid.hex()} is not in the L2 state")
            e = PegoutEntry.decode(raw)
            if e.status == PegoutStatus.COMPLETED:
                raise PolicyViolation(f"peg-out {pid.hex()} is already completed")
            if e.l2_height > anchor_height:
                raise PolicyViolation(f"peg-out {pid.hex()} (L2 height {e.l2_height}) is not covered by the anchor "
                                      f"at {anchor_height}")
            low = e.amount_sat - e.amount_sat * self.max_fee_share_ppm // 1_000_000
            match = [k for k, (spk, v) in enumerate(outs) if spk == e.script_pubkey and low <= v <= e.amount_sat]
            if not match:
                raise PolicyViolation(f"no output pays peg-out {pid.hex()} its amount (less at most "
                                      f"{self.max_fee_share_ppm} ppm of fee)")
            outs.pop(match[0])
            want += e.amount_sat
        change = [v for spk, v in outs if spk == change_spk]
        if len(outs) != len(change) or len(change) > 1:
            raise PolicyViolation("the transaction pays an output that is neither a peg-out nor the change")
        if sum(change) != in_total - want:
            raise PolicyViolation(f"change of {sum(change)} sat, expected inputs - peg-outs = {in_total - want}")
        txid = psbt.tx.get_txid()
        spent = {f"{t[::-1].hex()}:{v}" for t, v in _inputs(psbt)}
        for pid in pegout_ids:
            for other, other_inputs in self._record.get(pid.hex(), {}).items():
                if other != txid and not spent & set(other_inputs):
                    raise PolicyViolation(f"already signed {other} for peg-out {pid.hex()}; a second transaction "
                                          f"must conflict with it (spend one of its inputs)")

    def sign(self, psbt_bytes: bytes, pegout_ids: Sequence[bytes], anchor_height: int) -> bytes:
        """Check the policy, record the transaction, and return the PSBT with this key's partial signatures."""
        psbt = PSBT.from_bytes(psbt_bytes)
        self.check(psbt, pegout_ids, anchor_height)
        txid = psbt.tx.get_txid()
        spent = sorted(f"{t[::-1].hex()}:{v}" for t, v in _inputs(psbt))
        changed = False
        for pid in pegout_ids:
            entry = self._record.setdefault(pid.hex(), {})
            if txid not in entry:
                entry[txid] = spent
                changed = True
        if changed:
            self._save()  # before any signature leaves this signer
        for i, psi in enumerate(psbt.inputs):
            key = PrivateKey(tweaked_secret(self._secret, self.network.id, psi.unknown[_CONTRACT_KEY]))
            psi.partial_sigs[key.public_key.format(compressed=True)] = (
                key.sign(_sighash(psbt, i), hasher=None) + bytes((SIGHASH_ALL,)))
        return bytes(psbt.to_bytes())


def combine(psbts: Sequence[bytes]) -> bytes:
    """Merge the partial signatures of PSBTs of one transaction (refuses PSBTs of different transactions)."""
    base = PSBT.from_bytes(psbts[0])
    txid = base.tx.get_txid()
    for raw in psbts[1:]:
        other = PSBT.from_bytes(raw)
        if other.tx.get_txid() != txid:
            raise QuorumError("PSBTs of different transactions cannot be combined")
        for a, b in zip(base.inputs, other.inputs):
            a.partial_sigs.update(b.partial_sigs)
    return bytes(base.to_bytes())


def _script_keys(ws: bytes) -> tuple[int, list[bytes]]:
    m, n = ws[0] - 0x50, ws[-2] - 0x50
    return m, [ws[1 + 34 * k + 1:1 + 34 * (k + 1)] for k in range(n)]


def finalize(psbt_bytes: bytes) -> tuple[bytes, bytes]:
    """Check the quorum on every input and return (raw signed transaction, txid internal order).

    Each partial signature must be by a key of the input's witness script and verify (SIGHASH_ALL); an input
    needs m distinct such keys. A signature by any other key is refused, not ignored.
    """
    psbt = PSBT.from_bytes(psbt_bytes)
    for i, psi in enumerate(psbt.inputs):
        if psi.witness_script is None:
            raise QuorumError(f"input {i} has no witness script")
        m, keys = _script_keys(psi.witness_script.to_bytes())
        digest = _sighash(psbt, i)
        good = 0
        for pub, sig in psi.partial_sigs.items():
            if pub not in keys:
                raise QuorumError(f"input {i}: signature by {pub.hex()}, which is not a federation key of its script")
            if not sig or sig[-1] != SIGHASH_ALL or not PublicKey(pub).verify(sig[:-1], digest, hasher=None):
                raise QuorumError(f"input {i}: the signature by {pub.hex()} does not verify")
            good += 1
        if good < m:
            raise QuorumError(f"input {i}: {good} distinct valid signatures, {m} required")
    psbt.finalize()
    tx = psbt.extract_transaction()
    return bytes.fromhex(tx.to_hex()), bytes.fromhex(tx.get_txid())[::-1]


def psbt_summary(psbt_bytes: bytes) -> dict[str, Any]:
    psbt = PSBT.from_bytes(psbt_bytes)
    return {"txid": psbt.tx.get_txid(), "inputs": [f"{t[::-1].hex()}:{v}" for t, v in _inputs(psbt)],
            "signatures": [len(p.partial_sigs) for p in psbt.inputs]}
