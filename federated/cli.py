"""``l2-fl``: join a federation as a participant, make keys and data, or run a local dev federation.

  l2-fl keygen KEYFILE                      EC P-384 OpenSSH key pair; register KEYFILE.pub on the L2
  l2-fl partition --out DIR --id I --num N  write one digits partition (DIR/partition.npz)
  l2-fl join --superlink HOST:PORT --key KEYFILE --data DIR [--root-certificates CA | --insecure]
                                            start a SuperNode running the project's ClientApp (CA: the
                                            federation operator's, which signed the SuperLink's certificate)
  l2-fl dev [--nodes 3] [--rounds 3] [--strategy fedavg] [--compression none] [--set k=v ...] [--out DIR]
                                            SuperLink + N SuperNodes on loopback, one job, stop
                                            (progress on stderr, the result on stdout)

On the L2 (docs/federated.md; L2KEY is an l2-cli key file, 64 hex characters):
  l2-fl post --node URL --key L2KEY --pool SAT --rounds R --min M --max X [--set k=v ...]
                                            post a job, escrowing the reward pool; prints the job id
  l2-fl register --node URL --key L2KEY --job ID --node-key KEYFILE.pub
                                            register as a participant with the node key you join with
  l2-fl reclaim --node URL --key L2KEY --job ID
                                            (poster) close a job idle for 1000 L2 blocks: contributions
                                            so far are paid, the rest of the pool comes back
  l2-fl coordinate --node URL --token-file F --job ID --out DIR [--set k=v ...]
                   [--bind HOST] [--port P] [--tls-cert F --tls-key F --tls-ca F]
                                            (federation) auth SuperLink allowing exactly the job's L2
                                            registrations; runs or resumes the job, commits every round
                                            to the L2, pays rewards at the end. Across machines: bind a
                                            reachable address with the operator's certificate for it
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

from federated import data, l2, server_app, tls
from federated.launch import BIN, LaunchError, dev, flower_env, free_port, generate_node_key
from l2d.argtypes import existing_file, output_file
from l2d.client import ApiError, Client, Unreachable
from l2d.core.errors import DecodeError
from l2d.keys import KeyFileError, load_secret


def existing_path(arg: str) -> str:
    """An argparse type: a path that exists (a missing one is a usage error, exit 2, before anything starts)."""
    if not Path(arg).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {arg}")
    return str(Path(arg).expanduser())


class _Usage(Exception):
    """Arguments that parse but cannot be used: reported as argparse reports its own errors (exit 2)."""


def _join_argv(a: argparse.Namespace) -> list[str]:
    if (a.job is None) != (a.node is None):
        raise _Usage("argument --job: --job JOB_ID and --node URL go together")
    if a.job is not None:
        try:
            if len(bytes.fromhex(a.job)) != 32:
                raise ValueError
        except ValueError:
            raise _Usage(f"argument --job: {a.job!r} is not a 64-hex-character job id") from None
    d = Path(a.data)
    path = d / "partition.npz" if d.is_dir() else d
    if not path.is_file():
        raise _Usage(f"argument --data: no partition.npz in {d} (write one with l2-fl partition --out {d})")
    try:
        data.read_split(path)  # fail early on bad data
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise _Usage(f"argument --data: {path} is not a partition written by l2-fl partition ({e})") from None
    try:
        tls.split_hostport(a.superlink)
    except ValueError as e:
        raise _Usage(f"argument --superlink: {e}") from None
    if a.root_certificates:
        try:
            tls.load_ca(Path(a.root_certificates), "--root-certificates")
        except tls.TlsError as e:
            raise _Usage(f"argument {e.arg}: {e}") from None
    tls_args = (["--insecure"] if a.insecure
                else ["--root-certificates", a.root_certificates] if a.root_certificates else [])
    extra = "".join(f" {k}={_toml(v)}" for k, v in _settings(a.node_config).items())
    argv = [str(BIN / "flower-supernode"), *tls_args, "--superlink", a.superlink,
            "--port", str(a.port or free_port()), "--node-config", f'data-path="{path}"' + extra]
    if a.key:
        argv += ["--auth-supernode-private-key", a.key]
    return argv


def _join_job(a: argparse.Namespace, argv: list[str], env: dict[str, str]) -> int:
    """The SuperNode as a child, stopped once the job is no longer OPEN on the L2 (a SuperNode left alone retries
    its SuperLink forever after the job ended): exit 0 then, the SuperNode's own code if it ends first."""
    client = Client(a.node)
    proc = subprocess.Popen(argv, env=env)
    stop = threading.Event()
    before = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None and not stop.is_set():
            try:
                job = client.fl_job_or_none(a.job)
            except (ApiError, Unreachable) as e:  # the node may be restarting: the SuperNode keeps going
                sys.stderr.write(f"l2-fl join: job status unknown ({e}); asking again\n")
                job = None
            if job is not None and job["status"] != "OPEN":
                sys.stderr.write(f"l2-fl join: job {a.job} is {job['status']} on the L2: stopping the SuperNode\n")
                break
            stop.wait(a.poll_s)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return 0 if stop.is_set() or proc.returncode in (0, -signal.SIGTERM) else int(proc.returncode)


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
    server_tls, advertise = _coordinate_tls(a)
    token = Path(a.token_file).read_text().strip()
    return l2.coordinate(Client(a.node, token), _job_id(a.job), Path(a.out).resolve(), _settings(a.set),
                         Path(a.token_file).resolve(), say=lambda m: sys.stderr.write(m + "\n"),
                         host=a.bind, port=a.port, tls=server_tls, advertise=advertise)


def _coordinate_tls(a: argparse.Namespace) -> tuple[tls.ServerTls | None, str]:
    """coordinate's --bind and --tls-* checked before anything starts: the operator's TLS files (or None) and the
    host participants dial. The certificate must name the bound address (or, bound to all addresses, 127.0.0.1,
    which Flower's own ServerApp runtime and the flwr CLI dial on this machine)."""
    try:
        ipaddress.ip_address(a.bind)
    except ValueError:
        raise _Usage(f"argument --bind: {a.bind!r} is not an IP address (the address of this machine the "
                     "SuperLink listens on, e.g. 10.0.0.5, or 0.0.0.0 for all)") from None
    given = [name for name, v in (("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key), ("--tls-ca", a.tls_ca))
             if v]
    if not given:
        if tls.dial_host(a.bind) != "127.0.0.1":
            raise _Usage(f"argument --bind: {a.bind} needs the operator's --tls-cert, --tls-key and --tls-ca (the "
                         "throwaway CA made without them names only 127.0.0.1)")
        return None, ""
    if len(given) < 3:
        missing = sorted({"--tls-cert", "--tls-key", "--tls-ca"} - set(given))
        raise _Usage(f"argument {given[0]}: the operator's TLS needs --tls-cert, --tls-key and --tls-ca together "
                     f"(missing {', '.join(missing)})")
    server_tls = tls.ServerTls(Path(a.tls_ca).resolve(), Path(a.tls_cert).resolve(), Path(a.tls_key).resolve())
    try:
        have = tls.check_server_tls(server_tls, [tls.dial_host(a.bind)])
    except tls.TlsError as e:
        raise _Usage(f"argument {e.arg}: {e}") from None
    advertise = a.bind if tls.dial_host(a.bind) == a.bind else next(
        (n for n in have if n not in ("127.0.0.1", "::1", "localhost")), a.bind)
    return server_tls, advertise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="l2-fl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help)
        c.set_defaults(usage=c.error)  # for usage errors found after parsing (_Usage)
        return c

    k = cmd("keygen", "make an EC P-384 OpenSSH key pair for a SuperNode (register KEYFILE.pub on the L2)")
    k.add_argument("keyfile", type=output_file, metavar="KEYFILE", help="private key to write (KEYFILE.pub beside it)")
    pa = cmd("partition", "write one participant's digits partition, DIR/partition.npz (what join --data reads)")
    pa.add_argument("--out", required=True, metavar="DIR", help="directory to write partition.npz in (created)")
    pa.add_argument("--id", type=int, required=True, help="this partition's index, 0..NUM-1")
    pa.add_argument("--num", type=int, required=True, help="number of partitions the data is split into")
    pa.add_argument("--alpha", type=float, default=0.5,
                    help="Dirichlet concentration: lower is less IID (default %(default)s)")
    pa.add_argument("--seed", type=int, default=0, help="split seed (default %(default)s)")
    j = cmd("join", "start a SuperNode running the project's ClientApp against a federation's SuperLink")
    j.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the federation's SuperLink")
    j.add_argument("--key", type=existing_file, metavar="KEYFILE",
                   help="SuperNode private key registered on the L2 (OpenSSH EC, from l2-fl keygen)")
    j.add_argument("--data", required=True, type=existing_path, metavar="DIR",
                   help="dir with partition.npz, or an .npz file")
    j.add_argument("--root-certificates", type=existing_file, metavar="CA",
                   help="CA certificate (PEM) of the SuperLink's TLS")
    j.add_argument("--insecure", action="store_true", help="connect without TLS (a dev SuperLink only)")
    j.add_argument("--port", type=int, default=0, help="the SuperNode's own port (default: a free one)")
    j.add_argument("--job", metavar="JOB_ID", help="stop once this FL job is no longer OPEN on the L2 (needs --node); "
                   "without it the SuperNode runs until stopped")
    j.add_argument("--node", metavar="URL", help="an l2d node's REST API, to follow --job")
    j.add_argument("--poll-s", type=float, default=5.0, help="seconds between job status checks (default 5)")
    j.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                   help="extra node config for the ClientApp (e.g. local-epochs overrides); repeatable")
    d = cmd("dev", "SuperLink + N SuperNodes on loopback, one job, stop (progress on stderr, result on stdout)")
    d.add_argument("--nodes", type=int, default=3, help="SuperNodes (default %(default)s)")
    d.add_argument("--rounds", type=int, default=3, help="training rounds (default %(default)s)")
    d.add_argument("--strategy", default="fedavg", help="aggregation (fedavg, krum, multikrum, fedtrimmedavg, ...; "
                                                        "default %(default)s)")
    d.add_argument("--compression", default="none", help="update compression (default %(default)s)")
    d.add_argument("--dp", default="none", help="differential privacy (default %(default)s)")
    d.add_argument("--out", default="l2fl-dev", help="work dir: logs, rounds.jsonl, checkpoints (default %(default)s)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run config (e.g. trim-beta=0.34)")
    po = cmd("post", "post a job on the L2, escrowing the reward pool; prints the job id")
    po.add_argument("--node", required=True, metavar="URL", help="the L2 daemon's REST address")
    po.add_argument("--key", required=True, type=existing_file, metavar="L2KEY", help="the poster's l2-cli key file")
    po.add_argument("--pool", type=int, required=True, metavar="SAT", help="reward pool in satoshis")
    po.add_argument("--rounds", type=int, required=True, help="training rounds")
    po.add_argument("--min", type=int, required=True, help="fewest participants a round runs with")
    po.add_argument("--max", type=int, required=True, help="most participants that may register")
    po.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="training setting (run config)")
    po.add_argument("--fee", type=int, default=1, help="transaction fee in satoshis (default %(default)s)")
    rg = cmd("register", "register as a job's participant with the node key you join with")
    rg.add_argument("--node", required=True, metavar="URL", help="the L2 daemon's REST address")
    rg.add_argument("--key", required=True, type=existing_file, metavar="L2KEY", help="your l2-cli key file")
    rg.add_argument("--job", required=True, metavar="ID", help="job id (64 hex characters)")
    rg.add_argument("--node-key", required=True, type=existing_file, metavar="KEYFILE.pub",
                    help="the .pub of the key given to l2-fl join --key")
    rg.add_argument("--fee", type=int, default=1, help="transaction fee in satoshis (default %(default)s)")
    rc = cmd("reclaim", "(poster) close a job idle for 1000 L2 blocks: contributions so far are paid, the rest of "
                        "the pool comes back")
    rc.add_argument("--node", required=True, metavar="URL", help="the L2 daemon's REST address")
    rc.add_argument("--key", required=True, type=existing_file, metavar="L2KEY", help="the poster's l2-cli key file")
    rc.add_argument("--job", required=True, metavar="ID", help="job id (64 hex characters)")
    rc.add_argument("--fee", type=int, default=1, help="transaction fee in satoshis (default %(default)s)")
    co = cmd("coordinate", "(federation) run or resume a job: an auth SuperLink allowing exactly the job's L2 "
                           "registrations, every round committed to the L2, rewards paid at the end")
    co.add_argument("--node", required=True, metavar="URL", help="the L2 daemon's REST address")
    co.add_argument("--token-file", required=True, type=existing_file, metavar="F",
                    help="file holding the daemon's admin token")
    co.add_argument("--job", required=True, metavar="ID", help="job id (64 hex characters)")
    co.add_argument("--out", required=True, metavar="DIR", help="work dir: logs, checkpoints (created)")
    co.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="training setting: must be the ones the job was posted with")
    co.add_argument("--bind", default="127.0.0.1", metavar="HOST",
                    help="IP address the SuperLink listens on, e.g. this machine's LAN address (default "
                         "%(default)s; any other needs the --tls-* files)")
    co.add_argument("--port", type=int, default=0,
                    help="the SuperLink's port, the one participants must reach (default: a free one, printed)")
    co.add_argument("--tls-cert", type=existing_file, metavar="F",
                    help="the SuperLink's TLS certificate (PEM); its subjectAltName must name the --bind address")
    co.add_argument("--tls-key", type=existing_file, metavar="F", help="the certificate's private key (PEM)")
    co.add_argument("--tls-ca", type=existing_file, metavar="F",
                    help="the CA certificate that signed --tls-cert (participants join with it)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
        try:
            return _run(a)
        except _Usage as e:
            a.usage(str(e))  # prints the command's usage and the message, exits 2
            return 2
    except SystemExit as e:  # argparse: usage errors (2), --help (0)
        return e.code if isinstance(e.code, int) else 0


def _say(message: str) -> None:
    sys.stderr.write(f"l2-fl dev: {message}\n")
    sys.stderr.flush()


def _stop(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds coordinate's clean-up: its SuperLink and ServerApp are stopped too


def _run(a: argparse.Namespace) -> int:
    if a.cmd in ("post", "register", "reclaim", "coordinate"):
        # SIGTERM (a service manager's stop) stops coordinate the way Ctrl-C does, not leaving Flower running.
        trap = a.cmd == "coordinate" and threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, _stop) if trap else None
        try:
            result = _l2_command(a)
        except Unreachable as e:  # worded as before the shared client: the connection error's own text
            sys.stderr.write(f"l2-fl {a.cmd}: {e.error}\n")
            return 1
        except (ApiError, KeyFileError, LaunchError, DecodeError, OSError, ValueError) as e:
            sys.stderr.write(f"l2-fl {a.cmd}: {e}\n")
            return 1
        finally:
            if trap:
                signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)
        sys.stdout.write(json.dumps(result) + "\n")
        return 0

    if a.cmd == "keygen":
        try:
            pub = generate_node_key(Path(a.keyfile))
        except OSError as e:
            sys.stderr.write(f"l2-fl keygen: {e}\n")
            return 1
        sys.stdout.write(pub.read_text())
        return 0
    if a.cmd == "partition":
        if not 0 <= a.id < a.num:
            raise _Usage(f"argument --id: {a.id} is not in 0..{a.num - 1} (--num {a.num})")
        try:
            out = data.write_partition(Path(a.out) / "partition.npz", a.id, a.num, a.alpha, a.seed)
        except (OSError, ValueError) as e:
            sys.stderr.write(f"l2-fl partition: {e}\n")
            return 1
        sys.stdout.write(f"{out}\n")
        return 0
    if a.cmd == "join":
        argv2 = _join_argv(a)
        if a.root_certificates:
            try:  # a certificate that does not name the address is caught here, not as gRPC retries
                note = tls.probe(a.superlink, Path(a.root_certificates))
            except tls.TlsError as e:
                sys.stderr.write(f"l2-fl join: {e}\n")
                return 1
            if note:
                sys.stderr.write(f"l2-fl join: {note}\n")
        env = flower_env(Path(os.environ.get("HOME", "/tmp")))
        env["HOME"] = os.environ.get("HOME", env["HOME"])  # a real participant keeps their own home
        if a.job:
            return _join_job(a, argv2, env)
        os.execve(argv2[0], argv2, env)  # Flower in its own process; never returns
    if a.cmd == "dev":
        try:
            cfg = {"num-rounds": a.rounds, "strategy": a.strategy, "compression": a.compression, "dp": a.dp,
                   "local-epochs": 5, **_settings(a.set)}
            server_app.run_settings({**cfg, "out-dir": "-", "min-nodes": a.nodes})  # refused before Flower starts
            out = dev(a.nodes, cfg, workdir=Path(a.out).resolve(), say=_say)
        except (LaunchError, ValueError, OSError) as e:
            sys.stderr.write(f"l2-fl dev: {e}\n")
            return 1
        sys.stdout.write(json.dumps({"out_dir": str(out)}) + "\n")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
