"""AnchorUpdate (type 4): payload layout, strict decoding, member authority, zero fee, nonce replay, duplicates."""
from __future__ import annotations

import hashlib
import struct

import pytest
from coincurve import PrivateKey

from l2d.core import tx as T
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.codec import write_varint
from l2d.core.errors import (BadNonce, DecodeError, DuplicateDuty, InvalidTransaction, OutOfRange, Unauthorized,
                             UnknownType)
from l2d.core.params import LOCAL, REGTEST
from l2d.core.payload import TxType
from l2d.core.rules import apply_tx
from l2d.core.state import FEDERATION_MEMBERS_KEY, Namespace, Rules, StateView, genesis_state
from l2d.core.tx import decode, sign

AUX = b"\0" * 32
ROOT, TXID, BLOCK = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32
ZERO = b"\0" * 32


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


FED, FED2, OTHER = 7, 6, 8  # FED and FED2: the federation members
RULES = Rules(REGTEST, 1)


def confirmed(height: int = 5) -> AnchorUpdate:
    return AnchorUpdate(height, ROOT, TXID, BLOCK, 101, AnchorStatus.CONFIRMED)


def state_with_authority() -> dict[bytes, bytes]:
    return genesis_state([(pubkey(1), 1000)], pubkey(9), (pubkey(FED), pubkey(FED2)))


def test_payload_layout_and_round_trip() -> None:
    p = confirmed()
    raw = p.encode()
    assert len(raw) == 109
    assert raw == struct.pack(">Q", 5) + ROOT + TXID + BLOCK + struct.pack(">I", 101) + b"\x02"
    assert AnchorUpdate.decode(raw) == p
    tx = sign(REGTEST, secret(FED), 0, 0, p, AUX)
    assert tx.type == TxType.ANCHOR == 4
    back = decode(tx.encode(), REGTEST)
    assert back == tx and back.payload == p
    assert isinstance(back.payload.status, AnchorStatus)
    submitted = AnchorUpdate(9, ROOT, TXID, ZERO, 0, AnchorStatus.SUBMITTED)
    assert AnchorUpdate.decode(submitted.encode()) == submitted


@pytest.mark.parametrize("raw", [
    confirmed().encode()[:-1],  # truncated
    confirmed().encode() + b"\0",  # trailing
    confirmed().encode()[:-1] + b"\x00",  # status 0
    confirmed().encode()[:-1] + b"\x04",  # status 4
    struct.pack(">Q", 5) + ROOT + TXID + ZERO + struct.pack(">I", 101) + b"\x02",  # confirmed without block
    struct.pack(">Q", 5) + ROOT + TXID + BLOCK + struct.pack(">I", 0) + b"\x03",  # final without height
    struct.pack(">Q", 5) + ROOT + TXID + BLOCK + struct.pack(">I", 7) + b"\x01",  # submitted with a block
])
def test_strict_decoding(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        AnchorUpdate.decode(raw)
    tx_raw = (struct.pack(">BBB32sQQ", 1, REGTEST.id, 4, pubkey(FED), 0, 0) + write_varint(len(raw)) + raw
              + b"\0" * 64)
    with pytest.raises(DecodeError):
        decode(tx_raw, REGTEST)


def test_constructor_ranges() -> None:
    with pytest.raises(OutOfRange):
        AnchorUpdate(-1, ROOT, TXID, BLOCK, 1, AnchorStatus.FINAL)
    with pytest.raises(OutOfRange):
        AnchorUpdate(1, ROOT, TXID, BLOCK, 2**32, AnchorStatus.FINAL)
    with pytest.raises(OutOfRange):
        AnchorUpdate(1, ROOT[:31], TXID, BLOCK, 1, AnchorStatus.FINAL)
    with pytest.raises(OutOfRange):
        AnchorUpdate(1, ROOT, TXID, BLOCK, 1, True)  # type: ignore[arg-type]


def test_unassigned_type_refused() -> None:
    raw = struct.pack(">BBB32sQQ", 1, REGTEST.id, 15, pubkey(FED), 0, 0) + b"\x00" + b"\0" * 64
    with pytest.raises(UnknownType):
        decode(raw, REGTEST)


def test_apply_writes_state_record_without_account() -> None:
    base = state_with_authority()
    view = StateView(base.get)
    tx = sign(REGTEST, secret(FED), 0, 0, confirmed(5), AUX)
    apply_tx(view, tx, RULES)
    key = anchor_key(5)
    assert key[0] == Namespace.ANCHOR and len(key) == 33 and key[1:] == (5).to_bytes(32, "big")
    entry = AnchorEntry.decode(view.writes[key])  # type: ignore[arg-type]
    assert entry == AnchorEntry(ROOT, TXID, BLOCK, 101, AnchorStatus.CONFIRMED)
    assert len(entry.encode()) == 101
    # the sender's nonce advanced, its balance is untouched (0)
    assert view.account(pubkey(FED)) is not None and view.account(pubkey(FED)).nonce == 1  # type: ignore[union-attr]
    # a later update for the same height replaces the record
    tx2 = sign(REGTEST, secret(FED), 1, 0, AnchorUpdate(5, ROOT, TXID, BLOCK, 101, AnchorStatus.FINAL), AUX)
    apply_tx(view, tx2, RULES)
    assert AnchorEntry.decode(view.writes[key]).status == AnchorStatus.FINAL  # type: ignore[arg-type]


@pytest.mark.parametrize("member", [FED, FED2])
def test_every_member_may_post_with_its_own_nonces(member: int) -> None:
    view = StateView(state_with_authority().get)
    apply_tx(view, sign(REGTEST, secret(member), 0, 0, confirmed(5), AUX), RULES)
    apply_tx(view, sign(REGTEST, secret(FED + FED2 - member), 0, 0, confirmed(6), AUX), RULES)  # the other's nonce 0
    assert AnchorEntry.decode(view.writes[anchor_key(5)]).status == AnchorStatus.CONFIRMED  # type: ignore[arg-type]
    assert view.account(pubkey(FED)).nonce == view.account(pubkey(FED2)).nonce == 1  # type: ignore[union-attr]


def test_only_members() -> None:
    base = state_with_authority()
    view = StateView(base.get)
    with pytest.raises(Unauthorized):
        apply_tx(view, sign(REGTEST, secret(OTHER), 0, 0, confirmed(), AUX), RULES)
    # the mint authority is not a member
    with pytest.raises(Unauthorized):
        apply_tx(view, sign(REGTEST, secret(9), 0, 0, confirmed(), AUX), RULES)
    assert view.writes == {}
    # a chain without members refuses every anchor update
    plain = genesis_state([(pubkey(1), 1000)], pubkey(9))
    assert FEDERATION_MEMBERS_KEY not in plain
    with pytest.raises(Unauthorized):
        apply_tx(StateView(plain.get), sign(REGTEST, secret(FED), 0, 0, confirmed(), AUX), RULES)


def test_recording_what_is_recorded_is_a_duplicate_duty() -> None:
    base = dict(state_with_authority())
    view = StateView(base.get)
    apply_tx(view, sign(REGTEST, secret(FED), 0, 0, confirmed(5), AUX), RULES)
    base.update(view.writes)  # type: ignore[arg-type]
    for member, payload in ((FED2, confirmed(5)), (FED, confirmed(5))):  # another member's copy, or my own again
        view = StateView(base.get)
        with pytest.raises(DuplicateDuty) as info:
            apply_tx(view, sign(REGTEST, secret(member), 1 if member == FED else 0, 0, payload, AUX), RULES)
        assert info.value.reason == "duplicate-duty" and view.writes == {}
    # a non-member hears Unauthorized, not that the record is there
    with pytest.raises(Unauthorized):
        apply_tx(StateView(base.get), sign(REGTEST, secret(OTHER), 0, 0, confirmed(5), AUX), RULES)
    # moving the record on (another status, another transaction) is not a duplicate
    for upd in (AnchorUpdate(5, ROOT, TXID, BLOCK, 101, AnchorStatus.FINAL),
                AnchorUpdate(5, ROOT, b"\x44" * 32, BLOCK, 101, AnchorStatus.CONFIRMED),
                AnchorUpdate(5, ROOT, TXID, b"\x55" * 32, 102, AnchorStatus.CONFIRMED)):
        apply_tx(StateView(base.get), sign(REGTEST, secret(FED2), 0, 0, upd, AUX), RULES)


def test_fee_must_be_zero() -> None:
    base = state_with_authority()
    view = StateView(base.get)
    with pytest.raises(InvalidTransaction):
        apply_tx(view, sign(REGTEST, secret(FED), 0, 1, confirmed(), AUX), RULES)
    assert view.writes == {}


def test_replay_by_nonce_refused() -> None:
    base = state_with_authority()
    view = StateView(base.get)
    tx = sign(REGTEST, secret(FED), 0, 0, confirmed(), AUX)
    apply_tx(view, tx, RULES)
    before = dict(view.writes)
    with pytest.raises(BadNonce):
        apply_tx(view, tx, RULES)
    assert view.writes == before


def test_wrong_network_signature_domain() -> None:
    tx = sign(LOCAL, secret(FED), 0, 0, confirmed(), AUX)
    with pytest.raises(DecodeError):
        decode(tx.encode(), REGTEST)
    assert T.PAYLOAD_TYPES[4] is AnchorUpdate
