"""Ledger benchmarks: block throughput, full state root, incremental tree update (ratios to same-run baselines).

    python bench/bench_ledger.py [--accounts N] [--blocks B] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import keypairs, schnorr_baseline, sha256_baseline, timed  # noqa: E402

from l2d.core import tx as T  # noqa: E402
from l2d.core.coin_tx import Transfer  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.state import SUPPLY_KEY, Account, Rules, Supply, account_key
from l2d.core.tree import RootBuilder, StateTree, _nib  # noqa: E402
from l2d.ledger import Ledger  # noqa: E402
from l2d.store import Store  # noqa: E402

BLOCK = 1000


def genesis(accounts: int, active: list[tuple[bytes, bytes]], rnd: random.Random) -> dict[bytes, bytes]:
    """Active (signing) accounts with large balances plus filler accounts up to `accounts` records."""
    state = {account_key(pk): Account(10**12, 0).encode() for _, pk in active}
    while len(state) < accounts:
        state[account_key(rnd.randbytes(32))] = Account(1000, 0).encode()
    total = sum(Account.decode(v).balance_sat for v in state.values())
    state[SUPPLY_KEY] = Supply(total, 0, 0).encode()
    return state


def signed_blocks(active: list[tuple[bytes, bytes]], blocks: int, rnd: random.Random) -> list[list[bytes]]:
    nonces = [0] * len(active)
    out = []
    for b in range(blocks):
        raws = []
        for i in range(BLOCK):
            s = (b * BLOCK + i) % len(active)
            r = rnd.randrange(len(active) - 1)
            r += r >= s
            t = T.sign(LOCAL, active[s][0], nonces[s], 1, Transfer(active[r][1], 1 + rnd.randrange(1000)), b"\0" * 32)
            nonces[s] += 1
            raws.append(t.raw)
        out.append(raws)
    return out


def _verify_chunk(raws: list[bytes]) -> list[bool]:
    return [T.signature_ok(r) for r in raws]


def throughput(accounts: int, blocks: int, workers: int) -> dict[str, float]:
    rnd = random.Random(7)
    active = keypairs(min(accounts, 5000))
    state = genesis(accounts, active, rnd)
    payload = signed_blocks(active, blocks, rnd)
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d), LOCAL)
        ledger = Ledger(store, Rules(LOCAL, 1))
        ledger.open(state, 0)
        T.xonly_key.cache_clear()
        committed = 0

        def serial() -> None:
            nonlocal committed
            for raws in payload:
                built = ledger.build_block([T.decode(r, LOCAL) for r in raws], 1)
                ledger.commit(built)
                committed += len(built.block.txs)

        def pipelined(pool: ProcessPoolExecutor) -> None:
            nonlocal committed
            n = max(1, workers - 1)
            chunk = BLOCK // n
            futs = [[pool.submit(_verify_chunk, raws[i:i + chunk]) for i in range(0, BLOCK, chunk)] for raws in payload[:1]]
            for b, raws in enumerate(payload):
                if b + 1 < len(payload):
                    nxt = payload[b + 1]
                    futs.append([pool.submit(_verify_chunk, nxt[i:i + chunk]) for i in range(0, BLOCK, chunk)])
                ok = [v for f in futs[b] for v in f.result()]
                txs = [T.decode(r, LOCAL) for r, good in zip(raws, ok) if good]
                built = ledger.build_block(txs, 1, signatures_checked=True)
                ledger.commit(built)
                committed += len(built.block.txs)

        if workers == 1:
            dt = timed(serial)
        else:
            with ProcessPoolExecutor(max(1, workers - 1)) as pool:
                pool.submit(_verify_chunk, []).result()  # start the worker outside the timing
                dt = timed(lambda: pipelined(pool))
        store.close()
    if committed != blocks * BLOCK:
        raise SystemExit(f"only {committed} of {blocks * BLOCK} transfers committed")
    return {"tx_per_s": committed / dt, "seconds": dt}


def state_root(accounts: int) -> dict[str, float]:
    rnd = random.Random(3)
    items = sorted((account_key(rnd.randbytes(32)), Account(rnd.randrange(10**9), 0).encode()) for _ in range(accounts))

    def build() -> None:
        b = RootBuilder()
        add = b.add
        for k, v in items:
            add(k, v)
        b.root()

    dt = timed(build)
    base = sha256_baseline(2 * accounts)
    tree = StateTree()
    t_tree = timed(lambda: [tree.set(k, v) for k, v in items] and tree.root())
    return {"root_seconds": dt, "sha256_2n_seconds": base, "ratio": dt / base, "tree_build_seconds": t_tree,
            "_tree": tree, "_items": items}  # type: ignore[dict-item]


def incremental(tree: StateTree, items: list[tuple[bytes, bytes]], blocks: int = 5) -> dict[str, float]:
    """One block of 1,000 transfers = 2,000 account updates + the supply record, rehashed once."""
    rnd = random.Random(5)
    total = 0.0
    touched = 0
    for _ in range(blocks):
        changed = [items[i] for i in rnd.sample(range(len(items)), 2 * BLOCK)]

        def update() -> None:
            for k, v in changed:
                tree.set(k, v[:8] + os.urandom(8))
            tree.set(SUPPLY_KEY, os.urandom(24))
            tree.root()

        total += timed(update)
        touched += len(changed) + 1
    depths = []
    for k, _ in rnd.sample(items, 2000):
        node, d = tree._root, 0
        while type(node) is list:
            node = node[2 + _nib(k, d)]
            d += 1
        depths.append(d)
    depth = sum(depths) / len(depths)
    one_sha = sha256_baseline(200_000) / 200_000
    us = total / touched * 1e6
    return {"us_per_key": us, "depth": depth, "sha256_us": one_sha * 1e6, "ratio": us / (depth * one_sha * 1e6)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accounts", type=int, default=1_000_000)
    ap.add_argument("--blocks", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.accounts, a.blocks = 20_000, 2
    res: dict[str, object] = {}
    sig = schnorr_baseline()
    res["schnorr_verify_per_s"] = round(sig)
    for accounts in sorted({10_000, a.accounts}):
        one = throughput(accounts, a.blocks, 1)
        res[f"ledger_{accounts}_1core_tx_per_s"] = round(one["tx_per_s"])
        res[f"ledger_{accounts}_1core_ratio"] = round(one["tx_per_s"] / sig, 3)
        two = throughput(accounts, a.blocks, 2)
        res[f"ledger_{accounts}_2core_tx_per_s"] = round(two["tx_per_s"])
        res[f"ledger_{accounts}_2core_ratio"] = round(two["tx_per_s"] / sig, 3)
    sr = state_root(a.accounts)
    res[f"state_root_{a.accounts}_seconds"] = round(sr["root_seconds"], 3)
    res["sha256_2n_seconds"] = round(sr["sha256_2n_seconds"], 3)
    res["state_root_ratio"] = round(sr["ratio"], 3)
    res[f"tree_build_{a.accounts}_seconds"] = round(sr["tree_build_seconds"], 3)
    inc = incremental(sr["_tree"], sr["_items"])  # type: ignore[arg-type]
    res["incremental_us_per_key"] = round(inc["us_per_key"], 2)
    res["incremental_tree_depth"] = round(inc["depth"], 2)
    res["incremental_ratio_to_depth_x_sha256"] = round(inc["ratio"], 2)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
