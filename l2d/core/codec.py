"""Canonical binary codec: strict bounded reader, writer helpers, minimal CompactSize integers."""
from __future__ import annotations

import struct

from .errors import NonMinimalVarint, OutOfRange, TrailingBytes, Truncated

U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def write_varint(n: int) -> bytes:
    """Bitcoin CompactSize, always in its shortest form."""
    if n < 0:
        raise OutOfRange(f"varint {n} is negative")
    if n < 0xFD:
        return bytes((n,))
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    if n <= 0xFFFFFFFFFFFFFFFF:
        return b"\xff" + n.to_bytes(8, "little")
    raise OutOfRange(f"varint {n} exceeds 64 bits")


def write_bytes(b: bytes) -> bytes:
    """Length-prefixed byte string."""
    return write_varint(len(b)) + b


class Reader:
    """Bounded reader over one buffer; every read raises Truncated instead of returning short data."""

    __slots__ = ("buf", "pos", "what")

    def __init__(self, buf: bytes, what: str = "data") -> None:
        self.buf = buf
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise Truncated(f"{self.what}: needs {n} bytes at offset {self.pos}, only {len(self.buf) - self.pos} left")
        b = self.buf[self.pos:end]
        self.pos = end
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        v: int = U16.unpack(self.take(2))[0]
        return v

    def u32(self) -> int:
        v: int = U32.unpack(self.take(4))[0]
        return v

    def u64(self) -> int:
        v: int = U64.unpack(self.take(8))[0]
        return v

    def varint(self) -> int:
        first = self.u8()
        if first < 0xFD:
            return first
        size = {0xFD: 2, 0xFE: 4, 0xFF: 8}[first]
        n = int.from_bytes(self.take(size), "little")
        if n < (0xFD, 0x10000, 0x100000000)[size.bit_length() - 2]:
            raise NonMinimalVarint(f"{self.what}: varint {n} at offset {self.pos - size - 1} is not minimally encoded")
        return n

    def var_bytes(self, max_len: int) -> bytes:
        n = self.varint()
        if n > max_len:
            raise OutOfRange(f"{self.what}: length {n} exceeds the limit {max_len}")
        return self.take(n)

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise TrailingBytes(f"{self.what}: {len(self.buf) - self.pos} trailing bytes after offset {self.pos}")
