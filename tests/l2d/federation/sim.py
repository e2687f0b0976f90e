"""A deterministic discrete-event simulation of a federation running the real member code (l2d/federation).

Every member is a real `Member` with real BIP340 keys, real message encodings and a real signer state codec; its
"disk" is a dict here (the signer file's bytes and the stored blocks) so a crash keeps exactly what the member
persisted. A seeded scheduler delivers messages with random delays (so they reorder), drops and duplicates
them, partitions the members, crashes members (also at the two crash points of the signer: right after the signer
state is written and before the signature leaves; right after the signature left and before the block is stored),
restarts them (some with a wiped block store), skews their clocks, and lets Byzantine members equivocate: propose
different blocks to different members, precommit and sign every block they see, and send garbage.

A run has two phases: chaos (everything above), then a fair phase (every message delivered within a short delay,
clocks within the drift) in which either every member is up (`quorum_only=False`) or exactly m honest members are
(the others crashed, the Byzantine ones silent). Afterwards `check()` asserts the invariants (docs/federation.md):
    * safety: never two final blocks at one height across all members, and the final blocks form one chain;
    * every commit any member stored verifies (m member signatures);
    * every honest member's released signatures obey the signer rules, and each left only after the signer state
      that covers it was on disk (and every proposal after its round was recorded); replaying its persisted signer
      states, each follows from the previous one by the signer rules;
    * every equivocation evidence verifies and accuses a Byzantine member;
    * messages refused by an honest member raise typed errors (L2Error) only, and honest messages are never refused;
    * liveness: in the fair phase the final height rises by LIVENESS_BLOCKS, or (quorum_only) the stall is the
      documented one: the connected honest members are bound, at the stuck height, to different parents so that no
      parent can gather m signers.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from coincurve import PrivateKey
from coincurve.keys import PublicKeyXOnly

from l2d.core.block import BlockHeader, tx_root
from l2d.core.commit import sign_block
from l2d.core.errors import CommitError, L2Error
from l2d.core.members import Membership, default_threshold
from l2d.core.params import LOCAL
from l2d.federation.errors import StaleSignerState
from l2d.federation.machine import (Action, Broadcast, FetchBlocks, Member, PersistSigner, RecordEvidence, StoreBlock,
                                    StoredBlock, Timing, Validity, timestamp_ok)
from l2d.federation.messages import (AUX, BlockSignature, Candidate, Equivocation, Kind, Message, Precommit, Proposal,
                                     decode_message, sign_message)
from l2d.federation.signer import SignerState, Verdict, decide, decode_state, encode_state

NET = LOCAL
SECRETS = [hashlib.sha256(b"federation member %d" % i).digest() for i in range(16)]
KEYS = tuple(PrivateKey(s).public_key_xonly.format() for s in SECRETS)
GENESIS = BlockHeader(NET.id, 0, bytes(32), 1_000_000, 0, tx_root([]), hashlib.sha256(b"genesis").digest())
TIMING = Timing(block_interval_ms=200, round_ms=1000, max_round_ms=8000)
DRIFT_MS = 1000
FAIR_DELAY_MS = 150
FAIR_MS = 240_000  # the fair phase's budget (virtual time)
LIVENESS_BLOCKS = 2  # final blocks the fair phase must add
MAX_TXS = 3
T0 = 10_000_000  # the global clock at the start (after the genesis timestamp); schedule times are offsets
FETCH_LIMIT = 32  # blocks per fetch answer


class Violation(AssertionError):
    pass


def toy_root(parent_root: bytes, txids: tuple[bytes, ...]) -> bytes:
    return hashlib.sha256(parent_root + b"".join(txids)).digest()


class ToyLogic:
    """A ledger stand-in: the state root chains the parent's root and the txids; validity re-derives it and refuses
    a transaction already in the parent's chain. Like a real ledger it knows only the blocks its host stored:
    being asked to build on, or validate against, a parent the host has not stored yet is a broken host contract
    (the machine must wait for the host to apply a StoreBlock) and fails the simulation."""

    def __init__(self, mempool: dict[bytes, None], stored: Callable[[bytes], Optional[StoredBlock]],
                 drift_ms: int = DRIFT_MS) -> None:
        self.mempool = mempool
        self.stored = stored
        self.drift_ms = drift_ms
        self._ancestry: dict[bytes, frozenset[bytes]] = {GENESIS.hash: frozenset()}

    def included(self, block_hash: bytes) -> frozenset[bytes]:
        """The txids of the stored chain ending at block_hash."""
        if block_hash != GENESIS.hash and self.stored(block_hash) is None:
            raise Violation(f"the ledger was asked about block {block_hash.hex()[:12]} before its host stored it")
        todo = []
        h = block_hash
        while h not in self._ancestry:
            b = self.stored(h)
            if b is None:
                raise Violation(f"stored block chain broken at {h.hex()[:12]}")
            todo.append(b.block)
            h = b.block.parent
        for blk in reversed(todo):
            self._ancestry[blk.hash] = self._ancestry[blk.parent] | frozenset(blk.txids)
        return self._ancestry[block_hash]

    def build(self, parent: BlockHeader, timestamp_ms: int, allow_empty: bool) -> Optional[Candidate]:
        done = self.included(parent.hash)
        txids = tuple(t for t in self.mempool if t not in done)[:MAX_TXS]
        if not txids and not allow_empty:
            return None
        return make_block(parent, timestamp_ms, txids)

    def consensus_valid(self, parent: BlockHeader, block: Candidate) -> Validity:
        h = block.header
        ok = (h.network_id == parent.network_id and h.height == parent.height + 1 and h.prev_hash == parent.hash
              and h.timestamp_ms >= parent.timestamp_ms and len(set(block.txids)) == len(block.txids)
              and h.tx_count == len(block.txids) and h.tx_root == tx_root(list(block.txids))
              and h.state_root == toy_root(parent.state_root, block.txids)
              and not self.included(parent.hash) & set(block.txids))
        return Validity.VALID if ok else Validity.INVALID

    def policy_ok(self, parent: BlockHeader, block: Candidate, now_ms: int) -> bool:
        return timestamp_ok(parent, block.header, now_ms, self.drift_ms)


def make_block(parent: BlockHeader, timestamp_ms: int, txids: tuple[bytes, ...], root: Optional[bytes] = None
               ) -> Candidate:
    header = BlockHeader(NET.id, parent.height + 1, parent.hash, timestamp_ms, len(txids), tx_root(list(txids)),
                         toy_root(parent.state_root, txids) if root is None else root)
    return Candidate(header, txids)


@dataclass(frozen=True)
class Crash:
    member: int
    at_ms: int
    down_ms: int
    point: Optional[str] = None  # None (at once), "after_persist" or "after_signature" (the next such action)
    wipe: bool = False  # restart with an emptied block store (the signer state is kept)


@dataclass(frozen=True)
class Partition:
    start_ms: int
    end_ms: int
    group: frozenset[int]  # no message crosses between this group and the others


@dataclass(frozen=True)
class Schedule:
    n: int
    seed: int
    byzantine: tuple[int, ...] = ()
    drop_pct: int = 0
    dup_pct: int = 0
    max_delay_ms: int = 300
    skews: tuple[int, ...] = ()  # per member, ms added to the global clock during chaos
    crashes: tuple[Crash, ...] = ()
    partitions: tuple[Partition, ...] = ()
    chaos_ms: int = 15_000
    quorum_only: bool = False
    tx_every_ms: int = 400
    slow_signatures_ms: int = 0  # extra delay (up to) for SIGNATURE and BLOCK messages during chaos: members time
    # out after signing and sign a later round's block, so complete siblings (forks at the non-final height) appear

    @property
    def m(self) -> int:
        return default_threshold(self.n)


@dataclass
class Node:
    index: int
    honest: bool
    skew: int
    mempool: dict[bytes, None]
    logic: Optional[ToyLogic] = None
    machine: Optional[Member] = None
    disk_signer: Optional[bytes] = None
    disk_blocks: dict[bytes, StoredBlock] = field(default_factory=dict)
    disk_final: BlockHeader = GENESIS
    crash_plan: Optional[str] = None
    restart_after: int = 0
    wipe_on_restart: bool = False
    timer_gen: int = 0
    silent: bool = False  # down for good (quorum-only fair phase)


@dataclass
class SigRecord:
    time: int
    height: int
    round: int
    block_hash: bytes
    parent: bytes
    signature: bytes
    stored_at_height: frozenset[bytes]  # complete blocks at that height on the member's disk when it signed


class Sim:
    def __init__(self, sched: Schedule) -> None:
        self.s = sched
        self.rng = random.Random(sched.seed)
        self.fed = Membership(KEYS[:sched.n], sched.m)
        self.t = T0
        self.seq = 0
        self.events: list[tuple[int, int, str, Any]] = []
        self.fair = False
        self.nodes: list[Node] = []
        for i in range(sched.n):
            mempool: dict[bytes, None] = {}
            skew = sched.skews[i] if i < len(sched.skews) else 0
            node = Node(i, i not in sched.byzantine, skew, mempool)
            node.logic = ToyLogic(mempool, node.disk_blocks.get)
            self.nodes.append(node)
        self.stored: dict[bytes, StoredBlock] = {}  # every block any member stored
        self.sig_log: dict[int, list[SigRecord]] = {i: [] for i in range(sched.n)}
        self.evidence: list[tuple[int, Equivocation]] = []
        self.refused: dict[str, int] = {}
        self.tx_counter = 0
        self.crashes_done = 0
        self.fair_start_final = 0
        self.fair_at = 0
        self.fair_end: Optional[int] = None
        self.quorum: tuple[int, ...] = ()
        self.messages = 0
        self.documented_stall = False

    # ---- scheduling ----------------------------------------------------------------------------------------

    def at(self, t: int, kind: str, data: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, data))

    def local(self, i: int) -> int:
        return self.t + self.nodes[i].skew

    def run(self) -> "Sim":
        s = self.s
        for c in s.crashes:
            self.at(T0 + c.at_ms, "crash", c)
        self.at(T0 + s.chaos_ms, "fair", None)
        self.at(T0 + 1, "tx", None)
        for node in self.nodes:
            self.restart(node.index)
        end = T0 + s.chaos_ms + FAIR_MS
        while self.events:
            t, _, kind, data = heapq.heappop(self.events)
            if t > end:
                break
            self.t = max(self.t, t)
            getattr(self, "on_" + kind)(data)
            if self.fair:
                finals = [self.nodes[i].disk_final.height for i in self.quorum if self.nodes[i].honest]
                if min(finals) >= self.fair_start_final + LIVENESS_BLOCKS:
                    self.fair_end = self.t
                    break
                if max(finals) >= self.fair_start_final + LIVENESS_BLOCKS + 10 and self.t >= self.fair_at + 60_000:
                    break  # a minute on, the others moved on without a member: no need to watch longer
        return self

    # ---- members -------------------------------------------------------------------------------------------

    def up(self, i: int) -> bool:
        return self.nodes[i].machine is not None

    def restart(self, i: int) -> None:
        node = self.nodes[i]
        if node.machine is not None or node.silent:
            return
        if node.wipe_on_restart:
            node.disk_blocks.clear()
            node.disk_final, node.wipe_on_restart = GENESIS, False
        signer = decode_state(node.disk_signer, NET, KEYS[i]) if node.disk_signer is not None else SignerState()
        heads = [b for b in node.disk_blocks.values()
                 if b.block.height == node.disk_final.height + 1 and b.block.parent == node.disk_final.hash]
        try:
            node.machine = self.member(i, heads, signer)
        except StaleSignerState:
            if node.honest:
                raise
            # A Byzantine member's extra signatures are in stored commits but not in its machine's signer state:
            # the check refuses that start, as it should; the Byzantine host starts without its stored heads.
            node.machine = self.member(i, [], signer)
        node.crash_plan = None
        self.execute(i, node.machine.start(self.local(i)))

    def member(self, i: int, heads: list[StoredBlock], signer: SignerState) -> Member:
        node = self.nodes[i]
        assert node.logic is not None
        return Member(network=NET, members=self.fed, index=i, secret=SECRETS[i], timing=TIMING, logic=node.logic,
                      final=node.disk_final, heads=heads, signer=signer)

    def crash(self, i: int) -> None:
        node = self.nodes[i]
        if node.machine is None:
            return
        node.machine = None
        node.timer_gen += 1
        self.crashes_done += 1
        if not node.silent:
            self.at(self.t + max(1, node.restart_after), "restart", i)

    def execute(self, i: int, actions: list[Action]) -> None:
        node = self.nodes[i]
        for a in actions:
            if node.machine is None:
                return  # crashed part-way: the rest of the actions never happened
            if isinstance(a, PersistSigner):
                if node.honest:
                    self.audit_persist(i, a.state)
                node.disk_signer = encode_state(a.state, NET, KEYS[i])
                if node.crash_plan == "after_persist" and a.state.signed is not None:
                    self.crash(i)
                    return
            elif isinstance(a, Broadcast):
                self.broadcast(i, a.message)
                if node.crash_plan == "after_signature" and a.message.kind is Kind.SIGNATURE:
                    self.crash(i)
                    return
            elif isinstance(a, StoreBlock):
                self.store(i, a)
            elif isinstance(a, FetchBlocks):
                self.fetch(i, a)
            elif isinstance(a, RecordEvidence):
                self.evidence.append((i, a.evidence))
        self.arm_timer(i)

    def arm_timer(self, i: int) -> None:
        node = self.nodes[i]
        if node.machine is None:
            return
        node.timer_gen += 1
        self.at(max(self.t + 1, node.machine.deadline - node.skew), "timer", (i, node.timer_gen))

    def store(self, i: int, a: StoreBlock) -> None:
        node = self.nodes[i]
        h = a.block.hash
        if h not in self.stored:
            a.commit.verify(self.fed, NET, h)  # every stored commit proves m member signatures
            self.stored[h] = StoredBlock(a.block, a.commit)
        node.disk_blocks[h] = StoredBlock(a.block, a.commit)
        node.disk_final = a.final
        for txid in a.block.txids:
            node.mempool.pop(txid, None)

    def fetch(self, i: int, a: FetchBlocks) -> None:
        peer = self.nodes[a.peer]
        if peer.machine is None:
            return
        blocks = sorted((b for b in peer.disk_blocks.values() if b.block.height >= a.from_height),
                        key=lambda b: (b.block.height, b.block.hash))[:FETCH_LIMIT]
        if blocks and self.link_ok(a.peer, i):
            self.at(self.t + self.delay(), "blocks", (i, a.peer, blocks))

    # ---- network -------------------------------------------------------------------------------------------

    def link_ok(self, a: int, b: int) -> bool:
        if self.fair:
            return True
        for p in self.s.partitions:
            if T0 + p.start_ms <= self.t < T0 + p.end_ms and ((a in p.group) != (b in p.group)):
                return False
        return self.rng.randrange(100) >= self.s.drop_pct

    def delay(self, raw: bytes = b"") -> int:
        if self.fair:
            return self.rng.randint(1, FAIR_DELAY_MS)
        d = self.rng.randint(1, max(1, self.s.max_delay_ms))
        if self.s.slow_signatures_ms and len(raw) > 2 and raw[2] in (Kind.SIGNATURE, Kind.BLOCK):
            d += self.rng.randint(0, self.s.slow_signatures_ms)
        return d

    def send(self, frm: int, to: int, raw: bytes) -> None:
        if not self.link_ok(frm, to):
            return
        self.messages += 1
        self.at(self.t + self.delay(raw), "deliver", (frm, to, raw))
        if not self.fair and self.rng.randrange(100) < self.s.dup_pct:
            self.at(self.t + self.delay(raw), "deliver", (frm, to, raw))

    def broadcast(self, i: int, msg: Message) -> None:
        node = self.nodes[i]
        if node.honest:
            self.audit_release(i, msg)
            for j in range(self.s.n):
                if j != i:
                    self.send(i, j, msg.raw)
            return
        self.byzantine_broadcast(i, msg)

    def audit_persist(self, i: int, new: SignerState) -> None:
        """Replaying an honest member's persisted signer states: each new state follows from the one on disk by the
        signer rules (issue 12, item 5) -- a signature is never forgotten, never moves below the last signed height,
        to another parent, to an earlier or equal round, or past a complete block the member had stored -- and the
        recorded proposal never moves back."""
        node = self.nodes[i]
        old = decode_state(node.disk_signer, NET, KEYS[i]) if node.disk_signer is not None else SignerState()
        if old.proposed is not None and (new.proposed is None or new.proposed < old.proposed):
            raise Violation(f"member {i} persisted proposal {new.proposed} after {old.proposed}")
        if new.signed == old.signed:
            return
        if new.signed is None:
            raise Violation(f"member {i} persisted a state that forgets its signature {old.signed}")
        s = new.signed
        complete = any(b.block.height == s.height for b in node.disk_blocks.values())
        verdict = decide(old.signed, s.height, s.round, s.block_hash, s.parent_hash, complete).verdict
        if verdict is not Verdict.SIGN:
            raise Violation(f"member {i} persisted signature {s} after {old.signed}: the signer rules say {verdict}")

    def audit_release(self, i: int, msg: Message) -> None:
        """An honest member's signature or proposal leaves only with the signer state covering it on disk."""
        node = self.nodes[i]
        disk = decode_state(node.disk_signer, NET, KEYS[i]) if node.disk_signer is not None else SignerState()
        if isinstance(msg.body, BlockSignature):
            signed = disk.signed
            if signed is None or (signed.height, signed.block_hash, signed.signature) != (
                    msg.height, msg.body.block_hash, msg.body.signature):
                raise Violation(f"member {i} released a signature for {msg.body.block_hash.hex()[:8]} at height "
                                f"{msg.height} not covered by its persisted signer state {disk}")
            stored_here = frozenset(k for k, b in node.disk_blocks.items() if b.block.height == msg.height)
            self.sig_log[i].append(SigRecord(self.t, msg.height, msg.round, msg.body.block_hash,
                                             signed.parent_hash, msg.body.signature, stored_here))
        elif isinstance(msg.body, Proposal):
            if disk.proposed != (msg.height, msg.round):
                raise Violation(f"member {i} proposed at {msg.height}/{msg.round} before recording it: {disk}")

    def on_deliver(self, data: tuple[int, int, bytes]) -> None:
        frm, to, raw = data
        node = self.nodes[to]
        if node.machine is None:
            return
        try:
            actions = node.machine.receive(raw, self.local(to))
        except L2Error as e:
            if self.nodes[frm].honest:
                raise Violation(f"member {to} refused an honest message from {frm}: {e!r}") from e
            self.refused[type(e).__name__] = self.refused.get(type(e).__name__, 0) + 1
            return
        self.execute(to, actions)
        if not node.honest:
            self.byzantine_react(to, raw)

    def on_blocks(self, data: tuple[int, int, list[StoredBlock]]) -> None:
        to, peer, blocks = data
        node = self.nodes[to]
        for b in blocks:
            if node.machine is None:
                return
            try:
                actions = node.machine.receive_block(b.block, b.commit, peer, self.local(to))
            except CommitError as e:
                raise Violation(f"member {to} refused a stored block of member {peer}: {e!r}") from e
            self.execute(to, actions)

    def on_timer(self, data: tuple[int, int]) -> None:
        i, gen = data
        node = self.nodes[i]
        if node.machine is None or gen != node.timer_gen:
            return
        self.execute(i, node.machine.tick(self.local(i)))

    def on_tx(self, _: None) -> None:
        self.tx_counter += 1
        txid = hashlib.sha256(b"tx %d %d" % (self.s.seed, self.tx_counter)).digest()
        for node in self.nodes:
            if node.machine is not None and (self.fair or self.rng.randrange(100) < 80):
                node.mempool[txid] = None
                self.execute(node.index, node.machine.wake(self.local(node.index)))
        self.at(self.t + self.rng.randint(1, 2 * self.s.tx_every_ms), "tx", None)

    def on_crash(self, c: Crash) -> None:
        node = self.nodes[c.member]
        if self.fair or node.machine is None:
            return
        node.restart_after = c.down_ms
        node.wipe_on_restart = c.wipe
        if c.point is None:
            self.crash(c.member)
        else:
            node.crash_plan = c.point

    def on_restart(self, i: int) -> None:
        self.restart(i)

    def on_fair(self, _: None) -> None:
        """From now on: every message delivered within FAIR_DELAY_MS, clocks within the drift, no crashes."""
        self.fair = True
        honest = [n.index for n in self.nodes if n.honest]
        if self.s.quorum_only:
            self.quorum = tuple(honest[:self.s.m])
        else:
            self.quorum = tuple(range(self.s.n))
        for node in self.nodes:
            node.crash_plan = None
            node.skew = self.rng.randint(-DRIFT_MS // 4, DRIFT_MS // 4)
            if node.index not in self.quorum:
                node.silent = True
                self.crash(node.index)
        for i in self.quorum:
            self.restart(i)
        self.fair_start_final = max(n.disk_final.height for n in self.nodes)
        self.fair_at = self.t
        for i in self.quorum:  # clocks jumped: re-arm every timer
            self.arm_timer(i)

    # ---- Byzantine members ---------------------------------------------------------------------------------

    def byzantine_broadcast(self, i: int, msg: Message) -> None:
        others = [j for j in range(self.s.n) if j != i]
        if isinstance(msg.body, Proposal) and not self.fair or isinstance(msg.body, Proposal) and self.rng.random() < .5:
            a = msg.body.block
            variant = self.rng.randrange(3)
            if variant == 0:  # another timestamp
                b = make_block(self.parent_header(a), a.header.timestamp_ms + 1, a.txids)
            elif variant == 1:  # other transactions
                b = make_block(self.parent_header(a), a.header.timestamp_ms, a.txids[:-1] if a.txids else
                               (hashlib.sha256(b"byz %d" % self.t).digest(),))
            else:  # an invalid state root
                b = make_block(self.parent_header(a), a.header.timestamp_ms, a.txids, root=bytes(32))
            other = sign_message(PrivateKey(SECRETS[i]), NET, i, msg.height, msg.round, Proposal(b))
            for j in others:
                pick = self.rng.randrange(3)
                if pick in (0, 2):
                    self.send(i, j, msg.raw)
                if pick in (1, 2):
                    self.send(i, j, other.raw)
            self.sign_everything(i, msg.height, msg.round, b)
            return
        for j in others:
            if not self.fair and self.rng.randrange(100) < 3:  # garbage: a flipped byte
                raw = bytearray(msg.raw)
                raw[self.rng.randrange(len(raw))] ^= 1 << self.rng.randrange(8)
                self.send(i, j, bytes(raw))
            else:
                self.send(i, j, msg.raw)

    def parent_header(self, block: Candidate) -> BlockHeader:
        if block.parent == GENESIS.hash:
            return GENESIS
        return self.stored[block.parent].block.header

    def byzantine_react(self, i: int, raw: bytes) -> None:
        """A Byzantine member precommits and signs every proposal it sees, whatever it signed before."""
        try:
            msg = decode_message(raw, NET, self.fed)
        except L2Error:
            return
        if isinstance(msg.body, Proposal):
            self.sign_everything(i, msg.height, msg.round, msg.body.block)

    def sign_everything(self, i: int, height: int, round_: int, block: Candidate) -> None:
        key = PrivateKey(SECRETS[i])
        sig = sign_block(SECRETS[i], NET, block.hash, AUX)
        for body in (Precommit(block.hash), BlockSignature(block.hash, sig)):
            m = sign_message(key, NET, i, height, round_, body)
            for j in range(self.s.n):
                if j != i:
                    self.send(i, j, m.raw)

    # ---- invariants ----------------------------------------------------------------------------------------

    def finals(self) -> dict[int, set[bytes]]:
        """Height -> hashes of blocks that have a stored complete child (final blocks)."""
        out: dict[int, set[bytes]] = {}
        for b in self.stored.values():
            out.setdefault(b.block.height - 1, set()).add(b.block.parent)
        return out

    def check(self) -> None:
        self.check_safety()
        self.check_signers()
        self.check_evidence()
        self.check_liveness()

    def check_safety(self) -> None:
        finals = self.finals()
        for h, hashes in sorted(finals.items()):
            if len(hashes) > 1:
                raise Violation(f"two final blocks at height {h}: {sorted(x.hex()[:12] for x in hashes)}")
        chain = {h: next(iter(v)) for h, v in finals.items()}
        for h, hsh in chain.items():
            if h >= 1 and h - 1 in chain:
                header = self.stored[hsh].block.header
                if header.prev_hash != chain[h - 1]:
                    raise Violation(f"final block {h} does not extend final block {h - 1}")
        for node in self.nodes:
            f = node.disk_final
            if f.height >= 1 and chain.get(f.height) != f.hash:
                raise Violation(f"member {node.index} holds final block {f.height} {f.hash.hex()[:12]}, "
                                f"not the federation's")

    def check_signers(self) -> None:
        for i, log in self.sig_log.items():
            if not self.nodes[i].honest:
                continue
            last: Optional[SigRecord] = None
            for rec in log:
                if last is None or rec.height > last.height:
                    last = rec
                    continue
                if rec.height < last.height:
                    raise Violation(f"member {i} signed at height {rec.height} after signing at {last.height}")
                if rec.block_hash == last.block_hash:
                    if rec.signature != last.signature:
                        raise Violation(f"member {i} re-signed block {rec.block_hash.hex()[:8]} differently")
                    continue
                if rec.parent != last.parent:
                    raise Violation(f"member {i} signed two blocks with different parents at height {rec.height}")
                if rec.round <= last.round:
                    raise Violation(f"member {i} signed another block at height {rec.height} in round "
                                    f"{rec.round}, not after round {last.round}")
                if rec.stored_at_height:
                    raise Violation(f"member {i} signed another block at height {rec.height} while holding a "
                                    f"complete one")
                last = rec

    def check_evidence(self) -> None:
        for i, ev in self.evidence:
            Equivocation.from_raw(ev.first.raw, ev.second.raw, NET, self.fed)
            if self.nodes[ev.proposer].honest:
                raise Violation(f"member {i} holds evidence against honest member {ev.proposer}")

    def stall_explained(self) -> Optional[str]:
        """The documented stall: at the stuck height, the connected members are bound (by signatures) to different
        parents, and for every parent the members bound to it plus the unbound ones are fewer than m."""
        live = [self.nodes[i] for i in self.quorum]
        heights = {n.machine.height for n in live if n.machine is not None}
        if len(heights) != 1:
            return None
        h = heights.pop()
        bound: dict[bytes, int] = {}
        free = 0
        for n in live:
            assert n.machine is not None
            s = n.machine.signer.signed
            if s is not None and s.height == h:
                bound[s.parent_hash] = bound.get(s.parent_hash, 0) + 1
            else:
                free += 1
        if len(bound) >= 2 and all(c + free < self.s.m for c in bound.values()):
            return f"height {h}: signers bound to {len(bound)} parents {sorted(bound.values())}, {free} unbound"
        return None

    def check_liveness(self) -> None:
        if self.fair_end is not None:
            return
        if self.s.quorum_only and self.stall_explained() is not None:
            self.documented_stall = True
            return
        state = {i: (self.nodes[i].disk_final.height, self.nodes[i].machine.height if self.nodes[i].machine else None,
                     self.nodes[i].machine.round if self.nodes[i].machine else None) for i in self.quorum}
        raise Violation(f"no liveness: final height did not rise by {LIVENESS_BLOCKS} from {self.fair_start_final} "
                        f"within {FAIR_MS} ms of fair schedule; (final, height, round) per member: {state}")

    def stats(self) -> dict[str, int]:
        per_height: dict[int, int] = {}
        for b in self.stored.values():
            per_height[b.block.height] = per_height.get(b.block.height, 0) + 1
        return {"final_height": max((n.disk_final.height for n in self.nodes), default=0),
                "complete_siblings": sum(1 for c in per_height.values() if c > 1),
                "evidence": len(self.evidence), "crashes": self.crashes_done, "messages": self.messages,
                "refused": sum(self.refused.values()), "documented_stall": int(self.documented_stall)}


@contextlib.contextmanager
def memoized_verification() -> Iterator[None]:
    """BIP340 verification is a pure function of (key, signature, message): while a simulation runs, each distinct
    triple is verified once (libsecp256k1) and remembered, instead of once per recipient. Garbage and forgeries are
    distinct triples, so they are verified for real like everything else."""
    real = PublicKeyXOnly.verify
    memo: dict[tuple[bytes, bytes, bytes], bool] = {}

    def verify(self: PublicKeyXOnly, signature: bytes, message: bytes) -> bool:
        k = (self.format(), signature, message)
        r = memo.get(k)
        if r is None:
            r = memo[k] = bool(real(self, signature, message))
        return r

    PublicKeyXOnly.verify = verify  # type: ignore[method-assign]
    try:
        yield
    finally:
        PublicKeyXOnly.verify = real  # type: ignore[method-assign]


def run(sched: Schedule) -> Sim:
    with memoized_verification():
        sim = Sim(sched).run()
    sim.check()
    return sim


class Lockstep:
    """Members on a network the test drives by hand: messages queue in order until deliver() hands them over
    (filtered by a predicate), time moves only with advance(). For unit tests of single protocol steps."""

    def __init__(self, n: int, m: Optional[int] = None, drift_ms: int = DRIFT_MS, now: int = T0) -> None:
        self.fed = Membership(KEYS[:n], default_threshold(n) if m is None else m)
        self.now = now
        self.mempools: list[dict[bytes, None]] = [{} for _ in range(n)]
        self.disk_signer: dict[int, bytes] = {}
        self.disk_blocks: dict[int, dict[bytes, StoredBlock]] = {i: {} for i in range(n)}
        self.logics = [ToyLogic(mp, self.disk_blocks[i].get, drift_ms) for i, mp in enumerate(self.mempools)]
        self.disk_final = {i: GENESIS for i in range(n)}
        self.queue: list[tuple[int, int, bytes]] = []
        self.log: dict[int, list[Action]] = {i: [] for i in range(n)}
        self.members: dict[int, Member] = {}
        self.down: set[int] = set()
        for i in range(n):
            self.boot(i)

    def boot(self, i: int, signer: Optional[SignerState] = None) -> Member:
        state = signer if signer is not None else (
            decode_state(self.disk_signer[i], NET, KEYS[i]) if i in self.disk_signer else SignerState())
        final = self.disk_final[i]
        heads = [b for b in self.disk_blocks[i].values()
                 if b.block.height == final.height + 1 and b.block.parent == final.hash]
        self.members[i] = Member(network=NET, members=self.fed, index=i, secret=SECRETS[i], timing=TIMING,
                                 logic=self.logics[i], final=final, heads=heads, signer=state)
        self.down.discard(i)
        return self.members[i]

    def start(self, *which: int) -> None:
        for i in which or tuple(self.members):
            self.execute(i, self.members[i].start(self.now))

    def execute(self, i: int, actions: list[Action]) -> None:
        self._perform(i, actions)
        member = self.members[i]
        while i not in self.down and member.deadline <= self.now:  # tick() is due at once (after a StoreBlock)
            self._perform(i, member.tick(self.now))

    def _perform(self, i: int, actions: list[Action]) -> None:
        self.log[i].extend(actions)
        for a in actions:
            if isinstance(a, PersistSigner):
                self.disk_signer[i] = encode_state(a.state, NET, KEYS[i])
            elif isinstance(a, Broadcast):
                for j in self.members:
                    if j != i:
                        self.queue.append((i, j, a.message.raw))
            elif isinstance(a, StoreBlock):
                self.disk_blocks[i][a.block.hash] = StoredBlock(a.block, a.commit)
                self.disk_final[i] = a.final
                for txid in a.block.txids:
                    self.mempools[i].pop(txid, None)
            elif isinstance(a, FetchBlocks) and a.peer not in self.down:
                for b in sorted((b for b in self.disk_blocks[a.peer].values() if b.block.height >= a.from_height),
                                key=lambda b: b.block.height):
                    if i not in self.down:
                        self.execute(i, self.members[i].receive_block(b.block, b.commit, a.peer, self.now))

    def deliver(self, keep: Any = None, rounds: int = 100) -> int:
        """Deliver queued messages (those keep(frm, to, message) accepts; the others are dropped) until none is
        left; returns how many were delivered."""
        done = 0
        for _ in range(rounds):
            if not self.queue:
                break
            batch, self.queue = self.queue, []
            for frm, to, raw in batch:
                if to in self.down:
                    continue
                if keep is not None and not keep(frm, to, decode_message(raw, NET, self.fed)):
                    continue
                done += 1
                self.execute(to, self.members[to].receive(raw, self.now))
        return done

    def advance(self, ms: int) -> None:
        """Move the clock on, firing each member's timer when due."""
        end = self.now + ms
        while True:
            due = [(m.deadline, i) for i, m in self.members.items() if i not in self.down and m.deadline <= end]
            if not due:
                break
            self.now = max(self.now, min(due)[0])
            for d, i in sorted(due):
                if d <= self.now:
                    self.execute(i, self.members[i].tick(self.now))
        self.now = end

    def add_tx(self, tag: bytes, *which: int) -> bytes:
        txid = hashlib.sha256(tag).digest()
        for i in which or tuple(self.members):
            self.mempools[i][txid] = None
            if i not in self.down:
                self.execute(i, self.members[i].wake(self.now))
        return txid

    def sent(self, i: int, kind: Kind) -> list[Message]:
        return [a.message for a in self.log[i] if isinstance(a, Broadcast) and a.message.kind is kind]
