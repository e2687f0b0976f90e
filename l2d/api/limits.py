"""Rate limits for writes and expensive reads (README, "Operator"): a token bucket per client, refilled at
api.rate_limit_per_s up to api.rate_limit_burst requests. A client is its API key when the request carries the
admin token (an operator is not limited by others behind the same address), else its address. Beyond the bucket a
request is answered 429 with Retry-After (whole seconds) and the error body, before any work is done.

Limited: every request that is not a GET, and the GETs that stream large files (audit bundles, header files,
snapshots, FL models). Cheap reads (status, accounts, proofs of one key...) are never limited here; the connection
limits of l2d/api/server.py bound them."""
from __future__ import annotations

import hashlib
import hmac
import math
from typing import Awaitable, Callable, Optional

from aiohttp import web

from ..ratelimit import RateLimiter
from .deps import ADMIN_TOKEN
from .http import ApiError

EXPENSIVE_GETS = ("/api/anchors/{l2_height}/audit", "/api/bridge/headers", "/api/admin/snapshots/{name}",
                  "/api/fl/models/{hash}")


LIMITER: web.AppKey[Optional[RateLimiter]] = web.AppKey("limiter")


def _limited(request: web.Request) -> bool:
    if request.method != "GET":
        return True
    info = request.match_info.route.resource
    return info is not None and info.canonical in EXPENSIVE_GETS


def client_of(request: web.Request) -> str:
    token = request.app[ADMIN_TOKEN]
    header = request.headers.get("Authorization", "")
    # aiohttp reads header bytes that are not UTF-8 as surrogates: compare the bytes as sent (plain encode() raised)
    if token and hmac.compare_digest(header.encode("utf-8", "surrogateescape"), f"Bearer {token}".encode()):
        return "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"addr:{request.remote}"


@web.middleware
async def rate_limit(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    limiter = request.app[LIMITER]
    if limiter is not None and _limited(request):
        wait = limiter.take(client_of(request))
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise ApiError(429, "rate-limited", f"too many requests: at most {limiter.per_s}/s (bursts of "
                           f"{limiter.burst}) for writes and large downloads; retry in {retry} s",
                           headers={"Retry-After": str(retry)})
    return await handler(request)
