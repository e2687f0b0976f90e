"""Canonical codec: minimal CompactSize integers, strict bounded reads, no trailing bytes."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.codec import Reader, write_bytes, write_varint
from l2d.core.errors import DecodeError, NonMinimalVarint, OutOfRange, TrailingBytes, Truncated

# (value, its only valid encoding) at every width boundary
BOUNDARIES = [
    (0, "00"),
    (0xFC, "fc"),
    (0xFD, "fdfd00"),
    (0xFFFF, "fdffff"),
    (0x10000, "fe00000100"),
    (0xFFFFFFFF, "feffffffff"),
    (0x100000000, "ff0000000001000000"),
    (2**64 - 1, "ffffffffffffffffff"),
]


@pytest.mark.parametrize("n,enc", BOUNDARIES, ids=[hex(n) for n, _ in BOUNDARIES])
def test_varint_boundaries_round_trip(n: int, enc: str) -> None:
    raw = bytes.fromhex(enc)
    assert write_varint(n) == raw
    r = Reader(raw)
    assert r.varint() == n
    r.end()


@pytest.mark.parametrize("n,enc", BOUNDARIES, ids=[hex(n) for n, _ in BOUNDARIES])
def test_varint_every_truncation_raises_truncated(n: int, enc: str) -> None:
    raw = bytes.fromhex(enc)
    for cut in range(len(raw)):
        with pytest.raises(Truncated):
            Reader(raw[:cut]).varint()


@pytest.mark.parametrize("n", [-1, 2**64, 2**70])
def test_write_varint_out_of_range(n: int) -> None:
    with pytest.raises(OutOfRange):
        write_varint(n)


# (prefix byte, width, largest value that must use a shorter form)
WIDTHS = [(0xFD, 2, 0xFC), (0xFE, 4, 0xFFFF), (0xFF, 8, 0xFFFFFFFF)]


@pytest.mark.parametrize("prefix,width,shorter_max", WIDTHS, ids=["fd", "fe", "ff"])
def test_non_minimal_varints_rejected(prefix: int, width: int, shorter_max: int) -> None:
    for n in sorted({0, 1, 0xFC, shorter_max // 2, shorter_max}):
        raw = bytes((prefix,)) + n.to_bytes(width, "little")
        with pytest.raises(NonMinimalVarint):
            Reader(raw).varint()
    # the smallest value that needs this width is accepted
    raw = bytes((prefix,)) + (shorter_max + 1).to_bytes(width, "little")
    r = Reader(raw)
    assert r.varint() == shorter_max + 1
    r.end()


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_round_trip_property(n: int) -> None:
    raw = write_varint(n)
    assert len(raw) == (1 if n < 0xFD else 3 if n <= 0xFFFF else 5 if n <= 0xFFFFFFFF else 9)
    r = Reader(raw + b"tail")
    assert r.varint() == n
    assert r.take(4) == b"tail"
    r.end()


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=9))
def test_varint_decoding_is_canonical(raw: bytes) -> None:
    """Whatever decodes re-encodes to exactly the bytes consumed: one encoding per integer."""
    r = Reader(raw)
    try:
        n = r.varint()
    except DecodeError as e:
        assert isinstance(e, (Truncated, NonMinimalVarint))
        return
    assert write_varint(n) == raw[: r.pos]


@settings(deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_var_bytes_sequence_round_trip(items: list[bytes]) -> None:
    buf = b"".join(write_bytes(b) for b in items)
    r = Reader(buf)
    assert [r.var_bytes(300) for _ in items] == items
    assert r.remaining() == 0
    r.end()


def test_var_bytes_over_limit_is_out_of_range() -> None:
    raw = write_bytes(b"x" * 11)
    assert Reader(raw).var_bytes(11) == b"x" * 11
    with pytest.raises(OutOfRange):
        Reader(raw).var_bytes(10)
    # the length is checked before the body is read: a huge claimed length is OutOfRange, not Truncated
    with pytest.raises(OutOfRange):
        Reader(write_varint(2**64 - 1)).var_bytes(1024)


def test_var_bytes_truncated_body() -> None:
    raw = write_bytes(b"abcdef")
    for cut in range(len(raw)):
        with pytest.raises(Truncated):
            Reader(raw[:cut]).var_bytes(100)


def test_fixed_width_reads_big_endian_and_truncation() -> None:
    r = Reader(bytes.fromhex("01" "0203" "04050607" "08090a0b0c0d0e0f"))
    assert (r.u8(), r.u16(), r.u32(), r.u64()) == (1, 0x0203, 0x04050607, 0x08090A0B0C0D0E0F)
    r.end()
    for read, size in [(Reader.u8, 1), (Reader.u16, 2), (Reader.u32, 4), (Reader.u64, 8)]:
        for cut in range(size):
            with pytest.raises(Truncated):
                read(Reader(b"\xff" * cut))


def test_take_never_returns_short_data_and_does_not_advance_on_failure() -> None:
    r = Reader(b"abc")
    with pytest.raises(Truncated):
        r.take(4)
    assert r.pos == 0
    assert r.take(3) == b"abc"
    assert r.take(0) == b""
    with pytest.raises(Truncated):
        r.take(1)


def test_end_rejects_trailing_bytes() -> None:
    r = Reader(b"\x05\x06")
    assert r.u8() == 5
    with pytest.raises(TrailingBytes):
        r.end()
    assert r.u8() == 6
    r.end()
    Reader(b"").end()
    with pytest.raises(TrailingBytes):
        Reader(b"\0").end()


def test_errors_are_decode_errors() -> None:
    for cls in (Truncated, TrailingBytes, NonMinimalVarint, OutOfRange):
        assert issubclass(cls, DecodeError)
