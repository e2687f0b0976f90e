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
from coincurve import PublicKey

from .anchor import AnchorEntry, anchor_key
from .anchor_tx import AnchorStatus
from .codec import Reader
from .errors import DecodeError, DuplicateDuty
from .hashing import H_PLAN_SIG
from .pegs import (BRIDGE_TOTALS_KEY, CHANGE_CONTRACT, FUNDING_CONTRACT, BadPegoutTransition, BridgeRejected,
                   BridgeTotals, CoinKind, FedCoin, Federation, PegoutEntry, PegoutNotAnchored, UnknownPegout,
                   bridge_totals, coin_key, deposit_script_pubkey, federation, pegout_key, tweaked_key, witness_script)
from .pegs_tx import OUTPOINT, PegoutPlan, PegoutStatus, PegoutUpdate, PlanCompleted, PlanSignature, RollPlan
from .state import Namespace, Rules, StateView, bump_member_nonce, check_member
from .tx import Transaction

SPENDABLE = (CoinKind.DEPOSIT, CoinKind.CHANGE)  # the coins peg-outs spend; FUNDING coins pay anchors
RBF_SEQUENCE = 0xFFFFFFFD
DUST_SAT = 546  # the largest standard dust threshold (P2PKH); payouts and change stay above it
MAX_FEE_SHARE_PPM = 100_000  # a peg-out pays at most 10% of its amount in Bitcoin fees (signers may demand less)
SIG_ITEM = 72  # witness bytes counted per signature: a DER signature of at most 71 bytes (low S) + sighash
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
        ws = len(witness_script(fed, network_id, c.contract))
        witness += (_varint_size(fed.threshold + 2 + branch) + 1 + fed.threshold * (1 + SIG_ITEM) + 2 * branch
                    + _varint_size(ws) + ws)
    return (4 * base + witness + 3) // 4


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
    held = sum(c.amount_sat for c in coins if c.kind != CoinKind.FUNDING)
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
    """price() (price_roll() for a roll) of a recorded plan's coins and peg-outs at another fee rate (what a
    replacement would pay)."""
    coins = _coins(view, entry.inputs)
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
    """The Bitcoin transaction of a plan, with what signing each input needs."""

    tx: CTransaction
    coins: tuple[FedCoin, ...]
    witness_scripts: tuple[bytes, ...]

    @property
    def txid(self) -> bytes:
        return cast(bytes, self.tx.GetTxid())

    def sighash(self, i: int) -> bytes:
        return cast(bytes, SignatureHash(CScript(self.witness_scripts[i]), self.tx, i, SIGHASH_ALL,
                                         amount=self.coins[i].amount_sat, sigversion=SIGVERSION_WITNESS_V0))


def _rest(coins: Sequence[FedCoin], entry: PlanEntry) -> int:
    """What a plan returns to the funding script: inputs - payouts - change - fee (a roll's funding rest; zero for
    a peg-out plan, whose payouts carry the fee)."""
    return sum(c.amount_sat for c in coins) - sum(entry.payouts) - entry.change_sat - entry.fee_sat


def plan_tx(view: StateView, fed: Federation, network_id: int, entry: PlanEntry) -> PlanTx:
    """The transaction a recorded plan stands for, rebuilt from the state."""
    coins = _coins(view, entry.inputs)
    change = ((deposit_script_pubkey(fed, network_id, CHANGE_CONTRACT), entry.change_sat),) if entry.change_sat else ()
    rest = _rest(coins, entry)
    funding = ((deposit_script_pubkey(fed, network_id, FUNDING_CONTRACT), rest),) if rest else ()
    outputs = [(e.script_pubkey, v) for e, v in zip(_pegouts(view, entry.pegouts), entry.payouts)] + list(change)
    outputs += funding
    return PlanTx(_unsigned_tx(coins, outputs), tuple(coins),
                  tuple(witness_script(fed, network_id, c.contract) for c in coins))


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
    if old is not None and old.pegouts:
        raise BadReplacement(f"plan {p.replaces[::-1].hex()} pays peg-outs; a roll replaces only a roll")
    coins = _coins(view, p.inputs)
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
        pub = PublicKey(tweaked_key(key, rules.network.id, ptx.coins[i].contract))
        try:
            ok = pub.verify(sig[:-1], ptx.sighash(i), hasher=None)
        except (ValueError, TypeError):  # not a DER signature
            ok = False
        if not ok:
            raise BadPlanSignature(f"the signature of input {i} by key {p.key_index} does not verify")
    bump_member_nonce(view, tx)
    view.put(plan_sig_key(p.plan_id, p.key_index), p.encode()[33:])


def _complete(view: StateView, plan_id: bytes, plan: PlanEntry) -> None:
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
    if rest:
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
        _complete(view, p.btc_txid, plan)
    else:
        view.put(pegout_key(p.pegout_id), replace(entry, status=p.status, btc_txid=p.btc_txid).encode())


def _versions(get: Callable[[bytes], Optional[bytes]], plan_id: bytes) -> list[tuple[bytes, PlanEntry]]:
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
    done = [v for v, e in _versions(view.get, p.plan_id) if e.status == PlanStatus.COMPLETED]
    if done == [p.plan_id]:
        raise DuplicateDuty(f"plan {p.plan_id[::-1].hex()} is COMPLETED already")
    if done:
        raise PlanClosed(f"version {done[0][::-1].hex()} of this roll is COMPLETED; {p.plan_id[::-1].hex()} cannot "
                         f"be")
    bump_member_nonce(view, tx)
    _complete(view, p.plan_id, plan)
