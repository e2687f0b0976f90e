"""`l2-gateway`: an OpenAI-compatible front for the registered language models, paid per token through paid sessions
and recorded on the L2 (docs/inference.md, "Gateway").

Its own process, not a part of the daemon: it holds long streaming HTTP requests and a tokenizer, restarts and
scales apart from the member's consensus work, and talks to the daemon over REST like any client. It serves

    GET  /v1/models             the registered models an ACTIVE worker offers, with pricing, context length, workers
    POST /v1/chat/completions   messages -> the chat template -> a worker's /v1/generate, streamed (SSE: the first
                                delta carries the role, `data: [DONE]` last; usage only if stream_options.include_usage)
                                or not
    POST /v1/completions        a prompt string, the same way
    POST /v1/estimate           the exact prompt tokens, the most the request can cost, a quote valid to an L2 height
    GET  /v1/jobs/{id}          one request's status, tokens, cost, worker and the L2 transaction that recorded it
    GET  /v1/gateway            the gateway's L2 key (the server of its sessions) and fee split

The API key is a paid session (`sk-l2-` ‖ session id ‖ session secret, hex; `l2-gateway open-session` opens one):
the session's server must be this gateway, its key the secret's, its price 1 msat per unit. Each request reserves
its largest cost (prompt + max_tokens at the dearest offer) against the deposit (402 insufficient_quota when it does
not fit), is routed by the scheduler's weighted score (reputation, time to first token, price, green share) with
failover before the first token, and is billed for the tokens the client actually received at the serving worker's
on-chain prices. A Completion transaction records each one (hashes of prompt, output and fingerprint; the split
worker / verifier / treasury by basis points, the rest burned), one block at a time, in order.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, AsyncIterator, Optional

import aiohttp
from aiohttp import web
from coincurve import PrivateKey

from l2d.aio import serve_app, until_signalled
from l2d.client import ApiError, AsyncClient, Unreachable
from l2d.core.errors import OutOfRange
from l2d.core.model_tx import BP, DEFAULT_SPLIT, Completion, Sampling, fp_leaf, result_digest, token_cost_msat
from l2d.core.session_tx import SessionOpen
from l2d.core.tx import public_key, xonly_key
from l2d.keys import load_secret
from l2d.logs import setup_logging

from .llm import TopK, audit_drawn, fingerprint, token_hash
from .scheduler import Requirements, Scheduler, Weights
from .workers import DeviceKind, WorkerInfo, WorkerTable, latency_ema

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
KEY_PREFIX = "sk-l2-"
QUOTE_BLOCKS = 6  # an estimate's quote holds this many L2 blocks
EXPIRY_MARGIN = 2  # a session must stay open this many blocks past the tip for a request (time to record it)
MAX_JOBS = 10_000  # jobs kept for GET /v1/jobs/{id}, oldest dropped first
PRIOR_TTFT_US = 100_000  # a worker's time to first token until it has served one
DOWN_S = 30.0  # a worker that failed before its first token is tried last for this long
DEFAULT_WEIGHTS = "reputation=0.2,latency=0.2,cost=0.5,green=0.1"
ZERO = bytes(32)


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: Optional[str] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


class WorkerFault(Exception):
    """A worker's stream broke the protocol (a value out of range, too many tokens, a result not its own)."""


def bad_key(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", code="invalid_api_key")


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except OpenAIError as e:
        return e.response()
    except web.HTTPException as e:
        return OpenAIError(e.status, e.reason or "error", "invalid_request_error").response()
    except (ApiError, Unreachable) as e:
        log.warning("the L2 node failed a request: %s", e)
        return OpenAIError(503, f"the L2 node is unavailable: {e}", "server_error", code="l2_unavailable").response()


def api_key(session_id: bytes, secret: bytes) -> str:
    return KEY_PREFIX + session_id.hex() + secret.hex()


def parse_api_key(header: Optional[str]) -> tuple[bytes, bytes]:
    """(session id, session secret) from an `Authorization: Bearer sk-l2-…` header (401 when it is not one)."""
    token = (header or "").removeprefix("Bearer ").strip()
    if not token.startswith(KEY_PREFIX) or len(token) != len(KEY_PREFIX) + 128:
        raise bad_key("Incorrect API key: an l2-gateway key is sk-l2- followed by a paid session's id and secret "
                      "(l2-gateway open-session makes one)")
    try:
        sid, secret = bytes.fromhex(token[len(KEY_PREFIX):][:64]), bytes.fromhex(token[len(KEY_PREFIX) + 64:])
        PrivateKey(secret)
    except ValueError:
        raise bad_key("Incorrect API key: not hex, or not a valid secret") from None
    return sid, secret


@dataclass
class Tab:
    """What this gateway knows of one paid session, in msat: the deposit, what it billed (recorded or being
    recorded) and what requests in flight may still cost."""

    deposit_msat: int
    billed_msat: int = 0
    reserved_msat: int = 0

    def available(self) -> int:
        return self.deposit_msat - self.billed_msat - self.reserved_msat


@dataclass
class Offer:
    worker: bytes
    endpoint: str
    price_in: int
    price_out: int
    context_length: int


@dataclass
class Job:
    """One request, from routing to its Completion on the L2 (GET /v1/jobs/{id})."""

    id: str
    session_id: bytes
    model: str
    model_hash: bytes
    prompt: list[int]
    max_tokens: int
    seed: Optional[int]
    temperature_milli: int
    created: int
    offer: Optional[Offer] = None
    output: list[int] = field(default_factory=list)
    tops: list[TopK] = field(default_factory=list)
    fingerprint: bytes = ZERO
    worker_sig: bytes = bytes(64)
    status: str = "routing"  # running, completed, cancelled (the client left), failed (the worker did)
    finish_reason: Optional[str] = None
    cost_msat: int = 0
    billing: str = "none"  # pending, recorded, refused
    txid: Optional[str] = None
    l2_height: Optional[int] = None
    error: Optional[str] = None
    attempts: int = 0
    billable: bool = True  # False: the client got no answer, or the worker broke the protocol
    audit: dict[str, Any] = field(default_factory=lambda: {"status": "none"})

    def json(self) -> dict[str, Any]:
        o = self.offer
        return {"id": self.id, "object": "job", "created": self.created, "model": self.model,
                "model_sha256": self.model_hash.hex(), "status": self.status, "finish_reason": self.finish_reason,
                "worker": o.worker.hex() if o else None, "prompt_tokens": len(self.prompt),
                "completion_tokens": len(self.output), "cost_msat": self.cost_msat,
                "price_in_msat_per_1k": o.price_in if o else None, "price_out_msat_per_1k": o.price_out if o else None,
                "sampling": "greedy" if self.seed is None else "seeded", "seed": self.seed,
                "fingerprint": self.fingerprint.hex(), "prompt_hash": token_hash(self.prompt).hex(),
                "output_hash": token_hash(self.output).hex(), "session_id": self.session_id.hex(),
                "billing": {"status": self.billing, "txid": self.txid, "l2_height": self.l2_height,
                            "completion": f"/api/completions/{self.txid}" if self.billing == "recorded" else None},
                "audit": self.audit, "error": self.error}


@dataclass(frozen=True)
class Quote:
    session_id: Optional[bytes]
    price_in: int
    price_out: int
    valid_until_height: int


class Gateway:
    def __init__(self, api: AsyncClient, tokenizer: Any, secret: bytes, split: tuple[int, int, int] = DEFAULT_SPLIT,
                 verifier: bytes = ZERO, weights: Optional[Weights] = None, fee_sat: int = 1,
                 audit_bp: int = 1_000) -> None:
        if (split[1] > 0) != (verifier != ZERO) or sum(split) > BP:
            raise ValueError("a verifier share needs a verifier key (and one key a share); shares sum to <= 100 %")
        self.api, self.tok, self.secret = api, tokenizer, secret
        self.pubkey = public_key(secret)
        self.split, self.verifier, self.fee_sat, self.audit_bp = split, verifier, fee_sat, audit_bp
        self.weights = weights or Weights.from_config(_pairs(DEFAULT_WEIGHTS))
        self.http: Optional[aiohttp.ClientSession] = None
        self.network_id: Optional[int] = None
        self.tabs: dict[bytes, Tab] = {}
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.quotes: OrderedDict[str, Quote] = OrderedDict()
        self.ttft_us: dict[bytes, int] = {}
        self.load: dict[bytes, int] = {}
        self.down: dict[bytes, float] = {}  # worker -> when it last failed before a first token
        self.to_record: asyncio.Queue[Job] = asyncio.Queue()
        self.recording: list[Job] = []  # the job being recorded (drained on shutdown)
        self.to_audit: asyncio.Queue[Job] = asyncio.Queue()
        self.caught: dict[bytes, str] = {}  # worker -> the audit it failed: never routed to (nor asked to audit)

    # -- the registry ------------------------------------------------------------------------------------------------
    async def models(self) -> list[dict[str, Any]]:
        return [m for m in (await self.api.get("/api/models"))["models"] if m["offers"]]

    async def model(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str):
            raise OpenAIError(400, "'model' is required", "invalid_request_error", param="model")
        for m in await self.models():
            if name in (m["name"], m["weights_sha256"]):
                return m
        raise OpenAIError(404, f"The model '{name}' does not exist or no worker serves it", "invalid_request_error",
                          code="model_not_found", param="model")

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m["name"], "object": "model", "created": m["height"], "owned_by": m["registrant"],
                 "version": m["version"], "weights_sha256": m["weights_sha256"],
                 "context_length": max(o["context_length"] for o in m["offers"]),
                 "pricing": {"input_msat_per_1k": min(o["price_in_msat_per_1k"] for o in m["offers"]),
                             "output_msat_per_1k": min(o["price_out_msat_per_1k"] for o in m["offers"])},
                 "workers": len(m["offers"]), "workers_live": len(self.ranked(m, live=True))}
                for m in await self.models()]
        return web.json_response({"object": "list", "data": data})

    async def info(self, request: web.Request) -> web.Response:
        w, v, t = self.split
        return web.json_response({"server": self.pubkey.hex(), "verifier": self.verifier.hex(),
                                  "split_bp": {"worker": w, "verifier": v, "treasury": t, "burned": BP - w - v - t},
                                  "session": {"price_msat": 1, "unit": 1}, "weights_ppm": self.weights.as_dict()})

    # -- sessions ----------------------------------------------------------------------------------------------------
    async def authorize(self, request: web.Request) -> tuple[bytes, Tab, int]:
        """The request's paid session: (id, its tab, the L2 tip height); 401 unless it is an open session of this
        gateway's, at 1 msat per unit, keyed by the secret given, and not about to expire."""
        sid, secret = parse_api_key(request.headers.get("Authorization"))
        try:
            s = await self.api.get(f"/api/sessions/{sid.hex()}")
        except ApiError as e:
            if e.status == 404:
                raise bad_key(f"no paid session {sid.hex()} on the L2 (its opening may still be pending)") from None
            raise
        if s["server"] != self.pubkey.hex():
            raise bad_key(f"session {sid.hex()} pays server {s['server']}, not this gateway ({self.pubkey.hex()})")
        if s["session_key"] != PrivateKey(secret).public_key_xonly.format().hex():
            raise bad_key("Incorrect API key: the secret is not the session's key")
        if (s["price_msat"], s["unit"]) != (1, 1):
            raise bad_key(f"session {sid.hex()} is not priced at 1 msat per unit (the gateway bills msat)")
        if s["status"] != "OPEN" or s["tip_height"] + EXPIRY_MARGIN > s["expiry_height"]:
            raise bad_key(f"session {sid.hex()} is {s['status'].lower()}, expiring at L2 height {s['expiry_height']} "
                          f"(tip {s['tip_height']}): open another")
        tab = self.tabs.setdefault(sid, Tab(s["deposit_sat"] * 1000))
        tab.billed_msat = max(tab.billed_msat, int(s["settled"]["units"]))
        return sid, tab, int(s["tip_height"])

    # -- requests ----------------------------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the body is not JSON", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", "invalid_request_error")
        return body

    def _prompt(self, body: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(x, dict) and isinstance(x.get("content"), str) and isinstance(x.get("role"), str)
                    for x in messages):
                raise OpenAIError(400, "messages must be a non-empty list of {role, content}",
                                  "invalid_request_error", param="messages")
            enc: Any = self.tok.apply_chat_template([{"role": x["role"], "content": x["content"]} for x in messages],
                                                    add_generation_prompt=True)
            return [int(t) for t in (enc["input_ids"] if hasattr(enc, "keys") else enc)]
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise OpenAIError(400, "prompt must be a non-empty string", "invalid_request_error", param="prompt")
        return [int(t) for t in self.tok(body["prompt"])["input_ids"]]

    @staticmethod
    def _max_tokens(body: dict[str, Any]) -> int:
        v = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OpenAIError(400, "max_tokens must be a positive integer", "invalid_request_error",
                              param="max_tokens")
        return v

    @staticmethod
    def _sampling(body: dict[str, Any]) -> tuple[Optional[int], int]:
        """(seed, temperature in thousandths): greedy (None, 0) unless a seed is given, or a temperature > 0 without
        one (then the gateway draws the seed, and records it: the audit replays it)."""
        seed, t = body.get("seed"), body.get("temperature")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
            raise OpenAIError(400, "seed must be an integer in 0 … 2^63-1", "invalid_request_error", param="seed")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 2):
            raise OpenAIError(400, "temperature must be a number in 0 … 2", "invalid_request_error",
                              param="temperature")
        milli = round((1 if t is None else t) * 1000)
        if seed is None and (t is None or milli == 0):
            return None, 0
        if milli == 0:
            raise OpenAIError(400, "a seeded request needs a temperature above 0", "invalid_request_error",
                              param="temperature")
        return (int.from_bytes(os.urandom(8), "big") >> 1 if seed is None else seed), milli

    def _check_context(self, offers: list[Offer], n_prompt: int, max_tokens: int, chat: bool) -> None:
        ctx = max(o.context_length for o in offers)
        if n_prompt + max_tokens > ctx:
            raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens; the prompt is "
                              f"{n_prompt} tokens and max_tokens {max_tokens}", "invalid_request_error",
                              code="context_length_exceeded", param="messages" if chat else "prompt")

    def ranked(self, m: dict[str, Any], cap: Optional[Quote] = None, live: bool = False) -> list[Offer]:
        """The model's offers best first by the scheduler's weighted score (ties by worker key), those that failed
        in the last DOWN_S seconds last (left out if live); workers slashed by an audit, and with a quote the offers
        dearer than it, are left out."""
        table, offers = WorkerTable(), {}
        for o in m["offers"]:
            off = Offer(bytes.fromhex(o["worker"]), o["endpoint"], o["price_in_msat_per_1k"],
                        o["price_out_msat_per_1k"], o["context_length"])
            if off.worker in self.caught or cap is not None and (off.price_in > cap.price_in
                                                                 or off.price_out > cap.price_out):
                continue
            offers[off.worker] = off
            table.add(WorkerInfo(
                worker_id=off.worker, device=DeviceKind.CPU, accelerator_mem_mb=0, models=frozenset({m["name"]}),
                region=o["region"] or "any", price_sat_per_unit=min(off.price_in + off.price_out, 10**12),
                green_share_ppm=o["green_ppm"], carbon_g_per_kwh=0, stake_sat=o["stake_sat"],
                reputation_ppm=o["reputation_ppm"], latency_ema_us=self.ttft_us.get(off.worker, PRIOR_TTFT_US),
                capacity=10**6, load=self.load.get(off.worker, 0)))
        if not offers:
            return []
        ev = Scheduler(table, self.weights).evaluate(Requirements(model=m["name"]))
        now = time.monotonic()
        order = sorted(zip(ev.score.tolist(), (table.id_at(int(r)) for r in ev.rows)),
                       key=lambda s: (now - self.down.get(s[1], -DOWN_S) < DOWN_S, -s[0], s[1]))
        return [offers[w] for _, w in order if not live or now - self.down.get(w, -DOWN_S) >= DOWN_S]

    async def estimate(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        sid: Optional[bytes] = None
        tab: Optional[Tab] = None
        if request.headers.get("Authorization"):
            sid, tab, _ = await self.authorize(request)
        m = await self.model(body.get("model"))
        chat = "messages" in body
        prompt, max_tokens = self._prompt(body, chat), self._max_tokens(body)
        offers = self.ranked(m)
        if not offers:
            raise OpenAIError(503, "no worker serves this model", "server_error", code="no_worker")
        self._check_context(offers, len(prompt), max_tokens, chat)
        tip = int((await self.api.status())["height"])
        q = Quote(sid, max(o.price_in for o in offers), max(o.price_out for o in offers), tip + QUOTE_BLOCKS)
        qid = "quote-" + os.urandom(16).hex()
        self.quotes[qid] = q
        while len(self.quotes) > MAX_JOBS:
            self.quotes.popitem(last=False)
        cost = token_cost_msat(len(prompt), max_tokens, q.price_in, q.price_out)
        out: dict[str, Any] = {"object": "estimate", "quote": qid, "model": m["name"], "prompt_tokens": len(prompt),
                               "max_tokens": max_tokens, "price_in_msat_per_1k": q.price_in,
                               "price_out_msat_per_1k": q.price_out, "max_cost_msat": cost,
                               "valid_until_height": q.valid_until_height, "l2_height": tip}
        if tab is not None:
            out.update(available_msat=tab.available(), sufficient=cost <= tab.available())
        return web.json_response(out)

    async def job(self, request: web.Request) -> web.Response:
        sid, _, _ = await self.authorize(request)
        j = self.jobs.get(request.match_info["id"])
        if j is None or j.session_id != sid:
            raise OpenAIError(404, f"no job {request.match_info['id']} of this session", "invalid_request_error",
                              code="job_not_found")
        return web.json_response(j.json())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.complete(request, chat=False)

    async def complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        sid, tab, tip = await self.authorize(request)
        body = await self._body(request)
        m = await self.model(body.get("model"))
        prompt, max_tokens = self._prompt(body, chat), self._max_tokens(body)
        seed, temp = self._sampling(body)
        cap = self.quotes.get(body["quote"]) if isinstance(body.get("quote"), str) else None
        if body.get("quote") is not None and (cap is None or cap.session_id not in (None, sid)
                                              or tip > cap.valid_until_height):
            raise OpenAIError(400, "unknown or expired quote", "invalid_request_error", param="quote",
                              code="quote_expired")
        offers = self.ranked(m, cap)
        if not offers:
            raise OpenAIError(503, "no worker serves this model at the quoted prices", "server_error",
                              code="no_worker")
        self._check_context(offers, len(prompt), max_tokens, chat)
        offers = [o for o in offers if o.context_length >= len(prompt) + max_tokens]
        quote = token_cost_msat(len(prompt), max_tokens, max(o.price_in for o in offers),
                                max(o.price_out for o in offers))
        if quote > tab.available():
            raise OpenAIError(402, f"This request may cost up to {quote} msat ({len(prompt)} prompt tokens, "
                              f"max_tokens {max_tokens}); the session has {tab.available()} msat left",
                              "insufficient_quota", code="insufficient_quota")
        job = Job(("chatcmpl-" if chat else "cmpl-") + os.urandom(12).hex(), sid, m["name"],
                  bytes.fromhex(m["weights_sha256"]), prompt, max_tokens, seed, temp, int(time.time()))
        self.jobs[job.id] = job
        while len(self.jobs) > MAX_JOBS:
            self.jobs.popitem(last=False)
        tab.reserved_msat += quote
        stream: Optional[AsyncGenerator[dict[str, Any], None]] = None
        try:
            stream, first = await self.open_stream(offers, job)
            if body.get("stream"):
                opts = body.get("stream_options") or {}
                return await self.sse(request, job, stream, first, chat,
                                      bool(isinstance(opts, dict) and opts.get("include_usage")))
            return await self.whole(request, job, stream, first, chat)
        finally:
            if stream is not None:  # the worker's connection closed: a worker whose client left stops decoding
                await stream.aclose()
                assert job.offer is not None
                self.load[job.offer.worker] -= 1
            tab.reserved_msat -= quote
            self.bill(job, tab)

    def bill(self, job: Job, tab: Tab) -> None:
        """Charge the tokens delivered at the serving worker's prices and queue the Completion transaction."""
        if job.offer is None or not job.billable:
            job.status = "failed"
            return
        if job.status in ("routing", "running"):
            job.status = "cancelled"
        job.cost_msat = token_cost_msat(len(job.prompt), len(job.output), job.offer.price_in, job.offer.price_out)
        tab.billed_msat += job.cost_msat
        job.billing = "pending"
        self.to_record.put_nowait(job)

    async def open_stream(self, offers: list[Offer], job: Job) -> tuple[AsyncGenerator[dict[str, Any], None],
                                                                          dict[str, Any]]:
        """The first worker that answers with a first token (failover before it): its remaining lines and the
        first; its time to first token feeds the score."""
        assert self.http is not None
        gen = {"prompt": job.prompt, "max_tokens": job.max_tokens, "seed": job.seed,
               "temperature": job.temperature_milli / 1000 if job.seed is not None else 1.0}
        for o in offers:
            start = time.monotonic()
            try:
                resp = await self.http.post(f"http://{o.endpoint}/v1/generate", json=gen,
                                            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120))
                if resp.status != 200:
                    log.warning("worker %s refused: %s", o.worker.hex(), resp.status)
                    resp.release()
                    continue
                lines = _lines(resp)
                first = await lines.__anext__()
                us = int((time.monotonic() - start) * 1e6)
                self.ttft_us[o.worker] = latency_ema(self.ttft_us.get(o.worker, us), us)
                self.load[o.worker] = self.load.get(o.worker, 0) + 1
                self.down.pop(o.worker, None)
                job.offer, job.status = o, "running"
                return lines, first
            except (aiohttp.ClientError, asyncio.TimeoutError, StopAsyncIteration, ValueError) as e:
                log.warning("worker %s failed before its first token (%s): trying the next", o.worker.hex(), e)
                self.down[o.worker] = time.monotonic()
        raise OpenAIError(503, "no worker is free to serve this model", "server_error", code="no_worker")

    def _take(self, job: Job, line: dict[str, Any]) -> bool:
        """One line of the worker's stream into the job; True at its end. A line out of range, a token past
        max_tokens, or a result whose fingerprint or signature is not the worker's own is the worker's fault
        (WorkerFault): its answer is not paid, and it is routed nothing more."""
        assert job.offer is not None and self.network_id is not None
        if not line.get("done"):
            if len(job.output) >= job.max_tokens:
                raise WorkerFault(f"more than max_tokens {job.max_tokens} tokens")
            top = TopK(tuple(int(i) for i in line["top"][0]), tuple(int(q) for q in line["top"][1]))
            token = int(line["token"])
            try:
                fp_leaf(token, top.ids, top.logits)  # u32 ids, i32 logits: what a fingerprint can hold
            except OutOfRange as e:
                raise WorkerFault(f"a token out of range: {e}") from None
            job.output.append(token)
            job.tops.append(top)
            return False
        fp, sig = bytes.fromhex(line["fingerprint"]), bytes.fromhex(line["signature"])
        if fp != fingerprint(job.output, job.tops) or int(line["tokens"]) != len(job.output):
            raise WorkerFault("its fingerprint does not commit to the tokens and top-K it streamed")
        digest = result_digest(self.network_id, job.model_hash, token_hash(job.prompt), token_hash(job.output), fp,
                               len(job.prompt), len(job.output), int(job.seed is not None), job.seed or 0,
                               job.temperature_milli)
        if len(sig) != 64 or not xonly_key(job.offer.worker).verify(sig, digest):
            raise WorkerFault("its result is not signed by its key")
        job.fingerprint, job.worker_sig = fp, sig
        job.finish_reason, job.status = line["finish_reason"], "completed"
        return True

    def fault(self, job: Job, e: Exception) -> str:
        """A worker's answer broke the protocol: the job failed, unpaid, and the worker is routed nothing more."""
        assert job.offer is not None
        job.status, job.error, job.billable = "failed", f"the worker failed after {len(job.output)} tokens: {e}", False
        self.caught[job.offer.worker] = f"{job.id}: {e}"
        log.warning("worker %s broke the protocol on %s: %s", job.offer.worker.hex(), job.id, e)
        return job.error

    async def whole(self, request: web.Request, job: Job, stream: AsyncIterator[dict[str, Any]],
                    first: dict[str, Any], chat: bool) -> web.Response:
        text = ""
        try:
            async for line in _chain(first, stream):
                if self._take(job, line):
                    break
                text += line["text"]
                if request.transport is None or request.transport.is_closing():
                    return web.Response(status=499)  # the client left: billed for what was made until then
        except WorkerFault as e:
            raise OpenAIError(502, self.fault(job, e), "server_error", code="worker_failed") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
            job.status, job.error = "failed", f"the worker failed after {len(job.output)} tokens: {e}"
            job.billable = False  # the client gets no answer: it pays nothing
            raise OpenAIError(502, job.error, "server_error", code="worker_failed") from None
        n_out = len(job.output)
        usage = {"prompt_tokens": len(job.prompt), "completion_tokens": n_out, "total_tokens": len(job.prompt) + n_out}
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": job.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": job.finish_reason, "logprobs": None}
        assert job.offer is not None
        return web.json_response({"id": job.id, "object": "chat.completion" if chat else "text_completion",
                                  "created": job.created, "model": job.model,
                                  "system_fingerprint": f"l2-worker-{job.offer.worker.hex()}",
                                  "choices": [choice], "usage": usage})

    async def sse(self, request: web.Request, job: Job, stream: AsyncIterator[dict[str, Any]],
                  first: dict[str, Any], chat: bool, include_usage: bool) -> web.StreamResponse:
        assert job.offer is not None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        served_by = f"l2-worker-{job.offer.worker.hex()}"  # system_fingerprint: which worker answered

        async def send(choice: dict[str, Any], usage: Any = None, choices: Optional[list[Any]] = None) -> None:
            chunk = {"id": job.id, "object": obj, "created": job.created, "model": job.model,
                     "system_fingerprint": served_by, "choices": [choice] if choices is None else choices}
            if include_usage:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        try:
            if chat:
                await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
            try:
                async for line in _chain(first, stream):
                    if self._take(job, line):
                        break
                    try:
                        if chat:
                            await send({"index": 0, "delta": {"content": line["text"]}, "finish_reason": None})
                        else:
                            await send({"index": 0, "text": line["text"], "finish_reason": None})
                    except ConnectionResetError:  # not delivered: the client pays for the tokens before it
                        job.output.pop()
                        job.tops.pop()
                        raise
                final = ({"index": 0, "delta": {}, "finish_reason": job.finish_reason} if chat
                         else {"index": 0, "text": "", "finish_reason": job.finish_reason})
                await send(final)
            except ConnectionResetError:  # aiohttp's is a ClientError too: the client left, not the worker
                raise
            except WorkerFault as e:
                err = OpenAIError(502, self.fault(job, e), "server_error", code="worker_failed").body()
                await resp.write(f"data: {json.dumps(err)}\n\n".encode())
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
                # the worker died mid-stream: the client pays for the tokens it received
                job.status, job.error = "failed", f"the worker failed after {len(job.output)} tokens: {e}"
                err = OpenAIError(502, job.error, "server_error", code="worker_failed").body()
                await resp.write(f"data: {json.dumps(err)}\n\n".encode())
            if include_usage:
                n = len(job.output)
                await send({}, {"prompt_tokens": len(job.prompt), "completion_tokens": n,
                                "total_tokens": len(job.prompt) + n}, choices=[])
            await resp.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            log.info("job %s: the client left after %d tokens", job.id, len(job.output))
        return resp

    # -- recording on the L2 -------------------------------------------------------------------------------------------
    def completion(self, job: Job) -> Completion:
        assert job.offer is not None
        greedy = job.seed is None
        return Completion(job.session_id, job.offer.worker, job.model_hash, self.verifier, token_hash(job.prompt),
                          token_hash(job.output), job.fingerprint, len(job.prompt), len(job.output), job.cost_msat,
                          0 if greedy else job.seed or 0, Sampling.GREEDY if greedy else Sampling.SEEDED,
                          0 if greedy else job.temperature_milli, *self.split, job.worker_sig)

    async def recorder(self) -> None:
        """Record the billed jobs one transaction at a time, each signed at the gateway's committed nonce and
        followed until it is committed or dropped (sequential, so a dropped transaction never strands later nonces,
        and a job signed again reuses the nonce its earlier transaction held: at most one of them can commit). A
        dropped one is signed again (3 attempts), then refused (its cost leaves the tab); the node being
        unreachable, busy (429, 5xx) or refusing for a reason of its own is waited out."""
        while True:
            job = await self.to_record.get()
            self.recording = [job]
            try:
                await self.record(job)
            except (ApiError, Unreachable) as e:
                log.warning("recording %s failed (%s): trying again", job.id, e)
                self.recording = []
                self.to_record.put_nowait(job)
                await asyncio.sleep(1)
            except Exception as e:  # a job that cannot make a valid transaction: refused, the recorder goes on
                log.exception("job %s cannot be recorded", job.id)
                self.refused(job, f"cannot be recorded: {e}")
            self.recording = []

    async def record(self, job: Job) -> None:
        while not await self._resolved(job):
            if job.attempts >= 3:
                self.refused(job, f"its transaction was dropped {job.attempts} times: {job.error}")
                return
            job.attempts += 1
            try:
                res = await self.api.sign_and_submit(self.secret, self.completion(job), self.fee_sat)
            except ApiError as e:
                if e.status == 429 or e.status >= 500:
                    raise
                self.refused(job, str(e))
                return
            job.txid = res["txid"]

    async def _resolved(self, job: Job) -> bool:
        """Follow the job's transaction until it is committed (the job is recorded: True) or dropped or unknown
        to the node (False: sign it again, at the nonce it held). False at once for a job not sent yet."""
        while job.txid is not None:
            try:
                st = await self.api.tx(job.txid)
            except ApiError as e:
                if e.status != 404:
                    raise
                st = {"status": "unknown"}
            if st.get("status") == "committed":
                job.billing, job.l2_height = "recorded", int(st["height"])
                if job.status == "completed" and self.audit_bp:
                    self.to_audit.put_nowait(job)
                return True
            if st.get("status") != "pending":
                job.error, job.txid = f"transaction {job.txid} {st.get('status')}: {st.get('reason')}", None
                return False
            await asyncio.sleep(0.05)
        return False

    # -- audits ------------------------------------------------------------------------------------------------------
    async def auditor(self) -> None:
        """Audit recorded completions one at a time (docs/inference.md, "Audits")."""
        while True:
            job = await self.to_audit.get()
            try:
                await self.audit(job)
            except (OpenAIError, ApiError, Unreachable, aiohttp.ClientError, asyncio.TimeoutError, ValueError,
                    KeyError) as e:
                job.audit = {"status": "error", "reason": str(e)}

    async def audit(self, job: Job) -> None:
        """A completed answer drawn (from its record's draw seed, at audit_bp) is audited by the best-scored other
        worker serving the model: it re-executes the answer and, when it does not match what the worker committed
        to, challenges it on the L2; the referee the ledger drew re-executes it too and the ledger slashes the side
        shown wrong. A worker slashed is routed nothing more by this gateway (nor is an auditor slashed for a false
        challenge)."""
        assert job.offer is not None and job.txid is not None
        rec = await self.api.get(f"/api/completions/{job.txid}")
        if not audit_drawn(bytes.fromhex(rec["draw_seed"]), self.audit_bp):
            job.audit = {"status": "not-drawn"}
            return
        others = [o for o in self.ranked(await self.model(job.model)) if o.worker != job.offer.worker]
        if not others:
            job.audit = {"status": "skipped", "reason": "no other worker serves the model"}
            return
        work = {"completion_id": job.txid, "prompt": job.prompt, "output": job.output}
        auditor = others[0]
        res = await self._ask(auditor, "/v1/audit", {**work, "tops": [[list(t.ids), list(t.logits)] for t in job.tops]})
        job.audit = {"status": "passed" if res["verdict"] == "match" else "challenged", "auditor": auditor.worker.hex(),
                     "positions": res["positions"]}
        if res["verdict"] == "match":
            return
        job.audit.update(reason=res["reason"], challenge=res["challenge"])
        if res["challenge"].get("status") != "committed":
            return
        drawn = (await self.api.get(f"/api/completions/{job.txid}"))["challenge"]["referee"]  # the ledger's choice
        referee = next((o for o in others if o.worker.hex() == drawn), None)
        if referee is None:
            job.audit["referee"] = {"worker": drawn, "status": "unreachable: not among the live offers"}
            return
        ref = await self._ask(referee, "/v1/referee", work)
        job.audit["referee"] = {"worker": drawn, **ref["referee"]}
        verdict = (await self.api.get(f"/api/completions/{job.txid}"))["status"]
        if verdict == "WORKER_SLASHED":
            job.audit["status"] = "worker-slashed"
            self.caught[job.offer.worker] = f"{job.id}: slashed on the L2 ({res['reason']})"
        elif verdict == "CHALLENGER_SLASHED":
            job.audit["status"] = "auditor-slashed"
            self.caught[auditor.worker] = f"{job.id}: its challenge was refuted on the L2"
        log.warning("audit of %s by %s: %s (%s)", job.id, auditor.worker.hex(), job.audit["status"], res["reason"])

    async def _ask(self, o: Offer, path: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.post(f"http://{o.endpoint}{path}", json=body,
                                  timeout=aiohttp.ClientTimeout(total=300)) as r:
            if r.status != 200:
                raise ValueError(f"worker {o.worker.hex()} answered {path} with {r.status}: {await r.text()}")
            return await r.json()  # type: ignore[no-any-return]

    def refused(self, job: Job, why: str) -> None:
        log.warning("the L2 refused job %s (%d msat): %s", job.id, job.cost_msat, why)
        job.billing, job.error = "refused", why
        tab = self.tabs.get(job.session_id)
        if tab is not None:
            tab.billed_msat -= job.cost_msat

    async def drain(self, timeout: float = 30.0) -> None:
        """On shutdown: the job being recorded and those still queued are recorded (up to timeout)."""
        jobs = [j for j in self.recording if j.billing == "pending"]
        while not self.to_record.empty():
            jobs.append(self.to_record.get_nowait())
        try:
            async with asyncio.timeout(timeout):
                for job in jobs:
                    await self.record(job)
        except (TimeoutError, ApiError, Unreachable) as e:
            log.warning("shutting down with completions not recorded: %s", e)

async def _lines(resp: aiohttp.ClientResponse) -> AsyncGenerator[dict[str, Any], None]:
    try:
        async for raw in resp.content:
            if raw.strip():
                yield json.loads(raw)
    finally:
        resp.release()


async def _chain(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for x in rest:
        yield x


def make_app(gw: Gateway) -> web.Application:
    app = web.Application(middlewares=[errors])
    app.router.add_get("/v1/models", gw.list_models)
    app.router.add_get("/v1/gateway", gw.info)
    app.router.add_post("/v1/chat/completions", gw.chat)
    app.router.add_post("/v1/completions", gw.completions)
    app.router.add_post("/v1/estimate", gw.estimate)
    app.router.add_get("/v1/jobs/{id}", gw.job)

    async def running(app: web.Application) -> AsyncIterator[None]:
        gw.http = aiohttp.ClientSession()
        gw.network_id = (await gw.api.network()).id
        duties = [asyncio.create_task(gw.recorder()), asyncio.create_task(gw.auditor())]
        yield
        for t in duties:
            t.cancel()
        await asyncio.gather(*duties, return_exceptions=True)
        await gw.drain()
        await gw.http.close()
    app.cleanup_ctx.append(running)
    return app


def _pairs(text: str) -> dict[str, str]:
    try:
        return {k.strip(): v.strip() for k, v in (p.split("=", 1) for p in text.split(",") if p.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=value,…: {text!r}") from None


def _split(text: str) -> tuple[int, int, int]:
    """"50/0/10": worker / verifier / treasury percent (decimals allowed to 0.01 %) in basis points."""
    try:
        parts = [round(float(p) * 100) for p in text.split("/")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) > BP:
        raise argparse.ArgumentTypeError(f"--split wants worker/verifier/treasury percent summing to <= 100: {text!r}")
    return parts[0], parts[1], parts[2]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="l2-gateway", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    s.add_argument("--api", default="http://127.0.0.1:8650", help="an l2d node's REST base URL")
    s.add_argument("--listen", default="127.0.0.1:8700", help="host:port (port 0: any free one)")
    s.add_argument("--key", type=Path, required=True,
                   help="the gateway's L2 key file: the server of its sessions, the sender of its Completion records, "
                        "paid the treasury share")
    s.add_argument("--split", type=_split, default=DEFAULT_SPLIT,
                   help="worker/verifier/treasury percent of each billed satoshi, the rest burned (default 50/0/10)")
    s.add_argument("--verifier", default=ZERO.hex(), help="the verifier's L2 key (hex), needed for a verifier share")
    s.add_argument("--weights", type=_pairs, default=_pairs(DEFAULT_WEIGHTS),
                   help=f"routing score weights, fractions summing to 1 (default {DEFAULT_WEIGHTS})")
    s.add_argument("--fee", type=int, default=1, help="L2 fee per Completion transaction, sat")
    s.add_argument("--audit-share", type=float, default=10.0,
                   help="percent of recorded completions re-executed by another worker (default 10)")
    s.add_argument("--log-level", default="INFO")
    o = sub.add_parser("open-session", help="open a paid session with a gateway and print its API key")
    o.add_argument("--api", default="http://127.0.0.1:8650", help="an l2d node's REST base URL")
    o.add_argument("--key", type=Path, required=True, help="the client's L2 key file (pays the deposit)")
    o.add_argument("--gateway", default="http://127.0.0.1:8700", help="the gateway's base URL")
    o.add_argument("--deposit", type=int, required=True, help="sat escrowed for the gateway")
    o.add_argument("--blocks", type=int, default=1_000, help="L2 blocks the session stays open")
    o.add_argument("--log-level", default="WARNING")
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    return asyncio.run(_serve(a) if a.cmd == "serve" else _open_session(a))


async def _open_session(a: Any) -> int:
    secret = load_secret(a.key)
    async with aiohttp.ClientSession() as http:
        async with http.get(a.gateway.rstrip("/") + "/v1/gateway") as r:
            server = bytes.fromhex((await r.json())["server"])
    session_secret = os.urandom(32)
    async with AsyncClient(a.api) as api:
        tip = int((await api.status())["height"])
        res = await api.sign_and_submit(secret, SessionOpen(server, PrivateKey(session_secret).public_key_xonly
                                                            .format(), a.deposit, 1, 1, tip + a.blocks), 1)
        st = await api.wait_tx(res["txid"], 60)
    if st is None or st.get("status") != "committed":
        print(f"l2-gateway: the session was not committed: {st}", file=sys.stderr)
        return 1
    print(api_key(bytes.fromhex(res["txid"]), session_secret), flush=True)
    return 0


async def _serve(a: Any) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from .llm import model_path

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    async with AsyncClient(a.api) as api:
        gw = Gateway(api, tokenizer, load_secret(a.key), a.split, bytes.fromhex(a.verifier),
                     Weights.from_config(a.weights), a.fee, round(a.audit_share * 100))
        runner, endpoint = await serve_app(make_app(gw), a.listen)
        print(f"l2-gateway {gw.pubkey.hex()} on http://{endpoint}/v1", flush=True)
        try:
            await until_signalled()
        finally:
            await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
