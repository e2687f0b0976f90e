"""REST under load: 200 connections on /api/status and /api/l2/accounts/{id} of a real daemon vs a bare aiohttp
handler answering the same JSON, in one run.

    python bench/bench_api_load.py [--connections N] [--seconds S] [--quick]
    python bench/bench_api_load.py --bare          (the baseline server: prints `listening on HOST:PORT`)
    python bench/bench_api_load.py --load URL ...  (the load generator: prints one JSON line)

Three processes on loopback: the server under test (the l2d daemon, then the bare server), and a bounded Python
load generator (aiohttp's client, N connections each sending its next request when the last is answered, for S
seconds). The bare server is aiohttp with no middleware answering the daemon's own /api/status body (fixed) and
an account body of the same size: what any aiohttp service costs on this machine. Prints requests/s of each (each
side's best of three alternated runs), the ratios (the issue's goals: status >= 0.8, accounts >= 0.6 of the bare
handler), errors (goal 0) and the daemon's RSS before and after the load (goal: flat).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from common import Proc, current_rss_mb, keypairs, start_l2d  # noqa: E402


async def _load(url: str, connections: int, seconds: float) -> dict[str, Any]:
    import aiohttp
    ok = errors = 0
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one() -> None:
            nonlocal ok, errors
            while (t := time.perf_counter()) < stop:
                try:
                    async with s.get(url) as r:
                        await r.read()
                        if r.status == 200:
                            ok += 1
                        else:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                lat.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(connections)))
        took = time.perf_counter() - t0
    lat.sort()
    return {"rps": round(ok / took, 1), "ok": ok, "errors": errors,
            "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
            "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None}


def _bare(status_body: bytes, account_body: bytes) -> None:
    from aiohttp import web

    async def status(_: web.Request) -> web.Response:
        return web.Response(body=status_body, content_type="application/json")

    async def account(_: web.Request) -> web.Response:
        return web.Response(body=account_body, content_type="application/json")

    async def main() -> None:
        from l2d.aio import serve_app
        app = web.Application()
        app.router.add_get("/api/status", status)
        app.router.add_get("/api/l2/accounts/{id}", account)
        _, served = await serve_app(app, "127.0.0.1:0")
        print(f"listening on {served}", flush=True)
        await asyncio.Event().wait()
    asyncio.run(main())


def _run_load(url: str, connections: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, str(Path(__file__)), "--load", url, "--connections", str(connections),
                          "--seconds", str(seconds)], check=True, capture_output=True, text=True, cwd=REPO)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _get(url: str) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        return bytes(r.read())


def run(connections: int, seconds: float, rounds: int, work: Path) -> dict[str, Any]:
    (sk, pk), = keypairs(1)
    node, api = start_l2d(work, {pk: 10**9}, REPO)
    procs = [node]
    try:
        status_path, account_path = "/api/status", f"/api/l2/accounts/{pk.hex()}"
        status_body, account_body = _get(api + status_path), _get(api + account_path)
        bare = Proc([str(Path(__file__)), "--bare", status_body.hex(), account_body.hex()], work / "bare.log", REPO)
        procs.append(bare)
        bare_api = "http://" + bare.line(r"listening on (\S+)")[1]
        _run_load(api + status_path, connections, 1)  # warm both up
        _run_load(bare_api + status_path, connections, 1)
        rss_before = current_rss_mb(node.p.pid)
        out: dict[str, Any] = {"connections": connections, "seconds": seconds,
                               "status_body_bytes": len(status_body), "account_body_bytes": len(account_body)}
        for name, path in (("status", status_path), ("accounts", account_path)):
            runs: dict[str, list[dict[str, Any]]] = {"daemon": [], "bare": []}
            for _ in range(rounds):  # alternated, the best of each: other load on the machine hits both alike
                runs["daemon"].append(_run_load(api + path, connections, seconds))
                runs["bare"].append(_run_load(bare_api + path, connections, seconds))
            best = {k: max(v, key=lambda r: float(r["rps"])) for k, v in runs.items()}
            out[name] = {**best, "ratio": round(best["daemon"]["rps"] / best["bare"]["rps"], 3),
                         "errors": sum(r["errors"] for v in runs.values() for r in v)}
        out["daemon_rss_mb"] = {"before": round(rss_before, 1), "after": round(current_rss_mb(node.p.pid), 1)}
        out["goals"] = {"status_ratio": 0.8, "accounts_ratio": 0.6, "errors": 0}
        return out
    finally:
        for p in reversed(procs):
            p.stop()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="3 s per measurement")
    ap.add_argument("--bare", nargs=2, metavar=("STATUS_HEX", "ACCOUNT_HEX"), help=argparse.SUPPRESS)
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.bare:
        _bare(bytes.fromhex(a.bare[0]), bytes.fromhex(a.bare[1]))
        return {}
    if a.load:
        res = asyncio.run(_load(a.load, a.connections, a.seconds))
        print(json.dumps(res))
        return res
    with tempfile.TemporaryDirectory(prefix="l2d-bench-api-") as d:
        out = run(a.connections, 3.0 if a.quick else a.seconds, 1 if a.quick else 3, Path(d))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
