"""Routes of the anchor pipeline: every anchor with its Bitcoin and L2 status, the latest, and audit bundles."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from anchoring.service import Anchor, AnchorService, AnchorState

from ..core.anchor import AnchorEntry, anchor_key
from ..views import ChainView
from .deps import ANCHORS, CHAIN
from .http import ApiError, status_query, uint


def _anchor_json(chain: ChainView, a: Anchor) -> dict[str, Any]:
    d: dict[str, Any] = a.to_json()
    raw = chain.get_state(anchor_key(a.l2_height))
    if raw is None:
        d["l2_state"] = None
    else:
        e = AnchorEntry.decode(raw)
        d["l2_state"] = {"status": e.status.name, "btc_txid": e.btc_txid[::-1].hex(),
                         "btc_block_hash": e.btc_block_hash[::-1].hex(), "btc_height": e.btc_height,
                         "state_root": e.state_root.hex()}
    return d


def _service(request: web.Request) -> AnchorService:
    svc = request.app[ANCHORS]
    if svc is None:
        raise ApiError(404, "not-found", "anchoring is not enabled on this node")
    return svc


async def anchors(request: web.Request) -> web.Response:
    """GET /api/anchors[?status=S]: every anchor with its status, Bitcoin txid/height, L2 height and root; S is one of
    AnchorState's values in any case of ASCII letters (400 otherwise)."""
    svc = _service(request)
    chain = request.app[CHAIN]
    want = status_query(request, AnchorState.__members__)
    items = [_anchor_json(chain, a) for a in svc.all_anchors() if want is None or a.status.value == want]
    return web.json_response({"broadcasting": svc.broadcasting, "mode": svc.mode, "every_blocks": svc.every_blocks,
                              "btc_tip_height": svc.btc_tip_height, "anchors": items})


async def anchors_latest(request: web.Request) -> web.Response:
    """GET /api/anchors/latest: the anchor of the highest L2 height (404 if none yet)."""
    a = _service(request).latest()
    if a is None:
        raise ApiError(404, "not-found", "no anchor yet")
    return web.json_response(_anchor_json(request.app[CHAIN], a))


async def anchor_audit(request: web.Request) -> web.Response:
    """GET /api/anchors/{l2_height}/audit: the audit bundle file (404 until the anchor is confirmed)."""
    svc = _service(request)
    height = uint(request.match_info["l2_height"], "height")
    if not svc.broadcasting:
        raise ApiError(404, "not-found", "no bitcoind configured: anchors are not broadcast, so none is confirmed")
    bundle = await svc.audit_bundle(height)
    if bundle is None:
        raise ApiError(404, "not-found", f"no confirmed anchor at L2 height {height}")
    return web.Response(body=bundle, content_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="audit-{height}.l2audit"'})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/anchors", anchors)
    r.add_get("/api/anchors/latest", anchors_latest)
    r.add_get("/api/anchors/{l2_height}/audit", anchor_audit)
