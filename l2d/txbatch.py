"""The binary body of a batch submission (POST /api/l2/txs, application/octet-stream): each transaction as
`length u32 big-endian | its bytes`, back to back (docs/transaction-format.md, "Batches")."""
from __future__ import annotations

import struct
from typing import Any, Iterable, Iterator, Sequence

from .core.errors import DecodeError, OutOfRange
from .core.hashing import H_TXID
from .core.tx import MAX_TX_SIZE

MAX_BATCH = 1000  # transactions per request
BATCH_BYTES = 1 << 20  # a client's batch body at most (the daemon's default api.max_body_bytes)
_LEN = struct.Struct(">I")


def encode_batch(raws: Iterable[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(r)) + r for r in raws)


def batches(raws: Sequence[bytes]) -> Iterator[tuple[Sequence[bytes], bytes]]:
    """raws in batches of at most MAX_BATCH transactions and BATCH_BYTES bytes each, in order: (the transactions,
    their body). 1,000 transactions of the largest size would be 4.2 MB: a daemon with the default body limit
    answers 413."""
    start, size = 0, 0
    for i, r in enumerate(raws):
        if i - start == MAX_BATCH or (i > start and size + 4 + len(r) > BATCH_BYTES):
            yield raws[start:i], encode_batch(raws[start:i])
            start, size = i, 0
        size += 4 + len(r)
    if start < len(raws):
        yield raws[start:], encode_batch(raws[start:])


def unanswered(batch: Sequence[bytes], rest: Sequence[bytes], code: str, why: str) -> list[dict[str, Any]]:
    """The results of transactions whose batch got an error answer (or none: `why` says it) and of those after it,
    never sent: one {"txid", "error", "message"} each, as the daemon's refusals."""
    return ([{"txid": H_TXID(r).hex(), "error": code, "message": f"its batch was refused or not answered: {why}"}
             for r in batch] +
            [{"txid": H_TXID(r).hex(), "error": "not-sent", "message": f"an earlier batch failed: {why}"}
             for r in rest])


def decode_batch(body: bytes) -> list[bytes]:
    """The transactions of a batch body; DecodeError for a truncated entry, OutOfRange for an entry larger than a
    transaction can be, an empty entry or more than MAX_BATCH entries (each transaction is decoded later, alone)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(body):
        if len(out) == MAX_BATCH:
            raise OutOfRange(f"more than {MAX_BATCH} transactions in one batch")
        if pos + 4 > len(body):
            raise DecodeError(f"batch entry {len(out)}: {len(body) - pos} bytes left, a length needs 4")
        (n,) = _LEN.unpack_from(body, pos)
        if not 0 < n <= MAX_TX_SIZE:
            raise OutOfRange(f"batch entry {len(out)}: length {n} (1..{MAX_TX_SIZE})")
        if pos + 4 + n > len(body):
            raise DecodeError(f"batch entry {len(out)}: {n} bytes announced, {len(body) - pos - 4} left")
        out.append(body[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out
