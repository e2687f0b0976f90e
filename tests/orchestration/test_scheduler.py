"""Scheduler properties: hard filters, monotone scores, weights, strategies, round-robin, explanations."""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from orchestration.errors import InvalidRequirements, InvalidWeights, NoEligibleWorker
from orchestration.scheduler import (COMPONENTS, FILTERS, SCORE_SCALE, Requirements, Scheduler, Strategy,
                                     Weights, satisfies)
from orchestration.workers import PPM, DeviceKind, WorkerInfo

SETTINGS = settings(max_examples=150, deadline=None)
EQUAL = Weights(reputation=200_000, latency=200_000, capacity=150_000, cost=150_000, region=150_000,
                green=150_000)
TASK = b"\x01" * 32
region_st = st.none() | st.sampled_from(["eu", "us", "ap", "mars"])
weights_st = st.lists(st.integers(0, 10), min_size=6, max_size=6).filter(any).map(
    lambda xs: _weights_from_parts(xs))


def _weights_from_parts(xs: list[int]) -> Weights:
    total = sum(xs)
    ppm = [x * PPM // total for x in xs]
    ppm[xs.index(max(xs))] += PPM - sum(ppm)
    return Weights(**dict(zip(COMPONENTS, ppm)))


def _score_of(sched: Scheduler, req: Requirements, pref: str | None, worker_id: bytes) -> int | None:
    ev = sched.evaluate(req, pref)
    row = sched.table.row_of(worker_id)
    hits = [i for i, r in enumerate(ev.rows.tolist()) if r == row]
    return int(ev.score[hits[0]]) if hits else None


def _primary(strategy: Strategy, w: WorkerInfo) -> int:
    return {Strategy.LEAST_LOADED: lambda: w.load * PPM // w.capacity,
            Strategy.LOWEST_LATENCY: lambda: w.latency_ema_us,
            Strategy.HIGHEST_REPUTATION: lambda: -w.reputation_ppm,
            Strategy.LOWEST_COST: lambda: w.price_sat_per_unit}[strategy]()


# ---------------------------------------------------------------------------------------------
@given(data=st.data(), strategy=st.sampled_from(list(Strategy)), pref=region_st, weights=weights_st)
@SETTINGS
def test_filters_never_violated_and_vectorised_equals_reference(orch, data, strategy, pref, weights):
    workers = data.draw(orch.workers(min_size=0))
    req = data.draw(orch.requirements())
    table = orch.make_table(workers)
    vec, ref = Scheduler(table, weights), Scheduler(table, weights)
    eligible = [w for w in workers if satisfies(w, req)]
    for _ in range(3 if strategy is Strategy.ROUND_ROBIN else 1):
        if not eligible:
            with pytest.raises(NoEligibleWorker) as e1:
                vec.assign(TASK, req, strategy, pref)
            with pytest.raises(NoEligibleWorker) as e2:
                ref.assign_reference(TASK, req, strategy, pref)
            assert (e1.value.filter_name, e1.value.eliminated) == (e2.value.filter_name, e2.value.eliminated)
            assert sum(e1.value.eliminated.values()) == len(workers)
            return
        a = vec.assign(TASK, req, strategy, pref)
        b = ref.assign_reference(TASK, req, strategy, pref)
        assert a == b  # chosen, backup, every component, score and elimination count
        assert satisfies(table.get(a.worker_id), req)
        assert a.eligible_count == len(eligible)
        assert a.eligible_count + sum(dict(a.eliminated).values()) == len(workers)
        if len(eligible) == 1:
            assert a.backup is None
        else:
            assert a.backup_id is not None and a.backup_id != a.worker_id
            assert satisfies(table.get(a.backup_id), req)


def _improve(w: WorkerInfo, what: str, amount: int, pref: str | None) -> WorkerInfo:
    if what == "reputation":
        return replace(w, reputation_ppm=min(PPM, w.reputation_ppm + amount * 100_000))
    if what == "latency":
        return replace(w, latency_ema_us=max(0, w.latency_ema_us - amount))
    if what == "cost":
        return replace(w, price_sat_per_unit=max(0, w.price_sat_per_unit - amount))
    if what == "capacity":
        return replace(w, capacity=w.capacity + amount)
    if what == "load":
        return replace(w, load=max(0, w.load - amount))
    if what == "green":
        return replace(w, green_share_ppm=min(PPM, w.green_share_ppm + amount * 100_000))
    if what == "region":
        return replace(w, region=pref) if pref is not None else w
    raise AssertionError(what)


@given(data=st.data(), pref=region_st, weights=weights_st,
       what=st.sampled_from(["reputation", "latency", "cost", "capacity", "load", "green", "region"]),
       amount=st.integers(1, 20))
@SETTINGS
def test_raising_one_component_never_lowers_the_score(orch, data, pref, weights, what, amount):
    req = data.draw(orch.requirements())
    workers = data.draw(orch.workers(min_size=0)) + [orch.fit_worker(req)]
    eligible = [w for w in workers if satisfies(w, req)]
    assume(eligible)
    target = data.draw(st.sampled_from(eligible))
    better = _improve(target, what, amount, pref)
    assume(satisfies(better, req))  # e.g. moving to the preferred region may leave the region filter
    table = orch.make_table(workers)
    sched = Scheduler(table, weights)
    before = _score_of(sched, req, pref, target.worker_id)
    table.update(better)
    after = _score_of(sched, req, pref, target.worker_id)
    assert before is not None and after is not None
    assert after >= before


@given(data=st.data(), component=st.sampled_from(COMPONENTS), pref=region_st)
@SETTINGS
def test_weight_one_picks_argmax_of_that_component(orch, data, component, pref):
    req = data.draw(orch.requirements())
    workers = data.draw(orch.workers(min_size=0)) + [orch.fit_worker(req)]
    assume(any(satisfies(w, req) for w in workers))
    sched = Scheduler(orch.make_table(workers), Weights(**{component: PPM}))
    ev = sched.evaluate(req, pref)
    comp = ev.components[component].tolist()
    best = max(comp)
    a = sched.assign(TASK, req, Strategy.WEIGHTED, pref)
    assert dict(a.chosen.components)[component] == best
    assert a.chosen.score == best * PPM
    tied = sorted(sched.table.id_at(int(r)) for r, c in zip(ev.rows, comp) if c == best)
    assert a.worker_id == tied[0]  # tie-break: smallest worker id


@given(data=st.data(), strategy=st.sampled_from([s for s in Strategy if s not in (Strategy.WEIGHTED,
                                                                                   Strategy.ROUND_ROBIN)]),
       pref=region_st, weights=weights_st)
@SETTINGS
def test_each_strategy_picks_what_its_name_says(orch, data, strategy, pref, weights):
    req = data.draw(orch.requirements())
    workers = data.draw(orch.workers(min_size=0)) + [orch.fit_worker(req)]
    eligible = [w for w in workers if satisfies(w, req)]
    assume(eligible)
    sched = Scheduler(orch.make_table(workers), weights)
    a = sched.assign(TASK, req, strategy, pref)
    chosen = sched.table.get(a.worker_id)
    assert _primary(strategy, chosen) == min(_primary(strategy, w) for w in eligible)
    if a.backup_id is not None:
        rest = [w for w in eligible if w.worker_id != a.worker_id]
        assert _primary(strategy, sched.table.get(a.backup_id)) == min(_primary(strategy, w) for w in rest)
    # among equal primaries the higher score wins
    scores = {c.worker_id: c.score for c in [a.chosen] + ([a.backup] if a.backup else [])}
    if a.backup is not None and _primary(strategy, sched.table.get(a.backup_id)) == _primary(strategy, chosen):
        assert scores[a.worker_id] >= scores[a.backup_id]


@given(data=st.data(), pref=region_st, weights=weights_st)
@SETTINGS
def test_weighted_picks_highest_score(orch, data, pref, weights):
    req = data.draw(orch.requirements())
    workers = data.draw(orch.workers(min_size=0)) + [orch.fit_worker(req)]
    assume(any(satisfies(w, req) for w in workers))
    sched = Scheduler(orch.make_table(workers), weights)
    ev = sched.evaluate(req, pref)
    a = sched.assign(TASK, req, Strategy.WEIGHTED, pref)
    assert a.chosen.score == int(ev.score.max())
    assert a.chosen.score == sum(w * c for w, c in zip(weights.as_dict().values(), dict(a.chosen.components).values()))


@given(data=st.data())
@SETTINGS
def test_round_robin_rotates_through_every_eligible_worker(orch, data):
    req = data.draw(orch.requirements())
    workers = data.draw(orch.workers(min_size=0)) + [orch.fit_worker(req)]
    eligible = sorted(w.worker_id for w in workers if satisfies(w, req))
    assume(eligible)
    sched = Scheduler(orch.make_table(workers), EQUAL)
    k = len(eligible)
    # start mid-rotation: the cursor may be anywhere
    for _ in range(data.draw(st.integers(0, 3))):
        sched.assign(TASK, req, Strategy.ROUND_ROBIN)
    picks = [sched.assign(TASK, req, Strategy.ROUND_ROBIN) for _ in range(2 * k)]
    ids = [p.worker_id for p in picks]
    assert sorted(ids[:k]) == eligible and sorted(ids[k:]) == eligible  # each exactly once per cycle
    assert ids[:k] == ids[k:]
    for p, nxt in zip(picks, picks[1:]):
        assert p.backup_id == (None if k == 1 else nxt.worker_id)  # backup = next in the rotation
        assert nxt.worker_id == eligible[(eligible.index(p.worker_id) + 1) % k]


def test_round_robin_cursor_survives_changes(orch):
    table = orch.make_table([orch.make_worker(i) for i in range(4)])
    order = sorted(orch.wid(i) for i in range(4))
    sched = Scheduler(table, EQUAL)
    req = Requirements()
    assert sched.assign(TASK, req, Strategy.ROUND_ROBIN).worker_id == order[0]
    assert sched.assign(TASK, req, Strategy.ROUND_ROBIN).worker_id == order[1]
    table.remove(order[2])
    assert sched.assign(TASK, req, Strategy.ROUND_ROBIN).worker_id == order[3]
    assert sched.assign(TASK, req, Strategy.ROUND_ROBIN).worker_id == order[0]


def test_no_eligible_worker_names_the_filter(orch):
    workers = [orch.make_worker(i, price_sat_per_unit=100 + i) for i in range(5)]
    workers.append(orch.make_worker(9, active=False))
    sched = Scheduler(orch.make_table(workers), EQUAL)
    with pytest.raises(NoEligibleWorker, match="max_price") as e:
        sched.assign(TASK, Requirements(max_price_sat=99), Strategy.WEIGHTED)
    assert e.value.filter_name == "max_price"
    assert e.value.eliminated["max_price"] == 5 and e.value.eliminated["active"] == 1
    assert e.value.registered == 6
    with pytest.raises(NoEligibleWorker) as e:
        sched.assign(TASK, Requirements(model="gpt-9"), Strategy.LOWEST_COST)
    assert e.value.filter_name == "model" and e.value.eliminated["model"] == 5
    with pytest.raises(NoEligibleWorker) as e:
        sched.assign(TASK, Requirements(regions=frozenset({"us"}), min_stake_sat=1), Strategy.ROUND_ROBIN)
    assert e.value.filter_name == "region"
    with pytest.raises(NoEligibleWorker) as e:
        sched.assign(TASK, Requirements(devices=frozenset({DeviceKind.TPU})), Strategy.WEIGHTED)
    assert e.value.filter_name == "device"
    with pytest.raises(NoEligibleWorker) as e:
        Scheduler(orch.make_table([]), EQUAL).assign(TASK, Requirements(), Strategy.WEIGHTED)
    assert e.value.filter_name == "registered" and e.value.registered == 0
    full = Scheduler(orch.make_table([orch.make_worker(0, capacity=2, load=2)]), EQUAL)
    with pytest.raises(NoEligibleWorker) as e:
        full.assign(TASK, Requirements(), Strategy.LEAST_LOADED)
    assert e.value.filter_name == "free_capacity"
    assert set(e.value.eliminated) == set(FILTERS)


@pytest.mark.parametrize("config, key", [
    ({"reputation": -0.1, "latency": 1.1}, "reputation"),
    ({"reputation": 0.5, "latency": 0.4}, "sum"),
    ({"reputation": 0.5, "latency": 0.5, "speed": 0.0}, "speed"),
    ({"reputation": float("nan"), "latency": 1.0}, "reputation"),
    ({"reputation": float("inf"), "latency": 1.0}, "reputation"),
    ({"cost": "abc", "latency": 1.0}, "cost"),
    ({"cost": True}, "cost"),
    ({"green": 0.0000001, "latency": 0.9999999}, "green"),
    ({"region": Decimal("NaN")}, "region"),
])
def test_bad_weights_rejected_naming_the_key(config, key):
    with pytest.raises(InvalidWeights, match=key):
        Weights.from_config(config)


def test_weights_exact_conversion():
    w = Weights.from_config({"reputation": 0.1, "latency": 0.2, "capacity": 0.7})  # 0.1+0.2 != 0.3 in floats
    assert w.as_dict() == {"reputation": 100_000, "latency": 200_000, "capacity": 700_000, "cost": 0,
                           "region": 0, "green": 0}
    assert Weights.from_config({"cost": "0.5", "green": Fraction(1, 4), "region": Decimal("0.25")}).cost == 500_000
    assert Weights.from_config({"reputation": 1}).reputation == PPM
    with pytest.raises(InvalidWeights, match="latency"):
        Weights(reputation=PPM + 1, latency=-1)
    with pytest.raises(InvalidWeights, match="sum"):
        Weights(reputation=1)
    with pytest.raises(InvalidWeights, match="cost"):
        Weights(reputation=PPM - 1, cost=1.0)  # type: ignore[arg-type]


def test_bad_requirements_rejected():
    with pytest.raises(InvalidRequirements, match="min_stake_sat"):
        Requirements(min_stake_sat=-1)
    with pytest.raises(InvalidRequirements, match="regions"):
        Requirements(regions={"eu"})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequirements, match="devices"):
        Requirements(devices=frozenset({"CUDA"}))  # type: ignore[arg-type]


def test_explain_is_json_and_accounts_for_everything(orch):
    workers = [orch.make_worker(i, region=["eu", "us"][i % 2], latency_ema_us=1000 * (i + 1),
                                price_sat_per_unit=10 * (5 - i), load=i % 3) for i in range(5)]
    workers.append(orch.make_worker(7, reputation_ppm=10))
    sched = Scheduler(orch.make_table(workers), EQUAL)
    a = sched.assign(TASK, Requirements(min_reputation_ppm=500_000), Strategy.WEIGHTED, preferred_region="us")
    e = json.loads(json.dumps(a.explain()))
    assert e["eligible"] == 5 and e["registered"] == 6 and e["eliminated"]["min_reputation"] == 1
    for who in ("chosen", "backup"):
        c = e[who]
        assert set(c["components_ppm"]) == set(COMPONENTS)
        assert sum(c["contributions"].values()) == c["score"]
        assert all(0 <= v <= PPM for v in c["components_ppm"].values())
        assert math.isclose(c["score_fraction"], c["score"] / SCORE_SCALE)
    assert e["chosen"]["score"] >= e["backup"]["score"]
    assert e["chosen"]["worker_id"] == a.worker_id.hex() and e["strategy"] == "weighted"
    assert e["weights_ppm"] == EQUAL.as_dict() and e["preferred_region"] == "us"


def test_documented_normalisation(orch):
    workers = [
        orch.make_worker(0, latency_ema_us=100, price_sat_per_unit=10, capacity=4, load=0, region="us",
                         green_share_ppm=250_000, reputation_ppm=900_000),
        orch.make_worker(1, latency_ema_us=300, price_sat_per_unit=30, capacity=4, load=2, region="eu"),
        orch.make_worker(2, latency_ema_us=200, price_sat_per_unit=20, capacity=8, load=7, region="eu"),
    ]
    sched = Scheduler(orch.make_table(workers), EQUAL)
    ev = sched.evaluate(Requirements(), "us")
    comp = {sched.table.id_at(int(r)): {k: int(ev.components[k][i]) for k in COMPONENTS}
            for i, r in enumerate(ev.rows)}
    assert comp[orch.wid(0)] == {"reputation": 900_000, "latency": PPM, "capacity": PPM, "cost": PPM,
                                 "region": PPM, "green": 250_000}
    assert comp[orch.wid(1)]["latency"] == 0 and comp[orch.wid(1)]["cost"] == 0
    assert comp[orch.wid(1)]["capacity"] == 500_000 and comp[orch.wid(1)]["region"] == 0
    assert comp[orch.wid(2)]["latency"] == 500_000 and comp[orch.wid(2)]["capacity"] == 250_000
    # all-equal latency/price -> 1 for everyone
    same = Scheduler(orch.make_table([orch.make_worker(i) for i in range(3)]), EQUAL).evaluate(Requirements())
    assert set(same.components["latency"].tolist()) == {PPM} and set(same.components["cost"].tolist()) == {PPM}


def test_vectorised_equals_reference_on_a_large_random_table(orch):
    rng = random.Random(7)
    workers = [orch.make_worker(i, device=rng.choice(list(DeviceKind)), region=rng.choice(["eu", "us", "ap"]),
                                models=frozenset(rng.sample(["llama", "bert", "resnet"], rng.randint(0, 3))),
                                price_sat_per_unit=rng.randint(1, 1000), latency_ema_us=rng.randint(100, 10**6),
                                reputation_ppm=rng.randint(0, PPM), green_share_ppm=rng.randint(0, PPM),
                                capacity=rng.randint(0, 16), load=rng.randint(0, 16),
                                stake_sat=rng.randint(0, 10**7), accelerator_mem_mb=rng.randint(0, 80_000))
               for i in range(3000)]
    table = orch.make_table(workers)
    reqs = [Requirements(), Requirements(model="llama", max_price_sat=500, regions=frozenset({"eu", "us"})),
            Requirements(devices=frozenset({DeviceKind.CUDA, DeviceKind.ROCM}), min_reputation_ppm=300_000,
                         min_stake_sat=10**6, min_accel_mem_mb=16_000)]
    for strategy in Strategy:
        vec, ref = Scheduler(table, EQUAL), Scheduler(table, EQUAL)
        for req in reqs:
            for pref in (None, "ap"):
                assert vec.assign(TASK, req, strategy, pref) == ref.assign_reference(TASK, req, strategy, pref)
