"""`l2-worker`: a compute worker agent. It registers on the L2 with a stake (a signed transaction), sends
heartbeats, answers latency probes, polls its assignments over REST, runs real torch inference with the digits
model (CUDA when present) and returns each output with its fingerprint as a signed TaskResult transaction.

    l2-worker --node http://127.0.0.1:8650 --key-file worker.key --stake 100000 --price 10 --region eu
    l2-worker exit --node http://127.0.0.1:8650 --key-file worker.key       # leave: no new tasks
    l2-worker withdraw --node http://127.0.0.1:8650 --key-file worker.key   # the stake back, after the exit delay

SIGINT/SIGTERM stop the agent; the worker stays registered ACTIVE (a restart resumes it; an exit cannot be undone),
and the agent logs how to exit and withdraw. With --exit-on-stop it posts its exit before it stops (decommissioning).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from aiohttp import web

from l2d.aio import wait_event
from l2d.client import ApiError, AsyncClient, Unreachable
from l2d.core.params import network_by_name
from l2d.core.payload import Payload
from l2d.core.tx import public_key
from l2d.core.work_tx import TaskResult, WorkerCaps, WorkerExit, WorkerHeartbeat, WorkerRegister
from l2d.keys import KeyFileError, load_or_create_secret
from l2d.leave import COMMANDS, WORKER, find, stop_note
from l2d.leave import main as leave_main
from l2d.logs import setup_logging

log = logging.getLogger("orchestration.agent")


class AgentError(Exception):
    """The agent cannot go on (node unreachable for too long, registration refused, bad key file)."""


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.node = args.node.rstrip("/")
        try:
            self.secret = load_or_create_secret(Path(args.key_file), "worker")
        except KeyFileError as e:
            raise AgentError(str(e)) from None
        self.pubkey = public_key(self.secret)
        self.network = network_by_name(args.network)
        self.model: Any = None
        self.done: set[tuple[str, str]] = set()
        self._tx_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self.api = AsyncClient(self.node)

    # -- node access ---------------------------------------------------------------------------------------------
    async def send(self, payload: Payload) -> Optional[str]:
        """Sign payload with the next nonce, submit it and wait until it is committed (or dropped).

        Returns None when committed, else the reason it was refused or dropped. One at a time (one nonce line).
        """
        async with self._tx_lock:
            try:
                return await self._send(payload)
            except Unreachable as e:  # the text of the underlying error, as before the shared client
                return f"node unreachable: {e.error!r}"
            except ValueError as e:
                return f"node unreachable: {e!r}"

    async def _send(self, payload: Payload) -> Optional[str]:
        try:
            res = await self.api.sign_and_submit(self.secret, payload, self.args.fee, network=self.network)
        except Unreachable:
            raise
        except ApiError as e:  # refused at admission
            return f"{e.code}: {e.message}"
        st = await self.api.wait_tx(res["txid"], self.args.commit_timeout)
        if st is None:
            return "not committed in time"
        return None if st["status"] == "committed" else str(st.get("reason"))

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def register(self, endpoint: str) -> None:
        try:
            await self.api.assignments(self.pubkey.hex())
        except Unreachable:
            raise
        except ApiError:
            pass  # not registered (404): register now
        else:
            log.warning("already registered: the capabilities and endpoint registered first stay in force",
                        extra={"worker": self.pubkey.hex()})
            return
        a = self.args
        caps = WorkerCaps(device=1 if _cuda() else 0, accel_mem_mb=_accel_mem_mb(), price_sat=a.price,
                          green_ppm=a.green_ppm, carbon_g_per_kwh=a.carbon, capacity=a.capacity,
                          region=a.region.encode(), models=tuple(sorted({m.encode() for m in a.models})),
                          endpoint=endpoint.encode())
        err = await self.send(WorkerRegister(a.stake, caps))
        if err is not None:
            raise AgentError(f"registration refused: {err}")
        log.info("registered", extra={"worker": self.pubkey.hex(), "endpoint": endpoint, "stake_sat": a.stake})

    async def heartbeats(self) -> None:
        while not self._stop.is_set():
            err = await self.send(WorkerHeartbeat())
            if err is not None:
                log.warning("heartbeat not committed: %s", err)
            await wait_event(self._stop, self.args.heartbeat_ms / 1000)

    async def work(self) -> None:
        from orchestration import model as M  # torch: imported by the running agent, not at start-up

        while not self._stop.is_set():
            body: dict[str, Any] = {}
            try:
                body = await self.api.assignments(self.pubkey.hex())
            except Unreachable as e:  # logged with the underlying error, as before the shared client
                log.warning("poll failed: %r", e.error)
            except ApiError:
                pass  # not registered: nothing assigned
            except ValueError as e:
                log.warning("poll failed: %r", e)
            for a in body.get("assignments", []):
                key = (a["task_id"], a["role"])
                if key in self.done or a["model"] not in self.args.models:
                    continue
                self.done.add(key)
                log.info("task fetched", extra={"task": a["task_id"], "role": a["role"]})
                t0 = time.perf_counter()
                lg = await asyncio.to_thread(M.logits, self.model, bytes.fromhex(a["input"]))
                if self.args.cheat:
                    lg = M.cheat(lg)
                out, fp = M.fingerprint(lg)
                infer_ms = (time.perf_counter() - t0) * 1000
                if self.args.work_ms:
                    await asyncio.sleep(self.args.work_ms / 1000)
                err = await self.send(TaskResult(bytes.fromhex(a["task_id"]), out, fp))
                log.info("result submitted" if err is None else "result refused",
                         extra={"task": a["task_id"], "role": a["role"], "output": list(out),
                                "infer_ms": round(infer_ms, 3), "error": err})
            await wait_event(self._stop, self.args.poll_ms / 1000)

    async def run(self) -> int:
        import torch  # imported here, not at start-up (a bad key file or --help never loads torch)

        from orchestration import model as M  # torch, likewise

        torch.set_num_threads(1)  # one core per agent; results are deterministic and the host stays usable
        self.model = M.load_or_train(Path(self.args.model_cache) if self.args.model_cache else None)
        app = web.Application()

        async def ping(request: web.Request) -> web.Response:
            return web.json_response({"worker": self.pubkey.hex()})

        app.router.add_get("/ping", ping)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.args.listen, 0)
        await site.start()
        port = runner.addresses[0][1]
        loop = asyncio.get_running_loop()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, self._stop.set)
        try:
            async with self.api:
                try:
                    await self.register(f"{self.args.listen}:{port}")
                except Unreachable as e:
                    raise AgentError(f"cannot reach the node at {self.node}: {e.reason}") from None
                log.info("worker ready", extra={"worker": self.pubkey.hex(), "port": port})
                await asyncio.gather(self.heartbeats(), self.work())
                await self.stopping()
        finally:
            await runner.cleanup()
        return 0

    async def stopping(self) -> None:
        """On SIGINT/SIGTERM: post the exit with --exit-on-stop; in any case say where the stake stands and how to
        leave (a worker that only stops stays ACTIVE with its stake locked, by design: a restart resumes it)."""
        if self.args.exit_on_stop:
            err = await self.send(WorkerExit())
            if err is not None:
                log.error("--exit-on-stop: exit not committed: %s", err, extra={"worker": self.pubkey.hex()})
        try:
            rec = find(WORKER, await self.api.get(WORKER.listing), self.pubkey.hex())
        except (ApiError, ValueError) as e:
            log.warning("stopped; could not read the worker's record (%s). To leave: l2-worker exit --node %s "
                        "--key-file %s, then l2-worker withdraw (same arguments) after the exit delay", e, self.node,
                        self.args.key_file, extra={"worker": self.pubkey.hex()})
            return
        note = stop_note(WORKER, self.node, self.args.key_file, rec)
        (log.warning if rec is not None and rec["status"] == "ACTIVE" else log.info)(
            "stopped: %s", note, extra={"worker": self.pubkey.hex(), "status": None if rec is None else rec["status"]})


def _cuda() -> bool:
    import torch  # loaded by run() already; kept off start-up

    return bool(torch.cuda.is_available())


def _accel_mem_mb() -> int:
    import torch  # loaded by run() already; kept off start-up

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.get_device_properties(0).total_memory // (1 << 20))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in COMMANDS:  # `l2-worker exit|withdraw ...`: leave the registry (l2d/leave.py)
        return leave_main(WORKER, argv, "http://127.0.0.1:8650")
    ap = argparse.ArgumentParser(prog="l2-worker", description=__doc__.split("\n\n")[0],
                                 epilog="Leaving: `l2-worker exit --node URL --key-file K` (no new tasks), then after "
                                        "the exit delay `l2-worker withdraw --node URL --key-file K` (the stake back); "
                                        "`l2-worker exit --help`.")
    ap.add_argument("--node", required=True, help="l2d REST base URL, e.g. http://127.0.0.1:8650")
    ap.add_argument("--key-file", required=True, help="the worker's secret key (hex); created if missing")
    ap.add_argument("--network", default="local", help="network the transactions are signed for")
    ap.add_argument("--stake", type=int, default=100_000, help="stake locked at registration (sat)")
    ap.add_argument("--price", type=int, default=10, help="price per task unit (sat)")
    ap.add_argument("--region", default="eu")
    ap.add_argument("--models", nargs="+", default=["digits-mlp"])
    ap.add_argument("--capacity", type=int, default=2)
    ap.add_argument("--green-ppm", type=int, default=0, help="green-energy share in ppm")
    ap.add_argument("--carbon", type=int, default=400, help="carbon intensity g/kWh")
    ap.add_argument("--fee", type=int, default=1, help="fee per transaction (sat)")
    ap.add_argument("--listen", default="127.0.0.1", help="address of the probe endpoint")
    ap.add_argument("--heartbeat-ms", type=int, default=5000)
    ap.add_argument("--poll-ms", type=int, default=500)
    ap.add_argument("--commit-timeout", type=float, default=30.0)
    ap.add_argument("--model-cache", default="", help="file for the trained weights (trained once, then loaded)")
    ap.add_argument("--work-ms", type=int, default=0, help="extra time each task takes (a heavier job)")
    ap.add_argument("--exit-on-stop", action="store_true",
                    help="on SIGINT/SIGTERM, post the worker's exit before stopping (to decommission it; without it "
                         "the worker stays ACTIVE and a restart resumes it)")
    ap.add_argument("--cheat", action="store_true", help="TEST ONLY: return altered outputs")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return asyncio.run(Agent(args).run())
    except AgentError as e:
        log.error("l2-worker: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
