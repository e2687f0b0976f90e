"""LMDB store: blocks, state and transaction index; a block and its state changes commit atomically.

All writes run on one dedicated writer thread (`commit_block_async`); reads may come from any thread,
each in its own LMDB read transaction (MVCC: readers see the last committed block, never half of one).
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Optional

import lmdb

from .core.params import Network

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_U64 = struct.Struct(">Q")
_LOC = struct.Struct(">QI")


DEFAULT_MAP_SIZE = 64 << 30  # store.map_size's default


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
    def __init__(self, path: Path, network: Network, map_size: int = DEFAULT_MAP_SIZE) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.network = network
        self.map_size = map_size
        # mode: the environment's files are created 0600 (LMDB clears the execute bits), the directory 0700.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True, sync=True, metasync=True,
                             max_readers=256, mode=0o700)
        self._meta = self.env.open_db(b"meta")
        self._state = self.env.open_db(b"state")
        self._blocks = self.env.open_db(b"blocks")
        self._txs = self.env.open_db(b"txs")
        self._anchors = self.env.open_db(b"anchors")  # anchor service records: l2 height u64 -> JSON
        try:
            self._check_or_init_meta()
        except BaseException:
            self.env.close()
            raise
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmdb-writer")

    def _check_or_init_meta(self) -> None:
        with self.env.begin(write=True, db=self._meta) as txn:
            schema = txn.get(b"schema")
            net = txn.get(b"network")
            if schema is None and net is None:
                txn.put(b"schema", _U64.pack(SCHEMA_VERSION))
                txn.put(b"network", self.network.name.encode())
                return
        if net != self.network.name.encode():
            raise StoreError(f"database at {self.path} was made for network {net!r}, "
                             f"not {self.network.name!r}: refusing to open it")
        if schema is None or _U64.unpack(schema)[0] != SCHEMA_VERSION:
            got = None if schema is None else _U64.unpack(schema)[0]
            raise StoreError(f"database at {self.path} has schema version {got}, this code needs {SCHEMA_VERSION}")

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

    def tx_location(self, txid: bytes) -> Optional[tuple[int, int]]:
        """(block height, index in block) of a committed transaction."""
        with self.env.begin(db=self._txs) as txn:
            v = txn.get(txid)
        return None if v is None else _LOC.unpack(v)  # type: ignore[return-value]

    @contextmanager
    def reader(self) -> Iterator["Reader"]:
        """A consistent read view (one LMDB read transaction) for bulk work such as snapshots."""
        txn = self.env.begin(buffers=False)
        try:
            yield Reader(self, txn)
        finally:
            txn.abort()

    # -- writes (writer thread only) ----------------------------------------------------------------------
    def commit_block(self, height: int, block: bytes, txids: list[bytes],
                     writes: Mapping[bytes, Optional[bytes]]) -> None:
        """Commit block `height` with its state writes (None = delete) in one LMDB transaction.

        StoreFull / StoreWriteError when LMDB cannot write it (then nothing of it was stored)."""
        try:
            self._commit_block(height, block, txids, writes)
        except lmdb.Error as e:
            raise write_error(e, self.path, self.map_size, f"cannot commit block {height}") from e

    def _commit_block(self, height: int, block: bytes, txids: list[bytes],
                      writes: Mapping[bytes, Optional[bytes]]) -> None:
        with self.env.begin(write=True) as txn:
            tip = txn.get(b"tip", db=self._meta)
            expected = 0 if tip is None else _U64.unpack(tip)[0] + 1
            if height != expected:
                raise StoreError(f"commit of block {height} but the next height is {expected}")
            txn.put(_U64.pack(height), block, db=self._blocks)
            with txn.cursor(db=self._txs) as cur:
                cur.putmulti([(txid, _LOC.pack(height, i)) for i, txid in enumerate(txids)])
            puts = [(k, v) for k, v in writes.items() if v is not None]
            with txn.cursor(db=self._state) as cur:
                cur.putmulti(puts)
            for k, v in writes.items():
                if v is None:
                    txn.delete(k, db=self._state)
            txn.put(b"tip", _U64.pack(height), db=self._meta)

    async def commit_block_async(self, height: int, block: bytes, txids: list[bytes],
                                 writes: Mapping[bytes, Optional[bytes]]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self.commit_block, height, block, txids, writes)

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

    __slots__ = ("_s", "_txn")

    def __init__(self, store: Store, txn: "lmdb.Transaction") -> None:
        self._s = store
        self._txn = txn

    def tip_height(self) -> Optional[int]:
        v = self._txn.get(b"tip", db=self._s._meta)
        return None if v is None else int(_U64.unpack(v)[0])

    def get_block(self, height: int) -> Optional[bytes]:
        return self._txn.get(_U64.pack(height), db=self._s._blocks)  # type: ignore[no-any-return]

    def get_state(self, key: bytes) -> Optional[bytes]:
        return self._txn.get(key, db=self._s._state)  # type: ignore[no-any-return]

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
