"""Anchor latency on regtest: time from an L2 block commit to its anchor transaction accepted in bitcoind's mempool.

    python bench/bench_anchor.py [--anchors N]

Starts a throwaway bitcoind regtest (regtest/harness.py, ZMQ on) and an in-process l2d node with Taproot
anchoring every block (K = 1, confirmations 1, FINAL far away so no FINAL updates interleave). The federation
is funded once; then each round mines one Bitcoin block, which confirms the anchor in flight; the service writes
an AnchorUpdate, whose L2 block is the next anchored height, and the service anchors it at once. The latency of
each anchor is measured by the service itself (``accept_latency_ms``: wall clock from just after the L2 commit to
sendrawtransaction returning, which includes the federation coin scan, fee estimate, signing and
testmempoolaccept). Prints the median over N anchors (default 20), with min, p90 and max.
Needs bitcoind on PATH (or $BITCOIND); returns {"skipped": reason} without it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from coincurve import PrivateKey  # noqa: E402

from anchoring.btc_tx import key_path_script  # noqa: E402
from l2d.config import Config  # noqa: E402
from l2d.node import Node  # noqa: E402
from regtest.harness import BitcoindNode, find_bitcoind, fund_wallet  # noqa: E402
from regtest.members import poll  # noqa: E402

FED_SECRET = bytes.fromhex("5b" * 32)


async def run(n: int, work: Path, binary: str) -> dict[str, Any]:
    btc = BitcoindNode(work / "bitcoind", bitcoind=binary)
    btc.start()
    try:
        rpc = btc.rpc()
        try:
            w, mine_addr = await fund_wallet(rpc, "miner")
            spk = key_path_script(PrivateKey(FED_SECRET).public_key_xonly.format())
            info = await rpc.call("getdescriptorinfo", [f"rawtr({spk[2:].hex()})"])
            fed_addr = (await rpc.call("deriveaddresses", [info["descriptor"]]))[0]
            await w.sendtoaddress(fed_addr, 10_000_000)
            await rpc.generatetoaddress(1, mine_addr)

            data = work / "l2d"
            data.mkdir()
            (data / "federation.key").write_text(FED_SECRET.hex() + "\n")
            (data / "federation.key").chmod(0o600)
            cfg = Config.from_dict({
                "node": {"network": "regtest", "data_dir": str(data), "log_level": "WARNING"},
                "block": {"interval_ms": 10},
                "api": {"port": 0},
                "snapshots": {"every_blocks": 0},
                "anchoring": {"enabled": True, "mode": "taproot", "every_blocks": 1, "confirmations": 1,
                              "final_confirmations": 10_000, "poll_interval_ms": 1000,
                              "federation_key_file": str(data / "federation.key")},
                "bitcoind": {"rpc_url": btc.rpc_url, "cookie_file": str(btc.cookie_path),
                             "zmq_hashblock": btc.zmq_endpoint},
            }, work, env={})
            node = Node.from_config(cfg)
            await node.start(serve_http=False)
            try:
                svc = node.anchor_service
                assert svc is not None
                user = PrivateKey(bytes.fromhex("77" * 32)).public_key_xonly.format()
                node.admission.mint(user, 1000)  # L2 block 1: the first anchored height
                lat: list[float] = []
                seen: set[int] = set()
                while len(lat) < n:
                    def fresh() -> Any:
                        for a in svc.all_anchors():
                            if a.l2_height not in seen and a.status.value == "SUBMITTED" and a.accept_latency_ms:
                                return a
                        return None
                    a = await poll(fresh, 60, "the next anchor in the mempool", interval=0.005)
                    seen.add(a.l2_height)
                    lat.append(a.accept_latency_ms)
                    await rpc.generatetoaddress(1, mine_addr)  # confirm it: the next anchor follows
            finally:
                await node.stop()
        finally:
            await rpc.close()
    finally:
        btc.stop()
    lat_sorted = sorted(lat)
    return {
        "anchors": n,
        "commit_to_mempool_ms_median": round(statistics.median(lat), 2),
        "commit_to_mempool_ms_min": round(lat_sorted[0], 2),
        "commit_to_mempool_ms_p90": round(lat_sorted[max(0, int(0.9 * n) - 1)], 2),
        "commit_to_mempool_ms_max": round(lat_sorted[-1], 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=int, default=20)
    a = ap.parse_args(argv)
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
