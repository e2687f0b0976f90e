"""Reads of the committed state never wait for the block being built, and never pair a tree with another
state's values."""
from __future__ import annotations

import asyncio
import threading
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


async def test_a_read_while_a_block_is_being_stored_proves_against_the_tip_it_read(
        node_client: tuple[Node, Client], wait_until: Any, monkeypatch: Any) -> None:
    """A block's records and tree nodes are written in one LMDB transaction, so a read overlapping a store proves
    its values against the tip of its own transaction: the old one or the new one, never a mix. The store is
    paused inside its LMDB transaction (after the writes, before the commit) while reads go on."""
    node, client = node_client
    store = node.ledger.store
    entered, release = threading.Event(), threading.Event()
    real = store._write_state

    def paused(txn: Any, writes: Any) -> None:
        real(txn, writes)
        entered.set()
        release.wait(30)

    monkeypatch.setattr(store, "_write_state", paused)
    before = node.chain.tip
    sent = asyncio.ensure_future(_committed_transfer(client, 0, wait_until))
    try:
        assert await asyncio.to_thread(entered.wait, 30)
        proven = await node.chain.prove(account_key(Keys.pubkey(1)))  # the store holds LMDB's write lock now
        assert proven.tip == before and proven.proof is not None
        assert verify_proof(before.state_root, proven.proof) == proven.value
    finally:
        release.set()
    await sent
    after = await node.chain.prove(account_key(Keys.pubkey(1)))
    assert after.tip.height > before.height and after.value != proven.value
    assert after.proof is not None and verify_proof(after.tip.state_root, after.proof) == after.value
