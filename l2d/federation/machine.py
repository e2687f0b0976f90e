"""One federation member's protocol state machine, sans-IO (docs/federation.md).

Inputs: received message bytes (receive), blocks fetched from a peer (receive_block), the passing of time (tick, at
`deadline`), and "something changed locally" (wake: new mempool transactions, fetched transaction bodies). Every
input carries the member's clock in ms. Outputs: a list of actions that the host performs IN ORDER, stopping at
the first that fails (a PersistSigner that did not reach the disk must stop the member: the next action may
release a signature that depends on it). The machine itself has no clock, no randomness and no I/O; block
building and validation are the host's, injected as a BlockLogic.

A height goes in rounds. The proposer of (height, round) is members[(height + round) mod n]; it proposes its block
(header + txids), or re-proposes the block it already signed at this height. Every member that finds the proposal
consensus-valid and acceptable to its local policy, and whose signer rules would let it sign it, broadcasts a
precommit; on m precommits for the block in its current round it persists its signer state, signs, and sends the
signature to all. A member holding the block and m signatures stores it with the commit and relays it. A round
that times out passes to the next proposer (timeouts double per round up to a cap). A block is final once a child
of it is complete; between complete siblings at the one non-final height the fork choice is: later timestamp,
then lower hash.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Optional, Protocol, Sequence, Union

from coincurve import PrivateKey

from ..core.block import BlockHeader
from ..core.commit import Commit, sign_block
from ..core.members import Membership
from ..core.params import Network
from .errors import InconsistentMessage, TimingError, UnknownMember, WrongProposer
from .messages import (AUX, BlockSignature, Body, Candidate, CompleteBlock, Equivocation, Message, Precommit, Proposal,
                       Status, Timeout, decode_message, sign_message)
from .signer import Signed, SignerState, Verdict, check_not_stale, decide

ROUND_WINDOW = 16  # proposals and precommits kept for rounds this far from the current one
SIG_HASHES_PER_SENDER = 16  # distinct blocks a member's signatures are kept for, per height
FUTURE_PER_MEMBER = 64  # messages kept per member for the next height


@dataclass(frozen=True, slots=True)
class Timing:
    block_interval_ms: int  # a proposer builds no earlier than this after its parent's timestamp
    round_ms: int  # the first round's length; each later round doubles it...
    max_round_ms: int  # ...up to this cap

    def __post_init__(self) -> None:
        if self.block_interval_ms < 0 or self.round_ms <= 0 or self.max_round_ms < self.round_ms:
            raise TimingError(f"round timing needs block_interval_ms >= 0, round_ms > 0 and max_round_ms >= "
                              f"round_ms (got {self.block_interval_ms}, {self.round_ms}, {self.max_round_ms})")

    def timeout(self, round_: int) -> int:
        return min(self.round_ms << min(round_, 40), self.max_round_ms)

    def unreachable_timeout(self, round_: int) -> int:
        """The length of a round whose proposer I have no link to: a quarter of the usual (at least 1 ms)."""
        return max(1, self.timeout(round_) // 4)


def proposer(height: int, round_: int, n: int) -> int:
    """The member index that proposes at (height, round): the rotation moves one member per height and per round."""
    return (height + round_) % n


def fork_choice(blocks: Sequence[BlockHeader]) -> BlockHeader:
    """Among complete blocks at one height: the later timestamp, then the lower hash. Only header fields, so every
    member that holds the same blocks chooses the same one (a round number is no part of a block)."""
    return min(blocks, key=lambda h: (-h.timestamp_ms, h.hash))


def timestamp_ok(parent: BlockHeader, header: BlockHeader, now_ms: int, drift_ms: int) -> bool:
    """The signing policy's clock rule: after the parent's timestamp, not ahead of my clock by more than drift_ms."""
    return parent.timestamp_ms < header.timestamp_ms <= now_ms + drift_ms


class Validity(Enum):
    VALID = "valid"
    INVALID = "invalid"
    PENDING = "pending"  # cannot tell yet (transaction bodies missing): ask again on wake()


class BlockLogic(Protocol):
    def build(self, parent: BlockHeader, timestamp_ms: int, allow_empty: bool) -> Optional[Candidate]:
        """A block on parent from my mempool, or None when there is nothing to include and not allow_empty."""

    def consensus_valid(self, parent: BlockHeader, block: Candidate) -> Validity:
        """Deterministic validity (re-execution gives the header's roots, every transaction valid); the only check
        applied to blocks that already carry a commit."""

    def policy_ok(self, parent: BlockHeader, block: Candidate, now_ms: int) -> bool:
        """Local signing policy (clock drift, my bitcoind's view): decides only whether I precommit and sign."""


@dataclass(frozen=True, slots=True)
class StoredBlock:
    block: Candidate
    commit: Commit


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Send message.raw to every other member."""

    message: Message


@dataclass(frozen=True, slots=True)
class PersistSigner:
    """Write the signer state durably (signer.save_state) before performing the next action."""

    state: SignerState


@dataclass(frozen=True, slots=True)
class StoreBlock:
    """Store a complete block with its commit; atomically with it, the final block and the fork-choice head."""

    block: Candidate
    commit: Commit
    final: BlockHeader
    head: BlockHeader


@dataclass(frozen=True, slots=True)
class FetchBlocks:
    """Ask member `peer` for its complete blocks (with commits) from height from_height on, as many as it has
    (pipelined ranges, not one request per block); hand each, in height order, to receive_block(). The machine does
    not repeat the request while the answer's blocks move it up; if the answer is lost or ends early it asks again
    (perhaps another member) when its round timer next runs out."""

    peer: int
    from_height: int


@dataclass(frozen=True, slots=True)
class RecordEvidence:
    evidence: Equivocation


Action = Union[Broadcast, PersistSigner, StoreBlock, FetchBlocks, RecordEvidence]


class Member:
    """The protocol state of member `index`. Give it the stored chain's final block and the complete blocks above
    it (at most one height: the children of the final block), and the loaded signer state; call start()."""

    def __init__(self, *, network: Network, members: Membership, index: int, secret: bytes, timing: Timing,
                 logic: BlockLogic, final: BlockHeader, heads: Sequence[StoredBlock], signer: SignerState) -> None:
        if not 0 <= index < members.n:
            raise UnknownMember(f"member index {index}; the federation has {members.n} members")
        self._key = PrivateKey(secret)
        if self._key.public_key_xonly.format() != members.keys[index]:
            raise UnknownMember(f"this member's secret key is not the key of member {index}")
        for s in heads:
            s.block.check()
            if s.block.height != final.height + 1 or s.block.parent != final.hash:
                raise InconsistentMessage(f"stored block {s.block.height} is not a child of the final block "
                                          f"{final.height}")
            s.commit.verify(members, network, s.block.hash)
        check_not_stale(signer, index, [(s.block.height, s.commit) for s in heads])
        self.network, self.members, self.index, self.timing, self.logic = network, members, index, timing, logic
        self.m = members.threshold
        self._final = final
        self._heads = {s.block.hash: s for s in heads}
        self._signer = signer
        self.evidence: list[Equivocation] = []
        self._out: list[Action] = []
        self._now = 0
        # Across heights (entries below the head's height are pruned).
        self._blocks: dict[bytes, Candidate] = {}  # contents of blocks at heights >= height - 1
        self._valid: set[bytes] = set()
        self._invalid: set[bytes] = set()
        self._sigs: dict[bytes, tuple[int, dict[int, bytes]]] = {}  # block hash -> (height, member -> signature)
        self._pending: dict[bytes, StoredBlock] = {}  # complete, awaiting their parent or a validity verdict
        self._peer_height: dict[int, int] = {}
        self._future: list[Message] = []
        self._signed_blocks: dict[bytes, Candidate] = {}  # what I signed at this height (for re-proposal)
        # Per height.
        self.height = self.head.height + 1
        self.round = 0
        self._deadline = 0
        self._propose_at: Optional[int] = None
        self._proposals: dict[int, Message] = {}
        self._poisoned: set[int] = set()
        self._precommits: dict[int, dict[int, bytes]] = {}
        self._my_precommit: dict[int, bytes] = {}
        self._signed_rounds: set[int] = set()
        self._peer_round: dict[int, int] = {}
        self._timeouts: dict[int, int] = {}  # member -> the latest round it timed out in, at this height
        self._timer_runs = 0
        self._fetched = False  # a FetchBlocks went out in this round and timer period
        self._in_fetch = False  # receive_block() is applying a fetched block (the answer to a FetchBlocks)
        self._evidence_seen: set[tuple[int, int, int]] = set()
        self._deferred = False  # host-dependent work waits for the next input (see _resume)
        self._told_behind: set[int] = set()  # members at a lower height I sent my status to, at this height
        self._unreachable: frozenset[int] = frozenset()  # members my link to is down (set_unreachable)

    # ---- views -------------------------------------------------------------------------------------------------

    @property
    def final(self) -> BlockHeader:
        return self._final

    @property
    def head(self) -> BlockHeader:
        """The block I build on: the fork choice among the complete children of the final block (or the final
        block itself when it has none)."""
        if not self._heads:
            return self._final
        return fork_choice([s.block.header for s in self._heads.values()])

    @property
    def heads(self) -> list[StoredBlock]:
        return list(self._heads.values())

    @property
    def signer(self) -> SignerState:
        return self._signer

    @property
    def deadline(self) -> int:
        """The local time at which tick() must next be called (at once after a StoreBlock: see _resume)."""
        if self._deferred:
            return self._now
        return self._deadline if self._propose_at is None else min(self._deadline, self._propose_at)

    def set_unreachable(self, members: frozenset[int]) -> None:
        """The members my link to is down, as the host's transport sees it. A round such a member proposes ends
        after a quarter of its length (Timing.unreachable_timeout): its proposal cannot reach me, so waiting the
        whole round only delays the next proposer. Only timing depends on this, never safety; leaving the round
        still needs a timeout certificate of m members."""
        self._unreachable = members

    def proposal_seen(self, round_: int) -> bool:
        """Did a proposal of the current height reach me in this round (kept for ROUND_WINDOW rounds)?"""
        return round_ in self._proposals

    def peer_height(self, member: int) -> Optional[int]:
        """The highest height member is known to work on (from its signed messages and fetched blocks), if any."""
        return self._peer_height.get(member)

    def behind(self) -> bool:
        """Members who could all be honest (n - m + 1 of them) report a height above mine: catch up, sign nothing."""
        ahead = sum(1 for s, h in self._peer_height.items() if s != self.index and h > self.height)
        return ahead >= self.members.n - self.m + 1

    # ---- inputs ------------------------------------------------------------------------------------------------

    def start(self, now_ms: int) -> list[Action]:
        self._now = now_ms
        self._enter_height(self.height)
        self._resume()
        return self._flush()

    def receive(self, raw: bytes, now_ms: int) -> list[Action]:
        """Handle a message from another member. A message that cannot be decoded or verified, or that breaks the
        protocol (a proposal by a member not proposing that round, a block whose commit does not verify), raises a
        typed L2Error and changes nothing."""
        msg = decode_message(raw, self.network, self.members)
        if msg.sender == self.index:
            return []  # my own message coming back (a relay loop): nothing new in it
        if isinstance(msg.body, Proposal) and msg.sender != proposer(msg.height, msg.round, self.members.n):
            raise WrongProposer(f"member {msg.sender} proposed at height {msg.height} round {msg.round}, whose "
                                f"proposer is member {proposer(msg.height, msg.round, self.members.n)}")
        if isinstance(msg.body, CompleteBlock) and self._wants(msg.body.block):
            msg.body.commit.verify(self.members, self.network, msg.body.block.hash)
        self._step(now_ms)
        self._handle(msg)
        return self._flush()

    def receive_block(self, block: Candidate, commit: Commit, peer: int, now_ms: int) -> list[Action]:
        """A complete block fetched from member `peer` (catch-up): applied if its commit verifies and it is
        consensus-valid on a parent I hold; never judged by local policy. A bad commit raises a CommitError."""
        block.check()
        if self._wants(block):
            commit.verify(self.members, self.network, block.hash)
        self._in_fetch = True
        try:
            self._step(now_ms)
            if self._wants(block):
                self._peer_height[peer] = max(self._peer_height.get(peer, 0), block.height + 1)
                self._on_complete(block, commit, peer)
        finally:
            self._in_fetch = False
        return self._flush()

    def tick(self, now_ms: int) -> list[Action]:
        self._step(now_ms)
        if now_ms >= self._deadline:
            self._on_timer()
        else:
            if self._propose_at is not None and now_ms >= self._propose_at:
                self._propose_at = None
            self._round_actions()
        return self._flush()

    def wake(self, now_ms: int) -> list[Action]:
        """Local news (transactions arrived): retry pending validations, and propose if it is my turn."""
        self._step(now_ms)
        self._retry_pending()
        self._round_actions()
        return self._flush()

    def _step(self, now_ms: int) -> None:
        self._now = now_ms
        if self._deferred:
            self._resume()

    # ---- message handling --------------------------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        s, body = msg.sender, msg.body
        if isinstance(body, CompleteBlock):
            self._peer_height[s] = max(self._peer_height.get(s, 0), msg.height + 1)
            self._on_complete(body.block, body.commit, s)
            return
        self._peer_height[s] = max(self._peer_height.get(s, 0), msg.height)
        h = self.height
        if msg.height < h:
            if isinstance(body, BlockSignature) and msg.height == h - 1:
                self._add_signature(s, msg.height, body)
            elif isinstance(body, (Status, Timeout)) and s not in self._told_behind:
                # A member behind me (restarted, or back from a partition) says where it is: tell it where I am,
                # once per height, so it fetches at once instead of waiting for my next timer (up to a round).
                self._told_behind.add(s)
                self._send(Status(self.head.hash, self._final.height))
            return
        if msg.height > h:
            if msg.height == h + 1:
                if sum(1 for f in self._future if f.sender == s) < FUTURE_PER_MEMBER:
                    self._future.append(msg)
            else:
                self._fetch(s, self._final.height + 1)
            return
        self._peer_round[s] = max(self._peer_round.get(s, 0), msg.round)
        if isinstance(body, Timeout):
            self._timeouts[s] = max(self._timeouts.get(s, 0), msg.round)
        self._advance_round()
        if self.height != h:
            return
        if isinstance(body, (Status, Timeout)):
            if body.head_hash not in self._parents_at(h - 1):
                self._fetch(s, h - 1)  # a complete block I lack (a sibling of my head): the fork choice needs it
        elif isinstance(body, Proposal):
            self._on_proposal(msg, body)
        elif isinstance(body, Precommit):
            if self.round <= msg.round <= self.round + ROUND_WINDOW:
                votes = self._precommits.setdefault(msg.round, {})
                if s not in votes:  # one precommit per member and round: the first counts
                    votes[s] = body.block_hash
                    if msg.round == self.round:
                        self._maybe_sign()
        else:
            self._add_signature(s, msg.height, body)

    def _on_proposal(self, msg: Message, body: Proposal) -> None:
        r = msg.round
        first = self._proposals.get(r)
        if first is None:
            if abs(r - self.round) <= ROUND_WINDOW:
                self._proposals[r] = msg
                self._blocks.setdefault(body.block.hash, body.block)
                self._try_complete(body.block.hash)  # its m signatures may have come first
                if r == self.round:
                    self._consider()
            return
        if isinstance(first.body, Proposal) and first.body.block.hash != body.block.hash:
            # Two blocks from one proposer in one round: keep both signed messages, act on neither.
            self._poisoned.add(r)
            key = (msg.sender, msg.height, r)
            if key not in self._evidence_seen:
                self._evidence_seen.add(key)
                ev = Equivocation(first, msg)
                self.evidence.append(ev)
                self._out.append(RecordEvidence(ev))

    def _add_signature(self, sender: int, height: int, body: BlockSignature) -> None:
        h = body.block_hash
        if h in self._heads or h in self._pending:
            return
        entry = self._sigs.get(h)
        if entry is None:
            kept = sum(1 for ht, d in self._sigs.values() if ht == height and sender in d)
            if kept >= SIG_HASHES_PER_SENDER:
                return
            entry = self._sigs[h] = (height, {})
        entry[1].setdefault(sender, body.signature)
        self._try_complete(h)

    def _wants(self, block: Candidate) -> bool:
        """Is this complete block news to me (worth verifying its commit)?"""
        return (block.height > self._final.height and block.hash not in self._heads
                and block.hash not in self._pending)

    # ---- rounds ------------------------------------------------------------------------------------------------

    def _enter_height(self, height: int) -> None:
        self.height = height
        self._proposals, self._poisoned, self._precommits = {}, set(), {}
        self._my_precommit, self._signed_rounds, self._peer_round, self._timeouts = {}, set(), {}, {}
        self._propose_at = None
        low = height - 1
        self._blocks = {k: b for k, b in self._blocks.items() if b.height >= low}
        keep = set(self._blocks)
        self._valid &= keep
        self._invalid &= keep
        self._sigs = {k: v for k, v in self._sigs.items() if v[0] >= low}
        self._signed_blocks = {k: b for k, b in self._signed_blocks.items() if b.height == height}
        self._evidence_seen = {e for e in self._evidence_seen if e[1] >= height}
        self._told_behind = set()
        start = 0
        signed, proposed = self._signer.signed, self._signer.proposed
        if signed is not None and signed.height == height:
            start = signed.round  # resume where I signed (a re-proposal of that block can get it re-sent)
        if proposed is not None and proposed[0] == height:
            start = max(start, proposed[1])
        self._start_round(start)
        self._deferred = True

    def _resume(self) -> None:
        """The work that asks the host about blocks (build, consensus validity) waits for the step after the one
        that emitted a StoreBlock: by then the host has stored that block, updated its ledger and mempool, so a
        child is not built from a mempool still holding the parent's transactions, nor validated against a
        parent the ledger does not have yet. Messages that arrived early for this height are handled here too."""
        self._deferred = False
        h = self.height
        future, self._future = [f for f in self._future if f.height == h], [f for f in self._future if f.height > h]
        for f in future:
            self._handle(f)
        self._retry_pending()
        self._round_actions()

    def _start_round(self, round_: int) -> None:
        self.round = round_
        p = proposer(self.height, round_, self.members.n)
        self._deadline = self._now + (self.timing.unreachable_timeout(round_) if p in self._unreachable
                                      else self.timing.timeout(round_))
        self._propose_at = None
        low = round_ - ROUND_WINDOW
        self._proposals = {r: p for r, p in self._proposals.items() if r >= low}
        self._precommits = {r: v for r, v in self._precommits.items() if r >= round_}
        if not self._in_fetch:  # the heights a fetch answer moves me through need no new FetchBlocks each
            self._fetched = False
        self._catch_up()
        self._send(Status(self.head.hash, self._final.height))

    def _enter_round(self, round_: int) -> None:
        self._start_round(round_)
        self._round_actions()

    def _round_actions(self) -> None:
        if self._deferred:
            return
        token = (self.height, self.round)
        self._propose()
        if (self.height, self.round) == token:
            self._consider()
        if (self.height, self.round) == token:
            self._maybe_sign()

    def _on_timer(self) -> None:
        """My round's timer ran out: say so (again every round length while the round lasts) and move on when a
        timeout certificate forms. A member never leaves a round on its own timer alone: one member with an early
        timer would otherwise leave every round just before the others' precommits reach it, forever, once the
        round length stops growing at its cap."""
        self._timeouts[self.index] = max(self._timeouts.get(self.index, 0), self.round)
        self._deadline = self._now + self.timing.timeout(self.round)
        self._timer_runs += 1
        self._fetched = False
        self._catch_up()
        self._send(Timeout(self.head.hash, self._final.height))
        self._advance_round()

    def _advance_round(self) -> None:
        """Enter round r + 1 once m members timed out in round r or later (a timeout certificate), or join round r
        once n - m + 1 other members are in it or beyond (at least one of them honest if at most n - m are not):
        rounds converge without trusting any single member's round number."""
        votes = sorted(self._timeouts.values(), reverse=True)
        if len(votes) >= self.m and votes[self.m - 1] >= self.round:
            self._enter_round(votes[self.m - 1] + 1)
            return
        k = self.members.n - self.m + 1
        rounds = sorted((r for s, r in self._peer_round.items() if s != self.index), reverse=True)
        if len(rounds) >= k and rounds[k - 1] > self.round:
            self._enter_round(rounds[k - 1])

    # ---- proposing, precommitting, signing ---------------------------------------------------------------------

    def _propose(self) -> None:
        h, r = self.height, self.round
        if (proposer(h, r, self.members.n) != self.index or r in self._proposals
                or not self._signer.may_propose(h, r) or self.behind() or self._deferred):
            return
        signed = self._signer.signed
        block: Optional[Candidate] = None
        if signed is not None and signed.height == h:
            # I may only sign blocks on the parent I already signed on at this height: re-propose that block.
            parent = self._parents_at(h - 1).get(signed.parent_hash)
            block = self._signed_blocks.get(signed.block_hash)
        else:
            parent = self.head
        if parent is None:
            return
        if block is None:
            earliest = parent.timestamp_ms + self.timing.block_interval_ms
            if self._now < earliest:
                self._propose_at = earliest
                return
            allow_empty = parent.tx_count > 0 and parent.hash != self._final.hash  # one empty block finalizes it
            block = self.logic.build(parent, max(self._now, parent.timestamp_ms + 1), allow_empty)
            if block is None:
                return  # nothing to propose: wake() when transactions arrive
            if block.height != h or block.parent != parent.hash:
                raise ValueError(f"the block builder returned block {block.height} on "
                                 f"{block.parent.hex()}, asked for {h} on {parent.hash.hex()}")
        self._propose_at = None
        self._set_signer(replace(self._signer, proposed=(h, r)))  # never two proposals in one round, even across
        msg = self._send(Proposal(block))                          # a crash
        self._proposals[r] = msg
        self._blocks.setdefault(block.hash, block)
        self._consider()

    def _consider(self) -> None:
        """Precommit the current round's proposal if it is valid, acceptable, and mine to sign."""
        h, r = self.height, self.round
        msg = self._proposals.get(r)
        if msg is None or r in self._poisoned or r in self._my_precommit or self.behind() or self._deferred:
            return
        if not isinstance(msg.body, Proposal):
            return
        block = msg.body.block
        parent = self._parents_at(h - 1).get(block.parent)
        if parent is None:
            self._fetch(msg.sender, h - 1)  # built on a complete block I lack
            return
        if self._validity(parent, block) is not Validity.VALID or not self.logic.policy_ok(parent, block, self._now):
            return
        if decide(self._signer.signed, h, r, block.hash, block.parent, self._complete_held(h)).verdict is \
                Verdict.REFUSE:
            return
        self._my_precommit[r] = block.hash
        self._precommits.setdefault(r, {})[self.index] = block.hash
        self._send(Precommit(block.hash))
        self._maybe_sign()

    def _maybe_sign(self) -> None:
        """On m precommits in my current round for the block I precommitted: sign it (rules permitting)."""
        h, r = self.height, self.round
        target = self._my_precommit.get(r)
        if target is None or r in self._signed_rounds or r in self._poisoned or self.behind():
            return
        if sum(1 for x in self._precommits.get(r, {}).values() if x == target) < self.m:
            return
        block = self._blocks[target]
        self._signed_rounds.add(r)
        d = decide(self._signer.signed, h, r, target, block.parent, self._complete_held(h))
        if d.verdict is Verdict.REFUSE:
            return
        if d.verdict is Verdict.SIGN:
            sig = sign_block(self._key.secret, self.network, target, AUX)
            self._set_signer(replace(self._signer, signed=Signed(h, r, target, block.parent, sig)))
        else:
            assert self._signer.signed is not None  # RESEND is only decided against a stored signature
            sig = self._signer.signed.signature
        self._signed_blocks[target] = block
        self._send(BlockSignature(target, sig))
        self._add_signature(self.index, h, BlockSignature(target, sig))

    # ---- complete blocks, finality -----------------------------------------------------------------------------

    def _try_complete(self, block_hash: bytes) -> None:
        entry = self._sigs.get(block_hash)
        block = self._blocks.get(block_hash)
        if entry is None or block is None or len(entry[1]) < self.m:
            return
        self._on_complete(block, Commit.assemble(self.members.n, entry[1]), None)

    def _on_complete(self, block: Candidate, commit: Commit, peer: Optional[int]) -> None:
        """A block with a verified commit of m signatures."""
        if not self._wants(block):
            return
        if block.height >= self.height - 1:
            self._blocks.setdefault(block.hash, block)
        parent = self._parents_at(block.height - 1).get(block.parent)
        if parent is None:
            if peer is not None:
                self._fetch(peer, self._final.height + 1)
            if block.height <= self.height:
                self._pending[block.hash] = StoredBlock(block, commit)
            return
        if self._deferred:  # its parent may be the block stored in this very step: validate in the next
            self._pending[block.hash] = StoredBlock(block, commit)
            return
        v = self._validity(parent, block)
        if v is Validity.PENDING:
            self._pending[block.hash] = StoredBlock(block, commit)
        elif v is Validity.VALID:
            self._store(block, commit)

    def _retry_pending(self) -> None:
        if self._deferred:
            return
        for key in list(self._pending):
            s = self._pending.pop(key, None)
            if s is not None and s.block.height > self._final.height:
                self._on_complete(s.block, s.commit, None)

    def _store(self, block: Candidate, commit: Commit) -> None:
        self._pending.pop(block.hash, None)
        if block.height == self._final.height + 2:  # its parent, a head, becomes final
            self._final = self._heads[block.parent].block.header
            self._heads = {}
            self._pending = {k: s for k, s in self._pending.items() if s.block.height > self._final.height + 1
                             or s.block.parent == self._final.hash}
        self._heads[block.hash] = StoredBlock(block, commit)
        head = self.head
        self._out.append(StoreBlock(block, commit, self._final, head))
        self._send(CompleteBlock(block, commit), height=block.height, round_=0)
        if head.height + 1 > self.height:
            self._enter_height(head.height + 1)
        self._deferred = True  # a sibling of my head, too: the current proposal may have been waiting for it

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _parents_at(self, height: int) -> dict[bytes, BlockHeader]:
        """The complete blocks I hold at a height (the final block, or its complete children)."""
        if height == self._final.height:
            return {self._final.hash: self._final}
        if height == self._final.height + 1:
            return {k: s.block.header for k, s in self._heads.items()}
        return {}

    def _complete_held(self, height: int) -> bool:
        """Do I hold a complete block (contents and m signatures) at this height, stored or not yet? (m signatures
        without the contents say nothing about the block's parent or validity: they do not count.)"""
        return any(s.block.height == height for s in self._pending.values()) or any(
            s.block.height == height for s in self._heads.values())

    def _validity(self, parent: BlockHeader, block: Candidate) -> Validity:
        if block.hash in self._valid:
            return Validity.VALID
        if block.hash in self._invalid:
            return Validity.INVALID
        v = self.logic.consensus_valid(parent, block)
        if v is Validity.VALID:
            self._valid.add(block.hash)
        elif v is Validity.INVALID:
            self._invalid.add(block.hash)
        return v

    def _catch_up(self) -> None:
        """Someone reported a height above mine, so it holds complete blocks I lack: ask one of those members (a
        different one each time, so one that lies about its height cannot keep me waiting)."""
        ahead = sorted(s for s, h in self._peer_height.items() if s != self.index and h > self.height)
        if ahead:
            self._fetch(ahead[(self.round + self._timer_runs) % len(ahead)], self._final.height + 1)

    def _fetch(self, peer: int, from_height: int) -> None:
        """Ask a peer for complete blocks, at most once per round and timer period (then again if still needed)."""
        if peer == self.index or self._fetched:
            return
        self._fetched = True
        self._out.append(FetchBlocks(peer, max(1, from_height)))

    def _set_signer(self, state: SignerState) -> None:
        self._signer = state
        self._out.append(PersistSigner(state))

    def _send(self, body: Body, height: Optional[int] = None, round_: Optional[int] = None) -> Message:
        msg = sign_message(self._key, self.network, self.index, self.height if height is None else height,
                           self.round if round_ is None else round_, body)
        self._out.append(Broadcast(msg))
        return msg

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out
