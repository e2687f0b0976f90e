"""Crash soak: SIGKILL a real l2d process N times while signed transfers stream in; lose nothing committed.

    python bench/soak.py [--kills N] [--senders S] [--per-cycle C] [--seed K] [--keep DIR]

Each cycle starts `python -m l2d.node --config ...` on the same data dir (network local, API on port 0, the port read
from the JSON log line "api listening"), streams signed transfers from S client threads over REST (l2d.client.Client)
until C more transactions are reported committed by GET /api/l2/tx/<txid>, then SIGKILLs the daemon after a short
random delay (so the kill lands anywhere in the block cycle: building, committing, answering). After each kill:

1. offline, in the LMDB store the killed daemon left: every txid the API ever reported committed is at the height
   and index it was reported at; the state recomputed from the records hashes to the tip block's state root; the
   supply invariant holds (sum of balances + fees + locked == minted - burned);
2. after the restart, over the API: the daemon is at that tip with that root, and every transaction reported
   committed in the cycle just killed is still reported committed at the same place.

Prints one JSON object: kills survived, transactions committed, anything lost (and every failed check), time per
cycle, and the restart time after a kill as a ratio to the first (cold) start measured in the same run. Exits 1 if
anything was lost or a check failed. `make bench` runs the default 50 kills; `tests/bench/test_soak.py` runs 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import toml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import BUSY, poll  # noqa: E402
from l2d.client import ApiError, Client, Unreachable  # noqa: E402
from l2d.core.block import Block  # noqa: E402
from l2d.core.coin_tx import Transfer  # noqa: E402
from l2d.core.params import LOCAL  # noqa: E402
from l2d.core.state import LOCKED_KEY, SUPPLY_KEY, Account, Namespace, Supply  # noqa: E402
from l2d.core.tree import RootBuilder  # noqa: E402
from l2d.core.tx import public_key, sign  # noqa: E402
from l2d.store import Store  # noqa: E402

TOKEN = "soak-admin-token-0123456789abcdef"
GENESIS_SAT = 10**12
# Refusals a streaming sender expects under load (it retries); anything else is a real rejection and fails the run.
START_TIMEOUT = 120.0
COMMIT_TIMEOUT = 300.0


def secret(i: int) -> bytes:
    return hashlib.sha256(b"l2d soak key %d" % i).digest()


class Daemon:
    """One real l2d process; its JSON log lines go to log_path."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")
        env = {k: v for k, v in os.environ.items() if k != "L2D_ADMIN_TOKEN"}
        env["PYTHONPATH"] = str(REPO)
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "l2d.node", "--config", str(config)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        try:
            port = poll(self._port, START_TIMEOUT, "the log line 'api listening'")
        except BaseException:
            self.kill()
            raise
        self.start_s = time.monotonic() - t0
        self.client = Client(f"http://127.0.0.1:{port}", TOKEN)

    def _port(self) -> Optional[int]:
        if self.proc.poll() is not None:
            raise RuntimeError(f"l2d exited with code {self.proc.returncode} before listening: {self.tail()}")
        for line in self.log_path.read_text().splitlines():
            if '"api listening"' in line:
                return int(json.loads(line)["port"])
        return None

    def tail(self, n: int = 5) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-n:])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._log.close()


@dataclass
class Stream:
    """Client threads sending signed transfers in a ring until stopped or the daemon is gone."""

    client: Client
    senders: list[bytes]
    accepted: dict[str, int] = field(default_factory=dict)  # txid -> sender index
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for i in range(len(self.senders)):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)

    def _run(self, i: int) -> None:
        key = self.senders[i]
        recipient = public_key(self.senders[(i + 1) % len(self.senders)])
        try:
            nonce = int(self.client.account(public_key(key).hex())["nonce"])  # the committed history is the truth
            while not self.stop.is_set():
                tx = sign(LOCAL, key, nonce, 1, Transfer(recipient, 1 + nonce % 7), os.urandom(32))
                try:
                    txid = self.client.submit_tx(tx.raw)["txid"]
                except Unreachable:
                    raise
                except ApiError as e:
                    if e.code in BUSY:
                        time.sleep(0.005)  # back off from a full mempool (the daemon paces us, not a wait)
                        continue
                    raise
                self.accepted[txid] = i
                nonce += 1
        except Unreachable:
            return  # the daemon was killed
        except Exception as e:  # a real rejection or a broken answer: the run fails
            self.errors.append(f"sender {i}: {type(e).__name__}: {e}")

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def check_store(data_dir: Path, committed: dict[str, tuple[int, int]]) -> tuple[int, bytes, list[str]]:
    """Offline checks of the ledger a killed daemon left: (tip height, tip state root, problems found).

    Problems: a committed txid missing or moved; the records not hashing to the tip's state root; the supply
    invariant broken.
    """
    problems: list[str] = []
    store = Store(data_dir / "ledger", LOCAL)
    try:
        with store.reader() as r:
            tip_height = r.tip_height()
            if tip_height is None:
                return -1, b"", ["the store has no blocks"]
            tip = Block.decode(bytes(r.get_block(tip_height)), LOCAL)
            rb = RootBuilder()
            balances = 0
            for k, v in r.iter_state():
                rb.add(bytes(k), bytes(v))
                if k[0] == Namespace.ACCOUNT:
                    balances += Account.decode(bytes(v)).balance_sat
            if (root := rb.root()) != tip.header.state_root:
                problems.append(f"state records hash to {root.hex()}, tip {tip_height} commits to "
                                f"{tip.header.state_root.hex()}")
            supply = Supply.decode(bytes(r.get_state(SUPPLY_KEY)))
            locked_raw = r.get_state(LOCKED_KEY)
            locked = 0 if locked_raw is None else int.from_bytes(bytes(locked_raw), "big")
            if balances + supply.fees_sat + locked != supply.minted_sat - supply.burned_sat:
                problems.append(f"supply invariant broken: balances {balances} + fees {supply.fees_sat} + locked "
                                f"{locked} != minted {supply.minted_sat} - burned {supply.burned_sat}")
        for txid, where in committed.items():
            got = store.tx_location(bytes.fromhex(txid))
            if got != where:
                problems.append(f"lost: txid {txid} reported committed at {where}, store has {got}")
        return tip_height, tip.header.state_root, problems
    finally:
        store.close()


def write_config(path: Path, senders: list[bytes], block_ms: int) -> Path:
    path.write_text(toml.dumps({
        "node": {"network": "local", "data_dir": "data", "log_level": "INFO"},
        "chain": {"genesis_alloc": {public_key(s).hex(): GENESIS_SAT for s in senders}},
        "block": {"interval_ms": block_ms, "max_txs": 50},
        "mempool": {"max_per_sender": 64},
        "api": {"port": 0, "admin_token": TOKEN},
        "snapshots": {"every_blocks": 0},
    }))
    return path


def run(kills: int, senders: int, per_cycle: int, seed: int, workdir: Path, block_ms: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    keys = [secret(i) for i in range(senders)]
    config = write_config(workdir / "node.toml", keys, block_ms)
    data_dir = workdir / "data"
    committed: dict[str, tuple[int, int]] = {}  # every txid the API reported committed, and where
    last_cycle: dict[str, tuple[int, int]] = {}  # those reported in the cycle just killed
    problems: list[str] = []
    cycles: list[float] = []
    restarts: list[float] = []
    first_start = 0.0
    tip_height, tip_root = 0, b""
    survived = 0
    t_run = time.monotonic()
    for cycle in range(kills):
        t_cycle = time.monotonic()
        d = Daemon(config, workdir / f"cycle-{cycle:03d}.log")
        if cycle == 0:
            first_start = d.start_s
        else:
            restarts.append(d.start_s)
        this_cycle: dict[str, tuple[int, int]] = {}
        stream = Stream(d.client, keys)
        try:
            if cycle:  # 2. the restarted daemon continues from where the killed one left the store (it may have
                #           made a block since: the empty block that makes a non-final tip final)
                st = d.client.status()
                held = d.client.block(tip_height) if st["height"] >= tip_height else None
                if held is None or held["state_root"] != tip_root.hex():
                    problems.append(f"cycle {cycle}: restarted at height {st['height']} root {st['state_root']}, "
                                    f"the store held {tip_height} {tip_root.hex()}")
                for txid, where in last_cycle.items():
                    s = d.client.tx(txid)
                    if (s.get("status"), s.get("height"), s.get("index")) != ("committed", *where):
                        problems.append(f"lost: txid {txid} reported committed at {where} before kill {cycle}, "
                                        f"after the restart: {s}")
            stream.start()

            def enough() -> bool:
                if stream.errors:
                    raise RuntimeError(stream.errors[0])
                for txid in list(stream.accepted):
                    if txid not in committed:
                        s = d.client.tx(txid)
                        if s["status"] == "committed":
                            committed[txid] = this_cycle[txid] = (s["height"], s["index"])
                return len(this_cycle) >= per_cycle

            poll(enough, COMMIT_TIMEOUT, f"{per_cycle} transactions committed in cycle {cycle}")
            time.sleep(rnd.uniform(0, 2 * block_ms / 1000))  # land the kill anywhere in the block cycle
        except Exception as e:
            problems.append(f"cycle {cycle}: {type(e).__name__}: {e}\n{d.tail()}")
        finally:
            d.kill()  # SIGKILL while the streams are still posting
            stream.join()
        if stream.errors:
            problems.append(f"cycle {cycle}: {stream.errors[0]}")
        # 1. offline: the store the killed daemon left
        tip_height, tip_root, found = check_store(data_dir, committed)
        problems += [f"after kill {cycle + 1}: {p}" for p in found]
        last_cycle = this_cycle
        cycles.append(time.monotonic() - t_cycle)
        if problems:
            break
        survived += 1
        print(f"kill {survived}/{kills}: tip {tip_height}, {len(committed)} committed, cycle "
              f"{cycles[-1]:.2f}s", file=sys.stderr, flush=True)
    lost = [p for p in problems if "lost:" in p]
    mean_restart = sum(restarts) / len(restarts) if restarts else 0.0
    return {
        "kills": kills, "kills_survived": survived, "transactions_committed": len(committed),
        "tip_height": tip_height, "lost": len(lost), "problems": problems,
        "cycle_s_mean": round(sum(cycles) / len(cycles), 3) if cycles else None,
        "cycle_s_max": round(max(cycles), 3) if cycles else None,
        "total_s": round(time.monotonic() - t_run, 1),
        "cold_start_s": round(first_start, 3), "restart_after_kill_s_mean": round(mean_restart, 3),
        "restart_vs_cold_start": round(mean_restart / first_start, 2) if restarts and first_start else None,
        "ok": not problems and survived == kills,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50, help="SIGKILLs to survive (default 50)")
    ap.add_argument("--senders", type=int, default=3, help="client threads streaming transfers (default 3)")
    ap.add_argument("--per-cycle", type=int, default=100, help="commits to see before each kill (default 100)")
    ap.add_argument("--block-ms", type=int, default=20, help="block interval of the daemon (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the kill delays (default 1)")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    a = ap.parse_args(argv)
    if a.kills < 1 or a.senders < 2 or a.per_cycle < 1 or a.block_ms < 1:
        ap.error("--kills, --per-cycle and --block-ms must be at least 1, --senders at least 2")
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
        workdir = a.keep
    else:
        workdir = Path(tempfile.mkdtemp(prefix="l2d-soak-"))
    result = run(a.kills, a.senders, a.per_cycle, a.seed, workdir, a.block_ms)
    if a.keep is None and result["ok"]:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not result["ok"]:
        result["kept"] = str(workdir)  # the data dir and each cycle's log, for a look
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
