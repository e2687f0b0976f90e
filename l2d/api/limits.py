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
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Optional

from aiohttp import web

from .deps import ADMIN_TOKEN
from .http import ApiError

EXPENSIVE_GETS = ("/api/anchors/{l2_height}/audit", "/api/bridge/headers", "/api/admin/snapshots/{name}",
                  "/api/fl/models/{hash}")
MAX_CLIENTS = 100_000  # buckets kept (least recently used dropped first: a dropped client starts full again)


class RateLimiter:
    """Token buckets by client (not consensus: a float clock is fine)."""

    def __init__(self, per_s: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self.burst, self.clock = per_s, burst, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: str) -> float:
        """Spend one request of client's bucket: 0 when allowed, else the seconds until one is available."""
        now = self.clock()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return wait


LIMITER: web.AppKey[Optional[RateLimiter]] = web.AppKey("limiter")


def _limited(request: web.Request) -> bool:
    if request.method != "GET":
        return True
    info = request.match_info.route.resource
    return info is not None and info.canonical in EXPENSIVE_GETS


def client_of(request: web.Request) -> str:
    token = request.app[ADMIN_TOKEN]
    header = request.headers.get("Authorization", "")
    if token and hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
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
