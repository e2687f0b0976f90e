"""The mempool file: round trip, the byte layout of docs/mempool-file.md, strict decoding, atomic replacement."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from l2d import mempool_file as mf
from l2d.core.coin_tx import Transfer
from l2d.core.errors import DecodeError, TrailingBytes, Truncated, UnknownVersion, WrongNetwork
from l2d.core.params import LOCAL, REGTEST
from l2d.core.tx import MAX_TX_SIZE, sign

DOC = Path(__file__).resolve().parents[2] / "docs" / "mempool-file.md"


def contents(keys: Any) -> mf.MempoolFile:
    txs = tuple(sign(LOCAL, keys.secret(1), n, 1, Transfer(keys.pubkey(2), 5), b"\0" * 32).raw for n in range(3))
    return mf.MempoolFile(txs, ((b"\x11" * 32, "fee-below-floor"), (b"\x22" * 32, "stale-nonce")))


def seal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_round_trip(keys: Any) -> None:
    c = contents(keys)
    assert mf.decode(mf.encode(LOCAL, c), LOCAL) == c
    empty = mf.MempoolFile((), ())
    assert mf.decode(mf.encode(LOCAL, empty), LOCAL) == empty


def test_the_documented_example_byte_for_byte() -> None:
    """docs/mempool-file.md's example: no pending transaction, one drop reason."""
    example = re.search(r"```hex\n([0-9a-f\n]+)```", DOC.read_text())
    assert example is not None
    expected = bytes.fromhex(example.group(1).replace("\n", ""))
    assert mf.encode(LOCAL, mf.MempoolFile((), ((b"\xab" * 32, "fee-below-floor"),))) == expected


def test_layout(keys: Any) -> None:
    c = contents(keys)
    data = mf.encode(LOCAL, c)
    assert data[:8] == b"L2DMPOOL" and data[8:10] == bytes([1, LOCAL.id])
    assert struct.unpack(">I", data[10:14]) == (3,)
    assert struct.unpack(">I", data[14:18]) == (len(c.txs[0]),) and data[18:18 + len(c.txs[0])] == c.txs[0]
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()


@pytest.mark.parametrize("damage,error,match", [
    (lambda d: b"L2DSNAP\0" + d[8:], mf.MempoolFileError, "bad magic"),
    (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], mf.ChecksumMismatch, "checksum mismatch"),
    (lambda d: d[:-1], mf.ChecksumMismatch, "checksum mismatch"),
    (lambda d: d[:5], mf.MempoolFileError, "too short"),
    (lambda d: seal(d[:8] + b"\x02" + d[9:-32]), UnknownVersion, "version 2"),
    (lambda d: seal(d[:9] + bytes([REGTEST.id]) + d[10:-32]), WrongNetwork, "network id 2"),
    (lambda d: seal(d[:-32] + b"\0"), TrailingBytes, "1 bytes after the drop records"),
    (lambda d: seal(d[:14] + struct.pack(">I", MAX_TX_SIZE + 1) + d[18:-32]), mf.MempoolFileError,
     f"transaction 0 at offset 14: length {MAX_TX_SIZE + 1} outside 1..{MAX_TX_SIZE}"),
    (lambda d: seal(d[:10] + struct.pack(">I", 1) + struct.pack(">I", 0) + d[18:-32]), mf.MempoolFileError,
     "transaction 0 at offset 14: length 0"),
    (lambda d: seal(d[:-32 - 15] + b"FEE-below-floor"), mf.MempoolFileError, "bad reason code"),
    (lambda d: seal(d[:-32 - 12]), Truncated, "mempool file"),
])
def test_strict_decoding(keys: Any, damage: Any, error: type[Exception], match: str) -> None:
    c = mf.MempoolFile(contents(keys).txs, ((b"\x11" * 32, "fee-below-floor"),))
    with pytest.raises(error, match=match) as e:
        mf.decode(damage(mf.encode(LOCAL, c)), LOCAL)
    assert isinstance(e.value, DecodeError)


def test_unsaveable_contents_are_refused_before_writing(tmp_path: Path, keys: Any) -> None:
    path = tmp_path / mf.MEMPOOL_FILE
    for bad in (mf.MempoolFile((b"",), ()), mf.MempoolFile((), ((b"\x01" * 32, "Not A Code"),)),
                mf.MempoolFile((), ((b"\x01" * 31, "stale-nonce"),))):
        with pytest.raises(ValueError):
            mf.save(path, LOCAL, bad)
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic_and_private(tmp_path: Path, keys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / mf.MEMPOOL_FILE
    first = mf.MempoolFile((), ((b"\x11" * 32, "stale-nonce"),))
    assert mf.save(path, LOCAL, first) == path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600

    def failing_fsync(fd: int) -> None:  # the disk fails in the middle of writing the replacement
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        mf.save(path, LOCAL, contents(keys))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [mf.MEMPOOL_FILE]  # no temporary file left behind
    assert mf.decode(path.read_bytes(), LOCAL) == first  # the old file, whole


def test_load_sets_an_unreadable_file_aside(tmp_path: Path, keys: Any, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / mf.MEMPOOL_FILE
    assert mf.load(path, LOCAL) is None  # no file: nothing to reload
    mf.save(path, LOCAL, contents(keys))
    assert mf.load(path, LOCAL) == contents(keys)
    damaged = path.read_bytes()[:-1]
    path.write_bytes(damaged)
    assert mf.load(path, LOCAL) is None
    assert not path.exists() and (tmp_path / "mempool.dat.bad").read_bytes() == damaged
    assert any(r.levelno == logging.ERROR and r.getMessage().startswith("mempool file unreadable (mempool file "
                                                                        "checksum mismatch") for r in caplog.records)
