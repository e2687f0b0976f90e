"""The coordinator's decisions, driven block by block over a dict-backed ledger (real signatures, the real
state transition): each authority transaction it posts is applied as its own block."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import pytest
from aiohttp import web
from coincurve import PrivateKey

from l2d.config import Config, OrchestrationConfig
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.payload import Payload
from l2d.core.rules import apply_tx
from l2d.core.state import Account, Namespace, Rules, StateView, account_key, genesis_state
from l2d.core.tx import Transaction, sign
from l2d.core.work import TaskRecord, TaskStatus, get_task
from l2d.core.work_tx import (FP_ENTRY, Role, TaskResult, TaskSettle, TaskSubmit, WorkerCaps, WorkerExit,
                              WorkerHeartbeat, WorkerRegister)
from orchestration.service import OrchestrationService

RULES = Rules(LOCAL, 1)
AUTH, CLIENT, FILLER = 0, 9, 8
AUTH2 = 7  # a second federation member, running its own coordinator


def secret(n: int) -> bytes:
    return hashlib.sha256(b"service test key %d" % n).digest()


def pk(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def fp(out: bytes) -> bytes:
    return b"".join(FP_ENTRY.pack((c + j) % 10, q) for c in out for j, q in enumerate((900, 400, 50)))


class Ledger:
    def __init__(self) -> None:
        self.state = genesis_state([(pk(n), 10**8) for n in (1, 2, 3, 4, 5, CLIENT, FILLER)], None, (pk(AUTH), pk(AUTH2)))
        self.height = 0
        self.posted: list[Payload] = []
        self.blocks: dict[int, list[Transaction]] = {}
        self.task_scans = 0

    def apply(self, n: int, payload: Payload) -> bytes:
        raw = self.state.get(account_key(pk(n)))
        nonce = 0 if raw is None else Account.decode(raw).nonce
        t = sign(LOCAL, secret(n), nonce, 0 if payload.FEELESS else 1, payload, b"\0" * 32)
        view = StateView(self.state.get, self.height + 1)
        apply_tx(view, t, RULES)
        self.blocks[self.height + 1] = [t]
        for k, v in view.writes.items():
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v
        self.height += 1
        return t.txid

    def mine(self, n: int) -> None:
        for _ in range(n):
            self.apply(FILLER, Transfer(pk(CLIENT), 1))

    def read_prefix(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        self.task_scans += prefix == bytes((Namespace.TASK,))
        return sorted((k, v) for k, v in self.state.items() if k.startswith(prefix))

    def submit_auth(self, payload: Payload) -> bytes:
        self.posted.append(payload)
        return self.apply(AUTH, payload)

    def task(self, tid: bytes) -> TaskRecord:
        t = get_task(StateView(self.state.get), tid)
        assert t is not None
        return t


def make(ledger: Ledger, journal: Optional[Path] = None, **orch: Any) -> OrchestrationService:
    cfg: OrchestrationConfig = Config.from_dict(
        {"node": {"network": "local", "data_dir": "/nonexistent"},
         "orchestration": {"strategy": "lowest_cost", "timeout_blocks": 5, "challenge_window_blocks": 2,
                           "heartbeat_timeout_blocks": 1000, **orch}}, "/", env={}).orchestration
    return OrchestrationService(cfg, read_prefix=ledger.read_prefix, tip_height=lambda: ledger.height,
                                submit=ledger.submit_auth, tx_status=lambda txid: {"status": "committed"},
                                journal=journal, get_state=ledger.state.get, block_txs=ledger.blocks.get)


def register(ledger: Ledger, *ns: int) -> None:
    for n in ns:
        ledger.apply(n, WorkerRegister(50_000, WorkerCaps(0, 0, 10 + n, 0, 0, 4, b"eu", (b"digits-mlp",), b"")))


def submit(ledger: Ledger) -> bytes:
    return ledger.apply(CLIENT, TaskSubmit(1000, 0, 0, b"digits-mlp", b"", bytes(64)))


def test_waits_for_an_eligible_worker_then_assigns_with_backup_and_verifier() -> None:
    ledger = Ledger()
    svc = make(ledger, audit_rate=1.0)
    tid = submit(ledger)
    svc.step()
    assert ledger.task(tid).status == TaskStatus.SUBMITTED
    assert [e["kind"] for e in svc.notes[tid].events] == ["no-eligible-worker"]
    svc.step()
    assert len(svc.notes[tid].events) == 1  # the same non-event is recorded once
    register(ledger, 1, 2, 3)
    svc.step()
    t = ledger.task(tid)
    assert (t.status, t.worker, t.backup, t.verifier) == (TaskStatus.ASSIGNED, pk(1), pk(2), pk(3))
    expl = svc.notes[tid].explanations[0]
    assert expl["chosen"]["worker_id"] == pk(1).hex() and expl["verifier"]["worker_id"] == pk(3).hex()


def test_stale_heartbeats_and_failed_probes_take_workers_off_the_schedule() -> None:
    ledger = Ledger()
    svc = make(ledger, heartbeat_timeout_blocks=3, probe_failures=2)
    register(ledger, 1, 2)
    ledger.mine(4)
    ledger.apply(2, WorkerHeartbeat())
    svc.probe_failures[pk(2)] = 1
    svc.step()
    assert not svc.schedulable(pk(1), ledger.height) and svc.schedulable(pk(2), ledger.height)
    svc.probe_failures[pk(2)] = 2
    assert not svc.schedulable(pk(2), ledger.height)
    tid = submit(ledger)
    svc.step()
    assert ledger.task(tid).status == TaskStatus.SUBMITTED  # nobody healthy


def _through_results(ledger: Ledger, svc: OrchestrationService, worker_out: bytes, verifier_out: bytes) -> bytes:
    register(ledger, 1, 2, 3, 4)
    tid = submit(ledger)
    svc.step()
    ledger.apply(1, TaskResult(tid, worker_out, fp(worker_out)))
    ledger.apply(3, TaskResult(tid, verifier_out, fp(verifier_out)))
    return tid


def test_agreeing_results_settle_after_the_window_with_the_split() -> None:
    ledger = Ledger()
    svc = make(ledger, audit_rate=1.0, worker_share=0.7, verifier_share=0.2, treasury_share=0.1)
    tid = _through_results(ledger, svc, b"\3", b"\3")
    result_height = ledger.task(tid).result_height
    while ledger.task(tid).status != TaskStatus.SETTLED:
        assert ledger.height < result_height + 10
        svc.step()
        if ledger.task(tid).status != TaskStatus.SETTLED:
            ledger.mine(1)
    assert ledger.height >= result_height + 2
    settle = ledger.posted[-1]
    assert isinstance(settle, TaskSettle)
    assert (settle.worker_sat, settle.verifier_sat, settle.treasury_sat) == (700, 200, 100)


def test_an_undecided_referee_is_followed_by_another_until_none_is_left() -> None:
    ledger = Ledger()
    svc = make(ledger, audit_rate=1.0)
    tid = _through_results(ledger, svc, b"\3", b"\4")
    svc.step()
    t = ledger.task(tid)
    assert t.status == TaskStatus.DISPUTED and t.referee == pk(4)  # a third worker (not the backup, 2)
    ledger.apply(4, TaskResult(tid, b"\5", fp(b"\5")))  # agrees with neither side
    svc.step()
    t = ledger.task(tid)
    assert t.status == TaskStatus.DISPUTED and t.referee == pk(2) and t.result(Role.REFEREE) is None
    kinds = [e["kind"] for e in svc.notes[tid].events]
    assert kinds[-2:] == ["referee-undecided", "dispute"]
    ledger.apply(2, TaskResult(tid, b"\6", fp(b"\6")))  # undecided again, and nobody else is left
    n = len(ledger.posted)
    svc.step()
    assert len(ledger.posted) == n and ledger.task(tid).status == TaskStatus.DISPUTED
    assert svc.notes[tid].events[-1]["kind"] == "unresolvable"


def test_a_second_referee_decides() -> None:
    ledger = Ledger()
    svc = make(ledger, audit_rate=1.0)
    tid = _through_results(ledger, svc, b"\3", b"\4")
    svc.step()
    ledger.apply(4, TaskResult(tid, b"\5", fp(b"\5")))
    svc.step()
    ledger.apply(2, TaskResult(tid, b"\3", fp(b"\3")))  # agrees with the worker: the verifier was wrong
    svc.step()
    t = ledger.task(tid)
    assert t.status == TaskStatus.SETTLED and t.outcome.name == "VERIFIER_SLASHED"


@pytest.mark.parametrize("missing", ["worker", "verifier"])
def test_a_missed_deadline_hands_the_role_on(missing: str) -> None:
    ledger = Ledger()
    svc = make(ledger, audit_rate=1.0)
    register(ledger, 1, 2, 3, 4)
    tid = submit(ledger)
    svc.step()
    if missing == "worker":
        ledger.apply(3, TaskResult(tid, b"\3", fp(b"\3")))
    else:
        ledger.apply(1, TaskResult(tid, b"\3", fp(b"\3")))
    deadline = ledger.task(tid).deadline_height
    svc.step()
    assert ledger.task(tid).timeouts == 0
    ledger.mine(deadline - ledger.height)
    svc.step()
    t = ledger.task(tid)
    assert t.timeouts == 1
    if missing == "worker":
        assert (t.worker, t.backup) == (pk(2), pk(4))  # the backup takes over; a fresh backup is named
    else:
        assert t.verifier == pk(4) and t.worker == pk(1)
    assert svc.notes[tid].events[-1]["kind"] == "reassign"


def test_refused_posts_are_recorded_not_raised() -> None:
    ledger = Ledger()
    svc = make(ledger)
    register(ledger, 1)
    tid = submit(ledger)

    def refuse(payload: Payload) -> bytes:
        from l2d.core.errors import Unauthorized
        raise Unauthorized("not the federation")
    svc._submit = refuse
    svc.step()
    ev: Optional[dict[str, Any]] = svc.notes[tid].events[-1]
    assert ev is not None and ev["kind"] == "assign-refused" and ev["reason"] == "unauthorized"
    assert ledger.task(tid).status == TaskStatus.SUBMITTED


def test_a_silent_worker_is_failed_over_before_its_deadline() -> None:
    ledger = Ledger()
    svc = make(ledger, timeout_blocks=1000, heartbeat_grace_blocks=4)
    register(ledger, 1, 2, 3)
    tid = submit(ledger)
    svc.step()
    assert ledger.task(tid).worker == pk(1)
    for _ in range(6):  # the backup keeps beating, the worker does not
        ledger.apply(2, WorkerHeartbeat())
        svc.step()
    t = ledger.task(tid)
    assert t.worker == pk(2) and t.timeouts == 1 and t.deadline_height > ledger.height
    assert svc.notes[tid].events[-1]["reason"] == "missed-heartbeats"


def test_explanations_and_events_survive_a_restart(tmp_path: Path) -> None:
    journal = tmp_path / "orchestration" / "notes.jsonl"
    ledger = Ledger()
    svc = make(ledger, journal, audit_rate=1.0)
    register(ledger, 1, 2, 3)
    tid = submit(ledger)
    svc.step()
    svc.close()
    with journal.open("a") as f:
        f.write('{"task": "torn')  # a crash mid-write leaves a torn last line
    again = make(ledger, journal)
    assert again.notes[tid].explanations == svc.notes[tid].explanations
    assert [e["kind"] for e in again.notes[tid].events] == ["assign"]
    assert again.notes[tid].explanations[0]["chosen"]["worker_id"] == pk(1).hex()


def test_only_open_tasks_are_read_after_the_first_scan() -> None:
    ledger = Ledger()
    svc = make(ledger, challenge_window_blocks=0)
    register(ledger, 1, 2)
    done = submit(ledger)
    svc.step()
    ledger.apply(1, TaskResult(done, b"\3", fp(b"\3")))
    svc.step()
    assert ledger.task(done).status == TaskStatus.SETTLED
    svc.step()
    assert done not in svc.open_tasks
    later = submit(ledger)  # found in the new block, not by a scan
    svc.step()
    assert svc.open_tasks == {later} and ledger.task(later).status == TaskStatus.ASSIGNED
    assert ledger.task_scans == 1
    ledger.blocks.pop(ledger.height)  # a block it cannot read: it falls back to a full scan
    ledger.mine(1)
    ledger.blocks.pop(ledger.height)
    svc.step()
    assert ledger.task_scans == 2 and svc.open_tasks == {later}


def test_failover_skips_a_backup_that_exited() -> None:
    ledger = Ledger()
    svc = make(ledger)
    register(ledger, 1, 2, 3)
    tid = submit(ledger)
    svc.step()
    assert ledger.task(tid).backup == pk(2)
    ledger.apply(2, WorkerExit())
    ledger.mine(ledger.task(tid).deadline_height - ledger.height)
    svc.step()
    assert ledger.task(tid).worker == pk(3)


async def _ping_server(worker: bytes, hits: list[str]) -> web.AppRunner:
    async def ping(request: web.Request) -> web.Response:
        hits.append(request.host)
        return web.json_response({"worker": worker.hex()})

    app = web.Application()
    app.router.add_get("/ping", ping)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.mark.parametrize("allowed", [True, False])
async def test_probes_reach_private_endpoints_only_where_allowed(allowed: bool) -> None:
    """A worker names its own probe endpoint: outside local/regtest the coordinator must not be steered to its own
    host or private network, whether the endpoint is an IP literal or a name that resolves there."""
    ledger = Ledger()
    svc = make(ledger, probe_private_endpoints=allowed, probe_failures=1)
    hits: list[str] = []
    runners = [await _ping_server(pk(n), hits) for n in (1, 2)]
    try:
        ports = [r.addresses[0][1] for r in runners]
        for n, host in ((1, "127.0.0.1"), (2, "localhost")):
            caps = WorkerCaps(0, 0, 10 + n, 0, 0, 4, b"eu", (b"digits-mlp",), f"{host}:{ports[n - 1]}".encode())
            ledger.apply(n, WorkerRegister(50_000, caps))
        svc.step()
        async with svc.probe_session() as session:
            await svc.probe_all(session)
    finally:
        for r in runners:
            await r.cleanup()
    if allowed:
        assert len(hits) == 2 and svc.probe_failures == {pk(1): 0, pk(2): 0} and set(svc.latency_us) == {pk(1), pk(2)}
    else:
        assert hits == [] and svc.probe_failures == {pk(1): 1, pk(2): 1} and svc.latency_us == {}
        assert not svc.schedulable(pk(1), ledger.height) and not svc.schedulable(pk(2), ledger.height)


@pytest.mark.parametrize("network, default", [("local", True), ("regtest", True), ("signet", False),
                                              ("mainnet", False)])
def test_private_probe_endpoints_are_refused_by_default_on_public_networks(network: str, default: bool) -> None:
    cfg = Config.from_dict({"node": {"network": network, "data_dir": "/nonexistent"}}, "/", env={})
    assert cfg.orchestration.probe_private_endpoints is default


def test_two_members_coordinators_assign_once_and_the_late_one_takes_the_refusal_as_done() -> None:
    """Both members run the coordinator on the same tip: the first assignment in a block wins; the other member's
    copy is refused by consensus with duplicate-duty, which its service records as done, not as an error."""
    ledger = Ledger()
    register(ledger, 1, 2, 3)
    tid = submit(ledger)
    first = make(ledger)
    stale = dict(ledger.state)  # what the second member read before the first assignment was committed
    cfg = make(ledger).config
    second = OrchestrationService(cfg, read_prefix=lambda p: sorted((k, v) for k, v in stale.items()
                                                                     if k.startswith(p)),
                                  tip_height=lambda: ledger.height - 1,
                                  submit=lambda payload: ledger.apply(AUTH2, payload),
                                  tx_status=lambda txid: {"status": "committed"}, journal=None,
                                  get_state=stale.get, block_txs=ledger.blocks.get)
    first.step()
    assigned = ledger.task(tid)
    assert assigned.status == TaskStatus.ASSIGNED
    second.step()  # must not raise
    assert ledger.task(tid) == assigned  # applied once
    assert [e["kind"] for e in second.notes[tid].events][-1] == "assign-done-already"
    assert second.notes[tid].events[-1]["reason"] == "duplicate-duty"
