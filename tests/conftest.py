"""Fixtures shared across test folders: a per-test bitcoind regtest node and its RPC client, a poll helper and
real l2d processes whose logs go to a file.

Tests that use them are skipped with one line when bitcoind is absent (neither $BITCOIND nor PATH).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import pytest

from bridge.rpc import BitcoinRPC
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
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def poll() -> Callable[..., Awaitable[Any]]:
    """``await poll(cond, timeout, what)``: cond may be sync or async."""
    return _poll


class L2dProcess:
    """A real `l2d` process; JSON log lines go to log_path (read back with lines())."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
        env["PYTHONPATH"] = str(REPO)
        self.log_path = log_path
        self._log = open(log_path, "w")  # one log file per process
        self.proc = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(config_path)],
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
def l2d_process() -> Iterator[Callable[[Path, Path], L2dProcess]]:
    """Factory starting real l2d processes; any still running at teardown is killed."""
    started: list[L2dProcess] = []

    def start(config_path: Path, log_path: Path) -> L2dProcess:
        p = L2dProcess(config_path, log_path)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
