"""Task lifecycle end to end: a real l2d daemon (orchestration on) and real `l2-worker` processes on loopback
running torch inference; everything observed over REST, balances read from the ledger."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from sklearn.datasets import load_digits

from l2d.core.work_tx import TaskSubmit

PPM = 1_000_000
BOUNTY = 100_000
STAKE = 100_000  # what every agent stakes (conftest)


def images(seed: int, n: int = 8) -> tuple[bytes, list[int]]:
    """n held-out digit images and their true labels."""
    d = load_digits()
    idx = 1500 + (seed * 7919 + np.arange(n) * 31) % 297
    return d.data[idx].astype(np.uint8).tobytes(), [int(x) for x in d.target[idx]]


def submit(net: Any, seed: int, bounty: int = BOUNTY) -> str:
    data, _ = images(seed)
    raw = net.sign_client(TaskSubmit(bounty, 0, 0, b"digits-mlp", b"", data))
    status, body = net.post("/api/orchestration/submit", {"tx": raw.hex()})
    assert status == 202, body
    return str(body["task_id"])


def earned(net: Any, pk: bytes) -> int:
    """What a worker got paid: its balance against funding - stake - fees (1 sat per transaction so far),
    balance and nonce read in one snapshot (its heartbeats go on meanwhile)."""
    acc = net.get(f"/api/l2/accounts/{pk.hex()}")
    return int(acc["balance_sat"]) - (1_000_000 - STAKE - int(acc["nonce"]))


async def settled(net: Any, poll: Callable[..., Any], tid: str, timeout: float = 90) -> Any:
    async def done() -> Any:
        t = net.task(tid)
        return t if t is not None and t["status"] == "SETTLED" else None
    return await poll(done, timeout, f"task {tid} settled")


async def ready(net: Any, poll: Callable[..., Any], n: int) -> None:
    """n workers registered and probed (schedulable)."""
    async def ok() -> bool:
        ws = net.workers().values()
        return sum(1 for w in ws if w.get("live", {}).get("schedulable") and w["live"]["latency_ema_us"]) >= n
    await poll(ok, 120, f"{n} schedulable workers")


async def test_a_task_is_assigned_run_verified_and_settled(orch_net: Callable[..., Any],
                                                          poll: Callable[..., Any]) -> None:
    net = orch_net(["a", "b", "c"], audit_rate=1.0, worker_share=0.8, verifier_share=0.15, treasury_share=0.05)
    for i, name in enumerate("abc"):
        net.start_agent(name, "--price", str(10 + i))
    await ready(net, poll, 3)
    a, b, c = (net.agents[x].pubkey for x in "abc")
    before = {pk: net.balance(pk) for pk in (net.federation, net.client)}
    tid = submit(net, 1)
    t = await settled(net, poll, tid)
    assert (t["worker"], t["backup"], t["verifier"]) == (a.hex(), b.hex(), c.hex())  # lowest cost, then the rest
    assert t["outcome"] == "PAID" and t["timeouts"] == 0
    _, labels = images(1)
    out = t["results"]["worker"]["output"]
    assert out == t["results"]["verifier"]["output"]
    assert sum(o == y for o, y in zip(out, labels)) >= 6  # a real model: most of the 8 digits right
    # The explanation names every score component of the chosen worker, its backup and the verifier.
    expl = t["explanation"][0]
    comps = {"reputation", "latency", "capacity", "cost", "region", "green"}
    assert set(expl["chosen"]["components_ppm"]) == comps and set(expl["backup"]["components_ppm"]) == comps
    assert expl["verifier"]["worker_id"] == c.hex() and expl["strategy"] == "lowest_cost"
    # Balances moved as configured: 80% / 15% / 5%, the client paid bounty + fee.
    assert net.balance(net.client) == before[net.client] - BOUNTY - 1
    assert net.balance(net.federation) - before[net.federation] == BOUNTY * 5 // 100
    # a and c also pay fees for heartbeats and results, so compare with their fees taken out
    ws = net.workers()
    for pk, share in ((a, 80), (c, 15)):
        assert earned(net, pk) == BOUNTY * share // 100
        assert ws[pk.hex()]["tasks_done"] == 1 and ws[pk.hex()]["reputation_ppm"] > 500_000
    listed = net.get("/api/orchestration/tasks?status=SETTLED")["tasks"]
    assert [x["task_id"] for x in listed] == [tid]


async def test_a_cheating_worker_is_caught_slashed_and_loses_later_assignments(
        orch_net: Callable[..., Any], poll: Callable[..., Any]) -> None:
    net = orch_net(["a", "b", "c", "d"], audit_rate=1.0, slash_fraction=0.5, slash_challenger_share=0.4)
    net.start_agent("a", "--price", "10", "--cheat")  # the cheapest: lowest_cost gives it the first task
    for i, name in enumerate("bcd"):
        net.start_agent(name, "--price", str(11 + i))
    await ready(net, poll, 4)
    a, b, c, d = (net.agents[x].pubkey for x in "abcd")
    burned0 = net.get("/api/l2/state")["supply"]["burned_sat"]
    tid = submit(net, 2)
    t = await settled(net, poll, tid)
    assert (t["worker"], t["verifier"], t["referee"]) == (a.hex(), c.hex(), d.hex())
    assert t["outcome"] == "WORKER_SLASHED"
    assert t["results"]["referee"]["output"] == t["results"]["verifier"]["output"] != t["results"]["worker"]["output"]
    kinds = [e["kind"] for e in t["events"]]
    assert kinds[:3] == ["assign", "dispute", "resolve"]
    resolve = next(e for e in t["events"] if e["kind"] == "resolve")
    assert resolve["slash_sat"] == STAKE // 2 and resolve["challenger_sat"] == STAKE // 2 * 4 // 10
    ws = net.workers()
    assert ws[a.hex()]["stake_sat"] == STAKE // 2 and ws[a.hex()]["slashes"] == 1
    assert ws[a.hex()]["reputation_ppm"] < 300_000  # below the default minimum: off the schedule for good
    assert net.get("/api/l2/state")["supply"]["burned_sat"] == burned0 + STAKE // 2 - STAKE // 2 * 4 // 10
    # the verifier (the challenger) got its slash share on top of the executor's share of the bounty
    assert earned(net, c) == STAKE // 2 * 4 // 10 + BOUNTY * 85 // 100
    # Later tasks go to others, whatever the cheater's price.
    later = [submit(net, 3 + i) for i in range(2)]
    for tid2 in later:
        t2 = await settled(net, poll, tid2)
        assert a.hex() not in (t2["worker"], t2["backup"], t2["verifier"], t2["referee"])
        assert t2["outcome"] == "PAID" and t2["worker"] == b.hex()


async def test_a_lying_verifier_is_caught_by_the_dispute_re_execution(orch_net: Callable[..., Any],
                                                                     poll: Callable[..., Any]) -> None:
    net = orch_net(["a", "b", "c", "d"], audit_rate=1.0)
    for i, name in enumerate("abcd"):
        net.start_agent(name, "--price", str(10 + i), *(["--cheat"] if name == "c" else []))
    await ready(net, poll, 4)
    a, c, d = (net.agents[x].pubkey for x in "acd")
    tid = submit(net, 5)
    t = await settled(net, poll, tid)
    assert (t["worker"], t["verifier"], t["referee"]) == (a.hex(), c.hex(), d.hex())
    assert t["outcome"] == "VERIFIER_SLASHED"
    ws = net.workers()
    assert ws[c.hex()]["slashes"] == 1 and ws[c.hex()]["stake_sat"] == STAKE // 2
    assert ws[a.hex()]["slashes"] == 0 and ws[a.hex()]["tasks_done"] == 1
    # the worker was right: it gets the executor's share plus the challenger's part of the slash
    assert earned(net, a) == BOUNTY * 85 // 100 + STAKE // 2 // 2
    assert earned(net, d) == BOUNTY * 10 // 100  # the referee: the verifier's share


async def test_a_worker_killed_mid_task_fails_over_to_its_backup_and_the_task_settles_once(
        orch_net: Callable[..., Any], poll: Callable[..., Any]) -> None:
    # The deadline is far away: what fails the task over is that its worker stops sending heartbeats.
    net = orch_net(["a", "b", "c"], audit_rate=0, timeout_blocks=100_000, heartbeat_grace_blocks=40)
    net.start_agent("a", "--price", "10", "--work-ms", "20000")  # a long job: it will not live to finish it
    net.start_agent("b", "--price", "11")
    net.start_agent("c", "--price", "12")
    await ready(net, poll, 3)
    a, b = net.agents["a"].pubkey, net.agents["b"].pubkey
    treasury0 = net.balance(net.federation)
    tid = submit(net, 6)

    async def running() -> bool:
        t = net.task(tid)
        return t is not None and t["running"] and t["worker"] == a.hex()
    await poll(running, 60, "worker a running the task")
    net.agents["a"].kill()
    t = await settled(net, poll, tid)
    assert t["worker"] == b.hex() and t["timeouts"] == 1 and t["outcome"] == "PAID"
    reassign = [e for e in t["events"] if e["kind"] == "reassign"]
    assert len(reassign) == 1 and reassign[0]["replaced"] == a.hex() and reassign[0]["new"] == b.hex()
    assert reassign[0]["reason"] == "missed-heartbeats"
    ws = net.workers()
    assert ws[a.hex()]["tasks_failed"] == 1 and ws[a.hex()]["active_tasks"] == 0
    assert ws[b.hex()]["tasks_done"] == 1
    # paid exactly once: the backup's share and the treasury's add up to the bounty
    paid_b = earned(net, b)
    assert paid_b == BOUNTY * 95 // 100
    assert paid_b + net.balance(net.federation) - treasury0 == BOUNTY
    assert not ws[a.hex()]["live"]["schedulable"]  # its probes fail: no new work for a dead worker
