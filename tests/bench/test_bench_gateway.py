"""bench/bench_gateway.py --quick: the model decodes 16 tokens in process and through a real worker and gateway (paid
from a session, recorded on the L2), and an audit re-executes a result; every figure is reported (no timing is
asserted)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_gateway_bench_measures_direct_gateway_and_audit() -> None:
    spec = importlib.util.spec_from_file_location("bench_gateway", REPO / "bench" / "bench_gateway.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick"])
    assert out["tokens"] == 16
    for name in ("direct_tokens_per_s", "gateway_tokens_per_s", "ratio", "audit_reexecution_s", "generation_s"):
        assert out[name] > 0, name
    assert out["four_clients"]["aggregate_tokens_per_s"] > 0
    assert out["audit_over_generation"] > 0
