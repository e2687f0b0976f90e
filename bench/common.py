"""Shared helpers for the benchmarks: deterministic keys, baselines measured in the same run, RSS, waiting."""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import toml
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


def rss_parts_mb(pid: int | None = None) -> dict[str, float]:
    """RSS split into anonymous memory (the heap: what the process allocated) and file-backed pages (here: LMDB's
    memory map, pages of the database the kernel keeps cached and reclaims under pressure), in MiB."""
    out = {}
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "VmRSS:")):
                out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process pid has used so far (/proc/PID/stat, clock-tick resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_written_bytes(path: Path) -> Optional[int]:
    """Bytes written so far to the block device holding path (/proc/diskstats; every process's writes, the
    filesystem's journal included), or None where path is on no block device listed there (tmpfs, overlay)."""
    dev = os.stat(path).st_dev
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == (os.major(dev), os.minor(dev)):
                return int(fields[9]) * 512  # sectors written, 512 bytes each whatever the device's sector size
    return None


def current_rss_mb(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Proc:
    """A helper process of a bench (python's arguments after `python`), its stderr to log, its stdout read for
    the line that says where it listens."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self._log = open(log, "w")
        self.log = log
        self.p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=self._log, text=True,
                                  cwd=cwd)

    def line(self, pattern: str) -> re.Match[str]:
        """The first stdout line matching pattern (RuntimeError if the process exits first)."""
        assert self.p.stdout is not None
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.p.args}: exited ({self._log.name})")
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 60 s), then close the pipes."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p.stdout is not None:
            self.p.stdout.close()
        self._log.close()


def start_l2d(work: Path, alloc: dict[bytes, int], cwd: Path,
              **sections: dict[str, Any]) -> tuple[Proc, str]:
    """A local-network l2d (50 ms blocks, API on a free port, no admin token; sections: more config keys) with
    genesis money for alloc's keys: the process and its API base URL, read from its "api listening" log line."""
    cfg = work / "l2d.toml"
    d: dict[str, dict[str, Any]] = {
        "node": {"network": "local", "data_dir": str(work / "data"), "log_level": "INFO"},
        "chain": {"genesis_alloc": {k.hex(): v for k, v in alloc.items()}},
        "block": {"interval_ms": 50}, "api": {"port": 0, "admin_token": ""}, "snapshots": {"every_blocks": 0}}
    for name, values in sections.items():
        d[name] = {**d.get(name, {}), **values}
    cfg.write_text(toml.dumps(d))
    node = Proc(["-m", "l2d.node", "--config", str(cfg)], work / "l2d.log", cwd)

    def port() -> Optional[int]:
        for line in node.log.read_text().splitlines():
            rec = json.loads(line) if line.startswith("{") else {}
            if rec.get("msg") == "api listening":
                return int(rec["port"])
        return None
    try:
        return node, f"http://127.0.0.1:{poll(port, 60, 'l2d listening', 0.1)}"
    except TimeoutError:
        node.stop()
        raise
