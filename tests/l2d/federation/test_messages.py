"""Member protocol messages: each kind round-trips; decoding is strict, refuses unknown senders and bad signatures
with typed errors; equivocation evidence verifies only for two conflicting proposals."""
from __future__ import annotations

import hashlib
import struct

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.block import BlockHeader, tx_root
from l2d.core.commit import Commit, sign_block
from l2d.core.errors import (DecodeError, L2Error, OutOfRange, TrailingBytes, Truncated, UnknownType, UnknownVersion,
                             WrongNetwork)
from l2d.core.hashing import H_FED_MESSAGE
from l2d.core.members import Membership
from l2d.core.params import LOCAL, REGTEST
from l2d.federation.errors import (BadBlockSignature, BadEvidence, BadMessageSignature, InconsistentMessage,
                                   UnknownMember)
from l2d.federation.messages import (AUX, HEAD_SIZE, BlockSignature, Candidate, CompleteBlock, Equivocation, Kind,
                                     Precommit, Proposal, Status, Timeout, decode_message, sign_message)

SECRETS = [hashlib.sha256(b"member %d" % i).digest() for i in range(5)]
PRIV = [PrivateKey(s) for s in SECRETS]
KEYS = tuple(k.public_key_xonly.format() for k in PRIV)
FED = Membership(KEYS[:4], 3)
PARENT = BlockHeader(LOCAL.id, 6, bytes(32), 1000, 0, tx_root([]), bytes(32))
TXIDS = tuple(hashlib.sha256(b"tx %d" % i).digest() for i in range(3))


def block(txids: tuple[bytes, ...] = TXIDS, ts: int = 2000, height: int = 7) -> Candidate:
    return Candidate(BlockHeader(LOCAL.id, height, PARENT.hash, ts, len(txids), tx_root(list(txids)), b"\1" * 32),
                     txids)


def commit(b: Candidate, signers: tuple[int, ...] = (0, 1, 2)) -> Commit:
    return Commit.assemble(4, {i: sign_block(SECRETS[i], LOCAL, b.hash, AUX) for i in signers})


def bodies() -> list[object]:
    b = block()
    return [Status(b.hash, 5), Timeout(b.hash, 5), Proposal(b), Precommit(b.hash),
            BlockSignature(b.hash, sign_block(SECRETS[1], LOCAL, b.hash, AUX)), CompleteBlock(b, commit(b))]


def signed(body: object, sender: int = 1, height: int = 7, round_: int = 3) -> bytes:
    return sign_message(PRIV[sender], LOCAL, sender, height, round_, body).raw  # type: ignore[arg-type]


def resign(unsigned: bytes, sender: int = 1) -> bytes:
    """A message whose signature is valid over whatever bytes it carries (so only the field checks can refuse)."""
    return unsigned + PRIV[sender].sign_schnorr(H_FED_MESSAGE(unsigned), AUX)


@pytest.mark.parametrize("body", bodies(), ids=lambda b: type(b).__name__)
def test_every_kind_round_trips(body: object) -> None:
    raw = signed(body, round_=0 if isinstance(body, CompleteBlock) else 3)
    msg = decode_message(raw, LOCAL, FED)
    assert (msg.network_id, msg.sender, msg.height, msg.body, msg.raw) == (LOCAL.id, 1, 7, body, raw)
    assert msg.kind is body.KIND  # type: ignore[attr-defined]


def test_layout() -> None:
    b = block()
    raw = signed(Precommit(b.hash), sender=2, height=7, round_=3)
    assert raw[:HEAD_SIZE] == struct.pack(">BBBBQI", 1, LOCAL.id, Kind.PRECOMMIT, 2, 7, 3)
    assert raw[HEAD_SIZE:-64] == b.hash
    assert PRIV[2].public_key_xonly.verify(raw[-64:], H_FED_MESSAGE(raw[:-64]))
    assert len(signed(Status(b.hash, 5))) == HEAD_SIZE + 40 + 64
    assert signed(Proposal(b))[HEAD_SIZE:-64] == b.header.encode() + bytes((3,)) + b"".join(TXIDS)


def test_signing_is_reproducible() -> None:
    assert signed(Precommit(bytes(32))) == signed(Precommit(bytes(32)))


def test_structural_errors_are_typed() -> None:
    raw = signed(Precommit(block().hash))
    with pytest.raises(Truncated):
        decode_message(raw[:10], LOCAL, FED)
    with pytest.raises(Truncated):
        decode_message(raw[:-1], LOCAL, FED)
    with pytest.raises(TrailingBytes):
        decode_message(raw + b"\0", LOCAL, FED)
    with pytest.raises(UnknownVersion):
        decode_message(bytes((2,)) + raw[1:], LOCAL, FED)
    with pytest.raises(WrongNetwork):
        decode_message(raw, REGTEST, FED)
    with pytest.raises(UnknownType):
        decode_message(raw[:2] + bytes((9,)) + raw[3:], LOCAL, FED)
    with pytest.raises(OutOfRange, match="height 0"):
        decode_message(resign(struct.pack(">BBBBQI", 1, LOCAL.id, Kind.PRECOMMIT, 1, 0, 0) + bytes(32)), LOCAL, FED)
    with pytest.raises(OutOfRange, match="txids"):  # a count above the block limit, refused before reading
        decode_message(resign(struct.pack(">BBBBQI", 1, LOCAL.id, Kind.PROPOSAL, 1, 7, 0) + block().header.encode()
                              + b"\xfe" + (10 ** 6).to_bytes(4, "little")), LOCAL, FED)
    with pytest.raises(OutOfRange):
        sign_message(PRIV[1], LOCAL, 1, 0, 0, Precommit(bytes(32)))


def test_unknown_senders_and_bad_signatures_are_refused() -> None:
    body = Precommit(block().hash)
    with pytest.raises(UnknownMember, match="member 4"):  # a key outside the federation, sending as index 4
        decode_message(signed(body, sender=4), LOCAL, FED)
    raw = bytearray(signed(body, sender=1))
    raw[3] = 2  # claims to be member 2, signed by member 1
    with pytest.raises(BadMessageSignature, match="member 2"):
        decode_message(bytes(raw), LOCAL, FED)
    raw = bytearray(signed(body))
    raw[-1] ^= 1
    with pytest.raises(BadMessageSignature):
        decode_message(bytes(raw), LOCAL, FED)
    raw = bytearray(signed(body))
    raw[HEAD_SIZE] ^= 1  # the body changed after signing
    with pytest.raises(BadMessageSignature):
        decode_message(bytes(raw), LOCAL, FED)
    other = sign_message(PRIV[1], REGTEST, 1, 7, 3, body).raw  # signed for another network, relabelled
    with pytest.raises(BadMessageSignature):
        decode_message(other[:1] + bytes((LOCAL.id,)) + other[2:], LOCAL, FED)


def test_inconsistent_fields_are_refused() -> None:
    b = block()
    with pytest.raises(InconsistentMessage, match="carries block 7"):  # envelope height 8, block 7
        decode_message(signed(Proposal(b), height=8), LOCAL, FED)
    wrong_root = Candidate(BlockHeader(LOCAL.id, 7, PARENT.hash, 2000, 3, bytes(32), b"\1" * 32), TXIDS)
    with pytest.raises(InconsistentMessage, match="transaction root"):
        decode_message(signed(Proposal(wrong_root)), LOCAL, FED)
    miscounted = Candidate(BlockHeader(LOCAL.id, 7, PARENT.hash, 2000, 2, tx_root(list(TXIDS)), b"\1" * 32), TXIDS)
    with pytest.raises(InconsistentMessage, match="counts 2"):
        decode_message(signed(Proposal(miscounted)), LOCAL, FED)
    with pytest.raises(InconsistentMessage, match="round 3"):
        decode_message(signed(CompleteBlock(b, commit(b)), round_=3), LOCAL, FED)
    five = Commit.assemble(5, {i: sign_block(SECRETS[i], LOCAL, b.hash, AUX) for i in range(4)})
    with pytest.raises(InconsistentMessage, match="5 members"):
        decode_message(signed(CompleteBlock(b, five), round_=0), LOCAL, FED)
    with pytest.raises(InconsistentMessage, match="final height 7"):
        decode_message(signed(Status(b.hash, 7)), LOCAL, FED)
    with pytest.raises(InconsistentMessage, match="final height 9"):
        decode_message(signed(Timeout(b.hash, 9)), LOCAL, FED)
    with pytest.raises(BadBlockSignature, match="member 1"):  # member 2's block signature sent by member 1
        decode_message(signed(BlockSignature(b.hash, sign_block(SECRETS[2], LOCAL, b.hash, AUX))), LOCAL, FED)
    with pytest.raises(BadBlockSignature):  # a block signature for another block
        decode_message(signed(BlockSignature(b.hash, sign_block(SECRETS[1], LOCAL, bytes(32), AUX))), LOCAL, FED)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_messages_raise_typed_errors_only(data: st.DataObject) -> None:
    """Flip, drop, insert bytes anywhere, re-signed or not: a decoder either returns the message the bytes
    encode, or raises an L2Error; nothing else escapes."""
    raw = bytearray(signed(data.draw(st.sampled_from(bodies())), round_=0))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(("flip", "insert", "delete", "truncate")))
        if op == "flip" and i < len(raw):
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "insert":
            raw[i:i] = bytes((data.draw(st.integers(0, 255)),))
        elif op == "delete":
            del raw[i:i + 1]
        else:
            del raw[i:]
    candidate = bytes(raw)
    if data.draw(st.booleans()) and len(candidate) > 64:
        candidate = resign(candidate[:-64], sender=candidate[3] % 4 if len(candidate) > 3 else 1)
    try:
        msg = decode_message(candidate, LOCAL, FED)
    except L2Error:
        return
    assert msg.raw == candidate


def test_evidence_of_two_proposals() -> None:
    a, b = block(ts=2000), block(ts=2001)
    first, second = signed(Proposal(a), sender=2), signed(Proposal(b), sender=2)
    ev = Equivocation.from_raw(first, second, LOCAL, FED)
    assert (ev.proposer, ev.height, ev.round) == (2, 7, 3)
    with pytest.raises(BadEvidence, match="same block"):
        Equivocation.from_raw(first, signed(Proposal(a), sender=2), LOCAL, FED)
    with pytest.raises(BadEvidence, match="one member"):
        Equivocation.from_raw(first, signed(Proposal(b), sender=2, round_=4), LOCAL, FED)
    with pytest.raises(BadEvidence, match="one member"):
        Equivocation.from_raw(first, signed(Proposal(b), sender=1), LOCAL, FED)
    with pytest.raises(BadEvidence, match="PROPOSAL"):
        Equivocation.from_raw(first, signed(Precommit(b.hash), sender=2), LOCAL, FED)
    with pytest.raises(BadMessageSignature):  # evidence is only as good as the signatures in it
        Equivocation.from_raw(first, second[:-1] + bytes((second[-1] ^ 1,)), LOCAL, FED)
    with pytest.raises(DecodeError):
        Equivocation.from_raw(first, b"", LOCAL, FED)
