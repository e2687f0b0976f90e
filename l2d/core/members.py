"""The federation's membership: the members' block-signing keys (x-only, BIP340) in member-index order, and the
threshold m of member signatures a block needs.

Fixed at genesis (docs/federation.md). Byte layout (state value and file format):
    version u8 (1) | n u8 | m u8 | n x 32-byte x-only keys
Member i (0-based) is keys[i]; m must satisfy n/2 < m <= n, so two blocks at one height both signed by m members
share at least 2m - n >= 1 signer. default_threshold(n) = floor(2n/3) + 1 tolerates floor((n-1)/3) Byzantine members.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import DecodeError, InvalidMembership, UnknownVersion
from .tx import is_valid_key

MEMBERS_VERSION = 1
MAX_MEMBERS = 64  # a commit's signer bitmap is at most 8 bytes
_HEAD = struct.Struct(">BBB")


def default_threshold(n: int) -> int:
    """floor(2n/3) + 1: 4 -> 3, 7 -> 5, 15 -> 11 (1 -> 1)."""
    return 2 * n // 3 + 1


@dataclass(frozen=True, slots=True)
class Membership:
    keys: tuple[bytes, ...]
    threshold: int

    def __post_init__(self) -> None:
        n = len(self.keys)
        if not 1 <= n <= MAX_MEMBERS:
            raise InvalidMembership(f"a federation has 1..{MAX_MEMBERS} members, not {n}")
        if not n / 2 < self.threshold <= n:
            raise InvalidMembership(f"threshold {self.threshold} of {n} members must be above n/2 and at most n "
                                    f"(two blocks signed by m members at one height must share a signer)")
        for i, k in enumerate(self.keys):
            if not isinstance(k, bytes) or not is_valid_key(k):
                raise InvalidMembership(f"member {i} key is not a valid 32-byte x-only public key")
        if len(set(self.keys)) != n:
            raise InvalidMembership("a member key appears twice")

    @property
    def n(self) -> int:
        return len(self.keys)

    def index_of(self, key: bytes) -> int:
        """The member index of key; InvalidMembership if key is not a member's."""
        try:
            return self.keys.index(key)
        except ValueError:
            raise InvalidMembership(f"{key.hex()} is not a member key") from None

    def encode(self) -> bytes:
        return _HEAD.pack(MEMBERS_VERSION, self.n, self.threshold) + b"".join(self.keys)

    @classmethod
    def decode(cls, b: bytes) -> "Membership":
        if len(b) < _HEAD.size:
            raise DecodeError(f"membership is {len(b)} bytes, shorter than its {_HEAD.size}-byte head")
        version, n, m = _HEAD.unpack_from(b)
        if version != MEMBERS_VERSION:
            raise UnknownVersion(f"membership version {version} (this code knows {MEMBERS_VERSION})")
        if len(b) != _HEAD.size + 32 * n:
            raise DecodeError(f"membership of {n} members is {len(b)} bytes, expected {_HEAD.size + 32 * n}")
        keys = tuple(b[_HEAD.size + 32 * i:_HEAD.size + 32 * (i + 1)] for i in range(n))
        return cls(keys, m)
