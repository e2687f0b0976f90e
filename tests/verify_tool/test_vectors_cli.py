"""l2-verify passes the same pinned proof vectors the daemon's tree code passes (tests/l2d/core/test_vectors.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from verify_tool.cli import main

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "state_tree.json").read_text())


@pytest.mark.parametrize("vec", VECTORS["proofs"], ids=lambda v: v["name"])
def test_verifier_accepts_every_valid_proof_vector(vec: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.proof"
    f.write_bytes(bytes.fromhex(vec["proof"]))
    assert main(["proof", "--root", vec["root"], str(f), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True
    assert out["present"] is (vec["expect"] == "present")
    assert out["value"] == vec["value"]


@pytest.mark.parametrize("vec", VECTORS["invalid_proofs"], ids=lambda v: v["name"])
def test_verifier_rejects_every_invalid_proof_vector(vec: dict[str, Any], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "p.proof"
    f.write_bytes(bytes.fromhex(vec["proof"]))
    assert main(["proof", "--root", vec["root"], str(f)]) in (1, 2)
    assert capsys.readouterr().err.strip()  # one line saying what failed


COMMITS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "commits.json").read_text())


def _chain_run(v: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """l2-verify chain on the vector's chain file (genesis and block 1 carrying the vector's commit) against the
    genesis file of its membership and network."""
    chain, genesis = tmp_path / "c.l2chain", tmp_path / "genesis.json"
    chain.write_bytes(bytes.fromhex(v["chain_file"]))
    genesis.write_text(COMMITS["genesis_files"][f"{v['membership']}/{v['network']}"])
    code = main(["chain", str(chain), "--members", str(genesis), "--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("vec", COMMITS["commits"], ids=lambda v: v["name"])
def test_verifier_accepts_every_valid_commit_vector(vec: dict[str, Any], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _chain_run(vec, tmp_path, capsys)
    assert code == 0 and out["tip_hash"] == vec["block_hash"]
    assert [m["member"] for m in out["signed"] if m["blocks"]] == vec["signers"]


@pytest.mark.parametrize("vec", COMMITS["invalid_commits"], ids=lambda v: v["name"])
def test_verifier_refuses_every_invalid_commit_vector(vec: dict[str, Any], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _chain_run(vec, tmp_path, capsys)
    malformed = vec["l2_verify"].startswith("ChainFile")  # a commit that does not decode; else one that is refused
    assert (code, out["error_type"], out["height"]) == (2 if malformed else 1, vec["l2_verify"], 1)


def test_verifier_accepts_the_chain_file_vector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = COMMITS["chain"]
    code, out = _chain_run(c, tmp_path, capsys)
    assert code == 0 and (out["tip_height"], out["tip_hash"]) == (c["tip_height"], c["tip_hash"])


KOFN = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "audit_kofn.json").read_text())


def _audit_run(bundle_hex: str, members: Any, tmp_path: Path,
               capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    """l2-verify audit --json on a vector bundle, with --members when the vector names a genesis file."""
    f = tmp_path / "b.l2audit"
    f.write_bytes(bytes.fromhex(bundle_hex))
    argv = ["audit", str(f), "--json"]
    if members is not None:
        genesis = tmp_path / "genesis.json"
        genesis.write_text(COMMITS["genesis_files"][members])
        argv += ["--members", str(genesis)]
    code = main(argv)
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("vec", KOFN["bundles"], ids=lambda v: v["name"])
def test_verifier_accepts_every_kofn_bundle_vector(vec: dict[str, Any], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _audit_run(vec["bundle"], vec["members"], tmp_path, capsys)
    assert code == 0 and out["anchor_kind"] == "taproot-kofn"
    assert (out["k_of_n"]["k"], out["k_of_n"]["n"], out["k_of_n"]["merkle_root"]) == (vec["k"], vec["n"],
                                                                                      vec["merkle_root"])
    assert (out["txid"], out["vout"], out["block_hash"], out["confirmations"]) == (
        vec["txid"], vec["vout"], vec["block_hash"], vec["confirmations"])
    assert (None if out["commit"] is None else out["commit"]["signers"]) == vec["signers"]


@pytest.mark.parametrize("vec", KOFN["invalid_bundles"], ids=lambda v: v["name"])
def test_verifier_refuses_every_invalid_kofn_bundle_vector(vec: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _audit_run(vec["bundle"], None, tmp_path, capsys)
    assert (code, out["error_type"]) == (vec["exit_code"], vec["error"])
