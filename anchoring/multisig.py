"""The federation's k-of-n Taproot outputs, signing half: the script-path signature hash, one member's signature,
and the witness assembled from k of them.

The outputs themselves (NUMS_KEY, KofN, commitment_leaf, FederationOutput) are pure and live in l2d.core.kofn (the
verifier checks a k-of-n anchor with them). This module is the reference the tests and tests/vectors check those
outputs against (SIGHASH_DEFAULT, 64-byte signatures); the daemon signs and assembles its anchor transactions in
bridge/federation.py (SIGHASH_ALL, as every plan input). Byte layouts and the auditor's check: docs/anchoring.md,
"Federation outputs (k-of-n)".

The script-path digest is bitcoin-utils' (through anchoring.btc_tx); keys and signatures are libsecp256k1
(coincurve).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from coincurve import PrivateKey, PublicKeyXOnly

from l2d.core.kofn import FederationOutput

from .btc_tx import RBF_SEQUENCE, Prevout, TxOut, taproot_sighash

SIGNATURE_SIZE = 64  # BIP340, SIGHASH_DEFAULT: no sighash byte


class MultisigError(ValueError):
    """Base of the signing errors: the message names what was wrong; nothing is signed or assembled. (A policy that
    is not a k-of-n leaf is l2d.core.kofn.InvalidPolicy, also a ValueError.)"""


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


def prevout(output: FederationOutput, txid: bytes, vout: int, amount_sat: int) -> Prevout:
    """The coin `output` became at txid:vout (txid in internal order)."""
    return Prevout(txid, vout, amount_sat, output.script_pubkey, output.merkle_root)


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

