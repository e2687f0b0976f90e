"""REST API through aiohttp's test client: every endpoint's happy path, every rejection (4xx, JSON, no change)."""
from __future__ import annotations

import hashlib
import io
import json
import random
from typing import Any, Optional

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

import l2d
from l2d.core.block import ZERO_HASH, Block
from l2d.core.coin_tx import Burn, Mint, Transfer
from l2d.core.params import LOCAL, MAX_MONEY, REGTEST, SIGNET, Network
from l2d.core.snapshot import verify_snapshot
from l2d.core.state import Account, account_key
from l2d.core.tree import Proof, ProofKind, verify_proof
from l2d.core.tx import Transaction, sign
from l2d.metrics import escape_label_value
from l2d.node import Node
from tests.l2d.api.test_openapi import assert_conforms

Client = TestClient[web.Request, web.Application]

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"  # as in conftest
GENESIS_SAT = 1_000_000
MAX_BODY = 64 * 1024
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def transfer(frm: int, to: int, amount: int, nonce: int, fee: int = 1, network: Network = LOCAL,
             aux: int = 0) -> Transaction:
    return sign(network, secret(frm), nonce, fee, Transfer(pubkey(to), amount), bytes([aux]) * 32)


async def get_json(client: Client, path: str, status: int = 200, **kw: Any) -> Any:
    resp = await client.get(path, **kw)
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert_conforms("GET", path, resp.status, resp.content_type, body)  # as GET /api/openapi.json describes it
    return body


async def post_tx(client: Client, tx: Transaction) -> Any:
    resp = await client.post("/api/l2/tx", json={"tx": tx.raw.hex()})
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    assert body == {"txid": tx.txid.hex()}
    return body


async def tip_state(client: Client) -> tuple[int, str, str, int]:
    s = await get_json(client, "/api/status")
    return s["height"], s["tip_hash"], s["state_root"], s["mempool_size"]


async def expect_error(client: Client, method: str, path: str, status: int, code: Optional[str] = None,
                       **kw: Any) -> dict[str, Any]:
    """The request fails with status and a JSON {error, message} body, and neither state nor mempool moved."""
    before = await tip_state(client)
    resp = await client.request(method, path, **kw)
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", text
    body: dict[str, Any] = json.loads(text)
    assert set(body) == {"error", "message"} and body["message"], body
    assert_conforms(method, path, resp.status, resp.content_type, body)
    if code is not None:
        assert body["error"] == code, body
    assert await tip_state(client) == before
    return body


async def wait_committed(client: Client, wait_until: Any, txid: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    async def done() -> bool:
        out.update(await get_json(client, f"/api/l2/tx/{txid}"))
        return bool(out["status"] == "committed")

    await wait_until(done, what=f"tx {txid} committed")
    return out


async def account(client: Client, n_or_key: int | bytes) -> dict[str, Any]:
    key = pubkey(n_or_key) if isinstance(n_or_key, int) else n_or_key
    acc: dict[str, Any] = await get_json(client, f"/api/l2/accounts/{key.hex()}")
    # every answer carries a proof that checks against the state root it names
    proof = Proof.decode(bytes.fromhex(acc["proof"]))
    assert proof.key == account_key(key)
    value = verify_proof(bytes.fromhex(acc["state_root"]), proof)
    if acc["exists"]:
        assert value == Account(acc["balance_sat"], acc["nonce"]).encode()
    else:
        assert value is None and acc["balance_sat"] == 0 and acc["nonce"] == 0
    return acc


# -- happy paths -----------------------------------------------------------------------------------------------
async def test_health(client: Client) -> None:
    assert await get_json(client, "/health") == {"ok": True}


async def test_status(client: Client, node: Node) -> None:
    s = await get_json(client, "/api/status")
    assert s["network"] == "local" and s["height"] == 0
    assert s["tip_hash"] == node.chain.tip.hash.hex() and s["state_root"] == node.chain.tip.state_root.hex()
    assert s["mempool_size"] == 0 and s["version"] == l2d.__version__
    assert isinstance(s["uptime_s"], (int, float)) and s["uptime_s"] >= 0


async def test_state(client: Client, node: Node) -> None:
    s = await get_json(client, "/api/l2/state")
    assert s["height"] == 0 and s["state_root"] == node.chain.tip.state_root.hex() and s["tip_hash"] == node.chain.tip.hash.hex()
    assert s["records"] == 3 + 3  # three accounts, supply, mint authority, federation members
    assert s["supply"] == {"minted_sat": 3 * GENESIS_SAT, "burned_sat": 0, "fees_sat": 0}


async def test_account_present_and_absent_with_proofs(client: Client, node: Node) -> None:
    acc = await account(client, 1)
    assert acc["exists"] and acc["balance_sat"] == GENESIS_SAT and acc["nonce"] == 0
    assert acc["account"] == pubkey(1).hex() and acc["height"] == 0
    assert acc["state_root"] == node.chain.tip.state_root.hex()
    assert Proof.decode(bytes.fromhex(acc["proof"])).kind == ProofKind.PRESENT
    absent = await account(client, 77)
    assert not absent["exists"]
    assert Proof.decode(bytes.fromhex(absent["proof"])).kind != ProofKind.PRESENT
    upper = await get_json(client, f"/api/l2/accounts/{pubkey(1).hex().upper()}")
    assert upper["account"] == pubkey(1).hex() and upper["balance_sat"] == GENESIS_SAT


async def test_genesis_block(client: Client, node: Node) -> None:
    b = await get_json(client, "/api/l2/blocks/0")
    assert b["height"] == 0 and b["tx_count"] == 0 and b["txs"] == []
    assert b["prev_hash"] == ZERO_HASH.hex() and b["hash"] == node.chain.tip.hash.hex()
    assert Block.decode(bytes.fromhex(b["raw"]), LOCAL).header.hash.hex() == b["hash"]


async def test_transfer_is_committed_and_visible_everywhere(client: Client, wait_until: Any) -> None:
    t = transfer(1, 4, 1000, 0, fee=5)
    await post_tx(client, t)
    st = await get_json(client, f"/api/l2/tx/{t.txid.hex()}")
    assert st["txid"] == t.txid.hex() and st["status"] in ("pending", "committed")
    loc = await wait_committed(client, wait_until, t.txid.hex())
    assert loc["height"] == 1 and loc["index"] == 0

    async def settled() -> bool:  # then one empty block makes block 1 final, and the federation idles
        st = await get_json(client, "/api/status")
        return bool(st["height"] == 2 and st["final_height"] == 1)
    await wait_until(settled, 30, "block 1 final")
    sender, recipient = await account(client, 1), await account(client, 4)
    assert (sender["balance_sat"], sender["nonce"]) == (GENESIS_SAT - 1005, 1)
    assert recipient["exists"] and (recipient["balance_sat"], recipient["nonce"]) == (1000, 0)
    assert sender["height"] == 2

    b = await get_json(client, "/api/l2/blocks/1")
    empty = await get_json(client, "/api/l2/blocks/2")
    assert b["tx_count"] == 1 and empty["tx_count"] == 0 and b["state_root"] == empty["state_root"] == \
        sender["state_root"]
    assert b["txs"] == [{"txid": t.txid.hex(), "type": "transfer", "sender": pubkey(1).hex(), "nonce": 0,
                         "fee_sat": 5, "recipient": pubkey(4).hex(), "amount_sat": 1000}]
    genesis = await get_json(client, "/api/l2/blocks/0")
    assert b["prev_hash"] == genesis["hash"]

    s = await get_json(client, "/api/l2/state")
    assert s["height"] == 2 and s["records"] == 7  # 6 before the member record
    assert s["supply"] == {"minted_sat": 3 * GENESIS_SAT, "burned_sat": 0, "fees_sat": 5}
    status = await get_json(client, "/api/status")
    assert status["height"] == 2 and status["tip_hash"] == empty["hash"] and status["mempool_size"] == 0


async def test_queued_nonces_and_burn(client: Client, wait_until: Any) -> None:
    txs = [transfer(2, 5, 10, 0), transfer(2, 5, 20, 1),
           sign(LOCAL, secret(2), 2, 3, Burn(500, b"bc1qdest"), b"\0" * 32)]
    for t in reversed(txs[:2]):  # out of order: nonce 1 waits for nonce 0
        await post_tx(client, t)
    await post_tx(client, txs[2])
    await wait_committed(client, wait_until, txs[2].txid.hex())
    a = await account(client, 2)
    assert (a["balance_sat"], a["nonce"]) == (GENESIS_SAT - 11 - 21 - 503, 3)
    assert (await account(client, 5))["balance_sat"] == 30
    s = await get_json(client, "/api/l2/state")
    assert s["supply"]["burned_sat"] == 500 and s["supply"]["fees_sat"] == 5
    loc = await get_json(client, f"/api/l2/tx/{txs[2].txid.hex()}")
    blk = await get_json(client, f"/api/l2/blocks/{loc['height']}")
    burn = [t for t in blk["txs"] if t["type"] == "burn"]
    assert burn == [{"txid": txs[2].txid.hex(), "type": "burn", "sender": pubkey(2).hex(), "nonce": 2,
                     "fee_sat": 3, "amount_sat": 500, "destination": b"bc1qdest".hex()}]


async def test_admin_mint(client: Client, node: Node, wait_until: Any) -> None:
    first = await client.post("/api/admin/mint", json={"recipient": pubkey(6).hex(), "amount_sat": 700},
                              headers=AUTH)
    assert first.status == 202, await first.text()
    second = await client.post("/api/admin/mint", json={"recipient": pubkey(6).hex(), "amount_sat": 300},
                               headers=AUTH)
    assert second.status == 202, await second.text()  # the next authority nonce, while the first is pending
    t2 = (await second.json())["txid"]
    await wait_committed(client, wait_until, (await first.json())["txid"])
    await wait_committed(client, wait_until, t2)
    assert (await account(client, 6))["balance_sat"] == 1000
    s = await get_json(client, "/api/l2/state")
    assert s["supply"]["minted_sat"] == 3 * GENESIS_SAT + 1000
    assert node.admission.authority_pubkey is not None
    assert (await account(client, node.admission.authority_pubkey))["nonce"] == 2


async def test_admin_snapshot_and_download(client: Client, node: Node, wait_until: Any) -> None:
    t = transfer(3, 4, 50, 0)
    await post_tx(client, t)
    await wait_committed(client, wait_until, t.txid.hex())
    resp = await client.post("/api/admin/snapshot", headers=AUTH)
    assert resp.status == 200, await resp.text()
    info = await resp.json()
    assert info["height"] == node.chain.tip.height == 1 and info["state_root"] == node.chain.tip.state_root.hex()
    dl = await client.get(f"/api/admin/snapshots/{info['name']}", headers=AUTH)
    assert dl.status == 200
    data = await dl.read()
    assert len(data) == info["size"]
    header = verify_snapshot(io.BytesIO(data), LOCAL, expect_root=bytes.fromhex(info["state_root"]))
    assert header.height == 1 and header.block_hash == node.chain.tip.hash
    listing = await get_json(client, "/api/admin/snapshots", headers=AUTH)
    assert {"name": info["name"], "height": 1, "size": info["size"]} in listing["snapshots"]


async def test_metrics(client: Client, wait_until: Any) -> None:
    t = transfer(1, 4, 10, 0)
    await post_tx(client, t)
    await wait_committed(client, wait_until, t.txid.hex())
    await expect_error(client, "POST", "/api/l2/tx", 400, "bad-signature",
                       json={"tx": (t.raw[:-1] + bytes([t.raw[-1] ^ 1])).hex()})
    samples: dict[str, str] = {}

    async def idle() -> bool:  # the transfer's block, then the empty block that makes it final: nothing more
        nonlocal samples, text
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
        samples = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in text.splitlines()
                   if line and not line.startswith("#")}
        return samples.get("l2d_blocks_committed_total") == "2"

    text = ""
    await wait_until(idle, what="two blocks committed")
    height = int(samples["l2d_height"])
    assert height == 2 and samples["l2d_final_height"] == "1"
    assert samples["l2d_mempool_txs"] == "0"
    assert samples["l2d_txs_committed_total"] == "1"
    assert samples["l2d_state_records"] == "7"
    assert samples['l2d_txs_rejected_total{reason="bad-signature",stage="admission"}'] == "1"
    assert samples["l2d_block_build_seconds_count"] == str(height)  # a 1-member federation builds each block once
    assert samples["l2d_federation_peers_connected"] == "0"
    assert float(samples["l2d_uptime_seconds"]) >= 0
    assert samples['l2d_http_requests_total{path="/api/l2/tx",status="202"}'] == "1"
    assert "# TYPE l2d_block_build_seconds histogram" in text
    # one latency histogram per route: the two transaction posts (accepted and refused) in /api/l2/tx's
    assert samples['l2d_http_request_seconds_count{path="/api/l2/tx"}'] == "2"
    assert samples['l2d_http_request_seconds_bucket{path="/api/l2/tx",le="+Inf"}'] == "2"
    assert float(samples['l2d_http_request_seconds_sum{path="/api/l2/tx"}']) > 0
    assert int(samples['l2d_http_request_seconds_count{path="/metrics"}']) >= 1
    # the subsystems' figures, from the dashboard's snapshot
    assert samples['l2d_status{state="READY"}'] == "1" and samples['l2d_status{state="DEGRADED"}'] == "0"
    for family in ("l2d_workers", "l2d_tasks", "l2d_fl_jobs", "l2d_relays", "l2d_sessions", "l2d_completions"):
        assert f"# TYPE {family} gauge" in text


def test_metric_label_escaping() -> None:
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# -- rejections of transactions --------------------------------------------------------------------------------
async def test_reject_malformed_hex(client: Client) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", json={"tx": "zz"})
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", json={"tx": "abc"})
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", json={"tx": ""})


async def test_reject_truncated_and_trailing(client: Client) -> None:
    raw = transfer(1, 4, 10, 0).raw
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", json={"tx": raw[:-10].hex()})
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", json={"tx": raw[:20].hex()})
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", json={"tx": (raw + b"\0").hex()})


async def test_reject_bad_signature(client: Client) -> None:
    raw = transfer(1, 4, 10, 0).raw
    await expect_error(client, "POST", "/api/l2/tx", 400, "bad-signature",
                       json={"tx": (raw[:-1] + bytes([raw[-1] ^ 1])).hex()})
    # a signature by another key over the same body
    other = transfer(2, 4, 10, 0)
    await expect_error(client, "POST", "/api/l2/tx", 400, "bad-signature",
                       json={"tx": (raw[:-64] + other.signature).hex()})


async def test_reject_wrong_network(client: Client) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "wrong-network",
                       json={"tx": transfer(1, 4, 10, 0, network=REGTEST).raw.hex()})


async def test_reject_stale_nonce_replay(client: Client, wait_until: Any) -> None:
    t = transfer(1, 4, 10, 0)
    await post_tx(client, t)
    await wait_committed(client, wait_until, t.txid.hex())
    await expect_error(client, "POST", "/api/l2/tx", 400, "stale-nonce", json={"tx": t.raw.hex()})
    await expect_error(client, "POST", "/api/l2/tx", 400, "stale-nonce",
                       json={"tx": transfer(1, 5, 99, 0).raw.hex()})


async def test_reject_duplicate_and_taken_nonce(client: Client) -> None:
    t = transfer(1, 4, 10, 1)  # nonce 1 with nonce 0 missing: stays pending, never in a block
    await post_tx(client, t)
    await expect_error(client, "POST", "/api/l2/tx", 400, "duplicate", json={"tx": t.raw.hex()})
    await expect_error(client, "POST", "/api/l2/tx", 400, "nonce-taken",
                       json={"tx": transfer(1, 4, 10, 1, aux=7).raw.hex()})
    assert (await get_json(client, f"/api/l2/tx/{t.txid.hex()}"))["status"] == "pending"


async def test_reject_fee_below_floor(client: Client) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "fee-below-floor",
                       json={"tx": transfer(1, 4, 10, 0, fee=0).raw.hex()})


async def test_reject_unknown_sender(client: Client) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "unknown-sender",
                       json={"tx": transfer(9, 4, 10, 0).raw.hex()})


async def test_reject_state_rules(client: Client) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "insufficient-balance",
                       json={"tx": transfer(1, 4, GENESIS_SAT, 0).raw.hex()})
    await expect_error(client, "POST", "/api/l2/tx", 400, "invalid-transaction",
                       json={"tx": transfer(1, 1, 10, 0).raw.hex()})
    await expect_error(client, "POST", "/api/l2/tx", 400, "nonce-gap",
                       json={"tx": transfer(1, 4, 10, 500).raw.hex()})
    # a mint signed by someone who is not the authority
    mint = sign(LOCAL, secret(1), 0, 0, Mint(pubkey(4), 10), b"\0" * 32)
    await expect_error(client, "POST", "/api/l2/tx", 400, "unauthorized", json={"tx": mint.raw.hex()})


async def test_reject_spending_more_than_pending_leaves(client: Client) -> None:
    await post_tx(client, transfer(3, 4, GENESIS_SAT - 100, 1))  # pending behind a missing nonce 0
    await expect_error(client, "POST", "/api/l2/tx", 400, "insufficient-balance",
                       json={"tx": transfer(3, 4, 200, 0).raw.hex()})


# -- rejections of request bodies ------------------------------------------------------------------------------
async def test_reject_oversized_body(client: Client) -> None:
    body = json.dumps({"tx": "00" * MAX_BODY})
    await expect_error(client, "POST", "/api/l2/tx", 413, "body-too-large", data=body,
                       headers={"Content-Type": "application/json"})
    await expect_error(client, "POST", "/api/admin/mint", 413, "body-too-large", data=body,
                       headers={"Content-Type": "application/json", **AUTH})


@pytest.mark.parametrize("body", [b"not json", b"{", b'{"tx": NaN}', b"\xff\xfe\x00", b"[" * 30_000 + b"]" * 30_000])
async def test_reject_non_json_body(client: Client, body: bytes) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", data=body,
                       headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("value", [[], ["tx"], "tx", 1, None, True])
async def test_reject_json_that_is_not_an_object(client: Client, value: Any) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "malformed", data=json.dumps(value),
                       headers={"Content-Type": "application/json"})


async def test_reject_wrong_content_type(client: Client) -> None:
    raw = transfer(1, 4, 10, 0).raw
    await expect_error(client, "POST", "/api/l2/tx", 415, "unsupported-media-type",
                       data=json.dumps({"tx": raw.hex()}), headers={"Content-Type": "text/plain"})
    await expect_error(client, "POST", "/api/l2/tx", 415, "unsupported-media-type", data=raw)


async def test_reject_missing_or_mistyped_field(client: Client) -> None:
    await expect_error(client, "POST", "/api/l2/tx", 400, "missing-field", json={})
    await expect_error(client, "POST", "/api/l2/tx", 400, "missing-field", json={"txn": "00"})
    await expect_error(client, "POST", "/api/l2/tx", 400, "bad-field", json={"tx": 5})
    await expect_error(client, "POST", "/api/l2/tx", 400, "bad-field", json={"tx": ["00"]})


async def test_bad_paths_and_methods(client: Client) -> None:
    await expect_error(client, "GET", "/api/l2/accounts/abc", 400, "malformed")
    await expect_error(client, "GET", "/api/l2/accounts/" + "g" * 64, 400, "malformed")
    await expect_error(client, "GET", "/api/l2/accounts/" + "ab" * 33, 400, "malformed")
    await expect_error(client, "GET", "/api/l2/blocks/99", 404, "not-found")
    await expect_error(client, "GET", "/api/l2/blocks/-1", 400, "malformed")
    await expect_error(client, "GET", "/api/l2/blocks/one", 400, "malformed")
    await expect_error(client, "GET", "/api/l2/blocks/" + "9" * 30, 400, "malformed")
    resp = await client.get("/api/l2/tx/" + "00" * 32)  # the error shape, plus what the daemon knows of it
    assert resp.status == 404
    assert await resp.json() == {"error": "not-found", "message": f"transaction {'00' * 32} is unknown",
                                 "txid": "00" * 32, "status": "unknown"}
    await expect_error(client, "GET", "/api/l2/tx/xyz", 400, "malformed")
    await expect_error(client, "GET", "/nope", 404, "not-found")
    body = await expect_error(client, "GET", "/api/l2/tx", 405, "method-not-allowed")
    assert body["error"] == "method-not-allowed"
    await expect_error(client, "DELETE", "/api/status", 405, "method-not-allowed")


# -- admin authentication and validation -----------------------------------------------------------------------
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789abcdef"},
                                     {"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": "Bearer"},
                                     {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
                                     {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"}])
async def test_admin_requires_the_token(client: Client, headers: dict[str, str]) -> None:
    body = {"recipient": pubkey(4).hex(), "amount_sat": 5}
    requests: list[tuple[str, str, Any]] = [("POST", "/api/admin/mint", body), ("POST", "/api/admin/snapshot", None),
                                            ("GET", "/api/admin/snapshots", None),
                                            ("GET", "/api/admin/snapshots/x.l2snap", None)]
    for method, path, payload in requests:
        resp = await client.request(method, path, headers=headers, json=payload)
        assert resp.status == 401, (path, await resp.text())
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json())["error"] == "unauthorized"
    await expect_error(client, "POST", "/api/admin/mint", 401, "unauthorized", json=body, headers=headers)


async def test_admin_disabled_with_empty_token(tmp_path: Any, make_cfg: Any) -> None:
    node = Node.from_config(make_cfg(tmp_path / "d", api={"admin_token": ""}))
    try:
        async with TestClient(TestServer(node.web_app())) as c:
            resp = await c.post("/api/admin/snapshot", headers={"Authorization": "Bearer "})
            assert resp.status == 401
    finally:
        await node.stop()


@pytest.mark.parametrize("body, code", [
    ({"recipient": "zz", "amount_sat": 5}, "malformed"),
    ({"amount_sat": 5}, "missing-field"),
    ({"recipient": None, "amount_sat": 5}, "bad-field"),
    ({"recipient": "RECIPIENT"}, "missing-field"),
    ({"recipient": "RECIPIENT", "amount_sat": True}, "bad-field"),
    ({"recipient": "RECIPIENT", "amount_sat": 5.0}, "bad-field"),
    ({"recipient": "RECIPIENT", "amount_sat": "5"}, "bad-field"),
    ({"recipient": "RECIPIENT", "amount_sat": 0}, "out-of-range"),
    ({"recipient": "RECIPIENT", "amount_sat": -5}, "out-of-range"),
    ({"recipient": "RECIPIENT", "amount_sat": MAX_MONEY + 1}, "out-of-range"),
    ({"recipient": "RECIPIENT", "amount_sat": 10**30}, "out-of-range"),
    ({"recipient": (5).to_bytes(32, "big").hex(), "amount_sat": 5}, "invalid-transaction"),  # not on the curve
    ([], "malformed"),
])
async def test_admin_mint_validation(client: Client, body: Any, code: str) -> None:
    if isinstance(body, dict) and body.get("recipient") == "RECIPIENT":
        body = {**body, "recipient": pubkey(4).hex()}
    await expect_error(client, "POST", "/api/admin/mint", 400, code, json=body, headers=AUTH)


async def test_admin_mint_forbidden_without_admin_mint(signet_client: Any) -> None:
    node, client = signet_client
    assert node.admission.authority_pubkey is None
    await expect_error(client, "POST", "/api/admin/mint", 403, "forbidden",
                       json={"recipient": pubkey(4).hex(), "amount_sat": 5}, headers=AUTH)
    # and a hand-made mint transaction is refused as well
    mint = sign(SIGNET, secret(1), 0, 0, Mint(pubkey(4), 10), b"\0" * 32)
    await expect_error(client, "POST", "/api/l2/tx", 400, "unauthorized", json={"tx": mint.raw.hex()})


@pytest.mark.parametrize("name", ["..", "../ledger/data.mdb", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                                  "nothing.l2snap", ".hidden", "a%00b"])
async def test_snapshot_download_rejects_unknown_names(client: Client, name: str) -> None:
    resp = await client.post("/api/admin/snapshot", headers=AUTH)
    assert resp.status == 200
    resp = await client.get(f"/api/admin/snapshots/{name}", headers=AUTH)
    assert resp.status in (400, 404), await resp.text()
    assert resp.content_type == "application/json"


async def test_every_mutation_of_a_valid_tx_is_a_400(client: Client) -> None:
    """Each single-bit flip and each truncation of a signed transaction: 400 with a JSON reason, never 5xx."""
    raw = transfer(1, 4, 10, 0).raw
    before = await tip_state(client)
    variants = [raw[:i] for i in range(len(raw))]
    variants += [raw[:i] + bytes([raw[i] ^ (1 << (i % 8))]) + raw[i + 1:] for i in range(len(raw))]
    variants.append(raw[:2] + b"\xff" + raw[3:])  # a type number no subsystem uses
    reasons: set[str] = set()
    for v in variants:
        resp = await client.post("/api/l2/tx", json={"tx": v.hex()})
        assert resp.status == 400, (v.hex(), await resp.text())
        reasons.add((await resp.json())["error"])
    assert await tip_state(client) == before
    assert {"malformed", "bad-signature", "wrong-network", "unknown-version", "unknown-type"} <= reasons


@pytest.mark.parametrize("seed", range(3))
async def test_random_bodies_never_5xx(client: Client, seed: int) -> None:
    rng = random.Random(seed)
    values: list[Any] = [None, True, False, 0, -1, 2**70, 1.5, "", "00", "zz", [], {}, [1, 2], {"a": 1},
                         pubkey(4).hex(), "0" * 5000]
    before = await tip_state(client)
    for _ in range(60):
        fields = rng.sample(["tx", "recipient", "amount_sat", "x"], rng.randint(0, 3))
        body: Any = {k: rng.choice(values) for k in fields}
        if rng.random() < 0.2:
            body = rng.choice(values)
        for path, headers in (("/api/l2/tx", {}), ("/api/admin/mint", AUTH), ("/api/admin/snapshot", AUTH)):
            if rng.random() < 0.3:
                data: bytes = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            else:
                data = json.dumps(body).encode()
            resp = await client.post(path, data=data, headers={"Content-Type": "application/json", **headers})
            assert resp.status < 500, (path, data, await resp.text())
            if resp.status >= 400:
                assert set(await resp.json()) == {"error", "message"}
    # no value above is a valid mint amount, so nothing may have changed
    assert await tip_state(client) == before
