"""netflow.client.choose_path: the path rules (entry first, exit last, distinct operators), weights before
unmeasured relays, and a path found whenever one exists (checked against every ordered choice of relays)."""
from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.relay_tx import FLAG_ENTRY, FLAG_EXIT
from netflow.client import RelayInfo, choose_path


def relay(n: int, flags: int, operator: int | None = None, weight: int = 0) -> RelayInfo:
    return RelayInfo(bytes([n]) * 32, bytes(32), bytes([n if operator is None else operator]) * 32, flags,
                     f"127.0.0.1:{9000 + n}", 1000, weight)


def valid(path: list[RelayInfo], hops: int) -> bool:
    return (len(path) == hops and path[-1].flags & FLAG_EXIT != 0 and (hops == 1 or path[0].flags & FLAG_ENTRY != 0)
            and len({r.operator for r in path}) == hops)


def test_the_only_exit_is_never_spent_on_the_first_hop() -> None:
    # every relay registered by l2-relay is an entry; A is also the only exit: drawn first, it is always the last hop
    relays = [relay(1, FLAG_ENTRY | FLAG_EXIT, weight=100), relay(2, FLAG_ENTRY, weight=100),
              relay(3, FLAG_ENTRY, weight=100)]
    for seed in range(300):
        path = choose_path(relays, 3, random.Random(seed))
        assert valid(path, 3) and path[-1] == relays[0]


def test_measured_relays_are_drawn_before_unmeasured_ones() -> None:
    measured, never = relay(1, FLAG_ENTRY | FLAG_EXIT, weight=5), relay(2, FLAG_ENTRY | FLAG_EXIT, weight=0)
    assert {choose_path([never, measured], 1, random.Random(s))[0] for s in range(50)} == {measured}
    assert {choose_path([never], 1, random.Random(s))[0] for s in range(5)} == {never}  # none measured: uniformly


def test_no_path_is_a_value_error_naming_the_rules() -> None:
    same_operator = [relay(1, FLAG_ENTRY, operator=7), relay(2, FLAG_EXIT, operator=7), relay(3, 0, operator=7)]
    with pytest.raises(ValueError, match="distinct operators"):
        choose_path(same_operator, 2, random.Random(1))
    with pytest.raises(ValueError, match="no path of 1 relays"):
        choose_path([relay(1, FLAG_ENTRY)], 1, random.Random(1))  # no exit


relays_st = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from([0, 0, 1, 50, 1000])),
                     min_size=0, max_size=7).map(lambda xs: [relay(i + 1, f, o, w) for i, (f, o, w) in enumerate(xs)])


@settings(max_examples=300, deadline=None)
@given(relays_st, st.integers(1, 3), st.integers(0, 2**32))
def test_a_path_is_valid_and_found_whenever_one_exists(relays: list[RelayInfo], hops: int, seed: int) -> None:
    exists = any(valid(list(p), hops) for p in itertools.permutations(relays, hops))
    try:
        path = choose_path(relays, hops, random.Random(seed))
    except ValueError:
        assert not exists
    else:
        assert valid(path, hops) and all(r in relays for r in path)
