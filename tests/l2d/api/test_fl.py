"""REST of the FL subsystem on an in-process node: jobs, rounds, rewards, the content-addressed model store, and
every refused request answered with a typed error that changes nothing."""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

from l2d.client import ApiError
from l2d.client import Client as DaemonClient
from l2d.config import Config
from l2d.core import tx as T
from l2d.core.fl import RoundRecord
from l2d.core.fl_tx import FlJobPost, FlRegister
from l2d.core.params import LOCAL
from l2d.core.tree import Proof, verify_proof
from l2d.node import Node
from tests.l2d.api.test_openapi import assert_conforms

TOKEN = "fl-api-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POOL = 50_000
Client = TestClient[web.Request, web.Application]


def secret(n: int) -> bytes:
    return hashlib.sha256(b"fl api key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def node_key(n: int) -> str:
    import base64

    return "ecdsa-sha2-nistp384 " + base64.b64encode(hashlib.sha512(b"api node %d" % n).digest()).decode()


@pytest.fixture
async def nc(tmp_path: Path) -> AsyncIterator[tuple[Node, Client]]:
    cfg = Config.from_dict({
        "node": {"network": "local", "data_dir": str(tmp_path / "data"), "log_level": "DEBUG"},
        "chain": {"min_fee_sat": 1, "genesis_alloc": {pk(n).hex(): 1_000_000 for n in (1, 2, 3, 4)}},
        "block": {"interval_ms": 50, "max_txs": 100},
        "api": {"host": "127.0.0.1", "port": 0, "admin_token": TOKEN},
        "snapshots": {"every_blocks": 0},
        "anchoring": {"enabled": False},
    }, tmp_path, env={})
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        yield node, client
    finally:
        await client.close()
        await node.stop()


async def until(cond: Any, what: str, timeout: float = 20.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = await cond()
        if v:
            return v
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def get(c: Client, path: str) -> tuple[int, Any]:
    r = await c.get(path)
    body = await r.json() if r.content_type == "application/json" else await r.read()
    assert_conforms("GET", path, r.status, r.content_type, body)  # as GET /api/openapi.json describes it
    return r.status, body


async def post(c: Client, path: str, body: Any, headers: dict[str, str] = AUTH) -> tuple[int, Any]:
    r = await c.post(path, json=body, headers=headers)
    out = await r.json()
    assert_conforms("POST", path, r.status, r.content_type, out)
    return r.status, out


async def signed(node: Node, c: Client, n: int, payload: Any) -> str:
    status, acc = await get(c, f"/api/l2/accounts/{pk(n).hex()}")
    raw = T.sign(LOCAL, secret(n), acc["nonce"], 1, payload, os.urandom(32)).raw
    status, out = await post(c, "/api/l2/tx", {"tx": raw.hex()}, {})
    assert status == 202, out
    return str(out["txid"])


async def job_with_participants(node: Node, c: Client) -> str:
    jid = await signed(node, c, 1, FlJobPost(POOL, b"\1" * 32, 2, 1, 3))
    await until(lambda: _status_is(c, f"/api/fl/jobs/{jid}", 200), "job posted")
    for n in (2, 3):
        await signed(node, c, n, FlRegister(bytes.fromhex(jid), node_key(n).encode()))
    await until(lambda: _participants(c, jid, 2), "registrations")
    return jid


async def _status_is(c: Client, path: str, status: int) -> bool:
    return (await get(c, path))[0] == status


async def _participants(c: Client, jid: str, n: int) -> bool:
    return len((await get(c, f"/api/fl/jobs/{jid}"))[1]["participants"]) == n


def round_body(rnd: int, params: str, prev: str, parts: list[tuple[int, int, bool]], **kw: Any) -> dict[str, Any]:
    body = {"round": rnd, "params_hash": params, "prev_params_hash": prev, "accuracy_ppm": 900_000,
            "loss_ppm": 300_000, "update_bytes": 1000, "dp_epsilon_ppm": 0,
            "participants": [{"key": pk(n).hex(), "num_examples": ex, "accepted": a} for n, ex, a in parts]}
    body.update(kw)
    return body


async def test_job_rounds_models_and_rewards_over_rest(nc: tuple[Node, Client]) -> None:
    node, c = nc
    jid = await job_with_participants(node, c)
    status, jobs = await get(c, "/api/fl/jobs")
    assert status == 200 and [j["job_id"] for j in jobs["jobs"]] == [jid]
    model = b"L2FLPARM fake parameter bytes"
    h = hashlib.sha256(model).hexdigest()
    r = await c.put("/api/fl/models", data=model, headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status == 201 and (await r.json())["params_hash"] == h
    status, out = await post(c, f"/api/fl/jobs/{jid}/rounds", round_body(1, h, "00" * 32, [(2, 100, True), (3, 40, False)]))
    assert status == 202, out
    await until(lambda: _rounds_done(c, jid, 1), "round 1 committed")
    status, raw = await get(c, f"/api/fl/models/{h}")
    assert status == 200 and hashlib.sha256(raw).hexdigest() == h
    status, j = await get(c, f"/api/fl/jobs/{jid}")
    (rd,) = j["rounds_detail"]
    assert rd["params_hash"] == h and rd["model_available"] and rd["metrics"]["accuracy_ppm"] == 900_000
    assert j["rewards"] == {pk(2).hex(): POOL} and not j["rewards_final"]
    # an auditor checks the round against a state root, then the model against the committed hash
    status, pr = await get(c, f"/api/fl/jobs/{jid}/rounds/1")
    assert status == 200
    value = verify_proof(bytes.fromhex(pr["state_root"]), Proof.decode(bytes.fromhex(pr["proof"])))
    assert value is not None and value.hex() == pr["value"]
    assert RoundRecord.decode(value).commitment.params_hash.hex() == h == pr["params_hash"]
    status, blk = await get(c, f"/api/l2/blocks/{pr['tip_height']}")
    assert status == 200 and blk["state_root"] == pr["state_root"]  # the root a block header commits to
    status, out = await post(c, f"/api/fl/jobs/{jid}/finish", {})
    assert status == 202 and out["rewards"] == {pk(2).hex(): POOL}
    await until(lambda: _finished(c, jid), "job finished")
    status, j = await get(c, f"/api/fl/jobs/{jid}")
    assert j["final_model"] == h and j["paid_sat"] == POOL and j["rewards_final"]
    assert (await get(c, f"/api/l2/accounts/{pk(2).hex()}"))[1]["balance_sat"] == 1_000_000 - 1 + POOL
    assert (await get(c, f"/api/l2/accounts/{pk(3).hex()}"))[1]["balance_sat"] == 1_000_000 - 1
    # a second finish of the committed job is refused by the ledger's rules: that duty is done
    status, out = await post(c, f"/api/fl/jobs/{jid}/finish", {})
    assert status == 400 and out["error"] == "duplicate-duty" and "finished already" in out["message"]


async def _rounds_done(c: Client, jid: str, n: int) -> bool:
    return (await get(c, f"/api/fl/jobs/{jid}"))[1]["rounds_done"] == n


async def _finished(c: Client, jid: str) -> bool:
    return (await get(c, f"/api/fl/jobs/{jid}"))[1]["status"] == "FINISHED"


async def test_refused_requests_are_typed_and_change_nothing(nc: tuple[Node, Client]) -> None:
    node, c = nc
    jid = await job_with_participants(node, c)
    model = b"some parameters"
    h = hashlib.sha256(model).hexdigest()
    r = await c.put("/api/fl/models", data=model, headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status == 201
    before = (await get(c, f"/api/fl/jobs/{jid}"))[1]
    pending = len(node.mempool)
    ok = round_body(1, h, "00" * 32, [(2, 100, True)])
    missing = hashlib.sha256(b"never uploaded").hexdigest()
    cases: list[tuple[str, str, Any, dict[str, str], int, str]] = [
        ("GET", "/api/fl/jobs/xyz", None, {}, 400, "malformed"),
        ("GET", f"/api/fl/jobs/{'ab' * 32}", None, {}, 404, "not-found"),
        ("GET", "/api/fl/models/ABC", None, {}, 400, "malformed"),
        ("GET", f"/api/fl/models/{missing}", None, {}, 404, "not-found"),
        ("GET", f"/api/fl/jobs/{jid}/rounds/1", None, {}, 404, "not-found"),
        ("GET", f"/api/fl/jobs/{jid}/rounds/0", None, {}, 400, "malformed"),
        ("GET", f"/api/fl/jobs/{jid}/rounds/x", None, {}, 400, "malformed"),
        ("GET", f"/api/fl/jobs/{jid}/rounds/%C2%B2", None, {}, 400, "malformed"),  # '²': str.isdigit() says yes
        ("GET", f"/api/fl/jobs/{jid}/rounds/%D9%A1", None, {}, 400, "malformed"),  # Arabic-Indic one, int() reads 1
        ("GET", f"/api/fl/jobs/{jid}/rounds/65536", None, {}, 400, "malformed"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", ok, {}, 401, "unauthorized"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", ok, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ("POST", f"/api/fl/jobs/{jid}/finish", {}, {}, 401, "unauthorized"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", [1], AUTH, 400, "malformed"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", {**ok, "round": "1"}, AUTH, 400, "bad-field"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", {**ok, "accuracy_ppm": 1_000_001}, AUTH, 400, "bad-field"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", {**ok, "params_hash": "zz"}, AUTH, 400, "bad-field"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", {**ok, "participants": []}, AUTH, 400, "bad-field"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", {**ok, "participants": [{"key": pk(2).hex(), "num_examples": 1}]},
         AUTH, 400, "bad-field"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", round_body(1, h, "00" * 32, [(2, 1, True), (2, 2, True)]), AUTH, 400,
         "out-of-range"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", round_body(1, h, "00" * 32, [(2, 0, True)]), AUTH, 400, "out-of-range"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", round_body(1, missing, "00" * 32, [(2, 1, True)]), AUTH, 409, "conflict"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", round_body(2, h, "00" * 32, [(2, 1, True)]), AUTH, 400,
         "invalid-transaction"),
        ("POST", f"/api/fl/jobs/{jid}/rounds", round_body(1, h, "00" * 32, [(4, 1, True)]), AUTH, 400,
         "invalid-transaction"),
        ("POST", f"/api/fl/jobs/{'ab' * 32}/rounds", ok, AUTH, 400, "invalid-transaction"),
        ("POST", f"/api/fl/jobs/{'ab' * 32}/finish", {}, AUTH, 404, "not-found"),
    ]
    for method, path, body, headers, status, code in cases:
        r = await c.request(method, path, json=body, headers=headers)
        out = await r.json()
        assert (r.status, out["error"]) == (status, code), (method, path, body, out)
        assert out["message"]
    r = await c.put("/api/fl/models", data=b"", headers={**AUTH, "Content-Type": "application/octet-stream"})
    assert r.status == 400 and (await r.json())["error"] == "malformed"
    r = await c.put("/api/fl/models", data=b"x", headers={"Content-Type": "application/octet-stream"})
    assert r.status == 401
    assert len(node.mempool) == pending
    assert (await get(c, f"/api/fl/jobs/{jid}"))[1] | {"height": 0} == before | {"height": 0}
    # a damaged file in the store is never served under a name it does not have
    path = Path(node.config.node.data_dir) / "fl-models" / f"{h}.params"
    path.write_bytes(b"tampered")
    status, out = await get(c, f"/api/fl/models/{h}")
    assert status == 500 and out["error"] == "corrupt"


async def test_l2_recorder_refuses_unmapped_nodes_and_fetches_checkpoints_from_the_store(
        nc: tuple[Node, Client], tmp_path: Path) -> None:
    from federated import model as fl_model
    from federated.l2 import L2Recorder
    from federated.recorder import Participant, RoundCommitment

    node, c = nc
    jid = await job_with_participants(node, c)
    api = DaemonClient(str(c.make_url("")).rstrip("/"), TOKEN)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    arrays = fl_model.get_ndarrays(fl_model.new_model(0))
    raw = fl_model.canonical_bytes(arrays)
    h = fl_model.params_hash(arrays)
    (ckpt / f"{h}.params").write_bytes(raw)
    rec = L2Recorder(api, jid, {7: pk(2).hex(), 8: pk(3).hex()}, ckpt)
    stranger = RoundCommitment(jid, 1, h, "00" * 32, "fedavg", (Participant(7, 10, True), Participant(99, 10, True)),
                               {"accuracy": 0.5})
    with pytest.raises(ApiError, match="no L2 registration"):
        await asyncio.to_thread(rec.record, stranger)
    assert (await get(c, f"/api/fl/jobs/{jid}"))[1]["rounds_done"] == 0
    assert await asyncio.to_thread(rec.last, jid) is None
    ok = RoundCommitment(jid, 1, h, "00" * 32, "fedavg", (Participant(7, 10, True), Participant(8, 0, False)),
                         {"accuracy": 0.5, "loss": 1.25, "update_bytes": 9640.0})
    await asyncio.to_thread(rec.record, ok)  # returns once the round is in a block
    j = (await get(c, f"/api/fl/jobs/{jid}"))[1]
    assert j["rounds_done"] == 1 and j["rounds_detail"][0]["metrics"]["loss_ppm"] == 1_250_000
    # A coordinator that lost its disk resumes from the L2: the checkpoint comes back from the model store.
    (ckpt / f"{h}.params").unlink()
    last = await asyncio.to_thread(rec.last, jid)
    assert last is not None and (last.round, last.params_hash) == (1, h)
    assert (ckpt / f"{h}.params").read_bytes() == raw
    # ... and bytes that do not hash to the committed name are never accepted.
    (ckpt / f"{h}.params").unlink()
    (Path(node.config.node.data_dir) / "fl-models" / f"{h}.params").write_bytes(b"tampered")
    with pytest.raises(ApiError, match="corrupt"):
        await asyncio.to_thread(rec.last, jid)
    assert not (ckpt / f"{h}.params").exists()
    # finish() waits for the last round: with rounds left it changes nothing
    assert (await asyncio.to_thread(rec.finish, jid))["status"] == "OPEN"
