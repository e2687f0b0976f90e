"""The member transport: authenticated WebSocket links between federation members for the consensus messages and
transaction gossip, and signed HTTP fetches of block ranges and transactions (docs/federation.md, "Member
transport").

Each member keeps one outbound WebSocket to every other member and sends on it only; what it receives comes in on
the other members' connections to it. A connection proves the connecting member's key (challenge, BIP340
signature) before anything it sends is delivered. Sends never block the caller: `broadcast`, `send` and
`gossip_txs` append to bounded per-peer queues (the oldest entry is dropped and counted on overflow) that one
task per peer drains, reconnecting with capped exponential backoff, each write under a timeout, so a slow or
silent member delays nobody else. Delivery is at most once and in order per connection: a frame in flight when a
connection breaks is lost (the state machine retransmits by rounds).

The host mounts `routes(transport)` into the node's aiohttp app, calls `await start()` once the app serves, and
`await close()` on shutdown. Messages are opaque bytes here; their signatures are the state machine's to check.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import random
import time
from collections import Counter, OrderedDict, deque
from contextlib import suppress
from dataclasses import dataclass, fields
from typing import AsyncIterator, Awaitable, Callable, Optional, Sequence, Union

import aiohttp
from aiohttp import web
from coincurve import PrivateKey

from ..core.params import Network
from ..core.tx import is_valid_key
from . import wire
from .wire import (FRAME_MESSAGE, FRAME_TXS, Close, FetchError, FrameTooLarge, HandshakeError, HandshakeRefused,
                   HandshakeTimeout, MalformedFrame, MalformedResponse, PeerUnavailable, RequestAuthError)

log = logging.getLogger(__name__)

WS_PATH = "/api/federation/ws"
BLOCKS_PATH = "/api/federation/blocks"
TXS_PATH = "/api/federation/txs"
LOG_INTERVAL_S = 60.0  # one log line per (peer or remote address, reason) per interval

BlockEntry = tuple[bytes, bytes]  # (block raw, commit raw)
MaybeAwaitable = Union[list[bytes], Awaitable[list[bytes]]]


@dataclass(frozen=True, slots=True)
class Peer:
    """Another member: its index in the membership, its x-only block-signing key, its API base URL."""
    index: int
    key: bytes
    url: str  # e.g. "http://10.0.0.2:8332"; the routes live under /api/federation/


@dataclass(frozen=True, slots=True)
class Handlers:
    """What the host provides. on_message and on_txs run on the event loop for each frame received, in order per
    connection, and must not block. serve_blocks(from_height, max_count) returns up to max_count consecutive
    (block raw, commit raw) from from_height (fewer at the tip, none above it); serve_txs(txids) the raw
    transactions it has among txids. Both may be plain functions or coroutines."""
    on_message: Callable[[bytes, int], None]
    on_txs: Callable[[list[bytes], int], None]
    serve_blocks: Callable[[int, int], Union[list[BlockEntry], Awaitable[list[BlockEntry]]]]
    serve_txs: Callable[[list[bytes]], MaybeAwaitable]


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of the transport; ValueError naming the field if one is out of range."""
    max_frame_bytes: int = 4 << 20  # one WebSocket frame (a message or a transaction batch), either way
    queue_max_messages: int = 4096  # per peer, consensus messages waiting to be sent
    queue_max_tx_batches: int = 1024  # per peer, transaction batches waiting (sent after the messages)
    queue_max_bytes: int = 64 << 20  # per peer and per queue
    send_timeout_s: float = 10.0  # one frame written to the socket
    connect_timeout_s: float = 10.0  # TCP connect, WebSocket upgrade and handshake
    handshake_timeout_s: float = 10.0  # the server waiting for the client's auth frame
    heartbeat_s: float = 15.0  # WebSocket ping interval; a connection without pong is closed
    reconnect_min_s: float = 0.1
    reconnect_max_s: float = 10.0
    max_inbound_per_member: int = 2  # authenticated connections kept from one member (the oldest is replaced)
    fetch_range: int = 256  # blocks per range request (and the most a served range holds)
    fetch_pipeline: int = 4  # range requests in flight per fetch_blocks
    fetch_timeout_s: float = 60.0  # one range or transaction request
    max_response_bytes: int = 64 << 20  # one range or transaction response, either way
    max_txids_per_request: int = 4096
    request_window_s: float = 120.0  # accepted clock difference of a signed fetch request (replay window)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"transport limit {f.name} = {v!r}: must be a positive number")
        if self.max_frame_bytes > self.queue_max_bytes:
            raise ValueError("transport limit max_frame_bytes must not exceed queue_max_bytes")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("transport limit reconnect_min_s must not exceed reconnect_max_s")
        if self.fetch_range > 0xFFFF or self.max_txids_per_request > wire.MAX_TXS_PER_FRAME:
            raise ValueError(f"transport limits fetch_range and max_txids_per_request are at most "
                             f"{wire.MAX_TXS_PER_FRAME}")


@dataclass(slots=True)
class PeerStats:
    """Counters of one peer, for the host's metrics and status."""
    sent_messages: int = 0
    sent_tx_batches: int = 0
    received_messages: int = 0
    received_tx_batches: int = 0
    dropped_messages: int = 0  # oldest dropped from a full queue, or lost in flight when a connection broke
    dropped_tx_batches: int = 0
    queued_messages: int = 0
    queued_tx_batches: int = 0
    connected: bool = False  # our outbound connection to it is authenticated
    inbound: int = 0  # its authenticated connections to us
    connects: int = 0  # outbound connections authenticated so far
    failures: int = 0  # outbound connection attempts or sessions that failed
    last_seen: Optional[float] = None  # wall-clock time of the last frame or handshake received from it
    last_error: str = ""


class _Outbox:
    """A bounded FIFO of frames: on overflow the oldest go, counted."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.q: deque[bytes] = deque()
        self.bytes = 0
        self.max_items = max_items
        self.max_bytes = max_bytes

    def put(self, frame: bytes) -> int:
        """Append frame; the number of older frames dropped to make room."""
        self.q.append(frame)
        self.bytes += len(frame)
        dropped = 0
        while len(self.q) > self.max_items or self.bytes > self.max_bytes:
            self.bytes -= len(self.q.popleft())
            dropped += 1
        return dropped

    def pop(self) -> Optional[bytes]:
        if not self.q:
            return None
        frame = self.q.popleft()
        self.bytes -= len(frame)
        return frame


class _Link:
    """Our side of one peer: its queues, its sender task, its counters."""

    def __init__(self, peer: Peer, limits: Limits) -> None:
        self.peer = peer
        self.messages = _Outbox(limits.queue_max_messages, limits.queue_max_bytes)
        self.txs = _Outbox(limits.queue_max_tx_batches, limits.queue_max_bytes)
        self.wake = asyncio.Event()
        self.retry = asyncio.Event()  # the peer connected to us while our link was down: it is up, try now
        self.stats = PeerStats()
        self.task: Optional[asyncio.Task[None]] = None

    def next_frame(self) -> Optional[tuple[bytes, bool]]:
        """(frame, is a message): messages before transaction batches, so gossip cannot crowd out consensus."""
        frame = self.messages.pop()
        if frame is not None:
            self.stats.queued_messages -= 1
            return frame, True
        frame = self.txs.pop()
        if frame is not None:
            self.stats.queued_tx_batches -= 1
            return frame, False
        return None


class _LogOnce:
    """One log line per key per LOG_INTERVAL_S; the rest counted into the next line."""

    def __init__(self) -> None:
        self._last: dict[object, float] = {}
        self._held: Counter[object] = Counter()

    def __call__(self, key: object, level: int, msg: str, **extra: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < LOG_INTERVAL_S:
            self._held[key] += 1
            return
        if len(self._last) > 4096:  # keys include remote addresses: keep the table bounded
            self._last.clear()
        self._last[key] = now
        log.log(level, msg, extra={**extra, "suppressed": self._held.pop(key, 0)})


class Transport:
    """This member's links to the other members. See the module docstring; docs/federation.md for the bytes."""

    def __init__(self, network: Network, my_index: int, my_secret: bytes, peers: Sequence[Peer],
                 handlers: Handlers, limits: Limits = Limits(), clock: Callable[[], float] = time.time) -> None:
        self.network = network
        self.me = my_index
        self._secret = PrivateKey(my_secret)
        self.handlers = handlers
        self.limits = limits
        self._clock = clock  # wall clock: fetch-request timestamps and last_seen
        idx = [p.index for p in peers]
        if len(set(idx)) != len(idx) or my_index in idx or not all(0 <= i < 64 for i in idx + [my_index]):
            raise ValueError(f"peer indices {idx} must be distinct member indices 0..63 other than mine ({my_index})")
        for p in peers:
            if not is_valid_key(p.key):
                raise ValueError(f"peer {p.index}: key is not a valid 32-byte x-only public key")
        # member keys by index (None where a member is not among the peers: it cannot connect)
        n = max(idx + [my_index]) + 1
        self._keys: list[Optional[bytes]] = [None] * n
        for p in peers:
            self._keys[p.index] = p.key
        self._keys[my_index] = self._secret.public_key_xonly.format()
        if self._keys.count(self._keys[my_index]) > 1:
            raise ValueError("a peer has this member's own key")
        self._links = {p.index: _Link(p, limits) for p in peers}
        self._inbound: dict[int, list[web.WebSocketResponse]] = {p.index: [] for p in peers}
        self._closing = False  # set by close() and close_inbound(): new member connections are turned away
        self._nonces: dict[int, OrderedDict[bytes, float]] = {p.index: OrderedDict() for p in peers}
        self.refused: Counter[str] = Counter()  # inbound connections/requests refused, by reason
        self._log = _LogOnce()
        self._session: Optional[aiohttp.ClientSession] = None
        self._background: set[asyncio.Task[None]] = set()  # replaced connections being closed

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the client session and start one sender task per peer."""
        if self._session is not None:
            raise RuntimeError("transport already started")
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))
        for link in self._links.values():
            link.task = asyncio.create_task(self._sender(link), name=f"federation-send-{link.peer.index}")

    async def close(self) -> None:
        """Stop the senders, close inbound member connections and the client session."""
        self._closing = True
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with suppress(asyncio.CancelledError):
                await t
        await self.close_inbound()
        if self._session is not None:
            await self._session.close()

    async def close_inbound(self, _app: Optional[web.Application] = None) -> None:
        """Close the other members' connections to this one (GOING_AWAY). The host also registers it as the app's
        on_shutdown handler: aiohttp runs that after the listener is closed and before it waits for the open
        handlers, which an inbound member WebSocket would otherwise hold until its heartbeat fails (15 to 25 s
        with the default limits) or aiohttp's shutdown timeout (60 s) runs out."""
        self._closing = True
        await asyncio.gather(*(self._close(ws, aiohttp.WSCloseCode.GOING_AWAY, "member shutting down")
                               for conns in self._inbound.values() for ws in list(conns)))

    # -- outbound ----------------------------------------------------------------------------------------------

    def broadcast(self, raw: bytes) -> None:
        """Queue raw for every other member. Never blocks; FrameTooLarge if raw cannot be sent."""
        frame = self._message_frame(raw)
        for link in self._links.values():
            self._enqueue(link, frame, True)

    def send(self, peer: int, raw: bytes) -> None:
        """Queue raw for one member. Never blocks; KeyError for an unknown peer, FrameTooLarge if too big."""
        link = self._links[peer]
        self._enqueue(link, self._message_frame(raw), True)

    def gossip_txs(self, raws: Sequence[bytes]) -> None:
        """Queue transactions for every other member, in as few frames as fit. Never blocks."""
        for frame in self._tx_frames(raws):
            for link in self._links.values():
                self._enqueue(link, frame, False)

    def _message_frame(self, raw: bytes) -> bytes:
        if not raw:
            raise ValueError("an empty message")
        if len(raw) + 1 > self.limits.max_frame_bytes:
            raise FrameTooLarge(f"a message of {len(raw)} bytes; frames are at most {self.limits.max_frame_bytes}")
        return bytes([FRAME_MESSAGE]) + raw

    def _tx_frames(self, raws: Sequence[bytes]) -> list[bytes]:
        frames: list[bytes] = []
        batch: list[bytes] = []
        size = 3  # kind + count
        for r in raws:
            if not r:
                raise ValueError("an empty transaction")
            need = 4 + len(r)
            if size + need > self.limits.max_frame_bytes:
                if 3 + need > self.limits.max_frame_bytes:
                    raise FrameTooLarge(f"a transaction of {len(r)} bytes does not fit a frame")
                frames.append(bytes([FRAME_TXS]) + wire.encode_txs(batch))
                batch, size = [], 3
            batch.append(r)
            size += need
            if len(batch) == wire.MAX_TXS_PER_FRAME:
                frames.append(bytes([FRAME_TXS]) + wire.encode_txs(batch))
                batch, size = [], 3
        if batch:
            frames.append(bytes([FRAME_TXS]) + wire.encode_txs(batch))
        return frames

    def _enqueue(self, link: _Link, frame: bytes, message: bool) -> None:
        st = link.stats
        if message:
            dropped = link.messages.put(frame)
            st.queued_messages += 1 - dropped
            st.dropped_messages += dropped
        else:
            dropped = link.txs.put(frame)
            st.queued_tx_batches += 1 - dropped
            st.dropped_tx_batches += dropped
        link.wake.set()

    async def _sender(self, link: _Link) -> None:
        """Connect, drain the queues, and on any failure reconnect after a capped, jittered exponential backoff."""
        delay = self.limits.reconnect_min_s
        peer = link.peer.index
        while True:
            try:
                ws = await self._connect(link)
            except (HandshakeRefused, HandshakeError, aiohttp.ClientError, OSError, TimeoutError) as e:
                self._failed(link, "connect", e)
            else:
                link.stats.connected = True
                link.stats.connects += 1
                link.retry.clear()  # a wake-up from before this connection is spent
                delay = self.limits.reconnect_min_s
                log.info("connected to member", extra={"peer": peer})
                try:
                    await self._pump(link, ws)
                except (aiohttp.ClientError, OSError, TimeoutError, ConnectionError) as e:
                    self._failed(link, "send", e)
                finally:
                    link.stats.connected = False
                    await self._abort(ws)
            delay = await self._backoff(link, delay)

    async def _backoff(self, link: _Link, delay: float) -> float:
        """Wait a jittered delay before reconnecting, or less if the peer authenticates a connection to us
        meanwhile (it is back: a member that restarts is reconnected at once, not after the backoff grown while it
        was down); the next delay. A wake-up cuts one wait short but does not reset the backoff: a link that still
        fails (only the peer's direction works) keeps backing off, one extra attempt per connection of the peer."""
        waiter = asyncio.ensure_future(link.retry.wait())
        try:
            await asyncio.wait([waiter], timeout=random.uniform(delay / 2, delay))
        finally:
            waiter.cancel()
        link.retry.clear()
        return min(delay * 2, self.limits.reconnect_max_s)

    def _failed(self, link: _Link, stage: str, e: BaseException) -> None:
        link.stats.failures += 1
        link.stats.last_error = f"{stage}: {type(e).__name__}: {e}"
        self._log(("out", link.peer.index, stage, type(e)), logging.WARNING, "member link failed",
                  peer=link.peer.index, stage=stage, error=link.stats.last_error)

    async def _connect(self, link: _Link) -> aiohttp.ClientWebSocketResponse:
        """An authenticated WebSocket to link's peer (docs/federation.md: hello, auth, welcome)."""
        assert self._session is not None, "start() first"
        lim = self.limits
        async with asyncio.timeout(lim.connect_timeout_s):
            ws = await self._session.ws_connect(
                link.peer.url.rstrip("/") + WS_PATH, autoping=True, heartbeat=lim.heartbeat_s, compress=0,
                max_msg_size=lim.max_frame_bytes, timeout=aiohttp.ClientWSTimeout(ws_close=lim.send_timeout_s))
            try:
                hello = await self._handshake_frame(ws)
                network_id, server, challenge = wire.decode_hello(hello)
                if network_id != self.network.id:
                    raise wire.NetworkMismatch(f"member {link.peer.index} runs network id {network_id}, "
                                               f"this member {self.network.id}")
                if server != link.peer.index:
                    raise wire.BadHandshake(f"{link.peer.url} says it is member {server}, "
                                            f"expected {link.peer.index}")
                await ws.send_bytes(wire.encode_auth(network_id, self._secret, self.me, server, challenge))
                wire.check_welcome(await self._handshake_frame(ws), server, self.me)
            except BaseException:
                await self._abort(ws)
                raise
        return ws

    @staticmethod
    async def _handshake_frame(ws: aiohttp.ClientWebSocketResponse) -> bytes:
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            return bytes(msg.data)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            raise HandshakeRefused(msg.data, msg.extra or "")
        raise HandshakeRefused(ws.close_code, f"{msg.type.name} during the handshake")

    async def _pump(self, link: _Link, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Send queued frames until the connection fails or closes."""
        reader = asyncio.create_task(self._read_until_closed(ws))
        try:
            while True:
                item = link.next_frame()
                if item is None:
                    link.wake.clear()
                    waiter = asyncio.create_task(link.wake.wait())
                    try:
                        await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                    if reader.done():
                        raise ConnectionError(f"connection closed by the peer (code {ws.close_code})")
                    continue
                frame, is_message = item
                try:
                    async with asyncio.timeout(self.limits.send_timeout_s):
                        await ws.send_bytes(frame)
                except BaseException:
                    if is_message:  # in flight: lost with the connection (at-most-once delivery)
                        link.stats.dropped_messages += 1
                    else:
                        link.stats.dropped_tx_batches += 1
                    raise
                if is_message:
                    link.stats.sent_messages += 1
                else:
                    link.stats.sent_tx_batches += 1
        finally:
            reader.cancel()
            with suppress(asyncio.CancelledError):
                await reader

    @staticmethod
    async def _read_until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
        """The server sends nothing after its welcome; reading processes pongs and notices the close."""
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.ERROR):
                return

    async def _abort(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Close ws, giving up (and dropping the connection) after a short wait for a stuck peer."""
        with suppress(Exception):
            async with asyncio.timeout(min(1.0, self.limits.send_timeout_s)):
                await ws.close()

    # -- inbound -----------------------------------------------------------------------------------------------

    def _refuse(self, reason: str, remote: Optional[str], message: str) -> None:
        self.refused[reason] += 1
        self._log(("in", remote, reason), logging.WARNING, "member connection refused", reason=reason,
                  remote=remote, error=message)

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        """GET /api/federation/ws: a member's connection; authenticated, then its frames are delivered."""
        lim = self.limits
        ws = web.WebSocketResponse(autoping=True, heartbeat=lim.heartbeat_s, compress=False,
                                   max_msg_size=lim.max_frame_bytes, timeout=lim.send_timeout_s)
        await ws.prepare(request)
        challenge = os.urandom(32)
        try:
            async with asyncio.timeout(lim.handshake_timeout_s):
                await ws.send_bytes(wire.encode_hello(self.network.id, self.me, challenge))
                msg = await ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise wire.BadHandshake(f"a {msg.type.name} frame instead of the auth frame")
            peer = wire.check_auth(bytes(msg.data), self.network.id, self.me,
                                   [k or b"" for k in self._keys], challenge)
        except TimeoutError:
            e: HandshakeError = HandshakeTimeout(f"no auth frame within {lim.handshake_timeout_s}s")
            self._refuse(e.reason, request.remote, str(e))
            await self._close(ws, e.code, e.reason)
            return ws
        except HandshakeError as e:
            self._refuse(e.reason, request.remote, str(e))
            await self._close(ws, e.code, e.reason)
            return ws
        if self._closing:  # shutting down: a connection accepted now would hold the server's stop
            await self._close(ws, aiohttp.WSCloseCode.GOING_AWAY, "member shutting down")
            return ws
        conns = self._inbound[peer]
        while len(conns) >= lim.max_inbound_per_member:  # a restarted peer's new connection replaces a stale one
            old = conns.pop(0)
            t = asyncio.create_task(self._close(old, Close.REPLACED, "replaced"))
            self._background.add(t)
            t.add_done_callback(self._background.discard)
        conns.append(ws)
        if not self._links[peer].stats.connected:
            self._links[peer].retry.set()  # it is up: our own link to it need not wait out its backoff
        st = self._links[peer].stats
        st.inbound = len(conns)
        st.last_seen = self._clock()
        try:
            await ws.send_bytes(wire.encode_welcome(self.me, peer))
            await self._receive(ws, peer, request.remote)
        finally:
            if ws in conns:
                conns.remove(ws)
            st.inbound = len(conns)
        return ws

    async def _receive(self, ws: web.WebSocketResponse, peer: int, remote: Optional[str]) -> None:
        st = self._links[peer].stats
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.ERROR:  # aiohttp closed it already (1009 for a frame too big)
                too_big = getattr(msg.data, "code", None) == Close.MESSAGE_TOO_BIG
                reason = "frame-too-large" if too_big else "ws-error"
                self._refuse(reason, remote, f"member {peer}: {msg.data}")
                return
            try:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    raise MalformedFrame(f"a {msg.type.name} frame")
                kind, body = wire.decode_frame(bytes(msg.data))
            except MalformedFrame as e:
                self._refuse("bad-frame", remote, f"member {peer}: {e}")
                await self._close(ws, Close.BAD_FRAME, "bad-frame")
                return
            st.last_seen = self._clock()
            try:
                if kind == FRAME_MESSAGE:
                    st.received_messages += 1
                    self.handlers.on_message(body, peer)  # type: ignore[arg-type]
                else:
                    st.received_tx_batches += 1
                    self.handlers.on_txs(body, peer)  # type: ignore[arg-type]
            except Exception:  # the host's bug must not cut the member off; logged (rate-limited)
                self._log(("handler", kind), logging.ERROR, "federation message handler failed", peer=peer,
                          exc_info=True)

    @staticmethod
    async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
        with suppress(Exception):
            async with asyncio.timeout(1.0):
                await ws.close(code=code, message=reason.encode())

    # -- fetch: server side ------------------------------------------------------------------------------------

    def _authenticate(self, request: web.Request, body: bytes) -> int:
        """The member index a signed fetch request comes from; RequestAuthError otherwise (nothing recorded)."""
        client, ts, nonce, sig = wire.decode_request_auth(request.headers.get(wire.AUTH_HEADER))
        key = self._keys[client] if client < len(self._keys) and client != self.me else None
        if key is None:
            raise RequestAuthError(403, f"member index {client} is not a peer of this member")
        now = self._clock()
        window = self.limits.request_window_s
        if abs(ts / 1000 - now) > window:
            raise RequestAuthError(401, f"request timestamp {ts} ms is more than {window}s from this member's clock")
        sighash = wire.request_sighash(self.network.id, client, self.me, ts, nonce, request.method,
                                       request.path_qs, body)
        if not wire.verify_request(key, sig, sighash):
            raise RequestAuthError(401, f"request signature of member {client} does not verify")
        seen = self._nonces[client]
        while seen and next(iter(seen.values())) < now - 2 * window:
            seen.popitem(last=False)
        if nonce in seen:
            raise RequestAuthError(401, f"replayed request nonce {nonce.hex()} from member {client}")
        if len(seen) >= 65536:
            raise RequestAuthError(429, f"member {client}: too many requests in the replay window")
        seen[nonce] = now
        return client

    async def _guarded(self, request: web.Request, serve: Callable[[int, bytes], Awaitable[bytes]]
                       ) -> web.StreamResponse:
        body = await request.read()
        try:
            peer = self._authenticate(request, body)
        except RequestAuthError as e:
            self._refuse(f"request-{e.status}", request.remote, str(e))
            return web.Response(status=e.status, text=str(e))
        self._links[peer].stats.last_seen = self._clock()
        try:
            out = await serve(peer, body)
        except MalformedFrame as e:
            return web.Response(status=400, text=str(e))
        return web.Response(body=out, content_type="application/octet-stream")

    async def handle_blocks(self, request: web.Request) -> web.StreamResponse:
        """GET /api/federation/blocks?from=H&count=N (signed): a block-range response."""
        async def serve(peer: int, body: bytes) -> bytes:
            try:
                start = int(request.query["from"])
                count = int(request.query.get("count", self.limits.fetch_range))
            except (KeyError, ValueError):
                raise MalformedFrame("from and count are decimal integers") from None
            if not 0 <= start < 1 << 64 or not 1 <= count <= self.limits.fetch_range:
                raise MalformedFrame(f"from must be a height and count 1..{self.limits.fetch_range}")
            entries = await _call(self.handlers.serve_blocks, start, count)
            budget = self.limits.max_response_bytes - wire.range_head_size()
            kept = []
            for block, commit in entries[:count]:
                budget -= wire.range_entry_size(block, commit)
                if budget < 0:
                    break
                kept.append((block, commit))
            return wire.encode_range(self.network.id, start, kept)
        return await self._guarded(request, serve)

    async def handle_txs(self, request: web.Request) -> web.StreamResponse:
        """POST /api/federation/txs (signed), body: txids; the raw transactions this member has among them."""
        async def serve(peer: int, body: bytes) -> bytes:
            txids = wire.decode_txids(body, self.limits.max_txids_per_request)
            raws = await _call(self.handlers.serve_txs, txids)
            budget = self.limits.max_response_bytes - 2
            kept = []
            for r in raws[:len(txids)]:
                budget -= 4 + len(r)
                if budget < 0:
                    break
                kept.append(r)
            return wire.encode_txs(kept)
        return await self._guarded(request, serve)

    # -- fetch: client side ------------------------------------------------------------------------------------

    async def _request(self, peer: int, method: str, path_qs: str, body: bytes = b"") -> bytes:
        """A signed request to peer; its body (bounded) or a FetchError."""
        assert self._session is not None, "start() first"
        link = self._links[peer]
        lim = self.limits
        ts = int(self._clock() * 1000)
        auth = wire.encode_request_auth(self.network.id, self._secret, self.me, peer, ts, os.urandom(16), method,
                                        path_qs, body)
        url = link.peer.url.rstrip("/") + path_qs
        try:
            async with asyncio.timeout(lim.fetch_timeout_s):
                async with self._session.request(method, url, data=body or None,
                                                 headers={wire.AUTH_HEADER: auth}) as resp:
                    if resp.status != 200:
                        text = (await resp.content.read(500)).decode("utf-8", "replace")
                        raise PeerUnavailable(f"member {peer} answered {resp.status}: {text}")
                    if (resp.content_length or 0) > lim.max_response_bytes:
                        raise MalformedResponse(f"member {peer}: a response of {resp.content_length} bytes, "
                                                f"at most {lim.max_response_bytes}")
                    data = await resp.content.read(lim.max_response_bytes + 1)
                    while len(data) <= lim.max_response_bytes:
                        more = await resp.content.read(lim.max_response_bytes + 1 - len(data))
                        if not more:
                            break
                        data += more
                    if len(data) > lim.max_response_bytes:
                        raise MalformedResponse(f"member {peer}: a response above {lim.max_response_bytes} bytes")
                    return data
        except TimeoutError:
            raise PeerUnavailable(f"member {peer}: no complete answer within {lim.fetch_timeout_s}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise PeerUnavailable(f"member {peer}: {type(e).__name__}: {e}") from e

    async def _fetch_range(self, peer: int, start: int, count: int) -> list[BlockEntry]:
        data = await self._request(peer, "GET", f"{BLOCKS_PATH}?from={start}&count={count}")
        try:
            return wire.decode_range(data, self.network.id, start, count)
        except MalformedResponse as e:
            raise MalformedResponse(f"member {peer}: {e}") from None

    async def fetch_blocks(self, peer: int, from_height: int, until: Optional[int] = None
                           ) -> AsyncIterator[BlockEntry]:
        """(block raw, commit raw) from from_height up to until (inclusive) or the peer's tip, in height order.

        Pipelined: limits.fetch_pipeline range requests of limits.fetch_range blocks are in flight while the
        caller handles what was yielded. Stops after the first range that comes back short. Untrusted: the
        caller verifies every block and commit. FetchError (PeerUnavailable, MalformedResponse) on failure; use
        `contextlib.aclosing` to stop early and cancel the requests in flight."""
        if until is not None and until < from_height:
            return
        lim = self.limits
        pending: deque[tuple[int, asyncio.Task[list[BlockEntry]]]] = deque()
        next_start = from_height

        def launch() -> None:
            nonlocal next_start
            while len(pending) < lim.fetch_pipeline and (until is None or next_start <= until):
                count = lim.fetch_range if until is None else min(lim.fetch_range, until - next_start + 1)
                pending.append((count, asyncio.create_task(self._fetch_range(peer, next_start, count))))
                next_start += count

        try:
            launch()
            while pending:
                count, task = pending.popleft()
                entries = await task
                if len(entries) < count:
                    for e in entries:
                        yield e
                    return
                launch()
                for e in entries:
                    yield e
        finally:
            for _, t in pending:
                t.cancel()
            for _, t in pending:
                with suppress(asyncio.CancelledError, FetchError):
                    await t

    async def fetch_txs(self, peer: int, txids: Sequence[bytes]) -> list[bytes]:
        """The raw transactions peer has among txids (at most one per txid; untrusted: the caller checks the
        txids). FetchError on failure."""
        out: list[bytes] = []
        step = self.limits.max_txids_per_request
        for i in range(0, len(txids), step):
            chunk = txids[i:i + step]
            data = await self._request(peer, "POST", TXS_PATH, wire.encode_txids(chunk))
            try:
                out += wire.decode_txs(data, MalformedResponse, len(chunk))
            except MalformedResponse as e:
                raise MalformedResponse(f"member {peer}: {e}") from None
        return out

    # -- metrics -----------------------------------------------------------------------------------------------

    def stats(self) -> dict[int, PeerStats]:
        """The live counters of every peer, by member index (read them; do not change them)."""
        return {i: link.stats for i, link in self._links.items()}

    def connected_peers(self) -> int:
        """Peers our outbound connection to is authenticated."""
        return sum(link.stats.connected for link in self._links.values())


async def _call(fn: Callable[..., object], *args: object) -> list:  # type: ignore[type-arg]
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    if not isinstance(result, list):
        raise TypeError(f"{getattr(fn, '__name__', fn)} returned {type(result).__name__}, not a list")
    return result


def routes(transport: Transport) -> list[web.RouteDef]:
    """The member routes, for the host to add to the node's aiohttp app (app.router.add_routes)."""
    return [web.get(WS_PATH, transport.handle_ws),
            web.get(BLOCKS_PATH, transport.handle_blocks),
            web.post(TXS_PATH, transport.handle_txs)]


__all__ = ["BLOCKS_PATH", "TXS_PATH", "WS_PATH", "BlockEntry", "FetchError", "Handlers", "Limits", "MalformedResponse",
           "Peer", "PeerStats", "PeerUnavailable", "Transport", "routes"]
