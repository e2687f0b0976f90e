"""Model registry state transitions (docs/inference.md): models by content hash, and the workers' offers to serve
them.

State values (canonical, big-endian):
  model_key(weights_sha256)   = 0x10 || weights_sha256          -> ModelRecord
  offer_key(model, worker)    = 0x11 || H("l2d/model/offer", model || worker) -> OfferRecord (88 bytes)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from .codec import Reader, write_bytes
from .errors import DecodeError, InvalidTransaction
from .hashing import tagged_hash
from .model_tx import MAX_MODEL_NAME, MAX_MODEL_VERSION, ModelFormat, ModelRegister, ModelServe
from .state import Namespace, Rules, StateView, charge_sender
from .tx import Transaction
from .work import WorkerStatus, get_worker

_M = bytes((Namespace.MODEL,))
_O = bytes((Namespace.MODEL_OFFER,))
_MODEL_HEAD = struct.Struct(">32sBIQ")
_OFFER = struct.Struct(">32s32sIQQQ")


def model_key(weights_sha256: bytes) -> bytes:
    return _M + weights_sha256


def offer_key(model: bytes, worker: bytes) -> bytes:
    return _O + tagged_hash("l2d/model/offer", model + worker)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """Value under model_key: registrant 32 | format u8 | context_length u32 | height u64 | name | version."""

    registrant: bytes
    format: ModelFormat
    context_length: int
    height: int
    name: bytes
    version: bytes

    def encode(self) -> bytes:
        return (_MODEL_HEAD.pack(self.registrant, self.format, self.context_length, self.height)
                + write_bytes(self.name) + write_bytes(self.version))

    @classmethod
    def decode(cls, b: bytes) -> "ModelRecord":
        r = Reader(b, "model record")
        reg, fmt, ctx, height = _MODEL_HEAD.unpack(r.take(_MODEL_HEAD.size))
        name = r.var_bytes(MAX_MODEL_NAME)
        version = r.var_bytes(MAX_MODEL_VERSION)
        r.end()
        if fmt not in tuple(ModelFormat):
            raise DecodeError(f"model record format {fmt}")
        return cls(reg, ModelFormat(fmt), ctx, height, name, version)


@dataclass(frozen=True, slots=True)
class OfferRecord:
    """Value under offer_key: worker 32 | model 32 | context_length u32 | price_in u64 | price_out u64 (msat per 1k
    tokens) | height u64."""

    worker: bytes
    model: bytes
    context_length: int
    price_in_msat_per_1k: int
    price_out_msat_per_1k: int
    height: int

    def encode(self) -> bytes:
        return _OFFER.pack(self.worker, self.model, self.context_length, self.price_in_msat_per_1k,
                           self.price_out_msat_per_1k, self.height)

    @classmethod
    def decode(cls, b: bytes) -> "OfferRecord":
        if len(b) != _OFFER.size:
            raise DecodeError(f"model offer record of {len(b)} bytes, expected {_OFFER.size}")
        w, m, ctx, pin, pout, height = _OFFER.unpack(b)
        return cls(w, m, ctx, pin, pout, height)


def get_model(view: StateView, weights_sha256: bytes) -> Optional[ModelRecord]:
    raw = view.get(model_key(weights_sha256))
    return None if raw is None else ModelRecord.decode(raw)


def apply_register(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, ModelRegister)
    old = get_model(view, p.weights_sha256)
    if old is not None:
        raise InvalidTransaction(f"model {p.weights_sha256.hex()} is registered already, as "
                                 f"{old.name.decode()} {old.version.decode()} by {old.registrant.hex()}")
    charge_sender(view, tx, rules, 0)
    view.put(model_key(p.weights_sha256), ModelRecord(tx.sender, ModelFormat(p.format), p.context_length,
                                                      view.height, p.name, p.version).encode())


def apply_serve(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, ModelServe)
    w = get_worker(view, tx.sender)
    if w is None or w.status != WorkerStatus.ACTIVE:
        raise InvalidTransaction(f"{tx.sender.hex()} is not an active worker")
    m = get_model(view, p.model)
    if m is None:
        raise InvalidTransaction(f"model {p.model.hex()} is not registered")
    if p.context_length > m.context_length:
        raise InvalidTransaction(f"context length {p.context_length} exceeds the model's {m.context_length}")
    charge_sender(view, tx, rules, 0)
    view.put(offer_key(p.model, tx.sender), OfferRecord(tx.sender, p.model, p.context_length, p.price_in_msat_per_1k,
                                                        p.price_out_msat_per_1k, view.height).encode())
