"""Shared helpers for the benchmarks: deterministic keys, baselines measured in the same run, RSS, waiting."""
from __future__ import annotations

import hashlib
import os
import resource
import time
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from coincurve import PrivateKey, PublicKeyXOnly


def secret(i: int) -> bytes:
    return hashlib.sha256(b"l2d bench key %d" % i).digest()


def keypairs(n: int) -> list[tuple[bytes, bytes]]:
    """n deterministic (secret, x-only pubkey) pairs."""
    out = []
    for i in range(n):
        s = secret(i)
        out.append((s, PrivateKey(s).public_key_xonly.format()))
    return out


# Admission refusals a sender retries after a pause: its queue at the member is full, not its transaction wrong.
BUSY = ("nonce-gap", "sender-limit", "mempool-full")


def poll(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Call cond until it returns something truthy; return that, or raise TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextmanager
def workdir(keep: Optional[Path], prefix: str) -> Iterator[Path]:
    """The bench's directory: keep (created, left in place) or a temporary one removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sha256_baseline(calls: int) -> float:
    """Seconds for `calls` bare hashlib SHA-256 calls on 64-byte inputs."""
    data = [os.urandom(64) for _ in range(min(calls, 200_000))]
    sha = hashlib.sha256
    reps, rest = divmod(calls, len(data))

    def run() -> None:
        for _ in range(reps):
            for d in data:
                sha(d).digest()
        for d in data[:rest]:
            sha(d).digest()

    return timed(run)


def schnorr_baseline(n: int = 5000) -> float:
    """Bare libsecp256k1 BIP340 verifications per second (keys pre-parsed, 32-byte messages)."""
    keys = [PrivateKey(secret(10_000_000 + i)) for i in range(64)]
    items = []
    for i in range(n):
        k = keys[i % len(keys)]
        msg = hashlib.sha256(b"m%d" % i).digest()
        items.append((PublicKeyXOnly(k.public_key_xonly.format()), k.sign_schnorr(msg, b"\0" * 32), msg))
    dt = timed(lambda: [pk.verify(sig, msg) for pk, sig, msg in items])
    return n / dt


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
