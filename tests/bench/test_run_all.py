"""bench/run_all.py runs each benchmark's main(argv) in a fresh interpreter of its own and collects its result; a
benchmark that fails is reported as an error (make bench then exits non-zero) without stopping the others."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_a_benchmark_runs_in_a_process_of_its_own_and_a_failing_one_is_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
    assert spec is not None and spec.loader is not None
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    (tmp_path / "fake_bench.py").write_text(
        "import os, sys\n"
        "def main(argv):\n"
        "    print('the bench speaks')\n"
        "    return {'argv': argv, 'pid': os.getpid(), 'parent_module_loaded': 'run_all' in sys.modules}\n")
    (tmp_path / "broken_bench.py").write_text("def main(argv):\n    raise RuntimeError('no')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = run_all.run("fake_bench", ["--quick", "x"])
    assert out == {"argv": ["--quick", "x"], "pid": out["pid"], "parent_module_loaded": False}
    assert out["pid"] != os.getpid()
    assert "the bench speaks" in capsys.readouterr().out  # its own output passed through
    assert run_all.run("broken_bench", []) == {"error": "broken_bench exited with status 1"}
