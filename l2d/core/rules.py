"""The state transition function: one static table from transaction type to its rule, and apply_tx.

apply_tx(view, tx, rules) either records the transaction's writes in view or raises a Rejected subclass having
written nothing: every rule runs all its checks before its first write.
"""
from __future__ import annotations

from typing import Mapping, Protocol

from . import coin, fl, model, pegs, plans, relay, session, work
from .errors import BadNonce, ForeignNetwork, InvalidTransaction
from .payload import TxType
from .state import Rules, StateView
from .tx import Transaction, check_signature

_MAX_NONCE = 2**64 - 1  # an account's nonce is a u64; the last value can never be followed


class Rule(Protocol):
    def __call__(self, view: StateView, tx: Transaction, rules: Rules) -> None: ...


# Every transaction type and its rule (a test checks that no TxType is missing).
RULES: Mapping[int, Rule] = {
    TxType.TRANSFER: coin.apply_transfer,
    TxType.MINT: coin.apply_mint,
    TxType.BURN: pegs.apply_burn,
    TxType.ANCHOR: plans.apply_anchor_update,
    TxType.PEGIN_CLAIM: pegs.apply_pegin_claim,
    TxType.FEDERATION_FUND: pegs.apply_federation_fund,
    TxType.PEGOUT_UPDATE: plans.apply_pegout_update,
    TxType.PEGOUT_PLAN: plans.apply_pegout_plan,
    TxType.PLAN_SIGNATURE: plans.apply_plan_signature,
    TxType.ROLL_PLAN: plans.apply_roll_plan,
    TxType.PLAN_COMPLETED: plans.apply_plan_completed,
    TxType.ANCHOR_PLAN: plans.apply_anchor_plan,
    TxType.BTC_HEADERS: pegs.apply_btc_headers,
    TxType.WORKER_REGISTER: work.apply_register,
    TxType.WORKER_HEARTBEAT: work.apply_heartbeat,
    TxType.WORKER_EXIT: work.apply_exit,
    TxType.WORKER_WITHDRAW: work.apply_withdraw,
    TxType.TASK_SUBMIT: work.apply_submit,
    TxType.TASK_ASSIGN: work.apply_assign,
    TxType.TASK_RESULT: work.apply_result,
    TxType.TASK_REASSIGN: work.apply_reassign,
    TxType.TASK_SETTLE: work.apply_settle,
    TxType.TASK_DISPUTE: work.apply_dispute,
    TxType.TASK_RESOLVE: work.apply_resolve,
    TxType.TASK_CANCEL: work.apply_cancel,
    TxType.FL_JOB_POST: fl.apply_job_post,
    TxType.FL_REGISTER: fl.apply_register,
    TxType.FL_ROUND: fl.apply_round,
    TxType.FL_FINISH: fl.apply_finish,
    TxType.FL_RECLAIM: fl.apply_reclaim,
    TxType.SESSION_OPEN: session.apply_open,
    TxType.SESSION_SETTLE: session.apply_settle,
    TxType.SESSION_CLOSE: session.apply_close,
    TxType.RELAY_REGISTER: relay.apply_register,
    TxType.RELAY_HEARTBEAT: relay.apply_heartbeat,
    TxType.RELAY_EXIT: relay.apply_exit,
    TxType.RELAY_WITHDRAW: relay.apply_withdraw,
    TxType.RELAY_WEIGHTS: relay.apply_weights,
    TxType.MODEL_REGISTER: model.apply_register,
    TxType.MODEL_SERVE: model.apply_serve,
    TxType.COMPLETION: model.apply_completion,
    TxType.COMPLETION_CHALLENGE: model.apply_challenge,
    TxType.COMPLETION_REFEREE: model.apply_referee,
}


def apply_tx(view: StateView, tx: Transaction, rules: Rules, *, signature_checked: bool = False) -> None:
    """Apply one decoded transaction to view, or raise a Rejected subclass and change nothing."""
    if tx.network_id != rules.network.id:
        raise ForeignNetwork(f"transaction is for network id {tx.network_id}, this is {rules.network.name}")
    if tx.nonce >= _MAX_NONCE:
        raise BadNonce(f"nonce {tx.nonce} leaves no next nonce")
    if not signature_checked:
        check_signature(tx)
    rule = RULES.get(tx.payload.TYPE)
    if rule is None:  # a decoded type without a rule (the table test keeps this from happening)
        raise InvalidTransaction(f"transaction type {tx.payload.TYPE!r} is not applicable")
    rule(view, tx, rules)
