"""Mempool policy: nonce ordering, fair interleaving, limits, replay/duplicate/gap rejection, pruning."""
from __future__ import annotations

import hashlib
from typing import Callable

import pytest
from coincurve import PrivateKey

from l2d.core.coin_tx import Mint, Transfer
from l2d.core.errors import Rejected
from l2d.core.params import LOCAL
from l2d.core.tx import Transaction, sign
from l2d.mempool import (Duplicate, FeeBelowFloor, Mempool, MempoolError, MempoolFull, NonceGap, NonceTaken,
                         SenderLimit, StaleNonce)


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def tx(key: int, nonce: int, fee: int = 1, amount: int = 10, aux: int = 0) -> Transaction:
    return sign(LOCAL, secret(key), nonce, fee, Transfer(pubkey(99), amount), bytes([aux]) * 32)


def nonces(committed: dict[int, int]) -> Callable[[bytes], int]:
    by_key = {pubkey(k): n for k, n in committed.items()}
    return lambda sender: by_key.get(sender, 0)


def test_errors_are_typed_rejections_with_reason_codes() -> None:
    for cls, reason in ((Duplicate, "duplicate"), (StaleNonce, "stale-nonce"), (NonceGap, "nonce-gap"),
                        (NonceTaken, "nonce-taken"), (MempoolFull, "mempool-full"), (SenderLimit, "sender-limit"),
                        (FeeBelowFloor, "fee-below-floor")):
        assert issubclass(cls, MempoolError) and issubclass(cls, Rejected)
        assert cls.reason == reason


def test_add_get_len_size() -> None:
    m = Mempool(10, 4, 1)
    t = tx(1, 0)
    assert m.add(t, 0) == t.txid
    assert len(m) == 1 and t.txid in m and m.get(t.txid) is t
    assert m.size_bytes == len(t.raw)
    assert m.get(b"\0" * 32) is None


def test_select_orders_each_sender_by_nonce_from_committed() -> None:
    m = Mempool(100, 10, 1)
    for n in (3, 1, 2, 0):  # arrival out of order
        m.add(tx(1, n), 0)
    assert [t.nonce for t in m.select(10, nonces({1: 0}))] == [0, 1, 2, 3]
    assert [t.nonce for t in m.select(2, nonces({1: 0}))] == [0, 1]


def test_select_stops_at_a_gap_and_skips_senders_whose_next_nonce_is_missing() -> None:
    m = Mempool(100, 10, 1)
    for n in (0, 1, 3):
        m.add(tx(1, n), 0)
    m.add(tx(2, 1), 0)  # sender 2 lacks nonce 0
    assert [(t.sender, t.nonce) for t in m.select(10, nonces({}))] == [(pubkey(1), 0), (pubkey(1), 1)]


def test_select_starts_at_the_committed_nonce() -> None:
    m = Mempool(100, 10, 1)
    for n in (5, 6, 7):
        m.add(tx(1, n), 5)
    assert [t.nonce for t in m.select(10, nonces({1: 6}))] == [6, 7]


def test_select_interleaves_senders_fairly_in_order_of_first_arrival() -> None:
    m = Mempool(100, 10, 1)
    m.add(tx(2, 0), 0)
    m.add(tx(1, 0), 0)
    m.add(tx(2, 1), 0)
    m.add(tx(2, 2), 0)
    m.add(tx(1, 1), 0)
    m.add(tx(3, 0), 0)
    got = [(t.sender, t.nonce) for t in m.select(100, nonces({}))]
    p1, p2, p3 = pubkey(1), pubkey(2), pubkey(3)
    assert got == [(p2, 0), (p1, 0), (p3, 0), (p2, 1), (p1, 1), (p2, 2)]
    # a busy sender cannot crowd out the others from a small block
    assert [(t.sender, t.nonce) for t in m.select(3, nonces({}))] == [(p2, 0), (p1, 0), (p3, 0)]


def test_select_does_not_remove() -> None:
    m = Mempool(100, 10, 1)
    m.add(tx(1, 0), 0)
    m.select(10, nonces({}))
    assert len(m) == 1
    assert m.select(0, nonces({})) == []


def test_duplicate_rejected() -> None:
    m = Mempool(10, 4, 1)
    t = tx(1, 0)
    m.add(t, 0)
    with pytest.raises(Duplicate):
        m.add(t, 0)
    assert len(m) == 1


def test_stale_nonce_replay_rejected() -> None:
    m = Mempool(10, 4, 1)
    with pytest.raises(StaleNonce):
        m.add(tx(1, 2), 3)
    assert len(m) == 0


def test_unknown_account_counts_as_nonce_zero() -> None:
    m = Mempool(10, 4, 0)
    mint = sign(LOCAL, secret(7), 0, 0, Mint(pubkey(1), 5), b"\0" * 32)
    m.add(mint, None)
    with pytest.raises(NonceGap):
        m.add(sign(LOCAL, secret(7), 9, 0, Mint(pubkey(1), 5), b"\0" * 32), None)


def test_nonce_taken_by_another_pending_tx() -> None:
    m = Mempool(10, 4, 1)
    m.add(tx(1, 0, aux=1), 0)
    with pytest.raises(NonceTaken):
        m.add(tx(1, 0, aux=2), 0)  # same sender and nonce, different signature randomness: another txid
    assert len(m) == 1


def test_nonce_gap_window() -> None:
    m = Mempool(10, 3, 1)
    m.add(tx(1, 5 + 3), 5)  # committed + max_per_sender is the far edge of the window
    with pytest.raises(NonceGap):
        m.add(tx(1, 5 + 4), 5)


def test_sender_limit() -> None:
    m = Mempool(100, 2, 1)
    m.add(tx(1, 0), 0)
    m.add(tx(1, 1), 0)
    with pytest.raises(SenderLimit):
        m.add(tx(1, 2), 0)
    m.add(tx(2, 0), 0)  # other senders are unaffected
    assert len(m) == 3


def test_mempool_full() -> None:
    m = Mempool(2, 4, 1)
    m.add(tx(1, 0), 0)
    m.add(tx(2, 0), 0)
    with pytest.raises(MempoolFull):
        m.add(tx(3, 0), 0)
    assert len(m) == 2


def test_fee_floor_applies_to_everything_but_mints() -> None:
    m = Mempool(10, 4, 5)
    with pytest.raises(FeeBelowFloor):
        m.add(tx(1, 0, fee=4), 0)
    m.add(tx(1, 0, fee=5), 0)
    m.add(sign(LOCAL, secret(7), 0, 0, Mint(pubkey(1), 5), b"\0" * 32), None)  # mints carry no fee
    assert len(m) == 2


def test_remove_committed_and_drop() -> None:
    m = Mempool(10, 4, 1)
    a, b, c = tx(1, 0), tx(1, 1), tx(2, 0)
    for t in (a, b, c):
        m.add(t, 0)
    assert m.remove_committed([a]) == 1
    assert m.drop([c, tx(3, 0)]) == 1  # unknown txs are ignored
    assert len(m) == 1 and m.get(b.txid) is b
    assert m.size_bytes == len(b.raw)
    assert m.pending_of(pubkey(1)) == [b] and m.pending_of(pubkey(2)) == []
    # the slot is free again once removed
    m.add(tx(2, 0, aux=9), 0)


def test_prune_drops_nonces_below_committed() -> None:
    m = Mempool(10, 4, 1)
    for n in range(4):
        m.add(tx(1, n), 0)
    m.add(tx(2, 0), 0)
    gone = m.prune(nonces({1: 2}))
    assert sorted(t.nonce for t in gone) == [0, 1]
    assert [t.nonce for t in m.pending_of(pubkey(1))] == [2, 3]
    assert len(m) == 3
    assert m.prune(nonces({1: 2})) == []


def test_next_nonce_follows_consecutive_pending() -> None:
    m = Mempool(10, 5, 1)
    for n in (0, 1, 3):
        m.add(tx(1, n), 0)
    assert m.next_nonce(pubkey(1), 0) == 2
    assert m.next_nonce(pubkey(2), 7) == 7


def test_sender_order_after_a_sender_empties_and_returns() -> None:
    m = Mempool(10, 4, 1)
    a = tx(1, 0)
    m.add(a, 0)
    m.add(tx(2, 0), 0)
    m.remove_committed([a])
    m.add(tx(1, 1), 1)  # sender 1 re-arrives after sender 2
    got = [t.sender for t in m.select(10, nonces({1: 1}))]
    assert got == [pubkey(2), pubkey(1)]


def test_bad_limits_refused() -> None:
    with pytest.raises(ValueError):
        Mempool(0, 1, 0)


def test_spent_of_follows_adds_removals_and_prunes() -> None:
    """What a sender's pending transactions spend (the admission balance check) is kept as they come and go."""
    m = Mempool(20, 8, 1)

    def expected(key: int, except_nonce: int) -> int:
        return sum(t.payload.debit_sat() + t.fee_sat for t in m.pending_of(pubkey(key)) if t.nonce != except_nonce)

    txs = [tx(1, n, fee=1 + n, amount=10 * (n + 1)) for n in range(5)] + [tx(2, 0, amount=7)]
    for t in txs:
        m.add(t, 0)
    assert m.spent_of(pubkey(1), 99) == expected(1, 99) == sum(10 * (n + 1) + 1 + n for n in range(5))
    assert m.spent_of(pubkey(1), 2) == expected(1, 2) == expected(1, 99) - 33
    m.remove_committed([txs[0]])
    m.drop([txs[5]])
    assert m.spent_of(pubkey(1), 99) == expected(1, 99) and m.spent_of(pubkey(2), 0) == 0
    m.prune(nonces({1: 3}))
    assert m.spent_of(pubkey(1), 99) == expected(1, 99) == (40 + 4) + (50 + 5)
    m.prune(nonces({1: 5}))
    assert m.spent_of(pubkey(1), 0) == 0 and len(m) == 0
