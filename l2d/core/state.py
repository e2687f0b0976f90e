"""State layout (namespaced keys, canonical values), the write overlay the rules work on, and the helpers
every subsystem's rules share (charging the sender, member-posted system transactions, locked money, credits).

The rules themselves live one module per subsystem; l2d/core/rules.py maps each transaction type to its rule
and holds apply_tx.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterable, Optional, Sequence

from .errors import (BadNonce, DecodeError, FeeTooLow, InsufficientBalance, InvalidTransaction, Overflow, Unauthorized,
                     UnknownSender)
from .members import MAX_MEMBERS
from .params import MAX_MONEY, Network
from .tx import Transaction, is_valid_key


class Namespace(IntEnum):
    """First byte of every state key. Later subsystems add theirs here, never reuse a number."""

    META = 0x00
    ACCOUNT = 0x01
    PEGIN = 0x02
    PEGOUT = 0x03
    ANCHOR = 0x04
    WORKER = 0x05
    TASK = 0x06
    FL_ROUND = 0x07
    RELAY = 0x08
    BTC_HEADER = 0x09
    FL_JOB = 0x0A
    FED_COIN = 0x0B
    PLAN = 0x0C
    PLAN_SIG = 0x0D
    ANCHOR_PLAN = 0x0E
    SESSION = 0x0F
    MODEL = 0x10
    MODEL_OFFER = 0x11
    COMPLETION = 0x12
    COMPLETION_CHALLENGE = 0x13
    MODEL_SERVERS = 0x14
    RELAY_VOTE = 0x15


def meta_key(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 32:
        raise ValueError(f"meta key name {name!r} longer than 32 bytes")
    return bytes((Namespace.META,)) + raw.ljust(32, b"\0")


def account_key(pubkey: bytes) -> bytes:
    return bytes((Namespace.ACCOUNT,)) + pubkey



SUPPLY_KEY = meta_key("supply")
# Money held by the ledger itself (escrowed bounties and reward pools, locked stakes): u64, absent = 0.
# Invariant: sum(balances) + fees + locked == minted - burned.
LOCKED_KEY = meta_key("locked")
MINT_AUTHORITY_KEY = meta_key("mint_authority")
# The federation members' block-signing keys, the authorities of every system transaction (anchor updates, header
# relays, peg-out updates, task coordination, FL rounds): count u8 (1..64) | count x 32-byte x-only keys, in
# member-index order (docs/federation.md, "Member-signed system transactions").
FEDERATION_MEMBERS_KEY = meta_key("federation_members")

# The byte layouts of the two records every transaction touches (Account and Supply encode with these; the
# transfer rule, the ledger's hot path, packs them directly).
ACCOUNT_LAYOUT = struct.Struct(">QQ")
SUPPLY_LAYOUT = struct.Struct(">QQQ")
_ACC_PREFIX = bytes((Namespace.ACCOUNT,))


@dataclass(frozen=True, slots=True)
class Account:
    balance_sat: int
    nonce: int

    def encode(self) -> bytes:
        return ACCOUNT_LAYOUT.pack(self.balance_sat, self.nonce)

    @classmethod
    def decode(cls, b: bytes) -> "Account":
        if len(b) != ACCOUNT_LAYOUT.size:
            raise DecodeError(f"account value is {len(b)} bytes, expected {ACCOUNT_LAYOUT.size}")
        return cls(*ACCOUNT_LAYOUT.unpack(b))


@dataclass(frozen=True, slots=True)
class Supply:
    """Money created and destroyed so far. Invariant: sum(balances) + fees_sat == minted_sat - burned_sat."""

    minted_sat: int
    burned_sat: int
    fees_sat: int

    def encode(self) -> bytes:
        return SUPPLY_LAYOUT.pack(self.minted_sat, self.burned_sat, self.fees_sat)

    @classmethod
    def decode(cls, b: bytes) -> "Supply":
        if len(b) != SUPPLY_LAYOUT.size:
            raise DecodeError(f"supply value is {len(b)} bytes, expected {SUPPLY_LAYOUT.size}")
        return cls(*SUPPLY_LAYOUT.unpack(b))



@dataclass(frozen=True, slots=True)
class Rules:
    """Consensus parameters of one chain, passed in (never global)."""

    network: Network
    min_fee_sat: int


Getter = Callable[[bytes], Optional[bytes]]
_MISSING = object()


class StateView:
    """Write overlay over a read-only base; writes maps key -> value, or None for a deletion.

    height is the L2 height of the block the transactions are applied in (the only notion of time the
    state transition has: challenge windows, exit delays and timeouts are counted in blocks); parent_hash the hash
    of the block it is built on (what no transaction's author knew when it signed: the audit draws use it).
    """

    __slots__ = ("_base", "writes", "height", "parent_hash")

    def __init__(self, base: Getter, height: int = 0, parent_hash: bytes = bytes(32)) -> None:
        self._base = base
        self.writes: dict[bytes, Optional[bytes]] = {}
        self.height = height
        self.parent_hash = parent_hash

    def get(self, key: bytes) -> Optional[bytes]:
        v = self.writes.get(key, _MISSING)
        if v is _MISSING:
            return self._base(key)
        return v  # type: ignore[return-value]

    def put(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def delete(self, key: bytes) -> None:
        self.writes[key] = None

    def account(self, pubkey: bytes) -> Optional[Account]:
        v = self.get(_ACC_PREFIX + pubkey)
        return None if v is None else Account.decode(v)



def charge_sender(view: StateView, tx: Transaction, rules: Rules, debit_sat: int) -> Account:
    """Check the sender's account (exists, nonce, fee floor, balance >= debit + fee), then write it back
    with debit + fee taken and the nonce bumped, and count the fee. Returns the account as it was.

    For handlers of fee-paying types: call it after the handler's own checks and before its own writes.
    """
    skey = _ACC_PREFIX + tx.sender
    raw = view.get(skey)
    if raw is None:
        raise UnknownSender(f"no account {tx.sender.hex()}")
    bal, nonce = ACCOUNT_LAYOUT.unpack(raw)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    fee = tx.fee_sat
    if fee < rules.min_fee_sat:
        raise FeeTooLow(f"fee {fee} sat is below the floor of {rules.min_fee_sat} sat")
    if debit_sat + fee > bal:
        raise InsufficientBalance(f"needs {debit_sat + fee} sat ({debit_sat} + fee {fee}), balance is {bal}")
    view.put(skey, ACCOUNT_LAYOUT.pack(bal - debit_sat - fee, nonce + 1))
    if fee:
        sup = Supply.decode(view.get(SUPPLY_KEY) or SUPPLY_LAYOUT.pack(0, 0, 0))
        view.put(SUPPLY_KEY, SUPPLY_LAYOUT.pack(sup.minted_sat, sup.burned_sat, sup.fees_sat + fee))
    return Account(bal, nonce)


def encode_members(keys: Sequence[bytes]) -> bytes:
    """The FEDERATION_MEMBERS_KEY value: count u8 | the x-only keys in member-index order."""
    if not 1 <= len(keys) <= MAX_MEMBERS:
        raise InvalidTransaction(f"a federation has 1..{MAX_MEMBERS} members, not {len(keys)}")
    for i, k in enumerate(keys):
        if not is_valid_key(k):
            raise InvalidTransaction(f"federation member {i} key is not a valid x-only key")
    if len(set(keys)) != len(keys):
        raise InvalidTransaction("a federation member key appears twice")
    return bytes((len(keys),)) + b"".join(keys)


def decode_members(raw: bytes) -> tuple[bytes, ...]:
    """Strict inverse of encode_members (the layout only: the keys were checked when genesis wrote them)."""
    if not raw or not 1 <= raw[0] <= MAX_MEMBERS or len(raw) != 1 + 32 * raw[0]:
        raise DecodeError(f"federation members value of {len(raw)} bytes does not match its count")
    return tuple(raw[1 + 32 * i:33 + 32 * i] for i in range(raw[0]))


def is_member(view: StateView, key: bytes) -> bool:
    """Is key one of the federation members' keys in the state?"""
    raw = view.get(FEDERATION_MEMBERS_KEY)
    return raw is not None and key in decode_members(raw)


def check_member(view: StateView, tx: Transaction) -> int:
    """For fee-less system types: the sender is a federation member, the fee is 0 and the nonce is at least the
    next of the sender's own account (each member counts its own nonces, so two members' system transactions never
    compete for one nonce). Gaps are allowed, replays are not (the account's nonce becomes this one + 1): a duty
    refused as a duplicate leaves its nonce unused, and the member's next system transaction in the same block
    must still apply. Writes nothing; returns the sender's balance. A rule calls it before its other checks (so a
    non-member hears Unauthorized, not why its transaction would be wrong) and bump_member_nonce at its first
    write."""
    if not is_member(view, tx.sender):
        raise Unauthorized(f"{tx.sender.hex()} is not a federation member")
    if tx.fee_sat != 0:
        raise InvalidTransaction(f"a {tx.type.name.lower()} transaction carries no fee")
    raw = view.get(_ACC_PREFIX + tx.sender)
    bal, nonce = ACCOUNT_LAYOUT.unpack(raw) if raw is not None else (0, 0)
    if tx.nonce < nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected at least {nonce}")
    return int(bal)


def bump_member_nonce(view: StateView, tx: Transaction) -> None:
    """check_member, then bump the sender's nonce (creating its account if needed)."""
    bal = check_member(view, tx)
    view.put(_ACC_PREFIX + tx.sender, ACCOUNT_LAYOUT.pack(bal, tx.nonce + 1))


def locked_sat(view: StateView) -> int:
    raw = view.get(LOCKED_KEY)
    return 0 if raw is None else int.from_bytes(raw, "big")


def add_locked(view: StateView, delta: int) -> None:
    """Move delta sat into (delta > 0) or out of (delta < 0) the ledger's locked money."""
    new = locked_sat(view) + delta
    if not 0 <= new <= MAX_MONEY:
        raise Overflow(f"locked money would be {new}")
    view.put(LOCKED_KEY, new.to_bytes(8, "big"))


def credit(view: StateView, pubkey: bytes, amount: int) -> None:
    """Add amount to an account's balance, creating the account if needed."""
    key = _ACC_PREFIX + pubkey
    r = view.get(key)
    bal, nonce = ACCOUNT_LAYOUT.unpack(r) if r is not None else (0, 0)
    if bal + amount > MAX_MONEY:
        raise Overflow(f"balance of {pubkey.hex()} would exceed {MAX_MONEY}")
    view.put(key, ACCOUNT_LAYOUT.pack(bal + amount, nonce))


def genesis_state(alloc: Iterable[tuple[bytes, int]], mint_authority: Optional[bytes],
                  members: Sequence[bytes] = ()) -> dict[bytes, bytes]:
    """The key/value set of block 0: allocations (counted as minted), the mint authority and the federation
    members (the authorities of the system transactions; none: no system transaction is valid)."""
    state: dict[bytes, bytes] = {}
    total = 0
    for pubkey, amount in alloc:
        if not is_valid_key(pubkey):
            raise InvalidTransaction(f"genesis allocation to invalid key {pubkey.hex()}")
        if not 0 < amount <= MAX_MONEY or account_key(pubkey) in state:
            raise InvalidTransaction(f"genesis allocation {pubkey.hex()}: bad or repeated amount {amount}")
        total += amount
        state[account_key(pubkey)] = Account(amount, 0).encode()
    if total > MAX_MONEY:
        raise Overflow(f"genesis allocations total {total} exceeds {MAX_MONEY}")
    state[SUPPLY_KEY] = Supply(total, 0, 0).encode()
    if mint_authority is not None:
        if not is_valid_key(mint_authority):
            raise InvalidTransaction("mint authority is not a valid x-only key")
        state[MINT_AUTHORITY_KEY] = mint_authority
    if members:
        state[FEDERATION_MEMBERS_KEY] = encode_members(members)
    return state
