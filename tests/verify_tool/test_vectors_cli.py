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
