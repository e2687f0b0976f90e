"""Federated-learning transaction payloads: job post, participant registration, round commitment, job finish.

Byte layouts (big-endian integers, CompactSize-prefixed lists): docs/federated.md. Metrics are fixed-point
integers (accuracy and loss in parts per million); no floats reach consensus.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import ClassVar

from .codec import Reader, write_bytes, write_varint
from .errors import OutOfRange
from .params import MAX_MONEY
from .payload import TxType

PPM = 1_000_000
MAX_ROUNDS = 10_000
MAX_PARTICIPANTS = 64
MAX_NODE_KEY = 256
RECLAIM_BLOCKS = 1000  # a job idle this many L2 blocks (no round committed) may be closed by its poster
NODE_KEY_PREFIX = b"ecdsa-sha2-nistp"  # Flower 1.41 SuperNode auth keys: EC keys in OpenSSH format
_NODE_KEY = re.compile(rb"ecdsa-sha2-nistp(256|384|521) [A-Za-z0-9+/]+={0,2}")
ZERO32 = b"\0" * 32

_POST = struct.Struct(">Q32sHHH")
_REGISTER_HEAD = struct.Struct(">32s")
_ROUND_HEAD = struct.Struct(">32sH32s32sIQQQ")
_ROUND_PART = struct.Struct(">32sIB")
_FINISH_HEAD = struct.Struct(">32s32s")
_REWARD = struct.Struct(">32sQ")


def _u(value: int, bits: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise OutOfRange(f"{what} {value!r} is outside u{bits}")


def _b32(value: bytes, what: str, *, zero_ok: bool = True) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise OutOfRange(f"{what} must be 32 bytes")
    if not zero_ok and value == ZERO32:
        raise OutOfRange(f"{what} must not be all zero")


def _count(r: Reader, limit: int, what: str) -> int:
    n = r.varint()
    if n > limit:
        raise OutOfRange(f"{what}: {n} entries exceed the limit {limit}")
    return n


def check_node_key(key: bytes) -> None:
    """A Flower SuperNode public key line in OpenSSH format (no comment), at most MAX_NODE_KEY bytes."""
    if not isinstance(key, bytes) or not 0 < len(key) <= MAX_NODE_KEY:
        raise OutOfRange(f"node key must be 1..{MAX_NODE_KEY} bytes")
    if not _NODE_KEY.fullmatch(key):
        raise OutOfRange("node key is not an OpenSSH 'ecdsa-sha2-nistpNNN <base64>' public key line")


@dataclass(frozen=True, slots=True)
class FlJobPost:
    """Post an FL job (job id = this transaction's txid), escrowing reward_pool_sat of the sender's balance.

    config_hash: SHA-256 of the job's run config (strategy, model, data), fixed for the job's life.
    """

    TYPE: ClassVar[TxType] = TxType.FL_JOB_POST
    FEELESS: ClassVar[bool] = False
    reward_pool_sat: int
    config_hash: bytes
    rounds: int
    min_participants: int
    max_participants: int

    def __post_init__(self) -> None:
        if isinstance(self.reward_pool_sat, bool) or not isinstance(self.reward_pool_sat, int) \
                or not 0 < self.reward_pool_sat <= MAX_MONEY:
            raise OutOfRange(f"FL reward pool {self.reward_pool_sat!r} is outside 1..{MAX_MONEY}")
        _b32(self.config_hash, "FL job config hash")
        _u(self.rounds, 16, "FL job rounds")
        _u(self.min_participants, 16, "FL job minimum participants")
        _u(self.max_participants, 16, "FL job maximum participants")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise OutOfRange(f"FL job rounds {self.rounds} outside 1..{MAX_ROUNDS}")
        if not 1 <= self.min_participants <= self.max_participants <= MAX_PARTICIPANTS:
            raise OutOfRange(f"FL job participants need 1 <= min ({self.min_participants}) <= max "
                             f"({self.max_participants}) <= {MAX_PARTICIPANTS}")

    def encode(self) -> bytes:
        return _POST.pack(self.reward_pool_sat, self.config_hash, self.rounds, self.min_participants,
                          self.max_participants)

    def debit_sat(self) -> int:
        return self.reward_pool_sat

    @classmethod
    def decode(cls, b: bytes) -> "FlJobPost":
        r = Reader(b, "FL job post payload")
        v = _POST.unpack(r.take(_POST.size))
        r.end()
        return cls(*v)


@dataclass(frozen=True, slots=True)
class FlRegister:
    """Register the sender's L2 key as a participant of job_id, with the Flower SuperNode public key it joins
    with (the federation allows exactly the registered node keys on the SuperLink)."""

    TYPE: ClassVar[TxType] = TxType.FL_REGISTER
    FEELESS: ClassVar[bool] = False
    job_id: bytes
    node_key: bytes

    def __post_init__(self) -> None:
        _b32(self.job_id, "FL job id", zero_ok=False)
        check_node_key(self.node_key)

    def encode(self) -> bytes:
        return self.job_id + write_bytes(self.node_key)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "FlRegister":
        r = Reader(b, "FL register payload")
        job = r.take(32)
        key = r.var_bytes(MAX_NODE_KEY)
        r.end()
        return cls(job, key)


@dataclass(frozen=True, slots=True)
class RoundParticipant:
    """One participant's part in a round: its L2 key, examples it trained on, accepted by the aggregator."""

    key: bytes
    num_examples: int
    accepted: bool

    def __post_init__(self) -> None:
        _b32(self.key, "round participant key", zero_ok=False)
        _u(self.num_examples, 32, "round participant examples")
        if not isinstance(self.accepted, bool):
            raise OutOfRange(f"round participant accepted flag {self.accepted!r} is not a bool")
        if self.accepted and self.num_examples == 0:
            raise OutOfRange("an accepted round participant trained on at least one example")


@dataclass(frozen=True, slots=True)
class FlRound:
    """A round's commitment (federation authority, fee 0): the SHA-256 of the canonical bytes of the aggregated
    parameters, the previous round's hash, metrics in fixed point, and who took part (sorted by key)."""

    TYPE: ClassVar[TxType] = TxType.FL_ROUND
    FEELESS: ClassVar[bool] = True
    job_id: bytes
    round: int
    params_hash: bytes
    prev_params_hash: bytes
    accuracy_ppm: int
    loss_ppm: int
    update_bytes: int
    dp_epsilon_ppm: int  # 0 when the job runs without differential privacy
    participants: tuple[RoundParticipant, ...]

    def __post_init__(self) -> None:
        _b32(self.job_id, "FL job id", zero_ok=False)
        _u(self.round, 16, "FL round number")
        if self.round == 0:
            raise OutOfRange("FL round numbers start at 1")
        _b32(self.params_hash, "FL round params hash")
        _b32(self.prev_params_hash, "FL round previous params hash")
        _u(self.accuracy_ppm, 32, "FL round accuracy")
        if self.accuracy_ppm > PPM:
            raise OutOfRange(f"FL round accuracy {self.accuracy_ppm} ppm exceeds {PPM}")
        _u(self.loss_ppm, 64, "FL round loss")
        _u(self.update_bytes, 64, "FL round update bytes")
        _u(self.dp_epsilon_ppm, 64, "FL round DP epsilon")
        if not isinstance(self.participants, tuple) or not 1 <= len(self.participants) <= MAX_PARTICIPANTS:
            raise OutOfRange(f"FL round needs 1..{MAX_PARTICIPANTS} participants")
        keys = [p.key for p in self.participants]
        if any(a >= b for a, b in zip(keys, keys[1:])):
            raise OutOfRange("FL round participants must be sorted by key, each once")

    def encode(self) -> bytes:
        return (_ROUND_HEAD.pack(self.job_id, self.round, self.params_hash, self.prev_params_hash,
                                 self.accuracy_ppm, self.loss_ppm, self.update_bytes, self.dp_epsilon_ppm)
                + write_varint(len(self.participants))
                + b"".join(_ROUND_PART.pack(p.key, p.num_examples, int(p.accepted)) for p in self.participants))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "FlRound":
        r = Reader(b, "FL round payload")
        job, rnd, h, prev, acc_ppm, loss, nbytes, eps = _ROUND_HEAD.unpack(r.take(_ROUND_HEAD.size))
        parts = []
        for _ in range(_count(r, MAX_PARTICIPANTS, "FL round participants")):
            key, n, acc = _ROUND_PART.unpack(r.take(_ROUND_PART.size))
            if acc > 1:
                raise OutOfRange(f"FL round participant accepted flag {acc} is not 0 or 1")
            parts.append(RoundParticipant(key, n, bool(acc)))
        r.end()
        return cls(job, rnd, h, prev, acc_ppm, loss, nbytes, eps, tuple(parts))


@dataclass(frozen=True, slots=True)
class FlFinish:
    """Close a job (federation authority, fee 0): the final model hash (the last committed round's) and the
    rewards, sorted by key, listing every participant with a non-zero share. The state transition checks them
    against the contribution split (state.fl.reward_split); the rest of the pool goes back to the poster."""

    TYPE: ClassVar[TxType] = TxType.FL_FINISH
    FEELESS: ClassVar[bool] = True
    job_id: bytes
    final_params_hash: bytes
    rewards: tuple[tuple[bytes, int], ...]

    def __post_init__(self) -> None:
        _b32(self.job_id, "FL job id", zero_ok=False)
        _b32(self.final_params_hash, "FL final params hash")
        if not isinstance(self.rewards, tuple) or len(self.rewards) > MAX_PARTICIPANTS:
            raise OutOfRange(f"FL finish lists at most {MAX_PARTICIPANTS} rewards")
        for key, amount in self.rewards:
            _b32(key, "FL reward key", zero_ok=False)
            if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_MONEY:
                raise OutOfRange(f"FL reward {amount!r} is outside 1..{MAX_MONEY}")
        keys = [k for k, _ in self.rewards]
        if any(a >= b for a, b in zip(keys, keys[1:])):
            raise OutOfRange("FL rewards must be sorted by key, each once")

    def encode(self) -> bytes:
        return (_FINISH_HEAD.pack(self.job_id, self.final_params_hash) + write_varint(len(self.rewards))
                + b"".join(_REWARD.pack(k, a) for k, a in self.rewards))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "FlFinish":
        r = Reader(b, "FL finish payload")
        job, final = _FINISH_HEAD.unpack(r.take(_FINISH_HEAD.size))
        rewards = []
        for _ in range(_count(r, MAX_PARTICIPANTS, "FL rewards")):
            k, a = _REWARD.unpack(r.take(_REWARD.size))
            rewards.append((k, a))
        r.end()
        return cls(job, final, tuple(rewards))


@dataclass(frozen=True, slots=True)
class FlReclaim:
    """The poster closes a job the federation left idle for RECLAIM_BLOCKS blocks (since the post or the last
    round): the same contribution split as a finish is paid, the rest comes back to the poster."""

    TYPE: ClassVar[TxType] = TxType.FL_RECLAIM
    FEELESS: ClassVar[bool] = False
    job_id: bytes

    def __post_init__(self) -> None:
        _b32(self.job_id, "FL job id", zero_ok=False)

    def encode(self) -> bytes:
        return self.job_id

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "FlReclaim":
        r = Reader(b, "FL reclaim payload")
        job = r.take(32)
        r.end()
        return cls(job)
