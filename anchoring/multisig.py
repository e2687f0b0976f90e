"""The federation's k-of-n Taproot outputs: a tapscript OP_CHECKSIGADD leaf under BIP341's NUMS internal key.

Building blocks for member signing (issue 13): the leaf, the output (with or without the anchor record's
commitment leaf), the script-path signature hash, one member's signature, and the witness assembled from k of
them. The anchor service does not use them yet: it still spends key-path outputs of one federation key
(anchoring/btc_tx.py). Byte layouts and the auditor's check: docs/anchoring.md, "Federation outputs (k-of-n)".

Tree hashing and the output tweak are l2d.core.anchor_format's (BIP341-vector tested); the script-path digest is
bitcoin-utils' (through anchoring.btc_tx); keys and signatures are libsecp256k1 (coincurve). The output half of
this module (NUMS, KofN, commitment_leaf, FederationOutput) is pure, so it can move into l2d.core when audit
bundles learn this kind of anchor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from coincurve import PrivateKey, PublicKeyXOnly

from l2d.core.anchor_format import (LEAF_VERSION_TAPSCRIPT, OP_RETURN, AnchorRecord, Leaf, ScriptTree, control_block,
                                    output_key, p2tr_script, tree_root)
from l2d.core.members import MAX_MEMBERS

from .btc_tx import RBF_SEQUENCE, Prevout, TxOut, taproot_sighash

# BIP341's provably unspendable internal key H = lift_x(SHA256(uncompressed encoding of G)): "constructed by taking
# the hash of the standard uncompressed encoding of the secp256k1 base point G as X coordinate". Finding its
# discrete logarithm would need a SHA-256 output that happens to be the x coordinate of a point whose discrete log
# the finder knows: nobody knows one, so the key path of an output with this internal key cannot be spent and only
# the script tree can move the coin. Used as is (not H + rG with a secret r, BIP341's suggestion for privacy), so
# that anyone can see from a control block that the output has no key path.
NUMS_KEY = bytes.fromhex("50929b74c1a04954b78b4b6035e97a5e078a5a0f28ec96d547bfee9ace803ac0")

OP_CHECKSIG, OP_CHECKSIGADD, OP_NUMEQUAL, OP_1 = 0xAC, 0xBA, 0x9C, 0x51
PUSH_32 = 0x20
SIGNATURE_SIZE = 64  # BIP340, SIGHASH_DEFAULT: no sighash byte


class MultisigError(ValueError):
    """Base of the k-of-n errors: the message names what was wrong; nothing is signed or assembled."""


class InvalidPolicy(MultisigError):
    """k, n or the keys do not make a k-of-n leaf (1 <= k <= n <= MAX_MEMBERS, distinct valid x-only keys)."""


class UnknownKey(MultisigError):
    """A key (a signer's, or a signature's) that is not in the leaf."""


class DuplicateSignature(MultisigError):
    """Two signatures for one key."""


class InvalidSignature(MultisigError):
    """A signature that is not a valid 64-byte BIP340 signature of the input's sighash by its key."""


class NotEnoughSignatures(MultisigError):
    """Fewer than k valid signatures from distinct keys of the leaf."""


class WrongOutput(MultisigError):
    """The input asked for does not exist or does not spend this federation output."""


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


def commitment_leaf(record: AnchorRecord) -> Leaf:
    """OP_RETURN <link>: a leaf that commits to the anchor record and that no witness can satisfy."""
    return Leaf(LEAF_VERSION_TAPSCRIPT, bytes((OP_RETURN, PUSH_32)) + record.link)


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

    def prevout(self, txid: bytes, vout: int, amount_sat: int) -> Prevout:
        """The coin this output became at txid:vout (txid in internal order)."""
        return Prevout(txid, vout, amount_sat, self.script_pubkey, self.merkle_root)


@dataclass(frozen=True, slots=True)
class MemberSignature:
    """One member's BIP340 signature of one input: what a member hands to whoever assembles the witness."""

    key: bytes  # x-only
    signature: bytes  # 64 bytes, SIGHASH_DEFAULT


def _spent(output: FederationOutput, inputs: Sequence[Prevout], index: int) -> None:
    if not 0 <= index < len(inputs):
        raise WrongOutput(f"input {index} does not exist ({len(inputs)} inputs)")
    if not output.matches(inputs[index].script_pubkey):
        raise WrongOutput(f"input {index} spends scriptPubKey {inputs[index].script_pubkey.hex()}, not this "
                          f"federation output ({output.script_pubkey.hex()})")


def sighash(output: FederationOutput, inputs: Sequence[Prevout], outputs: Sequence[TxOut], index: int,
            sequence: int = RBF_SEQUENCE) -> bytes:
    """BIP341/342 script-path signature hash (SIGHASH_DEFAULT) of input `index`, which spends `output` by its
    k-of-n leaf."""
    _spent(output, inputs, index)
    return taproot_sighash(inputs, outputs, index, sequence, output.leaf.script)


def sign(secret: bytes, output: FederationOutput, inputs: Sequence[Prevout], outputs: Sequence[TxOut], index: int,
         aux: bytes, sequence: int = RBF_SEQUENCE) -> MemberSignature:
    """One member's signature of input `index` (BIP340 with 32 bytes of fresh randomness `aux`)."""
    key = PrivateKey(secret)
    xonly = key.public_key_xonly.format()
    if xonly not in output.policy.keys:
        raise UnknownKey(f"signer key {xonly.hex()} is not one of the {output.policy.n} keys of the leaf")
    return MemberSignature(xonly, key.sign_schnorr(sighash(output, inputs, outputs, index, sequence), aux))


def assemble(output: FederationOutput, inputs: Sequence[Prevout], outputs: Sequence[TxOut], index: int,
             signatures: Iterable[MemberSignature], sequence: int = RBF_SEQUENCE) -> list[bytes]:
    """The witness stack (bottom first) spending input `index` by the k-of-n leaf.

    Every signature must come from a distinct key of the leaf and verify for this input's sighash; at least k of
    them. The leaf counts valid signatures and wants exactly k, so when more are given the k of the keys first in
    the leaf's order are used. The stack: for each key from the last to the first, its signature or an empty
    vector, then the leaf script, then the control block (OP_CHECKSIG takes the first key's signature from the top).
    """
    msg = sighash(output, inputs, outputs, index, sequence)
    policy = output.policy
    valid: dict[bytes, bytes] = {}
    for s in signatures:
        if s.key not in policy.keys:
            raise UnknownKey(f"signature by {s.key.hex()}, which is not one of the {policy.n} keys of the leaf")
        if s.key in valid:
            raise DuplicateSignature(f"two signatures by key {s.key.hex()}")
        if len(s.signature) != SIGNATURE_SIZE:
            raise InvalidSignature(f"signature by {s.key.hex()} is {len(s.signature)} bytes, not {SIGNATURE_SIZE}")
        if not PublicKeyXOnly(s.key).verify(s.signature, msg):
            raise InvalidSignature(f"signature by {s.key.hex()} does not verify for input {index}")
        valid[s.key] = s.signature
    if len(valid) < policy.k:
        raise NotEnoughSignatures(f"{len(valid)} valid signatures for input {index}, {policy.k} needed")
    used = [key for key in policy.keys if key in valid][:policy.k]
    stack = [valid[key] if key in used else b"" for key in reversed(policy.keys)]
    return stack + [policy.script, output.control_block]


def dummy_witness(output: FederationOutput) -> list[bytes]:
    """A witness stack of the exact size of a real one (k 64-byte signatures), for fee and vsize estimates."""
    k, n = output.policy.k, output.policy.n
    return [b"\0" * SIGNATURE_SIZE if i >= n - k else b"" for i in range(n)] + [output.policy.script,
                                                                               output.control_block]

