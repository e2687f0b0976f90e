"""Fast unit tests: data partition, parameter bytes, compression, reply sanitising, DP (acceptance is in
test_server_app.py)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp import strategy as fls

from federated import compression, data, model
from federated import server_app as sa
from federated.recorder import JsonlRecorder, Participant, RoundCommitment


def test_partition_is_deterministic_and_non_iid():
    train, test = data.train_test(0)
    a = data.dirichlet_partition(train.y, 4, 0.5, seed=0)
    b = data.dirichlet_partition(train.y, 4, 0.5, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(len(train)))
    hist = [np.bincount(train.y[p], minlength=10) / len(p) for p in a]
    assert max(np.abs(h - hist[0]).sum() for h in hist) > 0.5  # label mixes differ
    assert len(test) == 449


def test_canonical_bytes_roundtrip_and_strict_decode():
    arrays = model.get_ndarrays(model.new_model(0))
    raw = model.canonical_bytes(arrays)
    back = model.decode_canonical(raw)
    assert list(back) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert model.params_hash(back) == model.params_hash(arrays)
    assert raw[:8] == b"L2FLPARM"
    with pytest.raises(model.ParamsFormatError):
        model.decode_canonical(raw + b"\x00")
    with pytest.raises(model.ParamsFormatError):
        model.decode_canonical(raw[:-1])
    assert model.params_hash(model.get_ndarrays(model.new_model(1))) != model.params_hash(arrays)


@pytest.mark.parametrize("mode", ["int8", "topk"])
def test_compression_roundtrip_and_size(mode):
    ref = model.get_ndarrays(model.new_model(0))
    rng = np.random.default_rng(0)
    delta = OrderedDict((k, rng.normal(0, 0.01, v.shape).astype(np.float32)) for k, v in ref.items())
    enc, scales = compression.encode(delta, mode, 0.1)
    dec = compression.decode(enc, scales, mode, ref)
    raw = sum(v.nbytes for v in delta.values())
    sent = sum(v.nbytes for v in enc.values())
    if mode == "int8":
        assert sent * 4 == raw
        for k in delta:
            assert np.max(np.abs(dec[k] - delta[k])) <= scales[k] / 2 + 1e-7
    else:
        assert sent < raw / 4
    with pytest.raises(compression.CompressionError):
        compression.decode({k: v for k, v in list(enc.items())[:-1]}, scales, mode, ref)


class _Meta:
    def __init__(self, nid: int) -> None:
        self.src_node_id = nid


class _Reply:
    """Just enough of a reply Message for the server's sanitiser and acceptance logic."""

    def __init__(self, nid: int, content: RecordDict) -> None:
        self.metadata = _Meta(nid)
        self.content = content

    def has_error(self) -> bool:
        return False


def _reply(nid: int, arrays: "OrderedDict[str, np.ndarray]", n: int = 10) -> _Reply:
    return _Reply(nid, RecordDict({"arrays": sa.to_record(arrays), "metrics": MetricRecord({"num-examples": n})}))


def test_malformed_and_non_finite_updates_are_rejected():
    g = model.get_ndarrays(model.new_model(0))
    ok, n, nb, why = sa.sanitise_reply(_reply(1, g), g, "none")
    assert ok is not None and n == 10 and nb > 0 and why == ""
    bad = OrderedDict(g)
    bad["fc1.weight"] = np.zeros((3, 3), np.float32)
    assert sa.sanitise_reply(_reply(2, bad), g, "none")[0] is None
    nan = OrderedDict((k, v.copy()) for k, v in g.items())
    nan["fc2.bias"][0] = np.nan
    r = sa.sanitise_reply(_reply(3, nan), g, "none")
    assert r[0] is None and "non-finite" in r[3]
    assert sa.sanitise_reply(_reply(4, g, n=0), g, "none")[0] is None


def test_dp_wrapper_clips_and_noises_and_epsilon_grows_per_round():
    strat, acct = sa.make_strategy(dict(sa.DEFAULTS, dp="server-fixed", **{"dp-noise": 1.0, "dp-clip": 0.1}), 4)
    assert isinstance(strat, fls.DifferentialPrivacyServerSideFixedClipping)
    g = model.get_ndarrays(model.new_model(0))
    far = OrderedDict((k, v + 1.0) for k, v in g.items())
    strat.current_arrays = sa.to_record(g)  # what configure_train stores in a real round
    agg, _ = strat.aggregate_train(1, [_reply(nid, far) for nid in range(1, 5)])
    new = sa.from_record(agg)
    moved = np.sqrt(sum(float(np.sum((new[k] - g[k]) ** 2)) for k in g))
    assert moved < 5.0  # clipped to 0.1 (+ noise of std 0.1/4 per coordinate), not the raw ~55
    eps = []
    for _ in range(3):
        acct.compose()
        eps.append(acct.epsilon())
    assert 0 < eps[0] < eps[1] < eps[2]
    # closed form check against a brute-force minimisation over Renyi orders
    import math
    brute = min(3 * a / 2 + math.log(1e5) / (a - 1) for a in np.linspace(1.001, 200, 200000))
    assert abs(eps[2] - brute) < 1e-3


def test_run_settings_reject_unknown_values():
    with pytest.raises(sa.ServerConfigError):
        sa.run_settings({"strategy": "mystery", "out-dir": "/tmp/x"})
    with pytest.raises(sa.ServerConfigError):
        sa.run_settings({"strategy": "fedavg"})


def test_jsonl_recorder_roundtrip_ignores_torn_line(tmp_path):
    rec = JsonlRecorder(tmp_path / "r.jsonl")
    c = RoundCommitment("j", 1, "ab" * 32, "cd" * 32, "fedavg",
                        (Participant(7, 10, True), Participant(8, 0, False, "malformed update: x")),
                        {"accuracy": 0.5})
    rec.record(c)
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"job_id": "j", "rou')
    assert rec.all("j") == [c]
    assert rec.last("j") == c and rec.last("other") is None


def test_model_runs_on_cpu_or_cuda():
    assert model.device().type in ("cpu", "cuda")
    out = model.new_model(0)(torch.zeros(2, 64))
    assert out.shape == (2, 10)


def test_cli_keygen_partition_and_join_command(tmp_path, capsys, pki):
    import argparse

    from federated import cli

    assert cli.main(["keygen", str(tmp_path / "node.key")]) == 0
    assert capsys.readouterr().out.startswith("ecdsa-sha2-nistp384 ")
    assert cli.main(["partition", "--out", str(tmp_path / "d"), "--id", "1", "--num", "3"]) == 0
    split = data.read_split(tmp_path / "d" / "partition.npz")
    assert len(split) == len(data.load_partition(1, 3))
    ca, _, _ = pki(tmp_path / "pki", ["10.0.0.1"])
    argv = cli._join_argv(argparse.Namespace(
        data=str(tmp_path / "d"), insecure=False, root_certificates=str(ca), superlink="10.0.0.1:9092",
        port=0, key=str(tmp_path / "node.key"), node_config=["local-epochs=2"], job=None, node=None))
    assert argv[0].endswith("flower-supernode")
    assert argv[argv.index("--superlink") + 1] == "10.0.0.1:9092"
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "node.key")
    assert f'data-path="{tmp_path / "d" / "partition.npz"}" local-epochs=2' in argv
