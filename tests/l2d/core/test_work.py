"""Orchestration state transitions: worker registry and task lifecycle on a dict-backed ledger.

Every rejection is a typed error that leaves the view (and the committed state) untouched; every accepted
transaction keeps sum(balances) + fees + locked == minted - burned.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Optional, cast

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.coin_tx import Transfer
from l2d.core.errors import (BadNonce, DuplicateDuty, InsufficientBalance, InvalidTransaction, Rejected, Unauthorized,
                             UnknownSender)
from l2d.core.params import LOCAL
from l2d.core.payload import Payload
from l2d.core.rules import apply_tx
from l2d.core.state import (SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key, genesis_state,
                            locked_sat)
from l2d.core.tx import Transaction, sign
from l2d.core.work import (EXIT_DELAY_BLOCKS, INITIAL_REPUTATION_PPM, Outcome, TaskPhase, TaskRecord, TaskStatus,
                           WorkerRecord, WorkerStatus, get_task, get_worker, task_key, worker_key)
from l2d.core.work_tx import (FP_ENTRY, ZERO_KEY, Role, TaskAssign, TaskCancel, TaskDispute, TaskReassign, TaskResolve,
                              TaskResult, TaskSettle, TaskSubmit, WorkerCaps, WorkerExit, WorkerHeartbeat,
                              WorkerRegister, WorkerWithdraw)

FEE = 2
RULES = Rules(LOCAL, FEE)
FUNDS = 1_000_000
STAKE = 10_000
BOUNTY = 1_000
IMAGES = bytes(range(17)) * 3 + bytes(13)  # 64 bytes: one image


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


AUTH, AUTH2 = 0, 8  # the federation members (the authorities of the coordinator types)
CLIENT = 9
W1, W2, W3, W4 = 1, 2, 3, 4


def fp(classes: bytes, shift: int = 0) -> bytes:
    return b"".join(FP_ENTRY.pack((c + j) % 10, q + shift) for c in classes for j, q in enumerate((900, 400, 50)))


def caps(region: bytes = b"eu", price: int = 10, models: tuple[bytes, ...] = (b"digits-mlp",)) -> WorkerCaps:
    return WorkerCaps(0, 0, price, 500_000, 100, 2, region, models, b"127.0.0.1:1")


class Chain:
    """A ledger in a dict: each apply is one block (height + 1), writes committed on success."""

    def __init__(self) -> None:
        self.state = genesis_state([(pk(n), FUNDS) for n in (W1, W2, W3, W4, CLIENT, 5)], None, (pk(AUTH), pk(AUTH2)))
        self.height = 1

    def nonce(self, n: int) -> int:
        raw = self.state.get(account_key(pk(n)))
        return 0 if raw is None else Account.decode(raw).nonce

    def tx(self, n: int, payload: Payload, nonce: Optional[int] = None, fee: Optional[int] = None) -> Transaction:
        return sign(LOCAL, secret(n), self.nonce(n) if nonce is None else nonce,
                    (0 if payload.FEELESS else FEE) if fee is None else fee, payload, b"\0" * 32)

    def apply(self, n: int, payload: Payload, **kw: Any) -> Transaction:
        t = self.tx(n, payload, **kw)
        view = StateView(self.state.get, self.height)
        apply_tx(view, t, RULES)
        for k, v in view.writes.items():
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v
        self.height += 1
        check_supply(self.state)
        return t

    def reject(self, exc: type[Rejected], n: int, payload: Payload, match: Optional[str] = None, **kw: Any) -> None:
        """apply must raise exactly exc and write nothing (checked on a view that already holds a write)."""
        t = self.tx(n, payload, **kw)
        frozen = dict(self.state)
        view = StateView(self.state.get, self.height)
        apply_tx(view, self.tx(5, Transfer(pk(CLIENT), 1)), RULES)
        before = dict(view.writes)
        with pytest.raises(exc, match=match) as info:
            apply_tx(view, t, RULES)
        assert type(info.value) is exc
        assert view.writes == before
        assert self.state == frozen

    def mine(self, blocks: int) -> None:
        for _ in range(blocks):
            self.apply(5, Transfer(pk(CLIENT), 1))

    def worker(self, n: int) -> WorkerRecord:
        w = get_worker(StateView(self.state.get), pk(n))
        assert w is not None
        return w

    def task(self, tid: bytes) -> TaskRecord:
        t = get_task(StateView(self.state.get), tid)
        assert t is not None
        return t

    def balance(self, n: int) -> int:
        raw = self.state.get(account_key(pk(n)))
        return 0 if raw is None else Account.decode(raw).balance_sat

    def register(self, *ns: int, **kw: Any) -> None:
        for n in ns:
            self.apply(n, WorkerRegister(STAKE, caps(**kw)))

    def submit(self, bounty: int = BOUNTY, images: bytes = IMAGES, **kw: Any) -> bytes:
        spec = dict(min_reputation_ppm=0, max_price_sat=0, model=b"digits-mlp", region=b"")
        spec.update(kw)
        return self.apply(CLIENT, TaskSubmit(bounty, input=images, **spec)).txid  # type: ignore[arg-type]

    def assign(self, tid: bytes, worker: int, backup: Optional[int] = None, verifier: Optional[int] = None,
               deadline: int = 10, window: int = 2) -> None:
        key = lambda n: ZERO_KEY if n is None else pk(n)  # noqa: E731
        self.apply(AUTH, TaskAssign(tid, pk(worker), key(backup), key(verifier), self.height + deadline, window))


def check_supply(state: dict[bytes, bytes]) -> None:
    sup = Supply.decode(state[SUPPLY_KEY])
    balances = sum(Account.decode(v).balance_sat for k, v in state.items() if k[0] == Namespace.ACCOUNT)
    assert balances + sup.fees_sat + locked_sat(StateView(state.get)) == sup.minted_sat - sup.burned_sat
    stakes = sum(WorkerRecord.decode(v).stake_sat for k, v in state.items() if k[0] == Namespace.WORKER)
    escrow = sum(TaskRecord.decode(v).bounty_sat for k, v in state.items() if k[0] == Namespace.TASK
                 and TaskRecord.decode(v).status not in (TaskStatus.SETTLED, TaskStatus.CANCELLED))
    assert locked_sat(StateView(state.get)) == stakes + escrow


@pytest.fixture
def chain() -> Chain:
    return Chain()


# -- registry ------------------------------------------------------------------------------------------------------
def test_register_locks_the_stake(chain: Chain) -> None:
    chain.register(W1)
    w = chain.worker(W1)
    assert (w.status, w.stake_sat, w.reputation_ppm, w.caps.region) == (WorkerStatus.ACTIVE, STAKE,
                                                                        INITIAL_REPUTATION_PPM, b"eu")
    assert chain.balance(W1) == FUNDS - STAKE - FEE
    assert locked_sat(StateView(chain.state.get)) == STAKE


def test_registration_rejections_change_nothing(chain: Chain) -> None:
    chain.register(W1)
    chain.reject(InvalidTransaction, W1, WorkerRegister(STAKE, caps()), "already registered")
    chain.reject(InsufficientBalance, W2, WorkerRegister(FUNDS, caps()))
    chain.reject(UnknownSender, 7, WorkerRegister(STAKE, caps()))
    chain.reject(BadNonce, W2, WorkerRegister(STAKE, caps()), nonce=5)


def test_heartbeat_records_the_height(chain: Chain) -> None:
    chain.register(W1)
    chain.mine(3)
    h = chain.height
    chain.apply(W1, WorkerHeartbeat())
    assert chain.worker(W1).last_heartbeat == h
    chain.reject(InvalidTransaction, W2, WorkerHeartbeat(), "not a registered worker")


def test_exit_then_withdraw_after_the_delay(chain: Chain) -> None:
    chain.register(W1)
    chain.reject(InvalidTransaction, W1, WorkerWithdraw(), "only an exited worker")
    chain.apply(W1, WorkerExit())
    assert chain.worker(W1).status == WorkerStatus.EXITING
    chain.reject(InvalidTransaction, W1, WorkerExit(), "not ACTIVE")
    chain.reject(InvalidTransaction, W1, WorkerWithdraw(), "locked until")
    chain.mine(EXIT_DELAY_BLOCKS)
    before = chain.balance(W1)
    chain.apply(W1, WorkerWithdraw())
    assert chain.balance(W1) == before + STAKE - FEE
    assert chain.worker(W1).status == WorkerStatus.WITHDRAWN and chain.worker(W1).stake_sat == 0
    assert locked_sat(StateView(chain.state.get)) == 0
    chain.reject(InvalidTransaction, W1, WorkerWithdraw())
    chain.reject(InvalidTransaction, W1, WorkerHeartbeat(), "withdrawn")


def test_an_exiting_worker_with_an_open_task_cannot_withdraw(chain: Chain) -> None:
    chain.register(W1)
    tid = chain.submit()
    chain.assign(tid, W1)
    chain.apply(W1, WorkerExit())
    chain.mine(EXIT_DELAY_BLOCKS)
    chain.reject(InvalidTransaction, W1, WorkerWithdraw(), "unsettled")
    # and an exiting worker is never given a new task
    tid2 = chain.submit()
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid2, pk(W1), ZERO_KEY, ZERO_KEY, chain.height + 5, 1),
                 "EXITING")


# -- tasks -----------------------------------------------------------------------------------------------------------
def test_submit_escrows_the_bounty_and_unfunded_bounties_are_refused(chain: Chain) -> None:
    tid = chain.submit()
    t = chain.task(tid)
    assert (t.status, t.bounty_sat, t.submitter) == (TaskStatus.SUBMITTED, BOUNTY, pk(CLIENT))
    assert chain.balance(CLIENT) == FUNDS - BOUNTY - FEE
    chain.reject(InsufficientBalance, CLIENT, TaskSubmit(FUNDS, 0, 0, b"digits-mlp", b"", IMAGES))
    chain.reject(UnknownSender, 7, TaskSubmit(1, 0, 0, b"digits-mlp", b"", IMAGES))


def test_happy_path_settles_after_the_window_with_the_configured_split(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    tid = chain.submit()
    chain.assign(tid, W1, W2, W3, window=3)
    t = chain.task(tid)
    assert (t.status, t.worker, t.backup, t.verifier) == (TaskStatus.ASSIGNED, pk(W1), pk(W2), pk(W3))
    assert chain.worker(W1).active_tasks == 1 and chain.worker(W2).active_tasks == 0
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    assert chain.task(tid).status == TaskStatus.ASSIGNED  # the verifier's result is still due
    chain.reject(InvalidTransaction, W1, TaskResult(tid, b"\3", fp(b"\3")), "already in")  # replayed result
    chain.apply(W3, TaskResult(tid, b"\3", fp(b"\3", 5)))  # within the tolerance
    t = chain.task(tid)
    assert t.status == TaskStatus.RESULT_SUBMITTED
    settle = TaskSettle(tid, 800, 100, 100)
    chain.reject(InvalidTransaction, AUTH, settle, "window open")
    chain.mine(2)
    chain.reject(InvalidTransaction, AUTH, TaskSettle(tid, 800, 100, 99), "sum to")
    chain.reject(Unauthorized, W2, settle)
    b1, b3, ba = chain.balance(W1), chain.balance(W3), chain.balance(AUTH)
    chain.apply(AUTH, settle)
    assert (chain.balance(W1) - b1, chain.balance(W3) - b3, chain.balance(AUTH) - ba) == (800, 100, 100)
    t = chain.task(tid)
    assert (t.status, t.outcome) == (TaskStatus.SETTLED, Outcome.PAID)
    assert chain.worker(W1).tasks_done == 1 and chain.worker(W1).active_tasks == 0
    assert chain.worker(W1).reputation_ppm > INITIAL_REPUTATION_PPM
    chain.reject(DuplicateDuty, AUTH, settle, "settled already")  # settles once


def test_a_task_says_what_it_waits_for_and_the_window_ends_where_settle_is_first_accepted(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    tid = chain.submit()
    assert (chain.task(tid).phase(), chain.task(tid).window_ends_height) == (TaskPhase.ASSIGNMENT, None)
    chain.assign(tid, W1, W2, W3, window=4)
    assert (chain.task(tid).phase(), chain.task(tid).window_ends_height) == (TaskPhase.RESULTS, None)
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    chain.apply(W3, TaskResult(tid, b"\3", fp(b"\3")))
    t = chain.task(tid)
    # every result is in: nothing is due from anyone, yet the task is not stuck, it waits for the window
    assert (t.status, t.waiting_for(), t.phase()) == (TaskStatus.RESULT_SUBMITTED, [], TaskPhase.CHALLENGE_WINDOW)
    ends = t.window_ends_height
    assert ends == t.result_height + 4 and ends > chain.height
    settle = TaskSettle(tid, 800, 100, 100)
    while chain.height < ends - 1:
        chain.mine(1)
    chain.reject(InvalidTransaction, AUTH, settle, f"open until height {ends}")  # one block early
    chain.mine(1)
    assert chain.height == ends
    chain.apply(AUTH, settle)  # the first height it is accepted at
    t = chain.task(tid)
    assert (t.phase(), t.window_ends_height) == (TaskPhase.DONE, ends)


def test_a_disagreement_is_waiting_for_a_dispute_then_its_referee_then_its_resolution(chain: Chain) -> None:
    chain.register(W1, W2, W3, W4)
    tid = chain.submit()
    chain.assign(tid, W1, W2, W3, window=5)
    chain.apply(W1, TaskResult(tid, b"\7", fp(b"\7")))
    chain.apply(W3, TaskResult(tid, b"\3", fp(b"\3")))
    assert (chain.task(tid).phase(), chain.task(tid).waiting_for()) == (TaskPhase.DISPUTE, [])
    chain.apply(AUTH, TaskDispute(tid, pk(W4), chain.height + 9))
    assert (chain.task(tid).phase(), chain.task(tid).window_ends_height) == (TaskPhase.REFEREE, None)
    chain.apply(W4, TaskResult(tid, b"\3", fp(b"\3")))
    assert chain.task(tid).phase() == TaskPhase.RESOLUTION
    chain.apply(AUTH, TaskResolve(tid, Role.WORKER, 4000, 1000, 0, 500, 300, 200))
    assert (chain.task(tid).phase(), chain.task(tid).window_ends_height) == (TaskPhase.DONE, None)


def test_a_cancelled_task_waits_for_nothing(chain: Chain) -> None:
    tid = chain.submit()
    chain.apply(CLIENT, TaskCancel(tid))
    assert (chain.task(tid).phase(), chain.task(tid).window_ends_height) == (TaskPhase.DONE, None)


def test_results_only_from_assigned_workers_and_of_the_right_size(chain: Chain) -> None:
    chain.register(W1, W2, W4)
    tid = chain.submit(images=IMAGES * 2)
    chain.reject(InvalidTransaction, W1, TaskResult(tid, b"\3\4", fp(b"\3\4")), "not assigned")
    chain.assign(tid, W1, W2)
    chain.reject(InvalidTransaction, W2, TaskResult(tid, b"\3\4", fp(b"\3\4")), "not assigned")  # backup
    chain.reject(InvalidTransaction, W4, TaskResult(tid, b"\3\4", fp(b"\3\4")), "not assigned")
    chain.reject(InvalidTransaction, W1, TaskResult(tid, b"\3", fp(b"\3")), "2 input images")
    chain.reject(InvalidTransaction, W1, TaskResult(b"\1" * 32, b"\3", fp(b"\3")), "no task")
    chain.apply(W1, TaskResult(tid, b"\3\4", fp(b"\3\4")))
    chain.reject(InvalidTransaction, W1, TaskResult(tid, b"\3\4", fp(b"\3\4")), "expects no result")


def test_assignment_rejections(chain: Chain) -> None:
    chain.register(W1, W2)
    chain.register(W3, region=b"us", price=50)
    tid = chain.submit(region=b"eu", max_price_sat=20)
    h = chain.height
    chain.reject(Unauthorized, W1, TaskAssign(tid, pk(W1), ZERO_KEY, ZERO_KEY, h + 5, 1), fee=0)
    chain.reject(InvalidTransaction, AUTH, TaskAssign(b"\1" * 32, pk(W1), ZERO_KEY, ZERO_KEY, h + 5, 1), "no task")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid, pk(W4), ZERO_KEY, ZERO_KEY, h + 5, 1), "not a registered")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid, pk(W3), ZERO_KEY, ZERO_KEY, h + 5, 1), "price")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid, pk(W1), pk(W3), ZERO_KEY, h + 5, 1), "price")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid, pk(W1), ZERO_KEY, ZERO_KEY, h, 1), "deadline")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid, pk(W1), ZERO_KEY, ZERO_KEY, h + 5, 10**6), "window")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid, pk(W1), ZERO_KEY, ZERO_KEY, h + 5, 1), fee=1)
    tid2 = chain.submit(model=b"resnet")
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid2, pk(W1), ZERO_KEY, ZERO_KEY, h + 5, 1), "model")
    tid3 = chain.submit(min_reputation_ppm=600_000)
    chain.reject(InvalidTransaction, AUTH, TaskAssign(tid3, pk(W1), ZERO_KEY, ZERO_KEY, h + 5, 1), "reputation")
    chain.assign(tid, W1, W2)
    chain.reject(DuplicateDuty, AUTH, TaskAssign(tid, pk(W2), ZERO_KEY, ZERO_KEY, h + 9, 1), "assigned already")


def test_cancel_refunds_only_an_unassigned_task_to_its_submitter(chain: Chain) -> None:
    chain.register(W1)
    tid = chain.submit()
    chain.reject(InvalidTransaction, W1, TaskCancel(tid), "submitter")
    before = chain.balance(CLIENT)
    chain.apply(CLIENT, TaskCancel(tid))
    assert chain.balance(CLIENT) == before + BOUNTY - FEE
    assert chain.task(tid).status == TaskStatus.CANCELLED
    chain.reject(InvalidTransaction, CLIENT, TaskCancel(tid), "CANCELLED")
    tid2 = chain.submit()
    chain.assign(tid2, W1)
    chain.reject(InvalidTransaction, CLIENT, TaskCancel(tid2), "ASSIGNED")


def test_timeout_fails_over_to_the_backup_and_the_task_settles_once(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    tid = chain.submit()
    chain.assign(tid, W1, W2, deadline=3, window=0)
    deadline = chain.task(tid).deadline_height
    re = TaskReassign(tid, Role.WORKER, pk(W2), pk(W3), deadline + 20)
    chain.reject(InvalidTransaction, AUTH, re, "has not passed")
    chain.mine(deadline - chain.height + 1)
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.WORKER, pk(W3), ZERO_KEY, deadline + 20),
                 "recorded backup")
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.VERIFIER, pk(W3), ZERO_KEY, deadline + 20),
                 "not waiting")
    rep = chain.worker(W1).reputation_ppm
    chain.apply(AUTH, re)
    t = chain.task(tid)
    assert (t.worker, t.backup, t.timeouts) == (pk(W2), pk(W3), 1)
    chain.reject(DuplicateDuty, AUTH2, re, "is .* already")  # the other member's copy of the same hand-over
    w1 = chain.worker(W1)
    assert (w1.active_tasks, w1.tasks_failed, w1.reputation_ppm) == (0, 1, rep - rep // 8)
    chain.reject(InvalidTransaction, W1, TaskResult(tid, b"\3", fp(b"\3")), "not assigned")  # too late
    chain.apply(W2, TaskResult(tid, b"\3", fp(b"\3")))
    chain.apply(AUTH, TaskSettle(tid, BOUNTY, 0, 0))
    chain.reject(DuplicateDuty, AUTH, TaskSettle(tid, BOUNTY, 0, 0), "settled already")
    chain.reject(InvalidTransaction, AUTH, re, "not waiting")


def test_verifier_and_referee_roles_can_be_handed_on(chain: Chain) -> None:
    chain.register(W1, W2, W3, W4)
    tid = chain.submit()
    chain.assign(tid, W1, W2, W3, deadline=2, window=0)
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    chain.mine(2)
    h = chain.height
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.VERIFIER, pk(W2), ZERO_KEY, h + 9), "already has")
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.VERIFIER, pk(W1), ZERO_KEY, h + 9), "already has")
    chain.apply(AUTH, TaskReassign(tid, Role.VERIFIER, pk(W4), ZERO_KEY, h + 9))
    assert chain.task(tid).verifier == pk(W4) and chain.worker(W3).active_tasks == 0
    chain.apply(W4, TaskResult(tid, b"\5", fp(b"\5")))
    assert chain.task(tid).status == TaskStatus.RESULT_SUBMITTED
    chain.reject(InvalidTransaction, AUTH, TaskSettle(tid, BOUNTY, 0, 0), "dispute")


def _disputed(chain: Chain, worker_out: bytes, verifier_out: bytes) -> bytes:
    chain.register(W1, W2, W3, W4)
    tid = chain.submit()
    chain.assign(tid, W1, W2, W3, window=5)
    chain.apply(W1, TaskResult(tid, worker_out, fp(worker_out)))
    chain.apply(W3, TaskResult(tid, verifier_out, fp(verifier_out)))
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid, pk(W1), chain.height + 9), "third worker")
    chain.apply(AUTH, TaskDispute(tid, pk(W4), chain.height + 9))
    assert chain.task(tid).status == TaskStatus.DISPUTED
    assert chain.worker(W4).active_tasks == 1
    return tid


def test_a_cheating_worker_is_slashed_share_to_the_challenger_rest_burned(chain: Chain) -> None:
    tid = _disputed(chain, b"\7", b"\3")
    resolve = TaskResolve(tid, Role.WORKER, 4000, 1000, 0, 500, 300, 200)
    chain.reject(InvalidTransaction, AUTH, resolve, "no referee result")
    chain.reject(InvalidTransaction, W1, TaskResult(tid, b"\3", fp(b"\3")), "expects no result")
    chain.apply(W4, TaskResult(tid, b"\3", fp(b"\3")))
    chain.reject(InvalidTransaction, AUTH, TaskResolve(tid, Role.VERIFIER, 4000, 1000, 500, 0, 300, 200),
                 "does not show")
    chain.reject(InvalidTransaction, AUTH, replace(resolve, slash_sat=STAKE + 1, challenger_sat=0), "exceeds")
    chain.reject(InvalidTransaction, AUTH, replace(resolve, treasury_sat=0), "sum to")
    burned = Supply.decode(chain.state[SUPPLY_KEY]).burned_sat
    b3, b4 = chain.balance(W3), chain.balance(W4)
    chain.apply(AUTH, resolve)
    assert Supply.decode(chain.state[SUPPLY_KEY]).burned_sat == burned + 3000
    assert chain.balance(W3) - b3 == 500 + 1000 and chain.balance(W4) - b4 == 300
    w1 = chain.worker(W1)
    assert (w1.stake_sat, w1.slashes, w1.active_tasks) == (STAKE - 4000, 1, 0)
    assert w1.reputation_ppm == INITIAL_REPUTATION_PPM // 4
    t = chain.task(tid)
    assert (t.status, t.outcome) == (TaskStatus.SETTLED, Outcome.WORKER_SLASHED)
    assert all(chain.worker(n).active_tasks == 0 for n in (W1, W2, W3, W4))
    chain.reject(DuplicateDuty, AUTH, resolve, "settled already")


def test_a_lying_verifier_is_slashed(chain: Chain) -> None:
    tid = _disputed(chain, b"\3", b"\7")
    chain.apply(W4, TaskResult(tid, b"\3", fp(b"\3")))
    chain.apply(AUTH, TaskResolve(tid, Role.VERIFIER, 1000, 0, 700, 0, 200, 100))
    assert chain.worker(W3).slashes == 1 and chain.worker(W3).stake_sat == STAKE - 1000
    assert chain.task(tid).outcome == Outcome.VERIFIER_SLASHED


def test_dispute_needs_a_real_disagreement(chain: Chain) -> None:
    chain.register(W1, W2, W3, W4)
    tid = chain.submit()
    chain.assign(tid, W1, W2, W3)
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid, pk(W4), chain.height + 9), "ASSIGNED")
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    chain.apply(W3, TaskResult(tid, b"\3", fp(b"\3")))
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid, pk(W4), chain.height + 9), "agree")


def test_slashing_lowers_reputation_for_good(chain: Chain) -> None:
    tid = _disputed(chain, b"\7", b"\3")
    chain.apply(W4, TaskResult(tid, b"\3", fp(b"\3")))
    chain.apply(AUTH, TaskResolve(tid, Role.WORKER, 100, 0, 0, BOUNTY, 0, 0))
    for _ in range(40):  # a long honest history afterwards
        t = chain.submit(bounty=10)
        chain.assign(t, W1, window=0)
        chain.apply(W1, TaskResult(t, b"\3", fp(b"\3")))
        chain.apply(AUTH, TaskSettle(t, 10, 0, 0))
    w = chain.worker(W1)
    assert w.tasks_done == 40 and w.reputation_ppm <= 1_000_000 // 2


# -- invariant ---------------------------------------------------------------------------------------------------------
# Lifecycle steps (5..12) drawn more often than registry churn (0..3), submissions and cancels (4, 13).
OPS = st.lists(st.tuples(st.sampled_from([0, 1, 2, 3, 4, 13] + list(range(5, 13)) * 3), st.integers(1, 4),
                         st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=40)


def _op(chain: Chain, op: int, a: int, b: int, c: int, tasks: list[bytes]) -> tuple[int, Payload]:
    """One operation. Lifecycle ops (op >= 5) take the oldest open task one natural step further, with
    parameters read off the state; c == 0 perturbs the step (another sender), so rejections are mixed in."""
    out = bytes([3 + b % 2])  # two possible answers: about half the audits disagree
    if op == 0:
        return a, WorkerRegister(STAKE * b, caps())
    if op == 1:
        return a, WorkerHeartbeat()
    if op == 2:
        return a, WorkerExit()
    if op == 3:
        chain.mine(c * 40)
        return a, WorkerWithdraw()
    if op == 4:
        return CLIENT, TaskSubmit(100 * b, 0, 0, b"digits-mlp", b"", IMAGES)
    view = StateView(chain.state.get)
    open_ = [x for x in tasks if cast(TaskRecord, get_task(view, x)).status < TaskStatus.SETTLED]
    if op == 13 or not open_:
        return CLIENT, TaskCancel(tasks[b % len(tasks)])
    tid = open_[0]
    t = cast(TaskRecord, get_task(view, tid))
    n = {pk(i): i for i in (W1, W2, W3, W4)}
    h = chain.height
    if t.status == TaskStatus.SUBMITTED:
        return AUTH, TaskAssign(tid, pk(a), pk(a % 4 + 1), pk((a + 1) % 4 + 1) if c % 2 else ZERO_KEY, h + 3, c)
    due = t.waiting_for()
    if due and op == 8:
        chain.mine(max(t.deadline_height - h + 1, 0))
        role = due[0]
        if role == Role.WORKER:
            new = t.backup if t.backup != ZERO_KEY else pk(a)
            nb = pk(a) if pk(a) not in (t.worker, new, t.verifier, t.referee) else ZERO_KEY
            return AUTH, TaskReassign(tid, role, new, nb, chain.height + 3)
        return AUTH, TaskReassign(tid, role, pk(a), ZERO_KEY, chain.height + 3)
    if due:
        return (n[t.party(due[0])] if c else a), TaskResult(tid, out, fp(out))
    if t.status == TaskStatus.RESULT_SUBMITTED:
        if t.verifier != ZERO_KEY and t.result(Role.WORKER) != t.result(Role.VERIFIER):
            free = [k for k in n if k not in (t.worker, t.verifier)]
            return AUTH, TaskDispute(tid, free[b % len(free)], h + 3)
        chain.mine(c)
        v = min(c, t.bounty_sat) if t.verifier != ZERO_KEY else 0
        return AUTH, TaskSettle(tid, t.bounty_sat - v - (c == 3), v, int(c == 3))
    loser = Role.WORKER if t.result(Role.WORKER) != t.result(Role.REFEREE) else Role.VERIFIER
    return AUTH, TaskResolve(tid, loser, 1000 * c, 100 * c, 0, 0, t.bounty_sat, 0)


@settings(max_examples=80, deadline=None)
@given(OPS)
def test_supply_invariant_with_locked_money_holds_over_random_sequences(ops: list[tuple[int, int, int, int]]) -> None:
    chain = Chain()
    chain.register(W1, W2, W3, W4)
    tasks = [chain.submit(bounty=100 * i) for i in (1, 2, 3)]
    for op, a, b, c in ops:
        n, payload = _op(chain, op, a, b, c, tasks)
        try:
            t = chain.apply(n, payload)  # checks the invariant after every block
        except Rejected:
            chain.mine(1)
            continue
        if op == 4:
            tasks.append(t.txid)
    check_supply(chain.state)


def test_state_values_round_trip(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    tid = chain.submit()
    chain.assign(tid, W1, W2, W3)
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    raw_t, raw_w = chain.state[task_key(tid)], chain.state[worker_key(pk(W1))]
    assert TaskRecord.decode(raw_t).encode() == raw_t
    assert WorkerRecord.decode(raw_w).encode() == raw_w
    from l2d.core.errors import DecodeError
    with pytest.raises(DecodeError):
        TaskRecord.decode(raw_t + b"\0")
    with pytest.raises(DecodeError):
        WorkerRecord.decode(b"\x09" + raw_w[1:])


def test_a_task_without_backup_can_be_handed_to_any_fitting_worker(chain: Chain) -> None:
    chain.register(W1, W2)
    tid = chain.submit()
    chain.assign(tid, W1, deadline=1, window=0)
    chain.mine(2)
    chain.apply(AUTH, TaskReassign(tid, Role.WORKER, pk(W2), ZERO_KEY, chain.height + 5))
    assert chain.task(tid).worker == pk(W2)


def test_a_silent_party_can_be_replaced_before_the_deadline(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    tid = chain.submit()
    chain.apply(AUTH, TaskAssign(tid, pk(W1), pk(W2), ZERO_KEY, chain.height + 100, 0, 3))
    phase = chain.task(tid).phase_height
    re = TaskReassign(tid, Role.WORKER, pk(W2), pk(W3), chain.height + 100)
    chain.reject(InvalidTransaction, AUTH, re, "not silent")
    chain.apply(W1, WorkerHeartbeat())  # alive: the grace counts from its last heartbeat
    beat = chain.worker(W1).last_heartbeat
    assert beat > phase
    chain.mine(beat + 3 - chain.height + 1)
    assert chain.height == beat + 4
    chain.apply(AUTH, re)
    assert chain.task(tid).worker == pk(W2) and chain.task(tid).phase_height == beat + 4
    # grace 0 means only the deadline counts
    tid2 = chain.submit()
    chain.apply(AUTH, TaskAssign(tid2, pk(W3), pk(W1), ZERO_KEY, chain.height + 100, 0, 0))
    chain.mine(20)
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid2, Role.WORKER, pk(W1), ZERO_KEY, chain.height + 9),
                 "not silent")


def test_a_backup_that_exited_is_passed_over(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    tid = chain.submit()
    chain.assign(tid, W1, W2, deadline=1, window=0)
    chain.apply(W2, WorkerExit())
    chain.mine(2)
    chain.apply(AUTH, TaskReassign(tid, Role.WORKER, pk(W3), ZERO_KEY, chain.height + 5))
    assert chain.task(tid).worker == pk(W3)


def test_more_authority_rejections(chain: Chain) -> None:
    chain.register(W1, W2, W3)
    chain.register(W4, models=(b"other",))
    tid = chain.submit()
    chain.assign(tid, W1, W2, deadline=2, window=0)
    chain.mine(3)
    h = chain.height
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.WORKER, pk(W2), pk(W1), h + 5), "new backup")
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.WORKER, pk(W2), pk(W4), h + 5), "model")
    chain.reject(InvalidTransaction, AUTH, TaskReassign(tid, Role.WORKER, pk(W2), ZERO_KEY, h), "deadline")
    chain.reject(InvalidTransaction, AUTH, TaskReassign(b"\2" * 32, Role.WORKER, pk(W2), ZERO_KEY, h + 5), "no task")
    chain.apply(AUTH, TaskReassign(tid, Role.WORKER, pk(W2), ZERO_KEY, h + 5))
    chain.apply(W2, TaskResult(tid, b"\3", fp(b"\3")))
    chain.reject(InvalidTransaction, AUTH, TaskSettle(tid, 900, 100, 0), "no verifier")
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid, pk(W3), chain.height + 5), "nothing to dispute")
    # a dispute's referee must be a registered worker fitting the task, with a deadline ahead
    tid2 = chain.submit()
    chain.assign(tid2, W1, None, W2)
    chain.apply(W1, TaskResult(tid2, b"\3", fp(b"\3")))
    chain.apply(W2, TaskResult(tid2, b"\4", fp(b"\4")))
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid2, pk(W4), chain.height + 5), "model")
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid2, pk(7), chain.height + 5), "not a registered")
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid2, pk(W3), chain.height - 1), "deadline")
    chain.reject(Unauthorized, W3, TaskDispute(tid2, pk(W3), chain.height + 5), fee=0)


def test_a_referee_that_decides_nothing_is_replaced(chain: Chain) -> None:
    chain.register(5)
    tid = _disputed(chain, b"\7", b"\3")
    chain.reject(DuplicateDuty, AUTH, TaskDispute(tid, pk(5), chain.height + 9), "waiting for its referee")
    chain.apply(W4, TaskResult(tid, b"\2", fp(b"\2")))  # neither the worker's nor the verifier's answer
    chain.reject(InvalidTransaction, AUTH, TaskResolve(tid, Role.WORKER, 0, 0, 0, BOUNTY, 0, 0), "does not show")
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid, pk(W4), chain.height + 9), "previous referee")
    chain.apply(AUTH, TaskDispute(tid, pk(5), chain.height + 9))
    t = chain.task(tid)
    assert t.referee == pk(5) and t.result(Role.REFEREE) is None and t.status == TaskStatus.DISPUTED
    assert chain.worker(W4).active_tasks == 0 and chain.worker(W4).tasks_failed == 0
    chain.apply(5, TaskResult(tid, b"\3", fp(b"\3")))
    chain.reject(InvalidTransaction, AUTH, TaskDispute(tid, pk(W2), chain.height + 9), "decides")
    chain.apply(AUTH, TaskResolve(tid, Role.WORKER, 100, 0, 0, BOUNTY, 0, 0))
    assert chain.task(tid).outcome == Outcome.WORKER_SLASHED


def test_every_member_coordinates_with_its_own_nonces_and_nobody_else_does(chain: Chain) -> None:
    chain.register(W1, W2)
    tid, tid2 = chain.submit(), chain.submit()
    assign = TaskAssign(tid, pk(W1), ZERO_KEY, ZERO_KEY, chain.height + 9, 1)
    for outsider in (W1, CLIENT):  # a worker, a client: not members
        chain.reject(Unauthorized, outsider, assign, "not a federation member")
    chain.apply(AUTH2, assign)
    chain.apply(AUTH, TaskAssign(tid2, pk(W2), ZERO_KEY, ZERO_KEY, chain.height + 9, 1))
    assert chain.nonce(AUTH) == chain.nonce(AUTH2) == 1  # each member counts its own nonces
    # the other member's assignment of the same task (whichever worker its scheduler chose) is refused, typed
    chain.reject(DuplicateDuty, AUTH, TaskAssign(tid, pk(W2), ZERO_KEY, ZERO_KEY, chain.height + 9, 1),
                 "assigned already")
    chain.reject(Unauthorized, CLIENT, TaskAssign(tid, pk(W2), ZERO_KEY, ZERO_KEY, chain.height + 9, 1))
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    chain.mine(2)
    settle = TaskSettle(tid, BOUNTY, 0, 0)
    chain.reject(Unauthorized, W2, settle)
    chain.apply(AUTH, settle)
    chain.reject(DuplicateDuty, AUTH2, settle, "settled already")
