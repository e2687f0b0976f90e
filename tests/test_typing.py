"""The consensus-critical modules, the federation protocol and the verifier are mypy --strict clean (settings in
pyproject.toml)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STRICT = ["l2d/core", "l2d/federation", "verify_tool", "anchoring/btc_tx.py", "anchoring/multisig.py"]


def test_consensus_code_is_mypy_strict_clean(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the test extra; install with pip install -e '.[test]'")
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), *STRICT],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
