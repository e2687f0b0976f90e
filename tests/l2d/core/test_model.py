"""Model registry: payload codecs, and the register / serve transitions on a dict-backed ledger (every refusal
typed, nothing written)."""
from __future__ import annotations

import hashlib
from typing import Any

import pytest

from l2d.core.errors import InvalidTransaction, OutOfRange
from l2d.core.model import ModelRecord, OfferRecord, get_model, model_key, offer_key
from l2d.core.model_tx import MAX_CONTEXT, ModelFormat, ModelRegister, ModelServe
from l2d.core.payload import Payload
from l2d.core.state import StateView
from l2d.core.work_tx import WorkerCaps, WorkerExit, WorkerRegister
from tests.l2d.core.payload_checks import check_round_trip, check_strict
from tests.l2d.core.test_relay import OTHER, RELAY, RELAY2, Chain, pk

H = hashlib.sha256(b"SmolLM2-135M-Instruct.Q4_1.gguf bytes").digest()
CAPS = WorkerCaps(0, 0, 10, 500_000, 100, 2, b"eu", (b"smollm2",), b"127.0.0.1:9000")
REGISTRANT, WORKER = RELAY, RELAY2


def smol(h: bytes = H, ctx: int = 8192) -> ModelRegister:
    return ModelRegister(h, ModelFormat.GGUF, ctx, b"SmolLM2-135M-Instruct", b"Q4_1")


def sample_payloads() -> list[Payload]:
    return [smol(), ModelServe(H, 2048, 1_000, 4_000)]


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_signed_transactions(payload: Payload) -> None:
    check_round_trip(payload)


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_decoders_are_strict(payload: Payload) -> None:
    check_strict(payload)


@pytest.mark.parametrize("make, match", [
    (lambda: smol(h=b"\0" * 32), "weights hash"),
    (lambda: ModelRegister(H, 7, 10, b"m", b"1"), "model format 7"),
    (lambda: smol(ctx=0), "context length 0"),
    (lambda: smol(ctx=MAX_CONTEXT + 1), "context length"),
    (lambda: ModelRegister(H, 1, 10, b"-bad", b"1"), "model name"),
    (lambda: ModelRegister(H, 1, 10, b"m" * 65, b"1"), "model name"),
    (lambda: ModelRegister(H, 1, 10, b"m", b"v 1"), "model version"),
    (lambda: ModelServe(H, 10, -1, 0), "input token price"),
    (lambda: ModelServe(b"\0" * 32, 10, 1, 1), "served model"),
])
def test_invalid_payload_fields_are_refused(make: Any, match: str) -> None:
    with pytest.raises(OutOfRange, match=match):
        make()


def test_a_model_is_registered_once_by_its_hash_and_served_by_active_workers() -> None:
    c = Chain()
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 2048, 1, 1), match="not an active worker")
    c.apply(WORKER, WorkerRegister(1000, CAPS))
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 2048, 1, 1), match="is not registered")
    c.apply(REGISTRANT, smol())
    rec = get_model(StateView(c.state.get), H)
    assert rec == ModelRecord(pk(REGISTRANT), ModelFormat.GGUF, 8192, c.height - 1, b"SmolLM2-135M-Instruct",
                              b"Q4_1")
    assert c.state[model_key(H)] == rec.encode() and ModelRecord.decode(rec.encode()) == rec
    c.reject(InvalidTransaction, OTHER, smol(), match="registered already")  # the hash is the identity
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 8193, 1, 1), match="exceeds the model's 8192")
    c.apply(WORKER, ModelServe(H, 2048, 1_000, 4_000))
    offer = OfferRecord.decode(c.state[offer_key(H, pk(WORKER))])
    assert offer == OfferRecord(pk(WORKER), H, 2048, 1_000, 4_000, c.height - 1)
    c.apply(WORKER, ModelServe(H, 4096, 800, 3_000))  # a later offer replaces the earlier
    assert OfferRecord.decode(c.state[offer_key(H, pk(WORKER))]).price_in_msat_per_1k == 800
    c.apply(WORKER, WorkerExit())
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 2048, 1, 1), match="not an active worker")
