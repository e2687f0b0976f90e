"""Orchestration benchmark: end-to-end overhead of a task, submit -> SETTLED, minus bare model inference.

    python bench/bench_orchestration.py [--tasks N] [--block-ms MS] [--window W] [--audit-rate R]

Starts a real l2d daemon (orchestration on, lowest-cost strategy) and two real `l2-worker` processes on
loopback, then submits N tasks (8 digit images each) one after another as a client would (signed TaskSubmit
over REST) and times each from the POST until the REST API reports it SETTLED. The baseline, measured in the
same run and process layout, is the bare inference the worker does for the same input (torch, one thread):
model forward pass plus fingerprint. Prints one JSON object; main(argv) returns it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from coincurve import PrivateKey  # noqa: E402

from l2d.core import tx as T  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.work_tx import TaskSubmit  # noqa: E402


def _key(label: str) -> tuple[bytes, bytes]:
    import hashlib

    s = hashlib.sha256(b"l2d bench orchestration " + label.encode()).digest()
    return s, PrivateKey(s).public_key_xonly.format()


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.005)
    raise SystemExit(f"bench_orchestration: timed out waiting for {what}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print and return the JSON result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--block-ms", type=int, default=50, help="block.interval_ms of the daemon")
    ap.add_argument("--window", type=int, default=0, help="challenge window in L2 blocks")
    ap.add_argument("--audit-rate", default="0", help="share of tasks also run by a verifier")
    args = ap.parse_args(argv)
    import toml
    import torch

    from orchestration import model as M

    torch.set_num_threads(1)  # as the agent does
    tmp = Path(tempfile.mkdtemp(prefix="l2d-bench-orch-"))
    cache = tmp / "digits-mlp.pt"
    model = M.load_or_train(cache)
    inputs = [M.sample_images(i, 8) for i in range(args.tasks)]
    bare = []
    for data in inputs:
        t0 = time.perf_counter()
        M.fingerprint(M.logits(model, data))
        bare.append(time.perf_counter() - t0)

    client_secret, client = _key("client")
    fed_secret, fed = _key("federation")
    names = ["w1", "w2"]
    alloc = {client.hex(): 10**10}
    for n in names:
        s, pk = _key(n)
        (tmp / f"{n}.key").write_text(s.hex())
        alloc[pk.hex()] = 10**8
    cfg = {"node": {"network": "local", "data_dir": "data", "log_level": "INFO"},
           "chain": {"min_fee_sat": 1, "genesis_alloc": alloc},
           "block": {"interval_ms": args.block_ms, "max_txs": 1000},
           "api": {"port": 0, "admin_token": ""}, "snapshots": {"every_blocks": 0},
           "anchoring": {"enabled": False},
           "orchestration": {"enabled": True, "strategy": "lowest_cost", "audit_rate": args.audit_rate,
                             "challenge_window_blocks": args.window, "poll_interval_ms": 10,
                             "probe_interval_ms": 1000}}
    (tmp / "l2d.toml").write_text(toml.dumps(cfg))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs: list[subprocess.Popen[bytes]] = []
    log = open(tmp / "l2d.log", "w")
    try:
        d = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(tmp / "l2d.toml")],
                             stderr=log, stdout=subprocess.DEVNULL, cwd=REPO, env=env)
        procs.append(d)

        def port() -> Optional[int]:
            for line in (tmp / "l2d.log").read_text().splitlines():
                rec = json.loads(line)
                if rec.get("msg") == "api listening":
                    return int(rec["port"])
            return None
        base = f"http://127.0.0.1:{_wait(port, 60, 'the daemon')}"
        for i, n in enumerate(names):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "orchestration.agent", "--node", base, "--key-file", str(tmp / f"{n}.key"),
                 "--price", str(10 + i), "--heartbeat-ms", "1000", "--poll-ms", "10", "--model-cache", str(cache),
                 "--log-level", "WARNING"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=REPO, env=env))
        _wait(lambda: sum(1 for w in _get(base + "/api/orchestration/workers")["workers"]
                          if w["live"]["schedulable"] and w["live"]["latency_ema_us"]) == len(names), 120, "workers")
        e2e = []
        nonce = 0
        for data in inputs:
            raw = T.sign(LOCAL, client_secret, nonce, 1, TaskSubmit(1000, 0, 0, b"digits-mlp", b"", data),
                         os.urandom(32)).raw
            nonce += 1
            t0 = time.perf_counter()
            tid = _post(base + "/api/orchestration/submit", {"tx": raw.hex()})["task_id"]

            def done() -> bool:
                try:
                    return bool(_get(f"{base}/api/orchestration/tasks/{tid}")["status"] == "SETTLED")
                except urllib.error.HTTPError as e:
                    e.close()
                    return False
            _wait(done, 120, f"task {tid}")
            e2e.append(time.perf_counter() - t0)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=30)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    med_e2e, med_bare = statistics.median(e2e), statistics.median(bare)
    out = {
        "tasks": args.tasks, "images_per_task": 8, "block_interval_ms": args.block_ms,
        "challenge_window_blocks": args.window, "audit_rate": args.audit_rate, "workers": len(names),
        "median_submit_to_settled_ms": round(med_e2e * 1000, 2),
        "median_bare_inference_ms": round(med_bare * 1000, 4),
        "median_overhead_ms": round((med_e2e - med_bare) * 1000, 2),
        "overhead_in_block_intervals": round((med_e2e - med_bare) * 1000 / args.block_ms, 2),
        "p90_submit_to_settled_ms": round(sorted(e2e)[int(0.9 * (len(e2e) - 1))] * 1000, 2),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
