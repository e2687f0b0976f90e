"""Helpers for the tests of a federation of real l2d processes on loopback: the `Federation` (written by
`l2-cli federation-init`, members started and killed as processes), a TCP proxy between members that injects
network faults, and the invariant check run across every member's database afterwards."""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from coincurve import PrivateKey

from l2d.core.block import Block, BlockHeader
from l2d.core.coin_tx import Transfer
from l2d.core.commit import Commit
from l2d.core.errors import L2Error
from l2d.core.genesis_file import load_genesis_file
from l2d.core.params import LOCAL, Network
from l2d.core.tx import Transaction, sign
from l2d.federation.messages import HEAD_SIZE
from l2d.federation.signer import SIGNER_FILE, SignerState, load_state
from l2d.federation.transport import BLOCKS_PATH, WS_PATH
from l2d.federation.wire import FRAME_MESSAGE
from l2d.store import Store
from regtest.harness import free_port_base
from tests.conftest import REPO, L2dProcess

DEMO1 = hashlib.sha256(b"l2d demo account 1").digest()
DEMO2 = PrivateKey(hashlib.sha256(b"l2d demo account 2").digest()).public_key_xonly.format()


def transfer(nonce: int) -> Transaction:
    return sign(LOCAL, DEMO1, nonce, 1, Transfer(DEMO2, 1000), bytes(32))


# -- the federation's processes ---------------------------------------------------------------------------------

class Federation:
    """n members written by `l2-cli federation-init` into root; member k (0-based) is `member-{k+1}`. With a
    ProxyNet, every member reaches every other member through that link's proxy (its config's
    `[[federation.members]]` URLs of the others are rewritten to the proxy ports)."""

    def __init__(self, root: Path, n: int = 4, proxies: Optional["ProxyNet"] = None,
                 federation: Optional[dict[str, int]] = None, network: Network = LOCAL) -> None:
        self.root = root
        self.n = n
        self.network = network
        base = free_port_base(n)
        r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-init", "--members", str(n), "--dir",
                            str(root), "--base-port", str(base), "--network", network.name], capture_output=True,
                           text=True, cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr
        with (root / "genesis.json").open("rb") as f:
            self.genesis = load_genesis_file(f)
        self.api_ports = [base + k for k in range(n)]
        for k in range(n):
            text = self.config(k).read_text()
            if federation:  # extra [federation] keys (round_ms, max_clock_drift_ms ...), right after the section line
                extra = "".join(f"{key} = {v}\n" for key, v in federation.items())
                text = text.replace("[federation]\n", "[federation]\n" + extra, 1)
            if proxies is not None:
                for j in range(n):
                    if j != k:
                        port = proxies.add(k, j, self.api_ports[j])
                        text, count = re.subn(rf'url = "http://127\.0\.0\.1:{self.api_ports[j]}"',
                                              f'url = "http://127.0.0.1:{port}"', text)
                        assert count == 1, f"member {k + 1}'s config: member {j + 1}'s url not found"
            self.config(k).write_text(text)
        self.procs: dict[int, L2dProcess] = {}
        self.starts = [0] * n

    @property
    def token(self) -> str:
        """The admin token federation-init gave every member."""
        m = re.search(r'admin_token = "([0-9a-f]+)"', self.config(0).read_text())
        assert m is not None
        return m.group(1)

    def rewrite_genesis(self) -> None:
        """After a change to every member's genesis (e.g. the same [bridge] section appended): genesis.json anew
        (`l2-cli federation-genesis`), and read back."""
        r = subprocess.run([sys.executable, "-m", "l2d.cli", "federation-genesis", "--dir", str(self.root)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode == 0, r.stderr
        with (self.root / "genesis.json").open("rb") as f:
            self.genesis = load_genesis_file(f)

    def dir(self, k: int) -> Path:
        return self.root / f"member-{k + 1}"

    def config(self, k: int) -> Path:
        return self.dir(k) / "l2d.toml"

    def data(self, k: int) -> Path:
        return self.dir(k) / "data"

    def secret(self, k: int) -> bytes:
        return bytes.fromhex((self.dir(k) / "member.key").read_text().strip())

    def start(self, k: int, launcher: Sequence[str] = ("-m", "l2d.node")) -> L2dProcess:
        self.starts[k] += 1
        p = L2dProcess(self.config(k), self.dir(k).with_name(f"member-{k + 1}-{self.starts[k]}.log"),
                       launcher=launcher)
        self.procs[k] = p
        return p

    def log_lines(self, k: int) -> list[dict[str, Any]]:
        """Member k's log records, every start of it in order."""
        return [json.loads(x) for i in range(1, self.starts[k] + 1)
                for x in self.dir(k).with_name(f"member-{k + 1}-{i}.log").read_text().splitlines() if x.strip()]

    def kill(self, k: int) -> None:
        self.procs.pop(k).kill()

    def stop(self, k: int) -> None:
        assert self.procs.pop(k).stop() == 0

    def kill_all(self) -> None:
        for k in list(self.procs):
            self.procs.pop(k).kill()

    def submit(self, k: int, tx: Transaction) -> None:
        p = self.procs[k]
        req = json.dumps({"tx": tx.raw.hex()}).encode()
        r = urllib.request.Request(p.url("/api/l2/tx"), data=req, method="POST",
                                   headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=30) as resp:
            assert resp.status == 202

    def status(self, k: int) -> dict[str, Any]:
        return self.procs[k].get("/api/status")  # type: ignore[no-any-return]

    def final(self, k: int) -> int:
        return int(self.status(k)["final_height"])

    def tx_height(self, k: int, tx: Transaction) -> Optional[int]:
        code, body = self.procs[k].get_raw(f"/api/l2/tx/{tx.txid.hex()}")
        st = json.loads(body)
        return st["height"] if code == 200 and st["status"] == "committed" else None

    def signer(self, k: int) -> SignerState:
        """Member k's signer state file as it is on disk now (empty if it never signed)."""
        return load_state(self.data(k) / SIGNER_FILE, self.network, self.genesis.members.keys[k])

    def chains(self, members: Optional[Sequence[int]] = None) -> list["MemberChain"]:
        """What each member stored (its processes stopped or killed): blocks, commits, siblings, final height and
        signer state."""
        out = []
        for k in range(self.n) if members is None else members:
            s = Store(self.data(k) / "ledger", self.network)
            try:
                tip = s.tip_height() or 0
                blocks = {}
                for h in range(1, tip + 1):
                    raw, commit = s.get_block(h), s.get_commit(h)
                    assert raw is not None and commit is not None, f"member {k + 1}: block or commit {h} missing"
                    blocks[h] = (bytes(raw), bytes(commit))
                out.append(MemberChain(k, s.final_height(), blocks, [(bytes(b), bytes(c)) for b, c in s.siblings()],
                                       self.signer(k)))
            finally:
                s.close()
        return out

    def check(self, members: Optional[Sequence[int]] = None) -> tuple[int, int]:
        """check_invariants over every member's database and signer file (processes stopped); (lowest, highest)
        final height."""
        return check_invariants(self, self.chains(members))


@dataclass
class MemberChain:
    member: int
    final: int
    blocks: dict[int, tuple[bytes, bytes]]  # height -> (block, commit), heights 1..tip
    siblings: list[tuple[bytes, bytes]]
    signer: SignerState
    headers: dict[int, BlockHeader] = field(default_factory=dict)


def check_invariants(fed: Federation, chains: Sequence[MemberChain]) -> tuple[int, int]:
    """The safety properties, across members (AssertionError naming the first one broken):
    - each member's stored chain links from genesis, and every stored block (siblings too) carries a commit of at
      least m valid member signatures;
    - never two different final blocks at one height: every member whose final height reaches h holds the same
      block at h;
    - no member signed two blocks with different parents at one height (in anyone's database), and each member's
      signer file records a signature at least as high as every stored commit it signed in, with the same parent
      at that height (an older file would let it sign a conflicting block).
    Returns (lowest, highest) final height."""
    g = fed.genesis
    signed_by: dict[int, dict[int, set[bytes]]] = {}  # member -> height -> parents of the blocks it signed

    def verified(raw: bytes, commit_raw: bytes, who: str) -> BlockHeader:
        header = Block.decode(raw, fed.network).header
        commit = Commit.decode(commit_raw)
        try:
            g.verify_commit(commit, header.hash)
        except L2Error as e:
            raise AssertionError(f"{who}: block {header.height} {header.hash.hex()[:16]}: commit: {e}") from e
        for i in commit.signers:
            signed_by.setdefault(i, {}).setdefault(header.height, set()).add(header.prev_hash)
        return header

    for c in chains:
        who = f"member {c.member + 1}"
        assert c.final <= len(c.blocks), f"{who}: final height {c.final} above its tip {len(c.blocks)}"
        prev = g.genesis_hash
        for h in range(1, len(c.blocks) + 1):
            header = verified(*c.blocks[h], who)
            assert header.height == h and header.prev_hash == prev, f"{who}: block {h} does not link to block {h - 1}"
            c.headers[h] = header
            prev = header.hash
        for raw, commit in c.siblings:
            header = verified(raw, commit, f"{who} (sibling)")
            assert header.height == c.final + 1, f"{who}: a sibling at height {header.height}, final is {c.final}"
    top = max(c.final for c in chains)
    for h in range(1, top + 1):
        finals = {c.headers[h].hash for c in chains if c.final >= h}
        assert len(finals) == 1, f"two different final blocks at height {h}: {sorted(x.hex()[:16] for x in finals)}"
    for i, heights in signed_by.items():
        for h, parents in heights.items():
            assert len(parents) == 1, f"member {i + 1} signed blocks on {len(parents)} different parents at height {h}"
    for c in chains:
        s = c.signer.signed
        for h, parents in signed_by.get(c.member, {}).items():
            assert s is not None and h <= s.height, (
                f"member {c.member + 1} signed a stored block at height {h}; its signer file records "
                f"{'nothing' if s is None else f'height {s.height}'}")
            if h == s.height:
                assert parents == {s.parent_hash}, (f"member {c.member + 1}'s signer file names another parent at "
                                                    f"height {h} than the block it signed there")
    return min(c.final for c in chains), top


# -- the TCP proxy ----------------------------------------------------------------------------------------------

PASS, DROP, DELAY, ONE_WAY, BLACKHOLE, FILTER = "pass", "drop", "delay", "one-way", "blackhole", "filter"


@dataclass
class Mode:
    """How a link's proxy treats its connections:
    pass       forward both ways;
    drop       close every connection (new ones are accepted and closed at once);
    delay      forward both ways, each chunk `delay_s` late (order kept);
    one-way    forward only `direction` ("up": client -> server, i.e. what the connecting member sends; "down":
               the answers), discard the other way;
    blackhole  accept, forward nothing either way, close nothing (the sender's writes vanish);
    filter     forward, except the member WebSocket messages of the kinds in `kinds` that the connecting member
               sends (whole frames are dropped), and block-range fetches (`no_fetch`: the connection is closed)."""
    name: str = PASS
    delay_s: float = 0.0
    direction: str = "up"
    kinds: frozenset[int] = frozenset()
    no_fetch: bool = False


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: Mode) -> None:
        self.reader, self.writer, self.mode = reader, writer, mode
        self.up_writer: Optional[asyncio.StreamWriter] = None
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.writer.close()
        if self.up_writer is not None:
            self.up_writer.close()


class _LinkProxy:
    """One listening port forwarding to one member's API port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = Mode()
        self.conns: set[_Conn] = set()
        self.server: Optional[asyncio.base_events.Server] = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def set_mode(self, mode: Mode) -> None:
        """New connections get the new mode; existing ones are closed (their byte streams may be cut mid-frame),
        except when the new mode is blackhole: they stay open and forward nothing from now on."""
        self.mode = mode
        for c in list(self.conns):
            if mode.name == BLACKHOLE:
                c.mode = mode
            else:
                self.conns.discard(c)
                c.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        c = _Conn(reader, writer, self.mode)
        if c.mode.name == DROP:
            writer.close()
            return
        self.conns.add(c)
        try:
            if c.mode.name != BLACKHOLE:
                up_reader, c.up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
                c.tasks = [asyncio.ensure_future(self._pump(c, reader, c.up_writer, True)),
                           asyncio.ensure_future(self._pump(c, up_reader, writer, False))]
            else:
                c.tasks = [asyncio.ensure_future(self._pump(c, reader, None, True))]
            await asyncio.gather(*c.tasks, return_exceptions=True)
        except OSError:
            pass
        finally:
            self.conns.discard(c)
            c.close()

    async def _pump(self, c: _Conn, src: asyncio.StreamReader, dst: Optional[asyncio.StreamWriter], up: bool) -> None:
        frames = _FrameFilter() if up else None
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        delayed: Optional[asyncio.Task[None]] = None
        try:
            while True:
                chunk = await src.read(65536)
                if not chunk:
                    break
                m = c.mode
                if dst is None or m.name == BLACKHOLE or (m.name == ONE_WAY and (m.direction == "up") != up):
                    continue
                if frames is not None:
                    chunk = frames.feed(chunk, m)
                    if chunk is None:
                        break  # a refused fetch: close the connection
                if m.name == DELAY:
                    if delayed is None:
                        delayed = asyncio.ensure_future(self._late(queue, dst))
                    queue.put_nowait((time.monotonic() + m.delay_s, chunk))
                    continue
                dst.write(chunk)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if delayed is not None:  # what is still delayed when the connection ends is lost with it
                delayed.cancel()
            c.close()

    @staticmethod
    async def _late(queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter) -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            dst.write(chunk)
            await dst.drain()


class _FrameFilter:
    """Follows what a connecting member sends: an HTTP request, then (for the member WebSocket) client frames,
    masked (RFC 6455 5.2). In filter mode it drops whole frames carrying member messages of the given kinds and
    refuses block-range fetches; otherwise it passes everything through unchanged."""

    def __init__(self) -> None:
        self.buf = b""
        self.ws: Optional[bool] = None  # None: still reading the request head

    def feed(self, chunk: bytes, mode: Mode) -> Optional[bytes]:
        if mode.name != FILTER:
            return chunk
        self.buf += chunk
        out = b""
        if self.ws is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return b""
            head, self.buf = self.buf[:end + 4], self.buf[end + 4:]
            self.ws = head.startswith(f"GET {WS_PATH} ".encode())
            out = head
        if not self.ws:
            if mode.no_fetch and BLOCKS_PATH.encode() in out + self.buf:
                return None
            out, self.buf = out + self.buf, b""
            return out
        while True:
            frame = self._frame()
            if frame is None:
                return out
            if not self._dropped(frame, mode.kinds):
                out += frame

    def _frame(self) -> Optional[bytes]:
        b = self.buf
        if len(b) < 2:
            return None
        n, at = b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, at = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, at = int.from_bytes(b[2:10], "big"), 10
        at += 4 if b[1] & 0x80 else 0
        if len(b) < at + n:
            return None
        frame, self.buf = b[:at + n], b[at + n:]
        return frame

    @staticmethod
    def _dropped(frame: bytes, kinds: frozenset[int]) -> bool:
        opcode, masked = frame[0] & 0x0F, frame[1] & 0x80
        if opcode != 0x2 or not masked or not kinds:
            return False
        n = frame[1] & 0x7F
        at = 2 + (2 if n == 126 else 8 if n == 127 else 0)
        mask, payload = frame[at:at + 4], frame[at + 4:at + 4 + HEAD_SIZE + 1]
        plain = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
        return len(plain) > 3 and plain[0] == FRAME_MESSAGE and plain[3] in kinds  # frame kind, then version,
        # network, kind


class ProxyNet:
    """One proxy per directed member link (i -> j: what member i sends to member j, and the answers), served by an
    event loop in its own thread, so the test's blocking calls never stall the forwarding."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="proxynet", daemon=True)
        self.thread.start()
        self.links: dict[tuple[int, int], _LinkProxy] = {}

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def add(self, i: int, j: int, target_port: int) -> int:
        link = _LinkProxy(target_port)
        self._call(link.start())
        self.links[(i, j)] = link
        return link.port

    def set(self, pairs: Sequence[tuple[int, int]], mode: Mode) -> None:
        async def apply() -> None:
            for p in pairs:
                self.links[p].set_mode(mode)
        self._call(apply())

    def isolate(self, k: int, mode: Mode) -> None:
        """Every link to and from member k."""
        self.set([p for p in self.links if k in p], mode)

    def split(self, a: Sequence[int], b: Sequence[int], mode: Mode) -> None:
        """Every link between the groups a and b, both ways."""
        self.set([(i, j) for i in a for j in b] + [(j, i) for i in a for j in b], mode)

    def heal(self) -> None:
        self.set(list(self.links), Mode())

    def close(self) -> None:
        async def stop() -> None:
            for link in self.links.values():
                for c in list(link.conns):
                    c.close()
                if link.server is not None:
                    link.server.close()
        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
