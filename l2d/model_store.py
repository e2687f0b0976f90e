"""The daemon's content-addressed model store: one file per FL parameter set, named by the SHA-256 of its bytes
(<data_dir>/fl-models/<hex>.params). What an FL round commits to on the L2 can be fetched from here."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from .datadir import write_atomic

MODEL_DIR = "fl-models"


class CorruptModel(Exception):
    """A stored file does not hash to its name (it is never served under that name)."""


class ModelStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, params_hash: bytes) -> Path:
        return self.dir / f"{params_hash.hex()}.params"

    def has(self, params_hash: bytes) -> bool:
        return self.path(params_hash).exists()

    def put(self, raw: bytes) -> bytes:
        """Write raw under its SHA-256 (atomically, fsynced); returns the hash. The same bytes twice is a no-op."""
        h = hashlib.sha256(raw).digest()
        p = self.path(h)
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(p, raw, 0o644)
        return h

    def get(self, params_hash: bytes) -> Optional[bytes]:
        """The bytes stored under params_hash, None if absent; CorruptModel if they do not hash to it."""
        p = self.path(params_hash)
        if not p.exists():
            return None
        raw = p.read_bytes()
        if hashlib.sha256(raw).digest() != params_hash:
            raise CorruptModel(f"stored model {params_hash.hex()} does not hash to its name")
        return raw
