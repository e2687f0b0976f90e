"""NetFlow relay registry state transitions: register (stake locked), heartbeat, exit, withdraw, and the weights
the federation derives from its own probes (docs/netflow.md).

State value (canonical, big-endian):
  relay_key(identity) = 0x08 || the relay's L2 key -> RelayRecord (130 fixed bytes, then the endpoint)
A relay's selection weight is never what it advertises: weight = min(measured, advertised, WEIGHT_CAP) x probe
success, from the latest RelayWeights of a federation member; 0 until it is first measured.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Optional

from .codec import Reader, write_bytes
from .errors import DecodeError, InvalidTransaction
from .relay_tx import MAX_ENDPOINT, PPM, RelayRegister, RelayWeights
from .state import Namespace, Rules, StateView, add_locked, bump_member_nonce, charge_sender, check_member, credit
from .tx import Transaction

EXIT_DELAY_BLOCKS = 100  # an exited relay's stake stays locked this long (sessions it served settle meanwhile)
WEIGHT_CAP_KIB_S = 1 << 20  # 1 GiB/s: no relay weighs more, whatever it measures
_R = bytes((Namespace.RELAY,))
_HEAD = struct.Struct(">BQQQQ32s32sBIQIIIQ")


class RelayStatus(IntEnum):
    ACTIVE = 1
    EXITING = 2
    WITHDRAWN = 3


def relay_key(identity: bytes) -> bytes:
    return _R + identity


def relay_weight(measured_kib_s: int, advertised_kib_s: int, success_ppm: int) -> int:
    """The selection weight: what was measured, never above what is advertised or WEIGHT_CAP_KIB_S, scaled by the
    share of probes that succeeded."""
    return min(measured_kib_s, advertised_kib_s, WEIGHT_CAP_KIB_S) * success_ppm // PPM


@dataclass(frozen=True, slots=True)
class RelayRecord:
    """Value under relay_key: status u8 | stake u64 | exit_height u64 | last_heartbeat u64 | registered_height u64 |
    x25519_key 32 | operator 32 | flags u8 | rate_kib_s u32 | price_msat_per_mib u64 | measured_kib_s u32 |
    success_ppm u32 | weight u32 | measured_height u64 | endpoint (CompactSize + bytes)."""

    status: RelayStatus
    stake_sat: int
    exit_height: int
    last_heartbeat: int
    registered_height: int
    x25519_key: bytes
    operator: bytes
    flags: int
    rate_kib_s: int
    price_msat_per_mib: int
    measured_kib_s: int
    success_ppm: int
    weight: int
    measured_height: int
    endpoint: bytes

    def encode(self) -> bytes:
        return _HEAD.pack(self.status, self.stake_sat, self.exit_height, self.last_heartbeat, self.registered_height,
                          self.x25519_key, self.operator, self.flags, self.rate_kib_s, self.price_msat_per_mib,
                          self.measured_kib_s, self.success_ppm, self.weight, self.measured_height) \
            + write_bytes(self.endpoint)

    @classmethod
    def decode(cls, b: bytes) -> "RelayRecord":
        r = Reader(b, "relay record")
        st, stake, exit_h, beat, reg, x25519, operator, flags, rate, price, measured, success, weight, at = \
            _HEAD.unpack(r.take(_HEAD.size))
        endpoint = r.var_bytes(MAX_ENDPOINT)
        r.end()
        if st not in (1, 2, 3):
            raise DecodeError(f"relay record status {st}")
        return cls(RelayStatus(st), stake, exit_h, beat, reg, x25519, operator, flags, rate, price, measured, success,
                   weight, at, endpoint)


def get_relay(view: StateView, identity: bytes) -> Optional[RelayRecord]:
    raw = view.get(relay_key(identity))
    return None if raw is None else RelayRecord.decode(raw)


def _need_relay(view: StateView, identity: bytes) -> RelayRecord:
    rec = get_relay(view, identity)
    if rec is None:
        raise InvalidTransaction(f"{identity.hex()} is not a registered relay")
    return rec


def apply_register(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, RelayRegister)
    old = get_relay(view, tx.sender)
    if old is not None and old.status != RelayStatus.WITHDRAWN:
        raise InvalidTransaction(f"relay {tx.sender.hex()} is registered ({old.status.name})")
    charge_sender(view, tx, rules, p.stake_sat)
    add_locked(view, p.stake_sat)
    view.put(relay_key(tx.sender), RelayRecord(
        RelayStatus.ACTIVE, p.stake_sat, 0, view.height, view.height, p.x25519_key, p.operator, p.flags,
        p.rate_kib_s, p.price_msat_per_mib, 0, 0, 0, 0, p.endpoint).encode())


def apply_heartbeat(view: StateView, tx: Transaction, rules: Rules) -> None:
    rec = _need_relay(view, tx.sender)
    if rec.status != RelayStatus.ACTIVE:
        raise InvalidTransaction(f"relay is {rec.status.name}: only an active relay sends heartbeats")
    charge_sender(view, tx, rules, 0)
    view.put(relay_key(tx.sender), replace(rec, last_heartbeat=view.height).encode())


def apply_exit(view: StateView, tx: Transaction, rules: Rules) -> None:
    rec = _need_relay(view, tx.sender)
    if rec.status != RelayStatus.ACTIVE:
        raise InvalidTransaction(f"relay is {rec.status.name}, not ACTIVE")
    charge_sender(view, tx, rules, 0)
    view.put(relay_key(tx.sender), replace(rec, status=RelayStatus.EXITING, exit_height=view.height).encode())


def apply_withdraw(view: StateView, tx: Transaction, rules: Rules) -> None:
    rec = _need_relay(view, tx.sender)
    if rec.status != RelayStatus.EXITING:
        raise InvalidTransaction(f"relay is {rec.status.name}: only an exited relay withdraws its stake")
    if view.height < rec.exit_height + EXIT_DELAY_BLOCKS:
        raise InvalidTransaction(f"stake is locked until height {rec.exit_height + EXIT_DELAY_BLOCKS} "
                                 f"(now {view.height})")
    charge_sender(view, tx, rules, 0)
    add_locked(view, -rec.stake_sat)
    credit(view, tx.sender, rec.stake_sat)
    view.put(relay_key(tx.sender), replace(rec, status=RelayStatus.WITHDRAWN, stake_sat=0, weight=0).encode())


def apply_weights(view: StateView, tx: Transaction, rules: Rules) -> None:
    """A member's probes: each named relay (registered, not withdrawn, not measured at a later epoch) gets the
    measurement and the weight derived from it. All checked before the first write."""
    p = tx.payload
    assert isinstance(p, RelayWeights)
    check_member(view, tx)  # a non-member hears Unauthorized first
    if p.epoch > view.height:
        raise InvalidTransaction(f"weights epoch {p.epoch} is above this block's height {view.height}")
    updated = []
    for m in p.measurements:
        rec = _need_relay(view, m.relay)
        if rec.status == RelayStatus.WITHDRAWN:
            raise InvalidTransaction(f"relay {m.relay.hex()} has withdrawn")
        if p.epoch <= rec.measured_height:
            raise InvalidTransaction(f"relay {m.relay.hex()} was measured at epoch {rec.measured_height}, not before "
                                     f"{p.epoch}")
        updated.append(replace(rec, measured_kib_s=m.measured_kib_s, success_ppm=m.success_ppm,
                               weight=relay_weight(m.measured_kib_s, rec.rate_kib_s, m.success_ppm),
                               measured_height=p.epoch))
    bump_member_nonce(view, tx)
    for m, rec in zip(p.measurements, updated):
        view.put(relay_key(m.relay), rec.encode())
