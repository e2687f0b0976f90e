"""Model registry state transitions (docs/inference.md): models by content hash, and the workers' offers to serve
them.

State values (canonical, big-endian):
  model_key(weights_sha256)   = 0x10 || weights_sha256          -> ModelRecord
  offer_key(model, worker)    = 0x11 || H("l2d/model/offer", model || worker) -> OfferRecord (88 bytes)
  completion_key(id)          = 0x12 || completion id (the recording txid) -> CompletionRecord (404 bytes)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Optional

from .codec import Reader, write_bytes

from .errors import DecodeError, InvalidTransaction, Unauthorized
from .hashing import tagged_hash
from .model_tx import (MAX_MODEL_NAME, MAX_MODEL_VERSION, Completion, ModelFormat, ModelRegister, ModelServe,
                       split_sat, token_cost_msat)
from .session import ReceiptOverEscrow, SessionExpired, open_session, session_key
from .session_tx import MSAT
from .state import Namespace, Rules, StateView, add_locked, charge_sender
from .tx import Transaction, xonly_key
from .work import WorkerStatus, burn_supply, check_credits, credit_all, get_worker

_M = bytes((Namespace.MODEL,))
_O = bytes((Namespace.MODEL_OFFER,))
_MODEL_HEAD = struct.Struct(">32sBIQ")
_OFFER = struct.Struct(">32s32sIQQQ")
_C = bytes((Namespace.COMPLETION,))
_COMPLETION_HEAD = struct.Struct(">BQ32sQQQQQ")


def model_key(weights_sha256: bytes) -> bytes:
    return _M + weights_sha256


def offer_key(model: bytes, worker: bytes) -> bytes:
    return _O + tagged_hash("l2d/model/offer", model + worker)


def completion_key(completion_id: bytes) -> bytes:
    return _C + completion_id


class CompletionStatus(IntEnum):
    RECORDED = 1  # billed and paid out; open to audit


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


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """Value under completion_key: status u8 | height u64 | gateway 32 | units_after u64 (the session's billed msat
    after it) | worker_sat u64 | verifier_sat u64 | treasury_sat u64 | burned_sat u64 (what its recording paid out)
    | the Completion payload (323 bytes)."""

    status: CompletionStatus
    height: int
    gateway: bytes
    units_after: int
    worker_sat: int
    verifier_sat: int
    treasury_sat: int
    burned_sat: int
    completion: Completion

    SIZE = _COMPLETION_HEAD.size + 323

    def encode(self) -> bytes:
        return _COMPLETION_HEAD.pack(self.status, self.height, self.gateway, self.units_after, self.worker_sat,
                                     self.verifier_sat, self.treasury_sat, self.burned_sat) + self.completion.encode()

    @classmethod
    def decode(cls, b: bytes) -> "CompletionRecord":
        if len(b) != cls.SIZE:
            raise DecodeError(f"completion record of {len(b)} bytes, expected {cls.SIZE}")
        status, height, gateway, units, worker, verifier, treasury, burned = _COMPLETION_HEAD.unpack(
            b[:_COMPLETION_HEAD.size])
        if status not in tuple(CompletionStatus):
            raise DecodeError(f"completion record status {status}")
        return cls(CompletionStatus(status), height, gateway, units, worker, verifier, treasury, burned,
                   Completion.decode(b[_COMPLETION_HEAD.size:]))


class BadResultSignature(InvalidTransaction):
    """A completion's fingerprint is not signed by the worker it names."""

    reason = "bad-result-signature"


def get_completion(view: StateView, completion_id: bytes) -> Optional[CompletionRecord]:
    raw = view.get(completion_key(completion_id))
    return None if raw is None else CompletionRecord.decode(raw)


def apply_completion(view: StateView, tx: Transaction, rules: Rules) -> None:
    """Bill a completion to its paid session (the sender is the session's server) and pay the split out."""
    p = tx.payload
    assert isinstance(p, Completion)
    rec = open_session(view, p.session_id)
    if tx.sender != rec.server:
        raise Unauthorized(f"only the session's server {rec.server.hex()} bills completions to it")
    if view.height > rec.expiry_height:
        raise SessionExpired(f"the session expired at L2 height {rec.expiry_height}; this is {view.height}")
    if (rec.price_msat, rec.unit) != (1, 1):
        raise InvalidTransaction(f"completions bill msat: the session must be opened at 1 msat per unit, not "
                                 f"{rec.price_msat} msat per {rec.unit}")
    raw = view.get(offer_key(p.model, p.worker))
    if raw is None:
        raise InvalidTransaction(f"worker {p.worker.hex()} offers no model {p.model.hex()}")
    offer = OfferRecord.decode(raw)
    if p.fingerprint != bytes(32) and not xonly_key(p.worker).verify(p.worker_sig, p.result_digest(rules.network.id)):
        raise BadResultSignature(f"the result is not signed by worker {p.worker.hex()}")
    if p.n_prompt + p.n_output > offer.context_length:
        raise InvalidTransaction(f"{p.n_prompt} + {p.n_output} tokens exceed the offer's context length "
                                 f"{offer.context_length}")
    cost = token_cost_msat(p.n_prompt, p.n_output, offer.price_in_msat_per_1k, offer.price_out_msat_per_1k)
    if p.cost_msat != cost:
        raise InvalidTransaction(f"cost {p.cost_msat} msat, the offer's prices make it {cost} msat")
    units = rec.units + cost
    settled = units // MSAT
    if settled > rec.deposit_sat:
        raise ReceiptOverEscrow(f"billing {cost} msat brings the session to {units} msat; its deposit is "
                                f"{rec.deposit_sat} sat")
    if get_completion(view, tx.txid) is not None:  # unreachable while txids are unique; kept as the invariant
        raise InvalidTransaction(f"completion {tx.txid.hex()} is recorded already")
    w, v, t, burned = split_sat(settled - rec.settled_sat, *p.split)
    payouts = [(p.worker, w), (p.verifier, v), (tx.sender, t)]
    check_credits(view, payouts)
    charge_sender(view, tx, rules, 0)
    add_locked(view, rec.settled_sat - settled)
    credit_all(view, payouts)
    burn_supply(view, burned)
    view.put(session_key(p.session_id), replace(rec, seq=rec.seq + 1, settled_sat=settled, units=units,
                                                receipt_id=tx.txid).encode())
    view.put(completion_key(tx.txid), CompletionRecord(CompletionStatus.RECORDED, view.height, tx.sender, units,
                                                       w, v, t, burned, p).encode())
