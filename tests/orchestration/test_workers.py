"""WorkerInfo validation, WorkerTable incremental updates and the integer latency EMA."""
from __future__ import annotations

from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestration.errors import DuplicateWorker, InvalidWorker, UnknownWorker
from orchestration.workers import LATENCY_ALPHA, DeviceKind, WorkerTable, id_words, latency_ema


def test_worker_validation_names_field(orch):
    with pytest.raises(InvalidWorker, match="worker_id"):
        orch.make_worker(worker_id=b"short")
    with pytest.raises(InvalidWorker, match="green_share_ppm"):
        orch.make_worker(green_share_ppm=1_000_001)
    with pytest.raises(InvalidWorker, match="reputation_ppm"):
        orch.make_worker(reputation_ppm=-1)
    with pytest.raises(InvalidWorker, match="price_sat_per_unit"):
        orch.make_worker(price_sat_per_unit=1.5)
    with pytest.raises(InvalidWorker, match="device"):
        orch.make_worker(device="CUDA")
    with pytest.raises(InvalidWorker, match="load"):
        orch.make_worker(load=True)


def test_add_get_update_remove(orch):
    t = orch.make_table([orch.make_worker(i, region=r) for i, r in enumerate(["eu", "us", "eu", "ap", "us"])])
    assert len(t) == 5
    assert t.get(orch.wid(3)).region == "ap"
    with pytest.raises(DuplicateWorker):
        t.add(orch.make_worker(3))
    with pytest.raises(UnknownWorker):
        t.get(orch.wid(99))
    t.update(replace(t.get(orch.wid(1)), price_sat_per_unit=7, models=frozenset({"bert"})))
    c = t.columns()
    r1 = t.row_of(orch.wid(1))
    assert c.price_sat[r1] == 7
    assert t.model_mask("bert")[r1] and not t.model_mask("llama")[r1]
    gone = t.remove(orch.wid(0))
    assert gone.worker_id == orch.wid(0) and orch.wid(0) not in t and len(t) == 4
    # the moved row keeps its data
    for w in t.workers():
        r = t.row_of(w.worker_id)
        c = t.columns()
        assert tuple(int(x) for x in c.id_words[r]) == id_words(w.worker_id)
        assert c.price_sat[r] == w.price_sat_per_unit
        assert bool(t.model_mask("llama")[r]) == ("llama" in w.models)
    with pytest.raises(UnknownWorker):
        t.remove(orch.wid(0))


def test_columns_are_contiguous_numpy(orch):
    t = orch.make_table([orch.make_worker(i) for i in range(10)])
    c = t.columns()
    for col in c:
        assert isinstance(col, np.ndarray) and col.flags["C_CONTIGUOUS"]
        assert col.shape[0] == 10


def test_set_load_reputation_active(orch):
    t = orch.make_table([orch.make_worker(i) for i in range(3)])
    t.set_load(orch.wid(1), 3)
    t.set_reputation(orch.wid(1), 123)
    t.set_active(orch.wid(2), False)
    c = t.columns()
    assert c.load[t.row_of(orch.wid(1))] == 3 and t.get(orch.wid(1)).load == 3
    assert c.reputation_ppm[t.row_of(orch.wid(1))] == 123
    assert not c.active[t.row_of(orch.wid(2))]
    with pytest.raises(InvalidWorker, match="reputation_ppm"):
        t.set_reputation(orch.wid(1), 2_000_000)
    assert t.get(orch.wid(1)).reputation_ppm == 123  # bad input changes nothing
    assert c.reputation_ppm[t.row_of(orch.wid(1))] == 123


def test_latency_ema_integer_and_documented():
    assert LATENCY_ALPHA == Fraction(1, 8)
    assert latency_ema(1000, 1000) == 1000
    assert latency_ema(1000, 9000) == 2000            # 1000 + (9000-1000)/8
    assert latency_ema(0, 4) == 1                     # step 0.5 rounds towards the sample
    assert latency_ema(0, 3) == 1                     # step 0.375 too: a constant sample is reached
    assert latency_ema(10, 7) == 9                    # and downwards
    assert latency_ema(10, 9) == 9
    assert isinstance(latency_ema(10, 20), int)


@given(prev=st.integers(0, 10**12), sample=st.integers(0, 10**12),
       p=st.integers(1, 16), q=st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_latency_ema_exact_and_between(prev, sample, p, q):
    if p > q:
        p, q = q, p
    a = Fraction(p, q)
    e = latency_ema(prev, sample, a)
    exact = prev + a * (sample - prev)
    assert abs(e - exact) < 1
    assert min(prev, sample) <= e <= max(prev, sample)


def test_record_latency_updates_column(orch):
    t = orch.make_table([orch.make_worker(0, latency_ema_us=8000)])
    assert t.record_latency(orch.wid(0), 16_000) == 9000
    assert t.columns().latency_us[0] == 9000 and t.get(orch.wid(0)).latency_ema_us == 9000
    for _ in range(200):
        t.record_latency(orch.wid(0), 500)
    assert t.get(orch.wid(0)).latency_ema_us == 500  # converges to a constant sample
    with pytest.raises(InvalidWorker, match="rtt_us"):
        t.record_latency(orch.wid(0), -1)


@given(ops=st.lists(st.tuples(st.sampled_from(["add", "remove", "load", "rtt", "models"]),
                              st.integers(0, 9), st.integers(0, 5)), max_size=60))
@settings(max_examples=60, deadline=None)
def test_columns_match_records_after_any_ops(orch, ops):
    t = WorkerTable(initial_capacity=1)
    for op, i, v in ops:
        w = orch.wid(i)
        if op == "add" and w not in t:
            t.add(orch.make_worker(i, device=DeviceKind(v % len(DeviceKind)), price_sat_per_unit=v,
                                   models=frozenset(orch.models[: v % 4])))
        elif op == "remove" and w in t:
            t.remove(w)
        elif op == "load" and w in t:
            t.set_load(w, v)
        elif op == "rtt" and w in t:
            t.record_latency(w, v * 1000)
        elif op == "models" and w in t:
            t.update(replace(t.get(w), models=frozenset(orch.models[v % 3:])))
    c = t.columns()
    assert len(t.workers()) == len(t) == c.price_sat.shape[0]
    for w in t.workers():
        r = t.row_of(w.worker_id)
        assert t.id_at(r) == w.worker_id
        assert (c.price_sat[r], c.load[r], c.latency_us[r], c.device[r]) == (
            w.price_sat_per_unit, w.load, w.latency_ema_us, int(w.device))
        for m in orch.models:
            mm = t.model_mask(m)
            assert (mm is not None and bool(mm[r])) == (m in w.models)
    for m in orch.models:
        mm = t.model_mask(m)
        if mm is not None:
            assert int(mm.sum()) == sum(m in w.models for w in t.workers())
