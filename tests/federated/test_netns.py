"""FL across machines: the l2d daemon in the root network namespace, ``l2-fl coordinate`` (SuperLink + ServerApp) in
one namespace bound to its LAN address with the operator's TLS (a test CA and a certificate naming that address),
and two participants (``l2-fl join``) in two other namespaces dialling it; one round committed on the L2.

Namespaces (veth pairs on a bridge) come from the ``lan`` fixture (tests/conftest.py), which skips with one line
where they cannot be made. Every process left in the namespaces is killed before they are removed, pass or fail.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from federated import cli, l2
from federated.launch import generate_node_key
from l2d.client import Client

REPO = Path(__file__).resolve().parents[2]
TOKEN = "netns-admin-token-0123456789abcdef"
POOL = 100_000
PORT = 9092  # the SuperLink's port inside its own namespace: nothing else listens there
SETTINGS = ["strategy=fedavg", "local-epochs=1"]


class NetnsProcs:
    """Processes started inside network namespaces, each in its own session; at teardown everything still running
    in those namespaces (Flower's SuperLink, SuperNodes and app processes included) is killed."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: dict[str, subprocess.Popen[str]] = {}
        self.namespaces: set[str] = set()

    def start(self, name: str, netns: str, args: list[str]) -> subprocess.Popen[str]:
        home = self.workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
        with open(self.log(name), "w") as err:
            p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "federated.cli", *args],
                                 stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO, env=env,
                                 start_new_session=True)
        self.started[name] = p
        self.namespaces.add(netns)
        return p

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def kill_all(self) -> None:
        for p in self.started.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for ns in self.namespaces:  # whatever Flower spawned in its own sessions
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.started.values():
            p.wait(timeout=30)
            if p.stdout is not None:
                p.stdout.close()


@pytest.fixture
def netns_procs(lan: Any, tmp_path: Path) -> Iterator[NetnsProcs]:
    """Requested after lan, so torn down before it: the namespaces are emptied, then removed."""
    procs = NetnsProcs(tmp_path)
    yield procs
    procs.kill_all()


def _wait(cond: Callable[[], Any], what: str, timeout: float) -> Any:
    end = time.monotonic() + timeout
    while not (v := cond()):
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)
    return v


def test_round_committed_across_network_namespaces(lan: Any, netns_procs: NetnsProcs, l2d_process: Any,
                                                   node_toml: Any, keys: Any, pki: Any, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    net = lan(3)  # host 0: the coordinator; hosts 1, 2: participants; the daemon on the bridge (root namespace)
    coord_ns, coord_addr = net.hosts[0], net.addrs[0]
    ca, cert, key = pki(tmp_path / "pki", [coord_addr])

    poster, parts = keys.secret(41), [keys.secret(42), keys.secret(43)]
    (tmp_path / "l2d").mkdir()
    cfg = node_toml(tmp_path / "l2d" / "l2d.toml", {keys.pubkey(n): 10 * POOL for n in (41, 42, 43)}, TOKEN,
                    api={"host": net.gateway}, block={"interval_ms": 50},
                    snapshots={"every_blocks": 0}, anchoring={"enabled": False})
    daemon = l2d_process(cfg)
    url = f"http://{net.gateway}:{daemon.port}"
    api = Client(url, TOKEN)
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")

    jid = l2.post_job(api, poster, POOL, cli._settings(SETTINGS), rounds=1, min_participants=2, max_participants=2)
    api.wait(lambda: api.fl_job_or_none(jid), "job posted", 30)
    node_keys = [tmp_path / f"node{i}.key" for i in range(2)]
    for secret, nk in zip(parts, node_keys):
        l2.register_participant(api, secret, jid, generate_node_key(nk).read_text())
    api.wait(lambda: len(api.fl_job(jid)["participants"]) == 2, "registrations", 30)
    for i in range(2):
        assert cli.main(["partition", "--out", str(tmp_path / f"data{i}"), "--id", str(i), "--num", "2"]) == 0
    capsys.readouterr()

    coord = netns_procs.start("coordinate", coord_ns, [
        "coordinate", "--node", url, "--token-file", str(token_file), "--job", jid, "--out", str(tmp_path / "co"),
        *[a for s in SETTINGS for a in ("--set", s)], "--bind", coord_addr, "--port", str(PORT),
        "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)])
    superlink = f"{coord_addr}:{PORT}"

    def ready() -> bool:
        assert coord.poll() is None, f"coordinate exited: {netns_procs.log('coordinate').read_text()[-3000:]}"
        return f"participants join with: l2-fl join --superlink {superlink}" in \
            netns_procs.log("coordinate").read_text()
    _wait(ready, "the SuperLink on the LAN address", 60)

    joins = [netns_procs.start(f"join{i}", net.hosts[1 + i], [
        "join", "--superlink", superlink, "--key", str(node_keys[i]), "--data", str(tmp_path / f"data{i}"),
        "--root-certificates", str(ca)]) for i in range(2)]

    try:
        code = coord.wait(timeout=150)  # coordinate returns when the job is finished on the L2
    except subprocess.TimeoutExpired:
        pytest.fail(f"coordinate still running: {netns_procs.log('coordinate').read_text()[-3000:]}")
    assert coord.stdout is not None
    assert code == 0, netns_procs.log("coordinate").read_text()[-3000:]
    assert json.loads(coord.stdout.read())["status"] == "FINISHED"
    for i, j in enumerate(joins):  # each participant's certificate check passed (the SuperLink names its address)
        assert "l2-fl join:" not in netns_procs.log(f"join{i}").read_text()

    job = api.fl_job(jid)  # what the daemon in the root namespace committed
    assert job["rounds_done"] >= 1 and job["status"] == "FINISHED"
    (round1,) = job["rounds_detail"]
    l2_keys = sorted(keys.pubkey(n).hex() for n in (42, 43))
    assert sorted(p["key"] for p in round1["participants"]) == l2_keys
    assert all(p["accepted"] for p in round1["participants"])
    assert api.get_model(round1["params_hash"])  # the round's model is in the daemon's store
    assert sum(int(p["reward_sat"]) for p in job["participants"]) > 0
