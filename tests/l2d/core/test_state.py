"""The federation members record of the genesis state and the member check every system transaction type uses."""
from __future__ import annotations

import hashlib

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.errors import BadNonce, DecodeError, InvalidTransaction, Unauthorized
from l2d.core.params import REGTEST
from l2d.core.state import (FEDERATION_MEMBERS_KEY, Account, StateView, account_key, bump_member_nonce, check_member,
                            decode_members, encode_members, genesis_state, is_member)
from l2d.core.tx import sign


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d state test key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


UPDATE = AnchorUpdate(5, b"\1" * 32, b"\2" * 32, b"\3" * 32, 101, AnchorStatus.CONFIRMED)


def test_members_record_layout_in_the_genesis_state() -> None:
    keys = (pk(1), pk(2), pk(3))
    state = genesis_state([(pk(9), 1000)], None, keys)
    assert FEDERATION_MEMBERS_KEY == b"\x00" + b"federation_members".ljust(32, b"\0")
    assert state[FEDERATION_MEMBERS_KEY] == b"\x03" + pk(1) + pk(2) + pk(3)  # count u8, keys in member order
    assert decode_members(state[FEDERATION_MEMBERS_KEY]) == keys
    assert FEDERATION_MEMBERS_KEY not in genesis_state([(pk(9), 1000)], None)  # no members: no record
    assert encode_members([pk(n) for n in range(64)])[0] == 64


@pytest.mark.parametrize("keys, match", [
    ([b"\x05" * 32], "not a valid x-only key"),
    ([pk(1), pk(2), pk(1)], "appears twice"),
    ([pk(n) for n in range(65)], "1..64 members"),
])
def test_unusable_member_sets_are_refused(keys: list[bytes], match: str) -> None:
    with pytest.raises(InvalidTransaction, match=match):
        genesis_state([], None, keys)


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x01" + b"\x11" * 31, b"\x01" + b"\x11" * 33,
                                 b"\x02" + b"\x11" * 32, b"\x41" + b"\x11" * 32 * 65])
def test_members_record_decoding_is_strict(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_members(raw)


@given(members=st.sets(st.integers(1, 8), min_size=1, max_size=5), sender=st.integers(1, 9),
       nonce=st.integers(0, 3), committed=st.integers(0, 3))
def test_only_a_member_at_or_above_its_own_next_nonce_passes_and_only_its_nonce_moves(
        members: set[int], sender: int, nonce: int, committed: int) -> None:
    state = genesis_state([], None, [pk(n) for n in sorted(members)])
    state[account_key(pk(sender))] = Account(7, committed).encode()
    tx = sign(REGTEST, secret(sender), nonce, 0, UPDATE, b"\0" * 32)
    view = StateView(state.get)
    assert is_member(view, pk(sender)) == (sender in members)
    if sender not in members:
        with pytest.raises(Unauthorized):
            bump_member_nonce(view, tx)
    elif nonce < committed:  # a replay (or a nonce used already)
        with pytest.raises(BadNonce):
            bump_member_nonce(view, tx)
    else:  # the next nonce, or one after a gap (a duty refused as a duplicate left it unused)
        assert check_member(view, tx) == 7 and view.writes == {}
        bump_member_nonce(view, tx)
        assert view.writes == {account_key(pk(sender)): Account(7, nonce + 1).encode()}
        return
    assert view.writes == {}


def test_a_member_system_transaction_carries_no_fee() -> None:
    state = genesis_state([], None, [pk(1)])
    with pytest.raises(InvalidTransaction, match="no fee"):
        check_member(StateView(state.get), sign(REGTEST, secret(1), 0, 1, UPDATE, b"\0" * 32))
