"""Orchestration REST bad input (typed 4xx, nothing changed), the [orchestration] config section, and the
coordinator's pure helpers (audit draw, bounty split)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from aiohttp.test_utils import TestClient

from l2d.config import Config, ConfigError
from l2d.core.coin_tx import Transfer
from l2d.core.work_tx import FP_ENTRY, TaskResult, TaskSubmit, WorkerCaps, WorkerRegister
from l2d.node import Node
from orchestration.service import audited, split

IMG = bytes(64)


async def test_rest_rejections_are_typed_and_change_nothing(orch_net: Callable[..., Any]) -> None:
    net = orch_net([])
    state0 = net.get("/api/l2/state")
    bal0 = net.balance(net.client)
    cases = [
        ({"tx": net.sign_client(Transfer(net.federation, 5)).hex()}, "wrong-type"),
        ({"tx": "zz"}, "malformed"),
        ({"tx": 5}, "malformed"),
        ({"tx": "00" * 40}, None),  # too short to be a transaction: a decoding reason
        ({"tx": net.sign_client(TaskSubmit(10**9, 0, 0, b"digits-mlp", b"", IMG)).hex()}, "insufficient-balance"),
    ]
    net._client_nonce = 0  # the refused submissions above consumed no nonce
    for body, code in cases:
        status, reply = net.post("/api/orchestration/submit", body)
        assert status == 400, reply
        if code is not None:
            assert reply["error"] == code, reply
    # A result from a worker that was never assigned (nor registered) is refused at admission.
    fp = b"".join(FP_ENTRY.pack(c, q) for c, q in ((1, 9), (2, 8), (3, 7)))
    net._client_nonce = 0
    status, reply = net.post("/api/l2/tx", {"tx": net.sign_client(TaskResult(b"\1" * 32, b"\1", fp)).hex()})
    assert status == 400 and reply["error"] == "invalid-transaction", reply
    # A malformed registration (region "EU": upper case) is refused while decoding, before any state is read.
    caps = WorkerCaps(0, 0, 10, 0, 0, 1, b"eu", (b"digits-mlp",), b"")
    net._client_nonce = 0
    raw = net.sign_client(WorkerRegister(1000, caps)).replace(b"\x02eu", b"\x02EU")
    status, reply = net.post("/api/l2/tx", {"tx": raw.hex()})
    assert status == 400 and reply["error"] == "out-of-range" and "region" in reply["message"], reply
    assert net.get("/api/l2/state") == state0 and net.balance(net.client) == bal0
    assert net.get("/api/orchestration/tasks")["tasks"] == []
    for path, code in (("/api/orchestration/tasks/xyz", 400), ("/api/orchestration/tasks/" + "00" * 32, 404),
                       ("/api/orchestration/tasks?status=BOGUS", 400),
                       ("/api/orchestration/workers/" + "00" * 32 + "/assignments", 404)):
        import urllib.error
        with pytest.raises(urllib.error.HTTPError) as e:
            net.get(path)
        e.value.close()
        assert e.value.code == code, path


async def test_tasks_status_filter_takes_ascii_names_in_any_case(client: TestClient) -> None:
    """Regression: "ſettled".upper() == "SETTLED", so a name with a non-ASCII letter was taken for a status; only
    the ASCII names, in any case, are (as GET /api/openapi.json says)."""
    for ok in ("SETTLED", "settled", "Result_Submitted"):
        resp = await client.get("/api/orchestration/tasks", params={"status": ok})
        assert resp.status == 200 and (await resp.json())["tasks"] == [], ok
    for bad in ("ſettled", "", "BOGUS"):
        resp = await client.get("/api/orchestration/tasks", params={"status": bad})
        body = await resp.json()
        assert resp.status == 400 and body["error"] == "malformed" and "SETTLED" in body["message"], bad


def _cfg(tmp_path: Path, **orch: Any) -> Config:
    return Config.from_dict({"node": {"network": "local", "data_dir": str(tmp_path / "d")},
                             "orchestration": orch}, tmp_path, env={})


@pytest.mark.parametrize("orch, words", [
    ({"weights": {"reputation": 0.5, "latency": 0.6}}, "orchestration.weights must sum to 1"),
    ({"weights": {"reputation": -0.2, "latency": 1.2}}, "orchestration.weights.reputation = -0.2"),
    ({"weights": {"speed": 1}}, "unknown key orchestration.weights.speed"),
    ({"weights": {"reputation": 0.333333, "latency": 0.666667}}, None),
    ({"weights": {"reputation": "1/3"}}, "orchestration.weights.reputation"),
    ({"weights": {"reputation": 0.1234567, "latency": 0.8765433}}, "multiple of 0.000001"),
    ({"worker_share": 0.9}, "must sum to 1"),
    ({"audit_rate": 1.5}, "orchestration.audit_rate"),
    ({"slash_fraction": True}, "orchestration.slash_fraction"),
    ({"strategy": "random"}, "orchestration.strategy"),
    ({"timeout_blocks": 0}, "orchestration.timeout_blocks"),
    ({"preferred_region": "EU"}, "orchestration.preferred_region"),
    ({"enable": True}, "did you mean orchestration.enabled"),
])
def test_config_errors_name_the_key(tmp_path: Path, orch: dict[str, Any], words: str | None) -> None:
    if words is None:
        assert dict(_cfg(tmp_path, **orch).orchestration.weights_ppm)["reputation"] == 333_333
        return
    with pytest.raises(ConfigError, match=words.replace(".", r"\.").replace("(", r"\(")):
        _cfg(tmp_path, **orch)


def test_config_defaults_and_exact_fractions(tmp_path: Path) -> None:
    o = _cfg(tmp_path, weights={"reputation": 0.7, "cost": 0.3}, audit_rate="0.25").orchestration
    assert not o.enabled and o.strategy == "weighted" and o.audit_rate_ppm == 250_000
    assert dict(o.weights_ppm) == {"reputation": 700_000, "latency": 0, "capacity": 0, "cost": 300_000, "region": 0,
                                   "green": 0}
    assert o.worker_share_ppm + o.verifier_share_ppm + o.treasury_share_ppm == 1_000_000


async def test_enabled_without_a_bridge_coordinates_as_this_member(tmp_path: Path) -> None:
    """The coordinator needs no Bitcoin key (no [bridge]): it posts with this member's key."""
    node = Node.from_config(_cfg(tmp_path, enabled=True))
    try:
        assert node.federation is None and not node.genesis.signer_secrets
        await node.start(serve_http=False)
        assert node.orchestration_service is not None
    finally:
        await node.stop()


@pytest.mark.parametrize("bounty", [1, 7, 99, 100_000, 12_345_679])
def test_split_always_sums_to_the_bounty(tmp_path: Path, bounty: int) -> None:
    cfg = _cfg(tmp_path, worker_share=0.7, verifier_share=0.2, treasury_share=0.1).orchestration
    for with_verifier in (True, False):
        w, v, t = split(bounty, cfg, with_verifier)
        assert w + v + t == bounty and min(w, v, t) >= 0
        assert (v == 0) == (not with_verifier or bounty * 2 // 10 == 0)


def test_audit_draw_is_deterministic_and_follows_the_rate() -> None:
    ids = [i.to_bytes(32, "big") for i in range(2000)]
    assert not any(audited(t, 0) for t in ids) and all(audited(t, 1_000_000) for t in ids)
    share = sum(audited(t, 250_000) for t in ids) / len(ids)
    assert 0.2 < share < 0.3
    assert [audited(t, 250_000) for t in ids] == [audited(t, 250_000) for t in ids]


def _agent(*args: str) -> "subprocess.CompletedProcess[str]":
    repo = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-m", "orchestration.agent", *args], capture_output=True, text=True,
                          cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), timeout=120)


def test_agent_refuses_a_bad_key_file(tmp_path: Path) -> None:
    kf = tmp_path / "w.key"
    kf.write_text("not hex\n")
    r = _agent("--node", "http://127.0.0.1:9", "--key-file", str(kf))
    assert r.returncode == 1 and "must hold a valid secp256k1 secret" in r.stderr


def test_agent_exits_cleanly_when_the_node_is_unreachable(tmp_path: Path, model_cache: Path) -> None:
    r = _agent("--node", "http://127.0.0.1:9", "--key-file", str(tmp_path / "new.key"), "--model-cache",
               str(model_cache))
    assert r.returncode == 1 and "cannot reach the node" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "new.key").stat().st_mode & 0o077 == 0  # a fresh key file, private


async def test_client_submits_and_cancels_a_task_the_bounty_comes_back(orch_net: Callable[..., Any],
                                                                      poll: Callable[..., Any]) -> None:
    import json

    from orchestration import client
    net = orch_net([])  # no workers: the task waits, SUBMITTED
    kf = net.tmp / "client.key"
    kf.write_text(net.client_secret.hex())
    base = ["--node", net.url, "--key-file", str(kf)]
    bal0 = net.balance(net.client)
    assert client.main(base + ["submit", "--bounty", "5000", "--digits", "10", "11"]) == 0
    tasks = await poll(lambda: net.get("/api/orchestration/tasks")["tasks"], 30, "the task committed")
    tid = tasks[0]["task_id"]
    assert tasks[0]["status"] == "SUBMITTED" and tasks[0]["spec"]["images"] == 2
    assert net.balance(net.client) == bal0 - 5000 - 1
    assert client.main(base + ["cancel", tid]) == 0
    await poll(lambda: net.task(tid)["status"] == "CANCELLED", 30, "the task cancelled")
    assert net.balance(net.client) == bal0 - 2  # the bounty is back; two fees paid
    assert client.main(base + ["cancel", tid]) == 1  # refused: nothing changes
    assert client.main(base + ["submit", "--bounty", "5", "--digits", "5000"]) == 1
    assert client.main(["--node", net.url, "show", tid]) == 0
    assert json.loads(json.dumps(net.task(tid)))["outcome"] == "CANCELLED"
