"""l2-verify chain: a chain file signed by real member keys (4 members, m = 3) against a federation genesis file;
exit 0 verified, 1 refused (naming the height and the reason), 2 malformed or usage; --json; a subprocess run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from l2d.core.commit import Commit
from tests.conftest import load_by_path
from verify_tool.cli import main

REPO = Path(__file__).resolve().parents[2]


B = load_by_path("tests/l2d/core/test_chain_file.py", "_l2d_chain_file_builder")  # its builders


@pytest.fixture
def genesis(tmp_path: Path) -> Path:
    p = tmp_path / "genesis.json"
    p.write_bytes(B.GENESIS.encode())
    return p


def write(tmp_path: Path, raw: bytes, name: str = "chain.l2chain") -> Path:
    p = tmp_path / name
    p.write_bytes(raw)
    return p


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    return write(tmp_path, B.chain_bytes(B.CHAIN))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert obj["ok"] is (code == 0) and obj["exit_code"] == code and obj["command"] == "chain"
    return code, obj


def test_verified(capsys: pytest.CaptureFixture[str], chain: Path, genesis: Path) -> None:
    tip = B.CHAIN[-1][0].hash.hex()
    code, out, err = run(capsys, "chain", str(chain), "--members", str(genesis))
    assert (code, err) == (0, "")
    assert out == (f"OK chain regtest 0..8 (9 blocks, tip {tip}) each signed by at least 3 of 4 members, linked "
                   f"from genesis; final through 7\n")
    code, obj = run_json(capsys, "chain", str(chain), "--members", str(genesis))
    assert code == 0
    assert obj == {"ok": True, "command": "chain", "file": str(chain), "exit_code": 0, "error": None,
                   "error_type": None, "network": "regtest", "start_height": 0, "tip_height": 8, "count": 9,
                   "start_hash": B.GENESIS.genesis_hash.hex(), "tip_hash": tip,
                   "genesis_hash": B.GENESIS.genesis_hash.hex(), "threshold": 3, "members": 4,
                   "trusted_start": "genesis", "final_height": 7,
                   "signed": [{"member": 0, "id": "alice", "blocks": 8}, {"member": 1, "id": "bob", "blocks": 8},
                              {"member": 2, "id": "carol", "blocks": 8}, {"member": 3, "id": "dave", "blocks": 1}],
                   "checksum": chain.read_bytes()[-32:].hex()}


def test_a_later_start_with_a_checkpoint(capsys: pytest.CaptureFixture[str], tmp_path: Path, genesis: Path) -> None:
    later = write(tmp_path, B.chain_bytes(B.CHAIN[5:]))
    code, obj = run_json(capsys, "chain", str(later), "--members", str(genesis))
    assert (code, obj["error_type"], obj["height"]) == (1, "ChainNoTrustedStart", 5)
    cp = f"4:{B.CHAIN[4][0].hash.hex()}"
    code, out, _ = run(capsys, "chain", str(later), "--members", str(genesis), "--checkpoint", cp)
    assert code == 0 and out.startswith("OK chain regtest 5..8 (4 blocks") and f"linked from checkpoint {cp};" in out
    code, obj = run_json(capsys, "chain", str(later), "--members", str(genesis), "--checkpoint",
                         f"6:{B.CHAIN[4][0].hash.hex()}")
    assert (code, obj["error_type"], obj["height"]) == (1, "ChainCheckpointMismatch", 6)


@pytest.mark.parametrize("case, error_type, height", [
    ("m-1 signatures", "ChainNotEnoughSignatures", 3),
    ("a non-member's signature", "ChainBadCommitSignature", 6),
    ("signed for another network", "ChainBadCommitSignature", 2),
    ("a duplicated signer's signature under another member's bit", "ChainBadCommitSignature", 5),
    ("a broken link", "ChainBrokenLink", 3),
    ("a height gap", "ChainHeightGap", 3),
    ("a block of another network", "ChainWrongNetwork", 4),
    ("another genesis", "ChainGenesisMismatch", 0),
    ("damaged (checksum)", "ChainFileChecksum", None),
])
def test_refused_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path, genesis: Path, case: str,
                        error_type: str, height: Any) -> None:
    c = B.CHAIN
    two = B.signed(c[5][0], (0, 1))
    raw = {
        "m-1 signatures": lambda: B.with_commit(3, B.signed(c[3][0], (0, 2))),
        "a non-member's signature": lambda: B.with_commit(
            6, B.signed(c[6][0], (0, 1, 3), secrets=list(B.SECRETS[:3]) + [B.SECRETS[4]])),
        "signed for another network": lambda: B.with_commit(2, B.signed(c[2][0], network=B.LOCAL)),
        "a duplicated signer's signature under another member's bit": lambda: B.with_commit(
            5, Commit(4, (0, 1, 2), two.signatures + two.signatures[1:])),
        "a broken link": lambda: B.chain_bytes(B.forge(c, 3, prev_hash=b"\x05" * 32)),
        "a height gap": lambda: B.chain_bytes(B.relink(c[:3] + c[4:], 3)),
        "a block of another network": lambda: B.chain_bytes(B.forge(c, 4, network_id=B.LOCAL.id)),
        "another genesis": lambda: B.chain_bytes(B.forge(c, 0, state_root=b"\x01" * 32)),
        "damaged (checksum)": lambda: B.chain_bytes(c)[:-1] + b"\0",
    }[case]()
    path = write(tmp_path, raw)
    code, out, err = run(capsys, "chain", str(path), "--members", str(genesis))
    assert (code, out) == (1, "") and err.startswith(f"FAIL chain {path}: ") and err.count("\n") == 1
    if height is not None:
        assert f"block {height}" in err
    code, obj = run_json(capsys, "chain", str(path), "--members", str(genesis))
    assert (code, obj["error_type"], obj["height"]) == (1, error_type, height)


def test_malformed_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, chain: Path, genesis: Path) -> None:
    raw = chain.read_bytes()
    two = B.signed(B.CHAIN[5][0], (0, 1))
    extra = bytearray(raw)
    at = B.entry_offset(raw, 5)
    length = int.from_bytes(raw[at + 118:at + 120], "big")
    forged = two.encode() + two.signatures[1]  # a duplicated signer: one signature more than the bitmap's bits
    extra[at + 118:at + 120 + length] = len(forged).to_bytes(2, "big") + forged
    cases = {
        "truncated": (raw[:-40], "ChainFileTruncated"),
        "trailing bytes": (raw + b"\0", "ChainFileTrailingBytes"),
        "unknown version": (B.reseal(raw[:8] + b"\x02" + raw[9:]), "ChainFileVersionError"),
        "bad magic": (b"L2DCHAIX" + raw[8:], "NotAChainFile"),
        "unknown network": (B.reseal(raw[:9] + b"\x63" + raw[10:]), "ChainFileUnknownNetwork"),
        "duplicated signer": (B.reseal(bytes(extra)), "ChainFileBadEntry"),
        "empty": (b"", "ChainFileTruncated"),
    }
    for name, (data, error_type) in cases.items():
        path = write(tmp_path, data, name.replace(" ", "-"))
        code, out, err = run(capsys, "chain", str(path), "--members", str(genesis))
        assert (code, out) == (2, ""), name
        assert err.startswith(f"ERROR chain {path}: ") and err.count("\n") == 1, name
        code, obj = run_json(capsys, "chain", str(path), "--members", str(genesis))
        assert (code, obj["error_type"]) == (2, error_type), name
    code, obj = run_json(capsys, "chain", str(write(tmp_path, B.reseal(bytes(extra)))), "--members", str(genesis))
    assert obj["height"] == 5 and "64 bytes after the last signature" in obj["error"]


def test_usage_and_genesis_file_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, chain: Path,
                                       genesis: Path) -> None:
    code, _, err = run(capsys, "chain", str(chain))
    assert code == 2 and "--members" in err
    code, obj = run_json(capsys, "chain", str(chain))
    assert (code, obj["error_type"]) == (2, "usage")
    assert run_json(capsys, "chain", str(tmp_path / "missing"), "--members", str(genesis))[1]["error_type"] == \
        "io-error"
    assert run_json(capsys, "chain", str(chain), "--members", str(tmp_path / "none"))[1]["error_type"] == "io-error"
    for bad_cp in ("3:abc", "x:" + "00" * 32, f"{1 << 64}:" + "00" * 32):
        code, obj = run_json(capsys, "chain", str(chain), "--members", str(genesis), "--checkpoint", bad_cp)
        assert (code, obj["error_type"]) == (2, "bad-argument"), bad_cp
    code, obj = run_json(capsys, "chain", "-", "--members", "-")
    assert (code, obj["error_type"]) == (2, "bad-argument")
    doc = json.loads(genesis.read_text())
    for change, error_type in ((dict(threshold=2), "GenesisFileInvalid"), (dict(version=9), "GenesisFileVersionError"),
                               (dict(format="x"), "NotAGenesisFile")):
        bad = write(tmp_path, json.dumps({**doc, **change}).encode(), "bad-genesis.json")
        code, out, err = run(capsys, "chain", str(chain), "--members", str(bad))
        assert code == 2 and err.startswith(f"ERROR chain {chain}: --members {bad}: ")
        code, obj = run_json(capsys, "chain", str(chain), "--members", str(bad))
        assert (code, obj["error_type"]) == (2, error_type)
    other = B.FederationGenesis(B.REGTEST, B.Membership(B.KEYS[1:5], 3), ("b", "c", "d", "e"), B.GENESIS.genesis)
    members = write(tmp_path, other.encode(), "other-members.json")  # same chain, another member set: refused
    code, obj = run_json(capsys, "chain", str(chain), "--members", str(members))
    assert (code, obj["error_type"], obj["height"]) == (1, "ChainBadCommitSignature", 1)


def test_subprocess_and_stdin(chain: Path, genesis: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "verify_tool.cli", "chain", "-", "--members", str(genesis), "--json"],
                       cwd=REPO, input=chain.read_bytes(), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["ok"] and obj["tip_height"] == 8 and obj["file"] == "-"
    r = subprocess.run([sys.executable, "-m", "verify_tool.cli", "chain", str(chain), "--members", "-"],
                       cwd=REPO, input=genesis.read_bytes(), capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(b"OK chain regtest 0..8"), r.stderr
    probe = ("import sys, verify_tool.cli; verify_tool.cli.main(['chain', sys.argv[1], '--members', sys.argv[2]]); "
             "print(sorted(m for m in ('lmdb', 'aiohttp', 'zmq', 'l2d.store', 'l2d.node', 'bitcoin', 'bitcoinutils') "
             "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe, str(chain), str(genesis)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "[]", r.stdout + r.stderr
