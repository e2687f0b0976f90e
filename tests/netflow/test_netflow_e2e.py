"""NetFlow end to end with real processes on loopback: an l2d daemon, relays (`l2-relay`, registered on the L2), the
client (`l2-netflow`, its SOCKS5 front) and `curl --socks5-hostname` downloading from a local aiohttp server.

Direct (one relay) and 3-hop onion paths deliver the file byte-identical; each relay settles what its receipts say
when it stops, and the balances move by exactly the settled receipts."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import pytest
from aiohttp import web
from coincurve import PrivateKey

from l2d.core.session import SessionRecord, SessionStatus
from l2d.core.session_tx import Receipt, quote_sat
from tests.conftest import REPO, L2dProcess, Lan, Proc

TOKEN = "netflow-test-admin-token-0001"
MIB = 1 << 20
PRICE = 1_000_000  # msat per MiB: 1,000 sat per MiB
FUNDS = 10_000_000


def secret(tag: str) -> bytes:
    return hashlib.sha256(b"l2d netflow test " + tag.encode()).digest()


def pk(s: bytes) -> bytes:
    return PrivateKey(s).public_key_xonly.format()


CLIENT = secret("client")
RELAYS = [secret(f"relay {i}") for i in range(3)]


@pytest.fixture
async def site() -> AsyncIterator[tuple[str, bytes]]:
    """A local HTTP server with a 3 MiB file of random bytes: (its base URL on loopback, the bytes). It listens on
    every address, so that network namespaces on a bridge reach it too."""
    body = os.urandom(3 * MIB)

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")
    app = web.Application()
    app.router.add_get("/file", file)
    runner = web.AppRunner(app)
    await runner.setup()
    s = web.TCPSite(runner, "0.0.0.0", 0)
    await s.start()
    port = s._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", body
    finally:
        await runner.cleanup()


async def start_relay(tmp: Path, api: str, i: int, exit_: bool, procs: list[Proc], host: str = "127.0.0.1",
                      netns: Optional[str] = None, extra: tuple[str, ...] = ()) -> tuple[Proc, str]:
    key = tmp / f"relay{i}.key"
    key.write_text(RELAYS[i].hex())
    key.chmod(0o600)
    args = ["netflow.relay", "--api", api, "--key", str(key), "--x25519-key", str(tmp / f"relay{i}.x25519"),
            "--listen", f"{host}:0", "--register", "--stake", "5000", "--price", str(PRICE), "--settle-every",
            "3600", *extra] + (["--exit"] if exit_ else [])
    p = Proc(args, tmp / f"relay{i}.log", netns)
    procs.append(p)
    line = await asyncio.to_thread(p.first_line)
    m = re.search(r"listening on (\S+)", line)
    assert m, line
    return p, m.group(1)


async def start_client(tmp: Path, api: str, args: list[str], procs: list[Proc],
                       netns: Optional[str] = None) -> tuple[Proc, str, list[str]]:
    key = tmp / "client.key"
    key.write_text(CLIENT.hex())
    key.chmod(0o600)
    p = Proc(["netflow.client", "--api", api, "--key", str(key), "--socks", "127.0.0.1:0", "--deposit", "50000",
              *args], tmp / "client.log", netns)
    procs.append(p)
    line = await asyncio.to_thread(p.first_line)
    m = re.search(r"SOCKS5 on (\S+) .*sessions (\S+)", line)
    assert m, line
    return p, m.group(1), m.group(2).split(",")


def curl(socks: str, url: str, out: Path, netns: Optional[str] = None) -> None:
    inside = [] if netns is None else ["ip", "netns", "exec", netns]
    r = subprocess.run([*inside, "curl", "-sS", "--fail", "--max-time", "120", "--socks5-hostname", socks, url, "-o",
                        str(out)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr


async def run_path(tmp: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
                   poll: Callable[..., Any], site: tuple[str, bytes], procs: list[Proc], n_relays: int,
                   lan: Optional[Lan] = None) -> None:
    """A download through n relays (each in its own network namespace, and the client in another, with lan; the
    daemon and the site in the root namespace), then every settlement checked."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    alloc = {pk(CLIENT): FUNDS, **{pk(r): FUNDS for r in RELAYS}}
    api_host = {} if lan is None else {"api": {"host": "0.0.0.0"}}  # for the namespaces, on the bridge
    d = l2d_process(node_toml(tmp / "node.toml", alloc, TOKEN, block={"interval_ms": 50}, **api_host))
    api = d.url("") if lan is None else f"http://{lan.gateway}:{d.port}"
    relays = [await start_relay(tmp, api, i, i == n_relays - 1, procs, *(() if lan is None else (
        lan.addrs[i], lan.hosts[i]))) for i in range(n_relays)]
    await poll(lambda: len([r for r in d.get("/api/netflow/relays")["relays"] if r["status"] == "ACTIVE"])
               == n_relays, 60, "the relays registered")
    ids = ",".join(pk(RELAYS[i]).hex() for i in range(n_relays))
    mode = ["--mode", "direct"] if n_relays == 1 else ["--mode", "onion", "--hops", str(n_relays)]
    client_ns = None if lan is None else lan.hosts[n_relays]
    client, socks, sessions = await start_client(tmp, api, [*mode, "--relays", ids], procs, client_ns)
    before = {i: d.get(f"/api/l2/accounts/{pk(RELAYS[i]).hex()}")["balance_sat"] for i in range(n_relays)}
    base, body = site
    out = tmp / "out.bin"
    url = f"{base}/file" if lan is None else f"{base.replace('127.0.0.1', lan.gateway)}/file"
    await asyncio.to_thread(curl, socks, url, out, client_ns)
    assert out.read_bytes() == body  # byte-identical through the relays
    assert client.stop() == 0  # the client's last receipts went out with each circuit's end
    for p, _ in relays:
        assert p.stop() == 0  # each relay settles its best receipt as it stops
    for i, sid in enumerate(sessions):
        s = d.get(f"/api/sessions/{sid}")
        rec = SessionRecord.decode(bytes.fromhex(s["value"]))
        assert rec.status == SessionStatus.OPEN and rec.server == pk(RELAYS[i]) and rec.seq > 0
        # paid for at least the file's bytes (each hop also carries the inner layers), at the quoted price
        assert rec.units >= len(body) and rec.settled_sat == quote_sat(rec.units, PRICE, MIB)
        after = d.get(f"/api/l2/accounts/{pk(RELAYS[i]).hex()}")["balance_sat"]
        assert after == before[i] + rec.settled_sat - 1  # paid exactly the settled receipt, less the settle fee
    for i in range(1, n_relays):  # an inner hop carries every layer of the hops after it: more than the exit
        inner = SessionRecord.decode(bytes.fromhex(d.get(f"/api/sessions/{sessions[i - 1]}")["value"]))
        outer = SessionRecord.decode(bytes.fromhex(d.get(f"/api/sessions/{sessions[i]}")["value"]))
        assert inner.units > outer.units
    (tmp / "relays.json").write_text(json.dumps(d.get("/api/netflow/relays")["relays"]))
    assert d.stop() == 0


async def test_a_download_through_one_relay_is_byte_identical_and_paid(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], site: tuple[str, bytes], procs: list[Proc]) -> None:
    await run_path(tmp_path, l2d_process, node_toml, poll, site, procs, 1)


async def test_a_download_through_three_onion_hops_is_byte_identical_and_each_hop_paid(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], site: tuple[str, bytes], procs: list[Proc]) -> None:
    await run_path(tmp_path, l2d_process, node_toml, poll, site, procs, 3)


async def test_a_relay_killed_mid_download_the_client_fails_over_and_the_download_completes(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], procs: list[Proc]) -> None:
    """Two exits, A and B. A download through A is cut by SIGKILLing A halfway (the server holds the second half until
    then, and A is killed once its receipts file holds the client's receipt for that first MiB); curl retries, the
    client cannot reach A, takes B (opening a session with it) and the download completes byte-identical. B is paid
    for the bytes it carried, within the few bytes of the HTTP exchange; A, restarted, settles the receipt it had
    written before it died: bytes paid == bytes carried, for both."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = os.urandom(2 * MIB)
    half = asyncio.Event()
    killed = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await resp.prepare(request)
        await resp.write(body[:MIB])
        half.set()
        await killed.wait()
        await resp.write(body[MIB:])
        return resp
    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    s = web.TCPSite(runner, "127.0.0.1", 0)
    await s.start()
    url = f"http://127.0.0.1:{s._server.sockets[0].getsockname()[1]}/slow"  # type: ignore[union-attr]
    try:
        d = l2d_process(node_toml(tmp_path / "node.toml", {pk(CLIENT): FUNDS, **{pk(r): FUNDS for r in RELAYS[:2]}},
                                  TOKEN, block={"interval_ms": 50}))
        api = d.url("")
        (a, _), (b, _) = [await start_relay(tmp_path, api, i, True, procs) for i in range(2)]
        await poll(lambda: len(d.get("/api/netflow/relays")["relays"]) == 2, 60, "the relays registered")
        client, socks, [sid_a] = await start_client(tmp_path, api, ["--mode", "direct", "--relays",
                                                                   pk(RELAYS[0]).hex()], procs)
        out = tmp_path / "out.bin"
        download = asyncio.create_task(asyncio.to_thread(
            subprocess.run, ["curl", "-sS", "--fail", "--max-time", "120", "--retry", "3", "--retry-all-errors",
                             "--retry-delay", "1", "--socks5-hostname", socks, url, "-o", str(out)],
            capture_output=True, text=True, timeout=180))
        await asyncio.wait_for(half.wait(), 60)

        def paid_a() -> Optional[Receipt]:
            raw = (tmp_path / "relay0.receipts").read_bytes()
            last = Receipt.decode(raw[-Receipt.SIZE:]) if len(raw) >= Receipt.SIZE else None
            return last if last is not None and last.units >= MIB else None
        owed = await poll(paid_a, 60, "A's receipt for the first MiB on its disk")
        a.kill()  # SIGKILL mid-download, before any settlement (--settle-every 3600)
        killed.set()
        r = await download
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == body
        assert "choosing another path" in (tmp_path / "client.log").read_text()
        assert client.stop() == 0
        assert b.stop() == 0  # B settles
        settles = [json.loads(x) for x in (tmp_path / "relay1.log").read_text().splitlines() if "session settled" in x]
        assert len(settles) == 1
        settled = settles[0]
        rec = SessionRecord.decode(bytes.fromhex(d.get(f"/api/sessions/{settled['session']}")["value"]))
        assert rec.server == pk(RELAYS[1]) and rec.session_key and rec.settled_sat == settled["amount_sat"]
        assert len(body) <= rec.units <= len(body) + 4096  # the body, the request and the response headers
        assert d.get(f"/api/sessions/{sid_a}")["settled"]["seq"] == 0  # A died before settling
        a, _ = await start_relay(tmp_path, api, 0, True, procs)  # the same key and receipts file
        await poll(lambda: d.get(f"/api/sessions/{sid_a}")["settled"]["seq"] >= owed.seq, 60, "A's receipts settled")
        rec_a = SessionRecord.decode(bytes.fromhex(d.get(f"/api/sessions/{sid_a}")["value"]))
        assert MIB <= rec_a.units <= MIB + 4096  # what A carried before it died: half the body and the headers
        assert "receipt recovered" in (tmp_path / "relay0.log").read_text()
        assert a.stop() == 0
        assert d.stop() == 0
    finally:
        await runner.cleanup()


async def test_relays_send_heartbeats_and_a_silent_one_is_passed_over(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], procs: list[Proc]) -> None:
    """Two exits, A and B, heartbeating every 0.2 s: each one's last_heartbeat moves on past its registration. A is
    SIGKILLed; once it has been silent for more than the client's --max-heartbeat-age (5 s), a client naming it
    exits 2 saying why, and a client left to choose takes B, the only relay heard from (as GET
    /api/netflow/sessions/{id} shows)."""
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(CLIENT): FUNDS, **{pk(r): FUNDS for r in RELAYS[:2]}},
                              TOKEN, block={"interval_ms": 50}))
    api = d.url("")
    (a, _), (b, _) = [await start_relay(tmp_path, api, i, True, procs, extra=("--heartbeat-every", "0.2"))
                      for i in range(2)]

    def listed() -> dict[str, Any]:
        return {r["identity"]: r for r in d.get("/api/netflow/relays")["relays"]}
    ida, idb = pk(RELAYS[0]).hex(), pk(RELAYS[1]).hex()
    await poll(lambda: len(rs := listed()) == 2 and all(r["last_heartbeat"] > r["registered_height"]
                                                        for r in rs.values()), 60, "both relays' heartbeats")
    assert any(json.loads(x)["msg"] == "heartbeat" for x in (tmp_path / "relay0.log").read_text().splitlines())
    a.kill()
    await poll(lambda: listed()[ida]["heartbeat_age_ms"] > 5_000, 60, "A silent for over 5 s")
    key = tmp_path / "client.key"
    key.write_text(CLIENT.hex())
    key.chmod(0o600)
    named = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "netflow.client", "--api", api, "--key", str(key), "--socks",
                         "127.0.0.1:0", "--max-heartbeat-age", "5", "--relays", ida], capture_output=True, text=True,
        timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert named.returncode == 2 and f"heard from within 5 s: {ida}" in named.stderr, named.stderr
    client, _, [sid] = await start_client(tmp_path, api, ["--mode", "direct", "--max-heartbeat-age", "5"], procs)
    assert d.get(f"/api/netflow/sessions/{sid}")["relay"]["identity"] == idb
    assert client.stop() == 0 and b.stop() == 0 and d.stop() == 0


async def test_an_onion_path_across_network_namespaces_is_byte_identical_and_each_hop_paid(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], site: tuple[str, bytes], procs: list[Proc], lan: Callable[[int], Lan]) -> None:
    """The three relays and the client each in a network namespace of their own (separate network stacks and
    addresses on a bridge, as separate hosts): each relay registers and is reached at its own address."""
    hosts = lan(4)
    await run_path(tmp_path, l2d_process, node_toml, poll, site, procs, 3, hosts)
    relays = {r["endpoint"].rpartition(":")[0] for r in json.loads((tmp_path / "relays.json").read_text())}
    assert relays == set(hosts.addrs[:3])
