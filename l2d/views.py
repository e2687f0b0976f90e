"""Read views of the committed chain for the API and the services: tip, summaries, records and proofs.

Every read comes from the store (LMDB read transactions over committed data). Proofs come from the tree nodes
stored with the committed tip, read in the same transaction as the values they prove: they never wait for the
block being built.
"""
from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .core.block import HEADER_SIZE, Block, BlockHeader
from .core.commit import Commit
from .core.params import Network
from .core.state import SUPPLY_KEY, Account, Supply, account_key
from .core.tree import Proof, prove_stored
from .ledger import Ledger
from .mempool import Mempool
from .metrics import Metrics
from .store import Reader, Store, StoreError


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


@dataclass(frozen=True, slots=True)
class ProvenValue:
    """A committed state value (None if absent) with its proof against the tip's root (None if absent)."""

    tip: BlockHeader
    value: Optional[bytes]
    proof: Optional[Proof]


class ChainView:
    """What the committed chain looks like now. Holds no state of its own beyond the start time."""

    def __init__(self, network: Network, store: Store, ledger: Ledger, mempool: Mempool, metrics: Metrics,
                 version: str) -> None:
        self.network = network
        self.store = store
        self.ledger = ledger
        self.mempool = mempool
        self.metrics = metrics
        self.version = version
        self._started = time.monotonic()
        self.peers_connected: Callable[[], int] = lambda: 0  # the node sets it when it has member peers
        self.bridge_halted: Callable[[], int] = lambda: 0  # the node sets it when it runs the bridge service

    @property
    def tip(self) -> BlockHeader:
        """Header of the last committed block."""
        tip = self.ledger.tip
        if tip is None:  # Ledger.open ran when the node was built
            raise StoreError("ledger is not open")
        return tip

    @property
    def final(self) -> BlockHeader:
        """Header of the highest final block (a child of it carries m member signatures)."""
        final = self.ledger.final
        if final is None:
            raise StoreError("ledger is not open")
        return final

    def block_commit(self, height: int, n: int) -> Optional[Commit]:
        """The stored commit of block height (block 0: the empty commit of n members), None above the tip."""
        raw = self.store.get_commit(height)
        if raw is None:
            return None
        return Commit(n, (), ()) if height == 0 else Commit.decode(raw)

    def chain_entries(self, start: int, end: int, n: int) -> list[tuple[BlockHeader, Commit]]:
        """(header, commit) of the stored blocks start..end from one read (fewer if the tip is lower)."""
        out = []
        with self.store.reader() as r:
            for h in range(start, end + 1):
                raw, commit = r.get_block(h), r.get_commit(h)
                if raw is None or commit is None:
                    break
                header = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), self.network)
                out.append((header, Commit(n, (), ()) if h == 0 else Commit.decode(bytes(commit))))
        return out

    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    def reader(self) -> AbstractContextManager[Reader]:
        """One consistent read transaction over the committed state and blocks."""
        return self.store.reader()

    def get_state(self, key: bytes) -> Optional[bytes]:
        return self.store.get_state(key)

    def records(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Every committed state record under prefix, in key order, from one read."""
        with self.store.reader() as r:
            return list(r.iter_prefix(prefix))

    def block(self, height: int) -> Optional[Block]:
        return self.ledger.block(height)

    def raw_block(self, height: int) -> Optional[bytes]:
        return self.store.get_block(height)

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

    async def prove(self, key: bytes) -> ProvenValue:
        """The committed value under key and its inclusion proof against the committed tip (both None if absent)."""
        with committed(self.store, self.network) as (tip, r, get):
            raw = get(key)
            proof = prove_stored(r.get_node, key, _present(get)) if raw is not None else None
        return ProvenValue(tip, raw, proof)

    async def account(self, pubkey: bytes) -> AccountView:
        return committed_account(self.store, self.network, pubkey)

    def render_metrics(self) -> str:
        """The Prometheus exposition of this node."""
        with self.store.reader() as r:
            records = r.state_count()
        tip = self.tip
        gauges = {
            "l2d_height": ("Height of the committed tip.", lambda: tip.height),
            "l2d_final_height": ("Height of the highest final block.", lambda: self.final.height),
            "l2d_federation_peers_connected": ("Members this member's outbound link is authenticated to.",
                                               self.peers_connected),
            "l2d_bridge_halted": ("1 while this member's circuit breaker refuses to sign peg-outs "
                                  "(GET /api/bridge/federation says why).", self.bridge_halted),
            "l2d_mempool_txs": ("Transactions in the mempool.", lambda: len(self.mempool)),
            "l2d_mempool_bytes": ("Encoded size of the mempool.", lambda: self.mempool.size_bytes),
            "l2d_state_records": ("Records in the committed state.", lambda: records),
            "l2d_uptime_seconds": ("Seconds since the node started.", lambda: round(self.uptime_s(), 3)),
        }
        return self.metrics.render(gauges)


@contextlib.contextmanager
def committed(store: Store, network: Network) -> Iterator[tuple[BlockHeader, Reader, Callable[[bytes],
                                                                                        Optional[bytes]]]]:
    """The committed tip, its tree and its values, all from one LMDB read transaction: never waiting for the block
    being built (a block's nodes and records are written in the transaction that stores it). Any process that
    opens the ledger's LMDB can read this way (l2d/readapi.py)."""
    with store.reader() as r:
        h = r.tip_height()
        raw = r.get_block(h) if h is not None else None
        if raw is None:
            raise StoreError("database has no tip block")
        tip = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), network)
        yield tip, r, lambda k: None if (v := r.get_state(k)) is None else bytes(v)


def committed_account(store: Store, network: Network, pubkey: bytes) -> AccountView:
    """Committed account and its proof (inclusion or non-inclusion) against the committed tip's state root."""
    key = account_key(pubkey)
    with committed(store, network) as (tip, r, get):
        raw = get(key)
        proof = prove_stored(r.get_node, key, _present(get))
    return AccountView(None if raw is None else Account.decode(raw), tip.height, tip.state_root, proof)


def _present(get: Callable[[bytes], Optional[bytes]]) -> Callable[[bytes], bytes]:
    """The stored value of a key the tree holds (StoreError if the store lacks it: corruption)."""
    def value(key: bytes) -> bytes:
        v = get(key)
        if v is None:
            raise StoreError(f"key {key.hex()} is in the tree but not in the store")
        return v
    return value
