"""Snapshot files of the committed state (docs/snapshot-format.md): periodic and on demand (pruned to the last
`keep`), and one at every anchored height (embedded in audit bundles).

Each file is written in a thread from one LMDB read transaction (an MVCC view of one height) while blocks go on
being committed. A failure is logged, never fatal: a snapshot is a copy, not the ledger.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .core import snapshot as snapshot_format
from .core.block import HEADER_SIZE, BlockHeader
from .core.params import Network
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


class Snapshots:
    """Writes and lists snapshot files. anchor_every > 0 turns on the snapshot at every anchored height."""

    def __init__(self, store: Store, network: Network, metrics: Metrics, *, directory: Path, keep: int,
                 every_blocks: int, track: Callable[["asyncio.Future[Any]"], None]) -> None:
        self.store = store
        self.network = network
        self.metrics = metrics
        self.dir = directory
        # Snapshots at anchored heights (embedded in audit bundles); never pruned.
        self.anchor_dir = directory / "anchored"
        self.keep = keep
        self.every_blocks = every_blocks
        self.anchor_every = 0
        self._track = track
        self._lock = asyncio.Lock()
        self._wanted = asyncio.Event()

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
        directory.mkdir(parents=True, exist_ok=True)
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
        opened = threading.Event()
        fut = asyncio.ensure_future(asyncio.to_thread(self._write_anchor_snapshot, header, opened))
        self._track(fut)
        await asyncio.to_thread(opened.wait, 30)

    def _write_anchor_snapshot(self, header: BlockHeader, opened: threading.Event) -> Optional[Path]:
        """Runs in a thread. A failure is logged, never raised: a snapshot is a copy, not the ledger (the audit
        bundle then carries the state root without the snapshot)."""
        try:
            directory = self.anchor_dir
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
            snaps = snapshot_format.list_snapshots(self.anchor_dir, self.network)
        except FileNotFoundError:
            return None
        for h, p in snaps:
            if h == height:
                return p.read_bytes()
        return None
