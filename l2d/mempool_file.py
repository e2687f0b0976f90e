"""The mempool file (docs/mempool-file.md): the pending transactions and the recent drop reasons, saved on a clean
stop and read back on the next start, where every transaction is re-admitted through admission.

Written atomically: a temporary file in the same directory, fsynced, renamed over the old one, the directory
fsynced; a crash leaves the previous file or the new one, never half of one. Read strictly: magic, version,
network, bounded lengths, reason codes, counts, a SHA-256 checksum over the whole file and no trailing bytes.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .core.codec import U8, U32, Reader
from .core.errors import DecodeError, TrailingBytes, UnknownVersion, WrongNetwork
from .core.params import Network
from .core.tx import MAX_TX_SIZE
from .datadir import write_atomic

log = logging.getLogger(__name__)

MEMPOOL_FILE = "mempool.dat"  # in the data dir
MAGIC = b"L2DMPOOL"
VERSION = 1
MAX_REASON = 64
_REASON = re.compile(rb"[a-z0-9][a-z0-9-]*")
_CHECKSUM = 32


class MempoolFileError(DecodeError):
    """The mempool file cannot be read back (damaged, truncated, another version or network)."""


class ChecksumMismatch(MempoolFileError):
    pass


@dataclass(frozen=True, slots=True)
class MempoolFile:
    txs: tuple[bytes, ...]  # raw transactions, in the order they were admitted
    dropped: tuple[tuple[bytes, str], ...]  # (txid, reason code), oldest first


def encode(network: Network, contents: MempoolFile) -> bytes:
    parts = [MAGIC, U8.pack(VERSION), U8.pack(network.id), U32.pack(len(contents.txs))]
    for raw in contents.txs:
        if not 0 < len(raw) <= MAX_TX_SIZE:
            raise ValueError(f"transaction of {len(raw)} bytes cannot be saved (1..{MAX_TX_SIZE})")
        parts += [U32.pack(len(raw)), raw]
    parts.append(U32.pack(len(contents.dropped)))
    for txid, reason in contents.dropped:
        code = reason.encode()
        if len(txid) != 32 or len(code) > MAX_REASON or not _REASON.fullmatch(code):
            raise ValueError(f"drop record ({txid.hex()}, {reason!r}) cannot be saved")
        parts += [txid, U8.pack(len(code)), code]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def decode(data: bytes, network: Network) -> MempoolFile:
    """Strict decoding; MempoolFileError (or another DecodeError naming the offset) on anything amiss."""
    if len(data) < len(MAGIC) + 2 + _CHECKSUM or data[:len(MAGIC)] != MAGIC:
        raise MempoolFileError("not a mempool file (bad magic or too short)")
    body, checksum = data[:-_CHECKSUM], data[-_CHECKSUM:]
    if hashlib.sha256(body).digest() != checksum:
        raise ChecksumMismatch("mempool file checksum mismatch: the file is damaged")
    r = Reader(body, "mempool file")
    r.take(len(MAGIC))
    version = r.u8()
    if version != VERSION:
        raise UnknownVersion(f"mempool file version {version}, this code reads {VERSION}")
    net = r.u8()
    if net != network.id:
        raise WrongNetwork(f"mempool file is for network id {net}, not {network.name} ({network.id})")
    txs = []
    for i in range(r.u32()):
        n = r.u32()
        if not 0 < n <= MAX_TX_SIZE:
            raise MempoolFileError(f"transaction {i} at offset {r.pos - 4}: length {n} outside 1..{MAX_TX_SIZE}")
        txs.append(r.take(n))
    dropped = []
    for i in range(r.u32()):
        txid = r.take(32)
        n = r.u8()
        code = r.take(n)
        if n > MAX_REASON or not _REASON.fullmatch(code):
            raise MempoolFileError(f"drop record {i} at offset {r.pos - n - 33}: bad reason code {code!r}")
        dropped.append((txid, code.decode()))
    if r.pos != len(body):
        raise TrailingBytes(f"mempool file: {len(body) - r.pos} bytes after the drop records")
    return MempoolFile(tuple(txs), tuple(dropped))


def load(path: Path, network: Network) -> Optional[MempoolFile]:
    """The saved mempool, or None: no file, or one that cannot be read (logged, and set aside as
    mempool.dat.bad so the next clean stop does not overwrite the evidence)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return decode(data, network)
    except DecodeError as e:
        bad = path.with_name(path.name + ".bad")
        path.replace(bad)
        log.error("mempool file unreadable (%s): set aside as %s; starting with an empty mempool", e, bad)
        return None


def save_logged(path: Path, network: Network, contents: MempoolFile) -> None:
    """save(), logging the outcome; a failure (a full disk, say) is logged, not raised: the node is stopping."""
    try:
        size = save(path, network, contents)
    except (OSError, ValueError) as e:
        log.error("mempool not saved (%s): its %d pending transactions are lost", e, len(contents.txs))
        return
    log.info("mempool saved", extra={"txs": len(contents.txs), "drop_reasons": len(contents.dropped),
                                     "bytes": size, "path": str(path)})


def save(path: Path, network: Network, contents: MempoolFile) -> int:
    """Write the file atomically (tmp + fsync + rename + directory fsync), mode 0600; returns its size."""
    data = encode(network, contents)
    write_atomic(path, data)
    return len(data)
