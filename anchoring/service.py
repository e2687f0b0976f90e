"""Anchor service: commits every K-th L2 block's state root to Bitcoin and follows each anchor to FINAL.

Owned by the node (the composition root), which hands it everything through the constructor: the federation (the
bridge's k-of-n keys), the RPC client (or None: then anchors are built and stored with status BUILT, never
broadcast), the network, and callbacks to read committed L2 headers and to submit L2 transactions as this member.

Anchors are plans of the federation (docs/anchoring.md, docs/bridge.md "Plans"); no member signs one alone:
* Propose: for the newest final L2 height that is a multiple of K, this service posts an AnchorPlan (the record,
  the previous anchor output and the largest free funding coins that pay the fee at its estimatesmartfee rate,
  capped at fee_max; the funding coins enter the state with `l2-cli federation-fund`). In Taproot mode the anchor
  output is the k-of-n script path under BIP341's NUMS key and is spent by the next anchor (the anchor is the
  federation's change); in OP_RETURN mode the change is a federation coin. Consensus fixes the transaction.
* Sign, broadcast, fee-bump: every member's bridge signs the plan in its own process (it checks the root is its
  own block's), any member holding k signatures broadcasts it, and a starved plan is replaced at a higher rate
  (bridge.rbf_after_blocks) by a version spending the same coins.
* Follow: this service marks its anchor SUBMITTED once a signed version is in its own bitcoind, follows the chain
  (a reorg moves a mined anchor back to SUBMITTED; the bridges rebroadcast it) and tells the L2 state every status
  change after the first confirmation (CONFIRMED, FINAL, SUBMITTED again after a reorg) with an AnchorUpdate; the
  FINAL update completes the plan. One anchor in flight: heights reached meanwhile are skipped, never queued; each
  record names its predecessor (prev_link = the previous record's link, from the state's anchor chain).
* Persistence: one JSON record per anchored L2 height in the store's ``anchors`` database (written on the store's
  writer thread); on restart the records are reloaded and reconciled against bitcoind.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

from bitcoin.core import CTransaction

from bridge.chain_tracker import ChainTracker, ChainTrackerError, Connected, Disconnected
from bridge.federation import signed_transaction
from bridge.rpc import BitcoinRPC, hash_from_hex, hash_to_hex
from bridge.rpc_errors import RPCInvalidAddressOrKey
from bridge.steps import run_steps
from l2d.config import AnchoringConfig
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_format import NO_PREVIOUS, AnchorRecord, op_return_script
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.block import BlockHeader
from l2d.core.errors import DuplicateDuty, Rejected
from l2d.core.params import NETWORKS, Network
from l2d.core.payload import Payload
from l2d.core.pegs import CoinKind, FedCoin, Federation, coin_key
from l2d.core.pegs_tx import MAX_PLAN_INPUTS, AnchorMode, AnchorPlan
from l2d.core.plans import (SUPERSEDE_AFTER, ZERO, AnchorPlanRecord, AnchorTip, PlanEntry, PlanUnderfunded,
                            anchor_output, anchor_plan_key, anchor_policy, anchor_tip, plan_entry, plan_tx,
                            plan_versions, price_anchor, signatures_by_key)
from l2d.core.state import Namespace, StateView

log = logging.getLogger(__name__)

FEE_CONF_TARGET = 6
RESCAN_LIMIT = 2000  # blocks searched for a SUBMITTED anchor after a restart
HEADERS_BELOW_ANCHOR = 10  # the audit bundle's header chain starts this many blocks below the anchor block
_ZERO = b"\0" * 32


class AnchorState(str, enum.Enum):
    BUILT = "BUILT"  # record and payload stored, nothing broadcast (no bitcoind, or no funds yet)
    SUBMITTED = "SUBMITTED"  # accepted by bitcoind's mempool
    CONFIRMED = "CONFIRMED"  # in a best-chain block with >= confirmations
    FINAL = "FINAL"  # >= final_confirmations


@dataclass
class Anchor:
    """The service's record of one anchored L2 height (persisted as JSON; hashes in display hex)."""

    l2_height: int
    state_root: str
    record: str  # AnchorRecord.encode() hex
    mode: str
    status: AnchorState
    script_pubkey: str  # the output carrying the anchor
    txid: Optional[str] = None
    raw_tx: Optional[str] = None
    anchor_vout: Optional[int] = None
    fee_sat: int = 0
    vsize: int = 0
    btc_block_hash: Optional[str] = None
    btc_height: Optional[int] = None
    confirmations: int = 0
    submit_btc_height: Optional[int] = None
    submitted_at: Optional[float] = None
    committed_at: Optional[float] = None  # when the L2 block was committed (this process), for latency
    status_at: Optional[float] = None  # when it reached its current status (for the stage metrics)
    accept_latency_ms: Optional[float] = None
    replaced_txids: list[str] = field(default_factory=list)
    l2_status: Optional[str] = None  # status last submitted to the L2 state

    def encode(self) -> bytes:
        d = asdict(self)
        d["status"] = self.status.value
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Anchor":
        d = json.loads(raw)
        d["status"] = AnchorState(d["status"])
        for gone in ("inputs", "sending"):  # kept by the single anchor key's service (removed); nothing uses them
            d.pop(gone, None)
        return cls(**d)

    def to_json(self) -> dict[str, Any]:
        """The public view (REST)."""
        return {"l2_height": self.l2_height, "state_root": self.state_root, "status": self.status.value,
                "mode": self.mode, "txid": self.txid, "btc_block_hash": self.btc_block_hash,
                "btc_height": self.btc_height, "confirmations": self.confirmations, "fee_sat": self.fee_sat,
                "vsize": self.vsize, "record": self.record, "link": self.anchor_record_link,
                "replaced_txids": list(self.replaced_txids), "accept_latency_ms": self.accept_latency_ms}

    @property
    def anchor_record_link(self) -> str:
        return _record(self.record).link.hex()


_NETWORK_BY_ID = {n.id: n for n in NETWORKS.values()}


def _record(record_hex: str) -> AnchorRecord:
    """Decode a stored record (its own network byte picks the network)."""
    raw = bytes.fromhex(record_hex)
    return AnchorRecord.decode(raw, _NETWORK_BY_ID[raw[5]])


class AnchorService:
    def __init__(self, *, config: AnchoringConfig, network: Network, federation: Federation,
                 rpc: Optional[BitcoinRPC], store: Any,
                 tip: Callable[[], BlockHeader], header_at: Callable[[int], Optional[BlockHeader]],
                 submit_update: Callable[[Payload], Any],
                 snapshot_bytes: Callable[[int], Optional[bytes]],
                 zmq_hashblock: str = "", zmq_sequence: str = "", bitcoin_chain: str = "regtest",
                 on_stage: Optional[Callable[[str, float], None]] = None) -> None:
        """on_stage(status, seconds): called when an anchor reaches a status, with the time since its previous one
        (BUILT: since its L2 block was committed), for the daemon's metrics."""
        self.config = config
        self._on_stage = on_stage
        self.fed = federation  # anchors are its plans: proposed here, signed by m members' bridges, followed here
        self._proposed: dict[int, int] = {}  # anchored height -> my L2 tip when I last proposed its plan
        self._expected: set[bytes] = set()  # the versions of the anchor plan in flight (txids, internal order)
        # those of them with m signatures: (fee, signed transaction), made once (signatures only accumulate, and any m
        # of them give the same txid)
        self._signed: dict[bytes, tuple[int, bytes]] = {}
        self.network = network
        self.rpc = rpc
        self.store = store
        self._tip = tip
        self._header_at = header_at
        self._submit_update = submit_update
        self._snapshot_bytes = snapshot_bytes
        self._zmq = {topic: ep for topic, ep in (("hashblock", zmq_hashblock), ("sequence", zmq_sequence)) if ep}
        self._bitcoin_chain = bitcoin_chain
        self.anchors: dict[int, Anchor] = {}
        self._committed_at: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tracker: Optional[ChainTracker] = None
        self._reconciled = False
        self._chain_checked = False
        self._warned: set[str] = set()
        self.btc_tip_height: Optional[int] = None
        self.bitcoind_error: Optional[str] = None  # why the last step could not reach bitcoind (None: it could)
        self.zmq_error: Optional[str] = None  # why the ZMQ subscription is down (None: up, or not configured)

    # -- state ------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Reload the stored anchors; what the L2 state holds is re-read from the committed state (an update
        admitted to the mempool but not committed before a restart is lost with the mempool: resubmit it)."""
        for height, raw in self.store.iter_anchors():
            a = Anchor.decode(raw)
            committed = self.store.get_state(anchor_key(height))
            a.l2_status = None if committed is None else AnchorEntry.decode(committed).status.name
            self.anchors[height] = a
        if self.anchors:
            log.info("anchor service loaded %d anchor(s); latest L2 height %d", len(self.anchors), max(self.anchors))

    async def _save(self, a: Anchor) -> None:
        before = self.anchors.get(a.l2_height)
        if before is None or before.status != a.status:
            now = time.time()
            since = a.committed_at if before is None else before.status_at
            if since is not None and self._on_stage is not None:
                self._on_stage(a.status.value, max(0.0, now - since))
            a.status_at = now
        self.anchors[a.l2_height] = a
        await self.store.put_anchor_async(a.l2_height, a.encode())

    @property
    def broadcasting(self) -> bool:
        """True when a bitcoind is configured: anchors are broadcast and tracked, not only built."""
        return self.rpc is not None

    @property
    def mode(self) -> str:
        """How the state root is committed: "taproot" or "op_return"."""
        return self.config.mode

    @property
    def every_blocks(self) -> int:
        return self.config.every_blocks

    def all_anchors(self) -> list[Anchor]:
        return [self.anchors[h] for h in sorted(self.anchors)]

    def latest(self) -> Optional[Anchor]:
        return self.anchors[max(self.anchors)] if self.anchors else None

    def anchored_snapshots_needed(self, heights: Sequence[int], keep_final: int) -> set[int]:
        """Of the anchored snapshot files at these L2 heights, those an audit bundle may still need
        (docs/anchoring.md, "Anchored snapshots"): the anchors not yet FINAL that may still reach Bitcoin or be
        audited (SUBMITTED, CONFIRMED, and the newest anchor if it is BUILT, waiting for funds), the newest
        keep_final FINAL ones, the newest final L2 height above every anchor (the next anchor is built there or
        higher: final heights passed meanwhile are skipped, never anchored later), and the heights above the
        final one (not final yet: one of them becomes the next candidate). Older BUILT anchors are never
        broadcast.
        """
        live = {AnchorState.SUBMITTED, AnchorState.CONFIRMED}
        needed = {h for h, a in self.anchors.items() if a.status in live}
        newest = self.latest()
        if newest is not None and newest.status == AnchorState.BUILT:
            needed.add(newest.l2_height)
        final = sorted(h for h, a in self.anchors.items() if a.status == AnchorState.FINAL)
        needed.update(final[len(final) - keep_final:] if keep_final else [])
        above = [h for h in heights if newest is None or h > newest.l2_height]
        final_height = self._tip().height  # anchors commit final heights only
        settled = [h for h in above if h <= final_height]
        if settled:
            needed.add(max(settled))
        needed.update(h for h in above if h > final_height)
        return needed & set(heights)

    def notify_block(self, header: BlockHeader) -> None:
        """A block was committed (called by the node; never blocks)."""
        if header.height % self.config.every_blocks == 0:
            self._committed_at[header.height] = time.time()
        self._wake.set()

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # -- main loop --------------------------------------------------------------------------------------------
    async def run(self) -> None:
        if self.rpc is None:
            log.warning("anchoring: no bitcoind configured (bitcoind.rpc_url is empty): anchors are built and "
                        "stored with status BUILT but NOT broadcast")
        zmq_task: Optional[asyncio.Task[None]] = None
        if self.rpc is not None:
            self._tracker = ChainTracker(self.rpc, window=max(144, self.config.final_confirmations + 10))
            if self._zmq:
                zmq_task = asyncio.create_task(self._zmq_loop(), name="anchor-zmq")
        poll = self.config.poll_interval_ms / 1000
        try:
            await run_steps(self._step_reached, self._wake, poll, "anchor service", self._unreachable)
        finally:
            if zmq_task is not None:
                zmq_task.cancel()
                await asyncio.gather(zmq_task, return_exceptions=True)

    async def _step_reached(self) -> None:
        await self.step()
        self.bitcoind_error = None

    def _unreachable(self, e: Exception) -> None:
        self.bitcoind_error = str(e) or type(e).__name__
        self._warn_once("transient", "anchoring: bitcoind unavailable (%s); retrying", e)

    async def _zmq_loop(self) -> None:
        from bridge.zmq_sub import BlockHashEvent, ResyncEvent, SequenceEvent, SequenceLabel, ZmqSubscriber

        if self.rpc is None:
            return
        block_labels = (SequenceLabel.BLOCK_CONNECTED, SequenceLabel.BLOCK_DISCONNECTED)
        backoff = 0.1
        while True:  # a failed subscription is logged and re-opened; the RPC poll covers the gap
            sub = ZmqSubscriber(self._zmq, self.rpc)
            try:
                sub.start()
                self.zmq_error = None
                async for ev in sub.events():  # only a trigger: the chain tracker re-reads everything over RPC
                    backoff = 0.1
                    if isinstance(ev, (BlockHashEvent, ResyncEvent)) or (isinstance(ev, SequenceEvent) and (
                            ev.label in block_labels
                            or (ev.label == SequenceLabel.TX_ADDED and ev.hash in self._expected))):
                        self._wake.set()  # a block, or a version of the plan in flight broadcast by a bridge
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.zmq_error = str(e) or type(e).__name__
                log.exception("anchoring: ZMQ subscription failed; re-subscribing in %.1fs", backoff)
            finally:
                sub.close()
            self._wake.set()  # whatever was missed, the next step re-reads the chain over RPC
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def step(self) -> None:
        """One pass: follow the chain, move anchors along, bump or rebroadcast, and start a new anchor."""
        async with self._lock:
            if self.rpc is None:
                await self._build_offline()
                return
            if not self._chain_checked:
                await self.rpc.require_chain(self._bitcoin_chain)
                self._chain_checked = True
            await self._follow_chain()
            await self._advance_confirmations()
            await self._write_l2_updates()
            await self._plans_in_flight()
            await self._start_new()
            await self._write_l2_updates()

    # -- offline (no bitcoind) ----------------------------------------------------------------------------------
    def _eligible(self) -> Optional[int]:
        h = self._tip().height
        e = h - h % self.config.every_blocks
        last = max(max(self.anchors) if self.anchors else 0, anchor_tip(self.store.get_state).l2_height)
        return e if e > last else None

    def _new_anchor(self, height: int) -> Optional[Anchor]:
        header = self._header_at(height)
        if header is None:
            return None
        # The predecessor: the federation's anchor chain is in the state (offline: the latest built anchor).
        prev = self.latest()
        if self.rpc is not None:
            prev_link = anchor_tip(self.store.get_state).link
        else:
            prev_link = NO_PREVIOUS if prev is None else _record(prev.record).link
        record = AnchorRecord(self.network.id, height, header.state_root, prev_link)
        spk = self._anchor_script(record)
        return Anchor(l2_height=height, state_root=header.state_root.hex(), record=record.encode().hex(),
                      mode=self.config.mode, status=AnchorState.BUILT, script_pubkey=spk.hex(),
                      committed_at=self._committed_at.pop(height, None))

    def _anchor_script(self, record: AnchorRecord) -> bytes:
        if self.config.mode != "taproot":
            return op_return_script(record)
        return anchor_output(self.fed, record.link).script_pubkey

    async def _build_offline(self) -> None:
        e = self._eligible()
        if e is None:
            return
        a = self._new_anchor(e)
        if a is not None:
            await self._save(a)
            log.info("anchor built (not broadcast: no bitcoind)", extra={"l2_height": e, "root": a.state_root})

    # -- chain following ------------------------------------------------------------------------------------------
    async def _follow_chain(self) -> None:
        rpc, tracker = self.rpc, self._tracker
        if rpc is None or tracker is None:
            return
        try:
            events = await tracker.sync()
        except ChainTrackerError as e:
            log.error("anchoring: chain tracker lost the chain (%s); starting over from bitcoind's tip", e)
            self._tracker = ChainTracker(rpc, window=max(144, self.config.final_confirmations + 10))
            self._reconciled = False
            events = []
            await self._tracker.sync()
        tip = self._tracker.tip if self._tracker is not None else None
        self.btc_tip_height = None if tip is None else tip.height
        if not self._reconciled:
            await self._reconcile()
            self._reconciled = True
        for ev in events:
            if isinstance(ev, Disconnected):
                for a in list(self.anchors.values()):
                    if a.btc_block_hash == ev.block_hash_hex:
                        log.warning("anchor block disconnected: anchor back to SUBMITTED",
                                    extra={"l2_height": a.l2_height, "txid": a.txid, "block": ev.block_hash_hex})
                        await self._save(replace(a, status=AnchorState.SUBMITTED, btc_block_hash=None,
                                                 btc_height=None, confirmations=0,
                                                 submit_btc_height=ev.height - 1))
            elif isinstance(ev, Connected):
                pending = self._pending_txids()
                if pending:
                    await self._scan_block(ev.height, ev.block_hash, pending)

    def _pending_txids(self, only: Optional[int] = None) -> dict[str, int]:
        """txid -> L2 height of the unmined SUBMITTED anchors, their RBF-replaced txids included (the miner may
        have taken an earlier version)."""
        out: dict[str, int] = {}
        for a in self.anchors.values():
            if a.status == AnchorState.SUBMITTED and a.txid is not None and a.btc_block_hash is None and (
                    only is None or a.l2_height == only):
                for t in (*a.replaced_txids, a.txid):
                    out[t] = a.l2_height
        return out

    async def _scan_block(self, height: int, block_hash: bytes, pending: dict[str, int]) -> None:
        rpc = self.rpc
        if rpc is None:
            return
        blk = await rpc.call("getblock", [hash_to_hex(block_hash), 1])
        for txid in blk.get("tx", []):
            l2_height = pending.get(txid)
            if l2_height is None:
                continue
            a = self.anchors[l2_height]
            if txid != a.txid:  # an earlier (replaced) version was mined: it is the anchor now
                raw = await rpc.getrawtransaction(hash_from_hex(txid), block_hash)
                version = plan_entry(self.store.get_state, hash_from_hex(txid))
                log.info("a replaced version of the anchor was mined", extra={"l2_height": l2_height, "txid": txid})
                a = replace(a, txid=txid, raw_tx=raw.hex(), replaced_txids=[t for t in a.replaced_txids if t != txid]
                            + ([a.txid] if a.txid else []), vsize=_vsize(raw),
                            fee_sat=a.fee_sat if version is None else version.fee_sat)
            log.info("anchor mined", extra={"l2_height": a.l2_height, "txid": txid, "btc_height": height})
            await self._save(replace(a, status=AnchorState.CONFIRMED if self.config.confirmations <= 1
                                     else AnchorState.SUBMITTED, btc_block_hash=hash_to_hex(block_hash),
                                     btc_height=height))

    async def _reconcile(self) -> None:
        """After a (re)start: re-check every unfinished anchor against bitcoind's best chain."""
        rpc = self.rpc
        if rpc is None:
            return
        for a in list(self.anchors.values()):
            if a.btc_block_hash is not None and a.status != AnchorState.FINAL:
                info = await rpc.getblockheader(hash_from_hex(a.btc_block_hash), True)
                if info.confirmations < 0:
                    log.warning("anchor block left the best chain while stopped", extra={"l2_height": a.l2_height})
                    await self._save(replace(a, status=AnchorState.SUBMITTED, btc_block_hash=None, btc_height=None,
                                             confirmations=0, submit_btc_height=info.height - 1))
        tip = self.btc_tip_height
        for a in list(self.anchors.values()):
            if a.status == AnchorState.SUBMITTED and a.btc_block_hash is None and a.txid and tip is not None:
                start = max(0, (a.submit_btc_height or 0) + 1, tip - RESCAN_LIMIT)
                for h in range(start, tip + 1):
                    bh = await rpc.getblockhash(h)
                    await self._scan_block(h, bh, self._pending_txids(only=a.l2_height))
                    if self.anchors[a.l2_height].btc_block_hash is not None:
                        break

    async def _advance_confirmations(self) -> None:
        tip = self.btc_tip_height
        if tip is None:
            return
        for a in list(self.anchors.values()):
            if a.btc_height is None or a.status == AnchorState.FINAL:
                continue
            confs = tip - a.btc_height + 1
            status: AnchorState = a.status
            if confs >= self.config.final_confirmations:
                status = AnchorState.FINAL
            elif confs >= self.config.confirmations:
                status = AnchorState.CONFIRMED
            if status != a.status or confs != a.confirmations:
                if status != a.status:
                    log.info("anchor %s", status.value.lower(), extra={"l2_height": a.l2_height, "txid": a.txid,
                                                                      "confirmations": confs})
                await self._save(replace(a, status=status, confirmations=confs))

    async def _write_l2_updates(self) -> None:
        for a in self.all_anchors():
            if a.status == AnchorState.BUILT or a.txid is None:
                continue
            if a.status == AnchorState.SUBMITTED and a.l2_status in (None, AnchorState.SUBMITTED.value):
                continue  # the state learns about an anchor from its first confirmation on
            if a.l2_status == a.status.value:
                continue
            confirmed = a.status != AnchorState.SUBMITTED
            upd = AnchorUpdate(a.l2_height, bytes.fromhex(a.state_root), hash_from_hex(a.txid),
                               hash_from_hex(a.btc_block_hash) if confirmed and a.btc_block_hash else _ZERO,
                               (a.btc_height or 0) if confirmed else 0,
                               {AnchorState.SUBMITTED: AnchorStatus.SUBMITTED, AnchorState.CONFIRMED:
                                AnchorStatus.CONFIRMED, AnchorState.FINAL: AnchorStatus.FINAL}[a.status])
            try:
                self._submit_update(upd)
            except DuplicateDuty:  # the state records exactly this already (an earlier run, another member): done
                log.info("anchor update already recorded", extra={"l2_height": a.l2_height, "status": a.status.value})
            except Exception as e:  # mempool full, key mismatch...: retried on the next step
                self._warn_once(f"l2:{a.l2_height}:{a.status.value}", "anchor update not admitted to the L2 "
                                "mempool (%s); will retry", e)
                continue
            await self._save(replace(a, l2_status=a.status.value))

    def _waiting_for_funds(self) -> Optional[Anchor]:
        """The newest anchor, if it is BUILT (not broadcast yet). Older BUILT ones (made while no bitcoind was
        configured) stay BUILT: only the newest state is worth anchoring."""
        a = self.latest()
        return a if a is not None and a.status == AnchorState.BUILT else None

    async def _start_new(self) -> None:
        if self._waiting_for_funds() is not None or any(a.status == AnchorState.SUBMITTED
                                                         for a in self.anchors.values()):
            return  # one anchor in flight at a time
        e = self._eligible()
        if e is None:
            return
        a = self._new_anchor(e)
        if a is None:
            return
        await self._save(a)
        await self._propose(a)

    # -- anchors as plans of the federation ------------------------------------------------------------------------
    async def _propose(self, a: Anchor) -> None:
        """Post the AnchorPlan of `a`: the previous anchor output (if any) and the largest free funding coins that
        pay the fee at my rate. The members' bridges sign it; at most once per 5 L2 blocks."""
        fed, rpc = self.fed, self.rpc
        if rpc is None:
            return
        if self._tip().height < self._proposed.get(a.l2_height, -10) + 5:
            return
        tip = anchor_tip(self.store.get_state)
        if tip.open != ZERO or a.l2_height <= tip.l2_height:
            return  # one anchor plan at a time; _plans_in_flight follows the one in flight
        record = _record(a.record)
        if record.prev_link != tip.link:  # built before the previous anchor completed: chain it to that one
            record = AnchorRecord(self.network.id, a.l2_height, record.state_root, tip.link)
            a = replace(a, record=record.encode().hex(), script_pubkey=self._anchor_script(record).hex())
            await self._save(a)
        with self.store.reader() as r:
            coins = [FedCoin.decode(bytes(v)) for _, v in r.iter_prefix(bytes((Namespace.FED_COIN,)))]
        take = [c for c in coins if (c.btc_txid, c.vout) == (tip.coin_txid, tip.coin_vout)]
        funding = sorted((c for c in coins if c.kind == CoinKind.FUNDING and c.spent_by == ZERO),
                         key=lambda c: (-c.amount_sat, c.btc_txid, c.vout))
        mode = AnchorMode.TAPROOT if a.mode == "taproot" else AnchorMode.OP_RETURN
        rec = AnchorPlanRecord(mode, record.state_root, record.prev_link)
        rate = await self._fee_rate()
        while True:
            try:
                if not take:
                    raise PlanUnderfunded("no coin")
                price_anchor(fed, self.network.id, take, rec, a.l2_height, rate)
                break
            except PlanUnderfunded as e:
                if not funding or len(take) == MAX_PLAN_INPUTS:
                    self._warn_once(f"nofunds:{a.l2_height}", "anchoring: the federation's funding coins do not pay "
                                    "the anchor of L2 height %d (%s); fund them (l2-cli federation-fund)",
                                    a.l2_height, e)
                    return
                take.append(funding.pop(0))
        self._post(AnchorPlan(a.l2_height, mode, record.state_root, record.prev_link, rate, ZERO,
                              tuple((c.btc_txid, c.vout) for c in take)))

    def _post(self, plan: AnchorPlan) -> None:
        self._proposed = {h: t for h, t in self._proposed.items() if h >= plan.l2_height}  # older: done with
        self._proposed[plan.l2_height] = self._tip().height
        try:
            self._submit_update(plan)
            log.info("anchor plan proposed", extra={"l2_height": plan.l2_height, "inputs": len(plan.inputs),
                                                    "rate": plan.feerate_sat_vb,
                                                    "replaces": hash_to_hex(plan.replaces) if plan.replaces != ZERO
                                                    else None})
        except DuplicateDuty:
            pass  # another member posted the same plan
        except Rejected as e:  # e.g. another member's plan is in flight: followed by _plans_in_flight
            log.info("anchor plan for L2 height %d not accepted: %s", plan.l2_height, e)

    async def _supersede(self, entry: PlanEntry, tip: AnchorTip) -> None:
        """The plan in flight commits a root that is not my block's at its height, and no version of it has m
        signatures SUPERSEDE_AFTER L2 blocks after its last version: the members refuse it, so nothing of it can
        ever be broadcast. Post a version spending the same coins (consensus allows nothing else) for the newest
        eligible height, with my own root. (A plan of my own root waits for signatures however long: a member down
        is not mended by a new version.) At most once per 5 L2 blocks."""
        l2 = self._tip().height
        if l2 + 1 - entry.l2_height < SUPERSEDE_AFTER:
            return
        theirs = AnchorPlanRecord.decode(self.store.get_state(anchor_plan_key(entry.anchor_height)) or b"")
        mine = self._header_at(entry.anchor_height)
        if mine is None or mine.state_root == theirs.state_root:
            return
        h = l2 - l2 % self.config.every_blocks
        if h <= entry.anchor_height or l2 < self._proposed.get(h, -10) + 5:
            return
        a = self.anchors.get(h) or self._new_anchor(h)  # chained to the state's anchor tip, with my block's root
        if a is None:
            return
        record = _record(a.record)
        mode = AnchorMode.TAPROOT if a.mode == "taproot" else AnchorMode.OP_RETURN
        with self.store.reader() as r:
            coins = [FedCoin.decode(bytes(r.get_state(coin_key(t, v)) or b"")) for t, v in entry.inputs]
        rate = await self._fee_rate()
        try:
            price_anchor(self.fed, self.network.id, coins, AnchorPlanRecord(mode, record.state_root,
                                                                            record.prev_link), h, rate)
        except PlanUnderfunded as e:
            self._warn_once(f"supersede:{h}", "anchoring: cannot supersede anchor plan %s at %d sat/vB: %s",
                            hash_to_hex(tip.open), rate, e)
            return
        await self._save(a)
        log.warning("anchoring: anchor plan %s commits root %s for L2 height %d, not my block's, and has no %d "
                    "signatures: superseding it", hash_to_hex(tip.open), theirs.state_root.hex(), entry.anchor_height,
                    self.fed.threshold)
        self._post(AnchorPlan(h, mode, record.state_root, record.prev_link, rate, tip.open, entry.inputs))

    async def _plans_in_flight(self) -> None:
        """Follow the state's anchor plan in flight (mine or another member's): once a version with m signatures
        is in my bitcoind (the bridges broadcast it), the anchor is SUBMITTED with that txid, the other signed
        versions as replaced txids for the block scan; a waiting anchor without a plan is proposed."""
        fed, rpc = self.fed, self.rpc
        if rpc is None:
            return
        get = self.store.get_state
        tip = anchor_tip(get)
        if tip.open == ZERO:
            waiting = self._waiting_for_funds()
            if waiting is not None and waiting.l2_height > tip.l2_height:
                await self._propose(waiting)
            return
        entry = plan_entry(get, tip.open)
        if entry is None:
            return
        self._expected = {v for v, _ in plan_versions(get, tip.open)}  # their broadcast wakes me (ZMQ sequence)
        h = entry.anchor_height
        a = self.anchors.get(h)
        if a is None:  # another member's plan: adopt its record
            rec = AnchorPlanRecord.decode(get(anchor_plan_key(h)) or b"")
            record = rec.record(self.network.id, h)
            a = Anchor(l2_height=h, state_root=rec.state_root.hex(), record=record.encode().hex(),
                       mode="taproot" if rec.mode == AnchorMode.TAPROOT else "op_return", status=AnchorState.BUILT,
                       script_pubkey=self._anchor_script(record).hex(), committed_at=self._committed_at.pop(h, None))
            await self._save(a)
        if a.btc_block_hash is not None:
            return  # mined: the chain follower takes it on
        self._signed = {v: x for v, x in self._signed.items() if v in self._expected}
        with self.store.reader() as r:
            view = StateView(r.get_state)
            signed = []
            for v, e in plan_versions(r.get_state, tip.open):
                got = self._signed.get(v)
                if got is None:
                    sigs = signatures_by_key(r.get_state, fed, v)
                    raw = signed_transaction(fed, self.network, plan_tx(view, fed, self.network.id, e), sigs)
                    if raw is None:  # fewer than m signatures
                        continue
                    got = self._signed[v] = (e.fee_sat, raw)
                signed.append((v, *got))
        if not signed:
            await self._supersede(entry, tip)
            return
        mine = None
        for v, fee, raw in signed:  # newest first: the version my bitcoind has (mempool or chain)
            try:
                info = await rpc.call("getrawtransaction", [hash_to_hex(v), True])
                mine = (v, fee, raw)
                break
            except RPCInvalidAddressOrKey:
                continue
        if mine is None:
            return
        txid = hash_to_hex(mine[0])
        others = [hash_to_hex(v) for v, _, _ in signed if v != mine[0]]
        if a.txid == txid and a.replaced_txids == others:
            return
        submit_height = a.submit_btc_height or await rpc.getblockcount()
        if isinstance(info, dict) and info.get("blockhash"):  # mined before a step saw it: rescan from its block
            submit_height = (await rpc.getblockheader(hash_from_hex(info["blockhash"]), True)).height - 1
            self._reconciled = False
        now = time.time()
        latency = a.accept_latency_ms
        if latency is None and a.committed_at is not None:
            latency = round((now - a.committed_at) * 1000, 3)
        await self._save(replace(a, status=AnchorState.SUBMITTED, txid=txid, raw_tx=mine[2].hex(), fee_sat=mine[1],
                                 vsize=_vsize(mine[2]), anchor_vout=0, replaced_txids=others, accept_latency_ms=latency,
                                 submit_btc_height=submit_height, submitted_at=a.submitted_at or now))
        log.info("anchor plan broadcast", extra={"l2_height": h, "txid": txid})

    async def _fee_rate(self) -> int:
        """sat/vB: estimatesmartfee, else the fallback; capped at fee_max."""
        rpc = self.rpc
        est = None if rpc is None else await rpc.estimatesmartfee(FEE_CONF_TARGET)
        rate = self.config.fee_fallback_sat_per_vb if est is None else -(-est // 1000)
        return max(1, min(rate, self.config.fee_max_sat_per_vb))

    # -- audit bundle --------------------------------------------------------------------------------------------
    async def audit_bundle(self, l2_height: int) -> Optional[bytes]:
        """The encoded audit bundle of a CONFIRMED/FINAL anchor, or None if there is none (yet)."""
        from l2d.core.audit import AnchorKind, AuditBundle, CommitEvidence, ProofEvidence, SnapshotEvidence
        from l2d.core.commit import Commit

        a = self.anchors.get(l2_height)
        rpc = self.rpc
        if (rpc is None or a is None or a.status not in (AnchorState.CONFIRMED, AnchorState.FINAL)
                or a.txid is None or a.btc_block_hash is None or a.btc_height is None or a.raw_tx is None):
            return None
        block_hash = hash_from_hex(a.btc_block_hash)
        merkleblock = await rpc.gettxoutproof([hash_from_hex(a.txid)], block_hash)
        start = max(0, a.btc_height - HEADERS_BELOW_ANCHOR)
        for _ in range(3):  # the tip may move (or reorg) while headers are read: retry until they link
            tip = await rpc.getblockcount()
            hashes = await asyncio.gather(*(rpc.getblockhash(h) for h in range(start, tip + 1)))
            headers = await asyncio.gather(*(rpc.getblockheader(h) for h in hashes))
            if all(headers[i][4:36] == hashes[i - 1] for i in range(1, len(headers))):
                break
        else:
            return None
        snap = self._snapshot_bytes(l2_height)
        evidence: Any = (SnapshotEvidence(snap) if snap is not None
                         else ProofEvidence(bytes.fromhex(a.state_root)))
        record = _record(a.record)
        kofn = a.mode == "taproot"  # the federation's k-of-n output
        header, raw_commit = self._header_at(l2_height), self.store.get_commit(l2_height)
        # version 2: the anchored block's commit (anchors commit final heights: it is stored; block 0 has none)
        commit = (CommitEvidence(header, Commit.decode(raw_commit))
                  if l2_height > 0 and header is not None and raw_commit else None)
        kind = AnchorKind.TAPROOT_KOFN if kofn else AnchorKind.OP_RETURN
        bundle = AuditBundle(self.network.id, record, kind, b"", bytes.fromhex(a.raw_tx), merkleblock, start,
                             b"".join(headers), evidence, commit, kofn=anchor_policy(self.fed) if kofn else None)
        return bundle.encode()


def _vsize(raw: bytes) -> int:
    return -(-CTransaction.deserialize(raw).calc_weight() // 4)
