"""Anchor latency on regtest: time from an L2 block commit to its anchor transaction accepted in bitcoind's mempool.

    python bench/bench_anchor.py [--anchors N]

Starts a throwaway bitcoind regtest (regtest/harness.py, ZMQ on) and an in-process l2d node (one member, 10 ms
blocks) whose [bridge] federation is one key, threshold 1, anchoring in Taproot mode every block (K = 1). Anchors
are plans of the federation (anchoring/service.py): the anchor service proposes an AnchorPlan, the bridge service
signs it with the federation's key once its block is final and broadcasts it, and the anchor service marks the
anchor SUBMITTED once the signed transaction is in its bitcoind. The federation is funded once, as an operator
does (`l2-cli federation-fund`): 0.1 BTC paid to its funding address (GET /api/bridge/federation), mined
pegin_min_depth deep, its headers relayed, recorded with its SPV proof (POST /api/admin/bridge/fund); the first
anchor spends that coin, each later one the previous anchor's output.

confirmations = final_confirmations = 1: one anchor plan is in flight until its FINAL AnchorUpdate completes it
(the next plan spends its output), so with FINAL further away each anchor would wait for that many more Bitcoin
blocks and the figure would be Bitcoin's block time, not the anchoring pipeline. Here each round mines one
Bitcoin block: it makes the anchor in flight FINAL, the FINAL AnchorUpdate lands in an L2 block, and the anchor
service anchors the newest final height at once. The anchor built while the federation was unfunded (its L2 block
committed long before the funding) is a warm-up, not measured.

Two figures per anchor, both from the anchor service's own records:
- **commit -> mempool**, the service's ``accept_latency_ms`` (what it reports in GET /api/anchors): wall clock from
  just after the anchored L2 block's commit to the step that finds the signed transaction in bitcoind. The anchored
  block is the newest final one when the previous plan completes: in this run, the block holding the previous
  anchor's PlanSignature, committed before that anchor reached the mempool. So the figure also covers the previous
  anchor's broadcast and this benchmark's mining step (on mainnet: the previous anchor's final_confirmations).
- **mined -> mempool**: from just before this benchmark mines the block that makes the previous anchor FINAL to
  the service marking this anchor SUBMITTED (its ``submitted_at``): one anchoring cycle on its own. The service
  sees the block (ZMQ) and posts the FINAL AnchorUpdate (an L2 block: the plan completed), proposes the next plan
  (a block, and an empty one making it final), the bridge signs it once final (its PlanSignature: a block and its
  finalizer) and broadcasts it, and the service finds it in bitcoind: five to seven L2 blocks (with the FINAL
  update's finalizer and the mined block's header relay; block.interval_ms 10 apart at least) and the services'
  polls of the state and bitcoind (bridge and anchoring poll_interval_ms 50, the minimum; the anchor service is
  also woken by each L2 commit and ZMQ block, the bridge is not).

Baseline, measured in the same run on the same bitcoind (5 per round, between anchors): a bare broadcast of a
comparable transaction, a wallet-signed 1-input 1-output Taproot (P2TR key-path) spend prepared beforehand: the
sendrawtransaction round trip, which returns once bitcoind accepted it to its mempool. That is what the anchor
itself costs bitcoind; the ratio is what the federation's pipeline (plan, k-of-n signature, L2 finality, polls)
adds on top, the number to watch when that pipeline changes.

Prints JSON: for each figure the median over N anchors (default 20), min, p90 and max, and the same over the 5N
baseline broadcasts; the ratios of the medians to the baseline's; the anchored L2 heights; and whether the anchors
chain (each spends the previous anchor's output and its record names the previous record's link). Needs bitcoind
on PATH (or $BITCOIND); returns {"skipped": reason} without it. Not in `make bench` (bench/run_all.py);
tests/bench/test_bench_anchor.py runs --anchors 3.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from anchoring.service import Anchor, AnchorService, AnchorState  # noqa: E402
from bridge.rpc import BitcoinRPC  # noqa: E402
from l2d.config import Config  # noqa: E402
from l2d.node import Node  # noqa: E402
from regtest.harness import BitcoindNode, find_bitcoind, fund_wallet  # noqa: E402
from regtest.members import MIN_DEPTH, fund_body, poll, proven_deposit  # noqa: E402

FUNDING_SAT = 10_000_000  # the federation's funding coin: the first anchor spends it, its output pays the next fees
BASELINE_SAT = 100_000  # each baseline transaction's input
BASELINE_FEE_SAT = 1_000
BASELINE_PER_ANCHOR = 5  # broadcasts per round: a few milliseconds each, so more samples for a steadier median
POLL_MS = 50  # anchoring and bridge poll_interval_ms: the minimum
ANCHOR_TIMEOUT_S = 120.0


def _figures(name: str, xs: Sequence[float]) -> dict[str, float]:
    s = sorted(xs)
    return {f"{name}_median": round(statistics.median(s), 2), f"{name}_min": round(s[0], 2),
            f"{name}_p90": round(s[max(0, int(0.9 * len(s)) - 1)], 2), f"{name}_max": round(s[-1], 2)}


async def baseline_txs(rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str, n: int) -> list[bytes]:
    """n signed transactions, each spending its own confirmed P2TR output of the wallet w to a new P2TR address."""
    addrs = [await w.getnewaddress("baseline", "bech32m") for _ in range(n)]
    await w.call("sendmany", ["", {a: BASELINE_SAT / 1e8 for a in addrs}], wallet=True, idempotent=False)
    await rpc.generatetoaddress(1, mine_addr)
    out = []
    for u in await w.listunspent(1, 9_999_999, addrs):
        dest = await w.getnewaddress("baseline", "bech32m")
        raw = await w.call("createrawtransaction", [[{"txid": u.txid[::-1].hex(), "vout": u.vout}],
                                                    [{dest: (u.amount_sat - BASELINE_FEE_SAT) / 1e8}]])
        signed = await w.call("signrawtransactionwithwallet", [raw], wallet=True)
        if not signed["complete"]:
            raise RuntimeError(f"the wallet did not sign a baseline transaction: {signed}")
        out.append(bytes.fromhex(signed["hex"]))
    if len(out) != n:
        raise RuntimeError(f"{len(out)} baseline outputs found, {n} paid")
    return out


async def chained(rpc: BitcoinRPC, anchors: Sequence[Anchor]) -> bool:
    """Each anchor's transaction spends the previous one's anchor output and its record names the previous link."""
    for prev, nxt in zip(anchors, anchors[1:]):
        tx = await rpc.call("decoderawtransaction", [nxt.raw_tx])
        spent = {(i["txid"], i["vout"]) for i in tx["vin"]}
        if (prev.txid, prev.anchor_vout) not in spent or nxt.record[92:] != prev.anchor_record_link:
            return False  # prev_link: the record's last 32 bytes
    return True


async def run(n: int, work: Path, binary: str) -> dict[str, Any]:
    btc = BitcoindNode(work / "bitcoind", bitcoind=binary)
    btc.start()
    try:
        rpc = btc.rpc()
        try:
            w, mine_addr = await fund_wallet(rpc, "miner")
            baseline = await baseline_txs(rpc, w, mine_addr, n * BASELINE_PER_ANCHOR)
            data = work / "l2d"
            token = secrets.token_hex(16)
            cfg = Config.from_dict({
                "node": {"network": "regtest", "data_dir": str(data), "log_level": "WARNING"},
                "block": {"interval_ms": 10},
                "api": {"host": "127.0.0.1", "port": 0, "admin_token": token},
                "snapshots": {"every_blocks": 0},
                "anchoring": {"enabled": True, "mode": "taproot", "every_blocks": 1, "confirmations": 1,
                              "final_confirmations": 1, "poll_interval_ms": POLL_MS},
                "bridge": {"enabled": True, "threshold": 1, "signer_key_files": [str(data / "signer.key")],
                           "pegin_min_depth": MIN_DEPTH, "poll_interval_ms": POLL_MS},
                "bitcoind": {"rpc_url": btc.rpc_url, "cookie_file": str(btc.cookie_path),
                             "zmq_hashblock": btc.zmq_endpoint, "zmq_sequence": btc.zmq_endpoint},
            }, work, env={})
            node = Node.from_config(cfg)
            await node.start()
            try:
                svc = node.anchor_service
                assert svc is not None
                res = await measure(node, svc, rpc, w, mine_addr, token, baseline)
            finally:
                await node.stop()
        finally:
            await rpc.close()
    finally:
        btc.stop()
    return res


async def measure(node: Node, svc: AnchorService, rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str, token: str,
                  baseline: Sequence[bytes]) -> dict[str, Any]:
    """Fund the federation, then one anchor per round (after a warm-up one) and one baseline broadcast."""
    n = len(baseline) // BASELINE_PER_ANCHOR
    api = f"http://127.0.0.1:{node.port}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async def federation() -> Any:
            async with http.get(f"{api}/api/bridge/federation") as r:
                r.raise_for_status()
                return await r.json()

        async def relayed() -> bool:
            tip = (await federation())["btc_tip"]
            return tip is not None and tip["height"] == await rpc.getblockcount()

        # fund the federation as an operator does (l2-cli federation-fund): the anchors' fees
        _, proof = await proven_deposit(rpc, w, mine_addr, relayed, (await federation())["funding_address"],
                                        FUNDING_SAT)
        async with http.post(f"{api}/api/admin/bridge/fund", json=fund_body(proof)) as r:
            if r.status != 202:
                raise RuntimeError(f"POST /api/admin/bridge/fund: {r.status} {await r.text()}")

        async def funded() -> bool:
            return bool((await federation())["funded_sat"] > 0)
        await poll(funded, 60, "the funding coin recorded")

        def submitted(after: int) -> Any:
            for a in svc.all_anchors():
                if a.l2_height > after and a.status == AnchorState.SUBMITTED and a.accept_latency_ms is not None:
                    return a
            return None
        warmup = await poll(lambda: submitted(-1), ANCHOR_TIMEOUT_S, "the first anchor in the mempool",
                            interval=0.005)
        measured: list[Anchor] = []
        bare: list[float] = []
        cycle: list[float] = []
        last = warmup
        while len(measured) < n:
            for raw in baseline[len(measured) * BASELINE_PER_ANCHOR:(len(measured) + 1) * BASELINE_PER_ANCHOR]:
                t0 = time.perf_counter()  # the baseline: a comparable transaction broadcast on the same bitcoind
                await rpc.sendrawtransaction(raw)
                bare.append((time.perf_counter() - t0) * 1000)
            mined = time.time()
            await rpc.generatetoaddress(1, mine_addr)  # the anchor in flight: FINAL; the next one follows
            prev = last.l2_height
            last = await poll(lambda: submitted(prev), ANCHOR_TIMEOUT_S,
                              f"anchor {len(measured) + 1} of {n} in the mempool", interval=0.005)
            measured.append(last)
            cycle.append(((last.submitted_at or mined) - mined) * 1000)  # the service's clock: when it saw it
            print(f"anchor {len(measured)}/{n}: L2 height {last.l2_height}, {last.accept_latency_ms:.1f} ms",
                  file=sys.stderr, flush=True)
        chain = await chained(rpc, [svc.anchors[a.l2_height] for a in (warmup, *measured)])  # as recorded now
    lat = [a.accept_latency_ms or 0.0 for a in measured]
    res: dict[str, Any] = {
        "config": (f"1 member, federation 1 key threshold 1, block.interval_ms 10, anchoring taproot every block, "
                   f"confirmations = final_confirmations = 1, anchoring and bridge poll_interval_ms {POLL_MS}; "
                   f"one Bitcoin block per anchor"),
        "anchors": n, "chained": chain,
        "l2_heights": [a.l2_height for a in measured],
    }
    res.update(_figures("commit_to_mempool_ms", lat))
    res.update(_figures("mined_to_mempool_ms", cycle))
    res.update(_figures("baseline_sendrawtransaction_ms", bare))
    base = max(res["baseline_sendrawtransaction_ms_median"], 0.01)
    for name in ("commit_to_mempool", "mined_to_mempool"):
        res[f"{name}_vs_baseline_median"] = round(res[f"{name}_ms_median"] / base, 1)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=20, help="anchors measured (default 20)")
    a = ap.parse_args(argv)
    if a.anchors < 1:
        ap.error(f"--anchors {a.anchors}: must be at least 1")
    binary = find_bitcoind()
    if binary is None:
        res: dict[str, Any] = {"skipped": "bitcoind not found (set $BITCOIND or put it on PATH)"}
    else:
        with tempfile.TemporaryDirectory(prefix="l2d-bench-anchor-") as d:
            res = asyncio.run(run(a.anchors, Path(d), binary))
    print(json.dumps(res, sort_keys=True))
    return res


if __name__ == "__main__":
    main()
