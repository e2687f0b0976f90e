"""Daemon memory: RSS of a real `l2d` process whose state holds N accounts (with the default tree cache), its start-up
time, and the median latency of GET /api/dashboard and of an account read (with its proof) at that size.

    python bench/bench_daemon_memory.py [--accounts N]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import current_rss_mb, rss_parts_mb  # noqa: E402

from l2d.core.block import Block, BlockHeader, tx_root  # noqa: E402
from l2d.core.commit import Commit, sign_block  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.state import Account, account_key
from l2d.core.tree import build_tree  # noqa: E402
from l2d.store import Store  # noqa: E402


def _config(tmp: Path) -> Path:
    cfg = tmp / "node.toml"
    cfg.write_text('[node]\nnetwork = "local"\ndata_dir = "data"\nlog_level = "WARNING"\n[api]\nport = 0\n'
                   '[snapshots]\nevery_blocks = 0\n')
    return cfg


def _add_accounts(data_dir: Path, accounts: int) -> None:
    """Commit one block whose state holds `accounts` more account records (the node must be stopped).

    The block carries no transactions: it is a storage fixture (as if the accounts had been minted over
    many blocks), committed with a correct header and the member's commit, so the daemon's start-up checks pass.
    """
    rnd = random.Random(11)
    store = Store(data_dir / "ledger", LOCAL)
    try:
        with store.reader() as r:
            tip = Block.decode(bytes(r.get_block(r.tip_height())), LOCAL).header  # type: ignore[arg-type]
            state = {bytes(k): bytes(v) for k, v in r.iter_state()}
        writes: dict[bytes, bytes | None] = {}
        value = Account(1000, 0).encode()
        while len(writes) < accounts:
            writes[account_key(rnd.randbytes(32))] = value
        root, tree = build_tree(sorted({**state, **writes}.items()))  # type: ignore[arg-type]
        del state
        header = BlockHeader(tip.network_id, tip.height + 1, tip.hash, tip.timestamp_ms, 0, tx_root([]), root)
        # signed by the 1-member federation's key (data_dir/member.key) and final, as its own blocks are
        member = bytes.fromhex((data_dir / "member.key").read_text().strip())
        commit = Commit.assemble(1, {0: sign_block(member, LOCAL, header.hash, bytes(32))})
        store.commit_block(header.height, Block(header, ()).encode(), [], writes, commit=commit.encode(),
                           final=header.height, tree=tree)
    finally:
        store.close()


def _start(cfg: Path) -> tuple[subprocess.Popen[str], float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(cfg)], cwd=REPO, env=env,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # log_level WARNING hides "api listening": find the listening port in /proc, then poll /health.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"l2d exited: {p.stderr.read() if p.stderr else ''}")
        port = _listening_port(p.pid)
        if port:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                return p, time.perf_counter() - t
            except OSError:
                pass
        time.sleep(0.2)
    raise SystemExit("l2d did not come up")


def _listening_port(pid: int) -> int | None:
    """The TCP port a process listens on, read from /proc (no extra tools needed)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # state LISTEN
                return int(parts[1].split(":")[1], 16)
    return None


def _latency_ms(url: str, n: int = 30) -> float:
    """Median milliseconds of n sequential GETs (after one to warm up)."""
    urllib.request.urlopen(url, timeout=60).read()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        urllib.request.urlopen(url, timeout=60).read()
        times.append(time.perf_counter() - t)
    return round(1000 * sorted(times)[n // 2], 2)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accounts", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    res: dict[str, float] = {"accounts": a.accounts}
    with tempfile.TemporaryDirectory() as d:
        cfg = _config(Path(d))
        p, secs = _start(cfg)  # genesis only
        res["empty_rss_mb"] = round(current_rss_mb(p.pid), 1)
        p.terminate()
        p.wait(timeout=120)
        t = time.perf_counter()
        _add_accounts(Path(d) / "data", a.accounts)
        res["populate_seconds"] = round(time.perf_counter() - t, 2)
        p, secs = _start(cfg)
        res["start_seconds"] = round(secs, 2)  # process start to /health answering (the root check reads one record)
        res["rss_mb"] = round(current_rss_mb(p.pid), 1)
        res["rss_parts_at_start_mb"] = rss_parts_mb(p.pid)  # type: ignore[assignment]
        res["rss_bytes_per_account"] = round((res["rss_mb"] - res["empty_rss_mb"]) * 2**20 / a.accounts)
        port = _listening_port(p.pid)
        for name, path in (("dashboard", "/api/dashboard"), ("account", f"/api/l2/accounts/{'ab' * 32}")):
            res[f"{name}_ms"] = _latency_ms(f"http://127.0.0.1:{port}{path}")
        rnd = random.Random(5)  # proofs of 2,000 random accounts: the tree's pages read from LMDB's map
        for _ in range(2000):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/l2/accounts/{rnd.randbytes(32).hex()}").read()
        res["rss_parts_after_2000_proofs_mb"] = rss_parts_mb(p.pid)  # type: ignore[assignment]
        p.terminate()
        p.wait(timeout=120)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
