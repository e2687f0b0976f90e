"""Recovery: what the federation owes at an anchored state, and how its Bitcoin would pay it (docs/recovery.md).

If the federation disappears, whoever holds the emergency keys must know whom to pay from evidence anchored in
Bitcoin, not from any member's word. From the records of a snapshot (the evidence of a verified audit bundle) this
module computes, deterministically:
- the claims: every account balance; every worker stake not WITHDRAWN (owed to the worker); every task bounty not
  SETTLED or CANCELLED (owed back to its submitter); every OPEN FL job's reward pool (owed to its poster); every
  OPEN paid session's deposit less its settlements (owed to its client: receipts its server had not settled by the
  anchored height are not in the state); every NetFlow relay stake not WITHDRAWN (owed to the relay); every peg-out
  not COMPLETED (burned on the L2, owed to its Bitcoin script, with the transactions that may already have paid
  it); and whether the money they lock equals the state's locked total;
- the federation's Bitcoin by the books: its DEPOSIT and CHANGE coins not spent by a COMPLETED plan (FUNDING coins
  listed apart: they pay anchors, never claims), against pegged_in - paid_out of the bridge totals;
- the payout: each claim in full if the coins cover them all, else the same share of every claim,
  floor(claim * holdings / total claims), the remainder reported.

Pure and consensus-grade: no clock, no floats; l2-verify imports it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Callable, Mapping, Optional, TypeVar

from .audit import AuditBundle, SnapshotEvidence
from .errors import DecodeError, L2Error
from .fl import JobRecord, JobStatus
from .params import Network
from .pegs import (BRIDGE_TOTALS_KEY, FEDERATION_KEY, BridgeTotals, CoinKind, FedCoin, Federation, PegoutEntry,
                   deposit_script_pubkey, script_address)
from .pegs_tx import PegoutStatus
from .plans import PlanEntry, held_coins, plan_key
from .relay import RelayRecord, RelayStatus
from .session import SessionRecord
from .snapshot import read_snapshot
from .state import LOCKED_KEY, Account, Namespace
from .work import TaskRecord, TaskStatus, WorkerRecord, WorkerStatus

ZERO = b"\0" * 32
_T = TypeVar("_T")


# -- errors ------------------------------------------------------------------------------------------------------
class RecoveryError(L2Error):
    """A bundle or snapshot from which no recovery can be computed."""


class NoSnapshotEvidence(RecoveryError):
    """The bundle's L2 evidence is a root with proofs: the whole state, which recovery needs, is not in it."""


class NotABridgeChain(RecoveryError):
    """The snapshot's state has no federation record: its chain has no bridge, so nothing is owed in Bitcoin."""


class RecordMalformed(RecoveryError, DecodeError):
    """A record that does not decode, or that names a record the state does not hold."""


# -- the result --------------------------------------------------------------------------------------------------
class ClaimKind(IntEnum):
    """What a claim is; claims are listed in this order, then by their record's key."""

    ACCOUNT = 1  # an account balance, owed to the account's key
    STAKE = 2  # a worker's stake (worker not WITHDRAWN), owed to the worker's key
    BOUNTY = 3  # a task's escrowed bounty (task not SETTLED or CANCELLED), owed to its submitter
    FL_POOL = 4  # an OPEN FL job's reward pool, owed to its poster
    PEGOUT = 5  # a peg-out not COMPLETED: burned on the L2, owed to its Bitcoin script
    SESSION = 6  # an OPEN paid session's deposit less what its server settled, owed to its client
    RELAY_STAKE = 7  # a NetFlow relay's stake (relay not WITHDRAWN), owed to the relay's key

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


# the claims whose money the state counts as locked
LOCKING = (ClaimKind.STAKE, ClaimKind.BOUNTY, ClaimKind.FL_POOL, ClaimKind.SESSION, ClaimKind.RELAY_STAKE)


@dataclass(frozen=True, slots=True)
class Claim:
    kind: ClaimKind
    record_id: bytes  # the record's key without its namespace byte: account/worker key, task/job id, peg-out id
    owner: bytes  # the L2 key it is owed to (b"" for a peg-out)
    script_pubkey: bytes  # a peg-out's Bitcoin script (b"" otherwise)
    address: Optional[str]  # that script's address on the paired Bitcoin chain
    status: str  # the record's status name ("" for an account)
    amount_sat: int
    payout_sat: int
    # a peg-out: transactions that, if mined, paid it already (the record's btc_txid first, then every plan version
    # naming it, by txid); they spend the same coins, so at most one of them is ever mined
    check_txids: tuple[bytes, ...] = ()

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"kind": self.kind.label, "id": self.record_id.hex(), "status": self.status or None,
                                "amount_sat": self.amount_sat, "payout_sat": self.payout_sat}
        if self.kind == ClaimKind.PEGOUT:
            d.update(script_pubkey=self.script_pubkey.hex(), address=self.address,
                     check_txids=[t[::-1].hex() for t in self.check_txids])
        else:
            d["owner"] = self.owner.hex()
        return d


@dataclass(frozen=True, slots=True)
class Recovery:
    network: Network
    l2_height: int
    state_root: bytes
    federation: Federation
    coins: tuple[FedCoin, ...]  # held DEPOSIT and CHANGE coins, by (txid, vout)
    funding: tuple[FedCoin, ...]  # FUNDING coins, by (txid, vout): not counted in the holdings
    totals: BridgeTotals
    locked_sat: int  # the state's locked total (meta "locked")
    claims: tuple[Claim, ...]
    pro_rata: bool  # the claims exceed the holdings: each is paid floor(claim * holdings / claims_sat)

    @property
    def holdings_sat(self) -> int:
        return sum(c.amount_sat for c in self.coins)

    @property
    def funding_sat(self) -> int:
        return sum(c.amount_sat for c in self.funding)

    @property
    def books_sat(self) -> int:
        """What the bridge totals say the federation holds: pegged in - paid out."""
        return self.totals.pegged_in_sat - self.totals.paid_out_sat

    @property
    def books_agree(self) -> bool:
        return self.books_sat == self.holdings_sat

    @property
    def locked_claims_sat(self) -> int:
        return sum(c.amount_sat for c in self.claims if c.kind in LOCKING)

    @property
    def locked_agrees(self) -> bool:
        return self.locked_claims_sat == self.locked_sat

    @property
    def claims_sat(self) -> int:
        return sum(c.amount_sat for c in self.claims)

    @property
    def payout_sat(self) -> int:
        return sum(c.payout_sat for c in self.claims)

    @property
    def unallocated_sat(self) -> int:
        """Holdings no claim receives: the rounding remainder when pro rata, the surplus otherwise."""
        return self.holdings_sat - self.payout_sat

    def coin_address(self, coin: FedCoin) -> Optional[str]:
        """The deposit address holding the coin (its contract's P2WSH under the federation's keys)."""
        return script_address(deposit_script_pubkey(self.federation, self.network.id, coin.contract), self.network)

    def to_dict(self) -> dict[str, object]:
        def coin(c: FedCoin) -> dict[str, object]:
            return {"txid": c.btc_txid[::-1].hex(), "vout": c.vout, "amount_sat": c.amount_sat,
                    "kind": c.kind.name.lower(), "contract": c.contract.hex(), "address": self.coin_address(c),
                    "planned_spend": None if c.spent_by == ZERO else c.spent_by[::-1].hex()}

        return {
            "network": self.network.name, "l2_height": self.l2_height, "state_root": self.state_root.hex(),
            "federation": {"threshold": self.federation.threshold, "keys": [k.hex() for k in self.federation.keys]},
            "holdings_sat": self.holdings_sat, "coins": [coin(c) for c in self.coins],
            "funding_sat": self.funding_sat, "funding_coins": [coin(c) for c in self.funding],
            "books": {"pegged_in_sat": self.totals.pegged_in_sat, "paid_out_sat": self.totals.paid_out_sat,
                      "pending_out_sat": self.totals.pending_out_sat, "books_sat": self.books_sat,
                      "agree": self.books_agree},
            "locked": {"state_sat": self.locked_sat, "claims_sat": self.locked_claims_sat,
                       "agree": self.locked_agrees},
            "claims": [c.to_dict() for c in self.claims],
            "claims_sat": self.claims_sat, "payout_sat": self.payout_sat, "pro_rata": self.pro_rata,
            "unallocated_sat": self.unallocated_sat,
        }


# -- the computation ---------------------------------------------------------------------------------------------
def _decode(key: bytes, value: bytes, decode: Callable[[bytes], _T], what: str) -> _T:
    try:
        return decode(value)
    except (L2Error, ValueError) as e:
        raise RecordMalformed(f"{what} record {key.hex()} does not decode: {e}") from None


def recover(records: Mapping[bytes, bytes], network: Network, l2_height: int, state_root: bytes) -> Recovery:
    """The federation's obligations and Bitcoin at the state made of records (state key -> value, as a snapshot
    holds them) of the L2 network at l2_height with state_root (which the caller has verified)."""
    raw_fed = records.get(FEDERATION_KEY)
    if raw_fed is None:
        raise NotABridgeChain(f"the state at L2 height {l2_height} has no federation record: its chain has no "
                              f"bridge, so the federation owes nothing in Bitcoin")
    fed = _decode(FEDERATION_KEY, raw_fed, Federation.decode, "federation")
    raw_totals = records.get(BRIDGE_TOTALS_KEY)
    totals = (BridgeTotals(0, 0, 0) if raw_totals is None
              else _decode(BRIDGE_TOTALS_KEY, raw_totals, BridgeTotals.decode, "bridge totals"))
    raw_locked = records.get(LOCKED_KEY)
    if raw_locked is not None and len(raw_locked) != 8:
        raise RecordMalformed(f"locked total record {LOCKED_KEY.hex()} is {len(raw_locked)} bytes, not 8")
    locked = 0 if raw_locked is None else int.from_bytes(raw_locked, "big")

    plans: dict[bytes, PlanEntry] = {}
    for key in sorted(k for k in records if k[0] == Namespace.PLAN):
        plans[key[1:]] = _decode(key, records[key], PlanEntry.decode, "plan")
    paying: dict[bytes, list[bytes]] = {}  # peg-out id -> the plan versions paying it, by txid
    for plan_id, plan in plans.items():
        for pid in plan.pegouts:
            paying.setdefault(pid, []).append(plan_id)

    claims: list[Claim] = []

    def owe(kind: ClaimKind, rid: bytes, owner: bytes, status: str, amount: int, script: bytes = b"",
            check: tuple[bytes, ...] = ()) -> None:
        if amount:
            address = script_address(script, network) if script else None
            claims.append(Claim(kind, rid, owner, script, address, status, amount, 0, check))

    coins: list[FedCoin] = []
    funding: list[FedCoin] = []
    for key in sorted(records):
        ns, rid, value = key[0], key[1:], records[key]
        if ns == Namespace.ACCOUNT:
            owe(ClaimKind.ACCOUNT, rid, rid, "", _decode(key, value, Account.decode, "account").balance_sat)
        elif ns == Namespace.WORKER:
            w = _decode(key, value, WorkerRecord.decode, "worker")
            if w.status != WorkerStatus.WITHDRAWN:
                owe(ClaimKind.STAKE, rid, rid, w.status.name, w.stake_sat)
        elif ns == Namespace.TASK:
            t = _decode(key, value, TaskRecord.decode, "task")
            if t.status not in (TaskStatus.SETTLED, TaskStatus.CANCELLED):
                owe(ClaimKind.BOUNTY, rid, t.submitter, t.status.name, t.bounty_sat)
        elif ns == Namespace.FL_JOB:
            j = _decode(key, value, JobRecord.decode, "FL job")
            if j.status == JobStatus.OPEN:
                owe(ClaimKind.FL_POOL, rid, j.poster, j.status.name, j.reward_pool_sat)
        elif ns == Namespace.RELAY:
            relay = _decode(key, value, RelayRecord.decode, "relay")
            if relay.status != RelayStatus.WITHDRAWN:
                owe(ClaimKind.RELAY_STAKE, rid, rid, relay.status.name, relay.stake_sat)
        elif ns == Namespace.SESSION:
            sess = _decode(key, value, SessionRecord.decode, "session")
            owe(ClaimKind.SESSION, rid, sess.client, sess.status.name, sess.escrow_sat)
        elif ns == Namespace.PEGOUT:
            e = _decode(key, value, PegoutEntry.decode, "peg-out")
            if e.status != PegoutStatus.COMPLETED:
                first = [e.btc_txid] if e.btc_txid != ZERO else []
                check = tuple(first + [t for t in paying.get(rid, []) if t != e.btc_txid])
                owe(ClaimKind.PEGOUT, rid, b"", e.status.name, e.amount_sat, e.script_pubkey, check)
        elif ns == Namespace.FED_COIN:
            c = _decode(key, value, FedCoin.decode, "federation coin")
            if c.kind == CoinKind.FUNDING:
                funding.append(c)
                continue
            if c.spent_by != ZERO and c.spent_by not in plans:
                raise RecordMalformed(f"federation coin {c.btc_txid[::-1].hex()}:{c.vout} is spent by plan "
                                      f"{c.spent_by[::-1].hex()}, which the state does not hold "
                                      f"(no record {plan_key(c.spent_by).hex()})")
            coins.append(c)

    claims.sort(key=lambda c: (c.kind, c.record_id))
    coins = sorted(held_coins(coins, plans), key=lambda c: (c.btc_txid, c.vout))
    funding.sort(key=lambda c: (c.btc_txid, c.vout))
    holdings = sum(c.amount_sat for c in coins)
    total = sum(c.amount_sat for c in claims)
    pro_rata = total > holdings
    out = tuple(replace(c, payout_sat=c.amount_sat * holdings // total if pro_rata else c.amount_sat) for c in claims)
    return Recovery(network, l2_height, state_root, fed, tuple(coins), tuple(funding), totals, locked, out, pro_rata)


def snapshot_recovery(snapshot: bytes, network: Network) -> Recovery:
    """recover() over the records of a snapshot file (its structure and checksum are checked while reading; its
    root is not recomputed: verify the snapshot, or the bundle carrying it, first)."""
    header, items = read_snapshot(io.BytesIO(snapshot), network)
    records = dict(items)  # read to the end: the checksum is checked
    return recover(records, network, header.height, header.state_root)


def bundle_recovery(bundle: AuditBundle, network: Network) -> Recovery:
    """The recovery at a bundle's anchored state, from its snapshot evidence. Call it on a bundle that passed
    audit.verify_bundle: that is what ties the snapshot to Bitcoin."""
    ev = bundle.evidence
    if not isinstance(ev, SnapshotEvidence):
        raise NoSnapshotEvidence(f"the bundle's L2 evidence is a state root with {len(ev.proofs)} proof(s), not a "
                                 f"snapshot: recovery needs every record of the anchored state (export the bundle "
                                 f"of an anchored height that has a snapshot)")
    return snapshot_recovery(ev.snapshot, network)
