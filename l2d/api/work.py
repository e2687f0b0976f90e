"""Routes of the work subsystem: task submission, tasks with their assignment explanation, workers, and each
worker's due assignments (what the l2-worker agent polls)."""
from __future__ import annotations

from typing import Any, Optional

from aiohttp import web

from ..core import tx as T
from ..core.errors import DecodeError
from ..core.payload import TxType
from ..core.state import Namespace
from ..core.work import TaskRecord, TaskStatus, WorkerRecord, task_key, worker_key
from ..core.work_tx import ZERO_KEY, Role
from .deps import ADMISSION, CHAIN, ORCHESTRATION
from .http import HEX, ApiError, path_hex32, read_json_object, status_query


def _hex(k: bytes) -> Optional[str]:
    return None if k == ZERO_KEY else k.hex()


def worker_json(pk: bytes, w: WorkerRecord, live: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    c = w.caps
    d: dict[str, Any] = {
        "worker": pk.hex(), "status": w.status.name, "stake_sat": w.stake_sat, "reputation_ppm": w.reputation_ppm,
        "slashes": w.slashes, "tasks_done": w.tasks_done, "tasks_failed": w.tasks_failed,
        "active_tasks": w.active_tasks, "last_heartbeat": w.last_heartbeat, "registered_height": w.registered_height,
        "exit_height": w.exit_height,
        "capabilities": {"device": c.device, "accel_mem_mb": c.accel_mem_mb, "price_sat": c.price_sat,
                         "green_ppm": c.green_ppm, "carbon_g_per_kwh": c.carbon_g_per_kwh, "capacity": c.capacity,
                         "region": c.region.decode(), "models": [m.decode() for m in c.models],
                         "endpoint": c.endpoint.decode()},
    }
    if live is not None:
        d["live"] = live
    return d


def task_json(tid: bytes, t: TaskRecord) -> dict[str, Any]:
    results = {}
    for role in Role:
        r = t.result(role)
        if r is not None:
            results[role.name.lower()] = {"output": list(r[0]), "fingerprint": r[1].hex()}
    return {
        "task_id": tid.hex(), "status": t.status.name, "outcome": t.outcome.name, "submitter": t.submitter.hex(),
        "bounty_sat": t.bounty_sat, "submit_height": t.submit_height, "worker": _hex(t.worker),
        "backup": _hex(t.backup), "verifier": _hex(t.verifier), "referee": _hex(t.referee),
        "deadline_height": t.deadline_height, "window_blocks": t.window_blocks, "result_height": t.result_height,
        "timeouts": t.timeouts, "waiting_for": [r.name.lower() for r in t.waiting_for()],
        "phase": t.phase().name.lower(), "window_ends_height": t.window_ends_height,
        "spec": {"model": t.spec.model.decode(), "images": t.spec.images, "region": t.spec.region.decode(),
                 "min_reputation_ppm": t.spec.min_reputation_ppm, "max_price_sat": t.spec.max_price_sat},
        "results": results,
    }


async def submit(request: web.Request) -> web.Response:
    """POST /api/orchestration/submit {"tx": hex of a signed TASK_SUBMIT}: 202 {"task_id"} (the txid)."""
    network = request.app[CHAIN].network
    body = await read_json_object(request)
    tx_hex = body.get("tx")
    if not isinstance(tx_hex, str) or len(tx_hex) > 2 * T.MAX_TX_SIZE or not HEX.fullmatch(tx_hex):
        raise ApiError(400, "malformed", "field 'tx' must be the hex encoding of a signed task submission")
    raw = bytes.fromhex(tx_hex)
    try:
        tx = T.decode(raw, network)
    except DecodeError:
        tx = None  # admission names the decoding error
    if tx is not None and tx.type != TxType.TASK_SUBMIT:
        raise ApiError(400, "wrong-type", f"expected a task_submit transaction, got {tx.type.name.lower()}")
    txid = request.app[ADMISSION].submit(raw)
    return web.json_response({"task_id": txid.hex(), "txid": txid.hex()}, status=202)


async def tasks(request: web.Request) -> web.Response:
    """GET /api/orchestration/tasks[?status=S]: every task in the committed state (oldest first)."""
    chain = request.app[CHAIN]
    want = status_query(request, TaskStatus.__members__)
    items = [task_json(k[1:], TaskRecord.decode(v)) for k, v in chain.records(bytes((Namespace.TASK,)))]
    items = [i for i in items if want is None or i["status"] == want]
    items.sort(key=lambda i: (i["submit_height"], i["task_id"]))
    return web.json_response({"height": chain.tip.height, "tasks": items})


async def task(request: web.Request) -> web.Response:
    """GET /api/orchestration/tasks/{id}: the record, and the coordinator's explanation of every choice."""
    tid = path_hex32(request, "id")
    raw = request.app[CHAIN].get_state(task_key(tid))
    if raw is None:
        raise ApiError(404, "not-found", f"no task {tid.hex()} (it may still be pending)")
    d = task_json(tid, TaskRecord.decode(raw))
    svc = request.app[ORCHESTRATION]
    notes = None if svc is None else svc.notes.get(tid)
    d["explanation"] = [] if notes is None else notes.explanations
    d["events"] = [] if notes is None else notes.events
    d["running"] = (d["status"] == "ASSIGNED" and notes is not None and d["worker"] in notes.fetched)
    return web.json_response(d)


async def workers(request: web.Request) -> web.Response:
    """GET /api/orchestration/workers: the registry with live probe figures and whether each is schedulable."""
    chain = request.app[CHAIN]
    svc = request.app[ORCHESTRATION]
    height = chain.tip.height
    out = []
    for k, v in chain.records(bytes((Namespace.WORKER,))):
        pk = k[1:]
        live = None
        if svc is not None:
            live = {"latency_ema_us": svc.latency_us.get(pk), "probe_failures": svc.probe_failures.get(pk, 0),
                    "schedulable": svc.schedulable(pk, height)}
        out.append(worker_json(pk, WorkerRecord.decode(v), live))
    return web.json_response({"height": height, "workers": out})


async def assignments(request: web.Request) -> web.Response:
    """GET /api/orchestration/workers/{id}/assignments: tasks whose result is due from this worker."""
    chain = request.app[CHAIN]
    pk = path_hex32(request, "id")
    if chain.get_state(worker_key(pk)) is None:
        raise ApiError(404, "not-found", f"worker {pk.hex()} is not registered")
    svc = request.app[ORCHESTRATION]
    if svc is not None and svc.steps:  # the coordinator knows the open tasks: no scan of every task ever
        values = ((tid, chain.get_state(task_key(tid))) for tid in sorted(svc.open_tasks))
        records = [(tid, v) for tid, v in values if v is not None]
    else:
        records = [(k[1:], v) for k, v in chain.records(bytes((Namespace.TASK,)))]
    out = []
    for tid, v in records:
        t = TaskRecord.decode(v)
        for role in t.waiting_for():
            if t.party(role) == pk:
                out.append({"task_id": tid.hex(), "role": role.name.lower(), "model": t.spec.model.decode(),
                            "input": t.spec.input.hex(), "deadline_height": t.deadline_height})
                if svc is not None:
                    svc.mark_fetched(tid, pk)
    return web.json_response({"height": chain.tip.height, "assignments": out})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_post("/api/orchestration/submit", submit)
    r.add_get("/api/orchestration/tasks", tasks)
    r.add_get("/api/orchestration/tasks/{id}", task)
    r.add_get("/api/orchestration/workers", workers)
    r.add_get("/api/orchestration/workers/{id}/assignments", assignments)
