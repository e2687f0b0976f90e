"""Federation numbers (issue 12): finality latency, committed transfers per second and catch-up speed of real
member processes on loopback, each against a baseline measured in the same run.

    python bench/federation.py [--quick] [--keep DIR]

Every federation is written by `l2-cli federation-init` (network local, the demo accounts funded) and every member
is `python -m l2d.node --config DIR/member-K/l2d.toml`. Progress is read from each member's own JSON log ("block
committed" lines carry height, txs and final_height, stamped with the member's wall clock, the clock the client
stamps its submits with), so measuring adds no polling load to the members.

1. **Finality latency** (4 members, and 1 member as the baseline): a steady load of transfers from several accounts,
   each account submitting to one member; latency = submit -> the first "block committed" line of THAT member whose
   final_height covers the transaction's block. Median and p90; the block interval achieved over the load window.
2. **Committed transfers per second** (4 members vs 1): the same pre-signed transfers from many accounts, submitted
   spread over the members by client threads (one keep-alive connection each); rate = transfers / (first submit ->
   every transfer final on every member). Also the daemons' CPU seconds per 1000 transfers.
3. **Catch-up** (4 members, fast blocks): SIGTERM member 4, the other three commit many small blocks, restart it;
   blocks per second it fetches, verifies and applies from its peers (first block applied -> its final height
   reaches the others'; the time from process start is reported too). Baseline: the same blocks (read from member
   1's store) verified and applied in this process on a fresh store: decode, each transaction's signature, the
   commit's m signatures, strict re-execution (Ledger.execute) and Ledger.store_block — the work catch-up must do,
   without the transport and the member protocol.

Settings (also printed under "config"): phase 1 runs the generated configs (block.interval_ms 1000, block.max_txs
1000, federation.round_ms 2000) with only the mempool limits raised (mempool.max_per_sender, max_txs) so that a
sender's transfers are not refused; phase 2 also sets block.interval_ms 250 and block.max_txs 10000, so the block
settings are not the cap of the rate measured; phase 3 sets block.interval_ms 10, block.max_txs 4 (many small
blocks in little time) and federation.round_ms 200: with member 4 down, every height it would propose waits out
a quarter round (the others know their link to it is down; reported as member_4_down_*), 0.5 s each with the
generated round_ms.
`make bench` runs the default sizes (about 2 minutes); tests/bench/test_federation.py runs --quick.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import BUSY, cpu_s, poll, workdir  # noqa: E402
from l2d.config import Config  # noqa: E402
from l2d.core.block import Block  # noqa: E402
from l2d.core.coin_tx import Transfer  # noqa: E402
from l2d.core.commit import Commit  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.state import Rules  # noqa: E402
from l2d.core.tx import Transaction, check_signature, public_key, sign  # noqa: E402
from l2d.genesis import load_genesis  # noqa: E402
from l2d.ledger import Ledger  # noqa: E402
from l2d.store import Store  # noqa: E402
from regtest.harness import free_port_base  # noqa: E402

START_TIMEOUT = 120.0
DONE_TIMEOUT = 120.0
TP_INTERVAL_MS, TP_MAX_TXS = 250, 10_000  # the throughput run's blocks: not the cap of the rate measured
CU_ROUND_MS = 200  # the catch-up run's rounds: a height whose proposer is the stopped member waits this long
DEMO = [hashlib.sha256(b"l2d demo account %d" % k).digest() for k in (1, 2, 3)]
SINK = public_key(hashlib.sha256(b"l2d fedbench sink").digest())  # every bench transfer pays this account


def account(i: int) -> bytes:
    return hashlib.sha256(b"l2d fedbench account %d" % i).digest()


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass(frozen=True, slots=True)
class Committed:
    t: float  # wall clock of the member's log line
    height: int
    txs: int
    final: int


class LogTail:
    """A member's JSON log, read incrementally: its "block committed" lines and its "api listening" time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pos = 0
        self._rest = b""
        self.blocks: list[Committed] = []
        self.listening: Optional[float] = None
        self.port: Optional[int] = None

    def read(self) -> "LogTail":
        with open(self.path, "rb") as f:
            f.seek(self._pos)
            data = f.read()
        self._pos += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        for line in lines:
            if b'"block committed"' in line:
                r = json.loads(line)
                self.blocks.append(Committed(_ts(r["ts"]), r["height"], r["txs"], r["final_height"]))
            elif b'"api listening"' in line:
                r = json.loads(line)
                self.listening, self.port = _ts(r["ts"]), int(r["port"])
        return self

    def final_height(self) -> int:
        return self.blocks[-1].final if self.blocks else 0

    def height_reaching(self, above: int, n_txs: int) -> Optional[int]:
        """The height at which the transactions in blocks above `above` add up to n_txs (the block stored last at
        a height counts: a replaced tip is replaced)."""
        per: dict[int, int] = {}
        for b in self.blocks:
            if b.height > above:
                per[b.height] = b.txs
        total = 0
        for h in sorted(per):
            total += per[h]
            if total >= n_txs:
                return h
        return None

    def final_at(self, height: int) -> Optional[float]:
        """When this member first reported `height` final."""
        return next((b.t for b in self.blocks if b.final >= height), None)


class Member:
    """One real l2d process."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self._log = open(log, "ab")
        self.tail = LogTail(log)
        self.tail._pos = log.stat().st_size
        env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
        env["PYTHONPATH"] = str(REPO)
        self.started = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(config)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self._log)

    def wait_listening(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"l2d {self.config} exited with code {self.proc.returncode}: "
                                   f"{self.tail.path.read_text()[-2000:]}")
            return self.tail.read().port is not None
        poll(up, START_TIMEOUT, f"{self.config}: 'api listening'")

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


class Conn:
    """A keep-alive HTTP connection to one member (one per client thread)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, body: Optional[bytes] = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (0, 1):
            try:
                self.c.request(method, path, body=body, headers=headers)
                r = self.c.getresponse()
                return r.status, json.loads(r.read())
            except (OSError, http.client.HTTPException):
                self.c.close()
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def submit(self, tx: Transaction) -> None:
        """POST the transaction until admitted (a full mempool or a sender limit: back off and retry)."""
        body = json.dumps({"tx": tx.raw.hex()}).encode()
        while True:
            status, res = self.request("POST", "/api/l2/tx", body)
            if status == 202:
                return
            if res.get("error") not in BUSY:
                raise RuntimeError(f"transaction refused by port {self.port}: {status} {res}")
            time.sleep(0.005)

    def close(self) -> None:
        self.c.close()


@dataclass
class Federation:
    root: Path
    n: int
    extra_toml: str  # tables appended to every member's l2d.toml
    federation_toml: str = ""  # keys added to its [federation] table
    network: str = "local"
    members: list[Optional[Member]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)

    def init(self) -> "Federation":
        r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-init", "--members", str(self.n), "--dir",
                            str(self.root), "--base-port", str(free_port_base(self.n)), "--network", self.network],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        if r.returncode:
            raise RuntimeError(f"federation-init: {r.stderr}")
        for k in range(self.n):  # tables appended after the [[federation.members]] array: valid TOML
            text = self.config(k).read_text()
            if self.federation_toml:
                text = text.replace("\n[federation]\n", "\n[federation]\n" + self.federation_toml, 1)
            self.config(k).write_text(text + "\n# bench/federation.py\n" + self.extra_toml)
        self.members = [None] * self.n
        self.starts = [0] * self.n
        return self

    def config(self, k: int) -> Path:
        return self.root / f"member-{k + 1}" / "l2d.toml"

    def start(self, k: int) -> Member:
        self.starts[k] += 1
        m = self.members[k] = Member(self.config(k), self.root / f"member-{k + 1}-{self.starts[k]}.log")
        return m

    def start_all(self) -> None:
        for k in range(self.n):
            self.start(k)
        for m in self.live():
            m.wait_listening()

    def live(self) -> list[Member]:
        return [m for m in self.members if m is not None]

    def member(self, k: int) -> Member:
        m = self.members[k]
        assert m is not None
        return m

    def stop(self, k: int) -> None:
        m = self.members[k]
        if m is not None:
            self.members[k] = None
            m.stop()

    def stop_all(self) -> None:
        for k in range(self.n):
            self.stop(k)

    def heights(self) -> list[int]:
        return [m.tail.read().blocks[-1].height if m.tail.blocks else 0 for m in self.live()]

    def wait_all_final(self, above: int, n_txs: int, members: Optional[list[int]] = None) -> dict[int, float]:
        """Wait until the n_txs transactions of blocks above `above` are final on each member; when, per member."""
        ks = list(range(self.n)) if members is None else members
        done: dict[int, float] = {}

        def check() -> bool:
            for k in ks:
                if k in done:
                    continue
                tail = self.member(k).tail.read()
                h = tail.height_reaching(above, n_txs)
                t = None if h is None else tail.final_at(h)
                if t is not None:
                    done[k] = t
            return len(done) == len(ks)
        poll(check, DONE_TIMEOUT, f"{n_txs} transactions final on members {ks}")
        return done


def in_threads(fns: list[Callable[[], Any]]) -> None:
    """Run each function in its own thread; the first exception raised in any is re-raised here."""
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    if errors:
        raise errors[0]


def transfers(secret: bytes, count: int, first_nonce: int = 0, amount: int = 1) -> list[Transaction]:
    return [sign(LOCAL, secret, first_nonce + i, 1, Transfer(SINK, amount), os.urandom(32)) for i in range(count)]


def fund(fed: Federation, funding: list[Transaction]) -> int:
    """Submit the funding transfers to member 1 and wait until they are final everywhere; the tip height after."""
    above = max(fed.heights())
    conn = Conn(fed.member(0).tail.port or 0)
    for tx in funding:
        conn.submit(tx)
    conn.close()
    fed.wait_all_final(above, len(funding))
    return max(fed.heights())


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def latency_run(fed: Federation, senders: list[bytes], per_sender: int, period_s: float) -> dict[str, Any]:
    """Phase 1: each sender submits per_sender transfers to member (i mod n), one every period_s (staggered)."""
    above = max(fed.heights())
    txs = [transfers(s, per_sender) for s in senders]
    sent: list[tuple[int, float, Transaction]] = []  # (member, submit wall time, tx)
    lock = threading.Lock()
    errors: list[str] = []
    t0 = time.time() + 0.2

    def run(i: int) -> None:
        k = i % fed.n
        conn = Conn(fed.member(k).tail.port or 0)
        try:
            for j, tx in enumerate(txs[i]):
                delay = t0 + (j + i / len(senders)) * period_s - time.time()
                if delay > 0:
                    time.sleep(delay)
                t = time.time()
                conn.submit(tx)
                with lock:
                    sent.append((k, t, tx))
        except Exception as e:
            errors.append(f"sender {i}: {type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(senders))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t1 = time.time()
    if errors:
        raise RuntimeError(errors[0])
    fed.wait_all_final(above, len(sent))
    lat: list[float] = []
    conns = {k: Conn(fed.member(k).tail.port or 0) for k in range(fed.n)}
    for k, t, tx in sent:
        status, st = conns[k].request("GET", f"/api/l2/tx/{tx.txid.hex()}")
        if status != 200 or st.get("status") != "committed":
            raise RuntimeError(f"transaction {tx.txid.hex()} not committed on member {k + 1}: {st}")
        tf = fed.member(k).tail.final_at(st["height"])
        assert tf is not None
        lat.append(tf - t)
    for c in conns.values():
        c.close()
    blocks = [b for b in fed.member(0).tail.blocks if t0 <= b.t <= t1 and b.height > above]
    gaps = [b.t - a.t for a, b in zip(blocks, blocks[1:])]
    return {
        "transfers": len(sent), "senders": len(senders), "offered_tx_per_s": round(len(sent) / (t1 - t0), 1),
        "finality_latency_s_median": round(statistics.median(lat), 3),
        "finality_latency_s_p90": round(_pct(lat, 0.9), 3),
        "finality_latency_s_max": round(max(lat), 3),
        "blocks_per_s": round(len(blocks) / (t1 - t0), 2),
        "block_interval_ms_mean": round(1000 * statistics.mean(gaps)) if gaps else None,
    }


def throughput_run(fed: Federation, txs: list[list[Transaction]], threads: int) -> dict[str, Any]:
    """Phase 2: sender i's pre-signed transfers go to member (i mod n), from client thread (i mod threads)."""
    above = max(fed.heights())
    total = sum(len(t) for t in txs)
    errors: list[str] = []
    barrier = threading.Barrier(threads + 1)
    submitted = [0.0] * threads

    def run(j: int) -> None:
        mine = [t for i, t in enumerate(txs) if i % threads == j]
        conns = {k: Conn(fed.member(k).tail.port or 0) for k in {i % fed.n for i in range(j, len(txs), threads)}}
        order = [(i, t) for i in range(j, len(txs), threads) for t in [txs[i]]]
        barrier.wait()
        try:
            for rank in range(max((len(t) for t in mine), default=0)):  # round-robin over my senders' nonces
                for i, ts in order:
                    if rank < len(ts):
                        conns[i % fed.n].submit(ts[rank])
        except Exception as e:
            errors.append(f"thread {j}: {type(e).__name__}: {e}")
        finally:
            submitted[j] = time.time()
            for c in conns.values():
                c.close()

    ths = [threading.Thread(target=run, args=(j,)) for j in range(threads)]
    for th in ths:
        th.start()
    cpu0 = sum(m.cpu_s() for m in fed.live())
    barrier.wait()
    t0 = time.time()
    for th in ths:
        th.join()
    if errors:
        raise RuntimeError(errors[0])
    done = fed.wait_all_final(above, total)
    t_end = max(done.values())
    cpu = sum(m.cpu_s() for m in fed.live()) - cpu0
    blocks = [b for b in fed.member(0).tail.blocks if b.height > above and b.txs]
    return {
        "transfers": total, "senders": len(txs), "client_threads": threads,
        "submit_s": round(max(submitted) - t0, 2), "first_submit_to_all_final_s": round(t_end - t0, 2),
        "committed_tx_per_s": round(total / (t_end - t0), 1),
        "blocks_with_txs": len(blocks), "txs_per_block_max": max((b.txs for b in blocks), default=0),
        "daemon_cpu_s_per_1000_tx": round(1000 * cpu / total, 2),
    }


def local_apply(root: Path, upto: int) -> tuple[int, float]:
    """The baseline of catch-up: blocks 1..upto of member 1's store verified and applied on a fresh store in this
    process. (blocks, seconds)."""
    cfg = Config.load(root / "member-1" / "l2d.toml")
    genesis = load_genesis(cfg, LOCAL)
    src = Store(root / "member-1" / "data" / "ledger", LOCAL)
    try:
        entries = [(src.get_block(h), src.get_commit(h)) for h in range(1, upto + 1)]
    finally:
        src.close()
    work = Path(tempfile.mkdtemp(prefix="l2d-fedbench-apply-", dir=root))
    store = Store(work, LOCAL)
    try:
        ledger = Ledger(store, Rules(LOCAL, cfg.chain.min_fee_sat))
        ledger.open(genesis.state, cfg.chain.genesis_timestamp_ms)
        t = time.perf_counter()
        for raw, raw_commit in entries:
            assert raw is not None and raw_commit is not None
            blk = Block.decode(raw, LOCAL)
            for tx in blk.txs:
                check_signature(tx)
            Commit.decode(raw_commit).verify(genesis.membership, LOCAL, blk.header.hash)
            parent = ledger.tip
            assert parent is not None
            built = ledger.execute(parent, blk.txs, blk.header.timestamp_ms, strict=True, signatures_checked=True)
            if built.header != blk.header:
                raise RuntimeError(f"block {blk.header.height} re-executes to another header")
            ledger.store_block(built, raw_commit, parent if parent.height >= 1 else None)
        dt = time.perf_counter() - t
    finally:
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return len(entries), dt


def catch_up_run(root: Path, n_txs: int, max_txs: int, round_ms: int) -> dict[str, Any]:
    """Phase 3 (see the module docstring)."""
    mp = max(64, n_txs)
    fed = Federation(root, 4, f"[block]\ninterval_ms = 10\nmax_txs = {max_txs}\n\n[mempool]\nmax_txs = {4 * mp}\n"
                              f"max_per_sender = {mp}\n", f"round_ms = {round_ms}\n").init()
    try:
        fed.start_all()
        per = -(-n_txs // 3)
        demo_txs = [transfers(DEMO[s], per + (1 if s == 0 else 0), amount=1) for s in range(3)]
        # one block that all four members sign (they are connected), then member 4 stops
        conn = Conn(fed.member(0).tail.port or 0)
        conn.submit(demo_txs[0][0])
        fed.wait_all_final(0, 1)
        stopped_at = fed.member(3).tail.read().blocks[-1].height
        fed.stop(3)
        above = max(fed.heights())
        conns = [Conn(fed.member(k).tail.port or 0) for k in range(3)]
        in_threads([lambda k=k: [conns[k].submit(t) for t in demo_txs[k][1 if k == 0 else 0:]] for k in range(3)])
        for c in (conn, *conns):
            c.close()
        fed.wait_all_final(above, 3 * per, members=[0, 1, 2])
        target = fed.member(0).tail.read().final_height()
        down = [b for b in fed.member(0).tail.blocks if b.height > above]
        gaps = [b.t - a.t for a, b in zip(down, down[1:])]
        m = fed.start(3)
        m.wait_listening()

        def caught_up() -> bool:
            return m.tail.read().final_height() >= target
        poll(caught_up, DONE_TIMEOUT, f"the restarted member's final height reaching {target}")
        applied = [b for b in m.tail.blocks if b.height > stopped_at]
        t_first, t_done = applied[0].t, m.tail.final_at(target)
        assert t_done is not None and m.tail.listening is not None
        n_blocks = applied[-1].height - stopped_at
        tip = max(fed.heights())
        fed.stop_all()
        base_blocks, base_s = local_apply(root, tip)
        fetched_rate = n_blocks / max(t_done - t_first, 1e-6)
        local_rate = base_blocks / base_s
        return {
            "blocks_behind": n_blocks, "txs_per_block": max_txs,
            "start_to_caught_up_s": round(t_done - m.started, 2),
            "start_to_listening_s": round(m.tail.listening - m.started, 2),
            "listening_to_first_block_s": round(t_first - m.tail.listening, 2),
            "first_block_to_caught_up_s": round(t_done - t_first, 2),
            "catch_up_blocks_per_s": round(fetched_rate, 1),
            "catch_up_blocks_per_s_from_start": round(n_blocks / (t_done - m.started), 1),
            "local_apply_blocks": base_blocks, "local_apply_blocks_per_s": round(local_rate, 1),
            "catch_up_vs_local_apply": round(fetched_rate / local_rate, 3),
            "catch_up_from_start_vs_local_apply": round(n_blocks / (t_done - m.started) / local_rate, 3),
            # while member 4 was down: the heights it should have proposed wait out a quarter round
            "member_4_down_blocks_per_s": round(len(gaps) / sum(gaps), 1) if gaps else None,
            "member_4_down_heights_waiting_a_quarter_round": sum(1 for g in gaps if g > round_ms / 5000),
            "member_4_down_heights": len(gaps),
        }
    finally:
        fed.stop_all()


def run(workdir: Path, quick: bool) -> dict[str, Any]:
    lat_senders, lat_per, lat_period = (4, 10, 0.2) if quick else (8, 40, 0.2)
    tp_senders, tp_per, tp_threads = (8, 20, 4) if quick else (50, 160, 8)
    cu_txs, cu_max = (160, 4) if quick else (1000, 4)
    keys = [account(i) for i in range(lat_senders + tp_senders)]
    need = (lat_per + tp_per) * 2 + 10
    funding = [sign(LOCAL, DEMO[0], i, 1, Transfer(public_key(k), need), os.urandom(32)) for i, k in enumerate(keys)]
    tp_txs = [transfers(k, tp_per) for k in keys[lat_senders:]]  # the same signed transfers for both federations
    mp = max(64, len(keys), tp_per)
    mempool = f"[mempool]\nmax_txs = {max(10_000, 2 * tp_senders * tp_per)}\nmax_per_sender = {mp}\n"
    tp_block = f"[block]\ninterval_ms = {TP_INTERVAL_MS}\nmax_txs = {TP_MAX_TXS}\n"
    out: dict[str, Any] = {"quick": quick, "config": {
        "latency": f"as generated (block.interval_ms 1000, block.max_txs 1000, federation.round_ms 2000), "
                   f"mempool.max_per_sender {mp}",
        "throughput": f"block.interval_ms {TP_INTERVAL_MS}, block.max_txs {TP_MAX_TXS}, mempool.max_per_sender {mp}; "
                      f"federation.round_ms as generated (2000)",
        "catch_up": f"block.interval_ms 10, block.max_txs {cu_max}, federation.round_ms {CU_ROUND_MS}"}}
    t_start = time.time()
    for phase, extra, what in (("latency", mempool, lambda fed: latency_run(fed, keys[:lat_senders], lat_per,
                                                                          lat_period)),
                               ("throughput", mempool + tp_block, lambda fed: throughput_run(fed, tp_txs,
                                                                                             tp_threads))):
        for n in (4, 1):
            fed = Federation(workdir / f"{phase}-{n}", n, extra).init()
            try:
                fed.start_all()
                fund(fed, funding)
                out[f"{phase}_{n}"] = what(fed)
            finally:
                fed.stop_all()
            print(f"{phase}, {n} member(s): {out[f'{phase}_{n}']}", file=sys.stderr, flush=True)
    out["finality_latency_median_4_vs_1"] = round(out["latency_4"]["finality_latency_s_median"]
                                                  / out["latency_1"]["finality_latency_s_median"], 2)
    out["committed_tx_per_s_4_vs_1"] = round(out["throughput_4"]["committed_tx_per_s"]
                                             / out["throughput_1"]["committed_tx_per_s"], 3)
    out["catch_up"] = catch_up_run(workdir / "catchup", cu_txs, cu_max, CU_ROUND_MS)
    out["total_s"] = round(time.time() - t_start, 1)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run, tests/bench)")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    a = ap.parse_args(argv)
    with workdir(a.keep, "l2d-fedbench-") as d:
        result = run(d, a.quick)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
