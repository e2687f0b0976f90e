"""Chain files: an exported run of L2 block headers with their commits, and its offline verification.

What a member serves for a height range (``GET /api/l2/commits?from=&to=``) and what ``l2-verify chain`` checks
against a federation genesis file (l2d/core/genesis_file.py). Pure: the file is a binary stream argument. Byte
layout (docs/federation.md, "Chain file"; integers big-endian):

    magic "L2DCHAIN" | version u8 = 1 | network id u8 | start_height u64 | count u64 (>= 1)
    | count x (block header 118 bytes | commit length u16 | commit)
    | SHA-256 of every byte before it

Reading streams one entry at a time (memory bounded by one commit, at most MAX_COMMIT_SIZE bytes). Errors:

    ChainFileError (offset, height where known)
      ChainFileMalformed (a DecodeError; l2-verify exit 2)   the bytes are not a chain file this code reads
        NotAChainFile                          wrong magic
        ChainFileVersionError (UnknownVersion) format version other than 1
        ChainFileUnknownNetwork (WrongNetwork) a network id this code does not know
        ChainFileEmpty                         count 0, or heights beyond u64
        ChainFileTruncated (Truncated)         fewer bytes than the entries and the checksum need
        ChainFileTrailingBytes (TrailingBytes) bytes after the checksum
        ChainFileBadEntry                      a header or commit that does not decode (unknown block version,
                                               commit length out of range, a commit that is not canonical)
      ChainFileChecksum (exit 1)               the checksum does not match: the file was damaged after it was written
      ChainInvalid (exit 1; height)            a well-formed file that does not verify against the genesis file
        ChainWrongNetwork                      the file or a block is for another network than the federation's
        ChainHeightGap                         a header's height is not the next one
        ChainBrokenLink                        a header's parent hash is not its predecessor's hash, or its time
                                               goes backwards (block.check_link)
        ChainGenesisMismatch                   block 0 is not the genesis file's header with the empty commit
        ChainNoTrustedStart                    a file starting above height 1 without a checkpoint
        ChainCheckpointMismatch                the checkpoint is outside the file or its hash differs
        ChainNotEnoughSignatures (NotEnoughSignatures), ChainBadCommitSignature (BadCommitSignature)
                                               a block without m valid member signatures
A problem found mid-stream (a bad entry or a verification failure) is first checked against the file's own
checksum: if that fails too, the file was damaged after it was written and ChainFileChecksum is raised, naming the
first inconsistency; otherwise the original error stands. Running out of bytes is always ChainFileTruncated.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, NoReturn, Optional

from .block import HEADER_SIZE, BlockHeader, check_link
from .commit import SIG_SIZE, Commit
from .errors import (BadCommitSignature, CommitError, DecodeError, InvalidBlock, L2Error, NotEnoughSignatures,
                     TrailingBytes, Truncated, UnknownVersion, WrongNetwork)
from .genesis_file import FederationGenesis
from .members import MAX_MEMBERS
from .params import NETWORKS, Network

MAGIC = b"L2DCHAIN"
FORMAT_VERSION = 1
TRAILER_SIZE = 32
_PREAMBLE = struct.Struct(">8sBBQQ")
PREAMBLE_SIZE = _PREAMBLE.size  # 26
_LEN = struct.Struct(">H")
MIN_COMMIT_SIZE = 2  # n and a one-byte bitmap
MAX_COMMIT_SIZE = 1 + (MAX_MEMBERS + 7) // 8 + SIG_SIZE * MAX_MEMBERS  # 4105
_U64_MAX = (1 << 64) - 1
_CHUNK = 1 << 16
_ID_TO_NETWORK = {n.id: n for n in NETWORKS.values()}


# -- errors --------------------------------------------------------------------------------------------------------
class ChainFileError(L2Error):
    """A chain file that cannot be read or does not verify; offset and height say where, when known."""

    def __init__(self, message: str, *, offset: Optional[int] = None, height: Optional[int] = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.height = height


class ChainFileMalformed(ChainFileError, DecodeError):
    pass


class NotAChainFile(ChainFileMalformed):
    pass


class ChainFileVersionError(ChainFileMalformed, UnknownVersion):
    pass


class ChainFileUnknownNetwork(ChainFileMalformed, WrongNetwork):
    pass


class ChainFileEmpty(ChainFileMalformed):
    pass


class ChainFileTruncated(ChainFileMalformed, Truncated):
    pass


class ChainFileTrailingBytes(ChainFileMalformed, TrailingBytes):
    pass


class ChainFileBadEntry(ChainFileMalformed):
    pass


class ChainFileChecksum(ChainFileError):
    pass


class ChainInvalid(ChainFileError):
    pass


class ChainWrongNetwork(ChainInvalid):
    pass


class ChainHeightGap(ChainInvalid):
    pass


class ChainBrokenLink(ChainInvalid):
    pass


class ChainGenesisMismatch(ChainInvalid):
    pass


class ChainNoTrustedStart(ChainInvalid):
    pass


class ChainCheckpointMismatch(ChainInvalid):
    pass


class ChainNotEnoughSignatures(ChainInvalid, NotEnoughSignatures):
    pass


class ChainBadCommitSignature(ChainInvalid, BadCommitSignature):
    pass


# -- format --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChainPreamble:
    network_id: int
    start_height: int
    count: int

    @property
    def tip_height(self) -> int:
        return self.start_height + self.count - 1

    def encode(self) -> bytes:
        return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, self.network_id, self.start_height, self.count)


@dataclass(frozen=True, slots=True)
class ChainEntry:
    header: BlockHeader
    commit: Commit
    offset: int  # of the header in the file


def genesis_commit(n: int) -> Commit:
    """The commit block 0 carries in a chain file: no signatures (genesis is trusted through the genesis file)."""
    return Commit(n, (), ())


def write_chain_file(f: BinaryIO, network: Network, start_height: int, count: int,
                     entries: Iterable[tuple[BlockHeader, Commit]]) -> bytes:
    """Write a chain file of exactly count (header, commit) entries to f; returns the checksum written.

    Only the framing is checked (the blocks and commits were checked when they were stored): a wrong count raises
    ChainFileMalformed before the checksum is written, so no complete-looking file results.
    """
    if count < 1:
        raise ChainFileEmpty("a chain file holds at least one block")
    if start_height < 0 or start_height + count - 1 > _U64_MAX:
        raise ChainFileEmpty(f"heights {start_height}..{start_height + count - 1} outside u64")
    h = hashlib.sha256()
    pre = ChainPreamble(network.id, start_height, count).encode()
    f.write(pre)
    h.update(pre)
    n = 0
    for header, commit in entries:
        n += 1
        if n > count:
            raise ChainFileMalformed(f"more than the {count} blocks announced")
        raw_commit = commit.encode()
        entry = header.encode() + _LEN.pack(len(raw_commit)) + raw_commit
        f.write(entry)
        h.update(entry)
    if n != count:
        raise ChainFileMalformed(f"{n} blocks written, {count} announced")
    digest = h.digest()
    f.write(digest)
    return digest


class ChainReader:
    """Streaming, strict reader: the preamble on construction, then entries(), which checks the trailer last.

    Treat what entries() yielded as unverified until it has ended without raising.
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.sha256()
        self.pos = 0
        self.checksum: Optional[bytes] = None
        magic = self._read_some(len(MAGIC))
        if magic != MAGIC:
            if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
                raise ChainFileTruncated(f"file ends after {len(magic)} bytes, inside the magic", offset=0)
            raise NotAChainFile(f"not a chain file: magic {magic.hex()}, expected {MAGIC.hex()}", offset=0)
        self.h.update(magic)
        self.pos = len(magic)
        rest = self._read(PREAMBLE_SIZE - len(MAGIC), "preamble")
        _, version, net_id, start, count = _PREAMBLE.unpack(magic + rest)
        if version != FORMAT_VERSION:
            raise ChainFileVersionError(f"chain file format version {version}, this code reads {FORMAT_VERSION}",
                                        offset=8)
        network = _ID_TO_NETWORK.get(net_id)
        if network is None:
            raise ChainFileUnknownNetwork(f"chain file network id {net_id} is not one this code knows", offset=9)
        if count == 0:
            raise ChainFileEmpty("chain file announces 0 blocks", offset=18)
        if start + count - 1 > _U64_MAX:
            raise ChainFileEmpty(f"chain file heights {start}..{start + count - 1} go beyond u64", offset=10)
        self.network: Network = network
        self.preamble = ChainPreamble(net_id, start, count)

    def _read_some(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.f.read(n - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def _read(self, n: int, what: str, height: Optional[int] = None, hashed: bool = True) -> bytes:
        at = self.pos
        b = self._read_some(n)
        if len(b) != n:
            raise ChainFileTruncated(f"{what} at offset {at}: needs {n} bytes, only {len(b)} present",
                                     offset=at, height=height)
        if hashed:
            self.h.update(b)
        self.pos += n
        return b

    def entries(self) -> Iterator[ChainEntry]:
        start = self.preamble.start_height
        for i in range(self.preamble.count):
            height = start + i
            at = self.pos
            raw = self._read(HEADER_SIZE, f"header of block {height}", height)
            length = _LEN.unpack(self._read(_LEN.size, f"commit length of block {height}", height))[0]
            if not MIN_COMMIT_SIZE <= length <= MAX_COMMIT_SIZE:
                self.damaged(ChainFileBadEntry(f"block {height}: commit length {length} outside "
                                               f"{MIN_COMMIT_SIZE}..{MAX_COMMIT_SIZE}", offset=at + HEADER_SIZE,
                                               height=height))
            raw_commit = self._read(length, f"commit of block {height}", height)
            try:
                header = BlockHeader.decode(raw, self.network)
            except WrongNetwork:
                self.damaged(ChainWrongNetwork(f"block {height} is for network id {raw[1]}, the file for "
                                               f"{self.network.name} ({self.network.id})", offset=at, height=height))
            except DecodeError as e:
                self.damaged(ChainFileBadEntry(f"block {height}: header: {e}", offset=at, height=height))
            try:
                commit = Commit.decode(raw_commit)
            except DecodeError as e:
                self.damaged(ChainFileBadEntry(f"block {height}: {e}", offset=at + HEADER_SIZE + _LEN.size,
                                               height=height))
            yield ChainEntry(header, commit, at)
        self._finish()

    def _finish(self) -> None:
        at = self.pos
        trailer = self._read(TRAILER_SIZE, "checksum", hashed=False)
        extra = 0
        while more := self.f.read(_CHUNK):
            extra += len(more)
        digest = self.h.digest()
        if trailer != digest:
            hint = (f"; {extra} more bytes follow it, so the preamble's count ({self.preamble.count}) may be wrong"
                    if extra else "")
            raise ChainFileChecksum(f"checksum mismatch: trailer at offset {at} is {trailer.hex()}, the file's bytes "
                                    f"hash to {digest.hex()}{hint}", offset=at)
        if extra:
            raise ChainFileTrailingBytes(f"{extra} bytes after the checksum at offset {at + TRAILER_SIZE}",
                                         offset=at + TRAILER_SIZE)
        self.checksum = digest

    def damaged(self, err: ChainFileError) -> NoReturn:
        """Raise for a problem found mid-stream: ChainFileChecksum if the file's own checksum fails too, else err."""
        h = self.h.copy()
        held = b""  # unhashed bytes; the last TRAILER_SIZE of the file are the claimed checksum
        while more := self.f.read(_CHUNK):
            held += more
            if len(held) > TRAILER_SIZE:
                h.update(held[:-TRAILER_SIZE])
                held = held[-TRAILER_SIZE:]
        if len(held) == TRAILER_SIZE and h.digest() != held:
            raise ChainFileChecksum(f"checksum mismatch: the file is damaged (first inconsistency: {err})",
                                    offset=err.offset, height=err.height) from err
        raise err


# -- verification --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChainReport:
    """What a verified chain file establishes (hashes are L2 block hashes, shown as plain hex)."""

    network: str
    start_height: int
    tip_height: int
    count: int
    start_hash: bytes
    tip_hash: bytes
    genesis_hash: bytes
    threshold: int
    members: int
    checkpoint: Optional[tuple[int, bytes]]
    signed: tuple[int, ...]  # per member index: blocks of the file it signed
    checksum: bytes

    @property
    def final_height(self) -> int:
        """Every block below the tip has an m-signed child in the file, so it is final; the tip may not be."""
        return max(self.tip_height - 1, 0)

    @property
    def trusted_start(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint[0]}:{self.checkpoint[1].hex()}"
        return "genesis"


def verify_chain(f: BinaryIO, genesis: FederationGenesis,
                 checkpoint: Optional[tuple[int, bytes]] = None) -> ChainReport:
    """Stream a chain file and check it against the federation's genesis file:

    1. the file is for the federation's network, and so is every block;
    2. its start is trusted: height 0 (block 0 must be the genesis file's header, with the empty commit), height 1
       (block 1's parent is the genesis header), or any height with a checkpoint (height, hash) at a height from
       start - 1 to the tip: the block at that height (at start - 1: the first block's parent) has that hash.
       A file starting above 1 without a checkpoint is refused (ChainNoTrustedStart): the same members could have
       signed blocks of another chain of the same network;
    3. heights are consecutive, each header links to its predecessor (block.check_link: parent hash, timestamp);
    4. every block above 0 has a commit with at least m valid signatures of distinct members (Commit.verify);
    5. the checksum, and nothing after it.
    """
    reader = ChainReader(f)
    pre = reader.preamble
    members = genesis.members
    if reader.network != genesis.network:
        raise ChainWrongNetwork(f"the file is for network {reader.network.name}, the federation's genesis for "
                                f"{genesis.network.name}", offset=9, height=pre.start_height)
    cp_height = checkpoint[0] if checkpoint is not None else None
    if cp_height is not None and not pre.start_height - 1 <= cp_height <= pre.tip_height:
        raise ChainCheckpointMismatch(f"checkpoint height {cp_height} is outside the file's heights "
                                      f"{pre.start_height - 1}..{pre.tip_height} (a checkpoint at start - 1 "
                                      f"checks the first block's parent)", height=cp_height)
    if pre.start_height > 1 and checkpoint is None:
        raise ChainNoTrustedStart(f"the file starts at height {pre.start_height}: give a checkpoint (height:hash "
                                  f"of a block from {pre.start_height - 1} to {pre.tip_height}) to tie it to the "
                                  f"federation's chain", height=pre.start_height)
    parent: Optional[BlockHeader] = genesis.genesis if pre.start_height == 1 else None
    signed = [0] * members.n
    first = last = b""
    for i, e in enumerate(reader.entries()):
        try:
            block_hash = _check_entry(e, pre.start_height + i, parent, genesis, checkpoint)
        except ChainFileError as err:
            reader.damaged(err)
        for k in e.commit.signers:
            signed[k] += 1
        parent = e.header
        first = first or block_hash
        last = block_hash
    if reader.checksum is None:  # entries() ended without its trailer check: cannot happen
        raise ChainFileMalformed("chain file ended without its checksum")
    return ChainReport(genesis.network.name, pre.start_height, pre.tip_height, pre.count, first, last,
                       genesis.genesis_hash, members.threshold, members.n, checkpoint, tuple(signed),
                       reader.checksum)


def _check_entry(e: ChainEntry, height: int, parent: Optional[BlockHeader], genesis: FederationGenesis,
                 checkpoint: Optional[tuple[int, bytes]]) -> bytes:
    """Steps 2-4 for the block expected at height (its parent header, when known); returns its hash."""
    header, commit, members = e.header, e.commit, genesis.members
    if header.height != height:
        raise ChainHeightGap(f"expected block {height} after block {height - 1}, found a block at height "
                             f"{header.height}", offset=e.offset, height=height)
    block_hash = header.hash
    if height == 0:
        if header != genesis.genesis:
            raise ChainGenesisMismatch(f"block 0 is {block_hash.hex()}, not the federation's genesis "
                                       f"{genesis.genesis_hash.hex()}", offset=e.offset, height=0)
        if commit != genesis_commit(members.n):
            raise ChainGenesisMismatch(f"block 0 carries a commit with {len(commit.signers)} signature(s) for "
                                       f"{commit.n} members; the genesis carries the empty commit for {members.n}",
                                       offset=e.offset, height=0)
    else:
        if parent is not None:
            try:
                check_link(parent, header)
            except InvalidBlock as err:
                raise ChainBrokenLink(str(err), offset=e.offset, height=height) from None
        if checkpoint is not None and checkpoint[0] == height - 1 and header.prev_hash != checkpoint[1]:
            raise ChainCheckpointMismatch(f"block {height}'s parent is {header.prev_hash.hex()}, the checkpoint "
                                          f"says {checkpoint[1].hex()}", offset=e.offset, height=height - 1)
        try:
            genesis.verify_commit(commit, block_hash)
        except NotEnoughSignatures as err:
            raise ChainNotEnoughSignatures(f"block {height} {block_hash.hex()}: {err}", offset=e.offset,
                                           height=height) from None
        except CommitError as err:
            raise ChainBadCommitSignature(f"block {height}: {err}", offset=e.offset, height=height) from None
    if checkpoint is not None and checkpoint[0] == height and block_hash != checkpoint[1]:
        raise ChainCheckpointMismatch(f"block {height} is {block_hash.hex()}, the checkpoint says "
                                      f"{checkpoint[1].hex()}", offset=e.offset, height=height)
    return block_hash

