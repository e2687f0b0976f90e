"""NetFlow's link framing and per-hop cryptography (docs/netflow.md, "Data plane").

A link is a TCP connection: frames of `length u32 | body` (body at most MAX_FRAME bytes). The first byte of a body
is its kind: CREATE and CREATED set a hop up; RELAY carries one onion layer.

A hop's keys: the client makes an ephemeral X25519 key e for each hop and sends e.pub in CREATE; both sides derive
    shared = X25519(e, relay's registered X25519 key)
    k_fwd || k_bwd = HKDF-SHA256(shared, salt = e.pub || relay X25519 pub, info = "l2d/netflow/hop v2", 64 bytes)
and the relay proves it holds its key by CREATED carrying ChaCha20-Poly1305(k_bwd, nonce 0, "", aad = e.pub): the
16-byte tag. Every later layer in one direction uses the next nonce (a 96-bit big-endian counter from 1), so a
replayed, dropped, reordered or altered frame fails authentication and the circuit is dropped.

A layer's plaintext is `command u8 | data`; the client wraps a command for hop i in the layers of hops i..1 (hop i's
innermost), each hop removes its own: FORWARD passes the rest to the next hop, any other command is for this hop.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import struct
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Optional, Union, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

MAX_FRAME = 1 << 19  # 512 KiB: a data chunk (at most MAX_DATA) and every layer's overhead fit
MAX_DATA = 1 << 18  # application bytes per DATA command
LINK_BUFFER = 1 << 20  # bytes a link's reader buffers and its writer queues before waiting (asyncio's 64 KiB default
# would make every 256 KiB frame wait for the socket)
TAG = 16
_LEN = struct.Struct(">I")
Buf = Union[bytes, bytearray, memoryview]
_INFO = b"l2d/netflow/hop v2"  # v2: 256 KiB DATA chunks in frames of up to 512 KiB (v1: 64 / 128 KiB)
HEAD = 6  # room before a received chunk's bytes for its frame's length, kind and command: it is sealed in place

log = logging.getLogger(__name__)


class WireError(Exception):
    """A peer broke the protocol: a malformed or oversized frame, a failed authentication, a wrong command."""


class Kind(enum.IntEnum):
    CREATE = 1  # e.pub 32 | session id 32
    CREATED = 2  # confirmation tag 16
    RELAY = 3  # one onion layer


class Cmd(enum.IntEnum):
    FORWARD = 0x10  # the rest is the next hop's RELAY body (forward), or comes from it (backward)
    EXTEND = 0x11  # e.pub 32 | session id 32 | endpoint (host:port)
    EXTENDED = 0x12  # confirmation tag 16 of the new hop
    RECEIPT = 0x13  # a 120-byte session receipt (l2d.core.session_tx.Receipt) for this hop
    CONNECT = 0x14  # host:port (exit only)
    CONNECTED = 0x15  # status u8 (0 = connected)
    DATA = 0x16  # application bytes
    END = 0x17  # the stream is over (either direction)
    CLOSE = 0x18  # to the exit: stop the stream (the application went away); the exit answers END


@dataclass
class Chunk:
    """n bytes received straight into `buf` at offset HEAD, with HEAD bytes of room before them and at least TAG
    after: a layer sealed around them is written in place (no copy)."""

    buf: bytearray
    n: int

    @property
    def data(self) -> memoryview:
        return memoryview(self.buf)[HEAD:HEAD + self.n]


Handler = Callable[["Link"], Awaitable[None]]


class Link(asyncio.BufferedProtocol):
    """One TCP connection of the data plane, read without copying: the kernel writes each frame (`framed`) or each
    chunk of a plain stream (at most MAX_DATA bytes) straight into a buffer of its own (a Chunk), which the reader
    then opens or seals in place. Up to LINK_BUFFER received bytes wait for the reader before the socket is no longer
    read (backpressure); writes queue up to LINK_BUFFER before drain() waits. (asyncio's StreamReader copies every
    byte twice, into its buffer and out of it, and moves what remains on each read: measured in bench_netflow.)"""

    def __init__(self, framed: bool, handler: Optional[Handler] = None) -> None:
        self.framed = framed
        self._handler = handler  # run with the link once connected (a server's links)
        self.transport: Optional[asyncio.Transport] = None
        self._ready: collections.deque[Chunk] = collections.deque()
        self._queued = 0  # bytes in _ready
        self._buf: Optional[bytearray] = None  # the chunk being received, bytes [HEAD, _pos) so far, up to _end
        self._pos = self._end = 0
        self._head = bytearray(4)  # a frame's length, being received while _buf is None
        self._head_n = 0
        self._paused = False  # reading, for backpressure
        self._error: Optional[BaseException] = None  # raised by read() once _ready is empty
        self._eof = False
        self._eof_written = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.get_running_loop().create_future()
        self._task: Optional[asyncio.Task[None]] = None

    # -- protocol callbacks --------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self.transport.set_write_buffer_limits(high=LINK_BUFFER)
        if self._handler is not None:
            self._task = asyncio.get_running_loop().create_task(self._serve(self._handler))

    async def _serve(self, handler: Handler) -> None:
        try:
            await handler(self)
        except Exception:
            log.exception("link handler failed")
        finally:
            self.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._buf is None and self.framed:
            return memoryview(self._head)[self._head_n:]
        if self._buf is None:
            self._buf, self._pos, self._end = bytearray(HEAD + MAX_DATA + TAG), HEAD, HEAD + MAX_DATA
        return memoryview(self._buf)[self._pos:self._end]

    def buffer_updated(self, nbytes: int) -> None:
        if self._buf is None:  # a frame's length
            self._head_n += nbytes
            if self._head_n < 4:
                return
            self._head_n = 0
            (n,) = _LEN.unpack(self._head)
            if not 0 < n <= MAX_FRAME:
                self._fail(WireError(f"frame of {n} bytes (1..{MAX_FRAME})"))
                return
            self._buf, self._pos, self._end = bytearray(HEAD + n + TAG), HEAD, HEAD + n
            return
        self._pos += nbytes
        if self._pos == self._end or not (self.framed or self._ready):  # a frame, or what a reader can take
            self._push()

    def _push(self) -> None:
        assert self._buf is not None
        chunk = Chunk(self._buf, self._pos - HEAD)
        self._buf = None
        self._ready.append(chunk)
        self._queued += chunk.n
        self._readable.set()
        if self._queued >= LINK_BUFFER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _fail(self, e: BaseException) -> None:
        self._error = e
        self._readable.set()
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        self._eof = True
        self._readable.set()
        return True  # the other direction stays open until closed

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = exc
        self._readable.set()
        self._writable.set()
        if not self._closed.done():
            self._closed.set_result(None)

    # -- the reader's side ---------------------------------------------------------------------------------------
    async def read(self) -> Optional[Chunk]:
        """The next frame's body, or the next bytes of a plain stream (None at its end). A framed link raises
        IncompleteReadError at the end of the stream, WireError for a malformed frame, the connection's error if
        it broke."""
        while not self._ready:
            if not self.framed and self._buf is not None and self._pos > HEAD:
                self._push()  # what has come so far
                break
            if self._error is not None:
                raise self._error
            if self._eof:
                if self.framed:
                    raise asyncio.IncompleteReadError(b"", None)
                return None
            self._readable.clear()
            await self._readable.wait()
        chunk = self._ready.popleft()
        self._queued -= chunk.n
        if self._paused and self._queued < LINK_BUFFER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def read_frame(self) -> memoryview:
        """The next frame's body (writable: opening a layer decrypts it in place)."""
        chunk = await self.read()
        assert chunk is not None  # a framed link raises at its end
        return chunk.data

    # -- the writer's side ---------------------------------------------------------------------------------------
    def write(self, data: Buf) -> None:
        """Queue data (not copied: a chunk's buffer is not reused). ConnectionResetError once the link is closed,
        WireError after write_eof (the peer sent data after its end: the transports' RuntimeError otherwise)."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the link is closed")
        if self._eof_written:
            raise WireError("data after the end of the stream")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while more than LINK_BUFFER bytes are queued; ConnectionResetError once the link is closed."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the link is closed")
        await self._writable.wait()
        if self.transport.is_closing():
            raise ConnectionResetError("the link is closed")

    def can_write_eof(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.transport.can_write_eof()

    def write_eof(self) -> None:
        assert self.transport is not None
        self._eof_written = True
        self.transport.write_eof()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed

    def get_extra_info(self, name: str) -> object:
        return None if self.transport is None else self.transport.get_extra_info(name)


async def connect(host: str, port: int, framed: bool = True) -> Link:
    """A link to host:port (a relay: `framed`; a destination: plain)."""
    _, link = await asyncio.get_running_loop().create_connection(lambda: Link(framed), host, port)
    return link


async def serve(handler: Handler, host: str, port: int) -> asyncio.AbstractServer:
    """Accept framed links on host:port (0: any free port), each served by handler(link), closed when it returns."""
    return await asyncio.get_running_loop().create_server(lambda: Link(True, handler), host, port)


def buffered(w: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """A writer that queues up to LINK_BUFFER bytes before drain() waits (for a server's accepted streams too)."""
    w.transport.set_write_buffer_limits(high=LINK_BUFFER)
    return w


def frame(body: bytes) -> bytes:
    return frame_head(body) + body


def frame_head(body: Buf) -> bytes:
    """The length that goes before `body` (written apart from it: a large body is not copied)."""
    if not 0 < len(body) <= MAX_FRAME:
        raise WireError(f"frame of {len(body)} bytes (1..{MAX_FRAME})")
    return _LEN.pack(len(body))


def x25519_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class HopKeys:
    """One hop's two directions: a key and a nonce counter each."""

    fwd: ChaCha20Poly1305
    bwd: ChaCha20Poly1305
    fwd_n: int = 1
    bwd_n: int = 1
    confirm: bytes = field(default=b"", repr=False)

    @classmethod
    def derive(cls, shared: bytes, client_pub: bytes, relay_pub: bytes) -> "HopKeys":
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=client_pub + relay_pub, info=_INFO).derive(shared)
        keys = cls(ChaCha20Poly1305(okm[:32]), ChaCha20Poly1305(okm[32:]))
        keys.confirm = keys.bwd.encrypt(_nonce(0), b"", client_pub)
        return keys

    def seal_fwd(self, cmd: int, data: Union[Buf, Chunk], framed: bool = False) -> memoryview:
        """The RELAY body carrying the layer `cmd | data` forward (a whole frame, length first, if `framed`). A
        Chunk is sealed in place: its buffer becomes the frame; other data is copied once."""
        n, self.fwd_n = self.fwd_n, self.fwd_n + 1
        return _seal(self.fwd, n, cmd, data, framed)

    def seal_bwd(self, cmd: int, data: Union[Buf, Chunk], framed: bool = False) -> memoryview:
        n, self.bwd_n = self.bwd_n, self.bwd_n + 1
        return _seal(self.bwd, n, cmd, data, framed)

    def open_fwd(self, body: Buf) -> memoryview:
        """The layer `cmd | data` of a RELAY body coming forward, decrypted in place when `body` is writable (its
        bytes become the plaintext); WireError if it is not a RELAY body, or fails authentication."""
        n, self.fwd_n = self.fwd_n, self.fwd_n + 1
        return _open(self.fwd, n, body)

    def open_bwd(self, body: Buf) -> memoryview:
        n, self.bwd_n = self.bwd_n, self.bwd_n + 1
        return _open(self.bwd, n, body)


def _nonce(n: int) -> bytes:
    return n.to_bytes(12, "big")


def _seal(aead: ChaCha20Poly1305, n: int, cmd: int, data: Union[Buf, Chunk], framed: bool) -> memoryview:
    """`length | RELAY | ChaCha20-Poly1305(cmd | data)` encrypted in the chunk's own buffer (the length only if
    `framed`)."""
    if not isinstance(data, Chunk):
        chunk = Chunk(bytearray(HEAD + len(data) + TAG), len(data))
        chunk.buf[HEAD:HEAD + len(data)] = data
        data = chunk
    size = 2 + data.n + TAG
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes (1..{MAX_FRAME})")
    buf = memoryview(data.buf)
    _LEN.pack_into(buf, 0, size)
    buf[4], buf[5] = Kind.RELAY, cmd
    aead.encrypt_into(_nonce(n), buf[5:HEAD + data.n], None, buf[5:HEAD + data.n + TAG])
    return buf[0 if framed else 4:HEAD + data.n + TAG]


def _open(aead: ChaCha20Poly1305, n: int, body: Buf) -> memoryview:
    if len(body) < 2 + TAG or body[0] != Kind.RELAY:
        raise WireError(f"a frame of kind {body[0] if body else None} and {len(body)} bytes inside a circuit")
    view = memoryview(body)
    if view.readonly:
        view = memoryview(bytearray(view))
    try:
        aead.decrypt_into(_nonce(n), view[1:], None, view[1:-TAG])  # in place: OpenSSL's AEADs allow it
    except InvalidTag:
        raise WireError("a layer failed authentication (tampered, replayed or out of order)") from None
    return view[1:-TAG]


def client_hop(relay_pub: bytes) -> tuple[bytes, HopKeys]:
    """The client's side of a hop: (e.pub for CREATE/EXTEND, the hop's keys); WireError if the relay's registered
    key is not a usable X25519 key (the registry checks only its length: a low-order point makes no shared
    secret)."""
    e = X25519PrivateKey.generate()
    pub = x25519_public(e)
    try:
        shared = e.exchange(X25519PublicKey.from_public_bytes(relay_pub))
    except ValueError as err:
        raise WireError(f"the relay's X25519 key is not usable: {err}") from None
    return pub, HopKeys.derive(shared, pub, relay_pub)


def relay_hop(relay_key: X25519PrivateKey, client_pub: bytes) -> HopKeys:
    """The relay's side of a hop from the client's e.pub (WireError if it is not a usable X25519 key)."""
    try:
        shared = relay_key.exchange(X25519PublicKey.from_public_bytes(client_pub))
    except ValueError as e:
        raise WireError(f"not an X25519 public key: {e}") from None
    return HopKeys.derive(shared, client_pub, x25519_public(relay_key))
