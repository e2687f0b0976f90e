"""bench/federation.py: a --quick run of real member processes completes and reports sane figures (no timed
assertions: the numbers themselves go to `make bench`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "federation.py"


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCH), "--quick", "--keep", str(tmp_path)], capture_output=True,
                       text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["quick"] is True
    for n in (4, 1):
        lat, tp = res[f"latency_{n}"], res[f"throughput_{n}"]
        assert lat["transfers"] == 40 and tp["transfers"] == 160
        assert 0 < lat["finality_latency_s_median"] <= lat["finality_latency_s_p90"] <= lat["finality_latency_s_max"]
        assert lat["blocks_per_s"] > 0 and lat["block_interval_ms_mean"] > 0
        assert tp["committed_tx_per_s"] > 0 and tp["blocks_with_txs"] >= 1 and tp["daemon_cpu_s_per_1000_tx"] > 0
    assert res["finality_latency_median_4_vs_1"] > 0 and res["committed_tx_per_s_4_vs_1"] > 0
    cu = res["catch_up"]
    # 160 transfers of 4 per block while member 4 was down: at least 40 blocks for it to fetch, then applied
    # locally (its blocks plus the two it had before it stopped)
    assert cu["blocks_behind"] >= 40 and cu["local_apply_blocks"] >= cu["blocks_behind"]
    assert cu["catch_up_blocks_per_s"] > 0 and cu["local_apply_blocks_per_s"] > 0 and cu["catch_up_vs_local_apply"] > 0
    assert cu["member_4_down_heights"] >= 40
    # every member process ran with its own log, and the restarted member 4 has a second one
    assert (tmp_path / "catchup" / "member-4-2.log").exists()
