"""The data dir: private modes, one daemon at a time (flock + PID), and the free-space floor (503 disk-low).

The free-space tests use the real os.statvfs: on the test's own filesystem with a floor set above its free space
(then lowered on the running node), and on a small tmpfs (`small_fs`: mounted when the test runs as root, skipped
otherwise) filled and emptied for real.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from l2d.config import Config
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.tx import Transaction, sign
from l2d.datadir import LOCK_FILE, DataDir, DataDirInUse, free_bytes
from l2d.node import Node

REPO = Path(__file__).resolve().parents[2]
TOKEN = "datadir-test-token-0123456789"


def transfer(keys: Any, nonce: int) -> Transaction:
    return sign(LOCAL, keys.secret(1), nonce, 1, Transfer(keys.pubkey(4), 10), b"\0" * 32)


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


# -- modes -----------------------------------------------------------------------------------------------------
async def test_data_dir_lmdb_files_snapshots_and_mempool_file_are_private(
        tmp_path: Path, make_cfg: Callable[..., Config], keys: Any, poll: Callable[..., Any]) -> None:
    old = os.umask(0o022)  # the usual umask: what l2d creates must not depend on it
    try:
        data = tmp_path / "parent" / "data"
        node = Node.from_config(make_cfg(data, snapshots={"every_blocks": 1}, block={"interval_ms": 20}))
        await node.start(serve_http=False)
        try:
            tx = transfer(keys, 0)
            node.admission.submit(tx.raw)
            await poll(lambda: node.store.tx_location(tx.txid) is not None, 20, "the transfer committed")
            await poll(lambda: node.snapshots.list_snapshots(), 20, "a periodic snapshot")
            node.admission.submit(transfer(keys, 2).raw)  # a nonce gap: stays pending, saved at the stop
        finally:
            await node.stop()
    finally:
        os.umask(old)
    assert not node.failed
    dirs = [data.parent, data, data / "ledger", data / "snapshots"]
    files = [data / "ledger" / "data.mdb", data / "ledger" / "lock.mdb", data / LOCK_FILE, data / "mempool.dat",
             data / "mint_authority.key", *(data / "snapshots").iterdir()]
    assert {str(d.relative_to(tmp_path)): oct(mode(d)) for d in dirs} == \
        {str(d.relative_to(tmp_path)): "0o700" for d in dirs}
    assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}


# -- the lock --------------------------------------------------------------------------------------------------
def test_a_second_opener_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    first = DataDir.open(tmp_path / "d", 0)
    assert (tmp_path / "d" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(DataDirInUse, match=rf"data dir .*/d is in use by another l2d \(pid {os.getpid()},"):
        DataDir.open(tmp_path / "d", 0)
    first.close()
    DataDir.open(tmp_path / "d", 0).close()  # released: the file left behind does not block anyone


def test_a_second_daemon_on_the_same_data_dir_exits_1_naming_the_first(
        tmp_path: Path, keys: Any, l2d_process: Callable[..., Any], node_toml: Callable[..., Path]) -> None:
    cfg = node_toml(tmp_path / "node.toml", {keys.pubkey(1): 1_000_000}, TOKEN, block={"interval_ms": 20})
    first = l2d_process(cfg)
    env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    second = subprocess.run([sys.executable, "-m", "l2d.node", "--config", str(cfg)], capture_output=True,
                            text=True, timeout=120, cwd=REPO, env=env)
    assert second.returncode == 1, second.stderr[-2000:]
    errors = [r["msg"] for r in map(json.loads, second.stderr.splitlines()) if r["level"] == "error"]
    assert errors == [f"cannot start: data dir {tmp_path / 'data'} is in use by another l2d (pid "
                      f"{first.proc.pid}, holding {tmp_path / 'data' / LOCK_FILE}): stop that daemon first, or "
                      "give this one another node.data_dir"]
    # the first one never noticed: it still accepts and commits
    tx = transfer(keys, 0)
    req = urllib.request.Request(first.url("/api/l2/tx"), data=json.dumps({"tx": tx.raw.hex()}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 202
    assert first.get(f"/api/l2/tx/{tx.txid.hex()}")["status"] in ("pending", "committed")
    assert first.stop() == 0
    again = l2d_process(cfg, tmp_path / "again.log")  # the lock went with the first process
    assert again.get(f"/api/l2/tx/{tx.txid.hex()}")["status"] in ("pending", "committed")
    assert again.stop() == 0


# -- free space ------------------------------------------------------------------------------------------------
async def _post(client: TestClient[Any, Any], tx: Transaction) -> tuple[int, dict[str, Any], dict[str, str]]:
    resp = await client.post("/api/l2/tx", json={"tx": tx.raw.hex()})
    return resp.status, await resp.json(), dict(resp.headers)


@asynccontextmanager
async def _started(cfg: Config) -> AsyncIterator[tuple[Node, TestClient[Any, Any]]]:
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    client: TestClient[Any, Any] = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        yield node, client
    finally:
        await client.close()
        await node.stop()
    assert not node.failed


async def test_below_the_floor_transactions_get_503_until_it_is_lowered(
        tmp_path: Path, make_cfg: Callable[..., Config], keys: Any, poll: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """The real statvfs of the test's filesystem: a floor of 1 PiB is above its free space."""
    cfg = make_cfg(tmp_path / "data", store={"min_free_bytes": 1 << 50})
    async with _started(cfg) as (node, client):
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(m.startswith("low disk space: ") and "below store.min_free_bytes (1125899906842624)" in m
                   for m in warnings), warnings
        tx = transfer(keys, 0)
        status, body, headers = await _post(client, tx)
        assert (status, body["error"], headers.get("Retry-After")) == (503, "disk-low", "10")
        assert "store.min_free_bytes = 1125899906842624" in body["message"]
        mint = await client.post("/api/admin/mint", json={"recipient": keys.pubkey(5).hex(), "amount_sat": 5},
                                 headers={"Authorization": "Bearer test-admin-token-0123456789abcdef"})
        assert mint.status == 503 and (await mint.json())["error"] == "disk-low"
        batch = await client.post("/api/l2/txs", json={"txs": [tx.raw.hex()]})  # a batch: refused as a whole
        assert (batch.status, (await batch.json())["error"], batch.headers.get("Retry-After")) == (
            503, "disk-low", "10")
        assert len(node.mempool) == 0 and node.admission.tx_status(tx.txid) is None
        assert node.metrics.txs_rejected.get(stage="admission", reason="disk-low") == 3

        node.datadir.min_free_bytes = free_bytes(tmp_path) // 2  # re-configured below the free space
        status, body, _ = await _post(client, tx)
        assert status == 202 and body["txid"] == tx.txid.hex()
        await poll(lambda: node.store.tx_location(tx.txid) is not None, 20, "the transfer committed")


def _fill(fs: Path, leave: int) -> Path:
    """A ballast file leaving about `leave` bytes free on fs."""
    ballast = fs / "ballast"
    with ballast.open("wb") as f:
        f.write(b"\0" * max(0, free_bytes(fs) - leave))
    return ballast


async def test_a_full_disk_refuses_then_recovers_by_itself_when_space_returns(
        small_fs: Path, make_cfg: Callable[..., Config], keys: Any, poll: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = make_cfg(small_fs / "data", store={"min_free_bytes": 4 << 20}, snapshots={"every_blocks": 1})
    async with _started(cfg) as (node, client):
        ballast = _fill(small_fs, 1 << 20)  # 1 MiB left: below the 4 MiB floor
        tx = transfer(keys, 0)
        status, body, headers = await _post(client, tx)
        assert (status, body["error"], headers["Retry-After"]) == (503, "disk-low", "10")
        ballast.unlink()  # space returns: nothing to do but retry
        status, _, _ = await _post(client, tx)
        assert status == 202
        await poll(lambda: node.store.tx_location(tx.txid) is not None, 20, "the transfer committed")

    # a start on the still-full disk says so, and refuses, but starts (what is committed stays readable)
    caplog.clear()
    ballast = _fill(small_fs, 1 << 20)
    async with _started(cfg) as (node, client):
        assert any(r.levelno == logging.WARNING and r.getMessage().startswith("low disk space")
                   for r in caplog.records)
        assert (await client.get(f"/api/l2/tx/{tx.txid.hex()}")).status == 200
        assert (await _post(client, transfer(keys, 1)))[0] == 503
        ballast.unlink()
        assert (await _post(client, transfer(keys, 1)))[0] == 202
