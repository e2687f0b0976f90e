"""The consensus host on a 1-member federation (what `make run` is): every block carries the member's commit, a
non-final tip is made final by one empty child, the signer state is written before a signature leaves, and the
exported chain file passes the auditor's check. And a member of four catching up on a block it held without a
transaction's body."""
from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import aiohttp
import pytest
from aiohttp import web
from coincurve import PrivateKey

from bridge.claims import Refusal
from l2d import consensus
from l2d.config import Config
from l2d.consensus import EVIDENCE_FILE
from l2d.core.chain_file import ChainBadCommitSignature, verify_chain
from l2d.core.commit import Commit, sign_block
from l2d.core.genesis_file import FederationGenesis
from l2d.core.params import LOCAL
from l2d.core.payload import TxType
from l2d.federation.errors import StaleSignerState
from l2d.federation.messages import AUX, Candidate, CompleteBlock, sign_message
from l2d.federation.signer import SIGNER_FILE, load_state
from l2d.federation.transport import Handlers, Peer, Transport
from l2d.federation.transport import routes as transport_routes
from l2d.genesis import NodeError
from l2d.node import Node
from tests.l2d.federation_procs import Federation
from tests.l2d.federation_procs import transfer as fed_transfer
from tests.l2d.test_node import transfer


async def _submitted_and_committed(node: Node, n: int, poll: Callable[..., Any]) -> list[Any]:
    """n transfers submitted to node, waited for until committed."""
    txs = [transfer(1, 4, 10, i) for i in range(n)]
    for t in txs:
        node.admission.submit(t.raw)
    await _committed(node, txs, poll)
    return txs


async def _committed(node: Node, txs: list[Any], poll: Callable[..., Any]) -> None:
    await poll(lambda: all(node.store.tx_location(t.txid) is not None for t in txs), 30, "transactions committed")


async def test_every_block_carries_the_member_commit_and_an_empty_child_makes_the_tip_final(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any]) -> None:
    cfg = make_cfg(tmp_path / "data")
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    try:
        txs = await _submitted_and_committed(node, 3, poll)
        height = node.store.tx_location(txs[-1].txid)[0]  # type: ignore[index]
        # nothing more to include: one empty block follows, so the block with the transactions becomes final
        await poll(lambda: node.chain.final.height >= height, 30, "the last transaction's block final")
        tip = node.chain.tip
        assert node.chain.final.height == tip.height - 1
        assert node.ledger.block(tip.height).header.tx_count == 0  # type: ignore[union-attr]
        members = node.genesis.membership
        for h in range(1, tip.height + 1):
            commit = node.chain.block_commit(h, members.n)
            blk = node.ledger.block(h)
            assert commit is not None and blk is not None and commit.signers == (0,)
            commit.verify(members, LOCAL, blk.header.hash)
        signed = load_state(node.datadir.path / SIGNER_FILE, LOCAL, members.keys[0]).signed
        assert signed is not None and signed.height == tip.height and signed.block_hash == tip.hash
    finally:
        await node.stop()


async def test_the_exported_chain_file_passes_the_auditors_check(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any]) -> None:
    node = Node.from_config(make_cfg(tmp_path / "data"))
    await node.start(serve_http=True)
    try:
        txs = await _submitted_and_committed(node, 2, poll)
        await poll(lambda: node.chain.final.height >= 1, 30, "a final block")
        block0 = node.ledger.block(0)
        assert block0 is not None
        genesis = FederationGenesis(LOCAL, node.genesis.membership, node.genesis.member_ids, block0.header)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{node.port}/api/l2/commits?from=0") as r:
                assert r.status == 200 and r.content_type == "application/octet-stream"
                body = await r.read()
            async with s.get(f"http://127.0.0.1:{node.port}/api/status") as r:
                status = await r.json()
            async with s.get(f"http://127.0.0.1:{node.port}/api/l2/blocks/1") as r:
                block1 = await r.json()
            async with s.get(f"http://127.0.0.1:{node.port}/api/federation") as r:
                fed = await r.json()
        report = verify_chain(io.BytesIO(body), genesis)
        assert report.start_height == 0 and report.tip_height >= 2
        assert status["final_height"] >= 1 and block1["final"] is True
        assert block1["commit"]["signers"] == [0] and block1["commit"]["threshold"] == 1
        assert Commit.decode(bytes.fromhex(block1["commit"]["raw"])).signers == (0,)
        assert (fed["n"], fed["threshold"], fed["me"]) == (1, 1, 0) and fed["members"][0]["id"] == "member-1"
        # a forged file (one byte of a signature flipped) is refused
        forged = bytearray(body[:-32])
        forged[-8] ^= 1  # a byte of the last block's signature; the file's checksum made anew, as a forger would
        forged += hashlib.sha256(forged).digest()
        with pytest.raises(ChainBadCommitSignature):
            verify_chain(io.BytesIO(bytes(forged)), genesis)
    finally:
        await node.stop()


async def test_restart_resumes_signing_and_a_lost_signer_state_is_refused(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any]) -> None:
    """The signer state must not be older than the stored chain: a member whose non-final tip carries its
    signature, started without its signer file, refuses to start rather than risk signing a conflicting block."""
    cfg = make_cfg(tmp_path / "data", block={"interval_ms": 3_600_000, "max_txs": 100},
                   chain={"genesis_timestamp_ms": 1_767_225_600_000})
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    try:
        t = transfer(1, 4, 10, 0)
        node.admission.submit(t.raw)
        await _committed(node, [t], poll)  # the genesis is old: the first block comes at once, its child in 1 h
        assert node.chain.final.height == 0 and node.chain.tip.height == 1
    finally:
        await node.stop()
    again = Node.from_config(cfg)  # restart: same tip, the signer state agrees with it
    assert again.chain.tip.height == 1 and again.host.member.signer.signed.height == 1  # type: ignore[union-attr]
    await again.stop()
    (tmp_path / "data" / SIGNER_FILE).unlink()
    with pytest.raises(NodeError, match="signer state") as e:
        Node.from_config(cfg)
    assert isinstance(e.value.__cause__, StaleSignerState)



async def test_recorded_evidence_survives_a_restart_and_a_torn_line_is_skipped(
        tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(tmp_path / "data")
    first = Node.from_config(cfg)  # creates the data dir
    first.store.close()
    first.datadir.close()
    line = {"member": 2, "height": 7, "round": 1, "first": "aa" * 10, "second": "bb" * 10}
    (tmp_path / "data" / EVIDENCE_FILE).write_text(json.dumps(line) + "\n" + '{"member": 3, "hei')
    node = Node.from_config(cfg)
    try:
        [e] = node.host.evidence
        assert (e.proposer, e.height, e.round, e.first, e.second) == (2, 7, 1, b"\xaa" * 10, b"\xbb" * 10)
    finally:
        node.store.close()
        node.datadir.close()


class GatedClaims:
    """A stand-in for the bitcoind claims policy (bridge/claims.py, tested against a real bitcoind there): every
    block with a transfer 'claims' something, and each check waits for the test's verdict."""

    def __init__(self) -> None:
        self.asked: asyncio.Queue[asyncio.Future[Optional[Refusal]]] = asyncio.Queue()

    def relevant(self, txs: Sequence[Any]) -> bool:
        return any(t.payload.TYPE == TxType.TRANSFER for t in txs)

    async def check(self, txs: Sequence[Any]) -> Optional[Refusal]:
        verdict: asyncio.Future[Optional[Refusal]] = asyncio.get_running_loop().create_future()
        await self.asked.put(verdict)
        return await verdict


async def test_a_block_whose_bitcoin_claims_my_bitcoind_does_not_confirm_is_not_signed(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consensus, "CLAIMS_FRESH_S", 0.05)
    node = Node.from_config(make_cfg(tmp_path / "data"))
    gated = GatedClaims()
    node.host.claims = gated
    await node.start(serve_http=False)
    try:
        tx = transfer(1, 4, 10, 0)
        node.admission.submit(tx.raw)
        first = await asyncio.wait_for(gated.asked.get(), 30)
        assert node.store.tx_location(tx.txid) is None  # not signed while my bitcoind has not answered
        first.set_result(Refusal("my bitcoind is behind", tx.txid, refuted=False))
        second = await asyncio.wait_for(gated.asked.get(), 30)  # asked again, later
        assert node.store.tx_location(tx.txid) is None  # a "no" is no signature
        second.set_result(None)
        await _committed(node, [tx], poll)
        blk = node.ledger.block(node.store.tx_location(tx.txid)[0])  # type: ignore[index]
        assert blk is not None and [t.txid for t in blk.txs] == [tx.txid]

        # a claim my bitcoind refutes: not signed, and the transaction leaves my mempool (I never propose it again)
        refuted = transfer(1, 4, 10, 1)
        node.admission.submit(refuted.raw)
        (await asyncio.wait_for(gated.asked.get(), 30)).set_result(Refusal("another block there", refuted.txid,
                                                                           refuted=True))
        await poll(lambda: node.mempool.get(refuted.txid) is None, 30, "the refuted transaction dropped")
        assert node.store.tx_location(refuted.txid) is None
        assert node.admission.tx_status(refuted.txid) == {"status": "dropped", "reason": "claim-refuted"}
    finally:
        await node.stop()


async def test_an_idle_federation_counts_its_rounds_idle_not_failed(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any]) -> None:
    node = Node.from_config(make_cfg(tmp_path / "data", federation={"round_ms": 100, "max_round_ms": 200}))
    await node.start(serve_http=False)
    try:
        tx = transfer(1, 4, 10, 0)
        node.admission.submit(tx.raw)
        await _committed(node, [tx], poll)
        rounds = node.metrics.federation_rounds
        await poll(lambda: rounds.get(outcome="idle") >= 3, 30, "idle rounds")
        assert rounds.get(outcome="entered") >= 1
        assert rounds.get(outcome="failed") == 0  # a 1-of-1 federation never fails a round
    finally:
        await node.stop()


async def test_a_block_waiting_for_a_missing_body_is_stored_when_a_block_fetch_brings_the_body(
        tmp_path: Path, poll: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Member 4 (this node) hears block 1 complete (relayed with its commit) but lacks its transaction's body, and
    the body is asked in vain (a committed transaction leaves the mempool the peers serve bodies from). Its
    catch-up fetch then brings block 1 with the body: the fetched copy is ignored as a block already held, so the
    body must wake the held block, or the member stays at height 0 for good (seen in the flapping-links fault
    test). The test plays member 1 with a real transport, answering body requests with nothing. The fetch logs its
    progress (every fetched block, with a clock that jumps past the interval each time it is read)."""
    ticks = iter(range(0, 10**6, 10))
    monkeypatch.setattr(consensus, "_now", lambda: float(next(ticks)))
    caplog.set_level(logging.INFO, logger="l2d.consensus")
    fed = Federation(tmp_path / "fed", federation={"round_ms": 1000, "max_round_ms": 8000})  # configs only
    node = Node.from_config(Config.load(fed.config(3), env={}))
    genesis = node.ledger.final
    assert genesis is not None
    tx = fed_transfer(0)
    built = node.ledger.execute(genesis, [tx], genesis.timestamp_ms + 1, strict=True)
    commit = Commit.assemble(4, {k: sign_block(fed.secret(k), LOCAL, built.header.hash, AUX) for k in range(3)})
    relay = sign_message(PrivateKey(fed.secret(0)), LOCAL, 0, 1, 0,
                         CompleteBlock(Candidate(built.header, (tx.txid,)), commit))
    asked: list[str] = []

    def serve_blocks(start: int, count: int) -> list[tuple[bytes, bytes]]:
        asked.append("blocks")
        return [(built.raw, commit.encode())] if start <= 1 else []

    def serve_txs(txids: list[bytes]) -> list[bytes]:
        asked.append("txs")
        return []
    member1 = Transport(LOCAL, 0, fed.secret(0), [Peer(3, fed.genesis.members.keys[3],
                                                       f"http://127.0.0.1:{fed.api_ports[3]}")],
                        Handlers(on_message=lambda raw, peer: None, on_txs=lambda raws, peer: None,
                                 serve_blocks=serve_blocks, serve_txs=serve_txs))
    app = web.Application()
    app.router.add_routes(transport_routes(member1))
    runner = web.AppRunner(app)
    await runner.setup()
    await node.start(serve_http=True)
    try:
        await web.TCPSite(runner, "127.0.0.1", fed.api_ports[0]).start()
        await member1.start()
        await poll(lambda: member1.connected_peers() == 1, 30, "member 1 connected to member 4")
        member1.send(3, relay.raw)
        await poll(lambda: node.store.tx_location(tx.txid) is not None, 60, "block 1 stored by member 4")
        assert asked.index("txs") < asked.index("blocks")  # the body was asked in vain, then the block fetched
        assert node.ledger.block(1).header.hash == built.header.hash  # type: ignore[union-attr]
        assert any(r.getMessage() == "catching up" and getattr(r, "height", None) == 1 for r in caplog.records)
    finally:
        await member1.close()
        await node.stop()
        await runner.cleanup()
    assert not node.failed


async def test_committed_transaction_bodies_are_served_to_members(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any]) -> None:
    """A member holding a block pending for a body asks the others, who may have committed it already."""
    node = Node.from_config(make_cfg(tmp_path / "data"))
    await node.start(serve_http=False)
    try:
        txs = await _submitted_and_committed(node, 3, poll)
        assert all(node.mempool.get(t.txid) is None for t in txs)
        unknown = hashlib.sha256(b"no such transaction").digest()
        assert node.host.serve_txs([txs[2].txid, unknown, txs[0].txid]) == [txs[2].raw, txs[0].raw]
    finally:
        await node.stop()
