"""Model registry payloads (docs/inference.md): a model recorded by the SHA-256 of its weights file, and a worker's
offer to serve one at a price per 1,000 input and output tokens.

Byte layouts (big-endian integers):
    ModelRegister  weights_sha256 32 | format u8 | context_length u32 | name (CompactSize + 1..64 bytes)
                   | version (CompactSize + 1..32 bytes)                                                   (40..135)
    ModelServe     model 32 (a registered weights_sha256) | context_length u32 | price_in_msat_per_1k u64
                   | price_out_msat_per_1k u64                                                                 (52)
The registrant is the transaction's sender: its BIP340 signature is the creator's signature over the record.
"""
from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from .codec import Reader, write_bytes
from .errors import OutOfRange
from .params import MAX_MONEY
from .payload import TxType

MAX_MODEL_NAME = 64
MAX_MODEL_VERSION = 32
MAX_CONTEXT = 1 << 24
MAX_TOKEN_PRICE_MSAT = MAX_MONEY * 1000
_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]*")
_REGISTER = struct.Struct(">32sBI")
_SERVE = struct.Struct(">32sIQQ")


class ModelFormat(enum.IntEnum):
    GGUF = 1
    SAFETENSORS = 2


def _b32(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != 32 or value == b"\0" * 32:
        raise OutOfRange(f"{what} must be 32 bytes, not all zero")


def _label(value: bytes, limit: int, what: str) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit or not _NAME.fullmatch(value):
        raise OutOfRange(f"{what} {value!r} must be 1..{limit} bytes of [A-Za-z0-9._-], starting alphanumeric")


def _context(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONTEXT:
        raise OutOfRange(f"context length {value!r} is outside 1..{MAX_CONTEXT}")


@dataclass(frozen=True, slots=True)
class ModelRegister:
    """Record a model: the SHA-256 of its weights file (its identity: content addressing), its format, context
    length, name and version."""

    TYPE: ClassVar[TxType] = TxType.MODEL_REGISTER
    FEELESS: ClassVar[bool] = False
    weights_sha256: bytes
    format: int
    context_length: int
    name: bytes
    version: bytes

    def __post_init__(self) -> None:
        _b32(self.weights_sha256, "model weights hash")
        if self.format not in tuple(ModelFormat):
            raise OutOfRange(f"model format {self.format!r} is not one of {[int(f) for f in ModelFormat]}")
        _context(self.context_length)
        _label(self.name, MAX_MODEL_NAME, "model name")
        _label(self.version, MAX_MODEL_VERSION, "model version")

    def encode(self) -> bytes:
        return (_REGISTER.pack(self.weights_sha256, self.format, self.context_length) + write_bytes(self.name)
                + write_bytes(self.version))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "ModelRegister":
        r = Reader(b, "model register payload")
        h, fmt, ctx = _REGISTER.unpack(r.take(_REGISTER.size))
        name = r.var_bytes(MAX_MODEL_NAME)
        version = r.var_bytes(MAX_MODEL_VERSION)
        r.end()
        return cls(h, fmt, ctx, name, version)


@dataclass(frozen=True, slots=True)
class ModelServe:
    """A registered worker (the sender) serves a registered model up to context_length tokens, at these prices per
    1,000 input and output tokens; a later ModelServe of the same model replaces the offer."""

    TYPE: ClassVar[TxType] = TxType.MODEL_SERVE
    FEELESS: ClassVar[bool] = False
    model: bytes
    context_length: int
    price_in_msat_per_1k: int
    price_out_msat_per_1k: int

    def __post_init__(self) -> None:
        _b32(self.model, "served model")
        _context(self.context_length)
        for what, v in (("input", self.price_in_msat_per_1k), ("output", self.price_out_msat_per_1k)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKEN_PRICE_MSAT:
                raise OutOfRange(f"{what} token price {v!r} is outside 0..{MAX_TOKEN_PRICE_MSAT} msat per 1k")

    def encode(self) -> bytes:
        return _SERVE.pack(self.model, self.context_length, self.price_in_msat_per_1k, self.price_out_msat_per_1k)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "ModelServe":
        r = Reader(b, "model serve payload")
        v = _SERVE.unpack(r.take(_SERVE.size))
        r.end()
        return cls(v[0], v[1], v[2], v[3])
