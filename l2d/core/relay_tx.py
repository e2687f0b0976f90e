"""NetFlow relay registry payloads (docs/netflow.md): register with a stake, heartbeat, exit, withdraw, and the
federation's measured weights.

Byte layouts (big-endian integers):
    RelayRegister  stake_sat u64 | x25519_key 32 | operator 32 | flags u8 | rate_kib_s u32 | price_msat_per_mib u64
                   | endpoint (CompactSize + 3 to 64 bytes of host:port)                           (89 to 150 bytes)
    RelayHeartbeat, RelayExit, RelayWithdraw: empty
    RelayWeights   epoch u64 | count (CompactSize, 1..64) | count x (relay 32 | measured_kib_s u32 | success_ppm u32)
The relay's identity is the transaction's sender (its L2 key); the transaction's BIP340 signature by that key covers
the X25519 key, which is how the onion handshake key is bound to the identity.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from .codec import Reader, write_bytes, write_varint
from .errors import OutOfRange
from .params import MAX_MONEY
from .payload import EmptyPayload, TxType

FLAG_ENTRY = 1  # takes clients' connections (first hop)
FLAG_EXIT = 2  # opens connections to destinations (last hop)
MAX_ENDPOINT = 64
MAX_RATE_KIB_S = 1 << 30
MAX_PRICE_MSAT_PER_MIB = MAX_MONEY * 1000
MAX_WEIGHTS = 64
PPM = 1_000_000
_ENDPOINT = re.compile(rb"[A-Za-z0-9.\[\]:-]+:[0-9]{1,5}")
_REGISTER = struct.Struct(">Q32s32sBIQ")
_MEASURE = struct.Struct(">32sII")


def _u(value: int, bits: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise OutOfRange(f"{what} {value!r} is outside u{bits}")


def _b32(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise OutOfRange(f"{what} must be 32 bytes")


@dataclass(frozen=True, slots=True)
class RelayRegister:
    """Register the sender as a relay, locking stake_sat of its balance: its X25519 key (onion handshakes), its
    operator (relays of one operator never share a path), entry/exit flags, advertised rate, price and endpoint."""

    TYPE: ClassVar[TxType] = TxType.RELAY_REGISTER
    FEELESS: ClassVar[bool] = False
    stake_sat: int
    x25519_key: bytes
    operator: bytes
    flags: int
    rate_kib_s: int
    price_msat_per_mib: int
    endpoint: bytes

    def __post_init__(self) -> None:
        _u(self.stake_sat, 64, "relay stake")
        if not 0 < self.stake_sat <= MAX_MONEY:
            raise OutOfRange(f"relay stake {self.stake_sat} is outside 1..{MAX_MONEY}")
        _b32(self.x25519_key, "relay X25519 key")
        _b32(self.operator, "relay operator")
        _u(self.flags, 8, "relay flags")
        if self.flags & ~(FLAG_ENTRY | FLAG_EXIT):
            raise OutOfRange(f"relay flags {self.flags:#x} name unknown bits")
        _u(self.rate_kib_s, 32, "relay rate")
        if not 0 < self.rate_kib_s <= MAX_RATE_KIB_S:
            raise OutOfRange(f"relay rate {self.rate_kib_s} KiB/s is outside 1..{MAX_RATE_KIB_S}")
        _u(self.price_msat_per_mib, 64, "relay price")
        if self.price_msat_per_mib > MAX_PRICE_MSAT_PER_MIB:
            raise OutOfRange(f"relay price {self.price_msat_per_mib} msat/MiB exceeds {MAX_PRICE_MSAT_PER_MIB}")
        if not isinstance(self.endpoint, bytes) or len(self.endpoint) > MAX_ENDPOINT \
                or not _ENDPOINT.fullmatch(self.endpoint):
            raise OutOfRange(f"relay endpoint {self.endpoint!r} must be 1..{MAX_ENDPOINT} bytes of host:port")

    def encode(self) -> bytes:
        return _REGISTER.pack(self.stake_sat, self.x25519_key, self.operator, self.flags, self.rate_kib_s,
                              self.price_msat_per_mib) + write_bytes(self.endpoint)

    def debit_sat(self) -> int:
        return self.stake_sat

    @classmethod
    def decode(cls, b: bytes) -> "RelayRegister":
        r = Reader(b, "relay register payload")
        stake, x25519, operator, flags, rate, price = _REGISTER.unpack(r.take(_REGISTER.size))
        endpoint = r.var_bytes(MAX_ENDPOINT)
        r.end()
        return cls(stake, x25519, operator, flags, rate, price, endpoint)


@dataclass(frozen=True, slots=True)
class RelayHeartbeat(EmptyPayload):
    """The relay is alive (records the block height)."""

    TYPE: ClassVar[TxType] = TxType.RELAY_HEARTBEAT

    @classmethod
    def decode(cls, b: bytes) -> "RelayHeartbeat":
        cls.check_empty(b, "relay heartbeat")
        return cls()


@dataclass(frozen=True, slots=True)
class RelayExit(EmptyPayload):
    """Leave the mesh: no longer selected; the stake is withdrawable EXIT_DELAY_BLOCKS later."""

    TYPE: ClassVar[TxType] = TxType.RELAY_EXIT

    @classmethod
    def decode(cls, b: bytes) -> "RelayExit":
        cls.check_empty(b, "relay exit")
        return cls()


@dataclass(frozen=True, slots=True)
class RelayWithdraw(EmptyPayload):
    """An exited relay takes its stake back."""

    TYPE: ClassVar[TxType] = TxType.RELAY_WITHDRAW

    @classmethod
    def decode(cls, b: bytes) -> "RelayWithdraw":
        cls.check_empty(b, "relay withdraw")
        return cls()


@dataclass(frozen=True, slots=True)
class Measurement:
    """One relay's probe result: the throughput measured through it, and the share of probes that succeeded."""

    relay: bytes
    measured_kib_s: int
    success_ppm: int

    def __post_init__(self) -> None:
        _b32(self.relay, "measured relay")
        _u(self.measured_kib_s, 32, "measured rate")
        _u(self.success_ppm, 32, "probe success")
        if self.success_ppm > PPM:
            raise OutOfRange(f"probe success {self.success_ppm} ppm exceeds {PPM}")


@dataclass(frozen=True, slots=True)
class RelayWeights:
    """A federation member publishes its probes of relays (a member-signed system transaction, fee 0); the state
    derives each relay's selection weight from them."""

    TYPE: ClassVar[TxType] = TxType.RELAY_WEIGHTS
    FEELESS: ClassVar[bool] = True
    epoch: int  # the L2 height the probes were made at (weights only move forward)
    measurements: tuple[Measurement, ...]

    def __post_init__(self) -> None:
        _u(self.epoch, 64, "weights epoch")
        if not isinstance(self.measurements, tuple) or not 1 <= len(self.measurements) <= MAX_WEIGHTS:
            raise OutOfRange(f"relay weights list 1..{MAX_WEIGHTS} relays")
        keys = [m.relay for m in self.measurements]
        if keys != sorted(set(keys)):
            raise OutOfRange("relay weights must name distinct relays in ascending order")

    def encode(self) -> bytes:
        return (struct.pack(">Q", self.epoch) + write_varint(len(self.measurements))
                + b"".join(_MEASURE.pack(m.relay, m.measured_kib_s, m.success_ppm) for m in self.measurements))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "RelayWeights":
        r = Reader(b, "relay weights payload")
        epoch = r.u64()
        n = r.varint()
        if not 1 <= n <= MAX_WEIGHTS:
            raise OutOfRange(f"relay weights list {n} relays, expected 1..{MAX_WEIGHTS}")
        ms = tuple(Measurement(*_MEASURE.unpack(r.take(_MEASURE.size))) for _ in range(n))
        r.end()
        return cls(epoch, ms)
