"""Header files: a run of Bitcoin block headers exported by the header store, loaded offline by the verifier.

Pure (the offline verifier imports it): no lmdb, no network, no clock; the file is a binary stream argument and
"now" for the 2-hour future rule is a parameter. The byte layout is documented in docs/header-file.md:

    magic "L2DHDRS\\0" | version u8 = 1 | chain name (u8 length, ASCII) | start_height u64 BE | count u64 BE
    | count x 80-byte headers | SHA-256 of every byte before it

Loading streams the headers through :class:`bridge.spv.HeaderChain` in batches, so memory stays bounded whatever
the count; every consensus rule failure raises the spv error for that rule (BadProofOfWork, BadLink,
BadDifficulty, TimeTooOld, TimeTooNew, CheckpointMismatch, the BadTarget family). The file's own problems:

    HeaderFileError
      HeaderFileMalformed (also a DecodeError)   the bytes are not a header file we can read
        NotAHeaderFile                           wrong magic
        HeaderFileVersionError (UnknownVersion)  format version other than 1
        HeaderFileUnknownChain                   chain name not one of mainnet, testnet, signet, regtest
        HeaderFileWrongChain (WrongNetwork)      a chain other than the one the caller requires
        HeaderFileEmpty                          count 0
        HeaderFileTruncated (Truncated)          fewer bytes than the header section and count promise
        HeaderFileTrailingBytes (TrailingBytes)  bytes after the checksum
      HeaderFileChecksum                         the checksum does not match (damaged after it was written)
      CheckpointNotInFile                        a required checkpoint height outside the file's range

Trust: the first header of the file is the start. At height 0 it must be the chain's genesis (HeaderChain checks
that); above 0 it is only as trustworthy as the file, unless a checkpoint (height, hash) inside the file's range is
given, which every header from the start up to it must then link to.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Optional

from .errors import DecodeError, L2Error, TrailingBytes, Truncated, UnknownVersion, WrongNetwork
from .spv import BITCOIN_CHAINS, HEADER_SIZE, ChainParams, HeaderChain, parse_header

MAGIC = b"L2DHDRS\0"
FORMAT_VERSION = 1
TRAILER_SIZE = 32
MAX_CHAIN_NAME = 16
# The canonical names a file may carry (BITCOIN_CHAINS also accepts the alias "testnet3"; a file never does).
CHAIN_NAMES = ("mainnet", "testnet", "signet", "regtest")
DEFAULT_BATCH = 2000  # headers validated per HeaderChain.extend_raw call: 160 kB of reads at a time
_U64 = struct.Struct(">Q")


class HeaderFileError(L2Error):
    """A header file that cannot be read or does not check out; offset is where in the file, when known."""

    def __init__(self, message: str, *, offset: Optional[int] = None) -> None:
        super().__init__(message)
        self.offset = offset


class HeaderFileMalformed(HeaderFileError, DecodeError):
    pass


class NotAHeaderFile(HeaderFileMalformed):
    pass


class HeaderFileVersionError(HeaderFileMalformed, UnknownVersion):
    pass


class HeaderFileUnknownChain(HeaderFileMalformed):
    pass


class HeaderFileWrongChain(HeaderFileMalformed, WrongNetwork):
    pass


class HeaderFileEmpty(HeaderFileMalformed):
    pass


class HeaderFileTruncated(HeaderFileMalformed, Truncated):
    pass


class HeaderFileTrailingBytes(HeaderFileMalformed, TrailingBytes):
    pass


class HeaderFileChecksum(HeaderFileError):
    pass


class CheckpointNotInFile(HeaderFileError):
    pass


@dataclass(frozen=True, slots=True)
class FilePreamble:
    """The fixed part before the headers."""

    chain_name: str
    start_height: int
    count: int

    @property
    def tip_height(self) -> int:
        return self.start_height + self.count - 1

    def encode(self) -> bytes:
        name = self.chain_name.encode("ascii")
        return (MAGIC + bytes((FORMAT_VERSION, len(name))) + name + _U64.pack(self.start_height)
                + _U64.pack(self.count))


@dataclass(frozen=True, slots=True)
class LoadedHeaders:
    """What a verified header file establishes. Hashes in internal byte order; work from start (inclusive)."""

    chain_name: str
    start_height: int
    start_hash: bytes
    tip_height: int
    tip_hash: bytes
    count: int
    work: int
    checksum: bytes
    chain: HeaderChain  # the validation state at the tip, to extend further or query median time past

    @property
    def tip_hash_hex(self) -> str:
        return self.tip_hash[::-1].hex()

    @property
    def start_hash_hex(self) -> str:
        return self.start_hash[::-1].hex()


def write_header_file(f: BinaryIO, chain_name: str, start_height: int, count: int,
                      headers: Iterable[bytes]) -> bytes:
    """Write a header file of exactly count headers (each 80 bytes) to f; returns the checksum written.

    Only the framing is checked here (the header store validated the headers when it stored them); a wrong
    count or size raises HeaderFileMalformed before the checksum is written, so no complete-looking file results.
    """
    if chain_name not in CHAIN_NAMES:
        raise HeaderFileUnknownChain(f"chain {chain_name!r} is not one of {', '.join(CHAIN_NAMES)}")
    if count < 1:
        raise HeaderFileEmpty("a header file holds at least one header")
    if not 0 <= start_height < 1 << 64:
        raise HeaderFileMalformed(f"start height {start_height} outside u64")
    h = hashlib.sha256()
    pre = FilePreamble(chain_name, start_height, count).encode()
    f.write(pre)
    h.update(pre)
    n = 0
    for raw in headers:
        if len(raw) != HEADER_SIZE:
            raise HeaderFileMalformed(f"header {n} is {len(raw)} bytes, not {HEADER_SIZE}")
        n += 1
        if n > count:
            raise HeaderFileMalformed(f"more than the {count} headers announced")
        f.write(raw)
        h.update(raw)
    if n != count:
        raise HeaderFileMalformed(f"{n} headers written, {count} announced")
    digest = h.digest()
    f.write(digest)
    return digest


def _read_exact(f: BinaryIO, n: int, offset: int, what: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise HeaderFileTruncated(f"{what} at offset {offset}: needs {n} bytes, only {len(b)} present",
                                  offset=offset)
    return b


def read_preamble(f: BinaryIO, require_chain: Optional[str] = None) -> tuple[FilePreamble, bytes]:
    """Read and check the part before the headers: (preamble, its raw bytes)."""
    magic = f.read(len(MAGIC))
    if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
        raise HeaderFileTruncated(f"file ends after {len(magic)} bytes, inside the magic", offset=0)
    if magic != MAGIC:
        raise NotAHeaderFile(f"not a header file: magic {magic.hex()}, expected {MAGIC.hex()}", offset=0)
    version, name_len = _read_exact(f, 2, 8, "version and chain name length")
    if version != FORMAT_VERSION:
        raise HeaderFileVersionError(f"header file format version {version}, this code reads {FORMAT_VERSION}",
                                     offset=8)
    if not 1 <= name_len <= MAX_CHAIN_NAME:
        raise HeaderFileUnknownChain(f"chain name length {name_len} outside 1..{MAX_CHAIN_NAME}", offset=9)
    raw_name = _read_exact(f, name_len, 10, "chain name")
    name = raw_name.decode("ascii", "replace")
    if name not in CHAIN_NAMES:
        raise HeaderFileUnknownChain(f"unknown chain {name!r} (known: {', '.join(CHAIN_NAMES)})", offset=10)
    if require_chain is not None and name != require_chain:
        raise HeaderFileWrongChain(f"header file is for chain {name}, not {require_chain}", offset=10)
    rest = _read_exact(f, 16, 10 + name_len, "start height and count")
    start_height, count = _U64.unpack_from(rest, 0)[0], _U64.unpack_from(rest, 8)[0]
    if count == 0:
        raise HeaderFileEmpty("header file announces 0 headers", offset=18 + name_len)
    pre = FilePreamble(name, start_height, count)
    return pre, pre.encode()


def load_header_file(f: BinaryIO, *, now: Optional[int], require_chain: Optional[str] = None,
                     checkpoint: Optional[tuple[int, bytes]] = None,
                     params: Optional[ChainParams] = None, batch: int = DEFAULT_BATCH) -> LoadedHeaders:
    """Stream a header file into a HeaderChain and check its checksum; memory bounded by batch headers.

    now: current time for the 2-hour future limit (None skips that rule, e.g. for archived files).
    require_chain: refuse a file for another chain (HeaderFileWrongChain).
    checkpoint: (height, hash in internal order) that the file must contain (CheckpointNotInFile otherwise)
    and match (spv.CheckpointMismatch).
    params: chain parameters to validate with; default: the ones for the file's chain name (tests pass synthetic
    parameters whose name is that of the file's chain).
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    pre, pre_raw = read_preamble(f, require_chain)
    chain_params = params if params is not None else BITCOIN_CHAINS[pre.chain_name]
    checkpoints: dict[int, bytes] = {}
    if checkpoint is not None:
        cp_height, cp_hash = checkpoint
        if not pre.start_height <= cp_height <= pre.tip_height:
            raise CheckpointNotInFile(f"checkpoint height {cp_height} is outside the file's heights "
                                      f"{pre.start_height}..{pre.tip_height}")
        checkpoints[cp_height] = cp_hash
    h = hashlib.sha256(pre_raw)
    offset = len(pre_raw)
    first = _read_exact(f, HEADER_SIZE, offset, f"header at height {pre.start_height}")
    h.update(first)
    offset += HEADER_SIZE
    chain = HeaderChain(chain_params, parse_header(first), pre.start_height, now=now, checkpoints=checkpoints)
    left = pre.count - 1
    while left:
        n = min(left, batch)
        data = _read_exact(f, n * HEADER_SIZE, offset, f"headers from height {chain.height + 1}")
        h.update(data)
        chain.extend_raw(data)
        offset += len(data)
        left -= n
    trailer = _read_exact(f, TRAILER_SIZE, offset, "checksum")
    extra = f.read(1)
    if extra:
        raise HeaderFileTrailingBytes(f"bytes after the checksum at offset {offset + TRAILER_SIZE}",
                                      offset=offset + TRAILER_SIZE)
    digest = h.digest()
    if trailer != digest:
        raise HeaderFileChecksum(f"checksum {trailer.hex()} does not match the contents ({digest.hex()}): the file "
                                 f"was damaged after it was written", offset=offset)
    return LoadedHeaders(pre.chain_name, pre.start_height, chain.start_hash, chain.height, chain.tip, pre.count,
                         chain.work, digest, chain)
