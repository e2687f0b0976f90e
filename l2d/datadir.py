"""The data directory: created private (0700), held by one daemon at a time, and watched for free space.

The lock is an exclusive `flock` on `<data_dir>/l2d.lock`, which holds the PID of the daemon holding it: a second
daemon on the same data dir refuses to start, naming that PID. The kernel drops the lock when its holder exits,
however it exits, so a stale file left by a crash never blocks a restart.

Free space: below `store.min_free_bytes` free on the data dir's filesystem (`os.statvfs`, as an unprivileged
process sees it) new transactions are refused with `DiskLow` (HTTP 503 `disk-low` with Retry-After) before LMDB
or a snapshot could fail for want of space; the check runs on every submission, so it lifts by itself as soon as
space returns.
"""
from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from .core.errors import Rejected
from .core.snapshot import fsync_dir
from .genesis import NodeError

log = logging.getLogger(__name__)

LOCK_FILE = "l2d.lock"
DISK_LOW_RETRY_AFTER_S = 10


class DataDirInUse(NodeError):
    """Another process holds the data dir's lock."""


class DiskLow(Rejected):
    """Refused for now: the data dir's filesystem has less free space than store.min_free_bytes.

    Answered with HTTP 503 and Retry-After: nothing is wrong with the transaction; submit it again later.
    """

    reason = "disk-low"
    retry_after_s = DISK_LOW_RETRY_AFTER_S


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on path's filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace path's contents with data at once and durably: a temporary file beside it (mode `mode`), fsynced,
    renamed over path, then the directory fsynced. A crash at any point leaves the old contents or the new."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def make_private_dir(path: Path) -> None:
    """Create path and its missing parents with mode 0700; existing directories are left as they are."""
    if path.is_dir():
        return
    if not path.parent.exists():
        make_private_dir(path.parent)
    path.mkdir(mode=0o700, exist_ok=True)


class DataDir:
    """The locked data dir of a running daemon. Build with DataDir.open; release with close()."""

    def __init__(self, path: Path, min_free_bytes: int, lock_fd: int) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._lock_fd: Optional[int] = lock_fd

    @classmethod
    def open(cls, path: Path, min_free_bytes: int) -> "DataDir":
        """Create the data dir (0700) if needed and take its lock; DataDirInUse if another process holds it."""
        make_private_dir(path)
        lock = path / LOCK_FILE
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"data dir {path} is in use by another l2d (pid {holder}, holding {lock}): "
                               "stop that daemon first, or give this one another node.data_dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        d = cls(path, min_free_bytes, fd)
        free = d.free_bytes()
        if free < min_free_bytes:
            log.warning("low disk space: %d bytes free on the data dir's filesystem, below store.min_free_bytes "
                        "(%d): new transactions are refused (HTTP 503 disk-low) until space is freed", free,
                        min_free_bytes, extra={"data_dir": str(path), "free_bytes": free,
                                               "min_free_bytes": min_free_bytes})
        return d

    def free_bytes(self) -> int:
        return free_bytes(self.path)

    def check_space(self) -> None:
        """Raise DiskLow when the free space is below store.min_free_bytes (0 turns the check off)."""
        if not self.min_free_bytes:
            return
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise DiskLow(f"the node is low on disk space ({free} bytes free on the data dir's filesystem, below "
                          f"store.min_free_bytes = {self.min_free_bytes}): not accepting transactions; "
                          f"retry in {DISK_LOW_RETRY_AFTER_S} s")

    def close(self) -> None:
        """Release the lock (the file stays: removing it would race with a daemon starting)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
