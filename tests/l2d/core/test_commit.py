"""Block commits: threshold signatures of member keys over (network, block hash); strict codec; every way a
commit can fail to prove the federation signed a block is a typed CommitError."""
from __future__ import annotations

import hashlib

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from l2d.core.commit import Commit, commit_sighash, sign_block, signature_valid
from l2d.core.errors import BadCommitSignature, DecodeError, NotEnoughSignatures, OutOfRange, TrailingBytes, Truncated
from l2d.core.members import MAX_MEMBERS, Membership
from l2d.core.params import LOCAL, REGTEST

SECRETS = [hashlib.sha256(b"member %d" % i).digest() for i in range(MAX_MEMBERS)]
KEYS = tuple(PrivateKey(s).public_key_xonly.format() for s in SECRETS)
FED = Membership(KEYS[:4], 3)
BLOCK = hashlib.sha256(b"a block").digest()
AUX = bytes(32)


def commit_of(signers: list[int], fed: Membership = FED, block: bytes = BLOCK) -> Commit:
    return Commit.assemble(fed.n, {i: sign_block(SECRETS[i], LOCAL, block, AUX) for i in signers})


def test_threshold_signatures_verify() -> None:
    for signers in ([0, 1, 2], [1, 2, 3], [0, 1, 2, 3], [3, 0, 2]):
        c = commit_of(signers)
        assert c.signers == tuple(sorted(signers))
        c.verify(FED, LOCAL, BLOCK)


def test_the_signature_commits_to_network_and_block() -> None:
    assert commit_sighash(LOCAL, BLOCK) != commit_sighash(REGTEST, BLOCK)
    sig = sign_block(SECRETS[0], LOCAL, BLOCK, AUX)
    assert signature_valid(KEYS[0], LOCAL, BLOCK, sig)
    assert not signature_valid(KEYS[0], REGTEST, BLOCK, sig)
    assert not signature_valid(KEYS[1], LOCAL, BLOCK, sig)
    assert not signature_valid(KEYS[0], LOCAL, bytes(32), sig)
    with pytest.raises(OutOfRange):
        commit_sighash(LOCAL, BLOCK[:31])


def test_every_failing_commit_is_a_typed_error() -> None:
    with pytest.raises(NotEnoughSignatures, match="threshold is 3"):
        commit_of([0, 1]).verify(FED, LOCAL, BLOCK)
    with pytest.raises(BadCommitSignature, match="member 2"):  # a signature over another block
        good = commit_of([0, 1])
        other = sign_block(SECRETS[2], LOCAL, bytes(32), AUX)
        Commit(4, (0, 1, 2), good.signatures + (other,)).verify(FED, LOCAL, BLOCK)
    with pytest.raises(BadCommitSignature, match="member 3"):  # member 2 signed, the bitmap names member 3
        c = commit_of([0, 1, 2])
        Commit(4, (0, 1, 3), c.signatures).verify(FED, LOCAL, BLOCK)
    with pytest.raises(BadCommitSignature):  # signed for another network
        Commit.assemble(4, {i: sign_block(SECRETS[i], REGTEST, BLOCK, AUX) for i in range(3)}).verify(
            FED, LOCAL, BLOCK)
    with pytest.raises(NotEnoughSignatures, match="5 members"):  # made for another federation
        commit_of([0, 1, 2], Membership(KEYS[:5], 4)).verify(FED, LOCAL, BLOCK)


def test_layout() -> None:
    c = commit_of([0, 2, 3])
    assert c.encode() == bytes((4, 0b1101)) + b"".join(c.signatures)
    wide = commit_of(list(range(0, 10, 3)), Membership(KEYS[:10], 7))
    assert wide.encode()[:3] == bytes((10, 0b01001001, 0b10))


@given(n=st.integers(1, MAX_MEMBERS), data=st.data())
def test_round_trip(n: int, data: st.DataObject) -> None:
    signers = data.draw(st.sets(st.integers(0, n - 1)))
    c = Commit(n, tuple(sorted(signers)), tuple(bytes([i]) * 64 for i in sorted(signers)))
    assert Commit.decode(c.encode()) == c


def test_decoding_is_strict() -> None:
    raw = commit_of([0, 1, 2]).encode()
    with pytest.raises(Truncated):
        Commit.decode(b"")
    with pytest.raises(OutOfRange):
        Commit.decode(b"\x00")
    with pytest.raises(OutOfRange):
        Commit.decode(bytes((MAX_MEMBERS + 1,)) + raw[1:])
    with pytest.raises(Truncated):
        Commit.decode(raw[:1])
    with pytest.raises(Truncated):
        Commit.decode(raw[:-1])
    with pytest.raises(TrailingBytes):
        Commit.decode(raw + b"\0")
    with pytest.raises(DecodeError, match="above member 3"):
        Commit.decode(raw[:1] + bytes((raw[1] | 0x10,)) + raw[2:] + bytes(64))


def test_construction_is_checked() -> None:
    with pytest.raises(OutOfRange):
        Commit(4, (1, 0), (bytes(64), bytes(64)))
    with pytest.raises(OutOfRange):
        Commit(4, (0, 0), (bytes(64), bytes(64)))
    with pytest.raises(OutOfRange):
        Commit(4, (4,), (bytes(64),))
    with pytest.raises(OutOfRange):
        Commit(4, (0,), (bytes(63),))
