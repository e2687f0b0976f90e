"""Task scheduler: hard filters, normalised per-worker score components, and six selection strategies.

Vectorised over the WorkerTable's numpy columns; ``assign_reference`` is the same algorithm as a plain
per-worker Python loop (used by the tests as an oracle and by the benchmark as the baseline).
All scheduling arithmetic is integer (ppm components, ppm weights, scores scaled by 10**12), so the
vectorised and reference paths agree bit for bit and decisions are reproducible on every machine.
"""
from __future__ import annotations

import bisect
import enum
import logging
import math
from dataclasses import dataclass, fields
from decimal import Decimal
from fractions import Fraction
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from orchestration.errors import InvalidRequirements, InvalidWeights, NoEligibleWorker
from orchestration.workers import PPM, DeviceKind, WorkerInfo, WorkerTable, id_words

logger = logging.getLogger(__name__)

#: Scores are ``sum(weight_ppm * component_ppm)``: integers in [0, SCORE_SCALE].
SCORE_SCALE = PPM * PPM

#: Score components, in the order they are reported.
COMPONENTS: tuple[str, ...] = ("reputation", "latency", "capacity", "cost", "region", "green")

#: Hard filters, in evaluation order. A worker is counted against the first filter it fails.
FILTERS: tuple[str, ...] = ("active", "free_capacity", "device", "model", "accel_mem",
                            "min_reputation", "max_price", "region", "min_stake")

I64 = npt.NDArray[np.int64]


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Weights:
    """Score weights, each an integer in parts per million; they must sum to exactly 1_000_000.

    Use :meth:`from_config` to build them from config values given as fractions of 1
    (``0.25``, ``"0.25"``, ``Decimal``, ``Fraction``): conversion is exact (a float is read
    through its shortest decimal repr, so ``0.1`` means 1/10), each weight must be a multiple of
    1e-6 and the exact sum must be 1. Every error names the offending weight and its value.
    """

    reputation: int = 0
    latency: int = 0
    capacity: int = 0
    cost: int = 0
    region: int = 0
    green: int = 0

    def __post_init__(self) -> None:
        total = 0
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidWeights(f"weight {f.name!r} must be an int ppm, got {v!r}")
            if v < 0:
                raise InvalidWeights(f"weight {f.name!r} is negative: {v}")
            total += v
        if total != PPM:
            raise InvalidWeights(f"weights must sum to {PPM} ppm (1.0), got {total} ppm: {self.as_dict()}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Weights":
        """Weights from a config mapping of component name -> fraction of 1 (missing names weigh 0)."""
        names = {f.name for f in fields(cls)}
        ppm: dict[str, int] = {}
        total = Fraction(0)
        for key, value in config.items():
            if key not in names:
                raise InvalidWeights(f"unknown weight {key!r} (value {value!r}); known: {sorted(names)}")
            frac = _exact_fraction(key, value)
            if frac < 0:
                raise InvalidWeights(f"weight {key!r} is negative: {value!r}")
            scaled = frac * PPM
            if scaled.denominator != 1:
                raise InvalidWeights(f"weight {key!r} = {value!r} is not a multiple of 1e-6")
            ppm[key] = int(scaled)
            total += frac
        if total != 1:
            raise InvalidWeights(f"weights must sum to exactly 1, got {float(total)!r} ({total}): "
                                 f"{dict(config)}")
        return cls(**ppm)

    def as_dict(self) -> dict[str, int]:
        """Weights as ``{name: ppm}`` in component order."""
        return {name: getattr(self, name) for name in COMPONENTS}


def _exact_fraction(key: str, value: object) -> Fraction:
    if isinstance(value, bool):
        raise InvalidWeights(f"weight {key!r} must be a number, got {value!r}")
    try:
        if isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidWeights(f"weight {key!r} is not finite: {value!r}")
            return Fraction(repr(value))
        if isinstance(value, Decimal):
            if not value.is_finite():
                raise InvalidWeights(f"weight {key!r} is not finite: {value!r}")
            return Fraction(value)
        if isinstance(value, (int, Fraction)):
            return Fraction(value)
        if isinstance(value, str):
            d = Decimal(value.strip())
            if not d.is_finite():
                raise InvalidWeights(f"weight {key!r} is not finite: {value!r}")
            return Fraction(d)
    except (ArithmeticError, ValueError) as exc:
        if isinstance(exc, InvalidWeights):
            raise
        raise InvalidWeights(f"weight {key!r} is not a number: {value!r}") from None
    raise InvalidWeights(f"weight {key!r} must be a number, got {type(value).__name__} {value!r}")


# --------------------------------------------------------------------------------------------
# requirements, strategies, assignments
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Requirements:
    """Hard requirements of a task; a worker failing any of them is never chosen, by any strategy.

    ``devices``: accepted device kinds (None = any); ``model``: a model name the worker must serve
    (None = any); ``max_price_sat``: None = no ceiling; ``regions``: accepted regions (None = any).
    """

    devices: frozenset[DeviceKind] | None = None
    model: str | None = None
    min_accel_mem_mb: int = 0
    min_reputation_ppm: int = 0
    max_price_sat: int | None = None
    regions: frozenset[str] | None = None
    min_stake_sat: int = 0

    def __post_init__(self) -> None:
        if self.devices is not None and (not isinstance(self.devices, frozenset)
                                         or not all(isinstance(d, DeviceKind) for d in self.devices)):
            raise InvalidRequirements(f"devices must be a frozenset of DeviceKind, got {self.devices!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidRequirements(f"model must be a str, got {self.model!r}")
        if self.regions is not None and (not isinstance(self.regions, frozenset)
                                         or not all(isinstance(r, str) for r in self.regions)):
            raise InvalidRequirements(f"regions must be a frozenset of str, got {self.regions!r}")
        for name in ("min_accel_mem_mb", "min_reputation_ppm", "max_price_sat", "min_stake_sat"):
            v = getattr(self, name)
            if v is None and name == "max_price_sat":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidRequirements(f"{name} must be a non-negative int, got {v!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "devices": None if self.devices is None else sorted(d.name for d in self.devices),
            "model": self.model, "min_accel_mem_mb": self.min_accel_mem_mb,
            "min_reputation_ppm": self.min_reputation_ppm, "max_price_sat": self.max_price_sat,
            "regions": None if self.regions is None else sorted(self.regions),
            "min_stake_sat": self.min_stake_sat,
        }


class Strategy(enum.Enum):
    """How the chosen worker is picked among the workers that pass the hard filters."""

    WEIGHTED = "weighted"                      # highest score
    ROUND_ROBIN = "round_robin"                # next id after the last one this scheduler chose
    LEAST_LOADED = "least_loaded"              # lowest load/capacity (ppm, floor)
    LOWEST_LATENCY = "lowest_latency"          # lowest latency EMA (µs)
    HIGHEST_REPUTATION = "highest_reputation"  # highest reputation (ppm)
    LOWEST_COST = "lowest_cost"                # lowest price (sat/unit)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One scored worker: its components (ppm), score (units of 1/SCORE_SCALE) and the raw inputs."""

    worker_id: bytes
    components: tuple[tuple[str, int], ...]
    score: int
    raw: tuple[tuple[str, int | str], ...]

    def explain(self, weights: Weights) -> dict[str, Any]:
        """JSON-able breakdown: components, weighted contributions (summing to score), raw inputs."""
        w = weights.as_dict()
        comps = dict(self.components)
        return {
            "worker_id": self.worker_id.hex(),
            "score": self.score,
            "score_fraction": self.score / SCORE_SCALE,
            "components_ppm": comps,
            "contributions": {k: w[k] * v for k, v in comps.items()},
            "raw": dict(self.raw),
        }


@dataclass(frozen=True, slots=True)
class Assignment:
    """A scheduling decision and everything needed to explain it.

    ``backup`` is the next best eligible worker distinct from ``chosen`` under the same strategy
    (for ROUND_ROBIN: the next one in the rotation), or None when only one worker is eligible.
    """

    task_id: bytes
    strategy: Strategy
    chosen: Candidate
    backup: Candidate | None
    eligible_count: int
    registered_count: int
    eliminated: tuple[tuple[str, int], ...]
    weights: Weights
    requirements: Requirements
    preferred_region: str | None

    @property
    def worker_id(self) -> bytes:
        """Id of the chosen worker."""
        return self.chosen.worker_id

    @property
    def backup_id(self) -> bytes | None:
        """Id of the backup worker, if any."""
        return None if self.backup is None else self.backup.worker_id

    def explain(self) -> dict[str, Any]:
        """JSON-able record for operators: why this worker, and who else was filtered out."""
        return {
            "task_id": self.task_id.hex(),
            "strategy": self.strategy.value,
            "chosen": self.chosen.explain(self.weights),
            "backup": None if self.backup is None else self.backup.explain(self.weights),
            "eligible": self.eligible_count,
            "registered": self.registered_count,
            "eliminated": dict(self.eliminated),
            "weights_ppm": self.weights.as_dict(),
            "requirements": self.requirements.as_dict(),
            "preferred_region": self.preferred_region,
            "score_scale": SCORE_SCALE,
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Vectorised filter + scoring result: eligible rows and their components and scores (aligned)."""

    rows: npt.NDArray[np.intp]
    eliminated: dict[str, int]
    components: dict[str, I64]
    score: I64
    registered: int


# --------------------------------------------------------------------------------------------
# vectorised helpers
# --------------------------------------------------------------------------------------------
def _narrow(cands: npt.NDArray[np.intp], keys: Sequence[npt.NDArray[Any]]) -> int:
    """Position (in ``cands``' index space) of the lexicographic minimum of ``keys`` over ``cands``."""
    for key in keys:
        if cands.size == 1:
            break
        vals = key[cands]
        cands = cands[vals == vals.min()]
    return int(cands[0])


def _greater_ids(words: npt.NDArray[np.uint64], ref: tuple[int, int, int, int]) -> npt.NDArray[np.bool_]:
    gt = np.zeros(words.shape[0], dtype=np.bool_)
    eq = np.ones(words.shape[0], dtype=np.bool_)
    for k in range(4):
        col = words[:, k]
        r = np.uint64(ref[k])
        gt |= eq & (col > r)
        eq &= col == r
    return gt


class Scheduler:
    """Assigns tasks to workers of a WorkerTable.

    Holds the round-robin cursor (the id of the last worker it chose by ROUND_ROBIN), so use one
    Scheduler per rotation. Not thread-safe; the table must not change during a call.
    """

    def __init__(self, table: WorkerTable, weights: Weights) -> None:
        if not isinstance(weights, Weights):
            raise InvalidWeights(f"weights must be a Weights, got {type(weights).__name__}")
        self.table = table
        self.weights = weights
        self._w = np.array([weights.as_dict()[c] for c in COMPONENTS], dtype=np.int64)
        self._rr_last: bytes | None = None

    @property
    def round_robin_cursor(self) -> bytes | None:
        """Id of the last worker chosen by ROUND_ROBIN (None before the first)."""
        return self._rr_last

    # -- vectorised ----------------------------------------------------------------------------
    def evaluate(self, requirements: Requirements, preferred_region: str | None = None) -> Evaluation:
        """Apply the hard filters and score every eligible worker (numpy over the table's columns)."""
        t = self.table
        c = t.columns()
        n = len(t)
        eliminated = dict.fromkeys(FILTERS, 0)
        mask = c.active.copy()
        alive = int(np.count_nonzero(mask))
        eliminated["active"] = n - alive
        free = np.maximum(c.capacity - c.load, 0)
        r = requirements

        def step(name: str, cond: npt.NDArray[np.bool_]) -> None:
            nonlocal alive
            np.logical_and(mask, cond, out=mask)
            now = int(np.count_nonzero(mask))
            eliminated[name] = alive - now
            alive = now

        step("free_capacity", free > 0)
        if r.devices is not None:
            step("device", np.isin(c.device, np.array([int(d) for d in r.devices], dtype=np.int8)))
        if r.model is not None:
            mm = t.model_mask(r.model)
            step("model", np.zeros(n, dtype=np.bool_) if mm is None else mm)
        if r.min_accel_mem_mb:
            step("accel_mem", c.accel_mem_mb >= r.min_accel_mem_mb)
        if r.min_reputation_ppm:
            step("min_reputation", c.reputation_ppm >= r.min_reputation_ppm)
        if r.max_price_sat is not None:
            step("max_price", c.price_sat <= r.max_price_sat)
        if r.regions is not None:
            codes = [code for code in (t.region_code(x) for x in r.regions) if code is not None]
            step("region", np.isin(c.region_code, np.array(codes, dtype=np.int32)))
        if r.min_stake_sat:
            step("min_stake", c.stake_sat >= r.min_stake_sat)

        rows = np.flatnonzero(mask)
        comps: dict[str, I64] = {}
        if rows.size:
            comps["reputation"] = c.reputation_ppm[rows]
            lat = c.latency_us[rows]
            lo, hi = int(lat.min()), int(lat.max())
            comps["latency"] = (np.full(rows.size, PPM, dtype=np.int64) if hi == lo
                                else PPM - (lat - lo) * PPM // (hi - lo))
            f = free[rows]
            comps["capacity"] = f * PPM // int(f.max())
            price = c.price_sat[rows]
            lo, hi = int(price.min()), int(price.max())
            comps["cost"] = (np.full(rows.size, PPM, dtype=np.int64) if hi == lo
                             else PPM - (price - lo) * PPM // (hi - lo))
            code = None if preferred_region is None else t.region_code(preferred_region)
            comps["region"] = (np.zeros(rows.size, dtype=np.int64) if code is None
                               else (c.region_code[rows] == code).astype(np.int64) * PPM)
            comps["green"] = c.green_ppm[rows]
            score = np.zeros(rows.size, dtype=np.int64)
            for w, name in zip(self._w.tolist(), COMPONENTS):
                if w:
                    score += w * comps[name]
        else:
            comps = {name: np.zeros(0, dtype=np.int64) for name in COMPONENTS}
            score = np.zeros(0, dtype=np.int64)
        return Evaluation(rows, eliminated, comps, score, n)

    def assign(self, task_id: bytes, requirements: Requirements, strategy: Strategy,
               preferred_region: str | None = None) -> Assignment:
        """Choose a worker (and a backup) for a task; NoEligibleWorker if none passes the filters."""
        ev = self.evaluate(requirements, preferred_region)
        m = ev.rows.size
        if m == 0:
            raise _no_eligible(ev.eliminated, ev.registered)
        c = self.table.columns()
        allpos = np.arange(m)
        if strategy is Strategy.ROUND_ROBIN:
            words = c.id_words[ev.rows]
            id_keys = [words[:, k] for k in range(4)]
            first = self._rr_pick(words, allpos, id_keys, self._rr_last)
            second = None
            if m > 1:
                rest = allpos[allpos != first]
                second = self._rr_pick(words[rest], rest, id_keys, self.table.id_at(int(ev.rows[first])))
            self._rr_last = self.table.id_at(int(ev.rows[first]))
        else:
            neg_score = -ev.score
            keys: list[npt.NDArray[Any]]
            if strategy is Strategy.WEIGHTED:
                keys = [neg_score]
            elif strategy is Strategy.LEAST_LOADED:
                keys = [c.load[ev.rows] * PPM // c.capacity[ev.rows], neg_score]
            elif strategy is Strategy.LOWEST_LATENCY:
                keys = [c.latency_us[ev.rows], neg_score]
            elif strategy is Strategy.HIGHEST_REPUTATION:
                keys = [-c.reputation_ppm[ev.rows], neg_score]
            elif strategy is Strategy.LOWEST_COST:
                keys = [c.price_sat[ev.rows], neg_score]
            else:  # pragma: no cover - exhaustive
                raise ValueError(f"unknown strategy {strategy!r}")
            first = self._best(allpos, keys, ev.rows, c.id_words)
            second = self._best(allpos[allpos != first], keys, ev.rows, c.id_words) if m > 1 else None
        chosen = self._candidate(ev, first)
        backup = None if second is None else self._candidate(ev, second)
        a = Assignment(task_id, strategy, chosen, backup, m, ev.registered, tuple(ev.eliminated.items()),
                       self.weights, requirements, preferred_region)
        logger.debug("task %s -> %s (backup %s) by %s among %d eligible", task_id.hex(), chosen.worker_id.hex(),
                     None if backup is None else backup.worker_id.hex(), strategy.value, m)
        return a

    @staticmethod
    def _best(cands: npt.NDArray[np.intp], keys: Sequence[npt.NDArray[Any]], rows: npt.NDArray[np.intp],
              all_words: npt.NDArray[np.uint64]) -> int:
        """Lexicographic minimum of ``keys`` then worker id; ids are gathered only for the tied candidates."""
        for key in keys:
            if cands.size == 1:
                return int(cands[0])
            vals = key[cands]
            cands = cands[vals == vals.min()]
        if cands.size == 1:
            return int(cands[0])
        words = all_words[rows[cands]]
        local = np.arange(cands.size)
        return int(cands[_narrow(local, [words[:, k] for k in range(4)])])

    @staticmethod
    def _rr_pick(words: npt.NDArray[np.uint64], positions: npt.NDArray[np.intp],
                 id_keys: list[npt.NDArray[np.uint64]], after: bytes | None) -> int:
        """Smallest id strictly after ``after`` among ``positions``, wrapping to the smallest id."""
        cands = positions
        if after is not None:
            later = positions[_greater_ids(words, id_words(after))]
            if later.size:
                cands = later
        return _narrow(cands, id_keys)

    def _candidate(self, ev: Evaluation, pos: int) -> Candidate:
        row = int(ev.rows[pos])
        info = self.table.get(self.table.id_at(row))
        return Candidate(info.worker_id, tuple((n, int(ev.components[n][pos])) for n in COMPONENTS),
                         int(ev.score[pos]), _raw(info))

    # -- reference (per-worker loop) -----------------------------------------------------------
    def assign_reference(self, task_id: bytes, requirements: Requirements, strategy: Strategy,
                         preferred_region: str | None = None,
                         workers: Iterable[WorkerInfo] | None = None) -> Assignment:
        """Same decision as :meth:`assign`, computed by a straightforward loop over WorkerInfo records.

        ``workers`` defaults to the table's workers; it shares (and advances) the round-robin cursor.
        """
        ws = self.table.workers() if workers is None else list(workers)
        r = requirements
        eliminated = dict.fromkeys(FILTERS, 0)
        elig: list[WorkerInfo] = []
        for w in ws:
            failed = _first_failed(w, r)
            if failed is None:
                elig.append(w)
            else:
                eliminated[failed] += 1
        if not elig:
            raise _no_eligible(eliminated, len(ws))
        lat_lo = min(w.latency_ema_us for w in elig)
        lat_hi = max(w.latency_ema_us for w in elig)
        pr_lo = min(w.price_sat_per_unit for w in elig)
        pr_hi = max(w.price_sat_per_unit for w in elig)
        free_hi = max(w.free_capacity for w in elig)
        wts = self.weights.as_dict()
        scored: list[tuple[WorkerInfo, dict[str, int], int]] = []
        for w in elig:
            comp = {
                "reputation": w.reputation_ppm,
                "latency": PPM if lat_hi == lat_lo else PPM - (w.latency_ema_us - lat_lo) * PPM // (lat_hi - lat_lo),
                "capacity": w.free_capacity * PPM // free_hi,
                "cost": PPM if pr_hi == pr_lo else PPM - (w.price_sat_per_unit - pr_lo) * PPM // (pr_hi - pr_lo),
                "region": PPM if preferred_region is not None and w.region == preferred_region else 0,
                "green": w.green_share_ppm,
            }
            scored.append((w, comp, sum(wts[k] * comp[k] for k in COMPONENTS)))
        if strategy is Strategy.ROUND_ROBIN:
            order = sorted(scored, key=lambda s: s[0].worker_id)
            ids = [s[0].worker_id for s in order]
            start = 0 if self._rr_last is None else bisect.bisect_right(ids, self._rr_last) % len(ids)
            ranked = [order[start]] + ([order[(start + 1) % len(order)]] if len(order) > 1 else [])
            self._rr_last = ranked[0][0].worker_id
        else:
            def key(s: tuple[WorkerInfo, dict[str, int], int]) -> tuple[int, int, bytes]:
                w, _, sc = s
                if strategy is Strategy.WEIGHTED:
                    primary = 0
                elif strategy is Strategy.LEAST_LOADED:
                    primary = w.load * PPM // w.capacity
                elif strategy is Strategy.LOWEST_LATENCY:
                    primary = w.latency_ema_us
                elif strategy is Strategy.HIGHEST_REPUTATION:
                    primary = -w.reputation_ppm
                elif strategy is Strategy.LOWEST_COST:
                    primary = w.price_sat_per_unit
                else:  # pragma: no cover - exhaustive
                    raise ValueError(f"unknown strategy {strategy!r}")
                return (primary, -sc, w.worker_id)
            ranked = sorted(scored, key=key)[:2]
        cands = [Candidate(w.worker_id, tuple((k, comp[k]) for k in COMPONENTS), sc, _raw(w))
                 for w, comp, sc in ranked]
        return Assignment(task_id, strategy, cands[0], cands[1] if len(cands) > 1 else None, len(elig), len(ws),
                          tuple(eliminated.items()), self.weights, requirements, preferred_region)


def _first_failed(w: WorkerInfo, r: Requirements) -> str | None:
    """Name of the first hard filter (in FILTERS order) the worker fails, or None if it passes all."""
    if not w.active:
        return "active"
    if w.free_capacity <= 0:
        return "free_capacity"
    if r.devices is not None and w.device not in r.devices:
        return "device"
    if r.model is not None and r.model not in w.models:
        return "model"
    if w.accelerator_mem_mb < r.min_accel_mem_mb:
        return "accel_mem"
    if w.reputation_ppm < r.min_reputation_ppm:
        return "min_reputation"
    if r.max_price_sat is not None and w.price_sat_per_unit > r.max_price_sat:
        return "max_price"
    if r.regions is not None and w.region not in r.regions:
        return "region"
    if w.stake_sat < r.min_stake_sat:
        return "min_stake"
    return None


def satisfies(worker: WorkerInfo, requirements: Requirements) -> bool:
    """True if the worker passes every hard filter of the requirements."""
    return _first_failed(worker, requirements) is None


def _no_eligible(eliminated: dict[str, int], registered: int) -> NoEligibleWorker:
    last = next((name for name in reversed(FILTERS) if eliminated[name]), "registered")
    return NoEligibleWorker(last, eliminated, registered)


def _raw(w: WorkerInfo) -> tuple[tuple[str, int | str], ...]:
    return (("reputation_ppm", w.reputation_ppm), ("latency_ema_us", w.latency_ema_us),
            ("capacity", w.capacity), ("load", w.load), ("free_capacity", w.free_capacity),
            ("price_sat_per_unit", w.price_sat_per_unit), ("region", w.region),
            ("green_share_ppm", w.green_share_ppm), ("stake_sat", w.stake_sat), ("device", w.device.name))
