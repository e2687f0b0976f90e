"""Run every benchmark (make bench) and print one JSON object of figures, each with its same-run baseline.

    python bench/run_all.py [--quick]

Each benchmark runs in a fresh interpreter of its own, one after the other: what one leaves behind (torch and
Flower imported, a large heap that makes every garbage collection slower, threads) does not slow the next. (In one
process, bench_rest's client threads ran after the FL benchmarks' imports and committed 0.56 of the in-process rate
instead of 0.74, and its spawned readers re-imported every benchmark before their first read.) A benchmark that
fails is reported as {"error": ...} and the others still run; the exit status is then non-zero.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT = "RESULT "  # the line a benchmark's process ends with: its figures as JSON
_CHILD = ("import importlib, json, sys; sys.path[:0] = sys.argv[1:3]; "
          "out = importlib.import_module(sys.argv[3]).main(sys.argv[4:]); "
          "print(" + repr("\n" + RESULT) + " + json.dumps(out, default=str), flush=True)")


def run(module: str, args: list[str]) -> Any:
    """module.main(args) in a fresh interpreter: its result, its own output passed through."""
    result: Any = {"error": f"{module} printed no result"}
    with subprocess.Popen([sys.executable, "-c", _CHILD, str(HERE), str(REPO), module, *args],
                          stdout=subprocess.PIPE, text=True, cwd=REPO) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT):])
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
    if p.returncode != 0:
        result = {"error": f"{module} exited with status {p.returncode}"}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    a = ap.parse_args()
    n = 20_000 if a.quick else 1_000_000
    q = ["--quick"] if a.quick else []
    plan: dict[str, tuple[str, list[str]]] = {
        "ledger": ("bench_ledger", q),
        "state_store": ("bench_state_store", q),  # 10 M accounts, tree in LMDB
        "verifier": ("bench_verifier", ["--records", str(n)]),
        "daemon_memory": ("bench_daemon_memory", ["--accounts", str(n)]),
        "spv": ("bench_spv", q),
        "sessions": ("bench_sessions", q),
        "netflow": ("bench_netflow", q),  # relays, SOCKS5 and curl, 64 MiB
        "gateway": ("bench_gateway", q),  # SmolLM2 direct vs through the gateway
        "scheduler": ("bench_scheduler", []),
        "orchestration": ("bench_orchestration", ["--tasks", "10"] if a.quick else []),
        "federated": ("bench_fl", q or ["--epochs", "400"]),
        "federated_l2": ("bench_fl_l2", ["--rounds", "10"] if a.quick else []),
        "rest": ("bench_rest", q),  # batch submissions vs the in-process ledger
        "dashboard": ("bench_dashboard", ["--loads", "3"] if a.quick else []),  # chromium: first render, bytes
        "api_load": ("bench_api_load", q),  # 200 connections vs bare aiohttp
        "slow_clients": ("bench_slow_clients", ["--slow", "200", "--pace", "1"] if a.quick else []),
        "federation": ("federation", q),  # real member processes, ~2 min
        "pegout": ("bench_pegout", q),  # member processes and bitcoind, ~4 min
        "anchor": ("bench_anchor", ["--anchors", "3"] if a.quick else []),  # one member, federation anchors
        "soak": ("soak", ["--kills", "5"] if a.quick else []),  # 50 SIGKILLs of a real daemon (~1.5 s each)
    }
    results = {name: run(module, args) for name, (module, args) in plan.items()}
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    failed = [name for name, r in results.items() if isinstance(r, dict) and "error" in r]
    if failed:
        sys.exit(f"benchmarks that failed: {', '.join(failed)}")
    if not results["soak"]["ok"]:
        sys.exit(f"soak: {results['soak']['problems'][:3]}")


if __name__ == "__main__":
    main()
