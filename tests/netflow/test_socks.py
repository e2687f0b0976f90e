"""The client's SOCKS5 front (RFC 1928) over a real socket: CONNECT to an IPv4, IPv6 or domain address gives the
destination; no acceptable method, another command or an unknown address type gets its RFC reply and no
destination. And when a receipt is due (every MiB, or 2 s after the last one for anything unpaid)."""
from __future__ import annotations

import asyncio
import struct
from typing import Optional

import pytest

from netflow.client import MIB, RECEIPT_EVERY_S, Paid, RelayInfo, socks_handshake


async def _handshake(request: bytes) -> tuple[Optional[str], bytes]:
    """What socks_handshake made of `request` sent by a client, and every byte it answered."""
    result: asyncio.Future[Optional[str]] = asyncio.get_running_loop().create_future()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            result.set_result(await socks_handshake(r, w))
        finally:
            w.close()
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    r, w = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    w.write(request)
    answer = await asyncio.wait_for(r.read(), 30)
    w.close()
    server.close()
    return await result, answer


GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication
OK = b"\x05\x00"


@pytest.mark.parametrize("address, dest", [
    (b"\x01" + bytes([10, 1, 2, 3]), "10.1.2.3:8080"),
    (b"\x03" + bytes([11]) + b"example.org", "example.org:8080"),
    (b"\x04" + bytes(15) + b"\x01", "[::1]:8080"),
])
async def test_connect_to_each_address_type_gives_the_destination(address: bytes, dest: str) -> None:
    got, answer = await _handshake(GREETING + b"\x05\x01\x00" + address + struct.pack(">H", 8080))
    assert got == dest and answer == OK  # the CONNECT's own reply comes once the circuit says CONNECTED


async def test_a_client_offering_no_acceptable_method_is_refused() -> None:
    got, answer = await _handshake(b"\x05\x01\x02")  # username/password only
    assert got is None and answer == b"\x05\xff"


@pytest.mark.parametrize("request_, code", [
    (b"\x05\x02\x00\x01" + bytes(4) + b"\x00\x50", 0x07),  # BIND: command not supported
    (b"\x05\x03\x00\x01" + bytes(4) + b"\x00\x50", 0x07),  # UDP ASSOCIATE
    (b"\x05\x01\x00\x05", 0x08),  # address type 5: not supported
])
async def test_another_command_or_address_type_gets_its_rfc_reply(request_: bytes, code: int) -> None:
    got, answer = await _handshake(GREETING + request_)
    assert got is None and answer[:2] == OK and answer[2:4] == bytes((5, code))


def test_a_receipt_is_due_every_mib_or_two_seconds_after_the_last_for_anything_unpaid() -> None:
    p = Paid(RelayInfo(bytes(32), bytes(32), bytes(32), 3, "127.0.0.1:1", 1000, 0), b"\2" * 32, b"\1" * 32, 10**6)
    assert not p.due(0.0)  # nothing carried
    p.units = MIB - 1
    assert not p.due(RECEIPT_EVERY_S - 0.01) and p.due(RECEIPT_EVERY_S)
    p.units = MIB
    assert p.due(0.0)
    p.receipt(1, 10.0)
    assert p.seq == 1 and p.receipted_units == MIB and not p.due(10.0 + RECEIPT_EVERY_S)  # all paid
    p.units += 1
    assert not p.due(10.0 + RECEIPT_EVERY_S - 0.01) and p.due(10.0 + RECEIPT_EVERY_S)
