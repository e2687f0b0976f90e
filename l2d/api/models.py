"""Routes of the model registry (docs/inference.md): registered models by content hash, and the workers' offers."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core.model import ModelRecord, OfferRecord
from ..core.state import Namespace
from ..core.work import WorkerRecord, WorkerStatus, worker_key
from .deps import CHAIN


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
            "reputation_ppm": w.reputation_ppm, "context_length": o.context_length,
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


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/models", models)
