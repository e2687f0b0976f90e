"""Federated-learning state transitions: jobs with an escrowed reward pool, registered participants, one
commitment per round, and the finish that pays rewards by contribution (docs/federated.md).

State values (canonical, big-endian):
  fl_job_key(id)       = 0x0A || job id (the posting txid)         -> JobRecord
  fl_round_key(id, n)  = 0x07 || H("l2d/fl/round", id || u16 n)   -> u64 height || the FlRound payload bytes
Every handler checks everything before its first write. The pool is locked money (add_locked) from the post
until the finish, which pays each participant floor(pool * accepted examples / all accepted examples) and
refunds the rest to the poster.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Optional, cast

from .codec import Reader, write_bytes, write_varint
from .errors import DecodeError, DuplicateDuty, InvalidTransaction, Overflow, Unauthorized
from .fl_tx import (MAX_NODE_KEY, MAX_PARTICIPANTS, RECLAIM_BLOCKS, ZERO32, FlFinish, FlJobPost, FlReclaim, FlRegister,
                    FlRound)
from .hashing import tagged_hash
from .params import MAX_MONEY
from .state import (Namespace, Rules, StateView, add_locked, bump_member_nonce, charge_sender, check_member, credit,
                    locked_sat)
from .tx import Transaction

_JOB_HEAD = struct.Struct(">B32sQ32sHHHQH32sQQQ")
_PART_HEAD = struct.Struct(">32sQHQQ")
_HEIGHT = struct.Struct(">Q")
_J = bytes((Namespace.FL_JOB,))
_R = bytes((Namespace.FL_ROUND,))


class JobStatus(IntEnum):
    OPEN = 1  # taking registrations and round commitments
    FINISHED = 2  # closed by the federation: rewards paid, pool unlocked
    RECLAIMED = 3  # closed by the poster after RECLAIM_BLOCKS idle blocks: rewards paid, pool unlocked


def fl_job_key(job_id: bytes) -> bytes:
    return _J + job_id


def fl_round_key(job_id: bytes, rnd: int) -> bytes:
    return _R + tagged_hash("l2d/fl/round", job_id + rnd.to_bytes(2, "big"))


@dataclass(frozen=True, slots=True)
class JobParticipant:
    """A registered participant: its L2 key, Flower node key, and what it has contributed and earned."""

    key: bytes
    accepted_examples: int  # sum over rounds of the examples it trained on, where the aggregator accepted it
    rounds_accepted: int
    reward_sat: int  # set by the finish
    register_height: int
    node_key: bytes

    def encode(self) -> bytes:
        return (_PART_HEAD.pack(self.key, self.accepted_examples, self.rounds_accepted, self.reward_sat,
                                self.register_height) + write_bytes(self.node_key))


@dataclass(frozen=True, slots=True)
class JobRecord:
    """Value under fl_job_key: a 145-byte head, then the participants sorted by key."""

    status: JobStatus
    poster: bytes
    reward_pool_sat: int
    config_hash: bytes
    rounds: int
    min_participants: int
    max_participants: int
    post_height: int
    rounds_done: int
    last_params_hash: bytes  # zero until the first round commitment
    paid_sat: int  # rewards paid at the finish
    refunded_sat: int  # returned to the poster at the finish
    finish_height: int
    participants: tuple[JobParticipant, ...]

    def encode(self) -> bytes:
        return (_JOB_HEAD.pack(self.status, self.poster, self.reward_pool_sat, self.config_hash, self.rounds,
                               self.min_participants, self.max_participants, self.post_height, self.rounds_done,
                               self.last_params_hash, self.paid_sat, self.refunded_sat, self.finish_height)
                + write_varint(len(self.participants)) + b"".join(p.encode() for p in self.participants))

    @classmethod
    def decode(cls, b: bytes) -> "JobRecord":
        r = Reader(b, "FL job record")
        st, poster, pool, cfg, rounds, lo, hi, posted, done, last, paid, refunded, fin = _JOB_HEAD.unpack(
            r.take(_JOB_HEAD.size))
        if st not in (1, 2, 3):
            raise DecodeError(f"FL job record status {st}")
        n = r.varint()
        if n > MAX_PARTICIPANTS:
            raise DecodeError(f"FL job record lists {n} participants")
        parts = []
        for _ in range(n):
            k, ex, ra, rew, h = _PART_HEAD.unpack(r.take(_PART_HEAD.size))
            parts.append(JobParticipant(k, ex, ra, rew, h, r.var_bytes(MAX_NODE_KEY)))
        r.end()
        return cls(JobStatus(st), poster, pool, cfg, rounds, lo, hi, posted, done, last, paid, refunded, fin,
                   tuple(parts))

    def participant(self, key: bytes) -> Optional[JobParticipant]:
        for p in self.participants:
            if p.key == key:
                return p
        return None


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """Value under fl_round_key: the L2 height it was committed at, then the commitment as posted."""

    height: int
    commitment: FlRound

    def encode(self) -> bytes:
        return _HEIGHT.pack(self.height) + self.commitment.encode()

    @classmethod
    def decode(cls, b: bytes) -> "RoundRecord":
        if len(b) < _HEIGHT.size:
            raise DecodeError("FL round record is shorter than its height")
        return cls(_HEIGHT.unpack(b[:_HEIGHT.size])[0], FlRound.decode(b[_HEIGHT.size:]))


def get_job(view: StateView, job_id: bytes) -> Optional[JobRecord]:
    raw = view.get(fl_job_key(job_id))
    return None if raw is None else JobRecord.decode(raw)


def get_round(view: StateView, job_id: bytes, rnd: int) -> Optional[RoundRecord]:
    raw = view.get(fl_round_key(job_id, rnd))
    return None if raw is None else RoundRecord.decode(raw)


def reward_split(job: JobRecord) -> tuple[tuple[bytes, int], ...]:
    """Each participant's share, floor(pool * accepted examples / all accepted examples), for every non-zero
    share, sorted by key. Participants the robust aggregator never accepted get nothing."""
    total = sum(p.accepted_examples for p in job.participants)
    if total == 0:
        return ()
    out = []
    for p in job.participants:
        amount = job.reward_pool_sat * p.accepted_examples // total
        if amount:
            out.append((p.key, amount))
    return tuple(out)


def _open_job(view: StateView, job_id: bytes) -> JobRecord:
    job = get_job(view, job_id)
    if job is None:
        raise InvalidTransaction(f"no FL job {job_id.hex()}")
    if job.status != JobStatus.OPEN:
        raise InvalidTransaction(f"FL job {job_id.hex()} is {job.status.name.lower()}")
    return job


def apply_job_post(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(FlJobPost, tx.payload)
    key = fl_job_key(tx.txid)
    if view.get(key) is not None:
        raise InvalidTransaction(f"FL job {tx.txid.hex()} exists")
    if locked_sat(view) + p.reward_pool_sat > MAX_MONEY:
        raise Overflow("locked money would exceed the supply cap")
    charge_sender(view, tx, rules, p.reward_pool_sat)
    add_locked(view, p.reward_pool_sat)
    view.put(key, JobRecord(JobStatus.OPEN, tx.sender, p.reward_pool_sat, p.config_hash, p.rounds,
                            p.min_participants, p.max_participants, view.height, 0, ZERO32, 0, 0, 0, ()).encode())


def apply_register(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(FlRegister, tx.payload)
    job = _open_job(view, p.job_id)
    if job.rounds_done >= job.rounds:
        raise InvalidTransaction(f"FL job {p.job_id.hex()} has run all its rounds")
    if job.participant(tx.sender) is not None:
        raise InvalidTransaction(f"{tx.sender.hex()} is already registered for FL job {p.job_id.hex()}")
    if any(q.node_key == p.node_key for q in job.participants):
        raise InvalidTransaction("this node key is already registered for the job by another participant")
    if len(job.participants) >= job.max_participants:
        raise InvalidTransaction(f"FL job {p.job_id.hex()} is full ({job.max_participants} participants)")
    charge_sender(view, tx, rules, 0)
    new = JobParticipant(tx.sender, 0, 0, 0, view.height, p.node_key)
    parts = tuple(sorted(job.participants + (new,), key=lambda q: q.key))
    view.put(fl_job_key(p.job_id), replace(job, participants=parts).encode())


def apply_round(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(FlRound, tx.payload)
    check_member(view, tx)
    job = get_job(view, p.job_id)
    if job is not None and 1 <= p.round <= job.rounds_done:
        raise DuplicateDuty(f"round {p.round} of FL job {p.job_id.hex()} is committed already")
    job = _open_job(view, p.job_id)
    if p.round != job.rounds_done + 1:
        raise InvalidTransaction(f"FL job {p.job_id.hex()} expects round {job.rounds_done + 1}, not {p.round}")
    if p.round > job.rounds:
        raise InvalidTransaction(f"FL job {p.job_id.hex()} has {job.rounds} rounds")
    if job.rounds_done and p.prev_params_hash != job.last_params_hash:
        raise InvalidTransaction(f"round {p.round} does not start from round {job.rounds_done}'s parameters "
                                 f"{job.last_params_hash.hex()}")
    by_key = {q.key: q for q in job.participants}
    for part in p.participants:
        if part.key not in by_key:
            raise InvalidTransaction(f"{part.key.hex()} is not registered for FL job {p.job_id.hex()}")
    bump_member_nonce(view, tx)
    for part in p.participants:
        if part.accepted:
            q = by_key[part.key]
            by_key[part.key] = replace(q, accepted_examples=q.accepted_examples + part.num_examples,
                                       rounds_accepted=q.rounds_accepted + 1)
    parts = tuple(by_key[q.key] for q in job.participants)
    view.put(fl_job_key(p.job_id), replace(job, rounds_done=p.round, last_params_hash=p.params_hash,
                                           participants=parts).encode())
    view.put(fl_round_key(p.job_id, p.round), RoundRecord(view.height, p).encode())


def apply_finish(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(FlFinish, tx.payload)
    check_member(view, tx)
    job = get_job(view, p.job_id)
    if job is not None and job.status == JobStatus.FINISHED:
        raise DuplicateDuty(f"FL job {p.job_id.hex()} is finished already")
    job = _open_job(view, p.job_id)
    if p.final_params_hash != job.last_params_hash:
        raise InvalidTransaction(f"final params hash {p.final_params_hash.hex()} is not the last committed round's "
                                 f"{job.last_params_hash.hex()}")
    by_key = {q.key: q for q in job.participants}
    for key, _ in p.rewards:
        q = by_key.get(key)
        if q is None:
            raise InvalidTransaction(f"reward to {key.hex()}, not a participant of FL job {p.job_id.hex()}")
        if q.accepted_examples == 0:
            raise InvalidTransaction(f"reward to {key.hex()}, whose updates the aggregator never accepted")
    paid = sum(a for _, a in p.rewards)
    if paid > job.reward_pool_sat:
        raise InvalidTransaction(f"rewards total {paid} sat exceed the pool of {job.reward_pool_sat} sat")
    if p.rewards != reward_split(job):
        raise InvalidTransaction("rewards differ from the contribution split floor(pool * accepted examples / total)")
    bump_member_nonce(view, tx)
    _close(view, p.job_id, job, p.rewards, JobStatus.FINISHED)


def _close(view: StateView, job_id: bytes, job: JobRecord, rewards: tuple[tuple[bytes, int], ...],
           status: JobStatus) -> None:
    """Pay rewards (already checked against the split), refund the rest to the poster, unlock the pool."""
    add_locked(view, -job.reward_pool_sat)
    paid = 0
    for key, amount in rewards:
        credit(view, key, amount)
        paid += amount
    refund = job.reward_pool_sat - paid
    if refund:
        credit(view, job.poster, refund)
    by_key = dict(rewards)
    parts = tuple(replace(q, reward_sat=by_key.get(q.key, 0)) for q in job.participants)
    view.put(fl_job_key(job_id), replace(job, status=status, paid_sat=paid, refunded_sat=refund,
                                         finish_height=view.height, participants=parts).encode())


def last_activity_height(view: StateView, job_id: bytes, job: JobRecord) -> int:
    """The height of the job's last round commitment, or of its post if none."""
    if job.rounds_done == 0:
        return job.post_height
    rec = get_round(view, job_id, job.rounds_done)
    if rec is None:
        raise InvalidTransaction(f"FL job {job_id.hex()} round {job.rounds_done} is missing from the state")
    return rec.height


def apply_reclaim(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(FlReclaim, tx.payload)
    job = _open_job(view, p.job_id)
    if tx.sender != job.poster:
        raise Unauthorized(f"only the poster {job.poster.hex()} may reclaim FL job {p.job_id.hex()}")
    since = last_activity_height(view, p.job_id, job)
    if view.height < since + RECLAIM_BLOCKS:
        raise InvalidTransaction(f"FL job {p.job_id.hex()} was active at height {since}: it may be reclaimed from "
                                 f"height {since + RECLAIM_BLOCKS}")
    charge_sender(view, tx, rules, 0)
    _close(view, p.job_id, job, reward_split(job), JobStatus.RECLAIMED)
