"""l2-verify audit --checkpoint HASH --headers FILE: a checkpoint at any height, connected to the bundle by a header
file (docs/audit-bundle.md, "A checkpoint outside the bundle"). Runs everywhere, on a ground regtest chain;
tests/verify_tool/test_audit_headers_regtest.py does the same with a real bitcoind's chain and anchor."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Sequence

import pytest

from l2d.core.header_file import write_header_file
from tests.conftest import load_by_path
from verify_tool.cli import main



B = load_by_path("tests/l2d/core/test_audit.py", "_l2d_audit_bundle_builder")  # its builders
START = 3  # the bundle's headers are 3..25 (anchor block at 5); the header files below run to 30
TIP = 30


@pytest.fixture(scope="module")
def world() -> Any:
    return B.make_world(B.AnchorKind.OP_RETURN, start=START)


def _extend(headers: Sequence[Any], to: int, salt: bytes) -> list[Any]:
    """headers extended by ground regtest headers up to height `to` (salt makes another branch)."""
    out = list(headers)
    while len(out) <= to:
        prev = out[-1]
        out.append(B.grind(prev.hash, hashlib.sha256(salt + b"%d" % len(out)).digest(), prev.time + 600))
    return out


@pytest.fixture(scope="module")
def chain(world: Any) -> list[Any]:
    """The bundle's chain, genesis to TIP (the bundle holds START..25 of it)."""
    return _extend(world.headers, TIP, b"main")


@pytest.fixture(scope="module")
def fork(chain: list[Any]) -> list[Any]:
    """Another branch, leaving the bundle's chain after height 7 (above the anchor block), to TIP."""
    return _extend(chain[:8], TIP, b"fork")


def header_file(path: Path, headers: Sequence[Any], start: int, chain_name: str = "regtest") -> Path:
    buf = io.BytesIO()
    write_header_file(buf, chain_name, start, len(headers), [h.serialize() for h in headers])
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture
def bundle(tmp_path: Path, world: Any) -> Path:
    p = tmp_path / "anchor.l2audit"
    p.write_bytes(world.bundle.encode())
    return p


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main([*argv, "--json"])
    out, _ = capsys.readouterr()
    obj = json.loads(out)
    assert obj["ok"] is (code == 0) and obj["exit_code"] == code
    return code, obj


def audit(capsys: pytest.CaptureFixture[str], bundle: Path, checkpoint: str, headers: Path,
          *extra: str) -> tuple[int, dict[str, Any]]:
    return run_json(capsys, "audit", str(bundle), "--checkpoint", checkpoint, "--headers", str(headers), *extra)


def test_checkpoint_below_inside_and_above_the_bundle(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                      bundle: Path, chain: list[Any]) -> None:
    hf = header_file(tmp_path / "h.l2dh", chain, 0)
    for height in (1, START, 12, 28):  # below the bundle, its first header, inside it, above its tip (25)
        code, obj = audit(capsys, bundle, chain[height].hash_hex, hf)
        assert code == 0, obj["error"]
        assert obj["checkpoint"] == f"{height}:{chain[height].hash_hex}"
        assert obj["trusted_start"].startswith(f"checkpoint {height}:{chain[height].hash_hex} through header file")
        assert obj["header_file"]["connected_at"] == f"{START}:{chain[START].hash_hex}"
        assert (obj["header_file"]["start_height"], obj["header_file"]["tip_height"]) == (0, TIP)
        assert (obj["start_height"], obj["block_height"], obj["confirmations"]) == (START, 5, 21)  # as today
    code, obj = audit(capsys, bundle, f"1:{chain[1].hash_hex}", hf, "--min-conf", "21")  # HEIGHT:HASH too
    assert code == 0 and obj["checkpoint"] == f"1:{chain[1].hash_hex}"
    code = main(["audit", str(bundle), "--checkpoint", chain[1].hash_hex, "--headers", str(hf)])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "") and "21 confirmation(s) >= 1, 23 headers linked from checkpoint 1:" in out
    # a file that starts above the checkpoint's ancestors is enough: 2..30, checkpoint at 2
    code, obj = audit(capsys, bundle, chain[2].hash_hex, header_file(tmp_path / "from2.l2dh", chain[2:], 2))
    assert code == 0 and obj["header_file"]["start_height"] == 2


def test_without_headers_nothing_changes(capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path,
                                         chain: list[Any]) -> None:
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", f"1:{chain[1].hash_hex}")
    assert (code, obj["error_type"]) == (1, "CheckpointMismatch")  # outside the bundle's 3..25
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", chain[12].hash_hex)
    assert (code, obj["error_type"]) == (2, "bad-argument") and "needs --headers" in obj["error"]
    code, obj = run_json(capsys, "audit", str(bundle), "--headers", str(header_file(tmp_path / "h", chain, 0)))
    assert (code, obj["error_type"]) == (2, "bad-argument") and "needs --checkpoint" in obj["error"]
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", f"12:{chain[12].hash_hex}")
    assert code == 0 and "header_file" not in obj


def test_checkpoint_not_in_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path,
                                    chain: list[Any], fork: list[Any]) -> None:
    hf = header_file(tmp_path / "h.l2dh", chain[:26], 0)  # 0..25
    code, obj = audit(capsys, bundle, chain[28].hash_hex, hf)  # above the file
    assert (code, obj["error_type"]) == (1, "CheckpointNotInFile") and "heights 0..25" in obj["error"]
    code, obj = audit(capsys, bundle, fork[20].hash_hex, hf)  # another branch's block at a height of the file
    assert (code, obj["error_type"]) == (1, "CheckpointNotInFile")
    code, obj = audit(capsys, bundle, f"11:{chain[12].hash_hex}", hf)  # in the file, at another height
    assert (code, obj["error_type"]) == (1, "CheckpointNotInFile") and "at height 12" in obj["error"]


def test_bundle_not_connected(capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path,
                              chain: list[Any]) -> None:
    code, obj = audit(capsys, bundle, chain[1].hash_hex, header_file(tmp_path / "low.l2dh", chain[:3], 0))
    assert (code, obj["error_type"]) == (1, "BundleNotConnected") and "no header at that height" in obj["error"]
    code, obj = audit(capsys, bundle, chain[9].hash_hex, header_file(tmp_path / "high.l2dh", chain[4:], 4))
    assert (code, obj["error_type"]) == (1, "BundleNotConnected")
    # a chain that left the bundle's below its start: the checkpoint is on it, the bundle is not
    early = _extend(chain[:2], TIP, b"early")
    code, obj = audit(capsys, bundle, early[20].hash_hex, header_file(tmp_path / "early.l2dh", early, 0))
    assert (code, obj["error_type"]) == (1, "BundleNotConnected")
    assert f"has {early[START].hash_hex} at that height" in obj["error"]


def test_checkpoint_on_another_branch(capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path,
                                      fork: list[Any]) -> None:
    """The file is a branch that leaves the bundle's chain after height 7: a checkpoint on it above 7 is on another
    branch than the bundle's headers (whose anchor block, at 5, is on both); at 7 or below it is not."""
    hf = header_file(tmp_path / "fork.l2dh", fork, 0)
    for height in (8, 20, 28):
        code, obj = audit(capsys, bundle, fork[height].hash_hex, hf)
        assert (code, obj["error_type"]) == (1, "CheckpointOnOtherBranch"), obj["error"]
        assert "at height 8 is not the header file's" in obj["error"]
    for height in (2, 7):
        code, obj = audit(capsys, bundle, fork[height].hash_hex, hf)
        assert code == 0 and obj["checkpoint"] == f"{height}:{fork[height].hash_hex}"


def test_invalid_header_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, bundle: Path,
                             chain: list[Any]) -> None:
    good = header_file(tmp_path / "h.l2dh", chain, 0).read_bytes()
    cp = chain[1].hash_hex
    bad_pow = list(chain)
    bad_pow[15] = B.grind(chain[15].prev_hash, chain[15].merkle_root, chain[15].time, fail=True)
    code, obj = audit(capsys, bundle, cp, header_file(tmp_path / "pow.l2dh", bad_pow, 0))
    assert (code, obj["error_type"], obj["height"]) == (1, "BadProofOfWork", 15)
    assert obj["error"].startswith("header file ")
    unlinked = chain[:15] + chain[16:]  # a header missing: the next does not link
    code, obj = audit(capsys, bundle, cp, header_file(tmp_path / "gap.l2dh", unlinked, 0))
    assert (code, obj["error_type"], obj["height"]) == (1, "BadLink", 15)
    damaged = bytearray(good)
    damaged[-1] ^= 1
    (tmp_path / "sum.l2dh").write_bytes(bytes(damaged))
    code, obj = audit(capsys, bundle, cp, tmp_path / "sum.l2dh")
    assert (code, obj["error_type"]) == (1, "HeaderFileChecksum")
    (tmp_path / "short.l2dh").write_bytes(good[:-100])
    code, obj = audit(capsys, bundle, cp, tmp_path / "short.l2dh")
    assert (code, obj["error_type"]) == (2, "HeaderFileTruncated")
    code, obj = audit(capsys, bundle, cp, bundle)  # not a header file
    assert (code, obj["error_type"]) == (2, "NotAHeaderFile")
    code, obj = audit(capsys, bundle, cp, header_file(tmp_path / "signet.l2dh", chain, 0, "signet"))
    assert (code, obj["error_type"]) == (2, "HeaderFileWrongChain")
    code, obj = audit(capsys, bundle, cp, tmp_path / "missing.l2dh")
    assert (code, obj["error_type"]) == (2, "io-error")
