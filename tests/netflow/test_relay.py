"""A NetFlow relay (netflow/relay.py) against a real l2d process, in-process so its session state can be read: the
credit window stops a download that is not paid for and releases it when a receipt comes; a forged receipt, or a
frame altered on the wire, closes the circuit. A relay process stopped while registered says how to leave, and
`l2-relay exit` does."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from coincurve import PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from l2d.client import ApiError, AsyncClient
from l2d.core.coin_tx import Transfer
from l2d.core.relay import EXIT_DELAY_BLOCKS
from l2d.core.relay_tx import FLAG_ENTRY, FLAG_EXIT, RelayRegister
from l2d.core.session import SessionStatus
from l2d.core.session_tx import Receipt
from netflow.client import Circuit, HopFailed, NetflowClient, Paid, RelayInfo
from netflow.relay import ReceiptLog, Relay
from netflow import client as netflow_client
from netflow import wire
from netflow.wire import MAX_DATA, Cmd, WireError, x25519_public
from tests.conftest import REPO, L2dProcess, Proc

TOKEN = "netflow-relay-test-token-0001"
MIB = 1 << 20
PRICE = 1_000_000
WINDOW = 256 * 1024
CLIENT = hashlib.sha256(b"netflow relay test client").digest()
RELAY = hashlib.sha256(b"netflow relay test relay").digest()


def pk(s: bytes) -> bytes:
    return PrivateKey(s).public_key_xonly.format()


async def serve(handler: Any) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, "127.0.0.1:%d" % server.sockets[0].getsockname()[1]


@pytest.fixture
async def world(tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path]
                ) -> AsyncIterator[dict[str, Any]]:
    """An l2d process, a destination sending 4 MiB to whoever connects, an exit relay (in-process, window 256 KiB)
    registered on the L2, and a client with a paid session to it."""
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(CLIENT): 10**7, pk(RELAY): 10**7}, TOKEN,
                              block={"interval_ms": 50}))
    payload = bytes(range(256)) * (4 * MIB // 256)
    connections: list[object] = []

    async def destination(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(w.get_extra_info("peername"))
        with contextlib.suppress(ConnectionError):
            w.write(payload)
            await w.drain()
        w.close()
    dest_server, dest = await serve(destination)
    async with AsyncClient(d.url("")) as api:
        network = await api.network()
        x = X25519PrivateKey.generate()
        relay = Relay(api=api, network=network, secret=RELAY, x25519_key=x, price_msat_per_mib=PRICE,
                      exit_allowed=True, window=WINDOW, settle_every_s=3600,
                      receipts=ReceiptLog(tmp_path / "relay.receipts"))
        relay_server = await wire.serve(relay.handle, "127.0.0.1", 0)
        endpoint = "127.0.0.1:%d" % relay_server.sockets[0].getsockname()[1]
        res = await api.sign_and_submit(RELAY, RelayRegister(5000, x25519_public(x), pk(RELAY),
                                                             FLAG_ENTRY | FLAG_EXIT, 1000, PRICE,
                                                             endpoint.encode()), 1)
        await api.wait_tx(res["txid"], 60)
        client = NetflowClient(api, network, CLIENT)
        [info] = await client.relays()
        assert info == RelayInfo(pk(RELAY), x25519_public(x), pk(RELAY), 3, endpoint, PRICE, 0)
        await client.open_sessions([info], 50_000, 1000)
        try:
            yield {"d": d, "relay": relay, "client": client, "dest": dest, "payload": payload, "api": api,
                   "endpoint": endpoint, "connections": connections}
        finally:
            relay_server.close()
            dest_server.close()


async def connected(w: dict[str, Any], client: NetflowClient) -> Circuit:
    c = Circuit(client.network, client.paid)
    await c.build()
    await c.send(0, Cmd.CONNECT, w["dest"].encode())
    assert await c.recv() == (0, Cmd.CONNECTED, b"\x00")
    return c


async def test_the_credit_window_holds_an_unpaid_download_and_a_receipt_releases_it(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any]) -> None:
    relay, client = world["relay"], world["client"]
    monkeypatch.setattr(Paid, "due", lambda self, now: False)  # a client that never pays on its own
    c = await connected(world, client)
    [s] = relay.sessions.values()
    got = bytearray()

    async def read_until_held() -> None:
        while True:
            hop, cmd, data = await c.recv()
            assert (hop, cmd) == (0, Cmd.DATA)
            got.extend(data)
    reader = asyncio.create_task(read_until_held())
    try:
        # the relay carries one window (and the chunk that crossed it), then waits for a receipt
        await poll(lambda: s.carried > WINDOW, 30, "a window carried")
        await poll(lambda: len(got) == s.carried, 30, "what was carried received")
        assert s.carried <= WINDOW + MAX_DATA and s.paid_units == 0 and not reader.done()
        held = s.carried
        await c.pay(force=True)  # a receipt for everything received so far
        await poll(lambda: s.paid_units == held and s.carried > held, 30, "the download released")
        assert s.best is not None and s.best.amount_sat == -(-held * PRICE // (MIB * 1000))
        assert s.carried <= held + WINDOW + MAX_DATA  # one more window at most
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        c.close()


async def test_a_client_that_stops_paying_is_cut_off_after_pay_wait(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any]) -> None:
    relay, client = world["relay"], world["client"]
    relay.pay_wait_s = 0.5
    monkeypatch.setattr(Paid, "due", lambda self, now: False)  # receives, never pays
    c = await connected(world, client)
    [s] = relay.sessions.values()
    got = 0
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, WireError)):
        while True:  # one window, then no more data: the link is closed
            hop, cmd, data = await asyncio.wait_for(c.recv(), 30)
            assert (hop, cmd) == (0, Cmd.DATA)
            got += len(data)
    assert s.paid_units == 0 and WINDOW < s.carried <= WINDOW + MAX_DATA and got == s.carried
    c.close()


async def test_a_settlement_not_seen_committed_is_retried_and_one_the_l2_has_is_not_sent_again(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any]) -> None:
    relay, client, api = world["relay"], world["client"], world["api"]
    c = await connected(world, client)
    while client.paid[0].units < 3 * MIB:  # a download paid as it arrives (this relay's window is 256 KiB)
        await asyncio.wait_for(c.recv(), 30)
        await c.pay(force=True)
    [s] = relay.sessions.values()
    await poll(lambda: s.best is not None and s.best.seq == client.paid[0].seq, 30, "every receipt at the relay")
    c.close()
    real_wait = api.wait_tx
    submitted: list[str] = []
    real_submit = api.sign_and_submit

    async def submit(*a: Any, **k: Any) -> Any:
        res = await real_submit(*a, **k)
        submitted.append(res["txid"])
        return res

    async def times_out(txid: str, timeout: float) -> Any:  # the settlement commits, but not within the wait
        return {"txid": txid, "status": "pending"}
    monkeypatch.setattr(api, "sign_and_submit", submit)
    monkeypatch.setattr(api, "wait_tx", times_out)
    await relay.settle()
    assert len(submitted) == 1 and s.settled_seq == 0  # not known to be settled
    assert (await real_wait(submitted[0], 60))["status"] == "committed"
    await relay.settle()  # the L2's record already has this receipt: nothing sent again
    assert len(submitted) == 1 and s.settled_seq == s.best.seq


async def test_receipts_on_disk_are_settled_by_the_relay_that_restarts_and_only_what_is_owed_is_kept(
        world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any]) -> None:
    """Every receipt the relay accepts is appended to its log before it counts; a new Relay on the same file (a
    restart) recovers the best receipt of each session the L2 has not settled, skipping a torn last record, records
    that do not decode and sessions the L2 does not know or that expired, rewrites the file with just that (what
    could not be checked, the node being down, is kept), and its first settlement redeems it; once settled nothing
    is owed. A log past COMPACT_BYTES is cut to what is owed after a settlement; a session closed before its receipt
    was settled is given up."""
    relay, client, api = world["relay"], world["client"], world["api"]
    path = relay.receipts.path
    c = await connected(world, client)
    while client.paid[0].units < 2 * MIB:
        await asyncio.wait_for(c.recv(), 30)
        await c.pay(force=True)
    [s] = relay.sessions.values()
    await c.abandon()  # the stream stopped mid-way: what was on its way read and counted
    await c.pay(force=True)
    await poll(lambda: s.best is not None and s.best.seq == client.paid[0].seq, 30, "every receipt at the relay")
    c.close()
    raw = path.read_bytes()
    assert len(raw) == s.best.seq * Receipt.SIZE and raw[-Receipt.SIZE:] == s.best.encode()  # each, in order
    stranger = Receipt.sign(relay.network.id, PrivateKey(), os.urandom(32), 9, 1, 1)
    with path.open("ab") as f:  # a session the L2 does not know, a record that is not a receipt, half a record
        f.write(stranger.encode() + bytes(Receipt.SIZE) + s.best.encode()[:50])

    def restart(log_path: Path) -> Relay:
        return Relay(api=api, network=relay.network, secret=RELAY, x25519_key=relay.x25519, price_msat_per_mib=PRICE,
                     exit_allowed=True, settle_every_s=3600, receipts=ReceiptLog(log_path))
    copy = tmp_path / "copy.receipts"
    copy.write_bytes(path.read_bytes())
    down = restart(path)

    async def unreachable(sid: bytes) -> Any:
        raise ApiError(0, "unreachable", "the node is down")
    monkeypatch.setattr(down, "record", unreachable)
    await down.recover()  # nothing can be checked: every receipt that decodes is kept for the next start
    assert down.sessions == {} and path.read_bytes() == s.best.encode() + stranger.encode()
    expired = restart(copy)
    real_record = expired.record

    async def past_expiry(sid: bytes) -> Any:
        return dataclasses.replace(await real_record(sid), expiry_height=0)
    monkeypatch.setattr(expired, "record", past_expiry)
    await expired.recover()  # a session past its expiry can no longer be settled: dropped
    assert expired.sessions == {} and copy.read_bytes() == b""

    restarted = restart(path)
    await restarted.recover()
    [r] = restarted.sessions.values()
    assert (r.sid, r.best, r.settled_seq, r.carried) == (s.sid, s.best, 0, s.best.units)
    assert path.read_bytes() == s.best.encode()  # only what is owed
    await restarted.settle()
    settled = await api.get(f"/api/sessions/{s.sid.hex()}")
    assert settled["settled"]["seq"] == s.best.seq and settled["settled"]["units"] == s.best.units

    again = restart(path)
    await again.recover()
    assert again.sessions == {} and path.read_bytes() == b""  # settled: nothing owed

    monkeypatch.setattr(ReceiptLog, "COMPACT_BYTES", 2 * Receipt.SIZE)
    c = await connected(world, client)  # the same session, paid further: the first relay object logs it
    relay.receipts = again.receipts
    relay.sessions[s.sid].settled_seq = s.best.seq
    for _ in range(3):
        await asyncio.wait_for(c.recv(), 30)
        await c.pay(force=True)
    await poll(lambda: s.best is not None and s.best.seq == client.paid[0].seq, 30, "the new receipts at the relay")
    c.close()
    assert len(path.read_bytes()) == 3 * Receipt.SIZE
    async def refused(*a: Any, **k: Any) -> Any:
        raise ApiError(503, "busy", "the daemon is busy")
    monkeypatch.setattr(api, "sign_and_submit", refused)
    await relay.settle()  # refused: still owed, and the log past its limit keeps just the best
    assert path.read_bytes() == s.best.encode()
    real_record = relay.record

    async def closed(sid: bytes) -> Any:
        return dataclasses.replace(await real_record(sid), status=SessionStatus.CLOSED)
    monkeypatch.setattr(relay, "record", closed)
    await relay.settle()  # a session closed before its receipt was settled: given up, not tried for ever
    assert s.sid not in relay.sessions


async def test_a_relay_registered_with_an_unusable_x25519_key_is_a_failed_hop(world: dict[str, Any]) -> None:
    # the registry checks the key's length only; a low-order point makes no shared secret: that relay is a hop that
    # failed (the client fails over, the prober counts a failed probe), not an error that stops them
    client = world["client"]
    p = client.paid[0]
    c = Circuit(client.network, [dataclasses.replace(p, relay=dataclasses.replace(p.relay, x25519=bytes(32)))])
    with pytest.raises(HopFailed) as e:
        await c.build()
    assert e.value.hop == 0 and "X25519" in str(e.value)
    c.close()


async def test_a_forged_receipt_closes_the_circuit(world: dict[str, Any], poll: Callable[..., Any]) -> None:
    relay, client = world["relay"], world["client"]
    c = await connected(world, client)
    paid = client.paid[0]
    not_the_key = PrivateKey(hashlib.sha256(b"not the session key").digest())
    forged = Receipt.sign(client.network.id, not_the_key, paid.session_id, 1,
                          10, 10)
    await c.send(0, Cmd.RECEIPT, forged.encode())
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, WireError)):
        while True:
            await asyncio.wait_for(c.recv(), 30)
    [s] = relay.sessions.values()
    assert s.best is None  # nothing accepted
    c.close()


def bit_flipper(endpoint: str, *, towards_relay: bool, frame: int) -> Callable[..., Any]:
    """A man in the middle of a link to the relay at endpoint: it passes frames through, flipping the last bit of the
    frame-th one going towards_relay (or coming back from it), and the other direction untouched."""
    host, port = endpoint.rsplit(":", 1)

    async def mitm(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        rr, rw = await asyncio.open_connection(host, int(port))
        (src, dst), (plain_src, plain_dst) = ((cr, rw), (rr, cw)) if towards_relay else ((rr, cw), (cr, rw))

        async def untouched() -> None:
            with contextlib.suppress(Exception):
                while data := await plain_src.read(65536):
                    plain_dst.write(data)
                    await plain_dst.drain()
            plain_dst.close()
        t = asyncio.create_task(untouched())
        n = 0
        with contextlib.suppress(Exception):
            while True:
                body = await src.readexactly(int.from_bytes(await src.readexactly(4), "big"))
                n += 1
                if n == frame:
                    body = body[:-1] + bytes((body[-1] ^ 1,))
                dst.write(len(body).to_bytes(4, "big") + body)
                await dst.drain()
        dst.close()
        t.cancel()
    return mitm


def through(client: NetflowClient, endpoint: str) -> None:
    """The client's (one-relay) path reaches its relay at endpoint instead."""
    p = client.paid[0]
    client.paid[0] = dataclasses.replace(p, relay=dataclasses.replace(p.relay, endpoint=endpoint))


async def socks_connect(front: asyncio.AbstractServer, dest: str) -> tuple[asyncio.StreamReader,
                                                                        asyncio.StreamWriter]:
    """A SOCKS5 CONNECT to dest (IPv4 host:port) through front, answered: the connection."""
    r, w = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
    host, port = dest.rsplit(":", 1)
    w.write(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + bytes(map(int, host.split("."))) + int(port).to_bytes(2, "big"))
    assert await r.readexactly(2) == b"\x05\x00" and (await r.readexactly(10))[:2] == b"\x05\x00"
    return r, w


async def socks_front(client: NetflowClient) -> tuple[asyncio.AbstractServer, list[asyncio.Task[Any]]]:
    """The client's SOCKS5 front on a free port, and the tasks serving its connections (one per connection, in
    order: a test waits for one to know the client is done with that connection)."""
    circuits: set[Circuit] = set()
    handlers: list[asyncio.Task[Any]] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        await client.socks(r, wire.buffered(w), circuits)
    return await asyncio.start_server(handler, "127.0.0.1", 0), handlers


async def test_a_frame_altered_on_the_wire_is_detected_and_the_circuit_dropped(
        world: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A man in the middle flips one bit of the client's CONNECT layer: the relay's ChaCha20-Poly1305 check fails,
    the relay closes the link, and nothing reaches the destination."""
    caplog.set_level(logging.INFO, logger="netflow.relay")
    server, proxy = await serve(bit_flipper(world["endpoint"], towards_relay=True, frame=2))  # the layer after CREATE
    client = world["client"]
    through(client, proxy)
    c = Circuit(client.network, client.paid)
    await c.build()  # CREATE / CREATED pass untouched
    await c.send(0, Cmd.CONNECT, world["dest"].encode())
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError, WireError)):
        await asyncio.wait_for(c.recv(), 30)
    assert any("failed authentication" in str(getattr(r, "why", "")) for r in caplog.records)
    assert world["connections"] == []  # the altered CONNECT never reached the destination
    c.close()
    server.close()


async def test_a_frame_altered_on_its_way_back_drops_the_path(world: dict[str, Any]) -> None:
    """A man in the middle flips one bit of a DATA frame the relay sends back: the client's ChaCha20-Poly1305 check
    fails, the SOCKS connection ends and the path's relays are not used again (the next circuit takes another)."""
    # CREATED, CONNECTED, a DATA frame, then the fourth altered
    server, proxy = await serve(bit_flipper(world["endpoint"], towards_relay=False, frame=4))
    client = world["client"]
    through(client, proxy)
    circuits: set[Circuit] = set()
    front = await asyncio.start_server(lambda r, w: client.socks(r, wire.buffered(w), circuits), "127.0.0.1", 0)
    r, w = await socks_connect(front, world["dest"])
    got = await asyncio.wait_for(r.read(), 30)  # until the client ends the connection
    assert 0 < len(got) < len(world["payload"]) and world["payload"].startswith(got)
    assert client.paid[0].relay.identity in client.dead and not circuits
    w.close()
    front.close()
    server.close()


async def test_a_socks_connection_whose_application_never_ends_its_side_closes_cleanly(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination sends its bytes and ends; the application keeps its side open: after UPLOAD_END_S the
    connection is closed, with every byte delivered and no error out of the handler."""
    monkeypatch.setattr(netflow_client, "UPLOAD_END_S", 0.2)
    world["relay"].window = 8 * MIB  # the whole download in one window: no receipt to wait for
    client = world["client"]
    circuits: set[Circuit] = set()
    errors: list[BaseException] = []
    done = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await client.socks(r, wire.buffered(w), circuits)
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()
    front = await asyncio.start_server(handler, "127.0.0.1", 0)
    r, w = await socks_connect(front, world["dest"])
    assert await asyncio.wait_for(r.read(), 30) == world["payload"]  # then the end; w stays open meanwhile
    await asyncio.wait_for(done.wait(), 30)  # the handler ends by itself
    assert r.at_eof()
    w.close()
    front.close()
    await front.wait_closed()
    assert errors == [] and not circuits


async def test_an_application_that_leaves_mid_download_leaves_the_session_usable_and_exactly_paid(
        world: dict[str, Any], monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any]) -> None:
    """An application reads 1 MiB of a 4 MiB download and resets its connection. The client stops the stream
    (CLOSE), reads what was already on its way up to the exit's END and pays for it: every byte the relay carried is
    paid, to the byte, and the next download on the same session is not held by bytes nobody paid for (without
    the CLOSE they stayed counted against the credit window, and every later circuit waited for a receipt that
    never came: the session was wedged)."""
    relay, client = world["relay"], world["client"]
    monkeypatch.setattr(netflow_client, "RECEIPT_EVERY_BYTES", 64 * 1024)  # paid well within the 256 KiB window
    front, handlers = await socks_front(client)
    try:
        r, w = await socks_connect(front, world["dest"])
        assert await asyncio.wait_for(r.readexactly(MIB), 30) == world["payload"][:MIB]
        w.transport.abort()  # a reset, with the rest of the download on its way
        await asyncio.wait_for(handlers[0], 30)
        [s] = relay.sessions.values()
        await poll(lambda: s.carried == client.paid[0].units, 30, "the relay's count and the client's equal")
        await poll(lambda: s.paid_units == s.carried, 30, "the last receipt at the relay")  # paid, to the byte
        r, w = await socks_connect(front, world["dest"])
        assert await asyncio.wait_for(r.read(), 30) == world["payload"]  # the same session carries on
        w.close()
        await asyncio.wait_for(handlers[1], 30)
        await poll(lambda: s.carried == client.paid[0].units, 30, "the relay's count and the client's equal")
        await poll(lambda: s.paid_units == s.carried, 30, "the last receipt at the relay")
    finally:
        front.close()


async def test_a_two_hop_stream_left_mid_way_is_paid_to_the_byte_at_both_relays(
        world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, poll: Callable[..., Any]) -> None:
    """The same through two relays (an entry in front of the world's exit, each with a 256 KiB window): after the
    reset, the client reads up to the exit's END paying as it goes (the entry may be waiting at its window for bytes
    already on their way), and each relay's count equals the client's count for it, paid; the next download on the
    same path completes."""
    exit_relay, api = world["relay"], world["api"]
    monkeypatch.setattr(netflow_client, "RECEIPT_EVERY_BYTES", 64 * 1024)
    entry_secret = hashlib.sha256(b"netflow relay test entry").digest()
    res = await api.sign_and_submit(CLIENT, Transfer(pk(entry_secret), 100_000), 1)
    await api.wait_tx(res["txid"], 60)
    x = X25519PrivateKey.generate()
    entry = Relay(api=api, network=exit_relay.network, secret=entry_secret, x25519_key=x, price_msat_per_mib=PRICE,
                  exit_allowed=False, window=WINDOW, settle_every_s=3600,
                  receipts=ReceiptLog(tmp_path / "entry.receipts"))
    server = await wire.serve(entry.handle, "127.0.0.1", 0)
    endpoint = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
    res = await api.sign_and_submit(entry_secret, RelayRegister(5000, x25519_public(x), pk(entry_secret), FLAG_ENTRY,
                                                                1000, PRICE, endpoint.encode()), 1)
    await api.wait_tx(res["txid"], 60)
    client = NetflowClient(api, exit_relay.network, CLIENT, hops=2)
    infos = {r.identity: r for r in await client.relays()}
    await client.open_sessions([infos[pk(entry_secret)], infos[pk(RELAY)]], 50_000, 1000)
    front, handlers = await socks_front(client)
    try:
        for n, whole in enumerate((False, True)):
            r, w = await socks_connect(front, world["dest"])
            if whole:
                assert await asyncio.wait_for(r.read(), 30) == world["payload"]
                w.close()
            else:
                assert await asyncio.wait_for(r.readexactly(MIB), 30) == world["payload"][:MIB]
                w.transport.abort()
            await asyncio.wait_for(handlers[n], 30)
            for relay, paid in ((entry, client.paid[0]), (exit_relay, client.paid[1])):
                [s] = relay.sessions.values()
                # the client counted every byte this relay carried (the entry counts the last receipts for the
                # exit when it forwards them: they may still be on their way), and paid for them
                await poll(lambda: s.carried == paid.units, 30, "the relay's count and the client's equal")
                await poll(lambda: s.paid_units == s.carried, 30, "the last receipt at the relay")
    finally:
        front.close()
        server.close()


async def test_a_link_that_sends_half_a_frame_is_closed_after_the_handshake_time(
        world: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    """A slow or silent peer does not hold a relay's connection: no CREATE within handshake_s closes the link."""
    caplog.set_level(logging.INFO, logger="netflow.relay")
    world["relay"].handshake_s = 0.2
    host, port = world["endpoint"].rsplit(":", 1)
    r, w = await asyncio.open_connection(host, int(port))
    w.write(b"\x00\x00")  # half of a frame's length, then nothing
    assert await asyncio.wait_for(r.read(), 30) == b""  # the relay closed the link
    assert any("no CREATE within 0.2 s" in str(getattr(rec, "why", "")) for rec in caplog.records)
    assert world["relay"].sessions == {}
    w.close()


async def test_a_spent_session_is_renewed_for_the_next_circuit(world: dict[str, Any]) -> None:
    """A session whose deposit would not pay for RENEW_MARGIN more bytes is replaced by a fresh one (opened and
    committed on the L2) before the next circuit; the relay serves the circuit on the new session."""
    relay, client = world["relay"], world["client"]
    old = client.paid[0]
    old.units = 45 * MIB  # 45 MiB of a 50,000-sat deposit at 1,000 sat/MiB: less than 8 MiB left
    assert old.spent()
    c = await client.circuit()
    new = client.paid[0]
    assert new.session_id != old.session_id and new.units == 0 and not new.spent()
    assert new.session_id in relay.sessions  # CREATE named the new session
    body = await world["api"].get(f"/api/sessions/{new.session_id.hex()}")
    assert body["status"] == "OPEN" and body["deposit_sat"] == client.deposit_sat
    c.close()


async def test_a_stopped_relay_says_how_to_leave_and_l2_relay_exit_takes_it_out_of_selection(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], procs: list[Any]) -> None:
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(RELAY): 1_000_000}, TOKEN, block={"interval_ms": 50}))
    api = d.url("")
    key = tmp_path / "relay.key"
    key.write_text(RELAY.hex())
    key.chmod(0o600)
    p = Proc(["netflow.relay", "--api", api, "--key", str(key), "--x25519-key", str(tmp_path / "relay.x25519"),
              "--listen", "127.0.0.1:0", "--register", "--stake", "5000", "--settle-every", "3600"],
             tmp_path / "relay.log")
    procs.append(p)
    assert re.search(r"listening on", await asyncio.to_thread(p.first_line))
    ident = pk(RELAY).hex()

    def record() -> Any:
        return next((r for r in d.get("/api/netflow/relays")["relays"] if r["identity"] == ident), None)
    await poll(lambda: (record() or {}).get("status") == "ACTIVE", 60, "the relay registered")
    assert p.stop() == 0
    assert record()["status"] == "ACTIVE"  # a restart resumes it
    [note] = [json.loads(x) for x in p.log.read_text().splitlines()
              if x.startswith("{") and json.loads(x)["msg"].startswith("stopped:")]
    assert note["level"] == "warning"
    assert f"l2-relay exit --api {api} --key {key}" in note["msg"]
    assert f"l2-relay withdraw --api {api} --key {key}" in note["msg"]

    def l2_relay(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-m", "netflow.relay", *args], capture_output=True, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    r = l2_relay("exit", "--api", api, "--key", str(key))
    assert r.returncode == 0, r.stderr
    rec = record()
    assert rec["status"] == "EXITING" and f"from L2 height {rec['exit_height'] + EXIT_DELAY_BLOCKS}" in r.stdout
    r = l2_relay("withdraw", "--api", api, "--key", str(key))
    assert r.returncode == 1 and f"locked until height {rec['exit_height'] + EXIT_DELAY_BLOCKS}" in r.stderr
    assert record()["stake_sat"] == 5000


def test_a_receipts_file_that_cannot_be_opened_is_a_clear_exit_2(tmp_path: Path) -> None:
    key = tmp_path / "relay.key"
    key.write_text(RELAY.hex())
    key.chmod(0o600)
    r = subprocess.run([sys.executable, "-m", "netflow.relay", "--key", str(key), "--x25519-key",
                        str(tmp_path / "relay.x25519"), "--receipts", str(tmp_path / "missing" / "relay.receipts")],
                       capture_output=True, text=True, timeout=60, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and "cannot open the receipts file" in r.stderr and "--receipts" in r.stderr, r.stderr
