"""NetFlow throughput: a download through relays vs the same download straight over loopback, in one run.

    python bench/bench_netflow.py [--mib N] [--quick]

Real processes on loopback: an l2d daemon (local network, 50 ms blocks), three `l2-relay`s registered on it (the last
an exit), an aiohttp server holding N MiB (default 64) of random bytes, and `l2-netflow` in `direct` mode (one relay)
and in `onion` mode (3 hops), each paying its relays with session receipts. `curl` downloads the file three ways:
straight from the server (the baseline), through the direct path and through the onion path (`--socks5-hostname`),
each twice (the best counts); every download is checked byte-identical. Prints MiB/s of each and the ratios to the
baseline (the issue's goals: direct >= 0.8, onion >= 0.3). The same download through two bare Python stream
forwarders (bench/forwarder.py: the direct path's process count, nothing else) is the ceiling any Python relay
design reaches on this machine; each path's share of it is printed too.
Needs curl; returns {"skipped": reason} without it.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from aiohttp import web
from coincurve import PrivateKey

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from common import Proc, start_l2d  # noqa: E402

from l2d.aio import serve_app  # noqa: E402

MIB = 1 << 20
PRICE = 1_000_000  # msat per MiB


def _secret(tag: str) -> bytes:
    return hashlib.sha256(b"l2d bench netflow " + tag.encode()).digest()


def _pk(s: bytes) -> str:
    return PrivateKey(s).public_key_xonly.format().hex()


def _curl(url: str, out: Path, socks: Optional[str] = None) -> float:
    args = ["curl", "-sS", "--fail", "--max-time", "600", url, "-o", str(out)]
    if socks:
        args[1:1] = ["--socks5-hostname", socks]
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t


async def run(mib: int, work: Path) -> dict[str, Any]:
    body = os.urandom(mib * MIB)
    app = web.Application()

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")
    app.router.add_get("/file", file)
    runner, served = await serve_app(app, "127.0.0.1:0")
    url = f"http://{served}/file"
    client, relays = _secret("client"), [_secret(f"relay {i}") for i in range(3)]
    procs: list[Proc] = []
    try:
        node, api = start_l2d(work, {PrivateKey(s).public_key_xonly.format(): 10**9 for s in (client, *relays)}, REPO)
        procs.append(node)
        for i, s in enumerate(relays):
            (work / f"relay{i}.key").write_text(s.hex())
            r = Proc(["-m", "netflow.relay", "--api", api, "--key", str(work / f"relay{i}.key"), "--x25519-key",
                       str(work / f"relay{i}.x25519"), "--listen", "127.0.0.1:0", "--register", "--price", str(PRICE),
                       "--settle-every", "3600", "--log-level", "WARNING"] + (["--exit"] if i == 2 else []),
                      work / f"relay{i}.log", REPO)
            procs.append(r)
            await asyncio.to_thread(r.line, r"listening on")
        (work / "client.key").write_text(client.hex())
        out = work / "out.bin"
        results: dict[str, Any] = {"mib": mib}
        base = min([await asyncio.to_thread(_curl, url, out) for _ in range(2)])
        assert out.read_bytes() == body
        results["loopback_mib_s"] = round(mib / base, 1)
        # The ceiling of any Python relay design here: the same download through two bare stream forwarders (the
        # direct path's two processes, client and relay, with no framing, cipher or payment).
        target = served
        for i in range(2):
            f = Proc([str(HERE / "forwarder.py"), target], work / f"forwarder{i}.log", REPO)
            procs.append(f)
            target = (await asyncio.to_thread(f.line, r"listening on (\S+)"))[1]
        bare = min([await asyncio.to_thread(_curl, f"http://{target}/file", out) for _ in range(2)])
        assert out.read_bytes() == body
        results["two_bare_forwarders_mib_s"] = round(mib / bare, 1)
        results["two_bare_forwarders_ratio"] = round(base / bare, 3)
        for name, mode in (("direct", ["--mode", "direct", "--relays", _pk(relays[2])]),
                           ("onion", ["--mode", "onion", "--hops", "3", "--relays", ",".join(_pk(s) for s in relays)])):
            c = Proc(["-m", "netflow.client", "--api", api, "--key", str(work / "client.key"), "--socks",
                       "127.0.0.1:0", "--deposit", str(10 * mib * PRICE // 1000), *mode, "--log-level", "WARNING"],
                      work / f"client-{name}.log", REPO)
            procs.append(c)
            socks = (await asyncio.to_thread(c.line, r"SOCKS5 on (\S+) "))[1]
            best = min([await asyncio.to_thread(_curl, url, out, socks) for _ in range(2)])
            assert out.read_bytes() == body, f"{name}: the download differs"
            c.stop()
            results[f"{name}_mib_s"] = round(mib / best, 1)
            results[f"{name}_ratio"] = round(base / best, 3)
            results[f"{name}_of_bare_forwarders"] = round(bare / best, 3)
        results["goals"] = {"direct_ratio": 0.8, "onion_ratio": 0.3}
        return results
    finally:
        for p in reversed(procs):
            p.stop()
        await runner.cleanup()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="download size in MiB (default 64)")
    ap.add_argument("--quick", action="store_true", help="8 MiB (smoke run)")
    a = ap.parse_args(argv)
    if shutil.which("curl") is None:
        out: dict[str, Any] = {"skipped": "curl is not installed"}
    else:
        with tempfile.TemporaryDirectory(prefix="l2d-bench-netflow-") as d:
            out = asyncio.run(run(8 if a.quick else a.mib, Path(d)))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
