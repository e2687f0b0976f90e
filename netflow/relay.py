"""`l2-relay`: a NetFlow relay. It carries circuits (docs/netflow.md, "Data plane"), is paid per MiB by session
receipts, and settles the highest receipt of each session on the L2.

A circuit reaches the relay as a TCP link whose first frame is CREATE (the client's ephemeral X25519 key and the id
of the client's paid session with this relay). The relay reads the session from the L2 (its server must be this
relay, OPEN, priced at least at this relay's price per MiB, not about to expire), answers CREATED and then serves the
circuit's commands: EXTEND (open a link to the next relay), FORWARD (pass a layer on), CONNECT and DATA (the exit:
a TCP connection to the destination), RECEIPT (a payment for this relay) and END.

Every byte the relay moves onward for the circuit (the next hop's layers, or the destination's data) counts as a unit
of the session, in both directions; the client counts the same bytes. Once the bytes carried exceed the units paid by
the best receipt by `window` bytes, the relay stops reading the destination or the next hop (backpressure, so the
client's downloads pause until it pays); past twice the window, or on a receipt that is not valid, the circuit is
closed. A relay's loss to a client that stops paying is at most one window.

Each receipt accepted is appended to a file (`--receipts`, beside the key by default) before the relay relies on it:
a relay killed before it settled reads the file back when it restarts and settles what the L2 has not (ReceiptLog).

It sends a RelayHeartbeat at start (registering counts as one) and every `--heartbeat-every` seconds (60): clients
pass over a relay not heard from for longer than they accept (180 s by default), so a relay that dies stops being
chosen even before the federation's probes weigh it 0. SIGINT/SIGTERM stop it after a last settlement; a registered
relay stays ACTIVE (a restart resumes it) and says how to leave: `l2-relay exit --api URL --key K` (no longer
selected), then after the exit delay `l2-relay withdraw --api URL --key K` (the stake back).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from coincurve import PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
import uvloop

from l2d.aio import until_signalled
from l2d.client import ApiError, AsyncClient
from l2d.datadir import write_atomic
from l2d.core.errors import L2Error
from l2d.core.params import Network
from l2d.core.relay_tx import RelayHeartbeat
from l2d.core.session import SessionRecord, SessionStatus, check_receipt
from l2d.core.session_tx import Receipt, SessionSettle
from l2d.keys import load_or_create_secret
from l2d.leave import COMMANDS, RELAY, find, stop_note
from l2d.leave import main as leave_main
from l2d.logs import setup_logging

from .wire import (Buf, Chunk, Cmd, HopKeys, Kind, Link, WireError, connect, frame, frame_head, relay_hop, serve,
                   x25519_public)

log = logging.getLogger(__name__)

MIB = 1 << 20
WINDOW = 4 * MIB  # default credit window
EXPIRY_MARGIN = 10  # a session must stay open at least this many L2 blocks to be served
HANDSHAKE_S = 30.0  # a link's CREATE must arrive within this (a link that sends nothing, or half a frame, is closed)
PAY_WAIT_S = 300.0  # a circuit waiting this long for a receipt with its credit window used up is closed
HEARTBEAT_EVERY_S = 60.0  # between RelayHeartbeats (l2-netflow passes over relays silent for 180 s)


@dataclass
class SessionState:
    """What the relay knows of one session: its record, the best receipt, the bytes carried (all its circuits)."""

    sid: bytes
    record: SessionRecord
    best: Optional[Receipt] = None
    settled_seq: int = 0
    carried: int = 0
    paid: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever a better receipt arrives

    @property
    def paid_units(self) -> int:
        """The units the best receipt pays for: its units, or fewer if its amount (capped by the deposit) does
        not cover them at the session's price."""
        if self.best is None:
            return 0
        rec = self.record
        if rec.price_msat == 0:
            return self.best.units
        return min(self.best.units, self.best.amount_sat * rec.unit * 1000 // rec.price_msat)


class CircuitClosed(Exception):
    pass


class ReceiptLog:
    """The receipts the relay accepted, appended to a file as they arrive (Receipt.SIZE bytes each, nothing else):
    the best of each session is what the relay is owed until it has settled it, so a relay killed before settling
    reads them back when it restarts and settles them. Each append is one write(2), in the kernel's page cache once
    made (a killed process loses none); the file is fsynced before every settlement pass (a power cut loses at most
    the receipts since). At start, and once it has grown past COMPACT_BYTES, the file is rewritten (atomically)
    with only the receipts still owed."""

    COMPACT_BYTES = 1 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, r: Receipt) -> None:
        """One record, whole (a short write is continued). OSError (a full disk): the caller logs it, and the
        receipt is then only in memory."""
        data = memoryview(r.encode())
        while data:
            data = data[os.write(self._fd, data):]

    def sync(self) -> None:
        os.fsync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def best(self) -> dict[bytes, Receipt]:
        """The highest-seq receipt of each session in the file (a torn last record, or one that does not decode,
        is skipped: the relay checks the others against the L2 before it settles them)."""
        data = self.path.read_bytes()
        out: dict[bytes, Receipt] = {}
        for i in range(0, len(data) - Receipt.SIZE + 1, Receipt.SIZE):
            try:
                r = Receipt.decode(data[i:i + Receipt.SIZE])
            except L2Error:
                continue
            if r.session_id not in out or r.seq > out[r.session_id].seq:
                out[r.session_id] = r
        return out

    def rewrite(self, keep: list[Receipt]) -> None:
        write_atomic(self.path, b"".join(r.encode() for r in keep))
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)


class Relay:
    def __init__(self, *, api: AsyncClient, network: Network, secret: bytes, x25519_key: X25519PrivateKey,
                 price_msat_per_mib: int, exit_allowed: bool, window: int = WINDOW, settle_every_s: float = 5.0,
                 fee_sat: int = 1, max_rate_kib_s: int = 0, handshake_s: float = HANDSHAKE_S,
                 receipts: ReceiptLog, pay_wait_s: float = PAY_WAIT_S,
                 heartbeat_every_s: float = HEARTBEAT_EVERY_S) -> None:
        self.api, self.network = api, network
        self._secret = secret  # the identity key: it signs the settlements
        self.identity = PrivateKey(secret).public_key_xonly.format()
        self.x25519 = x25519_key
        self.price = price_msat_per_mib
        self.exit_allowed = exit_allowed
        self.window = window
        self.settle_every_s = settle_every_s
        self.fee_sat = fee_sat
        self.handshake_s = handshake_s
        self.pay_wait_s = pay_wait_s
        self.heartbeat_every_s = heartbeat_every_s  # 0: none
        self.beat_at = -float("inf")  # when the last heartbeat was sent (monotonic): the first tick sends one
        self.sessions: dict[bytes, SessionState] = {}
        self.receipts = receipts
        self._tip = 0
        self.max_rate = max_rate_kib_s * 1024  # bytes/s over all circuits; 0 = unlimited
        self._free_at = 0.0  # when the rate limit lets the next byte go

    async def throttle(self, n: int) -> None:
        """Hold n bytes back until the relay's rate limit (--max-rate) has had time to carry them: never faster,
        whatever the chunk size."""
        if not self.max_rate:
            return
        now = time.monotonic()
        self._free_at = max(now, self._free_at) + n / self.max_rate
        await asyncio.sleep(self._free_at - now)

    # -- sessions ---------------------------------------------------------------------------------------------
    async def record(self, sid: bytes) -> SessionRecord:
        """The session's committed record (ApiError if the L2 has none)."""
        return SessionRecord.decode(bytes.fromhex((await self.api.get(f"/api/sessions/{sid.hex()}"))["value"]))

    async def session(self, sid: bytes) -> SessionState:
        s = self.sessions.get(sid)
        if s is not None and s.record.status == SessionStatus.OPEN and s.record.expiry_height > self._tip:
            return s
        try:
            rec = await self.record(sid)
            self._tip = int((await self.api.status())["height"])
        except ApiError as e:
            raise WireError(f"session {sid.hex()}: {e}") from None
        why = None
        if rec.server != self.identity:
            why = "its server is another relay"
        elif rec.status != SessionStatus.OPEN:
            why = "it is closed"
        elif rec.unit != MIB or rec.price_msat < self.price:
            why = f"it pays {rec.price_msat} msat per {rec.unit} units, this relay asks {self.price} per MiB"
        elif rec.expiry_height < self._tip + EXPIRY_MARGIN:
            why = f"it expires at L2 height {rec.expiry_height}"
        if why is not None:
            raise WireError(f"session {sid.hex()} is not served: {why}")
        if s is None:
            s = self.sessions[sid] = SessionState(sid, rec)
        else:
            s.record = rec
        return s

    def take_receipt(self, s: SessionState, raw: bytes) -> None:
        """A receipt better than the best so far (every consensus rule, against the best rather than the settled
        one); WireError otherwise."""
        try:
            r = Receipt.decode(raw)
            if r.session_id != s.sid:
                raise WireError(f"a receipt of session {r.session_id.hex()} on a circuit of {s.sid.hex()}")
            base = s.record if s.best is None else replace(s.record, seq=s.best.seq, settled_sat=s.best.amount_sat,
                                                               units=s.best.units)
            check_receipt(base, r, self.network.id, self._tip)
        except L2Error as e:
            raise WireError(f"receipt refused: {e}") from None
        try:
            self.receipts.append(r)
        except OSError as e:  # the relay's own disk: the receipt still counts, but a crash would lose it
            log.error("receipt of session %s not written to %s: %s", s.sid.hex(), self.receipts.path, e)
        s.best = r
        s.paid.set()

    async def recover(self) -> None:
        """The receipts the log holds that the L2 has not settled (sessions of this relay, OPEN, not expired): owed,
        so the next settlement redeems them. A receipt whose session could not be read (the node unreachable,
        busy) stays in the log for the next start; one of a session the L2 does not have is dropped. The log is
        rewritten with what is kept."""
        with contextlib.suppress(ApiError):
            self._tip = int((await self.api.status())["height"])
        keep = []
        for sid, r in self.receipts.best().items():
            try:
                rec = await self.record(sid)
            except ApiError as e:
                log.warning("receipt of session %s not recovered: %s", sid.hex(), e)
                if e.status != 404:
                    keep.append(r)
                continue
            if (rec.server != self.identity or rec.status != SessionStatus.OPEN or r.seq <= rec.seq
                    or rec.expiry_height < self._tip):
                continue
            # it carried at least what it was paid: the credit window starts from there
            self.sessions[sid] = SessionState(sid, rec, best=r, settled_seq=rec.seq, carried=r.units)
            keep.append(r)
            log.info("receipt recovered", extra={"session": sid.hex(), "seq": r.seq, "amount_sat": r.amount_sat})
        self.receipts.rewrite(keep)  # before any circuit: no append can fall between

    async def settle(self) -> None:
        """Redeem each session's best receipt not yet settled; forget sessions past their expiry once settled (a
        receipt is worth nothing after it: the client may close the session)."""
        with contextlib.suppress(ApiError):
            self._tip = int((await self.api.status())["height"])
        await asyncio.to_thread(self.receipts.sync)
        for sid, s in list(self.sessions.items()):
            if s.best is None or s.best.seq <= s.settled_seq:
                if s.record.expiry_height < self._tip:
                    del self.sessions[sid]
                continue
            try:
                best = s.best
                # what the L2 has settled: a settlement this relay saw time out may have been committed since
                on_l2 = await self.record(sid)
                if on_l2.seq >= best.seq:
                    s.settled_seq = on_l2.seq
                    continue
                if on_l2.status != SessionStatus.OPEN or on_l2.expiry_height < self._tip:
                    log.warning("receipt %d of session %s cannot be settled any more (%s, expiry height %d): lost",
                                best.seq, sid.hex(), on_l2.status.name, on_l2.expiry_height)
                    del self.sessions[sid]
                    continue
                res = await self.api.sign_and_submit(self._secret, SessionSettle(best), self.fee_sat)
                st = await self.api.wait_tx(res["txid"], 30)  # the next settlement takes the next nonce
                if st is None or st.get("status") != "committed":  # tried again at the next settlement
                    log.warning("settlement of session %s not committed yet: %s", sid.hex(), st)
                    continue
                s.settled_seq = best.seq
                log.info("session settled", extra={"session": sid.hex(), "seq": best.seq, "amount_sat": best.amount_sat,
                                                   "txid": res.get("txid")})
            except ApiError as e:
                log.warning("settlement of session %s refused: %s", sid.hex(), e)
            await self.heartbeat()  # when due: many slow settlements must not make the relay look silent
        if self.receipts.size() > ReceiptLog.COMPACT_BYTES:
            # on the event loop, so that no receipt is appended to the file being replaced
            self.receipts.rewrite([s.best for s in self.sessions.values()
                                   if s.best is not None and s.best.seq > s.settled_seq])

    async def heartbeat(self) -> None:
        """A RelayHeartbeat once heartbeat_every_s have passed since the last: clients pass over relays silent for
        longer than they accept (GET /api/netflow/relays gives each relay's heartbeat age)."""
        if not self.heartbeat_every_s or time.monotonic() - self.beat_at < self.heartbeat_every_s:
            return
        self.beat_at = time.monotonic()  # a refused one is not tried again before the next interval
        try:
            res = await self.api.sign_and_submit(self._secret, RelayHeartbeat(), self.fee_sat)
            st = await self.api.wait_tx(res["txid"], 30)
            if st is None or st.get("status") != "committed":
                log.warning("heartbeat not committed: %s", st)
            else:
                log.info("heartbeat", extra={"height": st.get("height"), "txid": res["txid"]})
        except ApiError as e:
            log.warning("heartbeat refused: %s", e)

    async def duties(self) -> None:
        """Settle at once and every settle_every_s, send a heartbeat every heartbeat_every_s, one after the other
        (each transaction takes the next nonce)."""
        tick = min(self.settle_every_s, self.heartbeat_every_s or self.settle_every_s)
        settled_at = -float("inf")  # the first pass at once: it redeems what recover() found owed
        while True:
            try:
                if time.monotonic() - settled_at >= self.settle_every_s:
                    settled_at = time.monotonic()
                    await self.settle()
                await self.heartbeat()
            except Exception:  # a pass that fails (a full disk, say) is logged; the next one starts afresh
                log.exception("settlement or heartbeat failed")
            await asyncio.sleep(tick)

    # -- circuits ---------------------------------------------------------------------------------------------
    async def handle(self, link: Link) -> None:
        """Serve one link from a client or a previous hop (netflow.wire.serve runs this for each)."""
        peer = link.get_extra_info("peername")
        try:
            try:
                body = bytes(await asyncio.wait_for(link.read_frame(), self.handshake_s))
            except asyncio.TimeoutError:
                raise WireError(f"no CREATE within {self.handshake_s:g} s") from None
            if len(body) != 65 or body[0] != Kind.CREATE:
                raise WireError("the first frame of a link is CREATE")
            client_pub, sid = body[1:33], body[33:65]
            s = await self.session(sid)
            keys = relay_hop(self.x25519, client_pub)
            link.write(frame(bytes((Kind.CREATED,)) + keys.confirm))
            await link.drain()
            await _Circuit(self, s, keys, link).run()
        except (WireError, CircuitClosed) as e:
            log.info("circuit closed", extra={"peer": str(peer), "why": str(e)})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            link.close()


class _Circuit:
    def __init__(self, relay: Relay, s: SessionState, keys: HopKeys, up: Link) -> None:
        self.relay, self.s, self.keys = relay, s, keys
        self.up = up
        self.down: Optional[Link] = None  # the next relay, or the destination (the exit)
        self.down_task: Optional[asyncio.Task[None]] = None
        self.is_exit = False
        self.stopping = False  # CLOSE came: the destination is no longer read

    async def send_up(self, cmd: Cmd, data: Union[Buf, Chunk]) -> None:
        self.up.write(self.keys.seal_bwd(cmd, data, framed=True))
        await self.up.drain()

    async def carry(self, n: int) -> None:
        """n more bytes moved onward: counted for the session, after the relay's rate limit."""
        await self.relay.throttle(n)
        self.count(n)

    def count(self, n: int) -> None:
        self.s.carried += n
        if self.s.carried - self.s.paid_units > 2 * self.relay.window:
            raise CircuitClosed(f"{self.s.carried - self.s.paid_units} bytes carried without a receipt")

    async def credit(self) -> None:
        """Wait while the bytes carried exceed the paid units by the window (the client pays, or the circuit
        waits); CircuitClosed once no better receipt came for pay_wait_s (a client that stopped paying holds no
        connection for ever; one whose application pauses reading that long opens a new circuit)."""
        while self.s.carried - self.s.paid_units > self.relay.window and not self.stopping:
            self.s.paid.clear()
            try:
                await asyncio.wait_for(self.s.paid.wait(), self.relay.pay_wait_s)
            except asyncio.TimeoutError:
                raise CircuitClosed(f"no receipt for {self.relay.pay_wait_s:g} s with the credit window of "
                                    f"{self.relay.window} bytes used up") from None

    async def run(self) -> None:
        try:
            while True:
                plain = self.keys.open_fwd(await self.up.read_frame())
                await self.command(plain[0], plain[1:])
        finally:
            if self.down_task is not None:
                self.down_task.cancel()
                with contextlib.suppress(BaseException):
                    await self.down_task
            if self.down is not None:
                self.down.close()

    async def command(self, cmd: int, data: memoryview) -> None:
        if cmd == Cmd.FORWARD:
            if self.down is None or self.is_exit:
                raise WireError("FORWARD before EXTEND")
            await self.carry(len(data))
            self.down.write(frame_head(data))
            self.down.write(data)
            await self.down.drain()
        elif cmd == Cmd.DATA:
            if self.down is None or not self.is_exit:
                raise WireError("DATA before CONNECT")
            await self.carry(len(data))
            self.down.write(data)
            await self.down.drain()
        elif cmd == Cmd.RECEIPT:
            self.relay.take_receipt(self.s, bytes(data))
        elif cmd == Cmd.END:
            if self.down is not None and self.is_exit and self.down.can_write_eof():
                self.down.write_eof()
        elif cmd == Cmd.CLOSE:
            self.close_stream()
        elif cmd == Cmd.EXTEND:
            await self.extend(bytes(data))
        elif cmd == Cmd.CONNECT:
            await self.connect(bytes(data))
        else:
            raise WireError(f"unknown command {cmd:#x}")

    async def extend(self, data: bytes) -> None:
        if self.down is not None or len(data) < 66:
            raise WireError("EXTEND on a circuit already extended, or malformed")
        host, port = _endpoint(data[64:])
        try:
            down = await asyncio.wait_for(connect(host, port), 30)
        except (OSError, asyncio.TimeoutError) as e:
            raise CircuitClosed(f"next relay {host}:{port} unreachable: {e}") from None
        down.write(frame(bytes((Kind.CREATE,)) + data[:64]))
        await down.drain()
        try:
            created = bytes(await asyncio.wait_for(down.read_frame(), 30))
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, WireError):
            down.close()
            raise CircuitClosed(f"next relay {host}:{port} refused the circuit") from None
        if len(created) != 17 or created[0] != Kind.CREATED:
            down.close()
            raise WireError("the next relay did not answer CREATED")
        self.down = down
        await self.send_up(Cmd.EXTENDED, created[1:])
        self.down_task = asyncio.create_task(self.from_next(down))

    async def from_next(self, down: Link) -> None:
        try:
            while True:
                chunk = await down.read()
                assert chunk is not None  # a framed link raises at its end
                await self.credit()
                await self.carry(chunk.n)
                await self.send_up(Cmd.FORWARD, chunk)  # sealed around the next hop's body, in its buffer
        except (asyncio.IncompleteReadError, OSError, WireError, CircuitClosed):
            self.up.close()  # the rest of the circuit is gone: so is this link

    async def connect(self, data: bytes) -> None:
        if self.down is not None:
            raise WireError("CONNECT on a circuit already in use")
        if not self.relay.exit_allowed:
            await self.send_up(Cmd.CONNECTED, b"\x01")
            raise CircuitClosed("this relay is not an exit")
        host, port = _endpoint(data)
        try:
            down = await asyncio.wait_for(connect(host, port, framed=False), 30)
        except (OSError, asyncio.TimeoutError):
            await self.send_up(Cmd.CONNECTED, b"\x01")
            return
        self.down, self.is_exit = down, True
        await self.send_up(Cmd.CONNECTED, b"\x00")
        self.down_task = asyncio.create_task(self.from_destination(down))

    def close_stream(self) -> None:
        """CLOSE: the destination's connection is closed and no more of it is read; from_destination then sends END
        after the last chunk it counted (a chunk is counted just before it is sealed and written), so the client,
        reading up to END, counts the same bytes this relay does, and pays for them. (Not by cancelling the task:
        Python 3.11's wait_for, in credit(), can swallow a cancellation that meets a receipt.)"""
        if self.down is None or not self.is_exit:
            raise WireError("CLOSE before CONNECT")
        self.stopping = True
        self.down.close()
        self.s.paid.set()  # a credit() wait re-checks, and sees stopping

    async def from_destination(self, down: Link) -> None:
        try:
            while (chunk := await down.read()) is not None:
                await self.credit()
                if self.stopping:
                    break
                await self.carry(chunk.n)
                await self.send_up(Cmd.DATA, chunk)  # sealed in the buffer the destination's bytes came in
            await self.send_up(Cmd.END, b"")
        except (OSError, CircuitClosed):  # the destination's connection broke (reset, timed out), or the circuit
            self.up.close()


def _endpoint(raw: bytes, listen: bool = False) -> tuple[str, int]:
    """host:port (port 0 only to listen on: any free port)."""
    try:
        host, _, port = raw.decode("ascii").rpartition(":")
        p = int(port)
    except (UnicodeDecodeError, ValueError):
        raise WireError(f"bad endpoint {raw[:80]!r}") from None
    if not host or not (0 if listen else 1) <= p < 65536:
        raise WireError(f"bad endpoint {raw[:80]!r}")
    return host.strip("[]"), p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in COMMANDS:  # `l2-relay exit|withdraw ...`: leave the registry (l2d/leave.py)
        return leave_main(RELAY, argv, "http://127.0.0.1:8650")
    ap = argparse.ArgumentParser(prog="l2-relay", description=__doc__.splitlines()[0],
                                 epilog="Leaving: `l2-relay exit --api URL --key K` (no longer selected), then after "
                                        "the exit delay `l2-relay withdraw --api URL --key K` (the stake back); "
                                        "`l2-relay exit --help`.")
    ap.add_argument("--api", default="http://127.0.0.1:8650", help="an l2d node's REST base URL (default: make run's)")
    ap.add_argument("--key", required=True, type=Path, help="the relay's identity key file (its L2 account)")
    ap.add_argument("--x25519-key", required=True, type=Path, help="its X25519 key file (created 0600 if missing)")
    ap.add_argument("--listen", default="127.0.0.1:9050", help="host:port to accept circuits on")
    ap.add_argument("--exit", action="store_true", help="open connections to destinations (the last hop)")
    ap.add_argument("--register", action="store_true", help="register (or keep) the relay on the L2 first")
    ap.add_argument("--stake", type=int, default=10_000, help="stake locked by --register (sat)")
    ap.add_argument("--rate", type=int, default=10_240, help="advertised rate, KiB/s (--register)")
    ap.add_argument("--price", type=int, default=1_000_000, help="price, msat per MiB")
    ap.add_argument("--operator", default="", help="64-hex operator id (default: the relay's identity)")
    ap.add_argument("--window", type=int, default=WINDOW, help="credit window, bytes (default 4 MiB)")
    ap.add_argument("--settle-every", type=float, default=5.0, help="seconds between settlements")
    ap.add_argument("--heartbeat-every", type=float, default=HEARTBEAT_EVERY_S,
                    help="seconds between heartbeats (default 60; 0: none, clients then pass the relay over)")
    ap.add_argument("--receipts", type=Path, default=None,
                    help="the file the receipts are kept in until settled (default: the key file's name, .receipts)")
    ap.add_argument("--pay-wait", type=float, default=PAY_WAIT_S,
                    help="seconds a circuit waits for a receipt with its window used up before it is closed")
    ap.add_argument("--max-rate", type=int, default=0, help="carry at most this many KiB/s (0: no limit)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    return uvloop.run(_run(a))  # libuv's loop: more relayed bytes per CPU second (bench_netflow)


async def _run(a: Any) -> int:
    from l2d.core.relay_tx import FLAG_ENTRY, FLAG_EXIT, RelayRegister

    secret = load_or_create_secret(a.key, "relay identity")
    x_secret = load_or_create_secret(a.x25519_key, "relay X25519")
    x_key = X25519PrivateKey.from_private_bytes(x_secret)
    host, port = _endpoint(a.listen.encode(), listen=True)
    receipts_path = a.receipts or a.key.with_suffix(".receipts")
    try:
        receipts = ReceiptLog(receipts_path)
    except OSError as e:
        print(f"l2-relay: cannot open the receipts file {receipts_path} ({e.strerror}): give a writable one with "
              f"--receipts", file=sys.stderr)
        return 2
    async with AsyncClient(a.api) as api:
        network = await api.network()
        relay = Relay(api=api, network=network, secret=secret, x25519_key=x_key, price_msat_per_mib=a.price,
                      exit_allowed=a.exit, window=a.window, settle_every_s=a.settle_every, max_rate_kib_s=a.max_rate,
                      pay_wait_s=a.pay_wait, heartbeat_every_s=a.heartbeat_every,
                      receipts=receipts)
        await relay.recover()  # what an earlier run was paid and did not settle, settled by the first pass below
        server = await serve(relay.handle, host, port)
        bound = server.sockets[0].getsockname()
        endpoint = f"{bound[0]}:{bound[1]}"
        if a.register:
            operator = bytes.fromhex(a.operator) if a.operator else relay.identity
            flags = FLAG_ENTRY | (FLAG_EXIT if a.exit else 0)
            payload = RelayRegister(a.stake, x25519_public(x_key), operator, flags, a.rate, a.price,
                                    endpoint.encode())
            try:
                res = await api.sign_and_submit(secret, payload, 1)
                await api.wait_tx(res["txid"], 60)
                relay.beat_at = time.monotonic()  # registering counts as a heartbeat
            except ApiError as e:
                if "is registered" not in str(e):
                    raise
        print(f"l2-relay {relay.identity.hex()} listening on {endpoint}", flush=True)
        settle = asyncio.create_task(relay.duties())
        try:
            await until_signalled()
        finally:
            server.close()
            settle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settle
            # what was paid is redeemed before the relay goes (its receipts file stays open until the process
            # ends: links still open may still pay)
            await relay.settle()
            await _stop_note(api, a, relay.identity.hex())
    return 0


async def _stop_note(api: AsyncClient, a: Any, identity: str) -> None:
    """Say where the stake stands and how to leave (stopping leaves a registered relay ACTIVE: a restart resumes
    it)."""
    try:
        rec = find(RELAY, await api.get(RELAY.listing), identity)
    except (ApiError, ValueError) as e:
        log.warning("stopped; could not read the relay's record (%s)", e)
        return
    note = stop_note(RELAY, a.api, str(a.key), rec)
    (log.warning if rec is not None and rec["status"] == "ACTIVE" else log.info)("stopped: %s", note)


if __name__ == "__main__":
    sys.exit(main())
