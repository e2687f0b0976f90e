"""l2d.client against an in-process daemon: answers parsed, refusals typed with the daemon's status/code/message,
no answer at all as Unreachable, signed transactions submitted with the right nonce and followed to their block.

The synchronous Client blocks, so it runs in a thread while the daemon serves on the test's event loop."""
from __future__ import annotations

import asyncio
import io
import socket
import urllib.error
from typing import Any, Iterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from l2d.client import NOT_JSON, ApiError, AsyncClient, Client, Unreachable, error_from_body
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.tx import public_key
from l2d.node import Node

Served = TestClient[web.Request, web.Application]  # the node's REST app on a test server (conftest's node_client)
Keys = Any  # conftest's deterministic test keys
GENESIS_SAT = 1_000_000  # what conftest's config allocates to test keys 1..3


def _url(client: Served) -> str:
    return str(client.make_url("/"))


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else gets it) but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


# -- the synchronous client ------------------------------------------------------------------------------------------
async def test_answers_are_parsed_and_the_url_may_end_in_a_slash(client: Served, keys: Keys) -> None:
    c = Client(_url(client))
    assert c.url == _url(client).rstrip("/")
    status = await asyncio.to_thread(c.status)
    assert status["network"] == "local"
    assert (await asyncio.to_thread(c.network)) is LOCAL
    acc = await asyncio.to_thread(c.account, keys.pubkey(1).hex())
    assert (acc["account"], acc["balance_sat"], acc["nonce"]) == (keys.pubkey(1).hex(), GENESIS_SAT, 0)


async def test_a_refusal_is_an_api_error_with_the_daemons_status_code_and_message(client: Served) -> None:
    c = Client(_url(client))
    with pytest.raises(ApiError) as e:
        await asyncio.to_thread(c.account, "xyz")
    assert not isinstance(e.value, Unreachable)
    assert (e.value.status, e.value.code, e.value.message) == (400, "malformed", "account id must be 64 hex characters")
    assert (e.value.method, e.value.path) == ("GET", "/api/l2/accounts/xyz")
    assert str(e.value) == "400 malformed: account id must be 64 hex characters"
    assert e.value.detail == "malformed: account id must be 64 hex characters"
    with pytest.raises(ApiError) as e:
        await asyncio.to_thread(c.tx, "ab" * 32)
    assert (e.value.status, e.value.code) == (404, "not-found")


async def test_the_admin_token_is_sent_only_on_admin_calls(node_client: tuple[Node, Served],
                                                          keys: Keys) -> None:
    node, client = node_client
    wrong = Client(_url(client), "wrong-token-0123456789")
    with pytest.raises(ApiError) as e:
        await asyncio.to_thread(wrong.mint, keys.pubkey(2).hex(), 5)
    assert (e.value.status, e.value.code, e.value.message) == (401, "unauthorized", "admin token rejected")
    with pytest.raises(ApiError, match="401 unauthorized"):
        await asyncio.to_thread(wrong.check_admin)
    admin = Client(_url(client), node.config.api.admin_token)
    await asyncio.to_thread(admin.check_admin)  # accepted: the empty upload is refused as malformed, not stored
    txid = (await asyncio.to_thread(admin.mint, keys.pubkey(2).hex(), 5))["txid"]
    st = await asyncio.to_thread(admin.wait_tx, txid, 20)
    assert st["status"] == "committed"
    assert (await asyncio.to_thread(admin.account, keys.pubkey(2).hex()))["balance_sat"] == GENESIS_SAT + 5
    info = await asyncio.to_thread(admin.snapshot)
    out, seen = io.BytesIO(), []
    size = await asyncio.to_thread(admin.download_snapshot, info["name"], out, lambda n, t: seen.append((n, t)))
    assert size == len(out.getvalue()) == info["size"] > 0 and seen[-1] == (size, size)
    assert out.getvalue().startswith(b"L2DSNAP\0")


async def test_sign_and_submit_uses_the_next_nonce_and_the_tx_is_found_committed(
        node_client: tuple[Node, Served], keys: Keys) -> None:
    node, client = node_client
    c = Client(_url(client))
    to = keys.pubkey(3)
    for n in range(2):  # the second one is signed with nonce 1, read from the daemon
        res = await asyncio.to_thread(c.sign_and_submit, keys.secret(1), Transfer(to, 100), 2)
        st = await asyncio.to_thread(c.wait_tx, res["txid"], 20)
        assert (st["txid"], st["status"]) == (res["txid"], "committed")
        assert (await asyncio.to_thread(c.account, keys.pubkey(1).hex()))["nonce"] == n + 1
    assert (await asyncio.to_thread(c.account, to.hex()))["balance_sat"] == GENESIS_SAT + 200
    with pytest.raises(ApiError) as e:  # an explicit, spent nonce: the daemon's reason
        await asyncio.to_thread(lambda: c.sign_and_submit(keys.secret(1), Transfer(to, 1), 2, nonce=0))
    assert (e.value.status, e.value.code, e.value.path) == (400, "stale-nonce", "/api/l2/tx")
    tx = await asyncio.to_thread(lambda: c.sign(keys.secret(2), Transfer(to, 1), 1, nonce=7, network=LOCAL))
    assert (tx.sender, tx.nonce, tx.fee_sat) == (keys.pubkey(2), 7, 1)


async def test_wait_tx_returns_the_last_status_when_the_timeout_passes(node_client: tuple[Node, Served],
                                                                      keys: Keys) -> None:
    node, client = node_client
    c = Client(_url(client))
    # nonce 5 is in the future: admitted to the mempool, never committed while nonces 0..4 are missing
    res = await asyncio.to_thread(lambda: c.sign_and_submit(keys.secret(1), Transfer(keys.pubkey(2), 1), 1, nonce=5))
    st = await asyncio.to_thread(c.wait_tx, res["txid"], 0.3)
    assert st["status"] == "pending"


def test_no_answer_is_unreachable_naming_the_daemon(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}"
    with pytest.raises(Unreachable) as e:
        Client(url + "/").status()
    assert isinstance(e.value, ApiError) and e.value.status == 0
    assert str(e.value) == f"cannot reach the daemon at {url}: {e.value.reason}"
    assert isinstance(e.value.error, urllib.error.URLError)
    assert isinstance(e.value.error.reason, ConnectionRefusedError)
    assert (e.value.url, e.value.method, e.value.path) == (url, "GET", "/api/status")


def test_wait_raises_a_timeout_error_naming_what_it_waited_for() -> None:
    calls: list[int] = []
    with pytest.raises(ApiError) as e:
        Client("http://127.0.0.1:1").wait(lambda: calls.append(1), "nothing", timeout=0.05, poll=0.01)
    assert (e.value.status, e.value.code) == (408, "timeout") and "waiting for nothing" in e.value.message
    assert len(calls) >= 2  # polled, not checked once
    assert Client("http://127.0.0.1:1").wait(lambda: {"ok": 1}, "something") == {"ok": 1}


@pytest.mark.parametrize("body, code, message, detail", [
    (b'{"error": "conflict", "message": "no"}', "conflict", "no", "conflict: no"),
    (b"  <html>Bad Gateway</html>\n", NOT_JSON, "<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
    (b"[1, 2]", NOT_JSON, "[1, 2]", "[1, 2]"),
    (b"x" * 500, NOT_JSON, "x" * 200, "x" * 200),
])
def test_error_bodies(body: bytes, code: str, message: str, detail: str) -> None:
    e = error_from_body(502, body, "GET", "/p")
    assert (e.status, e.code, e.message, e.detail) == (502, code, message, detail)
    assert str(e) == f"502 {code}: {message}"


# -- the asynchronous client -----------------------------------------------------------------------------------------
async def test_async_client_submits_and_follows_a_transaction(node_client: tuple[Node, Served],
                                                             keys: Keys) -> None:
    node, client = node_client
    async with AsyncClient(_url(client)) as c:
        assert (await c.network()) is LOCAL
        res = await c.sign_and_submit(keys.secret(2), Transfer(keys.pubkey(3), 10), 1, network=LOCAL)
        st = await c.wait_tx(res["txid"], 20)
        assert st is not None and st["status"] == "committed"
        acc = await c.account(public_key(keys.secret(2)).hex())
        assert (acc["nonce"], acc["balance_sat"]) == (1, GENESIS_SAT - 11)
        with pytest.raises(ApiError) as e:
            await c.sign_and_submit(keys.secret(2), Transfer(keys.pubkey(3), 10), 1, nonce=0)
        assert (e.value.status, e.value.code, e.value.method) == (400, "stale-nonce", "POST")
        with pytest.raises(ApiError) as e:
            await c.assignments("00" * 32)
        assert (e.value.status, e.value.code) == (404, "not-found")
        # an unknown transaction is "no status yet", never an error, until the timeout: None
        assert await c.wait_tx("ab" * 32, 0.2) is None


async def test_async_client_no_answer_is_unreachable(refused_port: int) -> None:
    url = f"http://127.0.0.1:{refused_port}"
    async with AsyncClient(url) as c:
        with pytest.raises(Unreachable) as e:
            await c.account("00" * 32)
        assert isinstance(e.value.error, aiohttp.ClientConnectorError)
        assert isinstance(e.value.error.os_error, ConnectionRefusedError)
        assert str(e.value) == f"cannot reach the daemon at {url}: {e.value.error}"
        with pytest.raises(Unreachable):  # also while following a transaction
            await c.wait_tx("ab" * 32, 5)


async def test_several_members_a_request_goes_to_the_first_that_answers(node_client: tuple[Node, Served],
                                                                        refused_port: int) -> None:
    """`--api A,B`: a member that does not answer is skipped; one that answers (even with a refusal) is final."""
    node, client = node_client
    down = f"http://127.0.0.1:{refused_port}"
    c = Client(f"{down}, {_url(client)}/")
    st = await asyncio.to_thread(c.status)
    assert st["height"] == node.chain.tip.height
    with pytest.raises(ApiError) as e:  # answered by the live member: not retried elsewhere, not Unreachable
        await asyncio.to_thread(c.get, "/api/l2/blocks/999999")
    assert e.value.status == 404 and not isinstance(e.value, Unreachable)
    with pytest.raises(Unreachable) as u:
        await asyncio.to_thread(Client(f"{down},{down}").status)
    assert u.value.url == down
