"""regtest/members.py: the Bitcoin sections it writes make a consistent federation (every member's genesis agrees,
each member signs with exactly the keys it was given), and a wrong key layout is refused before anything is
written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from coincurve import PrivateKey

from l2d.config import Config
from regtest.harness import BitcoindNode
from regtest.members import signer_pubkey, write_configs
from tests.conftest import REPO


def _init(root: Path, n: int) -> list[Path]:
    r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-init", "--members", str(n), "--dir", str(root),
                        "--network", "regtest"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return [root / f"member-{k + 1}" for k in range(n)]


def _btc(tmp_path: Path) -> BitcoindNode:
    node = BitcoindNode(tmp_path / "bitcoind", bitcoind="/bin/true")  # never started: only its URL and cookie path
    node.rpc_port = 18443
    return node


@pytest.mark.parametrize("n, held", [(4, [[0], [1], [2], [3]]), (1, [[0, 1, 2, 3]]), (2, [[0, 2], [1, 3]])])
def test_members_agree_on_the_federation_and_each_holds_its_keys(tmp_path: Path, n: int,
                                                                  held: list[list[int]]) -> None:
    dirs = _init(tmp_path / "fed", n)
    btc = _btc(tmp_path)
    write_configs(dirs, [btc] * n, held, 3)
    r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-genesis", "--dir", str(tmp_path / "fed")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr  # every member's config gives the same genesis, bridge federation included
    for k, d in enumerate(dirs):
        cfg = Config.load(d / "l2d.toml", env={})
        b = cfg.bridge
        assert b.enabled and b.threshold == 3 and b.pegin_min_depth == 2 and b.pegout_confirmations == 1
        mine = [PrivateKey(bytes.fromhex(f.read_text())).public_key.format().hex() for f in b.signer_key_files]
        assert mine == [signer_pubkey(i) for i in held[k]]
        assert sorted(mine + [x.hex() for x in b.other_keys]) == sorted(signer_pubkey(i) for i in range(4))
        assert cfg.bitcoind.rpc_url == "http://127.0.0.1:18443"
        assert cfg.anchoring.enabled  # every member follows the anchors: plans its keys sign
        assert all(f.stat().st_mode & 0o077 == 0 for f in d.glob("*.key"))


@pytest.mark.parametrize("held, n_btc", [([[0], [2]], 2),  # key 1 held by nobody
                                         ([[0], [1]], 1),  # a member without a bitcoind
                                         ([[0, 1]], 2)])  # a bitcoind without a member
def test_a_wrong_key_layout_is_refused_and_nothing_is_written(tmp_path: Path, held: list[list[int]],
                                                               n_btc: int) -> None:
    dirs = _init(tmp_path / "fed", len(held))
    before = {p: p.read_bytes() for d in dirs for p in d.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="held"):
        write_configs(dirs, [_btc(tmp_path)] * n_btc, held, 1)
    assert {p: p.read_bytes() for d in dirs for p in d.iterdir() if p.is_file()} == before
