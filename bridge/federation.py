"""The federation's Bitcoin side: a plan's transaction as a PSBT (BIP174), a member's signer with its own policy,
the quorum.

- build_psbt turns a recorded plan (l2d/core/plans.py: the state alone fixes its transaction) into a BIP174 PSBT
  (bitcoin-utils' PSBT class) whose inputs carry the witness UTXO, the witness script and, as a proprietary
  field, the peg-in contract (the L2 account the deposit was tweaked for) so that a signer can derive its
  tweaked key. Every member builds it itself; its txid must be the plan's id.
- LocalSigner signs with one federation key after checking its policy against the L2 state: the PSBT is the
  plan's transaction, every peg-out exists with matching amount and address, is covered by a CONFIRMED anchor,
  the fee share is bounded, the change returns exactly to the federation, and it never signs two different,
  non-conflicting transactions for one peg-out (its record is written to disk before the signatures leave it).
  Its signatures go into the L2 state as a PlanSignature, checked by consensus.
- finalize checks the quorum: every partial signature verifies for a key of that input's script; m distinct
  keys per input, unknown keys refused.
ECDSA signing and verification are libsecp256k1 (coincurve); sighashes (BIP143) come from bitcoin-utils.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from bitcoin.core import CScriptWitness, CTransaction, CTxInWitness, CTxWitness
from bitcoinutils.constants import SIGHASH_ALL
from bitcoinutils.psbt import PSBT
from bitcoinutils.script import Script
from bitcoinutils.transactions import Transaction, TxInput, TxOutput
from coincurve import PrivateKey, PublicKey

from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.params import Network
from l2d.core.pegs import (CHANGE_CONTRACT, FUNDING_CONTRACT, OP_IF, SECP256K1_N, CoinKind, Federation, PegoutEntry,
                           deposit_script_pubkey, pegin_tweak, pegout_key, tweaked_key, witness_script)
from l2d.core.pegs_tx import PegoutStatus
from l2d.core.plans import MAX_FEE_SHARE_PPM, RBF_SEQUENCE, PlanTx, anchor_output, anchor_policy

PROPRIETARY = 0xFC
_CONTRACT_KEY = bytes((PROPRIETARY, 3)) + b"l2d" + b"\x00"  # PSBT_IN_PROPRIETARY, prefix "l2d", subtype 0

StateGet = Callable[[bytes], Optional[bytes]]


class FederationError(Exception):
    """Base of the federation's Bitcoin-side errors."""


class PolicyViolation(FederationError):
    """A signer refuses: the PSBT breaks its policy (the message says which rule)."""


class QuorumError(FederationError):
    """Not enough distinct, valid signatures from registered keys (or a signature from an unknown key)."""


def _script(raw: bytes) -> Script:
    return Script.from_raw(raw.hex())


def build_psbt(fed: Federation, network: Network, ptx: PlanTx) -> bytes:
    """The PSBT of a plan's transaction, as every member builds it for itself."""
    seq = RBF_SEQUENCE.to_bytes(4, "little")
    inputs = [TxInput(c.btc_txid[::-1].hex(), c.vout, sequence=seq) for c in ptx.coins]
    outs = [TxOutput(o.nValue, _script(bytes(o.scriptPubKey))) for o in ptx.tx.vout]
    psbt = PSBT(Transaction(inputs, outs, has_segwit=True))
    for i, c in enumerate(ptx.coins):
        psbt.update_input(i, witness_utxo=TxOutput(c.amount_sat, _script(deposit_script_pubkey(fed, network.id,
                                                                                             c.contract))),
                          witness_script=_script(ptx.witness_scripts[i]), sighash_type=SIGHASH_ALL)
        psbt.inputs[i].unknown[_CONTRACT_KEY] = c.contract
    return bytes(psbt.to_bytes())


def add_signatures(fed: Federation, network: Network, psbt_bytes: bytes, signed: Mapping[int, Sequence[bytes]]
                   ) -> bytes:
    """The PSBT with the signatures of federation keys (key index -> one signature per input) as partial sigs."""
    psbt = PSBT.from_bytes(psbt_bytes)
    for index, sigs in signed.items():
        for psi, sig in zip(psbt.inputs, sigs):
            psi.partial_sigs[tweaked_key(fed.keys[index], network.id, psi.unknown[_CONTRACT_KEY])] = sig
    return bytes(psbt.to_bytes())


def signed_transaction(fed: Federation, network: Network, ptx: PlanTx, sigs: Mapping[int, Sequence[bytes]]
                       ) -> Optional[bytes]:
    """The raw signed transaction of a plan from its keys' signatures (l2d.core.plans.signatures_by_key), or None
    while fewer than m keys have signed. A plan spending an anchor output (a Taproot script path, which bitcoin-utils'
    PSBT cannot finalize) is assembled directly from the signatures, which consensus verified."""
    if len(sigs) < fed.threshold:
        return None
    if not any(c.kind == CoinKind.ANCHOR for c in ptx.coins):
        return finalize(add_signatures(fed, network, build_psbt(fed, network, ptx), sigs))[0]
    stacks = []
    for i, c in enumerate(ptx.coins):
        if c.kind == CoinKind.ANCHOR:  # multi_a: each key from the last to the first, its signature or empty
            policy = anchor_policy(fed)
            by_key = {fed.keys[j][1:]: s[i] for j, s in sigs.items()}
            used = [k for k in policy.keys if k in by_key][:policy.k]
            stacks.append([by_key[k] if k in used else b"" for k in reversed(policy.keys)]
                          + [policy.script, anchor_output(fed, c.contract).control_block])
        else:  # CHECKMULTISIG: the dummy, m signatures in the script's key order, the branch selector, the script
            ws = ptx.witness_scripts[i]
            m, keys, emergency = _script_keys(ws)
            by_key = {tweaked_key(fed.keys[j], network.id, c.contract): s[i] for j, s in sigs.items()}
            stacks.append([b""] + [by_key[k] for k in keys if k in by_key][:m] + ([b"\x01"] if emergency else [])
                          + [ws])
    tx = CTransaction(ptx.tx.vin, ptx.tx.vout, ptx.tx.nLockTime, ptx.tx.nVersion,
                      CTxWitness([CTxInWitness(CScriptWitness(st)) for st in stacks]))
    return bytes(tx.serialize())


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
    its own record file, so the interface is the one a remote signer would offer (PSBT in, signatures out)."""

    def __init__(self, secret: bytes, fed: Federation, network: Network, state_get: StateGet, record_path: Path,
                 max_fee_share_ppm: int = MAX_FEE_SHARE_PPM) -> None:
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
        if len(set(pegout_ids)) != len(pegout_ids):
            raise PolicyViolation("the peg-out list repeats a peg-out")
        anchor = self._get(anchor_key(anchor_height))
        if pegout_ids and (anchor is None or AnchorEntry.decode(anchor).status not in (AnchorStatus.CONFIRMED,
                                                                                        AnchorStatus.FINAL)):
            raise PolicyViolation(f"no CONFIRMED anchor at L2 height {anchor_height}")
        in_total = held = 0
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
            held += 0 if contract == FUNDING_CONTRACT else psi.witness_utxo.amount
        outs = [(o.script_pubkey.to_bytes(), o.amount) for o in psbt.tx.outputs]
        change_spk = deposit_script_pubkey(self.fed, net, CHANGE_CONTRACT)
        if not pegout_ids:  # a roll (l2d/core/plans.py): the coins go back to the federation, the books whole
            funding_spk = deposit_script_pubkey(self.fed, net, FUNDING_CONTRACT)
            scripts = [spk for spk, _ in outs]
            if any(spk not in (change_spk, funding_spk) for spk in scripts) or len(set(scripts)) != len(scripts):
                raise PolicyViolation("a roll pays an output that is neither the change nor the funding rest, or one "
                                      "twice")
            if sum(v for spk, v in outs if spk == change_spk) != held:
                raise PolicyViolation(f"a roll must return the held coins ({held} sat) whole to the change script")
            if sum(v for _, v in outs) > in_total:
                raise PolicyViolation("the outputs exceed the inputs")
            return
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

    def sign(self, psbt_bytes: bytes, plan_id: bytes, pegout_ids: Sequence[bytes], anchor_height: int
             ) -> tuple[bytes, ...]:
        """Check the policy (the PSBT must be plan plan_id's transaction), record the transaction, and return this
        key's signatures, one per input (DER + SIGHASH_ALL)."""
        psbt = PSBT.from_bytes(psbt_bytes)
        if bytes.fromhex(psbt.tx.get_txid())[::-1] != plan_id:
            raise PolicyViolation(f"the PSBT's transaction {psbt.tx.get_txid()} is not plan {plan_id[::-1].hex()}")
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
        return tuple(PrivateKey(tweaked_secret(self._secret, self.network.id, psi.unknown[_CONTRACT_KEY])).sign(
            _sighash(psbt, i), hasher=None) + bytes((SIGHASH_ALL,)) for i, psi in enumerate(psbt.inputs))


    def sign_anchor(self, ptx: PlanTx) -> tuple[bytes, ...]:
        """This key's signatures of an anchor plan's transaction, as this member derived it from its own state (no
        PSBT: nobody else's bytes are signed): BIP340 by the untweaked key over the BIP341 script-path digest for the
        previous anchor output, ECDSA by the key tweaked for the funding contract for a funding coin; each followed
        by 0x01 (SIGHASH_ALL). Refuses (PolicyViolation) a transaction spending any other coin: the books never pay
        anchors. The anchored root is the caller's check (bridge/service.py: it equals this member's block's)."""
        out = []
        for i, c in enumerate(ptx.coins):
            if c.kind == CoinKind.ANCHOR:
                out.append(PrivateKey(self._secret).sign_schnorr(ptx.sighash(i), os.urandom(32)) + b"\x01")
            elif c.kind == CoinKind.FUNDING:
                out.append(PrivateKey(tweaked_secret(self._secret, self.network.id, c.contract)).sign(
                    ptx.sighash(i), hasher=None) + bytes((SIGHASH_ALL,)))
            else:
                raise PolicyViolation(f"input {i} is a {c.kind.name} coin: anchors spend funding coins and the "
                                      f"previous anchor output only")
        return tuple(out)


def _script_keys(ws: bytes) -> tuple[int, list[bytes], bool]:
    """(m, the federation path's keys in script order, whether the script has the emergency path) of a deposit
    script (l2d.core.pegs.witness_script)."""
    emergency = ws[0] == OP_IF
    body = ws[1:] if emergency else ws
    keys = []
    pos = 1
    while body[pos] == 0x21:
        keys.append(body[pos + 1:pos + 34])
        pos += 34
    return body[0] - 0x50, keys, emergency


def finalize(psbt_bytes: bytes) -> tuple[bytes, bytes]:
    """Check the quorum on every input and return (raw signed transaction, txid internal order).

    Each partial signature must be by a key of the input's witness script and verify (SIGHASH_ALL); an input
    needs m distinct such keys. A signature by any other key is refused, not ignored. The witness: an empty item
    (OP_CHECKMULTISIG's extra pop), the first m signatures in the script's key order, the branch selector 0x01 when
    the script has an emergency path (OP_IF: the federation's branch), the witness script.
    """
    psbt = PSBT.from_bytes(psbt_bytes)
    for i, psi in enumerate(psbt.inputs):
        if psi.witness_script is None:
            raise QuorumError(f"input {i} has no witness script")
        ws = psi.witness_script.to_bytes()
        m, keys, emergency = _script_keys(ws)
        digest = _sighash(psbt, i)
        for pub, sig in psi.partial_sigs.items():
            if pub not in keys:
                raise QuorumError(f"input {i}: signature by {pub.hex()}, which is not a federation key of its script")
            try:
                ok = bool(sig) and sig[-1] == SIGHASH_ALL and PublicKey(pub).verify(sig[:-1], digest, hasher=None)
            except ValueError:  # not a DER signature
                ok = False
            if not ok:
                raise QuorumError(f"input {i}: the signature by {pub.hex()} does not verify")
        if len(psi.partial_sigs) < m:
            raise QuorumError(f"input {i}: {len(psi.partial_sigs)} distinct valid signatures, {m} required")
        sigs = [psi.partial_sigs[k] for k in keys if k in psi.partial_sigs][:m]
        psi.final_scriptsig = Script([])
        psi.final_scriptwitness = [b""] + sigs + ([b"\x01"] if emergency else []) + [ws]
    tx = psbt.extract_transaction()
    return bytes.fromhex(tx.to_hex()), bytes.fromhex(tx.get_txid())[::-1]
