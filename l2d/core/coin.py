"""The coin's own rules: transfer and mint (a burn is a peg-out request: l2d/core/pegs.py)."""
from __future__ import annotations

from typing import cast

from .coin_tx import Mint, Transfer
from .errors import BadNonce, FeeTooLow, InsufficientBalance, InvalidTransaction, Overflow, Unauthorized, UnknownSender
from .params import MAX_MONEY
from .state import ACCOUNT_LAYOUT, MINT_AUTHORITY_KEY, SUPPLY_KEY, SUPPLY_LAYOUT, Rules, StateView, account_key
from .tx import Transaction, is_valid_key

_ACCOUNT = ACCOUNT_LAYOUT
_SUPPLY = SUPPLY_LAYOUT


def apply_mint(view: StateView, tx: Transaction, rules: Rules) -> None:
    """Mint: the mint authority creates money for a recipient (networks with admin_mint only), fee 0."""
    get = view.get
    if not rules.network.admin_mint:
        raise Unauthorized(f"minting is not allowed on {rules.network.name}")
    if get(MINT_AUTHORITY_KEY) != tx.sender:
        raise Unauthorized(f"{tx.sender.hex()} is not the mint authority")
    if tx.fee_sat != 0:
        raise InvalidTransaction("a mint carries no fee")
    sender_key = account_key(tx.sender)
    raw = get(sender_key)
    bal, nonce = _ACCOUNT.unpack(raw) if raw is not None else (0, 0)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    mint = cast(Mint, tx.payload)
    recipient, amount = mint.recipient, mint.amount_sat
    if not is_valid_key(recipient):
        raise InvalidTransaction(f"recipient {recipient.hex()} is not a valid x-only key")
    sup_raw = get(SUPPLY_KEY)
    minted, burned, fees = _SUPPLY.unpack(sup_raw) if sup_raw is not None else (0, 0, 0)
    if minted + amount > MAX_MONEY:
        raise Overflow(f"minting {amount} would exceed the supply cap {MAX_MONEY}")
    if recipient == tx.sender:
        view.put(sender_key, _ACCOUNT.pack(bal + amount, nonce + 1))
    else:
        rkey = account_key(recipient)
        r = get(rkey)
        rbal, rnonce = _ACCOUNT.unpack(r) if r is not None else (0, 0)
        view.put(sender_key, _ACCOUNT.pack(bal, nonce + 1))
        view.put(rkey, _ACCOUNT.pack(rbal + amount, rnonce))
    view.put(SUPPLY_KEY, _SUPPLY.pack(minted + amount, burned, fees))


def apply_transfer(view: StateView, tx: Transaction, rules: Rules) -> None:
    """Transfer: move amount_sat from the sender to the recipient; the fee is counted in the supply record.

    The ledger's hot path: charge_sender's checks written out over the packed layouts, each record read once.
    """
    get = view.get
    sender_key = account_key(tx.sender)
    raw = get(sender_key)
    if raw is None:
        raise UnknownSender(f"no account {tx.sender.hex()}")
    bal, nonce = _ACCOUNT.unpack(raw)
    if tx.nonce != nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {nonce}")
    fee = tx.fee_sat
    if fee < rules.min_fee_sat:
        raise FeeTooLow(f"fee {fee} sat is below the floor of {rules.min_fee_sat} sat")
    transfer = cast(Transfer, tx.payload)
    amount = transfer.amount_sat
    if amount + fee > bal:
        raise InsufficientBalance(f"needs {amount + fee} sat (amount {amount} + fee {fee}), balance is {bal}")
    recipient = transfer.recipient
    if recipient == tx.sender:
        raise InvalidTransaction("transfer to oneself")
    if not is_valid_key(recipient):
        raise InvalidTransaction(f"recipient {recipient.hex()} is not a valid x-only key")
    rkey = account_key(recipient)
    r = get(rkey)
    rbal, rnonce = _ACCOUNT.unpack(r) if r is not None else (0, 0)
    if rbal + amount > MAX_MONEY:
        raise Overflow(f"recipient balance would exceed {MAX_MONEY}")
    sup_raw = get(SUPPLY_KEY)
    minted, burned, fees = _SUPPLY.unpack(sup_raw) if sup_raw is not None else (0, 0, 0)
    view.put(sender_key, _ACCOUNT.pack(bal - amount - fee, nonce + 1))
    view.put(rkey, _ACCOUNT.pack(rbal + amount, rnonce))
    view.put(SUPPLY_KEY, _SUPPLY.pack(minted, burned, fees + fee))
