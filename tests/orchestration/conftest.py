"""Shared helpers for the orchestration tests: worker/requirement builders and hypothesis strategies."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import pytest
from hypothesis import strategies as st

from orchestration.scheduler import Requirements
from orchestration.workers import DeviceKind, WorkerInfo, WorkerTable

REGIONS = ("eu", "us", "ap")
MODELS = ("llama", "bert", "resnet")


def wid(i: int) -> bytes:
    """A deterministic 32-byte worker id."""
    return hashlib.sha256(b"worker %d" % i).digest()


def make_worker(i: int = 0, **kw: Any) -> WorkerInfo:
    """A valid worker with sensible defaults; keyword arguments override fields."""
    base: dict[str, Any] = dict(
        worker_id=wid(i), device=DeviceKind.CUDA, accelerator_mem_mb=16_000, models=frozenset({"llama"}),
        region="eu", price_sat_per_unit=100, green_share_ppm=500_000, carbon_g_per_kwh=200,
        stake_sat=1_000_000, reputation_ppm=800_000, latency_ema_us=10_000, capacity=4, load=0, active=True)
    base.update(kw)
    return WorkerInfo(**base)


def make_table(workers: list[WorkerInfo]) -> WorkerTable:
    """A table holding the given workers (small initial capacity, so growth is exercised)."""
    t = WorkerTable(initial_capacity=2)
    for w in workers:
        t.add(w)
    return t


def fit_worker(req: Requirements, i: int = 10_000, **kw: Any) -> WorkerInfo:
    """A worker built to pass every hard filter of ``req`` (so a property test always has a candidate)."""
    fields: dict[str, Any] = dict(
        device=min(req.devices) if req.devices else DeviceKind.CUDA,
        models=frozenset({req.model}) if req.model else frozenset(),
        accelerator_mem_mb=max(req.min_accel_mem_mb, 0),
        reputation_ppm=max(req.min_reputation_ppm, 500_000),
        price_sat_per_unit=req.max_price_sat if req.max_price_sat is not None else 25,
        region=min(req.regions) if req.regions else "eu",
        stake_sat=req.min_stake_sat, latency_ema_us=20, capacity=3, load=1, active=True)
    fields.update(kw)
    return make_worker(i, **fields)


@st.composite
def _worker(draw: st.DrawFn, idx: int) -> WorkerInfo:
    # Small domains on purpose: many ties, so the tie-break rules are exercised.
    capacity = draw(st.integers(0, 4))
    return WorkerInfo(
        worker_id=draw(st.binary(min_size=32, max_size=32)) if draw(st.booleans()) else wid(idx),
        device=draw(st.sampled_from(list(DeviceKind))),
        accelerator_mem_mb=draw(st.sampled_from([0, 8_000, 16_000, 80_000])),
        models=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=3))),
        region=draw(st.sampled_from(REGIONS)),
        price_sat_per_unit=draw(st.integers(0, 50)),
        green_share_ppm=draw(st.sampled_from([0, 250_000, 500_000, 1_000_000])),
        carbon_g_per_kwh=draw(st.integers(0, 800)),
        stake_sat=draw(st.sampled_from([0, 10_000, 1_000_000])),
        reputation_ppm=draw(st.sampled_from([0, 100_000, 500_000, 900_000, 1_000_000])),
        latency_ema_us=draw(st.integers(0, 40)),
        capacity=capacity,
        load=draw(st.integers(0, 5)),
        active=draw(st.integers(0, 4)) != 0,  # mostly active
    )


@st.composite
def _workers(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[WorkerInfo]:
    n = draw(st.integers(min_size, max_size))
    out: dict[bytes, WorkerInfo] = {}
    for i in range(n):
        w = draw(_worker(i))
        out.setdefault(w.worker_id, w)
    return list(out.values())


@st.composite
def _requirements(draw: st.DrawFn) -> Requirements:
    return Requirements(
        devices=draw(st.none() | st.frozensets(st.sampled_from(list(DeviceKind)), min_size=1)),
        model=draw(st.none() | st.sampled_from(MODELS)),
        min_accel_mem_mb=draw(st.sampled_from([0, 8_000, 16_000])),
        min_reputation_ppm=draw(st.sampled_from([0, 100_000, 500_000])),
        max_price_sat=draw(st.none() | st.integers(0, 50)),
        regions=draw(st.none() | st.frozensets(st.sampled_from(REGIONS), min_size=1)),
        min_stake_sat=draw(st.sampled_from([0, 10_000])),
    )


@dataclass(frozen=True)
class OrchHelpers:
    """Bundle handed to tests by the ``orch`` fixture."""

    wid: Callable[[int], bytes]
    make_worker: Callable[..., WorkerInfo]
    make_table: Callable[[list[WorkerInfo]], WorkerTable]
    workers: Callable[..., st.SearchStrategy[list[WorkerInfo]]]
    requirements: Callable[[], st.SearchStrategy[Requirements]]
    fit_worker: Callable[..., WorkerInfo]
    regions: tuple[str, ...]
    models: tuple[str, ...]


@pytest.fixture(scope="session")
def orch() -> OrchHelpers:
    """Builders and hypothesis strategies for workers, tables and requirements."""
    return OrchHelpers(wid, make_worker, make_table, _workers, _requirements, fit_worker, REGIONS, MODELS)
