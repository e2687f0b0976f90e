"""Fixtures shared across test folders, in one place: a per-test bitcoind regtest node and its RPC client, a poll
helper, real l2d processes whose JSON logs go to a file, and in-process daemons (a Node on a fresh data dir with an
aiohttp test client on its REST app) with their test configs and deterministic keys.

Tests that need bitcoind are skipped with one line when it is absent (neither $BITCOIND nor PATH). Test modules
cannot import each other (site-packages holds a `tests` package), so shared helpers are handed out as fixtures:
`keys` (deterministic test keys), `wait_until` and `poll` (a condition with a timeout), `make_cfg`, `node_toml`,
`undocumented` (a CLI's subcommands and arguments without help).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional, Protocol, Sequence

import pytest
import toml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC
from l2d.config import Config
from l2d.node import Node
from regtest import members
from regtest.harness import BitcoindNode, find_bitcoind

SKIP_REASON = "bitcoind not found (set $BITCOIND or put it on PATH)"


@pytest.fixture
def bitcoind(tmp_path: Path) -> Iterator[BitcoindNode]:
    """A fresh bitcoind regtest node per test (datadir under tmp_path, which pytest keeps).

    Teardown stops it by RPC and asserts a clean exit (code 0).
    """
    binary = find_bitcoind()
    if binary is None:
        pytest.skip(SKIP_REASON)
    node = BitcoindNode(tmp_path / "bitcoind", bitcoind=binary)
    node.start()
    try:
        yield node
    finally:
        code = node.stop()
    assert code == 0, f"bitcoind exited with code {code}; datadir kept at {node.datadir}\n{node.log_tail()}"


@pytest.fixture
async def rpc(bitcoind: BitcoindNode) -> AsyncIterator[BitcoinRPC]:
    """An async RPC client (no wallet) for the test's node."""
    client = bitcoind.rpc()
    try:
        yield client
    finally:
        await client.close()


REPO = Path(__file__).resolve().parents[1]


async def _poll(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll cond (sync or async) until it returns something truthy; return that, or fail after timeout."""
    try:
        return await members.poll(cond, timeout, what)
    except TimeoutError as e:
        pytest.fail(str(e))


def load_by_path(relpath: str, name: str) -> ModuleType:
    """Another test file's helpers (relpath from the repo root), loaded once by path under name (a 'tests' package may
    exist elsewhere; dataclasses look their module up in sys.modules, so it is registered there)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Every subcommand and argument of a command-line parser (recursively) that has no help text."""
    missing: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in action._choices_actions}
            for name, sub in action.choices.items():
                if not helps.get(name):
                    missing.append(f"{parser.prog} {name}")
                missing += _undocumented(sub)
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.fixture
def undocumented() -> Callable[[argparse.ArgumentParser], list[str]]:
    """The subcommands and arguments of a CLI's parser that lack a help text (for l2-cli, l2-verify, l2-fl)."""
    return _undocumented


@pytest.fixture
def poll() -> Callable[..., Awaitable[Any]]:
    """``await poll(cond, timeout, what)``: cond may be sync or async."""
    return _poll


class L2dProcess:
    """A real `l2d` process; JSON log lines go to log_path (read back with lines())."""

    def __init__(self, config_path: Path, log_path: Path, launcher: Sequence[str] = ("-m", "l2d.node")) -> None:
        """launcher: what runs the daemon (python's arguments before --config)."""
        env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
        env["PYTHONPATH"] = str(REPO)
        self.log_path = log_path
        self._log = open(log_path, "w")  # one log file per process
        self.proc = subprocess.Popen([sys.executable, *launcher, "--config", str(config_path)],
                                     stderr=self._log, stdout=subprocess.DEVNULL, cwd=REPO, env=env)
        self.port = self._wait_port()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]

    def _wait_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            for rec in self.lines():
                if rec["msg"] == "api listening":
                    return int(rec["port"])
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"l2d did not start: {self.lines()[-5:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            return json.loads(r.read())

    def get_raw(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: dict[str, Any], token: str) -> Any:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def l2d_process() -> Iterator[Callable[..., L2dProcess]]:
    """Factory l2d_process(config_path, log_path=config_path.with_suffix(".log")) starting real l2d processes;
    any still running at teardown is killed."""
    started: list[L2dProcess] = []

    def start(config_path: Path, log_path: Optional[Path] = None) -> L2dProcess:
        p = L2dProcess(config_path, log_path or config_path.with_suffix(".log"))
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


class Proc:
    """A helper process (`python -m MODULE ARGS`, or `python SCRIPT.py ARGS`) whose first stdout line says where it
    listens."""

    def __init__(self, args: list[str], log: Path, netns: Optional[str] = None) -> None:
        """netns: run inside that network namespace (`ip netns exec`)."""
        self.log = log
        self._err = open(log, "w")
        run = [] if args[0].endswith(".py") else ["-m"]
        inside = [] if netns is None else ["ip", "netns", "exec", netns]
        self.proc = subprocess.Popen([*inside, sys.executable, *run, *args], stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})

    def first_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"{self.log.name}: exited: {self.log.read_text()[-2000:]}"
        return line

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._err.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Lan:
    """Network namespaces on one bridge, each a host with its own address; the bridge's address is the root
    namespace's (where the l2d daemon runs)."""

    hosts: list[str]  # namespace names
    addrs: list[str]  # their addresses
    gateway: str  # the root namespace's address on the bridge
    bridge: str


@pytest.fixture
def lan() -> Iterator[Callable[[int], Lan]]:
    """lan(n): n network namespaces on a bridge (10.231.x.0/24, made and removed by the test). Skips with one line
    where namespaces cannot be made (not root, no `ip`)."""
    made: list[Lan] = []

    def sh(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, text=True)

    def make(n: int) -> Lan:
        tag = f"l2{os.getpid() % 10_000}{len(made)}"
        net = f"10.231.{(os.getpid() + len(made)) % 250}"
        hosts = [f"{tag}h{i}" for i in range(n)]
        lan = Lan(hosts, [f"{net}.{10 + i}" for i in range(n)], f"{net}.1", tag)
        made.append(lan)
        try:
            sh("ip", "link", "add", tag, "type", "bridge")
        except (OSError, subprocess.CalledProcessError) as e:
            made.pop()
            pytest.skip(f"cannot make network namespaces here: {getattr(e, 'stderr', e)}".strip())
        sh("ip", "addr", "add", f"{lan.gateway}/24", "dev", tag)
        sh("ip", "link", "set", tag, "up")
        for i, (h, addr) in enumerate(zip(hosts, lan.addrs)):
            sh("ip", "netns", "add", h)
            sh("ip", "link", "add", f"{tag}v{i}", "type", "veth", "peer", "name", f"{tag}p{i}")
            sh("ip", "link", "set", f"{tag}p{i}", "netns", h)
            sh("ip", "link", "set", f"{tag}v{i}", "master", tag, "up")
            sh("ip", "netns", "exec", h, "ip", "addr", "add", f"{addr}/24", "dev", f"{tag}p{i}")
            sh("ip", "netns", "exec", h, "ip", "link", "set", f"{tag}p{i}", "up")
            sh("ip", "netns", "exec", h, "ip", "link", "set", "lo", "up")
        return lan

    yield make
    for lan in made:
        for h in lan.hosts:
            subprocess.run(["ip", "netns", "del", h], capture_output=True)
        subprocess.run(["ip", "link", "del", lan.bridge], capture_output=True)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Helper processes a test starts (relays, clients, workers, gateways); any still running at teardown is
    killed."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()


Client = TestClient[web.Request, web.Application]

ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
GENESIS_SAT = 1_000_000
MAX_BODY = 64 * 1024


class Keys:
    """Deterministic test keys: secret(n) = sha256(b"l2d test key N")."""

    @staticmethod
    def secret(n: int) -> bytes:
        return hashlib.sha256(b"l2d test key %d" % n).digest()

    @staticmethod
    def pubkey(n: int) -> bytes:
        return PrivateKey(Keys.secret(n)).public_key_xonly.format()


def config_dict(data_dir: Path, network: str = "local", **sections: dict[str, Any]) -> dict[str, Any]:
    """A test config: port 0, 50 ms blocks, known admin token, genesis money for test keys 1..3."""
    d: dict[str, Any] = {
        "node": {"network": network, "data_dir": str(data_dir), "log_level": "DEBUG"},
        "chain": {"min_fee_sat": 1,
                  "genesis_alloc": {Keys.pubkey(n).hex(): GENESIS_SAT for n in (1, 2, 3)}},
        "block": {"interval_ms": 50, "max_txs": 100},
        "mempool": {"max_txs": 1000, "max_per_sender": 16, "min_fee_sat": 1},
        "api": {"host": "127.0.0.1", "port": 0, "admin_token": ADMIN_TOKEN, "max_body_bytes": MAX_BODY},
        "snapshots": {"every_blocks": 0, "keep": 3},
    }
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    return d


def make_config(data_dir: Path, network: str = "local", **sections: dict[str, Any]) -> Config:
    """Config.from_dict with an empty environment (so $L2D_ADMIN_TOKEN cannot leak in)."""
    return Config.from_dict(config_dict(data_dir, network, **sections), data_dir.parent, env={})


class WaitUntil(Protocol):
    def __call__(self, cond: Callable[[], Awaitable[bool]], timeout: float = ..., what: str = ...) -> Awaitable[None]:
        ...


async def _wait_until(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def keys() -> type[Keys]:
    return Keys


@pytest.fixture
def wait_until() -> WaitUntil:
    return _wait_until


@pytest.fixture
def make_cfg() -> Callable[..., Config]:
    """make_config(data_dir, network="local", **section_overrides)."""
    return make_config


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path / "data")


async def _node_and_client(config: Config) -> AsyncIterator[tuple[Node, Client]]:
    node = Node.from_config(config)
    await node.start(serve_http=False)  # producer and snapshot tasks; HTTP comes from the TestServer
    client: Optional[Client] = None
    try:
        client = TestClient(TestServer(node.web_app()))
        await client.start_server()
        yield node, client
    finally:
        if client is not None:
            await client.close()
        await node.stop()
    assert not node.failed


@pytest.fixture
async def node_client(config: Config) -> AsyncIterator[tuple[Node, Client]]:
    """A running node (producer on) and a test client on its REST app."""
    async for pair in _node_and_client(config):
        yield pair


@pytest.fixture
async def client(node_client: tuple[Node, Client]) -> Client:
    return node_client[1]


@pytest.fixture
async def node(node_client: tuple[Node, Client]) -> Node:
    return node_client[0]


@pytest.fixture
async def signet_client(tmp_path: Path) -> AsyncIterator[tuple[Node, Client]]:
    """A node on a network without admin mint (signet), for the 403 paths."""
    cfg = make_config(tmp_path / "signet", "signet")
    # Keys are never created on signet: the block-signing member key must exist.
    cfg.federation.key_file.parent.mkdir(parents=True)
    cfg.federation.key_file.write_text(Keys.secret(99).hex() + "\n")
    async for pair in _node_and_client(cfg):
        yield pair


def write_node_toml(path: Path, alloc: dict[bytes, int], token: str, **sections: dict[str, Any]) -> Path:
    """A TOML config for a real l2d process: network local, data_dir "data" beside it, API on a free port."""
    d: dict[str, Any] = {"node": {"network": "local", "data_dir": "data"},
                         "chain": {"genesis_alloc": {k.hex(): v for k, v in alloc.items()}},
                         "api": {"port": 0, "admin_token": token}}
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    path.write_text(toml.dumps(d))
    return path


@pytest.fixture
def node_toml() -> Callable[..., Path]:
    """write_node_toml(path, {pubkey: sat}, token, **section_overrides) -> path."""
    return write_node_toml
