"""Launcher: one SuperLink and N SuperNodes, each in its own process; on free loopback ports by default (the dev
federation), or bound to an operator's address with the operator's TLS (``l2-fl coordinate --bind``).

Everything lives under one work dir (HOME and FLWR_HOME point there, telemetry is off), so
the user's ~/.flwr is never touched. ``Federation`` is used by tests, the benchmark and
``l2-fl dev``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from federated import data
from federated.recorder import JsonlRecorder, RoundCommitment
from federated.tls import ServerTls, dial_host, hostport

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent
CONNECTION = "l2dev"


class LaunchError(RuntimeError):
    """A Flower process did not start, or a run did not finish."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HOME": str(home), "FLWR_HOME": str(home / ".flwr"), "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
        # Flower's subprocesses run torch; one thread each keeps a 2-core box responsive.
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    })
    return env


def generate_node_key(private_path: Path) -> Path:
    """An EC P-384 key pair in OpenSSH format (what Flower's node auth wants); returns the .pub path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    os.chmod(private_path, 0o600)
    pub = private_path.with_suffix(private_path.suffix + ".pub")
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return pub


def generate_tls(dirpath: Path, names: Sequence[str] = ("localhost", "127.0.0.1"),
                 ca_name: str = "l2fl dev CA") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signs whose subjectAltName holds names (IP literals or DNS
    names; by default 127.0.0.1/localhost): (ca, cert, key) PEM paths in dirpath."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def san(n: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(n))
        except ValueError:
            return x509.DNSName(n)

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (x509.CertificateBuilder().subject_name(ca_subject).issuer_name(ca_subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([san(n) for n in names]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    dirpath.mkdir(parents=True, exist_ok=True)
    paths = (dirpath / "ca.crt", dirpath / "server.pem", dirpath / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    os.chmod(paths[2], 0o600)
    return paths


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class Federation:
    """A SuperLink plus SuperNodes. Use as a context manager.

    host: the address the SuperLink binds (its Fleet, Control and Runtime APIs share one port); port 0 picks a
    free one. tls: the operator's certificate, key and CA; without it an auth federation makes a throwaway CA for
    127.0.0.1 and a plain one runs without TLS (loopback only)."""

    workdir: Path | None = None
    auth: bool = False
    procs: list[Proc] = field(default_factory=list)
    port: int = 0
    ca: Path | None = None
    host: str = "127.0.0.1"
    tls: ServerTls | None = None

    def __post_init__(self) -> None:
        self._tmp = None
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="l2fl-")
            self.workdir = Path(self._tmp.name)
        self.workdir = Path(self.workdir)
        self.home = self.workdir / "home"
        (self.home / ".flwr").mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home)

    # -- processes ---------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> Proc:
        assert self.workdir is not None
        logp = self.workdir / f"{name}.log"
        f = open(logp, "wb")
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                             cwd=str(self.workdir), start_new_session=True)
        f.close()
        proc = Proc(name, p, logp)
        self.procs.append(proc)
        return proc

    @property
    def local_address(self) -> str:
        """HOST:PORT that clients on this machine dial (flwr, the SuperNodes of a dev federation)."""
        return hostport(dial_host(self.host), self.port)

    def start_superlink(self) -> None:
        self.port = self.port or free_port(self.host)
        argv = [str(BIN / "flower-superlink"), "--host", self.host, "--port", str(self.port)]
        if self.tls is not None:
            self.ca, cert, key = self.tls.ca, self.tls.cert, self.tls.key
        elif self.auth:
            # Flower refuses node authentication without TLS: use a throwaway dev CA.
            assert self.workdir is not None
            self.ca, cert, key = generate_tls(self.workdir / "tls")
        if self.ca is not None:
            argv += ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        self._spawn("superlink", argv)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self._check_alive("superlink")
            try:
                with socket.create_connection((dial_host(self.host), self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            raise LaunchError("SuperLink did not open its port")
        (self.home / ".flwr" / "config.toml").write_text(
            f'[superlink.{CONNECTION}]\naddress = "{self.local_address}"\n'
            + (f'root-certificates = "{self.ca}"\n' if self.ca else "insecure = true\n"))

    def add_supernode(self, node_config: dict[str, Any], key: Path | None = None, name: str | None = None) -> Proc:
        name = name or f"supernode-{len([p for p in self.procs if p.name.startswith('supernode')])}"
        nc = " ".join(f"{k}={_toml_value(v)}" for k, v in node_config.items())
        tls = ["--root-certificates", str(self.ca)] if self.ca else ["--insecure"]
        argv = [str(BIN / "flower-supernode"), *tls, "--superlink", self.local_address,
                "--port", str(free_port()), "--node-config", nc, "--max-retries", "3", "--max-wait-time", "20"]
        if key is not None:
            argv += ["--auth-supernode-private-key", str(key)]
        return self._spawn(name, argv)

    def register(self, public_key: Path) -> int:
        """Allow a SuperNode's key (federated/l2.py feeds this from the L2 registrations); returns the Flower
        node id the SuperLink gives that key."""
        r = self.flwr(["supernode", "register", str(public_key), CONNECTION], timeout=60)
        out = r.stdout.decode(errors="replace")
        m = re.search(r"SuperNode (\d+) registered", out)
        if r.returncode != 0 or m is None:
            raise LaunchError(f"register failed: {out[-2000:]}")
        return int(m.group(1))

    def register_allow_list(self, allow_list: Path) -> int:
        """Register every OpenSSH public key line of an allow-list file; returns the count."""
        n = 0
        assert self.workdir is not None
        for i, line in enumerate(allow_list.read_text().splitlines()):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = self.workdir / f"allow-{i}.pub"
            p.write_text(line + "\n")
            self.register(p)
            n += 1
        return n

    def _check_alive(self, name: str) -> None:
        for p in self.procs:
            if p.name == name and p.popen.poll() is not None:
                raise LaunchError(f"{name} exited with {p.popen.returncode}: {p.log_path.read_text()[-3000:]}")

    def flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=str(self.workdir),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)

    # -- runs --------------------------------------------------------------------
    def run(self, run_config: dict[str, Any], timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        """Submit a run of the project's app and stream it to completion."""
        assert self.workdir is not None
        cfg = self.workdir / f"run-{time.monotonic_ns()}.toml"
        cfg.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        r = self.flwr(["run", str(APP_DIR), CONNECTION, "--run-config", str(cfg), "--stream"], timeout=timeout)
        (self.workdir / "last-run.log").write_bytes(r.stdout)
        if r.returncode != 0:
            raise LaunchError(f"flwr run failed ({r.returncode}): {r.stdout.decode()[-3000:]}")
        return r

    def submit_run(self, run_config: dict[str, Any], timeout: float = 120) -> int:
        """Submit a run without streaming it (the caller watches its effects, e.g. on the L2); returns the run id."""
        assert self.workdir is not None
        cfg = self.workdir / f"run-{time.monotonic_ns()}.toml"
        cfg.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        r = self.flwr(["run", str(APP_DIR), CONNECTION, "--run-config", str(cfg)], timeout=timeout)
        out = r.stdout.decode(errors="replace")
        m = re.search(r"run (\d+)", out, re.IGNORECASE)
        if r.returncode != 0 or m is None:
            raise LaunchError(f"flwr run failed ({r.returncode}): {out[-3000:]}")
        return int(m.group(1))

    def run_status(self, run_id: int) -> str:
        """Flower's status of a run ("pending", "starting", "running", "finished:completed|failed|stopped")."""
        r = self.flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60)
        out = r.stdout.decode(errors="replace")
        m = re.search(r'"status":\s*"([^"]*)"', out)
        if r.returncode != 0 or m is None:
            raise LaunchError(f"flwr ls failed ({r.returncode}): {out[-2000:]}")
        return m.group(1)

    def kill(self, name: str) -> None:
        """SIGKILL a process and its process group (for the SuperLink: its ServerApp too), as a crash would."""
        for p in self.procs:
            if p.name == name and p.popen.poll() is None:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(timeout=30)

    # -- lifecycle ---------------------------------------------------------------
    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                try:
                    os.killpg(p.popen.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.popen.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.popen.wait(timeout=10)
            # The process group may hold Flower's app subprocesses; make sure they are gone.
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.procs.clear()

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Federation":
        self.start_superlink()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def dev(num_nodes: int, run_config: dict[str, Any], node_configs: list[dict[str, Any]] | None = None,
        workdir: Path | None = None, say: Callable[[str], None] | None = None) -> Path:
    """Start a federation, run one job, stop everything; returns the job's out-dir. say (if given) hears each step:
    the SuperLink, each SuperNode, the run, each round as it is committed."""
    tell = say or (lambda _m: None)
    fed = Federation(workdir=workdir)
    tell(f"starting the SuperLink (work dir {fed.workdir})")
    with fed:
        assert fed.workdir is not None
        tell(f"SuperLink listening on 127.0.0.1:{fed.port}")
        for i in range(num_nodes):
            part = data.write_partition(fed.workdir / f"data-{i}.npz", i, num_nodes)
            nc = {"partition-id": i, "num-partitions": num_nodes, "data-path": str(part)}
            if node_configs and i < len(node_configs):
                nc.update(node_configs[i])
            proc = fed.add_supernode(nc)
            tell(f"started SuperNode {i + 1}/{num_nodes} (partition {i}, log {proc.log_path})")
        out = Path(run_config.get("out-dir") or (fed.workdir / "job"))  # kept only if workdir is given
        cfg = dict(run_config, **{"out-dir": str(out), "min-nodes": num_nodes})
        rounds = cfg.get("num-rounds", "?")
        tell(f"running the job: {rounds} rounds of {num_nodes} nodes (rounds are committed to {out / 'rounds.jsonl'})")
        if say is None:
            fed.run(cfg)
        else:
            watch = RoundWatcher(out / "rounds.jsonl", rounds, say)
            stop = threading.Event()
            t = threading.Thread(target=watch.follow, args=(stop,), name="l2fl-dev-rounds", daemon=True)
            t.start()
            try:
                fed.run(cfg)
            finally:
                stop.set()
                t.join()
            watch.report()  # whatever the last poll missed
        tell("job finished; stopping the SuperNodes and the SuperLink")
        return out


class RoundWatcher:
    """Reports the rounds appended to a rounds.jsonl (federated/recorder.py) since it was made, one line each."""

    def __init__(self, path: Path, num_rounds: Any, say: Callable[[str], None]) -> None:
        self.path, self.num_rounds, self.say = path, num_rounds, say
        self.seen = len(self._rounds())  # rounds of an earlier run in the same --out are not news

    def _rounds(self) -> list[RoundCommitment]:
        return JsonlRecorder(self.path).all()

    def report(self) -> None:
        rounds = self._rounds()
        for c in rounds[self.seen:]:
            ok = sum(p.accepted for p in c.participants)
            acc = c.metrics.get("accuracy")
            self.say(f"round {c.round}/{self.num_rounds} committed: "
                     + (f"accuracy {acc:.4f}, " if acc is not None else "")
                     + f"{ok}/{len(c.participants)} participants accepted, params {c.params_hash[:16]}")
        self.seen = max(self.seen, len(rounds))

    def follow(self, stop: threading.Event, poll: float = 0.5) -> None:
        """report() every poll seconds until stop is set."""
        while not stop.wait(poll):
            self.report()
