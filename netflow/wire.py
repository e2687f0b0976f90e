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
import enum
import struct
from dataclasses import dataclass, field
from typing import Union

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


async def connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP stream with the link's buffers (LINK_BUFFER)."""
    r, w = await asyncio.open_connection(host, port, limit=LINK_BUFFER)
    return r, buffered(w)


def buffered(w: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """A writer that queues up to LINK_BUFFER bytes before drain() waits (for a server's accepted streams too)."""
    w.transport.set_write_buffer_limits(high=LINK_BUFFER)
    return w


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if not 0 < n <= MAX_FRAME:
        raise WireError(f"frame of {n} bytes (1..{MAX_FRAME})")
    return await reader.readexactly(n)


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

    def seal_fwd(self, cmd: int, data: Buf, framed: bool = False) -> bytearray:
        """The RELAY body carrying the layer `cmd | data` forward (a whole frame, length first, if `framed`)."""
        n, self.fwd_n = self.fwd_n, self.fwd_n + 1
        return _seal(self.fwd, n, cmd, data, framed)

    def seal_bwd(self, cmd: int, data: Buf, framed: bool = False) -> bytearray:
        n, self.bwd_n = self.bwd_n, self.bwd_n + 1
        return _seal(self.bwd, n, cmd, data, framed)

    def open_fwd(self, body: Buf) -> memoryview:
        """The layer `cmd | data` of a RELAY body coming forward (WireError if it is not one, or fails
        authentication)."""
        n, self.fwd_n = self.fwd_n, self.fwd_n + 1
        return _open(self.fwd, n, body)

    def open_bwd(self, body: Buf) -> memoryview:
        n, self.bwd_n = self.bwd_n, self.bwd_n + 1
        return _open(self.bwd, n, body)


def _nonce(n: int) -> bytes:
    return n.to_bytes(12, "big")


# A data chunk is copied once on each side of a hop: into the plaintext buffer (sealing), or out of the frame by
# the stream reader (opening); the cipher writes into the frame, and a layer is a view of its frame.
def _seal(aead: ChaCha20Poly1305, n: int, cmd: int, data: Buf, framed: bool) -> bytearray:
    plain = bytearray(1 + len(data))
    plain[0] = cmd
    plain[1:] = data
    size = 1 + len(plain) + TAG
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes (1..{MAX_FRAME})")
    head = _LEN.size if framed else 0
    out = bytearray(head + size)
    if framed:
        _LEN.pack_into(out, 0, size)
    out[head] = Kind.RELAY
    aead.encrypt_into(_nonce(n), plain, None, memoryview(out)[head + 1:])
    return out


def _open(aead: ChaCha20Poly1305, n: int, body: Buf) -> memoryview:
    if len(body) < 2 + TAG or body[0] != Kind.RELAY:
        raise WireError(f"a frame of kind {body[0] if body else None} and {len(body)} bytes inside a circuit")
    plain = bytearray(len(body) - 1 - TAG)
    try:
        aead.decrypt_into(_nonce(n), memoryview(body)[1:], None, plain)
    except InvalidTag:
        raise WireError("a layer failed authentication (tampered, replayed or out of order)") from None
    return memoryview(plain)


def client_hop(relay_pub: bytes) -> tuple[bytes, HopKeys]:
    """The client's side of a hop: (e.pub for CREATE/EXTEND, the hop's keys)."""
    e = X25519PrivateKey.generate()
    pub = x25519_public(e)
    return pub, HopKeys.derive(e.exchange(X25519PublicKey.from_public_bytes(relay_pub)), pub, relay_pub)


def relay_hop(relay_key: X25519PrivateKey, client_pub: bytes) -> HopKeys:
    """The relay's side of a hop from the client's e.pub (WireError if it is not a usable X25519 key)."""
    try:
        shared = relay_key.exchange(X25519PublicKey.from_public_bytes(client_pub))
    except ValueError as e:
        raise WireError(f"not an X25519 public key: {e}") from None
    return HopKeys.derive(shared, client_pub, x25519_public(relay_key))
