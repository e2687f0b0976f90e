"""Key files: a 32-byte secp256k1 secret as 64 hex characters, created with mode 0600 from the OS RNG."""
from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path

from coincurve import PrivateKey

log = logging.getLogger(__name__)


class KeyFileError(Exception):
    """A key file that cannot be used (unreadable, not 64 hex characters, not a valid secret)."""


def load_or_create_secret(path: Path, what: str = "mint authority") -> bytes:
    """The 32-byte secret stored as hex text in path; created with mode 0600 from the OS RNG if missing."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        while not _valid_secret(secret):  # astronomically unlikely: 0 or >= the group order
            secret = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # created concurrently: read theirs
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secret.hex() + "\n")
            log.info("created %s key file", what, extra={"path": str(path)})
            return secret
    secret = load_secret(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("key file is readable by others", extra={"path": str(path), "mode": oct(mode)})
    return secret


def load_secret(path: Path) -> bytes:
    """The 32-byte secret stored as hex text in path (never created: for tools signing with an existing key)."""
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror if isinstance(e, OSError) else e}") from None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise KeyFileError(f"key file {path} must hold a valid secp256k1 secret as 64 hex characters")
    secret = bytes.fromhex(text)
    if not _valid_secret(secret):
        raise KeyFileError(f"key file {path} does not hold a valid secp256k1 secret")
    return secret


def _valid_secret(secret: bytes) -> bool:
    try:
        PrivateKey(secret)
    except ValueError:
        return False
    return True
