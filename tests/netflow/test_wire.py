"""The hop layer in isolation: what one side seals the other opens, exactly once, in order, and nothing else; and
the Link that reads frames and chunks straight into buffers of their own."""
from __future__ import annotations

import asyncio
import os
import struct
from typing import Any, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from netflow.wire import (HEAD, LINK_BUFFER, MAX_DATA, MAX_FRAME, TAG, Chunk, Cmd, HopKeys, Kind, Link, WireError,
                          client_hop, frame, relay_hop, serve, x25519_public)


def _pair() -> tuple[HopKeys, HopKeys]:
    relay_key = X25519PrivateKey.generate()
    pub, client = client_hop(x25519_public(relay_key))
    relay = relay_hop(relay_key, pub)
    assert relay.confirm == client.confirm
    return client, relay


@pytest.mark.parametrize("size", [0, 1, 1000, MAX_DATA])
def test_a_layer_sealed_forward_opens_at_the_relay_and_back_at_the_client(size: int) -> None:
    client, relay = _pair()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = client.seal_fwd(Cmd.DATA, data)
    assert body[0] == Kind.RELAY and len(body) == 1 + 1 + size + TAG
    plain = relay.open_fwd(body)
    assert plain[0] == Cmd.DATA and bytes(plain[1:]) == data
    framed = relay.seal_bwd(Cmd.FORWARD, memoryview(data), framed=True)
    assert struct.unpack(">I", framed[:4])[0] == len(framed) - 4
    back = client.open_bwd(framed[4:])
    assert back[0] == Cmd.FORWARD and bytes(back[1:]) == data


def test_layers_open_only_in_order_and_only_once() -> None:
    client, relay = _pair()
    first, second = client.seal_fwd(Cmd.DATA, b"one"), client.seal_fwd(Cmd.DATA, b"two")
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_fwd(second)  # reordered: the relay expects the first nonce
    client, relay = _pair()
    first = bytes(client.seal_fwd(Cmd.DATA, b"one"))  # bytes: opened in a copy, so it can be replayed as sent
    assert bytes(relay.open_fwd(first)[1:]) == b"one"
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_fwd(first)  # replayed


def test_an_altered_byte_the_other_direction_s_key_or_a_malformed_body_is_refused() -> None:
    client, relay = _pair()
    body = client.seal_fwd(Cmd.DATA, b"payload")
    altered = bytearray(body)
    altered[3] ^= 1
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_fwd(altered)
    client, relay = _pair()
    with pytest.raises(WireError, match="failed authentication"):
        relay.open_bwd(client.seal_fwd(Cmd.DATA, b"payload"))  # a forward layer is not a backward one
    for bad in (b"", bytes([Kind.RELAY]) + bytes(TAG), bytes([Kind.CREATE]) + bytes(40)):
        with pytest.raises(WireError, match="inside a circuit"):
            relay.open_fwd(bad)


def test_a_layer_larger_than_a_frame_is_refused_before_it_is_sent() -> None:
    client, _ = _pair()
    with pytest.raises(WireError, match="frame of"):
        client.seal_fwd(Cmd.FORWARD, bytes(MAX_FRAME))


def test_a_chunk_is_sealed_in_its_own_buffer_exactly_as_a_copy_would_be() -> None:
    client, relay = _pair()
    data = bytes(range(256)) * 40
    chunk = Chunk(bytearray(HEAD + len(data) + TAG), len(data))
    chunk.buf[HEAD:HEAD + len(data)] = data
    other, _ = _pair()
    other.fwd = client.fwd  # the same key and nonce sealing a copy
    copied = bytes(other.seal_fwd(Cmd.DATA, data, framed=True))
    in_place = client.seal_fwd(Cmd.DATA, chunk, framed=True)
    assert in_place.obj is chunk.buf and bytes(in_place) == copied
    plain = relay.open_fwd(in_place[4:])
    assert plain.obj is chunk.buf and plain[0] == Cmd.DATA and bytes(plain[1:]) == data  # opened in place too


async def _pair_of_links(framed: bool) -> tuple[Link, asyncio.StreamWriter, asyncio.AbstractServer]:
    """A Link reading what an asyncio stream writes."""
    accepted: asyncio.Queue[Link] = asyncio.Queue()

    async def handler(link: Link) -> None:
        await accepted.put(link)
        await link.wait_closed()
    server = await (serve(handler, "127.0.0.1", 0) if framed else
                    asyncio.get_running_loop().create_server(lambda: Link(False, handler), "127.0.0.1", 0))
    _, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    return await accepted.get(), w, server


async def test_frames_written_in_pieces_arrive_whole_and_a_bad_length_is_refused_after_the_good_ones() -> None:
    link, w, server = await _pair_of_links(framed=True)
    bodies = [b"\x03" + bytes([i]) * (n - 1) for i, n in enumerate((1, 17, 70_000, MAX_FRAME))]
    wire = b"".join(frame(b) for b in bodies) + (MAX_FRAME + 1).to_bytes(4, "big") + b"never read"
    for i in range(0, len(wire), 50_000):  # in pieces that split lengths and bodies
        w.write(wire[i:i + 50_000])
        await w.drain()
    for b in bodies:
        got = await link.read_frame()
        assert bytes(got) == b and not got.readonly
    with pytest.raises(WireError, match=f"frame of {MAX_FRAME + 1} bytes"):
        await link.read_frame()
    assert link.transport is not None and link.transport.is_closing()  # a link that broke the protocol is closed
    w.close()
    server.close()


async def test_writing_after_the_end_or_after_close_is_a_typed_error() -> None:
    # the same on every event loop (asyncio's transport raises RuntimeError after write_eof, uvloop's after close)
    link, w, server = await _pair_of_links(framed=False)
    link.write(b"before")
    link.write_eof()
    with pytest.raises(WireError, match="after the end"):
        link.write(b"after")
    link.close()
    with pytest.raises(ConnectionResetError):
        link.write(b"closed")
    w.close()
    server.close()


async def test_a_link_ending_mid_frame_raises_incomplete_read() -> None:
    link, w, server = await _pair_of_links(framed=True)
    w.write(frame(b"\x03whole") + (100).to_bytes(4, "big") + b"part")
    w.close()
    assert bytes(await link.read_frame()) == b"\x03whole"
    with pytest.raises(asyncio.IncompleteReadError):
        await link.read_frame()
    link.close()
    server.close()


async def test_a_plain_link_delivers_the_stream_in_chunks_then_none_and_stops_reading_while_unread(
        poll: Callable[..., Any]) -> None:
    link, w, server = await _pair_of_links(framed=False)
    data = os.urandom(3 * LINK_BUFFER)
    w.write(data)  # nobody reads the link meanwhile
    assert link.transport is not None
    await poll(lambda: not link.transport.is_reading(), 30, "reading paused with LINK_BUFFER bytes unread")
    got = bytearray()
    while not link.transport.is_reading():  # resumed once less than LINK_BUFFER is unread
        chunk = await link.read()
        assert chunk is not None and chunk.n <= MAX_DATA
        got += chunk.data
    assert len(got) <= 2 * LINK_BUFFER
    drained = asyncio.ensure_future(w.drain())
    w.write_eof()
    while (chunk := await link.read()) is not None:
        assert 0 < chunk.n <= MAX_DATA and len(chunk.buf) >= HEAD + chunk.n + TAG  # room to be sealed in place
        got += chunk.data
    await drained
    assert bytes(got) == data
    w.close()
    link.close()
    server.close()
