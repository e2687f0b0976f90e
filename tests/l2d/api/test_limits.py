"""Rate limits (l2d/api/limits.py): the token bucket's arithmetic, and a real node's REST answering writes beyond
the bucket with 429, Retry-After and the JSON error, before any work; cheap reads never limited; the admin token's
holder counted apart from its address."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from l2d import ratelimit
from l2d.api.limits import LIMITER
from l2d.ratelimit import RateLimiter
from tests.conftest import ADMIN_TOKEN, _node_and_client, make_config


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    lim = RateLimiter(2, 3, clock)
    assert [lim.take("a") for _ in range(3)] == [0, 0, 0]  # the burst
    assert lim.take("a") == pytest.approx(0.5)  # refused: one token at 2/s is half a second away
    assert lim.take("b") == 0  # another client has its own bucket
    clock.t += 0.5
    assert lim.take("a") == 0 and lim.take("a") == pytest.approx(0.5)
    clock.t += 60  # refilled, never above the burst
    assert [lim.take("a") for _ in range(4)][-1] == pytest.approx(0.5)


def test_the_buckets_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "MAX_CLIENTS", 3)
    lim = RateLimiter(1, 1, Clock())
    for c in "abcd":
        assert lim.take(c) == 0
    assert lim.take("a") == 0  # the oldest bucket was dropped: "a" starts full again
    assert lim.take("d") == pytest.approx(1.0)


async def test_writes_beyond_the_bucket_get_429_with_retry_after(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "data", api={"rate_limit_per_s": 1, "rate_limit_burst": 2})
    async for node, client in _node_and_client(cfg):
        clock = Clock()
        lim = client.app[LIMITER]
        assert lim is not None
        lim.clock = clock
        codes = []
        for _ in range(3):
            r = await client.post("/api/l2/tx", json={"tx": "00"})
            codes.append(r.status)
            body: Any = await r.json()
        assert codes == [400, 400, 429]  # the first two reach the handler (a malformed transaction)
        assert body["error"] == "rate-limited" and r.headers["Retry-After"] == "1"
        for _ in range(10):  # cheap reads are not limited
            assert (await client.get("/api/status")).status == 200
        r = await client.post("/api/admin/mint", json={}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert r.status == 400  # the operator's key has its own bucket: served (and refused for its empty body)
        clock.t += 1  # a second later the address has one request again
        assert (await client.post("/api/l2/tx", json={"tx": "00"})).status == 400
        assert (await client.post("/api/l2/tx", json={"tx": "00"})).status == 429
        metrics = await (await client.get("/metrics")).text()
        assert 'status="429"' in metrics


async def test_no_limit_unless_configured(tmp_path: Path) -> None:
    async for node, client in _node_and_client(make_config(tmp_path / "data")):
        assert client.app[LIMITER] is None
        assert {(await client.post("/api/l2/tx", json={"tx": "00"})).status for _ in range(30)} == {400}


async def test_an_authorization_header_that_is_not_utf8_is_an_address_client(tmp_path: Path) -> None:
    """Regression (found probing the error paths of the OpenAPI contract): bytes that are not UTF-8 in the header
    made the limiter's client lookup raise, a 500; it is an unknown key, so the request counts for its address."""
    cfg = make_config(tmp_path / "data", api={"rate_limit_per_s": 1, "rate_limit_burst": 1})
    async for node, client in _node_and_client(cfg):
        lim = client.app[LIMITER]
        assert lim is not None
        lim.clock = Clock()
        assert client.server.host is not None and client.server.port is not None
        statuses = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
            try:
                writer.write(b"POST /api/l2/tx HTTP/1.1\r\nHost: l2d\r\nAuthorization: Bearer \xff\xfe\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n"
                             b'{"tx":"00"}')
                statuses.append(int((await reader.readline()).split()[1]))
            finally:
                writer.close()
                await writer.wait_closed()
        assert statuses == [400, 429]  # served (a malformed transaction), then the address's bucket is empty
        assert (await client.post("/api/l2/tx", json={"tx": "00"})).status == 429  # the same client: its address
