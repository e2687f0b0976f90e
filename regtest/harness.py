"""Local bitcoind regtest node for tests and tools, after Bitcoin Core's functional test harness.

:class:`BitcoindNode` starts ``bitcoind -regtest`` in a fresh datadir with free loopback ports
and isolation flags (no listening, no DNS seeds, no outbound connections), waits for readiness
by polling RPC (tolerating only warm-up -28 and connection refused while the cookie appears),
and stops it by RPC ``stop``, wait, then kill. Everything is written into the datadir
(``bitcoin.conf``, ``regtest/debug.log``, ``stdout.log``/``stderr.log``), so a kept datadir
explains a failed run, and ``bitcoin-cli -datadir=<datadir>`` works against it.

This module is test and operator tooling: it is not imported by the daemon.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional, Sequence

from bridge.rpc import BitcoinRPC, CookieAuth, RetryPolicy
from bridge.rpc_errors import RPCError, RPCInvalidParameter, RPCProtocolError, RPCWarmup, error_from_code

log = logging.getLogger(__name__)

ZMQ_TOPICS = ("hashblock", "rawblock", "rawtx", "sequence")

# Flags shared with regtest/start.sh: keep the two lists in step.
ISOLATION_FLAGS = (
    "listen=0",
    "dnsseed=0",
    "fixedseeds=0",
    "discover=0",
    "listenonion=0",
    "natpmp=0",
    "connect=0",
)
NODE_FLAGS = (
    "server=1",
    "rpcbind=127.0.0.1",
    "rpcallowip=127.0.0.1",
    "fallbackfee=0.0002",
    "txindex=1",
    "printtoconsole=0",
)


class BitcoindError(RuntimeError):
    """bitcoind failed to start, answer or stop."""


def find_bitcoind() -> Optional[str]:
    """The bitcoind to use: ``$BITCOIND`` if set (None unless it is an executable file), else PATH."""
    env = os.environ.get("BITCOIND")
    if env:
        p = Path(env)
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which("bitcoind")


def find_bitcoin_cli(bitcoind: Optional[str] = None) -> Optional[str]:
    """``$BITCOINCLI``, else bitcoin-cli next to ``bitcoind``, else PATH."""
    env = os.environ.get("BITCOINCLI")
    if env:
        return env
    if bitcoind:
        sibling = Path(bitcoind).with_name("bitcoin-cli")
        if sibling.is_file():
            return str(sibling)
    return shutil.which("bitcoin-cli")


def free_port_base(n: int) -> int:
    """A base port with n free consecutive ports from it on 127.0.0.1 (federation-init numbers members' ports so),
    below the ephemeral range (32768...): a restarted member binds its port again, which an outbound connection
    must not take meanwhile. The start depends on the process, so parallel runs rarely probe the same ports; a port
    found free here is only bound when the member starts."""
    start = 20000 + (os.getpid() * 389) % 12000
    for base in [*range(start, 32700 - n, 97), *range(20000, start, 97)]:
        socks: list[socket.socket] = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (all held open while choosing, so distinct)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class BitcoindNode:
    """One bitcoind regtest process in its own datadir.

    ``start()`` requires ``datadir`` to be absent or empty. Use :meth:`rpc` for an async
    :class:`BitcoinRPC` (cookie auth; the caller closes it) and :meth:`cli` for bitcoin-cli.
    """

    def __init__(
        self,
        datadir: Path,
        *,
        bitcoind: Optional[str] = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.datadir = Path(datadir)
        self.bitcoind = bitcoind or find_bitcoind()
        self.extra_args = tuple(extra_args)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.rpc_port = 0
        self.p2p_port = 0
        self.zmq_port = 0
        self._stdout: Optional[Any] = None
        self._stderr: Optional[Any] = None

    def __repr__(self) -> str:
        return f"BitcoindNode({str(self.datadir)!r}, rpc_port={self.rpc_port})"

    def __enter__(self) -> "BitcoindNode":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    find_bitcoind = staticmethod(find_bitcoind)

    # ---- paths and endpoints -------------------------------------------------------------------

    @property
    def chain_dir(self) -> Path:
        return self.datadir / "regtest"

    @property
    def cookie_path(self) -> Path:
        return self.chain_dir / ".cookie"

    @property
    def debug_log(self) -> Path:
        return self.chain_dir / "debug.log"

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.rpc_port}"

    @property
    def zmq_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.zmq_port}"

    @property
    def zmq_endpoints(self) -> dict[str, str]:
        """topic -> endpoint for every ZMQ topic this node publishes (all on one port)."""
        return {topic: self.zmq_endpoint for topic in ZMQ_TOPICS}

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start bitcoind and wait until RPC answers; BitcoindError (with debug.log tail) if not."""
        if self.bitcoind is None:
            raise BitcoindError("bitcoind not found (set $BITCOIND or put it on PATH)")
        if self.process is not None:
            raise BitcoindError("already started")
        if self.datadir.exists() and any(self.datadir.iterdir()):
            raise BitcoindError(f"datadir {self.datadir} is not empty; a fresh one is required")
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.rpc_port, self.p2p_port, self.zmq_port = free_ports(3)
        self._write_conf()
        self._stdout = open(self.datadir / "stdout.log", "wb")
        self._stderr = open(self.datadir / "stderr.log", "wb")
        cmd = [self.bitcoind, f"-datadir={self.datadir}", *self.extra_args]
        log.info("starting %s (rpc %d, zmq %d)", " ".join(cmd), self.rpc_port, self.zmq_port)
        self.process = subprocess.Popen(cmd, stdout=self._stdout, stderr=self._stderr, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(self.process, timeout)
        except BaseException:
            self._kill()
            raise

    def _write_conf(self) -> None:
        zmq = [f"zmqpub{t}={self.zmq_endpoint}" for t in ZMQ_TOPICS]
        lines = [
            "# written by regtest/harness.py",
            "regtest=1",
            "[regtest]",
            *ISOLATION_FLAGS,
            *NODE_FLAGS,
            f"rpcport={self.rpc_port}",
            f"port={self.p2p_port}",
            *zmq,
        ]
        (self.datadir / "bitcoin.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _wait_ready(self, proc: "subprocess.Popen[bytes]", timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        last: Optional[BaseException] = None
        while True:
            code = proc.poll()
            if code is not None:
                raise BitcoindError(f"bitcoind exited with code {code} during start-up\n{self.log_tail()}")
            if self.cookie_path.exists():
                try:
                    self.call_sync("getblockchaininfo", timeout=5.0)
                    log.info("bitcoind ready after %.2fs", time.monotonic() - started)
                    return
                except (ConnectionRefusedError, RPCWarmup) as e:
                    last = e  # tolerated while bitcoind starts: not listening yet / warming up
                except FileNotFoundError as e:
                    last = e  # cookie removed again: bitcoind is exiting; the next poll sees it
            if time.monotonic() > deadline:
                raise BitcoindError(f"bitcoind not ready after {timeout}s (last: {last!r})\n{self.log_tail()}")
            time.sleep(0.05)  # poll interval of the readiness check

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """RPC ``stop``, wait up to ``timeout``, then kill. Returns the exit code (None if never started)."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                self.call_sync("stop", timeout=10.0)
            except (OSError, RPCError) as e:
                log.warning("RPC stop failed (%s); waiting, then killing", e)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.error("bitcoind did not exit within %ss; killing it\n%s", timeout, self.log_tail())
                self._kill()
        code = proc.wait()
        self._close_logs()
        log.info("bitcoind exited with code %s", code)
        return code

    def _kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._close_logs()

    def _close_logs(self) -> None:
        for f in (self._stdout, self._stderr):
            if f is not None:
                f.close()
        self._stdout = self._stderr = None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of debug.log and stderr, for error messages."""
        parts = []
        for path in (self.debug_log, self.datadir / "stderr.log"):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no debug.log or stderr output)"

    # ---- talking to it -------------------------------------------------------------------------

    def rpc(self, wallet: Optional[str] = None, *, timeout: float = 30.0, retry: Optional[RetryPolicy] = None,
            max_concurrency: int = 8) -> BitcoinRPC:
        """An async client with cookie auth (create it inside the event loop; close it after)."""
        return BitcoinRPC(
            self.rpc_url,
            CookieAuth(self.cookie_path),
            timeout=timeout,
            retry=retry or RetryPolicy(max_attempts=3, base_delay=0.05, max_delay=0.5),
            max_concurrency=max_concurrency,
            wallet=wallet,
        )

    def call_sync(self, method: str, params: Sequence[Any] = (), *, timeout: float = 30.0) -> Any:
        """Blocking JSON-RPC call (start-up and teardown run outside any event loop).

        Raises ConnectionRefusedError while bitcoind is not listening, else typed RPCErrors.
        """
        user, _, password = self.cookie_path.read_text(encoding="utf-8").strip().partition(":")
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
        req = urllib.request.Request(self.rpc_url, data=body, method="POST")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            if e.code in (401, 403):
                raise RPCProtocolError(f"HTTP {e.code} from bitcoind", method=method) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                raise e.reason from None
            raise
        try:
            doc = json.loads(raw, parse_float=Decimal)
        except ValueError:
            raise RPCProtocolError(f"reply is not JSON: {raw[:200]!r}", method=method) from None
        err = doc.get("error")
        if err is not None:
            raise error_from_code(int(err["code"]), str(err.get("message", "")), method)
        return doc["result"]

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """Run bitcoin-cli against this node (for debugging); returns stdout, raises on failure."""
        cli = find_bitcoin_cli(self.bitcoind)
        if cli is None:
            raise BitcoindError("bitcoin-cli not found (set $BITCOINCLI or put it on PATH)")
        res = subprocess.run(
            [cli, f"-datadir={self.datadir}", *args], capture_output=True, text=True, timeout=timeout
        )
        if res.returncode != 0:
            raise BitcoindError(f"bitcoin-cli {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.strip()


async def fund_wallet(rpc: BitcoinRPC, wallet: str = "federation", blocks: int = 101) -> tuple[BitcoinRPC, str]:
    """Create ``wallet`` and mine ``blocks`` to a new address in it (101 makes one coinbase spendable).

    Returns a client view on the wallet (sharing ``rpc``'s session) and the mining address.
    """
    await rpc.createwallet(wallet)
    w = rpc.for_wallet(wallet)
    address = await w.getnewaddress("mining")
    await rpc.generatetoaddress(blocks, address)
    return w, address


async def scan_sat(rpc: BitcoinRPC, descriptors: list[str]) -> int:
    """scantxoutset's total over descriptors, in satoshis. bitcoind runs one scan at a time (a daemon's anchor service
    scans for its coins too), so a scan that finds another in progress is asked again."""
    for _ in range(300):
        try:
            scan = await rpc.call("scantxoutset", ["start", descriptors])
            return round(scan["total_amount"] * 100_000_000)
        except RPCInvalidParameter as e:
            if "Scan already in progress" not in str(e):
                raise
            await asyncio.sleep(0.1)
    raise BitcoindError("scantxoutset stayed busy for 30 s")
