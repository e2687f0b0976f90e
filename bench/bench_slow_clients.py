"""REST latency under slow-header clients: `/api/status` p50/p99 on a real `l2d` process with no other client
(the baseline), then while N sockets hold a request header open by sending one header line every few seconds.

    python bench/bench_slow_clients.py [--slow 1000] [--requests 1000] [--pace 5]

The daemon is configured to keep them (api.max_connections above N, api.header_timeout_ms past the run), so the
figure is the cost of holding N slow clients; each status request is a fresh connection, as l2-cli makes. A ratio
at or below 1 means no measurable cost (a loop kept busy by the trickle also wakes a little faster).
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _config(tmp: Path, slow: int) -> Path:
    cfg = tmp / "node.toml"
    cfg.write_text('[node]\nnetwork = "local"\ndata_dir = "data"\nlog_level = "INFO"\n'
                   f"[api]\nport = 0\nmax_connections = {slow + 100}\nheader_timeout_ms = 600000\n"
                   "keepalive_timeout_ms = 600000\n[snapshots]\nevery_blocks = 0\n")
    return cfg


def _start(cfg: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("L2D_ADMIN_TOKEN", None)
    p = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(cfg)], cwd=REPO, env=env,
                         stderr=log.open("w"), stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"l2d exited: {log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("msg") == "api listening":
                return p, int(rec["port"])
        time.sleep(0.1)
    p.kill()
    raise SystemExit("l2d did not come up")


def _raise_fd_limit(need: int) -> None:
    """This process holds the slow sockets: lift its soft descriptor limit (up to the hard one) to fit them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise SystemExit(f"needs {need} descriptors; the hard limit is {hard} (lower --slow)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def _latencies(port: int, n: int, min_seconds: float = 0.0) -> list[float]:
    """At least n sequential GET /api/status over at least min_seconds, each on a new connection; seconds each."""
    out: list[float] = []
    end = time.monotonic() + min_seconds
    while len(out) < n or time.monotonic() < end:
        t = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", "/api/status")
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 200:
            raise SystemExit(f"/api/status answered {r.status}")
        out.append(time.perf_counter() - t)
    return out


class SlowClients:
    """N sockets in a thread of their own, each sending a header line every `pace` seconds (staggered)."""

    def __init__(self, port: int, n: int, pace: float) -> None:
        self.port, self.n, self.pace = port, n, pace
        self.open = 0
        self.closed_by_server = 0
        self.ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        if not self.ready.wait(300):
            raise SystemExit("slow clients did not connect")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(120)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        rnd = random.Random(7)
        conns = []
        for i in range(self.n):
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"GET /api/status HTTP/1.1\r\nHost: bench\r\n")
            conns.append((reader, writer))
        self.open = len(conns)
        tasks = [asyncio.create_task(self._trickle(r, w, rnd.uniform(0, self.pace))) for r, w in conns]
        await asyncio.sleep(0)
        self.ready.set()
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        for _, w in conns:
            w.close()

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, offset: float) -> None:
        await asyncio.sleep(offset)
        for i in range(100):  # under aiohttp's 128-header limit
            try:
                data = await asyncio.wait_for(reader.read(1024), self.pace)
            except TimeoutError:
                writer.write(b"X-Slow-%d: y\r\n" % i)
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                self.open -= 1
                self.closed_by_server += 1
                return


def _pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slow", type=int, default=1000, help="slow-header sockets held open")
    ap.add_argument("--requests", type=int, default=1000, help="status requests per phase (at least; each phase lasts 2 paces)")
    ap.add_argument("--pace", type=float, default=5.0, help="seconds between a slow client's header lines")
    a = ap.parse_args(argv)
    _raise_fd_limit(a.slow + 256)
    with tempfile.TemporaryDirectory() as d:
        p, port = _start(_config(Path(d), a.slow), Path(d) / "l2d.log")
        try:
            _latencies(port, 200)  # warm-up
            # Each phase spans two paces, so every slow client sends header lines during the loaded one.
            base = _latencies(port, a.requests, 2 * a.pace)
            with SlowClients(port, a.slow, a.pace) as slow:
                loaded = _latencies(port, a.requests, 2 * a.pace)
                held = slow.open
        finally:
            p.terminate()
            p.wait(timeout=120)
    ms = 1000.0
    res = {
        "slow_clients": a.slow, "slow_clients_held_to_the_end": held, "pace_s": a.pace,
        "baseline_requests": len(base), "slow_requests": len(loaded),
        "baseline_p50_ms": round(_pct(base, 50) * ms, 3), "baseline_p99_ms": round(_pct(base, 99) * ms, 3),
        "slow_p50_ms": round(_pct(loaded, 50) * ms, 3), "slow_p99_ms": round(_pct(loaded, 99) * ms, 3),
    }
    res["p50_ratio"] = round(res["slow_p50_ms"] / res["baseline_p50_ms"], 2)
    res["p99_ratio"] = round(res["slow_p99_ms"] / res["baseline_p99_ms"], 2)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
