"""The member transport's byte layouts (docs/federation.md, "Member transport"): the WebSocket handshake, the frames
that follow it, the signed header of a fetch request, and the block-range and transaction responses.

Pure functions over bytes and the typed errors of the transport. Integers are unsigned big-endian.
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import Iterable, Sequence

from coincurve import PrivateKey

from ..core.hashing import H_FED_HANDSHAKE, H_FED_REQUEST, sha256
from ..core.tx import is_valid_key, xonly_key

VERSION = 1
MAGIC = b"L2DF"
FRAME_MESSAGE = 0x01  # kind | one machine message
FRAME_TXS = 0x02  # kind | count u16 | count x (u32 length | transaction)
MAX_TXS_PER_FRAME = 0xFFFF

_HELLO = struct.Struct(">4sBBB32s")  # magic | version | network id | server index | challenge
_AUTH = struct.Struct(">BB32sB64s")  # version | network id | client key | server index | signature
_WELCOME = struct.Struct(">4sBBB")  # magic | version | server index | client index
_REQ_AUTH = struct.Struct(">BQ16s64s")  # client index | timestamp ms | nonce | signature
_RANGE_HEAD = struct.Struct(">BBQH")  # version | network id | from height | count
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
MAX_COMMIT_BYTES = 0xFFFF  # u16 length; a real commit is at most 4105 bytes


class TransportError(Exception):
    """Root of the member transport's errors."""


class Close(IntEnum):
    """WebSocket close codes the server sends when it refuses a member connection (4000 + the HTTP status)."""
    BAD_HANDSHAKE = 4400  # a handshake frame that does not decode, or the wrong protocol version
    BAD_SIGNATURE = 4401  # the handshake signature does not verify under the key presented
    UNKNOWN_MEMBER = 4403  # the key presented is not a member's (or is this member's own)
    HANDSHAKE_TIMEOUT = 4408  # no handshake answer within limits.handshake_timeout_s
    REPLACED = 4409  # a newer authenticated connection from the same member replaced this one
    BAD_FRAME = 4415  # after the handshake: a text frame, an unknown kind, or a frame that does not decode
    NETWORK_MISMATCH = 4421  # the peer runs another network
    MESSAGE_TOO_BIG = 1009  # RFC 6455: a frame above limits.max_frame_bytes (aiohttp's own check)


class HandshakeError(TransportError):
    """A handshake this member refuses; `code` is the close code it answers with."""
    code = Close.BAD_HANDSHAKE
    reason = "bad-handshake"


class BadHandshake(HandshakeError):
    pass


class BadHandshakeSignature(HandshakeError):
    code = Close.BAD_SIGNATURE
    reason = "bad-signature"


class UnknownMember(HandshakeError):
    code = Close.UNKNOWN_MEMBER
    reason = "unknown-member"


class HandshakeTimeout(HandshakeError):
    code = Close.HANDSHAKE_TIMEOUT
    reason = "handshake-timeout"


class NetworkMismatch(HandshakeError):
    code = Close.NETWORK_MISMATCH
    reason = "network-mismatch"


class HandshakeRefused(TransportError):
    """Client side: the peer closed the connection during the handshake (code and reason as it sent them)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"peer refused the handshake: close code {code} {reason!r}")
        self.code = code
        self.reason = reason


class MalformedFrame(TransportError):
    """A frame after the handshake that does not decode."""


class FrameTooLarge(TransportError):
    """A frame above limits.max_frame_bytes (refused before it is queued, or by the receiver)."""


class RequestAuthError(TransportError):
    """A fetch request whose member signature is missing, unknown, stale, replayed or wrong; `status` is the HTTP
    status it is answered with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FetchError(TransportError):
    """A fetch from a peer failed; nothing it sent was returned."""


class PeerUnavailable(FetchError):
    """The peer could not be reached, timed out, or answered with an error status."""


class MalformedResponse(FetchError):
    """The peer's answer does not decode, is larger than allowed, or is not what was asked for."""


# -- handshake -------------------------------------------------------------------------------------------------

def handshake_sighash(network_id: int, challenge: bytes, client: int, server: int) -> bytes:
    return H_FED_HANDSHAKE(bytes([network_id]) + challenge + bytes([client, server]))


def encode_hello(network_id: int, server: int, challenge: bytes) -> bytes:
    return _HELLO.pack(MAGIC, VERSION, network_id, server, challenge)


def decode_hello(b: bytes) -> tuple[int, int, bytes]:
    """(network id, server index, challenge); BadHandshake if b is not a version 1 hello."""
    if len(b) != _HELLO.size:
        raise BadHandshake(f"hello is {len(b)} bytes, expected {_HELLO.size}")
    magic, version, network_id, server, challenge = _HELLO.unpack(b)
    if magic != MAGIC or version != VERSION:
        raise BadHandshake(f"hello: magic {magic!r} version {version} (this code speaks {MAGIC!r} {VERSION})")
    return network_id, server, challenge


def encode_auth(network_id: int, secret: PrivateKey, client: int, server: int, challenge: bytes) -> bytes:
    sig = secret.sign_schnorr(handshake_sighash(network_id, challenge, client, server))
    return _AUTH.pack(VERSION, network_id, secret.public_key_xonly.format(), server, sig)


def check_auth(b: bytes, network_id: int, me: int, members: Sequence[bytes], challenge: bytes) -> int:
    """The member index the auth frame b proves, against this member's challenge; a HandshakeError otherwise."""
    if len(b) != _AUTH.size:
        raise BadHandshake(f"auth is {len(b)} bytes, expected {_AUTH.size}")
    version, got_network, key, server, sig = _AUTH.unpack(b)
    if version != VERSION:
        raise BadHandshake(f"auth: version {version} (this code speaks {VERSION})")
    if got_network != network_id:
        raise NetworkMismatch(f"peer runs network id {got_network}, this member {network_id}")
    if server != me:
        raise BadHandshake(f"auth is addressed to member {server}, this is member {me}")
    try:
        client = members.index(key)
    except ValueError:
        raise UnknownMember(f"key {key.hex()} is not a member key") from None
    if client == me:
        raise UnknownMember(f"key {key.hex()} is this member's own key")
    if not xonly_key(key).verify(sig, handshake_sighash(network_id, challenge, client, me)):
        raise BadHandshakeSignature(f"handshake signature of member {client} does not verify")
    return client


def encode_welcome(server: int, client: int) -> bytes:
    return _WELCOME.pack(MAGIC, VERSION, server, client)


def check_welcome(b: bytes, server: int, client: int) -> None:
    if b != encode_welcome(server, client):
        raise BadHandshake(f"welcome frame {b[:16].hex()} is not member {server} accepting member {client}")


# -- frames after the handshake --------------------------------------------------------------------------------

def _entries(raws: Iterable[bytes], what: str, width: struct.Struct) -> bytes:
    out = []
    for r in raws:
        if len(r) >= 1 << (8 * width.size):
            raise ValueError(f"{what} of {len(r)} bytes does not fit its {width.size}-byte length")
        out.append(width.pack(len(r)))
        out.append(r)
    return b"".join(out)


def encode_txs(raws: Sequence[bytes]) -> bytes:
    """count u16 | count x (u32 length | raw)."""
    if len(raws) > MAX_TXS_PER_FRAME:
        raise ValueError(f"{len(raws)} transactions, at most {MAX_TXS_PER_FRAME} per frame")
    return _U16.pack(len(raws)) + _entries(raws, "transaction", _U32)


class _Reader:
    """Bounded reads over b; `error` is the exception type raised on any inconsistency."""

    def __init__(self, b: bytes, error: type[TransportError], what: str) -> None:
        self.b = memoryview(b)
        self.pos = 0
        self.error = error
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.b):
            raise self.error(f"{self.what}: truncated at byte {self.pos} (needs {n} more, has "
                             f"{len(self.b) - self.pos})")
        out = bytes(self.b[self.pos:self.pos + n])
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        return s.unpack(self.take(s.size))

    def end(self) -> None:
        if self.pos != len(self.b):
            raise self.error(f"{self.what}: {len(self.b) - self.pos} bytes after the last entry")


def decode_txs(b: bytes, error: type[TransportError] = MalformedFrame, max_count: int = MAX_TXS_PER_FRAME
               ) -> list[bytes]:
    r = _Reader(b, error, "transactions")
    (count,) = r.unpack(_U16)
    if count > max_count:
        raise error(f"transactions: {count} entries, at most {max_count} were asked for")
    out = []
    for _ in range(count):
        (n,) = r.unpack(_U32)
        if n == 0:
            raise error("transactions: an empty entry")
        out.append(r.take(n))
    r.end()
    return out


def decode_frame(b: bytes) -> tuple[int, bytes | list[bytes]]:
    """(kind, the message) or (kind, the transactions) of a frame after the handshake; MalformedFrame otherwise."""
    if len(b) < 2:
        raise MalformedFrame(f"a frame of {len(b)} bytes")
    kind = b[0]
    if kind == FRAME_MESSAGE:
        return kind, b[1:]
    if kind == FRAME_TXS:
        return kind, decode_txs(b[1:])
    raise MalformedFrame(f"unknown frame kind {kind}")


# -- fetch requests (HTTP) -------------------------------------------------------------------------------------

AUTH_HEADER = "L2d-Member-Auth"


def request_sighash(network_id: int, client: int, server: int, timestamp_ms: int, nonce: bytes, method: str,
                    path_qs: str, body: bytes) -> bytes:
    what = sha256(method.encode() + b" " + path_qs.encode() + b"\n" + body)
    return H_FED_REQUEST(bytes([network_id, client, server]) + timestamp_ms.to_bytes(8, "big") + nonce + what)


def encode_request_auth(network_id: int, secret: PrivateKey, client: int, server: int, timestamp_ms: int,
                        nonce: bytes, method: str, path_qs: str, body: bytes) -> str:
    sig = secret.sign_schnorr(request_sighash(network_id, client, server, timestamp_ms, nonce, method, path_qs, body))
    return _REQ_AUTH.pack(client, timestamp_ms, nonce, sig).hex()


def decode_request_auth(header: str | None) -> tuple[int, int, bytes, bytes]:
    """(client index, timestamp ms, nonce, signature) of the header; RequestAuthError(401) if absent or malformed."""
    if header is None:
        raise RequestAuthError(401, f"member requests carry a {AUTH_HEADER} header")
    try:
        raw = bytes.fromhex(header)
    except ValueError:
        raise RequestAuthError(401, f"{AUTH_HEADER} is not hex") from None
    if len(raw) != _REQ_AUTH.size:
        raise RequestAuthError(401, f"{AUTH_HEADER} is {len(raw)} bytes, expected {_REQ_AUTH.size}")
    client, ts, nonce, sig = _REQ_AUTH.unpack(raw)
    return client, ts, nonce, sig


def verify_request(key: bytes, sig: bytes, sighash: bytes) -> bool:
    return is_valid_key(key) and xonly_key(key).verify(sig, sighash)


# -- responses -------------------------------------------------------------------------------------------------

def encode_txids(txids: Sequence[bytes]) -> bytes:
    """The body of a transaction request: count u16 | count x 32-byte txid."""
    if any(len(t) != 32 for t in txids):
        raise ValueError("a txid is 32 bytes")
    return _U16.pack(len(txids)) + b"".join(txids)


def decode_txids(b: bytes, max_count: int) -> list[bytes]:
    r = _Reader(b, MalformedFrame, "txids")
    (count,) = r.unpack(_U16)
    if count > max_count:
        raise MalformedFrame(f"txids: {count}, at most {max_count} per request")
    out = [r.take(32) for _ in range(count)]
    r.end()
    return out


def range_head_size() -> int:
    return _RANGE_HEAD.size


def range_entry_size(block: bytes, commit: bytes) -> int:
    return _U32.size + len(block) + _U16.size + len(commit)


def encode_range(network_id: int, start: int, entries: Sequence[tuple[bytes, bytes]]) -> bytes:
    """version u8 | network id u8 | from height u64 | count u16 | count x (u32 block length | block | u16 commit
    length | commit)."""
    parts = [_RANGE_HEAD.pack(VERSION, network_id, start, len(entries))]
    for block, commit in entries:
        if not block or len(block) >= 1 << 32:
            raise ValueError(f"a block of {len(block)} bytes")
        if len(commit) > MAX_COMMIT_BYTES:
            raise ValueError(f"a commit of {len(commit)} bytes does not fit its u16 length")
        parts += (_U32.pack(len(block)), block, _U16.pack(len(commit)), commit)
    return b"".join(parts)


def decode_range(b: bytes, network_id: int, start: int, max_count: int) -> list[tuple[bytes, bytes]]:
    """The entries of a block-range response to a request for max_count blocks from height start;
    MalformedResponse unless it is exactly that (right version, network, start, at most max_count entries, no
    empty block, nothing after the last entry)."""
    r = _Reader(b, MalformedResponse, "block range")
    version, got_network, got_start, count = r.unpack(_RANGE_HEAD)
    if version != VERSION:
        raise MalformedResponse(f"block range: version {version} (this code reads {VERSION})")
    if got_network != network_id:
        raise MalformedResponse(f"block range: network id {got_network}, expected {network_id}")
    if got_start != start:
        raise MalformedResponse(f"block range: starts at height {got_start}, asked for {start}")
    if count > max_count:
        raise MalformedResponse(f"block range: {count} blocks, asked for at most {max_count}")
    out: list[tuple[bytes, bytes]] = []
    for _ in range(count):
        (n,) = r.unpack(_U32)
        if n == 0:
            raise MalformedResponse(f"block range: an empty block at entry {len(out)}")
        block = r.take(n)
        (c,) = r.unpack(_U16)
        out.append((block, r.take(c)))
    r.end()
    return out
