"""GET /api/models on a real in-process node: a model registered by its weights hash through POST /api/l2/tx, a
worker's offer listed while the worker is ACTIVE and gone once it exits."""
from __future__ import annotations

import hashlib
from typing import Any

from l2d.core.model import completion_key
from l2d.core.model_tx import DEFAULT_SPLIT, Completion, ModelFormat, ModelRegister, ModelServe, sign_result
from l2d.core.params import LOCAL
from l2d.core.session_tx import SessionOpen
from l2d.core.tree import Proof, verify_proof
from l2d.core.tx import sign
from l2d.core.work_tx import WorkerCaps, WorkerExit, WorkerRegister
from tests.l2d.api.test_ledger import Client, expect_error, get_json, post_tx, pubkey, secret, wait_committed

H = hashlib.sha256(b"a model's weights").digest()
CAPS = WorkerCaps(0, 0, 10, 500_000, 100, 2, b"eu", (b"smollm2",), b"127.0.0.1:9000")


async def send(c: Client, wait_until: Any, n: int, payload: Any) -> None:
    nonce = int((await get_json(c, f"/api/l2/accounts/{pubkey(n).hex()}"))["nonce"])
    t = sign(LOCAL, secret(n), nonce, 1, payload, b"\0" * 32)
    await post_tx(c, t)
    await wait_committed(c, wait_until, t.txid.hex())


async def test_registered_models_and_the_offers_of_active_workers(client: Client, wait_until: Any) -> None:
    assert (await get_json(client, "/api/models"))["models"] == []
    await send(client, wait_until, 1, ModelRegister(H, ModelFormat.GGUF, 8192, b"SmolLM2-135M-Instruct", b"Q4_1"))
    await send(client, wait_until, 2, WorkerRegister(1000, CAPS))
    await send(client, wait_until, 2, ModelServe(H, 2048, 1_000, 4_000))
    [m] = (await get_json(client, "/api/models"))["models"]
    assert {k: m[k] for k in ("weights_sha256", "name", "version", "format", "context_length", "registrant")} == {
        "weights_sha256": H.hex(), "name": "SmolLM2-135M-Instruct", "version": "Q4_1", "format": "gguf",
        "context_length": 8192, "registrant": pubkey(1).hex()}
    [o] = m["offers"]
    assert (o["worker"], o["context_length"], o["price_in_msat_per_1k"], o["price_out_msat_per_1k"]) == (
        pubkey(2).hex(), 2048, 1_000, 4_000)
    await send(client, wait_until, 2, WorkerExit())
    [m] = (await get_json(client, "/api/models"))["models"]
    assert m["offers"] == []  # an exited worker serves nothing


async def test_a_recorded_completion_is_served_with_its_state_proof(client: Client, wait_until: Any) -> None:
    await send(client, wait_until, 1, ModelRegister(H, ModelFormat.GGUF, 8192, b"SmolLM2-135M-Instruct", b"Q4_1"))
    await send(client, wait_until, 2, WorkerRegister(1000, CAPS))
    await send(client, wait_until, 2, ModelServe(H, 2048, 100_000, 400_000))
    nonce = int((await get_json(client, f"/api/l2/accounts/{pubkey(3).hex()}"))["nonce"])
    opened = sign(LOCAL, secret(3), nonce, 1, SessionOpen(pubkey(1), pubkey(4), 1_000, 1, 1, 10**6), b"\0" * 32)
    await post_tx(client, opened)
    await wait_committed(client, wait_until, opened.txid.hex())
    c = Completion(opened.txid, pubkey(2), H, b"\0" * 32, b"\1" * 32, b"\2" * 32, b"\3" * 32, 30, 200, 83_000, 0,
                   0, 0, *DEFAULT_SPLIT, sign_result(secret(2), LOCAL.id, H, b"\1" * 32, b"\2" * 32, b"\3" * 32, 30,
                                                     200, 0, 0, 0))
    nonce = int((await get_json(client, f"/api/l2/accounts/{pubkey(1).hex()}"))["nonce"])
    rec = sign(LOCAL, secret(1), nonce, 1, c, b"\0" * 32)
    await post_tx(client, rec)
    await wait_committed(client, wait_until, rec.txid.hex())
    got = await get_json(client, f"/api/completions/{rec.txid.hex()}")
    assert (got["status"], got["worker"], got["prompt_tokens"], got["completion_tokens"], got["cost_msat"]) == (
        "RECORDED", pubkey(2).hex(), 30, 200, 83_000)
    assert got["paid_sat"] == {"worker": 41, "verifier": 0, "treasury": 8, "burned": 34}
    proof = Proof.decode(bytes.fromhex(got["proof"]))
    assert proof.key == completion_key(rec.txid) and verify_proof(bytes.fromhex(got["state_root"]), proof) == \
        bytes.fromhex(got["value"])
    await expect_error(client, "GET", f"/api/completions/{'00' * 32}", 404, "not-found")
    await expect_error(client, "GET", "/api/completions/zz", 400, "malformed")
