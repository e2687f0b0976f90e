"""Anchor service: commits every K-th L2 block's state root to Bitcoin and follows each anchor to FINAL.

Owned by the node (the composition root), which hands it everything through the constructor: the RPC client
(or None: then anchors are built and stored with status BUILT, never broadcast), the federation secret, the
network, and callbacks to read committed L2 headers and to submit an AnchorUpdate L2 transaction.

Policy (docs/anchoring.md):
* Funding: federation coins are P2TR key-path outputs of the federation key (BIP86-style tweak, no script
  tree). They are found with ``scantxoutset`` on their exact scriptPubKey (no wallet needed, confirmed coins
  only). In Taproot mode the previous anchor output (confirmed, checked with ``gettxout``) is spent too, by
  the key path tweaked with its script tree, and the new anchor is the only output: the anchor is the
  federation's change. In OP_RETURN mode the change goes back to the federation key-path output.
* One anchor in flight: a new anchor is built only when every earlier one is CONFIRMED or FINAL; it is for
  the latest eligible height (a multiple of K), so heights reached meanwhile are skipped, never queued.
  Each record names its predecessor (prev_link = previous record's link).
* Fees: estimatesmartfee(6) (sat/kvB), else the configured fallback, capped at fee_max; nSequence signals
  RBF. testmempoolaccept always runs before sendrawtransaction.
* RBF: an anchor unconfirmed for rbf_after_blocks Bitcoin blocks is rebuilt over the same inputs with the
  same record and a fee of at least old fee + 1 sat/vB x vsize (the default incremental relay fee), capped.
* Reorgs: a disconnected anchor block moves the anchor back to SUBMITTED; it is rebroadcast, and if bitcoind
  refuses it (inputs gone or conflicting) it is rebuilt from fresh inputs with the same record.
* The L2 state learns every status change after the first confirmation (CONFIRMED, FINAL, and SUBMITTED
  again after a reorg) through an AnchorUpdate signed by the federation key.
* Persistence: one JSON record per anchored L2 height in the store's ``anchors`` database (written on the
  store's writer thread); on restart the records are reloaded and reconciled against bitcoind.
"""
from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

from bridge.chain_tracker import ChainTracker, ChainTrackerError, Connected, Disconnected
from bridge.federation import signed_transaction
from bridge.rpc import BitcoinRPC, hash_from_hex, hash_to_hex
from bridge.rpc_errors import RPCAlreadyInChain, RPCInvalidAddressOrKey, RPCVerifyError, RPCVerifyRejected
from bridge.steps import run_steps
from l2d.config import AnchoringConfig
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_format import NO_PREVIOUS, AnchorRecord, TaprootAnchor, op_return_script
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.block import BlockHeader
from l2d.core.errors import DuplicateDuty, Rejected
from l2d.core.params import NETWORKS, Network
from l2d.core.payload import Payload
from l2d.core.pegs import CoinKind, FedCoin, Federation
from l2d.core.pegs_tx import MAX_PLAN_INPUTS, AnchorMode, AnchorPlan
from l2d.core.plans import (ZERO, AnchorPlanRecord, PlanUnderfunded, anchor_output, anchor_plan_key, anchor_policy,
                            anchor_tip, plan_entry, plan_tx, plan_versions, price_anchor, signatures_by_key)
from l2d.core.state import Namespace, StateView

from .btc_tx import P2TR_DUST_SAT, Prevout, SignedTx, TxOut, build_signed, estimate_vsize, key_path_script

log = logging.getLogger(__name__)

FEE_CONF_TARGET = 6
INCREMENTAL_RELAY_SAT_PER_VB = 1
MAX_INPUTS = 50
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
    inputs: list[dict[str, Any]] = field(default_factory=list)
    fee_sat: int = 0
    vsize: int = 0
    btc_block_hash: Optional[str] = None
    btc_height: Optional[int] = None
    confirmations: int = 0
    submit_btc_height: Optional[int] = None
    submitted_at: Optional[float] = None
    committed_at: Optional[float] = None  # when the L2 block was committed (this process), for latency
    accept_latency_ms: Optional[float] = None
    replaced_txids: list[str] = field(default_factory=list)
    l2_status: Optional[str] = None  # status last submitted to the L2 state
    # Write-ahead: a signed transaction about to be broadcast, with what to record once bitcoind has it (txid,
    # raw_tx, inputs, fee_sat, vsize, replaced). Saved before the broadcast, cleared after it; a restart finishes it.
    sending: Optional[dict[str, Any]] = None

    def encode(self) -> bytes:
        d = asdict(self)
        d["status"] = self.status.value
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Anchor":
        d = json.loads(raw)
        d["status"] = AnchorState(d["status"])
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
    def __init__(self, *, config: AnchoringConfig, network: Network, federation_secret: bytes,
                 federation_key: bytes, rpc: Optional[BitcoinRPC], store: Any,
                 tip: Callable[[], BlockHeader], header_at: Callable[[int], Optional[BlockHeader]],
                 submit_update: Callable[[Payload], Any],
                 snapshot_bytes: Callable[[int], Optional[bytes]],
                 zmq_hashblock: str = "", zmq_sequence: str = "", bitcoin_chain: str = "regtest",
                 federation: Optional[Federation] = None) -> None:
        self.config = config
        # anchors as plans of the federation (anchoring.signer = "federation"): proposed here, signed by m members'
        # bridges, followed here; None: this member signs alone with the anchor key
        self.fed = federation if config.signer == "federation" else None
        self._proposed: dict[int, int] = {}  # anchored height -> my L2 tip when I last proposed its plan
        self.network = network
        self._secret = federation_secret
        self.federation_key = federation_key
        self.rpc = rpc
        self.store = store
        self._tip = tip
        self._header_at = header_at
        self._submit_update = submit_update
        self._snapshot_bytes = snapshot_bytes
        self._zmq = {topic: ep for topic, ep in (("hashblock", zmq_hashblock), ("sequence", zmq_sequence)) if ep}
        self._bitcoin_chain = bitcoin_chain
        self.fed_script = key_path_script(federation_key)
        self.anchors: dict[int, Anchor] = {}
        self._committed_at: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tracker: Optional[ChainTracker] = None
        self._reconciled = False
        self._chain_checked = False
        self._warned: set[str] = set()
        self.btc_tip_height: Optional[int] = None

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
            await run_steps(self.step, self._wake, poll, "anchor service",
                            lambda e: self._warn_once("transient", "anchoring: bitcoind unavailable (%s); retrying", e))
        finally:
            if zmq_task is not None:
                zmq_task.cancel()
                await asyncio.gather(zmq_task, return_exceptions=True)

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
                async for ev in sub.events():  # only a trigger: the chain tracker re-reads everything over RPC
                    backoff = 0.1
                    if isinstance(ev, (BlockHashEvent, ResyncEvent)) or (
                            isinstance(ev, SequenceEvent) and ev.label in block_labels):
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
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
            if self.fed is not None:
                await self._plans_in_flight()
            else:
                await self._handle_in_flight()
            await self._start_new()
            await self._write_l2_updates()

    # -- offline (no bitcoind) ----------------------------------------------------------------------------------
    def _eligible(self) -> Optional[int]:
        h = self._tip().height
        e = h - h % self.config.every_blocks
        last = max(self.anchors) if self.anchors else 0
        if self.fed is not None:
            last = max(last, anchor_tip(self.store.get_state).l2_height)
        return e if e > last else None

    def _new_anchor(self, height: int) -> Optional[Anchor]:
        header = self._header_at(height)
        if header is None:
            return None
        # The predecessor is the latest anchor that reached Bitcoin (offline: the latest built one).
        sent = [a for a in self.anchors.values() if a.txid is not None or self.rpc is None]
        prev = max(sent, key=lambda a: a.l2_height) if sent else None
        prev_link = NO_PREVIOUS if prev is None else _record(prev.record).link
        if self.fed is not None:  # the federation's anchor chain is in the state
            prev_link = anchor_tip(self.store.get_state).link
        record = AnchorRecord(self.network.id, height, header.state_root, prev_link)
        spk = self._anchor_script(record)
        return Anchor(l2_height=height, state_root=header.state_root.hex(), record=record.encode().hex(),
                      mode=self.config.mode, status=AnchorState.BUILT, script_pubkey=spk.hex(),
                      committed_at=self._committed_at.pop(height, None))

    def _anchor_script(self, record: AnchorRecord) -> bytes:
        if self.config.mode != "taproot":
            return op_return_script(record)
        if self.fed is not None:
            return anchor_output(self.fed, record.link).script_pubkey
        return TaprootAnchor(record, self.federation_key).script_pubkey

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
                log.info("a replaced version of the anchor was mined", extra={"l2_height": l2_height, "txid": txid})
                a = replace(a, txid=txid, raw_tx=raw.hex(), replaced_txids=[t for t in a.replaced_txids if t != txid]
                            + ([a.txid] if a.txid else []))
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

    # -- in-flight anchors: rebroadcast, RBF, or first broadcast -----------------------------------------------------
    async def _handle_in_flight(self) -> None:
        rpc = self.rpc
        if rpc is None:
            return
        await self._finish_sending()
        older_in_flight = False
        for h in sorted(self.anchors):  # oldest first: a later anchor may spend an older one's output
            a = self.anchors[h]
            if a.status == AnchorState.SUBMITTED and a.btc_block_hash is None and a.raw_tx and a.txid:
                in_flight_below, older_in_flight = older_in_flight, True
                try:
                    await rpc.getmempoolentry(hash_from_hex(a.txid))
                    in_mempool = True
                except RPCInvalidAddressOrKey:
                    in_mempool = False
                if not in_mempool:
                    try:
                        await rpc.sendrawtransaction(bytes.fromhex(a.raw_tx))
                        log.info("anchor rebroadcast", extra={"l2_height": a.l2_height, "txid": a.txid})
                    except RPCAlreadyInChain:
                        pass  # found by the block scan
                    except (RPCVerifyRejected, RPCVerifyError) as e:
                        if in_flight_below:
                            # An older anchor went back to the mempool (a reorg) and this one, built on it or on
                            # the coins it spends, is invalid: it waits, unbroadcast, until the older one is mined
                            # (then it is the newest BUILT anchor, sent as usual). Rebuilding it now could take
                            # the only coins the older one needs.
                            log.warning("anchor %s no longer valid (%s): it waits until the older anchor in flight "
                                        "is mined", a.txid, e)
                            await self._save(replace(a, status=AnchorState.BUILT, txid=None, raw_tx=None,
                                                     anchor_vout=None, inputs=[], fee_sat=0, vsize=0,
                                                     submit_btc_height=None, submitted_at=None,
                                                     replaced_txids=[*a.replaced_txids, a.txid]))
                            continue
                        log.warning("anchor %s no longer valid (%s): rebuilding it from fresh inputs", a.txid, e)
                        await self._fund_and_send(a, rebuild=True)
                elif (self.btc_tip_height is not None and a.submit_btc_height is not None
                      and self.btc_tip_height - a.submit_btc_height >= self.config.rbf_after_blocks):
                    await self._bump(a)
        waiting = self._waiting_for_funds()
        if waiting is not None and not any(a.status == AnchorState.SUBMITTED for a in self.anchors.values()):
            await self._fund_and_send(waiting)

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
        if self.fed is not None:
            await self._propose(a)
        else:
            await self._fund_and_send(a)

    # -- anchors as plans of the federation (anchoring.signer = "federation") ------------------------------------
    async def _propose(self, a: Anchor) -> None:
        """Post the AnchorPlan of `a`: the previous anchor output (if any) and the largest free funding coins that
        pay the fee at my rate. The members' bridges sign it; at most once per 5 L2 blocks."""
        fed, rpc = self.fed, self.rpc
        if fed is None or rpc is None:
            return
        l2_tip = self._tip().height
        if l2_tip < self._proposed.get(a.l2_height, -10) + 5:
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
        plan = AnchorPlan(a.l2_height, mode, record.state_root, record.prev_link, rate, ZERO,
                          tuple((c.btc_txid, c.vout) for c in take))
        self._proposed[a.l2_height] = l2_tip
        try:
            self._submit_update(plan)
            log.info("anchor plan proposed", extra={"l2_height": a.l2_height, "inputs": len(take), "rate": rate})
        except DuplicateDuty:
            pass  # another member posted the same plan
        except Rejected as e:  # e.g. another member's plan is in flight: followed by _plans_in_flight
            log.info("anchor plan for L2 height %d not accepted: %s", a.l2_height, e)

    async def _plans_in_flight(self) -> None:
        """Follow the state's anchor plan in flight (mine or another member's): once a version with m signatures
        is in my bitcoind (the bridges broadcast it), the anchor is SUBMITTED with that txid, the other signed
        versions as replaced txids for the block scan; a waiting anchor without a plan is proposed."""
        fed, rpc = self.fed, self.rpc
        if fed is None or rpc is None:
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
        with self.store.reader() as r:
            view = StateView(r.get_state)
            signed = []
            for v, e in plan_versions(r.get_state, tip.open):
                sigs = signatures_by_key(r.get_state, fed, v)
                if len(sigs) >= fed.threshold:
                    signed.append((v, signed_transaction(fed, self.network, plan_tx(view, fed, self.network.id, e),
                                                         sigs)))
        mine = None
        for v, raw in signed:  # newest first: the version my bitcoind has (mempool or chain)
            try:
                info = await rpc.call("getrawtransaction", [hash_to_hex(v), True])
                mine = (v, raw)
                break
            except RPCInvalidAddressOrKey:
                continue
        if mine is None:
            return
        txid = hash_to_hex(mine[0])
        others = [hash_to_hex(v) for v, _ in signed if v != mine[0]]
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
        await self._save(replace(a, status=AnchorState.SUBMITTED, txid=txid, raw_tx=(mine[1] or b"").hex(),
                                 anchor_vout=0, replaced_txids=others, accept_latency_ms=latency,
                                 submit_btc_height=submit_height, submitted_at=a.submitted_at or now))
        log.info("anchor plan broadcast", extra={"l2_height": h, "txid": txid})

    async def _fee_rate(self) -> int:
        """sat/vB: estimatesmartfee, else the fallback; capped at fee_max."""
        rpc = self.rpc
        est = None if rpc is None else await rpc.estimatesmartfee(FEE_CONF_TARGET)
        rate = self.config.fee_fallback_sat_per_vb if est is None else -(-est // 1000)
        return max(1, min(rate, self.config.fee_max_sat_per_vb))

    async def _inputs(self, for_anchor: Anchor) -> list[Prevout]:
        rpc = self.rpc
        if rpc is None:
            return []
        busy = {(i["txid"], i["vout"]) for a in self.anchors.values() if a.status == AnchorState.SUBMITTED
                and a.l2_height != for_anchor.l2_height for i in a.inputs}  # spent by another in-flight anchor
        out: list[Prevout] = []
        if self.config.mode == "taproot":
            prev = [a for a in self.anchors.values() if a.mode == "taproot" and a.txid and a.status in
                    (AnchorState.CONFIRMED, AnchorState.FINAL) and a.anchor_vout is not None]
            if prev:
                p = max(prev, key=lambda x: x.l2_height)
                txo = await rpc.call("gettxout", [p.txid, p.anchor_vout, True])  # None if spent, mempool too
                if txo is not None:
                    rec = _record(p.record)
                    out.append(Prevout(hash_from_hex(p.txid or ""), p.anchor_vout or 0,
                                       _btc_sat(txo["value"]), bytes.fromhex(p.script_pubkey),
                                       TaprootAnchor(rec, self.federation_key).merkle_root))
        scan = await rpc.call("scantxoutset", ["start", [f"raw({self.fed_script.hex()})"]], idempotent=False)
        for u in sorted(scan.get("unspents", []), key=lambda u: (-_btc_sat(u["amount"]), u["txid"], u["vout"])):
            if len(out) >= MAX_INPUTS:
                break
            if (hash_from_hex(u["txid"]).hex(), int(u["vout"])) in busy:
                continue
            out.append(Prevout(hash_from_hex(u["txid"]), int(u["vout"]), _btc_sat(u["amount"]), self.fed_script))
        return out

    def _outputs(self, a: Anchor, value: int) -> list[TxOut]:
        if a.mode == "taproot":
            return [TxOut(value, bytes.fromhex(a.script_pubkey))]
        return [TxOut(0, bytes.fromhex(a.script_pubkey)), TxOut(value, self.fed_script)]

    def _sign(self, a: Anchor, inputs: list[Prevout], fee: int) -> SignedTx:
        total = sum(i.amount_sat for i in inputs)
        return build_signed(self._secret, inputs, self._outputs(a, total - fee), os.urandom(32))

    async def _fund_and_send(self, a: Anchor, *, rebuild: bool = False) -> None:
        inputs = await self._inputs(a)
        if not inputs:
            self._warn_once("nofunds", "anchoring: no federation coins to fund anchor transactions; send coins "
                            "to the federation key-path output (scriptPubKey %s)", self.fed_script.hex())
            return
        rate = await self._fee_rate()
        vsize = estimate_vsize(len(inputs), self._outputs(a, 0))
        fee = rate * vsize
        await self._sign_test_send(a, inputs, fee, replaced=a.txid if rebuild else None)

    async def _bump(self, a: Anchor) -> None:
        """RBF: same inputs, same record, higher fee."""
        inputs = [Prevout(bytes.fromhex(i["txid"]), i["vout"], i["amount_sat"], bytes.fromhex(i["script_pubkey"]),
                          None if i["merkle_root"] is None else bytes.fromhex(i["merkle_root"])) for i in a.inputs]
        vsize = estimate_vsize(len(inputs), self._outputs(a, 0))
        fee = max(a.fee_sat + INCREMENTAL_RELAY_SAT_PER_VB * vsize, (await self._fee_rate()) * vsize)
        cap = self.config.fee_max_sat_per_vb * vsize
        if fee > cap:
            self._warn_once(f"rbfcap:{a.txid}", "anchor %s: fee bump capped by fee_max_sat_per_vb; waiting", a.txid)
            return
        log.info("anchor fee bump (RBF)", extra={"l2_height": a.l2_height, "old_fee": a.fee_sat, "fee": fee})
        await self._sign_test_send(a, inputs, fee, replaced=a.txid)

    async def _sign_test_send(self, a: Anchor, inputs: list[Prevout], fee: int, replaced: Optional[str]) -> None:
        rpc = self.rpc
        if rpc is None:
            return
        total = sum(i.amount_sat for i in inputs)
        min_change = P2TR_DUST_SAT
        if total - fee < min_change:
            self._warn_once(f"dust:{a.l2_height}", "anchoring: federation coins (%d sat) do not cover the fee "
                            "(%d sat) and a non-dust anchor output", total, fee)
            return
        signed = self._sign(a, inputs, fee)
        res = (await rpc.testmempoolaccept([signed.raw]))[0]
        if not res.allowed:
            self._warn_once(f"reject:{a.l2_height}:{res.reject_reason}", "anchor transaction for L2 height %d "
                            "refused by testmempoolaccept: %s %s", a.l2_height, res.reject_reason,
                            res.reject_details or "")
            return
        sending = {"txid": signed.txid_hex, "raw_tx": signed.raw.hex(), "fee_sat": signed.fee_sat,
                   "vsize": signed.vsize, "replaced": replaced,
                   "inputs": [{"txid": i.txid.hex(), "vout": i.vout, "amount_sat": i.amount_sat,
                               "script_pubkey": i.script_pubkey.hex(),
                               "merkle_root": None if i.merkle_root is None else i.merkle_root.hex()}
                              for i in inputs]}
        # Saved before the broadcast, recorded after it: a stop or crash in between is finished at the restart
        # (_finish_sending), so no transaction spending the anchor chain is ever broadcast unrecorded.
        a = replace(a, sending=sending)
        await self._save(a)
        await rpc.sendrawtransaction(signed.raw)
        await self._record_sent(a)

    async def _record_sent(self, a: Anchor, *, mined: bool = False) -> None:
        """The write-ahead transaction of `a` is in bitcoind's mempool (or, mined, in its chain): record it as the
        anchor's transaction."""
        rpc, sent = self.rpc, a.sending
        if rpc is None or sent is None:
            return
        now = time.time()
        tip = None if mined else await rpc.getblockcount()  # mined: no submit height, the rescan looks back
        replaced = sent["replaced"]
        replaced_txids = list(a.replaced_txids) + ([replaced] if replaced else [])
        latency = a.accept_latency_ms
        if latency is None and a.committed_at is not None:
            latency = round((now - a.committed_at) * 1000, 3)
        new = replace(a, status=AnchorState.SUBMITTED, txid=sent["txid"], raw_tx=sent["raw_tx"], anchor_vout=0,
                      fee_sat=sent["fee_sat"], vsize=sent["vsize"], btc_block_hash=None, btc_height=None,
                      confirmations=0, submit_btc_height=tip, submitted_at=now, replaced_txids=replaced_txids,
                      accept_latency_ms=latency, inputs=sent["inputs"], sending=None)
        await self._save(new)
        log.info("anchor submitted", extra={"l2_height": a.l2_height, "txid": sent["txid"], "fee_sat": sent["fee_sat"],
                                            "vsize": sent["vsize"], "replaces": replaced})

    async def _finish_sending(self) -> None:
        """After a restart: broadcast again and record a transaction saved but maybe never broadcast or recorded."""
        rpc = self.rpc
        if rpc is None:
            return
        for a in list(self.anchors.values()):
            if a.sending is None:
                continue
            try:
                await rpc.sendrawtransaction(bytes.fromhex(a.sending["raw_tx"]))
            except RPCAlreadyInChain:  # mined while stopped: record it and rescan the chain for its block
                await self._record_sent(a, mined=True)
                self._reconciled = False
                continue
            except (RPCVerifyRejected, RPCVerifyError) as e:  # its inputs went elsewhere: it was never the anchor
                log.warning("anchor %s: the transaction saved before a stop is no longer valid (%s); dropped",
                            a.sending["txid"], e)
                await self._save(replace(a, sending=None))
                continue
            await self._record_sent(a)

    # -- audit bundle ---------------------------------------------------------------------------------------------------
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
        taproot = a.mode == "taproot"
        kofn = taproot and self.fed is not None  # the federation's k-of-n output, not the anchor key's
        header, raw_commit = self._header_at(l2_height), self.store.get_commit(l2_height)
        # version 2: the anchored block's commit (anchors commit final heights: it is stored; block 0 has none)
        commit = (CommitEvidence(header, Commit.decode(raw_commit))
                  if l2_height > 0 and header is not None and raw_commit else None)
        kind = AnchorKind.TAPROOT_KOFN if kofn else AnchorKind.TAPROOT if taproot else AnchorKind.OP_RETURN
        bundle = AuditBundle(self.network.id, record, kind, self.federation_key if kind == AnchorKind.TAPROOT else b"",
                             bytes.fromhex(a.raw_tx), merkleblock, start, b"".join(headers), evidence, commit,
                             kofn=anchor_policy(self.fed) if kofn and self.fed is not None else None)
        return bundle.encode()


def _btc_sat(v: Any) -> int:
    from decimal import Decimal

    from bridge.rpc import btc_to_sat
    return btc_to_sat(Decimal(str(v)) if not isinstance(v, Decimal) else v)


