"""The regtest harness itself: locating bitcoind, start-up failures, clean stop."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from regtest.harness import BitcoindError, BitcoindNode, find_bitcoind, free_ports


def test_find_bitcoind_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BITCOIND", str(tmp_path / "nonexistent"))
    assert find_bitcoind() is None
    fake = tmp_path / "bitcoind"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("BITCOIND", str(fake))
    assert find_bitcoind() == str(fake)
    monkeypatch.delenv("BITCOIND")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_bitcoind() == str(fake)
    monkeypatch.setenv("PATH", os.devnull)
    assert find_bitcoind() is None


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(1024 <= p <= 65535 for p in ports)


def test_refuses_non_empty_datadir(tmp_path: Path) -> None:
    (tmp_path / "junk").write_text("x")
    with pytest.raises(BitcoindError, match="not empty"):
        BitcoindNode(tmp_path, bitcoind="/bin/true").start()


@pytest.mark.regtest
def test_start_failure_reports_log_tail(tmp_path: Path) -> None:
    binary = find_bitcoind()
    if binary is None:
        pytest.skip("bitcoind not found (set $BITCOIND or put it on PATH)")
    node = BitcoindNode(tmp_path / "node", bitcoind=binary, extra_args=["-nosuchoption=1"])
    with pytest.raises(BitcoindError) as exc:
        node.start()
    assert "exited with code" in str(exc.value) and "nosuchoption" in str(exc.value)
    assert node.process is not None and node.process.poll() is not None


@pytest.mark.regtest
def test_node_lifecycle_and_cli(bitcoind: BitcoindNode) -> None:
    conf = (bitcoind.datadir / "bitcoin.conf").read_text()
    for flag in ("listen=0", "dnsseed=0", "fixedseeds=0", "discover=0", "listenonion=0", "natpmp=0", "connect=0",
                 f"rpcport={bitcoind.rpc_port}", "rpcbind=127.0.0.1"):
        assert flag in conf.splitlines()
    assert bitcoind.cli("getblockcount") == "0"
    assert bitcoind.call_sync("getnetworkinfo")["connections"] == 0
    assert bitcoind.cookie_path.exists()
