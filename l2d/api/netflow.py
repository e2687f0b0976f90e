"""Routes of the NetFlow relay registry (docs/netflow.md): every relay's record, with its measured weight and how
long ago it last sent a heartbeat; one NetFlow session with its relay."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from ..core.block import HEADER_SIZE, BlockHeader
from ..core.relay import RelayRecord, member_votes, relay_key
from ..core.state import FEDERATION_MEMBERS_KEY, Namespace, decode_members
from .deps import CHAIN
from .http import ApiError
from .sessions import session_json


def relay_json(identity: bytes, r: RelayRecord) -> dict[str, Any]:
    return {"identity": identity.hex(), "status": r.status.name, "stake_sat": r.stake_sat,
            "x25519_key": r.x25519_key.hex(), "operator": r.operator.hex(), "flags": r.flags,
            "entry": bool(r.flags & 1), "exit": bool(r.flags & 2), "endpoint": r.endpoint.decode(),
            "rate_kib_s": r.rate_kib_s, "price_msat_per_mib": r.price_msat_per_mib,
            "measured_kib_s": r.measured_kib_s, "success_ppm": r.success_ppm, "weight": r.weight,
            "measured_height": r.measured_height, "last_heartbeat": r.last_heartbeat,
            "registered_height": r.registered_height, "exit_height": r.exit_height or None}


async def relays(request: web.Request) -> web.Response:
    """GET /api/netflow/relays: every registered relay (withdrawn ones too, with their status), by identity, with
    the timestamp of the block of its last heartbeat (or registration) and its age by this node's clock (clients
    pass over relays silent for longer than they accept), and the members' votes its weight comes from."""
    chain = request.app[CHAIN]
    now_ms = int(time.time() * 1000)
    out = []
    with chain.reader() as r:
        height = r.tip_height() or 0
        raw_members = r.get_state(FEDERATION_MEMBERS_KEY)
        members = decode_members(raw_members) if raw_members is not None else ()
        stamps: dict[int, int] = {}  # height -> its block's timestamp (relays often beat in one block)
        for k, v in r.iter_prefix(bytes((Namespace.RELAY,))):
            rec = RelayRecord.decode(v)
            if rec.last_heartbeat not in stamps:
                raw = r.get_block(rec.last_heartbeat)
                stamps[rec.last_heartbeat] = 0 if raw is None else BlockHeader.decode(
                    bytes(raw[:HEADER_SIZE]), chain.network).timestamp_ms
            beat_ms = stamps[rec.last_heartbeat]
            votes = [{"member": m.hex(), "epoch": x.epoch, "measured_kib_s": x.measured_kib_s,
                      "success_ppm": x.success_ppm}
                     for m, x in zip(members, member_votes(r.get_state, k[1:], rec, members)) if x is not None]
            out.append({**relay_json(k[1:], rec), "last_heartbeat_ms": beat_ms,
                        "heartbeat_age_ms": max(0, now_ms - beat_ms), "votes": votes})
    return web.json_response({"relays": out, "height": height})


async def session(request: web.Request) -> web.Response:
    """GET /api/netflow/sessions/{id}: a paid session whose server is a registered relay (as GET /api/sessions/{id},
    with its state proof) and that relay's record; 404 for a session with any other server (e.g. a gateway's)."""
    body, rec = await session_json(request)
    raw = request.app[CHAIN].get_state(relay_key(rec.server))
    if raw is None:
        raise ApiError(404, "not-found", f"session {body['session_id']} is not a NetFlow session: its server "
                                         f"{rec.server.hex()} is not a registered relay")
    return web.json_response({**body, "relay": relay_json(rec.server, RelayRecord.decode(raw))})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/netflow/relays", relays)
    r.add_get("/api/netflow/sessions/{id}", session)
