"""BitcoinRPC fault handling against a fault-injecting local aiohttp server (faults only).

Everything that is not a fault (real replies, typed results) is tested against a real bitcoind
in test_rpc_regtest.py.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Union

import pytest
from aiohttp import web

from bridge.rpc import BitcoinRPC, CookieAuth, RetryPolicy, UserPassAuth
from bridge.rpc_errors import (RPCAlreadyInChain, RPCAuthError, RPCConnectionLost, RPCConnectionRefused, RPCError,
                               RPCFatal, RPCInsufficientFunds, RPCInvalidAddressOrKey, RPCInvalidParameter,
                               RPCMethodNotFound, RPCMiscError, RPCProtocolError, RPCServiceUnavailable, RPCTimeout,
                               RPCTransient, RPCVerifyError, RPCVerifyRejected, RPCWalletError, RPCWalletNotFound,
                               RPCWarmup)
from regtest.harness import free_ports

FAST_RETRY = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.01)


@dataclass
class Ok:
    result: Any


@dataclass
class Err:
    code: int
    message: str = "boom"


@dataclass
class Drop:
    """Close the connection after reading the request, without replying."""


@dataclass
class Hang:
    """Never reply (until the server shuts down)."""


@dataclass
class Raw:
    status: int
    body: bytes


Fault = Union[Ok, Err, Drop, Hang, Raw]


@dataclass
class Call:
    path: str
    method: str
    params: Any
    body: dict[str, Any]


@dataclass
class FaultServer:
    """A bitcoind stand-in on 127.0.0.1:0 whose replies come from ``script(n, call)``."""

    script: Callable[[int, Call], Fault] = lambda n, call: Ok(None)
    credentials: tuple[str, str] = ("user", "pass")
    calls: list[Call] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    gate: Optional[asyncio.Event] = None  # when set, handlers wait for it before replying
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            auth = request.headers.get("Authorization", "")
            want = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if auth != want:
                self.calls.append(Call(request.path, "<unauthorized>", None, {}))
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="jsonrpc"'})
            body = json.loads(await request.read())
            call = Call(request.path, body["method"], body.get("params"), body)
            self.calls.append(call)
            fault = self.script(len(self.calls), call)
            if self.gate is not None:
                await self.gate.wait()
            if isinstance(fault, Drop):
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if isinstance(fault, Hang):
                await self.shutdown.wait()
                return web.Response(status=500)
            if isinstance(fault, Raw):
                return web.Response(status=fault.status, body=fault.body, content_type="application/json")
            if isinstance(fault, Err):
                doc = {"jsonrpc": "2.0", "error": {"code": fault.code, "message": fault.message}, "id": body["id"]}
            else:
                doc = {"jsonrpc": "2.0", "result": fault.result, "id": body["id"]}
            return web.Response(status=200, body=json.dumps(doc).encode(), content_type="application/json")
        finally:
            self.inflight -= 1


@pytest.fixture
async def server() -> AsyncIterator[FaultServer]:
    srv = FaultServer()
    app = web.Application()
    app.router.add_post("/", srv.handle)
    app.router.add_post("/wallet/{name}", srv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    srv.port = runner.addresses[0][1]
    try:
        yield srv
    finally:
        srv.shutdown.set()
        if srv.gate is not None:
            srv.gate.set()
        await runner.cleanup()


@pytest.fixture
async def client(server: FaultServer) -> AsyncIterator[BitcoinRPC]:
    c = BitcoinRPC(server.url, UserPassAuth(*server.credentials), timeout=5.0, retry=FAST_RETRY)
    try:
        yield c
    finally:
        await c.close()


def script(*faults: Fault, then: Fault = Ok(7)) -> Callable[[int, Call], Fault]:
    """Reply with ``faults`` in order for the first calls, then ``then`` forever."""
    return lambda n, call: faults[n - 1] if n <= len(faults) else then


# ---- connection faults ---------------------------------------------------------------------------


async def test_dropped_connection_is_retried(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = script(Drop(), Drop(), then=Ok(42))
    assert await client.getblockcount() == 42
    assert len(server.calls) == 3


async def test_dropped_connection_exhausts_retries(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = script(then=Drop())
    with pytest.raises(RPCConnectionLost) as exc:
        await client.getblockcount()
    assert isinstance(exc.value, RPCTransient)
    assert len(server.calls) == FAST_RETRY.max_attempts


async def test_dropped_connection_not_retried_for_non_idempotent_call(server: FaultServer, client: BitcoinRPC) -> None:
    # The block may have been mined before the connection broke: mining again would mine twice.
    server.script = script(Drop(), then=Ok(["00" * 32]))
    with pytest.raises(RPCConnectionLost):
        await client.generatetoaddress(1, "bcrt1qxyz")
    assert [c.method for c in server.calls] == ["generatetoaddress"]


async def test_connection_refused_is_transient_and_retried() -> None:
    (port,) = free_ports(1)  # nothing listens there
    async with BitcoinRPC(f"http://127.0.0.1:{port}", UserPassAuth("u", "p"), retry=FAST_RETRY) as c:
        with pytest.raises(RPCConnectionRefused) as exc:
            await c.generatetoaddress(1, "bcrt1qxyz")  # refused = never sent, so safe even here
    assert isinstance(exc.value, RPCTransient)


async def test_timeout_raises_transient_after_retries(server: FaultServer) -> None:
    server.script = script(then=Hang())
    retry = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    async with BitcoinRPC(server.url, UserPassAuth(*server.credentials), timeout=0.2, retry=retry) as c:
        started = time.monotonic()
        with pytest.raises(RPCTimeout) as exc:
            await c.getblockcount()
        elapsed = time.monotonic() - started
    assert isinstance(exc.value, RPCTransient)
    assert len(server.calls) == 2
    assert elapsed < 3.0


async def test_http_503_is_retried(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = script(Raw(503, b"Work queue depth exceeded"), then=Ok(5))
    assert await client.getblockcount() == 5
    assert len(server.calls) == 2


async def test_http_503_exhausted(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = script(then=Raw(503, b"Work queue depth exceeded"))
    with pytest.raises(RPCServiceUnavailable):
        await client.getblockcount()
    assert len(server.calls) == FAST_RETRY.max_attempts


# ---- warm-up --------------------------------------------------------------------------------------


async def test_warmup_then_success(server: FaultServer, client: BitcoinRPC, caplog: pytest.LogCaptureFixture) -> None:
    server.script = script(Err(-28, "Loading block index…"), Err(-28, "Verifying blocks…"),
                           Err(-28, "Loading wallet…"), then=Ok(101))
    with caplog.at_level(logging.DEBUG, logger="bridge.rpc"):
        assert await client.getblockcount() == 101
    assert len(server.calls) == 4
    # Rate-limited: one warning for the burst, the rest at debug level.
    warnings = [r for r in caplog.records if r.name == "bridge.rpc" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "RPCWarmup" in warnings[0].getMessage()


async def test_warmup_exhausts_retries(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = script(then=Err(-28, "Loading block index…"))
    with pytest.raises(RPCWarmup) as exc:
        await client.getblockcount()
    assert exc.value.code == -28
    assert len(server.calls) == FAST_RETRY.max_attempts


async def test_warmup_is_retried_even_for_non_idempotent_call(server: FaultServer, client: BitcoinRPC) -> None:
    # -28 is answered before the command runs, so retrying cannot run it twice.
    server.script = script(Err(-28, "Loading block index…"), then=Ok(["11" * 32]))
    assert await client.generatetoaddress(1, "bcrt1qxyz") == [bytes.fromhex("11" * 32)]
    assert len(server.calls) == 2


# ---- malformed replies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Raw(200, b'{"result": 1, "error": null, "id": '),  # truncated JSON
        Raw(200, b"<html>not json</html>"),
        Raw(500, b"Internal Server Error"),
        Raw(200, b"[1, 2, 3]"),  # JSON but not a JSON-RPC object
        Raw(200, b'{"jsonrpc": "2.0", "id": 1}'),  # neither result nor error
        Raw(200, b'{"jsonrpc": "2.0", "error": {"message": "no code"}, "id": 1}'),
        Raw(200, b'{"jsonrpc": "2.0", "result": 1, "id": 999999}'),  # wrong id
        Ok("not-a-number"),  # result of the wrong type for getblockcount
    ],
    ids=["truncated", "html", "http500-text", "json-array", "no-result", "error-without-code", "wrong-id",
         "wrong-type"],
)
async def test_malformed_reply_is_protocol_error_without_retry(
    server: FaultServer, client: BitcoinRPC, reply: Fault
) -> None:
    server.script = script(then=reply)
    with pytest.raises(RPCProtocolError):
        await client.getblockcount()
    assert len(server.calls) == 1


async def test_amount_that_is_not_whole_sats_is_protocol_error(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = lambda n, call: Raw(
        200, b'{"jsonrpc": "2.0", "result": 0.000000001, "id": %d}' % call.body["id"]
    )
    with pytest.raises(RPCProtocolError, match="whole number of satoshis"):
        await client.getbalance()


async def test_amounts_parsed_as_decimal(server: FaultServer, client: BitcoinRPC) -> None:
    # 0.29 * 1e8 as a float is 28999999.999999996: only Decimal parsing gets this right.
    server.script = lambda n, call: Raw(200, b'{"jsonrpc": "2.0", "result": 0.29, "id": %d}' % call.body["id"])
    assert await client.getbalance() == 29_000_000
    server.script = lambda n, call: Raw(
        200, b'{"jsonrpc": "2.0", "result": {"feerate": 0.00001234, "blocks": 2}, "id": %d}' % call.body["id"]
    )
    assert await client.estimatesmartfee(2) == 1234


# ---- authentication ----------------------------------------------------------------------------------


async def test_http_401_is_auth_error_without_retry(server: FaultServer) -> None:
    async with BitcoinRPC(server.url, UserPassAuth("user", "wrong"), retry=FAST_RETRY) as c:
        with pytest.raises(RPCAuthError) as exc:
            await c.getblockcount()
    assert isinstance(exc.value, RPCProtocolError)
    assert len(server.calls) == 1


async def test_cookie_reread_once_on_401(server: FaultServer, tmp_path: Path) -> None:
    cookie = tmp_path / ".cookie"
    cookie.write_text("__cookie__:first")
    server.credentials = ("__cookie__", "first")
    server.script = script(then=Ok(3))
    async with BitcoinRPC(server.url, CookieAuth(cookie), retry=FAST_RETRY) as c:
        assert await c.getblockcount() == 3
        # bitcoind restarted: new cookie on disk, the client still holds the old one.
        cookie.write_text("__cookie__:second")
        server.credentials = ("__cookie__", "second")
        assert await c.getblockcount() == 3
        assert [call.method for call in server.calls] == ["getblockcount", "<unauthorized>", "getblockcount"]
        # A cookie that is simply wrong: re-read once, then give up.
        server.credentials = ("__cookie__", "third")
        with pytest.raises(RPCAuthError):
            await c.getblockcount()
        assert [call.method for call in server.calls[3:]] == ["<unauthorized>", "<unauthorized>"]


async def test_missing_cookie_is_transient(tmp_path: Path, server: FaultServer) -> None:
    async with BitcoinRPC(server.url, CookieAuth(tmp_path / "absent"), retry=FAST_RETRY) as c:
        with pytest.raises(RPCTransient, match="cookie"):
            await c.getblockcount()
    assert server.calls == []


# ---- error code mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (-1, RPCMiscError),
        (-4, RPCWalletError),
        (-5, RPCInvalidAddressOrKey),
        (-6, RPCInsufficientFunds),
        (-8, RPCInvalidParameter),
        (-18, RPCWalletNotFound),
        (-25, RPCVerifyError),
        (-26, RPCVerifyRejected),
        (-27, RPCAlreadyInChain),
        (-32601, RPCMethodNotFound),
        (-99999, RPCFatal),
    ],
)
async def test_error_codes_map_to_classes(server: FaultServer, client: BitcoinRPC, code: int,
                                          cls: type[RPCError]) -> None:
    server.script = script(then=Err(code, "nope"))
    with pytest.raises(cls) as exc:
        await client.getblockcount()
    assert type(exc.value) is cls
    assert isinstance(exc.value, RPCFatal)
    assert exc.value.code == code and exc.value.message == "nope" and exc.value.method == "getblockcount"
    assert len(server.calls) == 1  # fatal errors are not retried


async def test_legacy_http_500_error_reply_is_mapped(server: FaultServer, client: BitcoinRPC) -> None:
    # JSON-RPC 1.0 style (HTTP 500 + error object) as older bitcoind versions reply.
    server.script = script(then=Raw(500, b'{"result": null, "error": {"code": -8, "message": "x"}, "id": 1}'))
    with pytest.raises(RPCInvalidParameter):
        await client.getblockcount()


# ---- request shape, wallet routing, concurrency -----------------------------------------------------------


async def test_request_is_jsonrpc2_and_wallet_calls_use_wallet_path(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = lambda n, call: Ok("bcrt1qaddr" if call.method == "getnewaddress" else 1)
    fed = client.for_wallet("fed one")
    assert await fed.getnewaddress() == "bcrt1qaddr"
    assert await fed.getblockcount() == 1
    assert [(c.path, c.method) for c in server.calls] == [("/wallet/fed one", "getnewaddress"), ("/", "getblockcount")]
    assert all(c.body["jsonrpc"] == "2.0" for c in server.calls)
    ids = [c.body["id"] for c in server.calls]
    assert len(set(ids)) == len(ids)


async def test_amounts_are_sent_as_exact_decimal_strings(server: FaultServer, client: BitcoinRPC) -> None:
    server.script = script(then=Ok("ab" * 32))
    await client.for_wallet("w").sendtoaddress("bcrt1qaddr", 29_000_001)
    assert server.calls[0].params == ["bcrt1qaddr", "0.29000001"]


async def test_concurrency_limit_is_honoured(server: FaultServer, poll_until: Any) -> None:
    limit = 3
    server.gate = asyncio.Event()
    server.script = script(then=Ok(1))
    async with BitcoinRPC(server.url, UserPassAuth(*server.credentials), max_concurrency=limit,
                          retry=FAST_RETRY) as c:
        tasks = [asyncio.create_task(c.getblockcount()) for _ in range(10)]

        async def at_limit() -> bool:
            return server.inflight >= limit

        await poll_until(at_limit, 5.0, f"{limit} requests in flight")
        # Give the client every chance to exceed the limit before releasing the gate.
        for _ in range(50):
            await asyncio.sleep(0.002)
            assert server.inflight <= limit
        server.gate.set()
        assert await asyncio.gather(*tasks) == [1] * 10
    assert server.max_inflight == limit
    assert len(server.calls) == 10


async def test_closed_client_refuses_calls(server: FaultServer) -> None:
    c = BitcoinRPC(server.url, UserPassAuth(*server.credentials))
    await c.close()
    with pytest.raises(RuntimeError, match="closed"):
        await c.getblockcount()
