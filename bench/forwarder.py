"""A bare TCP forwarder for bench_netflow's ceiling: asyncio streams as the relays use them, no framing, no cipher.

    python bench/forwarder.py TARGET_HOST:PORT

Listens on a free loopback port (prints `listening on HOST:PORT`) and copies every connection to TARGET both ways,
256 KiB reads, 1 MiB buffers: what two Python processes in the path cost before NetFlow adds anything.
"""
from __future__ import annotations

import asyncio
import sys

CHUNK, BUFFER = 1 << 18, 1 << 20


async def _copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while chunk := await r.read(CHUNK):
            w.write(chunk)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()
    except ConnectionError:
        w.close()


async def main(target: str) -> None:
    host, _, port = target.rpartition(":")

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(host, int(port), limit=BUFFER)
        for writer in (w, tw):
            writer.transport.set_write_buffer_limits(high=BUFFER)
        await asyncio.gather(_copy(r, tw), _copy(tr, w))
        w.close()
        tw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=BUFFER)
    print("listening on 127.0.0.1:%d" % server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
