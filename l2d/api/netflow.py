"""Routes of the NetFlow relay registry (docs/netflow.md): every relay's record, with its measured weight."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core.relay import RelayRecord
from ..core.state import Namespace
from .deps import CHAIN


def relay_json(identity: bytes, r: RelayRecord) -> dict[str, Any]:
    return {"identity": identity.hex(), "status": r.status.name, "stake_sat": r.stake_sat,
            "x25519_key": r.x25519_key.hex(), "operator": r.operator.hex(), "flags": r.flags,
            "entry": bool(r.flags & 1), "exit": bool(r.flags & 2), "endpoint": r.endpoint.decode(),
            "rate_kib_s": r.rate_kib_s, "price_msat_per_mib": r.price_msat_per_mib,
            "measured_kib_s": r.measured_kib_s, "success_ppm": r.success_ppm, "weight": r.weight,
            "measured_height": r.measured_height, "last_heartbeat": r.last_heartbeat,
            "registered_height": r.registered_height, "exit_height": r.exit_height or None}


async def relays(request: web.Request) -> web.Response:
    """GET /api/netflow/relays: every registered relay (withdrawn ones too, with their status), by identity."""
    chain = request.app[CHAIN]
    out = [relay_json(bytes(k[1:]), RelayRecord.decode(bytes(v)))
           for k, v in chain.records(bytes((Namespace.RELAY,)))]
    return web.json_response({"relays": out, "height": chain.tip.height})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/netflow/relays", relays)
