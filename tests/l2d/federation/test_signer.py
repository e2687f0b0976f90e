"""The signer's safety state: each rule of decide(), the strict file format, durable saving, and the refusal of a
damaged, foreign or stale state (never a silent reset)."""
from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import pytest
from coincurve import PrivateKey

from l2d.core.commit import Commit, sign_block
from l2d.core.params import LOCAL, REGTEST
from l2d.federation.errors import SignerStateCorrupt, SignerStateMismatch, StaleSignerState
from l2d.federation.messages import AUX
from l2d.federation.signer import (FILE_SIZE, MAGIC, Signed, SignerState, Verdict, check_not_stale, decide,
                                   decode_state, encode_state, load_state, save_state)

SECRET = hashlib.sha256(b"signer").digest()
KEY = PrivateKey(SECRET).public_key_xonly.format()
OTHER_KEY = PrivateKey(hashlib.sha256(b"other").digest()).public_key_xonly.format()
P, Q = b"P" * 32, b"Q" * 32  # two parents
X, Y = b"X" * 32, b"Y" * 32  # two blocks


def signed(height: int = 10, round_: int = 2, block: bytes = X, parent: bytes = P) -> Signed:
    return Signed(height, round_, block, parent, sign_block(SECRET, LOCAL, block, AUX))


LAST = signed()


@pytest.mark.parametrize("height, round_, block, parent, complete, verdict, reason", [
    (9, 5, Y, P, False, Verdict.REFUSE, "below my last signed height"),  # below: refuse, whatever else
    (9, 5, X, P, False, Verdict.REFUSE, "below my last signed height"),
    (11, 0, Y, Q, True, Verdict.SIGN, "nothing signed"),  # above: sign (the rules start afresh)
    (10, 2, X, P, False, Verdict.RESEND, "the block I signed"),  # same height and block: the same signature
    (10, 0, X, P, True, Verdict.RESEND, "the block I signed"),  # ...in any round, complete block or not
    (10, 3, Y, Q, False, Verdict.REFUSE, "another parent"),  # other parent: never
    (10, 99, Y, Q, False, Verdict.REFUSE, "another parent"),
    (10, 2, Y, P, False, Verdict.REFUSE, "not later"),  # same parent, same round
    (10, 1, Y, P, False, Verdict.REFUSE, "not later"),  # same parent, earlier round
    (10, 3, Y, P, True, Verdict.REFUSE, "complete block"),  # later round, but a complete block exists
    (10, 3, Y, P, False, Verdict.SIGN, "same parent"),  # later round, same parent, none complete: sign
])
def test_signer_rules(height: int, round_: int, block: bytes, parent: bytes, complete: bool, verdict: Verdict,
                      reason: str) -> None:
    d = decide(LAST, height, round_, block, parent, complete)
    assert d.verdict is verdict
    assert reason in d.reason


def test_a_fresh_signer_signs() -> None:
    assert decide(None, 1, 0, X, P, False).verdict is Verdict.SIGN


def test_one_proposal_per_round() -> None:
    s = SignerState(None, (10, 3))
    assert not s.may_propose(10, 3) and not s.may_propose(10, 2) and not s.may_propose(9, 7)
    assert s.may_propose(10, 4) and s.may_propose(11, 0) and SignerState().may_propose(1, 0)


@pytest.mark.parametrize("state", [SignerState(), SignerState(LAST), SignerState(None, (4, 1)),
                                   SignerState(LAST, (10, 7))])
def test_round_trip(state: SignerState) -> None:
    raw = encode_state(state, LOCAL, KEY)
    assert len(raw) == FILE_SIZE == 227
    assert decode_state(raw, LOCAL, KEY) == state


def test_layout() -> None:
    raw = encode_state(SignerState(LAST, (10, 7)), LOCAL, KEY)
    assert raw[:8] == MAGIC and raw[8:10] == bytes((1, LOCAL.id)) and raw[10:42] == KEY
    assert raw[42] == 1 and struct.unpack(">QI", raw[43:55]) == (10, 2)
    assert raw[55:87] == X and raw[87:119] == P and raw[119:183] == LAST.signature
    assert struct.unpack(">QI", raw[183:195]) == (10, 7)
    assert raw[195:] == hashlib.sha256(raw[:195]).digest()


def _with_checksum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_damaged_files_are_refused() -> None:
    raw = encode_state(SignerState(LAST, (10, 7)), LOCAL, KEY)
    body = raw[:-32]
    cases = {
        "227": raw[:-1],  # truncated
        "expected 227": raw + b"\0",
        "checksum": raw[:50] + bytes((raw[50] ^ 1,)) + raw[51:],  # a flipped bit
        "magic": _with_checksum(b"l2dsignx" + body[8:]),
        "version 2": _with_checksum(body[:8] + b"\2" + body[9:]),
        "flag 2": _with_checksum(body[:42] + b"\2" + body[43:]),
        "does not verify": _with_checksum(body[:55] + Y + body[87:]),  # the signature is for X
        "height 0": _with_checksum(body[:43] + bytes(8) + body[51:]),
        "without a proposal height": _with_checksum(body[:183] + bytes(8) + body[191:]),
    }
    empty = encode_state(SignerState(), LOCAL, KEY)[:-32]
    cases["nothing was signed"] = _with_checksum(empty[:43] + struct.pack(">Q", 5) + empty[51:])
    for reason, data in cases.items():
        with pytest.raises(SignerStateCorrupt, match=reason):
            decode_state(data, LOCAL, KEY)
    with pytest.raises(SignerStateCorrupt):
        decode_state(b"", LOCAL, KEY)


def test_a_state_of_another_network_or_member_is_refused() -> None:
    raw = encode_state(SignerState(LAST), LOCAL, KEY)
    with pytest.raises(SignerStateMismatch, match="network id 1"):
        decode_state(raw, REGTEST, KEY)
    with pytest.raises(SignerStateMismatch, match="member key"):
        decode_state(raw, LOCAL, OTHER_KEY)


def test_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "signer.state"
    assert load_state(path, LOCAL, KEY) == SignerState()  # a member that never signed
    save_state(path, SignerState(LAST), LOCAL, KEY)
    assert load_state(path, LOCAL, KEY) == SignerState(LAST)
    later = SignerState(signed(11, 0, Y, X), (11, 0))
    save_state(path, later, LOCAL, KEY)
    assert load_state(path, LOCAL, KEY) == later
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer.state"]


def test_a_damaged_file_is_never_read_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "signer.state"
    save_state(path, SignerState(LAST), LOCAL, KEY)
    path.write_bytes(b"")  # e.g. zeroed by a broken disk
    with pytest.raises(SignerStateCorrupt):
        load_state(path, LOCAL, KEY)
    path.write_bytes(encode_state(SignerState(LAST), LOCAL, KEY)[:100])
    with pytest.raises(SignerStateCorrupt):
        load_state(path, LOCAL, KEY)


def test_a_failed_write_leaves_the_old_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "signer.state"
    save_state(path, SignerState(LAST), LOCAL, KEY)

    def no_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_fsync)  # the failure a real disk gives only when full
    with pytest.raises(OSError):
        save_state(path, SignerState(signed(11, 0, Y, X)), LOCAL, KEY)
    monkeypatch.undo()
    assert load_state(path, LOCAL, KEY) == SignerState(LAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signer.state"]


def test_a_state_older_than_my_stored_signatures_is_stale() -> None:
    def commit(signers: tuple[int, ...]) -> Commit:
        return Commit(4, signers, tuple(bytes(64) for _ in signers))

    check_not_stale(SignerState(LAST), 1, [(10, commit((0, 1, 2))), (11, commit((0, 2, 3)))])
    check_not_stale(SignerState(), 1, [(3, commit((0, 2, 3)))])  # signed by others only
    with pytest.raises(StaleSignerState, match="height 11"):
        check_not_stale(SignerState(LAST), 1, [(11, commit((1, 2, 3)))])
    with pytest.raises(StaleSignerState, match="up to height 0"):
        check_not_stale(SignerState(), 1, [(1, commit((1, 2, 3)))])  # the file was lost, the chain remembers
