"""bench/bench_daemon_memory.py, briefly: its fixture block (many accounts, one block) is one the daemon accepts at
start (a committed, final block of the 1-member federation); `make bench` runs it with 1 M accounts. Without the
commit the daemon refused the data dir and the benchmark died (it did, unnoticed, from issue 12 to issue 13)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_daemon_starts_on_the_benchmarks_store_and_its_figures_are_reported() -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_daemon_memory.py"), "--accounts", "2000"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["accounts"] == 2000 and res["start_seconds"] > 0
    # two processes' RSS: with 2,000 accounts it may be a fraction of a MB below the empty daemon's (75.9 vs 76.0)
    assert res["rss_mb"] > 0 and res["empty_rss_mb"] > 0 and abs(res["rss_mb"] - res["empty_rss_mb"]) < 50
