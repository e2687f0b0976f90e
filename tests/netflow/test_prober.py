"""The federation's NetFlow probing duty (netflow/prober.py) in a real l2d process: it downloads through each relay
(real `l2-relay` processes) from its own sink, pays them from its member key's sessions, and posts RelayWeights; a
relay advertising far more than it carries (`--max-rate` caps it) weighs what was measured, an honest one what it
advertised."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, Callable

from coincurve import PrivateKey

from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.relay import relay_weight
from l2d.core.relay_tx import MAX_WEIGHTS, Measurement, RelayWeights
from l2d.core.tx import sign
from netflow.client import RelayInfo
from netflow.prober import to_probe
from tests.conftest import L2dProcess, Proc
from tests.l2d.federation_procs import DEMO1, Federation
from tests.netflow.test_netflow_e2e import FUNDS, PRICE, RELAYS, TOKEN, pk, secret

MEMBER = secret("member")
FAST = {"round_ms": 1000, "max_round_ms": 8000}  # round timing (docs/federation.md), as the federation fault tests


async def relay_proc(tmp: Path, api: str, i: int, rate: int, max_rate: int, procs: list[Proc]) -> Proc:
    key = tmp / f"relay{i}.key"
    key.write_text(RELAYS[i].hex())
    key.chmod(0o600)
    p = Proc(["netflow.relay", "--api", api, "--key", str(key), "--x25519-key", str(tmp / f"relay{i}.x25519"),
              "--listen", "127.0.0.1:0", "--register", "--exit", "--rate", str(rate), "--max-rate", str(max_rate),
              "--price", str(PRICE), "--settle-every", "3600"], tmp / f"relay{i}.log")
    procs.append(p)
    assert re.search(r"listening on", await asyncio.to_thread(p.first_line))
    return p


async def test_relays_weigh_what_the_federation_measured(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        poll: Callable[..., Any], procs: list[Proc]) -> None:
    member_key = tmp_path / "member.key"
    member_key.write_text(MEMBER.hex())
    member_key.chmod(0o600)
    alloc = {pk(MEMBER): FUNDS, **{pk(r): FUNDS for r in RELAYS[:2]}}
    d = l2d_process(node_toml(tmp_path / "node.toml", alloc, TOKEN, block={"interval_ms": 50},
                              federation={"key_file": str(member_key)},
                              netflow={"probe": True, "probe_interval_ms": 1000, "probe_bytes": 262_144}))
    api = d.url("")
    await relay_proc(tmp_path, api, 0, 100_000, 256, procs)  # claims 100 MiB/s, carries 256 KiB/s
    await relay_proc(tmp_path, api, 1, 512, 0, procs)  # claims 512 KiB/s, carries far more

    def measured() -> Any:
        rs = {r["identity"]: r for r in d.get("/api/netflow/relays")["relays"]}
        return rs if len(rs) == 2 and all(r["measured_height"] > 0 and r["success_ppm"] for r in rs.values()) else None
    rs = await poll(measured, 120, "both relays measured and weighed")
    liar, honest = rs[pk(RELAYS[0]).hex()], rs[pk(RELAYS[1]).hex()]
    for r in (liar, honest):
        assert r["weight"] == relay_weight(r["measured_kib_s"], r["rate_kib_s"], r["success_ppm"])
    assert liar["measured_kib_s"] <= 2 * 256 and liar["weight"] <= 2 * 256  # not the 100,000 it advertises
    assert honest["measured_kib_s"] > 512 and honest["weight"] == 512 * honest["success_ppm"] // 1_000_000
    assert honest["weight"] > liar["weight"]
    # the prober paid like any client: sessions from the member key, one per relay
    member = d.get(f"/api/l2/accounts/{pk(MEMBER).hex()}")
    assert member["balance_sat"] < FUNDS


def test_rounds_go_round_every_relay_when_there_are_more_than_one_transaction_holds() -> None:
    relays = [RelayInfo(bytes([i]) * 32, bytes(32), bytes([i]) * 32, 3, f"127.0.0.1:{9000 + i}", 1000, 0)
              for i in range(MAX_WEIGHTS + 6)]
    probed: dict[bytes, int] = {}
    seen = []
    for n in range(3):
        batch = to_probe(relays, probed, MAX_WEIGHTS)
        assert len(batch) == MAX_WEIGHTS and len({r.identity for r in batch}) == MAX_WEIGHTS
        probed.update((r.identity, n) for r in batch)
        seen.append({r.identity for r in batch})
    assert seen[0] | seen[1] == {r.identity for r in relays}  # two rounds measure every relay
    assert seen[1] >= {r.identity for r in relays[MAX_WEIGHTS:]}  # the ones left out first come first next


async def test_three_members_each_relay_weighs_the_low_median_of_their_votes_and_a_lying_member_moves_nothing(
        tmp_path: Path, poll: Callable[..., Any], procs: list[Proc]) -> None:
    """A federation of three real daemons; members 1 and 2 run the probing duty, member 3 does not and posts a lie
    instead (a RelayWeights signed with its member key saying both relays carry 1 GiB/s). Every member lists the same
    votes for each relay, the weight is the low median of the three (recomputed here from the votes listed), and the
    lie lifts neither relay above what a probing member measured: the one advertising 100,000 KiB/s but carrying 256
    still weighs about 256. Afterwards the members' databases hold one chain (the federation invariants)."""
    fed = Federation(tmp_path / "fed", n=3, federation=FAST)
    for k in (0, 1):
        with fed.config(k).open("a") as f:
            f.write("\n[netflow]\nprobe = true\nprobe_interval_ms = 1000\nprobe_bytes = 262144\n")
    members = [PrivateKey(fed.secret(k)).public_key_xonly.format() for k in range(3)]
    try:
        for k in range(3):
            fed.start(k)
        for n, to in enumerate([members[0], members[1], pk(RELAYS[0]), pk(RELAYS[1])]):  # money for probes, stakes
            fed.submit(0, sign(LOCAL, DEMO1, n, 1, Transfer(to, FUNDS), bytes(32)))
        api = fed.procs[0].url("")
        await poll(lambda: fed.procs[0].get(f"/api/l2/accounts/{pk(RELAYS[1]).hex()}")["balance_sat"] == FUNDS, 60,
                   "the transfers committed")
        await relay_proc(tmp_path, api, 0, 100_000, 256, procs)  # claims 100 MiB/s, carries 256 KiB/s
        await relay_proc(tmp_path, api, 1, 512, 0, procs)  # claims 512 KiB/s, carries far more
        liar, honest = pk(RELAYS[0]).hex(), pk(RELAYS[1]).hex()

        def voted(k: int, by: set[str]) -> Any:
            rs = {r["identity"]: r for r in fed.procs[k].get("/api/netflow/relays")["relays"]}
            ok = len(rs) == 2 and all({v["member"] for v in r["votes"]} >= by and r["success_ppm"] for r in rs.values())
            return rs if ok else None
        probers = {members[0].hex(), members[1].hex()}
        await poll(lambda: voted(2, probers), 180, "both relays measured by members 1 and 2 (seen by member 3)")
        epoch = int(fed.status(2)["height"])
        lie = RelayWeights(epoch, tuple(sorted((Measurement(pk(RELAYS[i]), 1 << 20, 1_000_000) for i in range(2)),
                                              key=lambda m: m.relay)))
        fed.submit(2, sign(LOCAL, fed.secret(2), 0, 0, lie, bytes(32)))
        for k in range(3):
            rs = await poll(lambda: voted(k, {m.hex() for m in members}), 60, f"member {k + 1} lists three votes")
            for r in rs.values():
                low = sorted(r["votes"], key=lambda v: v["measured_kib_s"])[1]["measured_kib_s"]
                ppm = sorted(v["success_ppm"] for v in r["votes"])[1]
                assert (r["measured_kib_s"], r["success_ppm"]) == (low, ppm)
                assert r["weight"] == relay_weight(low, r["rate_kib_s"], ppm)
                honest_max = max(v["measured_kib_s"] for v in r["votes"] if v["member"] in probers)
                assert r["measured_kib_s"] <= honest_max  # the lie (1 GiB/s) is never the median
            assert rs[liar]["weight"] <= 2 * 256 and rs[honest]["weight"] <= 512
        for k in range(3):
            fed.stop(k)
        fed.check()
    finally:
        fed.kill_all()
