"""Token buckets by client: what the REST API's rate limits count with (l2d/api/limits.py). Not consensus: a float
clock is fine."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

MAX_CLIENTS = 100_000  # buckets kept (least recently used dropped first: a dropped client starts full again)


class RateLimiter:
    """One token bucket per client: refilled at per_s a second, up to burst."""

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
