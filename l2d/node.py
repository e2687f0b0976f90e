"""The daemon's composition root: builds every component from one Config and owns the tasks and shutdown.

`l2d --config PATH` runs one asyncio loop: the REST API, this member's consensus host (blocks are made by the
federation's member protocol, a 1-member federation included), the snapshot writer and the services the config
turns on (anchoring, the bridge, the task coordinator). SIGINT/SIGTERM set a stop event; shutdown stops HTTP
first, lets an in-flight block store finish (it is shielded), and closes the store last.
After an unexpected exception nothing more is committed.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import lmdb
from aiohttp import web
from coincurve import PrivateKey

from anchoring.service import AnchorService
from bridge.claims import BitcoinClaims
from bridge.federation import LocalSigner
from bridge.headers import HEADER_STORE_DIR, HeaderStore
from bridge.rpc import BitcoinRPC, CookieAuth, UserPassAuth
from bridge.service import BridgeService
from netflow.prober import Prober
from orchestration.service import OrchestrationService

from . import __version__, mempool_file
from .admission import Admission
from .api.app import make_app
from .api.deps import ApiDeps
from .api.server import ApiServer, ensure_descriptors
from .config import BitcoindConfig, Config, ConfigError
from .consensus import EVIDENCE_FILE, FederationHost
from .core.block import BlockHeader
from .core.chains import btc_chain
from .core.errors import Rejected, WrongNetwork
from .core.params import Network, network_by_name
from .core.state import Rules
from .core.tx import Transaction
from .datadir import DataDir
from .federation.errors import SignerStateError
from .federation.machine import Timing
from .federation.signer import SIGNER_FILE
from .federation.transport import Handlers, Peer, Transport
from .federation.transport import routes as transport_routes
from .genesis import Genesis, NodeError, check_genesis, load_genesis
from .keys import KeyFileError
from .ledger import Ledger
from .logs import setup_logging
from .mempool import Mempool
from .metrics import Metrics
from .ratelimit import RateLimiter
from .readapi import ReadWorkers
from .sigpool import SignaturePool
from .model_store import MODEL_DIR, ModelStore
from .snapshots import Snapshots
from .store import Store, StoreError
from .views import ChainView

# Named after the module even when run as `python -m l2d.node` (where __name__ is "__main__").
log = logging.getLogger("l2d.node")

DEFAULT_CONFIG = "config/local.toml"
VERSION = __version__


class Node:
    """Everything the daemon runs, wired from one Config. Build with Node.from_config; run with run()."""

    def __init__(self, config: Config, network: Network, store: Store, ledger: Ledger, genesis: Genesis,
                 datadir: DataDir) -> None:
        self.config = config
        self.datadir = datadir  # held (locked) until the end of _shutdown
        self.network = network
        self.store = store
        self.ledger = ledger
        self.genesis = genesis
        self.federation = genesis.federation
        self.metrics = Metrics()
        self.mempool = Mempool(config.mempool.max_txs, config.mempool.max_per_sender, config.mempool.min_fee_sat)
        # The consensus host stores one block at a time under it (readers never take it: l2d/views.py).
        tree_lock = asyncio.Lock()
        self.chain = ChainView(network, store, ledger, self.mempool, self.metrics, VERSION)
        self.signatures = SignaturePool(config.api.signature_workers)
        self.admission = Admission(self.chain, ledger, self.mempool, self.metrics, admitted=self._tx_admitted,
                                   authority_secret=genesis.authority_secret,
                                   member_secret=genesis.member_secret, check_space=datadir.check_space)
        fed = config.federation
        self.host = FederationHost(
            network=network, members=genesis.membership, index=genesis.member_index, secret=genesis.member_secret,
            timing=Timing(config.block.interval_ms, fed.round_ms, fed.max_round_ms), drift_ms=fed.max_clock_drift_ms,
            ledger=ledger, store=store, mempool=self.mempool, admission=self.admission, metrics=self.metrics,
            tree_lock=tree_lock, signer_path=datadir.path / SIGNER_FILE,
            evidence_path=datadir.path / EVIDENCE_FILE, max_txs=config.block.max_txs,
            track=self._track)
        self.host.ids, self.host.urls = genesis.member_ids, genesis.member_urls
        self.transport: Optional[Transport] = None
        if genesis.membership.n > 1:  # a 1-member federation has nobody to talk to
            peers = [Peer(i, key, url) for i, (key, url) in enumerate(zip(genesis.membership.keys,
                                                                          genesis.member_urls))
                     if i != genesis.member_index]
            self.transport = Transport(network, genesis.member_index, genesis.member_secret, peers, Handlers(
                on_message=self.host.deliver, on_txs=self._peer_txs, serve_blocks=self.host.serve_blocks,
                serve_txs=self.host.serve_txs))
            self.host.peers = self.transport
            self.chain.peers_connected = self.transport.connected_peers
        self.snapshots = Snapshots(store, network, self.metrics, directory=Path(config.snapshots.dir),
                                   keep=config.snapshots.keep, every_blocks=config.snapshots.every_blocks,
                                   track=self._track, anchored_keep_final=config.snapshots.anchored_keep_final,
                                   anchored_max_bytes=config.snapshots.anchored_max_bytes,
                                   min_free_bytes=config.store.min_free_bytes)
        self.host.committed_locked = self.snapshots.committed_locked
        self.host.after_commit.append(self.snapshots.block_committed)
        self.models = ModelStore(Path(config.node.data_dir) / MODEL_DIR)
        self.btc_rpc = _bitcoind_client(config.bitcoind)  # the one bitcoind client, shared by every service
        if self.btc_rpc is not None:  # what a block claims about Bitcoin is signed only if my bitcoind agrees
            self.host.claims = BitcoinClaims(self.btc_rpc, final_confirmations=config.anchoring.final_confirmations,
                                             pegout_confirmations=config.bridge.pegout_confirmations,
                                             fee_fallback_sat_per_vb=config.bridge.fee_fallback_sat_per_vb,
                                             fee_max_sat_per_vb=config.bridge.fee_max_sat_per_vb)
        self.anchor_service: Optional[AnchorService] = None
        self.bridge_service: Optional[BridgeService] = None
        self.orchestration_service: Optional[OrchestrationService] = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: set[asyncio.Future[Any]] = set()
        self._api: Optional[ApiServer] = None
        self._readers: Optional[ReadWorkers] = None  # [api] read_workers
        self._stop_future: Optional[asyncio.Future[None]] = None
        self.failed = False
        self.port: Optional[int] = None

    @classmethod
    def from_config(cls, config: Config) -> "Node":
        """Open (or create) the ledger described by config. Raises NodeError or StoreError on failure."""
        try:
            network = network_by_name(config.node.network)
        except WrongNetwork as e:
            raise NodeError(str(e)) from None
        datadir = DataDir.open(Path(config.node.data_dir), config.store.min_free_bytes)
        try:
            genesis = load_genesis(config, network)
            store = Store(Path(config.node.data_dir) / "ledger", network, config.store.map_size,
                          config.store.tree_cache_mb << 20)
        except BaseException:
            datadir.close()
            raise
        try:
            ledger = Ledger(store, Rules(network, config.chain.min_fee_sat))
            ledger.open(genesis.state, config.chain.genesis_timestamp_ms)
            check_genesis(ledger, network, genesis.state, config.chain.genesis_timestamp_ms)
        except BaseException:
            store.close()
            datadir.close()
            raise
        try:
            node = cls(config, network, store, ledger, genesis, datadir)
        except SignerStateError as e:
            store.close()
            datadir.close()
            raise NodeError(f"signer state {datadir.path / SIGNER_FILE}: {e}; this member must not sign until an "
                            f"operator restores the newest signer state file (docs/federation.md)") from e
        node._load_mempool()
        return node

    # -- the mempool file (docs/mempool-file.md) -------------------------------------------------------------
    def _load_mempool(self) -> None:
        """Re-admit the mempool saved by the last clean stop, then delete the file (a later SIGKILL must not
        bring back this old copy)."""
        path = self.datadir.path / mempool_file.MEMPOOL_FILE
        saved = mempool_file.load(path, self.network)
        if saved is not None:
            admitted, dropped = self.admission.restore(saved)
            path.unlink()
            log.info("mempool reloaded", extra={"readmitted": admitted, "dropped": dropped,
                                                "drop_reasons": len(saved.dropped)})

    # -- services --------------------------------------------------------------------------------------------
    def _header_at(self, height: int) -> Optional[BlockHeader]:
        """My committed block header at an L2 height (None above my tip)."""
        blk = self.ledger.block(height)
        return None if blk is None else blk.header

    def _make_anchor_service(self) -> Optional[AnchorService]:
        cfg, fed = self.config.anchoring, self.federation
        if not cfg.enabled or fed is None:  # the config requires [bridge] (the federation) with anchoring
            return None
        b = self.config.bitcoind
        service = AnchorService(config=cfg, network=self.network, federation=fed, rpc=self.btc_rpc, store=self.store,
                                tip=lambda: self.chain.final,
                                header_at=self._header_at,
                                submit_update=self.admission.submit_as_member,
                                snapshot_bytes=self.snapshots.anchor_snapshot_bytes,
                                zmq_hashblock=b.zmq_hashblock, zmq_sequence=b.zmq_sequence, bitcoin_chain=b.chain,
                                on_stage=lambda stage, s: self.metrics.anchor_stage.observe(s, stage=stage))
        service.load()
        return service

    def _make_orchestration_service(self) -> Optional[OrchestrationService]:
        """The federation's task coordinator (orchestration/service.py): posts as this member."""
        cfg = self.config.orchestration
        if not cfg.enabled:
            return None
        def block_txs(height: int) -> Optional[tuple[Any, ...]]:
            blk = self.ledger.block(height)
            return None if blk is None else blk.txs

        return OrchestrationService(cfg, read_prefix=self.chain.records, tip_height=lambda: self.chain.tip.height,
                                    submit=self.admission.submit_as_member, tx_status=self.admission.tx_status,
                                    journal=Path(self.config.node.data_dir) / "orchestration" / "notes.jsonl",
                                    get_state=self.store.get_state, block_txs=block_txs)

    def _make_bridge_service(self) -> Optional[BridgeService]:
        """The federation's bridge work (header relay, peg-out payments): needs the federation and bitcoind."""
        fed = self.federation
        if fed is None or self.btc_rpc is None:
            if fed is not None:
                log.warning("bridge: no bitcoind configured: headers are not relayed and peg-outs not paid")
            return None
        cfg = self.config.bridge
        data_dir = Path(self.config.node.data_dir)
        bdir = data_dir / "bridge"
        bdir.mkdir(parents=True, exist_ok=True)
        signers = [LocalSigner(sec, fed, self.network, self.store.get_state,
                               bdir / f"signer-{PrivateKey(sec).public_key.format().hex()[:16]}.json")
                   for sec in self.genesis.signer_secrets]
        headers = HeaderStore(data_dir / HEADER_STORE_DIR, btc_chain(self.network).spv,
                              start_height=cfg.header_start_height, start_hash=cfg.header_start_hash,
                              map_size=self.config.store.map_size)
        return BridgeService(fed=fed, network=self.network, signers=signers, rpc=self.btc_rpc,
                             read_state=self.store.reader, submit=self.admission.submit_as_member,
                             headers=headers,
                             confirmations=cfg.pegout_confirmations, rbf_after_blocks=cfg.rbf_after_blocks,
                             fee_fallback_sat_per_vb=cfg.fee_fallback_sat_per_vb,
                             fee_max_sat_per_vb=cfg.fee_max_sat_per_vb, poll_interval_ms=cfg.poll_interval_ms,
                             roll_margin_blocks=cfg.roll_margin_blocks, header_at=self._header_at,
                             now=lambda: int(time.time()))

    def web_app(self) -> web.Application:
        """The REST application over this node's parts (each under its own AppKey), with the member routes."""
        api = self.config.api
        app = make_app(ApiDeps(
            chain=self.chain, admission=self.admission, snapshots=self.snapshots, metrics=self.metrics,
            models=self.models, admin_token=self.config.api.admin_token or "",
            max_body_bytes=self.config.api.max_body_bytes, members=self.host, anchors=self.anchor_service,
            federation=self.federation, bridge=self.bridge_service, orchestration=self.orchestration_service,
            rate_limit=RateLimiter(api.rate_limit_per_s, api.rate_limit_burst) if api.rate_limit_per_s else None,
            signatures=self.signatures))
        if self.transport is not None:
            app.router.add_routes(transport_routes(self.transport))
            app.on_shutdown.append(self.transport.close_inbound)  # else peers' WebSockets hold the API's stop
        return app

    # -- lifecycle -------------------------------------------------------------------------------------------
    def _tx_admitted(self, tx: Transaction, from_peer: bool) -> None:
        self.host.tx_admitted(tx, from_peer=from_peer)

    def _peer_txs(self, raws: list[bytes], peer: int) -> None:
        """Transactions another member forwarded: admitted like any (a refusal is the peer's or a duplicate)."""
        for raw in raws:
            try:
                self.admission.submit_from_peer(raw)
            except Rejected:
                pass

    def _track(self, fut: "asyncio.Future[Any]") -> None:
        """Keep fut (a shielded commit, a snapshot thread) for the shutdown to wait on."""
        self._inflight.add(fut)
        fut.add_done_callback(self._inflight.discard)

    def request_stop(self) -> None:
        """Ask the node to shut down (signal handlers call this)."""
        if not self._stop.is_set():
            log.info("stop requested")
        self._stop.set()
        self.host.stop_waiting()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def start(self, *, serve_http: bool = True) -> None:
        """Start the block producer, the snapshot task and the configured services, and (unless serve_http is
        False) the REST API."""
        self._tasks = [asyncio.create_task(self.host.run(self._stop), name="block-producer"),
                       asyncio.create_task(self.snapshots.run(), name="snapshotter")]
        self.anchor_service = self._make_anchor_service()
        if self.anchor_service is not None:
            # No bitcoind: no anchor can be confirmed, so no audit bundle can need a snapshot: none is written.
            if self.anchor_service.broadcasting:
                self.snapshots.anchor_every = self.config.anchoring.every_blocks
            self.snapshots.anchored_needed = self.anchor_service.anchored_snapshots_needed
            self.snapshots.prune_anchored()
            self.host.after_commit.append(self.anchor_service.notify_block)
            self._tasks.append(asyncio.create_task(self.anchor_service.run(), name="anchor-service"))
        self.orchestration_service = self._make_orchestration_service()
        if self.orchestration_service is not None:
            self._tasks.append(asyncio.create_task(self.orchestration_service.run(), name="orchestration-service"))
        if self.config.netflow.probe:  # this member's NetFlow probing duty (netflow/prober.py)
            prober = Prober(self.config.netflow, network=self.network, read_prefix=self.chain.records,
                            tip_height=lambda: self.chain.tip.height, submit=self.admission.submit_as_member,
                            tx_status=self.admission.tx_status, min_fee_sat=self.config.mempool.min_fee_sat)
            self._tasks.append(asyncio.create_task(prober.run(), name="netflow-prober"))
        self.bridge_service = self._make_bridge_service()
        if self.bridge_service is not None:
            svc = self.bridge_service
            self.chain.bridge_halted = lambda: int(svc.halted is not None)
            self._tasks.append(asyncio.create_task(svc.run(), name="bridge-service"))
        if serve_http:
            self._api = ApiServer(self.web_app(), self.config.api, self.metrics)
            self.port = await self._api.start()
            log.info("api listening", extra={"host": self.config.api.host, "port": self.port})
            api = self.config.api
            if api.read_workers:
                self._readers = ReadWorkers(Path(self.config.node.data_dir) / "ledger", self.network.name,
                                            api.host, api.read_port, api.read_workers)
                self._readers.start()
                log.info("read api started", extra={"host": api.host, "port": api.read_port,
                                                     "workers": api.read_workers})
        if self.transport is not None:
            await self.transport.start()

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
        if self._api is not None:
            await self._api.stop()
            self._api = None
        if self._readers is not None:
            await asyncio.to_thread(self._readers.close)
            self._readers = None
        if self.transport is not None:
            await self.transport.close()
        await self.host.close()
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
        self.signatures.close()
        if self.bridge_service is not None:
            self.bridge_service.close()
        if self.btc_rpc is not None:
            await self.btc_rpc.close()
        # Saved even after a failure: every transaction is re-checked against the committed state on reload.
        mempool_file.save_logged(self.datadir.path / mempool_file.MEMPOOL_FILE, self.network, self.admission.saved())
        self.store.close()
        self.datadir.close()
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


def _bitcoind_client(b: BitcoindConfig) -> Optional[BitcoinRPC]:
    """The bitcoind JSON-RPC client of [bitcoind], or None when no rpc_url is configured."""
    if not b.rpc_url:
        return None
    auth: Any = CookieAuth(b.cookie_file) if b.cookie_file is not None else UserPassAuth(b.rpc_user, b.rpc_password)
    return BitcoinRPC(b.rpc_url, auth)


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
        ensure_descriptors(config.api.max_connections)  # a limit the process cannot hold is a config error too
    except ConfigError as e:
        print(f"l2d: config error: {e}", file=sys.stderr)
        return 2
    try:
        node = Node.from_config(config)
    except (NodeError, KeyFileError, StoreError, OSError, lmdb.Error) as e:
        log.error("cannot start: %s", e)
        return 1
    return asyncio.run(node.run())


if __name__ == "__main__":
    sys.exit(main())
