"""Routes of the model registry (docs/inference.md): registered models by content hash, the workers' offers, and the
completions the gateways recorded."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core.model import ChallengeRecord, CompletionRecord, ModelRecord, OfferRecord, challenge_key, completion_key
from ..core.model_tx import Sampling
from ..core.state import Namespace
from ..core.work import WorkerRecord, WorkerStatus, worker_key
from .deps import CHAIN
from .http import ApiError, path_hex32


async def models(request: web.Request) -> web.Response:
    """GET /api/models: every registered model, each with the offers of the workers serving it that are ACTIVE."""
    chain = request.app[CHAIN]
    offers: dict[bytes, list[dict[str, Any]]] = {}
    for _, v in chain.records(bytes((Namespace.MODEL_OFFER,))):
        o = OfferRecord.decode(bytes(v))
        raw = chain.get_state(worker_key(o.worker))
        w = None if raw is None else WorkerRecord.decode(raw)
        if w is None or w.status != WorkerStatus.ACTIVE:
            continue
        offers.setdefault(o.model, []).append({
            "worker": o.worker.hex(), "endpoint": w.caps.endpoint.decode(), "region": w.caps.region.decode(),
            "reputation_ppm": w.reputation_ppm, "green_ppm": w.caps.green_ppm, "stake_sat": w.stake_sat,
            "context_length": o.context_length,
            "price_in_msat_per_1k": o.price_in_msat_per_1k, "price_out_msat_per_1k": o.price_out_msat_per_1k,
            "height": o.height})
    out = []
    for k, v in chain.records(bytes((Namespace.MODEL,))):
        m = ModelRecord.decode(bytes(v))
        h = bytes(k[1:])
        out.append({"weights_sha256": h.hex(), "name": m.name.decode(), "version": m.version.decode(),
                    "format": m.format.name.lower(), "context_length": m.context_length,
                    "registrant": m.registrant.hex(), "height": m.height,
                    "offers": sorted(offers.get(h, []), key=lambda o: o["worker"])})
    return web.json_response({"models": out, "height": chain.tip.height})


def completion_json(rec: CompletionRecord) -> dict[str, Any]:
    c = rec.completion
    return {"status": rec.status.name, "height": rec.height, "gateway": rec.gateway.hex(),
            "session_id": c.session_id.hex(), "worker": c.worker.hex(), "model": c.model.hex(),
            "prompt_hash": c.prompt_hash.hex(), "output_hash": c.output_hash.hex(), "fingerprint": c.fingerprint.hex(),
            "prompt_tokens": c.n_prompt, "completion_tokens": c.n_output, "cost_msat": c.cost_msat,
            "sampling": Sampling(c.sampling).name.lower(), "seed": c.seed, "temperature_milli": c.temperature_milli,
            "split_bp": {"worker": c.worker_bp, "verifier": c.verifier_bp, "treasury": c.treasury_bp},
            "verifier": c.verifier.hex(), "worker_sig": c.worker_sig.hex(), "session_units_after": rec.units_after,
            "draw_seed": rec.draw_seed.hex(), "audit_positions": rec.positions(),
            "paid_sat": {"worker": rec.worker_sat, "verifier": rec.verifier_sat, "treasury": rec.treasury_sat,
                         "burned": rec.burned_sat}}


async def completion(request: web.Request) -> web.Response:
    """GET /api/completions/{id}: a recorded completion (id: the recording txid) with its state proof, its audit
    draw, and its challenge (if any) with that record's proof."""
    cid = path_hex32(request, "id")
    key = completion_key(cid)
    proven = await request.app[CHAIN].prove(key)
    if proven.value is None or proven.proof is None:
        raise ApiError(404, "not-found", f"no completion {cid.hex()} (its recording may still be pending)")
    out = {"completion_id": cid.hex(), **completion_json(CompletionRecord.decode(proven.value)), "challenge": None,
           "key": key.hex(), "value": proven.value.hex(), "proof": proven.proof.encode().hex(),
           "state_root": proven.tip.state_root.hex(), "tip_height": proven.tip.height}
    ch = await request.app[CHAIN].prove(challenge_key(cid))
    if ch.value is not None and ch.proof is not None:
        c = ChallengeRecord.decode(ch.value)
        out["challenge"] = {"challenger": c.challenger.hex(), "height": c.height, "loser": c.loser.name.lower(),
                            "referee": c.referee.hex(), "slash_sat": c.slash_sat, "key": challenge_key(cid).hex(),
                            "value": ch.value.hex(), "proof": ch.proof.encode().hex(),
                            "state_root": ch.tip.state_root.hex()}
    return web.json_response(out)


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/models", models)
    r.add_get("/api/completions/{id}", completion)
