"""The operator's dashboard: the page at / (and /dashboard), the one snapshot it shows (GET /api/dashboard) and its
live feed (GET /api/dashboard/events, server-sent events).

Every ledger figure of a snapshot comes from one LMDB read transaction, in a worker thread, so the panels show one
height and never disagree and the scans never hold the event loop; the node's own view beside the ledger (members
last heard from, bitcoind and ZMQ, the bridge's circuit breaker, request counters) is read on the loop right after.
One snapshot serves every reader (each feed, GET /api/dashboard, /metrics) for PUSH_GAP_S or until the next block.
What it shows is bounded (the latest blocks, anchors and FL jobs, counts by status for the rest, never the
accounts), but the counts walk the worker, task, relay, session, completion and challenge records each time.
The layout of the JSON: docs/dashboard.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

from aiohttp import web

from anchoring.service import Anchor

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
from ..views import ChainView
from . import bridge
from .netflow import relay_json
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
T = TypeVar("T")


class News:
    """Wakes every feed when a block is committed, ends them when the server shuts down, and shares one snapshot
    among all readers (feeds, GET /api/dashboard, /metrics) for PUSH_GAP_S or until the next block."""

    def __init__(self) -> None:
        self._ev = asyncio.Event()
        self.closed = False
        self.latest: Optional[tuple[float, dict[str, Any]]] = None  # (loop time, snapshot)
        self.blocks = 0  # committed since start: a snapshot begun before a block is not kept as the latest
        self.building: Optional[asyncio.Future[dict[str, Any]]] = None

    async def close(self, _: web.Application) -> None:
        """on_shutdown: before the server waits for open requests, the feeds end (else each holds the stop)."""
        self.closed = True
        self._ev.set()

    def block_committed(self, *_: Any) -> None:
        self.latest = None
        self.blocks += 1
        self._ev.set()
        self._ev = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ev.wait(), timeout)


def _ns(r: Reader, ns: Namespace, decode: Callable[[bytes], T]) -> list[T]:
    """Every record of a namespace, decoded."""
    return [decode(bytes(v)) for _, v in r.iter_prefix(bytes((ns,)))]


def _by(items: Iterable[str]) -> dict[str, int]:
    return dict(Counter(items))


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
    workers, tasks = _ns(r, Namespace.WORKER, WorkerRecord.decode), _ns(r, Namespace.TASK, TaskRecord.decode)
    by_status = _by(t.status.name for t in tasks)
    return {"workers": _by(w.status.name for w in workers), "stake_sat": sum(w.stake_sat for w in workers),
            "slashes": sum(w.slashes for w in workers), "tasks": by_status,
            "outcomes": _by(t.outcome.name for t in tasks), "disputes_open": by_status.get("DISPUTED", 0),
            "href": {"workers": "/api/orchestration/workers", "tasks": "/api/orchestration/tasks"}}


def _fl(r: Reader) -> dict[str, Any]:
    jobs = [(bytes(k[1:]), JobRecord.decode(bytes(v))) for k, v in r.iter_prefix(bytes((Namespace.FL_JOB,)))]
    jobs.sort(key=lambda e: (e[1].post_height, e[0]))
    shown = []
    for jid, j in jobs[-FL_JOBS:][::-1]:
        rounds = (r.get_state(fl_round_key(jid, n)) for n in range(1, j.rounds_done + 1))
        accuracy = [{"round": c.round, "accuracy_ppm": c.accuracy_ppm, "loss_ppm": c.loss_ppm}
                    for c in (RoundRecord.decode(bytes(raw)).commitment for raw in rounds if raw is not None)]
        shown.append({"job_id": jid.hex(), "status": j.status.name, "rounds_done": j.rounds_done, "rounds": j.rounds,
                      "participants": len(j.participants), "reward_pool_sat": j.reward_pool_sat,
                      "accuracy": accuracy, "href": f"/api/fl/jobs/{jid.hex()}"})
    return {"jobs": _by(j.status.name for _, j in jobs), "latest": shown, "href": "/api/fl/jobs"}


def _netflow(r: Reader) -> dict[str, Any]:
    sessions = _ns(r, Namespace.SESSION, SessionRecord.decode)
    return {"relays": [relay_json(bytes(k[1:]), RelayRecord.decode(bytes(v)))  # as GET /api/netflow/relays
                       for k, v in r.iter_prefix(bytes((Namespace.RELAY,)))],
            "sessions": _by(s.status.name for s in sessions), "escrow_sat": sum(s.escrow_sat for s in sessions),
            "settled_sat": sum(s.settled_sat for s in sessions), "href": "/api/netflow/relays"}


def _gateway(r: Reader) -> dict[str, Any]:
    done = _ns(r, Namespace.COMPLETION, CompletionRecord.decode)
    return {"completions": _by(c.status.name for c in done),
            "tokens_in": sum(c.completion.n_prompt for c in done),
            "tokens_out": sum(c.completion.n_output for c in done),
            "cost_msat": sum(c.completion.cost_msat for c in done),
            "paid": {k: sum(getattr(c, k) for c in done) for k in ("worker_sat", "verifier_sat", "treasury_sat",
                                                                    "burned_sat")},
            "challenges": _by(c.loser.name for c in _ns(r, Namespace.COMPLETION_CHALLENGE, ChallengeRecord.decode)),
            "href": "/api/models"}


def _anchor_states(r: Reader, heights: Iterable[int]) -> dict[int, Optional[str]]:
    """The L2 state's status of each anchored height (None: not recorded on the L2)."""
    raws = {h: r.get_state(anchor_key(h)) for h in heights}
    return {h: None if raw is None else AnchorEntry.decode(bytes(raw)).status.name for h, raw in raws.items()}


def _anchors(app: web.Application, anchors: list[Anchor], l2_states: dict[int, Optional[str]], tip: int,
             final: int) -> dict[str, Any]:
    svc = app[ANCHORS]
    if svc is None:
        return {"enabled": False}
    counts = _by(a.status.value for a in anchors)
    latest = []
    for a in anchors[-ANCHORS_SHOWN:][::-1]:
        d = {"l2_height": a.l2_height, "status": a.status.value, "txid": a.txid, "btc_height": a.btc_height,
             "confirmations": a.confirmations, "fee_sat": a.fee_sat, "l2_state": l2_states.get(a.l2_height)}
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


def _ledger(chain: ChainView, with_bridge: bool, anchor_heights: list[int]) -> dict[str, Any]:
    """Every ledger figure, from one LMDB read (in a worker thread: the scans never hold the event loop)."""
    with chain.reader() as r:
        tip = r.tip_height()
        assert tip is not None  # the node opened its ledger before serving
        final = r.final_height()
        raw = r.get_block(tip)
        assert raw is not None
        head = BlockHeader.decode(bytes(raw[:HEADER_SIZE]), chain.network)
        sup = Supply.decode(bytes(r.get_state(SUPPLY_KEY) or bytes(24)))
        return {
            "head": head, "final": final, "books": bridge.books(r) if with_bridge else None,
            "anchor_states": _anchor_states(r, anchor_heights), "blocks": _blocks(r, chain.network, tip, final),
            "supply": {"minted_sat": sup.minted_sat, "burned_sat": sup.burned_sat, "fees_sat": sup.fees_sat,
                       "records": r.state_count(), "href": "/api/l2/state"},
            "work": _work(r), "fl": _fl(r), "netflow": _netflow(r), "gateway": _gateway(r)}


async def snapshot(app: web.Application, now: Callable[[], float] = time.time) -> dict[str, Any]:
    """What the dashboard shows: the ledger part from one read at one height (_ledger), the node's own view
    (members, services, counters) read on the event loop; one snapshot shared by every reader for PUSH_GAP_S or
    until the next block."""
    news, loop = app[NEWS], asyncio.get_running_loop()
    if news.latest is not None and loop.time() - news.latest[0] < PUSH_GAP_S:
        return news.latest[1]
    if news.building is None:
        news.building = asyncio.ensure_future(_build(app, now))
        news.building.add_done_callback(lambda _: setattr(news, "building", None))
    return await asyncio.shield(news.building)


async def _build(app: web.Application, now: Callable[[], float]) -> dict[str, Any]:
    chain, members, svc, blocks = app[CHAIN], app[MEMBERS], app[ANCHORS], app[NEWS].blocks
    anchors = [] if svc is None else svc.all_anchors()
    led = await asyncio.to_thread(_ledger, chain, app[FEDERATION] is not None,
                                  [a.l2_height for a in anchors[-ANCHORS_SHOWN:]])
    head, final, books = led["head"], led["final"], led["books"]
    fed = members.status()
    out: dict[str, Any] = {
        "height": head.height, "tip_hash": head.hash.hex(), "state_root": head.state_root.hex(),
        "final_height": final, "tip_timestamp_ms": head.timestamp_ms, "network": chain.network.name,
        "version": chain.version, "blocks": led["blocks"], "supply": led["supply"],
        "anchors": _anchors(app, anchors, led["anchor_states"], head.height, final),
        "work": led["work"], "fl": led["fl"], "netflow": led["netflow"], "gateway": led["gateway"]}
    bsvc = app[BRIDGE]
    halted = None if bsvc is None else bsvc.halted
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
    if app[NEWS].blocks == blocks:
        app[NEWS].latest = (asyncio.get_running_loop().time(), out)
    return out


def _samples(counts: dict[str, int], label: str) -> list[tuple[tuple[tuple[str, str], ...], float]]:
    return [(((label, k),), v) for k, v in sorted(counts.items())]


def metric_lines(s: dict[str, Any]) -> list[str]:
    """The subsystems' figures of a snapshot as Prometheus gauges (GET /metrics adds them to its own)."""
    out = gauges("l2d_status", "1 for the node's state (READY, SYNCING, DEGRADED), 0 for the others.",
                 [((("state", k),), int(s["status"]["state"] == k)) for k in ("READY", "SYNCING", "DEGRADED")])
    a = s["anchors"]
    if a["enabled"]:
        out += gauges("l2d_anchors", "Anchors this node keeps, by status.",
                      _samples({k: a["counts"].get(k, 0) for k in ("BUILT", "SUBMITTED", "CONFIRMED", "FINAL")},
                               "status"))
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
    out += gauges("l2d_workers", "Registered workers, by status.", _samples(w["workers"], "status"))
    out += gauges("l2d_tasks", "Tasks in the state, by status.", _samples(w["tasks"], "status"))
    out += gauge("l2d_worker_slashes", "Slashes of all workers.", w["slashes"])
    out += gauges("l2d_fl_jobs", "FL jobs, by status.", _samples(s["fl"]["jobs"], "status"))
    n = s["netflow"]
    out += gauges("l2d_relays", "NetFlow relays, by status.", _samples(_by(r["status"] for r in n["relays"]), "status"))
    out += gauges("l2d_sessions", "Paid sessions, by status.", _samples(n["sessions"], "status"))
    g = s["gateway"]
    out += gauges("l2d_completions", "Recorded completions, by status.", _samples(g["completions"], "status"))
    out += gauges("l2d_completion_tokens", "Tokens of recorded completions.",
                  [((("kind", "prompt"),), g["tokens_in"]), ((("kind", "output"),), g["tokens_out"])])
    return out


async def page(request: web.Request) -> web.Response:
    """GET / and /dashboard: the page (plain HTML, CSS and JS; nothing fetched from elsewhere)."""
    return web.Response(body=PAGE.read_bytes(), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def dashboard(request: web.Request) -> web.Response:
    """GET /api/dashboard: one snapshot."""
    return web.json_response(await snapshot(request.app))


async def events(request: web.Request) -> web.StreamResponse:
    """GET /api/dashboard/events: `event: snapshot` with a snapshot's JSON after every block (at most every
    PUSH_GAP_S) and at least every PUSH_EVERY_S, until the client goes away."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    await resp.write(b"retry: 2000\n\n")
    news = request.app[NEWS]
    while not news.closed:
        body = json.dumps(await snapshot(request.app), separators=(",", ":"))
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
