"""bench/bench_anchor.py: a short run (3 anchors of a 1-key federation on a real bitcoind) measures every anchor,
the anchors chain, and every figure and its baseline are reported; without bitcoind it reports why it skipped (no
timed assertions: the numbers themselves go to `python bench/bench_anchor.py`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regtest.harness import find_bitcoind

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "bench_anchor.py"


@pytest.mark.regtest
def test_short_run_measures_every_anchor_and_the_anchors_chain() -> None:
    if find_bitcoind() is None:
        pytest.skip("bitcoind not found (set $BITCOIND or put it on PATH)")
    r = subprocess.run([sys.executable, str(BENCH), "--anchors", "3"], capture_output=True, text=True, timeout=600,
                       cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["anchors"] == 3
    # three anchors after the warm-up one, each of a later L2 height, each spending the previous anchor's output
    heights = res["l2_heights"]
    assert len(heights) == 3 and heights == sorted(set(heights)) and heights[0] > 0
    assert res["chained"] is True
    for name in ("commit_to_mempool_ms", "mined_to_mempool_ms", "baseline_sendrawtransaction_ms"):
        assert 0 < res[f"{name}_min"] <= res[f"{name}_median"] <= res[f"{name}_p90"] <= res[f"{name}_max"], name
    assert res["commit_to_mempool_vs_baseline_median"] > 0 and res["mined_to_mempool_vs_baseline_median"] > 0


def test_without_bitcoind_it_reports_a_skip(tmp_path: Path) -> None:
    env = {**os.environ, "BITCOIND": str(tmp_path / "no-bitcoind")}
    r = subprocess.run([sys.executable, str(BENCH), "--anchors", "3"], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"skipped": "bitcoind not found (set $BITCOIND or put it on PATH)"}


def test_an_anchor_count_below_one_is_refused() -> None:
    r = subprocess.run([sys.executable, str(BENCH), "--anchors", "0"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 2 and "--anchors 0: must be at least 1" in r.stderr, r.stderr
