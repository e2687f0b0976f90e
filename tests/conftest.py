"""Fixtures shared across test folders: a per-test bitcoind regtest node and its RPC client.

Tests that use them are skipped with one line when bitcoind is absent (neither $BITCOIND nor PATH).
"""
from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Iterator

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
