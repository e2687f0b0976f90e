"""Orchestration transaction payloads: worker registry (register, heartbeat, exit, withdraw) and the task
lifecycle (submit, assign, result, reassign, settle, dispute, resolve, cancel). Layouts: docs/orchestration.md.

Also the result fingerprint format and its tolerance rule (consensus: the dispute resolution checks it).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from .codec import Reader, write_bytes
from .errors import DecodeError, OutOfRange
from .params import MAX_MONEY
from .payload import EmptyPayload, TxType

PPM = 1_000_000
MAX_PRICE_SAT = 10**12
MAX_CAPACITY = 1000
MAX_MODELS = 8
MAX_NAME = 32  # model names
MAX_REGION = 16
MAX_ENDPOINT = 64
IMAGE_BYTES = 64  # one 8x8 digit image, one byte per pixel (0..16), as scikit-learn's bundled digits
MAX_PIXEL = 16
MAX_IMAGES = 16
TOPK = 3  # classes kept per image in a fingerprint
FP_ENTRY = struct.Struct(">Bh")  # class index, logit quantised as round(logit * QUANT_SCALE) clamped to int16
FP_POSITION = TOPK * FP_ENTRY.size
QUANT_SCALE = 256
# Two fingerprints agree when every image has the same top-1 class and every class present in both top-k
# lists differs by at most this many quantisation steps (1/16 of a logit): far above float noise between
# CPU and CUDA kernels, far below what changing a prediction takes.
FP_TOLERANCE = 16
ZERO_KEY = b"\0" * 32

_NAME = re.compile(rb"[a-z0-9][a-z0-9._-]*")
_ENDPOINT = re.compile(rb"[A-Za-z0-9.:\[\]-]*")
_REG_HEAD = struct.Struct(">QBIQIIH")
_SUBMIT_HEAD = struct.Struct(">QIQ")
_ASSIGN = struct.Struct(">32s32s32s32sQII")
_REASSIGN = struct.Struct(">32sB32s32sQ")
_SETTLE = struct.Struct(">32sQQQ")
_DISPUTE = struct.Struct(">32s32sQ")
_RESOLVE = struct.Struct(">32sBQQQQQQ")


class Role(IntEnum):
    """Who runs a task: the assigned worker, the auditing verifier, or the dispute's referee."""

    WORKER = 1
    VERIFIER = 2
    REFEREE = 3


def _u(value: int, bits: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise OutOfRange(f"{what} {value!r} is outside u{bits}")


def _amount(value: int, what: str, *, zero_ok: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 if zero_ok else 1) <= value <= MAX_MONEY:
        raise OutOfRange(f"{what} {value!r} is outside {0 if zero_ok else 1}..{MAX_MONEY}")


def _key(value: bytes, what: str, *, zero_ok: bool = False) -> None:
    if not isinstance(value, bytes) or len(value) != 32:
        raise OutOfRange(f"{what} must be 32 bytes")
    if not zero_ok and value == ZERO_KEY:
        raise OutOfRange(f"{what} is the zero key")


def _name(value: bytes, limit: int, what: str) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit or not _NAME.fullmatch(value):
        raise OutOfRange(f"{what} {value!r} must be 1..{limit} bytes of [a-z0-9._-], starting alphanumeric")


# -- fingerprints ------------------------------------------------------------------------------------------------
Fingerprint = tuple[tuple[tuple[int, int], ...], ...]  # per image: TOPK (class, quantised logit), best first


def parse_fingerprint(fp: bytes, output: bytes) -> Fingerprint:
    """Check that fp is a canonical fingerprint of len(output) images whose top-1 classes are output.

    Per image: TOPK entries (class u8, logit i16), distinct classes, ordered by logit descending then class
    ascending. Raises OutOfRange naming the first violation.
    """
    n = len(output)
    if len(fp) != n * FP_POSITION:
        raise OutOfRange(f"fingerprint is {len(fp)} bytes, expected {FP_POSITION} per image ({n} images)")
    out: list[tuple[tuple[int, int], ...]] = []
    for i in range(n):
        entries = tuple(FP_ENTRY.unpack_from(fp, i * FP_POSITION + j * FP_ENTRY.size) for j in range(TOPK))
        if len({c for c, _ in entries}) != TOPK:
            raise OutOfRange(f"fingerprint image {i}: repeated class")
        if list(entries) != sorted(entries, key=lambda e: (-e[1], e[0])):
            raise OutOfRange(f"fingerprint image {i}: entries not ordered by logit")
        if entries[0][0] != output[i]:
            raise OutOfRange(f"output {i} is class {output[i]}, but its fingerprint's top class is {entries[0][0]}")
        out.append(tuple((int(c), int(q)) for c, q in entries))
    return tuple(out)


def fingerprints_match(a: Fingerprint, b: Fingerprint, tolerance: int = FP_TOLERANCE) -> bool:
    """The documented tolerance rule: same image count, same top-1 class per image, and every class in both
    top-k lists within `tolerance` quantisation steps."""
    if len(a) != len(b):
        return False
    for pa, pb in zip(a, b):
        if pa[0][0] != pb[0][0]:
            return False
        qb = dict(pb)
        for c, q in pa:
            other = qb.get(c)
            if other is not None and abs(q - other) > tolerance:
                return False
    return True


# -- worker registry -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class WorkerCaps:
    """What a worker offers. Models are distinct names in ascending byte order (one encoding per set)."""

    device: int  # orchestration.workers.DeviceKind value, 0..5
    accel_mem_mb: int
    price_sat: int  # per task unit (one image)
    green_ppm: int
    carbon_g_per_kwh: int
    capacity: int  # tasks it runs at once
    region: bytes
    models: tuple[bytes, ...]
    endpoint: bytes  # host:port of its probe endpoint (latency/health), may be empty

    def __post_init__(self) -> None:
        if isinstance(self.device, bool) or not isinstance(self.device, int) or not 0 <= self.device <= 5:
            raise OutOfRange(f"worker device {self.device!r} is not 0..5")
        _u(self.accel_mem_mb, 32, "worker accelerator memory")
        if isinstance(self.price_sat, bool) or not isinstance(self.price_sat, int) \
                or not 0 <= self.price_sat <= MAX_PRICE_SAT:
            raise OutOfRange(f"worker price {self.price_sat!r} is outside 0..{MAX_PRICE_SAT}")
        for what, v in (("green share", self.green_ppm), ("carbon intensity", self.carbon_g_per_kwh)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= PPM:
                raise OutOfRange(f"worker {what} {v!r} is outside 0..{PPM}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) \
                or not 1 <= self.capacity <= MAX_CAPACITY:
            raise OutOfRange(f"worker capacity {self.capacity!r} is outside 1..{MAX_CAPACITY}")
        _name(self.region, MAX_REGION, "worker region")
        if not isinstance(self.models, tuple) or not 1 <= len(self.models) <= MAX_MODELS:
            raise OutOfRange(f"worker lists {len(self.models) if isinstance(self.models, tuple) else '?'} "
                             f"models, expected 1..{MAX_MODELS}")
        for m in self.models:
            _name(m, MAX_NAME, "worker model")
        if list(self.models) != sorted(set(self.models)):
            raise OutOfRange("worker models must be distinct and in ascending order")
        if not isinstance(self.endpoint, bytes) or len(self.endpoint) > MAX_ENDPOINT \
                or not _ENDPOINT.fullmatch(self.endpoint):
            raise OutOfRange(f"worker endpoint {self.endpoint!r} must be up to {MAX_ENDPOINT} bytes of host:port")

    def encode(self) -> bytes:
        return (struct.pack(">BIQIIH", self.device, self.accel_mem_mb, self.price_sat, self.green_ppm,
                            self.carbon_g_per_kwh, self.capacity)
                + write_bytes(self.region) + bytes((len(self.models),))
                + b"".join(write_bytes(m) for m in self.models) + write_bytes(self.endpoint))

    @classmethod
    def read(cls, r: Reader) -> "WorkerCaps":
        device, mem, price, green, carbon, cap = struct.unpack(">BIQIIH", r.take(23))
        region = r.var_bytes(MAX_REGION)
        count = r.u8()
        if count > MAX_MODELS:
            raise OutOfRange(f"{r.what}: {count} models, limit {MAX_MODELS}")
        models = tuple(r.var_bytes(MAX_NAME) for _ in range(count))
        endpoint = r.var_bytes(MAX_ENDPOINT)
        return cls(device, mem, price, green, carbon, cap, region, models, endpoint)


@dataclass(frozen=True, slots=True)
class WorkerRegister:
    """Register the sender as a compute worker, locking stake_sat of its balance."""

    TYPE: ClassVar[TxType] = TxType.WORKER_REGISTER
    FEELESS: ClassVar[bool] = False
    stake_sat: int
    caps: WorkerCaps

    def __post_init__(self) -> None:
        _amount(self.stake_sat, "worker stake", zero_ok=False)
        if not isinstance(self.caps, WorkerCaps):
            raise OutOfRange("worker capabilities missing")

    def encode(self) -> bytes:
        return struct.pack(">Q", self.stake_sat) + self.caps.encode()

    def debit_sat(self) -> int:
        return self.stake_sat

    @classmethod
    def decode(cls, b: bytes) -> "WorkerRegister":
        r = Reader(b, "worker register payload")
        stake = r.u64()
        caps = WorkerCaps.read(r)
        r.end()
        return cls(stake, caps)


@dataclass(frozen=True, slots=True)
class WorkerHeartbeat(EmptyPayload):
    """The worker is alive (records the block height)."""

    TYPE: ClassVar[TxType] = TxType.WORKER_HEARTBEAT

    @classmethod
    def decode(cls, b: bytes) -> "WorkerHeartbeat":
        cls.check_empty(b, "worker heartbeat")
        return cls()


@dataclass(frozen=True, slots=True)
class WorkerExit(EmptyPayload):
    """Stop taking tasks; the stake can be withdrawn EXIT_DELAY_BLOCKS later once no task holds it."""

    TYPE: ClassVar[TxType] = TxType.WORKER_EXIT

    @classmethod
    def decode(cls, b: bytes) -> "WorkerExit":
        cls.check_empty(b, "worker exit")
        return cls()


@dataclass(frozen=True, slots=True)
class WorkerWithdraw(EmptyPayload):
    """Unlock the stake of an exited worker back to its balance."""

    TYPE: ClassVar[TxType] = TxType.WORKER_WITHDRAW

    @classmethod
    def decode(cls, b: bytes) -> "WorkerWithdraw":
        cls.check_empty(b, "worker withdraw")
        return cls()


# -- tasks -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TaskSubmit:
    """Submit a task (the task id is this transaction's txid), escrowing bounty_sat of the sender's balance.

    input: 1..MAX_IMAGES 8x8 digit images (IMAGE_BYTES each, pixels 0..16). Hard requirements on the worker:
    it serves `model`, its reputation is >= min_reputation_ppm, its price <= max_price_sat (0 = no ceiling)
    and its region is `region` (empty = any).
    """

    TYPE: ClassVar[TxType] = TxType.TASK_SUBMIT
    FEELESS: ClassVar[bool] = False
    bounty_sat: int
    min_reputation_ppm: int
    max_price_sat: int
    model: bytes
    region: bytes
    input: bytes

    def __post_init__(self) -> None:
        _amount(self.bounty_sat, "task bounty", zero_ok=False)
        if isinstance(self.min_reputation_ppm, bool) or not isinstance(self.min_reputation_ppm, int) \
                or not 0 <= self.min_reputation_ppm <= PPM:
            raise OutOfRange(f"task minimum reputation {self.min_reputation_ppm!r} is outside 0..{PPM}")
        if isinstance(self.max_price_sat, bool) or not isinstance(self.max_price_sat, int) \
                or not 0 <= self.max_price_sat <= MAX_PRICE_SAT:
            raise OutOfRange(f"task maximum price {self.max_price_sat!r} is outside 0..{MAX_PRICE_SAT}")
        _name(self.model, MAX_NAME, "task model")
        if self.region:
            _name(self.region, MAX_REGION, "task region")
        n = len(self.input)
        if n == 0 or n % IMAGE_BYTES or n > MAX_IMAGES * IMAGE_BYTES:
            raise OutOfRange(f"task input is {n} bytes, expected 1..{MAX_IMAGES} images of {IMAGE_BYTES} bytes")
        if max(self.input) > MAX_PIXEL:
            raise OutOfRange(f"task input pixel {max(self.input)} exceeds {MAX_PIXEL}")

    @property
    def images(self) -> int:
        return len(self.input) // IMAGE_BYTES

    def encode(self) -> bytes:
        return (_SUBMIT_HEAD.pack(self.bounty_sat, self.min_reputation_ppm, self.max_price_sat)
                + write_bytes(self.model) + write_bytes(self.region) + write_bytes(self.input))

    def debit_sat(self) -> int:
        return self.bounty_sat

    @classmethod
    def read(cls, r: Reader) -> "TaskSubmit":
        bounty, min_rep, max_price = _SUBMIT_HEAD.unpack(r.take(_SUBMIT_HEAD.size))
        model = r.var_bytes(MAX_NAME)
        region = r.var_bytes(MAX_REGION)
        data = r.var_bytes(MAX_IMAGES * IMAGE_BYTES)
        return cls(bounty, min_rep, max_price, model, region, data)

    @classmethod
    def decode(cls, b: bytes) -> "TaskSubmit":
        r = Reader(b, "task submit payload")
        p = cls.read(r)
        r.end()
        return p


def _distinct(*keys: bytes) -> None:
    present = [k for k in keys if k != ZERO_KEY]
    if len(set(present)) != len(present):
        raise OutOfRange("worker, backup, verifier and referee must be distinct workers")


@dataclass(frozen=True, slots=True)
class TaskAssign:
    """Federation authority: assign a SUBMITTED task to worker, naming its backup and (audit) a verifier.

    Zero keys mean "none". Results are due by deadline_height; settlement waits window_blocks after them. A
    party silent (no heartbeat) for heartbeat_grace blocks may be replaced before the deadline (0 = never).
    """

    TYPE: ClassVar[TxType] = TxType.TASK_ASSIGN
    FEELESS: ClassVar[bool] = True
    task_id: bytes
    worker: bytes
    backup: bytes
    verifier: bytes
    deadline_height: int
    window_blocks: int
    heartbeat_grace: int = 0

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")
        _key(self.worker, "assigned worker")
        _key(self.backup, "backup worker", zero_ok=True)
        _key(self.verifier, "verifier", zero_ok=True)
        _distinct(self.worker, self.backup, self.verifier)
        _u(self.deadline_height, 64, "task deadline height")
        _u(self.window_blocks, 32, "challenge window")
        _u(self.heartbeat_grace, 32, "heartbeat grace")

    def encode(self) -> bytes:
        return _ASSIGN.pack(self.task_id, self.worker, self.backup, self.verifier, self.deadline_height,
                            self.window_blocks, self.heartbeat_grace)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskAssign":
        if len(b) != _ASSIGN.size:
            raise DecodeError(f"task assign payload is {len(b)} bytes, expected {_ASSIGN.size}")
        return cls(*_ASSIGN.unpack(b))


@dataclass(frozen=True, slots=True)
class TaskResult:
    """A worker, verifier or referee of the task returns its output (one class per image) and fingerprint."""

    TYPE: ClassVar[TxType] = TxType.TASK_RESULT
    FEELESS: ClassVar[bool] = False
    task_id: bytes
    output: bytes
    fingerprint: bytes

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")
        if not 1 <= len(self.output) <= MAX_IMAGES:
            raise OutOfRange(f"task output is {len(self.output)} bytes, expected 1..{MAX_IMAGES}")
        parse_fingerprint(self.fingerprint, self.output)

    def encode(self) -> bytes:
        return self.task_id + write_bytes(self.output) + write_bytes(self.fingerprint)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskResult":
        r = Reader(b, "task result payload")
        task_id = r.take(32)
        output = r.var_bytes(MAX_IMAGES)
        fp = r.var_bytes(MAX_IMAGES * FP_POSITION)
        r.end()
        return cls(task_id, output, fp)


@dataclass(frozen=True, slots=True)
class TaskReassign:
    """Federation authority, after the deadline (or once the party has been silent for the task's heartbeat
    grace): hand a role whose result is missing to another worker.

    Role WORKER goes to the recorded backup (new_worker must be it while it still fits the task) and names a
    new backup; VERIFIER and
    REFEREE go to new_worker (new_backup must be zero). A new deadline applies.
    """

    TYPE: ClassVar[TxType] = TxType.TASK_REASSIGN
    FEELESS: ClassVar[bool] = True
    task_id: bytes
    role: Role
    new_worker: bytes
    new_backup: bytes
    deadline_height: int

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")
        if isinstance(self.role, bool) or not isinstance(self.role, int) or self.role not in (1, 2, 3):
            raise OutOfRange(f"reassign role {self.role!r} is not 1, 2 or 3")
        object.__setattr__(self, "role", Role(self.role))
        _key(self.new_worker, "new worker")
        _key(self.new_backup, "new backup", zero_ok=True)
        if self.role != Role.WORKER and self.new_backup != ZERO_KEY:
            raise OutOfRange("only the worker role has a backup")
        _distinct(self.new_worker, self.new_backup)
        _u(self.deadline_height, 64, "task deadline height")

    def encode(self) -> bytes:
        return _REASSIGN.pack(self.task_id, self.role, self.new_worker, self.new_backup, self.deadline_height)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskReassign":
        if len(b) != _REASSIGN.size:
            raise DecodeError(f"task reassign payload is {len(b)} bytes, expected {_REASSIGN.size}")
        return cls(*_REASSIGN.unpack(b))


@dataclass(frozen=True, slots=True)
class TaskSettle:
    """Federation authority, after the challenge window: pay the escrowed bounty out (the shares sum to it)."""

    TYPE: ClassVar[TxType] = TxType.TASK_SETTLE
    FEELESS: ClassVar[bool] = True
    task_id: bytes
    worker_sat: int
    verifier_sat: int
    treasury_sat: int

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")
        for what in ("worker_sat", "verifier_sat", "treasury_sat"):
            _amount(getattr(self, what), f"settle {what}", zero_ok=True)

    def encode(self) -> bytes:
        return _SETTLE.pack(self.task_id, self.worker_sat, self.verifier_sat, self.treasury_sat)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskSettle":
        if len(b) != _SETTLE.size:
            raise DecodeError(f"task settle payload is {len(b)} bytes, expected {_SETTLE.size}")
        return cls(*_SETTLE.unpack(b))


@dataclass(frozen=True, slots=True)
class TaskDispute:
    """Federation authority: the worker's and the verifier's fingerprints disagree; referee re-executes. Also
    hands a dispute whose referee decided nothing to another referee."""

    TYPE: ClassVar[TxType] = TxType.TASK_DISPUTE
    FEELESS: ClassVar[bool] = True
    task_id: bytes
    referee: bytes
    deadline_height: int

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")
        _key(self.referee, "referee")
        _u(self.deadline_height, 64, "task deadline height")

    def encode(self) -> bytes:
        return _DISPUTE.pack(self.task_id, self.referee, self.deadline_height)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskDispute":
        if len(b) != _DISPUTE.size:
            raise DecodeError(f"task dispute payload is {len(b)} bytes, expected {_DISPUTE.size}")
        return cls(*_DISPUTE.unpack(b))


@dataclass(frozen=True, slots=True)
class TaskResolve:
    """Federation authority: close a dispute. The referee's fingerprint must match the winner's and not the
    loser's. slash_sat leaves the loser's stake: challenger_sat to the winner, the rest burned. The bounty is
    paid out in the four shares (the loser's share must be 0)."""

    TYPE: ClassVar[TxType] = TxType.TASK_RESOLVE
    FEELESS: ClassVar[bool] = True
    task_id: bytes
    loser: Role
    slash_sat: int
    challenger_sat: int
    worker_sat: int
    verifier_sat: int
    referee_sat: int
    treasury_sat: int

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")
        if isinstance(self.loser, bool) or not isinstance(self.loser, int) or self.loser not in (1, 2):
            raise OutOfRange(f"resolve loser {self.loser!r} is not 1 (worker) or 2 (verifier)")
        object.__setattr__(self, "loser", Role(self.loser))
        for what in ("slash_sat", "challenger_sat", "worker_sat", "verifier_sat", "referee_sat", "treasury_sat"):
            _amount(getattr(self, what), f"resolve {what}", zero_ok=True)
        if self.challenger_sat > self.slash_sat:
            raise OutOfRange(f"challenger share {self.challenger_sat} exceeds the slash {self.slash_sat}")
        loser_share = self.worker_sat if self.loser == Role.WORKER else self.verifier_sat
        if loser_share:
            raise OutOfRange(f"the losing {self.loser.name.lower()} cannot be paid ({loser_share} sat)")

    def encode(self) -> bytes:
        return _RESOLVE.pack(self.task_id, self.loser, self.slash_sat, self.challenger_sat, self.worker_sat,
                             self.verifier_sat, self.referee_sat, self.treasury_sat)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskResolve":
        if len(b) != _RESOLVE.size:
            raise DecodeError(f"task resolve payload is {len(b)} bytes, expected {_RESOLVE.size}")
        return cls(*_RESOLVE.unpack(b))


@dataclass(frozen=True, slots=True)
class TaskCancel:
    """The submitter withdraws a task nobody was assigned yet; the bounty comes back."""

    TYPE: ClassVar[TxType] = TxType.TASK_CANCEL
    FEELESS: ClassVar[bool] = False
    task_id: bytes

    def __post_init__(self) -> None:
        _key(self.task_id, "task id")

    def encode(self) -> bytes:
        return self.task_id

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "TaskCancel":
        if len(b) != 32:
            raise DecodeError(f"task cancel payload is {len(b)} bytes, expected 32")
        return cls(b)
