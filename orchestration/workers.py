"""Registered compute workers: the immutable WorkerInfo record and the column-store WorkerTable the scheduler scans."""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Iterator, NamedTuple

import numpy as np
import numpy.typing as npt

from orchestration.errors import DuplicateWorker, InvalidWorker, UnknownWorker

logger = logging.getLogger(__name__)

PPM = 1_000_000
#: Upper bounds keep every scheduler product (value * 1_000_000) inside int64.
MAX_PRICE_SAT = 10**12
MAX_LATENCY_US = 10**12
MAX_CAPACITY = 10**9
MAX_LOAD = 10**9
MAX_ACCEL_MEM_MB = 10**9
MAX_STAKE_SAT = 21_000_000 * 100_000_000
MAX_CARBON_G_PER_KWH = 10**6

#: Latency EMA smoothing factor, as an exact rational (TCP SRTT's 1/8).
LATENCY_ALPHA = Fraction(1, 8)


class DeviceKind(enum.IntEnum):
    """Kind of accelerator a worker runs tasks on (stored as a small integer column)."""

    CPU = 0
    CUDA = 1
    ROCM = 2
    METAL = 3
    TPU = 4
    NPU = 5


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidWorker(f"{name} must be an int, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise InvalidWorker(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One registered worker. Integers only (ppm, sat, µs, MB): nothing here is a float.

    ``worker_id`` is the worker's 32-byte BIP340 x-only public key.
    """

    worker_id: bytes
    device: DeviceKind
    accelerator_mem_mb: int
    models: frozenset[str]
    region: str
    price_sat_per_unit: int
    green_share_ppm: int
    carbon_g_per_kwh: int
    stake_sat: int
    reputation_ppm: int
    latency_ema_us: int
    capacity: int
    load: int = 0
    active: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, bytes) or len(self.worker_id) != 32:
            raise InvalidWorker(f"worker_id must be 32 bytes, got {self.worker_id!r}")
        if not isinstance(self.device, DeviceKind):
            raise InvalidWorker(f"device must be a DeviceKind, got {self.device!r}")
        if not isinstance(self.models, frozenset) or not all(isinstance(m, str) and m for m in self.models):
            raise InvalidWorker(f"models must be a frozenset of non-empty str, got {self.models!r}")
        if not isinstance(self.region, str) or not self.region:
            raise InvalidWorker(f"region must be a non-empty str, got {self.region!r}")
        if not isinstance(self.active, bool):
            raise InvalidWorker(f"active must be a bool, got {self.active!r}")
        _check_int("accelerator_mem_mb", self.accelerator_mem_mb, 0, MAX_ACCEL_MEM_MB)
        _check_int("price_sat_per_unit", self.price_sat_per_unit, 0, MAX_PRICE_SAT)
        _check_int("green_share_ppm", self.green_share_ppm, 0, PPM)
        _check_int("carbon_g_per_kwh", self.carbon_g_per_kwh, 0, MAX_CARBON_G_PER_KWH)
        _check_int("stake_sat", self.stake_sat, 0, MAX_STAKE_SAT)
        _check_int("reputation_ppm", self.reputation_ppm, 0, PPM)
        _check_int("latency_ema_us", self.latency_ema_us, 0, MAX_LATENCY_US)
        _check_int("capacity", self.capacity, 0, MAX_CAPACITY)
        _check_int("load", self.load, 0, MAX_LOAD)

    @property
    def free_capacity(self) -> int:
        """Task slots still free (never negative)."""
        return max(self.capacity - self.load, 0)


def latency_ema(previous_us: int, sample_us: int, alpha: Fraction = LATENCY_ALPHA) -> int:
    """Integer EMA: ``previous + alpha * (sample - previous)``, the step rounded away from zero.

    With alpha = p/q and d = sample - previous, the step is ``ceil(|d|*p/q)`` towards the sample.
    Rounding the step away from zero (rather than to nearest) means a constant sample is
    reached exactly instead of the EMA sticking up to q/(2p) µs short of it; the result always lies
    between previous and sample (inclusive) and is within 1 µs of the exact rational EMA.
    Pure integers, so every machine computes the same value.
    """
    p, q = alpha.numerator, alpha.denominator
    if not 0 < p <= q:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    d = sample_us - previous_us
    if d >= 0:
        return previous_us + (d * p + q - 1) // q
    return previous_us - ((-d) * p + q - 1) // q


def id_words(worker_id: bytes) -> tuple[int, int, int, int]:
    """The id as four big-endian uint64 words: comparing the tuples orders ids like bytes."""
    return (int.from_bytes(worker_id[0:8], "big"), int.from_bytes(worker_id[8:16], "big"),
            int.from_bytes(worker_id[16:24], "big"), int.from_bytes(worker_id[24:32], "big"))


class Columns(NamedTuple):
    """Read-only views (length = number of registered workers) of the table's column arrays."""

    id_words: npt.NDArray[np.uint64]     # (n, 4) big-endian words of the worker id
    device: npt.NDArray[np.int8]
    accel_mem_mb: npt.NDArray[np.int64]
    region_code: npt.NDArray[np.int32]
    price_sat: npt.NDArray[np.int64]
    green_ppm: npt.NDArray[np.int64]
    carbon: npt.NDArray[np.int64]
    stake_sat: npt.NDArray[np.int64]
    reputation_ppm: npt.NDArray[np.int64]
    latency_us: npt.NDArray[np.int64]
    capacity: npt.NDArray[np.int64]
    load: npt.NDArray[np.int64]
    active: npt.NDArray[np.bool_]


_INT_COLUMNS = ("accel_mem_mb", "price_sat", "green_ppm", "carbon", "stake_sat", "reputation_ppm",
                "latency_us", "capacity", "load")


class WorkerTable:
    """The registered workers as contiguous numpy columns, updated in place row by row.

    Rows are dense ``0..n-1``; removing a worker moves the last row into its slot. Models are
    held as one boolean column per model name, regions as interned integer codes.
    """

    def __init__(self, initial_capacity: int = 1024) -> None:
        self._cap = max(int(initial_capacity), 1)
        self._n = 0
        self._row: dict[bytes, int] = {}
        self._ids: list[bytes] = []
        self._info: list[WorkerInfo] = []
        self._region_codes: dict[str, int] = {}
        self._id_words = np.zeros((self._cap, 4), dtype=np.uint64)
        self._device = np.zeros(self._cap, dtype=np.int8)
        self._region = np.zeros(self._cap, dtype=np.int32)
        self._active = np.zeros(self._cap, dtype=np.bool_)
        self._ints: dict[str, npt.NDArray[np.int64]] = {c: np.zeros(self._cap, dtype=np.int64) for c in _INT_COLUMNS}
        self._models: dict[str, npt.NDArray[np.bool_]] = {}

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._row

    def __iter__(self) -> Iterator[WorkerInfo]:
        return iter(list(self._info))

    def workers(self) -> list[WorkerInfo]:
        """All registered workers (a new list, in row order)."""
        return list(self._info)

    def get(self, worker_id: bytes) -> WorkerInfo:
        """The current record of one worker; UnknownWorker if it is not registered."""
        return self._info[self._row_of(worker_id)]

    def row_of(self, worker_id: bytes) -> int:
        """The current row index of a worker (changes when other workers are removed)."""
        return self._row_of(worker_id)

    def id_at(self, row: int) -> bytes:
        """The worker id stored in a row."""
        return self._ids[row]

    def region_code(self, region: str) -> int | None:
        """The interned code of a region name, or None if no worker ever registered there."""
        return self._region_codes.get(region)

    def model_mask(self, model: str) -> npt.NDArray[np.bool_] | None:
        """View of the boolean column 'worker serves this model', or None for an unknown model."""
        col = self._models.get(model)
        return None if col is None else col[: self._n]

    def columns(self) -> Columns:
        """Views of every column, sliced to the registered rows (do not write through them)."""
        n = self._n
        i = self._ints
        return Columns(self._id_words[:n], self._device[:n], i["accel_mem_mb"][:n], self._region[:n],
                       i["price_sat"][:n], i["green_ppm"][:n], i["carbon"][:n], i["stake_sat"][:n],
                       i["reputation_ppm"][:n], i["latency_us"][:n], i["capacity"][:n], i["load"][:n],
                       self._active[:n])

    # -- writing ---------------------------------------------------------------------------
    def add(self, info: WorkerInfo) -> None:
        """Register a new worker; DuplicateWorker if its id is already registered."""
        if not isinstance(info, WorkerInfo):
            raise InvalidWorker(f"expected WorkerInfo, got {type(info).__name__}")
        if info.worker_id in self._row:
            raise DuplicateWorker(f"worker {info.worker_id.hex()} is already registered")
        if self._n == self._cap:
            self._grow()
        row = self._n
        self._n += 1
        self._row[info.worker_id] = row
        self._ids.append(info.worker_id)
        self._info.append(info)
        self._id_words[row] = id_words(info.worker_id)
        self._write(row, info, previous=None)
        logger.debug("worker %s registered at row %d", info.worker_id.hex(), row)

    def update(self, info: WorkerInfo) -> None:
        """Replace every field of a registered worker's record."""
        row = self._row_of(info.worker_id)
        self._write(row, info, previous=self._info[row])
        self._info[row] = info

    def remove(self, worker_id: bytes) -> WorkerInfo:
        """Deregister a worker (the last row moves into its slot); returns its final record."""
        row = self._row_of(worker_id)
        last = self._n - 1
        gone = self._info[row]
        if row != last:
            moved = self._info[last]
            self._id_words[row] = self._id_words[last]
            self._device[row] = self._device[last]
            self._region[row] = self._region[last]
            self._active[row] = self._active[last]
            for col in self._ints.values():
                col[row] = col[last]
            for m in gone.models | moved.models:
                self._models[m][row] = self._models[m][last]
            self._ids[row] = moved.worker_id
            self._info[row] = moved
            self._row[moved.worker_id] = row
        for m in self._info[last].models:
            self._models[m][last] = False
        self._active[last] = False
        self._ids.pop()
        self._info.pop()
        del self._row[worker_id]
        self._n = last
        logger.debug("worker %s removed", worker_id.hex())
        return gone

    def record_latency(self, worker_id: bytes, rtt_us: int, alpha: Fraction = LATENCY_ALPHA) -> int:
        """Fold one measured probe/heartbeat round trip (µs) into the worker's latency EMA; returns the new EMA.

        The value given at registration is the prior; each sample moves the EMA by ``alpha``
        of the difference, in exact integer arithmetic (see :func:`latency_ema`).
        """
        rtt = _check_int("rtt_us", rtt_us, 0, MAX_LATENCY_US)
        row = self._row_of(worker_id)
        ema = latency_ema(self._info[row].latency_ema_us, rtt, alpha)
        self._set_field(row, "latency_ema_us", ema)
        return ema

    def set_load(self, worker_id: bytes, load: int) -> None:
        """Set the number of tasks a worker is currently running."""
        self._set_field(self._row_of(worker_id), "load", load)

    def set_reputation(self, worker_id: bytes, reputation_ppm: int) -> None:
        """Set a worker's reputation (ppm)."""
        self._set_field(self._row_of(worker_id), "reputation_ppm", reputation_ppm)

    def set_active(self, worker_id: bytes, active: bool) -> None:
        """Mark a worker as active (schedulable) or inactive."""
        self._set_field(self._row_of(worker_id), "active", active)

    # -- internals -------------------------------------------------------------------------
    def _row_of(self, worker_id: bytes) -> int:
        try:
            return self._row[worker_id]
        except (KeyError, TypeError):
            raise UnknownWorker(f"unknown worker {worker_id!r}") from None

    def _set_field(self, row: int, field: str, value: Any) -> None:
        info = replace(self._info[row], **{field: value})  # re-validates through __post_init__
        self._write(row, info, previous=self._info[row])
        self._info[row] = info

    def _grow(self) -> None:
        new = self._cap * 2

        def grow(a: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
            b = np.zeros((new,) + a.shape[1:], dtype=a.dtype)
            b[: self._cap] = a
            return b

        self._id_words = grow(self._id_words)  # type: ignore[assignment]
        self._device = grow(self._device)  # type: ignore[assignment]
        self._region = grow(self._region)  # type: ignore[assignment]
        self._active = grow(self._active)  # type: ignore[assignment]
        self._ints = {k: grow(v) for k, v in self._ints.items()}  # type: ignore[misc]
        self._models = {k: grow(v) for k, v in self._models.items()}  # type: ignore[misc]
        self._cap = new

    def _write(self, row: int, info: WorkerInfo, previous: WorkerInfo | None) -> None:
        self._device[row] = int(info.device)
        code = self._region_codes.setdefault(info.region, len(self._region_codes))
        self._region[row] = code
        self._active[row] = info.active
        i = self._ints
        i["accel_mem_mb"][row] = info.accelerator_mem_mb
        i["price_sat"][row] = info.price_sat_per_unit
        i["green_ppm"][row] = info.green_share_ppm
        i["carbon"][row] = info.carbon_g_per_kwh
        i["stake_sat"][row] = info.stake_sat
        i["reputation_ppm"][row] = info.reputation_ppm
        i["latency_us"][row] = info.latency_ema_us
        i["capacity"][row] = info.capacity
        i["load"][row] = info.load
        if previous is not None and previous.models != info.models:
            for m in previous.models - info.models:
                self._models[m][row] = False
        for m in info.models:
            col = self._models.get(m)
            if col is None:
                col = self._models[m] = np.zeros(self._cap, dtype=np.bool_)
            col[row] = True
