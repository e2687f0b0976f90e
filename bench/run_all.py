"""Run every benchmark (make bench) and print one JSON object of figures, each with its same-run baseline.

    python bench/run_all.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_anchor  # noqa: E402
import bench_api_load  # noqa: E402
import bench_daemon_memory  # noqa: E402
import bench_dashboard  # noqa: E402
import bench_fl  # noqa: E402
import bench_fl_l2  # noqa: E402
import bench_gateway  # noqa: E402
import bench_ledger  # noqa: E402
import bench_netflow  # noqa: E402
import bench_orchestration  # noqa: E402
import bench_pegout  # noqa: E402
import bench_rest  # noqa: E402
import bench_scheduler  # noqa: E402
import bench_sessions  # noqa: E402
import bench_slow_clients  # noqa: E402
import bench_spv  # noqa: E402
import bench_state_store  # noqa: E402
import bench_verifier  # noqa: E402
import federation  # noqa: E402
import soak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    a = ap.parse_args()
    n = 20_000 if a.quick else 1_000_000
    results = {
        "ledger": bench_ledger.main(["--quick"] if a.quick else []),
        "state_store": bench_state_store.main(["--quick"] if a.quick else []),  # 10 M accounts, tree in LMDB
        "verifier": bench_verifier.main(["--records", str(n)]),
        "daemon_memory": bench_daemon_memory.main(["--accounts", str(n)]),
        "spv": bench_spv.main(["--quick"] if a.quick else []),
        "sessions": bench_sessions.main(["--quick"] if a.quick else []),
        "netflow": bench_netflow.main(["--quick"] if a.quick else []),  # relays, SOCKS5 and curl, 64 MiB
        "gateway": bench_gateway.main(["--quick"] if a.quick else []),  # SmolLM2 direct vs through the gateway
        "scheduler": bench_scheduler.main([]),
        "orchestration": bench_orchestration.main(["--tasks", "10"] if a.quick else []),
        "federated": bench_fl.main(["--quick"] if a.quick else ["--epochs", "400"]),
        "federated_l2": bench_fl_l2.main(["--rounds", "10"] if a.quick else []),
        "rest": bench_rest.main(["--quick"] if a.quick else []),  # batch submissions vs the in-process ledger
        "dashboard": bench_dashboard.main(["--loads", "3"] if a.quick else []),  # chromium: first render, bytes
        "api_load": bench_api_load.main(["--quick"] if a.quick else []),  # 200 connections vs bare aiohttp
        "slow_clients": bench_slow_clients.main(["--slow", "200", "--pace", "1"] if a.quick else []),
        "federation": federation.main(["--quick"] if a.quick else []),  # real member processes, ~2 min
        "pegout": bench_pegout.main(["--quick"] if a.quick else []),  # member processes and bitcoind, ~4 min
        "anchor": bench_anchor.main(["--anchors", "3"] if a.quick else []),  # one member, federation anchors
        "soak": soak.main(["--kills", "5"] if a.quick else []),  # 50 SIGKILLs of a real daemon (~1.5 s each)
    }
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    if not results["soak"]["ok"]:
        sys.exit(f"soak: {results['soak']['problems'][:3]}")


if __name__ == "__main__":
    main()
