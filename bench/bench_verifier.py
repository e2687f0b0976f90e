"""Verifier benchmark: stream-verify a synthetic snapshot (seconds, peak RSS) against a same-run SHA-256 baseline.

    python bench/bench_verifier.py [--records N]

Writes a snapshot of N records (keys b"\\x01" + 32 random bytes, sorted; 16-byte values) to a temporary
directory (in one subprocess), then verifies it in another so that peak RSS is the verifier's alone: VmHWM of
that process, and getrusage's ru_maxrss (which Linux carries over from the parent across fork/exec, hence the
separate generator process). The verifying subprocess then times 2N bare hashlib.sha256(64 bytes).digest()
calls (about the hashing a root of N leaves needs).
Prints verifier_1M_seconds=..., sha256_2M_seconds=..., ratio=..., peak_rss_mb=... (the names keep "1M"/"2M"
whatever N is; "records" says N).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import peak_rss_mb, sha256_baseline  # noqa: E402

from l2d.core import snapshot as S  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.tree import RootBuilder  # noqa: E402


def make_snapshot(path: Path, n: int, seed: int = 1) -> bytes:
    """Write a deterministic synthetic snapshot of n records to path; return its state root."""
    rnd = random.Random(seed)
    keys = sorted(b"\x01" + rnd.randbytes(32) for _ in range(n))
    vrnd = random.Random(seed + 1)

    def items() -> Iterator[tuple[bytes, bytes]]:
        vr = random.Random(seed + 1)
        for k in keys:
            yield k, vr.randbytes(16)

    b = RootBuilder()
    for k in keys:
        b.add(k, vrnd.randbytes(16))
    root = b.root()
    with open(path, "wb") as f:
        S.write_snapshot(f, LOCAL, n, b"\x42" * 32, root, items(), n)
    return root


def vm_hwm_mb() -> float:
    """Peak resident set of this process image (reset by exec, unlike ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return peak_rss_mb()


def child(path: str, sha_calls: int) -> dict[str, Any]:
    """Runs in a fresh subprocess: verify, note peak RSS, then the SHA-256 baseline."""
    rss_before = vm_hwm_mb()
    t = time.perf_counter()
    with open(path, "rb") as f:
        header = S.verify_snapshot(f, LOCAL)
    seconds = time.perf_counter() - t
    hwm, maxrss = vm_hwm_mb(), peak_rss_mb()
    sha = sha256_baseline(sha_calls)
    return {"records": header.record_count, "verify_seconds": seconds, "sha256_seconds": sha,
            "peak_rss_mb": hwm, "ru_maxrss_mb": maxrss, "rss_before_verify_mb": rss_before}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--child", metavar="FILE", help=argparse.SUPPRESS)
    ap.add_argument("--sha-calls", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--make", metavar="FILE", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.sha_calls)))
        return {}
    if a.make:
        make_snapshot(Path(a.make), a.records)
        return {}
    me = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory(prefix="l2d-bench-verifier-") as d:
        path = Path(d) / "bench.l2snap"
        t = time.perf_counter()
        subprocess.run([sys.executable, me, "--make", str(path), "--records", str(a.records)], check=True)
        write_seconds = time.perf_counter() - t
        size = path.stat().st_size
        out = subprocess.run([sys.executable, me, "--child", str(path),
                              "--sha-calls", str(2 * a.records)], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout)
    res = {
        "records": r["records"],
        "verifier_1M_seconds": round(r["verify_seconds"], 3),
        "sha256_2M_seconds": round(r["sha256_seconds"], 3),
        "ratio": round(r["verify_seconds"] / r["sha256_seconds"], 2),
        "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "ru_maxrss_mb": round(r["ru_maxrss_mb"], 1),
        "rss_before_verify_mb": round(r["rss_before_verify_mb"], 1),
        "records_per_s": round(r["records"] / r["verify_seconds"]),
        "snapshot_mb": round(size / 1e6, 1),
        "generate_and_write_seconds": round(write_seconds, 2),
    }
    print(", ".join(f"{k}={v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
