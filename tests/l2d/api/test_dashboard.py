"""The dashboard's snapshot (GET /api/dashboard), its live feed and its status banner, against a running node.
The page itself in a real browser: test_dashboard_browser.py."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from aiohttp import web
from aiohttp.test_utils import TestClient

from l2d.api import dashboard
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.tx import sign
from tests.conftest import Keys
from tests.l2d.api.test_openapi import assert_conforms

Client = TestClient[web.Request, web.Application]


async def _json(client: Client, path: str) -> Any:
    r = await client.get(path)
    assert r.status == 200, await r.text()
    body = await r.json()
    assert_conforms("GET", path, r.status, r.content_type, body)  # as GET /api/openapi.json describes it
    return body


async def _transfers(client: Client, n: int, wait_until: Any) -> None:
    for nonce in range(n):
        tx = sign(LOCAL, Keys.secret(1), nonce, 1, Transfer(Keys.pubkey(2), 1000 + nonce), bytes(32))
        r = await client.post("/api/l2/tx", json={"tx": tx.raw.hex()})
        assert r.status == 202, await r.text()
        last = tx.txid.hex()

    async def committed() -> bool:
        return (await _json(client, f"/api/l2/tx/{last}"))["status"] == "committed"
    await wait_until(committed, what="the transfers committed")


async def test_the_snapshot_agrees_with_every_endpoint_behind_it(client: Client, wait_until: Any) -> None:
    await _transfers(client, 3, wait_until)
    got: list[Any] = []

    async def at_one_height() -> bool:  # a block making the last one final may come between the reads: read again
        got[:] = [await _json(client, p) for p in ("/api/dashboard", "/api/status", "/api/l2/state")]
        return bool(got[0]["height"] == got[1]["height"] == got[2]["height"])
    await wait_until(at_one_height, what="the three read at one height")
    s, status, state = got
    assert s["height"] >= 1
    assert s["state_root"] == status["state_root"] and s["tip_hash"] == status["tip_hash"]
    assert s["final_height"] == status["final_height"] and s["mempool"]["size"] == status["mempool_size"] == 0
    assert {k: s["supply"][k] for k in state["supply"]} == state["supply"]
    assert s["supply"]["records"] == state["records"]
    assert s["status"] == {"state": "READY", "reasons": [], "notes": ["anchoring is off"]}
    # the strip: the tip first, newest to oldest, each block as /api/l2/blocks serves it, 3 transfers in all
    assert [b["height"] for b in s["blocks"]] == list(range(s["height"], -1, -1))
    assert sum(b["tx_count"] for b in s["blocks"]) == 3
    for b in s["blocks"]:
        served = await _json(client, b["href"])
        assert (served["hash"], served["tx_count"], served["final"]) == (b["hash"], b["tx_count"], b["final"])
    assert s["federation"]["members"][0]["height"] == s["federation"]["height"] == s["height"] + 1
    assert s["node"]["txs_accepted"] == 3 and s["node"]["blocks_committed"] == s["height"]


async def test_the_page_is_served_at_the_root_and_at_dashboard_with_nothing_from_elsewhere(client: Client) -> None:
    for path in ("/", "/dashboard"):
        r = await client.get(path)
        assert r.status == 200 and r.content_type == "text/html"
        html = await r.text()
        assert "/api/dashboard/events" in html and "EventSource" in html
        assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # no CDN, no remote asset
        assert "https://" not in html


async def _next_snapshot(resp: Any) -> dict[str, Any]:
    event: Optional[str] = None
    while True:
        line = (await resp.content.readline()).decode()
        assert line, "the feed ended"
        if line.startswith("event: "):
            event = line[7:].strip()
        elif line.startswith("data: ") and event == "snapshot":
            return dict(json.loads(line[6:]))


async def test_the_feed_pushes_a_new_snapshot_after_a_block_and_ends_at_shutdown(client: Client,
                                                                                 wait_until: Any) -> None:
    resp = await client.get("/api/dashboard/events")
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    first = await _next_snapshot(resp)
    await _transfers(client, 1, wait_until)

    async def after_block() -> dict[str, Any]:
        while (s := await _next_snapshot(resp))["height"] == first["height"]:
            pass
        return s
    s = await asyncio.wait_for(after_block(), 30)
    assert s["height"] > first["height"] and sum(b["tx_count"] for b in s["blocks"]) == 1
    await client.app[dashboard.NEWS].close(client.app)  # what aiohttp's on_shutdown does before it waits
    assert await asyncio.wait_for(resp.content.read(), 30) is not None  # read to the end: the handler returned
    assert resp.content.at_eof()


def _fed(**kw: Any) -> dict[str, Any]:
    members = [{"index": 0, "id": "a", "height": 5, "last_seen_s_ago": None, "evidence": 0},
               {"index": 1, "id": "b", "height": 5, "last_seen_s_ago": 1.0, "evidence": 0}]
    return {"me": 0, "height": 5, "members": members, "evidence": 0, "behind": False, "catching_up_from": [], **kw}


ANCHORS_OK = {"enabled": True, "broadcasting": True, "bitcoind_error": None, "zmq_error": None}
BOOKS_OK = {"invariant_ok": True}


def test_the_banner_is_ready_only_when_nothing_is_wrong_and_names_every_reason() -> None:
    ok = dashboard._status(_fed(), ANCHORS_OK, BOOKS_OK, None, 0, 0, 1000.0)
    assert ok == {"state": "READY", "reasons": [], "notes": []}
    behind = _fed(behind=True)
    behind["members"][1]["height"] = 9
    s = dashboard._status(behind, ANCHORS_OK, BOOKS_OK, None, 0, 0, 1000.0)
    assert s["state"] == "SYNCING" and s["reasons"] == ["catching up: members report height 9, this member is at 5"]
    silent = _fed()
    silent["members"][1]["last_seen_s_ago"] = dashboard.SILENT_S + 1
    cases = [
        (silent, ANCHORS_OK, BOOKS_OK, None, 0, "member 1 (b) not heard from for 31 s"),
        (_fed(evidence=2), ANCHORS_OK, BOOKS_OK, None, 0, "2 equivocation(s) recorded"),
        (_fed(), {**ANCHORS_OK, "bitcoind_error": "connection refused"}, BOOKS_OK, None, 0,
         "bitcoind unreachable: connection refused"),
        (_fed(), {**ANCHORS_OK, "zmq_error": "no socket"}, BOOKS_OK, None, 0, "ZMQ subscription down"),
        (_fed(), ANCHORS_OK, {"invariant_ok": False}, None, 0, "bridge books do not balance"),
        (_fed(), ANCHORS_OK, BOOKS_OK, "coins do not match", 0, "bridge halted: coins do not match"),
        (_fed(), ANCHORS_OK, BOOKS_OK, None, 4, "4 transaction(s) waiting and no block for 1000 s"),
    ]
    for fed, anchors, books, halted, mempool, reason in cases:
        s = dashboard._status(fed, anchors, books, halted, mempool, 0, 1000.0)
        assert s["state"] == "DEGRADED" and any(r.startswith(reason) for r in s["reasons"]), (reason, s)
    # degraded wins over syncing, and keeps both reasons
    s = dashboard._status(behind, {**ANCHORS_OK, "bitcoind_error": "x"}, BOOKS_OK, None, 0, 0, 1000.0)
    assert s["state"] == "DEGRADED" and len(s["reasons"]) == 2
    # what is off by configuration is a note, not a fault
    s = dashboard._status(_fed(), {"enabled": True, "broadcasting": False}, None, None, 0, 0, 1000.0)
    assert s == {"state": "READY", "reasons": [], "notes": ["no bitcoind configured: anchors are built, not broadcast"]}


def test_the_subsystems_figures_become_prometheus_gauges() -> None:
    snap = {"status": {"state": "DEGRADED"},
            "anchors": {"enabled": True, "counts": {"FINAL": 3, "SUBMITTED": 1}, "next_in_blocks": 4,
                        "broadcasting": True, "bitcoind_error": "refused"},
            "bridge": {"pegged_in_sat": 900, "pending_pegouts_sat": 100, "paid_out_sat": 200, "holdings_sat": 800,
                       "invariant_ok": True},
            "work": {"workers": {"ACTIVE": 2}, "tasks": {"SETTLED": 5, "DISPUTED": 1}, "slashes": 1},
            "fl": {"jobs": {"FINISHED": 1}},
            "netflow": {"relays": [{"status": "ACTIVE"}, {"status": "ACTIVE"}, {"status": "WITHDRAWN"}],
                        "sessions": {"OPEN": 2}},
            "gateway": {"completions": {"RECORDED": 7}, "tokens_in": 70, "tokens_out": 140}}
    lines = dashboard.metric_lines(snap)
    samples = {ln.rsplit(" ", 1)[0]: ln.rsplit(" ", 1)[1] for ln in lines if not ln.startswith("#")}
    assert samples['l2d_status{state="DEGRADED"}'] == "1" and samples['l2d_status{state="READY"}'] == "0"
    assert samples['l2d_anchors{status="FINAL"}'] == "3" and samples['l2d_anchors{status="BUILT"}'] == "0"
    assert samples["l2d_bitcoind_reachable"] == "0" and samples["l2d_anchor_next_in_blocks"] == "4"
    assert samples['l2d_bridge_sat{book="holdings"}'] == "800" and samples["l2d_bridge_invariant_ok"] == "1"
    assert samples['l2d_tasks{status="DISPUTED"}'] == "1" and samples['l2d_workers{status="ACTIVE"}'] == "2"
    assert samples['l2d_relays{status="ACTIVE"}'] == "2" and samples['l2d_relays{status="WITHDRAWN"}'] == "1"
    assert samples['l2d_completion_tokens{kind="output"}'] == "140" and samples['l2d_fl_jobs{status="FINISHED"}'] == "1"
    types = [ln.split()[2] for ln in lines if ln.startswith("# TYPE")]
    assert len(types) == len(set(types))  # one HELP/TYPE per family
