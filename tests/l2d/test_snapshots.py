"""Anchored snapshots against a real regtest bitcoind, in a real in-process node: written while anchors are
broadcast, kept only while an audit bundle may still need them, and held to snapshots.anchored_max_bytes."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from coincurve import PrivateKey

from anchoring.service import AnchorService, AnchorState
from bridge.rpc import BitcoinRPC
from l2d.config import Config
from l2d.core.audit import AuditBundle, ProofEvidence, SnapshotEvidence, verify_bundle
from l2d.core.chains import btc_chain
from l2d.core.params import REGTEST
from l2d.core.snapshot import list_snapshots
from l2d.node import Node
from regtest.harness import BitcoindNode, fund_wallet
from regtest.members import fund_node

USER = PrivateKey(hashlib.sha256(b"l2d anchored snapshots test user").digest()).public_key_xonly.format()
Poll = Callable[..., Awaitable[Any]]


def config(tmp_path: Path, btc: BitcoindNode, **snapshots: int) -> Config:
    return Config.from_dict({
        "node": {"network": "regtest", "data_dir": str(tmp_path / "data"), "log_level": "DEBUG"},
        "block": {"interval_ms": 20},
        "snapshots": {"every_blocks": 0, **snapshots},
        "anchoring": {"enabled": True, "every_blocks": 1, "confirmations": 1, "final_confirmations": 2,
                      "poll_interval_ms": 100},
        # the federation whose k-of-n outputs carry the anchors (one key here), funded by fund()
        "bridge": {"enabled": True, "threshold": 1, "signer_key_files": [str(tmp_path / "signer.key")],
                   "pegin_min_depth": 1, "poll_interval_ms": 100},
        "bitcoind": {"rpc_url": btc.rpc_url, "cookie_file": str(btc.cookie_path)},
    }, tmp_path, env={})


async def fund(node: Node, rpc: BitcoinRPC) -> str:
    """The federation's funding coin (it pays the anchors); returns the miner's address."""
    w, addr = await fund_wallet(rpc, "miner")
    await fund_node(node, rpc, w, addr, 5_000_000)
    return addr


def files(node: Node) -> list[int]:
    d = node.snapshots.anchor_dir
    return [h for h, _ in list_snapshots(d, REGTEST)] if d.exists() else []


def service(node: Node) -> AnchorService:
    svc = node.anchor_service
    assert svc is not None and svc.broadcasting
    return svc


async def anchor_rounds(node: Node, rpc: BitcoinRPC, addr: str, poll: Poll, rounds: int) -> list[int]:
    """Each round: an L2 block, its anchor submitted (the anchor plan starts once the previous one is FINAL: Bitcoin
    blocks are mined until it is), one Bitcoin block (CONFIRMED)."""
    svc = service(node)
    done: list[int] = []
    for _ in range(rounds):
        h = node.chain.tip.height
        node.admission.mint(USER, 1000)
        await poll(lambda: node.chain.tip.height > h, 20, "an L2 block")
        last = done[-1] if done else 0

        async def submitted() -> Any:
            x = svc.latest()
            if x is not None and x.l2_height > last and x.status == AnchorState.SUBMITTED:
                return x
            if last and svc.anchors[last].status != AnchorState.FINAL:
                await rpc.generatetoaddress(1, addr)
            return None
        a = await poll(submitted, 60, "a new anchor submitted")
        done.append(a.l2_height)
        await rpc.generatetoaddress(1, addr)
        await poll(lambda: svc.anchors[a.l2_height].status == AnchorState.CONFIRMED, 30, "the anchor confirmed")
    return done


async def test_anchored_snapshots_follow_the_anchors_and_the_byte_budget(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Poll,
        caplog: pytest.LogCaptureFixture) -> None:
    node = Node.from_config(config(tmp_path, bitcoind, anchored_keep_final=1))
    await node.start(serve_http=False)
    try:
        addr = await fund(node, rpc)
        svc = service(node)
        a1, a2, a3, a4 = await anchor_rounds(node, rpc, addr, poll, 4)
        await poll(lambda: svc.anchors[a3].status == AnchorState.FINAL, 30, "the third anchor FINAL")

        def as_the_rule_says() -> bool:
            fs, anchors = files(node), svc.anchors
            top = max(anchors)
            return (a1 not in fs and a2 not in fs  # FINAL, and older than the newest FINAL one
                    and {a3, a4} <= set(fs)  # the newest FINAL one; CONFIRMED
                    and all(anchors[h].status != AnchorState.FINAL or h == a3 for h in fs if h in anchors)
                    and all(h in anchors for h in fs if h < top)  # heights skipped by the anchors: gone
                    # above the newest anchor: the next one's candidate (the newest final height) and the
                    # non-final tip, which may become it
                    and len([h for h in fs if h > top]) <= 2 and [h for h in fs if h > node.chain.tip.height] == [])
        await poll(as_the_rule_says, 30, f"the anchored snapshots to follow the rule (files {files(node)}, anchors "
                   f"{ {h: a.status.value for h, a in svc.anchors.items()} }, tip {node.chain.tip.height}, final "
                   f"{node.chain.final.height})")

        # a bundle still carries its snapshot; one whose snapshot was pruned carries the state root, and verifies
        params = btc_chain(REGTEST).spv
        with_snapshot = AuditBundle.decode(await svc.audit_bundle(a3) or b"")
        without = AuditBundle.decode(await svc.audit_bundle(a1) or b"")
        assert isinstance(with_snapshot.evidence, SnapshotEvidence)
        assert isinstance(without.evidence, ProofEvidence)
        assert without.evidence.state_root.hex() == svc.anchors[a1].state_root
        for bundle in (with_snapshot, without):
            verify_bundle(bundle, REGTEST, params, None, 1)
    finally:
        await node.stop()
    assert not node.failed

    # restarted with a budget that holds only the newest file: the oldest go first, at start
    sizes = {h: p.stat().st_size for h, p in list_snapshots(node.snapshots.anchor_dir, REGTEST)}
    assert len(sizes) >= 2
    newest = max(sizes)
    node = Node.from_config(config(tmp_path, bitcoind, anchored_keep_final=1, anchored_max_bytes=sizes[newest]))
    await node.start(serve_http=False)
    try:
        assert files(node) == [newest]
        assert any(r.levelno == logging.WARNING and r.getMessage().startswith(
            f"anchored snapshots over snapshots.anchored_max_bytes ({sizes[newest]}): deleting the "
            f"{len(sizes) - 1} oldest") for r in caplog.records)
    finally:
        await node.stop()
    assert not node.failed
