"""SPV benchmarks: header-chain validation rate, `l2-verify audit` on a 10,000-header bundle, merkle-proof checks.

    python bench/bench_spv.py [--headers N] [--audit-headers M] [--quick]

(a) a synthetic chain of N headers (default 900,000) built with mainnet retarget rules (2016-block periods, ×4
    clamp, alternating fast and slow periods, jittered non-monotonic timestamps) and a low powLimit (regtest's
    0x207fffff, about two nonces a header); built once into a temp file, validated in a fresh subprocess that
    streams the file in 640 kB chunks (bounded memory), which reports seconds, headers/s, peak RSS and the ratio to
    bare double-SHA-256 of the same 80-byte headers measured in that same process;
(b) `l2-verify audit` on a bundle whose header chain is M headers (default 10,000; real regtest genesis, anchor
    block 6 from the tip): in-process seconds (verify_tool.audit.run_audit) and a subprocess CLI wall time,
    headers/s and the ratio to the same-run double-SHA-256 baseline;
(c) partial-merkle-tree proof verification (bridge.spv.verify_tx_in_block) in µs per proof, on real testnet3
    blocks from ../shared/vectors (skipped if absent) and on a synthetic 2,000-transaction block.
Prints one JSON object; main(argv) returns it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from l2d.core.spv import (BITCOIN_REGTEST, HEADER_SIZE, ChainParams, HeaderChain, bits_to_target,
                          build_partial_merkle_tree, calculate_next_bits, compute_merkle_root, make_header,
                          parse_header, parse_merkleblock, parse_tx, serialize_merkleblock, verify_tx_in_block)

VECTORS = REPO.parent / "shared" / "vectors"
LOW_LIMIT = BITCOIN_REGTEST.pow_limit
CHUNK_HEADERS = 8192
_PACK = struct.Struct("<i32s32sIII")
_sha = hashlib.sha256
REGTEST_GENESIS = make_header(1, b"\0" * 32,
                              bytes.fromhex("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")[::-1],
                              1296688602, 0x207FFFFF, 2)


def _grind(prev: bytes, root: bytes, t: int, bits: int, target: int) -> tuple[bytes, bytes]:
    base = _PACK.pack(0x20000000, prev, root, t, bits, 0)[:76]
    nonce = 0
    while True:
        raw = base + nonce.to_bytes(4, "little")
        h = _sha(_sha(raw).digest()).digest()
        if int.from_bytes(h, "little") <= target:
            return raw, h
        nonce += 1


def bench_params(genesis_hash: bytes) -> ChainParams:
    """Mainnet retarget rules with regtest's powLimit."""
    return ChainParams("mainnet-rules-low-limit", LOW_LIMIT, genesis_hash)


def build_chain_file(path: Path, n: int) -> tuple[bytes, int]:
    """Write genesis + n-1 headers; returns (genesis hash, last time)."""
    bits = BITCOIN_REGTEST.pow_limit_bits
    target = bits_to_target(bits)
    params = bench_params(b"")
    interval = params.interval
    t0 = 1_600_000_000
    raw, h = _grind(b"\0" * 32, _sha(b"genesis").digest(), t0, bits, target)
    genesis_hash = h
    base_t, prev_t, period_start = t0, t0, t0
    rnd = random.Random(2016)
    out = [raw]
    with path.open("wb") as f:
        for height in range(1, n):
            if height % interval == 0:
                bits = calculate_next_bits(params, bits, prev_t - period_start)
                target = bits_to_target(bits)
            base_t += 540 if (height // interval) % 2 == 0 else 680  # fast then slow periods: retargets both ways
            t = base_t + rnd.randrange(-900, 901)  # jitter: many times are not monotonic (as on mainnet)
            if height % interval == 0:
                period_start = t
            raw, h = _grind(h, height.to_bytes(32, "little"), t, bits, target)
            out.append(raw)
            prev_t = t
            if len(out) >= CHUNK_HEADERS:
                f.write(b"".join(out))
                out.clear()
        f.write(b"".join(out))
    return genesis_hash, prev_t


def _dsha_rate(headers: list[bytes]) -> float:
    sha = _sha
    t = time.perf_counter()
    for h in headers:
        sha(sha(h).digest()).digest()
    return len(headers) / (time.perf_counter() - t)


def validate_file(path: Path, now: Optional[int]) -> dict[str, Any]:
    """Runs in the subprocess: stream-validate the file, then the baseline on the same headers."""
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with path.open("rb") as f:
        genesis = parse_header(f.read(HEADER_SIZE))
        chain = HeaderChain(bench_params(genesis.hash), genesis, 0, now=now)
        t = time.perf_counter()
        while True:
            chunk = f.read(HEADER_SIZE * CHUNK_HEADERS)
            if not chunk:
                break
            chain.extend_raw(chunk)
        seconds = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = chain.count
    with path.open("rb") as f:
        sample = f.read(HEADER_SIZE * min(n, 300_000))
    headers = [sample[i:i + HEADER_SIZE] for i in range(0, len(sample), HEADER_SIZE)]
    base_rate = max(_dsha_rate(headers) for _ in range(3))
    rate = n / seconds
    retargets = n // 2016
    return {"headers": n, "seconds": round(seconds, 3), "headers_per_s": round(rate),
            "dsha256_80B_per_s": round(base_rate), "ratio_to_dsha256": round(rate / base_rate, 3),
            "peak_rss_mb": round(rss, 1), "rss_before_validation_mb": round(rss0, 1), "retarget_periods": retargets,
            "tip_bits": hex(chain.tip_bits), "chain_work": hex(chain.work)}


# -- (b) audit bundle ----------------------------------------------------------------------------------------------
def build_audit_bundle(path: Path, n_headers: int) -> dict[str, Any]:
    from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript

    from l2d.core.anchor_format import AnchorRecord, op_return_script
    from l2d.core.audit import AnchorKind, AuditBundle, ProofEvidence
    from l2d.core.params import REGTEST
    from l2d.core.tree import StateTree

    items = {b"\x01" + _sha(b"acct%d" % i).digest(): b"balance %d" % i for i in range(1000)}
    tree = StateTree()
    for k, v in items.items():
        tree.set(k, v)
    keys = sorted(items)[:3]
    evidence = ProofEvidence(tree.root(), tuple(tree.prove(k, items.__getitem__) for k in keys))
    record = AnchorRecord(REGTEST.id, 777, tree.root())

    def tx(i: int, script: bytes) -> bytes:
        return CMutableTransaction([CMutableTxIn(COutPoint(_sha(b"p%d" % i).digest(), 0))],
                                   [CMutableTxOut(1000 + i, CScript(script))]).serialize()

    coinbase = CMutableTransaction([CMutableTxIn(COutPoint(), CScript(b"\x01\x05"))],
                                   [CMutableTxOut(50 * 10**8, CScript(b"\x51"))]).serialize()
    txs = [coinbase] + [tx(i, b"\x00\x14" + bytes([i]) * 20) for i in range(1, 200)]
    anchor_index = 137
    txs[anchor_index] = tx(9999, op_return_script(record))
    txids = [parse_tx(t).txid for t in txs]
    root, _ = compute_merkle_root(txids)
    anchor_height = n_headers - 6
    target = bits_to_target(0x207FFFFF)
    parts = [REGTEST_GENESIS.serialize()]
    h, t = REGTEST_GENESIS.hash, REGTEST_GENESIS.time
    block_raw = b""
    for height in range(1, n_headers):
        t += 600
        merkle = root if height == anchor_height else _sha(b"b%d" % height).digest()
        raw, h = _grind(h, merkle, t, 0x207FFFFF, target)
        parts.append(raw)
        if height == anchor_height:
            block_raw = raw
    pmt = build_partial_merkle_tree(txids, [i == anchor_index for i in range(len(txids))])
    bundle = AuditBundle(REGTEST.id, record, AnchorKind.OP_RETURN, b"", txs[anchor_index],
                         serialize_merkleblock(parse_header(block_raw), pmt), 0, b"".join(parts), evidence)
    data = bundle.encode()
    path.write_bytes(data)
    return {"bytes": len(data), "anchor_height": anchor_height, "block_txs": len(txs)}


def bench_audit(tmp: Path, n_headers: int, base_rate: float) -> dict[str, Any]:
    from verify_tool.audit import run_audit

    path = tmp / "bench.l2audit"
    info = build_audit_bundle(path, n_headers)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        code, result, _ = run_audit(str(path), None, 6, "regtest")
        best = min(best, time.perf_counter() - t)
        if code != 0:
            raise RuntimeError(f"audit failed: {result}")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(path), "--min-conf", "6"], cwd=REPO,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import verify_tool.cli, verify_tool.audit"], cwd=REPO, check=True)
    startup = time.perf_counter() - t
    rate = n_headers / best
    return {"headers": n_headers, **info, "seconds_in_process": round(best, 4), "headers_per_s": round(rate),
            "ratio_to_dsha256": round(rate / base_rate, 3), "cli_subprocess_wall_s": round(wall, 3),
            "python_startup_and_imports_s": round(startup, 3), "confirmations": result["confirmations"]}


# -- (c) merkle proofs ---------------------------------------------------------------------------------------------
def _time_proofs(cases: list[tuple[bytes, bytes]], reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        for raw_tx, mb in cases:
            verify_tx_in_block(raw_tx, mb)
    return (time.perf_counter() - t) / (reps * len(cases)) * 1e6


def bench_merkle() -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = VECTORS / "testnet3_blocks_bip158.json"
    if path.exists():
        from bitcoin.core import CBlock

        with path.open() as f:
            rows = json.load(f)[1:]
        for height in (180480, 926485):
            raw = bytes.fromhex(next(r[2] for r in rows if r[0] == height))
            block = CBlock.deserialize(raw)
            ids = [tx.GetTxid() for tx in block.vtx]
            header = parse_header(raw[:80])
            cases = [(tx.serialize(), serialize_merkleblock(
                header, build_partial_merkle_tree(ids, [k == i for k in range(len(ids))])))
                for i, tx in enumerate(block.vtx)]
            out[f"testnet3_{height}_us_per_proof"] = round(_time_proofs(cases, 400), 1)
            out[f"testnet3_{height}_txs"] = len(ids)
    else:
        out["real_blocks"] = f"skipped: {path} not found"
    from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript

    txs = [CMutableTransaction([CMutableTxIn(COutPoint(_sha(b"x%d" % i).digest(), 0))],
                               [CMutableTxOut(i, CScript(b"\x51"))]).serialize() for i in range(2000)]
    ids = [parse_tx(t).txid for t in txs]
    root, _ = compute_merkle_root(ids)
    header = make_header(4, b"\0" * 32, root, 0, 0x207FFFFF, 0)
    cases = [(txs[i], serialize_merkleblock(header, build_partial_merkle_tree(ids, [k == i for k in range(2000)])))
             for i in range(0, 2000, 97)]
    out["synthetic_2000tx_us_per_proof"] = round(_time_proofs(cases, 200), 1)
    pmts = [parse_merkleblock(mb)[1] for _, mb in cases]
    t = time.perf_counter()
    for _ in range(200):
        for pmt in pmts:
            pmt.extract_matches()
    out["synthetic_2000tx_extract_matches_only_us"] = round((time.perf_counter() - t) / (200 * len(pmts)) * 1e6, 1)
    out["synthetic_2000tx_proof_bytes"] = len(cases[0][1])
    return out


# -- driver --------------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headers", type=int, default=900_000, help="synthetic chain length for (a)")
    ap.add_argument("--audit-headers", type=int, default=10_000, help="header chain length of the (b) bundle")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--validate", metavar="FILE", help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--now", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.validate:
        res = validate_file(Path(a.validate), a.now)
        print(json.dumps(res))
        return res
    n = 50_000 if a.quick else a.headers
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="l2d-bench-spv-") as d:
        tmp = Path(d)
        chain_file = tmp / "headers.bin"
        t = time.perf_counter()
        _, last_time = build_chain_file(chain_file, n)
        build_s = time.perf_counter() - t
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--validate", str(chain_file),
                            "--now", str(last_time)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        results["header_validation"] = {**json.loads(r.stdout), "build_seconds": round(build_s, 1),
                                        "file_mb": round(os.path.getsize(chain_file) / 2**20, 1), "goal_ratio": 0.3}
        with chain_file.open("rb") as f:
            sample = f.read(HEADER_SIZE * min(n, 300_000))
        headers = [sample[i:i + HEADER_SIZE] for i in range(0, len(sample), HEADER_SIZE)]
        base_rate = max(_dsha_rate(headers) for _ in range(3))
        results["audit"] = bench_audit(tmp, 2_000 if a.quick else a.audit_headers, base_rate)
        results["audit"]["dsha256_80B_per_s"] = round(base_rate)
    results["merkle_proof"] = bench_merkle()
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
