"""Snapshot files of the committed state (docs/snapshot-format.md): periodic and on demand (pruned to the last
`keep`), and one at every anchored height while the anchor service broadcasts (embedded in audit bundles; kept
while the anchor may still need one, within a byte budget: docs/anchoring.md, "Anchored snapshots").

Each file is written in a thread from one LMDB read transaction (an MVCC view of one height) while blocks go on
being committed. A failure is logged, never fatal: a snapshot is a copy, not the ledger. Periodic and anchored
snapshots are skipped while their filesystem has less than store.min_free_bytes free.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .core import snapshot as snapshot_format
from .core.block import HEADER_SIZE, BlockHeader
from .core.params import Network
from .datadir import free_bytes, make_private_dir
from .metrics import Metrics
from .store import Store, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    name: str
    path: Path
    height: int
    block_hash: bytes
    state_root: bytes
    size: int


# (heights of the anchored snapshot files, anchored_keep_final) -> the heights an audit bundle may still need
NeededHeights = Callable[[Sequence[int], int], set[int]]


class Snapshots:
    """Writes and lists snapshot files. anchor_every > 0 turns on the snapshot at every anchored height;
    anchored_needed (the anchor service's rule) turns on their pruning."""

    def __init__(self, store: Store, network: Network, metrics: Metrics, *, directory: Path, keep: int,
                 every_blocks: int, track: Callable[["asyncio.Future[Any]"], None], anchored_keep_final: int = 2,
                 anchored_max_bytes: int = 4 << 30, min_free_bytes: int = 0) -> None:
        self.store = store
        self.network = network
        self.metrics = metrics
        self.dir = directory
        # Snapshots at anchored heights (embedded in audit bundles), pruned by prune_anchored.
        self.anchor_dir = directory / "anchored"
        self.keep = keep
        self.every_blocks = every_blocks
        self.anchor_every = 0
        self.anchored_needed: Optional[NeededHeights] = None
        self.anchored_keep_final = anchored_keep_final
        self.anchored_max_bytes = anchored_max_bytes
        self.min_free_bytes = min_free_bytes
        self._disk_low = False
        self._track = track
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()

    def _room_for(self, what: str) -> bool:
        """False (logged once until space returns) while the snapshot filesystem is below store.min_free_bytes."""
        if not self.min_free_bytes:
            return True
        make_private_dir(self.dir)
        free = free_bytes(self.dir)
        low = free < self.min_free_bytes
        if low and not self._disk_low:
            log.warning("low disk space: %s snapshots are not written while %d bytes are free on the filesystem of "
                        "%s, below store.min_free_bytes (%d)", what, free, self.dir, self.min_free_bytes)
        elif self._disk_low and not low:
            log.info("disk space back above store.min_free_bytes: snapshots are written again")
        self._disk_low = low
        return not low

    # -- periodic and on demand ----------------------------------------------------------------------------------
    def block_committed(self, header: BlockHeader) -> None:
        """A block was committed: ask for a periodic snapshot when its height is due."""
        if self.every_blocks and header.height % self.every_blocks == 0:
            self._wanted.set()

    async def run(self) -> None:
        """Write the periodic snapshots asked for by block_committed."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            if not self._room_for("periodic"):
                continue
            try:
                await self.snapshot_now(trigger="periodic")
            except Exception:  # a snapshot is a copy, not the ledger: log it and keep running
                log.exception("periodic snapshot failed")

    async def snapshot_now(self, trigger: str = "admin") -> SnapshotInfo:
        """Write a snapshot of the committed tip (one consistent read view, in a thread), then prune."""
        async with self._lock:
            fut = asyncio.ensure_future(asyncio.to_thread(self._write_snapshot))
            self._track(fut)
            info = await asyncio.shield(fut)
        self.metrics.snapshots.inc(trigger=trigger)
        log.info("snapshot written", extra={"trigger": trigger, "snapshot": info.name, "height": info.height,
                                            "root": info.state_root.hex(), "size": info.size})
        return info

    def _write_snapshot(self) -> SnapshotInfo:
        directory = self.dir
        make_private_dir(directory)
        with self.store.reader() as r:
            height = r.tip_height()
            raw = r.get_block(height) if height is not None else None
            if raw is None:
                raise StoreError("database has no tip block")
            header = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), self.network)
            path = Path(snapshot_format.write_snapshot_file(directory, self.network, header.height, header.hash,
                                                            header.state_root, r.iter_state(), r.state_count()))
        snapshot_format.prune_snapshots(directory, self.keep, self.network)
        return SnapshotInfo(path.name, path, header.height, header.hash, header.state_root, path.stat().st_size)

    def list_snapshots(self) -> list[dict[str, Any]]:
        """Complete snapshot files of this network in the snapshot directory (name, height, size), oldest first."""
        try:
            snaps = snapshot_format.list_snapshots(self.dir, self.network)
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
            snaps = snapshot_format.list_snapshots(self.dir, self.network)
        except FileNotFoundError:
            return None
        for _, p in snaps:
            if p.name == name:
                return p if p.is_file() and not p.is_symlink() else None
        return None

    # -- at anchored heights -------------------------------------------------------------------------------------
    async def committed_locked(self, header: BlockHeader) -> None:
        """Called with the tree lock held right after `header` was committed (so it is still the tip): at an
        anchored height, snapshot exactly that block.

        The lock is held only until the writer thread has opened its LMDB read transaction (an MVCC view of
        this height); the file is then written while blocks go on being committed.
        """
        if not self.anchor_every or header.height % self.anchor_every:
            return
        if not self.anchored_max_bytes or not self._room_for("anchored"):
            return
        opened = threading.Event()
        fut = asyncio.ensure_future(self._anchor_snapshot(header, opened))
        self._track(fut)
        await asyncio.to_thread(opened.wait, 30)

    async def _anchor_snapshot(self, header: BlockHeader, opened: threading.Event) -> None:
        """Write the anchored snapshot in a thread, then prune (on the event loop, so the anchor service, which
        decides on the loop too, never picks a height whose file is being deleted)."""
        await asyncio.to_thread(self._write_anchor_snapshot, header, opened)
        self.prune_anchored()

    def prune_anchored(self) -> list[int]:
        """Delete the anchored snapshots no audit bundle can need any more (anchored_needed, the anchor service's
        rule), then the oldest until the rest fit in anchored_max_bytes; returns the deleted heights.

        Never raises: a failure is logged (a snapshot is a copy, not the ledger)."""
        try:
            return self._prune_anchored()
        except Exception:
            log.exception("pruning the anchored snapshots failed")
            return []

    def _prune_anchored(self) -> list[int]:
        try:
            snaps = snapshot_format.list_snapshots(self.anchor_dir, self.network)
        except FileNotFoundError:
            return []
        doomed: list[tuple[int, Path]] = []
        if self.anchored_needed is not None:
            needed = self.anchored_needed([h for h, _ in snaps], self.anchored_keep_final)
            doomed = [(h, p) for h, p in snaps if h not in needed]
            snaps = [(h, p) for h, p in snaps if h in needed]
        sizes = [p.stat().st_size for _, p in snaps]
        total = sum(sizes)
        i = 0
        while total > self.anchored_max_bytes and i < len(snaps):  # over budget: the oldest go first
            doomed.append(snaps[i])
            total -= sizes[i]
            i += 1
        if i:
            log.warning("anchored snapshots over snapshots.anchored_max_bytes (%d): deleting the %d oldest still "
                        "wanted; their audit bundles will carry the state root without a snapshot",
                        self.anchored_max_bytes, i, extra={"heights": [h for h, _ in snaps[:i]]})
        for _, p in doomed:
            p.unlink(missing_ok=True)
        if doomed:
            log.info("anchored snapshots pruned", extra={"heights": sorted(h for h, _ in doomed),
                                                         "kept": len(snaps) - i, "bytes": total})
        return sorted(h for h, _ in doomed)

    def _write_anchor_snapshot(self, header: BlockHeader, opened: threading.Event) -> Optional[Path]:
        """Runs in a thread. A failure is logged, never raised: a snapshot is a copy, not the ledger (the audit
        bundle then carries the state root without the snapshot)."""
        try:
            directory = self.anchor_dir
            make_private_dir(directory)
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
            snaps = snapshot_format.list_snapshots(self.anchor_dir, self.network)
        except FileNotFoundError:
            return None
        for h, p in snaps:
            if h == height:
                return p.read_bytes()
        return None
