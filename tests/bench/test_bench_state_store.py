"""bench/bench_state_store.py, briefly (`make bench` runs it with 10 M accounts): a database made by one process
opens in another without rebuilding anything, takes blocks and reports every figure the issue asks for."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_state_store_benchmark_runs_and_reports_its_figures() -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_state_store.py"), "--accounts", "20000",
                          "--blocks", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["accounts"] == 20000 and res["tx_per_s_2core_warm"] > 0 and 0 < res["ratio_to_verify_warm"]
    assert all(res[f"update_us_per_key_{c}"][part] > 0 for c in ("cold", "warm") for part in ("tree", "commit"))
    assert res["rss_after_open_mb"]["RssAnon"] > 0 and res["start_seconds"] > 0
    # per block: building and storing it, with LMDB's flush and without (durable=False), and what the disk took
    for phase in ("warm", "warm_not_flushed"):
        assert res[f"tx_per_s_2core_{phase}"] > 0
        assert res[f"per_block_{phase}"]["build_ms"] > 0 and res[f"per_block_{phase}"]["store_ms"] > 0
    disk = res["per_block_warm"]["disk_mb"]
    assert disk is None or disk > 0  # a block's commit is flushed: the disk was written (None: no block device)
