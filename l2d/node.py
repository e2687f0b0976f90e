"""The daemon's composition root: builds every component from one Config and owns the tasks and shutdown.

`l2d --config PATH` runs one asyncio loop with three activities: the REST API, the block producer and the
snapshot writer. SIGINT/SIGTERM set a stop event; shutdown stops HTTP first, lets an in-flight block commit
finish (it is shielded), and closes the store last. After an unexpected exception nothing more is committed.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import lmdb
from aiohttp import web
from coincurve import PrivateKey

from . import __version__
from .config import Config, ConfigError
from .core import snapshot as snapshot_format
from .core import tx as T
from .core.anchor_tx import AnchorUpdate
from .core.block import HEADER_SIZE, BlockHeader, genesis_header
from .core.coin_tx import Mint
from .core.errors import DecodeError, L2Error, OutOfRange, Rejected, UnknownType, UnknownVersion, WrongNetwork
from .core.params import Network, network_by_name
from .core.payload import Payload
from .core.rules import apply_tx
from .core.state import SUPPLY_KEY, Account, Rules, StateView, Supply, account_key, genesis_state
from .core.tree import Proof, root_of
from .keys import KeyFileError, load_or_create_secret
from .ledger import BuiltBlock, Ledger
from .logs import setup_logging
from .mempool import Duplicate, Mempool, StaleNonce
from .metrics import Metrics
from .store import Store, StoreError

if TYPE_CHECKING:
    from anchoring.service import AnchorService
    from bridge.rpc import BitcoinRPC
    from bridge.service import BridgeService
    from l2d.core.pegs import Federation
    from orchestration.service import OrchestrationService

# Named after the module even when run as `python -m l2d.node` (where __name__ is "__main__").
log = logging.getLogger("l2d.node")

DEFAULT_CONFIG = "config/local.toml"
RECENT_TXIDS = 10_000


VERSION = __version__


class NodeError(Exception):
    """The node cannot start (unusable key file, data dir made for another chain, ...)."""


class Refused(Rejected):
    """A submitted transaction refused before the mempool, with a reason code of its own."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_reason(e: DecodeError) -> str:
    """Short reason code for a decoding failure."""
    if isinstance(e, WrongNetwork):
        return "wrong-network"
    if isinstance(e, UnknownVersion):
        return "unknown-version"
    if isinstance(e, UnknownType):
        return "unknown-type"
    if isinstance(e, OutOfRange):
        return "out-of-range"
    return "malformed"


# -- values handed to the API -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    path: Path
    height: int
    block_hash: bytes
    state_root: bytes
    size: int


@dataclass(frozen=True, slots=True)
class StateSummary:
    height: int
    tip_hash: bytes
    state_root: bytes
    records: int
    supply: Supply


@dataclass(frozen=True, slots=True)
class AccountView:
    account: Optional[Account]
    height: int
    state_root: bytes
    proof: Proof


class Node:
    """Everything the daemon runs, wired from one Config. Build with Node.from_config; run with run()."""

    def __init__(self, config: Config, network: Network, store: Store, ledger: Ledger, mempool: Mempool,
                 authority_secret: Optional[bytes], federation_secret: Optional[bytes] = None) -> None:
        self.config = config
        self.network = network
        self.store = store
        self.ledger = ledger
        self.mempool = mempool
        self.metrics = Metrics()
        self.version = VERSION
        self._authority_secret = authority_secret
        self.authority_pubkey: Optional[bytes] = (
            None if authority_secret is None else PrivateKey(authority_secret).public_key_xonly.format())
        self.snapshot_dir = Path(config.snapshots.dir)
        # Snapshots at anchored heights (embedded in audit bundles); never pruned.
        self.anchor_snapshot_dir = self.snapshot_dir / "anchored"
        self._federation_secret = federation_secret
        self.federation_pubkey: Optional[bytes] = (
            None if federation_secret is None else PrivateKey(federation_secret).public_key_xonly.format())
        self.anchor_service: Optional["AnchorService"] = None
        self.bridge_federation: Optional["Federation"] = None
        self._signer_secrets: list[bytes] = []
        self.bridge_service: Optional["BridgeService"] = None
        self.orchestration_service: Optional["OrchestrationService"] = None
        self._btc_rpc: Optional["BitcoinRPC"] = None
        # Held from build_block until commit returns: in between, the tree is ahead of the committed state.
        self.tree_lock = asyncio.Lock()
        self._snapshot_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._snapshot_wanted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Future[Any]] = set()
        self._recent: OrderedDict[bytes, Optional[str]] = OrderedDict()
        self._runner: Optional[web.AppRunner] = None
        self._started = time.monotonic()
        self._stop_future: Optional[asyncio.Future[None]] = None
        self.failed = False
        self.port: Optional[int] = None

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Config) -> "Node":
        """Open (or create) the ledger described by config. Raises NodeError or StoreError on failure."""
        try:
            network = network_by_name(config.node.network)
        except WrongNetwork as e:
            raise NodeError(str(e)) from None
        authority_secret: Optional[bytes] = None
        authority: Optional[bytes] = None
        if network.admin_mint:
            key_file = config.chain.mint_authority_key_file
            if key_file is None:
                raise NodeError(f"chain.mint_authority_key_file is required on {network.name}")
            authority_secret = load_or_create_secret(Path(key_file))
            authority = PrivateKey(authority_secret).public_key_xonly.format()
        federation_secret: Optional[bytes] = None
        fed_file = config.anchoring.federation_key_file
        if fed_file is not None:
            if not network.admin_mint and not Path(fed_file).exists():
                raise NodeError(f"anchoring.federation_key_file {fed_file} does not exist (it is only created "
                                f"on local and regtest)")
            federation_secret = load_or_create_secret(Path(fed_file), "federation")
        federation = None if federation_secret is None else PrivateKey(federation_secret).public_key_xonly.format()
        try:
            genesis = genesis_state(config.chain.genesis_alloc, authority, federation)
        except L2Error as e:
            raise NodeError(f"chain.genesis_alloc: {e}") from None
        signer_secrets, fed = _bridge_federation(config, network)
        if fed is not None:
            from .core.pegs import federation_genesis

            genesis.update(federation_genesis(fed))
        store = Store(Path(config.node.data_dir) / "ledger", network)
        try:
            ledger = Ledger(store, Rules(network, config.chain.min_fee_sat))
            ledger.open(genesis, config.chain.genesis_timestamp_ms)
            _check_genesis(ledger, network, genesis, config.chain.genesis_timestamp_ms)
        except BaseException:
            store.close()
            raise
        mempool = Mempool(config.mempool.max_txs, config.mempool.max_per_sender, config.mempool.min_fee_sat)
        node = cls(config, network, store, ledger, mempool, authority_secret, federation_secret)
        node.bridge_federation, node._signer_secrets = fed, signer_secrets
        return node

    # -- read side ------------------------------------------------------------------------------------------
    @property
    def tip(self) -> BlockHeader:
        """Header of the last committed block."""
        tip = self.ledger.tip
        if tip is None:  # Ledger.open ran in from_config
            raise StoreError("ledger is not open")
        return tip

    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    def committed_nonce(self, sender: bytes) -> int:
        """The sender's committed nonce (0 for an account that does not exist)."""
        raw = self.store.get_state(account_key(sender))
        return 0 if raw is None else Account.decode(raw).nonce

    def state_summary(self) -> StateSummary:
        """Tip, record count and supply from one consistent read view."""
        with self.store.reader() as r:
            height = r.tip_height()
            raw = r.get_block(height) if height is not None else None
            if raw is None:
                raise StoreError("database has no tip block")
            header = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), self.network)
            sup = r.get_state(SUPPLY_KEY)
            return StateSummary(header.height, header.hash, header.state_root, r.state_count(),
                                Supply.decode(bytes(sup)) if sup is not None else Supply(0, 0, 0))

    async def account(self, pubkey: bytes) -> AccountView:
        """Committed account and its proof against the committed tip's state root."""
        key = account_key(pubkey)
        async with self.tree_lock:  # the tree equals the committed state while no block is in flight
            tip = self.tip
            raw = self.store.get_state(key)
            proof = self.ledger.tree.prove(key, self._committed_value)
        return AccountView(None if raw is None else Account.decode(raw), tip.height, tip.state_root, proof)

    def _committed_value(self, key: bytes) -> bytes:
        v = self.store.get_state(key)
        if v is None:
            raise StoreError(f"key {key.hex()} is in the tree but not in the store")
        return v

    def tx_status(self, txid: bytes) -> Optional[dict[str, Any]]:
        """committed (from the store, authoritative), pending, dropped (with reason), or None if unknown."""
        loc = self.store.tx_location(txid)
        if loc is not None:
            return {"status": "committed", "height": loc[0], "index": loc[1]}
        if txid in self.mempool:
            return {"status": "pending"}
        if txid in self._recent:
            return {"status": "dropped", "reason": self._recent[txid] or "dropped"}
        return None

    def render_metrics(self) -> str:
        """The Prometheus exposition of this node."""
        with self.store.reader() as r:
            records = r.state_count()
        tip = self.tip
        gauges = {
            "l2d_height": ("Height of the committed tip.", lambda: tip.height),
            "l2d_mempool_txs": ("Transactions in the mempool.", lambda: len(self.mempool)),
            "l2d_mempool_bytes": ("Encoded size of the mempool.", lambda: self.mempool.size_bytes),
            "l2d_state_records": ("Records in the committed state.", lambda: records),
            "l2d_uptime_seconds": ("Seconds since the node started.", lambda: round(self.uptime_s(), 3)),
        }
        return self.metrics.render(gauges)

    # -- write side: admission -----------------------------------------------------------------------------
    def submit(self, raw: bytes) -> bytes:
        """Admit a signed transaction to the mempool; returns its txid or raises a Rejected with .reason."""
        try:
            tx = T.decode(raw, self.network)
        except DecodeError as e:
            return self._refuse(Refused(decode_reason(e), str(e)))
        return self._admit(tx, signature_checked=False)

    def _refuse(self, e: Rejected) -> bytes:
        self.metrics.txs_rejected.inc(stage="admission", reason=e.reason)
        log.debug("transaction refused", extra={"reason": e.reason, "detail": str(e)})
        raise e

    def _admit(self, tx: T.Transaction, *, signature_checked: bool) -> bytes:
        try:
            if tx.txid in self.mempool:  # before the balance check, which would count it twice
                raise Duplicate(f"transaction {tx.txid.hex()} is already pending")
            if not signature_checked:
                T.check_signature(tx)
            committed = self._precheck(tx)
            txid = self.mempool.add(tx, committed)
        except Rejected as e:
            return self._refuse(e)
        self.metrics.txs_accepted.inc()
        self._remember(txid, None)
        if len(self.mempool) >= self.config.block.max_txs:
            self._wake.set()
        return txid

    def _precheck(self, tx: T.Transaction) -> Optional[int]:
        """Cheap checks against the committed state as the sender's pending transactions leave it.

        Runs the consensus state transition on a throwaway view in which the sender's account has the
        committed balance minus what its pending transactions spend, and the nonce this tx carries; so every
        rule (authority, fee floor, balance, recipient, self-transfer) is the consensus one. Returns the
        committed nonce, None if the sender has no account.
        """
        skey = account_key(tx.sender)
        raw = self.store.get_state(skey)
        acc = None if raw is None else Account.decode(raw)
        committed = None if acc is None else acc.nonce
        if tx.nonce < (committed or 0):
            raise StaleNonce(f"nonce {tx.nonce} is below the committed nonce {committed} of {tx.sender.hex()}")
        spent = sum(p.payload.debit_sat() + p.fee_sat for p in self.mempool.pending_of(tx.sender)
                    if p.nonce != tx.nonce)
        view = StateView(self.store.get_state, self.tip.height + 1)
        if acc is not None or tx.nonce > 0:  # nonce > 0: the sender's pending transactions create its account
            balance = acc.balance_sat if acc is not None else 0
            view.put(skey, Account(max(balance - spent, 0), tx.nonce).encode())
        apply_tx(view, tx, self.ledger.rules, signature_checked=True)
        return committed

    def _remember(self, txid: bytes, reason: Optional[str]) -> None:
        self._recent[txid] = reason
        self._recent.move_to_end(txid)
        while len(self._recent) > RECENT_TXIDS:
            self._recent.popitem(last=False)

    def mint(self, recipient: bytes, amount_sat: int) -> bytes:
        """Sign a Mint with the authority key and admit it like any transaction; returns its txid."""
        secret = self._authority_secret
        if not self.network.admin_mint or secret is None or self.authority_pubkey is None:
            return self._refuse(Refused("unauthorized", f"minting is not allowed on {self.network.name}"))
        nonce = self.mempool.next_nonce(self.authority_pubkey, self.committed_nonce(self.authority_pubkey))
        try:
            tx = T.sign(self.network, secret, nonce, 0, Mint(recipient, amount_sat), os.urandom(32))
        except DecodeError as e:
            return self._refuse(Refused(decode_reason(e), str(e)))
        return self._admit(tx, signature_checked=True)

    # -- block production ------------------------------------------------------------------------------------
    async def produce_once(self) -> Optional[BuiltBlock]:
        """Build and commit one block from the mempool; None if there was nothing to include.

        The build+commit runs as its own task, shielded: cancelling the caller never interrupts a commit,
        and stop() waits for it before closing the store.
        """
        with self.store.reader() as r:  # one read transaction for every sender's nonce
            txs = self.mempool.select(self.config.block.max_txs, _nonce_reader(r.get_state))
        if not txs:
            return None
        fut = asyncio.ensure_future(self._build_and_commit(txs))
        self._track(fut)
        return await asyncio.shield(fut)

    async def _build_and_commit(self, txs: list[T.Transaction]) -> Optional[BuiltBlock]:
        t0 = time.perf_counter()
        async with self.tree_lock:
            built = await asyncio.to_thread(self.ledger.build_block, txs, int(time.time() * 1000),
                                            signatures_checked=True)
            if built.block.txs:
                await self.ledger.commit_async(built)
                h0 = built.block.header
                if self.anchor_service is not None and h0.height % self.config.anchoring.every_blocks == 0:
                    await self._start_anchor_snapshot(h0)
        ms = (time.perf_counter() - t0) * 1000
        rejected = [t for t, _ in built.rejected]
        self.mempool.remove_committed(built.block.txs)
        self.mempool.drop(rejected)
        for t, e in built.rejected:
            self.metrics.txs_rejected.inc(stage="block", reason=e.reason)
            self._remember(t.txid, e.reason)
            log.debug("transaction rejected in block", extra={"txid": t.txid.hex(), "reason": e.reason,
                                                                 "detail": str(e)})
        with self.store.reader() as r:
            pruned = self.mempool.prune(_nonce_reader(r.get_state))
        for t in pruned:
            self._remember(t.txid, "stale-nonce")
        if not built.block.txs:  # every candidate was rejected: nothing was written, no empty block
            log.info("no block: every candidate rejected", extra={"rejected": len(rejected)})
            return None
        h = built.block.header
        self.metrics.blocks_committed.inc()
        self.metrics.txs_committed.inc(len(built.block.txs))
        self.metrics.block_build.observe(ms / 1000)
        log.info("block committed", extra={"height": h.height, "txs": h.tx_count, "rejected": len(rejected),
                                           "root": h.state_root.hex(), "hash": h.hash.hex(), "ms": round(ms, 2)})
        every = self.config.snapshots.every_blocks
        if every and h.height % every == 0:
            self._snapshot_wanted.set()
        if self.anchor_service is not None:
            self.anchor_service.notify_block(h)
        return built

    async def _producer(self) -> None:
        interval = self.config.block.interval_ms / 1000
        while not self._stop.is_set():
            if not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), interval)
                except TimeoutError:
                    pass
            self._wake.clear()
            if self._stop.is_set():
                break
            await self.produce_once()
            if len(self.mempool) >= self.config.block.max_txs:
                self._wake.set()

    # -- snapshots -------------------------------------------------------------------------------------------
    async def snapshot_now(self, trigger: str = "admin") -> SnapshotInfo:
        """Write a snapshot of the committed tip (one consistent read view, in a thread), then prune."""
        async with self._snapshot_lock:
            fut = asyncio.ensure_future(asyncio.to_thread(self._write_snapshot))
            self._track(fut)
            info = await asyncio.shield(fut)
        self.metrics.snapshots.inc(trigger=trigger)
        log.info("snapshot written", extra={"trigger": trigger, "snapshot": info.name, "height": info.height,
                                            "root": info.state_root.hex(), "size": info.size})
        return info

    def _write_snapshot(self) -> SnapshotInfo:
        directory = self.snapshot_dir
        directory.mkdir(parents=True, exist_ok=True)
        with self.store.reader() as r:
            height = r.tip_height()
            raw = r.get_block(height) if height is not None else None
            if raw is None:
                raise StoreError("database has no tip block")
            header = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), self.network)
            path = Path(snapshot_format.write_snapshot_file(directory, self.network, header.height, header.hash,
                                                            header.state_root, r.iter_state(), r.state_count()))
        snapshot_format.prune_snapshots(directory, self.config.snapshots.keep, self.network)
        return SnapshotInfo(path.name, path, header.height, header.hash, header.state_root, path.stat().st_size)

    async def _start_anchor_snapshot(self, header: BlockHeader) -> None:
        """Snapshot exactly the block just committed (called under tree_lock, so it is still the tip).

        The lock is held only until the writer thread has opened its LMDB read transaction (an MVCC view of
        this height); the file is then written while blocks go on being committed.
        """
        opened = threading.Event()
        fut = asyncio.ensure_future(asyncio.to_thread(self._write_anchor_snapshot, header, opened))
        self._track(fut)
        await asyncio.to_thread(opened.wait, 30)

    def _write_anchor_snapshot(self, header: BlockHeader, opened: threading.Event) -> Optional[Path]:
        """Runs in a thread. A failure is logged, never raised: a snapshot is a copy, not the ledger (the audit
        bundle then carries the state root without the snapshot)."""
        try:
            directory = self.anchor_snapshot_dir
            directory.mkdir(parents=True, exist_ok=True)
            with self.store.reader() as r:
                opened.set()
                if r.tip_height() != header.height:
                    raise StoreError(f"tip moved past {header.height} before the anchored snapshot was opened")
                return Path(snapshot_format.write_snapshot_file(directory, self.network, header.height, header.hash,
                                                                header.state_root, r.iter_state(), r.state_count()))
        except Exception:
            log.exception("anchored snapshot failed", extra={"height": header.height})
            return None
        finally:
            opened.set()

    def anchor_snapshot_bytes(self, height: int) -> Optional[bytes]:
        """The snapshot written at anchored height `height`, if there is one."""
        try:
            snaps = snapshot_format.list_snapshots(self.anchor_snapshot_dir, self.network)
        except FileNotFoundError:
            return None
        for h, p in snaps:
            if h == height:
                return p.read_bytes()
        return None

    def submit_anchor_update(self, update: AnchorUpdate) -> bytes:
        """Sign an AnchorUpdate with the federation key and admit it like any transaction; returns its txid."""
        return self.submit_as_federation(update)

    def submit_as_federation(self, payload: Payload) -> bytes:
        """Sign a fee-less authority payload (anchor update, header relay, peg-out update, task assignment,
        FL round commitment...) with the federation key and admit it like any transaction; returns its txid.

        The federation key's x-only public key is the genesis anchor authority (ANCHOR_AUTHORITY_KEY), the
        one authority every coordinator-posted type checks.
        """
        secret, pub = self._federation_secret, self.federation_pubkey
        if secret is None or pub is None:
            return self._refuse(Refused("unauthorized", "this node has no federation key"))
        nonce = self.mempool.next_nonce(pub, self.committed_nonce(pub))
        tx = T.sign(self.network, secret, nonce, 0, payload, os.urandom(32))
        return self._admit(tx, signature_checked=True)

    def _make_anchor_service(self) -> Optional["AnchorService"]:
        cfg = self.config.anchoring
        if not cfg.enabled or self._federation_secret is None or self.federation_pubkey is None:
            return None
        from anchoring.service import AnchorService  # anchoring depends on core, not the other way round
        from bridge.rpc import BitcoinRPC, CookieAuth, UserPassAuth

        b = self.config.bitcoind
        rpc: Optional[BitcoinRPC] = None
        if b.rpc_url:
            auth: Any = (CookieAuth(b.cookie_file) if b.cookie_file is not None
                         else UserPassAuth(b.rpc_user, b.rpc_password))
            rpc = BitcoinRPC(b.rpc_url, auth)
        self._btc_rpc = rpc

        def header_at(height: int) -> Optional[BlockHeader]:
            blk = self.ledger.block(height)
            return None if blk is None else blk.header

        service = AnchorService(config=cfg, network=self.network, federation_secret=self._federation_secret,
                                federation_key=self.federation_pubkey, rpc=rpc, store=self.store,
                                tip=lambda: self.tip, header_at=header_at,
                                submit_update=self.submit_anchor_update, snapshot_bytes=self.anchor_snapshot_bytes,
                                zmq_hashblock=b.zmq_hashblock, zmq_sequence=b.zmq_sequence,
                                bitcoin_chain=b.chain)
        service.load()
        return service

    def _make_orchestration_service(self) -> Optional["OrchestrationService"]:
        """The federation's task coordinator (orchestration/service.py): needs the federation key."""
        cfg = self.config.orchestration
        if not cfg.enabled:
            return None
        if self._federation_secret is None:
            raise NodeError("orchestration.enabled needs anchoring.federation_key_file (the coordinator posts "
                            "task assignments and settlements as the federation)")
        from orchestration.service import OrchestrationService  # orchestration depends on core, not the reverse

        def read_prefix(prefix: bytes) -> list[tuple[bytes, bytes]]:
            with self.store.reader() as r:
                return list(r.iter_prefix(prefix))

        return OrchestrationService(cfg, read_prefix=read_prefix, tip_height=lambda: self.tip.height,
                                    submit=self.submit_as_federation, tx_status=self.tx_status,
                                    journal=Path(self.config.node.data_dir) / "orchestration" / "notes.jsonl",
                                    get_state=self.store.get_state, block_txs=self._block_txs)

    def _block_txs(self, height: int) -> Optional[tuple[T.Transaction, ...]]:
        blk = self.ledger.block(height)
        return None if blk is None else blk.txs

    def _make_bridge_service(self) -> Optional["BridgeService"]:
        """The federation's bridge work (header relay, peg-out payments): needs the federation and bitcoind."""
        fed = self.bridge_federation
        if fed is None or self._btc_rpc is None:
            if fed is not None:
                log.warning("bridge: no bitcoind configured: headers are not relayed and peg-outs not paid")
            return None
        from bridge.federation import LocalSigner
        from bridge.service import BridgeService

        cfg = self.config.bridge
        bdir = Path(self.config.node.data_dir) / "bridge"
        bdir.mkdir(parents=True, exist_ok=True)
        signers = [LocalSigner(sec, fed, self.network, self.store.get_state,
                               bdir / f"signer-{PrivateKey(sec).public_key.format().hex()[:16]}.json",
                               cfg.max_fee_share_ppm) for sec in self._signer_secrets]
        from bridge.headers import HEADER_STORE_DIR, HeaderStore
        from l2d.core.chains import btc_chain

        headers = HeaderStore(Path(self.config.node.data_dir) / HEADER_STORE_DIR, btc_chain(self.network).spv,
                              start_height=cfg.header_start_height, start_hash=cfg.header_start_hash)
        return BridgeService(fed=fed, network=self.network, signers=signers, rpc=self._btc_rpc,
                             read_state=self.store.reader, submit=self.submit_as_federation,
                             batch_dir=bdir / "batches", headers=headers,
                             confirmations=cfg.pegout_confirmations, rbf_after_blocks=cfg.rbf_after_blocks,
                             fee_fallback_sat_per_vb=cfg.fee_fallback_sat_per_vb,
                             fee_max_sat_per_vb=cfg.fee_max_sat_per_vb, poll_interval_ms=cfg.poll_interval_ms,
                             now=lambda: int(time.time()))

    async def _snapshotter(self) -> None:
        while True:
            await self._snapshot_wanted.wait()
            self._snapshot_wanted.clear()
            try:
                await self.snapshot_now(trigger="periodic")
            except Exception:  # a snapshot is a copy, not the ledger: log it and keep running
                log.exception("periodic snapshot failed")

    def list_snapshots(self) -> list[dict[str, Any]]:
        """Complete snapshot files of this network in the snapshot directory (name, height, size), oldest first."""
        try:
            snaps = snapshot_format.list_snapshots(self.snapshot_dir, self.network)
        except FileNotFoundError:
            return []
        out = []
        for height, p in snaps:
            try:
                out.append({"name": p.name, "height": height, "size": p.stat().st_size})
            except FileNotFoundError:  # pruned meanwhile
                continue
        return out

    def snapshot_path(self, name: str) -> Optional[Path]:
        """The path of snapshot `name` if it is one of the complete snapshot files listed in the directory.

        The name is only ever compared with the directory listing, never joined as given: no path traversal.
        """
        try:
            snaps = snapshot_format.list_snapshots(self.snapshot_dir, self.network)
        except FileNotFoundError:
            return None
        for _, p in snaps:
            if p.name == name:
                return p if p.is_file() and not p.is_symlink() else None
        return None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _track(self, fut: "asyncio.Future[Any]") -> None:
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)

    def request_stop(self) -> None:
        """Ask the node to shut down (signal handlers call this)."""
        if not self._stop.is_set():
            log.info("stop requested")
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def start(self, *, serve_http: bool = True) -> None:
        """Start the block producer and the snapshot task, and (unless serve_http is False) the REST API."""
        self._tasks = [asyncio.create_task(self._producer(), name="block-producer"),
                       asyncio.create_task(self._snapshotter(), name="snapshotter")]
        self.anchor_service = self._make_anchor_service()
        if self.anchor_service is not None:
            self._tasks.append(asyncio.create_task(self.anchor_service.run(), name="anchor-service"))
        self.orchestration_service = self._make_orchestration_service()
        if self.orchestration_service is not None:
            self._tasks.append(asyncio.create_task(self.orchestration_service.run(), name="orchestration-service"))
        self.bridge_service = self._make_bridge_service()
        if self.bridge_service is not None:
            self._tasks.append(asyncio.create_task(self.bridge_service.run(), name="bridge-service"))
        if serve_http:
            from .api import make_app  # the API module imports this one's types

            runner = web.AppRunner(make_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(runner, self.config.api.host, self.config.api.port)
            await site.start()
            addrs = runner.addresses
            self.port = int(addrs[0][1]) if addrs else None
            log.info("api listening", extra={"host": self.config.api.host, "port": self.port})

    async def wait(self) -> None:
        """Return when a stop is requested or a background task ends (which is a failure)."""
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([stopper, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        for t in self._tasks:
            if t.done() and not t.cancelled():
                exc = t.exception()
                if exc is None and self._stop.is_set():
                    continue  # the producer leaving its loop after a stop request
                self.failed = True
                log.error("task %s ended unexpectedly; no further blocks will be committed", t.get_name(),
                          exc_info=(type(exc), exc, exc.__traceback__) if exc else None)

    async def stop(self) -> None:
        """Shut down in order: HTTP, producer (its in-flight commit completes), snapshots, store (last).

        Idempotent and safe to call concurrently; cancelling a caller does not interrupt the shutdown.
        """
        if self._stop_future is None:
            self._stop_future = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._stop_future)

    async def _shutdown(self) -> None:
        self.request_stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for t in self._tasks:
            if t.get_name() != "block-producer":
                t.cancel()
        # The producer leaves its loop after the block at hand (the stop event is checked between blocks).
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._inflight:  # shielded commits and snapshot threads still running
            results += await asyncio.gather(*list(self._inflight), return_exceptions=True)
        for res in results:
            if isinstance(res, Exception) and not self.failed:
                self.failed = True
                log.error("task failed during shutdown", exc_info=(type(res), res, res.__traceback__))
        if self.bridge_service is not None:
            self.bridge_service.close()
        if self._btc_rpc is not None:
            await self._btc_rpc.close()
        self.store.close()
        tip = self.ledger.tip
        log.info("stopped", extra={"height": tip.height if tip else None, "failed": self.failed})

    async def run(self, *, install_signals: bool = True) -> int:
        """Run until SIGINT/SIGTERM (or request_stop); returns the process exit code (0 clean, 1 failure)."""
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        if install_signals:
            for s in sigs:
                loop.add_signal_handler(s, self.request_stop)
        try:
            await self.start(serve_http=True)
            await self.wait()
        except Exception:
            self.failed = True
            log.exception("node failed")
        finally:
            await self.stop()
            if install_signals:
                for s in sigs:
                    loop.remove_signal_handler(s)
        return 1 if self.failed else 0


def _nonce_reader(get: Callable[[bytes], Optional[bytes]]) -> Callable[[bytes], int]:
    """committed_nonce_of for the mempool, over one read view."""

    def nonce_of(sender: bytes) -> int:
        raw = get(account_key(sender))
        return 0 if raw is None else Account.decode(bytes(raw)).nonce

    return nonce_of


def _bridge_federation(config: Config, network: Network) -> tuple[list[bytes], Optional["Federation"]]:
    """The federation of [bridge] (a genesis parameter) and the secrets of the signers this daemon runs."""
    cfg = config.bridge
    if not cfg.enabled:
        return [], None
    from .core.pegs import Federation

    secrets_: list[bytes] = []
    for f in cfg.signer_key_files:
        if not network.admin_mint and not f.exists():
            raise NodeError(f"bridge.signer_key_files: {f} does not exist (keys are only created on local and "
                            f"regtest)")
        secrets_.append(load_or_create_secret(f, "federation signer"))
    keys = [PrivateKey(s).public_key.format(compressed=True) for s in secrets_] + list(cfg.other_keys)
    if len(set(keys)) != len(keys):
        raise NodeError("bridge: the same federation key is configured twice (a key counts once in a quorum)")
    try:
        return secrets_, Federation(cfg.threshold, tuple(sorted(keys)), cfg.pegin_min_depth)
    except L2Error as e:
        raise NodeError(f"bridge: {e}") from None


def _check_genesis(ledger: Ledger, network: Network, genesis: dict[bytes, bytes], timestamp_ms: int) -> None:
    """Refuse a data dir whose block 0 is not the genesis this config describes."""
    stored = ledger.block(0)
    expected = genesis_header(network, timestamp_ms, root_of(genesis.items()))
    if stored is None or stored.header.hash != expected.hash:
        raise NodeError(
            f"data dir {ledger.store.path} holds another chain: its genesis block "
            f"{stored.header.hash.hex() if stored else 'is missing'} differs from the one this config describes "
            f"({expected.hash.hex()}); check chain.genesis_alloc, chain.genesis_timestamp_ms, "
            f"chain.mint_authority_key_file and anchoring.federation_key_file, or use another node.data_dir")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: `l2d --config PATH`."""
    ap = argparse.ArgumentParser(prog="l2d", description="l2d: Bitcoin-anchored Layer-2 daemon")
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config file (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        config = Config.load(Path(args.config))
    except ConfigError as e:
        print(f"l2d: config error: {e}", file=sys.stderr)
        return 2
    setup_logging(config.node.log_level)
    log.info("effective config", extra={"config": config.effective(), "version": VERSION})
    try:
        node = Node.from_config(config)
    except (NodeError, KeyFileError, StoreError, OSError, lmdb.Error) as e:
        log.error("cannot start: %s", e)
        return 1
    return asyncio.run(node.run())


if __name__ == "__main__":
    sys.exit(main())
