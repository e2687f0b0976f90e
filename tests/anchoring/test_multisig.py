"""Signing the federation's k-of-n Taproot outputs (anchoring/multisig.py) without bitcoind: the script-path sighash,
signatures, the witness and every refusal. The outputs themselves are tests/l2d/core/test_kofn.py;
tests/anchoring/test_multisig_regtest.py spends them on bitcoind."""
from __future__ import annotations

import hashlib

import pytest
from coincurve import PrivateKey, PublicKeyXOnly

from anchoring.btc_tx import Prevout, TxOut, estimate_vsize, finalize, key_path_script, taproot_sighash
from anchoring.multisig import (DuplicateSignature, InvalidSignature, MemberSignature, NotEnoughSignatures, UnknownKey,
                                WrongOutput, assemble, dummy_witness, prevout, sighash, sign)
from l2d.core.anchor_format import AnchorRecord
from l2d.core.kofn import FederationOutput, KofN

SECRETS = [hashlib.sha256(b"l2d test key %d" % n).digest() for n in (1, 2, 3, 4)]
KEYS = [PrivateKey(s).public_key_xonly.format() for s in SECRETS]
OUTSIDER = hashlib.sha256(b"l2d test other key").digest()
RECORD = AnchorRecord(2, 10, b"\x42" * 32)
AUX = b"\x01" * 32



# -- signing and the witness ------------------------------------------------------------------------------------
POLICY = KofN.of(3, KEYS)  # 3-of-4
ANCHOR = FederationOutput.anchor(POLICY, RECORD)
COIN = FederationOutput(POLICY)
INPUTS = [prevout(ANCHOR, b"\x11" * 32, 0, 100_000), prevout(COIN, b"\x22" * 32, 1, 50_000),
          Prevout(b"\x33" * 32, 2, 20_000, key_path_script(KEYS[0]))]
OUTPUTS = [TxOut(169_000, COIN.script_pubkey)]


def _sigs(output: FederationOutput, index: int, secrets: list[bytes]) -> list[MemberSignature]:
    return [sign(s, output, INPUTS, OUTPUTS, index, AUX) for s in secrets]


def test_sighash_is_the_script_path_digest_of_the_leaf() -> None:
    msg = sighash(ANCHOR, INPUTS, OUTPUTS, 0)
    assert msg == taproot_sighash(INPUTS, OUTPUTS, 0, 0xFFFFFFFD, POLICY.script)
    assert msg != taproot_sighash(INPUTS, OUTPUTS, 0, 0xFFFFFFFD)  # the key-path digest
    assert msg != taproot_sighash(INPUTS, OUTPUTS, 0, 0xFFFFFFFD, KofN.of(2, KEYS).script)  # another leaf
    assert sighash(COIN, INPUTS, OUTPUTS, 1) == taproot_sighash(INPUTS, OUTPUTS, 1, 0xFFFFFFFD, POLICY.script) != msg


def test_member_signs_its_input() -> None:
    s = sign(SECRETS[2], ANCHOR, INPUTS, OUTPUTS, 0, AUX)
    assert s.key == KEYS[2] and len(s.signature) == 64
    assert PublicKeyXOnly(KEYS[2]).verify(s.signature, sighash(ANCHOR, INPUTS, OUTPUTS, 0))
    assert not PublicKeyXOnly(KEYS[2]).verify(s.signature, sighash(COIN, INPUTS, OUTPUTS, 1))
    with pytest.raises(UnknownKey, match="signer key"):
        sign(OUTSIDER, ANCHOR, INPUTS, OUTPUTS, 0, AUX)
    with pytest.raises(WrongOutput, match="input 1 spends"):
        sign(SECRETS[0], ANCHOR, INPUTS, OUTPUTS, 1, AUX)  # input 1 is the coin output, not the anchor
    with pytest.raises(WrongOutput, match="input 3 does not exist"):
        sign(SECRETS[0], ANCHOR, INPUTS, OUTPUTS, 3, AUX)


def test_assemble_orders_the_witness_for_checksigadd() -> None:
    """Members 1, 3 and 4 sign (member 2 absent): for each key from the last in the leaf to the first, its
    signature or an empty vector; then the leaf script and the control block."""
    sigs = _sigs(ANCHOR, 0, [SECRETS[3], SECRETS[0], SECRETS[2]])  # given in any order
    stack = assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs)
    by_key = {s.key: s.signature for s in sigs}
    assert stack == [by_key.get(k, b"") for k in reversed(POLICY.keys)] + [POLICY.script, ANCHOR.control_block]
    assert stack.count(b"") == 1 and len(stack) == 4 + 2
    assert stack[list(reversed(POLICY.keys)).index(KEYS[1])] == b""


def test_assemble_uses_exactly_k_signatures() -> None:
    """The leaf wants exactly k valid signatures: with all four, the three of the first keys in the leaf are used."""
    stack = assemble(ANCHOR, INPUTS, OUTPUTS, 0, _sigs(ANCHOR, 0, SECRETS))
    assert [bool(x) for x in stack[:4]] == [False, True, True, True]  # the last key (bottom of the stack) left out
    assert stack[0] == b""


def test_assemble_refusals() -> None:
    sigs = _sigs(ANCHOR, 0, SECRETS[:3])
    with pytest.raises(NotEnoughSignatures, match="2 valid signatures for input 0, 3 needed"):
        assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs[:2])
    with pytest.raises(DuplicateSignature, match=KEYS[0].hex()):
        assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs + [sigs[0]])
    outsider = PrivateKey(OUTSIDER)
    foreign = MemberSignature(outsider.public_key_xonly.format(),
                              outsider.sign_schnorr(sighash(ANCHOR, INPUTS, OUTPUTS, 0), AUX))
    with pytest.raises(UnknownKey, match="not one of the 4 keys"):
        assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs + [foreign])
    # An outsider's signature under a member's key, a tampered one, one for another input, a 65-byte one.
    with pytest.raises(InvalidSignature, match="does not verify"):
        assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs[:2] + [MemberSignature(KEYS[3], foreign.signature)])
    tampered = MemberSignature(sigs[1].key, sigs[1].signature[:10] + bytes([sigs[1].signature[10] ^ 1]) +
                               sigs[1].signature[11:])
    with pytest.raises(InvalidSignature, match="does not verify"):
        assemble(ANCHOR, INPUTS, OUTPUTS, 0, [sigs[0], tampered, sigs[2]])
    with pytest.raises(InvalidSignature, match="does not verify"):
        assemble(COIN, INPUTS, OUTPUTS, 1, sigs)
    with pytest.raises(InvalidSignature, match="65 bytes"):
        assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs[:2] + [MemberSignature(sigs[2].key, sigs[2].signature + b"\x01")])
    with pytest.raises(WrongOutput):
        assemble(ANCHOR, INPUTS, OUTPUTS, 2, sigs)
    assert len(assemble(ANCHOR, INPUTS, OUTPUTS, 0, sigs)) == 6  # the same signatures, correctly, pass


def test_dummy_witness_gives_the_exact_vsize() -> None:
    real = finalize(INPUTS, OUTPUTS, [assemble(ANCHOR, INPUTS, OUTPUTS, 0, _sigs(ANCHOR, 0, SECRETS[1:])),
                                      assemble(COIN, INPUTS, OUTPUTS, 1, _sigs(COIN, 1, SECRETS[:3])),
                                      [b"\0" * 64]])
    dummy = finalize(INPUTS, OUTPUTS, [dummy_witness(ANCHOR), dummy_witness(COIN), [b"\0" * 64]])
    assert real.vsize == dummy.vsize and real.txid == dummy.txid and real.fee_sat == 1_000
    assert real.vsize > estimate_vsize(3, OUTPUTS)  # script paths weigh more than key paths
    with pytest.raises(ValueError, match="2 witness stacks for 3 inputs"):
        finalize(INPUTS, OUTPUTS, [[b""], [b""]])
