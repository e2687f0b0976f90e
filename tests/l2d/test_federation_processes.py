"""A 4-member federation (m = 3) of real l2d processes on loopback, written by `l2-cli federation-init`:
transfers submitted to different members are committed once, every member agrees block by block, blocks become
final; a SIGKILLed member catches up and signs again; with two members down nothing becomes final, and progress
resumes when one returns. After each run every member's database is checked: the same block at every height up to
the lowest final height, each with a commit of at least m valid member signatures."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from coincurve import PrivateKey

from l2d.core.block import Block
from l2d.core.coin_tx import Transfer
from l2d.core.commit import Commit
from l2d.core.genesis_file import load_genesis_file
from l2d.core.params import LOCAL
from l2d.core.tx import Transaction, sign
from l2d.store import Store
from tests.conftest import REPO, L2dProcess

DEMO1 = hashlib.sha256(b"l2d demo account 1").digest()
DEMO2 = PrivateKey(hashlib.sha256(b"l2d demo account 2").digest()).public_key_xonly.format()


def _free_base(n: int) -> int:
    """A base port with n free consecutive ports above it."""
    for base in range(31000, 60000, 97):
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no free ports")


def _transfer(nonce: int) -> Transaction:
    return sign(LOCAL, DEMO1, nonce, 1, Transfer(DEMO2, 1000), bytes(32))


class Federation:
    def __init__(self, root: Path, n: int = 4) -> None:
        self.root = root
        self.n = n
        r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-init", "--members", str(n), "--dir",
                            str(root), "--base-port", str(_free_base(n))], capture_output=True, text=True, cwd=REPO,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        with (root / "genesis.json").open("rb") as f:
            self.genesis = load_genesis_file(f)
        self.procs: dict[int, L2dProcess] = {}
        self.starts = [0] * n

    def start(self, k: int) -> L2dProcess:
        self.starts[k] += 1
        p = L2dProcess(self.root / f"member-{k + 1}" / "l2d.toml", self.root / f"member-{k + 1}-{self.starts[k]}.log")
        self.procs[k] = p
        return p

    def kill(self, k: int) -> None:
        self.procs.pop(k).kill()

    def stop_all(self) -> None:
        for k in list(self.procs):
            assert self.procs.pop(k).stop() == 0

    def submit(self, k: int, tx: Transaction) -> None:
        p = self.procs[k]
        req = json.dumps({"tx": tx.raw.hex()}).encode()
        r = urllib.request.Request(p.url("/api/l2/tx"), data=req, method="POST",
                                   headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=30) as resp:
            assert resp.status == 202

    def status(self, k: int) -> dict[str, Any]:
        return self.procs[k].get("/api/status")  # type: ignore[no-any-return]

    def tx_height(self, k: int, tx: Transaction) -> int | None:
        code, body = self.procs[k].get_raw(f"/api/l2/tx/{tx.txid.hex()}")
        st = json.loads(body)
        return st["height"] if code == 200 and st["status"] == "committed" else None

    def check_databases(self) -> int:
        """Every member's database (processes stopped): the same block at every height up to the lowest final
        height, each carrying a commit of at least m valid signatures; returns that height."""
        stores = [Store(self.root / f"member-{k + 1}" / "data" / "ledger", LOCAL) for k in range(self.n)]
        try:
            finals = [s.final_height() for s in stores]
            low = min(finals)
            for h in range(1, low + 1):
                raws = {s.get_block(h) for s in stores}
                assert len(raws) == 1, f"members disagree at final height {h}"
                (raw,) = raws
                assert raw is not None
                block = Block.decode(raw, LOCAL)
                for s in stores:
                    commit = s.get_commit(h)
                    assert commit is not None
                    self.genesis.verify_commit(Commit.decode(commit), block.header.hash)
            return low
        finally:
            for s in stores:
                s.close()


async def test_four_members_agree_a_killed_member_catches_up_and_two_down_stop_finality(
        tmp_path: Path, poll: Callable[..., Any]) -> None:
    fed = Federation(tmp_path / "fed")
    try:
        for k in range(4):
            fed.start(k)
        # 1. transfers of one sender submitted to different members (gossip fills the others' nonce gaps)
        txs = [_transfer(i) for i in range(24)]
        for i, tx in enumerate(txs):
            fed.submit(i % 4, tx)
        await poll(lambda: all(fed.tx_height(k, txs[-1]) is not None for k in range(4)), 60, "all committed")
        last = fed.tx_height(0, txs[-1])
        assert last is not None
        await poll(lambda: all(fed.status(k)["final_height"] >= last for k in range(4)), 60, "final everywhere")
        heights = {fed.tx_height(k, t) for k in range(4) for t in txs[:1]}
        assert len(heights) == 1  # the same block on every member
        tips = {(fed.status(k)["height"], fed.status(k)["tip_hash"]) for k in range(4)}
        metrics = fed.procs[0].get_raw("/metrics")[1].decode()
        assert "l2d_federation_peers_connected 3" in metrics  # an authenticated link to each other member
        assert "l2d_federation_commit_seconds_count 0" not in metrics

        # 2. SIGKILL member 2: the other three keep finalizing; restarted, it catches up and signs again
        fed.kill(1)
        more = [_transfer(24 + i) for i in range(12)]
        for i, tx in enumerate(more):
            fed.submit((0, 2, 3)[i % 3], tx)
        await poll(lambda: all(fed.tx_height(k, more[-1]) is not None for k in (0, 2, 3)), 60, "committed by 3")
        top = fed.tx_height(0, more[-1])
        assert top is not None and top > max(h for h, _ in tips)
        await poll(lambda: all(fed.status(k)["final_height"] >= top for k in (0, 2, 3)), 60, "final with 3")
        fed.start(1)
        await poll(lambda: fed.status(1)["final_height"] >= top, 60, "the restarted member caught up")
        assert fed.tx_height(1, more[-1]) == top
        again = _transfer(36)
        fed.submit(1, again)  # submitted to the member that came back
        await poll(lambda: all(fed.tx_height(k, again) is not None for k in range(4)), 60, "committed after rejoin")

        # 3. two members down: nothing becomes final; one back: progress resumes
        fed.kill(2)
        fed.kill(3)
        stuck = fed.status(0)["final_height"]
        blocked = _transfer(37)
        fed.submit(0, blocked)
        # Without a quorum no timeout certificate forms either, so the round stays: give the two members three
        # round lengths (federation.round_ms = 2000) in which a block could have been signed, and see none was.
        until = time.monotonic() + 6.0
        await poll(lambda: time.monotonic() > until and fed.procs[1].get_raw(
            f"/api/l2/tx/{blocked.txid.hex()}")[0] == 200, 60, "three round lengths, the tx gossiped to member 2")
        assert fed.status(0)["final_height"] == stuck and fed.status(1)["final_height"] == stuck
        assert fed.tx_height(0, blocked) is None or fed.tx_height(0, blocked) > stuck
        fed.start(2)
        await poll(lambda: fed.tx_height(0, blocked) is not None, 120, "progress with three members")
        h = fed.tx_height(0, blocked)
        assert h is not None
        await poll(lambda: all(fed.status(k)["final_height"] >= h for k in (0, 1, 2)), 120, "final again")
        fed.start(3)
        await poll(lambda: fed.status(3)["final_height"] >= h, 60, "the fourth member caught up")
    finally:
        for k in list(fed.procs):
            fed.procs.pop(k).kill()
    assert fed.check_databases() >= 1
