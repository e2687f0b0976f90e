"""REST routes of the fl subsystem (registered by l2d.api.make_app): FL jobs, their rounds and rewards, and the
content-addressed model store (a file per parameter set, named by the SHA-256 of its bytes).

Reads come from the committed state. Writes are the FL coordinator's (admin bearer token): upload a model,
commit a round (turned into an FL_ROUND transaction signed with the federation key), finish a job (an FL_FINISH
paying the contribution split the ledger itself computes). Job posts and registrations are client-signed
transactions sent to POST /api/l2/tx like any other.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .api import ApiError, admin, node_of, path_hex32, read_json_object
from .core.errors import DecodeError
from .core.fl import JobRecord, JobStatus, RoundRecord, fl_job_key, fl_round_key, reward_split
from .core.fl_tx import MAX_PARTICIPANTS, PPM, FlFinish, FlRound, RoundParticipant
from .core.state import Namespace

if TYPE_CHECKING:
    from .node import Node

_HEX64 = re.compile(r"[0-9a-f]{64}")
MODEL_DIR = "fl-models"






def model_dir(node: "Node") -> Path:
    return Path(node.config.node.data_dir) / MODEL_DIR


def model_path(node: "Node", params_hash: bytes) -> Path:
    return model_dir(node) / f"{params_hash.hex()}.params"


def store_model(node: "Node", raw: bytes) -> bytes:
    """Write raw under its SHA-256 (atomically, fsynced); returns the hash. Storing the same bytes twice is a no-op."""
    h = hashlib.sha256(raw).digest()
    p = model_path(node, h)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    return h


def _job(node: "Node", job_id: bytes) -> JobRecord:
    raw = node.store.get_state(fl_job_key(job_id))
    if raw is None:
        raise ApiError(404, "not-found", f"no FL job {job_id.hex()} (it may still be pending)")
    return JobRecord.decode(raw)


def job_json(node: "Node", job_id: bytes, job: JobRecord, *, detail: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "job_id": job_id.hex(), "status": job.status.name, "poster": job.poster.hex(),
        "reward_pool_sat": job.reward_pool_sat, "config_hash": job.config_hash.hex(), "rounds": job.rounds,
        "min_participants": job.min_participants, "max_participants": job.max_participants,
        "post_height": job.post_height, "rounds_done": job.rounds_done,
        "last_params_hash": job.last_params_hash.hex() if job.rounds_done else None,
        "paid_sat": job.paid_sat, "refunded_sat": job.refunded_sat, "finish_height": job.finish_height,
        "participants": [{"key": p.key.hex(), "node_key": p.node_key.decode(), "accepted_examples": p.accepted_examples,
                          "rounds_accepted": p.rounds_accepted, "reward_sat": p.reward_sat,
                          "register_height": p.register_height} for p in job.participants],
    }
    if detail:
        rounds = []
        for n in range(1, job.rounds_done + 1):
            raw = node.store.get_state(fl_round_key(job_id, n))
            if raw is None:  # cannot happen in a consistent state; say so rather than invent a round
                raise RuntimeError(f"FL job {job_id.hex()} round {n} is missing from the state")
            rec = RoundRecord.decode(raw)
            c = rec.commitment
            rounds.append({
                "round": c.round, "height": rec.height, "params_hash": c.params_hash.hex(),
                "prev_params_hash": c.prev_params_hash.hex(),
                "metrics": {"accuracy_ppm": c.accuracy_ppm, "loss_ppm": c.loss_ppm, "update_bytes": c.update_bytes,
                            "dp_epsilon_ppm": c.dp_epsilon_ppm},
                "participants": [{"key": p.key.hex(), "num_examples": p.num_examples, "accepted": p.accepted}
                                 for p in c.participants],
                "model_available": model_path(node, c.params_hash).exists(),
            })
        d["rounds_detail"] = rounds
        closed = job.status != JobStatus.OPEN
        d["rewards"] = ({p.key.hex(): p.reward_sat for p in job.participants if p.reward_sat} if closed
                        else {k.hex(): a for k, a in reward_split(job)})
        d["rewards_final"] = closed
        d["final_model"] = job.last_params_hash.hex() if closed and job.rounds_done else None
    return d


async def jobs(request: web.Request) -> web.Response:
    """GET /api/fl/jobs: every FL job in the committed state (oldest first)."""
    node = node_of(request)
    with node.store.reader() as r:
        recs = list(r.iter_prefix(bytes((Namespace.FL_JOB,))))
    items = [job_json(node, k[1:], JobRecord.decode(v)) for k, v in recs]
    items.sort(key=lambda i: (i["post_height"], i["job_id"]))
    return web.json_response({"height": node.tip.height, "jobs": items})


async def job(request: web.Request) -> web.Response:
    """GET /api/fl/jobs/{id}: the job with its rounds (hashes, metrics, participants) and rewards (paid, or the
    split the finish would pay now)."""
    node = node_of(request)
    jid = path_hex32(request, "id")
    return web.json_response({"height": node.tip.height, **job_json(node, jid, _job(node, jid), detail=True)})


async def round_proof(request: web.Request) -> web.Response:
    """GET /api/fl/jobs/{id}/rounds/{n}: one round commitment with its state proof against the committed tip's
    root, so an auditor can check round -> params hash -> model bytes without trusting this node."""
    node = node_of(request)
    jid = path_hex32(request, "id")
    n_s = request.match_info["n"]
    if not n_s.isdigit() or not 1 <= int(n_s) < 2**16:
        raise ApiError(400, "malformed", "round must be an integer in 1..65535")
    key = fl_round_key(jid, int(n_s))

    def value_of(k: bytes) -> bytes:
        v = node.store.get_state(k)
        if v is None:
            raise RuntimeError(f"key {k.hex()} is in the tree but not in the store")
        return v

    async with node.tree_lock:  # the tree equals the committed state while no block is in flight
        tip = node.tip
        raw = node.store.get_state(key)
        proof = node.ledger.tree.prove(key, value_of) if raw is not None else None
    if raw is None or proof is None:
        raise ApiError(404, "not-found", f"FL job {jid.hex()} has no committed round {n_s}")
    rec = RoundRecord.decode(raw)
    return web.json_response({
        "job_id": jid.hex(), "round": rec.commitment.round, "height": rec.height,
        "params_hash": rec.commitment.params_hash.hex(), "key": key.hex(), "value": raw.hex(),
        "proof": proof.encode().hex(), "state_root": tip.state_root.hex(), "tip_height": tip.height,
    })


async def model(request: web.Request) -> web.StreamResponse:
    """GET /api/fl/models/{hash}: the canonical parameter bytes whose SHA-256 is hash."""
    node = node_of(request)
    h = path_hex32(request, "hash")
    p = model_path(node, h)
    if not p.exists():
        raise ApiError(404, "not-found", f"no model {h.hex()}")
    raw = p.read_bytes()
    if hashlib.sha256(raw).digest() != h:  # a damaged file is never served under a name it does not have
        raise ApiError(500, "corrupt", f"stored model {h.hex()} does not hash to its name")
    return web.Response(body=raw, headers={"Content-Type": "application/octet-stream"})


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, "bad-field", f"field {name!r} must be an integer in {lo}..{hi}")
    return v


def _hex32(body: dict[str, Any], name: str) -> bytes:
    v = body.get(name)
    if not isinstance(v, str) or not _HEX64.fullmatch(v):
        raise ApiError(400, "bad-field", f"field {name!r} must be 64 lowercase hex characters")
    return bytes.fromhex(v)


def round_from_json(job_id: bytes, body: dict[str, Any]) -> FlRound:
    """The FL_ROUND payload a coordinator's JSON describes; ApiError 400 naming the first bad field."""
    parts_in = body.get("participants")
    if not isinstance(parts_in, list) or not 1 <= len(parts_in) <= MAX_PARTICIPANTS:
        raise ApiError(400, "bad-field", f"field 'participants' must be a list of 1..{MAX_PARTICIPANTS} objects")
    parts = []
    for p in parts_in:
        if not isinstance(p, dict) or not isinstance(p.get("accepted"), bool):
            raise ApiError(400, "bad-field", "each participant is {key, num_examples, accepted: bool}")
        parts.append((_hex32(p, "key"), _int(p, "num_examples", 0, 2**32 - 1), p["accepted"]))
    try:
        return FlRound(job_id, _int(body, "round", 1, 2**16 - 1), _hex32(body, "params_hash"),
                       _hex32(body, "prev_params_hash"), _int(body, "accuracy_ppm", 0, PPM),
                       _int(body, "loss_ppm", 0, 2**64 - 1), _int(body, "update_bytes", 0, 2**64 - 1),
                       _int(body, "dp_epsilon_ppm", 0, 2**64 - 1),
                       tuple(RoundParticipant(k, n, a) for k, n, a in sorted(parts)))
    except DecodeError as e:
        raise ApiError(400, "out-of-range", str(e)) from None


async def _put_model(request: web.Request) -> web.Response:
    """PUT /api/fl/models (admin, application/octet-stream): store the bytes under their SHA-256."""
    node = node_of(request)
    raw = await request.read()
    if not raw:
        raise ApiError(400, "malformed", "empty model")
    h = store_model(node, raw)
    return web.json_response({"params_hash": h.hex(), "size": len(raw)}, status=201)


async def _post_round(request: web.Request) -> web.Response:
    """POST /api/fl/jobs/{id}/rounds (admin) {round, params_hash, prev_params_hash, accuracy_ppm, loss_ppm,
    update_bytes, dp_epsilon_ppm, participants: [{key, num_examples, accepted}]}: 202 {"txid"}.

    The model named params_hash must have been uploaded first: the ledger never commits to parameters this
    node cannot serve. Consensus checks (order, hash chain, registration) answer 400 with their reason.
    """
    node = node_of(request)
    jid = path_hex32(request, "id")
    body = await read_json_object(request)
    payload = round_from_json(jid, body)
    if not model_path(node, payload.params_hash).exists():
        raise ApiError(409, "conflict", f"upload model {payload.params_hash.hex()} before committing to it")
    txid = node.submit_as_federation(payload)
    return web.json_response({"txid": txid.hex()}, status=202)


async def _post_finish(request: web.Request) -> web.Response:
    """POST /api/fl/jobs/{id}/finish (admin): close the job with the last committed round's model, paying the
    contribution split of the committed state: 202 {"txid", "rewards"}."""
    node = node_of(request)
    jid = path_hex32(request, "id")
    await read_json_object(request, allow_empty=True)
    job_rec = _job(node, jid)
    rewards = reward_split(job_rec)
    txid = node.submit_as_federation(FlFinish(jid, job_rec.last_params_hash, rewards))
    return web.json_response({"txid": txid.hex(), "rewards": {k.hex(): a for k, a in rewards}}, status=202)


def _admin_routes() -> tuple[Any, Any, Any]:
    return admin(_put_model), admin(_post_round), admin(_post_finish)


def add_routes(r: web.UrlDispatcher) -> None:
    """Add this subsystem's routes; handlers reach the node as request.app[NODE_KEY] (from l2d.api, imported inside functions)."""
    put_model, post_round, post_finish = _admin_routes()
    r.add_get("/api/fl/jobs", jobs)
    r.add_get("/api/fl/jobs/{id}", job)
    r.add_post("/api/fl/jobs/{id}/rounds", post_round)
    r.add_get("/api/fl/jobs/{id}/rounds/{n}", round_proof)
    r.add_post("/api/fl/jobs/{id}/finish", post_finish)
    r.add_get("/api/fl/models/{hash}", model)
    r.add_put("/api/fl/models", put_model)
