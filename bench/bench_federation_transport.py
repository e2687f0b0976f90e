"""Member transport throughput: messages per second delivered among 4 members (each broadcasting to the 3 others
over l2d/federation/transport.py on loopback, one process), against the baseline of the same number of frames
sent over 12 bare aiohttp WebSockets (one per ordered pair, no handshake, queue or counters) in the same run.

    python bench/bench_federation_transport.py [--messages 5000] [--size 300]

A ratio near 1 means the transport adds little to aiohttp's own cost per frame.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import keypairs  # noqa: E402

from l2d.core.params import LOCAL  # noqa: E402
from l2d.federation.transport import Handlers, Limits, Peer, Transport, routes  # noqa: E402
from regtest.harness import free_ports  # noqa: E402

N = 4
HOST = "127.0.0.1"


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner


async def _wait(cond: object, what: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


async def transport_run(messages: int, size: int) -> float:
    """Seconds from the first broadcast until every member received every other member's messages."""
    keys = keypairs(N)
    got = [0] * N
    transports: list[Transport] = []
    runners: list[web.AppRunner] = []
    ports = free_ports(N)
    for i in range(N):
        def on_message(raw: bytes, peer: int, i: int = i) -> None:
            got[i] += 1
        peers = [Peer(j, keys[j][1], f"http://{HOST}:{ports[j]}") for j in range(N) if j != i]
        t = Transport(LOCAL, i, keys[i][0], peers, Handlers(on_message, lambda r, p: None, lambda a, b: [],
                                                             lambda x: []),
                      Limits(queue_max_messages=messages + 1, reconnect_min_s=0.01, reconnect_max_s=0.1))
        app = web.Application()
        app.router.add_routes(routes(t))
        runners.append(await _serve(app, ports[i]))
        transports.append(t)
    for t in transports:
        await t.start()
    await _wait(lambda: all(t.connected_peers() == N - 1 for t in transports), "connections")
    payload = bytes(size)
    t0 = time.perf_counter()
    for k in range(messages):
        for t in transports:
            t.broadcast(payload)
        if k % 64 == 63:
            await asyncio.sleep(0)
    await _wait(lambda: all(g == (N - 1) * messages for g in got), "delivery")
    dt = time.perf_counter() - t0
    for t in transports:
        await t.close()
    for r in runners:
        await r.cleanup()
    return dt


async def raw_run(messages: int, size: int) -> float:
    """The same frames over bare aiohttp WebSockets, one per ordered pair."""
    got = [0] * N

    def handler(i: int):  # type: ignore[no-untyped-def]
        async def ws_handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(compress=False)
            await ws.prepare(request)
            async for _ in ws:
                got[i] += 1
            return ws
        return ws_handler

    runners = []
    ports = free_ports(N)
    for i in range(N):
        app = web.Application()
        app.router.add_get("/ws", handler(i))
        runners.append(await _serve(app, ports[i]))
    session = aiohttp.ClientSession()
    conns = {(i, j): await session.ws_connect(f"http://{HOST}:{ports[j]}/ws", compress=0)
             for i in range(N) for j in range(N) if i != j}
    payload = b"\x01" + bytes(size)

    async def pump(ws: aiohttp.ClientWebSocketResponse) -> None:
        for _ in range(messages):
            await ws.send_bytes(payload)

    t0 = time.perf_counter()
    await asyncio.gather(*(pump(ws) for ws in conns.values()))
    await _wait(lambda: all(g == (N - 1) * messages for g in got), "raw delivery")
    dt = time.perf_counter() - t0
    for ws in conns.values():
        await ws.close()
    await session.close()
    for r in runners:
        await r.cleanup()
    return dt


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=5000, help="messages each member broadcasts")
    ap.add_argument("--size", type=int, default=300, help="bytes per message")
    a = ap.parse_args(argv)
    logging.getLogger("l2d.federation").setLevel(logging.ERROR)  # links failing as the members stop at the end
    frames = N * (N - 1) * a.messages
    raw = asyncio.run(raw_run(a.messages, a.size))
    fed = asyncio.run(transport_run(a.messages, a.size))
    res = {"members": N, "messages_per_member": a.messages, "size": a.size, "frames": frames,
           "transport_msgs_per_s": round(frames / fed), "raw_ws_msgs_per_s": round(frames / raw),
           "ratio_transport_to_raw": round(raw / fed, 3)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
