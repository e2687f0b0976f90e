"""Batch submission (POST /api/l2/txs): binary and JSON bodies, one result per transaction in order, signatures
checked in worker processes; a malformed batch admits nothing; the shared client's submit_txs against a real
daemon."""
from __future__ import annotations

import asyncio
import io
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given
from hypothesis import strategies as st

from l2d.client import ApiError, AsyncClient, Client as L2Client
from l2d.core.coin_tx import Transfer
from l2d.core.errors import DecodeError, OutOfRange
from l2d.core.hashing import H_TXID
from l2d.core.params import LOCAL
from l2d.core.tx import MAX_TX_SIZE, Transaction, sign
from l2d.txbatch import BATCH_BYTES, MAX_BATCH, batches, decode_batch, encode_batch
from tests.conftest import ADMIN_TOKEN, Keys, _node_and_client, make_config

Client = TestClient[web.Request, web.Application]
BIN = {"Content-Type": "application/octet-stream"}


def _transfer(frm: int, nonce: int, amount: int = 1000) -> Transaction:
    return sign(LOCAL, Keys.secret(frm), nonce, 1, Transfer(Keys.pubkey(3), amount), bytes(32))


def _forged(tx: Transaction) -> bytes:
    raw = bytearray(tx.raw)
    raw[-1] ^= 1
    return bytes(raw)


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=40))
def test_a_batch_body_round_trips(raws: list[bytes]) -> None:
    assert decode_batch(encode_batch(raws)) == raws


def test_a_malformed_batch_body_is_refused_with_a_typed_error() -> None:
    one = encode_batch([b"x" * 10])
    with pytest.raises(DecodeError, match="a length needs 4"):
        decode_batch(one + b"\0\0")
    with pytest.raises(DecodeError, match="announced"):
        decode_batch(one[:-1])
    for n in (0, MAX_TX_SIZE + 1):
        with pytest.raises(OutOfRange, match="length"):
            decode_batch(struct.pack(">I", n) + bytes(min(n, 10)))
    with pytest.raises(OutOfRange, match=f"more than {MAX_BATCH}"):
        decode_batch(encode_batch([b"x"] * (MAX_BATCH + 1)))


async def _mempool(client: Client) -> int:
    r = await client.get("/api/status")
    return int((await r.json())["mempool_size"])


async def test_each_transaction_of_a_batch_gets_its_own_result_in_order(client: Client) -> None:
    good = [_transfer(1, n) for n in range(3)]
    body = {"txs": [good[0].raw.hex(), _forged(good[1]).hex(), good[1].raw.hex(), "00", good[2].raw.hex(),
                    good[2].raw.hex()]}
    r = await client.post("/api/l2/txs", json=body)
    assert r.status == 200, await r.text()
    res = (await r.json())["results"]
    assert [x.get("status") or x["error"] for x in res] == [
        "pending", "bad-signature", "pending", "malformed", "pending", "duplicate"]
    assert [x["txid"] for x in (res[0], res[2], res[4])] == [t.txid.hex() for t in good]
    for t in good:
        r = await client.get(f"/api/l2/tx/{t.txid.hex()}")
        assert (await r.json())["status"] in ("pending", "committed")
    r = await client.get(f"/api/l2/tx/{H_TXID(_forged(good[1])).hex()}")
    assert (await r.json())["status"] in ("dropped", "unknown")


@pytest.mark.parametrize("body, error", [(b"\0\0\0", "malformed"), (struct.pack(">I", 500) + b"short", "malformed"),
                                         (struct.pack(">I", 0), "out-of-range"),
                                         (encode_batch([b"x"] * MAX_BATCH), "out-of-range")])  # MAX_BATCH + 1
async def test_a_body_that_is_not_a_batch_admits_nothing(client: Client, body: bytes, error: str) -> None:
    before = await _mempool(client)
    r = await client.post("/api/l2/txs", data=encode_batch([_transfer(1, 0).raw]) + body, headers=BIN)
    assert r.status == 400 and (await r.json())["error"] == error  # as the JSON body's errors
    assert await _mempool(client) == before
    r = await client.get(f"/api/l2/tx/{_transfer(1, 0).txid.hex()}")
    assert r.status == 404


@pytest.mark.parametrize("body", [{"txs": []}, {"txs": "00"}, {"txs": [1]}, {"txs": ["zz"]},
                                  {"txs": ["00"] * (MAX_BATCH + 1)}])
async def test_a_json_body_that_is_not_a_batch_is_refused(client: Client, body: Any) -> None:
    r = await client.post("/api/l2/txs", json=body)
    assert r.status == 400 and (await r.json())["error"] in ("malformed", "out-of-range", "bad-field")


async def test_a_batch_in_another_content_type_or_over_the_body_limit_admits_nothing(client: Client) -> None:
    before = await _mempool(client)
    r = await client.post("/api/l2/txs", data=encode_batch([_transfer(1, 0).raw]),
                          headers={"Content-Type": "text/plain"})
    assert r.status == 415
    r = await client.post("/api/l2/txs", data=io.BytesIO(encode_batch([_transfer(1, 0).raw]) + bytes(BATCH_BYTES)),
                          headers=BIN)
    assert r.status == 413
    assert await _mempool(client) == before


def test_client_batches_keep_to_the_count_and_the_body_size() -> None:
    big = [bytes([i % 251]) * MAX_TX_SIZE for i in range(600)]  # 600 of the largest: 2.5 MB in all
    small = [bytes([i % 251]) * 100 for i in range(2500)]
    for raws in (big, small, big[:1], []):
        parts = list(batches(raws))
        assert all(len(b) <= BATCH_BYTES and decode_batch(b) == list(p) and len(p) <= MAX_BATCH for p, b in parts)
        assert [r for p, _ in parts for r in p] == raws  # all of them, in order
    assert len(list(batches(small))) == 3 and len(list(batches(big))) == 3  # by count; by size (248 a body)


async def test_worker_processes_check_the_signatures_of_a_large_batch(tmp_path: Path, wait_until: Any) -> None:
    cfg = make_config(tmp_path / "data", api={"signature_workers": 2}, mempool={"max_per_sender": 64})
    txs = [_transfer(1, n) for n in range(30)] + [_transfer(2, n) for n in range(30)]
    raws = [t.raw for t in txs]
    raws[17] = _forged(txs[17])  # its successors from sender 1 wait behind the gap
    async for node, client in _node_and_client(cfg):
        r = await client.post("/api/l2/txs", data=encode_batch(raws), headers=BIN)
        res = (await r.json())["results"]
        assert node.signatures._pool is not None  # the pool ran them
        assert res[17]["error"] == "bad-signature"
        assert [x["txid"] for i, x in enumerate(res) if i != 17] == [t.txid.hex() for i, t in enumerate(txs) if i != 17]
        assert all(x.get("status") == "pending" for i, x in enumerate(res) if i != 17)

        async def nonce(k: int) -> int:
            return int((await (await client.get(f"/api/l2/accounts/{Keys.pubkey(k).hex()}")).json())["nonce"])

        async def committed(txid: bytes) -> bool:
            return (await (await client.get(f"/api/l2/tx/{txid.hex()}")).json())["status"] == "committed"
        await wait_until(lambda: committed(txs[-1].txid), what="sender 2's transfers committed")
        assert await nonce(1) == 17  # the forged transaction changed nothing: sender 1 waits at its nonce
        r = await client.post("/api/l2/txs", data=encode_batch([txs[17].raw]), headers=BIN)
        assert (await r.json())["results"] == [{"txid": txs[17].txid.hex(), "status": "pending"}]
        await wait_until(lambda: committed(txs[29].txid), what="sender 1's transfers committed")
        assert await nonce(1) == 30 and await nonce(2) == 30


def test_the_shared_client_submits_in_batches(tmp_path: Path, l2d_process: Any, node_toml: Any) -> None:
    node = l2d_process(node_toml(tmp_path / "node.toml", {Keys.pubkey(1): 10**8}, ADMIN_TOKEN,
                                 mempool={"max_per_sender": 64}))
    txs = [_transfer(1, n) for n in range(50)]
    res = L2Client(node.url("")).submit_txs([t.raw for t in txs] + [txs[0].raw])
    assert [x.get("status") for x in res[:50]] == ["pending"] * 50 and res[50]["error"] == "duplicate"
    assert [x["txid"] for x in res[:50]] == [t.txid.hex() for t in txs]


def test_a_refused_later_batch_keeps_the_results_of_the_batches_before_it(tmp_path: Path, l2d_process: Any,
                                                                           node_toml: Any) -> None:
    """A daemon whose body limit (200 kB) the second batch exceeds (413): the first batch's 1,000 results come back
    (its 20 transfers pending), the second's transactions carry its error, and a batch after it is "not-sent";
    with the first batch refused, the error is raised (nothing was admitted)."""
    node = l2d_process(node_toml(tmp_path / "node.toml", {Keys.pubkey(1): 10**8}, ADMIN_TOKEN,
                                 api={"max_body_bytes": 200_000}, mempool={"max_per_sender": 64}))
    txs = [_transfer(1, n).raw for n in range(20)]
    filler = [bytes([n % 251]) * 100 for n in range(MAX_BATCH - 20)]  # not transactions: each refused alone
    big = [bytes([n % 251]) * MAX_TX_SIZE for n in range(300)]  # 1.3 MB: a 413 for the first of its bodies
    raws = txs + filler + big
    assert [len(p) for p, _ in batches(raws)] == [MAX_BATCH, 248, 52]
    res = L2Client(node.url("")).submit_txs(raws)
    assert len(res) == len(raws) and [r["txid"] for r in res] == [H_TXID(r).hex() for r in raws]
    assert [r.get("status") for r in res[:20]] == ["pending"] * 20
    assert all("error" in r and r["error"] != "not-sent" for r in res[20:MAX_BATCH])
    assert {r["error"] for r in res[MAX_BATCH:MAX_BATCH + 248]} == {"body-too-large"}
    assert {r["error"] for r in res[MAX_BATCH + 248:]} == {"not-sent"}
    with pytest.raises(ApiError) as e:
        L2Client(node.url("")).submit_txs(big)
    assert e.value.status == 413
    api, deadline = L2Client(node.url("")), time.monotonic() + 60
    while api.account(Keys.pubkey(1).hex())["nonce"] != 20:  # the first batch's transfers commit
        assert time.monotonic() < deadline, "the 20 admitted transfers were not committed"
        time.sleep(0.05)

    async def submit_async(raws: list[bytes]) -> list[dict[str, Any]]:
        async with AsyncClient(node.url("")) as c:
            return await c.submit_txs(raws)
    more = [_transfer(1, n).raw for n in range(20, 40)] + filler + big  # the async client does the same
    res = asyncio.run(submit_async(more))
    assert [r["txid"] for r in res] == [H_TXID(r).hex() for r in more]
    assert [r.get("status") for r in res[:20]] == ["pending"] * 20
    assert [r["error"] for r in res[MAX_BATCH:]] == ["body-too-large"] * 248 + ["not-sent"] * 52


def test_signature_workers_do_not_outlive_a_killed_daemon(tmp_path: Path, l2d_process: Any, node_toml: Any,
                                                          poll: Any) -> None:
    """A daemon SIGKILLed with its pool of signature workers running: the workers exit by themselves (a pool's
    worker otherwise waits on its queue forever, an orphan)."""
    import signal

    node = l2d_process(node_toml(tmp_path / "node.toml", {Keys.pubkey(1): 10**8}, ADMIN_TOKEN,
                                 api={"signature_workers": 1}, mempool={"max_per_sender": 64}))
    res = L2Client(node.url("")).submit_txs([_transfer(1, n).raw for n in range(40)])
    assert all(r.get("status") == "pending" for r in res)
    children = Path(f"/proc/{node.proc.pid}/task/{node.proc.pid}/children").read_text().split()
    assert children, "the batch started a signature worker"
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{c}").exists() and "spawn_main" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")
              for c in children):
        assert time.monotonic() < deadline, f"signature workers {children} outlived their daemon"
        time.sleep(0.1)
