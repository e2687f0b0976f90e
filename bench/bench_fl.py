"""Federated-learning benchmarks (Flower 1.41 on loopback, digits MLP).

    python bench/bench_fl.py [--nodes 3] [--rounds 2] [--epochs 60] [--quick]
    python bench/bench_fl.py --robust

(a) round time with N participants under Flower vs the same local training without Flower in
    this process (sequential sum and slowest participant), same run: overhead ratios; plus
    Flower's fixed per-round floor (a round with local-epochs=0);
(b) Krum aggregation time with 20 participants at the model's size (FedAvg in the same run as
    the baseline);
(c) update bytes per round and final accuracy with compression none / int8 / top-k (10%);
(d) Flower's server-side fixed-clipping DP wrapper: ε (δ=1e-5) and accuracy per round.
--robust instead: accuracy per round and who was accepted (paid) under FedAvg, Krum, Multi-Krum and the
    trimmed mean, with 3 honest participants and with 3 honest + 1 poisoner (sign-flipped x10), 3 rounds,
    5 local epochs, the default non-IID partitions (alpha 0.5) and num-malicious 1.
Prints one JSON object; main(argv) returns it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from flwr.app import MetricRecord, RecordDict
    from flwr.serverapp import strategy as fls

import numpy as np  # noqa: E402

from federated import data, model  # noqa: E402
from federated import server_app as sa  # noqa: E402
from federated.launch import Federation  # noqa: E402
from federated.recorder import JsonlRecorder  # noqa: E402


class _Meta:
    def __init__(self, nid: int) -> None:
        self.src_node_id = nid
        self.message_type = "train"


class _Reply:
    def __init__(self, nid: int, content: RecordDict) -> None:
        self.metadata = _Meta(nid)
        self.content = content

    def has_error(self) -> bool:
        return False


def krum_bench(n: int = 20, reps: int = 5) -> dict[str, Any]:
    g = model.get_ndarrays(model.new_model(0))
    rng = np.random.default_rng(0)

    def replies() -> list[_Reply]:
        return [_Reply(i, RecordDict({
            "arrays": sa.to_record(OrderedDict((k, v + rng.normal(0, 0.01, v.shape).astype(np.float32)) for k, v in g.items())),
            "metrics": MetricRecord({"num-examples": 100})})) for i in range(n)]

    out: dict[str, Any] = {"participants": n, "params": int(sum(v.size for v in g.values()))}
    for name, strat in (("krum", fls.Krum(num_malicious_nodes=2)), ("fedavg", fls.FedAvg())):
        times = []
        for _ in range(reps):
            rs = replies()
            t = time.perf_counter()
            strat.aggregate_train(1, rs)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t)
        out[f"{name}_ms"] = round(1000 * min(times), 3)
    out["krum_over_fedavg"] = round(out["krum_ms"] / out["fedavg_ms"], 2)
    return out


def local_baseline(nodes: int, epochs: int, alpha: float) -> dict[str, float]:
    """One round's local training for every participant, in-process, no Flower."""
    g = model.get_ndarrays(model.new_model(0))
    times = []
    for i in range(nodes):
        part = data.load_partition(i, nodes, alpha)
        m = model.new_model(0)
        model.set_ndarrays(m, g)
        t = time.perf_counter()
        model.train(m, part, epochs, 0.05, seed=i)
        times.append(time.perf_counter() - t)
    return {"sum_s": sum(times), "max_s": max(times)}


ROBUST = ("fedavg", "krum", "multikrum", "fedtrimmedavg")


def robust_bench(rounds: int = 3, epochs: int = 5) -> dict[str, Any]:
    """Accuracy and acceptance per strategy, honest-only and with one poisoner, on real loopback federations."""
    out: dict[str, Any] = {"rounds": rounds, "local_epochs": epochs, "num_malicious": 1}
    for setup, honest, poisoners in (("3_honest", 3, 0), ("3_honest_1_poisoner", 3, 1)):
        n = honest + poisoners
        res: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="l2fl-bench-") as tmp, Federation(workdir=Path(tmp) / "fed") as fed:
            for i in range(n):
                part = data.write_partition(Path(tmp) / f"d{i}.npz", i, n)
                nc: dict[str, Any] = {"partition-id": i, "num-partitions": n, "data-path": str(part)}
                if i >= honest:
                    nc["poison-scale"] = 10.0
                fed.add_supernode(nc)
            for strategy in ROBUST:
                cfg = {"job-id": strategy, "out-dir": str(Path(tmp) / strategy), "min-nodes": n, "strategy": strategy,
                       "num-rounds": rounds, "local-epochs": epochs, "trim-beta": round(1 / n + 0.005, 3)}
                fed.run(cfg, timeout=1800)
                rs = JsonlRecorder(Path(tmp) / strategy / "rounds.jsonl").all(strategy)
                examples = {p.node_id: 0 for p in rs[0].participants}
                for c in rs:
                    for p in c.participants:
                        examples[p.node_id] += p.num_examples if p.accepted else 0
                res[strategy] = {
                    "accuracy_per_round": [round(c.metrics["accuracy"], 4) for c in rs],
                    "accepted_per_round": [sum(p.accepted for p in c.participants) for c in rs],
                    # the ledger's split of the pool by accepted examples, in partition order (poisoner last)
                    "pool_share": [round(e / max(1, sum(examples.values())), 3) for _, e in sorted(
                        examples.items(), key=lambda kv: _partition_of(fed, kv[0]))],
                }
                if strategy == "fedtrimmedavg":
                    res[strategy]["trim_beta"] = cfg["trim-beta"]
        out[setup] = res
    return out


def _partition_of(fed: Federation, node_id: int) -> int:
    """The partition a SuperNode trains (its name is supernode-<i>; Flower logs the id it was given)."""
    for p in fed.procs:
        if re.search(rf"SuperNode ID: {node_id}\b", p.log_path.read_text(errors="replace")):
            return int(p.name.rsplit("-", 1)[1])
    raise LookupError(f"no SuperNode with id {node_id}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="fewer rounds/epochs")
    p.add_argument("--robust", action="store_true", help="only the robust-aggregation accuracy/acceptance run")
    a = p.parse_args(argv)
    if a.robust:
        result = {"robust_aggregation": robust_bench()}
        print(json.dumps(result, indent=2))
        return result
    if a.quick:
        a.rounds, a.epochs = 1, 20
    result: dict[str, Any] = {"krum_aggregation": krum_bench()}
    with tempfile.TemporaryDirectory(prefix="l2fl-bench-") as tmp, Federation(workdir=Path(tmp) / "fed") as fed:
        for i in range(a.nodes):
            part = data.write_partition(Path(tmp) / f"d{i}.npz", i, a.nodes)
            fed.add_supernode({"partition-id": i, "num-partitions": a.nodes, "data-path": str(part)})

        def job(name: str, **cfg: Any) -> list[Any]:
            out = Path(tmp) / name
            fed.run({"job-id": name, "out-dir": str(out), "min-nodes": a.nodes, **cfg}, timeout=1800)
            return JsonlRecorder(out / "rounds.jsonl").all(name)

        floor = job("floor", **{"num-rounds": 2, "local-epochs": 0})
        work = job("work", **{"num-rounds": a.rounds, "local-epochs": a.epochs})
        base = local_baseline(a.nodes, a.epochs, 0.5)
        flower_round = float(np.mean([c.metrics["round_seconds"] for c in work]))
        result["round_overhead"] = {
            "nodes": a.nodes, "local_epochs": a.epochs,
            "flower_round_s": round(flower_round, 3),
            "flower_floor_round_s": round(float(np.mean([c.metrics["round_seconds"] for c in floor])), 3),
            "local_training_sum_s": round(base["sum_s"], 3), "local_training_max_s": round(base["max_s"], 3),
            "ratio_vs_sequential": round(flower_round / base["sum_s"], 2),
            "ratio_vs_slowest": round(flower_round / base["max_s"], 2),
        }
        comp = {}
        for mode in ("none", "int8", "topk"):
            rs = job(f"comp-{mode}", **{"num-rounds": 3, "local-epochs": 5, "compression": mode})
            comp[mode] = {"bytes_per_round": int(np.mean([c.metrics["update_bytes"] for c in rs])),
                          "accuracy_per_round": [round(c.metrics["accuracy"], 4) for c in rs]}
        for mode in ("int8", "topk"):
            comp[mode]["bytes_ratio_vs_none"] = round(comp[mode]["bytes_per_round"] / comp["none"]["bytes_per_round"], 3)
        result["compression"] = comp
        dp = job("dp", **{"num-rounds": 3, "local-epochs": 5, "dp": "server-fixed",
                          "dp-noise": 0.5, "dp-clip": 5.0, "dp-delta": 1e-5})
        result["dp_server_fixed"] = {
            "noise_multiplier": 0.5, "clip": 5.0, "delta": 1e-5,
            "epsilon_per_round": [round(c.metrics["dp_epsilon"], 3) for c in dp],
            "accuracy_per_round": [round(c.metrics["accuracy"], 4) for c in dp],
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
