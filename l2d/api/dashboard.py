"""The operator's dashboard: the page at / (and /dashboard), the one snapshot it shows (GET /api/dashboard) and its
live feed (GET /api/dashboard/events, server-sent events).

Every ledger figure of a snapshot comes from one LMDB read transaction, so the panels show one height and never
disagree; the node's own view beside the ledger (members last heard from, bitcoind and ZMQ, the bridge's circuit
breaker, request counters) is read in the same turn of the event loop. A snapshot is bounded whatever the ledger
holds: the latest blocks, anchors and FL jobs, counts by status for the rest, never a scan of the accounts.
The layout of the JSON: docs/dashboard.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from aiohttp import web

from ..core.anchor import AnchorEntry, anchor_key
from ..core.block import HEADER_SIZE, BlockHeader
from ..core.commit import Commit
from ..core.fl import JobRecord, RoundRecord, fl_round_key
from ..core.model import ChallengeRecord, CompletionRecord
from ..core.params import Network
from ..core.relay import RelayRecord
from ..core.session import SessionRecord
from ..core.state import SUPPLY_KEY, Namespace, Supply
from ..core.work import TaskRecord, WorkerRecord
from ..metrics import gauge, gauges
from ..store import Reader
from . import bridge
from .deps import ANCHORS, BRIDGE, CHAIN, FEDERATION, MEMBERS, METRICS, ORCHESTRATION

PAGE = Path(__file__).with_name("dashboard.html")
BLOCKS = 16  # blocks in the strip
ANCHORS_SHOWN = 8
FL_JOBS = 4  # latest FL jobs, each with its accuracy per round
SILENT_S = 30.0  # a member not heard from for this long makes the node DEGRADED
STALLED_S = 30.0  # transactions waiting while no block came for this long: DEGRADED
PUSH_EVERY_S = 2.0  # the feed sends a snapshot at least this often (a block sends one sooner) ...
PUSH_GAP_S = 0.25  # ... and at most this often
NEWS: web.AppKey["News"] = web.AppKey("dashboard_news")


class News:
    """Wakes every feed when a block is committed, and ends them when the server shuts down."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()
        self.closed = False

    async def close(self, _: web.Application) -> None:
        """on_shutdown: before the server waits for open requests, the feeds end (else each holds the stop)."""
        self.closed = True
        self._ev.set()

    def block_committed(self, *_: Any) -> None:
        self._ev.set()
        self._ev = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ev.wait(), timeout)


def _count(counts: dict[str, int], name: str) -> None:
    counts[name] = counts.get(name, 0) + 1


def _ns(r: Reader, ns: Namespace) -> Any:
    return r.iter_prefix(bytes((ns,)))


def _blocks(r: Reader, network: Network, tip: int, final: int) -> list[dict[str, Any]]:
    out = []
    for h in range(tip, max(-1, tip - BLOCKS), -1):
        raw, commit = r.get_block(h), r.get_commit(h)
        if raw is None:
            break
        hd = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), network)
        signers = 0 if h == 0 or commit is None else len(Commit.decode(bytes(commit)).signers)
        out.append({"height": h, "hash": hd.hash.hex(), "tx_count": hd.tx_count, "timestamp_ms": hd.timestamp_ms,
                    "bytes": len(raw), "signers": signers, "final": h <= final, "href": f"/api/l2/blocks/{h}"})
    return out


def _work(r: Reader) -> dict[str, Any]:
    workers: dict[str, int] = {}
    slashes = stake = 0
    for _, v in _ns(r, Namespace.WORKER):
        w = WorkerRecord.decode(bytes(v))
        _count(workers, w.status.name)
        slashes += w.slashes
        stake += w.stake_sat
    tasks: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    for _, v in _ns(r, Namespace.TASK):
        t = TaskRecord.decode(bytes(v))
        _count(tasks, t.status.name)
        _count(outcomes, t.outcome.name)
    return {"workers": workers, "stake_sat": stake, "slashes": slashes, "tasks": tasks, "outcomes": outcomes,
            "disputes_open": tasks.get("DISPUTED", 0),
            "href": {"workers": "/api/orchestration/workers", "tasks": "/api/orchestration/tasks"}}


def _fl(r: Reader) -> dict[str, Any]:
    jobs = [(bytes(k[1:]), JobRecord.decode(bytes(v))) for k, v in _ns(r, Namespace.FL_JOB)]
    counts: dict[str, int] = {}
    for _, j in jobs:
        _count(counts, j.status.name)
    jobs.sort(key=lambda e: (e[1].post_height, e[0]))
    shown = []
    for jid, j in jobs[-FL_JOBS:][::-1]:
        accuracy = []
        for n in range(1, j.rounds_done + 1):
            raw = r.get_state(fl_round_key(jid, n))
            if raw is not None:
                c = RoundRecord.decode(bytes(raw)).commitment
                accuracy.append({"round": c.round, "accuracy_ppm": c.accuracy_ppm, "loss_ppm": c.loss_ppm})
        shown.append({"job_id": jid.hex(), "status": j.status.name, "rounds_done": j.rounds_done, "rounds": j.rounds,
                      "participants": len(j.participants), "reward_pool_sat": j.reward_pool_sat,
                      "accuracy": accuracy, "href": f"/api/fl/jobs/{jid.hex()}"})
    return {"jobs": counts, "latest": shown, "href": "/api/fl/jobs"}


def _netflow(r: Reader) -> dict[str, Any]:
    relays = []
    for k, v in _ns(r, Namespace.RELAY):
        rr = RelayRecord.decode(bytes(v))
        relays.append({"identity": bytes(k[1:]).hex(), "status": rr.status.name, "endpoint": rr.endpoint.decode(),
                       "exit": bool(rr.flags & 2), "rate_kib_s": rr.rate_kib_s, "measured_kib_s": rr.measured_kib_s,
                       "weight": rr.weight, "price_msat_per_mib": rr.price_msat_per_mib})
    sessions: dict[str, int] = {}
    escrow = settled = 0
    for _, v in _ns(r, Namespace.SESSION):
        s = SessionRecord.decode(bytes(v))
        _count(sessions, s.status.name)
        escrow += s.escrow_sat
        settled += s.settled_sat
    return {"relays": relays, "sessions": sessions, "escrow_sat": escrow, "settled_sat": settled,
            "href": "/api/netflow/relays"}


def _gateway(r: Reader) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    tokens_in = tokens_out = cost_msat = 0
    split = {"worker_sat": 0, "verifier_sat": 0, "treasury_sat": 0, "burned_sat": 0}
    for _, v in _ns(r, Namespace.COMPLETION):
        c = CompletionRecord.decode(bytes(v))
        _count(statuses, c.status.name)
        tokens_in += c.completion.n_prompt
        tokens_out += c.completion.n_output
        cost_msat += c.completion.cost_msat
        for name in split:
            split[name] += getattr(c, name)
    challenges: dict[str, int] = {}
    for _, v in _ns(r, Namespace.COMPLETION_CHALLENGE):
        _count(challenges, ChallengeRecord.decode(bytes(v)).loser.name)
    return {"completions": statuses, "tokens_in": tokens_in, "tokens_out": tokens_out, "cost_msat": cost_msat,
            "paid": split, "challenges": challenges, "href": "/api/models"}


def _anchors(app: web.Application, r: Reader, tip: int, final: int) -> dict[str, Any]:
    svc = app[ANCHORS]
    if svc is None:
        return {"enabled": False}
    counts: dict[str, int] = {}
    anchors = svc.all_anchors()
    for a in anchors:
        _count(counts, a.status.value)
    latest = []
    for a in anchors[-ANCHORS_SHOWN:][::-1]:
        raw = r.get_state(anchor_key(a.l2_height))
        d = {"l2_height": a.l2_height, "status": a.status.value, "txid": a.txid, "btc_height": a.btc_height,
             "confirmations": a.confirmations, "fee_sat": a.fee_sat, "l2_state": None if raw is None else
             AnchorEntry.decode(bytes(raw)).status.name}
        if a.status.value in ("CONFIRMED", "FINAL"):
            d["audit"] = f"/api/anchors/{a.l2_height}/audit"
        latest.append(d)
    every = svc.every_blocks
    next_at = (final // every + 1) * every
    return {"enabled": True, "broadcasting": svc.broadcasting, "mode": svc.mode, "every_blocks": every,
            "next_l2_height": next_at, "next_in_blocks": max(0, next_at - tip),
            "btc_tip_height": svc.btc_tip_height, "bitcoind_error": svc.bitcoind_error, "zmq_error": svc.zmq_error,
            "counts": counts, "latest": latest, "href": "/api/anchors"}


def _status(fed: dict[str, Any], anchors: dict[str, Any], books: Optional[dict[str, Any]], halted: Optional[str],
            mempool: int, tip_ms: int, now: float) -> dict[str, Any]:
    """READY, SYNCING or DEGRADED, with every reason (notes: what is off by configuration, not wrong)."""
    syncing, degraded, notes = [], [], []
    if fed["behind"] or fed["catching_up_from"]:
        syncing.append(f"catching up: members report height {max((m['height'] or 0) for m in fed['members'])}, "
                       f"this member is at {fed['height']}")
    for m in fed["members"]:
        if m["index"] == fed["me"]:
            continue
        seen = m["last_seen_s_ago"]
        if seen is None or seen > SILENT_S:
            degraded.append(f"member {m['index']} ({m['id']}) not heard from " +
                            ("since start" if seen is None else f"for {seen:.0f} s"))
    if fed["evidence"]:
        degraded.append(f"{fed['evidence']} equivocation(s) recorded: GET /api/federation/evidence")
    if mempool and now * 1000 - tip_ms > STALLED_S * 1000:
        degraded.append(f"{mempool} transaction(s) waiting and no block for {(now * 1000 - tip_ms) / 1000:.0f} s")
    if not anchors.get("enabled"):
        notes.append("anchoring is off")
    elif not anchors["broadcasting"]:
        notes.append("no bitcoind configured: anchors are built, not broadcast")
    else:
        if anchors["bitcoind_error"]:
            degraded.append(f"bitcoind unreachable: {anchors['bitcoind_error']}")
        if anchors["zmq_error"]:
            degraded.append(f"ZMQ subscription down (polling instead): {anchors['zmq_error']}")
    if books is not None and not books["invariant_ok"]:
        degraded.append("bridge books do not balance: holdings - pending peg-outs != bridged supply")
    if halted:
        degraded.append(f"bridge halted: {halted}")
    state = "DEGRADED" if degraded else "SYNCING" if syncing else "READY"
    return {"state": state, "reasons": degraded + syncing, "notes": notes}


def snapshot(app: web.Application, now: Callable[[], float] = time.time) -> dict[str, Any]:
    """What the dashboard shows, the ledger part from one read (no await inside: one turn of the event loop)."""
    chain, members = app[CHAIN], app[MEMBERS]
    fed = members.status()
    with chain.reader() as r:
        tip = r.tip_height()
        assert tip is not None  # the node opened its ledger before serving
        final = r.final_height()
        raw = r.get_block(tip)
        assert raw is not None
        head = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), chain.network)
        sup = Supply.decode(bytes(r.get_state(SUPPLY_KEY) or bytes(24)))
        books = None if app[FEDERATION] is None else bridge.books(r)
        out: dict[str, Any] = {
            "height": tip, "tip_hash": head.hash.hex(), "state_root": head.state_root.hex(), "final_height": final,
            "tip_timestamp_ms": head.timestamp_ms, "network": chain.network.name, "version": chain.version,
            "blocks": _blocks(r, chain.network, tip, final),
            "supply": {"minted_sat": sup.minted_sat, "burned_sat": sup.burned_sat, "fees_sat": sup.fees_sat,
                       "records": r.state_count(), "href": "/api/l2/state"},
            "anchors": _anchors(app, r, tip, final),
            "work": _work(r), "fl": _fl(r), "netflow": _netflow(r), "gateway": _gateway(r),
        }
    svc = app[BRIDGE]
    halted = None if svc is None else svc.halted
    out["bridge"] = None if books is None else {**books, "halted": halted, "href": "/api/bridge/federation"}
    out["mempool"] = {"size": len(chain.mempool), "href": "/api/status"}
    out["federation"] = {**fed, "href": "/api/federation"}
    m = app[METRICS]
    out["node"] = {"uptime_s": round(chain.uptime_s(), 1), "rounds": {k: m.federation_rounds.get(outcome=k)
                                                                     for k in ("entered", "failed", "idle")},
                   "txs_accepted": m.txs_accepted.get(), "blocks_committed": m.blocks_committed.get(),
                   "orchestration": app[ORCHESTRATION] is not None, "metrics": "/metrics"}
    t = now()
    out["status"] = _status(fed, out["anchors"], books, halted, out["mempool"]["size"], head.timestamp_ms, t)
    out["generated_ms"] = int(t * 1000)
    return out


def _by(counts: dict[str, int], label: str) -> list[tuple[tuple[tuple[str, str], ...], float]]:
    return [(((label, k),), v) for k, v in sorted(counts.items())]


def metric_lines(s: dict[str, Any]) -> list[str]:
    """The subsystems' figures of a snapshot as Prometheus gauges (GET /metrics adds them to its own)."""
    out = gauges("l2d_status", "1 for the node's state (READY, SYNCING, DEGRADED), 0 for the others.",
                 [((("state", k),), int(s["status"]["state"] == k)) for k in ("READY", "SYNCING", "DEGRADED")])
    a = s["anchors"]
    if a["enabled"]:
        out += gauges("l2d_anchors", "Anchors this node keeps, by status.",
                      _by({k: a["counts"].get(k, 0) for k in ("BUILT", "SUBMITTED", "CONFIRMED", "FINAL")}, "status"))
        out += gauge("l2d_anchor_next_in_blocks", "L2 blocks until the next anchored height.", a["next_in_blocks"])
        out += gauge("l2d_bitcoind_reachable", "0 while the anchor service cannot reach bitcoind.",
                     int(a["broadcasting"] and a["bitcoind_error"] is None))
    b = s["bridge"]
    if b is not None:
        out += gauges("l2d_bridge_sat", "The bridge's books (satoshi): what came in, is pending, was paid out, and "
                      "the coins held.", [((("book", k),), b[f"{k}_sat"]) for k in
                                          ("pegged_in", "pending_pegouts", "paid_out", "holdings")])
        out += gauge("l2d_bridge_invariant_ok", "1 while holdings - pending peg-outs == bridged supply.",
                     int(b["invariant_ok"]))
    w = s["work"]
    out += gauges("l2d_workers", "Registered workers, by status.", _by(w["workers"], "status"))
    out += gauges("l2d_tasks", "Tasks in the state, by status.", _by(w["tasks"], "status"))
    out += gauge("l2d_worker_slashes", "Slashes of all workers.", w["slashes"])
    out += gauges("l2d_fl_jobs", "FL jobs, by status.", _by(s["fl"]["jobs"], "status"))
    n = s["netflow"]
    out += gauges("l2d_relays", "NetFlow relays, by status.", _by(Counter(r["status"] for r in n["relays"]), "status"))
    out += gauges("l2d_sessions", "Paid sessions, by status.", _by(n["sessions"], "status"))
    g = s["gateway"]
    out += gauges("l2d_completions", "Recorded completions, by status.", _by(g["completions"], "status"))
    out += gauges("l2d_completion_tokens", "Tokens of recorded completions.",
                  [((("kind", "prompt"),), g["tokens_in"]), ((("kind", "output"),), g["tokens_out"])])
    return out


async def page(request: web.Request) -> web.Response:
    """GET / and /dashboard: the page (plain HTML, CSS and JS; nothing fetched from elsewhere)."""
    return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def dashboard(request: web.Request) -> web.Response:
    """GET /api/dashboard: one snapshot."""
    return web.json_response(snapshot(request.app))


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/dashboard/events: `event: snapshot` with a snapshot's JSON after every block (at most every
    PUSH_GAP_S) and at least every PUSH_EVERY_S, until the client goes away."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    await resp.write(b"retry: 2000\n\n")
    news = request.app[NEWS]
    while not news.closed:
        body = json.dumps(snapshot(request.app), separators=(",", ":"))
        try:
            await resp.write(f"event: snapshot\ndata: {body}\n\n".encode())
        except (ConnectionError, RuntimeError):  # the client left (RuntimeError: aiohttp's closed transport)
            return resp
        await news.wait(PUSH_EVERY_S)
        await asyncio.sleep(PUSH_GAP_S)
    return resp


def setup(app: web.Application) -> None:
    """The routes, and the feed's wake-up on every committed block."""
    news = app[NEWS] = News()
    app[MEMBERS].after_commit.append(news.block_committed)
    app.on_shutdown.append(news.close)
    for path in ("/", "/dashboard"):
        app.router.add_get(path, page)
    app.router.add_get("/api/dashboard", dashboard)
    app.router.add_get("/api/dashboard/events", events)
