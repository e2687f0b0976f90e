"""The federation's k-of-n Taproot outputs (l2d/core/kofn.py): NUMS, leaf and tree bytes, every policy refusal, and
the policy's strict encoding in an audit bundle. Signing them is tests/anchoring/test_multisig.py;
tests/anchoring/test_multisig_regtest.py checks the same outputs against bitcoind's descriptors."""
from __future__ import annotations

import hashlib

import pytest
from bitcoinutils.utils import tagged_hash
from coincurve import PrivateKey, PublicKeyXOnly

from l2d.core.anchor_format import AnchorRecord, Leaf, output_key, p2tr_script, tapleaf_hash
from l2d.core.codec import Reader
from l2d.core.errors import DecodeError, TrailingBytes, Truncated
from l2d.core.kofn import NUMS_KEY, FederationOutput, InvalidPolicy, KofN, commitment_leaf
from l2d.core.members import MAX_MEMBERS

SECRETS = [hashlib.sha256(b"l2d test key %d" % n).digest() for n in (1, 2, 3, 4)]
KEYS = [PrivateKey(s).public_key_xonly.format() for s in SECRETS]
RECORD = AnchorRecord(2, 10, b"\x42" * 32)

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
    nums_key_path = p2tr_script(output_key(NUMS_KEY, None)[0])
    assert coin.script_pubkey not in (anchor.script_pubkey, nums_key_path)
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




# -- the policy's encoding (an audit bundle's k-of-n anchor) -------------------------------------------------------
def _read(raw: bytes) -> KofN:
    r = Reader(raw, "policy")
    policy = KofN.read(r)
    r.end()
    return policy


def test_encoding_round_trips() -> None:
    policy = KofN.of(3, KEYS)
    raw = policy.encode()
    assert raw == bytes((3, 4)) + b"".join(sorted(KEYS)) and len(raw) == 2 + 4 * 32
    assert _read(raw) == policy
    big = KofN.of(MAX_MEMBERS, [PrivateKey(hashlib.sha256(b"many %d" % i).digest()).public_key_xonly.format()
                                for i in range(MAX_MEMBERS)])
    assert _read(big.encode()) == big


def test_decoding_refusals() -> None:
    keys = b"".join(sorted(KEYS))
    cases = {
        "k = 0": (bytes((0, 4)) + keys, InvalidPolicy, "threshold k = 0"),
        "k > n": (bytes((5, 4)) + keys, InvalidPolicy, "threshold k = 5 is outside 1..4"),
        "n = 0": (bytes((1, 0)), InvalidPolicy, "not 0"),
        "n > 64": (bytes((1, 65)) + keys, InvalidPolicy, "not 65"),  # refused on the count, before reading keys
        "unsorted": (bytes((2, 4)) + b"".join(sorted(KEYS, reverse=True)), InvalidPolicy, "ascending"),
        "duplicate": (bytes((2, 4)) + keys[:64] + keys[32:64] + keys[96:], InvalidPolicy, "appears twice"),
        "not on the curve": (bytes((1, 1)) + b"\xff" * 32, InvalidPolicy, "not the x coordinate"),
        "keys run out": (bytes((2, 4)) + keys[:-1], Truncated, "needs 32 bytes"),
        "a key too many": (bytes((2, 3)) + keys, TrailingBytes, None),
    }
    for name, (raw, error, message) in cases.items():
        with pytest.raises(error, match=message):
            _read(raw)
        assert issubclass(error, DecodeError), name  # l2-verify: malformed input, exit 2
    assert issubclass(InvalidPolicy, ValueError)
