"""make fuzz: every target of tests/fuzz/targets.py under atheris (coverage-guided libFuzzer), one process each.

    python tests/fuzz/run.py [--inputs N] [--target NAME ...] [--out DIR]

--inputs (default 10^6) is spread over the targets by SHARES. Each target starts from its seeds (real encodings)
in DIR/<target>/corpus, where libFuzzer also keeps the inputs that reached new code; an input that raises
anything but a typed error (an untyped exception, a broken round trip) stops that target and is written to
DIR/<target>/crash-<sha1> -- replay it with `python tests/fuzz/run.py --target NAME --replay FILE`. Prints, per
target, the inputs run, inputs/s, coverage and findings, then the total; exits 1 if anything was found.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# Share of --inputs per target, by how much there is to explore and how much each input costs.
SHARES = {"tx_decode": 0.18, "apply_tx": 0.18, "proof": 0.14, "block": 0.12, "snapshot": 0.09,
          "header_file": 0.09, "audit": 0.08, "chain_file": 0.06, "genesis_file": 0.03, "l2_verify": 0.03}
_STAT = re.compile(r"stat::(\w+):\s*(\d+)")
_COV = re.compile(r"cov: (\d+) ft: (\d+)")
_START = re.compile(r"^fuzz-start ([0-9.]+)$", re.M)


def _import_targets() -> Any:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import targets  # noqa: E402  (tests/fuzz/targets.py; imported here so atheris can instrument what it imports)
    return targets


def child(name: str, runs: int, corpus: Path, out: Path) -> None:
    """Fuzz one target in this process (libFuzzer exits the process when it is done)."""
    import atheris  # the `fuzz` extra of pyproject.toml (make fuzz installs it)

    with atheris.instrument_imports(include=["l2d", "verify_tool"]):
        targets = _import_targets()
    target = targets.TARGETS[name]
    target.seeds()  # build (and cache) the seeds' world before the clock starts
    print(f"fuzz-start {time.time()}", flush=True)
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-print_final_stats=1", f"-artifact_prefix={out}/",
                   "-timeout=60", "-rss_limit_mb=4096", "-max_len=16384", str(corpus)], target.run)
    atheris.Fuzz()


def replay(name: str, path: Path) -> None:
    """Run one input through a target without the fuzzer: the finding's traceback, if it still fails."""
    _import_targets().TARGETS[name].run(path.read_bytes())
    print(f"{name}: {path} passes (no finding)")


def fuzz(name: str, runs: int, out: Path) -> dict[str, Any]:
    """Run one target in a child process; what its final stats and exit say."""
    work = out / name
    corpus = work / "corpus"
    shutil.rmtree(work, ignore_errors=True)
    corpus.mkdir(parents=True)
    targets = _import_targets()
    for i, seed in enumerate(targets.TARGETS[name].seeds()):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    log = work / "fuzz.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, __file__, "--child", name, "--runs", str(runs), "--corpus", str(corpus),
                             "--out", str(work)], stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode
    end = time.time()
    wall = time.monotonic() - t0
    text = log.read_text(errors="replace")
    started = _START.search(text)
    secs = max(end - float(started.group(1)), 1e-9) if started else wall  # the fuzzing loop, without start-up
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    cov = _COV.findall(text)
    crashes = sorted(str(p) for p in work.glob("crash-*")) + sorted(str(p) for p in work.glob("timeout-*"))
    executed = stats.get("number_of_executed_units", 0)
    found = len(crashes) or (1 if rc != 0 else 0)
    return {"target": name, "inputs": executed, "inputs_per_s": round(executed / secs), "seconds": round(wall, 1),
            "coverage": int(cov[-1][0]) if cov else None, "features": int(cov[-1][1]) if cov else None,
            "corpus": len(list(corpus.iterdir())), "untyped_exceptions": found, "findings": crashes,
            "exit": rc, "log": str(log)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs in total, over all targets")
    ap.add_argument("--target", action="append", choices=sorted(SHARES), help="only this target (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / ".fuzz", help="corpora, logs and findings (default .fuzz/)")
    ap.add_argument("--replay", type=Path, help="run this one input through --target and show what it raises")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.runs, a.corpus, a.out)
        return 0
    names = a.target or list(SHARES)
    if a.replay:
        if len(names) != 1:
            ap.error("--replay needs exactly one --target")
        replay(names[0], a.replay)
        return 0
    share = sum(SHARES[n] for n in names)
    results = []
    print(f"{'target':<12} {'inputs':>9} {'inputs/s':>9} {'seconds':>8} {'cov':>6} {'corpus':>7} {'untyped':>8}")
    for n in names:
        r = fuzz(n, max(1, round(a.inputs * SHARES[n] / share)), a.out.resolve())
        results.append(r)
        print(f"{n:<12} {r['inputs']:>9} {r['inputs_per_s']:>9} {r['seconds']:>8} {r['coverage'] or '-':>6} "
              f"{r['corpus']:>7} {r['untyped_exceptions']:>8}", flush=True)
        for c in r["findings"] or ([r["log"]] if r["untyped_exceptions"] else []):
            print(f"  finding: {c}", flush=True)
    total = sum(r["inputs"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    bad = sum(r["untyped_exceptions"] for r in results)
    print(f"{'total':<12} {total:>9} {round(total / max(seconds, 1e-9)):>9} {round(seconds, 1):>8} "
          f"{'':>6} {'':>7} {bad:>8}")
    print(f"{total} inputs over {len(results)} targets in {seconds:.0f} s; untyped exceptions: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
