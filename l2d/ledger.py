"""The ledger: the stored chain (final blocks and at most one non-final tip) with its state tree, and block
execution over the LMDB store.

Executing a block applies its transactions to an overlay of its parent's state (the tip, the final block below
a non-final tip, or a complete sibling of the tip: see docs/federation.md, "Storage") and yields its header; its
root comes from a TreeOverlay over the tip's stored tree (nodes in LMDB, read through the store's cache), so the
stored tree is never changed by building: readers prove against it in their own LMDB read transactions while
blocks are built. Storing writes block, commit, state changes, the tree's changed nodes, undo record and final
height in one LMDB transaction. On open, the stored tree's root must equal the tip header's (a mismatch means
corruption); `check()` recomputes it from every record.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .core.block import HEADER_SIZE, Block, BlockHeader, genesis_header, tx_root
from .core.errors import Rejected
from .core.rules import apply_tx
from .core.state import Rules, StateView
from .core.tree import RootBuilder, TreeChanges, TreeOverlay, build_tree, leaf_hash, stored_root
from .core.tx import Transaction
from .store import Reader, Store, StoreError

log = logging.getLogger(__name__)


Changes = dict[bytes, Optional[bytes]]  # key -> value, or None for a deletion


@dataclass(frozen=True, slots=True)
class BuiltBlock:
    block: Block
    raw: bytes
    writes: Changes  # relative to the parent's state
    rejected: tuple[tuple[Transaction, Rejected], ...]
    # The tree's changes for the block over the stored tree of the tip `from_tip`: stored while that is still the
    # tip, the block writes them instead of applying its writes to the tree again.
    tree: Optional[TreeChanges] = field(default=None, compare=False, repr=False)
    from_tip: Optional[bytes] = field(default=None, compare=False, repr=False)

    @property
    def header(self) -> BlockHeader:
        return self.block.header


class UnknownParent(StoreError):
    """A block whose parent is neither the tip, the final block below it, nor a stored sibling of the tip."""


class TipMoved(StoreError):
    """A block was stored while another was being executed (in another thread) over the tip before it: execute
    again."""


class Ledger:
    """Owns the tip. Not thread-safe for writes: one caller at a time stores (the node serialises them); execute may
    run beside a store (it reads its own LMDB transaction)."""

    def __init__(self, store: Store, rules: Rules) -> None:
        self.store = store
        self.rules = rules
        self.final: Optional[BlockHeader] = None
        self.tip: Optional[BlockHeader] = None
        self._sibling_writes: dict[bytes, Changes] = {}  # hash of a sibling of the tip -> its writes over final

    def open(self, genesis_state: dict[bytes, bytes], genesis_timestamp_ms: int) -> BlockHeader:
        """Load the tip and check the stored tree's root; on an empty database, commit the genesis block first."""
        net = self.rules.network
        if self.store.tip_height() is None:
            root, changes = build_tree(sorted(genesis_state.items()))
            header = genesis_header(net, genesis_timestamp_ms, root)
            block = Block(header, ())
            self.store.commit_block(0, block.encode(), [], dict(genesis_state), final=0, tree=changes)
            log.info("genesis block %s committed with %d state records", header.hash.hex(), len(genesis_state))
        with self.store.reader() as r:
            height = r.tip_height()
            raw = r.get_block(height) if height is not None else None
            if raw is None:
                raise StoreError("database has no tip block")
            tip = Block.decode(bytes(raw), net).header
            final_h = r.final_height()
            raw_final = r.get_block(final_h)
            if raw_final is None:
                raise StoreError(f"database has no final block {final_h}")
            final = Block.decode(bytes(raw_final), net).header
            root, records = stored_root(r.get_node), r.state_count()
        if root != tip.state_root:
            raise StoreError(f"the stored state tree's root is {root.hex()}, but block {tip.height} "
                             f"commits to {tip.state_root.hex()}: the database is corrupt")
        self.final, self.tip = final, tip
        log.info("ledger open at height %d, state root %s, %d records", tip.height, tip.state_root.hex(), records)
        return tip

    def state_root(self) -> bytes:
        """The stored tree's root (the tip's state root)."""
        with self.store.reader() as r:
            return stored_root(r.get_node)

    def check(self) -> bytes:
        """Recompute the root from every stored record (RootBuilder) and compare it with the stored tree's and the
        tip's: StoreError on any difference. The full cross-check the daemon no longer does at start."""
        with self.store.reader() as r:
            b = RootBuilder()
            for k, v in r.iter_state():
                b.add(bytes(k), bytes(v))
            full, stored = b.root(), stored_root(r.get_node)
        tip = self._tip()
        if not full == stored == tip.state_root:
            raise StoreError(f"state root from the records {full.hex()}, from the stored tree {stored.hex()}, "
                             f"in block {tip.height} {tip.state_root.hex()}: the database is corrupt")
        return full

    def build_block(self, txs: Iterable[Transaction], timestamp_ms: int, *,
                    signatures_checked: bool = False) -> BuiltBlock:
        """A block on the tip of the transactions that apply (rejected ones are skipped and reported)."""
        return self.execute(self._tip(), txs, timestamp_ms, signatures_checked=signatures_checked)

    def execute(self, parent: BlockHeader, txs: Iterable[Transaction], timestamp_ms: int, *, strict: bool = False,
                signatures_checked: bool = False) -> BuiltBlock:
        """Apply txs on parent's state; the header takes max(timestamp_ms, parent's timestamp). strict: the first
        rejected transaction raises its Rejected (a proposal with an invalid transaction is invalid as a whole);
        otherwise rejected ones are skipped and reported. UnknownParent if parent's state is not at hand; TipMoved
        if a block was stored meanwhile (by another thread). Nothing is written."""
        tip = self._tip()
        base = self._changes_to(parent.hash)
        accepted: list[Transaction] = []
        rejected: list[tuple[Transaction, Rejected]] = []
        rules = self.rules
        with self.store.reader() as r:
            raw = r.get_block(tip.height)
            if (r.tip_height() != tip.height or raw is None
                    or BlockHeader.decode(bytes(raw[:HEADER_SIZE]), self.rules.network) != tip):
                raise TipMoved(f"a block was stored while block {parent.height + 1} was being executed")
            get = r.get_state if not base else (lambda k: base[k] if k in base else r.get_state(k))
            view = StateView(get, parent.height + 1, parent.hash)
            for tx in txs:
                try:
                    apply_tx(view, tx, rules, signature_checked=signatures_checked)
                except Rejected as e:
                    if strict:
                        raise
                    rejected.append((tx, e))
                else:
                    accepted.append(tx)
            writes = view.writes
            root, tree = _tree_changes(self.store, r, {**base, **writes} if base else writes)
        header = BlockHeader(parent.network_id, parent.height + 1, parent.hash, max(timestamp_ms, parent.timestamp_ms),
                             len(accepted), tx_root([t.txid for t in accepted]), root)
        block = Block(header, tuple(accepted))
        return BuiltBlock(block, block.encode(), writes, tuple(rejected), tree, tip.hash)

    def _tip(self) -> BlockHeader:
        if self.tip is None or self.final is None:
            raise StoreError("ledger is not open")
        return self.tip

    def _changes_to(self, parent_hash: bytes) -> Changes:
        """The state changes from the tip's state to the state after block parent_hash."""
        tip, final = self._tip(), self.final
        assert final is not None
        if parent_hash == tip.hash:
            return {}
        if tip.height > final.height:
            undo = self.store.get_undo(tip.height)
            if undo is None:
                raise StoreError(f"non-final block {tip.height} has no undo record")
            if parent_hash == final.hash:
                return undo
            writes = self._sibling_writes.get(parent_hash)
            if writes is None:
                for raw, _ in self.store.siblings():
                    sib = Block.decode(raw, self.rules.network)
                    if sib.header.hash == parent_hash:
                        writes = self._replay(final, sib, undo)
                        break
            if writes is not None:
                return {**undo, **writes}
        raise UnknownParent(f"block {parent_hash.hex()} is not a stored block that can be built on")

    def _replay(self, final: BlockHeader, sib: Block, undo: Changes) -> Changes:
        """The writes of a stored sibling of the tip over the final state (it was valid when stored)."""
        with self.store.reader() as r:
            view = StateView(lambda k: undo[k] if k in undo else r.get_state(k), sib.header.height,
                             sib.header.prev_hash)
            for tx in sib.txs:
                apply_tx(view, tx, self.rules, signature_checked=True)
        self._sibling_writes[sib.header.hash] = view.writes
        return view.writes

    def _tree_after(self, built: BuiltBlock, changes: Changes) -> TreeChanges:
        """The tree's changes for a block stored over the tip's state: the ones executing it made, if made over
        this tip's tree, else the tip's with changes applied."""
        if built.tree is not None and built.from_tip == self._tip().hash:
            return built.tree
        with self.store.reader() as r:
            root, tree = _tree_changes(self.store, r, changes)
        if root != built.header.state_root:
            raise StoreError(f"block {built.header.height}: its writes make root {root.hex()}, its header says "
                             f"{built.header.state_root.hex()}")
        return tree

    # -- storing -----------------------------------------------------------------------------------------------
    def _undo_of(self, writes: Changes, base: Changes) -> Changes:
        """The parent-state value of every key a block writes (base: changes from the tip to the parent)."""
        out: Changes = {}
        for k in writes:
            if k in base:
                out[k] = base[k]
            else:
                v = self.store.get_state(k)
                out[k] = None if v is None else bytes(v)
        return out

    def store_block(self, built: BuiltBlock, commit: bytes, final: Optional[BlockHeader]) -> None:
        """Store a complete block (built by execute) as the new tip. Its parent is the tip (append) or the final
        block below a non-final tip (the tip is replaced by this sibling, which moves to the siblings); final: the
        new final block (None: unchanged). One LMDB transaction."""
        tip = self._tip()
        h = built.header
        if h.prev_hash == tip.hash:
            undo = self._undo_of(built.writes, {})
            self.store.commit_block(h.height, built.raw, [t.txid for t in built.block.txs], built.writes,
                                    commit=commit, final=None if final is None else final.height, undo=undo,
                                    tree=self._tree_after(built, built.writes))
        elif self.final is not None and tip.height > self.final.height and h.prev_hash == self.final.hash:
            if final is not None:
                raise StoreError("replacing the tip cannot move the final height")
            base = self._changes_to(h.prev_hash)
            undo = self._undo_of(built.writes, base)
            old = self.block(tip.height)
            assert old is not None
            self.store.replace_tip(tip.hash, [t.txid for t in old.txs], h.height, built.raw,
                                   [t.txid for t in built.block.txs], built.writes, commit=commit, undo=undo,
                                   new_hash=h.hash, tree=self._tree_after(built, {**base, **built.writes}))
        else:
            raise UnknownParent(f"block {h.height} does not extend the tip or the final block")
        if final is not None:
            self.final = final
            self._sibling_writes.clear()
        else:
            self._sibling_writes.pop(h.hash, None)
        self.tip = h

    def commit(self, built: BuiltBlock) -> None:
        """Store a block on the tip without a commit (tests and benchmarks of a single member)."""
        b = built.block
        self.store.commit_block(b.header.height, built.raw, [t.txid for t in b.txs], built.writes,
                                tree=self._tree_after(built, built.writes))
        self.tip = b.header

    def get(self, key: bytes) -> Optional[bytes]:
        """Committed value of a state key."""
        return self.store.get_state(key)

    def block(self, height: int) -> Optional[Block]:
        raw = self.store.get_block(height)
        return None if raw is None else Block.decode(raw, self.rules.network)

    def txs_committed(self, txids: Sequence[bytes]) -> list[bool]:
        return [self.store.tx_location(t) is not None for t in txids]


def _tree_changes(store: Store, r: Reader, changes: Changes) -> tuple[bytes, TreeChanges]:
    """The root and the tree's changes after changes to the tree stored as of r."""
    t = TreeOverlay(store.tree_loader(r))
    for k in sorted(changes):  # key order: neighbouring paths share the nodes they decode
        v = changes[k]
        if v is None:
            t.delete(k)
        else:
            t.set_hash(k, leaf_hash(k, v))  # keys come from the state transition: already well-formed
    return t.root(), t.changes()
