"""Shared loopback federations for the federated tests.

Flower 1.41 has a fixed floor of roughly 9 s per round here (3 s poll sleeps in both the
SuperNode and the ServerApp's grid, plus one ClientApp process per message), so the
scenarios are started once, concurrently, in background threads, and each test waits for
the scenario it checks.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import warnings

import pytest

# flwr 1.41 imports typer, which touches click APIs deprecated in the installed click; the
# suite runs with filterwarnings=error, so import Flower once here with that one category
# silenced (third-party import-time warning, not ours).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import flwr.app  # noqa: F401
    import flwr.clientapp  # noqa: F401
    import flwr.serverapp  # noqa: F401
    import flwr.serverapp.strategy  # noqa: F401

from federated import data
from federated.launch import Federation, generate_node_key
from federated.recorder import JsonlRecorder, RoundCommitment

N = 4  # participants per federation
ROUNDS = 3


@dataclass
class ScenarioResult:
    workdir: Path
    jobs: dict[str, list[RoundCommitment]] = field(default_factory=dict)
    outdirs: dict[str, Path] = field(default_factory=dict)
    unregistered_log: str = ""
    unregistered_exit: int | None = None
    node_ids: dict[str, int] = field(default_factory=dict)  # supernode name -> Flower node id
    seconds: dict[str, float] = field(default_factory=dict)


def _nodes(fed: Federation, extra: dict[int, dict[str, Any]], keys: list[Path] | None = None,
           alpha: float = 0.5) -> None:
    assert fed.workdir is not None
    for i in range(N):
        part = data.write_partition(fed.workdir / f"data-{i}.npz", i, N, alpha=alpha)
        nc: dict[str, Any] = {"partition-id": i, "num-partitions": N, "data-path": str(part)}
        nc.update(extra.get(i, {}))
        fed.add_supernode(nc, key=keys[i] if keys else None)


def _node_ids(fed: Federation) -> dict[str, int]:
    ids = {}
    for p in fed.procs:
        m = re.search(r"SuperNode ID: (\d+)", p.log_path.read_text(errors="replace"))
        if m:
            ids[p.name] = int(m.group(1))
    return ids


def _job(fed: Federation, res: ScenarioResult, name: str, cfg: dict[str, Any]) -> None:
    out = res.workdir / name
    t = time.monotonic()
    fed.run({"job-id": name, "out-dir": str(out), "min-nodes": N, "local-epochs": 5, **cfg})
    res.seconds[name] = time.monotonic() - t
    res.outdirs[name] = out
    res.jobs[name] = JsonlRecorder(out / "rounds.jsonl").all(name)


def scenario_main(workdir: Path) -> ScenarioResult:
    """Auth-enabled federation: 3 honest nodes + 1 sending malformed updates, all
    registered; 1 unregistered node. FedAvg for ROUNDS rounds, then resumed to ROUNDS+1."""
    res = ScenarioResult(workdir)
    with Federation(workdir=workdir / "fed", auth=True) as fed:
        keys = [generate_node_key(workdir / f"node{i}.key") for i in range(N + 1)]
        priv = [workdir / f"node{i}.key" for i in range(N + 1)]
        allow = workdir / "allow-list.txt"  # what the L2 registry would write
        allow.write_text("".join(k.read_text() for k in keys[:N]))
        fed.register_allow_list(allow)
        _nodes(fed, {N - 1: {"malformed": 1}}, keys=priv)
        intruder = fed.add_supernode({"partition-id": 0, "num-partitions": N}, key=priv[N], name="intruder")
        _job(fed, res, "main", {"num-rounds": ROUNDS, "strategy": "fedavg"})
        # Resume: same job id and out-dir, one more round; must start from round ROUNDS's params.
        _job(fed, res, "main-resumed", {"job-id": "main", "out-dir": str(res.outdirs["main"]),
                                        "num-rounds": ROUNDS + 1, "strategy": "fedavg"})
        res.jobs["main-resumed"] = JsonlRecorder(res.outdirs["main"] / "rounds.jsonl").all("main")
        res.node_ids = _node_ids(fed)
        res.unregistered_exit = intruder.popen.poll()
        res.unregistered_log = intruder.log_path.read_text(errors="replace")
    return res


def scenario_poison(workdir: Path) -> ScenarioResult:
    """3 honest nodes + 1 poisoner (sign-flipped, x10), near-IID data (alpha=5): FedAvg for one
    round (it collapses at once) vs FedTrimmedAvg for two. Coordinate-wise robust aggregation
    needs honest updates that agree; at alpha=0.5 trimmed mean itself only reaches ~0.35."""
    res = ScenarioResult(workdir)
    with Federation(workdir=workdir / "fed") as fed:
        _nodes(fed, {N - 1: {"poison-scale": 10.0}}, alpha=5.0)
        _job(fed, res, "poison-fedavg", {"num-rounds": 1, "strategy": "fedavg"})
        _job(fed, res, "poison-trimmed", {"num-rounds": 2, "strategy": "fedtrimmedavg", "trim-beta": 0.25})
        res.node_ids = _node_ids(fed)
    return res


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict[str, cf.Future[ScenarioResult]]:
    pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="l2fl-scenario")
    futs = {
        "main": pool.submit(scenario_main, tmp_path_factory.mktemp("fl-main")),
        "poison": pool.submit(scenario_poison, tmp_path_factory.mktemp("fl-poison")),
    }
    yield futs
    pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def main_scenario(scenarios: dict[str, cf.Future[ScenarioResult]]) -> ScenarioResult:
    return scenarios["main"].result(timeout=300)


@pytest.fixture(scope="session")
def poison_scenario(scenarios: dict[str, cf.Future[ScenarioResult]]) -> ScenarioResult:
    return scenarios["poison"].result(timeout=300)
