"""Anchor service without bitcoind: every K-th block's anchor is built and stored (BUILT), never broadcast."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

from anchoring.service import Anchor, AnchorService, AnchorState
from l2d.config import Config
from l2d.core.anchor_format import NO_PREVIOUS, AnchorRecord, op_return_script
from l2d.core.params import REGTEST
from l2d.core.pegs import Federation
from l2d.core.plans import anchor_output
from l2d.core.state import FEDERATION_MEMBERS_KEY
from l2d.node import Node

TOKEN = "offline-anchor-token-000001"


def _config(data: Path, mode: str = "taproot") -> Config:
    return Config.from_dict({
        "node": {"network": "regtest", "data_dir": str(data), "log_level": "DEBUG"},
        "block": {"interval_ms": 20},
        "api": {"port": 0, "admin_token": TOKEN},
        "snapshots": {"every_blocks": 0},
        "anchoring": {"enabled": True, "mode": mode, "every_blocks": 2, "poll_interval_ms": 50},
        # the federation whose k-of-n output carries the anchor: one signer key, created 0600 on regtest
        "bridge": {"enabled": True, "threshold": 1, "signer_key_files": [str(data.parent / "signer.key")]},
    }, data.parent, env={})


async def _mint_blocks(node: Node, n: int, poll: Callable[..., Awaitable[Any]]) -> None:
    user = PrivateKey(hashlib.sha256(b"offline user").digest()).public_key_xonly.format()
    for _ in range(n):
        h = node.chain.tip.height
        node.admission.mint(user, 1000)
        await poll(lambda: node.chain.tip.height > h, 10, "a block")


@pytest.mark.parametrize("mode", ["taproot", "op_return"])
async def test_builds_and_stores_payloads_without_bitcoind(tmp_path: Path, mode: str,
                                                           poll: Callable[..., Awaitable[Any]],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cfg = _config(tmp_path / "data", mode)
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        # the anchor's Bitcoin keys are the bridge's (k-of-n); the L2 authorities are the members (this 1-member
        # federation), with keys of their own
        fed = node.federation
        assert fed is not None and node.admission.member_pubkey not in [k[1:] for k in fed.keys]
        assert node.store.get_state(FEDERATION_MEMBERS_KEY) == b"\x01" + node.admission.member_pubkey
        assert os.stat(tmp_path / "signer.key").st_mode & 0o777 == 0o600
        await _mint_blocks(node, 4, poll)

        async def two_built() -> Any:
            r = await client.get("/api/anchors")
            body = await r.json()
            return len(body["anchors"]) >= 2 and body
        body = await poll(two_built, 10, "two BUILT anchors")
        assert body["broadcasting"] is False
        a2, a4 = body["anchors"][:2]
        assert (a2["l2_height"], a4["l2_height"]) == (2, 4)
        assert {a2["status"], a4["status"]} == {"BUILT"} and a2["txid"] is None and a2["l2_state"] is None
        # the records commit to the blocks' roots and chain to each other
        for a in (a2, a4):
            blk = node.ledger.block(a["l2_height"])
            assert blk is not None and a["state_root"] == blk.header.state_root.hex()
        r2 = AnchorRecord.decode(bytes.fromhex(a2["record"]), REGTEST)
        r4 = AnchorRecord.decode(bytes.fromhex(a4["record"]), REGTEST)
        assert r2.prev_link == NO_PREVIOUS and r4.prev_link == r2.link
        svc = node.anchor_service
        assert svc is not None
        expected = (anchor_output(fed, r4.link).script_pubkey if mode == "taproot" else op_return_script(r4))
        assert svc.anchors[4].script_pubkey == expected.hex()
        latest = await (await client.get("/api/anchors/latest")).json()
        assert latest["l2_height"] >= 4
        assert (await client.get("/api/anchors/2/audit")).status == 404
        assert (await client.get("/api/anchors?status=CONFIRMED")).status == 200
        assert any("NOT broadcast" in r.getMessage() for r in caplog.records)
        # no bitcoind: no anchor can be confirmed, so no audit bundle can need a snapshot; none is written
        assert node.snapshots.anchor_snapshot_bytes(2) is None and not node.snapshots.anchor_dir.exists()
        # the stage metrics: each BUILT anchor timed from its L2 block's commit, no later stage reached
        metrics = await (await client.get("/metrics")).text()
        built = [ln for ln in metrics.splitlines() if ln.startswith('l2d_anchor_stage_seconds_count{stage="BUILT"}')]
        assert len(built) == 1 and int(built[0].rsplit(" ", 1)[1]) >= 2
        assert 'stage="SUBMITTED"' not in metrics
    finally:
        await client.close()
        await node.stop()
    assert not node.failed

    # a restart reloads the stored anchors
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    try:
        svc = node.anchor_service
        assert svc is not None and {2, 4} <= set(svc.anchors)
    finally:
        await node.stop()


async def test_anchors_endpoint_404_when_disabled(tmp_path: Path) -> None:
    cfg = Config.from_dict({"node": {"network": "local", "data_dir": str(tmp_path / "d")}}, tmp_path, env={})
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        assert (await client.get("/api/anchors")).status == 404
        assert (await client.get("/api/anchors/latest")).status == 404
    finally:
        await client.close()
        await node.stop()


async def test_anchors_status_filter_refuses_what_is_not_a_status(tmp_path: Path,
                                                                   poll: Callable[..., Awaitable[Any]]) -> None:
    """Regression (found by schemathesis, tests/l2d/api/test_openapi.py): ?status= with anything but a status was
    answered 200 with an empty list, as if no anchor had it; now 400 malformed naming the statuses."""
    node = Node.from_config(_config(tmp_path / "data"))
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        await _mint_blocks(node, 2, poll)

        async def built() -> Any:
            return (await (await client.get("/api/anchors?status=BUILT")).json())["anchors"]
        assert [a["l2_height"] for a in await poll(built, 10, "a BUILT anchor")] == [2]
        assert [a["l2_height"] for a in (await (await client.get("/api/anchors?status=built")).json())["anchors"]] \
            == [2]  # any case
        assert (await (await client.get("/api/anchors?status=FINAL")).json())["anchors"] == []
        for bad in ("", "BOGUS", "BUILT ", "ﬁnal"):  # "ﬁnal".upper() == "FINAL": ASCII letters only
            resp = await client.get("/api/anchors", params={"status": bad})
            body = await resp.json()
            assert resp.status == 400 and body["error"] == "malformed" and "BUILT" in body["message"], bad
    finally:
        await client.close()
        await node.stop()


@pytest.mark.parametrize("statuses,files,keep_final,needed", [
    # FINAL 10/20/30, CONFIRMED 40, SUBMITTED 50; 5 and 15 were skipped; 55..70 came after the last anchor
    ({10: "FINAL", 20: "FINAL", 30: "FINAL", 40: "CONFIRMED", 50: "SUBMITTED"},
     [5, 10, 15, 20, 30, 40, 50, 55, 60, 70], 2, {20, 30, 40, 50, 70}),
    ({10: "FINAL", 20: "FINAL", 30: "FINAL", 40: "CONFIRMED", 50: "SUBMITTED"},
     [5, 10, 15, 20, 30, 40, 50, 55, 60, 70], 0, {40, 50, 70}),
    ({10: "FINAL", 20: "FINAL"}, [10, 20], 5, {10, 20}),
    # built without bitcoind: only the newest BUILT one may still be broadcast (waiting for funds)
    ({10: "BUILT", 20: "BUILT", 30: "BUILT"}, [10, 20, 30], 2, {30}),
    ({10: "BUILT", 20: "SUBMITTED"}, [10, 20, 25], 2, {20, 25}),
    ({}, [2, 4, 6], 2, {6}),  # no anchor yet: the newest height is the next anchor's candidate
    ({10: "CONFIRMED"}, [], 2, set()),  # a needed height without a file is not invented
    # heights above the final one are not final yet: each may become the next candidate (final height 11 here)
    ({10: "FINAL"}, [10, 11, 12, 13], 1, {10, 11, 12, 13}),
    ({}, [2, 4, 9, 11, 12], 2, {11, 12}),
])
def test_anchored_snapshots_needed(tmp_path: Path, statuses: dict[int, str], files: list[int], keep_final: int,
                                   needed: set[int]) -> None:
    final_height = 11 if files[-1:] in ([13], [12]) else max(files, default=0)
    cfg = _config(tmp_path / "data")
    fed = Federation(1, (PrivateKey(b"\x01" * 32).public_key.format(),), 6)
    svc = AnchorService(config=cfg.anchoring, network=REGTEST, federation=fed, rpc=None, store=None,
                        tip=lambda: SimpleNamespace(height=final_height),  # type: ignore[arg-type,return-value]
                        header_at=lambda h: None, submit_update=lambda u: None, snapshot_bytes=lambda h: None)
    svc.anchors = {h: Anchor(l2_height=h, state_root="", record="", mode="taproot", status=AnchorState(s),
                             script_pubkey="") for h, s in statuses.items()}
    assert svc.anchored_snapshots_needed(files, keep_final) == needed
