"""Who the ServerApp accepts (and so the ledger pays) under the robust strategies, on real updates: the ClientApp's
own local training (and its poisoning adversary) on the digits partitions, Flower's strategies aggregating, rounds
replayed in-process (the transport is exercised end to end in test_federation.py). Plus the run-config checks that
keep a robust strategy from silently being a plain mean."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum

from federated import cli, client_app, model
from federated import server_app as sa
from l2d.core.fl import JobParticipant, JobRecord, JobStatus, reward_split

POOL = 1_000_000
ROUNDS = 2
POISON = {"poison-scale": 10.0}  # sends g - 10 (local - g), as the end-to-end poisoner does


class _Meta:
    def __init__(self, nid: int) -> None:
        self.src_node_id = nid
        self.message_type = "train"


class _Reply:
    """Just enough of a reply Message for the server's sanitiser, acceptance and Flower's aggregators."""

    def __init__(self, nid: int, content: RecordDict) -> None:
        self.metadata = _Meta(nid)
        self.content = content

    def has_error(self) -> bool:
        return False


def _replies(g: "OrderedDict[str, np.ndarray]", rnd: int, node_configs: list[dict[str, Any]]) -> list[Any]:
    """One round's replies, as the ServerApp holds them after sanitising: node i+1 trains partition i."""
    out = []
    cfg = {"local-epochs": 5, "lr": 0.05, "server-round": rnd}
    for i, nc in enumerate(node_configs):
        params, n, _ = client_app.local_params(g, cfg, nc)
        content = RecordDict({"arrays": sa.to_record(params), "metrics": MetricRecord({"num-examples": n})})
        reply = _Reply(i + 1, content)
        clean, _, _, why = sa.sanitise_reply(reply, g, "none")  # type: ignore[arg-type]
        assert clean is not None, why
        out.append(clean)
    return out


Rounds = list[tuple[dict[int, str], list[Any]]]  # (acceptance, replies) per round


def _federation(strategy: str, honest: int, poisoners: int, **settings: Any) -> Rounds:
    """ROUNDS rounds of run_job's loop without the transport and evaluation: (acceptance, replies) per round.
    Default alpha (0.5): the non-IID data `l2-fl partition` and `l2-fl dev` give participants."""
    n = honest + poisoners
    nodes = [{"partition-id": i, "num-partitions": n, **(POISON if i >= honest else {})} for i in range(n)]
    cfg = sa.run_settings({"strategy": strategy, "out-dir": "-", "min-nodes": n, **settings})
    strat, _ = sa.make_strategy(cfg, n)
    g = model.get_ndarrays(model.new_model(0))
    out = []
    for rnd in range(1, ROUNDS + 1):
        replies = _replies(g, rnd, nodes)
        verdict = sa.acceptance(strat, replies)
        strat.current_arrays = sa.to_record(g)  # what configure_train stores in a real round
        agg, _ = strat.aggregate_train(rnd, replies)
        g = OrderedDict((k, np.asarray(sa.from_record(agg)[k], dtype=np.float32)) for k in g)
        out.append((verdict, replies))
    return out


def _paid(rounds: Rounds) -> dict[int, int]:
    """The ledger's reward split (l2d.core.fl) over the rounds' accepted flags and example counts."""
    examples: dict[int, int] = {}
    for verdict, replies in rounds:
        for r in replies:
            nid = r.metadata.src_node_id
            accepted = int(r.content["metrics"]["num-examples"]) if not verdict[nid] else 0
            examples[nid] = examples.get(nid, 0) + accepted
    key = {nid: nid.to_bytes(32, "big") for nid in examples}
    job = JobRecord(JobStatus.OPEN, bytes(32), POOL, bytes(32), ROUNDS, 1, 8, 0, ROUNDS, bytes(32), 0, 0, 0,
                    tuple(JobParticipant(key[nid], ex, 0, 0, 0, b"k") for nid, ex in sorted(examples.items())))
    split = dict(reward_split(job))
    return {nid: split.get(key[nid], 0) for nid in examples}


@pytest.mark.parametrize("strategy,settings", [
    ("krum", {}),
    ("multikrum", {}),
    ("fedtrimmedavg", {"trim-beta": 0.25}),
])
def test_every_honest_participant_is_accepted_and_paid_and_the_poisoner_never(strategy, settings):
    """3 honest participants + 1 poisoner (num-malicious = 1). Before: Krum accepted the one update it averages
    (two honest participants unpaid), Multi-Krum the 2 it averages, and the trimmed mean's absolute 50 %-of-
    coordinates bar left out the honest participant with the largest update (46 % kept; 50 % is what a
    participant averages when a quarter is cut from each side)."""
    rounds = _federation(strategy, 3, 1, **settings)
    for verdict, _ in rounds:
        assert [bool(verdict[nid]) for nid in (1, 2, 3, 4)] == [False, False, False, True], verdict
    paid = _paid(rounds)
    assert paid[4] == 0 and all(paid[nid] > 0 for nid in (1, 2, 3)), paid
    assert sum(paid.values()) <= POOL


@pytest.mark.parametrize("strategy", ["krum", "multikrum"])
def test_three_honest_participants_are_all_paid_under_krum(strategy):
    """The README's job: 3 honest participants, Krum, num-malicious left at 1. Krum's core (the n - f = 2 best
    scores: Flower's select_multikrum) leaves the same honest participant out every round on this non-IID data,
    so acceptance by the core alone would pay it nothing; its score stays within SPREAD^2 of the core's."""
    rounds = _federation(strategy, 3, 0)
    left_out = set()
    for verdict, replies in rounds:
        assert not any(verdict.values()), verdict
        core = select_multikrum([r.content for r in replies], 1, 2)
        left_out |= {r.metadata.src_node_id for r in replies if not any(r.content is c for c in core)}
    assert len(left_out) == 1  # the premise: the core alone leaves one honest participant out every round
    paid = _paid(rounds)
    assert all(paid[nid] > 0 for nid in (1, 2, 3)), paid


def test_krum_scores_and_core_are_flowers():
    g = model.get_ndarrays(model.new_model(0))
    nodes = [{"partition-id": i, "num-partitions": 5, **(POISON if i == 4 else {})} for i in range(5)]
    replies = _replies(g, 1, nodes)
    contents = [r.content for r in replies]
    for f in (0, 1, 2):
        scores = sa.krum_scores([c["arrays"] for c in contents], f)
        for m in (1, 3, 5 - f):
            mine = [contents[i] for i in np.argsort(scores)[:m]]
            assert [id(c) for c in mine] == [id(c) for c in select_multikrum(contents, f, m)]
    strat, _ = sa.make_strategy(dict(sa.DEFAULTS, strategy="krum", **{"num-malicious": 1}), 5)
    verdict = sa.acceptance(strat, replies)
    assert verdict[5].startswith("Krum score") and not any(verdict[nid] for nid in (1, 2, 3, 4))


def test_fedavg_accepts_every_well_formed_update_even_a_poisoner():
    g = model.get_ndarrays(model.new_model(0))
    nodes = [{"partition-id": i, "num-partitions": 4, **(POISON if i == 3 else {})} for i in range(4)]
    replies = _replies(g, 1, nodes)
    strat, _ = sa.make_strategy(dict(sa.DEFAULTS, strategy="fedavg"), 4)
    assert sa.acceptance(strat, replies) == {1: "", 2: "", 3: "", 4: ""}


def test_multikrum_averages_n_minus_f_unless_told_otherwise():
    """Blanchard et al.'s Multi-Krum averages the n - f best; the old default of 2 averaged 2 of 3 honest."""
    strat, _ = sa.make_strategy(dict(sa.DEFAULTS, strategy="multikrum", **{"num-malicious": 1}), 4)
    assert strat.num_nodes_to_select == 3
    strat, _ = sa.make_strategy(dict(sa.DEFAULTS, strategy="multikrum", **{"num-to-select": 2}), 4)
    assert strat.num_nodes_to_select == 2


@pytest.mark.parametrize("settings,match", [
    ({"trim-beta": 0.2, "min-nodes": 4}, "trim-beta 0.2 with min-nodes 4 trims .* = 0 updates per side"),
    ({"trim-beta": 0.3, "min-nodes": 3}, "trim-beta 0.3 with min-nodes 3"),
    ({"trim-beta": 0.5, "min-nodes": 10}, "trim-beta < 0.5"),
])
def test_a_trimmed_mean_that_trims_nothing_is_refused(settings, match):
    """Flower's FedTrimmedAvg cuts int(beta x n) per side: the default 0.2 cuts nothing below 5 nodes."""
    with pytest.raises(sa.ServerConfigError, match=match):
        sa.run_settings({"strategy": "fedtrimmedavg", "out-dir": "-", **settings})
    sa.run_settings({"strategy": "fedtrimmedavg", "out-dir": "-", "trim-beta": 0.34, "min-nodes": 3})
    sa.run_settings({"strategy": "fedtrimmedavg", "out-dir": "-", "trim-beta": 0.25, "min-nodes": 4})


@pytest.mark.parametrize("key,value", [("num-malicious", -1), ("num-to-select", -2), ("num-malicious", 1.5)])
def test_negative_or_fractional_krum_counts_are_refused(key, value):
    with pytest.raises(sa.ServerConfigError, match=f"{key} must be an integer >= 0"):
        sa.run_settings({"strategy": "krum", "out-dir": "-", key: value})


def test_post_and_dev_refuse_a_trimmed_mean_that_trims_nothing_before_anything_starts(capsys, tmp_path):
    """`l2-fl post` checks with the job's --min (coordinate runs with min-nodes = --min), before reaching the
    daemon (nothing listens on the URL) or reading the key; `l2-fl dev` checks with --nodes before starting Flower."""
    (tmp_path / "poster.key").write_text("not read\n")
    argv = ["post", "--node", "http://127.0.0.1:9", "--key", str(tmp_path / "poster.key"), "--pool", "1000",
            "--rounds", "3", "--min", "3", "--max", "8", "--set", "strategy=fedtrimmedavg"]
    assert cli.main(argv) == 1
    assert "trim-beta 0.2 with min-nodes 3" in capsys.readouterr().err
    assert cli.main(["dev", "--nodes", "4", "--strategy", "fedtrimmedavg", "--out", "/nonexistent/dev"]) == 1
    assert "trim-beta 0.2 with min-nodes 4" in capsys.readouterr().err
