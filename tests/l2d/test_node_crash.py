"""Crash safety: SIGKILL the daemon while signed transfers stream in, restart, lose nothing committed."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from l2d.core.block import Block
from l2d.core.coin_tx import Transfer
from l2d.core.params import LOCAL
from l2d.core.state import SUPPLY_KEY, Account, Supply, account_key
from l2d.core.tree import RootBuilder
from l2d.core.tx import sign
from l2d.store import Store

SENDERS = (1, 2, 3)


def _post(url: str, raw: bytes) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps({"tx": raw.hex()}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _poll(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_sigkill_during_transfers_loses_no_committed_block(tmp_path: Path, keys: Any,
                                                           l2d_process: Callable[..., Any],
                                                           node_toml: Callable[..., Path]) -> None:
    cfg = node_toml(tmp_path / "node.toml", {keys.pubkey(n): 100_000_000 for n in SENDERS},
                    "crash-test-token-0123456789", block={"interval_ms": 20, "max_txs": 25},
                    mempool={"max_per_sender": 64}, snapshots={"every_blocks": 0})
    d = l2d_process(cfg)
    accepted: dict[str, int] = {}  # txid -> sender
    committed: dict[str, tuple[int, int]] = {}  # txid -> (height, index), as the API reported before the kill
    stop = threading.Event()

    def stream(sender: int) -> None:
        recipient = keys.pubkey(sender % 3 + 1)
        nonce = 0
        while not stop.is_set():
            tx = sign(LOCAL, keys.secret(sender), nonce, 1, Transfer(recipient, 1 + nonce % 7), b"\0" * 32)
            try:
                status, body = _post(d.url("/api/l2/tx"), tx.raw)
            except (urllib.error.URLError, ConnectionError, OSError):
                return  # the daemon was killed
            if status == 202:
                accepted[body["txid"]] = sender
                nonce += 1
            elif body.get("error") not in ("nonce-gap", "sender-limit", "mempool-full"):
                raise AssertionError(body)  # anything else is a real rejection: fail loudly

    threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in SENDERS]
    for t in threads:
        t.start()

    def enough_committed() -> bool:
        for txid in list(accepted):
            if txid not in committed:
                st = d.get(f"/api/l2/tx/{txid}")
                if st["status"] == "committed":
                    committed[txid] = (st["height"], st["index"])
        return len(committed) >= 150

    _poll(enough_committed, 120, "150 transactions reported committed")
    in_flight = len(accepted) - len(committed)
    d.kill()  # SIGKILL while the streams are still posting and blocks are being built
    stop.set()
    for t in threads:
        t.join(timeout=30)

    # 1. Offline: the stored state hashes to the root the tip block commits to.
    store = Store(tmp_path / "data" / "ledger", LOCAL)
    try:
        with store.reader() as r:
            tip_height = r.tip_height()
            assert tip_height is not None and tip_height >= 1
            tip = Block.decode(bytes(r.get_block(tip_height)), LOCAL)
            rb = RootBuilder()
            balances = 0
            for k, v in r.iter_state():
                rb.add(bytes(k), bytes(v))
                if k[:1] == account_key(b"\0" * 32)[:1]:
                    balances += Account.decode(bytes(v)).balance_sat
            assert rb.root() == tip.header.state_root
            supply = Supply.decode(bytes(r.get_state(SUPPLY_KEY)))
            assert balances + supply.fees_sat == supply.minted_sat - supply.burned_sat
            for txid, (height, index) in committed.items():
                assert store.tx_location(bytes.fromhex(txid)) == (height, index)
                assert height <= tip_height
    finally:
        store.close()

    # 2. Restart: the daemon comes back at the same tip (and may have made the empty block that makes a non-final
    #    tip final) and reports every committed transaction.
    d2 = l2d_process(cfg)
    status = d2.get("/api/status")
    assert status["height"] in (tip_height, tip_height + 1)
    held = d2.get(f"/api/l2/blocks/{tip_height}")
    assert (held["hash"], held["state_root"]) == (tip.header.hash.hex(), tip.header.state_root.hex())
    for txid, (height, index) in committed.items():
        st = d2.get(f"/api/l2/tx/{txid}")
        assert (st["status"], st["height"], st["index"]) == ("committed", height, index)
    # Nonces match the committed history: each sender's nonce = its transactions in blocks 1..tip.
    sent = {s: 0 for s in SENDERS}
    for h in range(1, tip_height + 1):
        for tx in d2.get(f"/api/l2/blocks/{h}")["txs"]:
            sent[next(s for s in SENDERS if keys.pubkey(s).hex() == tx["sender"])] += 1
    for s in SENDERS:
        assert d2.get(f"/api/l2/accounts/{keys.pubkey(s).hex()}")["nonce"] == sent[s]
    print(f"killed at tip {tip_height} with {len(committed)} committed, {in_flight} accepted but not yet seen committed")
    assert d2.stop() == 0
