"""Peg-out latency of the k-of-n federation (issue 13): real member processes paying burns on a real bitcoind.

    python bench/bench_pegout.py [--pegouts N] [--quick] [--keep DIR]

Two federations, each written by `l2-cli federation-init --network regtest` (generated settings: block.interval_ms
1000, federation.round_ms 2000) with the Bitcoin sections of regtest/members.py (an anchor every 2 L2 blocks,
CONFIRMED at 1 Bitcoin confirmation, FINAL at 3, peg-outs COMPLETED at 1, bridge and anchoring polling bitcoind
every 100 ms), each against its own throwaway bitcoind (regtest/harness.py):
- **4 members**, 3-of-4 federation keys, one key per member process; anchors are plans signed by 3 of the keys
  (as every anchor), paid by a funding coin an operator records with federation-fund;
- **the baseline**: 1 member holding 3 of the 4 keys itself (threshold 3): the same plans, signatures and
  transactions, with no other member process to agree with.
Alice pegs in 1 BTC (a proven deposit, claimed), then, while bitcoind mines one block every second (a fixed
cadence, from a thread), burns 0.01 BTC to a fresh wallet address N times (default 10, --quick 3), each burn sent
to the next member in turn once the previous peg-out is COMPLETED in member 1's state (so each peg-out is alone in
flight and its plan finds the previous payout's change). For each peg-out:
- **payable**: the first "block committed" line, in any member's own JSON log, of the L2 block whose AnchorUpdate
  makes an anchor at or above the burn's height FINAL in the L2 state (the block found by decoding member 1's
  blocks; members log each block's hash);
- **plan**, **signed**: the same for the block recording the peg-out's PegoutPlan, and for the block holding the
  threshold-th PlanSignature of the version paid;
- **mempool**: when the payout (the plan's txid) entered bitcoind's mempool, from bitcoind's ZMQ `sequence`
  notifications received in a thread of this process (same machine, same wall clock as the members' logs);
- **burn**: this process's wall clock just before it POSTs the burn.
Reported: payable -> mempool (median, p90, max) for both federations and their ratio 4/1; the same for every
anchor, commit -> mempool (member 1's commit of the anchored L2 block to the anchor plan's signed transaction in
its bitcoind, its anchor service's `accept_latency_ms`), and their ratio 4/1; burn -> mempool for both
(the issue's figure is the 4-member one); and the median of each step (burn -> payable, payable -> plan,
plan -> signed, signed -> mempool).

What dominates. payable -> mempool is three L2 blocks, each up to block.interval_ms (1 s) apart, plus the bridge's
100 ms polls: a member's bridge sees the FINAL anchor and proposes a plan (the next block records it); a plan is
signed only once its block is final, i.e. once a child block is committed; each holder of a key then posts its
PlanSignature (the next block); any member holding m signatures finalizes and broadcasts. With one member the same
three blocks are needed, so the 4/1 ratio shows what the member rounds (proposal, precommits, signatures between
processes) and the three separate signers add: little while a round on loopback takes less than the block interval,
since each proposer waits block.interval_ms after its parent's timestamp either way (one of the m signatures
landing a block after the others' costs one more interval: the 4-member p90). burn -> mempool adds burn -> payable,
which is Bitcoin-bound: the burn's block is committed and made final (1-2 L2 blocks), the next anchored height
(every 2 L2 blocks) is anchored once the previous anchor is confirmed (one anchor in flight), then the anchor needs
final_confirmations = 3 blocks (about 3 s at this cadence, on average half a block more to the first one), and
the AnchorUpdate FINAL is recorded in the next L2 block. On mainnet the same steps take 3 Bitcoin blocks (about 30
minutes with these settings), so the L2 side is negligible there; this benchmark shows its share.
Needs bitcoind on PATH (or $BITCOIND); returns {"skipped": reason} without it. `make bench` runs the default size
(about 4 minutes); tests/bench/test_bench_pegout.py runs --quick.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import zmq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from coincurve import PrivateKey  # noqa: E402
from common import workdir  # noqa: E402
from federation import Conn, Federation, Member  # noqa: E402

from bridge.zmq_sub import SequenceEvent, SequenceLabel, parse_message  # noqa: E402
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate  # noqa: E402
from l2d.core.block import Block  # noqa: E402
from l2d.core.coin_tx import Burn  # noqa: E402
from l2d.core.params import REGTEST  # noqa: E402
from l2d.core.pegs_tx import PegoutPlan, PlanSignature  # noqa: E402
from l2d.core.tx import Transaction, sign  # noqa: E402
from regtest.harness import BitcoindNode, find_bitcoind, fund_wallet  # noqa: E402
from regtest.members import fund_body, poll, proven_deposit, secret, write_configs  # noqa: E402

CADENCE_S = 1.0  # one Bitcoin block every second while peg-outs are in flight
DEPOSIT_SAT = 100_000_000
FUNDING_SAT = 5_000_000  # the federation's funding coin: it pays every anchor's fee
BURN_SAT = 1_000_000
PEGOUT_TIMEOUT_S = 180.0
ALICE = secret("bench pegout alice")
ALICE_ID = PrivateKey(ALICE).public_key_xonly.format()
FEDERATIONS = ((4, ((0,), (1,), (2,), (3,))), (1, ((0, 1, 2),)))  # (members, peg-out keys each member holds)
THRESHOLD = 3
MAX_PEGOUTS = 500  # GET /api/bridge/plans lists at most 500


class MempoolWatch:
    """bitcoind's ZMQ `sequence` notifications, read in a thread: when each transaction entered the mempool (this
    process's wall clock when the notification arrived)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.first: dict[str, float] = {}  # txid (display hex) -> time
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="mempool-watch", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the ZMQ subscriber did not start")

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.SUBSCRIBE, b"sequence")
            sock.connect(self.endpoint)
            self._ready.set()
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                frames = sock.recv_multipart()
                t = time.time()
                _, ev = parse_message(frames)
                if isinstance(ev, SequenceEvent) and ev.label == SequenceLabel.TX_ADDED:
                    self.first.setdefault(ev.hash_hex, t)
        except BaseException as e:
            self._error = e
        finally:
            sock.close(0)
            ctx.term()

    def seen(self, txid: str) -> Optional[float]:
        if self._error is not None:
            raise RuntimeError(f"the ZMQ subscriber failed: {self._error!r}")
        return self.first.get(txid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Miner:
    """One Bitcoin block every cadence_s seconds, on a fixed schedule, in a thread."""

    def __init__(self, node: BitcoindNode, address: str, cadence_s: float) -> None:
        self.node, self.address, self.cadence_s = node, address, cadence_s
        self.blocks = 0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="miner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic() + self.cadence_s
        try:
            while not self._stop.wait(max(0.0, due - time.monotonic())):  # the cadence, not a wait for a condition
                self.node.call_sync("generatetoaddress", [1, self.address])
                self.blocks += 1
                due += self.cadence_s
        except BaseException as e:
            self.error = e

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)


def committed_at(logs: Sequence[Path]) -> dict[str, float]:
    """Block hash -> the earliest "block committed" line for it in any of these member logs (wall clock)."""
    out: dict[str, float] = {}
    for path in logs:
        for line in path.read_text().splitlines():
            if '"block committed"' in line:
                r = json.loads(line)
                t = datetime.fromisoformat(r["ts"]).timestamp()
                out[r["hash"]] = min(t, out.get(r["hash"], t))
    return out


@dataclass
class Sample:
    """One peg-out's moments (wall clock, seconds)."""

    pegout: str
    burn: float
    payable: float
    plan: float
    signed: float
    mempool: float
    signature_senders: int  # member processes whose PlanSignature transactions the paid version's quorum came from


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _figures(name: str, xs: Sequence[float]) -> dict[str, float]:
    return {f"{name}_s_median": round(statistics.median(xs), 3), f"{name}_s_p90": round(_pct(xs, 0.9), 3),
            f"{name}_s_max": round(max(xs), 3)}


def _get(m: Member, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{m.tail.port}{path}", timeout=60) as r:
        return json.loads(r.read())


def _submit(m: Member, tx: Transaction) -> None:
    c = Conn(m.tail.port or 0)
    try:
        c.submit(tx)
    finally:
        c.close()


def _samples(fed: Federation, burns: Sequence[tuple[str, float]], watch: MempoolWatch) -> list[Sample]:
    """Each peg-out's moments, from member 1's blocks and plans and every member's log."""
    m1 = fed.member(0)
    tip = _get(m1, "/api/status")["height"]
    blocks = {h: Block.decode(bytes.fromhex(_get(m1, f"/api/l2/blocks/{h}")["raw"]), REGTEST)
              for h in range(1, tip + 1)}
    at = committed_at([fed.root / f"member-{k + 1}-{i}.log" for k in range(fed.n)
                       for i in range(1, fed.starts[k] + 1)])

    def when(h: int) -> float:
        return at[blocks[h].header.hash.hex()]

    pegouts = {p["id"]: p for p in _get(m1, "/api/bridge/pegouts")["pegouts"]}
    plans = _get(m1, f"/api/bridge/plans?limit={MAX_PEGOUTS}")["plans"]  # one plan (or a few versions) each
    out = []
    for pid, t_burn in burns:
        hb = pegouts[pid]["l2_height"]
        payable = next(h for h in range(hb + 1, tip + 1) if any(
            isinstance(t.payload, AnchorUpdate) and t.payload.status == AnchorStatus.FINAL
            and t.payload.l2_height >= hb for t in blocks[h].txs))
        versions = [p for p in plans if pid in [q["id"] for q in p["pegouts"]]]
        first = min(versions, key=lambda p: p["l2_height"])
        seen = [(ts, p) for p in versions if (ts := watch.seen(p["id"])) is not None]
        if not seen:
            raise RuntimeError(f"peg-out {pid}: no version of its plan was seen entering the mempool")
        t_mempool, paid = min(seen, key=lambda x: x[0])
        plan_id = bytes.fromhex(paid["id"])[::-1]
        count, senders, signed = 0, set[bytes](), None
        for h in range(paid["l2_height"] + 1, tip + 1):
            for t in blocks[h].txs:
                if isinstance(t.payload, PlanSignature) and t.payload.plan_id == plan_id:
                    count += 1
                    senders.add(t.sender)
            if count >= paid["threshold"]:
                signed = h
                break
        if signed is None:
            raise RuntimeError(f"peg-out {pid}: fewer than {paid['threshold']} signatures of {paid['id']} recorded")
        assert any(isinstance(t.payload, PegoutPlan) for t in blocks[first["l2_height"]].txs)
        out.append(Sample(pid, t_burn, when(payable), when(first["l2_height"]), when(signed), t_mempool,
                          len(senders)))
    return out


async def run_federation(root: Path, binary: str, n: int, held: Sequence[Sequence[int]],
                         n_pegouts: int) -> dict[str, Any]:
    """One federation on its own bitcoind: set up, pay n_pegouts burns one after the other, measure."""
    btc = BitcoindNode(root / "bitcoind", bitcoind=binary)
    btc.start()
    fed = Federation(root / "fed", n, "", network="regtest")
    miner: Optional[Miner] = None
    watch: Optional[MempoolWatch] = None
    rpc = btc.rpc()
    try:
        w, mine_addr = await fund_wallet(rpc, "miner")
        fed.init()
        write_configs([fed.root / f"member-{k + 1}" for k in range(n)], [btc] * n, held, THRESHOLD)
        r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-genesis", "--dir", str(fed.root)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        if r.returncode:
            raise RuntimeError(f"federation-genesis: {r.stderr}")
        fed.start_all()
        m1 = fed.member(0)

        async def relayed() -> bool:
            tip = _get(m1, "/api/bridge/federation")["btc_tip"]
            return tip is not None and tip["height"] == await rpc.getblockcount()
        await poll(relayed, 120, "the federation's header relay reaching bitcoind's tip")
        addr = _get(m1, f"/api/bridge/pegin-address/{ALICE_ID.hex()}")["address"]
        _, proof = await proven_deposit(rpc, w, mine_addr, relayed, addr, DEPOSIT_SAT)
        claim = sign(REGTEST, ALICE, 0, 1, proof, os.urandom(32))
        _submit(m1, claim)
        await poll(lambda: _get(m1, f"/api/l2/accounts/{ALICE_ID.hex()}")["balance_sat"] > 0, 60,
                   "Alice's claim committed")
        # the anchors are plans paid by the federation's funding coins: an operator funds it (federation-fund)
        fund_addr = _get(m1, "/api/bridge/federation")["funding_address"]
        _, funding = await proven_deposit(rpc, w, mine_addr, relayed, fund_addr, FUNDING_SAT)
        token = re.search(r'admin_token = "([0-9a-f]+)"', fed.config(0).read_text())
        assert token is not None
        req = urllib.request.Request(
            f"http://127.0.0.1:{m1.tail.port}/api/admin/bridge/fund", method="POST",
            data=json.dumps(fund_body(funding)).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token.group(1)}"})
        with urllib.request.urlopen(req, timeout=60):
            pass
        await poll(lambda: _get(m1, "/api/bridge/federation")["funded_sat"] > 0, 60, "the federation funded")

        watch = MempoolWatch(btc.zmq_endpoint)
        miner = Miner(btc, mine_addr, CADENCE_S)
        burns: list[tuple[str, float]] = []
        for i in range(n_pegouts):
            dest = await w.getnewaddress()
            burn = sign(REGTEST, ALICE, i + 1, 1, Burn(BURN_SAT, dest.encode()), os.urandom(32))
            t = time.time()
            _submit(fed.member(i % n), burn)
            pid = burn.txid.hex()
            burns.append((pid, t))

            def completed() -> bool:
                if miner is not None and miner.error is not None:
                    raise RuntimeError(f"the miner failed: {miner.error!r}")
                return any(p["id"] == pid and p["status"] == "COMPLETED"
                           for p in _get(m1, "/api/bridge/pegouts")["pegouts"])
            await poll(completed, PEGOUT_TIMEOUT_S, f"peg-out {i + 1} of {n_pegouts} COMPLETED")
            print(f"{n} member(s): peg-out {i + 1}/{n_pegouts} completed", file=sys.stderr, flush=True)
        miner.close()
        samples = _samples(fed, burns, watch)
        blocks_mined = miner.blocks
        # each anchor as member 1 saw it: its own commit of the anchored block -> the plan's signed transaction in
        # bitcoind (proposed, signed by m keys, broadcast by the members' bridges)
        anchored = [a["accept_latency_ms"] / 1000 for a in _get(m1, "/api/anchors")["anchors"]
                    if a["accept_latency_ms"] is not None]
    finally:
        if miner is not None:
            miner.close()
        if watch is not None:
            watch.close()
        if fed.members:
            fed.stop_all()
        await rpc.close()
        btc.stop()
    res: dict[str, Any] = {"members": n, "keys_held_per_member": [len(h) for h in held], "threshold": THRESHOLD,
                           "pegouts": len(samples), "btc_blocks_mined": blocks_mined}
    res.update(_figures("payable_to_mempool", [s.mempool - s.payable for s in samples]))
    res["anchors"] = len(anchored)
    res.update(_figures("anchor_commit_to_mempool", anchored))
    res.update(_figures("burn_to_mempool", [s.mempool - s.burn for s in samples]))
    for name, a, b in (("burn_to_payable", "burn", "payable"), ("payable_to_plan", "payable", "plan"),
                       ("plan_to_signed", "plan", "signed"), ("signed_to_mempool", "signed", "mempool")):
        res[f"{name}_s_median"] = round(statistics.median(getattr(s, b) - getattr(s, a) for s in samples), 3)
    res["signature_senders_min"] = min(s.signature_senders for s in samples)
    res["samples"] = [{"pegout": s.pegout, **{k: round(getattr(s, k) - s.burn, 3) for k in
                                              ("payable", "plan", "signed", "mempool")}} for s in samples]
    return res


def run(workdir: Path, binary: str, n_pegouts: int, quick: bool) -> dict[str, Any]:
    t0 = time.time()
    out: dict[str, Any] = {"quick": quick, "config": (
        f"generated federation settings (block.interval_ms 1000, federation.round_ms 2000); anchoring every 2 L2 "
        f"blocks, FINAL at 3 confirmations; peg-out threshold {THRESHOLD} of 4 keys; one Bitcoin block every "
        f"{CADENCE_S:g} s; peg-outs of {BURN_SAT} sat one after the other")}
    for n, held in FEDERATIONS:
        out[f"members_{n}"] = asyncio.run(run_federation(workdir / f"members-{n}", binary, n, held, n_pegouts))
        print(f"{n} member(s): {json.dumps({k: v for k, v in out[f'members_{n}'].items() if k != 'samples'})}",
              file=sys.stderr, flush=True)
    out["payable_to_mempool_median_4_vs_1"] = round(out["members_4"]["payable_to_mempool_s_median"]
                                                    / out["members_1"]["payable_to_mempool_s_median"], 2)
    out["anchor_commit_to_mempool_median_4_vs_1"] = round(out["members_4"]["anchor_commit_to_mempool_s_median"]
                                                          / out["members_1"]["anchor_commit_to_mempool_s_median"], 2)
    out["total_s"] = round(time.time() - t0, 1)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pegouts", type=int, help="peg-outs per federation (default 10, --quick 3)")
    ap.add_argument("--quick", action="store_true", help="3 peg-outs per federation (smoke run, tests/bench)")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    a = ap.parse_args(argv)
    n_pegouts = a.pegouts if a.pegouts is not None else 3 if a.quick else 10
    if not 1 <= n_pegouts <= MAX_PEGOUTS // 2:
        ap.error(f"--pegouts {n_pegouts}: must be 1..{MAX_PEGOUTS // 2}")
    binary = find_bitcoind()
    if binary is None:
        res: dict[str, Any] = {"skipped": "bitcoind not found (set $BITCOIND or put it on PATH)"}
    else:
        with workdir(a.keep, "l2d-bench-pegout-") as d:
            res = run(d, binary, n_pegouts, a.quick)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
