"""The federation's task coordinator, run inside the daemon: it reads the committed worker and task records,
schedules with orchestration.scheduler and posts the fee-less authority transactions that move each task on
(assign with a backup and, for audited tasks, a verifier; reassign after a missed deadline; dispute on a
fingerprint mismatch; resolve with slashing; settle after the challenge window). It also probes each worker's
endpoint for latency and health. Everything it decides is checked again by the state transition (l2d/core/work.py).
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from l2d.config import OrchestrationConfig
from l2d.core.errors import DuplicateDuty, Rejected
from l2d.core.hashing import tagged_hash
from l2d.core.payload import Payload, TxType
from l2d.core.state import Namespace, StateView
from l2d.core.tx import Transaction
from l2d.core.work import TaskRecord, TaskStatus, WorkerRecord, WorkerStatus, backup_fits, silent, task_key, verdict
from l2d.core.work_tx import (PPM, ZERO_KEY, Role, TaskAssign, TaskDispute, TaskReassign, TaskResolve, TaskSettle,
                              fingerprints_match, parse_fingerprint)
from orchestration.errors import NoEligibleWorker
from orchestration.scheduler import Assignment, Requirements, Scheduler, Strategy, Weights
from orchestration.workers import DeviceKind, WorkerInfo, WorkerTable, latency_ema

log = logging.getLogger(__name__)

PRIOR_LATENCY_US = 100_000  # until a worker's first probe answers
ReadPrefix = Callable[[bytes], list[tuple[bytes, bytes]]]


@dataclass
class TaskNotes:
    """What the coordinator knows about a task beyond the ledger: why each party was chosen, and events."""

    explanations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    fetched: dict[str, float] = field(default_factory=dict)  # worker hex -> wall time it fetched the task


def audited(task_id: bytes, rate_ppm: int) -> bool:
    """Whether a task is audited: a deterministic draw from its id, so every federation member agrees."""
    draw = int.from_bytes(tagged_hash("l2d/work/audit", task_id)[:8], "big") % PPM
    return draw < rate_ppm


def split(bounty: int, cfg: OrchestrationConfig, with_verifier: bool) -> tuple[int, int, int]:
    """(worker, verifier, treasury) shares of a bounty; without a verifier its share goes to the worker.
    Floors go to the treasury, so the three always sum to the bounty."""
    v = bounty * cfg.verifier_share_ppm // PPM if with_verifier else 0
    w = bounty * (cfg.worker_share_ppm + (0 if with_verifier else cfg.verifier_share_ppm)) // PPM
    return w, v, bounty - w - v


class OrchestrationService:
    """One coordinator per daemon holding the federation key. Not thread-safe: runs on the node's loop."""

    def __init__(self, config: OrchestrationConfig, *, read_prefix: ReadPrefix, tip_height: Callable[[], int],
                 submit: Callable[[Payload], bytes], tx_status: Callable[[bytes], Optional[dict[str, Any]]],
                 journal: Optional[Path] = None, get_state: Optional[Callable[[bytes], Optional[bytes]]] = None,
                 block_txs: Optional[Callable[[int], Optional[Iterable[Transaction]]]] = None) -> None:
        """read_prefix/get_state read the committed state; block_txs(h) the transactions of committed block h.

        With get_state and block_txs, each step reads only the open tasks (new ones are found in the new
        blocks' submissions) instead of every task ever submitted."""
        self.config = config
        self._read_prefix = read_prefix
        self._tip_height = tip_height
        self._submit = submit
        self._tx_status = tx_status
        self.table = WorkerTable()
        self.scheduler = Scheduler(self.table, Weights(**dict(config.weights_ppm)))
        self.strategy = Strategy(config.strategy)
        self.workers: dict[bytes, WorkerRecord] = {}
        self.latency_us: dict[bytes, int] = {}
        self.probe_failures: dict[bytes, int] = {}
        self.notes: dict[bytes, TaskNotes] = {}
        self._pending: dict[bytes, bytes] = {}  # task id -> txid of the authority tx posted for it
        self._height = -1
        self._reprobed = False
        self.steps = 0
        self._get_state = get_state
        self._block_txs = block_txs
        self.open_tasks: set[bytes] = set()  # ids of tasks not SETTLED/CANCELLED (as of the last step)
        self._scanned_to: Optional[int] = None
        self._journal_path = journal
        self._journal: Optional[IO[str]] = None
        if journal is not None:
            self._load_journal(journal)

    # -- journal: the explanations and events survive a restart ------------------------------------------------------
    def _load_journal(self, path: Path) -> None:
        """Read back the notes of earlier runs (JSON lines); a torn last line (a crash mid-write) is skipped."""
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            return
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
                notes = self.note(bytes.fromhex(rec["task"]))
                (notes.explanations if rec["kind"] == "explanation" else notes.events).append(rec["record"])
            except (ValueError, KeyError, TypeError):
                log.warning("orchestration journal %s: line %d unreadable, skipped", path, i + 1)

    def _write(self, task_id: bytes, kind: str, record: dict[str, Any]) -> None:
        if self._journal_path is None:
            return
        if self._journal is None:
            self._journal_path.parent.mkdir(parents=True, exist_ok=True)
            self._journal = open(self._journal_path, "a", encoding="utf-8")
        self._journal.write(json.dumps({"task": task_id.hex(), "kind": kind, "record": record}, default=str) + "\n")
        self._journal.flush()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _explain(self, task_id: bytes, record: dict[str, Any]) -> None:
        self.note(task_id).explanations.append(record)
        self._write(task_id, "explanation", record)

    # -- reading -------------------------------------------------------------------------------------------------
    def note(self, task_id: bytes) -> TaskNotes:
        return self.notes.setdefault(task_id, TaskNotes())

    def mark_fetched(self, task_id: bytes, worker: bytes) -> None:
        """A worker fetched its assignment (the REST poll): the task is RUNNING as far as we can see."""
        self.note(task_id).fetched.setdefault(worker.hex(), time.time())

    def schedulable(self, pk: bytes, height: int) -> bool:
        w = self.workers.get(pk)
        return (w is not None and w.status == WorkerStatus.ACTIVE and w.stake_sat >= self.config.min_stake_sat
                and height - w.last_heartbeat <= self.config.heartbeat_timeout_blocks
                and self.probe_failures.get(pk, 0) < self.config.probe_failures)

    def _sync_workers(self, height: int) -> None:
        self.workers = {k[1:]: WorkerRecord.decode(v) for k, v in self._read_prefix(bytes((Namespace.WORKER,)))}
        for pk, w in self.workers.items():
            c = w.caps
            info = WorkerInfo(
                worker_id=pk, device=DeviceKind(c.device), accelerator_mem_mb=c.accel_mem_mb,
                models=frozenset(m.decode() for m in c.models), region=c.region.decode(),
                price_sat_per_unit=c.price_sat,
                green_share_ppm=c.green_ppm, carbon_g_per_kwh=c.carbon_g_per_kwh, stake_sat=w.stake_sat,
                reputation_ppm=w.reputation_ppm, latency_ema_us=self.latency_us.get(pk, PRIOR_LATENCY_US),
                capacity=c.capacity, load=min(w.active_tasks, 10**9), active=self.schedulable(pk, height))
            if pk in self.table:
                self.table.update(info)
            else:
                self.table.add(info)

    # -- choosing ------------------------------------------------------------------------------------------------
    def _requirements(self, t: TaskRecord) -> Requirements:
        s = t.spec
        return Requirements(model=s.model.decode(),
                            min_reputation_ppm=max(s.min_reputation_ppm, self.config.min_reputation_ppm),
                            max_price_sat=s.max_price_sat or None,
                            regions=frozenset({s.region.decode()}) if s.region else None,
                            min_stake_sat=self.config.min_stake_sat)

    def _choose(self, t: TaskRecord, task_id: bytes, exclude: Iterable[bytes],
                record: bool = True) -> Optional[Assignment]:
        """Schedule among the workers not excluded (they are taken off the table for this one decision)."""
        off = [pk for pk in set(exclude) - {ZERO_KEY} if pk in self.table and self.table.get(pk).active]
        for pk in off:
            self.table.set_active(pk, False)
        try:
            return self.scheduler.assign(task_id, self._requirements(t), self.strategy,
                                         self.config.preferred_region or None)
        except NoEligibleWorker as e:
            if record:
                self._event(task_id, "no-eligible-worker", filter=e.filter_name, eliminated=e.eliminated)
            return None
        finally:
            for pk in off:
                self.table.set_active(pk, True)

    def _busy(self, pk: bytes) -> None:
        if pk != ZERO_KEY and pk in self.table:
            self.table.set_load(pk, self.table.get(pk).load + 1)

    def _event(self, task_id: bytes, kind: str, **fields: Any) -> None:
        ev = {"kind": kind, "height": self._height, "time": time.time(), **fields}
        events = self.note(task_id).events
        if events and {k: v for k, v in events[-1].items() if k not in ("height", "time")} == \
                {k: v for k, v in ev.items() if k not in ("height", "time")}:
            return  # the same non-event every block (e.g. still no eligible worker): keep one
        events.append(ev)
        self._write(task_id, "event", ev)

    # -- acting --------------------------------------------------------------------------------------------------
    def _post(self, task_id: bytes, payload: Payload, kind: str, **fields: Any) -> bool:
        try:
            txid = self._submit(payload)
        except DuplicateDuty as e:  # another member's coordinator did it first: the next step reads the state
            log.info("orchestration: %s for task %s already done: %s", kind, task_id.hex(), e,
                     extra={"task": task_id.hex(), "reason": e.reason})
            self._event(task_id, f"{kind}-done-already", reason=e.reason, detail=str(e))
            return False
        except Rejected as e:
            log.warning("orchestration: %s for task %s refused: %s", kind, task_id.hex(), e,
                        extra={"task": task_id.hex(), "reason": e.reason})
            self._event(task_id, f"{kind}-refused", reason=e.reason, detail=str(e))
            return False
        self._pending[task_id] = txid
        self._event(task_id, kind, txid=txid.hex(), **fields)
        log.info("orchestration: %s", kind, extra={"task": task_id.hex(), "txid": txid.hex(), **fields})
        return True

    def _assign(self, task_id: bytes, t: TaskRecord, height: int) -> None:
        a = self._choose(t, task_id, ())
        if a is None:
            return
        verifier: Optional[Assignment] = None
        if audited(task_id, self.config.audit_rate_ppm):
            verifier = self._choose(t, task_id, (a.worker_id, a.backup_id or ZERO_KEY))
            if verifier is None:
                self._event(task_id, "audit-without-verifier")
        backup = a.backup_id or ZERO_KEY
        vid = verifier.worker_id if verifier is not None else ZERO_KEY
        payload = TaskAssign(task_id, a.worker_id, backup, vid, height + 1 + self.config.timeout_blocks,
                             self.config.challenge_window_blocks, self.config.heartbeat_grace_blocks)
        if self._post(task_id, payload, "assign", worker=a.worker_id.hex(), backup=backup.hex(), verifier=vid.hex()):
            expl = {"role": "worker", "height": height, **a.explain()}
            if verifier is not None:
                expl["verifier"] = verifier.chosen.explain(verifier.weights)
            self._explain(task_id, expl)
            self._busy(a.worker_id)
            self._busy(vid)

    def _state_get(self, key: bytes) -> Optional[bytes]:
        if self._get_state is not None:
            return self._get_state(key)
        return dict(self._read_prefix(key)).get(key)

    def _overdue(self, t: TaskRecord, role: Role, height: int) -> Optional[str]:
        """Why a due role may be handed on in the next block (None if it may not)."""
        if height + 1 > t.deadline_height:
            return "missed-deadline"
        party = self.workers.get(t.party(role))
        if party is not None and silent(t, party, height + 1):
            return "missed-heartbeats"
        return None

    def _reassign(self, task_id: bytes, t: TaskRecord, role: Role, height: int, reason: str) -> None:
        deadline = height + 1 + self.config.timeout_blocks
        parties = (t.worker, t.backup, t.verifier, t.referee)
        if role == Role.WORKER:
            new = t.backup
            if not backup_fits(StateView(self._state_get), t):  # gone, exited or no longer fitting
                a = self._choose(t, task_id, parties)
                if a is None:
                    return
                new = a.worker_id
            b = self._choose(t, task_id, parties + (new,))
            nb = b.worker_id if b is not None else ZERO_KEY
            payload = TaskReassign(task_id, role, new, nb, deadline)
            expl = None if b is None else {"role": "backup", "height": height, **b.explain()}
        else:
            a = self._choose(t, task_id, parties)
            if a is None:
                return
            new, nb = a.worker_id, ZERO_KEY
            payload = TaskReassign(task_id, role, new, ZERO_KEY, deadline)
            expl = {"role": role.name.lower(), "height": height, **a.explain()}
        if self._post(task_id, payload, "reassign", role=role.name.lower(), replaced=t.party(role).hex(),
                      new=new.hex(), new_backup=nb.hex(), reason=reason, deadline=t.deadline_height):
            if expl is not None:
                self._explain(task_id, expl)
            self._busy(new)

    def _dispute(self, task_id: bytes, t: TaskRecord, height: int) -> None:
        """Send the task to a referee no earlier referee of it was (preferably not its backup either)."""
        tried = [bytes.fromhex(e["referee"]) for e in self.note(task_id).events if e["kind"] == "dispute"]
        base = (t.worker, t.verifier, t.referee, *tried)
        a = self._choose(t, task_id, base + (t.backup,), record=False) or self._choose(t, task_id, base)
        if a is None:
            self._event(task_id, "unresolvable", detail="no further referee available")
            return
        if self._post(task_id, TaskDispute(task_id, a.worker_id, height + 1 + self.config.timeout_blocks),
                      "dispute", referee=a.worker_id.hex()):
            self._explain(task_id, {"role": "referee", "height": height, **a.explain()})
            self._busy(a.worker_id)

    def _after_results(self, task_id: bytes, t: TaskRecord, height: int) -> None:
        if t.verifier != ZERO_KEY and not _match(t, Role.WORKER, Role.VERIFIER):
            self._dispute(task_id, t, height)
            return
        if height + 1 < t.result_height + t.window_blocks:
            return  # the challenge window is still open
        w, v, tr = split(t.bounty_sat, self.config, t.verifier != ZERO_KEY)
        self._post(task_id, TaskSettle(task_id, w, v, tr), "settle", worker_sat=w, verifier_sat=v, treasury_sat=tr)

    def _resolve(self, task_id: bytes, t: TaskRecord, height: int) -> None:
        loser = verdict(t)
        if loser is None:  # the referee agrees with neither side (or both): ask another one
            self._event(task_id, "referee-undecided", referee=t.referee.hex())
            self._dispute(task_id, t, height)
            return
        stake = self.workers[t.party(loser)].stake_sat
        slash = stake * self.config.slash_ppm // PPM
        challenger = slash * self.config.slash_challenger_ppm // PPM
        exec_share, ref_share, treasury = split(t.bounty_sat, self.config, True)
        worker_sat, verifier_sat = (0, exec_share) if loser == Role.WORKER else (exec_share, 0)
        resolve = TaskResolve(task_id, loser, slash, challenger, worker_sat, verifier_sat, ref_share, treasury)
        self._post(task_id, resolve,
                   "resolve", loser=loser.name.lower(), slashed=t.party(loser).hex(), slash_sat=slash,
                   challenger_sat=challenger, burned_sat=slash - challenger)

    def step(self) -> None:
        """One pass over the committed state at the current tip (call again after each block)."""
        height = self._tip_height()
        for tid, txid in list(self._pending.items()):
            st = self._tx_status(txid)
            if st is None or st["status"] != "pending":
                if st is not None and st["status"] == "dropped":
                    self._event(tid, "dropped", txid=txid.hex(), reason=st.get("reason"))
                del self._pending[tid]
        self._height = height
        self._sync_workers(height)
        tasks = self._open_tasks(height)
        for t, tid in tasks:
            if tid in self._pending:
                continue
            if t.status == TaskStatus.SUBMITTED:
                self._assign(tid, t, height)
            elif t.status in (TaskStatus.ASSIGNED, TaskStatus.DISPUTED):
                due = t.waiting_for()
                overdue = [(r, why) for r, why in ((r, self._overdue(t, r, height)) for r in due) if why]
                if overdue:
                    self._reassign(tid, t, overdue[0][0], height, overdue[0][1])
                elif not due:
                    self._resolve(tid, t, height)
            elif t.status == TaskStatus.RESULT_SUBMITTED:
                self._after_results(tid, t, height)
        self.steps += 1

    def _open_tasks(self, height: int) -> list[tuple[TaskRecord, bytes]]:
        """The open tasks, oldest first: a full scan the first time (or without block access), then the
        previously open ones plus the submissions in the blocks committed since."""
        get, blocks = self._get_state, self._block_txs
        new: set[bytes] = set()
        full = self._scanned_to is None or get is None or blocks is None
        if not full and blocks is not None and self._scanned_to is not None:
            for h in range(self._scanned_to + 1, height + 1):
                txs = blocks(h)
                if txs is None:
                    full = True
                    break
                new.update(t.txid for t in txs if t.type == TxType.TASK_SUBMIT)
        if full or get is None:
            raw = [(k[1:], v) for k, v in self._read_prefix(bytes((Namespace.TASK,)))]
        else:
            values = ((tid, get(task_key(tid))) for tid in self.open_tasks | new)
            raw = [(tid, v) for tid, v in values if v is not None]
        self._scanned_to = height
        tasks = [(t, tid) for t, tid in ((TaskRecord.decode(v), tid) for tid, v in raw)
                 if t.status not in (TaskStatus.SETTLED, TaskStatus.CANCELLED)]
        tasks.sort(key=lambda x: (x[0].submit_height, x[1]))
        self.open_tasks = {tid for _, tid in tasks}
        return tasks

    # -- probes --------------------------------------------------------------------------------------------------
    async def probe_all(self, session: aiohttp.ClientSession) -> None:
        """Time one GET /ping round trip to every registered worker's endpoint (latency EMA and health)."""
        targets = [(pk, w.caps.endpoint.decode()) for pk, w in self.workers.items()
                   if w.status == WorkerStatus.ACTIVE and w.caps.endpoint]
        await asyncio.gather(*(self._probe(session, pk, ep) for pk, ep in targets))

    def probe_session(self) -> aiohttp.ClientSession:
        """The HTTP session of the probes: host names resolve to public addresses only unless
        probe_private_endpoints (IP literals are checked in _probe)."""
        if self.config.probe_private_endpoints:
            return aiohttp.ClientSession()
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=PublicOnlyResolver()))

    async def _probe(self, session: aiohttp.ClientSession, pk: bytes, endpoint: str) -> None:
        t0 = time.perf_counter()
        try:
            if not self.config.probe_private_endpoints:
                check_public_literal(endpoint)
            async with session.get(f"http://{endpoint}/ping", timeout=aiohttp.ClientTimeout(total=2)) as r:
                body = await r.json()
            if r.status != 200 or not isinstance(body, dict) or body.get("worker") != pk.hex():
                raise ValueError(f"unexpected answer {r.status} {str(body)[:80]}")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            n = self.probe_failures.get(pk, 0) + 1
            self.probe_failures[pk] = n
            if n == self.config.probe_failures:
                log.warning("orchestration: worker %s failed %d probes, off the schedule: %s", pk.hex(), n, e)
            return
        rtt = int((time.perf_counter() - t0) * 1_000_000)
        self.latency_us[pk] = latency_ema(self.latency_us.get(pk, rtt), rtt)
        self.probe_failures[pk] = 0

    async def run(self) -> None:
        """Step on every new tip (and while a posted transaction is pending); probe concurrently."""
        poll = self.config.poll_interval_ms / 1000
        async with self.probe_session() as session:
            prober = asyncio.create_task(self._probe_loop(session), name="orchestration-probes")
            try:
                while True:
                    if self._tip_height() != self._height or self._pending or self._reprobed:
                        self._reprobed = False
                        try:
                            self.step()
                        except Exception:  # a bug here must not stop the daemon's other work; logged loudly
                            log.exception("orchestration step failed")
                    if prober.done():
                        prober.result()  # re-raise what ended it (a bug): the node reports the task failed
                    await asyncio.sleep(poll)
            finally:
                prober.cancel()
                await asyncio.gather(prober, return_exceptions=True)
                self.close()

    async def _probe_loop(self, session: aiohttp.ClientSession) -> None:
        while True:
            await self.probe_all(session)
            self._reprobed = True  # health may have changed: reschedule even without a new block
            await asyncio.sleep(self.config.probe_interval_ms / 1000)


class PrivateEndpoint(ValueError):
    """A worker's probe endpoint on a loopback, private, link-local or otherwise non-public address, refused while
    orchestration.probe_private_endpoints is false (the default outside local and regtest)."""


def check_public_literal(endpoint: str) -> None:
    """Raise PrivateEndpoint if endpoint's host is an IP address that is not globally routable (host names are
    checked when they resolve, by PublicOnlyResolver)."""
    host = urllib.parse.urlsplit(f"http://{endpoint}").hostname or ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if not ip.is_global:
        raise PrivateEndpoint(f"endpoint {endpoint} is not a public address (orchestration.probe_private_endpoints)")


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's threaded resolver keeping only globally routable addresses: a worker's host name cannot steer the
    coordinator's probes to its own host or private network (the connection goes to an address checked here)."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        public = [a for a in found if ipaddress.ip_address(a["host"]).is_global]
        if not public:
            raise OSError(f"{host} resolves to no public address (orchestration.probe_private_endpoints)")
        return public

    async def close(self) -> None:
        await self._inner.close()


def _match(t: TaskRecord, a: Role, b: Role) -> bool:
    ra, rb = t.result(a), t.result(b)
    if ra is None or rb is None:
        return False
    return fingerprints_match(parse_fingerprint(ra[1], ra[0]), parse_fingerprint(rb[1], rb[0]))
