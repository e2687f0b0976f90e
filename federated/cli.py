"""``l2-fl``: join a federation as a participant, make keys and data, or run a local dev federation.

  l2-fl keygen KEYFILE                      EC P-384 OpenSSH key pair; register KEYFILE.pub on the L2
  l2-fl partition --out DIR --id I --num N  write one digits partition (DIR/partition.npz)
  l2-fl join --superlink HOST:PORT --key KEYFILE --data DIR [--root-certificates CA | --insecure]
                                            start a SuperNode running the project's ClientApp
  l2-fl dev [--nodes 3] [--rounds 3] [--strategy fedavg] [--compression none] [--set k=v ...] [--out DIR]
                                            SuperLink + N SuperNodes on loopback, one job, stop

On the L2 (docs/federated.md; L2KEY is an l2-cli key file, 64 hex characters):
  l2-fl post --node URL --key L2KEY --pool SAT --rounds R --min M --max X [--set k=v ...]
                                            post a job, escrowing the reward pool; prints the job id
  l2-fl register --node URL --key L2KEY --job ID --node-key KEYFILE.pub
                                            register as a participant with the node key you join with
  l2-fl reclaim --node URL --key L2KEY --job ID
                                            (poster) close a job idle for 1000 L2 blocks: contributions
                                            so far are paid, the rest of the pool comes back
  l2-fl coordinate --node URL --token-file F --job ID --out DIR [--set k=v ...]
                                            (federation) auth SuperLink allowing exactly the job's L2
                                            registrations; runs or resumes the job, commits every round
                                            to the L2, pays rewards at the end
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from federated import data, l2, server_app
from federated.launch import BIN, LaunchError, dev, flower_env, free_port, generate_node_key
from l2d.client import ApiError, Client, Unreachable
from l2d.core.errors import DecodeError
from l2d.keys import KeyFileError, load_secret


def _join_argv(a: argparse.Namespace) -> list[str]:
    d = Path(a.data)
    path = d / "partition.npz" if d.is_dir() else d
    data.read_split(path)  # fail early on bad data
    tls = ["--insecure"] if a.insecure else (["--root-certificates", a.root_certificates] if a.root_certificates else [])
    extra = "".join(f" {k}={_toml(v)}" for k, v in _settings(a.node_config).items())
    argv = [str(BIN / "flower-supernode"), *tls, "--superlink", a.superlink,
            "--port", str(a.port or free_port()), "--node-config", f'data-path="{path}"' + extra]
    if a.key:
        argv += ["--auth-supernode-private-key", a.key]
    return argv


def _settings(pairs: list[str]) -> dict[str, Any]:
    """--set k=v pairs as run-config values (TOML literals: 5, 0.05, "fedavg"; bare words are strings)."""
    import tomllib

    out: dict[str, Any] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[k.strip()] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            out[k.strip()] = v
    return out


def _toml(v: Any) -> str:
    from federated.launch import _toml_value

    return _toml_value(v)


def _job_id(s: str) -> str:
    if len(s) != 64 or any(c not in "0123456789abcdef" for c in s):
        raise ValueError("--job must be the 64 lowercase hex characters of the job id")
    return s


def _l2_command(a: argparse.Namespace) -> dict[str, Any]:
    if a.cmd == "post":
        settings = _settings(a.set)
        # refuse a config the ServerApp could not run (coordinate runs it with min-nodes = the job's --min)
        server_app.run_settings({**settings, "out-dir": "-", "min-nodes": a.min})
        api = Client(a.node)
        jid = l2.post_job(api, load_secret(Path(a.key)), a.pool, settings, a.rounds, a.min, a.max, a.fee)
        return {"job_id": jid, "config_hash": l2.config_hash(settings).hex()}
    if a.cmd == "register":
        line = Path(a.node_key).read_text().strip()
        api = Client(a.node)
        txid = l2.register_participant(api, load_secret(Path(a.key)), _job_id(a.job), line, a.fee)
        return {"txid": txid}
    if a.cmd == "reclaim":
        return {"txid": l2.reclaim_job(Client(a.node), load_secret(Path(a.key)), _job_id(a.job), a.fee)}
    token = Path(a.token_file).read_text().strip()
    return l2.coordinate(Client(a.node, token), _job_id(a.job), Path(a.out).resolve(), _settings(a.set),
                         Path(a.token_file).resolve(), say=lambda m: sys.stderr.write(m + "\n"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="l2-fl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keygen")
    k.add_argument("keyfile")
    pa = sub.add_parser("partition")
    pa.add_argument("--out", required=True)
    pa.add_argument("--id", type=int, required=True)
    pa.add_argument("--num", type=int, required=True)
    pa.add_argument("--alpha", type=float, default=0.5)
    pa.add_argument("--seed", type=int, default=0)
    j = sub.add_parser("join")
    j.add_argument("--superlink", required=True)
    j.add_argument("--key", help="SuperNode private key registered on the L2 (OpenSSH EC)")
    j.add_argument("--data", required=True, help="dir with partition.npz, or an .npz file")
    j.add_argument("--root-certificates")
    j.add_argument("--insecure", action="store_true")
    j.add_argument("--port", type=int, default=0)
    j.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra node config for the ClientApp (e.g. local-epochs overrides); repeatable")
    d = sub.add_parser("dev")
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--strategy", default="fedavg")
    d.add_argument("--compression", default="none")
    d.add_argument("--dp", default="none")
    d.add_argument("--out", default="l2fl-dev", help="work dir: logs, rounds.jsonl, checkpoints")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config (e.g. trim-beta=0.34)")
    po = sub.add_parser("post")
    po.add_argument("--node", required=True)
    po.add_argument("--key", required=True)
    po.add_argument("--pool", type=int, required=True)
    po.add_argument("--rounds", type=int, required=True)
    po.add_argument("--min", type=int, required=True)
    po.add_argument("--max", type=int, required=True)
    po.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training setting (run config)")
    po.add_argument("--fee", type=int, default=1)
    rg = sub.add_parser("register")
    rg.add_argument("--node", required=True)
    rg.add_argument("--key", required=True)
    rg.add_argument("--job", required=True)
    rg.add_argument("--node-key", required=True, help="the .pub of the key given to l2-fl join --key")
    rg.add_argument("--fee", type=int, default=1)
    rc = sub.add_parser("reclaim")
    rc.add_argument("--node", required=True)
    rc.add_argument("--key", required=True)
    rc.add_argument("--job", required=True)
    rc.add_argument("--fee", type=int, default=1)
    co = sub.add_parser("coordinate")
    co.add_argument("--node", required=True)
    co.add_argument("--token-file", required=True)
    co.add_argument("--job", required=True)
    co.add_argument("--out", required=True)
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.cmd in ("post", "register", "reclaim", "coordinate"):
        try:
            out = _l2_command(a)
        except Unreachable as e:  # worded as before the shared client: the connection error's own text
            sys.stderr.write(f"l2-fl {a.cmd}: {e.error}\n")
            return 1
        except (ApiError, KeyFileError, LaunchError, DecodeError, OSError, ValueError) as e:
            sys.stderr.write(f"l2-fl {a.cmd}: {e}\n")
            return 1
        sys.stdout.write(json.dumps(out) + "\n")
        return 0

    if a.cmd == "keygen":
        pub = generate_node_key(Path(a.keyfile))
        sys.stdout.write(pub.read_text())
        return 0
    if a.cmd == "partition":
        out = data.write_partition(Path(a.out) / "partition.npz", a.id, a.num, a.alpha, a.seed)
        sys.stdout.write(f"{out}\n")
        return 0
    if a.cmd == "join":
        argv2 = _join_argv(a)
        env = flower_env(Path(os.environ.get("HOME", "/tmp")))
        env["HOME"] = os.environ.get("HOME", env["HOME"])  # a real participant keeps their own home
        os.execve(argv2[0], argv2, env)  # Flower in its own process; never returns
    if a.cmd == "dev":
        try:
            cfg = {"num-rounds": a.rounds, "strategy": a.strategy, "compression": a.compression, "dp": a.dp,
                   "local-epochs": 5, **_settings(a.set)}
            server_app.run_settings({**cfg, "out-dir": "-", "min-nodes": a.nodes})  # refused before Flower starts
            out = dev(a.nodes, cfg, workdir=Path(a.out).resolve())
        except (LaunchError, ValueError) as e:
            sys.stderr.write(f"l2-fl dev: {e}\n")
            return 1
        sys.stdout.write(json.dumps({"out_dir": str(out)}) + "\n")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
