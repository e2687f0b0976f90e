"""Scheduler benchmark: scheduling decisions per second with 10,000 registered workers, vectorised vs reference.

    python bench/bench_scheduler.py [--workers N] [--decisions K] [--seed S]

Builds a seeded random WorkerTable of N workers (default 10,000), then, in the same run, times K
decisions of ``Scheduler.assign`` (numpy over the column arrays) and of ``Scheduler.assign_reference``
(a plain per-worker Python loop over the WorkerInfo records, materialised once beforehand so the loop is
not charged for building them) for WEIGHTED and LOWEST_LATENCY, each with and without hard filters.
Both paths must agree on every decision (checked). Prints one JSON object; main(argv) returns it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from orchestration.scheduler import Requirements, Scheduler, Strategy, Weights  # noqa: E402
from orchestration.workers import DeviceKind, WorkerInfo, WorkerTable  # noqa: E402

REGIONS = ("eu-west", "eu-north", "us-east", "us-west", "ap-south", "ap-east")
MODELS = ("llama-8b", "llama-70b", "bert-base", "resnet50", "whisper", "sdxl")


def build_table(n: int, seed: int) -> WorkerTable:
    """A seeded random table of n workers."""
    rng = random.Random(seed)
    table = WorkerTable(initial_capacity=n)
    for _ in range(n):
        cap = rng.randint(1, 16)
        table.add(WorkerInfo(
            worker_id=rng.randbytes(32), device=rng.choice(list(DeviceKind)),
            accelerator_mem_mb=rng.choice([0, 8_000, 16_000, 24_000, 40_000, 80_000]),
            models=frozenset(rng.sample(MODELS, rng.randint(1, 4))), region=rng.choice(REGIONS),
            price_sat_per_unit=rng.randint(1, 10_000), green_share_ppm=rng.randint(0, 1_000_000),
            carbon_g_per_kwh=rng.randint(0, 900), stake_sat=rng.randint(0, 10**8),
            reputation_ppm=rng.randint(0, 1_000_000), latency_ema_us=rng.randint(200, 500_000),
            capacity=cap, load=rng.randint(0, cap), active=rng.random() < 0.95))
    return table


def _rate(fn: Any, decisions: int) -> float:
    t = time.perf_counter()
    for i in range(decisions):
        fn(i)
    return decisions / (time.perf_counter() - t)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print and return the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=10_000)
    ap.add_argument("--decisions", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    table = build_table(args.workers, args.seed)
    weights = Weights.from_config({"reputation": 0.3, "latency": 0.2, "capacity": 0.15, "cost": 0.15,
                                   "region": 0.1, "green": 0.1})
    snapshot = table.workers()
    cases = {
        "no_filters": Requirements(),
        "filtered": Requirements(devices=frozenset({DeviceKind.CUDA, DeviceKind.ROCM}), model="llama-8b",
                                 min_reputation_ppm=200_000, max_price_sat=8_000,
                                 regions=frozenset({"eu-west", "eu-north", "us-east"}), min_stake_sat=10**6),
    }
    out: dict[str, Any] = {"workers": args.workers, "decisions": args.decisions, "seed": args.seed, "results": {}}
    for strategy in (Strategy.WEIGHTED, Strategy.LOWEST_LATENCY):
        for name, req in cases.items():
            vec, ref = Scheduler(table, weights), Scheduler(table, weights)
            a = vec.assign(b"\0" * 32, req, strategy, "eu-west")
            b = ref.assign_reference(b"\0" * 32, req, strategy, "eu-west", workers=snapshot)
            if a != b:
                raise SystemExit(f"vectorised and reference disagree for {strategy.value}/{name}")
            tid = b"\1" * 32
            vec_rate = _rate(lambda i: vec.assign(tid, req, strategy, "eu-west"), args.decisions)
            ref_decisions = max(args.decisions // 10, 5)
            ref_rate = _rate(lambda i: ref.assign_reference(tid, req, strategy, "eu-west", workers=snapshot),
                             ref_decisions)
            out["results"][f"{strategy.value}/{name}"] = {
                "eligible": a.eligible_count,
                "vectorised_decisions_per_s": round(vec_rate, 1),
                "reference_decisions_per_s": round(ref_rate, 1),
                "ratio": round(vec_rate / ref_rate, 1),
            }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
