"""The member state machine, one protocol step at a time, on a network the tests drive by hand (sim.Lockstep):
proposer rotation, rounds and the timeout certificate, precommit then sign, the signer rules as the machine applies
them (re-proposal, later rounds, crash points, restored state), finality and the empty block, fork choice between
complete siblings, evidence, catch-up, and the stall the signer rules can cause."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Optional

import pytest
from coincurve import PrivateKey

from l2d.core.block import BlockHeader
from l2d.core.commit import Commit, sign_block
from l2d.core.errors import BadCommitSignature, NotEnoughSignatures
from l2d.federation.errors import InconsistentMessage, StaleSignerState, TimingError, UnknownMember, WrongProposer
from l2d.federation.machine import (Broadcast, FetchBlocks, Member, PersistSigner, RecordEvidence, StoreBlock,
                                    StoredBlock, Timing, Validity, fork_choice, proposer, timestamp_ok)
from l2d.federation.messages import (AUX, BlockSignature, Candidate, CompleteBlock, Equivocation, Kind, Precommit,
                                     Proposal, Status, Timeout, sign_message)
from l2d.federation.signer import Signed, SignerState, decode_state


def _sim() -> ModuleType:
    if (mod := sys.modules.get("l2d_federation_sim")) is None:
        spec = importlib.util.spec_from_file_location("l2d_federation_sim", Path(__file__).with_name("sim.py"))
        assert spec is not None and spec.loader is not None
        mod = sys.modules["l2d_federation_sim"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


S = _sim()
NET, GENESIS, SECRETS, KEYS = S.NET, S.GENESIS, S.SECRETS, S.KEYS
ROUND = S.TIMING.round_ms


def heights(net: object) -> dict[int, tuple[int, int, int]]:
    """member -> (working height, round, final height)"""
    return {i: (m.height, m.round, m.final.height) for i, m in net.members.items()}  # type: ignore[attr-defined]


def signed_by(i: int, height: int, round_: int, body: object) -> bytes:
    return sign_message(PrivateKey(SECRETS[i]), NET, i, height, round_, body).raw  # type: ignore[arg-type]


def complete(block: Candidate, signers: tuple[int, ...] = (0, 1, 2), n: int = 4) -> Commit:
    return Commit.assemble(n, {i: sign_block(SECRETS[i], NET, block.hash, AUX) for i in signers})


def block_on(parent: BlockHeader, ts: int, *tags: bytes) -> Candidate:
    return S.make_block(parent, ts, tuple(S.hashlib.sha256(t).digest() for t in tags))


# ---- the pure parts --------------------------------------------------------------------------------------------

def test_proposer_rotates_per_height_and_round() -> None:
    assert [proposer(1, r, 4) for r in range(6)] == [1, 2, 3, 0, 1, 2]
    assert [proposer(h, 0, 4) for h in range(1, 6)] == [1, 2, 3, 0, 1]
    assert {proposer(h, r, 1) for h in range(5) for r in range(5)} == {0}
    for h in range(10):  # any n consecutive rounds give every member one turn
        assert sorted(proposer(h, r, 7) for r in range(3, 10)) == list(range(7))


def test_round_timeouts_double_up_to_a_cap() -> None:
    t = Timing(block_interval_ms=200, round_ms=1000, max_round_ms=5000)
    assert [t.timeout(r) for r in range(5)] == [1000, 2000, 4000, 5000, 5000]
    assert t.timeout(10 ** 6) == 5000
    for bad in ((-1, 1000, 5000), (0, 0, 5000), (0, 1000, 999)):
        with pytest.raises(TimingError):
            Timing(*bad)


def test_fork_choice_prefers_the_later_timestamp_then_the_lower_hash() -> None:
    a, b, c = (block_on(GENESIS, ts, tag).header for ts, tag in ((5, b"a"), (9, b"b"), (9, b"c")))
    assert fork_choice([a, b]) == b and fork_choice([b, a]) == b
    assert fork_choice([b, c]) == fork_choice([c, b]) == min((b, c), key=lambda h: h.hash)
    assert fork_choice([a]) == a


def test_timestamp_policy() -> None:
    child = block_on(GENESIS, GENESIS.timestamp_ms + 500).header
    assert timestamp_ok(GENESIS, child, now_ms=GENESIS.timestamp_ms, drift_ms=500)
    assert not timestamp_ok(GENESIS, child, now_ms=GENESIS.timestamp_ms, drift_ms=499)  # ahead of my clock
    same = block_on(GENESIS, GENESIS.timestamp_ms).header
    assert not timestamp_ok(GENESIS, same, now_ms=GENESIS.timestamp_ms + 10 ** 6, drift_ms=500)  # not after parent


# ---- construction ----------------------------------------------------------------------------------------------

def test_a_member_is_built_only_from_consistent_parts() -> None:
    net = S.Lockstep(4)
    fed = net.fed
    args = dict(network=NET, members=fed, timing=S.TIMING, logic=net.logics[0], final=GENESIS, heads=[],
                signer=SignerState())
    with pytest.raises(UnknownMember, match="member 1"):
        Member(index=1, secret=SECRETS[0], **args)  # type: ignore[arg-type]
    with pytest.raises(UnknownMember, match="4 members"):
        Member(index=4, secret=SECRETS[4], **args)  # type: ignore[arg-type]
    b = block_on(GENESIS, 2_000_000, b"x")
    with pytest.raises(NotEnoughSignatures):
        Member(index=0, secret=SECRETS[0], **{**args, "heads": [StoredBlock(b, complete(b, (1, 2)))]})  # type: ignore
    orphan = block_on(b.header, 2_000_001)
    with pytest.raises(InconsistentMessage, match="not a child"):
        Member(index=0, secret=SECRETS[0], **{**args, "heads": [StoredBlock(orphan, complete(orphan))]})  # type: ignore


def test_a_restored_old_signer_state_is_refused() -> None:
    """The stored chain carries my signature at height 1 but my signer state says I never signed: an old copy
    (or a lost file). Signing from it could contradict the signature I released, so the member does not start."""
    net = S.Lockstep(4)
    b = block_on(GENESIS, 2_000_000, b"x")
    net.disk_blocks[0][b.hash] = StoredBlock(b, complete(b, (0, 1, 2)))
    with pytest.raises(StaleSignerState, match="height 1"):
        net.boot(0, SignerState())
    net.boot(1 if False else 3, SignerState())  # member 3 did not sign it: nothing to contradict


# ---- rounds ----------------------------------------------------------------------------------------------------

def test_one_member_federation_commits_and_finalizes_with_one_empty_block() -> None:
    net = S.Lockstep(1)
    net.start()
    assert net.sent(0, Kind.PROPOSAL) == []  # nothing to propose, nothing to finalize: idle
    net.add_tx(b"t1")
    net.advance(1000)
    stores = [a for a in net.log[0] if isinstance(a, StoreBlock)]
    assert [s.block.header.tx_count for s in stores] == [1, 0]  # the block, then one empty block on it
    assert stores[1].final == stores[0].block.header and stores[1].head == stores[1].block.header
    for s in stores:
        s.commit.verify(net.fed, NET, s.block.hash)
    net.advance(20 * ROUND)
    assert len(net.sent(0, Kind.PROPOSAL)) == 2  # the tip is empty: no further empty block
    assert heights(net) == {0: (3, heights(net)[0][1], 1)}


def test_four_members_commit_a_block_and_its_finalizing_empty_child() -> None:
    net = S.Lockstep(4)
    net.start()
    net.add_tx(b"t1")  # member 1 proposes height 1, round 0
    net.deliver()
    net.advance(300)  # the block interval after block 1
    net.deliver()
    assert heights(net) == {i: (3, 0, 1) for i in range(4)}
    for i in range(4):
        b1, b2 = sorted(net.disk_blocks[i].values(), key=lambda s: s.block.height)
        assert b1.block.header.tx_count == 1 and b2.block.header.tx_count == 0 and b2.block.parent == b1.block.hash
        b1.commit.verify(net.fed, NET, b1.block.hash)
        assert len(b1.commit.signers) >= 3
    assert len({tuple(sorted(net.disk_blocks[i])) for i in range(4)}) == 1


def test_signer_state_is_persisted_before_each_signature_and_proposal() -> None:
    net = S.Lockstep(4)
    net.start()
    net.add_tx(b"t1")
    net.deliver()
    for i in range(4):
        persisted: Optional[SignerState] = None
        for a in net.log[i]:
            if isinstance(a, PersistSigner):
                persisted = a.state
            elif isinstance(a, Broadcast) and isinstance(a.message.body, BlockSignature):
                assert persisted is not None and persisted.signed is not None
                assert persisted.signed.block_hash == a.message.body.block_hash
                assert persisted.signed.signature == a.message.body.signature
            elif isinstance(a, Broadcast) and isinstance(a.message.body, Proposal):
                assert persisted is not None and persisted.proposed == (a.message.height, a.message.round)
    assert len(net.sent(1, Kind.PROPOSAL)) == 1 and all(len(net.sent(i, Kind.SIGNATURE)) == 1 for i in range(4))


def test_a_round_without_its_proposer_passes_to_the_next_one() -> None:
    net = S.Lockstep(4)
    net.start()
    net.add_tx(b"t1")
    net.deliver(keep=lambda frm, to, msg: frm != 1)  # the proposer of (1, 0) is cut off
    assert heights(net) == {i: (1, 0, 0) for i in range(4)}
    net.advance(ROUND)  # every timer runs out: TIMEOUTs, and a timeout certificate (m = 3) for round 0
    net.deliver(keep=lambda frm, to, msg: frm != 1 and msg.kind is Kind.TIMEOUT, rounds=1)
    assert {i: heights(net)[i][1] for i in (0, 2, 3)} == {0: 1, 2: 1, 3: 1}
    proposals = net.sent(2, Kind.PROPOSAL)  # proposer(1, 1) = 2
    assert [(p.height, p.round) for p in proposals] == [(1, 1)]
    net.deliver(keep=lambda frm, to, msg: frm != 1)
    assert all(len(net.disk_blocks[i]) == 1 for i in (0, 2, 3))


def test_a_round_whose_proposer_is_unreachable_ends_after_a_quarter_of_its_length() -> None:
    net = S.Lockstep(4)
    for i in (0, 2, 3):
        net.members[i].set_unreachable(frozenset({1}))  # the proposer of (1, 0) is down
    net.start()
    net.add_tx(b"t1")
    assert {i: net.members[i].deadline - net.now for i in range(4)} == {0: ROUND // 4, 1: ROUND, 2: ROUND // 4,
                                                                        3: ROUND // 4}
    net.down.add(1)
    net.advance(ROUND // 4)  # the three time out at once, and form a certificate
    net.deliver(keep=lambda frm, to, msg: msg.kind is Kind.TIMEOUT, rounds=1)
    assert {i: heights(net)[i][1] for i in (0, 2, 3)} == {0: 1, 2: 1, 3: 1}
    # proposer(1, 1) = 2 is reachable: its round has the usual length (doubled in round 1)
    assert {net.members[i].deadline - net.now for i in (0, 2, 3)} == {2 * ROUND}
    net.deliver()
    assert all(len(net.disk_blocks[i]) == 1 for i in (0, 2, 3))
    assert S.TIMING.unreachable_timeout(0) == ROUND // 4 and S.TIMING.unreachable_timeout(20) == 8000 // 4


def test_a_member_leaves_a_round_only_on_a_timeout_certificate() -> None:
    """One member's early timer does not take it out of the round (it would miss the others' precommits); m
    TIMEOUTs do, and n - m + 1 members in a later round pull a member along."""
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    net.execute(0, m0.tick(m0.deadline))
    assert m0.round == 0 and [(t.height, t.round) for t in net.sent(0, Kind.TIMEOUT)] == [(1, 0)]
    net.execute(0, m0.tick(m0.deadline))  # still alone: it says so again, stays
    assert m0.round == 0 and len(net.sent(0, Kind.TIMEOUT)) == 2
    net.queue.clear()
    net.execute(0, m0.receive(signed_by(1, 1, 0, Timeout(GENESIS.hash, 0)), net.now))
    assert m0.round == 0
    net.execute(0, m0.receive(signed_by(2, 1, 0, Timeout(GENESIS.hash, 0)), net.now))
    assert m0.round == 1  # three of four timed out in round 0
    net.execute(0, m0.receive(signed_by(2, 1, 5, Status(GENESIS.hash, 0)), net.now))
    assert m0.round == 1  # one member in round 5 is not enough (it could be lying)...
    net.execute(0, m0.receive(signed_by(3, 1, 4, Status(GENESIS.hash, 0)), net.now))
    assert m0.round == 4  # ...two (n - m + 1) are: at least one of them is honest, join the lower one


def test_a_proposal_from_the_wrong_member_is_refused_and_changes_nothing() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    before = (m0.height, m0.round, dict(m0._proposals))
    b = block_on(GENESIS, net.now, b"x")
    with pytest.raises(WrongProposer, match="proposer is member 1"):
        m0.receive(signed_by(2, 1, 0, Proposal(b)), net.now)
    assert (m0.height, m0.round, dict(m0._proposals)) == before


def test_invalid_or_unacceptable_proposals_are_not_precommitted() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    bad_root = S.make_block(GENESIS, net.now, (), root=bytes(32))
    net.execute(0, m0.receive(signed_by(1, 1, 0, Proposal(bad_root)), net.now))
    net.advance(ROUND)
    for i in (1, 2):
        net.execute(0, m0.receive(signed_by(i, 1, 0, Timeout(GENESIS.hash, 0)), net.now))
    assert m0.round == 1
    ahead = block_on(GENESIS, net.now + S.DRIFT_MS + 1)  # ahead of my clock beyond the drift (round 1's proposer)
    net.execute(0, m0.receive(signed_by(2, 1, 1, Proposal(ahead)), net.now))
    assert net.sent(0, Kind.PRECOMMIT) == []
    ok = block_on(GENESIS, net.now)  # a valid proposal is precommitted (the test above can fail)
    net.advance(2 * ROUND)
    for i in (1, 2):
        net.execute(0, m0.receive(signed_by(i, 1, 1, Timeout(GENESIS.hash, 0)), net.now))
    net.execute(0, m0.receive(signed_by(3, 1, 2, Proposal(ok)), net.now))
    assert [p.body.block_hash for p in net.sent(0, Kind.PRECOMMIT)] == [ok.hash]  # type: ignore[union-attr]


def test_signatures_that_arrive_before_the_block_complete_it_when_it_arrives() -> None:
    """Member 0 missed round 0's proposal but got m signatures of its block; the contents come later (the round-1
    re-proposal, while member 0 is still in round 0). With the contents and m signatures in hand it stores the
    block at once: no precommit round needed (a member bound elsewhere at this height could not even sign it).
    Found by the simulation (a quorum-only schedule with crashes at the signer's crash points stalled)."""
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    x = block_on(GENESIS, net.now, b"x")
    for i in (1, 2, 3):
        net.execute(0, m0.receive(signed_by(i, 1, 0, BlockSignature(x.hash, sign_block(SECRETS[i], NET, x.hash,
                                                                                          AUX))), net.now))
    assert net.disk_blocks[0] == {}
    net.execute(0, m0.receive(signed_by(2, 1, 1, Proposal(x)), net.now))  # proposer(1, 1) = 2 re-proposes x
    assert list(net.disk_blocks[0]) == [x.hash] and m0.height == 2
    assert len(net.disk_blocks[0][x.hash].commit.signers) == 3


def test_a_block_whose_commit_does_not_verify_is_refused() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    b = block_on(GENESIS, net.now, b"x")
    with pytest.raises(NotEnoughSignatures):
        m0.receive(signed_by(1, 1, 0, CompleteBlock(b, complete(b, (1, 2)))), net.now)
    forged = complete(b, (1, 2, 3))
    forged = Commit(4, forged.signers, forged.signatures[:2] + (sign_block(SECRETS[3], NET, bytes(32), AUX),))
    with pytest.raises(BadCommitSignature, match="member 3"):
        m0.receive(signed_by(1, 1, 0, CompleteBlock(b, forged)), net.now)
    with pytest.raises(BadCommitSignature):
        m0.receive_block(b, forged, 1, net.now)
    assert net.disk_blocks[0] == {} and m0.height == 1
    net.execute(0, m0.receive(signed_by(1, 1, 0, CompleteBlock(b, complete(b))), net.now))
    assert list(net.disk_blocks[0]) == [b.hash]


# ---- the signer rules in the machine ---------------------------------------------------------------------------

def _sign_without_completing(net: object, keep_sigs_to: tuple[int, ...] = ()) -> Candidate:
    """Round 0 of height 1: member 1 proposes, everyone precommits and signs; the signatures are lost (except to
    keep_sigs_to), so the block is signed by all but complete nowhere."""
    net.add_tx(b"t1")  # type: ignore[attr-defined]
    net.deliver(keep=lambda frm, to, msg: msg.kind is not Kind.SIGNATURE or to in keep_sigs_to)  # type: ignore
    proposal = net.sent(1, Kind.PROPOSAL)[0]  # type: ignore[attr-defined]
    assert isinstance(proposal.body, Proposal)
    return proposal.body.block


def _time_out(net: object, *members: int) -> None:
    """The members' round timers run out and their TIMEOUTs (the only messages queued) reach each other: the
    timeout certificate moves them to the next round. What they send then stays queued for the next deliver()."""
    net.advance(net.members[members[0]].deadline - net.now)  # type: ignore[attr-defined]
    net.deliver(keep=lambda frm, to, msg: frm in members and to in members, rounds=1)  # type: ignore[attr-defined]


def test_the_next_proposer_re_proposes_the_block_it_signed_and_signers_re_send() -> None:
    net = S.Lockstep(4)
    net.start()
    x = _sign_without_completing(net)
    assert all(net.members[i].signer.signed.block_hash == x.hash for i in range(4))  # type: ignore[union-attr]
    _time_out(net, 0, 1, 2, 3)
    second = net.sent(2, Kind.PROPOSAL)  # proposer(1, 1) = 2 signed x in round 0: it proposes x again
    assert [(p.round, p.body.block.hash) for p in second] == [(1, x.hash)]  # type: ignore[union-attr]
    net.deliver(keep=lambda frm, to, msg: msg.height == 1)  # height 1 only: x completes, height 2 waits
    assert all(x.hash in net.disk_blocks[i] for i in range(4))
    for i in range(4):  # the signature went out twice, the same bytes, and the state still says round 0
        sigs = {m.body.signature for m in net.sent(i, Kind.SIGNATURE)}  # type: ignore[union-attr]
        assert len(net.sent(i, Kind.SIGNATURE)) == 2 and len(sigs) == 1
        assert net.members[i].signer.signed.round == 0  # type: ignore[union-attr]


def test_a_later_round_block_on_the_same_parent_is_signed() -> None:
    """Member 2 (the next proposer) missed round 0's precommits so it signed nothing; it builds a new block in
    round 1 and the members who signed x sign it too: a later round, the same parent, no complete block."""
    net = S.Lockstep(4)
    net.start()
    net.add_tx(b"t1")
    net.deliver(keep=lambda frm, to, msg: msg.kind is not Kind.SIGNATURE and not (
        msg.kind is Kind.PRECOMMIT and to == 2))
    x = net.sent(1, Kind.PROPOSAL)[0].body.block  # type: ignore[union-attr]
    assert net.members[2].signer.signed is None
    net.advance(ROUND)
    net.deliver(keep=lambda frm, to, msg: msg.kind is Kind.TIMEOUT, rounds=1)  # round 1; its proposal stays queued
    y = net.sent(2, Kind.PROPOSAL)[0].body.block  # type: ignore[union-attr]
    assert y.hash != x.hash and y.parent == x.parent
    net.deliver()
    for i in range(4):
        assert y.hash in net.disk_blocks[i] and x.hash not in net.disk_blocks[i]
        assert net.members[i].signer.signed.block_hash == y.hash  # type: ignore[union-attr]


def test_crash_after_persisting_before_sending_never_signs_a_conflicting_block() -> None:
    """Crash point 1: the signer state is on disk, the signature never left. After a restart the member refuses a
    block on another parent at that height, and re-sends the identical signature for the block it signed."""
    net = S.Lockstep(4)
    net.start()
    x = _sign_without_completing(net)  # member 3's signature is lost with the others': x is complete nowhere
    net.down.add(3)
    state = decode_state(net.disk_signer[3], NET, KEYS[3])
    assert state.signed is not None and state.signed.height == 1
    x_hash = state.signed.block_hash
    assert x_hash == x.hash and all(x.hash not in net.disk_blocks[i] for i in range(4))
    m3 = net.boot(3)
    before = len(net.log[3])
    net.execute(3, m3.start(net.now))
    assert m3.signer == state and m3.round == state.signed.round
    other = block_on(replace(GENESIS, state_root=bytes(32)), net.now)  # another parent at height 1...
    assert not S.ToyLogic({}, net.disk_blocks[3].get).consensus_valid(GENESIS, other) is Validity.VALID
    from l2d.federation.signer import Verdict, decide
    assert decide(m3.signer.signed, 1, 5, other.hash, other.parent, False).verdict is Verdict.REFUSE
    # ...and the block it signed gets the very same signature again when re-proposed.
    net.advance(ROUND)
    net.deliver(keep=lambda frm, to, msg: msg.height == 1)
    assert all(x.hash in net.disk_blocks[i] for i in range(4))
    resent = [a.message.body for a in net.log[3][before:]
              if isinstance(a, Broadcast) and a.message.kind is Kind.SIGNATURE]
    assert resent and all(b.block_hash == x_hash and b.signature == state.signed.signature  # type: ignore
                          for b in resent)


def test_crash_after_sending_before_storing_catches_up_and_signs_on() -> None:
    """Crash point 2: the signature left, the block was never stored. The restarted member gets the complete
    block from the others and takes part in the next height."""
    net = S.Lockstep(4)
    net.start()
    net.add_tx(b"t1")
    net.deliver(keep=lambda frm, to, msg: not (to == 3 and msg.kind in (Kind.SIGNATURE, Kind.BLOCK)))
    assert heights(net)[3] == (1, 0, 0) and all(heights(net)[i][0] == 2 for i in (0, 1, 2))
    net.down.add(3)
    net.execute(3, net.boot(3).start(net.now))
    net.advance(ROUND)
    net.deliver()
    net.advance(ROUND)
    net.deliver()
    assert heights(net)[3][0] == heights(net)[0][0] == 3
    assert any(m.height == 2 for m in net.sent(3, Kind.SIGNATURE))  # it signs again at the next height


# ---- equivocation ----------------------------------------------------------------------------------------------

def test_two_proposals_from_one_proposer_are_dropped_and_kept_as_evidence() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    a, b = block_on(GENESIS, net.now, b"a"), block_on(GENESIS, net.now, b"b")
    first, second = signed_by(1, 1, 0, Proposal(a)), signed_by(1, 1, 0, Proposal(b))  # member 1's key, twice
    net.execute(0, m0.receive(first, net.now))
    assert [p.body.block_hash for p in net.sent(0, Kind.PRECOMMIT)] == [a.hash]  # type: ignore[union-attr]
    net.execute(0, m0.receive(second, net.now))
    net.execute(0, m0.receive(second, net.now))  # recorded once
    records = [x for x in net.log[0] if isinstance(x, RecordEvidence)]
    assert len(records) == 1 and m0.evidence == [records[0].evidence]
    ev = records[0].evidence
    assert (ev.proposer, ev.height, ev.round, ev.first.raw, ev.second.raw) == (1, 1, 0, first, second)
    Equivocation.from_raw(ev.first.raw, ev.second.raw, NET, net.fed)
    for i in (2, 3):  # m precommits for a arrive: member 0 does not sign in the poisoned round
        net.execute(0, m0.receive(signed_by(i, 1, 0, Precommit(a.hash)), net.now))
    assert net.sent(0, Kind.SIGNATURE) == [] and len(net.sent(0, Kind.PRECOMMIT)) == 1


# ---- finality, fork choice, catch-up ---------------------------------------------------------------------------

def test_complete_siblings_are_chosen_by_fork_choice_and_a_complete_child_makes_final() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    early, late = block_on(GENESIS, net.now, b"e"), block_on(GENESIS, net.now + 5, b"l")
    for blk in (early, late):
        net.execute(0, m0.receive(signed_by(1, 1, 0, CompleteBlock(blk, complete(blk))), net.now))
    stores = [a for a in net.log[0] if isinstance(a, StoreBlock)]
    assert [s.head.hash for s in stores] == [early.hash, late.hash]  # the later timestamp wins
    assert m0.final == GENESIS and m0.head.hash == late.hash and m0.height == 2
    child = block_on(early.header, net.now + 10, b"c")  # ...until a complete child of the other one appears
    net.execute(0, m0.receive(signed_by(2, 2, 0, CompleteBlock(child, complete(child))), net.now))
    assert m0.final.hash == early.hash and m0.head.hash == child.hash and [s.block.hash for s in m0.heads] == [
        child.hash]
    last = [a for a in net.log[0] if isinstance(a, StoreBlock)][-1]
    assert (last.final.hash, last.head.hash) == (early.hash, child.hash)


def test_a_member_bound_to_a_parent_proposes_on_it_not_on_its_fork_choice() -> None:
    """Member 2 signed a block at height 2 on `early`; later the complete sibling `late` (the fork choice) arrives.
    As proposer it may only get blocks on `early` signed by itself: it proposes on `early`."""
    net = S.Lockstep(4)
    net.start()
    early = block_on(GENESIS, net.now, b"e")
    net.execute(2, net.members[2].receive(signed_by(1, 1, 0, CompleteBlock(early, complete(early))), net.now))
    m2 = net.members[2]
    assert m2.height == 2
    x = block_on(early.header, net.now + 300, b"x")  # proposer(2, 0) = 2 would build itself; feed it the round
    m2.signer  # noqa: B018
    net.advance(300)
    net.queue.clear()
    prop = net.sent(2, Kind.PROPOSAL)
    if prop:  # member 2 proposed on its only head; take that block as the one it signs
        x = prop[0].body.block  # type: ignore[union-attr]
    for i in (0, 1):
        net.execute(2, m2.receive(signed_by(i, 2, 0, Precommit(x.hash)), net.now))
    assert m2.signer.signed is not None and m2.signer.signed.parent_hash == early.hash
    late = block_on(GENESIS, net.now + 50, b"l")
    net.execute(2, m2.receive(signed_by(1, 1, 0, CompleteBlock(late, complete(late))), net.now))
    assert m2.head.hash == late.hash  # fork choice moved...
    for r in range(1, 5):  # ...but in its next turn (round 4: proposer(2, 4) = 2) it proposes on early
        for i in (0, 1):
            net.execute(2, m2.receive(signed_by(i, 2, r - 1, Timeout(late.hash, 0)), net.now))
        net.advance(m2.deadline - net.now)
    props = [p for p in net.sent(2, Kind.PROPOSAL) if p.round == 4]
    assert len(props) == 1 and props[0].body.block.parent == early.hash  # type: ignore[union-attr]


def ahead_without_member_3() -> "S.Lockstep":
    """Four members; members 0-2 commit blocks while member 3 hears nothing, until member 0's final height is at
    least 3 (height 3's round 0 is member 3's: it passes to member 0 on a timeout certificate)."""
    net = S.Lockstep(4)
    net.start()
    for k in range(10):
        net.add_tx(b"t%d" % k, 0, 1, 2)
        net.deliver(keep=lambda frm, to, msg: to != 3 and frm != 3)
        net.advance(ROUND)
        net.deliver(keep=lambda frm, to, msg: to != 3 and frm != 3)
        if heights(net)[0][2] >= 3:
            break
    return net


def test_catch_up_applies_blocks_by_commit_and_validity_only_and_signs_only_at_the_tip() -> None:
    net = ahead_without_member_3()
    top = heights(net)[0]
    assert top[2] >= 3 and heights(net)[3] == (1, 0, 0)
    m3 = net.members[3]
    net.down.update({0, 1})  # their block stores do not answer member 3's first request
    net.execute(3, m3.receive(net.sent(0, Kind.STATUS)[-1].raw, net.now))
    net.execute(3, m3.receive(net.sent(1, Kind.STATUS)[-1].raw, net.now))
    assert m3.behind() and m3.height == 1  # two members (n - m + 1) report a higher height: it signs nothing...
    net.execute(3, m3.receive(net.sent(1, Kind.PROPOSAL)[0].raw, net.now))  # (it would precommit this one)
    assert net.sent(3, Kind.PRECOMMIT) == []
    net.down.difference_update({0, 1})
    net.logics[3].drift_ms = -10 ** 9  # member 3's local policy now refuses every block: catch-up ignores policy
    before = len(net.log[3])
    net.advance(m3.deadline - net.now)  # ...and asks one of them again on its next timer, once for all blocks
    fetches = [a for a in net.log[3][before:] if isinstance(a, FetchBlocks)]
    assert [f.from_height for f in fetches] == [1]
    assert heights(net)[3][0] == top[0] and not m3.behind()
    assert sorted(net.disk_blocks[3]) == sorted(net.disk_blocks[0])


def test_a_member_behind_is_told_where_the_others_are_once_per_height_and_fetches_at_once() -> None:
    """A restarted member's status reaches members ahead of it: each answers with its own status (once per height
    and member, however often the status comes), and the member behind fetches at once, not on its next timer."""
    net = ahead_without_member_3()
    m0, m3 = net.members[0], net.members[3]
    assert m0.height >= 4 and m3.height == 1
    behind = net.sent(3, Kind.STATUS)[-1].raw
    before = len(net.sent(0, Kind.STATUS))
    net.execute(0, m0.receive(behind, net.now))
    told = net.sent(0, Kind.STATUS)[before:]
    assert [(t.height, t.body.final_height) for t in told] == [(m0.height, m0.final.height)]  # type: ignore
    net.execute(0, m0.receive(behind, net.now))  # the same again: no second answer at this height
    assert len(net.sent(0, Kind.STATUS)) == before + 1
    start = len(net.log[3])
    net.execute(3, m3.receive(told[0].raw, net.now))  # no time passes: the fetch is not waiting for a timer
    assert [a.from_height for a in net.log[3][start:] if isinstance(a, FetchBlocks)] == [1]


def test_pending_validity_waits_for_wake() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    logic = net.logics[0]
    verdicts = [Validity.PENDING]
    real = logic.consensus_valid
    logic.consensus_valid = lambda parent, block: verdicts[-1] if verdicts[-1] is not Validity.VALID else real(
        parent, block)  # type: ignore[method-assign]
    b = block_on(GENESIS, net.now, b"x")
    net.execute(0, m0.receive(signed_by(1, 1, 0, Proposal(b)), net.now))
    assert net.sent(0, Kind.PRECOMMIT) == []  # transaction bodies missing: no verdict yet
    verdicts.append(Validity.VALID)
    net.execute(0, m0.wake(net.now))
    assert [p.body.block_hash for p in net.sent(0, Kind.PRECOMMIT)] == [b.hash]  # type: ignore[union-attr]


def test_messages_for_the_next_height_wait_for_it() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    b1 = block_on(GENESIS, net.now, b"1")
    b2 = block_on(b1.header, net.now + 300, b"2")
    net.execute(0, m0.receive(signed_by(2, 2, 0, Proposal(b2)), net.now))  # proposer(2, 0) = 2, early
    assert net.sent(0, Kind.PRECOMMIT) == []
    net.advance(300)  # b2's timestamp is not ahead of member 0's clock
    net.execute(0, m0.receive(signed_by(1, 1, 0, CompleteBlock(b1, complete(b1))), net.now))
    assert [(p.height, p.body.block_hash) for p in net.sent(0, Kind.PRECOMMIT)] == [(2, b2.hash)]  # type: ignore


def test_own_messages_coming_back_are_ignored() -> None:
    net = S.Lockstep(4)
    net.start()
    m0 = net.members[0]
    assert m0.receive(net.sent(0, Kind.STATUS)[0].raw, net.now) == []


# ---- the stall the signer rules allow --------------------------------------------------------------------------

def test_members_bound_to_different_parents_stall_until_a_free_member_returns() -> None:
    """The price of the signer rules (docs/federation.md): two complete siblings A and B at height 1; member 0
    signed a block on A at height 2, member 1 one on B. With member 3 away, neither parent can gather m = 3
    signers (1 bound + 1 free each): no block becomes final, nothing forks. When member 3 (free) returns, the
    A side (0, 2, 3) or the B side (1, 2, 3) completes and the federation moves on."""
    net = S.Lockstep(4)
    a, b = block_on(GENESIS, 2_000_000, b"a"), block_on(GENESIS, 2_000_001, b"b")
    for i in range(4):
        net.disk_blocks[i][a.hash] = StoredBlock(a, complete(a))
        net.disk_blocks[i][b.hash] = StoredBlock(b, complete(b, (1, 2, 3)))
    on_a, on_b = block_on(a.header, 2_000_100, b"xa"), block_on(b.header, 2_000_100, b"xb")
    bound = {0: on_a, 1: on_b}
    for i, blk in bound.items():
        net.disk_blocks[i][blk.hash] = StoredBlock(blk, Commit(4, (), ()))  # only to build the ToyLogic chain
    net.down.add(3)

    def signed_b(i: int) -> SignerState:  # the state of a member whose last signature is b's (round 1)
        return SignerState(Signed(1, 1, b.hash, GENESIS.hash, sign_block(SECRETS[i], NET, b.hash, AUX)))

    for i in range(3):
        st = signed_b(i)  # member 2 signed a in round 0, then b in round 1 (no complete block seen yet)
        if i in bound:
            blk = bound[i]
            st = SignerState(Signed(2, 0, blk.hash, blk.parent, sign_block(SECRETS[i], NET, blk.hash, AUX)))
        net.members[i] = Member(network=NET, members=net.fed, index=i, secret=SECRETS[i], timing=S.TIMING,
                                logic=net.logics[i], final=GENESIS,
                                heads=[StoredBlock(a, complete(a)), StoredBlock(b, complete(b, (1, 2, 3)))],
                                signer=st)
    for i in range(3):
        net.execute(i, net.members[i].start(net.now))
        net.add_tx(b"tx", i)
    for _ in range(12):
        net.advance(S.TIMING.max_round_ms)
        net.deliver(keep=lambda frm, to, msg: frm != 3 and to != 3)
    assert all(net.members[i].final == GENESIS for i in range(3))
    assert all(s.block.height == 1 for i in range(3) for s in net.members[i].heads)  # nothing stored at 2
    net.members[3] = Member(network=NET, members=net.fed, index=3, secret=SECRETS[3], timing=S.TIMING,
                            logic=net.logics[3], final=GENESIS,
                            heads=[StoredBlock(a, complete(a)), StoredBlock(b, complete(b, (1, 2, 3)))],
                            signer=signed_b(3))
    net.down.discard(3)
    net.execute(3, net.members[3].start(net.now))
    net.add_tx(b"tx", 3)
    for _ in range(12):
        net.advance(S.TIMING.max_round_ms)
        net.deliver()
    finals = {net.members[i].final.hash for i in range(4)}
    assert len(finals) == 1 and finals != {GENESIS.hash}

    def final_at_1(i: int) -> bytes:  # member i's final chain at height 1
        h = net.members[i].final.hash
        while net.disk_blocks[i][h].block.height > 1:
            h = net.disk_blocks[i][h].block.parent
        return h

    assert {final_at_1(i) for i in range(4)} in ({a.hash}, {b.hash})
