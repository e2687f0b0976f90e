"""`l2-netflow`: a local SOCKS5 front (RFC 1928, CONNECT, no authentication) whose connections go through NetFlow
relays, paid per MiB with session receipts (docs/netflow.md, "Data plane").

At start it picks a path (`direct`: one relay, an exit; `onion`: 2 or 3 relays of distinct operators, an exit last),
opens a paid session with each relay (SessionOpen: a deposit, the relay's price per MiB, an ephemeral session key)
and waits until they are committed. Each SOCKS connection is a circuit: CREATE with the first relay, EXTEND through
it to the next, and so on (one X25519 handshake per hop, each layer ChaCha20-Poly1305), then CONNECT at the exit.
The client counts, per relay, every byte that relay carries onward for it (the same bytes the relay counts), and
sends that relay a cumulative receipt once a MiB more is due, or every 2 seconds while anything is unpaid.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import random
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from coincurve import PrivateKey
import uvloop

from l2d.aio import until_signalled
from l2d.client import AsyncClient
from l2d.core.params import Network
from l2d.core.relay_tx import FLAG_ENTRY, FLAG_EXIT
from l2d.core.session_tx import Receipt, SessionOpen, quote_sat
from l2d.keys import load_secret
from l2d.logs import setup_logging

from .wire import LINK_BUFFER, MAX_DATA, Buf, Cmd, HopKeys, Kind, Link, WireError, buffered, client_hop, connect, frame

log = logging.getLogger(__name__)

MIB = 1 << 20
RECEIPT_EVERY_BYTES = MIB
RECEIPT_EVERY_S = 2.0
UPLOAD_END_S = 60.0  # after the destination's end, the application's side may still send this long
ABANDON_S = 10.0  # a stream the application left: the exit's END (after what was on its way) is awaited this long
RENEW_MARGIN = 8 * MIB  # a session is renewed once its deposit would not pay for this many more bytes
MAX_HEARTBEAT_AGE_S = 180.0  # a relay silent longer (3 of l2-relay's default heartbeat intervals) is not chosen


@dataclass(frozen=True)
class RelayInfo:
    """A relay as the registry lists it (GET /api/netflow/relays)."""

    identity: bytes
    x25519: bytes
    operator: bytes
    flags: int
    endpoint: str
    price_msat_per_mib: int
    weight: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RelayInfo":
        return cls(bytes.fromhex(d["identity"]), bytes.fromhex(d["x25519_key"]), bytes.fromhex(d["operator"]),
                   int(d["flags"]), str(d["endpoint"]), int(d["price_msat_per_mib"]), int(d["weight"]))


def choose_path(relays: Sequence[RelayInfo], hops: int, rng: random.Random) -> list[RelayInfo]:
    """`hops` distinct relays of distinct operators, an entry first and an exit last, each drawn at random in
    proportion to its measured weight (relays never measured are drawn only when no measured one fits: uniformly).
    As Tor does, the exit is drawn first, then the entry, then the middle hops (which need no flag): a relay that is
    both entry and exit never takes the first hop when it is the only exit. An exit for which no entry of another
    operator exists is passed over for the next draw, so a path is found whenever one exists; ValueError if none
    does."""
    if len({r.operator for r in relays}) >= hops:  # then any exit and entry leave enough operators for the middle
        for exit_ in _draws([r for r in relays if r.flags & FLAG_EXIT], rng):
            if hops == 1:
                return [exit_]
            entry = next(_draws([r for r in relays if r.flags & FLAG_ENTRY and r.operator != exit_.operator], rng),
                         None)
            if entry is None:
                continue  # every entry is this exit's operator's: another exit
            path, taken = [entry], {exit_.operator, entry.operator}
            for r in _draws([r for r in relays if r.operator not in taken], rng):
                if len(path) == hops - 1:
                    break
                if r.operator not in taken:
                    path.append(r)
                    taken.add(r.operator)
            return [*path, exit_]
    raise ValueError(f"no path of {hops} relays (an entry first, an exit last, distinct operators) among "
                     f"{len(relays)} relays")


def _draws(relays: Sequence[RelayInfo], rng: random.Random) -> Iterator[RelayInfo]:
    """relays in the order of successive draws without replacement: the measured ones in proportion to their
    weights, then the others uniformly."""
    measured = [r for r in relays if r.weight > 0]
    while measured:
        r = rng.choices(measured, weights=[m.weight for m in measured])[0]
        measured.remove(r)
        yield r
    rest = [r for r in relays if r.weight <= 0]
    rng.shuffle(rest)
    yield from rest


@dataclass
class Paid:
    """One relay's session, seen from the client: what the relay carried for it, and the last receipt sent."""

    relay: RelayInfo
    session_id: bytes
    session_secret: bytes
    deposit_sat: int
    units: int = 0
    seq: int = 0
    receipted_units: int = 0
    receipted_at: float = 0.0

    @functools.cached_property
    def session_key(self) -> PrivateKey:
        return PrivateKey(self.session_secret)

    def spent(self) -> bool:
        """The deposit cannot pay for another credit window: a new circuit takes a new session."""
        return quote_sat(self.units + RENEW_MARGIN, self.relay.price_msat_per_mib, MIB) > self.deposit_sat

    def due(self, now: float) -> bool:
        unpaid = self.units - self.receipted_units
        return unpaid >= RECEIPT_EVERY_BYTES or (unpaid > 0 and now - self.receipted_at >= RECEIPT_EVERY_S)

    def receipt(self, network_id: int, now: float) -> Receipt:
        self.seq += 1
        amount = min(quote_sat(self.units, self.relay.price_msat_per_mib, MIB), self.deposit_sat)
        self.receipted_units, self.receipted_at = self.units, now
        return Receipt.sign(network_id, self.session_key, self.session_id, self.seq, amount, self.units,
                            os.urandom(32))


class HopFailed(Exception):
    """A circuit could not be built: relay `hop` of its path was not reached (or did not prove its key)."""

    def __init__(self, hop: int, why: str) -> None:
        super().__init__(why)
        self.hop = hop


class Circuit:
    """A client's circuit through paid relays (paid[0] is the first hop)."""

    def __init__(self, network: Network, paid: list[Paid]) -> None:
        self.network, self.paid = network, paid
        self.keys: list[HopKeys] = []
        self.link: Optional[Link] = None  # to the first relay
        self.ended = False  # the exit's END came: nothing more is on its way

    async def build(self) -> None:
        """CREATE with the first relay, EXTEND to each next one; HopFailed names the relay that was not reached."""
        first = self.paid[0]
        host, _, port = first.relay.endpoint.rpartition(":")
        try:
            link = self.link = await asyncio.wait_for(connect(host.strip("[]"), int(port)), 30)
            pub, keys = client_hop(first.relay.x25519)
            link.write(frame(bytes((Kind.CREATE,)) + pub + first.session_id))
            await link.drain()
            created = bytes(await asyncio.wait_for(link.read_frame(), 30))
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, WireError) as e:
            raise HopFailed(0, f"relay {first.relay.endpoint}: {e or type(e).__name__}") from None
        if len(created) != 17 or created[0] != Kind.CREATED or created[1:] != keys.confirm:
            raise HopFailed(0, f"relay {first.relay.endpoint} did not prove its X25519 key")
        self.keys.append(keys)
        for i, p in enumerate(self.paid[1:], 1):
            try:
                pub, keys = client_hop(p.relay.x25519)
                await self.send(i - 1, Cmd.EXTEND, pub + p.session_id + p.relay.endpoint.encode())
                hop, cmd, data = await asyncio.wait_for(self.recv(), 30)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, WireError) as e:
                raise HopFailed(i, f"relay {p.relay.endpoint} not reached: {e or type(e).__name__}") from None
            if (hop, cmd) != (i - 1, Cmd.EXTENDED) or data != keys.confirm:
                raise HopFailed(i, f"relay {p.relay.endpoint} was not reached, or did not prove its X25519 key")
            self.keys.append(keys)

    async def send(self, hop: int, cmd: Cmd, data: bytes) -> None:
        """A command for `hop`, in the layers of hops hop..0; counts what each earlier hop carries onward."""
        body = self.keys[hop].seal_fwd(cmd, data, framed=hop == 0)
        if cmd == Cmd.DATA:
            self.paid[hop].units += len(data)
        for i in range(hop - 1, -1, -1):
            self.paid[i].units += len(body)
            body = self.keys[i].seal_fwd(Cmd.FORWARD, body, framed=i == 0)
        assert self.link is not None
        self.link.write(body)
        await self.link.drain()
        await self.pay()

    async def recv(self) -> tuple[int, int, Buf]:
        """The next command from the circuit: (the hop it came from, command, data: a view for DATA, else bytes);
        each layer is opened in the buffer the frame was received in."""
        assert self.link is not None
        body: Buf = await self.link.read_frame()
        for i, keys in enumerate(self.keys):
            plain = keys.open_bwd(body)
            if plain[0] == Cmd.FORWARD and i + 1 < len(self.keys):
                body = plain[1:]
                self.paid[i].units += len(body)
                continue
            if plain[0] == Cmd.DATA:
                self.paid[i].units += len(plain) - 1
                return i, Cmd.DATA, plain[1:]
            return i, plain[0], bytes(plain[1:])
        raise WireError("a FORWARD from the last hop")

    async def abandon(self) -> None:
        """Stop the stream mid-way (the application went away): CLOSE to the exit, then read what the path had sent
        already up to the exit's END, counting it as each relay counted it when it sent it, so that the next receipts
        pay each relay exactly what it carried (bytes left unread would count against this session's credit window
        at every relay, for every later circuit)."""
        exit_hop = len(self.paid) - 1
        await self.send(exit_hop, Cmd.CLOSE, b"")
        while (await self.recv())[:2] != (exit_hop, Cmd.END):
            await self.pay()  # a relay before the exit may be waiting at its window for what it already carried
        self.ended = True

    async def pay(self, force: bool = False) -> None:
        """A receipt to each relay that is due one (every one still unpaid, with force). The last hop first: a
        receipt for a hop is carried, and counted, by the hops before it, so each hop's own receipt comes after the
        ones it carries and pays for them too."""
        now = time.monotonic()
        for i in reversed(range(len(self.paid))):
            p = self.paid[i]
            if p.due(now) or (force and p.units > p.receipted_units):
                r = p.receipt(self.network.id, now)
                await self.send(i, Cmd.RECEIPT, r.encode())

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


class NetflowClient:
    def __init__(self, api: AsyncClient, network: Network, secret: bytes, hops: int = 1, deposit_sat: int = 100_000,
                 session_blocks: int = 10_000, rng: Optional[random.Random] = None,
                 max_heartbeat_age_s: float = MAX_HEARTBEAT_AGE_S) -> None:
        self.api, self.network, self.secret = api, network, secret
        self.hops, self.deposit_sat, self.session_blocks = hops, deposit_sat, session_blocks
        self.max_heartbeat_age_ms = int(max_heartbeat_age_s * 1000)
        self.rng = rng or random.Random()
        self.paid: list[Paid] = []  # the current path, first hop first
        self.sessions: dict[bytes, Paid] = {}  # every relay paid so far (a relay taken again keeps its session)
        self.dead: set[bytes] = set()  # relays a circuit could not reach
        self._repath = asyncio.Lock()

    async def relays(self) -> list[RelayInfo]:
        """The relays a path may take: ACTIVE, and heard from (a heartbeat, or the registration) within the
        accepted age (by the node's clock)."""
        return [RelayInfo.from_json(r) for r in (await self.api.get("/api/netflow/relays"))["relays"]
                if r["status"] == "ACTIVE" and int(r["heartbeat_age_ms"]) <= self.max_heartbeat_age_ms]

    async def open_sessions(self, path: Sequence[RelayInfo], deposit_sat: Optional[int] = None,
                            blocks: Optional[int] = None) -> None:
        """The path: one paid session per relay (opened and committed on the L2 before any byte flows, unless this
        client has one with that relay already)."""
        deposit_sat = self.deposit_sat if deposit_sat is None else deposit_sat
        blocks = self.session_blocks if blocks is None else blocks
        tip = int((await self.api.status())["height"])
        paid = []
        for r in path:
            p = self.sessions.get(r.identity)
            if p is None or p.spent():
                session_secret = os.urandom(32)
                key = PrivateKey(session_secret).public_key_xonly.format()
                payload = SessionOpen(r.identity, key, deposit_sat, r.price_msat_per_mib, MIB, tip + blocks)
                res = await self.api.sign_and_submit(self.secret, payload, 1)
                st = await self.api.wait_tx(res["txid"], 60)
                if st is None or st.get("status") != "committed":
                    raise RuntimeError(f"the session with relay {r.endpoint} was not committed: {st}")
                p = self.sessions[r.identity] = Paid(r, bytes.fromhex(res["txid"]), session_secret, deposit_sat)
            paid.append(p)
        self.paid = paid

    async def circuit(self, attempts: int = 3) -> "Circuit":
        """A circuit over the current path; when a relay of it cannot be reached, another path without the relays
        found dead (the others keep their sessions) — failover, up to `attempts` paths."""
        if any(p.spent() for p in self.paid):  # renew spent sessions before a new circuit needs them
            async with self._repath:
                if any(p.spent() for p in self.paid):
                    await self.open_sessions([p.relay for p in self.paid])
        for attempt in range(attempts):
            c = Circuit(self.network, list(self.paid))
            try:
                await c.build()
                return c
            except HopFailed as e:
                c.close()
                dead = c.paid[e.hop].relay
                log.warning("relay %s failed (%s): choosing another path", dead.endpoint, e)
                async with self._repath:
                    self.dead.add(dead.identity)
                    if any(p.relay.identity in self.dead for p in self.paid):
                        live = [r for r in await self.relays() if r.identity not in self.dead]
                        await self.open_sessions(choose_path(live, self.hops, self.rng))
        raise HopFailed(-1, f"no path worked in {attempts} attempts")

    async def pay_loop(self, circuits: set[Circuit]) -> None:
        while True:
            await asyncio.sleep(RECEIPT_EVERY_S / 2)
            for c in list(circuits):
                with contextlib.suppress(Exception):
                    await c.pay()

    async def socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    circuits: set[Circuit]) -> None:
        circuit: Optional[Circuit] = None
        try:
            dest = await socks_handshake(reader, writer)
            if dest is None:
                return
            try:
                circuit = await self.circuit()
                exit_hop = len(circuit.paid) - 1
                await circuit.send(exit_hop, Cmd.CONNECT, dest.encode())
                hop, cmd, data = await asyncio.wait_for(circuit.recv(), 60)
                ok = (hop, cmd, data) == (exit_hop, Cmd.CONNECTED, b"\x00")
            except (OSError, WireError, HopFailed, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                log.warning("circuit failed: %s", e)
                ok = False
            writer.write(socks_reply(0x00 if ok else 0x04))
            await writer.drain()
            if not ok or circuit is None:
                if circuit is not None:
                    circuit.ended = True  # no stream began
                return
            circuits.add(circuit)
            await pump(circuit, reader, writer)
        except WireError as e:  # a layer that did not open, or a command out of place: a relay of the path is bad
            log.warning("path dropped: %s", e)
            if circuit is not None:
                self.dead.update(p.relay.identity for p in circuit.paid)  # the next circuit takes another path
                circuit.ended = True  # nothing more is read from it
        except (ConnectionError, asyncio.IncompleteReadError) as e:
            log.info("SOCKS connection ended: %s", e)
        finally:
            if circuit is not None:
                circuits.discard(circuit)
                if not circuit.ended:  # the application went away mid-stream (or the path broke: this fails fast)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(circuit.abandon(), ABANDON_S)
                with contextlib.suppress(Exception):
                    await circuit.pay(force=True)
                circuit.close()
            writer.close()


async def pump(circuit: Circuit, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    exit_hop = len(circuit.paid) - 1

    async def upload() -> None:
        while True:
            chunk = await reader.read(MAX_DATA)
            if not chunk:
                await circuit.send(exit_hop, Cmd.END, b"")
                return
            await circuit.send(exit_hop, Cmd.DATA, chunk)

    up = asyncio.create_task(upload())
    try:
        while True:
            hop, cmd, data = await circuit.recv()
            if hop != exit_hop:
                raise WireError(f"command {cmd:#x} from hop {hop + 1}, not the exit")
            if cmd == Cmd.DATA:
                writer.write(data)
                await circuit.pay()  # a receipt once a MiB more is due: the relays' windows never close
                await writer.drain()
            elif cmd == Cmd.END:
                circuit.ended = True
                if writer.can_write_eof():
                    writer.write_eof()
                with contextlib.suppress(asyncio.TimeoutError):  # an application that never ends its side
                    await asyncio.wait_for(up, UPLOAD_END_S)
                return
            else:
                raise WireError(f"unexpected command {cmd:#x} from the exit")
    finally:
        up.cancel()
        with contextlib.suppress(BaseException):
            await up


async def socks_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Optional[str]:
    """RFC 1928: the greeting (method 0, no authentication) and a CONNECT request; the destination as host:port, or
    None once a refusal was answered."""
    ver, n = await reader.readexactly(2)
    methods = await reader.readexactly(n)
    if ver != 5 or 0 not in methods:
        writer.write(b"\x05\xff")
        await writer.drain()
        return None
    writer.write(b"\x05\x00")
    ver, cmd, _, atyp = await reader.readexactly(4)
    if atyp == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif atyp == 3:
        (ln,) = await reader.readexactly(1)
        host = (await reader.readexactly(ln)).decode("ascii", "replace")
    elif atyp == 4:
        host = f"[{ipaddress.IPv6Address(await reader.readexactly(16))}]"
    else:
        writer.write(socks_reply(0x08))
        await writer.drain()
        return None
    (port,) = struct.unpack(">H", await reader.readexactly(2))
    if ver != 5 or cmd != 1:
        writer.write(socks_reply(0x07))  # only CONNECT
        await writer.drain()
        return None
    return f"{host}:{port}"


def socks_reply(code: int) -> bytes:
    return bytes((5, code, 0, 1)) + b"\0\0\0\0" + b"\0\0"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="l2-netflow", description=__doc__.splitlines()[0])
    ap.add_argument("--api", default="http://127.0.0.1:8650", help="an l2d node's REST base URL (default: make run's)")
    ap.add_argument("--key", required=True, type=Path, help="the client's L2 key file (pays the sessions)")
    ap.add_argument("--socks", default="127.0.0.1:1080", help="host:port of the SOCKS5 front")
    ap.add_argument("--mode", choices=("direct", "onion"), default="direct")
    ap.add_argument("--hops", type=int, default=3, help="relays of an onion path (2 or 3)")
    ap.add_argument("--deposit", type=int, default=100_000, help="sat escrowed per relay")
    ap.add_argument("--session-blocks", type=int, default=10_000, help="sessions expire this many L2 blocks on")
    ap.add_argument("--relays", default="", help="comma-separated relay identities (hex), first hop first")
    ap.add_argument("--max-heartbeat-age", type=float, default=MAX_HEARTBEAT_AGE_S,
                    help="seconds: relays silent longer are not chosen (default 180)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    if a.mode == "onion" and a.hops not in (2, 3):
        ap.error("--hops must be 2 or 3")
    setup_logging(a.log_level)
    return uvloop.run(_run(a))  # libuv's loop: more relayed bytes per CPU second (bench_netflow)


async def _run(a: Any) -> int:
    secret = load_secret(a.key)
    host, _, port = a.socks.rpartition(":")
    async with AsyncClient(a.api) as api:
        hops = 1 if a.mode == "direct" else a.hops
        client = NetflowClient(api, await api.network(), secret, hops, a.deposit, a.session_blocks,
                               max_heartbeat_age_s=a.max_heartbeat_age)
        relays = await client.relays()
        try:
            if a.relays:
                by_id = {r.identity.hex(): r for r in relays}
                unknown = [x for x in a.relays.split(",") if x not in by_id]
                if unknown:
                    raise ValueError(f"not an active registered relay heard from within {a.max_heartbeat_age:g} s: "
                                     f"{', '.join(unknown)}")
                path = [by_id[x] for x in a.relays.split(",")]
            else:
                path = choose_path(relays, hops, client.rng)
        except ValueError as e:
            print(f"l2-netflow: {e}", file=sys.stderr)
            return 2
        await client.open_sessions(path)
        circuits: set[Circuit] = set()
        server = await asyncio.start_server(lambda r, w: client.socks(r, buffered(w), circuits), host, int(port),
                                            limit=LINK_BUFFER)
        bound = server.sockets[0].getsockname()
        print(f"l2-netflow SOCKS5 on {bound[0]}:{bound[1]} through "
              f"{' -> '.join(p.relay.endpoint for p in client.paid)}; sessions "
              f"{','.join(p.session_id.hex() for p in client.paid)}", flush=True)
        payer = asyncio.create_task(client.pay_loop(circuits))
        try:
            await until_signalled()
        finally:
            server.close()
            payer.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
