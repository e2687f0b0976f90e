"""What committing FL rounds to the L2 costs: a real l2d daemon, the ServerApp's L2Recorder, real parameter bytes.

    python bench/bench_fl_l2.py [--rounds 30] [--participants 4] [--block-ms 50]

Per round the recorder uploads the model (canonical bytes of the digits MLP), posts the commitment, and waits
until it is in a block. Reported: median and max seconds per round commitment, the finish, the FL_ROUND
transaction size, and as the same-run baseline the daemon's plain transfer latency (submit -> committed) on the
same block interval. Flower's own per-round floor on this machine is ~9 s (bench_fl.py), for scale.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
from coincurve import PrivateKey  # noqa: E402

from federated import model  # noqa: E402
from federated.l2 import L2Recorder, post_job, register_participant  # noqa: E402
from federated.recorder import Participant, RoundCommitment  # noqa: E402
from l2d.client import Client  # noqa: E402
from l2d.core import tx as T  # noqa: E402
from l2d.core.coin_tx import Transfer  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402

TOKEN = "bench-fl-l2-token-0123456789abcdef"


def _secret(label: str) -> bytes:
    return hashlib.sha256(b"l2d bench fl " + label.encode()).digest()


def _pk(label: str) -> str:
    return PrivateKey(_secret(label)).public_key_xonly.format().hex()


def _wait(cond: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import toml

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--participants", type=int, default=4)
    ap.add_argument("--block-ms", type=int, default=50)
    a = ap.parse_args(argv)
    n = a.participants
    tmp = Path(tempfile.mkdtemp(prefix="l2d-bench-fl-"))
    alloc = {_pk("poster"): 10**9, **{_pk(f"p{i}"): 10**6 for i in range(n)}}
    cfg = {"node": {"network": "local", "data_dir": "data", "log_level": "INFO"},
           "chain": {"min_fee_sat": 1, "genesis_alloc": alloc}, "block": {"interval_ms": a.block_ms, "max_txs": 500},
           "api": {"port": 0, "admin_token": TOKEN}, "snapshots": {"every_blocks": 0},
           "anchoring": {"enabled": False}}
    (tmp / "l2d.toml").write_text(toml.dumps(cfg))
    log = open(tmp / "l2d.log", "w")
    d = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(tmp / "l2d.toml")], stderr=log,
                         stdout=subprocess.DEVNULL, cwd=HERE.parent, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    try:
        def port() -> int | None:
            for line in (tmp / "l2d.log").read_text().splitlines():
                if '"api listening"' in line:
                    return int(json.loads(line)["port"])
            return None

        api = Client(f"http://127.0.0.1:{_wait(port, 60, 'daemon')}", TOKEN)
        # baseline: a plain transfer, submit -> committed
        transfer = []
        for i in range(10):
            acc = api.account(_pk("poster"))
            raw = T.sign(LOCAL, _secret("poster"), acc["nonce"], 1, Transfer(bytes.fromhex(_pk("p0")), 1),
                         os.urandom(32)).raw
            t = time.perf_counter()
            txid = api.submit_tx(raw)["txid"]
            _wait(lambda: api.get(f"/api/l2/tx/{txid}").get("status") == "committed", 30, "transfer")
            transfer.append(time.perf_counter() - t)
        jid = post_job(api, _secret("poster"), 10**6, {"strategy": "fedavg"}, a.rounds, 1, n)
        _wait(lambda: api.fl_job_or_none(jid), 30, "job")
        for i in range(n):
            nk = "ecdsa-sha2-nistp384 " + base64.b64encode(hashlib.sha512(b"%d" % i).digest()).decode()
            register_participant(api, _secret(f"p{i}"), jid, nk)
        _wait(lambda: len(api.fl_job(jid)["participants"]) == n, 30, "registrations")
        ckpt = tmp / "checkpoints"
        ckpt.mkdir()
        node_map = {i + 1: _pk(f"p{i}") for i in range(n)}
        rec = L2Recorder(api, jid, node_map, ckpt)
        net = model.new_model(0)
        arrays = model.get_ndarrays(net)
        prev = model.params_hash(arrays)
        per_round = []
        raw_len = 0
        for r in range(1, a.rounds + 1):
            arrays = type(arrays)((k, (v + np.float32(0.001 * r)).astype(np.float32)) for k, v in arrays.items())
            raw = model.canonical_bytes(arrays)
            raw_len = len(raw)
            h = model.params_hash(arrays)
            (ckpt / f"{h}.params").write_bytes(raw)
            parts = tuple(Participant(i + 1, 100 + i, i != n - 1) for i in range(n))
            c = RoundCommitment(jid, r, h, prev, "fedavg", parts, {"accuracy": 0.9, "loss": 0.3, "update_bytes": 9640.0})
            t = time.perf_counter()
            rec.record(c)
            per_round.append(time.perf_counter() - t)
            prev = h
        t = time.perf_counter()
        job = rec.finish(jid)
        finish_s = time.perf_counter() - t
        detail = api.fl_job(jid)["rounds_detail"][-1]
        from l2d.core.fl_tx import FlRound, RoundParticipant
        payload = FlRound(bytes.fromhex(jid), 1, bytes(32), bytes(32), 0, 0, 0, 0,
                          tuple(sorted((RoundParticipant(bytes.fromhex(_pk(f"p{i}")), 1, True) for i in range(n)),
                                       key=lambda p: p.key)))
        out = {
            "block_ms": a.block_ms, "rounds": a.rounds, "participants": n, "model_bytes": raw_len,
            "round_commit_s_median": round(statistics.median(per_round), 4),
            "round_commit_s_max": round(max(per_round), 4),
            "finish_s": round(finish_s, 4),
            "baseline_transfer_commit_s_median": round(statistics.median(transfer), 4),
            "ratio_round_commit_vs_transfer": round(statistics.median(per_round) / statistics.median(transfer), 2),
            "fl_round_payload_bytes": len(payload.encode()),
            "fl_round_tx_bytes": len(payload.encode()) + 3 + 32 + 8 + 8 + 3 + 64,
            "job_status": job["status"], "last_round_matches": detail["params_hash"] == prev,
        }
    finally:
        d.terminate()
        d.wait(timeout=60)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
