"""The ledger: committed chain tip, in-memory state tree and block building over the LMDB store.

Building a block applies transactions to an overlay of the committed state, updates the tree and yields
the header; committing writes block, state changes and tip in one LMDB transaction. On open, the tree is
rebuilt from the stored state and its root must equal the tip header's: a mismatch means corruption.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from .core.block import Block, BlockHeader, genesis_header, tx_root
from .core.errors import Rejected
from .core.rules import apply_tx
from .core.state import Rules, StateView
from .core.tree import StateTree, leaf_hash
from .core.tx import Transaction
from .store import Store, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BuiltBlock:
    block: Block
    raw: bytes
    writes: dict[bytes, Optional[bytes]]
    rejected: tuple[tuple[Transaction, Rejected], ...]


class Ledger:
    """Owns the tree and the tip. Not thread-safe: one caller at a time (the node serialises them)."""

    def __init__(self, store: Store, rules: Rules) -> None:
        self.store = store
        self.rules = rules
        self.tree = StateTree()
        self.tip: Optional[BlockHeader] = None

    def open(self, genesis_state: dict[bytes, bytes], genesis_timestamp_ms: int) -> BlockHeader:
        """Load the tip and rebuild the tree; on an empty database, commit the genesis block first."""
        net = self.rules.network
        if self.store.tip_height() is None:
            tree = StateTree()
            for k, v in genesis_state.items():
                tree.set(k, v)
            header = genesis_header(net, genesis_timestamp_ms, tree.root())
            block = Block(header, ())
            self.store.commit_block(0, block.encode(), [], dict(genesis_state))
            log.info("genesis block %s committed with %d state records", header.hash.hex(), len(genesis_state))
        with self.store.reader() as r:
            height = r.tip_height()
            raw = r.get_block(height) if height is not None else None
            if raw is None:
                raise StoreError("database has no tip block")
            tip = Block.decode(bytes(raw), net).header
            tree = StateTree()
            for k, v in r.iter_state():
                tree.set(k, v)
        if tree.root() != tip.state_root:
            raise StoreError(f"state in the database hashes to {tree.root().hex()}, but block {tip.height} "
                             f"commits to {tip.state_root.hex()}: the database is corrupt")
        self.tree, self.tip = tree, tip
        log.info("ledger open at height %d, state root %s, %d records", tip.height, tip.state_root.hex(), len(tree))
        return tip

    def build_block(self, txs: Iterable[Transaction], timestamp_ms: int, *,
                    signatures_checked: bool = False) -> BuiltBlock:
        """Apply txs on top of the tip (rejected ones are skipped and reported) and update the tree.

        The tree now reflects the new block: commit() it next, or treat a failure as fatal.
        """
        tip = self.tip
        if tip is None:
            raise StoreError("ledger is not open")
        accepted: list[Transaction] = []
        rejected: list[tuple[Transaction, Rejected]] = []
        rules = self.rules
        with self.store.reader() as r:
            view = StateView(r.get_state, tip.height + 1)
            for tx in txs:
                try:
                    apply_tx(view, tx, rules, signature_checked=signatures_checked)
                except Rejected as e:
                    rejected.append((tx, e))
                else:
                    accepted.append(tx)
            writes = view.writes
        tree = self.tree
        for k, v in writes.items():
            if v is None:
                tree.delete(k)
            else:
                tree.set_hash(k, leaf_hash(k, v))  # keys come from the state transition: already well-formed
        header = BlockHeader(tip.network_id, tip.height + 1, tip.hash, max(timestamp_ms, tip.timestamp_ms),
                             len(accepted), tx_root([t.txid for t in accepted]), tree.root())
        block = Block(header, tuple(accepted))
        return BuiltBlock(block, block.encode(), writes, tuple(rejected))

    def _commit_args(self, built: BuiltBlock) -> tuple[int, bytes, list[bytes], dict[bytes, Optional[bytes]]]:
        return (built.block.header.height, built.raw, [t.txid for t in built.block.txs], built.writes)

    def commit(self, built: BuiltBlock) -> None:
        self.store.commit_block(*self._commit_args(built))
        self.tip = built.block.header

    async def commit_async(self, built: BuiltBlock) -> None:
        await self.store.commit_block_async(*self._commit_args(built))
        self.tip = built.block.header

    def get(self, key: bytes) -> Optional[bytes]:
        """Committed value of a state key."""
        return self.store.get_state(key)

    def block(self, height: int) -> Optional[Block]:
        raw = self.store.get_block(height)
        return None if raw is None else Block.decode(raw, self.rules.network)

    def txs_committed(self, txids: Sequence[bytes]) -> list[bool]:
        return [self.store.tx_location(t) is not None for t in txids]
