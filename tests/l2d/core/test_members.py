"""Membership: the threshold rule, key checks, and a strict round-tripping encoding."""
from __future__ import annotations

import hashlib

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from l2d.core.errors import DecodeError, InvalidMembership, UnknownVersion
from l2d.core.members import MAX_MEMBERS, Membership, default_threshold


def key(i: int) -> bytes:
    return PrivateKey(hashlib.sha256(b"member %d" % i).digest()).public_key_xonly.format()


KEYS = tuple(key(i) for i in range(MAX_MEMBERS + 1))


def test_default_threshold_tolerates_a_third_byzantine() -> None:
    assert [default_threshold(n) for n in (1, 2, 3, 4, 7, 15)] == [1, 2, 3, 3, 5, 11]


@pytest.mark.parametrize("n, m, ok", [(1, 1, True), (4, 3, True), (4, 4, True), (4, 2, False), (3, 1, False),
                                      (2, 1, False), (4, 5, False), (4, 0, False)])
def test_threshold_must_be_a_majority_at_most_n(n: int, m: int, ok: bool) -> None:
    if ok:
        assert Membership(KEYS[:n], m).threshold == m
    else:
        with pytest.raises(InvalidMembership, match="threshold"):
            Membership(KEYS[:n], m)


def test_bad_member_sets_are_refused() -> None:
    with pytest.raises(InvalidMembership, match="1..64"):
        Membership((), 1)
    with pytest.raises(InvalidMembership, match="1..64"):
        Membership(KEYS[:MAX_MEMBERS + 1], MAX_MEMBERS)
    with pytest.raises(InvalidMembership, match="twice"):
        Membership((KEYS[0], KEYS[1], KEYS[0]), 2)
    with pytest.raises(InvalidMembership, match="member 1 key"):
        Membership((KEYS[0], (5).to_bytes(32, "big")), 2)  # x = 5 is not on the curve
    with pytest.raises(InvalidMembership, match="member 0 key"):
        Membership((KEYS[0][:31],), 1)


def test_layout_and_index() -> None:
    m = Membership(KEYS[:4], 3)
    assert m.encode() == bytes((1, 4, 3)) + b"".join(KEYS[:4])
    assert m.index_of(KEYS[2]) == 2
    with pytest.raises(InvalidMembership, match="not a member"):
        m.index_of(KEYS[9])


@given(n=st.integers(1, MAX_MEMBERS), data=st.data())
def test_round_trip(n: int, data: st.DataObject) -> None:
    m = Membership(KEYS[:n], data.draw(st.integers(n // 2 + 1, n)))
    assert Membership.decode(m.encode()) == m


def test_decoding_is_strict() -> None:
    raw = Membership(KEYS[:4], 3).encode()
    with pytest.raises(UnknownVersion):
        Membership.decode(b"\x02" + raw[1:])
    for bad in (raw[:2], raw[:-1], raw + b"\0"):
        with pytest.raises(DecodeError):
            Membership.decode(bad)
    with pytest.raises(InvalidMembership):
        Membership.decode(raw[:2] + b"\x02" + raw[3:])  # m = 2 of 4
