"""Daemon memory: RSS of a real `l2d` process holding N accounts (genesis allocations), and its start-up time.

    python bench/bench_daemon_memory.py [--accounts N]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from common import current_rss_mb  # noqa: E402

from l2d.core.tx import is_valid_key  # noqa: E402


def _config(tmp: Path, accounts: int) -> Path:
    rnd = random.Random(11)
    lines = []
    while len(lines) < accounts:
        k = rnd.randbytes(32)
        if is_valid_key(k):
            lines.append(f"{k.hex()} = 1000\n")
    cfg = tmp / "node.toml"
    cfg.write_text('[node]\nnetwork = "local"\ndata_dir = "data"\nlog_level = "WARNING"\n[api]\nport = 0\n'
                   '[snapshots]\nevery_blocks = 0\n[chain.genesis_alloc]\n' + "".join(lines))
    return cfg


def _start(cfg: Path) -> tuple[subprocess.Popen[str], float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(cfg)], cwd=REPO, env=env,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # log_level WARNING hides "api listening": find the listening port in /proc, then poll /health.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"l2d exited: {p.stderr.read() if p.stderr else ''}")
        port = _listening_port(p.pid)
        if port:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                return p, time.perf_counter() - t
            except OSError:
                pass
        time.sleep(0.2)
    raise SystemExit("l2d did not come up")


def _listening_port(pid: int) -> int | None:
    """The TCP port a process listens on, read from /proc (no extra tools needed)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # state LISTEN
                return int(parts[1].split(":")[1], 16)
    return None


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--accounts", type=int, default=1_000_000)
    a = ap.parse_args(argv)
    res: dict[str, float] = {"accounts": a.accounts}
    with tempfile.TemporaryDirectory() as d:
        cfg = _config(Path(d), a.accounts)
        for phase in ("first_start", "restart"):
            p, secs = _start(cfg)
            res[f"{phase}_seconds"] = round(secs, 2)
            res[f"{phase}_rss_mb"] = round(current_rss_mb(p.pid), 1)
            p.terminate()
            p.wait(timeout=120)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
