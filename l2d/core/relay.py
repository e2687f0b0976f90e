"""NetFlow relay registry state transitions: register (stake locked), heartbeat, exit, withdraw, and the weights
the federation derives from its own probes (docs/netflow.md).

State values (canonical, big-endian):
  relay_key(identity) = 0x08 || the relay's L2 key -> RelayRecord (130 fixed bytes, then the endpoint)
  vote_key(identity, member) = 0x15 || H_RELAY_VOTE(relay || member) -> RelayVote (16 bytes): that member's latest
    measurement of the relay
A relay's selection weight is never what it advertises, nor what one member says: measured and success are the low
medians over the current members of their latest votes since the relay registered (a member without one counts 0),
and weight = min(measured, advertised, WEIGHT_CAP) x success; 0 until more than half the members have measured it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Callable, Optional, Sequence

from .codec import Reader, write_bytes
from .errors import DecodeError, InvalidTransaction
from .hashing import H_RELAY_VOTE
from .relay_tx import MAX_ENDPOINT, PPM, RelayRegister, RelayWeights
from .state import (FEDERATION_MEMBERS_KEY, Namespace, Rules, StateView, add_locked, bump_member_nonce, charge_sender,
                    check_member, credit, decode_members)
from .tx import Transaction

EXIT_DELAY_BLOCKS = 100  # an exited relay's stake stays locked this long (sessions it served settle meanwhile)
WEIGHT_CAP_KIB_S = 1 << 20  # 1 GiB/s: no relay weighs more, whatever it measures
_R = bytes((Namespace.RELAY,))
_V = bytes((Namespace.RELAY_VOTE,))
_HEAD = struct.Struct(">BQQQQ32s32sBIQIIIQ")
_VOTE = struct.Struct(">QII")


class RelayStatus(IntEnum):
    ACTIVE = 1
    EXITING = 2
    WITHDRAWN = 3


def relay_key(identity: bytes) -> bytes:
    return _R + identity


def vote_key(identity: bytes, member: bytes) -> bytes:
    return _V + H_RELAY_VOTE(identity + member)


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


@dataclass(frozen=True, slots=True)
class RelayVote:
    """Value under vote_key: epoch u64 | measured_kib_s u32 | success_ppm u32 (one member's latest measurement)."""

    epoch: int
    measured_kib_s: int
    success_ppm: int

    def encode(self) -> bytes:
        return _VOTE.pack(self.epoch, self.measured_kib_s, self.success_ppm)

    @classmethod
    def decode(cls, b: bytes) -> "RelayVote":
        if len(b) != _VOTE.size:
            raise DecodeError(f"relay vote of {len(b)} bytes, not {_VOTE.size}")
        return cls(*_VOTE.unpack(b))


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
    """A member's probes: each named relay (registered since before the epoch, not withdrawn, not measured by this
    member at this or a later epoch) gets the member's vote, and the measurement and weight the current members'
    votes give together (aggregate). All checked before the first write."""
    p = tx.payload
    assert isinstance(p, RelayWeights)
    check_member(view, tx)  # a non-member hears Unauthorized first
    if p.epoch > view.height:
        raise InvalidTransaction(f"weights epoch {p.epoch} is above this block's height {view.height}")
    members = decode_members(view.get(FEDERATION_MEMBERS_KEY) or b"")
    me = members.index(tx.sender)
    updated = []
    for m in p.measurements:
        rec = _need_relay(view, m.relay)
        if rec.status == RelayStatus.WITHDRAWN:
            raise InvalidTransaction(f"relay {m.relay.hex()} has withdrawn")
        if p.epoch < rec.registered_height:
            raise InvalidTransaction(f"relay {m.relay.hex()} registered at height {rec.registered_height}, after "
                                     f"epoch {p.epoch}")
        votes = member_votes(view.get, m.relay, rec, members)
        mine = votes[me]
        if mine is not None and p.epoch <= mine.epoch:
            raise InvalidTransaction(f"relay {m.relay.hex()} was measured by this member at epoch {mine.epoch}, "
                                     f"not before {p.epoch}")
        vote = votes[me] = RelayVote(p.epoch, m.measured_kib_s, m.success_ppm)
        updated.append((vote, aggregate(rec, votes)))
    bump_member_nonce(view, tx)
    for m, (v, rec) in zip(p.measurements, updated):
        view.put(vote_key(m.relay, tx.sender), v.encode())
        view.put(relay_key(m.relay), rec.encode())


def member_votes(get: Callable[[bytes], Optional[bytes]], relay: bytes, rec: RelayRecord,
                 members: Sequence[bytes]) -> list[Optional[RelayVote]]:
    """Each member's vote on the relay's current registration, in member order (None: it has none, or only one
    from before the relay last registered, which counts for nothing)."""
    out: list[Optional[RelayVote]] = []
    for k in members:
        raw = get(vote_key(relay, k))
        v = None if raw is None else RelayVote.decode(raw)
        out.append(v if v is not None and v.epoch >= rec.registered_height else None)
    return out


def aggregate(rec: RelayRecord, votes: list[Optional[RelayVote]]) -> RelayRecord:
    """The relay's measurement from every current member's vote (None: that member has not measured it, which
    counts as 0): the low medians of the measured rates and of the success shares, so members fewer than half can
    raise neither above what an honest member measured, nor lower it below; the weight derived from them; and the
    newest vote's epoch."""
    low = (len(votes) - 1) // 2
    measured = sorted(0 if v is None else v.measured_kib_s for v in votes)[low]
    success = sorted(0 if v is None else v.success_ppm for v in votes)[low]
    return replace(rec, measured_kib_s=measured, success_ppm=success,
                   weight=relay_weight(measured, rec.rate_kib_s, success),
                   measured_height=max(v.epoch for v in votes if v is not None))
