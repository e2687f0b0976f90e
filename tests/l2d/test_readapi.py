"""Read-only API processes ([api] read_workers): a real daemon starts them on read_port; they answer account reads
with the main API's body and a proof against the committed tip, follow new blocks, refuse a malformed id with the
one error shape, and stop with the daemon (also when it is SIGKILLed)."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from l2d.config import Config, ConfigError
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.state import Account
from l2d.core.tree import Proof, verify_proof
from l2d.core.tx import sign
from l2d.node import Node
from tests.conftest import Keys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _alive_reader(pid: int) -> bool:
    try:
        return b"l2d.readapi" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _readers_of(parent: int) -> list[int]:
    out = []
    for x in os.listdir("/proc"):
        try:
            if x.isdigit() and int(Path(f"/proc/{x}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(x))
        except (OSError, IndexError, ValueError):
            continue
    return [p for p in out if _alive_reader(p)]


def test_read_workers_serve_proven_account_reads_and_exit_with_the_daemon(
        tmp_path: Path, node_toml: Callable[..., Path], l2d_process: Callable[..., Any]) -> None:
    read_port = _free_port()
    cfg = node_toml(tmp_path / "l2d.toml", {Keys.pubkey(1): 10**8}, "t" * 32,
                    api={"read_workers": 2, "read_port": read_port}, block={"interval_ms": 50})
    d = l2d_process(cfg)
    base = f"http://127.0.0.1:{read_port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if _get(base + "/health")[0] == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the read API did not come up"
        time.sleep(0.1)
    account = f"/api/l2/accounts/{Keys.pubkey(1).hex()}"
    status, body = _get(base + account)
    assert status == 200 and body == d.get(account) and body["balance_sat"] == 10**8
    assert verify_proof(bytes.fromhex(body["state_root"]), Proof.decode(bytes.fromhex(body["proof"]))) is not None

    tx = sign(LOCAL, Keys.secret(1), 0, 1, Transfer(Keys.pubkey(2), 1000), bytes(32))
    req = urllib.request.Request(d.url("/api/l2/tx"), data=json.dumps({"tx": tx.raw.hex()}).encode(),
                                 headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(req, timeout=30).status == 202
    while d.get(f"/api/l2/tx/{tx.txid.hex()}")["status"] != "committed":
        assert time.monotonic() < deadline + 60, "the transfer was not committed"
        time.sleep(0.05)
    status, body = _get(base + account)  # a block stored by the daemon is read by the other processes at once
    assert status == 200 and body["nonce"] == 1 and body["balance_sat"] == 10**8 - 1001
    value = verify_proof(bytes.fromhex(body["state_root"]), Proof.decode(bytes.fromhex(body["proof"])))
    assert value is not None and Account.decode(value).nonce == 1
    status, err = _get(base + "/api/l2/accounts/xyz")
    assert status == 400 and set(err) >= {"error", "message"}

    readers = _readers_of(d.proc.pid)
    assert len(readers) == 2
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive_reader(p) for p in readers):
        assert time.monotonic() < deadline, "read workers outlived the daemon"
        time.sleep(0.2)


@pytest.mark.parametrize("api", [{"read_workers": 1}, {"read_workers": 1, "read_port": 8650}])
def test_read_workers_need_a_port_of_their_own(tmp_path: Path, api: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="api.read_port"):
        Config.from_dict({"node": {"network": "local", "data_dir": "d"}, "api": api}, tmp_path, env={})


async def test_a_stopping_node_stops_its_read_workers(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    read_port = _free_port()
    node = Node.from_config(make_cfg(tmp_path / "data", api={"port": 0, "read_workers": 1, "read_port": read_port}))
    await node.start()
    try:
        assert node._readers is not None
        procs = list(node._readers.procs)
        assert len(procs) == 1 and procs[0].poll() is None
    finally:
        await node.stop()
    assert node._readers is None and all(p.poll() is not None for p in procs)
