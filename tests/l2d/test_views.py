"""Reads of the committed state never wait for the block being built, and never pair a tree with another
state's values."""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.state import account_key
from l2d.core.tree import Proof, verify_proof
from l2d.core.tx import sign
from l2d.node import Node
from tests.conftest import Keys

Client = TestClient[web.Request, web.Application]


async def _committed_transfer(client: Client, nonce: int, wait_until: Any) -> None:
    tx = sign(LOCAL, Keys.secret(1), nonce, 1, Transfer(Keys.pubkey(2), 10), bytes(32))
    assert (await client.post("/api/l2/tx", json={"tx": tx.raw.hex()})).status == 202

    async def committed() -> bool:
        return (await (await client.get(f"/api/l2/tx/{tx.txid.hex()}")).json())["status"] == "committed"
    await wait_until(committed, what="the transfer committed")


async def test_account_reads_and_proofs_are_served_while_a_block_is_being_stored(
        node_client: tuple[Node, Client], wait_until: Any) -> None:
    node, client = node_client
    await _committed_transfer(client, 0, wait_until)
    async with node.host.tree_lock:  # what the consensus host holds while it stores a block
        r = await asyncio.wait_for(client.get(f"/api/l2/accounts/{Keys.pubkey(1).hex()}"), 30)
        body = await r.json()
        assert r.status == 200 and body["nonce"] == 1
        proof = Proof.decode(bytes.fromhex(body["proof"]))
        assert verify_proof(bytes.fromhex(body["state_root"]), proof) is not None
        assert body["state_root"] == node.ledger.tip.state_root.hex()  # type: ignore[union-attr]


async def test_a_read_between_storing_and_publishing_a_block_waits_for_the_publication(
        node_client: tuple[Node, Client], wait_until: Any, monkeypatch: Any) -> None:
    """LMDB holds a new tip before the ledger publishes its tree: a read in that gap must not prove the new values
    against the old tree (the proof would not verify), so it waits for the publication."""
    node, client = node_client
    ledger = node.ledger
    old_view = ledger.view
    await _committed_transfer(client, 0, wait_until)
    async with node.host.tree_lock:  # no block is stored meanwhile
        monkeypatch.setattr(node.host, "build", lambda *_a, **_k: None)  # nor proposed on the rolled-back tip
        new_view = ledger.view
        assert old_view is not None and new_view is not None and old_view[1] != new_view[1]
        ledger.view = old_view  # as if the newest block were stored but not yet published
        try:
            read = asyncio.ensure_future(node.chain.prove(account_key(Keys.pubkey(1))))
            for _ in range(20):
                await asyncio.sleep(0.002)
            assert not read.done()
        finally:
            ledger.view = new_view
        proven = await asyncio.wait_for(read, 30)
    assert proven.tip == new_view[1] and proven.proof is not None
    assert verify_proof(proven.tip.state_root, proven.proof) == proven.value
