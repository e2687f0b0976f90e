"""Routes of the FL subsystem: FL jobs, their rounds and rewards, and the content-addressed model store
(l2d/model_store.py).

Reads come from the committed state. Writes are the FL coordinator's (admin bearer token): upload a model,
commit a round (turned into an FL_ROUND transaction signed with the federation key), finish a job (an FL_FINISH
paying the contribution split the ledger itself computes). Job posts and registrations are client-signed
transactions sent to POST /api/l2/tx like any other.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core.errors import DecodeError
from ..core.fl import JobRecord, JobStatus, RoundRecord, fl_job_key, fl_round_key, reward_split
from ..core.fl_tx import MAX_PARTICIPANTS, PPM, FlFinish, FlRound, RoundParticipant
from ..core.state import Namespace
from ..model_store import CorruptModel, ModelStore
from ..views import ChainView
from .deps import ADMISSION, CHAIN, MODELS
from .http import ApiError, admin, hex32, path_hex32, read_json_object, uint


def _job(chain: ChainView, job_id: bytes) -> JobRecord:
    raw = chain.get_state(fl_job_key(job_id))
    if raw is None:
        raise ApiError(404, "not-found", f"no FL job {job_id.hex()} (it may still be pending)")
    return JobRecord.decode(raw)


def job_json(chain: ChainView, models: ModelStore, job_id: bytes, job: JobRecord, *,
             detail: bool = False) -> dict[str, Any]:
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
            raw = chain.get_state(fl_round_key(job_id, n))
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
                "model_available": models.has(c.params_hash),
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
    chain, models = request.app[CHAIN], request.app[MODELS]
    recs = chain.records(bytes((Namespace.FL_JOB,)))
    items = [job_json(chain, models, k[1:], JobRecord.decode(v)) for k, v in recs]
    items.sort(key=lambda i: (i["post_height"], i["job_id"]))
    return web.json_response({"height": chain.tip.height, "jobs": items})


async def job(request: web.Request) -> web.Response:
    """GET /api/fl/jobs/{id}: the job with its rounds (hashes, metrics, participants) and rewards (paid, or the
    split the finish would pay now)."""
    chain, models = request.app[CHAIN], request.app[MODELS]
    jid = path_hex32(request, "id")
    return web.json_response({"height": chain.tip.height,
                              **job_json(chain, models, jid, _job(chain, jid), detail=True)})


async def round_proof(request: web.Request) -> web.Response:
    """GET /api/fl/jobs/{id}/rounds/{n}: one round commitment with its state proof against the committed tip's
    root, so an auditor can check round -> params hash -> model bytes without trusting this node."""
    jid = path_hex32(request, "id")
    n = uint(request.match_info["n"], "round", 1, 2**16 - 1)
    key = fl_round_key(jid, n)
    proven = await request.app[CHAIN].prove(key)
    raw, proof, tip = proven.value, proven.proof, proven.tip
    if raw is None or proof is None:
        raise ApiError(404, "not-found", f"FL job {jid.hex()} has no committed round {n}")
    rec = RoundRecord.decode(raw)
    return web.json_response({
        "job_id": jid.hex(), "round": rec.commitment.round, "height": rec.height,
        "params_hash": rec.commitment.params_hash.hex(), "key": key.hex(), "value": raw.hex(),
        "proof": proof.encode().hex(), "state_root": tip.state_root.hex(), "tip_height": tip.height,
    })


async def model(request: web.Request) -> web.StreamResponse:
    """GET /api/fl/models/{hash}: the canonical parameter bytes whose SHA-256 is hash."""
    h = path_hex32(request, "hash")
    try:
        raw = request.app[MODELS].get(h)
    except CorruptModel as e:  # a damaged file is never served under a name it does not have
        raise ApiError(500, "corrupt", str(e)) from None
    if raw is None:
        raise ApiError(404, "not-found", f"no model {h.hex()}")
    return web.Response(body=raw, headers={"Content-Type": "application/octet-stream"})


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int:
    v = body.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, "bad-field", f"field {name!r} must be an integer in {lo}..{hi}")
    return v


def _hex32(body: dict[str, Any], name: str) -> bytes:
    return hex32(body.get(name), f"field {name!r}", "bad-field")


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


@admin
async def put_model(request: web.Request) -> web.Response:
    """PUT /api/fl/models (admin, application/octet-stream): store the bytes under their SHA-256."""
    raw = await request.read()
    if not raw:
        raise ApiError(400, "malformed", "empty model")
    h = request.app[MODELS].put(raw)
    return web.json_response({"params_hash": h.hex(), "size": len(raw)}, status=201)


@admin
async def post_round(request: web.Request) -> web.Response:
    """POST /api/fl/jobs/{id}/rounds (admin) {round, params_hash, prev_params_hash, accuracy_ppm, loss_ppm,
    update_bytes, dp_epsilon_ppm, participants: [{key, num_examples, accepted}]}: 202 {"txid"}.

    The model named params_hash must have been uploaded first: the ledger never commits to parameters this
    node cannot serve. Consensus checks (order, hash chain, registration) answer 400 with their reason.
    """
    jid = path_hex32(request, "id")
    body = await read_json_object(request)
    payload = round_from_json(jid, body)
    if not request.app[MODELS].has(payload.params_hash):
        raise ApiError(409, "conflict", f"upload model {payload.params_hash.hex()} before committing to it")
    txid = request.app[ADMISSION].submit_as_member(payload)
    return web.json_response({"txid": txid.hex()}, status=202)


@admin
async def post_finish(request: web.Request) -> web.Response:
    """POST /api/fl/jobs/{id}/finish (admin): close the job with the last committed round's model, paying the
    contribution split of the committed state: 202 {"txid", "rewards"}."""
    jid = path_hex32(request, "id")
    await read_json_object(request, allow_empty=True)
    job_rec = _job(request.app[CHAIN], jid)
    rewards = reward_split(job_rec)
    txid = request.app[ADMISSION].submit_as_member(FlFinish(jid, job_rec.last_params_hash, rewards))
    return web.json_response({"txid": txid.hex(), "rewards": {k.hex(): a for k, a in rewards}}, status=202)


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/fl/jobs", jobs)
    r.add_get("/api/fl/jobs/{id}", job)
    r.add_post("/api/fl/jobs/{id}/rounds", post_round)
    r.add_get("/api/fl/jobs/{id}/rounds/{n}", round_proof)
    r.add_post("/api/fl/jobs/{id}/finish", post_finish)
    r.add_get("/api/fl/models/{hash}", model)
    r.add_put("/api/fl/models", put_model)
