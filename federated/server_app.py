"""The Flower ServerApp (Message API): Flower's own strategies, plus the L2 seams.

Per round: the strategy configures training; replies are sanitised (decompressed, checked
for names/shapes/finite values — a malformed update is dropped, the round goes on); the
strategy aggregates the rest; the new global parameters are checkpointed content-addressed
by their hash; the server evaluates them on the held-out split; then the RoundRecorder is
called with the round's commitment. Resume starts after the recorder's last round, from
the checkpoint whose hash it committed.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as fls
from flwr.serverapp.strategy.multikrum import compute_distances

from federated import compression, data, model
from federated.l2 import recorder_from_config
from federated.privacy import GaussianRdpAccountant
from federated.recorder import JsonlRecorder, Participant, RoundCommitment, RoundRecorder

log = logging.getLogger(__name__)

STRATEGIES = ("fedavg", "fedprox", "krum", "multikrum", "bulyan", "fedtrimmedavg", "fedmedian")
DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")

DEFAULTS: dict[str, Any] = {
    "job-id": "job",
    "out-dir": "",
    "strategy": "fedavg",
    "num-rounds": 3,
    "min-nodes": 2,
    "num-malicious": 1,
    "num-to-select": 0,  # multikrum: updates averaged per round; 0 = n - f (Blanchard et al.'s Multi-Krum)
    "trim-beta": 0.2,
    "proximal-mu": 0.01,
    "dp": "none",
    "dp-noise": 0.5,
    "dp-clip": 1.0,
    "dp-delta": 1e-5,
    "compression": "none",
    "topk-fraction": 0.1,
    "local-epochs": 1,
    "lr": 0.05,
    "hidden": 32,
    "seed": 0,
    "round-timeout": 120.0,
    "poll-interval": 0.25,
    # L2 integration (federated/l2.py): daemon URL, admin token file, Flower node id -> L2 key map.
    "l2-url": "",
    "l2-token-file": "",
    "l2-node-map": "",
}


class ServerConfigError(ValueError):
    """A run config the ServerApp cannot run."""


def run_settings(run_config: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in run_config.items()})
    if cfg["strategy"] not in STRATEGIES:
        raise ServerConfigError(f"strategy must be one of {STRATEGIES}, not {cfg['strategy']!r}")
    if cfg["dp"] not in DP_MODES:
        raise ServerConfigError(f"dp must be one of {DP_MODES}, not {cfg['dp']!r}")
    if cfg["compression"] not in compression.MODES:
        raise ServerConfigError(f"compression must be one of {compression.MODES}")
    if cfg["dp"].startswith("client-") and cfg["compression"] != "none":
        raise ServerConfigError("client-side DP clips full parameters: use compression = none")
    for key in ("num-malicious", "num-to-select"):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ServerConfigError(f"{key} must be an integer >= 0, not {cfg[key]!r}")
    if cfg["strategy"] == "fedtrimmedavg":
        beta, n = float(cfg["trim-beta"]), int(cfg["min-nodes"])
        if not (beta < 0.5 and int(beta * n) >= 1):  # Flower's trim_mean cuts int(beta * n) per side
            raise ServerConfigError(
                f"trim-beta {beta} with min-nodes {n} trims int(trim-beta x min-nodes) = {int(beta * n)} updates "
                f"per side: fedtrimmedavg would be a plain mean; needs 1/min-nodes <= trim-beta < 0.5")
    if not cfg["out-dir"]:
        raise ServerConfigError("run config needs out-dir (recorder file and checkpoints)")
    return cfg


def make_strategy(cfg: dict[str, Any], num_nodes: int) -> tuple[fls.Strategy, Any]:
    """(strategy to run, privacy accountant or None) from the run config."""
    common = dict(
        fraction_evaluate=0.0,  # evaluation is central (server-side, held-out split)
        min_train_nodes=num_nodes,
        min_available_nodes=num_nodes,
    )
    name = cfg["strategy"]
    f = int(cfg["num-malicious"])
    if name == "fedavg":
        s: fls.Strategy = fls.FedAvg(**common)
    elif name == "fedprox":
        s = fls.FedProx(**common, proximal_mu=float(cfg["proximal-mu"]))
    elif name == "krum":
        s = fls.Krum(**common, num_malicious_nodes=f)
    elif name == "multikrum":
        s = fls.MultiKrum(**common, num_malicious_nodes=f,
                          num_nodes_to_select=int(cfg["num-to-select"]) or max(1, num_nodes - f))
    elif name == "bulyan":
        s = fls.Bulyan(**common, num_malicious_nodes=f)
    elif name == "fedtrimmedavg":
        s = fls.FedTrimmedAvg(**common, beta=float(cfg["trim-beta"]))
    else:
        s = fls.FedMedian(**common)
    accountant = None
    dp = cfg["dp"]
    noise, clip = float(cfg["dp-noise"]), float(cfg["dp-clip"])
    if dp != "none":
        accountant = GaussianRdpAccountant(noise, float(cfg["dp-delta"]))
    if dp == "server-fixed":
        s = fls.DifferentialPrivacyServerSideFixedClipping(s, noise, clip, num_nodes)
    elif dp == "client-fixed":
        s = fls.DifferentialPrivacyClientSideFixedClipping(s, noise, clip, num_nodes)
    elif dp == "server-adaptive":
        s = fls.DifferentialPrivacyServerSideAdaptiveClipping(s, noise, num_nodes, initial_clipping_norm=clip)
    elif dp == "client-adaptive":
        s = fls.DifferentialPrivacyClientSideAdaptiveClipping(s, noise, num_nodes, initial_clipping_norm=clip)
    return s, accountant


def _inner(s: fls.Strategy) -> fls.Strategy:
    while hasattr(s, "strategy") and isinstance(getattr(s, "strategy"), fls.Strategy):
        s = s.strategy
    return s


def to_record(arrays: "OrderedDict[str, np.ndarray]") -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))) for k, v in arrays.items()))


def from_record(rec: ArrayRecord) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict((k, np.asarray(v.numpy())) for k, v in rec.items())


class Checkpoints:
    """Global parameters per round, stored as canonical bytes under their SHA-256."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, h: str) -> Path:
        return self.root / f"{h}.params"

    def save(self, arrays: "OrderedDict[str, np.ndarray]") -> str:
        raw = model.canonical_bytes(arrays)
        h = model.params_hash(arrays)
        p = self.path(h)
        if not p.exists():
            tmp = p.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        return h

    def load(self, h: str) -> "OrderedDict[str, np.ndarray]":
        arrays = model.decode_canonical(self.path(h).read_bytes())
        if model.params_hash(arrays) != h:
            raise ValueError(f"checkpoint {h} does not hash to its name")
        return arrays


def sanitise_reply(msg: Message, global_arrays: "OrderedDict[str, np.ndarray]", mode: str
                   ) -> tuple[Message | None, int, int, str]:
    """(clean reply or None, num_examples, update bytes, rejection reason)."""
    if msg.has_error():
        return None, 0, 0, f"error reply: {msg.error.reason}"
    content = msg.content
    try:
        rec = content["arrays"]
        metrics = content["metrics"]
        n = metrics["num-examples"]
        if not isinstance(n, int) or n <= 0:
            raise ValueError("num-examples must be a positive integer")
        sent = {k: np.asarray(v.numpy()) for k, v in rec.items()}
        nbytes = int(sum(a.nbytes for a in sent.values()))
        if mode == "none":
            if list(sent) != list(global_arrays):
                raise ValueError("parameter names do not match the model")
            full = OrderedDict()
            for k, ref in global_arrays.items():
                a = sent[k]
                if a.shape != ref.shape or a.dtype != np.float32:
                    raise ValueError(f"{k}: {a.dtype}{a.shape} != float32{ref.shape}")
                full[k] = a
        else:
            scales = {k[len("scale."):]: float(v) for k, v in content["compression"].items()
                      if k.startswith("scale.")} if "compression" in content else {}
            delta = compression.decode(sent, scales, mode, global_arrays)
            full = OrderedDict((k, (global_arrays[k] + delta[k]).astype(np.float32)) for k in global_arrays)
        for k, a in full.items():
            if not np.all(np.isfinite(a)):
                raise ValueError(f"{k}: non-finite values")
    except (KeyError, ValueError, TypeError, compression.CompressionError) as e:
        return None, 0, 0, f"malformed update: {e}"
    clean = RecordDict({"arrays": to_record(full), "metrics": MetricRecord({"num-examples": n})})
    # Same message (routing metadata intact), content replaced by the decoded full params,
    # so Flower's aggregators see an ordinary reply.
    msg.content = clean
    return msg, n, nbytes, ""


# How far outside the robust rule's core an update may lie and still count as honest (paid): see acceptance().
SPREAD = 2.0


def krum_scores(records: list[ArrayRecord], num_malicious: int) -> np.ndarray:
    """Flower's Krum score of each update (flwr.serverapp.strategy.multikrum.select_multikrum): the sum of the
    squared L2 distances to its max(1, n - f - 2) nearest other updates; lowest = most central."""
    dist = compute_distances(records)
    k = max(1, len(records) - num_malicious - 2)
    return np.array([float(np.sum(row[np.argsort(row)[1 : k + 1]])) for row in dist])


def acceptance(strategy: fls.Strategy, clean: list[Message]) -> dict[int, str]:
    """Node id -> "" if the robust rule considers its update honest (it is paid for the round), else why not.

    Krum / MultiKrum: the core is the n - f best Krum scores (f = num-malicious; what Flower's select_multikrum
    returns when asked for n - f), accepted whatever the strategy then averages (Krum keeps only one). An update
    outside the core is accepted too when its score is at most SPREAD^2 times the core's worst: Krum always
    leaves f updates out, attack or not, so with fewer than f attackers the updates it leaves out include honest
    ones, and with non-IID data the same ones every round. FedTrimmedAvg: the fraction of a node's coordinates
    inside the kept order statistics must be at least 1 / SPREAD of what every node averages, (n - 2 cut) / n.
    FedAvg / FedProx / FedMedian / Bulyan: every well-formed update."""
    inner = _inner(strategy)
    ids = [m.metadata.src_node_id for m in clean]
    if not clean:
        return {}
    n = len(clean)
    if isinstance(inner, fls.MultiKrum):  # Krum is a MultiKrum selecting one
        scores = krum_scores([m.content["arrays"] for m in clean], inner.num_malicious_nodes)
        core = set(np.argsort(scores)[: max(1, n - inner.num_malicious_nodes)].tolist())
        worst = max(scores[i] for i in core)
        return {nid: "" if i in core or scores[i] <= SPREAD**2 * worst else
                f"Krum score {scores[i]:.4g} > {SPREAD**2:g} x {worst:.4g}, the worst of the {len(core)} best"
                for i, nid in enumerate(ids)}
    if isinstance(inner, fls.FedTrimmedAvg):
        flat = np.stack([np.concatenate([np.asarray(a.numpy()).ravel() for a in m.content["arrays"].values()])
                         for m in clean])
        cut = int(inner.beta * n)  # Flower's trim_mean cuts int(beta * n) per side of every coordinate
        ranks = np.argsort(np.argsort(flat, axis=0, kind="stable"), axis=0, kind="stable")
        kept = ((ranks >= cut) & (ranks < n - cut)).mean(axis=1)
        need = (n - 2 * cut) / n / SPREAD
        return {nid: "" if kept[i] >= need else f"{kept[i]:.0%} of coordinates kept by the trimmed mean < {need:.0%}"
                for i, nid in enumerate(ids)}
    return {nid: "" for nid in ids}


def send_and_receive(grid: Grid, messages: Any, timeout: float, poll: float) -> list[Message]:
    """Grid.send_and_receive with a short poll: Flower's HTTP grid sleeps 3 s between pulls,
    which alone adds up to 3 s to every round."""
    ids = set(grid.push_messages(messages))
    out: list[Message] = []
    end = time.monotonic() + timeout
    while ids and time.monotonic() < end:
        got = list(grid.pull_messages(ids))
        out.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        if ids:
            time.sleep(poll)
    return out


def run_job(grid: Grid, run_config: dict[str, Any], recorder: RoundRecorder | None = None) -> list[RoundCommitment]:
    """Run (or resume) one training job; returns the commitments made by this call."""
    cfg = run_settings(run_config)
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    rec = recorder or recorder_from_config(cfg, out) or JsonlRecorder(out / "rounds.jsonl")
    ckpt = Checkpoints(out / "checkpoints")
    job = str(cfg["job-id"])
    num_nodes = int(cfg["min-nodes"])
    strategy, accountant = make_strategy(cfg, num_nodes)
    test = data.load_test(int(cfg["seed"]))
    net = model.new_model(int(cfg["seed"]), int(cfg["hidden"]))

    last = rec.last(job)
    if last is not None:
        arrays = ckpt.load(last.params_hash)  # raises if missing or tampered
        start = last.round + 1
        log.info("resuming job %s after round %d (params %s)", job, last.round, last.params_hash)
    else:
        arrays = model.get_ndarrays(net)
        start = 1
    prev_hash = ckpt.save(arrays)

    train_cfg = ConfigRecord({
        "local-epochs": int(cfg["local-epochs"]), "lr": float(cfg["lr"]),
        "compression": str(cfg["compression"]), "topk-fraction": float(cfg["topk-fraction"]),
        "hidden": int(cfg["hidden"]), "seed": int(cfg["seed"]), "dp": str(cfg["dp"]),
    })
    made: list[RoundCommitment] = []
    wait_until = time.monotonic() + float(cfg["round-timeout"])
    while len(list(grid.get_node_ids())) < num_nodes:
        if time.monotonic() > wait_until:
            raise TimeoutError(f"fewer than {num_nodes} nodes connected")
        time.sleep(0.2)

    for rnd in range(start, int(cfg["num-rounds"]) + 1):
        t0 = time.monotonic()
        train_cfg["server-round"] = rnd
        msgs = strategy.configure_train(rnd, to_record(arrays), train_cfg, grid)
        replies = send_and_receive(grid, msgs, float(cfg["round-timeout"]), float(cfg["poll-interval"]))
        t_train = time.monotonic() - t0
        clean: list[Message] = []
        info: dict[int, tuple[int, int, str]] = {}
        for r in replies:
            nid = r.metadata.src_node_id
            c, n, nb, reason = sanitise_reply(r, arrays, str(cfg["compression"]))
            info[nid] = (n, nb, reason)
            if c is not None:
                clean.append(c)
            else:
                log.warning("round %d: node %d rejected: %s", rnd, nid, reason)
        verdict = acceptance(strategy, clean)
        inner = _inner(strategy)
        if isinstance(inner, fls.MultiKrum) and not isinstance(inner, fls.Krum) and not int(cfg["num-to-select"]):
            inner.num_nodes_to_select = max(1, len(clean) - inner.num_malicious_nodes)  # n - f of this round
        t1 = time.monotonic()
        agg, _ = strategy.aggregate_train(rnd, clean) if clean else (None, None)
        t_agg = time.monotonic() - t1
        if agg is not None:
            arrays = OrderedDict((k, np.asarray(from_record(agg)[k], dtype=np.float32)) for k in arrays)
        h = ckpt.save(arrays)
        model.set_ndarrays(net, arrays)
        loss, acc = model.evaluate(net, test)
        metrics = {
            "accuracy": acc, "loss": loss, "round_seconds": time.monotonic() - t0,
            "train_seconds": t_train, "aggregate_seconds": t_agg,
            "update_bytes": float(sum(v[1] for v in info.values())),
            "num_replies": float(len(replies)), "num_valid": float(len(clean)),
        }
        if accountant is not None and agg is not None:
            accountant.compose()
        if accountant is not None:
            metrics["dp_epsilon"] = accountant.epsilon()
            metrics["dp_delta"] = accountant.delta
        parts = tuple(
            Participant(node_id=nid, num_examples=n, accepted=not (reason or verdict[nid]),
                        reason=reason or verdict[nid], update_bytes=nb)
            for nid, (n, nb, reason) in sorted(info.items()))
        c = RoundCommitment(job_id=job, round=rnd, params_hash=h, prev_params_hash=prev_hash,
                            strategy=str(cfg["strategy"]) + ("" if cfg["dp"] == "none" else "+dp-" + cfg["dp"]),
                            participants=parts, metrics=metrics)
        rec.record(c)
        made.append(c)
        prev_hash = h
        log.info("round %d: acc=%.4f hash=%s", rnd, acc, h)
    finish = getattr(rec, "finish", None)
    if finish is not None:  # the L2 recorder closes the job: rewards by contribution, pool unlocked
        finish(job)
    return made


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_job(grid, dict(context.run_config))
