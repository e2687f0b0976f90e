"""Orchestration state transitions: the worker registry and the task lifecycle (docs/orchestration.md).

State values (canonical, big-endian):
  worker_key(pk) = 0x05 || pk      -> WorkerRecord (stake, status, reputation, counters, capabilities)
  task_key(id)   = 0x06 || task id -> TaskRecord (status, parties, escrowed bounty, deadline, results)
Every handler checks everything before its first write. Money: stakes and bounties are locked
(add_locked); slashing burns what the challenger does not get.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Optional, cast

from .codec import Reader, write_bytes
from .errors import DecodeError, DuplicateDuty, InvalidTransaction, Overflow
from .params import MAX_MONEY
from .state import (SUPPLY_KEY, Namespace, Rules, StateView, Supply, add_locked, bump_member_nonce, charge_sender,
                    check_member, credit)
from .tx import Transaction
from .work_tx import (FP_POSITION, MAX_IMAGES, PPM, ZERO_KEY, Role, TaskAssign, TaskCancel, TaskDispute, TaskReassign,
                      TaskResolve, TaskResult, TaskSettle, TaskSubmit, WorkerCaps, WorkerRegister, fingerprints_match,
                      parse_fingerprint)

EXIT_DELAY_BLOCKS = 100  # an exited worker's stake stays slashable this long
INITIAL_REPUTATION_PPM = 500_000
MAX_WINDOW_BLOCKS = 100_000
_WORKER_HEAD = struct.Struct(">BQQIHIIIQQ")
_TASK_HEAD = struct.Struct(">BB32sQQ32s32s32s32sQIQBQI")
_W = bytes((Namespace.WORKER,))
_T = bytes((Namespace.TASK,))


class WorkerStatus(IntEnum):
    ACTIVE = 1
    EXITING = 2
    WITHDRAWN = 3


class TaskStatus(IntEnum):
    SUBMITTED = 1
    ASSIGNED = 2  # waiting for the worker's (and the verifier's) result
    RESULT_SUBMITTED = 3  # every result in: the challenge window runs
    DISPUTED = 4  # fingerprints disagreed: waiting for the referee, then the resolution
    SETTLED = 5
    CANCELLED = 6


class TaskPhase(IntEnum):
    """What a task waits for next, derived from its record (not stored): the answer to "why is it not settled?"."""

    ASSIGNMENT = 1  # SUBMITTED: the coordinator has not assigned it yet
    RESULTS = 2  # ASSIGNED: the roles of waiting_for() owe their results by deadline_height
    CHALLENGE_WINDOW = 3  # RESULT_SUBMITTED, results agree: settled once the window ends (window_ends_height)
    DISPUTE = 4  # RESULT_SUBMITTED, the verifier disagrees: the coordinator opens a dispute (no settling)
    REFEREE = 5  # DISPUTED: the referee owes its result by deadline_height
    RESOLUTION = 6  # DISPUTED, the referee answered: the coordinator resolves (or hands it to another referee)
    DONE = 7  # SETTLED or CANCELLED


class Outcome(IntEnum):
    NONE = 0
    PAID = 1  # settled after the window
    WORKER_SLASHED = 2
    VERIFIER_SLASHED = 3
    CANCELLED = 4


def worker_key(pubkey: bytes) -> bytes:
    return _W + pubkey


def task_key(task_id: bytes) -> bytes:
    return _T + task_id


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """Value under worker_key: 51 fixed bytes, then the registered capabilities."""

    status: WorkerStatus
    stake_sat: int
    exit_height: int
    reputation_ppm: int
    slashes: int
    tasks_done: int
    tasks_failed: int
    active_tasks: int  # roles (worker, verifier, referee) it holds on unsettled tasks
    last_heartbeat: int  # L2 height
    registered_height: int
    caps: WorkerCaps

    def encode(self) -> bytes:
        return _WORKER_HEAD.pack(self.status, self.stake_sat, self.exit_height, self.reputation_ppm, self.slashes,
                                 self.tasks_done, self.tasks_failed, self.active_tasks, self.last_heartbeat,
                                 self.registered_height) + self.caps.encode()

    @classmethod
    def decode(cls, b: bytes) -> "WorkerRecord":
        r = Reader(b, "worker record")
        st, stake, exit_h, rep, slashes, done, failed, active, beat, reg = _WORKER_HEAD.unpack(
            r.take(_WORKER_HEAD.size))
        if st not in (1, 2, 3):
            raise DecodeError(f"worker record status {st}")
        caps = WorkerCaps.read(r)
        r.end()
        return cls(WorkerStatus(st), stake, exit_h, rep, slashes, done, failed, active, beat, reg, caps)

    @property
    def reputation_cap(self) -> int:
        """Reputation never climbs back above PPM / (1 + slashes): a slash lowers it for good."""
        return PPM // (1 + self.slashes)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """Value under task_key: a 211-byte head, the submitted spec, then each role's output and fingerprint."""

    status: TaskStatus
    outcome: Outcome
    submitter: bytes
    bounty_sat: int
    submit_height: int
    worker: bytes  # zero key = none (same for backup, verifier, referee)
    backup: bytes
    verifier: bytes
    referee: bytes
    deadline_height: int
    window_blocks: int
    result_height: int  # when the last required result arrived (the window starts)
    timeouts: int  # roles handed on after a missed deadline (or missed heartbeats)
    phase_height: int  # when the roles now due were handed out (assign, reassign, dispute)
    heartbeat_grace: int  # blocks of silence after which a due party may be replaced (0 = only the deadline)
    spec: TaskSubmit
    results: tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]  # (output, fp) by role - 1

    def encode(self) -> bytes:
        out = _TASK_HEAD.pack(self.status, self.outcome, self.submitter, self.bounty_sat, self.submit_height,
                              self.worker, self.backup, self.verifier, self.referee, self.deadline_height,
                              self.window_blocks, self.result_height, self.timeouts, self.phase_height,
                              self.heartbeat_grace) + self.spec.encode()
        for o, fp in self.results:
            out += write_bytes(o) + write_bytes(fp)
        return out

    @classmethod
    def decode(cls, b: bytes) -> "TaskRecord":
        r = Reader(b, "task record")
        (st, oc, sub, bounty, sub_h, worker, backup, verifier, referee, deadline, window, res_h, timeouts, phase,
         grace) = _TASK_HEAD.unpack(r.take(_TASK_HEAD.size))
        if st not in range(1, 7) or oc not in range(0, 5):
            raise DecodeError(f"task record status {st} / outcome {oc}")
        spec = TaskSubmit.read(r)
        res = tuple((r.var_bytes(MAX_IMAGES), r.var_bytes(MAX_IMAGES * FP_POSITION)) for _ in range(3))
        r.end()
        return cls(TaskStatus(st), Outcome(oc), sub, bounty, sub_h, worker, backup, verifier, referee, deadline,
                   window, res_h, timeouts, phase, grace, spec, cast(_Results, res))

    def party(self, role: Role) -> bytes:
        return (self.worker, self.verifier, self.referee)[role - 1]

    def result(self, role: Role) -> Optional[tuple[bytes, bytes]]:
        r = self.results[role - 1]
        return r if r[0] else None

    def role_of(self, pubkey: bytes) -> Optional[Role]:
        for role in Role:
            if self.party(role) == pubkey:
                return role
        return None

    def waiting_for(self) -> list[Role]:
        """The roles whose result is still due (in ASSIGNED or DISPUTED)."""
        if self.status == TaskStatus.ASSIGNED:
            roles = [Role.WORKER] + ([Role.VERIFIER] if self.verifier != ZERO_KEY else [])
        elif self.status == TaskStatus.DISPUTED:
            roles = [Role.REFEREE]
        else:
            return []
        return [role for role in roles if self.result(role) is None]

    @property
    def window_ends_height(self) -> Optional[int]:
        """The first L2 height at which the task may be settled (apply_settle checks exactly this): result_height +
        window_blocks, while the challenge window runs (RESULT_SUBMITTED) and after a task was settled PAID; None
        where no window applies (before every result is in, disputed, slashed or cancelled)."""
        if self.status == TaskStatus.RESULT_SUBMITTED or self.outcome == Outcome.PAID:
            return self.result_height + self.window_blocks
        return None

    def phase(self) -> TaskPhase:
        """What the task waits for next (see TaskPhase)."""
        if self.status in (TaskStatus.SETTLED, TaskStatus.CANCELLED):
            return TaskPhase.DONE
        if self.status == TaskStatus.SUBMITTED:
            return TaskPhase.ASSIGNMENT
        if self.status == TaskStatus.ASSIGNED:
            return TaskPhase.RESULTS
        if self.status == TaskStatus.DISPUTED:
            return TaskPhase.REFEREE if self.result(Role.REFEREE) is None else TaskPhase.RESOLUTION
        return TaskPhase.CHALLENGE_WINDOW if _verified(self) else TaskPhase.DISPUTE


_Results = tuple[tuple[bytes, bytes], tuple[bytes, bytes], tuple[bytes, bytes]]
_NO_RESULTS: _Results = ((b"", b""), (b"", b""), (b"", b""))


# -- reads ---------------------------------------------------------------------------------------------------------
def get_worker(view: StateView, pubkey: bytes) -> Optional[WorkerRecord]:
    raw = view.get(worker_key(pubkey))
    return None if raw is None else WorkerRecord.decode(raw)


def get_task(view: StateView, task_id: bytes) -> Optional[TaskRecord]:
    raw = view.get(task_key(task_id))
    return None if raw is None else TaskRecord.decode(raw)


def _need_worker(view: StateView, pubkey: bytes, what: str) -> WorkerRecord:
    w = get_worker(view, pubkey)
    if w is None:
        raise InvalidTransaction(f"{what} {pubkey.hex()} is not a registered worker")
    return w


def _need_task(view: StateView, task_id: bytes) -> TaskRecord:
    t = get_task(view, task_id)
    if t is None:
        raise InvalidTransaction(f"no task {task_id.hex()}")
    return t


def _need_status(t: TaskRecord, *allowed: TaskStatus) -> None:
    if t.status not in allowed:
        raise InvalidTransaction(f"task is {t.status.name}, expected {' or '.join(s.name for s in allowed)}")


def _check_fits(w: WorkerRecord, spec: TaskSubmit, what: str, pubkey: bytes) -> None:
    """A party must be an active, staked worker meeting the task's hard requirements."""
    if w.status != WorkerStatus.ACTIVE or w.stake_sat == 0:
        raise InvalidTransaction(f"{what} {pubkey.hex()} is {w.status.name} with stake {w.stake_sat}")
    if spec.model not in w.caps.models:
        raise InvalidTransaction(f"{what} {pubkey.hex()} does not serve model {spec.model.decode()}")
    if w.reputation_ppm < spec.min_reputation_ppm:
        raise InvalidTransaction(f"{what} reputation {w.reputation_ppm} is below {spec.min_reputation_ppm}")
    if spec.max_price_sat and w.caps.price_sat > spec.max_price_sat:
        raise InvalidTransaction(f"{what} price {w.caps.price_sat} is above {spec.max_price_sat}")
    if spec.region and w.caps.region != spec.region:
        raise InvalidTransaction(f"{what} region {w.caps.region.decode()} is not {spec.region.decode()}")


def _parties(view: StateView, spec: TaskSubmit, pairs: list[tuple[bytes, str]]) -> dict[bytes, WorkerRecord]:
    out: dict[bytes, WorkerRecord] = {}
    for pk, what in pairs:
        if pk != ZERO_KEY:
            w = _need_worker(view, pk, what)
            _check_fits(w, spec, what, pk)
            out[pk] = w
    return out


def _deadline(view: StateView, deadline: int) -> None:
    if deadline <= view.height:
        raise InvalidTransaction(f"deadline {deadline} is not after the current height {view.height}")


def rep_up(w: WorkerRecord) -> int:
    cap = w.reputation_cap
    return w.reputation_ppm + (cap - w.reputation_ppm) // 8 if w.reputation_ppm < cap else cap


def burn_supply(view: StateView, amount: int) -> None:
    if amount:
        raw = view.get(SUPPLY_KEY)
        sup = Supply.decode(raw) if raw is not None else Supply(0, 0, 0)
        view.put(SUPPLY_KEY, Supply(sup.minted_sat, sup.burned_sat + amount, sup.fees_sat).encode())


# -- worker registry -------------------------------------------------------------------------------------------------
def apply_register(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(WorkerRegister, tx.payload)
    if view.get(worker_key(tx.sender)) is not None:
        raise InvalidTransaction(f"worker {tx.sender.hex()} is already registered")
    charge_sender(view, tx, rules, p.stake_sat)
    add_locked(view, p.stake_sat)
    rec = WorkerRecord(WorkerStatus.ACTIVE, p.stake_sat, 0, INITIAL_REPUTATION_PPM, 0, 0, 0, 0, view.height,
                       view.height, p.caps)
    view.put(worker_key(tx.sender), rec.encode())


def apply_heartbeat(view: StateView, tx: Transaction, rules: Rules) -> None:
    w = _need_worker(view, tx.sender, "sender")
    if w.status == WorkerStatus.WITHDRAWN:
        raise InvalidTransaction("a withdrawn worker sends no heartbeats")
    charge_sender(view, tx, rules, 0)
    view.put(worker_key(tx.sender), replace(w, last_heartbeat=view.height).encode())


def apply_exit(view: StateView, tx: Transaction, rules: Rules) -> None:
    w = _need_worker(view, tx.sender, "sender")
    if w.status != WorkerStatus.ACTIVE:
        raise InvalidTransaction(f"worker is {w.status.name}, not ACTIVE")
    charge_sender(view, tx, rules, 0)
    view.put(worker_key(tx.sender), replace(w, status=WorkerStatus.EXITING, exit_height=view.height).encode())


def apply_withdraw(view: StateView, tx: Transaction, rules: Rules) -> None:
    w = _need_worker(view, tx.sender, "sender")
    if w.status != WorkerStatus.EXITING:
        raise InvalidTransaction(f"worker is {w.status.name}: only an exited worker withdraws its stake")
    if view.height < w.exit_height + EXIT_DELAY_BLOCKS:
        raise InvalidTransaction(f"stake is locked until height {w.exit_height + EXIT_DELAY_BLOCKS} "
                                 f"(now {view.height})")
    if w.active_tasks:
        raise InvalidTransaction(f"worker still holds {w.active_tasks} unsettled task roles")
    charge_sender(view, tx, rules, 0)
    add_locked(view, -w.stake_sat)
    credit(view, tx.sender, w.stake_sat)
    view.put(worker_key(tx.sender), replace(w, status=WorkerStatus.WITHDRAWN, stake_sat=0).encode())


# -- tasks ----------------------------------------------------------------------------------------------------------
def apply_submit(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskSubmit, tx.payload)
    charge_sender(view, tx, rules, p.bounty_sat)
    add_locked(view, p.bounty_sat)
    rec = TaskRecord(TaskStatus.SUBMITTED, Outcome.NONE, tx.sender, p.bounty_sat, view.height, ZERO_KEY, ZERO_KEY,
                     ZERO_KEY, ZERO_KEY, 0, 0, 0, 0, 0, 0, p, _NO_RESULTS)
    view.put(task_key(tx.txid), rec.encode())


def apply_cancel(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskCancel, tx.payload)
    t = _need_task(view, p.task_id)
    if t.submitter != tx.sender:
        raise InvalidTransaction("only the submitter cancels a task")
    _need_status(t, TaskStatus.SUBMITTED)
    charge_sender(view, tx, rules, 0)
    add_locked(view, -t.bounty_sat)
    credit(view, tx.sender, t.bounty_sat)
    view.put(task_key(p.task_id), replace(t, status=TaskStatus.CANCELLED, outcome=Outcome.CANCELLED).encode())


def _authority(view: StateView, tx: Transaction) -> None:
    bump_member_nonce(view, tx)


def _member_task(view: StateView, tx: Transaction, task_id: bytes) -> TaskRecord:
    """The first checks of a coordinator (member-posted) task type: a member's transaction, an existing task."""
    check_member(view, tx)
    return _need_task(view, task_id)


def _put_workers(view: StateView, workers: dict[bytes, WorkerRecord]) -> None:
    for pk in sorted(workers):  # fixed write order (the view is a dict; order never reaches the root anyway)
        view.put(worker_key(pk), workers[pk].encode())


def apply_assign(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskAssign, tx.payload)
    t = _member_task(view, tx, p.task_id)
    if t.status not in (TaskStatus.SUBMITTED, TaskStatus.CANCELLED):
        raise DuplicateDuty(f"task {p.task_id.hex()} is assigned already ({t.status.name})")
    _need_status(t, TaskStatus.SUBMITTED)
    _deadline(view, p.deadline_height)
    if max(p.window_blocks, p.heartbeat_grace) > MAX_WINDOW_BLOCKS:
        raise InvalidTransaction(f"challenge window {p.window_blocks} or heartbeat grace {p.heartbeat_grace} "
                                 f"exceeds {MAX_WINDOW_BLOCKS} blocks")
    ws = _parties(view, t.spec, [(p.worker, "worker"), (p.backup, "backup"), (p.verifier, "verifier")])
    _authority(view, tx)
    for pk in (p.worker, p.verifier):
        if pk != ZERO_KEY:
            ws[pk] = replace(ws[pk], active_tasks=ws[pk].active_tasks + 1)
    ws.pop(p.backup, None)
    _put_workers(view, ws)
    view.put(task_key(p.task_id), replace(t, status=TaskStatus.ASSIGNED, worker=p.worker, backup=p.backup,
                                          verifier=p.verifier, deadline_height=p.deadline_height,
                                          window_blocks=p.window_blocks, phase_height=view.height,
                                          heartbeat_grace=p.heartbeat_grace).encode())


def apply_result(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskResult, tx.payload)
    t = _need_task(view, p.task_id)
    role = t.role_of(tx.sender)
    if role is None:
        raise InvalidTransaction(f"{tx.sender.hex()} is not assigned to task {p.task_id.hex()}")
    if role not in t.waiting_for():
        raise InvalidTransaction(f"task {p.task_id.hex()} expects no result from its {role.name.lower()} "
                                 f"(task {t.status.name}, result {'already in' if t.result(role) else 'not due'})")
    if len(p.output) != t.spec.images:
        raise InvalidTransaction(f"output has {len(p.output)} classes for {t.spec.images} input images")
    charge_sender(view, tx, rules, 0)
    results = list(t.results)
    results[role - 1] = (p.output, p.fingerprint)
    t = replace(t, results=cast(_Results, tuple(results)))
    if t.status == TaskStatus.ASSIGNED and not t.waiting_for():
        t = replace(t, status=TaskStatus.RESULT_SUBMITTED, result_height=view.height)
    view.put(task_key(p.task_id), t.encode())


def backup_fits(view: StateView, t: TaskRecord) -> bool:
    """The recorded backup can still take the task over (registered, ACTIVE, staked, meeting the requirements)."""
    w = None if t.backup == ZERO_KEY else get_worker(view, t.backup)
    if w is None:
        return False
    try:
        _check_fits(w, t.spec, "backup", t.backup)
    except InvalidTransaction:
        return False
    return True


def silent(t: TaskRecord, party: WorkerRecord, height: int) -> bool:
    """The party has sent no heartbeat for the task's grace since its role was handed out (grace 0: never)."""
    return t.heartbeat_grace > 0 and height > max(party.last_heartbeat, t.phase_height) + t.heartbeat_grace


def _fp(t: TaskRecord, role: Role) -> tuple[tuple[tuple[int, int], ...], ...]:
    res = t.result(role)
    if res is None:
        raise InvalidTransaction(f"task has no {role.name.lower()} result")
    return parse_fingerprint(res[1], res[0])


def _verified(t: TaskRecord) -> bool:
    """No verifier, or the verifier's fingerprint matches the worker's within the tolerance."""
    return t.verifier == ZERO_KEY or fingerprints_match(_fp(t, Role.WORKER), _fp(t, Role.VERIFIER))


def apply_reassign(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskReassign, tx.payload)
    t = _member_task(view, tx, p.task_id)
    if (t.status in (TaskStatus.ASSIGNED, TaskStatus.RESULT_SUBMITTED, TaskStatus.DISPUTED)
            and p.new_worker != ZERO_KEY and t.party(p.role) == p.new_worker):
        raise DuplicateDuty(f"the {p.role.name.lower()} of task {p.task_id.hex()} is {p.new_worker.hex()} already")
    if p.role not in t.waiting_for():
        raise InvalidTransaction(f"task {t.status.name} is not waiting for its {p.role.name.lower()}")
    old = t.party(p.role)
    loser = _need_worker(view, old, "replaced party")
    if view.height <= t.deadline_height and not silent(t, loser, view.height):
        raise InvalidTransaction(f"the deadline {t.deadline_height} has not passed (now {view.height}) and the "
                                 f"{p.role.name.lower()} is not silent (last heartbeat {loser.last_heartbeat})")
    _deadline(view, p.deadline_height)
    if p.role == Role.WORKER:
        if backup_fits(view, t) and p.new_worker != t.backup:
            raise InvalidTransaction("the worker role goes to the recorded backup (it still fits the task)")
        others = {t.worker, t.verifier, t.referee}
        if p.new_backup != ZERO_KEY and p.new_backup in others | {t.backup}:
            raise InvalidTransaction("the new backup already has a role in this task")
    else:
        others = {t.worker, t.backup, t.verifier, t.referee}
    if p.new_worker in others - {ZERO_KEY}:
        raise InvalidTransaction("the new party already has a role in this task (or is the one replaced)")
    new = _parties(view, t.spec, [(p.new_worker, "new worker"), (p.new_backup, "new backup")])
    _authority(view, tx)
    new[old] = replace(loser, active_tasks=loser.active_tasks - 1, tasks_failed=loser.tasks_failed + 1,
                       reputation_ppm=loser.reputation_ppm - loser.reputation_ppm // 8)
    new[p.new_worker] = replace(new[p.new_worker], active_tasks=new[p.new_worker].active_tasks + 1)
    new.pop(p.new_backup, None)
    _put_workers(view, new)
    if p.role == Role.WORKER:
        t = replace(t, worker=p.new_worker, backup=p.new_backup)
    elif p.role == Role.VERIFIER:
        t = replace(t, verifier=p.new_worker)
    else:
        t = replace(t, referee=p.new_worker)
    view.put(task_key(p.task_id), replace(t, deadline_height=p.deadline_height, timeouts=min(t.timeouts + 1, 255),
                                          phase_height=view.height).encode())


def _pay(view: StateView, payouts: list[tuple[bytes, int]], total: int, what: str) -> None:
    if sum(a for _, a in payouts) != total:
        raise InvalidTransaction(f"{what} shares sum to {sum(a for _, a in payouts)}, the bounty is {total}")


def credit_all(view: StateView, payouts: list[tuple[bytes, int]]) -> None:
    for pk, amount in payouts:
        if amount:
            credit(view, pk, amount)


def check_credits(view: StateView, payouts: list[tuple[bytes, int]]) -> None:
    """Overflow checks before any write (credit checks too, but only after earlier writes)."""
    totals: dict[bytes, int] = {}
    for pk, amount in payouts:
        totals[pk] = totals.get(pk, 0) + amount
    for pk, amount in totals.items():
        acc = view.account(pk)
        if (acc.balance_sat if acc else 0) + amount > MAX_MONEY:
            raise Overflow(f"balance of {pk.hex()} would exceed {MAX_MONEY}")


def apply_settle(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskSettle, tx.payload)
    t = _member_task(view, tx, p.task_id)
    if t.status == TaskStatus.SETTLED:
        raise DuplicateDuty(f"task {p.task_id.hex()} is settled already")
    _need_status(t, TaskStatus.RESULT_SUBMITTED)
    if view.height < t.result_height + t.window_blocks:  # TaskRecord.window_ends_height
        raise InvalidTransaction(f"challenge window open until height {t.result_height + t.window_blocks} "
                                 f"(now {view.height})")
    if not _verified(t):
        raise InvalidTransaction("the verifier's fingerprint disagrees with the worker's: dispute, not settle")
    if t.verifier == ZERO_KEY and p.verifier_sat:
        raise InvalidTransaction("task has no verifier to pay")
    payouts = [(t.worker, p.worker_sat), (t.verifier, p.verifier_sat), (tx.sender, p.treasury_sat)]
    _pay(view, payouts, t.bounty_sat, "settle")
    check_credits(view, payouts)
    ws = {pk: _need_worker(view, pk, "party") for pk in (t.worker, t.verifier) if pk != ZERO_KEY}
    _authority(view, tx)
    for pk, w in ws.items():
        ws[pk] = replace(w, active_tasks=w.active_tasks - 1, tasks_done=w.tasks_done + 1, reputation_ppm=rep_up(w))
    _put_workers(view, ws)
    add_locked(view, -t.bounty_sat)
    credit_all(view, payouts)
    view.put(task_key(p.task_id), replace(t, status=TaskStatus.SETTLED, outcome=Outcome.PAID).encode())


def verdict(t: TaskRecord) -> Optional[Role]:
    """The side the referee's result shows wrong: the one it does not match while it matches the other. None
    when it matches neither (or both): then the dispute goes to another referee."""
    ref = _fp(t, Role.REFEREE)
    w, v = fingerprints_match(ref, _fp(t, Role.WORKER)), fingerprints_match(ref, _fp(t, Role.VERIFIER))
    return None if w == v else (Role.VERIFIER if w else Role.WORKER)


def apply_dispute(view: StateView, tx: Transaction, rules: Rules) -> None:
    """Open a dispute (RESULT_SUBMITTED, fingerprints disagree), or hand it to another referee (DISPUTED, the
    referee's result decides nothing). The earlier referee's result is dropped; it is neither paid nor blamed."""
    p = cast(TaskDispute, tx.payload)
    t = _member_task(view, tx, p.task_id)
    if t.status == TaskStatus.DISPUTED and t.result(Role.REFEREE) is None:
        raise DuplicateDuty(f"task {p.task_id.hex()} is disputed already, waiting for its referee")
    _need_status(t, TaskStatus.RESULT_SUBMITTED, TaskStatus.DISPUTED)
    if t.status == TaskStatus.RESULT_SUBMITTED:
        if t.verifier == ZERO_KEY or _verified(t):
            raise InvalidTransaction("nothing to dispute: the fingerprints agree (or there is no verifier)")
    elif t.result(Role.REFEREE) is None:
        raise InvalidTransaction("the referee has not answered yet (hand its role on with a reassign)")
    elif verdict(t) is not None:
        raise InvalidTransaction("the referee's result decides the dispute: resolve it")
    if p.referee in (t.worker, t.verifier, t.referee):
        raise InvalidTransaction("the referee must be a third worker (and not the previous referee)")
    _deadline(view, p.deadline_height)
    ws = _parties(view, t.spec, [(p.referee, "referee")])
    if t.referee != ZERO_KEY:
        ws[t.referee] = _need_worker(view, t.referee, "previous referee")
    _authority(view, tx)
    ws[p.referee] = replace(ws[p.referee], active_tasks=ws[p.referee].active_tasks + 1)
    if t.referee != ZERO_KEY:
        ws[t.referee] = replace(ws[t.referee], active_tasks=ws[t.referee].active_tasks - 1)
    _put_workers(view, ws)
    results = (t.results[0], t.results[1], (b"", b""))
    view.put(task_key(p.task_id), replace(t, status=TaskStatus.DISPUTED, referee=p.referee, results=results,
                                          deadline_height=p.deadline_height, phase_height=view.height).encode())


def apply_resolve(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = cast(TaskResolve, tx.payload)
    t = _member_task(view, tx, p.task_id)
    if t.status == TaskStatus.SETTLED:
        raise DuplicateDuty(f"task {p.task_id.hex()} is settled already")
    _need_status(t, TaskStatus.DISPUTED)
    winner = Role.VERIFIER if p.loser == Role.WORKER else Role.WORKER
    if verdict(t) != p.loser:
        raise InvalidTransaction(f"the referee's result does not show the {p.loser.name.lower()} wrong and the "
                                 f"{winner.name.lower()} right")
    loser_pk, winner_pk = t.party(p.loser), t.party(winner)
    loser = _need_worker(view, loser_pk, "loser")
    if p.slash_sat > loser.stake_sat:
        raise InvalidTransaction(f"slash {p.slash_sat} exceeds the loser's stake {loser.stake_sat}")
    payouts = [(t.worker, p.worker_sat), (t.verifier, p.verifier_sat), (t.referee, p.referee_sat),
               (tx.sender, p.treasury_sat)]
    _pay(view, payouts, t.bounty_sat, "resolve")
    check_credits(view, payouts + [(winner_pk, p.challenger_sat)])
    ws = {pk: _need_worker(view, pk, "party") for pk in (t.worker, t.verifier, t.referee)}
    _authority(view, tx)
    slashes = loser.slashes + 1
    ws[loser_pk] = replace(ws[loser_pk], stake_sat=loser.stake_sat - p.slash_sat, slashes=slashes,
                           active_tasks=loser.active_tasks - 1, tasks_failed=loser.tasks_failed + 1,
                           reputation_ppm=min(loser.reputation_ppm // 4, PPM // (1 + slashes)))
    for pk in (winner_pk, t.referee):
        w = ws[pk]
        ws[pk] = replace(w, active_tasks=w.active_tasks - 1, tasks_done=w.tasks_done + 1, reputation_ppm=rep_up(w))
    _put_workers(view, ws)
    add_locked(view, -(t.bounty_sat + p.slash_sat))
    burn_supply(view, p.slash_sat - p.challenger_sat)
    credit_all(view, payouts + [(winner_pk, p.challenger_sat)])
    outcome = Outcome.WORKER_SLASHED if p.loser == Role.WORKER else Outcome.VERIFIER_SLASHED
    view.put(task_key(p.task_id), replace(t, status=TaskStatus.SETTLED, outcome=outcome).encode())
