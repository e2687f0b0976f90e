"""Shared loopback federations for the federated tests.

Flower 1.41 has a fixed floor of roughly 9 s per round here (3 s poll sleeps in both the
SuperNode and the ServerApp's grid, plus one ClientApp process per message), so the
scenarios are started once, concurrently, in background threads, and each test waits for
the scenario it checks.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
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

from coincurve import PrivateKey

from federated import data
from federated.l2 import coordinate, post_job, register_participant, sync_registrations
from federated.launch import Federation, generate_node_key, generate_tls
from federated.recorder import JsonlRecorder, RoundCommitment
from l2d.client import Client

N = 4  # participants per federation
ROUNDS = 3
POOL = 1_000_000  # each L2 job's reward pool (sat)
TOKEN = "fl-admin-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ScenarioResult:
    workdir: Path
    jobs: dict[str, list[RoundCommitment]] = field(default_factory=dict)
    outdirs: dict[str, Path] = field(default_factory=dict)
    unregistered_log: str = ""
    unregistered_exit: int | None = None
    node_ids: dict[str, int] = field(default_factory=dict)  # supernode name -> Flower node id
    seconds: dict[str, float] = field(default_factory=dict)
    job_ids: dict[str, str] = field(default_factory=dict)  # scenario job name -> L2 job id
    l2_keys: dict[str, str] = field(default_factory=dict)  # supernode name -> participant's L2 key (hex)
    l2_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # GET /api/fl/jobs/{id} at the end
    balances_before: dict[str, dict[str, int]] = field(default_factory=dict)
    balances_after: dict[str, dict[str, int]] = field(default_factory=dict)
    node_map_first: dict[int, str] = field(default_factory=dict)  # Flower node id -> L2 key (first SuperLink)
    node_map_second: dict[int, str] = field(default_factory=dict)
    node_ids2: dict[str, int] = field(default_factory=dict)
    joined_ids: dict[str, int] = field(default_factory=dict)  # `l2-fl join` participants' node ids (poison, L2 job)
    rounds_at_kill: int = -1
    serverapp_log: str = ""


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


def _wait(cond: Any, what: str, timeout: float = 120.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Daemon:
    """A real l2d process (local network, 50 ms blocks, federation key, admin token) for the FL scenarios."""

    def __init__(self, workdir: Path, alloc: dict[str, int]) -> None:
        import toml

        workdir.mkdir(parents=True, exist_ok=True)
        self.token_file = workdir / "admin.token"
        self.token_file.write_text(TOKEN + "\n")
        cfg = {"node": {"network": "local", "data_dir": "data", "log_level": "INFO"},
               "chain": {"min_fee_sat": 1, "genesis_alloc": alloc},
               "block": {"interval_ms": 50, "max_txs": 500},
               "api": {"port": 0, "admin_token": TOKEN},
               "snapshots": {"every_blocks": 0},
               "anchoring": {"enabled": False}}
        (workdir / "l2d.toml").write_text(toml.dumps(cfg))
        self.log_path = workdir / "l2d.log"
        self._log = open(self.log_path, "w")
        env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
        env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(workdir / "l2d.toml")],
                                     stderr=self._log, stdout=subprocess.DEVNULL, cwd=REPO, env=env)
        self.data_dir = workdir / "data"
        port = _wait(self._port, "l2d api listening", 60)
        self.url = f"http://127.0.0.1:{port}"
        self.api = Client(self.url, TOKEN)

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"l2d exited: {self.log_path.read_text()[-2000:]}")
        for line in self.log_path.read_text().splitlines():
            if '"api listening"' in line:
                return int(json.loads(line)["port"])
        return None

    def balance(self, key: bytes) -> int:
        return int(self.api.account(key.hex())["balance_sat"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)
        self._log.close()


def _secret(label: str) -> bytes:
    return hashlib.sha256(b"fl test " + label.encode()).digest()


def xonly(secret: bytes) -> bytes:
    return PrivateKey(secret).public_key_xonly.format()


def _l2_job(d: Daemon, res: ScenarioResult, name: str, poster: str, keys: list[Path], rounds: int,
            cfg: dict[str, Any]) -> str:
    """Post an FL job for `rounds` rounds and register participants 0..N-1 (their Flower node keys) on the L2."""
    jid = post_job(d.api, _secret(poster), POOL, cfg, rounds, N, N + 1)
    _wait(lambda: d.api.fl_job_or_none(jid), f"job {name} posted")
    for i in range(N):
        register_participant(d.api, _secret(f"{name}-p{i}"), jid, keys[i].read_text())
    _wait(lambda: len(d.api.fl_job(jid)["participants"]) == N, f"job {name} registrations")
    res.l2_keys.update({f"supernode-{i}": xonly(_secret(f"{name}-p{i}")).hex() for i in range(N)})
    res.job_ids[name] = jid
    res.balances_before[name] = {f"supernode-{i}": d.balance(xonly(_secret(f"{name}-p{i}"))) for i in range(N)}
    res.balances_before[name]["poster"] = d.balance(xonly(_secret(poster)))
    return jid


def _l2_run_cfg(d: Daemon, jid: str, out: Path, node_map: Path, **cfg: Any) -> dict[str, Any]:
    return {"job-id": jid, "out-dir": str(out), "min-nodes": N, "local-epochs": 5, "l2-url": d.url,
            "l2-token-file": str(d.token_file), "l2-node-map": str(node_map), **cfg}


def _start_auth_federation(workdir: Path, d: Daemon, jid: str, priv: list[Path], extra: dict[int, dict[str, Any]],
                           alpha: float = 0.5) -> tuple[Federation, Path]:
    fed = Federation(workdir=workdir, auth=True)
    fed.start_superlink()
    node_map = workdir / "node-map.json"
    sync_registrations(fed, d.api, jid, node_map)  # the allow-list is the job's L2 registrations
    _nodes(fed, extra, keys=priv, alpha=alpha)
    return fed, node_map


def scenario_main(workdir: Path, d: Daemon) -> ScenarioResult:
    """Auth federation keyed to an L2 job: 3 honest nodes + 1 sending malformed updates, all registered on the
    L2; 1 node with a key but no L2 registration. FedAvg for ROUNDS+1 rounds committed to the L2; the
    SuperLink (and its ServerApp) is SIGKILLed after round 2 is committed, then a fresh federation with an
    empty out-dir resumes the job from the L2 (round 2's parameters come from the daemon's model store)."""
    res = ScenarioResult(workdir)
    priv = [workdir / f"node{i}.key" for i in range(N + 1)]
    keys = [generate_node_key(p) for p in priv]
    cfg = {"strategy": "fedavg", "num-rounds": ROUNDS + 1}
    jid = _l2_job(d, res, "main", "main-poster", keys, ROUNDS + 1, cfg)
    fed, node_map = _start_auth_federation(workdir / "fed", d, jid, priv, {N - 1: {"malformed": 1}})
    try:
        intruder = fed.add_supernode({"partition-id": 0, "num-partitions": N}, key=priv[N], name="intruder")
        out1 = workdir / "main-1"
        t = time.monotonic()
        fed.submit_run(_l2_run_cfg(d, jid, out1, node_map, **cfg))
        _wait(lambda: d.api.fl_job(jid)["rounds_done"] >= 2, "round 2 committed", 240)
        fed.kill("superlink")  # SuperLink and its ServerApp process, mid-round 3
        res.rounds_at_kill = d.api.fl_job(jid)["rounds_done"]
        res.node_ids = _node_ids(fed)
        res.node_map_first = {int(k): v for k, v in json.loads(node_map.read_text()).items()}
        res.unregistered_exit = intruder.popen.poll()  # refused long before: it never became a node
        res.unregistered_log = intruder.log_path.read_text(errors="replace")
    finally:
        fed.cleanup()
    fed2, node_map2 = _start_auth_federation(workdir / "fed2", d, jid, priv, {N - 1: {"malformed": 1}})
    try:
        out2 = workdir / "main-2"  # empty: the resumed run must get round 2's parameters from the L2
        fed2.submit_run(_l2_run_cfg(d, jid, out2, node_map2, **cfg))
        _wait(lambda: d.api.fl_job(jid)["status"] == "FINISHED", "main job finished", 300)
        res.seconds["main"] = time.monotonic() - t
        res.node_ids2 = _node_ids(fed2)
        res.node_map_second = {int(k): v for k, v in json.loads(node_map2.read_text()).items()}
        res.serverapp_log = "".join(p.log_path.read_text(errors="replace") for p in fed2.procs
                                    if p.name == "superlink")
    finally:
        fed2.cleanup()
    res.outdirs = {"main-1": out1, "main-2": out2}
    res.jobs["main"] = JsonlRecorder(out1 / "rounds.jsonl").all(jid) + JsonlRecorder(out2 / "rounds.jsonl").all(jid)
    res.l2_jobs["main"] = d.api.fl_job(jid)
    res.balances_after["main"] = {k: d.balance(bytes.fromhex(v)) for k, v in res.l2_keys.items()}
    res.balances_after["main"]["poster"] = d.balance(xonly(_secret("main-poster")))
    return res


class Joined:
    """Participants started the way a real one joins: `l2-fl join` (python -m federated.cli join), which execs
    flower-supernode; each in its own session so it can be stopped with its children."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, fed: Federation, name: str, key: Path, data_path: Path, *node_config: str) -> None:
        env = dict(os.environ, HOME=str(self.workdir / f"home-{name}"), PYTHONPATH=str(REPO))
        argv = [sys.executable, "-m", "federated.cli", "join", "--superlink", f"127.0.0.1:{fed.port}",
                "--key", str(key), "--data", str(data_path), "--root-certificates", str(fed.ca)]
        for nc in node_config:
            argv += ["--node-config", nc]
        with open(self.workdir / f"{name}.log", "wb") as f:
            self.procs[name] = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                                start_new_session=True)

    def node_ids(self) -> dict[str, int]:
        ids = {}
        for name in self.procs:
            m = re.search(r"SuperNode ID: (\d+)", (self.workdir / f"{name}.log").read_text(errors="replace"))
            if m:
                ids[name] = int(m.group(1))
        return ids

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=20)


def scenario_poison(workdir: Path, d: Daemon) -> ScenarioResult:
    """3 honest nodes + 1 poisoner (sign-flipped, x10), near-IID data (alpha=5). On a plain loopback
    federation: FedAvg for one round (it collapses at once), FedTrimmedAvg (beta 0.25) for two, Multi-Krum for
    one; beside it, Krum (num-malicious 1) for two rounds as an L2 job run the way it is deployed: `l2-fl
    coordinate` (via federated.l2.coordinate) with participants that registered on the L2 and joined with
    `l2-fl join`.
    Coordinate-wise robust aggregation needs honest updates that agree; at alpha=0.5 trimmed mean itself only
    reaches ~0.35."""
    res = ScenarioResult(workdir)

    def plain() -> None:
        with Federation(workdir=workdir / "fed") as fed:
            _nodes(fed, {N - 1: {"poison-scale": 10.0}}, alpha=5.0)
            _job(fed, res, "poison-fedavg", {"num-rounds": 1, "strategy": "fedavg"})
            _job(fed, res, "poison-trimmed", {"num-rounds": 2, "strategy": "fedtrimmedavg", "trim-beta": 0.25})
            _job(fed, res, "poison-multikrum", {"num-rounds": 1, "strategy": "multikrum"})
            res.node_ids = _node_ids(fed)

    # The plain federation and the L2 job run side by side: a round is mostly Flower's idle polling.
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="l2fl-poison-plain") as pool:
        plain_done = pool.submit(plain)
        _poison_l2(workdir, d, res)
        plain_done.result()
    return res


def _poison_l2(workdir: Path, d: Daemon, res: ScenarioResult) -> None:
    priv = [workdir / f"node{i}.key" for i in range(N)]
    keys = [generate_node_key(p) for p in priv]
    settings = {"strategy": "krum", "local-epochs": 5}  # num-malicious 1 (the default)
    jid = _l2_job(d, res, "poison", "poison-poster", keys, 2, settings)
    joined = Joined(workdir)
    parts = [data.write_partition(workdir / f"data-{i}.npz", i, N, alpha=5.0) for i in range(N)]

    def on_ready(cfed: Federation) -> None:
        for i in range(N):
            extra = ("poison-scale=10.0",) if i == N - 1 else ()
            joined.start(cfed, f"supernode-{i}", priv[i], parts[i], *extra)

    out = workdir / "coordinator"
    t = time.monotonic()
    try:
        res.l2_jobs["poison"] = coordinate(d.api, jid, out, settings, d.token_file, poll=0.2, on_ready=on_ready)
        res.seconds["poison-krum"] = time.monotonic() - t
        res.joined_ids = joined.node_ids()
    finally:
        joined.stop()
    res.outdirs["poison-krum"] = out / "job"
    res.jobs["poison-krum"] = JsonlRecorder(out / "job" / "rounds.jsonl").all(jid)
    res.l2_jobs["poison"] = d.api.fl_job(jid)
    res.balances_after["poison"] = {k: d.balance(bytes.fromhex(v)) for k, v in res.l2_keys.items()}


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    alloc = {xonly(_secret(p)).hex(): 10 * POOL for p in ("main-poster", "poison-poster", "cli")}
    alloc.update({xonly(_secret(f"{j}-p{i}")).hex(): 1000 for j in ("main", "poison") for i in range(N)})
    d = Daemon(tmp_path_factory.mktemp("fl-l2d"), alloc)
    yield d
    d.stop()


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory: pytest.TempPathFactory, daemon: Daemon) -> dict[str, cf.Future[ScenarioResult]]:
    pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="l2fl-scenario")
    futs = {
        "main": pool.submit(scenario_main, tmp_path_factory.mktemp("fl-main"), daemon),
        "poison": pool.submit(scenario_poison, tmp_path_factory.mktemp("fl-poison"), daemon),
    }
    yield futs
    pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def main_scenario(scenarios: dict[str, cf.Future[ScenarioResult]]) -> ScenarioResult:
    return scenarios["main"].result(timeout=300)


@pytest.fixture(scope="session")
def poison_scenario(scenarios: dict[str, cf.Future[ScenarioResult]]) -> ScenarioResult:
    return scenarios["poison"].result(timeout=300)


def make_pki(dirpath: Path, names: list[str], ca_name: str = "l2fl test CA") -> tuple[Path, Path, Path]:
    """An operator's PKI as a test stands it up: a fresh CA and a server certificate it signs whose subjectAltName
    holds names (IP literals or DNS names), made by the launcher's own generate_tls. Returns (ca, cert, key)."""
    return generate_tls(dirpath, names, ca_name)


@pytest.fixture
def pki() -> Any:
    """make_pki(dirpath, names, ca_name=...) -> (ca, cert, key): a test CA and a server certificate for names."""
    return make_pki
