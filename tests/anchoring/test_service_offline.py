"""Anchor service without bitcoind: every K-th block's anchor is built and stored (BUILT), never broadcast."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

from l2d.config import Config
from l2d.core.anchor_format import NO_PREVIOUS, AnchorRecord, TaprootAnchor, op_return_script
from l2d.core.params import REGTEST
from l2d.core.state import ANCHOR_AUTHORITY_KEY
from l2d.node import Node

TOKEN = "offline-anchor-token-000001"


def _config(data: Path, mode: str = "taproot") -> Config:
    return Config.from_dict({
        "node": {"network": "regtest", "data_dir": str(data), "log_level": "DEBUG"},
        "block": {"interval_ms": 20},
        "api": {"port": 0, "admin_token": TOKEN},
        "snapshots": {"every_blocks": 0},
        "anchoring": {"enabled": True, "mode": mode, "every_blocks": 2, "poll_interval_ms": 50},
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
        fed_key = node.admission.federation_pubkey
        assert fed_key is not None and node.store.get_state(ANCHOR_AUTHORITY_KEY) == fed_key
        assert (cfg.anchoring.federation_key_file is not None
                and os.stat(cfg.anchoring.federation_key_file).st_mode & 0o777 == 0o600)
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
        expected = (TaprootAnchor(r4, fed_key).script_pubkey if mode == "taproot" else op_return_script(r4))
        assert svc.anchors[4].script_pubkey == expected.hex()
        latest = await (await client.get("/api/anchors/latest")).json()
        assert latest["l2_height"] >= 4
        assert (await client.get("/api/anchors/2/audit")).status == 404
        assert (await client.get("/api/anchors?status=CONFIRMED")).status == 200
        assert any("NOT broadcast" in r.getMessage() for r in caplog.records)
        # the anchored heights have their snapshot (for audit bundles)
        assert node.snapshots.anchor_snapshot_bytes(2) is not None
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
