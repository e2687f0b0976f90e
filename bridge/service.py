"""The federation's bridge service in the daemon: relays Bitcoin headers into the L2 state and pays peg-outs.

Header relay: the LMDB header store follows bitcoind (reorgs included); every step posts BtcHeaders for the
heights where the relayed chain in the L2 state differs from the store's best chain (from the fork point on,
at most 50 per transaction), so claims are judged against the federation's best chain.

Peg-outs, one batch at a time, every state change of a batch written to disk (fsync, atomic rename) before
anything leaves the process:
  1. PENDING peg-outs covered by a CONFIRMED anchor are planned into a PSBT over federation coins (claimed
     peg-ins and completed change) and saved (status "signing").
  2. Each local signer checks its policy and adds its signatures; the quorum is checked and the transaction
     finalized; the raw transaction is saved (status "signed") before it is broadcast.
  3. The L2 records BROADCAST with the txid; the transaction is (re)broadcast until it confirms; at
     `confirmations` the L2 records COMPLETED. A transaction unconfirmed after `rbf_after_blocks` blocks is
     replaced (same inputs, same peg-outs, higher fee rate); the signers accept the replacement because it
     conflicts with what they signed before.
A restart resumes every batch from its file: a saved transaction is rebroadcast as is, never rebuilt, so a
crash between signing and broadcast pays nothing twice.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from l2d.core.anchor import AnchorEntry
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.errors import DuplicateDuty, Rejected
from l2d.core.params import Network
from l2d.core.payload import Payload
from l2d.core.pegs import (CHANGE_CONTRACT, Federation, PeginEntry, PegoutEntry, bridge_totals, btc_header_key,
                           btc_tip, pegout_key)
from l2d.core.pegs_tx import MAX_RELAY_HEADERS, BtcHeaders, PegoutStatus, PegoutUpdate
from l2d.core.state import SUPPLY_KEY, Namespace, StateView, Supply

from .federation import (Coin, FederationError, InsufficientFunds, LocalSigner, Pegout, build_psbt, combine, finalize,
                         plan_batch)
from .rpc import BitcoinRPC
from .rpc_errors import RPCAlreadyInChain, RPCError, RPCTransient
from .steps import run_steps

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One peg-out batch as saved on disk (JSON). txids are display order (hex), ids are L2 txids (hex)."""

    id: int
    pegouts: list[str]
    anchor_height: int
    coins: list[dict[str, Any]]
    feerate_sat_vb: int
    change_sat: int = 0  # inputs - sum(peg-out amounts): the same for every replacement
    status: str = "signing"  # signing | signed | broadcast | completed
    psbt: str = ""
    raw: str = ""
    txid: str = ""
    broadcast_height: int = 0
    history: list[dict[str, str]] = field(default_factory=list)  # earlier (replaced) transactions: txid, raw

    def coin_objs(self) -> list[Coin]:
        return [Coin(bytes.fromhex(c["txid"])[::-1], c["vout"], c["amount_sat"], bytes.fromhex(c["contract"]))
                for c in self.coins]


class BridgeService:
    def __init__(self, *, fed: Federation, network: Network, signers: Sequence[LocalSigner], rpc: BitcoinRPC,
                 read_state: Callable[[], Any], submit: Callable[[Payload], bytes], batch_dir: Path,
                 headers: Any = None, confirmations: int = 1, rbf_after_blocks: int = 3,
                 fee_fallback_sat_per_vb: int = 2, fee_max_sat_per_vb: int = 500, poll_interval_ms: int = 1000,
                 now: Callable[[], int]) -> None:
        self.fed = fed
        self.network = network
        self.signers = list(signers)
        self.rpc = rpc
        self._read_state = read_state  # () -> context manager giving a store Reader
        self._submit = submit
        self.dir = batch_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.headers = headers
        self.confirmations = confirmations
        self.rbf_after_blocks = rbf_after_blocks
        self.fee_fallback = fee_fallback_sat_per_vb
        self.fee_max = fee_max_sat_per_vb
        self.poll = poll_interval_ms / 1000
        self._now = now
        self.batches: dict[int, Batch] = {}
        # what this run submitted, with the L2 height then: resubmitted if still not in the state 5 blocks later
        self._submitted: dict[tuple[Any, ...], int] = {}
        self._wake = asyncio.Event()
        self.halted: Optional[str] = None  # why the circuit breaker refuses to sign peg-outs, None while closed
        for p in sorted(self.dir.glob("batch-*.json")):
            b = Batch(**json.loads(p.read_text()))
            self.batches[b.id] = b

    # -- persistence ----------------------------------------------------------------------------------------------
    def _save(self, b: Batch) -> None:
        path = self.dir / f"batch-{b.id:08d}.json"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(b), f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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

    def confirmed_anchor_height(self) -> Optional[int]:
        best = None
        with self._read_state() as r:
            for k, v in r.iter_prefix(bytes((Namespace.ANCHOR,))):
                if AnchorEntry.decode(v).status in (AnchorStatus.CONFIRMED, AnchorStatus.FINAL):
                    best = int.from_bytes(k[1:], "big")
        return best

    def pegouts(self) -> list[tuple[bytes, PegoutEntry]]:
        with self._read_state() as r:
            return [(k[1:], PegoutEntry.decode(v)) for k, v in r.iter_prefix(bytes((Namespace.PEGOUT,)))]

    def pegins(self) -> list[PeginEntry]:
        with self._read_state() as r:
            return [PeginEntry.decode(v) for _, v in r.iter_prefix(bytes((Namespace.PEGIN,)))]

    def coins(self) -> list[Coin]:
        """Federation coins free to spend: the held coins minus the inputs of batches in flight."""
        busy = {(c.txid, c.vout) for b in self.batches.values() if b.status != "completed" for c in b.coin_objs()}
        return [c for c in self.held_coins() if (c.txid, c.vout) not in busy]

    def held_coins(self) -> list[Coin]:
        """The coins the federation holds by its books, as confirmed on Bitcoin: claimed deposits and the change of
        completed batches, minus the inputs of completed batches (an unconfirmed payout's inputs are still held)."""
        coins = [Coin(p.btc_txid, p.vout, p.amount_sat, p.recipient) for p in self.pegins()]
        spent: set[tuple[bytes, int]] = set()
        for b in self.batches.values():
            if b.status == "completed":
                spent.update((c.txid, c.vout) for c in b.coin_objs())
                if b.change_sat:
                    coins.append(Coin(bytes.fromhex(b.txid)[::-1], len(b.pegouts), b.change_sat, CHANGE_CONTRACT))
        return [c for c in coins if (c.txid, c.vout) not in spent]

    def holdings_sat(self) -> int:
        return sum(c.amount_sat for c in self.held_coins())

    async def audit(self) -> Optional[str]:
        """The circuit breaker's check, against my own bitcoind (docs/bridge.md, "Circuit breaker"): every coin
        the books hold is in the UTXO set with its value (or spent by the confirmed transaction of a batch in
        flight), and the books agree with the L2 state: holdings - pending peg-outs = the L2 money that came in
        through the bridge, which the L2 supply covers. None when all holds, else what does not."""
        with self._read_state() as r:
            view = StateView(r.get_state)
            totals = bridge_totals(view)
            sup = Supply.decode(bytes(r.get_state(SUPPLY_KEY) or bytes(24)))
        bridged = totals.pegged_in_sat - totals.pending_out_sat - totals.paid_out_sat
        held = self.held_coins()
        books = sum(c.amount_sat for c in held)
        if books - totals.pending_out_sat != bridged:
            return (f"the books hold {books} sat; with {totals.pending_out_sat} sat of peg-outs pending that is not "
                    f"the {bridged} sat the L2 state says came in through the bridge")
        if bridged > sup.minted_sat - sup.burned_sat:
            return f"{bridged} sat came in through the bridge, more than the L2 supply {sup.minted_sat - sup.burned_sat}"
        in_flight = {(c.txid, c.vout): b for b in self.batches.values() if b.status != "completed"
                     for c in b.coin_objs()}
        for c in held:
            out = await self.rpc.call("gettxout", [c.txid[::-1].hex(), c.vout, False])
            if out is None:
                b = in_flight.get((c.txid, c.vout))
                if b is not None and b.txid and any([await self._confirmations(t)
                                                     for t in [b.txid, *(h["txid"] for h in b.history)]]):
                    continue  # spent by the batch's own transaction, confirmed but not yet completed
                return f"coin {c.outpoint} ({c.amount_sat} sat) is not in my bitcoind's UTXO set"
            value = round(Decimal(str(out["value"])) * 100_000_000)
            if value != c.amount_sat:
                return f"coin {c.outpoint} holds {value} sat on chain, {c.amount_sat} sat in the books"
        return None

    async def _breaker_closed(self) -> bool:
        """Run the check; while it fails nothing is signed (logged when it trips and when it resets)."""
        why = await self.audit()
        if why != self.halted:
            if why is None:
                log.warning("bridge: circuit breaker reset: the federation's coins match the books again")
            else:
                log.warning("bridge: circuit breaker tripped, signing no peg-outs: %s", why)
            self.halted = why
        return why is None

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
        if self.headers is not None:
            await self.relay_headers()
        for b in sorted(self.batches.values(), key=lambda b: b.id):
            if b.status != "completed":
                await self._advance(b)
        await self._start_batch()

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
    async def _feerate(self) -> int:
        est = await self.rpc.estimatesmartfee(6)
        rate = self.fee_fallback if est is None else -(-est // 1000)
        return max(1, min(rate, self.fee_max))

    async def _start_batch(self) -> None:
        anchored = self.confirmed_anchor_height()
        if anchored is None:
            return
        busy = {pid for b in self.batches.values() for pid in b.pegouts}
        todo = [(pid, e) for pid, e in self.pegouts()
                if e.status == PegoutStatus.PENDING and e.l2_height <= anchored and pid.hex() not in busy]
        if not todo or not await self._breaker_closed():
            return
        rate = await self._feerate()
        try:
            plan = plan_batch(self.fed, self.network, self.coins(),
                              [Pegout(pid, e.script_pubkey, e.amount_sat) for pid, e in todo], rate)
        except InsufficientFunds as e:
            log.warning("bridge: cannot pay %d peg-outs yet: %s", len(todo), e)
            return
        b = Batch(id=max(self.batches, default=0) + 1, pegouts=[p.pegout_id.hex() for p in plan.pegouts],
                  anchor_height=anchored, feerate_sat_vb=rate, change_sat=plan.change_sat,
                  coins=[{"txid": c.txid[::-1].hex(), "vout": c.vout, "amount_sat": c.amount_sat,
                          "contract": c.contract.hex()} for c in plan.coins],
                  psbt=build_psbt(self.fed, self.network, plan).hex())
        self._save(b)
        self.batches[b.id] = b
        log.info("bridge: batch %d for %d peg-outs, fee %d sat", b.id, len(b.pegouts), plan.fee_sat)
        await self._advance(b)

    def _sign(self, b: Batch) -> None:
        ids = [bytes.fromhex(p) for p in b.pegouts]
        signed = []
        for s in self.signers:
            try:
                signed.append(s.sign(bytes.fromhex(b.psbt), ids, b.anchor_height))
            except FederationError as e:
                log.warning("bridge: signer %s refused batch %d: %s", s.pubkey.hex(), b.id, e)
        if not signed:
            return
        psbt = combine(signed)
        raw, txid = finalize(psbt)  # raises QuorumError below the threshold
        b.psbt, b.raw, b.txid, b.status = psbt.hex(), raw.hex(), txid[::-1].hex(), "signed"
        self._save(b)  # the transaction is on disk before it is broadcast

    async def _advance(self, b: Batch) -> None:
        if b.status == "signing":
            if not await self._breaker_closed():
                return
            try:
                self._sign(b)
            except FederationError as e:
                log.warning("bridge: batch %d not signed: %s", b.id, e)
                return
            if b.status != "signed":
                return
        await self._record(b, PegoutStatus.BROADCAST)
        if b.status == "signed":
            await self._broadcast(b.raw)
            b.broadcast_height, b.status = await self.rpc.getblockcount(), "broadcast"
            self._save(b)
            return
        # broadcast: find which of its transactions (current or replaced) confirmed
        for cand in [{"txid": b.txid, "raw": b.raw}, *b.history]:
            conf = await self._confirmations(cand["txid"])
            if conf > 0 and cand["txid"] != b.txid:  # an earlier transaction won the race
                b.history = [h for h in b.history if h["txid"] != cand["txid"]] + [{"txid": b.txid, "raw": b.raw}]
                b.txid, b.raw = cand["txid"], cand["raw"]
                self._save(b)
                await self._record(b, PegoutStatus.BROADCAST)
            if conf >= self.confirmations:
                await self._record(b, PegoutStatus.COMPLETED)
                if all(e.status == PegoutStatus.COMPLETED for _, e in self._entries(b)):
                    b.status = "completed"
                    self._save(b)
                    log.info("bridge: batch %d completed in %s", b.id, b.txid)
                return
            if conf > 0:
                return
        await self._broadcast(b.raw)
        if await self.rpc.getblockcount() - b.broadcast_height >= self.rbf_after_blocks:
            await self._replace(b)

    async def _replace(self, b: Batch) -> None:
        rate = max(b.feerate_sat_vb * 2, b.feerate_sat_vb + 1)
        if rate > self.fee_max:
            return
        ids = [bytes.fromhex(p) for p in b.pegouts]
        entries = dict(self._entries(b))
        pegouts = [Pegout(pid, entries[pid].script_pubkey, entries[pid].amount_sat) for pid in ids]
        try:
            plan = plan_batch(self.fed, self.network, b.coin_objs(), pegouts, rate)
        except InsufficientFunds as e:
            log.warning("bridge: cannot bump batch %d: %s", b.id, e)
            return
        if [(c.txid, c.vout) for c in plan.coins] != [(c.txid, c.vout) for c in b.coin_objs()]:
            return  # the same coins or no replacement: a replacement must conflict with what was signed
        b.history.append({"txid": b.txid, "raw": b.raw})
        b.feerate_sat_vb, b.psbt, b.status = rate, build_psbt(self.fed, self.network, plan).hex(), "signing"
        self._save(b)
        log.info("bridge: replacing %s of batch %d at %d sat/vB", b.txid, b.id, rate)
        await self._advance(b)

    def _entries(self, b: Batch) -> list[tuple[bytes, PegoutEntry]]:
        out = []
        for pid in b.pegouts:
            v = self._get(pegout_key(bytes.fromhex(pid)))
            if v is not None:
                out.append((bytes.fromhex(pid), PegoutEntry.decode(v)))
        return out

    async def _record(self, b: Batch, status: PegoutStatus) -> None:
        """Put status with the batch's txid into the L2 state for every peg-out not already there."""
        txid = bytes.fromhex(b.txid)[::-1]
        for pid, e in self._entries(b):
            if e.btc_txid == txid and e.status >= status:
                continue
            key = (pid.hex(), int(status), b.txid)
            if self._pending(key):
                continue
            try:
                self._submit(PegoutUpdate(pid, status, txid, b.anchor_height))
            except DuplicateDuty:  # recorded already (another member, or this one before a restart): done
                log.info("bridge: peg-out %s %s already recorded", pid.hex(), status.name)
                continue
            except Rejected as e2:  # e.g. the BROADCAST record is not committed yet: retried next step
                log.info("bridge: peg-out %s %s not recorded yet: %s", pid.hex(), status.name, e2)
                continue
            self._submitted[key] = self._l2_height()

    async def _broadcast(self, raw_hex: str) -> None:
        try:
            await self.rpc.sendrawtransaction(bytes.fromhex(raw_hex))
        except RPCAlreadyInChain:
            pass
        except RPCError as e:
            if isinstance(e, RPCTransient):
                raise
            log.warning("bridge: broadcast refused: %s", e)

    async def _confirmations(self, txid_hex: str) -> int:
        try:
            r = await self.rpc.call("getrawtransaction", [txid_hex, True])
        except RPCTransient:
            raise
        except RPCError:
            return 0
        return int(r.get("confirmations", 0) or 0)
