"""l2-verify audit: exit codes 0/1/2, one-line messages, --json, a subprocess run, no daemon imports."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import load_by_path
from verify_tool.audit import run_audit
from verify_tool.cli import main

REPO = Path(__file__).resolve().parents[2]


B = load_by_path("tests/l2d/core/test_audit.py", "_l2d_audit_bundle_builder")  # its builders


@pytest.fixture(scope="module")
def world() -> Any:
    return B.make_world(B.AnchorKind.OP_RETURN)


@pytest.fixture
def bundle(tmp_path: Path, world: Any) -> Path:
    p = tmp_path / "anchor.l2audit"
    p.write_bytes(world.bundle.encode())
    return p


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run(capsys, *argv, "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert obj["ok"] is (code == 0) and obj["exit_code"] == code and obj["command"] == argv[0]
    return code, obj


def test_verified(capsys: pytest.CaptureFixture[str], bundle: Path, world: Any) -> None:
    code, out, err = run(capsys, "audit", str(bundle))
    assert (code, err) == (0, "")
    assert out.count("\n") == 1 and out.startswith(f"OK audit {bundle}: L2 regtest height {B.L2_HEIGHT}")
    assert "21 confirmation(s) >= 1" in out and "from genesis" in out
    code, obj = run_json(capsys, "audit", str(bundle), "--min-conf", "21")
    assert code == 0 and obj["error"] is None
    assert (obj["block_height"], obj["confirmations"], obj["tip_height"]) == (5, 21, 25)
    assert obj["state_root"] == world.bundle.record.state_root.hex() and obj["anchor_kind"] == "op-return"
    genesis = world.headers[0].hash_hex
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", f"0:{genesis}", "--chain", "regtest")
    assert code == 0 and obj["checkpoint"] == f"0:{genesis}"
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", f"9:{world.headers[9].hash_hex}")
    assert code == 0 and obj["trusted_start"].startswith("checkpoint 9:")


def test_verification_failures_exit_1(capsys: pytest.CaptureFixture[str], bundle: Path, world: Any,
                                      tmp_path: Path) -> None:
    code, out, err = run(capsys, "audit", str(bundle), "--min-conf", "22")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.startswith(f"FAIL audit {bundle}: ") and "22 required" in err
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", f"9:{world.headers[8].hash_hex}")
    assert (code, obj["error_type"], obj["height"]) == (1, "CheckpointMismatch", 9)
    code, obj = run_json(capsys, "audit", str(bundle), "--chain", "mainnet")
    assert (code, obj["error_type"]) == (1, "CheckpointMismatch")  # the regtest genesis is not mainnet's
    raw = bytearray(bundle.read_bytes())
    raw[len(raw) // 2] ^= 1
    damaged = tmp_path / "damaged.l2audit"
    damaged.write_bytes(bytes(raw))
    code, obj = run_json(capsys, "audit", str(damaged))
    assert (code, obj["error_type"]) == (1, "BundleChecksumMismatch")
    hs = list(world.headers)
    hs[12] = B.grind(hs[12].prev_hash, hs[12].merkle_root, hs[12].time, fail=True)
    bad_pow = tmp_path / "pow.l2audit"
    bad_pow.write_bytes(dataclasses.replace(world.bundle, headers=b"".join(h.serialize() for h in hs)).encode())
    code, obj = run_json(capsys, "audit", str(bad_pow))
    assert (code, obj["error_type"], obj["height"]) == (1, "BadProofOfWork", 12)


def test_malformed_and_usage_exit_2(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.l2audit"
    short.write_bytes(bundle.read_bytes()[:-50])
    code, out, err = run(capsys, "audit", str(short))
    assert (code, out) == (2, "") and err.startswith(f"ERROR audit {short}: ") and err.count("\n") == 1
    code, obj = run_json(capsys, "audit", str(short))
    assert (code, obj["error_type"]) == (2, "Truncated")
    notabundle = tmp_path / "x.bin"
    notabundle.write_bytes(b"hello world")
    assert run_json(capsys, "audit", str(notabundle))[1]["error_type"] == "BundleMalformed"
    assert run_json(capsys, "audit", str(tmp_path / "missing"))[1]["error_type"] == "io-error"
    code, obj = run_json(capsys, "audit", str(bundle), "--checkpoint", "12:abc")
    assert (code, obj["error_type"]) == (2, "bad-argument")
    code, obj = run_json(capsys, "audit", str(bundle), "--min-conf", "-1")
    assert (code, obj["error_type"]) == (2, "bad-argument")
    for argv in (["audit"], ["audit", str(bundle), "--min-conf", "many"], ["audit", str(bundle), "--chain", "ltc"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and "error:" in err


def test_run_audit_directly(bundle: Path, world: Any) -> None:
    code, result, line = run_audit(str(bundle), None, 1, None, now=world.headers[-1].time)
    assert code == 0 and result["ok"] and line.startswith("OK audit")
    code, result, line = run_audit(str(bundle), None, 1, None, now=world.headers[-1].time - 7201)
    assert (code, result["error_type"]) == (1, "TimeTooNew") and line.startswith("FAIL audit")


def test_subprocess_run_and_imports(bundle: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(bundle), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["ok"] and obj["confirmations"] == 21
    probe = ("import sys, verify_tool.cli, verify_tool.audit; "
             "print(sorted(m for m in ('lmdb', 'aiohttp', 'zmq', 'l2d.store', 'l2d.node') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# -- --members: the anchored L2 block's commit (version 2 bundles) ------------------------------------------------
@pytest.fixture
def members(tmp_path: Path) -> Path:
    p = tmp_path / "genesis.json"
    p.write_bytes(B.FEDERATION.encode())
    return p


def test_commit_checked_with_members(capsys: pytest.CaptureFixture[str], tmp_path: Path, world: Any,
                                     members: Path) -> None:
    v2 = tmp_path / "v2.l2audit"
    b = B.with_commit(world)
    v2.write_bytes(b.encode())
    block = b.commit.header.hash.hex()
    code, out, err = run(capsys, "audit", str(v2), "--members", str(members))
    assert (code, err) == (0, "")
    assert (f"(3 account proof(s)), block {block} signed by 3 of 4 members (alice, bob, carol; threshold 3), "
            f"anchored by op-return output") in out
    code, obj = run_json(capsys, "audit", str(v2), "--members", str(members))
    assert code == 0 and obj["commit"] == {"l2_block_hash": block, "signers": [0, 1, 2], "checked": True,
                                           "signer_ids": ["alice", "bob", "carol"]}
    code, out, _ = run(capsys, "audit", str(v2))  # no --members: verified, and the line says what was not checked
    assert code == 0 and f"block {block} with a commit of 3 member signature(s) NOT checked (no --members)" in out
    code, obj = run_json(capsys, "audit", str(v2))
    assert code == 0 and obj["commit"] == {"l2_block_hash": block, "signers": [0, 1, 2], "checked": False}


def test_commit_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, world: Any, bundle: Path,
                        members: Path) -> None:
    code, obj = run_json(capsys, "audit", str(bundle), "--members", str(members))
    assert (code, obj["error_type"]) == (1, "CommitMissing")  # a version 1 bundle cannot show the signatures
    code, obj = run_json(capsys, "audit", str(bundle))
    assert code == 0 and obj["commit"] is None  # and verifies as before without --members
    cases = {
        "m-1": (B.with_commit(world, (1, 3)), "NotEnoughSignatures"),
        "non-member": (B.with_commit(world, (0, 1, 2), secrets=B.MEMBER_SECRETS[:2] + [B.MEMBER_SECRETS[4]]),
                       "BadCommitSignature"),
        "another block": (B.with_commit(world, state_root=b"\x09" * 32), "CommitMismatch"),
    }
    for name, (b, error_type) in cases.items():
        p = tmp_path / f"{name}.l2audit"
        p.write_bytes(b.encode())
        code, out, err = run(capsys, "audit", str(p), "--members", str(members))
        assert (code, out) == (1, "") and err.startswith(f"FAIL audit {p}: "), name
        code, obj = run_json(capsys, "audit", str(p), "--members", str(members))
        assert (code, obj["error_type"]) == (1, error_type), name
    bad = tmp_path / "bad.json"
    bad.write_bytes(B.FEDERATION.encode().replace(b'"threshold": 3', b'"threshold": 2'))
    code, obj = run_json(capsys, "audit", str(bundle), "--members", str(bad))
    assert (code, obj["error_type"]) == (2, "GenesisFileInvalid") and obj["error"].startswith(f"--members {bad}: ")
    code, obj = run_json(capsys, "audit", str(bundle), "--members", str(tmp_path / "none.json"))
    assert (code, obj["error_type"]) == (2, "io-error")


# -- k-of-n anchors: the bundle carries k and the members' Bitcoin keys --------------------------------------------
@pytest.fixture(scope="module")
def kofn_world() -> Any:
    return B.make_world(B.AnchorKind.TAPROOT_KOFN)


def test_kofn_anchor_verified(capsys: pytest.CaptureFixture[str], tmp_path: Path, kofn_world: Any) -> None:
    p = tmp_path / "kofn.l2audit"
    p.write_bytes(kofn_world.bundle.encode())
    code, out, err = run(capsys, "audit", str(p))
    assert (code, err) == (0, "")
    assert "anchored by taproot-kofn (k=3 of n=4 keys, NUMS internal key) output " in out
    code, obj = run_json(capsys, "audit", str(p))
    assert code == 0 and obj["anchor_kind"] == "taproot-kofn" and obj["vout"] == 0
    kofn = obj["k_of_n"]
    assert (kofn["k"], kofn["n"], kofn["keys"]) == (3, 4, [key.hex() for key in B.KOFN.keys])
    assert kofn["internal_key"] == B.NUMS_KEY.hex()
    assert kofn["merkle_root"] == B.FederationOutput.anchor(B.KOFN, kofn_world.bundle.record).merkle_root.hex()


def test_kofn_anchor_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, kofn_world: Any) -> None:
    b, keys = kofn_world.bundle, list(B.KOFN.keys)
    raw = b.encode()
    record = b.record.encode()
    refused = {  # well-formed bundles whose tree is not the anchor output's: exit 1
        "k tampered": (dataclasses.replace(b, kofn=B.KofN(2, B.KOFN.keys)).encode(), 1, "AnchorNotInTx"),
        "a key swapped": (dataclasses.replace(b, kofn=B.KofN.of(3, keys[1:] + [B.OUTSIDER_KEY])).encode(), 1,
                          "AnchorNotInTx"),
        "a key missing": (dataclasses.replace(b, kofn=B.KofN.of(3, keys[:3])).encode(), 1, "AnchorNotInTx"),
        "link changed": (dataclasses.replace(b, record=dataclasses.replace(b.record, prev_link=b"\x07" * 32))
                         .encode(), 1, "AnchorNotInTx"),
        "k tampered, not resealed": (raw[:98] + b"\x02" + raw[99:], 1, "BundleChecksumMismatch"),
        # malformed policies: exit 2
        "k = 0": (B.with_anchor_body(raw, record + b"\x02\x00\x04" + b"".join(keys)), 2, "InvalidPolicy"),
        "k > n": (B.with_anchor_body(raw, record + b"\x02\x05\x04" + b"".join(keys)), 2, "InvalidPolicy"),
        "keys unsorted": (B.with_anchor_body(raw, record + b"\x02\x03\x04" + b"".join(keys[::-1])), 2,
                          "InvalidPolicy"),
        "a key twice": (B.with_anchor_body(raw, record + b"\x02\x03\x04" + b"".join(keys[:3] + keys[2:3])), 2,
                        "InvalidPolicy"),
        "an invalid key": (B.with_anchor_body(raw, record + b"\x02\x03\x04" + b"".join(keys[:3]) + b"\xff" * 32), 2,
                           "InvalidPolicy"),
    }
    assert raw[98] == 3  # k's byte: record (78) and the kind byte after the preamble and the section head
    for name, (data, want, error_type) in refused.items():
        p = tmp_path / f"{name}.l2audit"
        p.write_bytes(data)
        code, out, err = run(capsys, "audit", str(p))
        assert (code, out) == (want, "") and err.startswith(("FAIL" if want == 1 else "ERROR") + f" audit {p}: "), name
        code, obj = run_json(capsys, "audit", str(p))
        assert (code, obj["error_type"]) == (want, error_type), name
