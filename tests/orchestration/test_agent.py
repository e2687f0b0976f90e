"""`l2-worker` (orchestration/agent.py) leaving the registry: what a stopped agent says and does about its stake,
and `l2-worker exit` / `l2-worker withdraw` against a real daemon, stake read back from the ledger."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from l2d.core.coin_tx import Transfer
from l2d.core.work import EXIT_DELAY_BLOCKS
from orchestration.agent import main as agent_main

REPO = Path(__file__).resolve().parents[2]
STAKE = 100_000  # what every agent stakes (conftest)


def l2_worker(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "orchestration.agent", *args], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)


async def advance(net: Any, poll: Callable[..., Any], blocks: int) -> None:
    """Make the daemon commit at least `blocks` more blocks (one client transfer each, each waited for)."""
    target = int(net.get("/api/status")["height"]) + blocks
    while int(net.get("/api/status")["height"]) < target:
        status, body = net.post("/api/l2/tx", {"tx": net.sign_client(Transfer(net.federation, 1)).hex()})
        assert status == 202, body
        await poll(lambda: net.get(f"/api/l2/tx/{body['txid']}")["status"] == "committed", 30, "transfer committed")


async def test_a_stopped_worker_stays_active_says_how_to_leave_and_exit_withdraw_return_the_stake(
        orch_net: Callable[..., Any], poll: Callable[..., Any]) -> None:
    net = orch_net(["stays", "leaves"])
    stays, leaves = net.start_agent("stays"), net.start_agent("leaves", "--exit-on-stop")
    pk_stays, pk_leaves = stays.pubkey.hex(), leaves.pubkey.hex()
    await poll(lambda: {pk_stays, pk_leaves} <= set(net.workers()), 120, "both workers registered")

    # SIGTERM: the plain agent leaves its worker ACTIVE (a restart resumes it) and logs the two commands that leave
    assert stays.stop() == 0
    assert net.workers()[pk_stays]["status"] == "ACTIVE"
    key_stays = str(net.worker_keys["stays"])
    [note] = [x for x in stays.lines() if x["msg"].startswith("stopped:")]
    assert note["level"] == "warning" and "ACTIVE" in note["msg"]
    assert f"l2-worker exit --node {net.url} --key-file {key_stays}" in note["msg"]
    assert f"l2-worker withdraw --node {net.url} --key-file {key_stays}" in note["msg"]

    # SIGTERM with --exit-on-stop: the exit is committed before the process ends, and it says when to withdraw
    assert leaves.stop() == 0
    w = net.workers()[pk_leaves]
    assert w["status"] == "EXITING" and w["exit_height"] > 0
    [note] = [x for x in leaves.lines() if x["msg"].startswith("stopped:")]
    assert f"withdrawn from height {w['exit_height'] + EXIT_DELAY_BLOCKS}" in note["msg"]

    # l2-worker exit: the stopped ACTIVE worker leaves; withdraw is refused with the ledger's reason until the delay
    r = l2_worker("exit", "--node", net.url, "--key-file", key_stays)
    assert r.returncode == 0, r.stderr
    w = net.workers()[pk_stays]
    assert w["status"] == "EXITING" and f"from L2 height {w['exit_height'] + EXIT_DELAY_BLOCKS}" in r.stdout
    r = l2_worker("exit", "--node", net.url, "--key-file", key_stays)
    assert r.returncode == 1 and "not ACTIVE" in r.stderr  # once
    before = int(net.get(f"/api/l2/accounts/{pk_stays}")["balance_sat"])
    r = l2_worker("withdraw", "--node", net.url, "--key-file", key_stays)
    assert r.returncode == 1 and f"locked until height {w['exit_height'] + EXIT_DELAY_BLOCKS}" in r.stderr
    assert net.workers()[pk_stays]["stake_sat"] == STAKE

    await advance(net, poll, EXIT_DELAY_BLOCKS)
    r = l2_worker("withdraw", "--node", net.url, "--key-file", key_stays)
    assert r.returncode == 0, r.stderr
    assert net.workers()[pk_stays]["status"] == "WITHDRAWN" and net.workers()[pk_stays]["stake_sat"] == 0
    after = int(net.get(f"/api/l2/accounts/{pk_stays}")["balance_sat"])
    assert after - before == STAKE - 1  # the stake back, less the 1-sat fee of the withdrawal
    assert f"now {after} sat" in r.stdout


def test_exit_of_an_unregistered_key_or_a_missing_key_file_is_refused(tmp_path: Path, capsys: Any) -> None:
    assert agent_main(["exit", "--node", "http://127.0.0.1:9", "--key-file", str(tmp_path / "none.key")]) == 1
    assert "none.key" in capsys.readouterr().err
    assert agent_main(["withdraw", "--node", "http://127.0.0.1:9"]) == 2  # --key-file is required


def test_every_leave_subcommand_and_argument_has_help(undocumented: Callable[[Any], list[str]]) -> None:
    from l2d.leave import RELAY, WORKER, build_parser
    assert undocumented(build_parser(WORKER, "http://127.0.0.1:8650")) == []
    assert undocumented(build_parser(RELAY, "http://127.0.0.1:8650")) == []
