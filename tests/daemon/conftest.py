"""Fixtures for the daemon tests: a Node on a fresh data dir in tmp_path, and an aiohttp test client on it.

Test modules cannot import each other (site-packages holds a `tests` package), so the shared helpers are
handed out as fixtures: `keys` (deterministic test keys) and `wait_until` (poll a condition with a timeout).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Optional, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

from l2d.config import Config
from l2d.logs import JsonFormatter
from l2d.node import Node

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


@pytest.fixture(autouse=True)
def json_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Log everything at DEBUG (so every log call really builds its record) and check each record renders
    as one JSON line with the daemon's formatter."""
    caplog.set_level(logging.DEBUG)
    yield
    fmt = JsonFormatter()
    for record in caplog.records:
        line = fmt.format(record)
        assert "\n" not in line
        assert json.loads(line)["msg"] == record.getMessage()


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
    async for pair in _node_and_client(make_config(tmp_path / "signet", "signet")):
        yield pair


REPO = Path(__file__).resolve().parents[2]


class DaemonProcess:
    """A real `l2d` process (python -m l2d.node) on a TOML config; its JSON log lines are kept in `lines`."""

    def __init__(self, config_path: Path) -> None:
        import os
        import subprocess
        import sys

        env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
        env["PYTHONPATH"] = str(REPO)
        self.proc = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(config_path)],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
        self.lines: list[dict[str, Any]] = []
        self.port = self._read_port()

    def _read_port(self, timeout: float = 60) -> int:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            rec = json.loads(line)  # every log line is one JSON object
            self.lines.append(rec)
            if rec["msg"] == "api listening":
                return int(rec["port"])
        self.kill()
        raise AssertionError(f"l2d did not start: {self.lines[-5:]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str) -> Any:
        import urllib.request

        with urllib.request.urlopen(self.url(path), timeout=10) as r:
            return json.loads(r.read())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def terminate(self) -> tuple[int, list[dict[str, Any]]]:
        import signal

        self.proc.send_signal(signal.SIGTERM)
        rest = self.proc.communicate(timeout=60)[1]
        return self.proc.returncode, [json.loads(x) for x in rest.splitlines() if x.strip()]


@pytest.fixture
def daemon_process() -> Iterator[Callable[[Path], DaemonProcess]]:
    """Factory starting real l2d processes; every one still running at teardown is killed."""
    started: list[DaemonProcess] = []

    def start(config_path: Path) -> DaemonProcess:
        p = DaemonProcess(config_path)
        started.append(p)
        return p

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.kill()


def write_node_toml(path: Path, alloc: dict[bytes, int], token: str, **sections: dict[str, Any]) -> Path:
    """A TOML config for a real l2d process: network local, data_dir "data" beside it, API on a free port."""
    import toml

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
