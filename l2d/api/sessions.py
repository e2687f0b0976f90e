"""Routes of paid sessions (docs/sessions.md): one session's record with its state proof.

Sessions are opened, settled and closed by client- and server-signed transactions sent to POST /api/l2/tx; receipts
never reach the node (they travel between client and server). This is the read side.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core.session import SessionRecord, session_key
from .deps import CHAIN
from .http import ApiError, path_hex32


async def session(request: web.Request) -> web.Response:
    """GET /api/sessions/{id}: the session's record at the committed tip, and its state proof against that tip's root
    (the settled receipt's id is in it), so a client or server can check it without trusting this node."""
    return web.json_response((await session_json(request))[0])


async def session_json(request: web.Request) -> tuple[dict[str, Any], SessionRecord]:
    """The {id} session's JSON (as GET /api/sessions/{id}) and its record; ApiError 404 if there is none."""
    sid = path_hex32(request, "id")
    key = session_key(sid)
    proven = await request.app[CHAIN].prove(key)
    raw, proof, tip = proven.value, proven.proof, proven.tip
    if raw is None or proof is None:
        raise ApiError(404, "not-found", f"no session {sid.hex()} (its opening transaction may still be pending)")
    s = SessionRecord.decode(raw)
    return {
        "session_id": sid.hex(), "status": s.status.name, "client": s.client.hex(), "server": s.server.hex(),
        "session_key": s.session_key.hex(), "deposit_sat": s.deposit_sat, "price_msat": s.price_msat,
        "unit": s.unit, "expiry_height": s.expiry_height, "open_height": s.open_height,
        "settled": {"seq": s.seq, "amount_sat": s.settled_sat, "units": s.units,
                    "receipt_id": s.receipt_id.hex() if s.seq else None},
        "escrow_sat": s.escrow_sat, "refunded_sat": s.refunded_sat, "close_height": s.close_height or None,
        "key": key.hex(), "value": raw.hex(), "proof": proof.encode().hex(), "state_root": tip.state_root.hex(),
        "tip_height": tip.height,
    }, s


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/sessions/{id}", session)
