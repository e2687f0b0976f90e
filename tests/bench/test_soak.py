"""bench/soak.py: a short run (2 SIGKILLs of a real daemon) loses nothing, and its checks do catch a loss.

The full 50-kill soak runs in `make bench`; here it runs briefly so `make test` keeps the probe working, and the
offline check is shown to report a moved or missing transaction, a state that does not hash to the tip's root and a
broken supply invariant (a probe that cannot fail would prove nothing).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import lmdb
import pytest

from l2d.core.block import Block
from l2d.core.params import LOCAL
from l2d.core.state import SUPPLY_KEY, Supply
from l2d.store import Store

REPO = Path(__file__).resolve().parents[2]
SOAK = REPO / "bench" / "soak.py"


def _soak() -> ModuleType:
    """bench/soak.py as a module (bench/ is not a package; dataclasses need the module registered)."""
    if (mod := sys.modules.get("l2d_bench_soak")) is None:
        spec = importlib.util.spec_from_file_location("l2d_bench_soak", SOAK)
        assert spec is not None and spec.loader is not None
        mod = sys.modules["l2d_bench_soak"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def test_two_kills_lose_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(SOAK), "--kills", "2", "--per-cycle", "40", "--keep", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] and result["problems"] == [] and result["lost"] == 0
    assert result["kills_survived"] == 2
    assert result["transactions_committed"] >= 80
    # Each cycle's daemon was a real process that was SIGKILLed: no clean shutdown line in either log.
    for log in ("cycle-000.log", "cycle-001.log"):
        msgs = [json.loads(x)["msg"] for x in (tmp_path / log).read_text().splitlines() if x.strip()]
        assert "api listening" in msgs
        assert "stop requested" not in msgs and "stopped" not in msgs, msgs


@pytest.fixture(scope="module")
def killed_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir of a soak run of one kill."""
    work = tmp_path_factory.mktemp("soak")
    r = subprocess.run([sys.executable, str(SOAK), "--kills", "1", "--per-cycle", "20", "--keep", str(work)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    return work / "data"


def _first_txid(data: Path) -> tuple[str, tuple[int, int]]:
    store = Store(data / "ledger", LOCAL)
    try:
        with store.reader() as r:
            for h in range(1, (r.tip_height() or 0) + 1):
                block = Block.decode(bytes(r.get_block(h)), LOCAL)
                if block.txs:
                    return block.txs[0].txid.hex(), (h, 0)
    finally:
        store.close()
    raise AssertionError("no committed transaction in the soak's ledger")


def test_check_store_passes_on_the_killed_ledger(killed_ledger: Path) -> None:
    txid, where = _first_txid(killed_ledger)
    tip, root, problems = _soak().check_store(killed_ledger, {txid: where})
    assert problems == [] and tip >= where[0] and len(root) == 32


def test_check_store_reports_missing_and_moved_transactions(killed_ledger: Path) -> None:
    txid, (height, index) = _first_txid(killed_ledger)
    _, _, problems = _soak().check_store(killed_ledger, {txid: (height, index + 1), "ab" * 32: (1, 0)})
    assert len(problems) == 2 and all(p.startswith("lost: ") for p in problems), problems
    assert any(txid in p and "store has (%d, %d)" % (height, index) in p for p in problems)
    assert any("ab" * 32 in p and "store has None" in p for p in problems)


def test_check_store_reports_a_root_mismatch_and_a_broken_supply(killed_ledger: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "ledger").mkdir(parents=True)
    for f in (killed_ledger / "ledger").iterdir():
        (data / "ledger" / f.name).write_bytes(f.read_bytes())
    env = lmdb.open(str(data / "ledger"), max_dbs=8, subdir=True)
    try:
        state = env.open_db(b"state")
        with env.begin(write=True, db=state) as txn:  # one more satoshi "minted" behind the ledger's back
            s = Supply.decode(bytes(txn.get(SUPPLY_KEY)))
            txn.put(SUPPLY_KEY, Supply(s.minted_sat + 1, s.burned_sat, s.fees_sat).encode())
    finally:
        env.close()
    _, _, problems = _soak().check_store(data, {})
    assert len(problems) == 2, problems
    assert "state records hash to" in problems[0]
    assert problems[1].startswith("supply invariant broken")
