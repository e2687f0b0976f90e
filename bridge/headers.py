"""Header store: bitcoind's best chain of block headers, SPV-validated, in its own LMDB environment.

The bridge asks it where a block is (``height_of``, ``depth``) before it credits a peg-in, and exports runs of
headers for the offline verifier (``export``; the file format is docs/header-file.md, the loader is the pure
bridge.header_file).

Layout (one LMDB environment, by default ``<data_dir>/btc_headers``, never shared with the ledger's store):

    meta    b"schema" u64 | b"chain" name | b"genesis" 32 | b"start_height" u64 | b"start_hash" 32
            | b"tip" u64 (height of the best header) | b"ctx_times", b"ctx_period_start", b"ctx_last_normal"
            (validation context from before a start above 0, see below)
    best    height u64 BE -> block hash (32, internal order): the best chain, start .. tip, nothing else
    hdrs    block hash -> raw header (80) | height u64 BE | cumulative work (32, BE): every header ever stored,
            including those a reorg later disconnected (height_of/depth look them up in ``best`` to tell)

Start point. The chain is stored from a start header that is trusted rather than validated against its
ancestors: by default bitcoind's genesis (height 0, which must be the genesis of the chain parameters, so a
node on another chain is refused), or for long chains a checkpoint ``start_height`` + ``start_hash`` from the
configuration (the hash is then required to be bitcoind's block at that height). With a start height but no hash,
bitcoind's block at that height is taken as given (fine for regtest and tests, not for production). The start is
written once, on the first sync, and a store opened later with a different start or chain is refused. Cumulative
work counts from the start header inclusive: from genesis it equals bitcoind's ``chainwork``. For a start above
0, the first sync also fetches the headers below it back to the start of its retarget period (at least 10,
at most interval - 1: 2015 on mainnet), each authenticated by walking prev-hashes down from the trusted start
hash, and keeps from them only the validation context (the 10 timestamps before the start, the period's first
timestamp, the last non-min-difficulty nBits): so the headers right after a checkpoint are held to the full
median-time-past and exact-retarget rules, as they would be from genesis. Those headers are not part of the
stored chain (the read API covers start..tip).

Validation. Every header is checked with bridge.spv's rules before it is stored: proof of work against its
nBits, the nBits against the chain's difficulty rules (retarget, min-difficulty, no-retargeting), linkage,
median time past of the previous 11 headers and the 2-hour future limit against a ``now`` the caller passes
(no clock is read here). The validation context at a fork point (last 11 timestamps, start of the retarget
period, last non-min-difficulty nBits) is rebuilt from the stored headers, so a reorg branch is held to exactly
the rules a fresh chain would be. Failures raise spv's errors (BadProofOfWork, BadDifficulty, TimeTooOld, ...)
and nothing is stored.

Sync. :meth:`HeaderStore.sync` runs a bridge.chain_tracker.ChainTracker seeded with the last ``reorg_window``
blocks of the store: it reads bitcoind's tip and walks back by prev-hash to the fork point, so the new headers
form one linked chain that was bitcoind's best when the sync began. The disconnects and connects of one sync
are validated and written in one LMDB write transaction (on the store's single writer thread, shielded from
cancellation): a crash or an error at any point leaves the previous tip and chain exactly as they were. The store
follows bitcoind even when bitcoind's best chain has less work than the one stored (``invalidateblock``, or a
block bitcoind found invalid): bitcoind fully validates blocks, SPV cannot; such a reorg is logged as a warning.
A sync holds its new headers in memory until it writes them (a few hundred bytes each): start long chains from a
checkpoint near the tip. :meth:`HeaderStore.follow` repeats the sync on each ZMQ wake-up (or poll) and yields
what changed; the clock for "now" is a callable the composition root passes.

Errors (besides spv's for invalid headers):

    HeaderStoreError
      StoreMismatch       the database was made for another chain, start point or schema version
      StartNotInChain     the configured start is not bitcoind's block at that height
      UnknownHeight       a height outside start..tip (header_at, headers, export, apply)
      ReorgTooDeep        the fork point lies below the reorg window or the start
      ConcurrentSync      the tip moved between reading bitcoind and writing (the sync is simply re-run)
      HeaderSourceError   bitcoind returned a header that does not hash to the block asked for
      StoreCorrupt        a record the store's invariants require is missing (damaged database)
      HeaderStoreFull     the LMDB map (the node's store.map_size) is full: nothing of that write was stored
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncGenerator, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import lmdb

from bridge import chain_tracker as ct
from bridge.chain_tracker import BlockRef, ChainTracker, Connected, Disconnected
from bridge.rpc_errors import RPCInvalidParameter, RPCTransient
from l2d.aio import wait_event
from l2d.core.header_file import write_header_file
from l2d.core.spv import (HEADER_SIZE, MEDIAN_TIME_SPAN, ChainParams, HeaderChain, bits_to_target, block_work,
                          parse_header)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HEADER_STORE_DIR = "btc_headers"  # the store's directory under the node's data dir
DEFAULT_REORG_WINDOW = 2016  # deepest reorg a sync resolves: one retarget period
DEFAULT_MAP_SIZE = 4 << 30  # sparse; a full mainnet chain needs about 200 MB
_U64 = struct.Struct(">Q")
_WORK_SIZE = 32
_ENTRY_SIZE = HEADER_SIZE + 8 + _WORK_SIZE


def _dsha256(b: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


# -- errors --------------------------------------------------------------------------------------------------------
class HeaderStoreError(Exception):
    """The header store cannot do what was asked; validation failures are bridge.spv's errors instead."""


class HeaderStoreFull(HeaderStoreError):
    """The LMDB map is full (the node sizes it with store.map_size); the write was not stored."""


class StoreMismatch(HeaderStoreError):
    pass


class StartNotInChain(HeaderStoreError):
    pass


class UnknownHeight(HeaderStoreError):
    pass


class ReorgTooDeep(HeaderStoreError):
    pass


class ConcurrentSync(HeaderStoreError):
    pass


class HeaderSourceError(HeaderStoreError):
    pass


class StoreCorrupt(HeaderStoreError):
    """A record the store's own invariants say must exist is missing."""


# -- values --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeaderTip:
    """The best stored header: height, hash (internal order), cumulative work from the start header."""

    height: int
    block_hash: bytes
    work: int

    @property
    def block_hash_hex(self) -> str:
        return self.block_hash[::-1].hex()


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What one sync or apply changed: disconnects tip first, then connects oldest first, and the new tip."""

    disconnected: tuple[Disconnected, ...]
    connected: tuple[Connected, ...]
    tip: HeaderTip


@dataclass(frozen=True, slots=True)
class ExportResult:
    path: Path
    start_height: int
    count: int
    tip_hash: bytes
    checksum: bytes


class _TipInfo(Protocol):
    @property
    def blocks(self) -> int: ...

    @property
    def best_block_hash(self) -> bytes: ...


class HeaderSource(Protocol):
    """The RPCs a sync needs (bridge.rpc.BitcoinRPC satisfies it; unit tests use a fake)."""

    async def getblockchaininfo(self) -> _TipInfo: ...

    async def getblockheader(self, block_hash: bytes) -> bytes: ...

    async def getblockhash(self, height: int) -> bytes: ...


PROGRESS_EVERY_S = 5.0  # a long header sync logs how far it is this often


def _now() -> float:
    return time.monotonic()


class _Recording:
    """Passes the tracker's RPCs through and keeps the headers it fetched (every connected block's is among them);
    logs its progress every PROGRESS_EVERY_S while it fetches (a first sync from an old start height is long)."""

    def __init__(self, source: HeaderSource, from_height: int) -> None:
        self._source = source
        self.headers: dict[bytes, bytes] = {}
        self._from, self._to = from_height, from_height
        self._logged = _now()

    async def getblockchaininfo(self) -> _TipInfo:
        info = await self._source.getblockchaininfo()
        self._to = info.blocks
        return info

    async def getblockheader(self, block_hash: bytes) -> bytes:
        raw = await self._source.getblockheader(block_hash)
        self.headers[block_hash] = raw
        now = _now()
        if now - self._logged >= PROGRESS_EVERY_S:
            self._logged = now
            want = max(1, self._to - self._from)
            log.info("header sync: %d of %d headers fetched (%d%%), bitcoind's tip at height %d",
                     len(self.headers), want, min(100, 100 * len(self.headers) // want), self._to)
        return raw


def _must(v: object, what: str) -> bytes:
    if v is None:
        raise StoreCorrupt(f"header store: {what} is missing")
    return bytes(v)  # type: ignore[call-overload]


def _entry(raw: bytes, height: int, work: int) -> bytes:
    return raw + _U64.pack(height) + work.to_bytes(_WORK_SIZE, "big")


# -- the store -----------------------------------------------------------------------------------------------------
class HeaderStore:
    """Bitcoin headers of the best chain, validated and persisted; see the module docstring.

    Reads may come from any thread (each in its own LMDB read transaction: a reader never sees half a reorg);
    writes run on one writer thread.
    """

    def __init__(self, path: Path, params: ChainParams, *, start_height: int = 0, start_hash: Optional[bytes] = None,
                 checkpoints: Optional[Mapping[int, bytes]] = None, reorg_window: int = DEFAULT_REORG_WINDOW,
                 map_size: int = DEFAULT_MAP_SIZE) -> None:
        if start_height < 0:
            raise ValueError(f"start height {start_height} is negative")
        if start_hash is not None and len(start_hash) != 32:
            raise ValueError("start hash must be 32 bytes (internal order)")
        if reorg_window < 1:
            raise ValueError("reorg window must be at least 1")
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
        self.params = params
        self.reorg_window = reorg_window
        self.checkpoints = dict(checkpoints or {})
        self._want_start = (start_height, start_hash)
        # mode: the directory 0700, its files 0600 (LMDB clears the execute bits), like the ledger's store.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=4, subdir=True, sync=True, metasync=True,
                             max_readers=256, mode=0o700)
        self._meta = self.env.open_db(b"meta")
        self._best = self.env.open_db(b"best")
        self._hdrs = self.env.open_db(b"hdrs")
        try:
            self._check_or_init_meta()
        except BaseException:
            self.env.close()
            raise
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headers-writer")
        self._sync_lock = asyncio.Lock()

    def _check_or_init_meta(self) -> None:
        name = self.params.name.encode()
        with self.env.begin(write=True, db=self._meta) as txn:
            schema = txn.get(b"schema")
            chain = txn.get(b"chain")
            if schema is None and chain is None:
                txn.put(b"schema", _U64.pack(SCHEMA_VERSION))
                txn.put(b"chain", name)
                txn.put(b"genesis", self.params.genesis_hash)
                return
            genesis = txn.get(b"genesis")
            stored_height = txn.get(b"start_height")
            stored_hash = txn.get(b"start_hash")
        if chain != name or genesis != self.params.genesis_hash:
            raise StoreMismatch(f"header store at {self.path} was made for chain {chain!r} with genesis "
                                f"{None if genesis is None else bytes(genesis)[::-1].hex()}, not {name!r} "
                                f"({self.params.genesis_hash[::-1].hex()})")
        if schema is None or _U64.unpack(schema)[0] != SCHEMA_VERSION:
            got = None if schema is None else _U64.unpack(schema)[0]
            raise StoreMismatch(f"header store at {self.path} has schema version {got}, this code needs "
                                f"{SCHEMA_VERSION}")
        if stored_height is not None:
            want_height, want_hash = self._want_start
            have_height = _U64.unpack(stored_height)[0]
            have_hash = _must(stored_hash, "start hash")
            if have_height != want_height or (want_hash is not None and want_hash != have_hash):
                raise StoreMismatch(f"header store at {self.path} starts at height {have_height} "
                                    f"({have_hash[::-1].hex()}), configured start is {want_height}"
                                    + ("" if want_hash is None else f" ({want_hash[::-1].hex()})"))

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.env.close()

    # -- reads ---------------------------------------------------------------------------------------------------
    @property
    def start(self) -> Optional[BlockRef]:
        """The trusted start header's height and hash, once the first sync has written it."""
        with self.env.begin(db=self._meta) as txn:
            h = txn.get(b"start_height")
            b = txn.get(b"start_hash")
        return None if h is None else BlockRef(_U64.unpack(h)[0], _must(b, "start hash"))

    def tip(self) -> Optional[HeaderTip]:
        """The best stored header, or None before the first sync."""
        with self.env.begin() as txn:
            return self._tip_in(txn)

    def hash_at(self, height: int) -> Optional[bytes]:
        """Hash (internal order) of the best-chain block at height; None outside start..tip."""
        if not 0 <= height < 1 << 64:
            return None
        with self.env.begin(db=self._best) as txn:
            v = txn.get(_U64.pack(height))
        return None if v is None else bytes(v)

    def header_at(self, height: int) -> bytes:
        """The raw 80-byte header of the best-chain block at height; UnknownHeight outside start..tip."""
        with self.env.begin() as txn:
            return self._raw_at(txn, height)

    def height_of(self, block_hash: bytes) -> Optional[int]:
        """Height of a block on the best chain; None if it is not (never seen, or disconnected by a reorg)."""
        with self.env.begin() as txn:
            return self._height_of_in(txn, block_hash)

    def depth(self, block_hash: bytes) -> int:
        """Confirmations of a block as bitcoind counts them: 1 at the tip, tip - height + 1 below it; 0 for a
        block not on the stored best chain (unknown, reorged out, or below the start)."""
        with self.env.begin() as txn:
            h = self._height_of_in(txn, block_hash)
            tip = self._tip_in(txn)
        return 0 if h is None or tip is None else tip.height - h + 1

    def headers(self, from_height: int, to_height: int) -> list[bytes]:
        """Raw headers of the best chain from from_height to to_height, both inclusive, oldest first."""
        with self.env.begin() as txn:
            self._check_range(txn, from_height, to_height)
            return list(self._iter_raw(txn, from_height, to_height))

    def header_by_hash(self, block_hash: bytes) -> Optional[tuple[bytes, int]]:
        """(raw header, height) of any stored header, including ones a reorg disconnected; None if never stored."""
        with self.env.begin(db=self._hdrs) as txn:
            v = txn.get(block_hash)
        return None if v is None else (bytes(v[:HEADER_SIZE]), _U64.unpack_from(v, HEADER_SIZE)[0])

    def _tip_in(self, txn: lmdb.Transaction) -> Optional[HeaderTip]:
        v = txn.get(b"tip", db=self._meta)
        if v is None:
            return None
        height = _U64.unpack(v)[0]
        block_hash = _must(txn.get(_U64.pack(height), db=self._best), f"best-chain entry at tip height {height}")
        entry = _must(txn.get(block_hash, db=self._hdrs), f"tip header {block_hash[::-1].hex()}")
        return HeaderTip(height, block_hash, int.from_bytes(entry[HEADER_SIZE + 8:], "big"))

    def _height_of_in(self, txn: lmdb.Transaction, block_hash: bytes) -> Optional[int]:
        entry = txn.get(bytes(block_hash), db=self._hdrs)
        if entry is None:
            return None
        height: int = _U64.unpack_from(entry, HEADER_SIZE)[0]
        on_best = txn.get(_U64.pack(height), db=self._best)
        return height if on_best is not None and bytes(on_best) == block_hash else None

    def _raw_at(self, txn: lmdb.Transaction, height: int) -> bytes:
        block_hash = txn.get(_U64.pack(height), db=self._best) if 0 <= height < 1 << 64 else None
        if block_hash is None:
            tip = self._tip_in(txn)
            span = "the store is empty" if tip is None else f"the store holds {self._start_height(txn)}..{tip.height}"
            raise UnknownHeight(f"no header at height {height}: {span}")
        return _must(txn.get(block_hash, db=self._hdrs), f"header at height {height}")[:HEADER_SIZE]

    def _start_height(self, txn: lmdb.Transaction) -> int:
        v = txn.get(b"start_height", db=self._meta)
        return -1 if v is None else int(_U64.unpack(v)[0])

    def _check_range(self, txn: lmdb.Transaction, a: int, b: int) -> None:
        tip = self._tip_in(txn)
        start = self._start_height(txn)
        if tip is None:
            raise UnknownHeight(f"no headers {a}..{b}: the store is empty")
        if not start <= a <= b <= tip.height:
            raise UnknownHeight(f"heights {a}..{b} are not within the stored {start}..{tip.height}")

    def _iter_raw(self, txn: lmdb.Transaction, a: int, b: int) -> Iterator[bytes]:
        hdrs = self._hdrs
        with txn.cursor(db=self._best) as cur:
            if not cur.set_key(_U64.pack(a)):
                raise UnknownHeight(f"no header at height {a}")
            for k, v in cur.iternext(keys=True, values=True):
                if _U64.unpack(k)[0] > b:
                    return
                yield _must(txn.get(v, db=hdrs), f"header {bytes(v)[::-1].hex()}")[:HEADER_SIZE]

    def _recent(self, n: int) -> list[BlockRef]:
        """The last n best-chain blocks, oldest first."""
        out: list[BlockRef] = []
        with self.env.begin(db=self._best) as txn, txn.cursor() as cur:
            if not cur.last():
                return out
            for k, v in cur.iterprev(keys=True, values=True):
                out.append(BlockRef(_U64.unpack(k)[0], bytes(v)))
                if len(out) == n:
                    break
        out.reverse()
        return out

    # -- export --------------------------------------------------------------------------------------------------
    def export(self, path: Path, from_height: Optional[int] = None, to_height: Optional[int] = None) -> ExportResult:
        """Write the best chain from from_height to to_height (inclusive; default start..tip) as a header file.

        Read from one LMDB read transaction (a concurrent sync cannot splice two chains into the file), written to
        a temporary file beside path, fsynced and renamed: path is either absent or complete.
        """
        if self.params.name not in ("mainnet", "testnet", "signet", "regtest"):
            raise HeaderStoreError(f"chain {self.params.name!r} has no header file name")
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with self.env.begin() as txn:
            tip = self._tip_in(txn)
            if tip is None:
                raise UnknownHeight("nothing to export: the store is empty")
            a = self._start_height(txn) if from_height is None else from_height
            b = tip.height if to_height is None else to_height
            self._check_range(txn, a, b)
            last = _must(txn.get(_U64.pack(b), db=self._best), f"best-chain entry at {b}")
            try:
                with open(tmp, "wb") as f:
                    checksum = write_header_file(f, self.params.name, a, b - a + 1, self._iter_raw(txn, a, b))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        log.info("exported headers %d..%d (%d) to %s", a, b, b - a + 1, path)
        return ExportResult(path, a, b - a + 1, last, checksum)

    # -- writes --------------------------------------------------------------------------------------------------
    def apply(self, fork_height: int, raw_headers: Sequence[bytes], *, now: Optional[int],
              expected_tip: Optional[bytes] = None) -> SyncResult:
        """Replace the best chain above fork_height by raw_headers (which must extend the block at fork_height),
        validating them first; all in one LMDB transaction, nothing changed on any error.

        now: current time for the 2-hour future rule (None skips it). expected_tip: refuse (ConcurrentSync) if the
        stored tip is no longer this hash. Runs on the calling thread; sync() runs it on the writer thread.
        """
        return self._write(None, fork_height, raw_headers, now, expected_tip)

    def _write(self, init: Optional[tuple[bytes, list[bytes]]], fork_height: int, raws: Sequence[bytes],
               now: Optional[int], expected_tip: Optional[bytes]) -> SyncResult:
        try:
            return self._write_txn(init, fork_height, raws, now, expected_tip)
        except lmdb.MapFullError as e:
            raise HeaderStoreFull(f"the header store's LMDB map at {self.path} is full ({self.env.info()['map_size']} "
                                  "bytes, the node's store.map_size): raise store.map_size in the config and "
                                  "restart; the stored chain is unchanged") from e

    def _write_txn(self, init: Optional[tuple[bytes, list[bytes]]], fork_height: int, raws: Sequence[bytes],
                   now: Optional[int], expected_tip: Optional[bytes]) -> SyncResult:
        with self.env.begin(write=True) as txn:
            if init is not None:
                self._init_start(txn, init, now)
            tip = self._tip_in(txn)
            if tip is None:
                raise UnknownHeight("the store is empty: sync once to write the start header")
            if expected_tip is not None and tip.block_hash != expected_tip:
                raise ConcurrentSync(f"the stored tip moved to {tip.block_hash_hex} at {tip.height} during the sync")
            start = self._start_height(txn)
            if fork_height < start:
                raise ReorgTooDeep(f"fork point {fork_height} is below the store's start {start}")
            if fork_height > tip.height:
                raise UnknownHeight(f"fork point {fork_height} is above the stored tip {tip.height}")
            if not raws and fork_height == tip.height:
                return SyncResult((), (), tip)
            chain = self._context(txn, fork_height, start, now)
            fork_hash = chain.tip
            fork_work = int.from_bytes(_must(txn.get(fork_hash, db=self._hdrs), "fork header")[HEADER_SIZE + 8:], "big")
            blob = b"".join(raws)
            chain.extend_raw(blob)  # every spv rule; raises the rule's error, nothing written yet
            disconnected = tuple(Disconnected(h, _must(txn.get(_U64.pack(h), db=self._best), f"best at {h}"))
                                 for h in range(tip.height, fork_height, -1))
            for d in disconnected:
                txn.delete(_U64.pack(d.height), db=self._best)
            connected: list[Connected] = []
            work = fork_work
            works: dict[int, int] = {}
            height = fork_height
            for raw in raws:
                raw = bytes(raw)
                height += 1
                block_hash = _dsha256(raw)
                bits = int.from_bytes(raw[72:76], "little")
                w = works.get(bits)
                if w is None:
                    w = works[bits] = block_work(bits_to_target(bits))
                work += w
                txn.put(block_hash, _entry(raw, height, work), db=self._hdrs)
                txn.put(_U64.pack(height), block_hash, db=self._best)
                connected.append(Connected(height, block_hash))
            txn.put(b"tip", _U64.pack(height), db=self._meta)
            new_tip = HeaderTip(height, connected[-1].block_hash if connected else fork_hash, work)
        if disconnected:
            log.warning("header reorg: %d disconnected down to height %d, %d connected; tip %s at %d (work %s than "
                        "before)", len(disconnected), fork_height, len(connected), new_tip.block_hash_hex,
                        new_tip.height, "more" if new_tip.work > tip.work else "NOT more")
        elif connected:
            log.debug("%d header(s) connected; tip %s at %d", len(connected), new_tip.block_hash_hex, new_tip.height)
        return SyncResult(disconnected, tuple(connected), new_tip)

    def _init_start(self, txn: lmdb.Transaction, init: tuple[bytes, list[bytes]], now: Optional[int]) -> None:
        raw, below = init
        if txn.get(b"start_height", db=self._meta) is not None:
            raise ConcurrentSync("the start header was written by another sync")
        height, want_hash = self._want_start
        header = parse_header(raw)
        cps = dict(self.checkpoints)
        if want_hash is not None:
            cps[height] = want_hash
        chain = HeaderChain(self.params, header, height, now=now, checkpoints=cps)  # PoW, genesis, checkpoint
        self._put_start_context(txn, height, below)
        txn.put(b"start_height", _U64.pack(height), db=self._meta)
        txn.put(b"start_hash", header.hash, db=self._meta)
        txn.put(header.hash, _entry(bytes(raw), height, chain.work), db=self._hdrs)
        txn.put(_U64.pack(height), header.hash, db=self._best)
        txn.put(b"tip", _U64.pack(height), db=self._meta)
        log.info("header store starts at height %d, block %s", height, header.hash_hex)

    def _put_start_context(self, txn: lmdb.Transaction, start: int, below: list[bytes]) -> None:
        """Keep what validation needs from the headers below a start above 0 (below: ascending, ending at start-1,
        already authenticated by prev-hash linkage to the start)."""
        if not below:
            return
        params = self.params
        first = start - len(below)
        times = [int.from_bytes(b[68:72], "little") for b in below]
        txn.put(b"ctx_times", b"".join(t.to_bytes(4, "big") for t in times[-(MEDIAN_TIME_SPAN - 1):]), db=self._meta)
        period = start - start % params.interval
        if first <= period < start:
            txn.put(b"ctx_period_start", times[period - first].to_bytes(4, "big"), db=self._meta)
        if params.allow_min_difficulty:
            for h in range(start - 1, max(first, period) - 1, -1):
                bits = int.from_bytes(below[h - first][72:76], "little")
                if h % params.interval == 0 or bits != params.pow_limit_bits:
                    txn.put(b"ctx_last_normal", bits.to_bytes(4, "big"), db=self._meta)
                    break

    def _context(self, txn: lmdb.Transaction, fork: int, start: int, now: Optional[int]) -> HeaderChain:
        """A HeaderChain whose tip is the stored block at fork, with the validation context rebuilt from the store."""
        params = self.params

        def hdr(h: int) -> bytes:
            return self._raw_at(txn, h)

        def meta_u32(key: bytes) -> Optional[int]:
            v = txn.get(key, db=self._meta)
            return None if v is None else int.from_bytes(v, "big")

        fork_header = parse_header(hdr(fork))
        lo = fork - MEDIAN_TIME_SPAN + 1
        prior = [int.from_bytes(hdr(h)[68:72], "little") for h in range(max(start, lo), fork)]
        if lo < start:  # the 10 timestamps reach below the start: the context kept when the start was written
            ctx = txn.get(b"ctx_times", db=self._meta)
            before = [] if ctx is None else [int.from_bytes(ctx[i:i + 4], "big") for i in range(0, len(ctx), 4)]
            prior = before[len(before) - min(len(before), start - lo):] + prior
        period = fork - fork % params.interval
        period_start = int.from_bytes(hdr(period)[68:72], "little") if period >= start else meta_u32(
            b"ctx_period_start")
        last_normal: Optional[int] = None
        if params.allow_min_difficulty:
            limit = params.pow_limit_bits
            for h in range(fork, start - 1, -1):  # Core's walk back over min-difficulty exceptions
                bits = int.from_bytes(hdr(h)[72:76], "little")
                if h % params.interval == 0 or bits != limit:
                    last_normal = bits
                    break
            else:
                last_normal = meta_u32(b"ctx_last_normal")
        return HeaderChain(params, fork_header, fork, now=now, checkpoints=self.checkpoints, prior_times=prior,
                           period_start_time=period_start, last_normal_bits=last_normal)

    # -- sync ----------------------------------------------------------------------------------------------------
    async def sync(self, source: HeaderSource, *, now: Optional[int]) -> SyncResult:
        """Bring the store to bitcoind's best chain: disconnects and connects validated and written atomically.

        now: current time (seconds) for the 2-hour future rule. Raises spv errors for an invalid header,
        ReorgTooDeep, StartNotInChain, HeaderSourceError, or the RPC client's errors (transient ones are worth a
        retry on the next trigger); in every case the store is unchanged.
        """
        async with self._sync_lock:
            known = self._recent(self.reorg_window)
            init: Optional[tuple[bytes, list[bytes]]] = None
            if not known:
                start_ref, init = await self._fetch_start(source)
                known = [start_ref]
            recording = _Recording(source, known[-1].height)
            tracker = ChainTracker(recording, window=len(known), known=known)
            try:
                events = await tracker.sync()
            except ct.ReorgTooDeep as e:
                raise ReorgTooDeep(f"{e} (reorg window {self.reorg_window}, start {known[0].height})") from None
            except ct.BadHeader as e:
                raise HeaderSourceError(str(e)) from None
            if not events and init is None:
                tip = self.tip()
                if tip is None:  # unreachable: known was non-empty
                    raise UnknownHeight("the store is empty")
                return SyncResult((), (), tip)
            connects = [e for e in events if isinstance(e, Connected)]
            disconnects = [e for e in events if isinstance(e, Disconnected)]
            if connects:
                fork = connects[0].height - 1
            elif disconnects:
                fork = min(d.height for d in disconnects) - 1
            else:
                fork = known[-1].height
            raws = [recording.headers[c.block_hash] for c in connects]
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._writer, self._write, init, fork, raws, now,
                                       None if init is not None else known[-1].block_hash)
            return await asyncio.shield(fut)

    async def follow(self, source: HeaderSource, wakeup: asyncio.Event, clock: Callable[[], float], *,
                     poll_interval: float = 30.0) -> AsyncGenerator[SyncResult, None]:
        """Sync whenever wakeup is set (a ZMQ hashblock, say) or every poll_interval seconds; yields each sync
        that changed something. clock() gives "now" for the future-time rule (the composition root passes
        time.time). Transient RPC failures are logged and retried on the next trigger; anything else (an invalid
        header, ReorgTooDeep, ...) ends the iteration: the store is unchanged and an operator should look.
        """
        while True:
            wakeup.clear()  # before syncing: a wake-up during the sync triggers another one
            try:
                result = await self.sync(source, now=int(clock()))
            except (RPCTransient, ConcurrentSync) as e:
                log.warning("header sync: %s; retrying on the next trigger", e)
            else:
                if result.connected or result.disconnected:
                    yield result
            await wait_event(wakeup, poll_interval)

    async def _fetch_start(self, source: HeaderSource) -> tuple[BlockRef, tuple[bytes, list[bytes]]]:
        height, want = self._want_start
        try:
            at = await source.getblockhash(height)
        except RPCInvalidParameter:
            raise StartNotInChain(f"bitcoind has no block at the start height {height}") from None
        if want is not None and at != want:
            raise StartNotInChain(f"configured start {want[::-1].hex()} is not bitcoind's block at height {height} "
                                  f"({at[::-1].hex()})")
        raw = await source.getblockheader(at)
        if len(raw) != HEADER_SIZE or _dsha256(raw) != at:
            raise HeaderSourceError(f"header returned for {at[::-1].hex()} does not hash to it")
        # the context below the start: back to its period's first header, and at least the 10 before it
        lo = max(0, min(height - (MEDIAN_TIME_SPAN - 1), height - height % self.params.interval))
        below: list[bytes] = []
        cur = raw
        for h in range(height - 1, lo - 1, -1):
            want_hash = cur[4:36]
            cur = await source.getblockheader(want_hash)
            if len(cur) != HEADER_SIZE or _dsha256(cur) != want_hash:
                raise HeaderSourceError(f"header returned for {want_hash[::-1].hex()} (height {h}) does not hash "
                                        f"to it")
            below.append(cur)
        below.reverse()
        return BlockRef(height, at), (raw, below)
