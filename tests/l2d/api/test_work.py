"""The work routes' task JSON (l2d/api/work.py task_json): what a task waits for, in the documented shape."""
from __future__ import annotations

from l2d.api.work import task_json
from l2d.core.work_tx import TaskResult, TaskSettle
from tests.l2d.api.test_openapi import assert_conforms
from tests.l2d.core.test_work import AUTH, W1, W2, W3, Chain, fp


def test_a_task_in_its_challenge_window_says_so_and_when_it_ends() -> None:
    chain = Chain()
    chain.register(W1, W2, W3)
    tid = chain.submit()
    seen = [task_json(tid, chain.task(tid))]
    chain.assign(tid, W1, W2, W3, window=3)
    seen.append(task_json(tid, chain.task(tid)))
    chain.apply(W1, TaskResult(tid, b"\3", fp(b"\3")))
    chain.apply(W3, TaskResult(tid, b"\3", fp(b"\3")))
    waiting = task_json(tid, chain.task(tid))
    assert waiting["status"] == "RESULT_SUBMITTED" and waiting["waiting_for"] == []
    assert waiting["phase"] == "challenge_window"
    assert waiting["window_ends_height"] == waiting["result_height"] + waiting["window_blocks"]
    seen.append(waiting)
    chain.mine(waiting["window_ends_height"] - chain.height)
    chain.apply(AUTH, TaskSettle(tid, 800, 100, 100))
    done = task_json(tid, chain.task(tid))
    assert (done["status"], done["phase"]) == ("SETTLED", "done")
    seen.append(done)
    assert [t["phase"] for t in seen] == ["assignment", "results", "challenge_window", "done"]
    assert [t["window_ends_height"] for t in seen[:2]] == [None, None]
    assert_conforms("GET", "/api/orchestration/tasks", 200, "application/json", {"height": chain.height,
                                                                                 "tasks": seen})
    assert_conforms("GET", f"/api/orchestration/tasks/{tid.hex()}", 200, "application/json",
                    {**waiting, "explanation": [], "events": [], "running": False})
