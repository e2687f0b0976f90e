"""The federation's k-of-n Taproot outputs: a tapscript OP_CHECKSIGADD leaf under BIP341's NUMS internal key.

The output half of issue 13's federation outputs: the k-of-n policy and its leaf (Bitcoin Core's multi_a), the
anchor record's commitment leaf (OP_RETURN <link>), and the P2TR output with or without it. Pure and
consensus-critical: the daemon and the verifier (an audit bundle of a k-of-n anchor, l2d.core.audit) both use it.
Signing (the script-path sighash, each member's signature, the witness) is bridge/federation.py's in the daemon
(anchoring/multisig.py is the tests' reference). Byte layouts:
docs/anchoring.md, "Federation outputs (k-of-n)"; the policy's encoding in an audit bundle: docs/audit-bundle.md.

Tree hashing and the output tweak are l2d.core.anchor_format's (BIP341-vector tested); keys are libsecp256k1
(coincurve).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from bitcoinutils.script import Script
from bitcoinutils.transactions import Transaction
from coincurve import PublicKeyXOnly

from .anchor_format import (LEAF_VERSION_TAPSCRIPT, OP_RETURN, AnchorRecord, Leaf, ScriptTree, control_block,
                            output_key, p2tr_script, tree_root)
from .codec import Reader
from .errors import DecodeError
from .members import MAX_MEMBERS

# BIP341's provably unspendable internal key H = lift_x(SHA256(uncompressed encoding of G)): "constructed by taking
# the hash of the standard uncompressed encoding of the secp256k1 base point G as X coordinate". Finding its
# discrete logarithm would need a SHA-256 output that happens to be the x coordinate of a point whose discrete log
# the finder knows: nobody knows one, so the key path of an output with this internal key cannot be spent and only
# the script tree can move the coin. Used as is (not H + rG with a secret r, BIP341's suggestion for privacy), so
# that anyone can see from a control block that the output has no key path.
NUMS_KEY = bytes.fromhex("50929b74c1a04954b78b4b6035e97a5e078a5a0f28ec96d547bfee9ace803ac0")

OP_CHECKSIG, OP_CHECKSIGADD, OP_NUMEQUAL, OP_1 = 0xAC, 0xBA, 0x9C, 0x51
PUSH_32 = 0x20


class InvalidPolicy(DecodeError, ValueError):
    """k, n or the keys do not make a k-of-n leaf (1 <= k <= n <= MAX_MEMBERS, distinct valid x-only keys in
    ascending order). A DecodeError for the verifier (a malformed audit bundle), a ValueError for callers."""


def _push_threshold(k: int) -> bytes:
    """k as Bitcoin Core's CScript() << k writes it: OP_1..OP_16, above that a 1-byte minimal push (k <= 64)."""
    return bytes((OP_1 - 1 + k,)) if k <= 16 else bytes((1, k))


@dataclass(frozen=True, slots=True)
class KofN:
    """A k-of-n policy over x-only keys, kept in ascending byte order (the order of the leaf and the witness).

    Build it with KofN.of, which sorts; the constructor refuses keys out of order, so one policy has one leaf.
    """

    k: int
    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        n = len(self.keys)
        if not 1 <= n <= MAX_MEMBERS:
            raise InvalidPolicy(f"a k-of-n leaf has 1..{MAX_MEMBERS} keys, not {n}")
        if not 1 <= self.k <= n:
            raise InvalidPolicy(f"threshold k = {self.k} is outside 1..{n} (n keys)")
        for i, key in enumerate(self.keys):
            if len(key) != 32:
                raise InvalidPolicy(f"key {i} is {len(key)} bytes, not a 32-byte x-only key")
            try:
                PublicKeyXOnly(key)
            except ValueError:
                raise InvalidPolicy(f"key {i} ({key.hex()}) is not the x coordinate of a secp256k1 point") from None
        for a, b in zip(self.keys, self.keys[1:]):
            if a == b:
                raise InvalidPolicy(f"key {a.hex()} appears twice")
            if a > b:
                raise InvalidPolicy("keys must be in ascending byte order (use KofN.of)")

    @classmethod
    def of(cls, k: int, keys: Iterable[bytes]) -> "KofN":
        """The policy of k of these keys, in any order (sorted here; duplicates refused)."""
        return cls(k, tuple(sorted(bytes(key) for key in keys)))

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def script(self) -> bytes:
        """<K1> OP_CHECKSIG <K2> OP_CHECKSIGADD ... <Kn> OP_CHECKSIGADD <k> OP_NUMEQUAL (Bitcoin Core's multi_a)."""
        parts = [bytes((PUSH_32,)) + self.keys[0] + bytes((OP_CHECKSIG,))]
        parts += [bytes((PUSH_32,)) + key + bytes((OP_CHECKSIGADD,)) for key in self.keys[1:]]
        return b"".join(parts) + _push_threshold(self.k) + bytes((OP_NUMEQUAL,))

    @property
    def leaf(self) -> Leaf:
        return Leaf(LEAF_VERSION_TAPSCRIPT, self.script)

    def encode(self) -> bytes:
        """k u8 · n u8 · n x-only keys (32 bytes each), ascending: the policy in an audit bundle."""
        return bytes((self.k, self.n)) + b"".join(self.keys)

    @classmethod
    def read(cls, r: Reader) -> "KofN":
        """Strict read of encode()'s bytes: InvalidPolicy for k outside 1..n, n outside 1..MAX_MEMBERS, a key that
        is not a valid x-only key, keys unsorted or repeated; Truncated if the keys run out."""
        k = r.u8()
        n = r.u8()
        if not 1 <= n <= MAX_MEMBERS:  # before reading n keys: the count is checked first
            raise InvalidPolicy(f"a k-of-n leaf has 1..{MAX_MEMBERS} keys, not {n}")
        return cls(k, tuple(r.take(32) for _ in range(n)))


def commitment_leaf(record: AnchorRecord) -> Leaf:
    """OP_RETURN <link>: a leaf that commits to the anchor record and that no witness can satisfy."""
    return link_leaf(record.link)


def link_leaf(link: bytes) -> Leaf:
    """commitment_leaf of the record whose link this is."""
    return Leaf(LEAF_VERSION_TAPSCRIPT, bytes((OP_RETURN, PUSH_32)) + link)


class RawScript(Script):  # type: ignore[misc]
    """A script given as bytes: bitcoin-utils serializes it as is (its own parser mangles non-standard scripts)."""

    def __init__(self, raw: bytes) -> None:
        super().__init__([])
        self.raw = raw

    def to_bytes(self) -> bytes:
        return self.raw


def script_path_sighash(raw_tx: bytes, index: int, prevouts: Sequence[tuple[bytes, int]], leaf_script: bytes,
                        hash_type: int) -> bytes:
    """BIP341/342 signature hash of input `index` of the (unsigned) transaction raw_tx spending the tapscript leaf
    leaf_script (leaf version 0xc0, no annex, no OP_CODESEPARATOR), given every input's (scriptPubKey, amount);
    hash_type 0x00 (SIGHASH_DEFAULT) or 0x01 (SIGHASH_ALL, which the message then commits to). bitcoin-utils'
    digest (BIP341-vector tested in tests/anchoring)."""
    tx = Transaction.from_raw(raw_tx.hex())
    return bytes(tx.get_transaction_taproot_digest(index, [RawScript(spk) for spk, _ in prevouts],
                                                   [amount for _, amount in prevouts], 1, RawScript(leaf_script),
                                                   sighash=hash_type))


@dataclass(frozen=True, slots=True)
class FederationOutput:
    """A P2TR output of the federation: internal key NUMS_KEY, script tree the k-of-n leaf alone (a federation
    coin) or the k-of-n leaf and a commitment leaf side by side (an anchor: FederationOutput.anchor)."""

    policy: KofN
    commitment: Optional[Leaf] = None

    @classmethod
    def anchor(cls, policy: KofN, record: AnchorRecord) -> "FederationOutput":
        """The anchor output of record: spendable by k of the policy's keys, committing to record's link."""
        return cls(policy, commitment_leaf(record))

    @property
    def leaf(self) -> Leaf:
        return self.policy.leaf

    @property
    def tree(self) -> ScriptTree:
        return self.leaf if self.commitment is None else [self.leaf, self.commitment]

    @property
    def merkle_root(self) -> bytes:
        root = tree_root(self.tree)
        if root is None:  # never: the tree always has the k-of-n leaf
            raise InvalidPolicy("empty script tree")
        return root

    @property
    def output_key(self) -> bytes:
        return output_key(NUMS_KEY, self.merkle_root)[0]

    @property
    def script_pubkey(self) -> bytes:
        return p2tr_script(self.output_key)

    @property
    def control_block(self) -> bytes:
        """(0xc0 | parity of the output key) || NUMS_KEY || the commitment leaf's hash (when there is one)."""
        return control_block(NUMS_KEY, self.tree, self.leaf)

    def matches(self, script_pubkey: bytes) -> bool:
        return script_pubkey == self.script_pubkey
