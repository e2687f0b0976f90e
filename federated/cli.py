"""``l2-fl``: join a federation as a participant, make keys and data, or run a local dev federation.

  l2-fl keygen KEYFILE                      EC P-384 OpenSSH key pair; register KEYFILE.pub on the L2
  l2-fl partition --out DIR --id I --num N  write one digits partition (DIR/partition.npz)
  l2-fl join --superlink HOST:PORT --key KEYFILE --data DIR [--root-certificates CA | --insecure]
                                            start a SuperNode running the project's ClientApp
  l2-fl dev [--nodes 3] [--rounds 3] [--strategy fedavg] [--compression none] [--out DIR]
                                            SuperLink + N SuperNodes on loopback, one job, stop
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from federated import data
from federated.launch import BIN, LaunchError, dev, flower_env, free_port, generate_node_key


def _join_argv(a: argparse.Namespace) -> list[str]:
    d = Path(a.data)
    path = d / "partition.npz" if d.is_dir() else d
    data.read_split(path)  # fail early on bad data
    tls = ["--insecure"] if a.insecure else (["--root-certificates", a.root_certificates] if a.root_certificates else [])
    argv = [str(BIN / "flower-supernode"), *tls, "--superlink", a.superlink,
            "--port", str(a.port or free_port()), "--node-config", f'data-path="{path}"']
    if a.key:
        argv += ["--auth-supernode-private-key", a.key]
    return argv


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
    d = sub.add_parser("dev")
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--strategy", default="fedavg")
    d.add_argument("--compression", default="none")
    d.add_argument("--dp", default="none")
    d.add_argument("--out", default="l2fl-dev", help="work dir: logs, rounds.jsonl, checkpoints")
    a = p.parse_args(argv)

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
        cfg = {"num-rounds": a.rounds, "strategy": a.strategy, "compression": a.compression, "dp": a.dp,
               "local-epochs": 5}
        try:
            out = dev(a.nodes, cfg, workdir=Path(a.out).resolve())
        except LaunchError as e:
            sys.stderr.write(f"l2-fl dev: {e}\n")
            return 1
        sys.stdout.write(json.dumps({"out_dir": str(out)}) + "\n")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
