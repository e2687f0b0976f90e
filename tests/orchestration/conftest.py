"""Shared helpers for the orchestration tests: worker/requirement builders and hypothesis strategies."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import strategies as st

from orchestration.scheduler import Requirements
from orchestration.workers import DeviceKind, WorkerInfo, WorkerTable

REGIONS = ("eu", "us", "ap")
MODELS = ("llama", "bert", "resnet")


def wid(i: int) -> bytes:
    """A deterministic 32-byte worker id."""
    return hashlib.sha256(b"worker %d" % i).digest()


def make_worker(i: int = 0, **kw: Any) -> WorkerInfo:
    """A valid worker with sensible defaults; keyword arguments override fields."""
    base: dict[str, Any] = dict(
        worker_id=wid(i), device=DeviceKind.CUDA, accelerator_mem_mb=16_000, models=frozenset({"llama"}),
        region="eu", price_sat_per_unit=100, green_share_ppm=500_000, carbon_g_per_kwh=200,
        stake_sat=1_000_000, reputation_ppm=800_000, latency_ema_us=10_000, capacity=4, load=0, active=True)
    base.update(kw)
    return WorkerInfo(**base)


def make_table(workers: list[WorkerInfo]) -> WorkerTable:
    """A table holding the given workers (small initial capacity, so growth is exercised)."""
    t = WorkerTable(initial_capacity=2)
    for w in workers:
        t.add(w)
    return t


def fit_worker(req: Requirements, i: int = 10_000, **kw: Any) -> WorkerInfo:
    """A worker built to pass every hard filter of ``req`` (so a property test always has a candidate)."""
    fields: dict[str, Any] = dict(
        device=min(req.devices) if req.devices else DeviceKind.CUDA,
        models=frozenset({req.model}) if req.model else frozenset(),
        accelerator_mem_mb=max(req.min_accel_mem_mb, 0),
        reputation_ppm=max(req.min_reputation_ppm, 500_000),
        price_sat_per_unit=req.max_price_sat if req.max_price_sat is not None else 25,
        region=min(req.regions) if req.regions else "eu",
        stake_sat=req.min_stake_sat, latency_ema_us=20, capacity=3, load=1, active=True)
    fields.update(kw)
    return make_worker(i, **fields)


@st.composite
def _worker(draw: st.DrawFn, idx: int) -> WorkerInfo:
    # Small domains on purpose: many ties, so the tie-break rules are exercised.
    capacity = draw(st.integers(0, 4))
    return WorkerInfo(
        worker_id=draw(st.binary(min_size=32, max_size=32)) if draw(st.booleans()) else wid(idx),
        device=draw(st.sampled_from(list(DeviceKind))),
        accelerator_mem_mb=draw(st.sampled_from([0, 8_000, 16_000, 80_000])),
        models=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3))),
        region=draw(st.sampled_from(REGIONS)),
        price_sat_per_unit=draw(st.integers(0, 50)),
        green_share_ppm=draw(st.sampled_from([0, 250_000, 500_000, 1_000_000])),
        carbon_g_per_kwh=draw(st.integers(0, 800)),
        stake_sat=draw(st.sampled_from([0, 10_000, 1_000_000])),
        reputation_ppm=draw(st.sampled_from([0, 100_000, 500_000, 900_000, 1_000_000])),
        latency_ema_us=draw(st.integers(0, 40)),
        capacity=capacity,
        load=draw(st.integers(0, 5)),
        active=draw(st.integers(0, 4)) != 0,  # mostly active
    )


@st.composite
def _workers(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[WorkerInfo]:
    n = draw(st.integers(min_size, max_size))
    out: dict[bytes, WorkerInfo] = {}
    for i in range(n):
        w = draw(_worker(i))
        out.setdefault(w.worker_id, w)
    return list(out.values())


@st.composite
def _requirements(draw: st.DrawFn) -> Requirements:
    return Requirements(
        devices=draw(st.none() | st.frozensets(st.sampled_from(list(DeviceKind)), min_size=1)),
        model=draw(st.none() | st.sampled_from(MODELS)),
        min_accel_mem_mb=draw(st.sampled_from([0, 8_000, 16_000])),
        min_reputation_ppm=draw(st.sampled_from([0, 100_000, 500_000])),
        max_price_sat=draw(st.none() | st.integers(0, 50)),
        regions=draw(st.none() | st.frozensets(st.sampled_from(REGIONS), min_size=1)),
        min_stake_sat=draw(st.sampled_from([0, 10_000])),
    )


@dataclass(frozen=True)
class OrchHelpers:
    """Bundle handed to tests by the ``orch`` fixture."""

    wid: Callable[[int], bytes]
    make_worker: Callable[..., WorkerInfo]
    make_table: Callable[[list[WorkerInfo]], WorkerTable]
    workers: Callable[..., st.SearchStrategy[list[WorkerInfo]]]
    requirements: Callable[[], st.SearchStrategy[Requirements]]
    fit_worker: Callable[..., WorkerInfo]
    regions: tuple[str, ...]
    models: tuple[str, ...]


@pytest.fixture(scope="session")
def orch() -> OrchHelpers:
    """Builders and hypothesis strategies for workers, tables and requirements."""
    return OrchHelpers(wid, make_worker, make_table, _workers, _requirements, fit_worker, REGIONS, MODELS)


# -- a real daemon with real l2-worker agents on loopback ------------------------------------------------------------
import json as _json  # noqa: E402
import os as _os  # noqa: E402
import subprocess as _subprocess  # noqa: E402
import sys as _sys  # noqa: E402
import urllib.error as _urlerror  # noqa: E402
import urllib.request as _urlrequest  # noqa: E402
from pathlib import Path as _Path  # noqa: E402
from typing import Iterator as _Iterator  # noqa: E402

from coincurve import PrivateKey as _PrivateKey  # noqa: E402

from l2d.core import tx as _T  # noqa: E402
from l2d.core.params import LOCAL as _LOCAL  # noqa: E402

REPO = _Path(__file__).resolve().parents[2]
CLIENT_FUNDS = 10_000_000
WORKER_FUNDS = 1_000_000


def _secret(label: str) -> bytes:
    return hashlib.sha256(b"orchestration test " + label.encode()).digest()


def xonly(secret: bytes) -> bytes:
    return _PrivateKey(secret).public_key_xonly.format()


class AgentProcess:
    """A real `l2-worker` process (python -m orchestration.agent); its JSON log goes to a file."""

    def __init__(self, name: str, node_url: str, key_file: _Path, log_path: _Path, extra: list[str]) -> None:
        self.name = name
        self.pubkey = xonly(bytes.fromhex(key_file.read_text().strip()))
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = dict(_os.environ, PYTHONPATH=str(REPO))
        self.proc = _subprocess.Popen(
            [_sys.executable, "-m", "orchestration.agent", "--node", node_url, "--key-file", str(key_file),
             "--heartbeat-ms", "300", "--poll-ms", "100", "--stake", "100000", *extra],
            stdout=_subprocess.DEVNULL, stderr=self._log, cwd=REPO, env=env)

    def lines(self) -> list[dict[str, Any]]:
        return [_json.loads(x) for x in self.log_path.read_text().splitlines() if x.startswith("{")]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self._log.close()
        return int(self.proc.returncode)


class OrchNet:
    """One l2d daemon (orchestration on) plus l2-worker agents, driven over REST like any client."""

    def __init__(self, tmp: _Path, l2d_process: Callable[..., Any], names: list[str], orchestration: dict[str, Any],
                 model_cache: _Path) -> None:
        import toml

        self.tmp = tmp
        self.client_secret = _secret("client")
        self.client = xonly(self.client_secret)
        self.worker_keys: dict[str, _Path] = {}
        alloc = {self.client.hex(): CLIENT_FUNDS}
        for name in names:
            kf = tmp / f"{name}.key"
            kf.write_text(_secret(name).hex() + "\n")
            kf.chmod(0o600)
            self.worker_keys[name] = kf
            alloc[xonly(_secret(name)).hex()] = WORKER_FUNDS
        fed = tmp / "member.key"  # this 1-member federation's key: it signs the coordinator's transactions
        fed.write_text(_secret("federation").hex() + "\n")
        fed.chmod(0o600)
        self.federation = xonly(_secret("federation"))
        cfg = {"node": {"network": "local", "data_dir": "data", "log_level": "INFO"},
               "chain": {"min_fee_sat": 1, "genesis_alloc": alloc},
               "block": {"interval_ms": 50, "max_txs": 500},
               "api": {"port": 0, "admin_token": ""},
               "snapshots": {"every_blocks": 0},
               "anchoring": {"enabled": False},
               "federation": {"key_file": str(fed)},
               # Deadlines and heartbeat grace far above what a loaded CI host needs (blocks come at most every
               # 50 ms, so 400 blocks are >= 20 s): only the failover test relies on them, with its own values.
               "orchestration": {"enabled": True, "strategy": "lowest_cost", "timeout_blocks": 400,
                                 "heartbeat_grace_blocks": 200,
                                 "challenge_window_blocks": 3, "probe_interval_ms": 300, "poll_interval_ms": 50,
                                 **orchestration}}
        path = tmp / "l2d.toml"
        path.write_text(toml.dumps(cfg))
        self.daemon = l2d_process(path, tmp / "l2d.log")
        self.url = self.daemon.url("")
        self.model_cache = model_cache
        self.agents: dict[str, AgentProcess] = {}
        self._client_nonce = 0

    def start_agent(self, name: str, *extra: str) -> AgentProcess:
        a = AgentProcess(name, self.url, self.worker_keys[name], self.tmp / f"{name}.log",
                         ["--model-cache", str(self.model_cache), *extra])
        self.agents[name] = a
        return a

    def get(self, path: str) -> Any:
        with _urlrequest.urlopen(self.daemon.url(path), timeout=30) as r:
            return _json.loads(r.read())

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        req = _urlrequest.Request(self.daemon.url(path), data=_json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json"})
        try:
            with _urlrequest.urlopen(req, timeout=30) as r:
                return r.status, _json.loads(r.read())
        except _urlerror.HTTPError as e:
            with e:
                return e.code, _json.loads(e.read())

    def balance(self, pk: bytes) -> int:
        return int(self.get(f"/api/l2/accounts/{pk.hex()}")["balance_sat"])

    def sign_client(self, payload: Any) -> bytes:
        """Sign as the client; nonces counted locally, so several submissions can be pending at once."""
        nonce = max(self._client_nonce, int(self.get(f"/api/l2/accounts/{self.client.hex()}")["nonce"]))
        self._client_nonce = nonce + 1
        return _T.sign(_LOCAL, self.client_secret, nonce, 1, payload, _os.urandom(32)).raw

    def task(self, tid: str) -> Any:
        try:
            return self.get(f"/api/orchestration/tasks/{tid}")
        except _urlerror.HTTPError as e:
            e.close()
            return None

    def workers(self) -> dict[str, Any]:
        return {w["worker"]: w for w in self.get("/api/orchestration/workers")["workers"]}

    def close(self) -> None:
        for a in self.agents.values():
            a.kill()
        self.daemon.kill()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> _Path:
    """One trained-weights file shared by every agent of the session (training is deterministic anyway)."""
    return tmp_path_factory.mktemp("model") / "digits-mlp.pt"


@pytest.fixture
def orch_net(tmp_path: _Path, l2d_process: Callable[..., Any], model_cache: _Path) -> _Iterator[Callable[..., OrchNet]]:
    """Factory: orch_net(names, **orchestration_config) -> a running daemon with funded worker keys."""
    nets: list[OrchNet] = []

    def make(names: list[str], **orchestration: Any) -> OrchNet:
        n = OrchNet(tmp_path, l2d_process, names, orchestration, model_cache)
        nets.append(n)
        return n

    yield make
    for n in nets:
        n.close()
