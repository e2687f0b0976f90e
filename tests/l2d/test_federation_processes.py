"""A 4-member federation (m = 3) of real l2d processes on loopback, written by `l2-cli federation-init`:
transfers submitted to different members are committed once, every member agrees block by block, blocks become
final; a SIGKILLed member catches up and signs again; with two members down nothing becomes final, and progress
resumes when one returns. Afterwards every member's database and signer file are checked
(federation_procs.check_invariants): one block at every final height, each stored block with a commit of at least
m valid member signatures, signer files never behind a released signature."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from tests.l2d.federation_procs import Federation, transfer


async def test_four_members_agree_a_killed_member_catches_up_and_two_down_stop_finality(
        tmp_path: Path, poll: Callable[..., Any]) -> None:
    fed = Federation(tmp_path / "fed")
    try:
        for k in range(4):
            fed.start(k)
        # 1. transfers of one sender submitted to different members (gossip fills the others' nonce gaps)
        txs = [transfer(i) for i in range(24)]
        for i, tx in enumerate(txs):
            fed.submit(i % 4, tx)
        await poll(lambda: all(fed.tx_height(k, txs[-1]) is not None for k in range(4)), 60, "all committed")
        last = fed.tx_height(0, txs[-1])
        assert last is not None
        await poll(lambda: all(fed.status(k)["final_height"] >= last for k in range(4)), 60, "final everywhere")
        heights = {fed.tx_height(k, t) for k in range(4) for t in txs[:1]}
        assert len(heights) == 1  # the same block on every member
        tips = {(fed.status(k)["height"], fed.status(k)["tip_hash"]) for k in range(4)}
        metrics = fed.procs[0].get_raw("/metrics")[1].decode()
        assert "l2d_federation_peers_connected 3" in metrics  # an authenticated link to each other member
        assert "l2d_federation_commit_seconds_count 0" not in metrics
        assert "l2d_federation_precommit_seconds_count 0" not in metrics  # member 1 signed blocks
        assert 'l2d_federation_rounds_total{outcome="entered"}' in metrics

        # 2. SIGKILL member 2: the other three keep finalizing; restarted, it catches up and signs again
        fed.kill(1)
        more = [transfer(24 + i) for i in range(12)]
        for i, tx in enumerate(more):
            fed.submit((0, 2, 3)[i % 3], tx)
        await poll(lambda: all(fed.tx_height(k, more[-1]) is not None for k in (0, 2, 3)), 60, "committed by 3")
        top = fed.tx_height(0, more[-1])
        assert top is not None and top > max(h for h, _ in tips)
        await poll(lambda: all(fed.status(k)["final_height"] >= top for k in (0, 2, 3)), 60, "final with 3")
        fed.start(1)
        await poll(lambda: fed.status(1)["final_height"] >= top, 60, "the restarted member caught up")
        assert fed.tx_height(1, more[-1]) == top
        again = transfer(36)
        fed.submit(1, again)  # submitted to the member that came back
        await poll(lambda: all(fed.tx_height(k, again) is not None for k in range(4)), 60, "committed after rejoin")

        # 3. two members down: nothing becomes final; one back: progress resumes
        fed.kill(2)
        fed.kill(3)
        stuck = fed.status(0)["final_height"]
        blocked = transfer(37)
        fed.submit(0, blocked)
        # Without a quorum no timeout certificate forms either, so the round stays: give the two members three
        # round lengths (federation.round_ms = 2000) in which a block could have been signed, and see none was.
        until = time.monotonic() + 6.0
        await poll(lambda: time.monotonic() > until and fed.procs[1].get_raw(
            f"/api/l2/tx/{blocked.txid.hex()}")[0] == 200, 60, "three round lengths, the tx gossiped to member 2")
        assert fed.status(0)["final_height"] == stuck and fed.status(1)["final_height"] == stuck
        assert fed.tx_height(0, blocked) is None or fed.tx_height(0, blocked) > stuck
        fed.start(2)
        await poll(lambda: fed.tx_height(0, blocked) is not None, 120, "progress with three members")
        h = fed.tx_height(0, blocked)
        assert h is not None
        await poll(lambda: all(fed.status(k)["final_height"] >= h for k in (0, 1, 2)), 120, "final again")
        fed.start(3)
        await poll(lambda: fed.status(3)["final_height"] >= h, 60, "the fourth member caught up")
    finally:
        for k in list(fed.procs):
            fed.procs.pop(k).kill()
    assert fed.check()[0] >= 1
