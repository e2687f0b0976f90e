"""Read-only API processes (`[api] read_workers`, `[api] read_port`): GET /api/l2/accounts/{id} (balance, nonce and
proof, the same body as the main API's) and GET /health, served by processes of their own that open the ledger's
LMDB read-only.

Every read is one LMDB read transaction over the committed tip: its header, its records and its tree nodes are
written together by the transaction that stores a block (docs/state-tree.md, "Stored tree"), so a process that did
not build the block reads it as well as the daemon does, and never waits for the daemon's event loop or its GIL
(admission and block execution there cannot delay these reads). The workers share one port (SO_REUSEPORT: the
kernel spreads connections over them) and exit when the daemon that started them is gone.

    python -m l2d.readapi --ledger DIR --network NAME --host H --port P --parent PID
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from aiohttp import web

from .api.deps import METRICS
from .api.http import error_middleware, hex32
from .api.ledger import account_json
from .core.params import network_by_name
from .metrics import Metrics
from .sigpool import exit_with
from .store import Store
from .views import committed_account

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


def make_app(store: Store) -> web.Application:
    async def account(request: web.Request) -> web.Response:
        pubkey = hex32(request.match_info["id"], "account id")
        return web.json_response(account_json(pubkey, committed_account(store, store.network, pubkey)))

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[error_middleware])
    app[METRICS] = Metrics()  # the error middleware counts requests (this process's own, not exported)
    app.router.add_get("/api/l2/accounts/{id}", account)
    app.router.add_get("/health", health)
    return app


class ReadWorkers:
    """The read-only API processes of a daemon."""

    def __init__(self, ledger_dir: Path, network: str, host: str, port: int, workers: int) -> None:
        self.args = ["--ledger", str(ledger_dir), "--network", network, "--host", host, "--port", str(port),
                     "--parent", str(os.getpid())]
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-m", "l2d.readapi", *self.args]) for _ in range(self.workers)]

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="l2d-readapi", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ledger", required=True, type=Path, help="the daemon's ledger LMDB directory")
    ap.add_argument("--network", required=True, help="the daemon's network")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", required=True, type=int)
    ap.add_argument("--parent", type=int, help="exit when this process (the daemon) is gone")
    a = ap.parse_args(argv)
    if a.parent:
        exit_with(a.parent)
    store = Store(a.ledger, network_by_name(a.network), readonly=True)
    web.run_app(make_app(store), host=a.host, port=a.port, reuse_port=True, print=None, access_log=None,
                handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
