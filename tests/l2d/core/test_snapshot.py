"""Snapshots: round trip, strict header, and every kind of corruption named (with its record and offset)."""
from __future__ import annotations

import hashlib
import io
import os
import re
import struct
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core import snapshot as S
from l2d.core.block import genesis_header
from l2d.core.errors import DecodeError, OutOfRange, TrailingBytes, Truncated, UnknownVersion, WrongNetwork
from l2d.core.hashing import EMPTY_ROOT
from l2d.core.params import LOCAL, REGTEST
from l2d.core.state import SUPPLY_KEY, Account, Supply, account_key
from l2d.core.tree import MAX_VALUE, reference_root, root_of

HDR = struct.Struct(">8sBBQ32s32sQ")
BLOCK = bytes(range(32))


def key(i: int, ns: int = 1) -> bytes:
    return bytes((ns,)) + hashlib.sha256(b"k%d" % i).digest()


def make_items(n: int, vlen: int = 16) -> list[tuple[bytes, bytes]]:
    return sorted((key(i), hashlib.sha256(b"v%d" % i).digest()[:vlen] * (vlen // 32 + 1))
                  for i in range(n))


def varint(n: int) -> bytes:
    if n < 0xFD:
        return bytes((n,))
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    return b"\xfe" + n.to_bytes(4, "little")


def build(items: list[tuple[bytes, bytes]], *, root: Optional[bytes] = None, count: Optional[int] = None,
          magic: bytes = S.MAGIC, version: int = 1, net: int = LOCAL.id, height: int = 42,
          raw_records: Optional[bytes] = None) -> bytes:
    """An independent encoder (not the module's writer): any records, in any order, with a valid checksum."""
    root = root_of(dict(items).items()) if root is None else root
    body = HDR.pack(magic, version, net, height, BLOCK, root, len(items) if count is None else count)
    body += raw_records if raw_records is not None else b"".join(k + varint(len(v)) + v for k, v in items)
    return body + hashlib.sha256(body).digest()


def write(items: list[tuple[bytes, bytes]], height: int = 42) -> bytes:
    f = io.BytesIO()
    S.write_snapshot(f, LOCAL, height, BLOCK, root_of(items), iter(items), len(items))
    return f.getvalue()


def verify(data: bytes, **kw: object) -> S.SnapshotHeader:
    return S.verify_snapshot(io.BytesIO(data), **kw)  # type: ignore[arg-type]


def offsets(items: list[tuple[bytes, bytes]]) -> list[int]:
    out, at = [], S.HEADER_SIZE
    for k, v in items:
        out.append(at)
        at += len(k) + len(varint(len(v))) + len(v)
    return out


ITEMS = make_items(12)


# -- round trip ----------------------------------------------------------------------------------------------------
def test_round_trip_write_read_verify() -> None:
    data = write(ITEMS)
    assert data == build(ITEMS)  # the writer and the independent encoder agree byte for byte
    h = verify(data)
    assert (h.network_id, h.height, h.block_hash, h.record_count) == (LOCAL.id, 42, BLOCK, 12)
    assert h.state_root == reference_root(dict(ITEMS)) and h.network_name == "local"
    header, it = S.read_snapshot(io.BytesIO(data), LOCAL)
    assert header == h and list(it) == ITEMS
    assert len(data) == S.HEADER_SIZE + sum(33 + 1 + 16 for _ in ITEMS) + S.TRAILER_SIZE


def test_writer_returns_the_trailer_checksum() -> None:
    f = io.BytesIO()
    digest = S.write_snapshot(f, LOCAL, 1, BLOCK, root_of(ITEMS), ITEMS, len(ITEMS))
    data = f.getvalue()
    assert digest == data[-32:] == hashlib.sha256(data[:-32]).digest()


def test_empty_snapshot() -> None:
    data = write([])
    assert len(data) == S.HEADER_SIZE + 32
    assert verify(data, expect_root=EMPTY_ROOT).state_root == EMPTY_ROOT
    assert list(S.read_snapshot(io.BytesIO(data))[1]) == []


@pytest.mark.parametrize("chunk", [1, 100, 4096, S.CHUNK])
def test_every_value_length_form_across_buffer_boundaries(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(S, "CHUNK", chunk)
    lengths = [0, 1, 0xFC, 0xFD, 0xFFFF, 0x10000, 5, MAX_VALUE, 0, 300] * 3
    items = sorted((key(i), bytes([i]) * n) for i, n in enumerate(lengths))
    data = write(items)
    assert data == build(items)
    assert verify(data).record_count == len(items)
    assert list(S.read_snapshot(io.BytesIO(data))[1]) == items


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.binary(min_size=33, max_size=33), st.binary(max_size=40), max_size=40))
def test_verified_root_is_the_tree_root(d: dict[bytes, bytes]) -> None:
    items = sorted(d.items())
    assert verify(write(items)).state_root == reference_root(d)


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.largest = 0

    def read(self, n: Optional[int] = -1) -> bytes:
        if n is None or n < 0:
            raise AssertionError("unbounded read")
        self.largest = max(self.largest, n)
        return super().read(n)


def test_reads_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(S, "CHUNK", 512)
    f = CountingReader(write(make_items(3000)))
    S.verify_snapshot(f)
    assert 0 < f.largest <= 512 + S.MAX_RECORD_SIZE


# -- header --------------------------------------------------------------------------------------------------------
def test_header_round_trip_and_strictness() -> None:
    h = S.SnapshotHeader(REGTEST.id, 7, BLOCK, b"\x22" * 32, 3)
    b = h.encode()
    assert len(b) == S.HEADER_SIZE == 90 and b[:8] == b"L2DSNAP\0" and b[8] == 1 and b[9] == REGTEST.id
    assert S.SnapshotHeader.decode(b) == h == S.SnapshotHeader.decode(b, REGTEST)
    with pytest.raises(Truncated, match="needs 90 bytes"):
        S.SnapshotHeader.decode(b[:-1])
    with pytest.raises(TrailingBytes, match="1 trailing bytes"):
        S.SnapshotHeader.decode(b + b"\0")
    with pytest.raises(S.BadMagic, match="not an l2d snapshot"):
        S.SnapshotHeader.decode(b"X" + b[1:])
    with pytest.raises(UnknownVersion, match="format version 2 is not supported"):
        S.SnapshotHeader.decode(b[:8] + b"\x02" + b[9:])
    with pytest.raises(WrongNetwork, match=r"network regtest \(id 2\), expected local"):
        S.SnapshotHeader.decode(b, LOCAL)
    for bad in (dict(block_hash=b"\0" * 31), dict(height=-1), dict(record_count=1 << 64), dict(network_id=256)):
        with pytest.raises(OutOfRange):
            S.SnapshotHeader(**{**dict(network_id=1, height=0, block_hash=BLOCK, state_root=BLOCK,
                                       record_count=0), **bad})  # type: ignore[arg-type]


def test_header_errors_are_distinct_decode_errors() -> None:
    data = write(ITEMS)
    cases = {
        S.BadMagic: b"L2DSNAQ\0" + data[8:],
        S.SnapshotVersionError: data[:8] + b"\x09" + data[9:],
    }
    messages = set()
    for cls, bad in cases.items():
        with pytest.raises(cls) as e:
            verify(bad)
        assert isinstance(e.value, DecodeError) and not isinstance(e.value, S.SnapshotInvalid)
        messages.add(str(e.value))
    with pytest.raises(S.SnapshotWrongNetwork) as e:
        verify(data, network=REGTEST)
    messages.add(str(e.value))
    assert len(messages) == 3
    assert "magic" in " ".join(messages) and "version 9" in " ".join(messages) and "network local" in " ".join(messages)


def test_not_a_snapshot_at_all() -> None:
    with pytest.raises(S.BadMagic, match="starts with 0102"):
        verify(b"\x01\x02")
    with pytest.raises(S.SnapshotTruncated, match="empty file"):
        verify(b"")


# -- corruption ----------------------------------------------------------------------------------------------------
SMALL = make_items(5, vlen=3)


def flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    return data[:at] + bytes((data[at] ^ mask,)) + data[at + 1:]


def test_every_flipped_byte_is_caught() -> None:
    data = write(SMALL)
    offs = offsets(SMALL)
    length_bytes = {o + 33 for o in offs} | set(range(82, 90))  # value lengths and the record count
    for at in range(len(data)):
        for mask in (0x01, 0x80):
            bad = flip(data, at, mask)
            with pytest.raises(S.SnapshotError) as e:
                verify(bad)
            err = e.value
            if at < 8:
                assert isinstance(err, S.BadMagic)
            elif at == 8:
                assert isinstance(err, S.SnapshotVersionError)
            elif at in length_bytes:  # the parse goes astray: damage found by the checksum, or the end comes early
                assert isinstance(err, (S.ChecksumMismatch, S.SnapshotTruncated)), (at, err)
            else:  # header fields, keys, values, trailer
                assert isinstance(err, S.ChecksumMismatch), (at, err)
                assert "checksum mismatch" in str(err)


def test_flipped_value_byte_names_checksum_and_trailer_offset() -> None:
    data = write(SMALL)
    with pytest.raises(S.ChecksumMismatch, match=rf"trailer at offset {len(data) - 32}.*the records hash to "
                                                 rf"[0-9a-f]{{64}}, the header says {root_of(SMALL).hex()}"):
        verify(flip(data, offsets(SMALL)[2] + 35))


def test_flipped_trailer_byte() -> None:
    data = write(SMALL)
    with pytest.raises(S.ChecksumMismatch, match="checksum mismatch.*the records hash to the header's state root"):
        verify(flip(data, len(data) - 1))


def test_forged_header_root_with_valid_checksum_is_a_root_mismatch() -> None:
    with pytest.raises(S.RootMismatch, match="header says " + "ab" * 32):
        verify(build(SMALL, root=b"\xab" * 32))


def test_expect_root() -> None:
    data = write(SMALL)
    root = root_of(SMALL)
    assert verify(data, expect_root=root).state_root == root
    with pytest.raises(S.RootMismatch, match="not the expected root " + "00" * 32):
        verify(data, expect_root=b"\0" * 32)
    with pytest.raises(OutOfRange):
        verify(data, expect_root=b"\0" * 31)


def test_reordered_records_with_recomputed_checksum_fail_the_ordering_check() -> None:
    swapped = SMALL[:2] + [SMALL[3], SMALL[2]] + SMALL[4:]
    data = build(swapped, root=root_of(SMALL))
    off = offsets(swapped)[3]
    for read_only in (False, True):
        with pytest.raises(S.KeyOrderError) as e:
            if read_only:
                list(S.read_snapshot(io.BytesIO(data))[1])
            else:
                verify(data)
        assert not isinstance(e.value, S.DuplicateKey) and not isinstance(e.value, DecodeError)
        assert (e.value.record, e.value.offset) == (3, off)
        assert str(e.value).startswith(f"record 3 at offset {off}: key out of order {SMALL[2][0].hex()}")


def test_reordered_records_without_new_checksum_report_damage_and_the_first_inconsistency() -> None:
    data = write(SMALL)
    offs = offsets(SMALL)
    a, b = data[offs[2]:offs[3]], data[offs[3]:offs[4]]
    bad = data[:offs[2]] + b + a + data[offs[4]:]
    with pytest.raises(S.ChecksumMismatch, match=r"damaged \(first inconsistency: record 3 at offset \d+: key out"):
        verify(bad)


def test_duplicated_record_with_recomputed_checksum_and_count() -> None:
    dup = SMALL[:3] + [SMALL[2]] + SMALL[3:]
    data = build(dup, root=root_of(SMALL))
    for read_only in (False, True):
        with pytest.raises(S.DuplicateKey, match=rf"record 3 at offset {offsets(dup)[3]}: duplicate key"):
            if read_only:
                list(S.read_snapshot(io.BytesIO(data))[1])
            else:
                verify(data)


@pytest.mark.parametrize("cut", [1, 5, 8, 50, 89, 90, 91, 123, 124, 150, -33, -32, -31, -1])
def test_truncated_anywhere(cut: int) -> None:
    data = write(SMALL)
    end = cut if cut > 0 else len(data) + cut
    with pytest.raises(S.SnapshotTruncated) as e:
        verify(data[:end])
    assert isinstance(e.value, Truncated) and isinstance(e.value, DecodeError)
    assert "truncated" in str(e.value) or "needs 90 bytes" in str(e.value)
    if end >= S.HEADER_SIZE:
        assert e.value.offset is not None and e.value.offset <= end
    with pytest.raises(S.SnapshotTruncated):
        if end >= S.HEADER_SIZE:
            list(S.read_snapshot(io.BytesIO(data[:end]))[1])
        else:
            S.read_snapshot(io.BytesIO(data[:end]))


def test_truncated_inside_a_record_names_it() -> None:
    data = write(SMALL)
    offs = offsets(SMALL)
    with pytest.raises(S.SnapshotTruncated, match=rf"record 4 at offset {offs[4]}: file ends"):
        verify(data[:offs[4] + 10])
    with pytest.raises(S.SnapshotTruncated, match=rf"trailer at offset {len(data) - 32}: needs 32 bytes"):
        verify(data[:-5])


def test_trailing_garbage() -> None:
    data = write(SMALL)
    with pytest.raises(S.SnapshotTrailingBytes, match=rf"7 trailing bytes after the trailer at offset {len(data)}"):
        verify(data + b"garbage")
    with pytest.raises(S.SnapshotTrailingBytes):
        list(S.read_snapshot(io.BytesIO(data + b"\0"))[1])


def test_count_mismatch() -> None:
    root = root_of(SMALL)
    with pytest.raises(S.SnapshotTruncated, match="record 5 at offset .*header says 6 records"):
        verify(build(SMALL, root=root, count=6))
    with pytest.raises(S.ChecksumMismatch, match=r"record count \(4\) may be wrong"):
        verify(build(SMALL, root=root, count=4))


def test_bad_record_lengths() -> None:
    k = key(1)
    nonminimal = k + b"\xfd\x03\x00" + b"abc"
    with pytest.raises(S.NonMinimalLength, match="record 0 at offset 90: value length 3 is not minimally encoded"):
        verify(build([], root=EMPTY_ROOT, count=1, raw_records=nonminimal))
    oversize = k + b"\xfe" + (MAX_VALUE + 1).to_bytes(4, "little") + b"\0" * (MAX_VALUE + 1)
    with pytest.raises(S.BadRecordLength, match=f"exceeds the limit {MAX_VALUE}"):
        verify(build([], root=EMPTY_ROOT, count=1, raw_records=oversize))
    damaged = bytearray(build([], root=EMPTY_ROOT, count=1, raw_records=nonminimal))
    damaged[-1] ^= 1
    with pytest.raises(S.ChecksumMismatch, match="first inconsistency: record 0 .* not minimally encoded"):
        verify(bytes(damaged))


class Trickle(io.RawIOBase):
    """A pipe-like stream: short reads of at most 777 bytes, no seek."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        n = min(len(b), 777, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_stream_with_short_reads_and_no_seek() -> None:
    data = write(make_items(200))
    assert S.verify_snapshot(Trickle(data)).record_count == 200  # type: ignore[arg-type]
    with pytest.raises(S.SnapshotTrailingBytes):
        S.verify_snapshot(Trickle(data + b"x" * 3000))  # type: ignore[arg-type]
    with pytest.raises(S.ChecksumMismatch):
        S.verify_snapshot(Trickle(flip(data, 100)))  # type: ignore[arg-type]


# -- writer --------------------------------------------------------------------------------------------------------
def test_writer_refuses_bad_input() -> None:
    root = root_of(SMALL)
    cases = [
        (SMALL, 4, S.SnapshotWriteError, "more than the 4 records"),
        (SMALL, 6, S.SnapshotWriteError, "5 records given, 6 announced"),
        ([SMALL[1], SMALL[0]], 2, S.SnapshotWriteError, "record 1: key out of order"),
        ([SMALL[0], SMALL[0]], 2, S.SnapshotWriteError, "record 1: duplicate key"),
        ([(b"\x01" * 32, b"")], 1, OutOfRange, "key is 32 bytes"),
        ([(key(0), b"\0" * (MAX_VALUE + 1))], 1, OutOfRange, "the limit is"),
    ]
    for items, count, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            S.write_snapshot(io.BytesIO(), LOCAL, 1, BLOCK, root, items, count)
    with pytest.raises(S.RootMismatch):
        S.write_snapshot(io.BytesIO(), LOCAL, 1, BLOCK, b"\0" * 32, SMALL, 5, verify_root=True)
    f = io.BytesIO()
    S.write_snapshot(f, LOCAL, 1, BLOCK, root, SMALL, 5, verify_root=True)
    assert verify(f.getvalue()).state_root == root


def test_write_snapshot_file_is_atomic_and_named(tmp_path: Path) -> None:
    root = root_of(ITEMS)
    p = S.write_snapshot_file(tmp_path, REGTEST, 1234, BLOCK, root, ITEMS, len(ITEMS))
    assert p == tmp_path / "snapshot-regtest-000000001234.l2snap" == tmp_path / S.snapshot_name(REGTEST, 1234)
    assert os.listdir(tmp_path) == [p.name]
    with open(p, "rb") as f:
        assert S.verify_snapshot(f, REGTEST, root).height == 1234
    # Same snapshot again: the existing file is kept as it is (never rewritten).
    before = p.stat()
    assert S.write_snapshot_file(tmp_path, REGTEST, 1234, BLOCK, root, ITEMS, len(ITEMS)) == p
    after = p.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    # A different snapshot under the same name is refused and leaves everything in place.
    with pytest.raises(S.SnapshotExists):
        S.write_snapshot_file(tmp_path, REGTEST, 1234, b"\x99" * 32, root, ITEMS, len(ITEMS))
    assert os.listdir(tmp_path) == [p.name] and p.stat().st_mtime_ns == before.st_mtime_ns


def test_write_snapshot_file_leaves_nothing_on_error(tmp_path: Path) -> None:
    def items():  # type: ignore[no-untyped-def]
        yield from SMALL[:3]
        raise RuntimeError("database went away")

    with pytest.raises(RuntimeError):
        S.write_snapshot_file(tmp_path, LOCAL, 5, BLOCK, root_of(SMALL), items(), 5)
    with pytest.raises(S.SnapshotWriteError):
        S.write_snapshot_file(tmp_path, LOCAL, 5, BLOCK, root_of(SMALL), SMALL, 6)
    assert os.listdir(tmp_path) == []


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    for h in (3, 10, 7, 1000, 20):
        S.write_snapshot_file(tmp_path, LOCAL, h, BLOCK, root_of(SMALL), SMALL, 5)
    S.write_snapshot_file(tmp_path, REGTEST, 1, BLOCK, root_of(SMALL), SMALL, 5)
    (tmp_path / "notes.txt").write_text("not a snapshot")
    (tmp_path / ".snapshot-local-000000000099.l2snap.x1.tmp").write_bytes(b"partial")
    assert [h for h, _ in S.list_snapshots(tmp_path, LOCAL)] == [3, 7, 10, 20, 1000]
    removed = S.prune_snapshots(tmp_path, 2, LOCAL)
    assert sorted(p.name for p in removed) == [S.snapshot_name(LOCAL, h) for h in (3, 7, 10)]
    assert sorted(os.listdir(tmp_path)) == sorted([
        ".snapshot-local-000000000099.l2snap.x1.tmp", "notes.txt", S.snapshot_name(LOCAL, 20),
        S.snapshot_name(LOCAL, 1000), S.snapshot_name(REGTEST, 1)])
    assert S.prune_snapshots(tmp_path, 2, LOCAL) == []
    assert [p.name for p in S.prune_snapshots(tmp_path, 2)] == [S.snapshot_name(REGTEST, 1)]
    with pytest.raises(ValueError):
        S.prune_snapshots(tmp_path, 0)


def test_docs_worked_example() -> None:
    """docs/snapshot-format.md's example file is what the writer produces, and it verifies."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "snapshot-format.md").read_text()
    (hex_file,) = re.findall(r"^([0-9a-f]{400,})$", doc, re.M)
    data = bytes.fromhex(hex_file)
    pk = bytes.fromhex("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    items = sorted([(SUPPLY_KEY, Supply(1000, 0, 0).encode()), (account_key(pk), Account(1000, 0).encode())])
    root = root_of(items)
    f = io.BytesIO()
    S.write_snapshot(f, LOCAL, 0, genesis_header(LOCAL, 0, root).hash, root, items, 2)
    assert f.getvalue() == data and len(data) == 230
    assert verify(data, network=LOCAL).state_root.hex() in doc
