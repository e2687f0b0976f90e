"""bench/bench_pegout.py: a --quick run (3 peg-outs per federation, real member processes, a real bitcoind)
completes and reports consistent figures; without bitcoind it reports why it skipped (no timed assertions: the
numbers themselves go to `make bench`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from regtest.harness import find_bitcoind

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "bench_pegout.py"


@pytest.mark.regtest
def test_quick_run_pays_every_pegout_and_reports_every_figure(tmp_path: Path) -> None:
    if find_bitcoind() is None:
        pytest.skip("bitcoind not found (set $BITCOIND or put it on PATH)")
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--keep", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["quick"] is True
    for n, keys, senders in ((4, [1, 1, 1, 1], 3), (1, [3], 1)):
        f = res[f"members_{n}"]
        assert f["members"] == n and f["keys_held_per_member"] == keys and f["threshold"] == 3
        assert f["pegouts"] == 3 and len(f["samples"]) == 3 and f["btc_blocks_mined"] > 0
        for name in ("payable_to_mempool", "burn_to_mempool"):
            assert 0 < f[f"{name}_s_median"] <= f[f"{name}_s_p90"] <= f[f"{name}_s_max"]
        # each payout is paid from plan signatures posted by `senders` separate member processes
        assert f["signature_senders_min"] >= senders
        for s in f["samples"]:  # seconds after the burn: payable, then the plan's block, its signatures, mempool
            assert 0 < s["payable"] < s["plan"] < s["signed"] < s["mempool"], s
        assert f["payable_to_mempool_s_median"] < f["burn_to_mempool_s_median"]
        # the anchors covering the burns were plans signed by 3 keys and reached bitcoind's mempool
        assert f["anchors"] >= 1 and 0 < f["anchor_commit_to_mempool_s_median"] <= f["anchor_commit_to_mempool_s_max"]
    assert res["payable_to_mempool_median_4_vs_1"] > 0 and res["anchor_commit_to_mempool_median_4_vs_1"] > 0
    for k in range(4):  # every member was its own process, with its own log
        assert (tmp_path / "members-4" / "fed" / f"member-{k + 1}-1.log").exists()


def test_without_bitcoind_it_reports_a_skip(tmp_path: Path) -> None:
    env = {**os.environ, "BITCOIND": str(tmp_path / "no-bitcoind")}
    r = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"skipped": "bitcoind not found (set $BITCOIND or put it on PATH)"}


def test_a_pegout_count_out_of_range_is_refused() -> None:
    for n in ("0", "251"):  # GET /api/bridge/plans lists at most 500 plans: two versions per peg-out fit
        r = subprocess.run([sys.executable, str(BENCH), "--pegouts", n], capture_output=True, text=True, timeout=120,
                           cwd=REPO)
        assert r.returncode == 2 and f"--pegouts {n}: must be 1..250" in r.stderr, r.stderr
