"""The Flower ClientApp (Message API): local torch training on the participant's data.

Node config (set per SuperNode with ``--node-config``):
  partition-id, num-partitions  which Dirichlet partition of the bundled digits to use
  data-path                     optional .npz with x (float32, N x 64) and y (int64) instead
  alpha                         Dirichlet concentration (default 0.5)
  poison-scale                  attack for robustness tests: send g - s * (local - g)
  malformed                     attack for tests: send a wrongly shaped tensor
A poisoning / malformed client is an adversary model for tests and benchmarks, not a mode
an honest participant would run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from federated import compression, data, model

app = ClientApp()


def _local_data(node_config: dict) -> data.Split:
    path = str(node_config.get("data-path", "") or "")
    if path:
        return data.read_split(path)
    return data.load_partition(int(node_config["partition-id"]), int(node_config["num-partitions"]),
                               float(node_config.get("alpha", 0.5)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train; with a client-side DP wrapper on the server, clip through Flower's own mods."""
    dp = str(msg.content["config"].get("dp", "none"))
    if dp == "client-fixed":
        return fixedclipping_mod(msg, context, _train)
    if dp == "client-adaptive":
        return adaptiveclipping_mod(msg, context, _train)
    return _train(msg, context)


def local_params(glob: "OrderedDict[str, np.ndarray]", cfg: Any, nc: dict
                 ) -> tuple["OrderedDict[str, np.ndarray]", int, float]:
    """(parameters to send, examples trained on, last epoch's loss): local training from the global
    parameters, then the test adversary's poisoning if the node config asks for it."""
    local = _local_data(nc)
    net = model.new_model(int(cfg.get("seed", 0)), int(cfg.get("hidden", 32)))
    model.set_ndarrays(net, glob)
    loss = model.train(net, local, epochs=int(cfg.get("local-epochs", 1)), lr=float(cfg.get("lr", 0.05)),
                       seed=int(cfg.get("server-round", 0)) * 1000 + int(nc.get("partition-id", 0)))
    new = model.get_ndarrays(net)
    scale = float(nc.get("poison-scale", 0.0))
    if scale:
        new = OrderedDict((k, glob[k] - scale * (new[k] - glob[k])) for k in new)
    return new, len(local), loss


def _train(msg: Message, context: Context) -> Message:
    cfg = msg.content["config"]
    nc = dict(context.node_config)
    glob = OrderedDict((k, np.asarray(v.numpy(), dtype=np.float32)) for k, v in msg.content["arrays"].items())
    new, num_examples, loss = local_params(glob, cfg, nc)
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss})})
    mode = str(cfg.get("compression", "none"))
    if int(nc.get("malformed", 0)):
        bad = OrderedDict(new)
        first = next(iter(bad))
        bad[first] = np.zeros((3, 3), dtype=np.float32)
        content["arrays"] = ArrayRecord(OrderedDict((k, torch.from_numpy(v)) for k, v in bad.items()))
    elif mode == "none":
        content["arrays"] = ArrayRecord(OrderedDict((k, torch.from_numpy(v)) for k, v in new.items()))
    else:
        delta = OrderedDict((k, new[k] - glob[k]) for k in new)
        enc, scales = compression.encode(delta, mode, float(cfg.get("topk-fraction", 0.1)))
        content["arrays"] = ArrayRecord(OrderedDict((k, torch.from_numpy(v)) for k, v in enc.items()))
        content["compression"] = ConfigRecord({f"scale.{k}": v for k, v in scales.items()})
    return Message(content=content, reply_to=msg)
