"""Mempool: admitted, not yet committed transactions, ordered per sender by nonce and bounded in size.

A pure data structure (no clock, no store access): the node passes the committed nonces in. The node has
already strictly decoded each transaction, checked its signature and run the cheap state checks before
calling `add`; the mempool only enforces pool policy (duplicates, replays, nonce window, limits, fee floor).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Iterator, Optional

from .core.errors import Rejected
from .core.tx import Transaction

log = logging.getLogger(__name__)

NonceOf = Callable[[bytes], int]


class MempoolError(Rejected):
    """A transaction the mempool refuses; nothing was changed."""

    reason = "mempool-rejected"


class Duplicate(MempoolError):
    reason = "duplicate"


class StaleNonce(MempoolError):
    """The nonce is below the sender's committed nonce: a replay of something already committed."""

    reason = "stale-nonce"


class NonceGap(MempoolError):
    """The nonce is further ahead of the committed nonce than the pool keeps per sender."""

    reason = "nonce-gap"


class NonceTaken(MempoolError):
    """Another pending transaction of the same sender already holds this nonce (no replacement)."""

    reason = "nonce-taken"


class MempoolFull(MempoolError):
    reason = "mempool-full"


class SenderLimit(MempoolError):
    reason = "sender-limit"


class FeeBelowFloor(MempoolError):
    reason = "fee-below-floor"


class Mempool:
    """Pending transactions: by txid, and per sender by nonce; senders kept in order of first arrival."""

    __slots__ = ("max_txs", "max_per_sender", "min_fee_sat", "_by_id", "_by_sender", "_spent", "_size_bytes")

    def __init__(self, max_txs: int, max_per_sender: int, min_fee_sat: int) -> None:
        if max_txs < 1 or max_per_sender < 1 or min_fee_sat < 0:
            raise ValueError(f"bad mempool limits: max_txs={max_txs}, max_per_sender={max_per_sender}, "
                             f"min_fee_sat={min_fee_sat}")
        self.max_txs = max_txs
        self.max_per_sender = max_per_sender
        self.min_fee_sat = min_fee_sat
        self._by_id: dict[bytes, Transaction] = {}
        # sender -> {nonce: tx}; dict order is the order in which senders (re)appeared, which select() honours.
        self._by_sender: dict[bytes, dict[int, Transaction]] = {}
        self._spent: dict[bytes, int] = {}  # sender -> what its pending transactions spend (debits and fees)
        self._size_bytes = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, txid: object) -> bool:
        return txid in self._by_id

    def __iter__(self) -> Iterator[Transaction]:
        return iter(list(self._by_id.values()))

    @property
    def size_bytes(self) -> int:
        """Total encoded size of the pending transactions."""
        return self._size_bytes

    def get(self, txid: bytes) -> Optional[Transaction]:
        """The pending transaction with this txid, if any."""
        return self._by_id.get(txid)

    def pending_of(self, sender: bytes) -> list[Transaction]:
        """The sender's pending transactions in nonce order."""
        q = self._by_sender.get(sender)
        return [q[n] for n in sorted(q)] if q else []

    def spent_of(self, sender: bytes, except_nonce: int) -> int:
        """What the sender's pending transactions spend (debits and fees), but the one with except_nonce."""
        q = self._by_sender.get(sender)
        if not q:
            return 0
        same = q.get(except_nonce)
        return self._spent[sender] - (0 if same is None else _cost(same))

    def next_nonce(self, sender: bytes, committed_nonce: int) -> int:
        """The first nonce after the run of consecutive pending nonces starting at committed_nonce."""
        q = self._by_sender.get(sender, {})
        n = committed_nonce
        while n in q:
            n += 1
        return n

    def add(self, tx: Transaction, committed_nonce: Optional[int]) -> bytes:
        """Admit tx (signature and state pre-checks already done by the caller); returns its txid.

        committed_nonce is the sender's committed nonce, None if the account does not exist (treated as 0).
        Raises a MempoolError subclass, having changed nothing, if the pool refuses it.
        """
        txid = tx.txid
        if txid in self._by_id:
            raise Duplicate(f"transaction {txid.hex()} is already pending")
        base = committed_nonce or 0
        if tx.nonce < base:
            raise StaleNonce(f"nonce {tx.nonce} is below the committed nonce {base} of {tx.sender.hex()}")
        if not tx.payload.FEELESS and tx.fee_sat < self.min_fee_sat:
            raise FeeBelowFloor(f"fee {tx.fee_sat} sat is below the mempool floor of {self.min_fee_sat} sat")
        if tx.nonce > base + self.max_per_sender:
            raise NonceGap(f"nonce {tx.nonce} is more than {self.max_per_sender} ahead of the committed "
                           f"nonce {base}")
        q = self._by_sender.get(tx.sender)
        if q is not None:
            if tx.nonce in q:
                raise NonceTaken(f"nonce {tx.nonce} of {tx.sender.hex()} is already taken by pending "
                                 f"transaction {q[tx.nonce].txid.hex()}")
            if len(q) >= self.max_per_sender:
                raise SenderLimit(f"{tx.sender.hex()} already has {len(q)} pending transactions "
                                  f"(limit {self.max_per_sender})")
        if len(self._by_id) >= self.max_txs:
            raise MempoolFull(f"mempool holds {len(self._by_id)} transactions (limit {self.max_txs})")
        if q is None:
            q = self._by_sender[tx.sender] = {}
            self._spent[tx.sender] = 0
        q[tx.nonce] = tx
        self._spent[tx.sender] += _cost(tx)
        self._by_id[txid] = tx
        self._size_bytes += len(tx.raw)
        return txid

    def select(self, max_n: int, committed_nonce_of: NonceOf) -> list[Transaction]:
        """Up to max_n transactions for the next block, without removing them.

        Each sender contributes its consecutive nonces starting at its committed nonce (a gap stops it);
        senders take turns, one transaction per turn, in order of first arrival.
        """
        if max_n <= 0:
            return []
        runs: list[Iterator[Transaction]] = []
        for sender, q in self._by_sender.items():
            start = committed_nonce_of(sender)
            if start in q:
                runs.append(_run(q, start))
        out: list[Transaction] = []
        while runs and len(out) < max_n:
            alive: list[Iterator[Transaction]] = []
            for it in runs:
                tx = next(it, None)
                if tx is None:
                    continue
                out.append(tx)
                alive.append(it)
                if len(out) >= max_n:
                    break
            runs = alive
        return out

    def _remove(self, tx: Transaction) -> bool:
        txid = tx.txid
        if self._by_id.pop(txid, None) is None:
            return False
        self._size_bytes -= len(tx.raw)
        q = self._by_sender.get(tx.sender)
        if q is not None:
            if q.get(tx.nonce) is not None and q[tx.nonce].txid == txid:
                del q[tx.nonce]
                self._spent[tx.sender] -= _cost(tx)
            if not q:
                del self._by_sender[tx.sender]
                del self._spent[tx.sender]
        return True

    def remove_committed(self, txs: Iterable[Transaction]) -> int:
        """Forget transactions that are now in a committed block; returns how many were pending."""
        return sum(self._remove(t) for t in txs)

    def drop(self, txs: Iterable[Transaction]) -> int:
        """Forget transactions the ledger rejected; returns how many were pending."""
        return sum(self._remove(t) for t in txs)

    def prune(self, committed_nonce_of: NonceOf) -> list[Transaction]:
        """Drop every pending transaction whose nonce is below its sender's committed nonce; returns them."""
        stale: list[Transaction] = []
        for sender, q in list(self._by_sender.items()):
            base = committed_nonce_of(sender)
            stale.extend(tx for n, tx in q.items() if n < base)
        for tx in stale:
            self._remove(tx)
        if stale:
            log.debug("pruned %d stale transactions", len(stale))
        return stale


def _run(q: dict[int, Transaction], start: int) -> Iterator[Transaction]:
    n = start
    while n in q:
        yield q[n]
        n += 1


def _cost(tx: Transaction) -> int:
    return int(tx.payload.debit_sat() + tx.fee_sat)
