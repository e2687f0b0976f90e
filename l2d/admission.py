"""Admission: decode and check a transaction against the committed state and the mempool, then admit it.

Also signs the node's own transactions (mints with the mint authority key; anchor updates, header relays,
peg-out updates, task coordination and FL rounds with this member's key) and admits them the same way.
Remembers recently dropped transactions so GET /api/l2/tx/{txid} can say why; re-admits the transactions of the
mempool file on start (`restore`). New transactions are refused with DiskLow (HTTP 503) while the data dir's
filesystem is below store.min_free_bytes.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from typing import Any, Callable, Optional

from coincurve import PrivateKey

from .core import tx as T
from .core.coin_tx import Mint
from .core.errors import BadSignature, DecodeError, OutOfRange, Rejected, UnknownType, UnknownVersion, WrongNetwork
from .core.hashing import H_TXID
from .core.payload import Payload
from .core.rules import apply_tx
from .core.state import Account, StateView, account_key
from .ledger import Ledger
from .mempool import Duplicate, Mempool, StaleNonce
from .mempool_file import MempoolFile
from .metrics import Metrics
from .views import ChainView

log = logging.getLogger(__name__)

DROPPED_KEPT = 10_000  # drop reasons remembered (oldest forgotten first)


class Refused(Rejected):
    """A submitted transaction refused before the mempool, with a reason code of its own."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def decode_reason(e: DecodeError) -> str:
    """Short reason code for a decoding failure."""
    if isinstance(e, WrongNetwork):
        return "wrong-network"
    if isinstance(e, UnknownVersion):
        return "unknown-version"
    if isinstance(e, UnknownType):
        return "unknown-type"
    if isinstance(e, OutOfRange):
        return "out-of-range"
    return "malformed"


def _xonly(secret: Optional[bytes]) -> Optional[bytes]:
    return None if secret is None else PrivateKey(secret).public_key_xonly.format()


class Admission:
    """The one way into the mempool. admitted(tx, from_peer) is called for every transaction admitted (the consensus
    host forwards it to the other members unless it came from one, and wakes its proposer)."""

    def __init__(self, chain: ChainView, ledger: Ledger, mempool: Mempool, metrics: Metrics, *,
                 admitted: Callable[[T.Transaction, bool], None], authority_secret: Optional[bytes],
                 member_secret: bytes, check_space: Callable[[], None] = lambda: None) -> None:
        self.chain = chain
        self.network = chain.network
        self.ledger = ledger
        self.mempool = mempool
        self.metrics = metrics
        self._admitted = admitted
        self._authority_secret = authority_secret
        self.authority_pubkey = _xonly(authority_secret)
        self._member_secret = member_secret
        self.member_pubkey = PrivateKey(member_secret).public_key_xonly.format()
        self._check_space = check_space  # raises DiskLow below store.min_free_bytes
        self._dropped: OrderedDict[bytes, str] = OrderedDict()  # txid -> reason code

    def submit(self, raw: bytes) -> bytes:
        """Admit a signed transaction to the mempool; returns its txid or raises a Rejected with .reason."""
        self.check_space()
        return self._submit(raw)

    def submit_checked(self, raw: bytes, signature_ok: bool) -> bytes:
        """submit for one transaction of a batch, whose signature was already checked on its raw bytes
        (`l2d.sigpool`: `signature_ok` is that check's answer) and whose batch passed check_space (once per batch:
        statvfs per transaction was 7 % of a daemon admitting batches). Everything else is checked here."""
        return self._submit(raw, signature_ok=signature_ok)

    def submit_from_peer(self, raw: bytes) -> bytes:
        """A transaction another member forwarded: the same checks as submit, and it is not forwarded again."""
        self.check_space()
        return self._submit(raw, from_peer=True)

    def check_space(self) -> None:
        """DiskLow (HTTP 503) while the data dir's filesystem is below store.min_free_bytes."""
        try:
            self._check_space()
        except Rejected as e:
            self._refuse(e)

    def _submit(self, raw: bytes, from_peer: bool = False, signature_ok: Optional[bool] = None) -> bytes:
        try:
            tx = T.decode(raw, self.network)
        except DecodeError as e:
            return self._refuse(Refused(decode_reason(e), str(e)))
        if signature_ok is False:
            return self._refuse(BadSignature(f"signature does not verify for sender {tx.sender.hex()}"))
        return self._admit(tx, signature_checked=signature_ok is True, from_peer=from_peer)

    def mint(self, recipient: bytes, amount_sat: int) -> bytes:
        """Sign a Mint with the authority key and admit it like any transaction; returns its txid."""
        secret, pub = self._authority_secret, self.authority_pubkey
        if not self.network.admin_mint:
            return self._refuse(Refused("unauthorized", f"minting is not allowed on {self.network.name}"))
        if secret is None or pub is None:  # chain.mint_authority_key: another member holds the secret
            return self._refuse(Refused("unauthorized", "this node does not hold the mint authority key"))
        self.check_space()
        nonce = self.mempool.next_nonce(pub, self.chain.committed_nonce(pub))
        try:
            tx = T.sign(self.network, secret, nonce, 0, Mint(recipient, amount_sat), os.urandom(32))
        except DecodeError as e:
            return self._refuse(Refused(decode_reason(e), str(e)))
        return self._admit(tx, signature_checked=True)

    def submit_as_member(self, payload: Payload, fee_sat: int = 0) -> bytes:
        """Sign a fee-less system payload (anchor update, header relay, peg-out update, task coordination, FL
        round...) with this member's key (federation.key_file) and admit it like any transaction; returns its
        txid. Every federation member's key is an authority of these types (FEDERATION_MEMBERS_KEY), each with its
        own nonces; one already done by another member (or an earlier run) is refused with DuplicateDuty
        (reason "duplicate-duty"), which the services take as "done". A member's own fee-paying transaction (the
        NetFlow prober's sessions) gives its fee."""
        self.check_space()
        pub = self.member_pubkey
        nonce = self.mempool.next_nonce(pub, self.chain.committed_nonce(pub))
        tx = T.sign(self.network, self._member_secret, nonce, fee_sat, payload, os.urandom(32))
        return self._admit(tx, signature_checked=True)

    def tx_status(self, txid: bytes) -> Optional[dict[str, Any]]:
        """committed (from the store, authoritative), pending, dropped (with reason), or None if unknown."""
        loc = self.chain.store.tx_location(txid)
        if loc is not None:
            return {"status": "committed", "height": loc[0], "index": loc[1]}
        if txid in self.mempool:
            return {"status": "pending"}
        reason = self._dropped.get(txid)
        if reason is not None:
            return {"status": "dropped", "reason": reason}
        return None

    def remember(self, txid: bytes, reason: Optional[str]) -> None:
        """Note a transaction admitted (reason None: forget an earlier drop) or dropped (with its reason code)."""
        if reason is None:
            self._dropped.pop(txid, None)
            return
        self._dropped[txid] = reason
        self._dropped.move_to_end(txid)
        while len(self._dropped) > DROPPED_KEPT:
            self._dropped.popitem(last=False)

    def saved(self) -> MempoolFile:
        """What the mempool file keeps: the pending transactions in order of admission and the drop reasons."""
        return MempoolFile(tuple(t.raw for t in self.mempool), tuple(self._dropped.items()))

    def restore(self, saved: MempoolFile) -> tuple[int, int]:
        """Re-admit the transactions of a mempool file, each through the checks of `submit` against the committed
        state (not the free-space check: they were accepted before); those that no longer apply are recorded as
        dropped with their reason code. Returns (re-admitted, dropped now)."""
        for txid, reason in saved.dropped:
            self.remember(txid, reason)
        admitted = 0
        for raw in saved.txs:
            try:
                self._submit(raw)
            except Rejected as e:
                self.remember(H_TXID(raw), e.reason)
            else:
                admitted += 1
        return admitted, len(saved.txs) - admitted

    def _refuse(self, e: Rejected) -> bytes:
        self.metrics.txs_rejected.inc(stage="admission", reason=e.reason)
        log.debug("transaction refused", extra={"reason": e.reason, "detail": str(e)})
        raise e

    def _admit(self, tx: T.Transaction, *, signature_checked: bool, from_peer: bool = False) -> bytes:
        try:
            if tx.txid in self.mempool:  # before the balance check, which would count it twice
                raise Duplicate(f"transaction {tx.txid.hex()} is already pending")
            if not signature_checked:
                T.check_signature(tx)
            committed = self._precheck(tx)
            txid = self.mempool.add(tx, committed)
        except Rejected as e:
            return self._refuse(e)
        self.metrics.txs_accepted.inc()
        self.remember(txid, None)
        self._admitted(tx, from_peer)
        return txid

    def _precheck(self, tx: T.Transaction) -> Optional[int]:
        """Cheap checks against the committed state as the sender's pending transactions leave it.

        Runs the consensus state transition on a throwaway view in which the sender's account has the
        committed balance minus what its pending transactions spend, and the nonce this tx carries; so every
        rule (authority, fee floor, balance, recipient, self-transfer) is the consensus one. Returns the
        committed nonce, None if the sender has no account.
        """
        skey = account_key(tx.sender)
        with self.chain.store.reader() as r:  # one read transaction for every record the checks read
            raw = r.get_state(skey)
            acc = None if raw is None else Account.decode(raw)
            committed = None if acc is None else acc.nonce
            if tx.nonce < (committed or 0):
                raise StaleNonce(f"nonce {tx.nonce} is below the committed nonce {committed} of {tx.sender.hex()}")
            spent = self.mempool.spent_of(tx.sender, tx.nonce)
            tip = self.chain.tip
            view = StateView(r.get_state, tip.height + 1, tip.hash)
            if acc is not None or tx.nonce > 0:  # nonce > 0: the sender's pending transactions create its account
                balance = acc.balance_sat if acc is not None else 0
                view.put(skey, Account(max(balance - spent, 0), tx.nonce).encode())
            apply_tx(view, tx, self.ledger.rules, signature_checked=True)
        return committed
