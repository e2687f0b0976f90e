"""The federation's NetFlow probing duty: measured, not self-reported, relay capacity (docs/netflow.md, "Weights").

Run by a member's daemon when `[netflow] probe = true`. Every probe_interval_ms it downloads probe_bytes through
each ACTIVE relay from a sink of its own (a TCP server that sends probe_bytes to whoever connects): an exit directly,
any other relay as the first hop of a 2-hop circuit to the exit weighing most among those of another operator
(sbws's pairing with a fast exit). It pays like any client, from sessions it opens with its member key, so a relay
cannot tell a probe from a user. It keeps each relay's last PROBES_KEPT results and posts one RelayWeights
transaction per round: the median throughput of the successful probes and the share that succeeded. That is this
member's vote; the state derives the weight from all current members' votes (low medians, then min(measured,
advertised, cap) x success). It probes every ACTIVE relay, silent ones too: a dead relay's failed probes weigh it 0,
and one that comes back is measured again.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import statistics
import time
from typing import Any, Callable, Optional

from coincurve import PrivateKey

from l2d.config import NetflowConfig
from l2d.core.errors import L2Error
from l2d.core.params import Network
from l2d.core.relay import RelayRecord, RelayStatus
from l2d.core.relay_tx import FLAG_EXIT, MAX_WEIGHTS, PPM, Measurement, RelayWeights
from l2d.core.session_tx import SessionOpen, quote_sat
from l2d.core.state import Namespace

from .client import MIB, Circuit, HopFailed, Paid, RelayInfo
from .wire import Cmd, WireError

log = logging.getLogger(__name__)

PROBES_KEPT = 5
SESSION_BLOCKS = 100_000


def _info(identity: bytes, r: RelayRecord) -> RelayInfo:
    return RelayInfo(identity, r.x25519_key, r.operator, r.flags, r.endpoint.decode(), r.price_msat_per_mib,
                     r.weight)


class Prober:
    def __init__(self, cfg: NetflowConfig, *, network: Network,
                 read_prefix: Callable[[bytes], list[tuple[bytes, bytes]]], tip_height: Callable[[], int],
                 submit: Callable[..., bytes],
                 tx_status: Callable[[bytes], Optional[dict[str, Any]]], min_fee_sat: int) -> None:
        self.cfg, self.network = cfg, network
        self._read, self._tip, self._submit, self._status = read_prefix, tip_height, submit, tx_status
        self.min_fee = max(1, min_fee_sat)
        self.history: dict[bytes, collections.deque[Optional[int]]] = {}  # relay -> last KiB/s (None: failed)
        self.probed: dict[bytes, int] = {}  # relay -> the round it was last probed in
        self.rounds = 0
        self.sessions: dict[bytes, Paid] = {}
        self._payload = os.urandom(cfg.probe_bytes)
        self._sink: Optional[asyncio.AbstractServer] = None
        self.sink_endpoint = ""

    async def start_sink(self) -> None:
        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                w.write(self._payload)
                await w.drain()
            w.close()
        self._sink = await asyncio.start_server(sink, self.cfg.sink_host, 0)
        host, port = self._sink.sockets[0].getsockname()[:2]
        self.sink_endpoint = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def run(self) -> None:
        await self.start_sink()
        try:
            while True:
                try:
                    await self.round()
                except Exception:  # a round that fails is logged; the next one starts afresh
                    log.exception("netflow probe round failed")
                await asyncio.sleep(self.cfg.probe_interval_ms / 1000)
        finally:
            if self._sink is not None:
                self._sink.close()

    def relays(self) -> list[RelayInfo]:
        out = []
        for k, v in self._read(bytes((Namespace.RELAY,))):
            r = RelayRecord.decode(bytes(v))
            if r.status == RelayStatus.ACTIVE:
                out.append(_info(bytes(k[1:]), r))
        return out

    async def round(self) -> None:
        relays = self.relays()
        epoch = self._tip()
        batch = to_probe(relays, self.probed, MAX_WEIGHTS)
        for r in batch:
            kib_s = await self.probe(r, relays)
            self.history.setdefault(r.identity, collections.deque(maxlen=PROBES_KEPT)).append(kib_s)
            self.probed[r.identity] = self.rounds
        self.rounds += 1
        ms = []
        for r in sorted(batch, key=lambda x: x.identity):
            h = self.history[r.identity]
            ok = [x for x in h if x is not None]
            ms.append(Measurement(r.identity, int(statistics.median(ok)) if ok else 0, len(ok) * PPM // len(h)))
        if ms and epoch > 0:
            try:
                self._submit(RelayWeights(epoch, tuple(ms)))
                log.info("relay weights posted", extra={"epoch": epoch, "relays": len(ms)})
            except L2Error as e:
                log.warning("relay weights not admitted: %s", e)

    async def probe(self, r: RelayInfo, relays: list[RelayInfo]) -> Optional[int]:
        """KiB/s of a download of probe_bytes through r (None if it failed)."""
        path = [r]
        if not r.flags & FLAG_EXIT:
            exits = sorted((x for x in relays if x.flags & FLAG_EXIT and x.operator != r.operator),
                           key=lambda x: (-x.weight, x.identity))
            if not exits:
                return None
            path.append(exits[0])
        try:
            paid = [await self.session(x) for x in path]
            return await asyncio.wait_for(self.download(paid), self.cfg.probe_timeout_ms / 1000)
        except (OSError, WireError, HopFailed, L2Error, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            log.info("probe of relay %s failed: %s", r.endpoint, e)
            return None

    async def session(self, r: RelayInfo) -> Paid:
        """A session with r that still covers a probe (a new one when the last is spent)."""
        p = self.sessions.get(r.identity)
        need = quote_sat(p.units + 2 * self.cfg.probe_bytes, r.price_msat_per_mib, MIB) if p else 0
        if p is not None and need <= p.deposit_sat:
            return p
        secret = os.urandom(32)
        deposit = max(self.cfg.probe_deposit_sat, 4 * quote_sat(self.cfg.probe_bytes, r.price_msat_per_mib, MIB))
        txid = self._submit(SessionOpen(r.identity, PrivateKey(secret).public_key_xonly.format(), deposit,
                                        r.price_msat_per_mib, MIB, self._tip() + SESSION_BLOCKS), self.min_fee)
        deadline = time.monotonic() + 60
        while (self._status(txid) or {}).get("status") != "committed":
            if time.monotonic() > deadline:
                raise WireError(f"the probe session with {r.endpoint} was not committed")
            await asyncio.sleep(0.05)
        p = self.sessions[r.identity] = Paid(r, txid, secret, deposit)
        return p

    async def download(self, paid: list[Paid]) -> int:
        c = Circuit(self.network, paid)
        try:
            await c.build()
            exit_hop = len(paid) - 1
            await c.send(exit_hop, Cmd.CONNECT, self.sink_endpoint.encode())
            if await c.recv() != (exit_hop, Cmd.CONNECTED, b"\x00"):
                raise WireError("the exit did not reach the sink")
            t, got = time.perf_counter(), 0
            while got < self.cfg.probe_bytes:
                hop, cmd, data = await c.recv()
                if cmd != Cmd.DATA:
                    break
                got += len(data)
                await c.pay()
            elapsed = time.perf_counter() - t
            await c.pay(force=True)
            if got < self.cfg.probe_bytes:
                raise WireError(f"{got} of {self.cfg.probe_bytes} probe bytes")
            return max(1, int(got / 1024 / max(elapsed, 1e-6)))
        finally:
            c.close()


def to_probe(relays: list[RelayInfo], probed: dict[bytes, int], limit: int) -> list[RelayInfo]:
    """The `limit` relays (one RelayWeights transaction's worth) probed longest ago, never-probed ones first (then
    by identity): with more relays than that, successive rounds go round all of them."""
    return sorted(relays, key=lambda r: (probed.get(r.identity, -1), r.identity))[:limit]
