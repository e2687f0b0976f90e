"""Node lifecycle: restart, foreign data dirs, clean shutdown, failure handling, snapshots, the l2d process."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from coincurve import PrivateKey

from l2d.config import Config
from l2d.core.coin_tx import Transfer
from l2d.core.errors import Rejected
from l2d.core.params import LOCAL
from l2d.core.snapshot import list_snapshots, verify_snapshot
from l2d.core.state import Account, account_key
from l2d.core.tx import Transaction, sign
from l2d.genesis import NodeError
from l2d.keys import KeyFileError, load_or_create_secret, load_secret
from l2d.node import Node
from l2d.store import StoreError, StoreFull

REPO = Path(__file__).resolve().parents[2]
GENESIS_SAT = 1_000_000


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def transfer(frm: int, to: int, amount: int, nonce: int, fee: int = 1) -> Transaction:
    return sign(LOCAL, secret(frm), nonce, fee, Transfer(pubkey(to), amount), b"\0" * 32)


def balance(node: Node, n: int) -> tuple[int, int]:
    raw = node.store.get_state(account_key(pubkey(n)))
    assert raw is not None
    a = Account.decode(raw)
    return a.balance_sat, a.nonce


async def test_restart_keeps_height_and_root(tmp_path: Path, make_cfg: Callable[..., Config],
                                             wait_until: Any) -> None:
    cfg = make_cfg(tmp_path / "data")
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    txs = [transfer(1, 4, 100, n) for n in range(3)] + [transfer(2, 4, 7, 0)]
    for t in txs:
        node.admission.submit(t.raw)

    async def all_committed() -> bool:
        return all(node.store.tx_location(t.txid) is not None for t in txs)

    await wait_until(all_committed, what="4 transactions committed")
    await node.stop()
    assert not node.failed
    tip = node.chain.tip
    assert tip.height >= 1

    again = Node.from_config(cfg)
    try:
        assert again.chain.tip == tip
        assert again.ledger.state_root() == tip.state_root
        assert balance(again, 1) == (GENESIS_SAT - 303, 3)
        assert balance(again, 4) == (307, 0)
    finally:
        await again.stop()


async def test_other_network_data_dir_refused(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    data = tmp_path / "data"
    first = Node.from_config(make_cfg(data))
    await first.stop()
    with pytest.raises(StoreError, match="network b?'?local'?.*regtest|made for network"):
        Node.from_config(make_cfg(data, "regtest"))
    # the refusal left the database usable for its own network
    ok = Node.from_config(make_cfg(data))
    await ok.stop()


async def test_other_genesis_in_data_dir_refused(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    data = tmp_path / "data"
    first = Node.from_config(make_cfg(data))
    await first.stop()
    other = make_cfg(data, chain={"genesis_alloc": {pubkey(1).hex(): 5}})
    with pytest.raises(NodeError, match="holds another chain"):
        Node.from_config(other)


@pytest.mark.parametrize("how", ["stop-event", "cancel-producer"])
async def test_clean_stop_finishes_the_block_in_flight(tmp_path: Path, make_cfg: Callable[..., Config],
                                                       monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any],
                                                       how: str) -> None:
    cfg = make_cfg(tmp_path / "data", block={"interval_ms": 10, "max_txs": 4})
    node = Node.from_config(cfg)
    real_store = node.ledger.store_block
    entered, release = threading.Event(), threading.Event()
    stores = 0

    def held_store(built: Any, commit: bytes, final: Any) -> None:  # the second store waits for the test
        nonlocal stores
        stores += 1
        if stores == 2:
            entered.set()
            release.wait(30)
        real_store(built, commit, final)

    monkeypatch.setattr(node.ledger, "store_block", held_store)
    await node.start(serve_http=False)
    txs = [transfer(s, 5, 1, n) for n in range(12) for s in (1, 2, 3)]
    for t in txs:
        node.admission.submit(t.raw)
    await poll(entered.is_set, 10, "the second block being stored")
    in_flight = node.chain.tip.height + 1  # the tip moves only once the store has returned
    assert in_flight == 2
    if how == "cancel-producer":
        producer = next(t for t in node._tasks if t.get_name() == "block-producer")
        producer.cancel()  # cancellation must not interrupt the shielded commit
    node.request_stop()
    stopping = asyncio.create_task(node.stop())
    await asyncio.wait([stopping], timeout=0.05)
    assert not stopping.done()  # stop() waits for the commit in flight ...
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert not node.failed
    stopped_at = node.chain.tip
    assert stopped_at.height == in_flight  # ... which completed; no other block was started
    assert len(node.mempool) > 0  # there was more to do

    again = Node.from_config(cfg)  # Ledger.open checks the stored state against the tip's root
    try:
        assert again.chain.tip == stopped_at  # the block in flight was committed, nothing after it
        total = 0
        for h in range(1, stopped_at.height + 1):
            blk = again.ledger.block(h)
            assert blk is not None and blk.header.tx_count == len(blk.txs) <= 4
            assert all(again.store.tx_location(t.txid) == (h, i) for i, t in enumerate(blk.txs))
            total += len(blk.txs)
        assert sum(balance(again, s)[1] for s in (1, 2, 3)) == total
        assert again.ledger.block(stopped_at.height + 1) is None
    finally:
        await again.stop()


async def test_unexpected_failure_commits_nothing_more(tmp_path: Path, make_cfg: Callable[..., Config],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_cfg(tmp_path / "data")
    node = Node.from_config(cfg)
    node.admission.submit(transfer(1, 4, 100, 0).raw)

    def broken_commit(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(node.store, "commit_block", broken_commit)
    rc = await asyncio.wait_for(node.run(install_signals=False), 10)
    assert rc == 1 and node.failed
    again = Node.from_config(cfg)
    try:
        assert again.chain.tip.height == 0
    finally:
        await again.stop()


async def test_snapshot_now_verifies_against_the_tip(tmp_path: Path, make_cfg: Callable[..., Config],
                                                     wait_until: Any) -> None:
    node = Node.from_config(make_cfg(tmp_path / "data", snapshots={"every_blocks": 1, "keep": 2}))
    await node.start(serve_http=False)
    try:
        for n in range(3):  # one block per transaction: each waits for the previous one to commit
            t = transfer(1, 4, 10, n)
            node.admission.submit(t.raw)

            async def committed(t: Transaction = t) -> bool:
                return node.store.tx_location(t.txid) is not None

            await wait_until(committed, what=f"tx {n} committed")

        async def periodic_done() -> bool:
            return [h for h, _ in list_snapshots(node.snapshots.dir, LOCAL)][-1:] == [node.chain.tip.height]

        await wait_until(periodic_done, what="a periodic snapshot of the tip")
        info = await node.snapshots.snapshot_now()
        tip = node.chain.tip
        assert (info.height, info.state_root, info.block_hash) == (tip.height, tip.state_root, tip.hash)
        with open(info.path, "rb") as f:
            header = verify_snapshot(f, LOCAL, expect_root=tip.state_root)
        assert header.height == tip.height and header.record_count == node.chain.state_summary().records
        assert len(list_snapshots(node.snapshots.dir, LOCAL)) <= 2  # pruned to snapshots.keep
        assert node.metrics.snapshots.get(trigger="periodic") >= 1
    finally:
        await node.stop()


def test_mint_key_file_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "mint.key"
    s1 = load_or_create_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(path) == s1
    path.write_text("nothex\n")
    with pytest.raises(KeyFileError, match="64 hex"):
        load_or_create_secret(path)


def test_load_secret_reads_an_existing_key_file_and_never_creates_one(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_secret(path)
    assert not path.exists()
    path.write_text("11" * 32 + "\n")
    assert load_secret(path) == bytes([0x11] * 32)
    for text, words in (("11" * 31, "must hold a valid secp256k1 secret as 64 hex"),
                        ("zz" * 32, "must hold a valid secp256k1 secret as 64 hex"),
                        ("00" * 32, "does not hold a valid secp256k1 secret"),
                        ("ff" * 32, "does not hold a valid secp256k1 secret")):
        path.write_text(text)
        with pytest.raises(KeyFileError, match=words):
            load_secret(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(KeyFileError, match="cannot read key file"):
        load_secret(path)


async def test_authority_key_persists_across_restarts(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(tmp_path / "data")
    a = Node.from_config(cfg)
    await a.stop()
    b = Node.from_config(cfg)  # same key file, so the same genesis: accepted
    await b.stop()
    assert a.admission.authority_pubkey == b.admission.authority_pubkey is not None
    assert cfg.chain.mint_authority_key_file is not None
    assert cfg.chain.mint_authority_key_file.stat().st_mode & 0o777 == 0o600


# -- the l2d process -------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nnetwork = "local"\ndata_dir = "d"\n[block]\ninterval_ms = "fast"\n')
    p = subprocess.run([sys.executable, "-m", "l2d.node", "--config", str(bad)], capture_output=True, text=True,
                       timeout=60, cwd=REPO, env=_env())
    assert p.returncode == 2, p.stderr
    assert "block.interval_ms" in p.stderr and '"fast"' in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    missing = subprocess.run([sys.executable, "-m", "l2d.node", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, timeout=60, cwd=REPO, env=_env())
    assert missing.returncode == 2 and "none.toml" in missing.stderr


def test_daemon_serves_and_stops_cleanly_on_sigterm(tmp_path: Path, l2d_process: Callable[..., Any],
                                                    node_toml: Callable[..., Path]) -> None:
    cfg = node_toml(tmp_path / "node.toml", {pubkey(1): GENESIS_SAT}, "process-test-token-0123456789",
                    block={"interval_ms": 50})
    d = l2d_process(cfg)
    first = d.lines()[0]  # every log line is one JSON object (lines() parses each)
    assert {"ts", "level", "logger", "msg"} <= set(first)
    assert first["config"]["node"]["network"] == "local"
    assert first["config"]["api"]["admin_token"] == "<redacted>"
    assert "process-test-token" not in json.dumps(d.lines())
    assert d.get("/health") == {"ok": True}
    assert d.get("/api/status")["height"] == 0
    rc = d.stop()
    tail = d.lines()
    assert rc == 0, tail[-5:]
    assert any(r["msg"] == "stopped" and r["failed"] is False for r in tail)
    assert (tmp_path / "data" / "mint_authority.key").stat().st_mode & 0o777 == 0o600


def _submit(d: Any, tx: Transaction) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(d.url("/api/l2/tx"), data=json.dumps({"tx": tx.raw.hex()}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _statuses(d: Any, txids: list[str]) -> dict[str, tuple[str, Optional[str]]]:
    out = {}
    for txid in txids:
        code, body = d.get_raw(f"/api/l2/tx/{txid}")
        st = json.loads(body)
        assert (code == 404) == (st["status"] == "unknown"), st
        out[txid] = (st["status"], st.get("reason"))
    return out


async def test_clean_stop_keeps_the_mempool_and_the_drop_reasons(tmp_path: Path,
                                                                 l2d_process: Callable[..., Any],
                                                                 node_toml: Callable[..., Path],
                                                                 poll: Callable[..., Any]) -> None:
    """A real daemon with a full mempool (blocks held back by a 1-hour interval after a genesis made now) is stopped
    with SIGTERM and restarted: every accepted transaction is then committed, pending, or dropped with a reason;
    none is unknown."""
    alloc = {pubkey(n): GENESIS_SAT for n in (1, 2, 3)}
    token = "mempool-file-token-0123456789"
    genesis_ms = int(time.time() * 1000)  # a block follows its parent by block.interval_ms at the earliest

    def start(log: str, min_fee: int, interval_ms: int) -> Any:
        cfg = node_toml(tmp_path / "node.toml", alloc, token, block={"interval_ms": interval_ms, "max_txs": 1000},
                        chain={"genesis_timestamp_ms": genesis_ms},
                        mempool={"max_txs": 450, "max_per_sender": 160, "min_fee_sat": min_fee},
                        snapshots={"every_blocks": 0})
        return l2d_process(cfg, tmp_path / log)

    d = start("1.log", 1, 3_600_000)
    fees = {1: 5, 2: 5, 3: 1}  # sender 3 pays the fee a later restart no longer relays
    sent: dict[str, int] = {}
    for n in range(150):
        for s in (1, 2, 3):
            tx = transfer(s, 4, 1, n, fee=fees[s])
            assert _submit(d, tx) == (202, {"txid": tx.txid.hex()})
            sent[tx.txid.hex()] = s
    assert _submit(d, transfer(1, 4, 1, 150, fee=5))[1]["error"] == "mempool-full"
    assert set(_statuses(d, list(sent)).values()) == {("pending", None)}
    assert d.stop() == 0
    saved = [r for r in d.lines() if r["msg"] == "mempool saved"]
    assert [(r["txs"], r["drop_reasons"]) for r in saved] == [(450, 0)]
    assert (tmp_path / "data" / "mempool.dat").stat().st_mode & 0o777 == 0o600

    # the relay floor was raised meanwhile: sender 3's transactions no longer apply and say why
    d = start("2.log", 2, 3_600_000)
    assert [(r["readmitted"], r["dropped"]) for r in d.lines() if r["msg"] == "mempool reloaded"] == [(300, 150)]
    assert not (tmp_path / "data" / "mempool.dat").exists()  # a later SIGKILL cannot bring this copy back
    st = _statuses(d, list(sent))
    assert {txid: v for txid, v in st.items() if sent[txid] != 3} == {t: ("pending", None) for t in sent
                                                                      if sent[t] != 3}
    assert {txid: v for txid, v in st.items() if sent[txid] == 3} == {t: ("dropped", "fee-below-floor")
                                                                      for t in sent if sent[t] == 3}
    assert d.get("/api/status")["mempool_size"] == 300
    assert d.stop() == 0

    # blocks flow again: the pending ones commit; the drop reasons survived a second clean restart
    d = start("3.log", 2, 50)
    committed = {t for t in sent if sent[t] != 3}
    assert all(v == ("dropped", "fee-below-floor") for t, v in _statuses(d, list(sent)).items() if sent[t] == 3)
    await poll(lambda: all(v[0] == "committed" for v in _statuses(d, sorted(committed)).values()), 60,
               "the 300 re-admitted transactions committed")
    code, body = d.get_raw(f"/api/l2/tx/{'ee' * 32}")
    assert code == 404 and json.loads(body)["status"] == "unknown"
    assert d.stop() == 0


async def test_a_full_map_stops_the_node_naming_store_map_size_and_loses_nothing_accepted(
        tmp_path: Path, make_cfg: Callable[..., Config], poll: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    """A real 1 MiB LMDB map filled by mints to new accounts: the producer stops with StoreFull, the accepted
    transactions are saved with the mempool, and a restart with a bigger store.map_size commits every one."""
    cfg = make_cfg(tmp_path / "data", store={"map_size": 1 << 20}, block={"interval_ms": 10, "max_txs": 200},
                   mempool={"max_txs": 1000, "max_per_sender": 300})
    node = Node.from_config(cfg)
    run = asyncio.create_task(node.run(install_signals=False))
    accepted: list[bytes] = []
    while not run.done():
        try:
            for _ in range(300):
                accepted.append(node.admission.mint(pubkey(10 + len(accepted)), 1000))
        except Rejected as e:
            assert e.reason in ("sender-limit", "nonce-gap", "mempool-full"), e
        await poll(lambda: run.done() or len(node.mempool) < 100, 60, "room in the mempool, or the node stopped")
    assert await run == 1 and node.failed
    [failure] = [r for r in caplog.records if r.getMessage().startswith("task block-producer ended unexpectedly")]
    assert failure.exc_info is not None and isinstance(failure.exc_info[1], StoreFull)
    assert "is full (store.map_size = 1048576 bytes): raise store.map_size in the config" in str(failure.exc_info[1])
    assert node.chain.tip.height >= 1 and len(node.mempool) > 0

    bigger = make_cfg(tmp_path / "data", store={"map_size": 64 << 20}, block={"interval_ms": 10, "max_txs": 200},
                      mempool={"max_txs": 1000, "max_per_sender": 300})
    again = Node.from_config(bigger)
    try:
        statuses = [again.admission.tx_status(t) for t in accepted]
        assert {None if s is None else s["status"] for s in statuses} == {"committed", "pending"}
        await again.start(serve_http=False)
        await poll(lambda: all(again.store.tx_location(t) is not None for t in accepted), 60,
                   f"the {len(accepted)} accepted mints committed")
    finally:
        await again.stop()
    assert not again.failed
