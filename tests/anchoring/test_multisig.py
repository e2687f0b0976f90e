"""The federation's k-of-n Taproot outputs (anchoring/multisig.py) without bitcoind: NUMS, leaf and tree bytes,
signatures, the witness and every refusal. tests/anchoring/test_multisig_regtest.py checks the same outputs against
bitcoind's descriptors and spends them."""
from __future__ import annotations

import hashlib

import pytest
from bitcoinutils.utils import tagged_hash
from coincurve import PrivateKey, PublicKeyXOnly

from anchoring.btc_tx import Prevout, TxOut, estimate_vsize, finalize, key_path_script, taproot_sighash
from anchoring.multisig import (NUMS_KEY, DuplicateSignature, FederationOutput, InvalidPolicy, InvalidSignature, KofN,
                                MemberSignature, NotEnoughSignatures, UnknownKey, WrongOutput, assemble,
                                commitment_leaf, dummy_witness, sighash, sign)
from l2d.core.anchor_format import AnchorRecord, Leaf, output_key, tapleaf_hash
from l2d.core.members import MAX_MEMBERS

SECRETS = [hashlib.sha256(b"l2d test key %d" % n).digest() for n in (1, 2, 3, 4)]
KEYS = [PrivateKey(s).public_key_xonly.format() for s in SECRETS]
OUTSIDER = hashlib.sha256(b"l2d test other key").digest()
RECORD = AnchorRecord(2, 10, b"\x42" * 32)
AUX = b"\x01" * 32

# 2-of-3 over test keys 1..3, sorted: 068a92.. (key 3) < 425ac6.. (key 2) < 753671.. (key 1).
LEAF_2_OF_3 = ("20068a92370a730d8967975e34d91755a5571b2cd6f11f4eab8bffb40cafca8353ac"
               "20425ac6b9422c09f21c2d0ae9b207196cdf26fb6c950f1941db05efad4b2b2a8fba"
               "20753671b667f8bcbca301a273ca7d784269a7c9fac9304772e26eb244ec87bddeba"
               "529c")


def test_nums_key_is_bip341s_point() -> None:
    """H = lift_x(SHA256(uncompressed G)), as BIP341 constructs it; a valid x-only key."""
    g = PrivateKey((1).to_bytes(32, "big")).public_key.format(compressed=False)
    assert g[0] == 4 and len(g) == 65
    assert hashlib.sha256(g).digest() == NUMS_KEY
    PublicKeyXOnly(NUMS_KEY)


def test_leaf_bytes_are_pinned_and_keys_sorted() -> None:
    policy = KofN.of(2, KEYS[:3])
    assert policy.script.hex() == LEAF_2_OF_3
    assert policy.keys == tuple(sorted(KEYS[:3])) and policy.n == 3
    assert KofN.of(2, reversed(KEYS[:3])) == policy  # any order in, one leaf out
    assert policy.leaf == Leaf(0xC0, bytes.fromhex(LEAF_2_OF_3))


@pytest.mark.parametrize("k, tail", [(1, "519c"), (16, "609c"), (17, "01119c"), (MAX_MEMBERS, "01409c")])
def test_threshold_is_a_minimal_push(k: int, tail: str) -> None:
    keys = [PrivateKey(hashlib.sha256(b"many %d" % i).digest()).public_key_xonly.format() for i in range(k)]
    script = KofN.of(k, keys).script
    assert script.hex().endswith(tail)
    assert len(script) == 34 * k + len(tail) // 2


def test_policy_refusals() -> None:
    with pytest.raises(InvalidPolicy, match="threshold k = 0"):
        KofN.of(0, KEYS)
    with pytest.raises(InvalidPolicy, match="threshold k = 5"):
        KofN.of(5, KEYS)
    with pytest.raises(InvalidPolicy, match="1..64 keys, not 0"):
        KofN.of(1, [])
    many = [PrivateKey(hashlib.sha256(b"many %d" % i).digest()).public_key_xonly.format()
            for i in range(MAX_MEMBERS + 1)]
    with pytest.raises(InvalidPolicy, match="not 65"):
        KofN.of(1, many)
    with pytest.raises(InvalidPolicy, match="appears twice"):
        KofN.of(2, [KEYS[0], KEYS[1], KEYS[0]])
    with pytest.raises(InvalidPolicy, match="33 bytes"):
        KofN.of(1, [b"\x02" + KEYS[0]])
    with pytest.raises(InvalidPolicy, match="not the x coordinate"):
        KofN.of(1, [b"\xff" * 32])  # above the field size
    with pytest.raises(InvalidPolicy, match="ascending"):
        KofN(1, tuple(sorted(KEYS, reverse=True)))


def test_anchor_output_commits_the_record_beside_the_k_of_n_leaf() -> None:
    policy = KofN.of(3, KEYS)
    anchor = FederationOutput.anchor(policy, RECORD)
    assert anchor.commitment == commitment_leaf(RECORD)
    assert commitment_leaf(RECORD).script == b"\x6a\x20" + RECORD.link  # OP_RETURN <link>: never satisfiable
    # The root is the TapBranch of the two leaf hashes; the output key is NUMS tweaked by it.
    a, b = sorted([tapleaf_hash(policy.leaf), tapleaf_hash(commitment_leaf(RECORD))])
    assert anchor.merkle_root == bytes(tagged_hash(a + b, "TapBranch"))
    assert anchor.output_key == output_key(NUMS_KEY, anchor.merkle_root)[0]
    assert anchor.script_pubkey == b"\x51\x20" + anchor.output_key
    # Control block: version|parity, NUMS, then the commitment leaf's hash, which an auditor checks against the link.
    cb = anchor.control_block
    assert len(cb) == 65 and cb[0] & 0xFE == 0xC0 and cb[0] & 1 == output_key(NUMS_KEY, anchor.merkle_root)[1]
    assert cb[1:33] == NUMS_KEY and cb[33:] == tapleaf_hash(commitment_leaf(RECORD))
    # Another record, another output; the same policy without a record is the federation's coin output.
    assert FederationOutput.anchor(policy, AnchorRecord(2, 10, b"\x43" * 32)).script_pubkey != anchor.script_pubkey
    coin = FederationOutput(policy)
    assert coin.merkle_root == tapleaf_hash(policy.leaf) and coin.control_block[1:] == NUMS_KEY
    assert coin.script_pubkey not in (anchor.script_pubkey, key_path_script(NUMS_KEY))
    assert anchor.matches(anchor.script_pubkey) and not anchor.matches(coin.script_pubkey)


def test_pinned_outputs() -> None:
    policy = KofN.of(2, KEYS[:3])
    anchor = FederationOutput.anchor(policy, RECORD)
    assert anchor.script_pubkey.hex() == "5120dbbd2e22c0adb56fe2d993138d3ecc8e2008bfbca349c0a5c653e4b1f3170296"
    assert anchor.control_block.hex() == ("c1" + NUMS_KEY.hex() +
                                          "4c00074d5cc51877fad76932954501f2b82f9eb5ec9c6b3979583c7651ca3f28")
    coin = FederationOutput(policy)
    assert coin.script_pubkey.hex() == "51204974f17f78c73f7c590bd3df32495ee7c750a48341ff233b61b6c86ecb5bef95"
    assert coin.control_block.hex() == "c1" + NUMS_KEY.hex()


# -- signing and the witness ------------------------------------------------------------------------------------
POLICY = KofN.of(3, KEYS)  # 3-of-4
ANCHOR = FederationOutput.anchor(POLICY, RECORD)
COIN = FederationOutput(POLICY)
INPUTS = [ANCHOR.prevout(b"\x11" * 32, 0, 100_000), COIN.prevout(b"\x22" * 32, 1, 50_000),
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
