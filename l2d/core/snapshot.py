"""Snapshot format: canonical, streamable file of the whole state at one block (see docs/snapshot-format.md).

    header  : magic b"L2DSNAP\\0" | format u8 | network u8 | height u64 | block_hash 32 | state_root 32 | count u64
    records : count x (key 33 | value CompactSize-length-prefixed), strictly increasing keys
    trailer : SHA-256 of every preceding byte (32)

Integers are big-endian; the value length is a minimal Bitcoin CompactSize of at most tree.MAX_VALUE.
Everything is read in bounded chunks: a snapshot of any size verifies in constant memory.

Errors (each names the record index and file offset when it is about one place):
    SnapshotMalformed (a DecodeError; l2-verify exit 2): BadMagic, SnapshotVersionError, SnapshotWrongNetwork,
        SnapshotTruncated, SnapshotTrailingBytes, BadRecordLength (NonMinimalLength) -- the bytes are not a snapshot we can read;
    SnapshotInvalid (l2-verify exit 1): ChecksumMismatch, RootMismatch, KeyOrderError (DuplicateKey) -- a
        well-formed snapshot that does not verify.
A record-level problem found mid-stream (bad length encoding, key order) is first checked against the file's own
checksum: if the checksum does not hold either, the file was damaged after it was written and ChecksumMismatch is
raised (its message names the first inconsistency); otherwise the original error stands. Running out of bytes is
always SnapshotTruncated.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import BinaryIO, ClassVar, Iterable, Iterator, NoReturn, Optional, Union

from .codec import write_varint
from .errors import (DecodeError, L2Error, NonMinimalVarint, OutOfRange, TrailingBytes, Truncated, UnknownVersion,
                     WrongNetwork)
from .params import NETWORKS, Network
from .tree import KEY_SIZE, MAX_VALUE, RootBuilder

MAGIC = b"L2DSNAP\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">8sBBQ32s32sQ")
HEADER_SIZE = _HEADER.size  # 90
TRAILER_SIZE = 32
_U64_MAX = (1 << 64) - 1
MAX_RECORD_SIZE = KEY_SIZE + 9 + MAX_VALUE  # longest bytes one record can span before it is rejected
CHUNK = 1 << 20  # read/write granularity; peak buffer is CHUNK + MAX_RECORD_SIZE
_LEN1 = [bytes((i,)) for i in range(0xFD)]  # one-byte CompactSize prefixes
_NAME = re.compile(r"snapshot-([a-z0-9_]+)-(\d{12,20})\.l2snap")
_ID_TO_NAME = {n.id: n.name for n in NETWORKS.values()}


# -- errors ------------------------------------------------------------------------------------------------------
class SnapshotError(L2Error):
    """Base of the snapshot errors; record (index) and offset (byte offset in the file) say where, when known."""

    kind: ClassVar[str] = "snapshot-error"

    def __init__(self, message: str, *, record: Optional[int] = None, offset: Optional[int] = None) -> None:
        super().__init__(message)
        self.record = record
        self.offset = offset


class SnapshotWriteError(SnapshotError):
    """write_snapshot was given records that cannot form a snapshot (wrong count, keys not increasing)."""

    kind = "write-error"


class SnapshotExists(SnapshotError):
    """A different snapshot already holds this name; snapshot files are never rewritten."""

    kind = "exists"


class SnapshotMalformed(SnapshotError, DecodeError):
    """Bytes that are not a readable snapshot (l2-verify exit 2)."""

    kind = "malformed"


class BadMagic(SnapshotMalformed):
    kind = "bad-magic"


class SnapshotVersionError(SnapshotMalformed, UnknownVersion):
    kind = "unknown-version"


class SnapshotWrongNetwork(SnapshotMalformed, WrongNetwork):
    kind = "wrong-network"


class SnapshotTruncated(SnapshotMalformed, Truncated):
    kind = "truncated"


class SnapshotTrailingBytes(SnapshotMalformed, TrailingBytes):
    kind = "trailing-bytes"


class BadRecordLength(SnapshotMalformed, OutOfRange):
    """A value length above tree.MAX_VALUE (or, as NonMinimalLength, not minimally encoded)."""

    kind = "bad-record-length"


class NonMinimalLength(BadRecordLength, NonMinimalVarint):
    kind = "non-minimal-length"


class SnapshotInvalid(SnapshotError):
    """A readable snapshot that does not verify (l2-verify exit 1)."""

    kind = "invalid"


class ChecksumMismatch(SnapshotInvalid):
    kind = "checksum-mismatch"


class RootMismatch(SnapshotInvalid):
    kind = "root-mismatch"


class KeyOrderError(SnapshotInvalid):
    kind = "key-out-of-order"


class DuplicateKey(KeyOrderError):
    kind = "duplicate-key"


# -- header ------------------------------------------------------------------------------------------------------
def network_label(network_id: int) -> str:
    """'regtest (id 2)' for a known id, 'unknown (id 9)' otherwise."""
    return f"{_ID_TO_NAME.get(network_id, 'unknown')} (id {network_id})"


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    network_id: int
    height: int
    block_hash: bytes
    state_root: bytes
    record_count: int
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.version != FORMAT_VERSION:
            raise SnapshotVersionError(f"snapshot format version {self.version} is not supported "
                                       f"(this code reads and writes version {FORMAT_VERSION})")
        if not 0 <= self.network_id <= 0xFF:
            raise OutOfRange(f"snapshot network id {self.network_id} is not a byte")
        if not 0 <= self.height <= _U64_MAX or not 0 <= self.record_count <= _U64_MAX:
            raise OutOfRange(f"snapshot height {self.height} / record count {self.record_count} outside u64")
        if len(self.block_hash) != 32 or len(self.state_root) != 32:
            raise OutOfRange("snapshot block hash and state root must be 32 bytes each")

    def encode(self) -> bytes:
        return _HEADER.pack(MAGIC, self.version, self.network_id, self.height, self.block_hash, self.state_root,
                            self.record_count)

    @property
    def network_name(self) -> str:
        return _ID_TO_NAME.get(self.network_id, f"unknown-{self.network_id}")

    @classmethod
    def decode(cls, b: bytes, network: Optional[Network] = None) -> "SnapshotHeader":
        """Exactly HEADER_SIZE bytes; network, when given, must match the header's network id."""
        h = cls._parse(b, network)
        if len(b) > HEADER_SIZE:
            raise SnapshotTrailingBytes(f"snapshot header: {len(b) - HEADER_SIZE} trailing bytes after offset "
                                        f"{HEADER_SIZE}", offset=HEADER_SIZE)
        return h

    @classmethod
    def _parse(cls, b: bytes, network: Optional[Network]) -> "SnapshotHeader":
        # Magic first, even on short input: a file that is not a snapshot at all should say so.
        if not b:
            raise SnapshotTruncated("empty file: no snapshot header", offset=0)
        head = bytes(b[:len(MAGIC)])
        if head != MAGIC[:len(head)]:
            raise BadMagic(f"not an l2d snapshot: starts with {head.hex()}, expected magic "
                           f"{MAGIC.hex()} (b'L2DSNAP\\0')", offset=0)
        if len(b) < HEADER_SIZE:
            raise SnapshotTruncated(f"snapshot header: needs {HEADER_SIZE} bytes, only {len(b)} present",
                                    offset=len(b))
        _, version, net, height, block_hash, state_root, count = _HEADER.unpack_from(b)
        if version != FORMAT_VERSION:
            raise SnapshotVersionError(f"snapshot format version {version} is not supported (this verifier reads "
                                       f"version {FORMAT_VERSION})", offset=len(MAGIC))
        if network is not None and net != network.id:
            raise SnapshotWrongNetwork(f"snapshot is for network {network_label(net)}, expected {network.name} "
                                       f"(id {network.id})", offset=len(MAGIC) + 1)
        return cls(net, height, block_hash, state_root, count, version)


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes, fewer only at end of file (raw files and pipes may return short reads)."""
    b = f.read(n)
    if len(b) == n or not b:
        return b
    parts = [b]
    got = len(b)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_header(fileobj: BinaryIO, network: Optional[Network] = None) -> SnapshotHeader:
    """Read and check the header at the current position (leaves the file positioned at record 0)."""
    return SnapshotHeader._parse(_read_full(fileobj, HEADER_SIZE), network)


# -- streaming body ----------------------------------------------------------------------------------------------
def _record_size(value: bytes) -> int:
    n = len(value)
    return KEY_SIZE + (1 if n < 0xFD else 3 if n <= 0xFFFF else 5) + n


class _Body:
    """Streaming parse of the records and trailer after a header.

    Invariant between refills: the running hash covers file bytes [0, base); data holds file bytes
    [base, base + len(data)); the file position is base + len(data).
    """

    __slots__ = ("f", "header", "h", "data", "base", "eof")

    def __init__(self, f: BinaryIO, header: SnapshotHeader, header_bytes: bytes) -> None:
        self.f = f
        self.header = header
        self.h = hashlib.sha256(header_bytes)
        self.data = b""
        self.base = HEADER_SIZE
        self.eof = False

    def _refill(self, pos: int) -> None:
        """Hash data[:pos], keep data[pos:], and read until at least CHUNK + MAX_RECORD_SIZE are buffered or EOF."""
        data = self.data
        if pos:
            self.h.update(memoryview(data)[:pos])
        rest = data[pos:]
        want = CHUNK + MAX_RECORD_SIZE - len(rest)
        more = _read_full(self.f, want) if want > 0 else b""
        if len(more) < want:
            self.eof = True
        self.data = rest + more
        self.base += pos

    def batches(self, check_order: bool) -> Iterator[tuple[int, list[tuple[bytes, bytes]]]]:
        """Yield (file offset of the first record, records) per buffer, then check the trailer.

        With check_order, keys must be strictly increasing (verify_snapshot leaves that to RootBuilder).
        """
        count = self.header.record_count
        i = 0
        pos = 0
        prev = b""
        while i < count:
            self._refill(pos)
            data, pos = self.data, 0
            n = len(data)
            limit = n if self.eof else n - MAX_RECORD_SIZE  # past limit a record may straddle the next read
            batch: list[tuple[bytes, bytes]] = []
            append = batch.append
            start = self.base
            try:
                while i < count and pos <= limit:
                    ln = data[pos + 33]  # IndexError: fewer than 34 bytes left (only possible at EOF)
                    if ln < 0xFD:
                        vs = pos + 34
                    else:
                        ln, vs = self._long_length(data, pos, i)
                    ve = vs + ln
                    if ve > n:
                        raise self._truncated(i, pos, ve - pos)
                    key = data[pos:pos + 33]
                    if check_order:
                        if key <= prev:
                            self._damaged(self._order_error(i, self.base + pos, key, prev))
                        prev = key
                    append((key, data[vs:ve]))
                    pos = ve
                    i += 1
            except IndexError:
                raise self._truncated(i, pos, 34) from None
            if batch:
                yield start, batch
        self._finish(pos)

    def _long_length(self, data: bytes, pos: int, i: int) -> tuple[int, int]:
        first = data[pos + 33]
        size = 2 if first == 0xFD else 4 if first == 0xFE else 8
        vs = pos + 34 + size
        if vs > len(data):
            raise self._truncated(i, pos, 34 + size)
        ln = int.from_bytes(data[pos + 34:vs], "little")
        where = f"record {i} at offset {self.base + pos}"
        if ln < (0xFD if size == 2 else 0x10000 if size == 4 else 0x100000000):
            self._damaged(NonMinimalLength(f"{where}: value length {ln} is not minimally encoded",
                                          record=i, offset=self.base + pos))
        if ln > MAX_VALUE:
            self._damaged(BadRecordLength(f"{where}: value length {ln} exceeds the limit {MAX_VALUE}",
                                          record=i, offset=self.base + pos))
        return ln, vs

    def _truncated(self, i: int, pos: int, need: int) -> SnapshotTruncated:
        left = len(self.data) - pos
        return SnapshotTruncated(f"record {i} at offset {self.base + pos}: file ends after {left} of its "
                                 f"{need}+ bytes (truncated; header says {self.header.record_count} records)",
                                 record=i, offset=self.base + pos)

    @staticmethod
    def _order_error(i: int, offset: int, key: bytes, prev: bytes) -> KeyOrderError:
        if key == prev:
            return DuplicateKey(f"record {i} at offset {offset}: duplicate key {key.hex()}", record=i, offset=offset)
        return KeyOrderError(f"record {i} at offset {offset}: key out of order {key.hex()} (previous {prev.hex()})",
                             record=i, offset=offset)

    def _finish(self, pos: int) -> None:
        """After the last record at data[pos:]: trailer present, checksum holds, nothing follows."""
        if len(self.data) - pos < TRAILER_SIZE and not self.eof:
            self._refill(pos)
            pos = 0
        data = self.data
        at = self.base + pos
        if len(data) - pos < TRAILER_SIZE:
            raise SnapshotTruncated(f"trailer at offset {at}: needs {TRAILER_SIZE} bytes, only {len(data) - pos} "
                                    f"present (truncated)", offset=at, record=self.header.record_count)
        self.h.update(memoryview(data)[:pos])
        computed = self.h.digest()
        trailer = data[pos:pos + TRAILER_SIZE]
        extra = len(data) - pos - TRAILER_SIZE
        while not self.eof:  # count what follows without holding it
            more = self.f.read(CHUNK)
            if not more:
                break
            extra += len(more)
        if computed != trailer:
            hint = (f"; {extra} more bytes follow it, so the header's record count "
                    f"({self.header.record_count}) may be wrong" if extra else "")
            raise ChecksumMismatch(f"checksum mismatch: trailer at offset {at} is {trailer.hex()}, the file's bytes "
                                   f"hash to {computed.hex()}{hint}", offset=at)
        if extra:
            raise SnapshotTrailingBytes(f"{extra} trailing bytes after the trailer at offset {at + TRAILER_SIZE}",
                                        offset=at + TRAILER_SIZE)

    def _damaged(self, err: SnapshotError) -> NoReturn:
        """Raise for a record-level problem: ChecksumMismatch if the file's own checksum fails too, else err."""
        h = self.h.copy()
        held = self.data  # unhashed bytes; the last TRAILER_SIZE of the file are the claimed checksum
        while not self.eof:
            more = self.f.read(CHUNK)
            if not more:
                break
            held += more
            if len(held) > TRAILER_SIZE:
                h.update(memoryview(held)[:-TRAILER_SIZE])
                held = held[-TRAILER_SIZE:]
        if len(held) >= TRAILER_SIZE:
            h.update(memoryview(held)[:-TRAILER_SIZE])
            if h.digest() != held[-TRAILER_SIZE:]:
                raise ChecksumMismatch(f"checksum mismatch: the file is damaged (first inconsistency: {err})",
                                       record=err.record, offset=err.offset) from err
        raise err


# -- reading and verifying ---------------------------------------------------------------------------------------
def read_snapshot(fileobj: BinaryIO, network: Optional[Network] = None
                  ) -> tuple[SnapshotHeader, Iterator[tuple[bytes, bytes]]]:
    """Header now, then a lazy iterator of (key, value) in key order.

    The iterator checks structure and ordering as it goes and the checksum when it is exhausted: treat what it
    yielded as unverified until it has ended without raising. The root is not recomputed (verify_snapshot does).
    """
    raw = _read_full(fileobj, HEADER_SIZE)
    header = SnapshotHeader._parse(raw, network)
    body = _Body(fileobj, header, raw)
    return header, chain.from_iterable(batch for _, batch in body.batches(check_order=True))


def verify_snapshot(fileobj: BinaryIO, network: Optional[Network] = None,
                    expect_root: Optional[bytes] = None) -> SnapshotHeader:
    """Stream the whole file, recompute the state root, and return the header if everything holds.

    Checks: header (magic, version, network if given), every record's encoding, strictly increasing keys, the
    record count, the trailer checksum, no trailing bytes, recomputed root == header root (== expect_root if given).
    """
    if expect_root is not None and len(expect_root) != 32:
        raise OutOfRange(f"expected root is {len(expect_root)} bytes, not 32")
    raw = _read_full(fileobj, HEADER_SIZE)
    header = SnapshotHeader._parse(raw, network)
    body = _Body(fileobj, header, raw)
    builder = RootBuilder()
    add = builder.add
    done = 0  # records before the current batch
    last = b""  # key of the record before the current batch
    try:
        for start, batch in body.batches(check_order=False):
            try:
                for key, value in batch:  # the hot loop: one call per record
                    add(key, value)
            except DecodeError:  # RootBuilder: not strictly increasing
                i = builder.count
                j = i - done
                key = batch[j][0]
                prev = batch[j - 1][0] if j else last
                if key > prev:  # not an ordering problem after all: let it through unchanged
                    raise
                offset = start + sum(_record_size(v) for _, v in batch[:j])
                body._damaged(_Body._order_error(i, offset, key, prev))
            done += len(batch)
            last = batch[-1][0]
    except ChecksumMismatch as e:
        if e.record is not None:  # damage found mid-stream: the message already says where it showed
            raise
        # Every record was read: say whether they still hash to the header's root (helps locate the damage).
        root = builder.root()
        same = "the header's state root" if root == header.state_root else (
            f"{root.hex()}, the header says {header.state_root.hex()}")
        raise ChecksumMismatch(f"{e}; the records hash to {same}", offset=e.offset) from None
    root = builder.root()
    if root != header.state_root:
        raise RootMismatch(f"state root mismatch: the {header.record_count} records hash to {root.hex()}, the "
                           f"header says {header.state_root.hex()}")
    if expect_root is not None and root != expect_root:
        raise RootMismatch(f"snapshot root {root.hex()} is not the expected root {expect_root.hex()}")
    return header


# -- writing -----------------------------------------------------------------------------------------------------
def write_snapshot(fileobj: BinaryIO, network: Network, height: int, block_hash: bytes, state_root: bytes,
                   items: Iterable[tuple[bytes, bytes]], count: int, *, verify_root: bool = False) -> bytes:
    """Stream a snapshot to fileobj and return its checksum (the trailer).

    items must yield exactly count (key, value) pairs in strictly increasing key order (SnapshotWriteError
    otherwise). With verify_root the records' root is recomputed while writing and RootMismatch is raised
    before the trailer is written if it is not state_root. On any error the partial output must be discarded.
    """
    header = SnapshotHeader(network.id, height, block_hash, state_root, count).encode()
    h = hashlib.sha256(header)
    fileobj.write(header)
    builder = RootBuilder() if verify_root else None
    parts: list[bytes] = []
    part = parts.append
    pending = 0
    prev = b""
    i = 0
    for key, value in items:
        if i == count:
            raise SnapshotWriteError(f"more than the {count} records announced", record=i)
        if len(key) != KEY_SIZE:
            raise OutOfRange(f"record {i}: key is {len(key)} bytes, expected {KEY_SIZE}")
        if key <= prev:
            what = "duplicate key" if key == prev else "key out of order"
            raise SnapshotWriteError(f"record {i}: {what} {key.hex()} (previous {prev.hex()})", record=i)
        n = len(value)
        if n > MAX_VALUE:
            raise OutOfRange(f"record {i}: value is {n} bytes, the limit is {MAX_VALUE}")
        part(key)
        part(_LEN1[n] if n < 0xFD else write_varint(n))
        part(value)
        if builder is not None:
            builder.add(key, value)
        pending += KEY_SIZE + 1 + n
        if pending >= CHUNK:
            blob = b"".join(parts)
            h.update(blob)
            fileobj.write(blob)
            parts.clear()
            pending = 0
        prev = key
        i += 1
    if i != count:
        raise SnapshotWriteError(f"{i} records given, {count} announced", record=i)
    blob = b"".join(parts)
    h.update(blob)
    fileobj.write(blob)
    if builder is not None and (root := builder.root()) != state_root:
        raise RootMismatch(f"the {count} records hash to {root.hex()}, not the state root {state_root.hex()}")
    digest = h.digest()
    fileobj.write(digest)
    return digest


def snapshot_name(network: Network, height: int) -> str:
    """File name of the snapshot of network at height: snapshot-{network}-{height:012d}.l2snap."""
    return f"snapshot-{network.name}-{height:012d}.l2snap"


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in directory durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_snapshot(path: Path, header: SnapshotHeader, digest: Optional[bytes]) -> bool:
    """Does the existing file at path hold this snapshot (same header and, when known, same checksum)?"""
    with open(path, "rb") as f:
        if f.read(HEADER_SIZE) != header.encode():
            return False
        if digest is None:
            return True
        f.seek(-TRAILER_SIZE, os.SEEK_END)
        return f.read(TRAILER_SIZE) == digest


def write_snapshot_file(directory: Union[str, os.PathLike[str]], network: Network, height: int, block_hash: bytes,
                        state_root: bytes, items: Iterable[tuple[bytes, bytes]], count: int, *,
                        verify_root: bool = False) -> Path:
    """Write snapshot_name(network, height) into directory atomically and return its path.

    The file appears complete or not at all: it is written to a temporary file in the same directory, fsynced,
    hard-linked to its final name (which never replaces an existing file) and the directory is fsynced. If the name
    already holds the same snapshot (same header, so the same state) that file is returned untouched; if it holds a
    different one, SnapshotExists is raised. Temporary files are named .snapshot-*.tmp and removed on error.
    """
    directory = Path(directory)
    final = directory / snapshot_name(network, height)
    header = SnapshotHeader(network.id, height, block_hash, state_root, count)
    if final.exists():
        if _same_snapshot(final, header, None):
            return final
        raise SnapshotExists(f"{final} already holds a different snapshot of height {height}")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            digest = write_snapshot(f, network, height, block_hash, state_root, items, count,
                                    verify_root=verify_root)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, final)  # unlike rename, never replaces an existing name
        except FileExistsError:
            if not _same_snapshot(final, header, digest):
                raise SnapshotExists(f"{final} already holds a different snapshot of height {height}") from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            if final.exists():  # no hard links on this filesystem: check, then rename (a narrow race)
                raise SnapshotExists(f"{final} appeared while writing") from None
            os.rename(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(directory)
    return final


def list_snapshots(directory: Union[str, os.PathLike[str]],
                   network: Optional[Network] = None) -> list[tuple[int, Path]]:
    """(height, path) of the complete snapshot files in directory, oldest first (temporary files excluded)."""
    directory = Path(directory)
    found = []
    for name in os.listdir(directory):
        m = _NAME.fullmatch(name)
        if m is None or (network is not None and m.group(1) != network.name):
            continue
        found.append((int(m.group(2)), name))
    return [(height, directory / name) for height, name in sorted(found)]


def prune_snapshots(directory: Union[str, os.PathLike[str]], keep: int,
                    network: Optional[Network] = None) -> list[Path]:
    """Delete all but the newest keep snapshot files (by height; only names this module writes); return the deleted.

    Files are only ever deleted whole, never rewritten. Stray temporary files of a crashed writer are left alone.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    snaps = list_snapshots(directory, network)
    removed = []
    for _, path in snaps[:-keep]:
        try:
            path.unlink()
        except FileNotFoundError:  # pruned concurrently
            continue
        removed.append(path)
    if removed:
        fsync_dir(Path(directory))
    return removed
