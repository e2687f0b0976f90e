"""The daemon side of the member protocol: runs one Member (machine.py) against this node's ledger, mempool, signer
file and peers (docs/federation.md, "The host").

Every input (a peer's message, a fetched block, local news, the timer) is handed to the machine on the event loop,
one at a time, and the actions it returns are performed in order before the next input: PersistSigner is written
and fsynced (in a thread) before a Broadcast that may carry the signature; StoreBlock goes to LMDB (in the writer's
thread, under the tree lock) before anything builds on it. A failed PersistSigner or StoreBlock ends the host (and
the node): nothing may be signed on top of a state that did not reach the disk.

The BlockLogic the machine asks about blocks: build (from the mempool, on the parent the machine names),
consensus_valid (re-execute every transaction, strictly: one invalid transaction rejects the block, and the
roots must be the header's) and policy_ok (the local signing policy: the timestamp against my clock, and what the
block claims about Bitcoin against my own bitcoind: bridge/claims.py). The bitcoind's answer comes later than the
question: policy_ok says no for now, asks in the background, and wakes the machine when the answer is in, so the
machine considers the proposal again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Optional, Protocol, Sequence

from .admission import Admission
from .aio import wait_event
from .core.block import Block, BlockHeader
from .core.commit import Commit
from .core.errors import L2Error, Rejected
from .core.members import Membership
from .core.params import Network
from .core.state import Account, account_key
from .core.tx import Transaction, check_signature
from .core.tx import decode as decode_tx
from .federation.machine import (Action, Broadcast, FetchBlocks, Member, PersistSigner, RecordEvidence, StoreBlock,
                                 StoredBlock, Timing, Validity, proposer, timestamp_ok)
from .federation.messages import BlockSignature, Candidate, Equivocation
from .federation.signer import load_state, save_state
from .federation.transport import PeerStats
from .federation.wire import TransportError
from .ledger import BuiltBlock, Ledger, TipMoved, UnknownParent
from .mempool import Mempool
from .metrics import Metrics
from .store import Store

log = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0  # a block fetch from a member logs how far it is this often


def _now() -> float:
    return time.monotonic()

EVIDENCE_FILE = "evidence.jsonl"  # in the data dir: the equivocations this member saw
INBOX_MAX = 10_000  # inputs waiting for the machine; beyond it a peer's message is dropped (it is re-sent)
BUILT_KEPT = 256  # executed blocks kept for storing without re-execution
TXS_KEPT = 100_000  # transaction bodies fetched from peers for proposals
ASK_AGAIN_S = 1.0  # a transaction body still missing is asked of the peers again after this long
CLAIMS_FRESH_S = 2.0  # my bitcoind's verdict on a block's Bitcoin claims is reused for this long, then asked again
CLAIMS_KEPT = 64  # verdicts kept (by block hash)


def wall_ms() -> int:
    return int(time.time() * 1000)


class Refusal(Protocol):
    """Why my bitcoind does not confirm a block's Bitcoin claims (bridge/claims.py): refuted = it contradicts the
    claim of transaction txid (which I then drop from my mempool), rather than cannot confirm it yet."""

    @property
    def reason(self) -> str: ...

    @property
    def txid(self) -> Optional[bytes]: ...

    @property
    def refuted(self) -> bool: ...


class Claims(Protocol):
    """The signing policy on a block's Bitcoin claims, against my own bitcoind (bridge/claims.py)."""

    def relevant(self, txs: Sequence[Transaction]) -> bool: ...

    async def check(self, txs: Sequence[Transaction]) -> Optional[Refusal]: ...


class Peers(Protocol):
    """The member transport as the host uses it (transport.py)."""

    def broadcast(self, raw: bytes) -> None: ...

    def gossip_txs(self, raws: list[bytes]) -> None: ...

    def fetch_blocks(self, peer: int, from_height: int) -> AsyncIterator[tuple[bytes, bytes]]: ...

    async def fetch_txs(self, peer: int, txids: list[bytes]) -> list[bytes]: ...

    def stats(self) -> Mapping[int, PeerStats]: ...


@dataclass(frozen=True, slots=True)
class Evidence:
    proposer: int
    height: int
    round: int
    first: bytes  # the two signed PROPOSAL messages, as received
    second: bytes


class FederationHost:
    def __init__(self, *, network: Network, members: Membership, index: int, secret: bytes, timing: Timing,
                 drift_ms: int, ledger: Ledger, store: Store, mempool: Mempool, admission: Admission,
                 metrics: Metrics, tree_lock: asyncio.Lock, signer_path: Path, evidence_path: Path, max_txs: int,
                 track: Callable[["asyncio.Future[Any]"], None], clock: Callable[[], int] = wall_ms) -> None:
        self.network, self.members, self.index = network, members, index
        self.ledger, self.store, self.mempool, self.admission = ledger, store, mempool, admission
        self.metrics, self.tree_lock, self.signer_path = metrics, tree_lock, signer_path
        self.max_txs, self.drift_ms, self.clock, self._track = max_txs, drift_ms, clock, track
        self.peers: Optional[Peers] = None
        self.ids: tuple[str, ...] = tuple(f"member-{i + 1}" for i in range(members.n))  # the config's, if given
        self.urls: tuple[str, ...] = ("",) * members.n
        self.last_seen: dict[int, float] = {}  # peer -> wall time of its last message
        self.evidence_path = evidence_path
        self.claims: Optional[Claims] = None  # the node sets it when it has a bitcoind
        # block hash -> (monotonic time of the answer, does my bitcoind agree?); a None time: asking
        self._verdicts: OrderedDict[bytes, tuple[Optional[float], bool]] = OrderedDict()
        self.evidence: list[Evidence] = _load_evidence(evidence_path)
        self.committed_locked: Optional[Callable[[BlockHeader], Awaitable[None]]] = None
        self.after_commit: list[Callable[[BlockHeader], None]] = []
        self._built: OrderedDict[bytes, BuiltBlock] = OrderedDict()
        self._invalid: OrderedDict[bytes, None] = OrderedDict()  # proposals whose execution failed
        self._checking: set[bytes] = set()  # proposals being executed in a worker thread
        self._parent_unknown: set[bytes] = set()  # proposals whose parent was not at hand (invalid once)
        self._prebuilt: Optional[BuiltBlock] = None  # my next proposal, built in a worker thread
        self._building = False
        self._executing: set["asyncio.Future[BuiltBlock]"] = set()
        self._txs: OrderedDict[bytes, Transaction] = OrderedDict()  # bodies from peers, signatures checked
        self._inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(INBOX_MAX)
        self._news = asyncio.Event()
        self._woken = False
        self._gossip: list[bytes] = []  # admitted from clients this turn, not yet forwarded
        self._fetching: set[int] = set()
        self._asked: dict[bytes, float] = {}  # txid -> when (monotonic) it was last asked of the peers
        self._background: set["asyncio.Task[None]"] = set()  # fetches from peers, cancelled by close()
        signer = load_state(signer_path, network, members.keys[index])
        self.member = Member(network=network, members=members, index=index, secret=secret, timing=timing,
                             logic=self, final=ledger.final, heads=self._stored_heads(), signer=signer)

    # -- what the machine starts from ------------------------------------------------------------------------
    def _stored_heads(self) -> list[StoredBlock]:
        """The complete children of the final block: the tip when it is not final, and the stored siblings."""
        tip, final = self.ledger.tip, self.ledger.final
        assert tip is not None and final is not None
        if tip.height == final.height:
            return []
        heads = []
        blk = self.ledger.block(tip.height)
        raw_commit = self.store.get_commit(tip.height)
        assert blk is not None and raw_commit is not None
        heads.append(StoredBlock(_candidate(blk), Commit.decode(raw_commit)))
        for raw, commit in self.store.siblings():
            heads.append(StoredBlock(_candidate(Block.decode(raw, self.network)), Commit.decode(commit)))
        return heads

    # -- inputs ----------------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Local news: transactions arrived."""
        self._woken = True
        self._news.set()

    def deliver(self, raw: bytes, peer: int) -> None:
        """A message from a peer (the transport authenticated the connection; the machine checks the signature)."""
        self.last_seen[peer] = time.time()
        self._put(("msg", raw, peer))

    def tx_admitted(self, tx: Transaction, *, from_peer: bool) -> None:
        """Admission accepted tx: forward it to every member once (unless it came from one), then wake. The
        transactions admitted within one turn of the event loop go out together (fewer, larger frames)."""
        if not from_peer and self.peers is not None:
            if not self._gossip:
                try:
                    asyncio.get_running_loop().call_soon(self._flush_gossip)
                except RuntimeError:  # before the loop runs (the saved mempool reloaded at start): run() sends
                    pass
            self._gossip.append(tx.raw)
        self.wake()

    def _flush_gossip(self) -> None:
        raws, self._gossip = self._gossip, []
        if raws and self.peers is not None:
            self.peers.gossip_txs(raws)

    def _put(self, item: tuple[Any, ...]) -> None:
        try:
            self._inbox.put_nowait(item)
        except asyncio.QueueFull:
            self.metrics.federation_dropped.inc()
            return
        self._news.set()

    def status(self) -> dict[str, Any]:
        """What GET /api/federation shows."""
        m = self.member
        final = self.ledger.final
        now = time.time()
        return {
            "threshold": self.members.threshold, "n": self.members.n, "me": self.index,
            "members": [{"index": i, "id": self.ids[i], "key": k.hex(), "url": self.urls[i],
                         "last_seen_s_ago": None if i not in self.last_seen else round(now - self.last_seen[i], 3),
                         "height": m.height if i == self.index else m.peer_height(i),
                         "evidence": sum(1 for e in self.evidence if e.proposer == i)}
                        for i, k in enumerate(self.members.keys)],
            "height": m.height, "round": m.round, "proposer": proposer(m.height, m.round, self.members.n),
            "final_height": None if final is None else final.height, "evidence": len(self.evidence),
            "behind": m.behind(), "catching_up_from": sorted(self._fetching),
        }

    # -- serving peers ---------------------------------------------------------------------------------------
    def serve_blocks(self, from_height: int, max_count: int) -> list[tuple[bytes, bytes]]:
        """Stored blocks with their commits from from_height (up to the tip)."""
        out = []
        with self.store.reader() as r:
            for h in range(max(from_height, 1), from_height + max_count):
                raw, commit = r.get_block(h), r.get_commit(h)
                if raw is None or commit is None:
                    break
                out.append((bytes(raw), bytes(commit)))
        return out

    def serve_txs(self, txids: Sequence[bytes]) -> list[bytes]:
        """The bodies I have: pending, fetched for proposals, or committed (a member that holds a block pending for
        a body asks for it after the others committed it)."""
        out = []
        blocks: dict[int, Optional[Block]] = {}  # each block decoded once per request
        for t in txids:
            tx = self.mempool.get(t) or self._txs.get(t)
            if tx is None:
                loc = self.store.tx_location(t)
                if loc is not None:
                    if loc[0] not in blocks:
                        blocks[loc[0]] = self.ledger.block(loc[0])
                    blk = blocks[loc[0]]
                    tx = None if blk is None else blk.txs[loc[1]]
            if tx is not None:
                out.append(tx.raw)
        return out

    # -- the loop --------------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Drive the machine until stop is set; stop is checked before every input, so the block at hand is stored
        and nothing is started after it."""
        self._flush_gossip()
        self._links()
        await self._perform(self.member.start(self.clock()))
        last = (self.member.height, self.member.round)
        while not stop.is_set():
            self._links()
            wait_ms = self.member.deadline - self.clock()
            if wait_ms > 0 and not self._news.is_set():
                await wait_event(self._news, wait_ms / 1000)
            self._news.clear()
            while not self._inbox.empty() and not stop.is_set():
                await self._input(self._inbox.get_nowait())
            if self._woken and not stop.is_set():
                self._woken = False
                await self._perform(self.member.wake(self.clock()))
            if self.clock() >= self.member.deadline and not stop.is_set():
                await self._perform(self.member.tick(self.clock()))
            now = (self.member.height, self.member.round)
            if now != last:
                self.metrics.federation_rounds.inc(outcome=self._outcome(last, now))
                last = now

    def _links(self) -> None:
        """Tell the machine which members my link to is down (their rounds as proposer end sooner)."""
        if self.peers is not None:
            self.member.set_unreachable(frozenset(i for i, st in self.peers.stats().items() if not st.connected))

    def _outcome(self, last: tuple[int, int], now: tuple[int, int]) -> str:
        """How round last ended: a new height (entered), or the next round of the same height after a proposal or
        with transactions waiting (failed), or with nothing to do (idle: an idle federation's rounds time out)."""
        if now[0] != last[0]:
            return "entered"
        return "failed" if self.member.proposal_seen(last[1]) or len(self.mempool) else "idle"

    def stop_waiting(self) -> None:
        self._news.set()

    async def _input(self, item: tuple[Any, ...]) -> None:
        kind = item[0]
        try:
            if kind == "msg":
                actions = self.member.receive(item[1], self.clock())
            else:
                _, cand, commit, peer = item
                actions = self.member.receive_block(cand, commit, peer, self.clock())
        except L2Error as e:
            self.metrics.federation_refused.inc(reason=type(e).__name__)
            log.debug("member input refused", extra={"peer": item[-1], "error": type(e).__name__, "detail": str(e)})
            return
        await self._perform(actions)

    async def _perform(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Broadcast):
                if self.peers is not None:
                    self.peers.broadcast(a.message.raw)
                if isinstance(a.message.body, BlockSignature) and a.message.body.block_hash in self._built:
                    ts = self._built[a.message.body.block_hash].header.timestamp_ms
                    self.metrics.federation_precommit.observe(max(0, self.clock() - ts) / 1000)
            elif isinstance(a, PersistSigner):
                await asyncio.shield(asyncio.to_thread(save_state, self.signer_path, a.state, self.network,
                                                       self.members.keys[self.index]))
            elif isinstance(a, StoreBlock):
                fut = asyncio.ensure_future(self._store(a))
                self._track(fut)
                await asyncio.shield(fut)
            elif isinstance(a, FetchBlocks):
                self._fetch_blocks(a.peer, a.from_height)
            elif isinstance(a, RecordEvidence):
                self._record(a.evidence)

    # -- BlockLogic ------------------------------------------------------------------------------------------
    def build(self, parent: BlockHeader, timestamp_ms: int, allow_empty: bool) -> Optional[Candidate]:
        """The block built on parent in a worker thread, once it is ready; until then None, and the thread's end
        wakes the machine (so the event loop keeps serving while a block executes)."""
        ready, self._prebuilt = self._prebuilt, None
        if ready is not None and ready.header.prev_hash == parent.hash:
            if not ready.block.txs and not allow_empty:
                return None
            self._keep(ready)
            return _candidate(ready.block)
        if self._building:
            return None
        with self.store.reader() as r:
            txs = self.mempool.select(self.max_txs, _nonce_reader(r.get_state))
        if not txs and not allow_empty:
            return None
        self._building = True
        self._spawn(self._build(parent, txs, timestamp_ms))
        return None

    async def _build(self, parent: BlockHeader, txs: list[Transaction], timestamp_ms: int) -> None:
        try:
            t0 = time.perf_counter()
            try:
                built = await self._execute(parent, txs, timestamp_ms, signatures_checked=True)
            except TipMoved as e:  # a block was stored meanwhile: the machine asks again on another parent
                log.debug("block built on a parent that stopped being the tip", extra={"error": str(e)})
                return
            self.metrics.block_build.observe(time.perf_counter() - t0)
            if built.rejected:
                self.mempool.drop([t for t, _ in built.rejected])
                for t, e in built.rejected:
                    self.metrics.txs_rejected.inc(stage="block", reason=e.reason)
                    self.admission.remember(t.txid, e.reason)
            self._prebuilt = built
        finally:
            self._building = False
            self.wake()

    async def _execute(self, parent: BlockHeader, txs: Sequence[Transaction], timestamp_ms: int, *,
                       strict: bool = False, signatures_checked: bool = False) -> BuiltBlock:
        """ledger.execute in a worker thread; close() waits for it (a cancelled caller does not stop it)."""
        fut = asyncio.ensure_future(asyncio.to_thread(self.ledger.execute, parent, txs, timestamp_ms, strict=strict,
                                                      signatures_checked=signatures_checked))
        self._executing.add(fut)
        fut.add_done_callback(self._executing.discard)
        return await asyncio.shield(fut)

    def consensus_valid(self, parent: BlockHeader, block: Candidate) -> Validity:
        if block.hash in self._built:
            return Validity.VALID
        if block.hash in self._invalid:
            return Validity.INVALID
        if block.hash in self._parent_unknown:
            self._parent_unknown.discard(block.hash)
            return Validity.INVALID
        txs: list[Transaction] = []
        missing: list[bytes] = []
        for t in block.txids:
            tx = self.mempool.get(t) or self._txs.get(t)
            if tx is None:
                missing.append(t)
            else:
                txs.append(tx)
        if missing:
            self._ask_txs(missing)
            return Validity.PENDING
        if block.hash not in self._checking:
            self._checking.add(block.hash)
            self._spawn(self._check(parent, block, txs))
        return Validity.PENDING

    async def _check(self, parent: BlockHeader, block: Candidate, txs: list[Transaction]) -> None:
        """Execute a proposal in a worker thread: kept if its header is the proposal's, else remembered invalid;
        the machine is woken to ask again."""
        try:
            try:
                built = await self._execute(parent, txs, block.header.timestamp_ms, strict=True,
                                            signatures_checked=True)
            except Rejected as e:
                log.info("block refused: a transaction is invalid",
                         extra={"height": block.height, "reason": e.reason, "hash": block.hash.hex()})
                return self._refuse(block.hash)
            except UnknownParent as e:  # not the block's fault: refused this time, executed again if asked again
                log.warning("block refused: %s", e)
                self._parent_unknown.add(block.hash)
                return None
            except TipMoved as e:  # a block was stored meanwhile: checked again when the machine asks
                log.debug("proposal executed beside a store", extra={"error": str(e)})
                return None
            if built.header != block.header:
                log.info("block refused: re-execution gives another header",
                         extra={"height": block.height, "hash": block.hash.hex()})
                return self._refuse(block.hash)
            self._keep(built)
            return None
        finally:
            self._checking.discard(block.hash)
            self.wake()

    def _refuse(self, block_hash: bytes) -> None:
        self._invalid[block_hash] = None
        while len(self._invalid) > BUILT_KEPT:
            self._invalid.popitem(last=False)

    def policy_ok(self, parent: BlockHeader, block: Candidate, now_ms: int) -> bool:
        if not timestamp_ok(parent, block.header, now_ms, self.drift_ms):
            log.info("not signing: block timestamp outside my clock's window",
                     extra={"height": block.height, "timestamp_ms": block.header.timestamp_ms, "now_ms": now_ms})
            return False
        return self._claims_ok(block)

    def _claims_ok(self, block: Candidate) -> bool:
        """Do the block's Bitcoin claims agree with my bitcoind? From the last answer if it is fresh; else no for
        now, and ask (the machine is woken when the answer is in)."""
        if self.claims is None:
            return True
        built = self._built.get(block.hash)
        if built is None:  # consensus_valid kept it a moment ago; gone only if evicted since: decide next time
            return False
        txs = built.block.txs
        if not self.claims.relevant(txs):
            return True
        asked, agrees = self._verdicts.get(block.hash, (0.0, False))
        if asked is None:
            return False  # an answer is on its way
        if asked and time.monotonic() - asked <= CLAIMS_FRESH_S:
            return agrees
        self._verdicts[block.hash] = (None, False)
        self._verdicts.move_to_end(block.hash)
        while len(self._verdicts) > CLAIMS_KEPT:
            self._verdicts.popitem(last=False)
        self._spawn(self._ask_claims(block.height, block.hash, txs))
        return False

    async def _ask_claims(self, height: int, block_hash: bytes, txs: Sequence[Transaction]) -> None:
        assert self.claims is not None
        try:
            why = await self.claims.check(txs)
        except Exception as e:  # a malformed answer: not a verdict, so not a signature either
            log.warning("not signing: checking the block's Bitcoin claims failed",
                        extra={"height": height, "hash": block_hash.hex(), "error": f"{type(e).__name__}: {e}"})
            self._verdicts[block_hash] = (time.monotonic(), False)
            return
        if why is not None:
            log.info("not signing: my bitcoind does not confirm the block's Bitcoin claims",
                     extra={"height": height, "hash": block_hash.hex(), "reason": why.reason,
                            "refuted": why.refuted})
            if why.refuted and why.txid is not None:  # never propose it myself again: it can only cost rounds
                if self.mempool.drop([t for t in txs if t.txid == why.txid]):
                    self.admission.remember(why.txid, "claim-refuted")
        self._verdicts[block_hash] = (time.monotonic(), why is None)
        self.wake()

    def _keep(self, built: BuiltBlock) -> None:
        self._built[built.header.hash] = built
        while len(self._built) > BUILT_KEPT:
            self._built.popitem(last=False)

    # -- performing actions ----------------------------------------------------------------------------------
    async def _store(self, a: StoreBlock) -> None:
        ledger = self.ledger
        async with self.tree_lock:
            tip, final = ledger.tip, ledger.final
            assert tip is not None and final is not None
            commit = a.commit.encode()
            replaced: Optional[Block] = None
            if a.block.parent == tip.hash:
                built = await self._built_for(a.block)
                new_final = a.final if a.final.hash != final.hash else None
                await asyncio.to_thread(ledger.store_block, built, commit, new_final)
            elif a.block.parent == final.hash and tip.height == a.block.height:  # a sibling of the tip
                built = await self._built_for(a.block)
                if a.head.hash != a.block.hash:
                    await asyncio.to_thread(self.store.put_sibling, a.block.hash, built.raw, commit)
                    return
                replaced = ledger.block(tip.height)
                await asyncio.to_thread(ledger.store_block, built, commit, None)
            else:  # its parent is a sibling of the tip: that sibling becomes the tip, and final
                sib = self._sibling(a.block.parent)
                if sib is None:
                    raise UnknownParent(f"block {a.block.height}: its parent is not stored")
                sib_block, sib_commit = sib
                replaced = ledger.block(tip.height)
                sib_built = await self._execute(final, sib_block.txs, sib_block.header.timestamp_ms, strict=True,
                                                signatures_checked=True)
                await asyncio.to_thread(ledger.store_block, sib_built, sib_commit, None)
                built = await self._built_for(a.block)
                await asyncio.to_thread(ledger.store_block, built, commit, a.final)
            header = built.header
            if self.committed_locked is not None:
                await self.committed_locked(header)
        self._committed(built, replaced)

    async def _built_for(self, block: Candidate) -> BuiltBlock:
        built = self._built.get(block.hash)
        if built is not None:
            return built
        parent = self.ledger.tip if block.parent == self.ledger.tip.hash else self.ledger.final  # type: ignore[union-attr]
        assert parent is not None
        txs = [self.mempool.get(t) or self._txs[t] for t in block.txids]
        built = await self._execute(parent, txs, block.header.timestamp_ms, strict=True, signatures_checked=True)
        if built.header != block.header:
            raise UnknownParent(f"block {block.height} re-executes to another header")
        return built

    def _sibling(self, block_hash: bytes) -> Optional[tuple[Block, bytes]]:
        for raw, commit in self.store.siblings():
            blk = Block.decode(raw, self.network)
            if blk.header.hash == block_hash:
                return blk, commit
        return None

    def _committed(self, built: BuiltBlock, replaced: Optional[Block]) -> None:
        h = built.header
        self.mempool.remove_committed(built.block.txs)
        with self.store.reader() as r:
            pruned = self.mempool.prune(_nonce_reader(r.get_state))
        for t in pruned:
            self.admission.remember(t.txid, "stale-nonce")
        if replaced is not None:  # its transactions that the new tip lacks go back to the mempool
            now_in = {t.txid for t in built.block.txs}
            for t in replaced.txs:
                if t.txid not in now_in:
                    try:
                        self.admission.submit(t.raw)
                    except Rejected:
                        pass
        final = self.ledger.final
        self._built = OrderedDict((k, b) for k, b in self._built.items()
                                  if final is None or b.header.height > final.height)
        self.metrics.blocks_committed.inc()
        self.metrics.txs_committed.inc(len(built.block.txs))
        self.metrics.federation_commit.observe(max(0, self.clock() - h.timestamp_ms) / 1000)
        log.info("block committed", extra={"height": h.height, "txs": h.tx_count, "root": h.state_root.hex(),
                                           "hash": h.hash.hex(),
                                           "final_height": None if final is None else final.height})
        for listener in self.after_commit:
            listener(h)

    def _fetch_blocks(self, peer: int, from_height: int) -> None:
        if self.peers is None or peer in self._fetching:
            return
        self._fetching.add(peer)
        task = self._spawn(self._fetch_from(peer, from_height))
        task.add_done_callback(lambda _: self._fetching.discard(peer))

    async def _fetch_from(self, peer: int, from_height: int) -> None:
        assert self.peers is not None
        logged = _now()
        try:
            async for raw, raw_commit in self.peers.fetch_blocks(peer, from_height):
                blk = Block.decode(raw, self.network)
                if _now() - logged >= PROGRESS_EVERY_S:  # a long catch-up says how far it is
                    logged = _now()
                    log.info("catching up", extra={"peer": peer, "height": blk.header.height,
                                                   "members_report": max(
                                                       (self.member.peer_height(i) or 0 for i in range(self.members.n)),
                                                       default=0)})
                commit = Commit.decode(raw_commit)
                bodies = False
                for tx in blk.txs:
                    if tx.txid not in self._txs and self.mempool.get(tx.txid) is None:
                        check_signature(tx)
                        self._remember_tx(tx)
                        bodies = True
                self._put(("block", _candidate(blk), commit, peer))
                if bodies:  # news for a block the machine holds pending for them (it ignores the fetched copy)
                    self.wake()
                while self._inbox.qsize() > INBOX_MAX // 2:  # let the machine apply them: bounded memory
                    await asyncio.sleep(0.01)
        except (L2Error, OSError, asyncio.TimeoutError, TransportError) as e:
            log.info("block fetch from a member ended: %s", e, extra={"peer": peer})

    def _ask_txs(self, txids: list[bytes]) -> None:
        """Fetch transaction bodies a proposal names and I lack, from every member; wake when some arrive. A txid is
        asked again at most every ASK_AGAIN_S (one nobody has, e.g. named by a lying proposer, must not turn the
        machine's retries into a stream of requests)."""
        if self.peers is None:
            return
        now = time.monotonic()
        new = [t for t in txids if now - self._asked.get(t, -ASK_AGAIN_S) >= ASK_AGAIN_S]
        if not new:
            return
        if len(self._asked) > TXS_KEPT:
            self._asked = {t: at for t, at in self._asked.items() if now - at < ASK_AGAIN_S}
        for t in new:
            self._asked[t] = now
        for peer in range(self.members.n):
            if peer != self.index:
                self._spawn(self._fetch_txs(peer, new))

    async def _fetch_txs(self, peer: int, txids: list[bytes]) -> None:
        assert self.peers is not None
        got = 0
        try:
            raws = await self.peers.fetch_txs(peer, txids)
            wanted = set(txids)
            for raw in raws:
                tx = decode_tx(raw, self.network)
                if tx.txid in wanted and tx.txid not in self._txs:
                    check_signature(tx)
                    self._remember_tx(tx)
                    got += 1
        except (L2Error, OSError, asyncio.TimeoutError, TransportError) as e:
            log.info("transaction fetch from a member failed: %s", e, extra={"peer": peer})
        if got:
            self.wake()

    def _spawn(self, coro: Awaitable[None]) -> "asyncio.Task[None]":
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        """Cancel the fetches from peers still running (the node is stopping)."""
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*self._executing, return_exceptions=True)  # blocks executing in worker threads

    def _remember_tx(self, tx: Transaction) -> None:
        self._txs[tx.txid] = tx
        while len(self._txs) > TXS_KEPT:
            self._txs.popitem(last=False)

    def _record(self, ev: Equivocation) -> None:
        e = Evidence(ev.proposer, ev.height, ev.round, ev.first.raw, ev.second.raw)
        self.evidence.append(e)
        line = json.dumps({"member": e.proposer, "height": e.height, "round": e.round, "first": e.first.hex(),
                           "second": e.second.hex()}) + "\n"
        with open(self.evidence_path, "a") as f:  # kept across restarts; a torn last line is skipped on load
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.metrics.federation_evidence.inc()
        log.warning("equivocation: two proposals from one member in one round",
                    extra={"member": ev.proposer, "height": ev.height, "round": ev.round})


def _load_evidence(path: Path) -> list[Evidence]:
    """The equivocations recorded so far (one JSON object per line; an unreadable line, e.g. torn by a crash, is
    skipped with a warning)."""
    out: list[Evidence] = []
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            d = json.loads(line)
            out.append(Evidence(int(d["member"]), int(d["height"]), int(d["round"]), bytes.fromhex(d["first"]),
                                bytes.fromhex(d["second"])))
        except (ValueError, KeyError, TypeError):
            log.warning("evidence file: a line that cannot be read is skipped", extra={"path": str(path)})
    return out


def _candidate(block: Block) -> Candidate:
    return Candidate(block.header, tuple(t.txid for t in block.txs))


def _nonce_reader(get: Callable[[bytes], Optional[bytes]]) -> Callable[[bytes], int]:
    """committed_nonce_of for the mempool, over one read view."""

    def nonce_of(sender: bytes) -> int:
        raw = get(account_key(sender))
        return 0 if raw is None else Account.decode(bytes(raw)).nonce

    return nonce_of


