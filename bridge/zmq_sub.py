"""ZMQ subscriber for bitcoind's hashblock/hashtx/rawblock/rawtx/sequence notifications.

Message format (Bitcoin Core doc/zmq.md): three frames, ``topic``, ``body`` and a 4-byte
little-endian message sequence number that counts up by one per topic and publisher. A missing
number means notifications were lost (high-water mark, reconnect, bitcoind restart); the
subscriber then asks for a resync: it re-reads the tip over RPC and yields a
:class:`ResyncEvent`, after which consumers (the chain tracker) re-derive state from RPC. ZMQ
is only ever a hint: nothing is trusted from it that is not re-checked over RPC.

Parsing and sequence checking are pure (:func:`parse_message`, :class:`SequenceTracker`,
:class:`ZmqDecoder`) so they are tested without sockets. Hashes in events are internal byte
order (ZMQ bodies carry display order, like RPC); ``*_hex`` properties give display hex.
"""
from __future__ import annotations

import enum
import hashlib
import logging
import struct
from dataclasses import dataclass
from typing import AsyncGenerator, Awaitable, Callable, Mapping, Optional, Protocol, Sequence, Union

import zmq
import zmq.asyncio

from bridge.rpc_errors import RPCError

log = logging.getLogger(__name__)

TOPICS = ("hashblock", "hashtx", "rawblock", "rawtx", "sequence")
_SEQ = struct.Struct("<I")
_MEMPOOL_SEQ = struct.Struct("<Q")
_SEQ_MOD = 1 << 32


def sha256d(data: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


class ZmqMessageError(ValueError):
    """A ZMQ message that is not a well-formed bitcoind notification."""


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockHashEvent:
    """``hashblock``: the chain tip changed to this block (not sent for every block in a reorg)."""

    block_hash: bytes  # internal order
    seq: int

    @property
    def block_hash_hex(self) -> str:
        return self.block_hash[::-1].hex()


@dataclass(frozen=True, slots=True)
class TxHashEvent:
    """``hashtx``: a transaction entered the mempool or a connected block."""

    txid: bytes  # internal order
    seq: int


@dataclass(frozen=True, slots=True)
class RawBlockEvent:
    """``rawblock``: the serialized new tip block."""

    raw_block: bytes
    seq: int

    @property
    def header(self) -> bytes:
        return self.raw_block[:80]

    @property
    def block_hash(self) -> bytes:
        """Double-SHA256 of the 80-byte header, internal order."""
        return sha256d(self.raw_block[:80])


@dataclass(frozen=True, slots=True)
class RawTxEvent:
    """``rawtx``: a serialized transaction (mempool entry or in a connected block)."""

    raw_tx: bytes
    seq: int

    def txid(self) -> bytes:
        """Internal-order txid (deserializes the transaction; witness excluded)."""
        from bitcoin.core import CTransaction  # deferred: only when a consumer needs it

        return bytes(CTransaction.deserialize(self.raw_tx).GetTxid())


class SequenceLabel(enum.Enum):
    """The label byte of a ``sequence`` notification."""

    BLOCK_CONNECTED = "C"
    BLOCK_DISCONNECTED = "D"
    TX_REMOVED = "R"  # removed from the mempool for a non-block reason
    TX_ADDED = "A"  # added to the mempool


@dataclass(frozen=True, slots=True)
class SequenceEvent:
    """``sequence``: block connect/disconnect or mempool add/remove, in bitcoind's total order."""

    hash: bytes  # internal order; block hash for C/D, txid for A/R
    label: SequenceLabel
    mempool_seq: Optional[int]  # present for A/R only
    seq: int

    @property
    def hash_hex(self) -> str:
        return self.hash[::-1].hex()


@dataclass(frozen=True, slots=True)
class ResyncEvent:
    """Notifications were lost or garbled; state must be re-derived over RPC.

    ``best_block_hash``/``height`` are the tip re-read over RPC (None if that failed too).
    """

    topic: Optional[str]
    reason: str
    best_block_hash: Optional[bytes]
    height: Optional[int]


NotificationEvent = Union[BlockHashEvent, TxHashEvent, RawBlockEvent, RawTxEvent, SequenceEvent]
ZmqEvent = Union[NotificationEvent, ResyncEvent]


# --------------------------------------------------------------------------------------------
# Pure parsing and sequence checking
# --------------------------------------------------------------------------------------------


def parse_message(frames: Sequence[bytes]) -> tuple[str, NotificationEvent]:
    """Parse one multipart message into (topic, event); ZmqMessageError if malformed."""
    if len(frames) != 3:
        raise ZmqMessageError(f"expected 3 frames (topic, body, sequence), got {len(frames)}")
    raw_topic, body, seq_frame = (bytes(f) for f in frames)
    try:
        topic = raw_topic.decode("ascii")
    except UnicodeDecodeError:
        raise ZmqMessageError(f"topic is not ASCII: {raw_topic[:40]!r}") from None
    if len(seq_frame) != 4:
        raise ZmqMessageError(f"{topic}: sequence frame is {len(seq_frame)} bytes, not 4")
    (seq,) = _SEQ.unpack(seq_frame)
    if topic == "hashblock":
        if len(body) != 32:
            raise ZmqMessageError(f"hashblock body is {len(body)} bytes, not 32")
        return topic, BlockHashEvent(body[::-1], seq)
    if topic == "hashtx":
        if len(body) != 32:
            raise ZmqMessageError(f"hashtx body is {len(body)} bytes, not 32")
        return topic, TxHashEvent(body[::-1], seq)
    if topic == "rawblock":
        if len(body) < 81:  # header + at least the transaction count
            raise ZmqMessageError(f"rawblock body is {len(body)} bytes, too short for a block")
        return topic, RawBlockEvent(body, seq)
    if topic == "rawtx":
        if len(body) < 10:  # version + in/out counts + locktime
            raise ZmqMessageError(f"rawtx body is {len(body)} bytes, too short for a transaction")
        return topic, RawTxEvent(body, seq)
    if topic == "sequence":
        if len(body) < 33:
            raise ZmqMessageError(f"sequence body is {len(body)} bytes, need at least 33")
        try:
            label = SequenceLabel(chr(body[32]))
        except ValueError:
            raise ZmqMessageError(f"sequence label {body[32:33]!r} is not one of C/D/R/A") from None
        if label in (SequenceLabel.BLOCK_CONNECTED, SequenceLabel.BLOCK_DISCONNECTED):
            if len(body) != 33:
                raise ZmqMessageError(f"sequence {label.value} body is {len(body)} bytes, not 33")
            mempool_seq = None
        else:
            if len(body) != 41:
                raise ZmqMessageError(f"sequence {label.value} body is {len(body)} bytes, not 41")
            (mempool_seq,) = _MEMPOOL_SEQ.unpack_from(body, 33)
        return topic, SequenceEvent(body[31::-1], label, mempool_seq, seq)
    raise ZmqMessageError(f"unknown topic {topic!r}")


class SeqStatus(enum.Enum):
    FIRST = "first"  # first message on the topic: baseline, nothing to compare
    OK = "ok"
    GAP = "gap"  # messages were lost
    RESET = "reset"  # counter went backwards or repeated: publisher restarted (or duplicate)


@dataclass(frozen=True, slots=True)
class SeqCheck:
    status: SeqStatus
    expected: Optional[int]
    got: int
    missed: int  # messages lost for GAP, else 0


def check_sequence(last: Optional[int], got: int) -> SeqCheck:
    """Compare a message sequence number with the last one seen on its topic (mod 2**32)."""
    if last is None:
        return SeqCheck(SeqStatus.FIRST, None, got, 0)
    expected = (last + 1) % _SEQ_MOD
    if got == expected:
        return SeqCheck(SeqStatus.OK, expected, got, 0)
    ahead = (got - expected) % _SEQ_MOD
    if ahead < _SEQ_MOD // 2:
        return SeqCheck(SeqStatus.GAP, expected, got, ahead)
    return SeqCheck(SeqStatus.RESET, expected, got, 0)


class SequenceTracker:
    """Last sequence number seen per topic."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def observe(self, topic: str, seq: int) -> SeqCheck:
        check = check_sequence(self._last.get(topic), seq)
        self._last[topic] = seq
        return check

    def last(self, topic: str) -> Optional[int]:
        return self._last.get(topic)


@dataclass(frozen=True, slots=True)
class Decoded:
    """Result of feeding one message: the event (None if malformed) and why to resync, if so."""

    topic: Optional[str]
    event: Optional[NotificationEvent]
    resync_reason: Optional[str]


class ZmqDecoder:
    """Pure state machine: frames in, event plus resync decision out."""

    def __init__(self) -> None:
        self.tracker = SequenceTracker()

    def feed(self, frames: Sequence[bytes]) -> Decoded:
        try:
            topic, event = parse_message(frames)
        except ZmqMessageError as e:
            bad_topic: Optional[str] = None
            if frames:
                try:
                    bad_topic = bytes(frames[0]).decode("ascii")
                except UnicodeDecodeError:
                    pass
            return Decoded(bad_topic, None, f"malformed message: {e}")
        check = self.tracker.observe(topic, event.seq)
        if check.status is SeqStatus.GAP:
            return Decoded(topic, event, f"{topic}: sequence gap, expected {check.expected} got {check.got} "
                                         f"({check.missed} lost)")
        if check.status is SeqStatus.RESET:
            return Decoded(topic, event, f"{topic}: sequence went from {check.expected} to {check.got} "
                                         "(publisher restarted?)")
        return Decoded(topic, event, None)


# --------------------------------------------------------------------------------------------
# The subscriber
# --------------------------------------------------------------------------------------------


class TipSource(Protocol):
    """What a resync needs from the RPC client (BitcoinRPC satisfies it)."""

    async def getblockchaininfo(self) -> "_TipInfo": ...


class _TipInfo(Protocol):
    @property
    def blocks(self) -> int: ...

    @property
    def best_block_hash(self) -> bytes: ...


ResyncCallback = Callable[[ResyncEvent], Awaitable[None]]


class ZmqSubscriber:
    """Subscribes to bitcoind's ZMQ publishers and yields typed events.

    ``endpoints`` maps topic -> endpoint (``{"hashblock": "tcp://127.0.0.1:28332", ...}``);
    topics sharing an endpoint share one SUB socket. On a sequence gap or a malformed message
    it logs, re-reads the tip via ``rpc``, calls ``on_resync`` (if given) and yields a
    :class:`ResyncEvent` before the next event. The receive high-water mark defaults to 0
    (unbounded, as bitcoind's contrib/zmq example does) so a slow consumer does not silently
    lose messages; TCP keepalive is enabled on the subscriber side too.
    """

    def __init__(
        self,
        endpoints: Mapping[str, str],
        rpc: TipSource,
        *,
        rcvhwm: int = 0,
        tcp_keepalive_idle: Optional[int] = None,
        on_resync: Optional[ResyncCallback] = None,
    ) -> None:
        unknown = set(endpoints) - set(TOPICS)
        if unknown:
            raise ValueError(f"unknown ZMQ topics {sorted(unknown)}; known: {', '.join(TOPICS)}")
        if not endpoints:
            raise ValueError("no ZMQ topics to subscribe to")
        self.endpoints = dict(endpoints)
        self._rpc = rpc
        self._rcvhwm = rcvhwm
        self._keepalive_idle = tcp_keepalive_idle
        self._on_resync = on_resync
        self._decoder = ZmqDecoder()
        self._ctx: Optional[zmq.asyncio.Context] = None
        self._sockets: list[zmq.asyncio.Socket] = []
        self._poller: Optional[zmq.asyncio.Poller] = None
        self._ready: list[NotificationEvent] = []  # events held back behind a ResyncEvent
        self.resyncs = 0

    def __repr__(self) -> str:
        return f"ZmqSubscriber({self.endpoints!r})"

    async def __aenter__(self) -> "ZmqSubscriber":
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Create the SUB sockets, connect and subscribe (connection completes in the background)."""
        if self._ctx is not None:
            return
        self._ctx = zmq.asyncio.Context()
        self._poller = zmq.asyncio.Poller()
        by_endpoint: dict[str, list[str]] = {}
        for topic, endpoint in self.endpoints.items():
            by_endpoint.setdefault(endpoint, []).append(topic)
        for endpoint, topics in by_endpoint.items():
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            if self._keepalive_idle is not None:
                sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, self._keepalive_idle)
            if "[" in endpoint:
                sock.setsockopt(zmq.IPV6, 1)
            for topic in topics:
                sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
            sock.connect(endpoint)
            self._poller.register(sock, zmq.POLLIN)
            self._sockets.append(sock)
            log.info("ZMQ subscribed to %s on %s", ",".join(sorted(topics)), endpoint)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._poller = None

    async def _recv_frames(self) -> list[bytes]:
        if self._poller is None:
            raise RuntimeError("ZmqSubscriber is not started")
        if len(self._sockets) == 1:
            return list(await self._sockets[0].recv_multipart())
        while True:
            for sock, _ in await self._poller.poll():
                return list(await sock.recv_multipart())

    async def recv(self) -> ZmqEvent:
        """The next event (a ResyncEvent comes before the event whose arrival revealed the gap)."""
        if self._ready:
            return self._ready.pop(0)
        while True:
            frames = await self._recv_frames()
            decoded = self._decoder.feed(frames)
            if decoded.resync_reason is None:
                if decoded.event is not None:
                    return decoded.event
                continue
            if decoded.event is not None:
                self._ready.append(decoded.event)
            return await self._resync(decoded.topic, decoded.resync_reason)

    async def events(self) -> AsyncGenerator[ZmqEvent, None]:
        """All events, forever (until cancelled)."""
        while True:
            yield await self.recv()

    async def _resync(self, topic: Optional[str], reason: str) -> ResyncEvent:
        self.resyncs += 1
        log.warning("ZMQ %s; resynchronising over RPC", reason)
        best: Optional[bytes] = None
        height: Optional[int] = None
        try:
            info = await self._rpc.getblockchaininfo()
            best, height = info.best_block_hash, info.blocks
        except RPCError as e:  # the resync event still tells consumers to re-check
            log.warning("ZMQ resync: reading the tip over RPC failed: %s", e)
        event = ResyncEvent(topic, reason, best, height)
        if self._on_resync is not None:
            await self._on_resync(event)
        return event
