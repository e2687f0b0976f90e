"""The state tree in LMDB at scale (issue 17): a ledger of N accounts opened in a fresh process — start-up time and
RSS with the default tree cache —, block throughput there against bare BIP340 verification measured in the same
process, and the cost per touched key of updating the stored tree with a cold and a warm cache.

Per block it also reports the milliseconds of building it (execution and the tree) and of storing it (one LMDB write
transaction, flushed), and the megabytes the disk was sent meanwhile (/proc/diskstats, the database's device); then
the same blocks once more with LMDB's flush turned off (Store(durable=False), a benchmark-only setting): how much of
a block is the disk, and the most any tuning of this layout could reach (docs/state-tree.md, "What a block costs").

    python bench/bench_state_store.py [--accounts N] [--blocks B] [--quick]

The database is made once by a separate process (genesis with N records: 5,000 funded signing accounts and
filler accounts), so the measured process holds nothing but what the daemon's ledger holds; the kernel's page cache
is dropped in between where that is allowed (root), so start-up and the first touch of a node read the disk.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_ledger import BLOCK, _verify_chunk, genesis, signed_blocks  # noqa: E402
from common import disk_written_bytes, keypairs, rss_parts_mb, schnorr_baseline, timed  # noqa: E402

from l2d.core import tx as T  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.state import SUPPLY_KEY, Account, Rules, account_key  # noqa: E402
from l2d.ledger import Ledger, _tree_changes  # noqa: E402
from l2d.store import DEFAULT_TREE_CACHE, Store  # noqa: E402

ACTIVE = 5000


def make(path: Path, accounts: int) -> None:
    """The database: genesis with `accounts` records (run in its own process)."""
    rnd = random.Random(7)
    state = genesis(accounts, keypairs(ACTIVE), rnd)
    ledger = Ledger(Store(path, LOCAL), Rules(LOCAL, 1))
    ledger.open(state, 0)
    ledger.store.close()


def _open(path: Path, durable: bool = True) -> tuple[Ledger, float]:
    t = time.perf_counter()
    ledger = Ledger(Store(path, LOCAL, tree_cache=DEFAULT_TREE_CACHE, durable=durable), Rules(LOCAL, 1))
    ledger.open({}, 0)
    return ledger, time.perf_counter() - t


def throughput(ledger: Ledger, payload: list[list[bytes]]) -> dict[str, float]:
    """Blocks of 1,000 transfers, signatures checked in a second process one block ahead (as bench_ledger):
    transfers per second, and per block the milliseconds of building it (execution and the tree's new nodes), of
    storing it (one LMDB write transaction: records, nodes, and the disk's flush when durable) and the megabytes
    the disk was sent meanwhile (None where /proc/diskstats does not list the database's device)."""
    committed = 0
    build_s = store_s = 0.0

    def run(pool: ProcessPoolExecutor) -> None:
        nonlocal committed, build_s, store_s
        futs = [pool.submit(_verify_chunk, payload[0])]
        for b, raws in enumerate(payload):
            if b + 1 < len(payload):
                futs.append(pool.submit(_verify_chunk, payload[b + 1]))
            ok = futs[b].result()
            t0 = time.perf_counter()
            built = ledger.build_block([T.decode(r, LOCAL) for r, good in zip(raws, ok) if good], 1,
                                       signatures_checked=True)
            t1 = time.perf_counter()
            ledger.commit(built)
            build_s, store_s = build_s + t1 - t0, store_s + time.perf_counter() - t1
            committed += len(built.block.txs)

    with ProcessPoolExecutor(1) as pool:
        pool.submit(_verify_chunk, []).result()
        disk0 = disk_written_bytes(ledger.store.path)
        dt = timed(lambda: run(pool))
        disk1 = disk_written_bytes(ledger.store.path)
    if committed != len(payload) * BLOCK:
        raise SystemExit(f"only {committed} of {len(payload) * BLOCK} transfers committed")
    n = len(payload)
    return {"tx_per_s": committed / dt, "build_ms": build_s / n * 1e3, "store_ms": store_s / n * 1e3,
            "disk_mb": None if disk0 is None or disk1 is None else (disk1 - disk0) / n / 2**20}


def per_key_us(ledger: Ledger, keys: list[bytes], rounds: int) -> tuple[float, float]:
    """Microseconds per touched key to change `keys` (+ the supply record) in the stored tree — read the nodes on
    their paths, rehash (TreeOverlay) — and to commit the records and the changed nodes (one LMDB write transaction,
    fsynced, per round)."""
    store = ledger.store
    tree_s = commit_s = 0.0
    for i in range(rounds):
        writes: dict[bytes, bytes | None] = {k: Account(1000 + i, 1).encode() for k in keys}
        writes[SUPPLY_KEY] = os.urandom(24)
        t0 = time.perf_counter()
        with store.reader() as r:
            _, tree = _tree_changes(store, r, writes)
        t1 = time.perf_counter()
        store.commit_block(store.tip_height() + 1, b"bench", [], writes, tree=tree)  # type: ignore[operator]
        tree_s, commit_s = tree_s + t1 - t0, commit_s + time.perf_counter() - t1
    n = rounds * (len(keys) + 1)
    return tree_s / n * 1e6, commit_s / n * 1e6


def measure(path: Path, accounts: int, blocks: int) -> dict[str, object]:
    """In a fresh process: start-up, RSS, throughput and per-key cost."""
    res: dict[str, object] = {}
    sig = schnorr_baseline()
    res["schnorr_verify_per_s"] = round(sig)
    ledger, secs = _open(path)
    res["start_seconds"] = round(secs, 3)
    res["rss_after_open_mb"] = rss_parts_mb()
    rnd = random.Random(9)
    active = keypairs(ACTIVE)
    payload = signed_blocks(active, 4 * blocks, rnd)
    T.xonly_key.cache_clear()
    # the first blocks after start-up read their nodes and records from the disk; the next ones find them cached
    for name, part in (("after_start", payload[:blocks]), ("warm", payload[blocks:2 * blocks])):
        _report(res, name, throughput(ledger, part), sig)
    res["rss_after_blocks_mb"] = rss_parts_mb()
    ledger.store.close()
    # The same blocks when LMDB does not flush its commits (durable=False): the disk's share of a block, and the
    # ceiling of any tuning that keeps this store's layout (blocks after a warm-up, as "warm")
    ledger, _ = _open(path, durable=False)
    throughput(ledger, payload[2 * blocks:3 * blocks])
    _report(res, "warm_not_flushed", throughput(ledger, payload[3 * blocks:]), sig)
    ledger.store.close()
    ledger, _ = _open(path)
    # filler accounts touched for the first time (their nodes are not in the cache), then again (they are)
    pick = random.Random(3)
    sample = []
    with ledger.store.env.begin() as txn, txn.cursor(db=ledger.store._state) as cur:
        for _ in range(2000):  # the first account at or after a random point (no scan of the state)
            if cur.set_range(account_key(pick.randbytes(32))) and cur.key()[:1] == b"\x01":
                sample.append(bytes(cur.key()))
    sample = sorted(set(sample) - {account_key(pk) for _, pk in active})  # the blocks' senders keep their nonces
    for name, rounds in (("cold", 1), ("warm", 3)):
        tree_us, commit_us = per_key_us(ledger, sample, rounds)
        res[f"update_us_per_key_{name}"] = {"tree": round(tree_us, 2), "commit": round(commit_us, 2),
                                            "total": round(tree_us + commit_us, 2)}
    res["cache_mb"] = round(ledger.store._cache_bytes / 2**20, 1)
    res["rss_end_mb"] = rss_parts_mb()
    ledger.store.close()
    return res


def _report(res: dict[str, object], name: str, t: dict[str, float], sig: float) -> None:
    res[f"tx_per_s_2core_{name}"] = round(t["tx_per_s"])
    res[f"ratio_to_verify_{name}"] = round(t["tx_per_s"] / sig, 3)
    res[f"per_block_{name}"] = {"build_ms": round(t["build_ms"], 1), "store_ms": round(t["store_ms"], 1),
                                "disk_mb": None if t["disk_mb"] is None else round(t["disk_mb"], 1)}


def _drop_page_cache() -> bool:
    """Write dirty pages out and drop the kernel's page cache (needs root; False where not allowed)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accounts", type=int, default=10_000_000)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--_make", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._make:
        make(Path(a._make), a.accounts)
        return {}
    if a._measure:
        print(json.dumps(measure(Path(a._measure), a.accounts, a.blocks)))
        return {}
    if a.quick:
        a.accounts, a.blocks = 200_000, 3
    res: dict[str, object] = {"accounts": a.accounts}
    me = [sys.executable, str(Path(__file__).resolve()), "--accounts", str(a.accounts), "--blocks", str(a.blocks)]
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "ledger"
        t = time.perf_counter()
        subprocess.run(me + ["--_make", str(db)], check=True)
        res["make_seconds"] = round(time.perf_counter() - t, 1)
        res["db_mb"] = round(sum(f.stat().st_blocks * 512 for f in db.iterdir()) / 2**20)
        res["page_cache_dropped"] = _drop_page_cache()  # so start-up and the cold figures read the disk
        out = subprocess.run(me + ["--_measure", str(db)], check=True, capture_output=True, text=True).stdout
        res.update(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
