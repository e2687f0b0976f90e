"""Transactions: envelope layout, strict decoding, BIP340 signatures, sighash and txid."""
from __future__ import annotations

import dataclasses
import hashlib
import struct
import subprocess
import sys
from typing import Callable

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core import tx as T
from l2d.core.codec import write_varint
from l2d.core.coin_tx import MAX_BURN_DESTINATION, Burn, Mint, Transfer
from l2d.core.errors import (BadSignature, DecodeError, NonMinimalVarint, OutOfRange, TrailingBytes, Truncated,
                             UnknownType, UnknownVersion, WrongNetwork)
from l2d.core.hashing import tagged_hash
from l2d.core.params import LOCAL, MAINNET, MAX_MONEY, REGTEST, SIGNET, Network
from l2d.core.payload import Payload, TxType
from l2d.core.tx import PAYLOAD_TYPES, Transaction, check_signature, decode, sign, signature_ok

# Helpers live in each test module: site-packages already holds a `tests` package (from base58check) that
# shadows this directory as a namespace package, so test modules cannot import each other reliably.
AUX0 = b"\0" * 32
# x = 5 is not the x-coordinate of any secp256k1 point (5**3 + 7 is a non-residue mod p).
NOT_ON_CURVE = (5).to_bytes(32, "big")
_HEAD = struct.Struct(">BBB32sQQ")


def secret(n: int) -> bytes:
    """Secret of deterministic test key n."""
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def raw_tx(*, version: int = 1, net: int = 1, typ: int = 1, sender: bytes = b"\x02" * 32, nonce: int = 0,
           fee: int = 0, payload: bytes = b"", length: bytes | None = None, sig: bytes = b"\0" * 64) -> bytes:
    """Transaction bytes assembled straight from docs/transaction-format.md, without any validation."""
    return (_HEAD.pack(version, net, typ, sender, nonce, fee)
            + (write_varint(len(payload)) if length is None else length) + payload + sig)


def transfer_payload(recipient: bytes, amount: int) -> bytes:
    return recipient + amount.to_bytes(8, "big")


def burn_payload(amount: int, destination: bytes = b"") -> bytes:
    return amount.to_bytes(8, "big") + write_varint(len(destination)) + destination


A, B = pubkey(1), pubkey(2)
HEAD = 3 + 32 + 8 + 8


def _samples() -> dict[str, Transaction]:
    return {
        "transfer": sign(LOCAL, secret(1), 7, 10, Transfer(B, 12_345), AUX0),
        "mint": sign(REGTEST, secret(1), 0, 0, Mint(B, MAX_MONEY), AUX0),
        "burn": sign(LOCAL, secret(1), 2**64 - 1, MAX_MONEY, Burn(1, b"bc1q-destination"), bytes(range(32))),
        "burn-empty-dest": sign(LOCAL, secret(2), 3, 1, Burn(500), AUX0),
    }


SAMPLES = _samples()
NET = {"transfer": LOCAL, "mint": REGTEST, "burn": LOCAL, "burn-empty-dest": LOCAL}


def flip_bit(b: bytes, bit: int) -> bytes:
    m = bytearray(b)
    m[bit >> 3] ^= 0x80 >> (bit & 7)
    return bytes(m)


def with_raw(tx: Transaction, raw: bytes) -> Transaction:
    """The same object pointing at other bytes (fields that check_signature reads come from raw)."""
    return dataclasses.replace(tx, raw=raw, sender=raw[3:35], signature=raw[-64:])


# ---------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", SAMPLES)
def test_sign_decode_round_trip(name: str) -> None:
    tx = SAMPLES[name]
    got = decode(tx.raw, NET[name])
    assert got == tx
    assert got.encode() == tx.raw
    check_signature(got)
    assert signature_ok(tx.raw)


def test_transfer_layout_matches_the_spec() -> None:
    tx = SAMPLES["transfer"]
    payload = transfer_payload(B, 12_345)
    expected_body = raw_tx(net=LOCAL.id, typ=1, sender=A, nonce=7, fee=10, payload=payload, sig=b"")
    assert tx.raw[:-64] == expected_body
    assert len(tx.raw) == HEAD + 1 + 40 + 64
    assert tx.sender == A and tx.nonce == 7 and tx.fee_sat == 10 and tx.type == TxType.TRANSFER
    assert tx.raw[-64:] == tx.signature


def test_mint_and_burn_layout_matches_the_spec() -> None:
    mint = SAMPLES["mint"]
    assert mint.raw[:-64] == raw_tx(net=REGTEST.id, typ=2, sender=A, nonce=0, fee=0,
                                    payload=transfer_payload(B, MAX_MONEY), sig=b"")
    burn = SAMPLES["burn"]
    assert burn.raw[:-64] == raw_tx(net=LOCAL.id, typ=3, sender=A, nonce=2**64 - 1, fee=MAX_MONEY,
                                    payload=burn_payload(1, b"bc1q-destination"), sig=b"")
    assert SAMPLES["burn-empty-dest"].payload == Burn(500, b"")


def test_signing_is_deterministic_given_aux() -> None:
    a = sign(LOCAL, secret(1), 0, 1, Transfer(B, 5), AUX0)
    b = sign(LOCAL, secret(1), 0, 1, Transfer(B, 5), AUX0)
    c = sign(LOCAL, secret(1), 0, 1, Transfer(B, 5), b"\x01" * 32)
    assert a.raw == b.raw
    assert c.raw[:-64] == a.raw[:-64] and c.signature != a.signature


# ---------------------------------------------------------------------------------------------- strictness


@pytest.mark.parametrize("name", SAMPLES)
def test_every_truncation_is_truncated(name: str) -> None:
    raw = SAMPLES[name].raw
    for cut in range(len(raw)):
        with pytest.raises(Truncated):
            decode(raw[:cut], NET[name])


@pytest.mark.parametrize("name", SAMPLES)
def test_trailing_bytes_rejected(name: str) -> None:
    raw = SAMPLES[name].raw
    for tail in (b"\0", b"\xff", b"\0" * 10):
        with pytest.raises(TrailingBytes):
            decode(raw + tail, NET[name])


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    raw = bytearray(SAMPLES["transfer"].raw)
    raw[0] = version
    with pytest.raises(UnknownVersion):
        decode(bytes(raw), LOCAL)


@pytest.mark.parametrize("typ", [0, 15, 255])  # numbers no subsystem uses (l2d/core/tx.py TxType)
def test_unknown_type(typ: int) -> None:
    raw = bytearray(SAMPLES["transfer"].raw)
    raw[2] = typ
    with pytest.raises(UnknownType):
        decode(bytes(raw), LOCAL)


def test_wrong_network() -> None:
    raw = SAMPLES["transfer"].raw
    for net in (REGTEST, SIGNET, MAINNET):
        with pytest.raises(WrongNetwork):
            decode(raw, net)
    other = bytearray(raw)
    other[1] = 0x7F
    with pytest.raises(WrongNetwork):
        decode(bytes(other), LOCAL)


@pytest.mark.parametrize("typ", [1, 2])
def test_transfer_and_mint_payload_length_mismatch(typ: int) -> None:
    good = transfer_payload(B, 5)
    assert decode(raw_tx(typ=typ, payload=good), LOCAL).payload.amount_sat == 5  # type: ignore[union-attr]
    for bad in (good[:-1], good + b"\0", b"", good * 2):
        with pytest.raises(DecodeError):
            decode(raw_tx(typ=typ, payload=bad), LOCAL)


def test_burn_payload_strictness() -> None:
    assert decode(raw_tx(typ=3, payload=burn_payload(5, b"d" * 128)), LOCAL).payload == Burn(5, b"d" * 128)
    with pytest.raises(TrailingBytes):
        decode(raw_tx(typ=3, payload=burn_payload(5, b"dest") + b"\0"), LOCAL)
    with pytest.raises(Truncated):
        decode(raw_tx(typ=3, payload=burn_payload(5, b"dest")[:-1]), LOCAL)
    with pytest.raises(Truncated):
        decode(raw_tx(typ=3, payload=(5).to_bytes(8, "big")), LOCAL)  # destination length missing
    with pytest.raises(OutOfRange):
        decode(raw_tx(typ=3, payload=burn_payload(5, b"d" * 129)), LOCAL)
    with pytest.raises(NonMinimalVarint):
        decode(raw_tx(typ=3, payload=(5).to_bytes(8, "big") + b"\xfd\x04\x00dest"), LOCAL)


@pytest.mark.parametrize("amount", [0, MAX_MONEY + 1, 2**64 - 1])
def test_amount_out_of_range(amount: int) -> None:
    for typ, payload in [(1, transfer_payload(B, amount)), (2, transfer_payload(B, amount)),
                         (3, burn_payload(amount))]:
        with pytest.raises(OutOfRange):
            decode(raw_tx(typ=typ, payload=payload), LOCAL)


def test_amount_and_fee_limits_are_inclusive() -> None:
    tx = decode(raw_tx(typ=1, fee=MAX_MONEY, payload=transfer_payload(B, MAX_MONEY)), LOCAL)
    assert tx.fee_sat == MAX_MONEY and tx.payload.amount_sat == MAX_MONEY  # type: ignore[union-attr]
    assert decode(raw_tx(typ=3, payload=burn_payload(1)), LOCAL).payload == Burn(1)


@pytest.mark.parametrize("fee", [MAX_MONEY + 1, 2**64 - 1])
def test_fee_above_max_money(fee: int) -> None:
    with pytest.raises(OutOfRange):
        decode(raw_tx(typ=1, fee=fee, payload=transfer_payload(B, 1)), LOCAL)


def test_oversize_transaction() -> None:
    assert T.MAX_TX_SIZE == 51 + 3 + T.MAX_PAYLOAD + 64
    with pytest.raises(OutOfRange):
        decode(b"\x01" * (T.MAX_TX_SIZE + 1), LOCAL)
    big = raw_tx(typ=3, payload=burn_payload(1, b"d" * (T.MAX_PAYLOAD - 11)))
    assert len(big) == T.MAX_TX_SIZE
    with pytest.raises(OutOfRange):  # the burn destination limit, not the size limit, applies here
        decode(big, LOCAL)
    with pytest.raises(OutOfRange):  # payload length above MAX_PAYLOAD is refused before reading it
        decode(raw_tx(typ=3, length=b"\xfd" + (T.MAX_PAYLOAD + 1).to_bytes(2, "little"), payload=b""), LOCAL)


def test_non_minimal_payload_length() -> None:
    payload = transfer_payload(B, 5)
    assert decode(raw_tx(typ=1, length=b"\x28", payload=payload), LOCAL).payload == Transfer(B, 5)
    for length in (b"\xfd\x28\x00", b"\xfe\x28\x00\x00\x00", b"\xff\x28" + b"\0" * 7):
        with pytest.raises(NonMinimalVarint):
            decode(raw_tx(typ=1, length=length, payload=payload), LOCAL)


def test_encode_body_rejects_out_of_range_fields() -> None:
    p = Transfer(B, 1)
    for kwargs in [dict(sender=A[:31]), dict(sender=A + b"\0"), dict(nonce=-1), dict(nonce=2**64),
                   dict(fee_sat=-1), dict(fee_sat=MAX_MONEY + 1)]:
        args = dict(network_id=1, sender=A, nonce=0, fee_sat=0, payload=p) | kwargs
        with pytest.raises(OutOfRange):
            T.encode_body(**args)  # type: ignore[arg-type]
    with pytest.raises(OutOfRange):
        T.encode_body(1, A, 0, 0, Burn(1, b"d" * T.MAX_PAYLOAD))


@pytest.mark.parametrize("make", [
    lambda: Transfer(B, 0), lambda: Transfer(B, MAX_MONEY + 1), lambda: Mint(B, 0), lambda: Burn(0),
    lambda: Burn(1, b"d" * 129), lambda: Transfer(B[:31], 1), lambda: Transfer(B + b"\x01", 1),
], ids=["transfer-0", "transfer-max+1", "mint-0", "burn-0", "burn-dest-129", "recipient-31", "recipient-33"])
def test_payloads_that_decode_would_reject_cannot_be_built(make: Callable[[], Payload]) -> None:
    # Validation lives in the payload constructors, so sign() can never produce bytes decode() refuses.
    with pytest.raises(OutOfRange):
        make()


# ---------------------------------------------------------------------------------------------- signatures


@pytest.mark.parametrize("name", SAMPLES)
def test_any_flipped_bit_breaks_the_signature(name: str) -> None:
    tx, net = SAMPLES[name], NET[name]
    for bit in range(8 * len(tx.raw)):
        raw = flip_bit(tx.raw, bit)
        assert not signature_ok(raw), bit
        with pytest.raises(BadSignature):
            check_signature(with_raw(tx, raw))
        try:
            decoded = decode(raw, net)
        except DecodeError:
            continue
        with pytest.raises(BadSignature):
            check_signature(decoded)


@pytest.mark.parametrize("sender", [NOT_ON_CURVE, b"\xff" * 32, b"\0" * 32], ids=["x=5", "x>=p", "x=0"])
def test_sender_not_on_curve(sender: bytes) -> None:
    tx = SAMPLES["transfer"]
    raw = tx.raw[:3] + sender + tx.raw[35:]
    decoded = decode(raw, LOCAL)  # decoding does not parse keys; signature checking does
    assert decoded.sender == sender
    with pytest.raises(BadSignature):
        check_signature(decoded)
    assert not signature_ok(raw)


def test_signature_by_another_key_over_the_same_body() -> None:
    tx = SAMPLES["transfer"]
    forged = tx.raw[:-64] + PrivateKey(secret(2)).sign_schnorr(tx.sighash, AUX0)
    assert not signature_ok(forged)
    with pytest.raises(BadSignature):
        check_signature(decode(forged, LOCAL))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_signature_ok_agrees_with_check_signature(name: str, data: st.DataObject) -> None:
    tx = SAMPLES[name]
    raw = tx.raw
    if data.draw(st.booleans()):
        bits = data.draw(st.lists(st.integers(0, 8 * len(raw) - 1), min_size=1, max_size=3, unique=True))
        for b in bits:
            raw = flip_bit(raw, b)
    try:
        check_signature(with_raw(tx, raw))
        checked = True
    except BadSignature:
        checked = False
    assert signature_ok(raw) is checked
    assert checked is (raw == tx.raw)


# ---------------------------------------------------------------------------------------------- hashes


@pytest.mark.parametrize("name", SAMPLES)
def test_txid_and_sighash_definitions(name: str) -> None:
    tx = SAMPLES[name]
    assert tx.txid == tagged_hash("l2d/tx/id", tx.raw)
    assert tx.sighash == tagged_hash("l2d/tx/sighash", tx.raw[:-64])
    assert tx.sighash == tagged_hash("l2d/tx/sighash", T.encode_body(tx.network_id, tx.sender, tx.nonce,
                                                                     tx.fee_sat, tx.payload))


@pytest.mark.parametrize("name", SAMPLES)
def test_txid_changes_with_any_byte(name: str) -> None:
    tx = SAMPLES[name]
    seen = {tx.txid}
    for i in range(len(tx.raw)):
        for mask in (0x01, 0x80):
            m = bytearray(tx.raw)
            m[i] ^= mask
            seen.add(with_raw(tx, bytes(m)).txid)
    assert len(seen) == 1 + 2 * len(tx.raw)


def test_sighash_excludes_the_signature() -> None:
    a = sign(LOCAL, secret(1), 0, 1, Transfer(B, 5), AUX0)
    b = sign(LOCAL, secret(1), 0, 1, Transfer(B, 5), b"\x5a" * 32)
    assert a.signature != b.signature and a.txid != b.txid
    assert a.sighash == b.sighash
    check_signature(a)
    check_signature(b)
    # the sighash commits to the network, type and every body field
    variants = [sign(REGTEST, secret(1), 0, 1, Transfer(B, 5), AUX0), sign(LOCAL, secret(1), 0, 1, Mint(B, 5), AUX0),
                sign(LOCAL, secret(1), 1, 1, Transfer(B, 5), AUX0), sign(LOCAL, secret(1), 0, 2, Transfer(B, 5), AUX0),
                sign(LOCAL, secret(1), 0, 1, Transfer(B, 6), AUX0), sign(LOCAL, secret(1), 0, 1, Transfer(A, 5), AUX0)]
    assert len({a.sighash} | {v.sighash for v in variants}) == 1 + len(variants)


# ---------------------------------------------------------------------------------------------- properties

amounts = st.integers(min_value=1, max_value=MAX_MONEY)
payloads = st.one_of(
    st.builds(Transfer, st.binary(min_size=32, max_size=32), amounts),
    st.builds(Mint, st.binary(min_size=32, max_size=32), amounts),
    st.builds(Burn, amounts, st.binary(max_size=MAX_BURN_DESTINATION)),
)


@settings(max_examples=150, deadline=None)
@given(key=st.integers(1, 4), net=st.sampled_from([LOCAL, REGTEST, SIGNET, MAINNET]),
       nonce=st.integers(0, 2**64 - 1), fee=st.integers(0, MAX_MONEY), payload=payloads,
       aux=st.binary(min_size=32, max_size=32))
def test_random_fields_round_trip(key: int, net: Network, nonce: int, fee: int, payload: Payload,
                                  aux: bytes) -> None:
    tx = sign(net, secret(key), nonce, fee, payload, aux)
    got = decode(tx.raw, net)
    assert got == tx
    assert (got.network_id, got.sender, got.nonce, got.fee_sat, got.payload) == (net.id, pubkey(key), nonce, fee,
                                                                                 payload)
    assert type(got.payload) is type(payload)
    check_signature(got)
    assert signature_ok(got.raw)


def _mutate(raw: bytes, data: st.DataObject) -> bytes:
    m = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 4))):
        what = data.draw(st.sampled_from(["set", "insert", "delete"]))
        i = data.draw(st.integers(0, max(0, len(m) - 1)))
        if what == "set" and m:
            m[i] = data.draw(st.integers(0, 255))
        elif what == "insert":
            m[i:i] = data.draw(st.binary(min_size=1, max_size=3))
        elif m:
            del m[i]
    return bytes(m)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(SAMPLES)), st.data())
def test_decode_of_mutated_bytes_is_strict_and_canonical(name: str, data: st.DataObject) -> None:
    """Anything decode() accepts re-encodes to exactly the input; everything else raises a DecodeError."""
    raw = _mutate(SAMPLES[name].raw, data)
    try:
        t = decode(raw, NET[name])
    except DecodeError:
        return
    assert T.encode_body(t.network_id, t.sender, t.nonce, t.fee_sat, t.payload) + t.signature == raw
    assert t.raw == raw and t.signature == raw[-64:]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decode_of_random_bytes_raises_only_decode_errors(raw: bytes) -> None:
    try:
        t = decode(raw, LOCAL)
    except DecodeError:
        return
    assert T.encode_body(t.network_id, t.sender, t.nonce, t.fee_sat, t.payload) + t.signature == raw


def test_every_type_has_a_payload_class_that_names_it() -> None:
    assert set(PAYLOAD_TYPES) == set(TxType)
    for typ, cls in PAYLOAD_TYPES.items():
        assert cls.TYPE == typ


def test_importing_tx_alone_decodes_every_type() -> None:
    # A fresh interpreter: which types decode must not depend on what else was imported first.
    code = ("import l2d.core.tx as T, l2d.core.payload as P; import sys; "
            "assert set(T.PAYLOAD_TYPES) == set(P.TxType); "
            "assert 'l2d.core.rules' not in sys.modules and 'l2d.core.state' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
