"""State layout (namespaced keys, canonical values) and the state transition function.

apply_tx(view, tx, rules) either records the transaction's writes in view or raises a Rejected
subclass having written nothing: every check runs before the first write.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable, Iterable, Optional, Protocol, cast

from .errors import (BadNonce, DecodeError, FeeTooLow, ForeignNetwork, InsufficientBalance, InvalidTransaction, Overflow,
                     Unauthorized, UnknownSender)
from .params import MAX_MONEY, Network
from .tx import AnchorStatus, AnchorUpdate, Mint, Transaction, Transfer, TxType, check_signature, is_valid_key


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


def meta_key(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 32:
        raise ValueError(f"meta key name {name!r} longer than 32 bytes")
    return bytes((Namespace.META,)) + raw.ljust(32, b"\0")


def account_key(pubkey: bytes) -> bytes:
    return bytes((Namespace.ACCOUNT,)) + pubkey


def anchor_key(l2_height: int) -> bytes:
    """0x04 || l2_height as a 32-byte big-endian integer."""
    return bytes((Namespace.ANCHOR,)) + l2_height.to_bytes(32, "big")


SUPPLY_KEY = meta_key("supply")
# Money held by the ledger itself (escrowed bounties and reward pools, locked stakes): u64, absent = 0.
# Invariant: sum(balances) + fees + locked == minted - burned.
LOCKED_KEY = meta_key("locked")
MINT_AUTHORITY_KEY = meta_key("mint_authority")
ANCHOR_AUTHORITY_KEY = meta_key("anchor_authority")

_ACCOUNT = struct.Struct(">QQ")
_SUPPLY = struct.Struct(">QQQ")
_ANCHOR_VALUE = struct.Struct(">32s32s32sIB")
_ACC_PREFIX = bytes((Namespace.ACCOUNT,))
_MAX_NONCE = 2**64 - 1  # an account's nonce is a u64; the last value can never be followed


@dataclass(frozen=True, slots=True)
class Account:
    balance_sat: int
    nonce: int

    def encode(self) -> bytes:
        return _ACCOUNT.pack(self.balance_sat, self.nonce)

    @classmethod
    def decode(cls, b: bytes) -> "Account":
        if len(b) != _ACCOUNT.size:
            raise DecodeError(f"account value is {len(b)} bytes, expected {_ACCOUNT.size}")
        return cls(*_ACCOUNT.unpack(b))


@dataclass(frozen=True, slots=True)
class Supply:
    """Money created and destroyed so far. Invariant: sum(balances) + fees_sat == minted_sat - burned_sat."""

    minted_sat: int
    burned_sat: int
    fees_sat: int

    def encode(self) -> bytes:
        return _SUPPLY.pack(self.minted_sat, self.burned_sat, self.fees_sat)

    @classmethod
    def decode(cls, b: bytes) -> "Supply":
        if len(b) != _SUPPLY.size:
            raise DecodeError(f"supply value is {len(b)} bytes, expected {_SUPPLY.size}")
        return cls(*_SUPPLY.unpack(b))


@dataclass(frozen=True, slots=True)
class AnchorEntry:
    """State value under anchor_key(h): the anchored root and where its Bitcoin anchor stands (101 bytes)."""

    state_root: bytes
    btc_txid: bytes
    btc_block_hash: bytes
    btc_height: int
    status: AnchorStatus

    def encode(self) -> bytes:
        return _ANCHOR_VALUE.pack(self.state_root, self.btc_txid, self.btc_block_hash, self.btc_height, self.status)

    @classmethod
    def decode(cls, b: bytes) -> "AnchorEntry":
        if len(b) != _ANCHOR_VALUE.size:
            raise DecodeError(f"anchor value is {len(b)} bytes, expected {_ANCHOR_VALUE.size}")
        root, txid, block, height, status = _ANCHOR_VALUE.unpack(b)
        if status not in (1, 2, 3):
            raise DecodeError(f"anchor value status {status}")
        return cls(root, txid, block, height, AnchorStatus(status))


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
    state transition has: challenge windows, exit delays and timeouts are counted in blocks).
    """

    __slots__ = ("_base", "writes", "height")

    def __init__(self, base: Getter, height: int = 0) -> None:
        self._base = base
        self.writes: dict[bytes, Optional[bytes]] = {}
        self.height = height

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


class Handler(Protocol):
    def __call__(self, view: StateView, tx: Transaction, rules: Rules) -> None: ...


# The subsystems' state transitions, by transaction type (registered at the bottom of this module).
HANDLERS: dict[int, Handler] = {}


def register_handlers(handlers: dict[int, Handler]) -> None:
    for typ, fn in handlers.items():
        if typ in HANDLERS:
            raise RuntimeError(f"state transition for type {typ} registered twice")
        HANDLERS[typ] = fn


def charge_sender(view: StateView, tx: Transaction, rules: Rules, debit_sat: int) -> Account:
    """Check the sender's account (exists, nonce, fee floor, balance >= debit + fee), then write it back
    with debit + fee taken and the nonce bumped, and count the fee. Returns the account as it was.

    For handlers of fee-paying types: call it after the handler's own checks and before its own writes.
    """
    skey = _ACC_PREFIX + tx.sender
    raw = view.get(skey)
    if raw is None:
        raise UnknownSender(f"no account {tx.sender.hex()}")
    bal, nonce = _ACCOUNT.unpack(raw)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    fee = tx.fee_sat
    if fee < rules.min_fee_sat:
        raise FeeTooLow(f"fee {fee} sat is below the floor of {rules.min_fee_sat} sat")
    if debit_sat + fee > bal:
        raise InsufficientBalance(f"needs {debit_sat + fee} sat ({debit_sat} + fee {fee}), balance is {bal}")
    view.put(skey, _ACCOUNT.pack(bal - debit_sat - fee, nonce + 1))
    if fee:
        sup = Supply.decode(view.get(SUPPLY_KEY) or _SUPPLY.pack(0, 0, 0))
        view.put(SUPPLY_KEY, _SUPPLY.pack(sup.minted_sat, sup.burned_sat, sup.fees_sat + fee))
    return Account(bal, nonce)


def bump_authority_nonce(view: StateView, tx: Transaction, authority_key: bytes, what: str) -> None:
    """For fee-less authority types: check the sender is the authority stored under authority_key, the fee
    is 0 and the nonce is next, then bump the nonce (creating the account if needed)."""
    if view.get(authority_key) != tx.sender:
        raise Unauthorized(f"{tx.sender.hex()} is not the {what}")
    if tx.fee_sat != 0:
        raise InvalidTransaction(f"a {tx.type.name.lower()} transaction carries no fee")
    skey = _ACC_PREFIX + tx.sender
    raw = view.get(skey)
    bal, nonce = _ACCOUNT.unpack(raw) if raw is not None else (0, 0)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    view.put(skey, _ACCOUNT.pack(bal, nonce + 1))


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
    bal, nonce = _ACCOUNT.unpack(r) if r is not None else (0, 0)
    if bal + amount > MAX_MONEY:
        raise Overflow(f"balance of {pubkey.hex()} would exceed {MAX_MONEY}")
    view.put(key, _ACCOUNT.pack(bal + amount, nonce))


def apply_tx(view: StateView, tx: Transaction, rules: Rules, *, signature_checked: bool = False) -> None:
    """Apply one decoded transaction to view, or raise a Rejected subclass and change nothing."""
    if tx.network_id != rules.network.id:
        raise ForeignNetwork(f"transaction is for network id {tx.network_id}, this is {rules.network.name}")
    if tx.nonce >= _MAX_NONCE:
        raise BadNonce(f"nonce {tx.nonce} leaves no next nonce")
    if not signature_checked:
        check_signature(tx)
    get = view.get
    typ = tx.payload.TYPE
    sender_key = _ACC_PREFIX + tx.sender
    raw = get(sender_key)
    sup_raw = get(SUPPLY_KEY)
    minted, burned, fees = _SUPPLY.unpack(sup_raw) if sup_raw is not None else (0, 0, 0)
    fee = tx.fee_sat

    if typ == TxType.MINT:
        if not rules.network.admin_mint:
            raise Unauthorized(f"minting is not allowed on {rules.network.name}")
        if get(MINT_AUTHORITY_KEY) != tx.sender:
            raise Unauthorized(f"{tx.sender.hex()} is not the mint authority")
        if fee != 0:
            raise InvalidTransaction("a mint carries no fee")
        bal, nonce = _ACCOUNT.unpack(raw) if raw is not None else (0, 0)
        if tx.nonce != nonce:
            raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
        mint = cast(Mint, tx.payload)
        recipient, amount = mint.recipient, mint.amount_sat
        if not is_valid_key(recipient):
            raise InvalidTransaction(f"recipient {recipient.hex()} is not a valid x-only key")
        if minted + amount > MAX_MONEY:
            raise Overflow(f"minting {amount} would exceed the supply cap {MAX_MONEY}")
        if recipient == tx.sender:
            view.put(sender_key, _ACCOUNT.pack(bal + amount, nonce + 1))
        else:
            rkey = _ACC_PREFIX + recipient
            r = get(rkey)
            rbal, rnonce = _ACCOUNT.unpack(r) if r is not None else (0, 0)
            view.put(sender_key, _ACCOUNT.pack(bal, nonce + 1))
            view.put(rkey, _ACCOUNT.pack(rbal + amount, rnonce))
        view.put(SUPPLY_KEY, _SUPPLY.pack(minted + amount, burned, fees))
        return

    if typ == TxType.ANCHOR:
        _apply_anchor(view, tx, raw, sender_key)
        return
    handler = HANDLERS.get(typ)
    if handler is not None:
        handler(view, tx, rules)
        return
    if typ != TxType.TRANSFER:  # a decoded type without a state transition
        raise InvalidTransaction(f"transaction type {typ!r} is not applicable")

    if raw is None:
        raise UnknownSender(f"no account {tx.sender.hex()}")
    bal, nonce = _ACCOUNT.unpack(raw)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    if fee < rules.min_fee_sat:
        raise FeeTooLow(f"fee {fee} sat is below the floor of {rules.min_fee_sat} sat")
    amount = tx.payload.debit_sat()
    if amount + fee > bal:
        raise InsufficientBalance(f"needs {amount + fee} sat (amount {amount} + fee {fee}), balance is {bal}")

    recipient = cast(Transfer, tx.payload).recipient
    if recipient == tx.sender:
        raise InvalidTransaction("transfer to oneself")
    if not is_valid_key(recipient):
        raise InvalidTransaction(f"recipient {recipient.hex()} is not a valid x-only key")
    rkey = _ACC_PREFIX + recipient
    r = get(rkey)
    rbal, rnonce = _ACCOUNT.unpack(r) if r is not None else (0, 0)
    if rbal + amount > MAX_MONEY:
        raise Overflow(f"recipient balance would exceed {MAX_MONEY}")
    view.put(sender_key, _ACCOUNT.pack(bal - amount - fee, nonce + 1))
    view.put(rkey, _ACCOUNT.pack(rbal + amount, rnonce))
    view.put(SUPPLY_KEY, _SUPPLY.pack(minted, burned, fees + fee))


def _apply_anchor(view: StateView, tx: Transaction, raw: Optional[bytes], sender_key: bytes) -> None:
    """AnchorUpdate: the anchor authority records (or moves) the Bitcoin anchor of one L2 height."""
    get = view.get
    if get(ANCHOR_AUTHORITY_KEY) != tx.sender:
        raise Unauthorized(f"{tx.sender.hex()} is not the anchor authority")
    if tx.fee_sat != 0:
        raise InvalidTransaction("an anchor update carries no fee")
    bal, nonce = _ACCOUNT.unpack(raw) if raw is not None else (0, 0)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    p = cast(AnchorUpdate, tx.payload)
    entry = AnchorEntry(p.state_root, p.btc_txid, p.btc_block_hash, p.btc_height, p.status)
    view.put(sender_key, _ACCOUNT.pack(bal, nonce + 1))
    view.put(anchor_key(p.l2_height), entry.encode())


def genesis_state(alloc: Iterable[tuple[bytes, int]], mint_authority: Optional[bytes],
                  anchor_authority: Optional[bytes] = None) -> dict[bytes, bytes]:
    """The key/value set of block 0: allocations (counted as minted), the mint and the anchor authority."""
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
    if anchor_authority is not None:
        if not is_valid_key(anchor_authority):
            raise InvalidTransaction("anchor authority is not a valid x-only key")
        state[ANCHOR_AUTHORITY_KEY] = anchor_authority
    return state


# The subsystems' state transitions import the names above; they register themselves when imported here.
from . import pegs  # noqa: E402,F401
from . import work  # noqa: E402,F401
from . import fl  # noqa: E402,F401
