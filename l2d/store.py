"""LMDB store: blocks, their commits, state and transaction index; a block, its commit, its state changes and the
final height commit atomically.

Layout (docs/federation.md, "Storage"): the chain is the final blocks plus at most one non-final block, the tip
(the fork choice among the complete children of the final block). A non-final tip keeps an undo record (the prior
value of every key it wrote), so it can be replaced by a sibling in one write transaction; the other complete
children of the final block wait in `siblings`. Both go when the final height passes them.

Block commits come from one caller at a time (the node's consensus stores blocks under its tree lock, on a
worker thread); the anchor service's records are written on the store's writer thread (`put_anchor_async`); LMDB
serialises write transactions between threads. Reads may come from any thread, each in its own LMDB read
transaction (MVCC: readers see the last committed block, never half of one).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import struct
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import lmdb

from .core.params import Network
from .core.tree import ROOT_REF, Load, NodeBuilder, TreeChanges, leaf_hash

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # 2: block commits, the final height, undo records and siblings (issue 12); 3: tree nodes
_U64 = struct.Struct(">Q")
_LOC = struct.Struct(">QI")


READER_CHECK_EVERY = 64  # commits between two sweeps of LMDB's reader table for slots of dead processes
DEFAULT_MAP_SIZE = 64 << 30  # store.map_size's default
DEFAULT_TREE_CACHE = 256 << 20  # store.tree_cache_mb's default, in bytes
_CACHE_ENTRY = 160  # bytes a cached node costs beyond its key and value (objects and the ordered dict's links)


class StoreError(Exception):
    """The database cannot be used (wrong network or schema, corrupt metadata, non-sequential commit)."""


class StoreFull(StoreError):
    """A write did not fit: the LMDB map (store.map_size) is full. Nothing of that write was stored."""


class StoreWriteError(StoreError):
    """LMDB could not write (e.g. the disk is full: ENOSPC, or EIO from a failed write-back). Nothing of that
    write was stored."""


def write_error(e: lmdb.Error, path: Path, map_size: int, what: str) -> StoreError:
    """The typed error for an LMDB write failure, saying what to do about it (shared with the header store)."""
    if isinstance(e, lmdb.MapFullError):
        return StoreFull(f"{what}: the LMDB map of {path} is full (store.map_size = {map_size} bytes): raise "
                         "store.map_size in the config and restart; nothing committed was lost")
    try:
        st = os.statvfs(path)
        free = f"{st.f_bavail * st.f_frsize} bytes free on its filesystem"
    except OSError as oe:
        free = f"free space unknown: {oe.strerror}"
    return StoreWriteError(f"{what}: LMDB cannot write to {path} ({e}; {free}): if the disk is full, free space "
                           "and restart; nothing committed was lost")


class Store:
    def __init__(self, path: Path, network: Network, map_size: int = DEFAULT_MAP_SIZE,
                 tree_cache: int = DEFAULT_TREE_CACHE, *, readonly: bool = False, durable: bool = True) -> None:
        """readonly: for another process reading a daemon's ledger (l2d/readapi.py); it must exist and have this
        code's schema, and nothing can be written through it. durable=False: commits are not flushed to the disk
        (no fsync; a crash of the process loses nothing, one of the machine may lose the last commits) — for
        benchmarks that measure the store without the disk's flush (bench/bench_state_store.py), never the daemon."""
        if not readonly:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.network = network
        self.map_size = map_size
        # The most recently written tree nodes (path key -> node), for the block executor: filled only by commits,
        # so it holds the committed tree's nodes; _gen is odd while a commit changes the tree (a seqlock: a loader
        # that sees _gen move ignores what the cache gave it and reads its own LMDB transaction).
        self.tree_cache_limit = tree_cache
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._gen = 0
        # mode: the environment's files are created 0600 (LMDB clears the execute bits), the directory 0700.
        # readahead off: blocks and proofs read records and tree nodes at random places; the kernel's readahead
        # would map (and, from a cold cache, read) neighbouring pages nobody asked for: at 10 M accounts 1.1 GB
        # of RSS for 10 blocks instead of 0.16 GB, at no gain in speed.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=16, subdir=True, sync=durable, metasync=durable,
                             max_readers=256, mode=0o700, readahead=False, readonly=readonly, create=not readonly)
        db = functools.partial(self.env.open_db, create=not readonly)
        self._meta = db(b"meta")
        self._state = db(b"state")
        self._blocks = db(b"blocks")
        self._txs = db(b"txs")
        self._anchors = db(b"anchors")  # anchor service records: l2 height u64 -> JSON
        self._commits = db(b"commits")  # height u64 -> the block's commit (b"" for block 0)
        self._undo = db(b"undo")  # height u64 -> undo record of a non-final block
        self._siblings = db(b"siblings")  # block hash -> u32 block length | block | commit
        self._nodes = db(b"nodes")  # the state tree: path key -> node (l2d/core/tree.py)
        try:
            self._check_or_init_meta(readonly)
        except BaseException:
            self.env.close()
            raise
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-writer")
        self._since_reader_check = 0
        if not readonly:
            self.check_readers()

    def check_readers(self) -> int:
        """Free the reader slots of processes that died inside a read transaction (a read API worker killed
        mid-read): such a slot pins the version it read, so every later commit's pages would be kept and the file
        would grow until the map is full. Done at open and every READER_CHECK_EVERY commits; the count freed."""
        n = int(self.env.reader_check())
        if n:
            log.warning("freed %d LMDB reader slot(s) of dead processes in %s", n, self.path)
        return n

    def _check_or_init_meta(self, readonly: bool) -> None:
        with self.env.begin(write=not readonly, db=self._meta) as txn:
            schema = txn.get(b"schema")
            net = txn.get(b"network")
            if schema is None and net is None and not readonly:
                txn.put(b"schema", _U64.pack(SCHEMA_VERSION))
                txn.put(b"network", self.network.name.encode())
                return
        if net != self.network.name.encode():
            raise StoreError(f"database at {self.path} was made for network {net!r}, "
                             f"not {self.network.name!r}: refusing to open it")
        if schema is not None and _U64.unpack(schema)[0] == 2 and not readonly:
            self._add_tree_nodes()
            return
        if schema is None or _U64.unpack(schema)[0] != SCHEMA_VERSION:
            got = None if schema is None else _U64.unpack(schema)[0]
            hint = (": it was made before blocks carried member signatures (schema 1); move it away and start "
                    "a fresh data dir, or sync one from the federation" if got == 1 else "")
            raise StoreError(f"database at {self.path} has schema version {got}, this code needs "
                             f"{SCHEMA_VERSION}{hint}")

    def _add_tree_nodes(self) -> None:
        """Upgrade schema 2 to 3: write the state tree's nodes (one pass over the state, one transaction)."""
        log.info("upgrading %s to schema %d: writing the state tree's nodes", self.path, SCHEMA_VERSION)
        try:
            with self.env.begin(write=True) as txn:
                put = functools.partial(txn.put, db=self._nodes)
                b = NodeBuilder(put)
                with txn.cursor(db=self._state) as cur:
                    for k, v in cur.iternext(keys=True, values=True):
                        b.add(k, leaf_hash(k, v))
                ref = b.finish()
                if ref:
                    put(ROOT_REF, ref)
                txn.put(b"schema", _U64.pack(SCHEMA_VERSION), db=self._meta)
        except lmdb.Error as e:
            raise write_error(e, self.path, self.map_size, "cannot write the state tree's nodes") from e
        log.info("upgraded %s: %d state records in the tree", self.path, b.count)

    # -- reads (any thread) -------------------------------------------------------------------------------
    def tip_height(self) -> Optional[int]:
        with self.env.begin(db=self._meta) as txn:
            v = txn.get(b"tip")
        return None if v is None else int(_U64.unpack(v)[0])

    def get_block(self, height: int) -> Optional[bytes]:
        with self.env.begin(db=self._blocks) as txn:
            v = txn.get(_U64.pack(height))
        return None if v is None else bytes(v)

    def get_state(self, key: bytes) -> Optional[bytes]:
        with self.env.begin(db=self._state) as txn:
            v = txn.get(key)
        return None if v is None else bytes(v)

    def final_height(self) -> int:
        with self.env.begin(db=self._meta) as txn:
            v = txn.get(b"final")
        return 0 if v is None else int(_U64.unpack(v)[0])

    def get_commit(self, height: int) -> Optional[bytes]:
        with self.env.begin(db=self._commits) as txn:
            v = txn.get(_U64.pack(height))
        return None if v is None else bytes(v)

    def get_undo(self, height: int) -> Optional[dict[bytes, Optional[bytes]]]:
        """The undo record of the non-final block at height (None once it is final)."""
        with self.env.begin(db=self._undo) as txn:
            v = txn.get(_U64.pack(height))
        return None if v is None else decode_undo(bytes(v))

    def siblings(self) -> list[tuple[bytes, bytes]]:
        """The complete children of the final block other than the tip: (block, commit) pairs in hash order."""
        with self.env.begin(db=self._siblings) as txn:
            with txn.cursor() as cur:
                return [_split_sibling(bytes(v)) for v in cur.iternext(keys=False, values=True)]

    def tx_location(self, txid: bytes) -> Optional[tuple[int, int]]:
        """(block height, index in block) of a committed transaction."""
        with self.env.begin(db=self._txs) as txn:
            v = txn.get(txid)
        return None if v is None else _LOC.unpack(v)  # type: ignore[return-value]

    @contextmanager
    def reader(self) -> Iterator["Reader"]:
        """A consistent read view (one LMDB read transaction) for bulk work such as snapshots."""
        gen = self._gen  # before the transaction begins: see tree_loader
        txn = self.env.begin(buffers=False)
        try:
            yield Reader(self, txn, gen)
        finally:
            txn.abort()

    # -- writes (one caller at a time) --------------------------------------------------------------------
    def commit_block(self, height: int, block: bytes, txids: list[bytes], writes: Mapping[bytes, Optional[bytes]],
                     *, commit: bytes = b"", final: Optional[int] = None,
                     undo: Optional[Mapping[bytes, Optional[bytes]]] = None,
                     tree: Optional[TreeChanges] = None) -> None:
        """Commit block `height` with its commit, its state writes (None = delete) and the tree's changes for them,
        its undo record (the prior value of every key it writes; kept while it is not final) and the new final
        height (None: unchanged), in one LMDB transaction. Siblings and undo records at or below the new final
        height are dropped with it.

        StoreFull / StoreWriteError when LMDB cannot write it (then nothing of it was stored)."""
        with self._tree_write(tree):
            try:
                with self.env.begin(write=True) as txn:
                    self._append(txn, height, block, txids, writes, commit, undo, tree)
                    if final is not None:
                        self._set_final(txn, final, height)
            except lmdb.Error as e:
                raise write_error(e, self.path, self.map_size, f"cannot commit block {height}") from e
        self._since_reader_check += 1
        if self._since_reader_check >= READER_CHECK_EVERY:
            self._since_reader_check = 0
            self.check_readers()

    def replace_tip(self, old_hash: bytes, old_txids: list[bytes], height: int, block: bytes, txids: list[bytes],
                    writes: Mapping[bytes, Optional[bytes]], *, commit: bytes,
                    undo: Mapping[bytes, Optional[bytes]], new_hash: bytes, tree: TreeChanges) -> None:
        """Replace the non-final tip (height, hash old_hash) by a complete sibling, in one LMDB transaction: the
        tip's state changes are undone, its transactions unindexed, and it moves to the siblings; the sibling (its
        writes and undo record relative to the common parent, and the tree's changes from the old tip's) becomes
        the tip."""
        with self._tree_write(tree):
            try:
                with self.env.begin(write=True) as txn:
                    tip = txn.get(b"tip", db=self._meta)
                    final = txn.get(b"final", db=self._meta)
                    if tip is None or _U64.unpack(tip)[0] != height or (final and _U64.unpack(final)[0] >= height):
                        raise StoreError(f"cannot replace block {height}: it is not the non-final tip")
                    key = _U64.pack(height)
                    raw_undo = txn.get(key, db=self._undo)
                    if raw_undo is None:
                        raise StoreError(f"block {height} has no undo record")
                    self._write_state(txn, decode_undo(bytes(raw_undo)))
                    for txid in old_txids:
                        txn.delete(txid, db=self._txs)
                    old_block = bytes(txn.get(key, db=self._blocks))
                    old_commit = bytes(txn.get(key, db=self._commits))
                    txn.put(old_hash, _join_sibling(old_block, old_commit), db=self._siblings)
                    txn.delete(new_hash, db=self._siblings)
                    txn.put(b"tip", _U64.pack(height - 1), db=self._meta)
                    self._append(txn, height, block, txids, writes, commit, undo, tree)
            except lmdb.Error as e:
                raise write_error(e, self.path, self.map_size, f"cannot replace block {height}") from e

    def put_sibling(self, block_hash: bytes, block: bytes, commit: bytes) -> None:
        """Keep a complete child of the final block that is not the tip (it may become the tip)."""
        try:
            with self.env.begin(write=True, db=self._siblings) as txn:
                txn.put(block_hash, _join_sibling(block, commit))
        except lmdb.Error as e:
            raise write_error(e, self.path, self.map_size, "cannot store a sibling block") from e

    def _append(self, txn: "lmdb.Transaction", height: int, block: bytes, txids: list[bytes],
                writes: Mapping[bytes, Optional[bytes]], commit: bytes,
                undo: Optional[Mapping[bytes, Optional[bytes]]], tree: Optional[TreeChanges]) -> None:
        tip = txn.get(b"tip", db=self._meta)
        expected = 0 if tip is None else _U64.unpack(tip)[0] + 1
        if height != expected:
            raise StoreError(f"commit of block {height} but the next height is {expected}")
        key = _U64.pack(height)
        txn.put(key, block, db=self._blocks)
        txn.put(key, commit, db=self._commits)
        if undo is not None:
            txn.put(key, encode_undo(undo), db=self._undo)
        with txn.cursor(db=self._txs) as cur:
            cur.putmulti([(txid, _LOC.pack(height, i)) for i, txid in enumerate(txids)])
        self._write_state(txn, writes)
        if tree is not None:
            if tree.replace:
                txn.drop(self._nodes, delete=False)
            with txn.cursor(db=self._nodes) as cur:
                cur.putmulti(sorted(tree.puts.items()))
            for p in tree.deletes:
                txn.delete(p, db=self._nodes)
            if tree.root_ref:
                txn.put(ROOT_REF, tree.root_ref, db=self._nodes)
            else:
                txn.delete(ROOT_REF, db=self._nodes)
        txn.put(b"tip", key, db=self._meta)

    @contextmanager
    def _tree_write(self, tree: Optional[TreeChanges]) -> Iterator[None]:
        """Around a commit that changes the tree: the cache takes the new nodes once LMDB has them (and drops them
        all if the commit failed, keeping only what is sure to be committed)."""
        if tree is None:
            yield
            return
        self._gen += 1  # odd: loaders stop trusting the cache
        ok = False
        try:
            yield
            ok = True
        finally:
            cache = self._cache
            if not ok or tree.replace:
                cache.clear()
                self._cache_bytes = 0
            else:
                size = self._cache_bytes
                for p in (*tree.deletes, *tree.puts):  # a written node moves to the newest end
                    old = cache.pop(p, None)
                    if old is not None:
                        size -= len(p) + len(old) + _CACHE_ENTRY
                for p, enc in tree.puts.items():
                    cache[p] = enc
                    size += len(p) + len(enc) + _CACHE_ENTRY
                while size > self.tree_cache_limit and cache:
                    p, enc = cache.popitem(last=False)
                    size -= len(p) + len(enc) + _CACHE_ENTRY
                self._cache_bytes = size
            self._gen += 1

    def tree_loader(self, r: "Reader") -> Load:
        """Tree nodes as of r's transaction, from the cache of committed nodes when it is that version: r's
        generation was taken before its transaction began, a commit makes the generation odd before LMDB has the new
        tree and even again after the cache has it, so a node from the cache is r's version if the generation is
        still r's after reading it."""
        get, db = r._txn.get, self._nodes
        gen = r.gen
        if gen & 1:
            return lambda p: get(p, db=db)  # type: ignore[no-any-return]
        cache = self._cache

        def load(p: bytes) -> Optional[bytes]:
            enc = cache.get(p)
            if enc is not None and self._gen == gen:
                return enc
            return get(p, db=db)  # type: ignore[no-any-return]
        return load

    def _write_state(self, txn: "lmdb.Transaction", writes: Mapping[bytes, Optional[bytes]]) -> None:
        puts = [(k, v) for k, v in writes.items() if v is not None]
        with txn.cursor(db=self._state) as cur:
            cur.putmulti(puts)
        for k, v in writes.items():
            if v is None:
                txn.delete(k, db=self._state)

    def _set_final(self, txn: "lmdb.Transaction", final: int, tip: int) -> None:
        old = txn.get(b"final", db=self._meta)
        old_final = 0 if old is None else int(_U64.unpack(old)[0])
        if not old_final <= final <= tip:
            raise StoreError(f"final height {final} outside {old_final}..{tip}")
        if final == old_final and old is not None:
            return
        for h in range(old_final + 1, final + 1):
            txn.delete(_U64.pack(h), db=self._undo)
        txn.drop(self._siblings, delete=False)  # the children of the old final block are final or lost
        txn.put(b"final", _U64.pack(final), db=self._meta)

    # -- anchors (the anchor service's local records; not consensus state) --------------------------------
    def put_anchor(self, l2_height: int, value: bytes) -> None:
        try:
            with self.env.begin(write=True, db=self._anchors) as txn:
                txn.put(_U64.pack(l2_height), value)
        except lmdb.Error as e:
            raise write_error(e, self.path, self.map_size, f"cannot store the anchor at L2 height {l2_height}") from e

    async def put_anchor_async(self, l2_height: int, value: bytes) -> None:
        """Write one anchor record on the writer thread (shielded: a cancelled caller never half-writes)."""
        loop = asyncio.get_running_loop()
        await asyncio.shield(loop.run_in_executor(self._writer, self.put_anchor, l2_height, value))

    def iter_anchors(self) -> list[tuple[int, bytes]]:
        """Every anchor record, by L2 height."""
        with self.env.begin(db=self._anchors) as txn:
            with txn.cursor() as cur:
                return [(int(_U64.unpack(k)[0]), bytes(v)) for k, v in cur.iternext(keys=True, values=True)]

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.env.close()


class Reader:
    """Reads inside one read transaction."""

    __slots__ = ("_s", "_txn", "gen")

    def __init__(self, store: Store, txn: "lmdb.Transaction", gen: int) -> None:
        self._s = store
        self._txn = txn
        self.gen = gen  # the tree cache's generation when the transaction began

    def tip_height(self) -> Optional[int]:
        v = self._txn.get(b"tip", db=self._s._meta)
        return None if v is None else int(_U64.unpack(v)[0])

    def get_block(self, height: int) -> Optional[bytes]:
        return self._txn.get(_U64.pack(height), db=self._s._blocks)  # type: ignore[no-any-return]

    def get_state(self, key: bytes) -> Optional[bytes]:
        return self._txn.get(key, db=self._s._state)  # type: ignore[no-any-return]

    def get_commit(self, height: int) -> Optional[bytes]:
        return self._txn.get(_U64.pack(height), db=self._s._commits)  # type: ignore[no-any-return]

    def final_height(self) -> int:
        v = self._txn.get(b"final", db=self._s._meta)
        return 0 if v is None else int(_U64.unpack(v)[0])

    def get_node(self, path: bytes) -> Optional[bytes]:
        """A stored tree node (or ROOT_REF) as of this transaction."""
        return self._txn.get(path, db=self._s._nodes)  # type: ignore[no-any-return]

    def state_count(self) -> int:
        return int(self._txn.stat(self._s._state)["entries"])

    def iter_state(self) -> Iterator[tuple[bytes, bytes]]:
        """Every state record in key order."""
        with self._txn.cursor(db=self._s._state) as cur:
            yield from cur.iternext(keys=True, values=True)

    def iter_prefix(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The state records whose key starts with prefix (e.g. one namespace byte), in key order."""
        with self._txn.cursor(db=self._s._state) as cur:
            if not cur.set_range(prefix):
                return
            for k, v in cur.iternext(keys=True, values=True):
                if not bytes(k).startswith(prefix):
                    return
                yield bytes(k), bytes(v)


def encode_undo(undo: Mapping[bytes, Optional[bytes]]) -> bytes:
    """count u32 | per key, in key order: key length u16 | key | present u8 | (value length u32 | value)"""
    out = [struct.pack(">I", len(undo))]
    for k in sorted(undo):
        v = undo[k]
        out.append(struct.pack(">H", len(k)) + k)
        out.append(b"\0" if v is None else b"\1" + struct.pack(">I", len(v)) + v)
    return b"".join(out)


def decode_undo(b: bytes) -> dict[bytes, Optional[bytes]]:
    (count,), i = struct.unpack_from(">I", b), 4
    out: dict[bytes, Optional[bytes]] = {}
    for _ in range(count):
        (klen,) = struct.unpack_from(">H", b, i)
        k = b[i + 2:i + 2 + klen]
        i += 2 + klen
        if b[i] == 0:
            out[k], i = None, i + 1
        else:
            (vlen,) = struct.unpack_from(">I", b, i + 1)
            out[k], i = b[i + 5:i + 5 + vlen], i + 5 + vlen
    if i != len(b):
        raise StoreError("undo record: trailing bytes")
    return out


def _join_sibling(block: bytes, commit: bytes) -> bytes:
    return struct.pack(">I", len(block)) + block + commit


def _split_sibling(b: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack_from(">I", b)
    return b[4:4 + n], b[4 + n:]
