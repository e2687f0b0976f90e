"""The federation's bridge service in each member's daemon: relays Bitcoin headers into the L2 state and pays
peg-outs through plans (l2d/core/plans.py, docs/bridge.md "Who does what").

Header relay: the LMDB header store follows bitcoind (reorgs included); every step posts BtcHeaders for the
heights where the relayed chain in the L2 state differs from the store's best chain (from the fork point on,
at most 50 per transaction), so claims are judged against the federation's best chain.

Peg-outs: every decision is in the L2 state, so each member does the same duties from what the state says,
with its own keys and its own bitcoind, and any of them can finish what another started:
  1. plan: PENDING peg-outs covered by a FINAL anchor, not yet planned, get a PegoutPlan over the free federation
     coins (the deterministic choice of select_coins) at this member's fee rate (the first plan committed wins);
  2. sign: once a plan's block is final, each of this member's keys that has not signed it builds the plan's PSBT
     itself, checks its signer policy (LocalSigner, plus: the anchor is confirmed in *this* member's bitcoind and
     the circuit breaker is closed), records the transaction on disk, and posts its signatures (PlanSignature);
  3. broadcast: a version with m signatures per input in the state is finalized and (re)broadcast;
  4. record: BROADCAST with the txid this member's bitcoind knows, then COMPLETED at `confirmations` (for
     whichever version was mined; the first COMPLETED completes the plan);
  5. replace: a broadcast version still unconfirmed `rbf_after_blocks` blocks later is replaced by a plan at a
     higher fee rate spending the same coins (so at most one version can ever be mined).
Rolls (when the federation's scripts have an emergency path): a free coin that has `emergency_delay -
roll_margin_blocks` confirmations in this member's bitcoind is due; the due coins (with a funding coin for the fee)
get a RollPlan, which members sign only if every held coin in it is due in their own bitcoind, and which goes
through the same sign / broadcast / replace duties; PlanCompleted records it mined. The circuit breaker does not stop
rolls: they pay nobody, and they keep the coins out of the emergency keys' reach.
Signatures are in the state, so a member that crashed after signing, or a federation that restarted before
broadcasting, finalizes the same transaction again: nothing is rebuilt, nothing is paid twice.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Optional, Sequence

from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.block import BlockHeader
from l2d.core.errors import DuplicateDuty, Rejected
from l2d.core.params import Network
from l2d.core.payload import Payload
from l2d.core.pegs import (BridgeTotals, CoinKind, FedCoin, Federation, PegoutEntry, bridge_totals, btc_header_key,
                           btc_tip, pegout_key)
from l2d.core.pegs_tx import (MAX_PLAN_INPUTS, MAX_PLAN_PEGOUTS, MAX_RELAY_HEADERS, AnchorPlan, BtcHeaders, PegoutPlan,
                              PegoutStatus, PegoutUpdate, PlanCompleted, PlanSignature, RollPlan)
from l2d.core.plans import (ROLLED, SPENDABLE, ZERO, AnchorPlanRecord, PlanEntry, PlanStatus, PlanUnderfunded,
                            anchor_plan_key, held_coins, is_anchor_plan, plan_signatures, plan_tx, price,
                            price_recorded, price_roll, select_coins, signatures_by_key)
from l2d.core.state import SUPPLY_KEY, Namespace, StateView, Supply

from .claims import anchor_in_my_chain, my_feerate
from .federation import FederationError, LocalSigner, build_psbt, signed_transaction
from .rpc import BitcoinRPC
from .rpc_errors import RPCAlreadyInChain, RPCError, RPCTransient
from .steps import run_steps

log = logging.getLogger(__name__)

MAX_PLAN_CANDIDATES = 200  # pending peg-outs tried for one plan, oldest first


@dataclass(frozen=True, slots=True)
class Books:
    totals: BridgeTotals
    supply: Supply
    plans: dict[bytes, PlanEntry]
    held: list[FedCoin]  # DEPOSIT and CHANGE coins not spent by a COMPLETED plan


def choose_roll(fed: Federation, network_id: int, due: Sequence[FedCoin], younger: Sequence[FedCoin], rate: int
                ) -> tuple[Optional[list[FedCoin]], str]:
    """The inputs of a roll of the due coins (oldest first) at this rate, or (None, why it waits).

    The due coins (at most MAX_PLAN_INPUTS) go in; while their funding coins do not pay the fee, the largest younger
    funding coins join (the youngest held coin making room at MAX_PLAN_INPUTS) — but only for a roll that moves held
    coins: a roll of funding coins alone is signed only when all of them are due, so a young payer would lock it.
    """
    take = list(due[:MAX_PLAN_INPUTS])
    payers = sorted((c for c in younger if c.kind == CoinKind.FUNDING), key=lambda c: (-c.amount_sat, c.btc_txid,
                                                                                        c.vout))
    while True:
        try:
            price_roll(fed, network_id, take, rate)
            return take, ""
        except PlanUnderfunded as e:
            held = [c for c in take if c.kind in SPENDABLE]
            if not held:
                return None, (f"the due funding coins do not pay for rolling themselves ({e}); they wait to be paid "
                              f"for by a roll of held coins, or for more of them to be due")
            if not payers:
                return None, (f"the funding coins cannot pay its fee ({e}): fund the federation (l2-cli "
                              f"federation-fund) before the coins reach the emergency timelock")
            if len(take) == MAX_PLAN_INPUTS:  # make room: the youngest held coin waits for the next roll
                if len(held) == 1:
                    return None, f"{MAX_PLAN_INPUTS} inputs do not pay the fee of a roll"
                take.remove(held[-1])
            take.append(payers.pop(0))


class BridgeService:
    def __init__(self, *, fed: Federation, network: Network, signers: Sequence[LocalSigner], rpc: BitcoinRPC,
                 read_state: Callable[[], Any], submit: Callable[[Payload], bytes], headers: Any = None,
                 confirmations: int = 1, rbf_after_blocks: int = 3,
                 fee_fallback_sat_per_vb: int = 2, fee_max_sat_per_vb: int = 500, poll_interval_ms: int = 1000,
                 roll_margin_blocks: int = 144, header_at: Optional[Callable[[int], Optional[BlockHeader]]] = None,
                 now: Callable[[], int]) -> None:
        self.fed = fed
        self.network = network
        self.signers = list(signers)
        self.rpc = rpc
        self._read_state = read_state  # () -> context manager giving a store Reader
        self._submit = submit
        self.headers = headers
        self.confirmations = confirmations
        self.rbf_after_blocks = rbf_after_blocks
        self.fee_fallback = fee_fallback_sat_per_vb
        self.fee_max = fee_max_sat_per_vb
        self.poll = poll_interval_ms / 1000
        # a coin is due for a roll at this many confirmations (None: the federation's scripts have no timelock)
        self.roll_at: Optional[int] = (fed.emergency_delay - roll_margin_blocks
                                       if fed.emergency_keys and 0 < roll_margin_blocks < fed.emergency_delay else None)
        self._now = now
        self._header_at = header_at  # my committed L2 block headers (the anchored roots), None: sign no anchor
        # what this run submitted, with the L2 height then: resubmitted if still not in the state 5 blocks later
        self._submitted: dict[tuple[Any, ...], int] = {}
        # plan id -> the Bitcoin height at which this member first saw the version in its bitcoind (for RBF)
        self._seen: dict[bytes, int] = {}
        self._signed: dict[bytes, bytes] = {}  # plan id -> its signed transaction, once m keys have signed
        self._wake = asyncio.Event()
        self.halted: Optional[str] = None  # why the circuit breaker refuses to sign peg-outs, None while closed
        self._warned: set[str] = set()
        self._audited = False  # the breaker's check ran in this step
        self._mined_at: dict[tuple[bytes, int], int] = {}  # outpoint -> the Bitcoin height that confirmed it (rolls)

    # -- state reads ----------------------------------------------------------------------------------------------
    def _get(self, key: bytes) -> Optional[bytes]:
        with self._read_state() as r:
            v = r.get_state(key)
            return None if v is None else bytes(v)

    def _l2_height(self) -> int:
        with self._read_state() as r:
            return int(r.tip_height() or 0)

    def _pending(self, key: tuple[Any, ...]) -> bool:
        """Submitted by this run and, 5 L2 blocks later, possibly still waiting for a block."""
        at = self._submitted.get(key)
        return at is not None and self._l2_height() <= at + 5

    def _records(self, ns: Namespace) -> list[tuple[bytes, bytes]]:
        with self._read_state() as r:
            return [(bytes(k[1:]), bytes(v)) for k, v in r.iter_prefix(bytes((ns,)))]

    def final_anchor_height(self) -> Optional[int]:
        """The highest L2 height whose anchor is FINAL (plans pay only burns at or below it)."""
        best = None
        for k, v in self._records(Namespace.ANCHOR):
            if AnchorEntry.decode(v).status == AnchorStatus.FINAL:
                best = int.from_bytes(k, "big")
        return best

    def pegouts(self) -> list[tuple[bytes, PegoutEntry]]:
        return [(k, PegoutEntry.decode(v)) for k, v in self._records(Namespace.PEGOUT)]

    def plans(self) -> dict[bytes, PlanEntry]:
        return {k: PlanEntry.decode(v) for k, v in self._records(Namespace.PLAN)}

    def fed_coins(self) -> list[FedCoin]:
        return [FedCoin.decode(v) for _, v in self._records(Namespace.FED_COIN)]

    def books(self) -> Books:
        """Totals, supply, plans and the coins the books hold, from one read transaction (a block stored meanwhile
        cannot make them disagree)."""
        with self._read_state() as r:
            totals = bridge_totals(StateView(r.get_state))
            sup = Supply.decode(bytes(r.get_state(SUPPLY_KEY) or bytes(24)))
            plans = {bytes(k[1:]): PlanEntry.decode(bytes(v)) for k, v in r.iter_prefix(bytes((Namespace.PLAN,)))}
            coins = [FedCoin.decode(bytes(v)) for _, v in r.iter_prefix(bytes((Namespace.FED_COIN,)))]
        return Books(totals, sup, plans, held_coins(coins, plans))

    async def audit(self) -> Optional[str]:
        """The circuit breaker's check, against my own bitcoind (docs/bridge.md, "Circuit breaker"): every coin
        the books hold is in the UTXO set with its value (or spent by a mined version of the plan spending it), and
        the books agree with the L2 state: holdings - pending peg-outs = the L2 money that came in through the
        bridge, which the L2 supply covers. None when all holds, else what does not."""
        b = self.books()
        totals, sup = b.totals, b.supply
        bridged = totals.pegged_in_sat - totals.pending_out_sat - totals.paid_out_sat
        books = sum(c.amount_sat for c in b.held)
        if books - totals.pending_out_sat != bridged:
            return (f"the books hold {books} sat; with {totals.pending_out_sat} sat of peg-outs pending that is not "
                    f"the {bridged} sat the L2 state says came in through the bridge")
        supply = sup.minted_sat - sup.burned_sat
        if bridged > supply:
            return f"{bridged} sat came in through the bridge, more than the L2 supply {supply}"
        for c in b.held:
            out = await self.rpc.call("gettxout", [c.btc_txid[::-1].hex(), c.vout, False])
            outpoint = f"{c.btc_txid[::-1].hex()}:{c.vout}"
            if out is None:
                if c.spent_by != ZERO and any([await self._confirmations(v[::-1].hex()) > 0
                                               for v in self._versions(b.plans, c.spent_by)]):
                    continue  # spent by a version of its plan, mined but not yet recorded COMPLETED
                return f"coin {outpoint} ({c.amount_sat} sat) is not in my bitcoind's UTXO set"
            value = round(Decimal(str(out["value"])) * 100_000_000)
            if value != c.amount_sat:
                return f"coin {outpoint} holds {value} sat on chain, {c.amount_sat} sat in the books"
        return None

    async def _breaker_closed(self) -> bool:
        """Run the check (once per step); while it fails nothing is signed (logged when it trips and resets)."""
        if self._audited:
            return self.halted is None
        self._audited = True
        why = await self.audit()
        if why != self.halted:
            if why is None:
                log.warning("bridge: circuit breaker reset: the federation's coins match the books again")
            else:
                log.warning("bridge: circuit breaker tripped, signing no peg-outs: %s", why)
            self.halted = why
        return why is None

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- the loop -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        if self.headers is not None:
            self.headers.close()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        await run_steps(self.step, self._wake, self.poll, "bridge",
                        lambda e: log.warning("bridge: bitcoind unavailable (%s); retrying", e))

    async def step(self) -> None:
        self._audited = False
        if self.headers is not None:
            await self.relay_headers()
        plans = self.plans()
        for plan_id, p in sorted(plans.items(), key=lambda kv: (kv[1].l2_height, kv[0])):
            if p.status == PlanStatus.PLANNED:
                await self._pay(plans, plan_id, p)
        await self._plan()
        await self._roll()

    # -- header relay ---------------------------------------------------------------------------------------------
    async def relay_headers(self) -> None:
        store = self.headers
        await store.sync(self.rpc, now=self._now())
        tip, first = store.tip(), store.start
        if tip is None or first is None:
            return
        store_height = tip.height
        with self._read_state() as r:
            view = StateView(r.get_state)
            relayed = btc_tip(view)
            start = first.height if relayed is None else None
            if relayed is not None:
                h = min(relayed.height, store_height)  # the highest height where both chains agree, from here
                while h > relayed.base_height:
                    raw = r.get_state(btc_header_key(h))
                    if raw is not None and bytes(raw) == store.header_at(h):
                        break
                    h -= 1
                start = h + 1
        assert start is not None
        if start > store_height:
            return
        end = min(store_height, start + MAX_RELAY_HEADERS - 1)
        headers = tuple(store.header_at(h) for h in range(start, end + 1))
        key = ("relay", start, headers[-1].hex())
        if self._pending(key):  # already in the mempool: wait for its block
            return
        try:
            self._submit(BtcHeaders(start, headers))
        except DuplicateDuty as e:  # another member relayed them first: done, the next step reads them
            log.info("bridge: headers from %d already relayed: %s", start, e)
            return
        except Rejected as e:
            log.warning("bridge: header relay from %d refused: %s", start, e)
            return
        self._submitted[key] = self._l2_height()

    # -- peg-outs -------------------------------------------------------------------------------------------------
    def _try_submit(self, key: tuple[Any, ...], payload: Payload, what: str) -> None:
        """Submit a duty unless this run did so lately; another member having done it already is fine."""
        if self._pending(key):
            return
        try:
            self._submit(payload)
        except DuplicateDuty as e:
            log.info("bridge: %s: done already (%s)", what, e)
            return
        except Rejected as e:  # e.g. what it builds on is not committed yet: retried next step
            log.info("bridge: %s not accepted yet: %s", what, e)
            return
        self._submitted[key] = self._l2_height()

    @staticmethod
    def _versions(plans: dict[bytes, PlanEntry], plan_id: bytes) -> list[bytes]:
        """The plan and every earlier version it replaced, newest first."""
        out = [plan_id]
        while plans[out[-1]].replaces != ZERO:
            out.append(plans[out[-1]].replaces)
        return out

    async def _plan(self) -> None:
        """Propose a plan for the oldest unplanned peg-outs under the highest FINAL anchor (as many as one
        transaction of at most MAX_PLAN_INPUTS free coins pays at this member's fee rate)."""
        anchored = self.final_anchor_height()
        if anchored is None:
            return
        todo = sorted((e.l2_height, pid, e) for pid, e in self.pegouts()
                      if e.status == PegoutStatus.PENDING and e.btc_txid == ZERO and e.l2_height <= anchored)
        if not todo or not await self._breaker_closed():
            return
        rate = await my_feerate(self.rpc, self.fee_fallback, self.fee_max)
        free = [c for c in self.fed_coins() if c.kind in SPENDABLE and c.spent_by == ZERO]
        chosen: list[tuple[int, bytes, PegoutEntry]] = []
        coins: list[FedCoin] = []
        for item in todo[:MAX_PLAN_CANDIDATES]:  # oldest first; a peg-out that does not fit is left for later
            entries = [e for _, _, e in chosen] + [item[2]]
            take = select_coins(free, sum(e.amount_sat for e in entries))
            try:
                if len(take) > MAX_PLAN_INPUTS:
                    raise PlanUnderfunded(f"paying it takes more than {MAX_PLAN_INPUTS} coins")
                price(self.fed, self.network.id, take, entries, rate)
            except PlanUnderfunded as e:
                self._warn_once(item[1].hex(), "bridge: peg-out %s waits: %s", item[1].hex(), e)
                continue
            chosen.append(item)
            coins = take
            if len(chosen) == MAX_PLAN_PEGOUTS:
                break
        if not chosen:
            return
        ids = tuple(pid for _, pid, _ in chosen)
        self._try_submit(("plan", ids), PegoutPlan(anchored, rate, ZERO, tuple((c.btc_txid, c.vout) for c in coins),
                                                   ids), f"plan for {len(ids)} peg-outs")

    async def _pay(self, plans: dict[bytes, PlanEntry], plan_id: bytes, p: PlanEntry) -> None:
        """Take the current version of a payout one duty further: record a mined version, sign, broadcast the
        newest fully signed version, replace it when it is starved."""
        versions = self._versions(plans, plan_id)
        for v in versions:
            conf = await self._confirmations(v[::-1].hex())
            if conf > 0:
                self._record_mined(v, plans[v], conf)
                return
        await self._sign(plan_id, p)
        for v in versions:
            raw = self._assemble(v, plans[v])
            if raw is None:
                continue  # not enough signatures yet: the version before it may be signed
            height = await self.rpc.getblockcount()
            first = self._seen.setdefault(v, height)  # when this member first held it signed
            if await self._broadcast(raw):
                self._record_broadcast(v, plans[v])
            # starved: unconfirmed, or refused by bitcoind (its fee too low for the mempool now)
            if v == plan_id and height - first >= self.rbf_after_blocks:
                await self._replace(plan_id, p)
            return

    def _record_broadcast(self, v: bytes, p: PlanEntry) -> None:
        for pid in p.pegouts:
            raw = self._get(pegout_key(pid))
            e = None if raw is None else PegoutEntry.decode(raw)
            if e is not None and e.status != PegoutStatus.COMPLETED and (e.status, e.btc_txid) != (
                    PegoutStatus.BROADCAST, v):
                self._try_submit((pid, int(PegoutStatus.BROADCAST), v), PegoutUpdate(
                    pid, PegoutStatus.BROADCAST, v, p.anchor_height), f"peg-out {pid.hex()} BROADCAST")

    def _record_mined(self, v: bytes, p: PlanEntry, conf: int) -> None:
        """Version v is mined: BROADCAST with it, then (deep enough) COMPLETED, which completes the whole plan."""
        self._record_broadcast(v, p)
        if conf < self.confirmations:
            return
        if is_anchor_plan(p):  # the anchor service records it (AnchorUpdate CONFIRMED, then FINAL completes it)
            return
        if not p.pegouts:  # a roll
            self._try_submit(("completed", v), PlanCompleted(v), f"roll {v[::-1].hex()} COMPLETED")
            return
        for pid in p.pegouts:
            raw = self._get(pegout_key(pid))
            e = None if raw is None else PegoutEntry.decode(raw)
            if e is not None and e.status == PegoutStatus.BROADCAST and e.btc_txid == v:
                self._try_submit((pid, int(PegoutStatus.COMPLETED), v), PegoutUpdate(
                    pid, PegoutStatus.COMPLETED, v, p.anchor_height), f"plan {v[::-1].hex()} COMPLETED")
                return

    async def _sign(self, plan_id: bytes, p: PlanEntry) -> None:
        """Each of my keys that has not signed the current version signs it, if the plan's block is final and my
        own checks pass."""
        with self._read_state() as r:
            if p.l2_height > r.final_height():
                return  # a non-final block may still be replaced: sign only what is final
            todo = [(self.fed.keys.index(s.pubkey), s) for s in self.signers]
            todo = [(i, s) for i, s in todo
                    if plan_signatures(r.get_state, plan_id, i) is None and not self._pending(("sig", plan_id, i))]
            if not todo:
                return
            ptx = plan_tx(StateView(r.get_state), self.fed, self.network.id, p)
            anchor_raw = r.get_state(anchor_key(p.anchor_height))
            rec_raw = r.get_state(anchor_plan_key(p.anchor_height)) if is_anchor_plan(p) else None
        what = f"plan {plan_id[::-1].hex()}"
        if p.feerate_sat_vb > self.fee_max:
            self._warn_once(f"cap:{what}", "bridge: %s pays %d sat/vB, above my cap of %d: not signing", what,
                            p.feerate_sat_vb, self.fee_max)
            return
        if rec_raw is not None:  # an anchor: the root it commits is my own block's at that height
            rec = AnchorPlanRecord.decode(bytes(rec_raw))
            mine = None if self._header_at is None else self._header_at(p.anchor_height)
            if mine is None or mine.state_root != rec.state_root:
                self._warn_once(f"root:{what}", "bridge: not signing anchor %s: it commits root %s for L2 height %d, "
                                "my block there has %s", what, rec.state_root.hex(), p.anchor_height,
                                None if mine is None else mine.state_root.hex())
                return
            for i, s in todo:
                try:
                    sigs = s.sign_anchor(ptx)
                except FederationError as e:
                    self._warn_once(f"refuse:{i}:{what}:{e}", "bridge: key %d refuses %s: %s", i, what, e)
                    continue
                self._try_submit(("sig", plan_id, i), PlanSignature(plan_id, i, sigs),
                                 f"signature of {what} by key {i}")
            return
        if not p.pegouts:  # a roll: every held coin in it is due in my bitcoind (funding coins may pay the fee);
            held = [c for c in ptx.coins if c.kind != CoinKind.FUNDING]  # a roll of funding coins alone: all due
            early = [c for c in (held or ptx.coins) if not await self._due(c, fresh=True)]
            if early:
                self._warn_once(f"early:{what}", "bridge: not signing %s: coin %s:%d is not due for a roll in my "
                                "bitcoind", what, early[0].btc_txid[::-1].hex(), early[0].vout)
                return
        else:
            if anchor_raw is None:
                return
            why = await anchor_in_my_chain(self.rpc, AnchorEntry.decode(bytes(anchor_raw)), p.anchor_height, 1)
            if why is not None:
                self._warn_once(f"anchor:{what}:{why[0]}", "bridge: not signing %s: %s", what, why[0])
                return
            if not await self._breaker_closed():
                return
        psbt = build_psbt(self.fed, self.network, ptx)
        for i, s in todo:
            try:
                sigs = s.sign(psbt, plan_id, p.pegouts, p.anchor_height)
            except FederationError as e:
                self._warn_once(f"refuse:{i}:{what}:{e}", "bridge: key %d refuses %s: %s", i, what, e)
                continue
            self._try_submit(("sig", plan_id, i), PlanSignature(plan_id, i, sigs), f"signature of {what} by key {i}")

    def _assemble(self, v: bytes, p: PlanEntry) -> Optional[bytes]:
        """The signed transaction of version v, if the state holds signatures of m keys (kept once made: the
        signatures of a version only accumulate, and any m of them give the same txid)."""
        raw = self._signed.get(v)
        if raw is None:
            with self._read_state() as r:
                sigs = signatures_by_key(r.get_state, self.fed, v)
                if len(sigs) < self.fed.threshold:
                    return None
                ptx = plan_tx(StateView(r.get_state), self.fed, self.network.id, p)
            raw = signed_transaction(self.fed, self.network, ptx, sigs)
            if raw is not None:
                self._signed[v] = raw
        return raw

    async def _replace(self, plan_id: bytes, p: PlanEntry) -> None:
        """Propose a replacement at twice the rate (at least +1), or the highest rate up to that which my cap and the
        consensus fee share bound allow; nothing if no higher rate is allowed."""
        target = min(max(p.feerate_sat_vb * 2, p.feerate_sat_vb + 1), self.fee_max)
        with self._read_state() as r:
            view = StateView(r.get_state)

            def fits(rate: int) -> bool:
                try:
                    price_recorded(view, self.fed, self.network.id, p, rate)
                    return True
                except PlanUnderfunded:
                    return False
            lo, hi = p.feerate_sat_vb, target  # the highest rate in (lo, hi] that fits, if any
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits(mid):
                    lo = mid
                else:
                    hi = mid - 1
        what = f"plan {plan_id[::-1].hex()}"
        if lo == p.feerate_sat_vb:
            self._warn_once(f"noreplace:{plan_id.hex()}", "bridge: %s is starved at %d sat/vB, and no higher rate is "
                            "allowed (my cap %d, the 10%% fee share bound)", what, p.feerate_sat_vb, self.fee_max)
            return
        payload: Payload
        if p.pegouts:
            payload = PegoutPlan(p.anchor_height, lo, plan_id, p.inputs, p.pegouts)
        elif is_anchor_plan(p):
            rec = AnchorPlanRecord.decode(self._get(anchor_plan_key(p.anchor_height)) or b"")
            payload = AnchorPlan(p.anchor_height, rec.mode, rec.state_root, rec.prev_link, lo, plan_id, p.inputs)
        else:
            payload = RollPlan(lo, plan_id, p.inputs)
        self._try_submit(("replace", plan_id), payload, f"replacement of {what} at {lo} sat/vB")

    # -- rolls ----------------------------------------------------------------------------------------------------
    async def _due(self, c: FedCoin, *, fresh: bool = False, tip: Optional[int] = None) -> bool:
        """The coin has roll_at confirmations in my bitcoind at `tip` (read here when not given) (False if it is not
        in its UTXO set). The height that confirmed it is kept, so a step asks bitcoind only about coins it has not
        seen confirmed; fresh asks again (a signer's check)."""
        if self.roll_at is None:
            return False
        outpoint = (c.btc_txid, c.vout)
        if tip is None:
            tip = await self.rpc.getblockcount()
        if fresh or outpoint not in self._mined_at:
            out = await self.rpc.call("gettxout", [c.btc_txid[::-1].hex(), c.vout, False])
            confirmations = 0 if out is None else int(out.get("confirmations", 0))
            if confirmations <= 0 or await self.rpc.getblockcount() != tip:  # a block came in between: ask again
                self._mined_at.pop(outpoint, None)
                return False
            self._mined_at[outpoint] = tip - confirmations + 1
        return tip - self._mined_at[outpoint] + 1 >= self.roll_at

    async def _roll(self) -> None:
        """Propose a roll of the free coins that are due (choose_roll)."""
        if self.roll_at is None:
            return
        free = [c for c in self.fed_coins() if c.spent_by == ZERO and c.kind in ROLLED]
        if not free:
            return
        tip = await self.rpc.getblockcount()  # once per step: a coin seen confirmed costs no RPC at all
        due = [c for c in free if await self._due(c, tip=tip)]
        if not due:
            return
        due.sort(key=lambda c: (self._mined_at[(c.btc_txid, c.vout)], c.btc_txid, c.vout))
        rate = await my_feerate(self.rpc, self.fee_fallback, self.fee_max)
        take, why = choose_roll(self.fed, self.network.id, due, [c for c in free if c not in due], rate)
        if take is None:
            self._warn_once(f"roll-wait:{why}", "bridge: %d coin(s) are due for a roll, which waits: %s", len(due), why)
            return
        inputs = tuple((c.btc_txid, c.vout) for c in take)
        self._try_submit(("roll", inputs), RollPlan(rate, ZERO, inputs), f"roll of {len(inputs)} coins")

    async def _broadcast(self, raw: bytes) -> bool:
        """Send the transaction to my bitcoind; True when it is in its mempool or chain."""
        try:
            await self.rpc.sendrawtransaction(raw)
        except RPCAlreadyInChain:
            return True
        except RPCError as e:
            if isinstance(e, RPCTransient):
                raise
            log.info("bridge: broadcast refused: %s", e)
            return False
        return True

    async def _confirmations(self, txid_hex: str) -> int:
        try:
            r = await self.rpc.call("getrawtransaction", [txid_hex, True])
        except RPCTransient:
            raise
        except RPCError:
            return 0
        return int(r.get("confirmations", 0) or 0)
