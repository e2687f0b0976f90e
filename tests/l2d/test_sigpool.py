"""l2d/sigpool.py: checks in worker processes agree with the inline check, and a worker that dies (SIGKILL, as
the OOM killer does) costs one batch an inline check, never an error: the next batch has fresh workers."""
from __future__ import annotations

import os
import signal

from coincurve import PrivateKey

from l2d.core import tx as T
from l2d.core.coin import Transfer
from l2d.core.params import LOCAL
from l2d.sigpool import SignaturePool


def _raws(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        secret = (i + 1).to_bytes(32, "big")
        to = PrivateKey((i + 2).to_bytes(32, "big")).public_key_xonly.format()
        raw = T.sign(LOCAL, secret, 0, 1, Transfer(to, 1 + i), b"\0" * 32).raw
        out.append(raw if i % 3 else raw[:-1] + bytes([raw[-1] ^ 1]))  # every third signature broken
    return out


async def test_a_killed_worker_costs_one_inline_batch_and_the_next_batch_has_new_workers() -> None:
    raws = _raws(40)
    expected = [bool(i % 3) for i in range(40)]
    pool = SignaturePool(1)
    try:
        assert await pool.check(raws) == expected
        assert pool._pool is not None
        first = pool._pool
        for pid in list(first._processes):  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
        assert await pool.check(raws) == expected  # the broken pool: checked inline, no error
        assert pool._pool is None or pool._pool is not first
        assert await pool.check(raws) == expected  # a fresh pool
        assert pool._pool is not None and pool._pool is not first
    finally:
        pool.close()
