"""bench/bench_sessions.py --quick runs and reports what it measures (no timing is asserted)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_sessions_bench_measures_receipts_and_the_settlement_it_saves() -> None:
    spec = importlib.util.spec_from_file_location("bench_sessions", REPO / "bench" / "bench_sessions.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick", "--receipts", "16"])
    r, s = out["receipts"], out["settlement"]
    assert r["receipts"] == 500 and min(r["sign_per_s"], r["check_per_s"], r["bare_bip340_verify_per_s"]) > 0
    assert s["receipts"] == 16 and s["l2_txs"] == {"settlement": 1, "per_receipt_payments": 16}
    assert s["settle_tx_bytes"] == 236 and s["transfers_bytes"] == 16 * 156  # the envelope + payload sizes
    assert s["bytes_ratio"] < 1 and s["settle_apply_us"] > 0
