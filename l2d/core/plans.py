"""Peg-out plans: the Bitcoin transactions the federation agrees on in L2 blocks, signed by each member itself.

A plan (PegoutPlan, posted by a member) names federation coins and PENDING peg-outs covered by a FINAL anchor,
and a fee rate. Everything else follows from the state, so every member derives the same Bitcoin transaction
(docs/bridge.md, "Plans"):
- inputs in the plan's order, nSequence 0xFFFFFFFD (replaceable), version 2, locktime 0;
- outputs: each peg-out's script with its amount less an equal share of the fee (the first `fee mod n`
  peg-outs pay one satoshi more), then the change, inputs - sum(peg-out amounts), to the deposit script of
  CHANGE_CONTRACT when it is not zero; so the federation's holdings fall by exactly what was burned;
- fee = feerate x vsize, where vsize counts m 72-byte signatures per input (an upper bound on DER + sighash), and
  the 1-byte branch selector when the federation has an emergency path;
- the plan's id is that transaction's txid (internal order).
Each federation key's signatures of it (PlanSignature, BIP143 SIGHASH_ALL, by the key tweaked for each input's
contract) are checked here and kept in the state, so any member holding m of them per input can finalize and
broadcast, and a restarted federation finds them again.

A replacement (RBF) names the plan it replaces, spends exactly its coins for exactly its peg-outs at a higher fee
rate: every version of a payout spends the same coins, so at most one of them can ever be mined. The first
PegoutUpdate COMPLETED with a version's txid completes the plan: every peg-out of it becomes COMPLETED with that
txid, its coins are spent by it, its change becomes a coin (CHANGE), and the other versions are REPLACED.
Federation coins for plans are claimed deposits and change; funding coins pay anchors and rolls, never peg-outs.

A roll (RollPlan, when the federation's scripts have an emergency path) moves coins nearing their timelock to fresh
outputs before the emergency keys could spend them: the held coins (deposits, change) go whole to one CHANGE
output, the funding coins among the inputs pay the fee and their rest, when not zero, goes to one FUNDING output
(after the CHANGE output). Which coins are due is each member's signing policy, judged in its own bitcoind;
consensus fixes the transaction. A roll is replaced by fee like a payout, and completed by PlanCompleted.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Callable, Iterable, Mapping, Optional, Sequence, cast

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, SignatureHash
from coincurve import PublicKey, PublicKeyXOnly

from .anchor import AnchorEntry, anchor_key, apply_anchor
from .anchor_format import NO_PREVIOUS, AnchorRecord, op_return_script
from .anchor_tx import AnchorStatus, AnchorUpdate
from .codec import Reader
from .errors import DecodeError, DuplicateDuty
from .hashing import H_PLAN_SIG
from .kofn import FederationOutput, KofN, link_leaf, script_path_sighash
from .pegs import (BRIDGE_TOTALS_KEY, CHANGE_CONTRACT, FUNDING_CONTRACT, BadPegoutTransition, BridgeRejected,
                   BridgeTotals, CoinKind, FedCoin, Federation, PegoutEntry, PegoutNotAnchored, UnknownPegout,
                   bridge_totals, coin_key, deposit_script_pubkey, federation, pegout_key, tweaked_key, witness_script)
from .pegs_tx import (OUTPOINT, AnchorMode, AnchorPlan, PegoutPlan, PegoutStatus, PegoutUpdate, PlanCompleted,
                      PlanSignature, RollPlan)
from .state import Namespace, Rules, StateView, bump_member_nonce, check_member, meta_key
from .tx import Transaction

SPENDABLE = (CoinKind.DEPOSIT, CoinKind.CHANGE)  # the coins peg-outs spend; FUNDING coins pay anchors
ROLLED = (CoinKind.DEPOSIT, CoinKind.CHANGE, CoinKind.FUNDING)  # the coins under the emergency path (rolls move them)
RBF_SEQUENCE = 0xFFFFFFFD
DUST_SAT = 546  # the largest standard dust threshold (P2PKH); payouts and change stay above it
MAX_FEE_SHARE_PPM = 100_000  # a peg-out pays at most 10% of its amount in Bitcoin fees (signers may demand less)
SIG_ITEM = 72  # witness bytes counted per signature: a DER signature of at most 71 bytes (low S) + sighash
SCHNORR_SIZE = 64
SCHNORR_ITEM = SCHNORR_SIZE + 1  # an anchor input's signature: BIP340 + the explicit SIGHASH_ALL byte
TAPROOT_SIGHASH = 0x01  # SIGHASH_ALL, explicit, so the signature ends in 0x01 as every PlanSignature item does
CONTROL_BLOCK = 65  # leaf version | internal key 32 | the commitment leaf's hash 32
P2TR_DUST_SAT = 330
SUPERSEDE_AFTER = 10  # L2 blocks after which an anchor plan nobody can broadcast may be superseded by a fresh one
ANCHOR_TIP_KEY = meta_key("anchor_tip")
_ANCHOR_PLAN_RECORD = struct.Struct(">B32s32s")
_ANCHOR_TIP = struct.Struct(">Q32s32sI32s")
ZERO = b"\0" * 32
_PLAN = struct.Struct(">B32s32sQQIQQ")  # status, replaces, replaced_by, l2 height, anchor height, rate, fee, change
_PAYOUT = struct.Struct(">32sQ")


class PlanStatus(IntEnum):
    PLANNED = 1  # the current version: members sign it
    REPLACED = 2  # a later version replaced it, or another version was completed
    COMPLETED = 3  # this version was mined and recorded (COMPLETED) on the L2


class UnknownPlan(BridgeRejected):
    reason = "unknown-plan"


class UnknownCoin(BridgeRejected):
    reason = "unknown-coin"


class CoinSpent(BridgeRejected):
    reason = "coin-spent"


class PegoutPlanned(BridgeRejected):
    reason = "pegout-planned"


class PlanUnderfunded(BridgeRejected):
    reason = "plan-underfunded"


class BadReplacement(BridgeRejected):
    reason = "bad-replacement"


class SuperfluousCoin(BridgeRejected):
    reason = "superfluous-coin"


class PlanClosed(BridgeRejected):
    reason = "plan-not-open"


class BadPlanSignature(BridgeRejected):
    reason = "bad-plan-signature"


class NothingToRoll(BridgeRejected):
    reason = "nothing-to-roll"


class AnchorOutOfOrder(BridgeRejected):
    reason = "anchor-out-of-order"


class AnchorInFlight(BridgeRejected):
    reason = "anchor-in-flight"


class BadAnchorLink(BridgeRejected):
    reason = "bad-anchor-link"


def plan_key(plan_id: bytes) -> bytes:
    return bytes((Namespace.PLAN,)) + plan_id


def plan_sig_key(plan_id: bytes, key_index: int) -> bytes:
    return bytes((Namespace.PLAN_SIG,)) + H_PLAN_SIG(plan_id + bytes((key_index,)))


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """State value under plan_key(id): status u8 | replaces 32 | replaced_by 32 | l2_height u64 (the block that
    recorded it) | anchor_height u64 | feerate u32 | fee u64 | change u64 | n_in u8 | n_in x (txid 32 | vout u32)
    | n u8 | n x (pegout id 32 | payout u64)."""

    status: PlanStatus
    replaces: bytes
    replaced_by: bytes
    l2_height: int
    anchor_height: int
    feerate_sat_vb: int
    fee_sat: int
    change_sat: int
    inputs: tuple[tuple[bytes, int], ...]
    pegouts: tuple[bytes, ...]
    payouts: tuple[int, ...]

    def encode(self) -> bytes:
        return (_PLAN.pack(self.status, self.replaces, self.replaced_by, self.l2_height, self.anchor_height,
                           self.feerate_sat_vb, self.fee_sat, self.change_sat)
                + bytes((len(self.inputs),)) + b"".join(OUTPOINT.pack(t, v) for t, v in self.inputs)
                + bytes((len(self.pegouts),))
                + b"".join(_PAYOUT.pack(p, v) for p, v in zip(self.pegouts, self.payouts)))

    @classmethod
    def decode(cls, b: bytes) -> "PlanEntry":
        r = Reader(b, "plan value")
        status, replaces, replaced_by, height, anchor, rate, fee, change = _PLAN.unpack(r.take(_PLAN.size))
        if status not in (1, 2, 3):
            raise DecodeError(f"plan status {status}")
        inputs = tuple(cast(tuple[bytes, int], OUTPOINT.unpack(r.take(OUTPOINT.size))) for _ in range(r.take(1)[0]))
        pays = [_PAYOUT.unpack(r.take(_PAYOUT.size)) for _ in range(r.take(1)[0])]
        r.end()
        return cls(PlanStatus(status), replaces, replaced_by, height, anchor, rate, fee, change, inputs,
                   tuple(p for p, _ in pays), tuple(v for _, v in pays))


def plan_entry(get: Callable[[bytes], Optional[bytes]], plan_id: bytes) -> Optional[PlanEntry]:
    raw = get(plan_key(plan_id))
    return None if raw is None else PlanEntry.decode(raw)


def pegout_paid_sat(get: Callable[[bytes], Optional[bytes]], pegout_id: bytes, entry: PegoutEntry) -> Optional[int]:
    """What the Bitcoin output of a COMPLETED peg-out paid: its payout in the plan that completed it (the plan id is
    the txid the entry records), i.e. its amount less its share of that transaction's fee (price()). None while it
    is not COMPLETED."""
    if entry.status != PegoutStatus.COMPLETED:
        return None
    plan = plan_entry(get, entry.btc_txid)
    if plan is None or pegout_id not in plan.pegouts:
        raise DecodeError(f"peg-out {pegout_id.hex()} is COMPLETED by {entry.btc_txid[::-1].hex()}, which is not a "
                          "recorded plan paying it")
    return plan.payouts[plan.pegouts.index(pegout_id)]


def held_coins(coins: Iterable[FedCoin], plans: Mapping[bytes, PlanEntry]) -> list[FedCoin]:
    """The coins that back peg-ins by the books: DEPOSIT and CHANGE coins not spent by a COMPLETED plan (a coin of an
    open plan is reserved, not spent). Their total is pegged_in - paid_out. KeyError if a coin names a plan that
    plans lacks."""
    return [c for c in coins if c.kind in SPENDABLE
            and (c.spent_by == ZERO or plans[c.spent_by].status != PlanStatus.COMPLETED)]


def signatures_by_key(get: Callable[[bytes], Optional[bytes]], fed: Federation, plan_id: bytes
                      ) -> dict[int, tuple[bytes, ...]]:
    """Every federation key's signatures of the plan that the state holds: key index -> one per input."""
    return {i: s for i in range(len(fed.keys)) if (s := plan_signatures(get, plan_id, i)) is not None}


def plan_signatures(get: Callable[[bytes], Optional[bytes]], plan_id: bytes, key_index: int
                    ) -> Optional[tuple[bytes, ...]]:
    """The signatures (one per input) the federation key at key_index gave the plan, if the state has them."""
    raw = get(plan_sig_key(plan_id, key_index))
    return None if raw is None else PlanSignature.decode(plan_id + bytes((key_index,)) + raw).signatures


# -- the transaction a plan stands for -------------------------------------------------------------------------
def _covers(total: int, need_sat: int) -> bool:
    return total == need_sat or total - need_sat >= DUST_SAT


def superfluous(coins: Sequence[FedCoin], need_sat: int) -> Optional[FedCoin]:
    """The first coin (in the given order) without which the others still cover need, if any."""
    total = sum(c.amount_sat for c in coins)
    return next((c for c in coins if _covers(total - c.amount_sat, need_sat)), None)


def select_coins(coins: Sequence[FedCoin], need_sat: int) -> list[FedCoin]:
    """The deterministic coin choice for a plan: largest first (ties by txid, vout) until the total covers need with
    a change of 0 or at least DUST_SAT, then, smallest first, every coin the rest covers need without is dropped
    again (consensus refuses a plan with a superfluous coin). Returns what it took (which may fall short: the plan
    is then refused)."""
    chosen: list[FedCoin] = []
    total = 0
    for c in sorted(coins, key=lambda c: (-c.amount_sat, c.btc_txid, c.vout)):
        if _covers(total, need_sat):
            break
        chosen.append(c)
        total += c.amount_sat
    if not _covers(total, need_sat):
        return chosen
    while (extra := superfluous(chosen[::-1], need_sat)) is not None:
        chosen.remove(extra)
    return chosen


def _varint_size(n: int) -> int:
    return 1 if n < 0xFD else 3


def _unsigned_tx(coins: Sequence[FedCoin], outputs: Sequence[tuple[bytes, int]]) -> CTransaction:
    vin = [CTxIn(COutPoint(c.btc_txid, c.vout), CScript(), RBF_SEQUENCE) for c in coins]
    vout = [CTxOut(v, CScript(spk)) for spk, v in outputs]
    return CTransaction(vin, vout, 0, 2)


def vsize_bound(fed: Federation, network_id: int, coins: Sequence[FedCoin], outputs: Sequence[tuple[bytes, int]]
                ) -> int:
    """The transaction's vsize once signed with m signatures of SIG_ITEM bytes per input (an upper bound)."""
    base = len(_unsigned_tx(coins, outputs).serialize())
    witness = 2  # segwit marker and flag
    branch = 1 if fed.emergency_keys else 0  # the OP_IF selector (0x01) of the federation's path
    for c in coins:
        if c.kind == CoinKind.ANCHOR:  # the k-of-n leaf: k 65-byte signatures, n - k empty items, script, control
            leaf = anchor_policy(fed).script
            witness += (_varint_size(len(fed.keys) + 2) + fed.threshold * (1 + SCHNORR_ITEM)
                        + (len(fed.keys) - fed.threshold) + _varint_size(len(leaf)) + len(leaf) + 1 + CONTROL_BLOCK)
            continue
        ws = len(witness_script(fed, network_id, c.contract))
        witness += (_varint_size(fed.threshold + 2 + branch) + 1 + fed.threshold * (1 + SIG_ITEM) + 2 * branch
                    + _varint_size(ws) + ws)
    return (4 * base + witness + 3) // 4


# -- anchor plans ------------------------------------------------------------------------------------------------------
def anchor_policy(fed: Federation) -> KofN:
    """The federation's k-of-n over its keys' x coordinates (the untweaked keys: every deposit script uses tweaked
    ones), k = the federation's threshold."""
    return KofN.of(fed.threshold, [k[1:] for k in fed.keys])


def anchor_output(fed: Federation, link: bytes) -> FederationOutput:
    """The Taproot anchor output committing to the record with this link, spendable by m of the federation's keys."""
    return FederationOutput(anchor_policy(fed), link_leaf(link))


def coin_script_pubkey(fed: Federation, network_id: int, coin: FedCoin) -> bytes:
    """The scriptPubKey holding a federation coin: the anchor output of an ANCHOR coin, else the deposit script."""
    if coin.kind == CoinKind.ANCHOR:
        return anchor_output(fed, coin.contract).script_pubkey
    return deposit_script_pubkey(fed, network_id, coin.contract)


def anchor_plan_key(l2_height: int) -> bytes:
    return bytes((Namespace.ANCHOR_PLAN,)) + l2_height.to_bytes(32, "big")


@dataclass(frozen=True, slots=True)
class AnchorPlanRecord:
    """State value under anchor_plan_key(h), written by the first AnchorPlan for h (every version shares it):
    mode u8 | state_root 32 | prev_link 32."""

    mode: AnchorMode
    state_root: bytes
    prev_link: bytes

    def encode(self) -> bytes:
        return _ANCHOR_PLAN_RECORD.pack(self.mode, self.state_root, self.prev_link)

    @classmethod
    def decode(cls, b: bytes) -> "AnchorPlanRecord":
        if len(b) != _ANCHOR_PLAN_RECORD.size:
            raise DecodeError(f"anchor plan record is {len(b)} bytes, expected {_ANCHOR_PLAN_RECORD.size}")
        mode, root, prev = _ANCHOR_PLAN_RECORD.unpack(b)
        if mode not in (1, 2):
            raise DecodeError(f"anchor plan mode {mode}")
        return cls(AnchorMode(mode), root, prev)

    def record(self, network_id: int, l2_height: int) -> AnchorRecord:
        return AnchorRecord(network_id, l2_height, self.state_root, self.prev_link)


@dataclass(frozen=True, slots=True)
class AnchorTip:
    """State value under ANCHOR_TIP_KEY: where the federation's anchor chain stands. l2_height u64 and link 32 of
    the last completed anchor (0 and NO_PREVIOUS before the first) | coin txid 32 | coin vout u32 (its Taproot
    output, an ANCHOR coin the next anchor must spend; zero txid for none) | open 32 (the current version of the
    anchor plan in flight; zero for none)."""

    l2_height: int = 0
    link: bytes = NO_PREVIOUS
    coin_txid: bytes = ZERO
    coin_vout: int = 0
    open: bytes = ZERO

    def encode(self) -> bytes:
        return _ANCHOR_TIP.pack(self.l2_height, self.link, self.coin_txid, self.coin_vout, self.open)

    @classmethod
    def decode(cls, b: bytes) -> "AnchorTip":
        if len(b) != _ANCHOR_TIP.size:
            raise DecodeError(f"anchor tip is {len(b)} bytes, expected {_ANCHOR_TIP.size}")
        return cls(*_ANCHOR_TIP.unpack(b))


def anchor_tip(get: Callable[[bytes], Optional[bytes]]) -> AnchorTip:
    raw = get(ANCHOR_TIP_KEY)
    return AnchorTip() if raw is None else AnchorTip.decode(raw)


def _anchor_outputs(fed: Federation, network_id: int, rec: AnchorPlanRecord, l2_height: int, value: int
                    ) -> tuple[tuple[bytes, int], ...]:
    """Taproot: the anchor output holding value; OP_RETURN: the record, then value (when not zero) to FUNDING."""
    record = rec.record(network_id, l2_height)
    if rec.mode == AnchorMode.TAPROOT:
        return ((anchor_output(fed, record.link).script_pubkey, value),)
    rest = ((deposit_script_pubkey(fed, network_id, FUNDING_CONTRACT), value),) if value else ()
    return ((op_return_script(record), 0),) + rest


def price_anchor(fed: Federation, network_id: int, coins: Sequence[FedCoin], rec: AnchorPlanRecord, l2_height: int,
                 feerate_sat_vb: int) -> Priced:
    """Fee and outputs of an anchor plan over these coins: fee = rate x the vsize bound (with every output), the rest
    to the anchor output (Taproot: at least P2TR_DUST_SAT) or back to FUNDING (OP_RETURN: 0 or at least DUST_SAT);
    PlanUnderfunded otherwise."""
    total = sum(c.amount_sat for c in coins)
    fee = feerate_sat_vb * vsize_bound(fed, network_id, coins, _anchor_outputs(fed, network_id, rec, l2_height, total))
    value = total - fee
    low = P2TR_DUST_SAT if rec.mode == AnchorMode.TAPROOT else DUST_SAT
    if value < 0 or (value < low and (rec.mode == AnchorMode.TAPROOT or value)):
        raise PlanUnderfunded(f"coins of {total} sat do not pay a fee of {fee} sat ({feerate_sat_vb} sat/vB) with "
                              f"{'an anchor output' if rec.mode == AnchorMode.TAPROOT else 'a rest'} of "
                              f"{'' if rec.mode == AnchorMode.TAPROOT else '0 or '}at least {low} sat")
    return Priced((), 0, fee, _anchor_outputs(fed, network_id, rec, l2_height, value))


@dataclass(frozen=True, slots=True)
class Priced:
    """A plan's arithmetic: payouts per peg-out, change, fee, and the transaction's outputs."""

    payouts: tuple[int, ...]
    change_sat: int
    fee_sat: int
    outputs: tuple[tuple[bytes, int], ...]


def price(fed: Federation, network_id: int, coins: Sequence[FedCoin], pegouts: Sequence[PegoutEntry],
          feerate_sat_vb: int) -> Priced:
    """Payouts, change and fee of a plan over these coins and peg-outs (PlanUnderfunded when they do not fit)."""
    need = sum(e.amount_sat for e in pegouts)
    total = sum(c.amount_sat for c in coins)
    change = total - need
    if change < 0 or 0 < change < DUST_SAT:
        raise PlanUnderfunded(f"coins of {total} sat do not cover peg-outs of {need} sat with a change of 0 or at "
                              f"least {DUST_SAT} sat")
    tail = ((deposit_script_pubkey(fed, network_id, CHANGE_CONTRACT), change),) if change else ()
    sized = [(e.script_pubkey, e.amount_sat) for e in pegouts] + list(tail)
    fee = feerate_sat_vb * vsize_bound(fed, network_id, coins, sized)
    n = len(pegouts)
    payouts = tuple(e.amount_sat - fee // n - (1 if i < fee % n else 0) for i, e in enumerate(pegouts))
    if min(payouts) < DUST_SAT:
        raise PlanUnderfunded(f"a fee of {fee} sat ({feerate_sat_vb} sat/vB) leaves a payout below {DUST_SAT} sat")
    for e, v in zip(pegouts, payouts):
        if (e.amount_sat - v) * 1_000_000 > e.amount_sat * MAX_FEE_SHARE_PPM:
            raise PlanUnderfunded(f"a fee share of {e.amount_sat - v} sat is more than {MAX_FEE_SHARE_PPM // 10_000}% "
                                  f"of a peg-out of {e.amount_sat} sat ({feerate_sat_vb} sat/vB)")
    outputs = tuple((e.script_pubkey, v) for e, v in zip(pegouts, payouts)) + tail
    return Priced(payouts, change, fee, outputs)


def price_roll(fed: Federation, network_id: int, coins: Sequence[FedCoin], feerate_sat_vb: int) -> Priced:
    """Change, fee and outputs of a roll of these coins: the held coins' total to CHANGE, the funding coins' total
    less the fee (sized with the funding output) to FUNDING when not zero (PlanUnderfunded when the funding coins
    do not cover the fee with a rest of 0 or at least DUST_SAT, or nothing would be left)."""
    held = sum(c.amount_sat for c in coins if c.kind in SPENDABLE)
    funding = sum(c.amount_sat for c in coins if c.kind == CoinKind.FUNDING)
    change = ((deposit_script_pubkey(fed, network_id, CHANGE_CONTRACT), held),) if held else ()
    funding_spk = deposit_script_pubkey(fed, network_id, FUNDING_CONTRACT)
    fee = feerate_sat_vb * vsize_bound(fed, network_id, coins, change + ((funding_spk, funding),))
    rest = funding - fee
    if rest < 0 or 0 < rest < DUST_SAT or not (held or rest):
        raise PlanUnderfunded(f"funding coins of {funding} sat do not pay a fee of {fee} sat ({feerate_sat_vb} "
                              f"sat/vB) with a rest of 0 or at least {DUST_SAT} sat (rolling {held} sat)")
    return Priced((), held, fee, change + (((funding_spk, rest),) if rest else ()))


def price_recorded(view: StateView, fed: Federation, network_id: int, entry: PlanEntry, feerate_sat_vb: int
                   ) -> Priced:
    """price() (price_roll() for a roll, price_anchor() for an anchor) of a recorded plan's coins and peg-outs at
    another fee rate (what a replacement would pay)."""
    coins = _coins(view, entry.inputs)
    if is_anchor_plan(entry):
        rec = AnchorPlanRecord.decode(cast(bytes, view.get(anchor_plan_key(entry.anchor_height))))
        return price_anchor(fed, network_id, coins, rec, entry.anchor_height, feerate_sat_vb)
    if not entry.pegouts:
        return price_roll(fed, network_id, coins, feerate_sat_vb)
    return price(fed, network_id, coins, _pegouts(view, entry.pegouts), feerate_sat_vb)


def _coins(view: StateView, inputs: Sequence[tuple[bytes, int]]) -> list[FedCoin]:
    out = []
    for txid, vout in inputs:
        raw = view.get(coin_key(txid, vout))
        if raw is None:
            raise UnknownCoin(f"{txid[::-1].hex()}:{vout} is not a federation coin")
        out.append(FedCoin.decode(raw))
    return out


def _pegouts(view: StateView, ids: Sequence[bytes]) -> list[PegoutEntry]:
    out = []
    for pid in ids:
        raw = view.get(pegout_key(pid))
        if raw is None:
            raise UnknownPegout(f"no peg-out {pid.hex()}")
        out.append(PegoutEntry.decode(raw))
    return out


@dataclass(frozen=True, slots=True)
class PlanTx:
    """The Bitcoin transaction of a plan, with what signing each input needs: the witness script of a deposit-script
    coin (BIP143, SIGHASH_ALL), the k-of-n leaf script of an ANCHOR coin (BIP341 script path, SIGHASH_ALL), and
    every input's scriptPubKey (BIP341 commits to all of them)."""

    tx: CTransaction
    coins: tuple[FedCoin, ...]
    witness_scripts: tuple[bytes, ...]
    script_pubkeys: tuple[bytes, ...] = ()

    @property
    def txid(self) -> bytes:
        return cast(bytes, self.tx.GetTxid())

    def sighash(self, i: int) -> bytes:
        if self.coins[i].kind == CoinKind.ANCHOR:
            return script_path_sighash(self.tx.serialize(), i, [(spk, c.amount_sat) for spk, c in
                                                               zip(self.script_pubkeys, self.coins)],
                                       self.witness_scripts[i], TAPROOT_SIGHASH)
        return cast(bytes, SignatureHash(CScript(self.witness_scripts[i]), self.tx, i, SIGHASH_ALL,
                                         amount=self.coins[i].amount_sat, sigversion=SIGVERSION_WITNESS_V0))


def _rest(coins: Sequence[FedCoin], entry: PlanEntry) -> int:
    """What a plan returns to the funding script: inputs - payouts - change - fee (a roll's funding rest; zero for
    a peg-out plan, whose payouts carry the fee)."""
    return sum(c.amount_sat for c in coins) - sum(entry.payouts) - entry.change_sat - entry.fee_sat


def is_anchor_plan(entry: PlanEntry) -> bool:
    """An anchor plan names the anchored height and pays no peg-out (a roll names height 0)."""
    return not entry.pegouts and entry.anchor_height != 0


def _plan_outputs(view: StateView, fed: Federation, network_id: int, entry: PlanEntry, coins: Sequence[FedCoin]
                  ) -> list[tuple[bytes, int]]:
    rest = _rest(coins, entry)
    if is_anchor_plan(entry):
        rec = AnchorPlanRecord.decode(cast(bytes, view.get(anchor_plan_key(entry.anchor_height))))
        return list(_anchor_outputs(fed, network_id, rec, entry.anchor_height, rest))
    change = ((deposit_script_pubkey(fed, network_id, CHANGE_CONTRACT), entry.change_sat),) if entry.change_sat else ()
    funding = ((deposit_script_pubkey(fed, network_id, FUNDING_CONTRACT), rest),) if rest else ()
    outputs = [(e.script_pubkey, v) for e, v in zip(_pegouts(view, entry.pegouts), entry.payouts)] + list(change)
    return outputs + list(funding)


def plan_tx(view: StateView, fed: Federation, network_id: int, entry: PlanEntry) -> PlanTx:
    """The transaction a recorded plan stands for, rebuilt from the state."""
    coins = _coins(view, entry.inputs)
    outputs = _plan_outputs(view, fed, network_id, entry, coins)
    scripts = tuple(anchor_policy(fed).script if c.kind == CoinKind.ANCHOR else witness_script(fed, network_id,
                                                                                              c.contract)
                    for c in coins)
    return PlanTx(_unsigned_tx(coins, outputs), tuple(coins), scripts,
                  tuple(coin_script_pubkey(fed, network_id, c) for c in coins))


def _final_anchor(view: StateView, height: int) -> None:
    raw = view.get(anchor_key(height))
    if raw is None or AnchorEntry.decode(raw).status != AnchorStatus.FINAL:
        raise PegoutNotAnchored(f"no FINAL anchor at L2 height {height}")


# -- state transitions ----------------------------------------------------------------------------------------------
def _old_version(view: StateView, replaces: bytes) -> Optional[PlanEntry]:
    """The plan a new one replaces (None for a fresh plan); UnknownPlan if there is none."""
    if replaces == ZERO:
        return None
    old = plan_entry(view.get, replaces)
    if old is None:
        raise UnknownPlan(f"no plan {replaces[::-1].hex()} to replace")
    return old


def _check_replacement(view: StateView, fed: Federation, replaces: bytes, old: PlanEntry,
                       inputs: tuple[tuple[bytes, int], ...], pegouts: tuple[bytes, ...], feerate_sat_vb: int) -> None:
    if old.status != PlanStatus.PLANNED:
        raise BadReplacement(f"plan {replaces[::-1].hex()} is {old.status.name}, not the current version")
    if old.inputs != inputs or old.pegouts != pegouts:
        raise BadReplacement("a replacement spends exactly the coins of the plan it replaces, for exactly its "
                             "peg-outs")
    if feerate_sat_vb <= old.feerate_sat_vb:
        raise BadReplacement(f"a replacement raises the fee rate above {old.feerate_sat_vb} sat/vB")
    signed = len(signatures_by_key(view.get, fed, replaces))
    if signed < fed.threshold:
        raise BadReplacement(f"plan {replaces[::-1].hex()} has {signed} of the {fed.threshold} signatures: only "
                             f"a version that can be broadcast is replaced")


def _check_unspent(coins: Sequence[FedCoin], spender: bytes) -> None:
    for c in coins:
        if c.spent_by != spender:
            raise CoinSpent(f"{c.btc_txid[::-1].hex()}:{c.vout} is spent by plan {c.spent_by[::-1].hex()}")


def _record_plan(view: StateView, plan_id: bytes, entry: PlanEntry, old: Optional[PlanEntry],
                 coins: Sequence[FedCoin]) -> None:
    """Store a new plan (version), mark the version it replaces and reserve its coins."""
    view.put(plan_key(plan_id), entry.encode())
    if old is not None:
        view.put(plan_key(entry.replaces), replace(old, status=PlanStatus.REPLACED, replaced_by=plan_id).encode())
    for c in coins:
        view.put(coin_key(c.btc_txid, c.vout), replace(c, spent_by=plan_id).encode())


def apply_pegout_plan(view: StateView, tx: Transaction, rules: Rules) -> None:
    check_member(view, tx)
    fed = federation(view)
    p = cast(PegoutPlan, tx.payload)
    old = _old_version(view, p.replaces)
    coins = _coins(view, p.inputs)
    entries = _pegouts(view, p.pegouts)
    priced = price(fed, rules.network.id, coins, entries, p.feerate_sat_vb)
    if old is None and (extra := superfluous(coins, sum(e.amount_sat for e in entries))) is not None:
        raise SuperfluousCoin(f"{extra.btc_txid[::-1].hex()}:{extra.vout} is not needed: the other coins cover the "
                              f"peg-outs (peg-outs do not pay for consolidating the federation's coins)")
    plan_id = cast(bytes, _unsigned_tx(coins, priced.outputs).GetTxid())
    if view.get(plan_key(plan_id)) is not None:
        raise DuplicateDuty(f"plan {plan_id[::-1].hex()} is recorded already")
    if old is not None:
        _check_replacement(view, fed, p.replaces, old, p.inputs, p.pegouts, p.feerate_sat_vb)
    _final_anchor(view, p.anchor_height)
    for pid, e in zip(p.pegouts, entries):
        if old is None and (e.status != PegoutStatus.PENDING or e.btc_txid != ZERO):
            raise PegoutPlanned(f"peg-out {pid.hex()} is {e.status.name} with {e.btc_txid[::-1].hex()}")
        if e.l2_height > p.anchor_height:
            raise PegoutNotAnchored(f"peg-out {pid.hex()} (L2 height {e.l2_height}) is not covered by the anchor "
                                    f"at {p.anchor_height}")
    for c in coins:
        if c.kind not in SPENDABLE:
            raise UnknownCoin(f"{c.btc_txid[::-1].hex()}:{c.vout} is a {c.kind.name} coin; peg-outs spend deposits "
                              f"and change")
    _check_unspent(coins, p.replaces)
    bump_member_nonce(view, tx)
    _record_plan(view, plan_id, PlanEntry(PlanStatus.PLANNED, p.replaces, ZERO, view.height, p.anchor_height,
                                          p.feerate_sat_vb, priced.fee_sat, priced.change_sat, p.inputs, p.pegouts,
                                          priced.payouts), old, coins)
    for pid, e in zip(p.pegouts, entries):
        if e.status == PegoutStatus.PENDING:
            view.put(pegout_key(pid), replace(e, btc_txid=plan_id).encode())


def apply_roll_plan(view: StateView, tx: Transaction, rules: Rules) -> None:
    check_member(view, tx)
    fed = federation(view)
    p = cast(RollPlan, tx.payload)
    if not fed.emergency_keys:
        raise NothingToRoll("the federation's coins have no emergency timelock: there is nothing to roll")
    old = _old_version(view, p.replaces)
    if old is not None and (old.pegouts or old.anchor_height):
        raise BadReplacement(f"plan {p.replaces[::-1].hex()} is not a roll; a roll replaces only a roll")
    coins = _coins(view, p.inputs)
    for c in coins:
        if c.kind not in ROLLED:
            raise UnknownCoin(f"{c.btc_txid[::-1].hex()}:{c.vout} is a {c.kind.name} coin; rolls move deposits, "
                              f"change and funding coins")
    priced = price_roll(fed, rules.network.id, coins, p.feerate_sat_vb)
    plan_id = cast(bytes, _unsigned_tx(coins, priced.outputs).GetTxid())
    if view.get(plan_key(plan_id)) is not None:
        raise DuplicateDuty(f"plan {plan_id[::-1].hex()} is recorded already")
    if old is not None:
        _check_replacement(view, fed, p.replaces, old, p.inputs, (), p.feerate_sat_vb)
    _check_unspent(coins, p.replaces)
    bump_member_nonce(view, tx)
    _record_plan(view, plan_id, PlanEntry(PlanStatus.PLANNED, p.replaces, ZERO, view.height, 0, p.feerate_sat_vb,
                                          priced.fee_sat, priced.change_sat, p.inputs, (), ()), old, coins)


def apply_plan_signature(view: StateView, tx: Transaction, rules: Rules) -> None:
    check_member(view, tx)
    fed = federation(view)
    p = cast(PlanSignature, tx.payload)
    entry = plan_entry(view.get, p.plan_id)
    if entry is None:
        raise UnknownPlan(f"no plan {p.plan_id[::-1].hex()}")
    if entry.status != PlanStatus.PLANNED:
        raise PlanClosed(f"plan {p.plan_id[::-1].hex()} is {entry.status.name}; only the current version is signed")
    if p.key_index >= len(fed.keys):
        raise BadPlanSignature(f"key index {p.key_index}: the federation has {len(fed.keys)} keys")
    if view.get(plan_sig_key(p.plan_id, p.key_index)) is not None:
        raise DuplicateDuty(f"key {p.key_index} has signed plan {p.plan_id[::-1].hex()} already")
    if len(p.signatures) != len(entry.inputs):
        raise BadPlanSignature(f"{len(p.signatures)} signatures for a plan of {len(entry.inputs)} inputs")
    ptx = plan_tx(view, fed, rules.network.id, entry)
    key = fed.keys[p.key_index]
    for i, sig in enumerate(p.signatures):
        try:
            if ptx.coins[i].kind == CoinKind.ANCHOR:  # BIP340 over the BIP341 script-path sighash, SIGHASH_ALL
                ok = len(sig) == 1 + SCHNORR_SIZE and PublicKeyXOnly(key[1:]).verify(sig[:-1], ptx.sighash(i))
            else:
                pub = PublicKey(tweaked_key(key, rules.network.id, ptx.coins[i].contract))
                ok = pub.verify(sig[:-1], ptx.sighash(i), hasher=None)
        except (ValueError, TypeError):  # not a DER signature
            ok = False
        if not ok:
            raise BadPlanSignature(f"the signature of input {i} by key {p.key_index} does not verify")
    bump_member_nonce(view, tx)
    view.put(plan_sig_key(p.plan_id, p.key_index), p.encode()[33:])


def _complete(view: StateView, plan_id: bytes, plan: PlanEntry, network_id: int) -> None:
    """Version plan_id was mined: its peg-outs are paid, its coins spent, its change (and a roll's funding rest)
    a coin, the other versions REPLACED."""
    view.put(plan_key(plan_id), replace(plan, status=PlanStatus.COMPLETED).encode())
    later = plan.replaced_by  # earlier versions are REPLACED already; the newest may still be PLANNED
    while later != ZERO:
        e = cast(PlanEntry, plan_entry(view.get, later))
        if e.status == PlanStatus.PLANNED:
            view.put(plan_key(later), replace(e, status=PlanStatus.REPLACED).encode())
        later = e.replaced_by
    for txid, vout in plan.inputs:
        c = FedCoin.decode(cast(bytes, view.get(coin_key(txid, vout))))
        view.put(coin_key(txid, vout), replace(c, spent_by=plan_id).encode())
    vout = len(plan.pegouts)
    if plan.change_sat:
        view.put(coin_key(plan_id, vout), FedCoin(plan_id, vout, plan.change_sat, CoinKind.CHANGE,
                                                  CHANGE_CONTRACT).encode())
        vout += 1
    rest = _rest(_coins(view, plan.inputs), plan)
    if is_anchor_plan(plan):  # Taproot: the anchor output (vout 0) is the next anchor's coin; OP_RETURN: vout 1
        rec = AnchorPlanRecord.decode(cast(bytes, view.get(anchor_plan_key(plan.anchor_height))))
        link = rec.record(network_id, plan.anchor_height).link
        taproot = rec.mode == AnchorMode.TAPROOT
        if taproot:
            view.put(coin_key(plan_id, 0), FedCoin(plan_id, 0, rest, CoinKind.ANCHOR, link).encode())
        elif rest:
            view.put(coin_key(plan_id, 1), FedCoin(plan_id, 1, rest, CoinKind.FUNDING, FUNDING_CONTRACT).encode())
        view.put(ANCHOR_TIP_KEY, AnchorTip(plan.anchor_height, link, plan_id if taproot else ZERO, 0, ZERO).encode())
    elif rest:
        view.put(coin_key(plan_id, vout), FedCoin(plan_id, vout, rest, CoinKind.FUNDING, FUNDING_CONTRACT).encode())
    paid = 0
    for pid in plan.pegouts:
        pe = PegoutEntry.decode(cast(bytes, view.get(pegout_key(pid))))
        view.put(pegout_key(pid), replace(pe, status=PegoutStatus.COMPLETED, btc_txid=plan_id).encode())
        paid += pe.amount_sat
    t = bridge_totals(view)
    view.put(BRIDGE_TOTALS_KEY, BridgeTotals(t.pegged_in_sat, t.pending_out_sat - paid,
                                             t.paid_out_sat + paid).encode())


def apply_pegout_update(view: StateView, tx: Transaction, rules: Rules) -> None:
    check_member(view, tx)
    federation(view)
    p = cast(PegoutUpdate, tx.payload)
    raw = view.get(pegout_key(p.pegout_id))
    if raw is None:
        raise UnknownPegout(f"no peg-out {p.pegout_id.hex()}")
    entry = PegoutEntry.decode(raw)
    if entry.status == p.status and entry.btc_txid == p.btc_txid:
        raise DuplicateDuty(f"peg-out {p.pegout_id.hex()} is {entry.status.name} with {p.btc_txid[::-1].hex()} "
                            f"already")
    plan = plan_entry(view.get, p.btc_txid)
    if plan is None or p.pegout_id not in plan.pegouts:
        raise UnknownPlan(f"no plan {p.btc_txid[::-1].hex()} pays peg-out {p.pegout_id.hex()}")
    anchor = view.get(anchor_key(p.anchor_height))
    if (anchor is None or p.anchor_height < entry.l2_height
            or AnchorEntry.decode(anchor).status not in (AnchorStatus.CONFIRMED, AnchorStatus.FINAL)):
        raise PegoutNotAnchored(f"no CONFIRMED anchor at L2 height {p.anchor_height} covering the burn at "
                                f"height {entry.l2_height}")
    if p.status == PegoutStatus.BROADCAST:
        ok = entry.status == PegoutStatus.PENDING or (entry.status == PegoutStatus.BROADCAST
                                                      and entry.btc_txid != p.btc_txid)
    else:
        ok = entry.status == PegoutStatus.BROADCAST and entry.btc_txid == p.btc_txid
    if not ok:
        raise BadPegoutTransition(f"peg-out {p.pegout_id.hex()} is {entry.status.name} "
                                  f"(txid {entry.btc_txid[::-1].hex()}); cannot record {p.status.name} "
                                  f"with {p.btc_txid[::-1].hex()}")
    bump_member_nonce(view, tx)
    if p.status == PegoutStatus.COMPLETED:
        _complete(view, p.btc_txid, plan, rules.network.id)
    else:
        view.put(pegout_key(p.pegout_id), replace(entry, status=p.status, btc_txid=p.btc_txid).encode())


def plan_versions(get: Callable[[bytes], Optional[bytes]], plan_id: bytes) -> list[tuple[bytes, PlanEntry]]:
    """Every version of the payout or roll plan_id belongs to, newest first."""
    newest = plan_id
    while (later := cast(PlanEntry, plan_entry(get, newest)).replaced_by) != ZERO:
        newest = later
    out = [(newest, cast(PlanEntry, plan_entry(get, newest)))]
    while out[-1][1].replaces != ZERO:
        out.append((out[-1][1].replaces, cast(PlanEntry, plan_entry(get, out[-1][1].replaces))))
    return out


def apply_plan_completed(view: StateView, tx: Transaction, rules: Rules) -> None:
    """PlanCompleted: a version of a roll was mined deep enough (by the recording member's bitcoind)."""
    check_member(view, tx)
    federation(view)
    p = cast(PlanCompleted, tx.payload)
    plan = plan_entry(view.get, p.plan_id)
    if plan is None:
        raise UnknownPlan(f"no plan {p.plan_id[::-1].hex()}")
    if plan.pegouts:
        raise UnknownPlan(f"plan {p.plan_id[::-1].hex()} pays peg-outs: it completes through PegoutUpdate COMPLETED")
    if is_anchor_plan(plan):
        raise UnknownPlan(f"plan {p.plan_id[::-1].hex()} is an anchor: it completes through AnchorUpdate FINAL")
    done = [v for v, e in plan_versions(view.get, p.plan_id) if e.status == PlanStatus.COMPLETED]
    if done == [p.plan_id]:
        raise DuplicateDuty(f"plan {p.plan_id[::-1].hex()} is COMPLETED already")
    if done:
        raise PlanClosed(f"version {done[0][::-1].hex()} of this roll is COMPLETED; {p.plan_id[::-1].hex()} cannot "
                         f"be")
    bump_member_nonce(view, tx)
    _complete(view, p.plan_id, plan, rules.network.id)


def apply_anchor_plan(view: StateView, tx: Transaction, rules: Rules) -> None:
    """AnchorPlan: the transaction anchoring an L2 height, from funding coins and the previous anchor output.

    A version replaces another (`replaces`) spending exactly its coins, so at most one version is ever mined: by fee
    (the same record, a higher rate) once a version of the chain has m signatures, or, while none has (nothing of
    the chain can be broadcast), SUPERSEDE_AFTER blocks after the last version, with the same record or for a higher
    height (a plan the members refuse to sign, a wrong root say, cannot stop anchoring)."""
    check_member(view, tx)
    fed = federation(view)
    p = cast(AnchorPlan, tx.payload)
    net = rules.network.id
    old = _old_version(view, p.replaces)
    rec = AnchorPlanRecord(p.mode, p.state_root, p.prev_link)
    stored = view.get(anchor_plan_key(p.l2_height))
    tip = anchor_tip(view.get)
    if old is not None:
        if not is_anchor_plan(old) or old.status != PlanStatus.PLANNED:
            raise BadReplacement(f"plan {p.replaces[::-1].hex()} is not the current version of an anchor plan")
        if old.inputs != p.inputs:
            raise BadReplacement("a new version of an anchor plan spends exactly the coins of the one it replaces")
        same = p.l2_height == old.anchor_height and stored == rec.encode()
        chain = plan_versions(view.get, p.replaces)
        if any(len(signatures_by_key(view.get, fed, v)) >= fed.threshold for v, _ in chain):
            if not same or p.feerate_sat_vb <= old.feerate_sat_vb:
                raise BadReplacement(f"a version of this anchor has {fed.threshold} signatures and may be mined: it is "
                                     f"replaced only by fee (the same record, a rate above {old.feerate_sat_vb})")
        elif view.height - old.l2_height < SUPERSEDE_AFTER or not (same or p.l2_height > old.anchor_height):
            raise BadReplacement(f"an anchor plan nobody can broadcast is superseded {SUPERSEDE_AFTER} blocks after "
                                 f"it was recorded, by the same record or a higher height")
    if p.l2_height <= tip.l2_height:
        raise AnchorOutOfOrder(f"L2 height {p.l2_height} is not above the last anchored height {tip.l2_height}")
    if p.prev_link != tip.link:
        raise BadAnchorLink(f"previous link {p.prev_link.hex()} is not the last anchor's {tip.link.hex()}")
    if tip.coin_txid != ZERO and (tip.coin_txid, tip.coin_vout) not in p.inputs:
        raise BadAnchorLink(f"the previous anchor output {tip.coin_txid[::-1].hex()}:{tip.coin_vout} is not spent: "
                            f"each anchor spends the one before it")
    if stored is not None and stored != rec.encode():
        raise BadAnchorLink(f"L2 height {p.l2_height} has an anchor plan of another record")
    coins = _coins(view, p.inputs)
    for c in coins:
        if c.kind not in (CoinKind.FUNDING, CoinKind.ANCHOR):
            raise UnknownCoin(f"{c.btc_txid[::-1].hex()}:{c.vout} is a {c.kind.name} coin; anchors spend funding "
                              f"coins and the previous anchor output")
    priced = price_anchor(fed, net, coins, rec, p.l2_height, p.feerate_sat_vb)
    plan_id = cast(bytes, _unsigned_tx(coins, priced.outputs).GetTxid())
    if view.get(plan_key(plan_id)) is not None:
        raise DuplicateDuty(f"plan {plan_id[::-1].hex()} is recorded already")
    if old is None and tip.open != ZERO:
        raise AnchorInFlight(f"anchor plan {tip.open[::-1].hex()} is in flight: one anchor at a time")
    _check_unspent(coins, p.replaces)
    bump_member_nonce(view, tx)
    if stored is None:
        view.put(anchor_plan_key(p.l2_height), rec.encode())
    _record_plan(view, plan_id, PlanEntry(PlanStatus.PLANNED, p.replaces, ZERO, view.height, p.l2_height,
                                          p.feerate_sat_vb, priced.fee_sat, 0, p.inputs, (), ()), old, coins)
    view.put(ANCHOR_TIP_KEY, replace(tip, open=plan_id).encode())


def apply_anchor_update(view: StateView, tx: Transaction, rules: Rules) -> None:
    """AnchorUpdate (l2d/core/anchor.py); FINAL with the txid of a version of the anchor plan of that height also
    completes the plan: its coins spent, its Taproot output the next anchor's coin (or the funding rest a FUNDING
    coin), the anchor tip moved on."""
    p = cast(AnchorUpdate, tx.payload)
    recorded = view.get(anchor_key(p.l2_height))
    if recorded is not None:  # an anchor plan completed at this height is final: nothing moves it any more
        was = AnchorEntry.decode(recorded)
        holder = plan_entry(view.get, was.btc_txid)
        if (holder is not None and is_anchor_plan(holder) and holder.status == PlanStatus.COMPLETED
                and (p.btc_txid != was.btc_txid or p.status != AnchorStatus.FINAL)):
            raise PlanClosed(f"the anchor of L2 height {p.l2_height} is plan {was.btc_txid[::-1].hex()}, completed: "
                             f"it cannot become {p.status.name} with {p.btc_txid[::-1].hex()}")
    plan = plan_entry(view.get, p.btc_txid) if p.status == AnchorStatus.FINAL else None
    if plan is not None and is_anchor_plan(plan):
        if plan.anchor_height != p.l2_height:
            raise UnknownPlan(f"plan {p.btc_txid[::-1].hex()} anchors L2 height {plan.anchor_height}, not "
                              f"{p.l2_height}")
        rec = AnchorPlanRecord.decode(cast(bytes, view.get(anchor_plan_key(plan.anchor_height))))
        if rec.state_root != p.state_root:
            raise BadAnchorLink(f"the anchor plan of L2 height {p.l2_height} commits root {rec.state_root.hex()}, "
                                f"not {p.state_root.hex()}")
        done = [v for v, e in plan_versions(view.get, p.btc_txid) if e.status == PlanStatus.COMPLETED]
        if done and done != [p.btc_txid]:
            raise PlanClosed(f"version {done[0][::-1].hex()} of this anchor is COMPLETED; {p.btc_txid[::-1].hex()} "
                             f"cannot be")
    apply_anchor(view, tx, rules)
    if plan is not None and is_anchor_plan(plan) and plan.status != PlanStatus.COMPLETED:
        _complete(view, p.btc_txid, plan, rules.network.id)
