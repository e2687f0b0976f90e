"""bench/bench_netflow.py --quick: real relays and clients download 8 MiB byte-identical (the bench checks it) and
report throughput for each path and the ratios to loopback (no timing is asserted)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_the_netflow_bench_downloads_through_both_paths() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    spec = importlib.util.spec_from_file_location("bench_netflow", REPO / "bench" / "bench_netflow.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--quick"])
    assert out["mib"] == 8
    for server in ("body", "sendfile"):
        for name in ("loopback", "direct", "onion"):
            assert out[f"{server}_{name}_mib_s"] > 0
        assert out[f"{server}_direct_ratio"] > 0 and out[f"{server}_onion_ratio"] > 0
    # CPU per MiB of each process in the path: the exit and the client; three relays and the client
    assert len(out["direct_cpu_ms_per_mib"]) == 2 and len(out["onion_cpu_ms_per_mib"]) == 4
