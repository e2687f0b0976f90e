"""Routes of the federation: the members and this member's view of the rounds, the evidence of equivocation it
holds, and exported runs of block headers with their commits (the chain file that `l2-verify chain` checks)."""
from __future__ import annotations

import io

from aiohttp import web

from ..core.chain_file import write_chain_file
from .deps import CHAIN, MEMBERS
from .http import ApiError, uint

MAX_COMMITS = 10_000  # blocks per chain file served


async def federation(request: web.Request) -> web.Response:
    """GET /api/federation: members, threshold, this member, the current height/round/proposer, final height, and
    what this member last heard from each peer."""
    return web.json_response(request.app[MEMBERS].status())


async def evidence(request: web.Request) -> web.Response:
    """GET /api/federation/evidence: every equivocation this member saw (both signed proposals, hex)."""
    return web.json_response({"evidence": [
        {"member": e.proposer, "height": e.height, "round": e.round, "first": e.first.hex(), "second": e.second.hex()}
        for e in request.app[MEMBERS].evidence]})


async def commits(request: web.Request) -> web.Response:
    """GET /api/l2/commits?from=A&to=B: the chain file (docs/federation.md) of blocks A..B (B defaults to the tip,
    at most MAX_COMMITS blocks per request), application/octet-stream."""
    chain = request.app[CHAIN]
    q = request.query
    tip = chain.tip.height
    start = uint(q.get("from", "0"), "from")
    end = uint(q["to"], "to") if "to" in q else min(tip, start + MAX_COMMITS - 1)
    if start > tip or end < start:
        raise ApiError(404, "not-found", f"no blocks {start}..{end} (tip is {tip})")
    if end - start + 1 > MAX_COMMITS:
        raise ApiError(400, "malformed", f"at most {MAX_COMMITS} blocks per request ({start}..{end} asked)")
    entries = chain.chain_entries(start, min(end, tip), request.app[MEMBERS].members.n)
    buf = io.BytesIO()
    write_chain_file(buf, chain.network, start, len(entries), entries)
    return web.Response(body=buf.getvalue(), content_type="application/octet-stream")


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/federation", federation)
    r.add_get("/api/federation/evidence", evidence)
    r.add_get("/api/l2/commits", commits)
