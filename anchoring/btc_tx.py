"""Bitcoin transactions for anchors: P2TR key-path spends built, hashed and sized by bitcoin-utils.

Serialization, the BIP341 signature hash (SIGHASH_DEFAULT; key path, or the BIP342 script path of a tapscript
leaf, which anchoring/multisig.py uses) and vsize come from bitcoin-utils' Transaction; the tweaked key and the
BIP340 signature come from libsecp256k1 (coincurve). Nothing here touches bitcoin-utils' global network setting:
scripts are raw bytes. The txid is the double SHA-256 of the non-witness serialization (internal byte order).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from bitcoinutils.constants import TAPROOT_SIGHASH_ALL
from bitcoinutils.transactions import Transaction, TxInput, TxOutput, TxWitnessInput
from coincurve import PrivateKey

from l2d.core.anchor_format import output_key, p2tr_script, taptweak
from l2d.core.codec import write_varint
from l2d.core.kofn import RawScript

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
RBF_SEQUENCE = 0xFFFFFFFD  # signals BIP125 replaceability
P2TR_DUST_SAT = 330


def sha256d(b: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


@dataclass(frozen=True, slots=True)
class Prevout:
    """A coin being spent: outpoint (txid internal order), its value and scriptPubKey, and its tweak.

    merkle_root is the script tree root of the P2TR output (None for a key-path-only output).
    """

    txid: bytes
    vout: int
    amount_sat: int
    script_pubkey: bytes
    merkle_root: Optional[bytes] = None


@dataclass(frozen=True, slots=True)
class TxOut:
    amount_sat: int
    script_pubkey: bytes

    def encode(self) -> bytes:
        return struct.pack("<q", self.amount_sat) + write_varint(len(self.script_pubkey)) + self.script_pubkey


@dataclass(frozen=True, slots=True)
class SignedTx:
    raw: bytes  # with witness
    txid: bytes  # internal order
    vsize: int
    fee_sat: int

    @property
    def txid_hex(self) -> str:
        return self.txid[::-1].hex()


def key_path_script(internal_key: bytes) -> bytes:
    """scriptPubKey of the key-path-only P2TR output of internal_key (BIP86 tweak: no script tree)."""
    return p2tr_script(output_key(internal_key, None)[0])


def _transaction(inputs: Sequence[Prevout], outputs: Sequence[TxOut], sequence: int,
                 stacks: Optional[Sequence[Sequence[bytes]]] = None) -> Transaction:
    """The transaction; stacks, when given, holds each input's witness stack (items bottom first)."""
    seq = struct.pack("<I", sequence)
    return Transaction([TxInput(i.txid[::-1].hex(), i.vout, sequence=seq) for i in inputs],
                       [TxOutput(o.amount_sat, RawScript(o.script_pubkey)) for o in outputs],
                       has_segwit=True,
                       witnesses=None if stacks is None else [TxWitnessInput([w.hex() for w in s]) for s in stacks])


def taproot_sighash(inputs: Sequence[Prevout], outputs: Sequence[TxOut], index: int, sequence: int,
                    leaf_script: Optional[bytes] = None) -> bytes:
    """BIP341 signature hash, SIGHASH_DEFAULT, no annex, for input `index`.

    Key path by default; with leaf_script, the BIP342 script path of that tapscript leaf (leaf version 0xc0, the
    only one bitcoin-utils hashes; no OP_CODESEPARATOR executed): the digest then also commits to the leaf hash.
    """
    tx = _transaction(inputs, outputs, sequence)
    leaf = None if leaf_script is None else RawScript(leaf_script)
    return bytes(tx.get_transaction_taproot_digest(index, [RawScript(i.script_pubkey) for i in inputs],
                                                   [i.amount_sat for i in inputs], 0 if leaf is None else 1, leaf,
                                                   sighash=TAPROOT_SIGHASH_ALL))


def tweaked_secret(secret: bytes, merkle_root: Optional[bytes]) -> bytes:
    """BIP341 taproot_tweak_seckey: the secret of the output key of secret's x-only key and merkle_root."""
    key = PrivateKey(secret)
    d = int.from_bytes(secret, "big")
    if key.public_key.format(compressed=True)[0] == 3:  # odd y: BIP340 uses the negated secret
        d = SECP256K1_N - d
    xonly = key.public_key_xonly.format()
    t = int.from_bytes(taptweak(xonly, merkle_root), "big")
    if t >= SECP256K1_N:
        raise ValueError("taproot tweak out of range")
    return ((d + t) % SECP256K1_N).to_bytes(32, "big")


def build_signed(secret: bytes, inputs: Sequence[Prevout], outputs: Sequence[TxOut], aux: bytes,
                 sequence: int = RBF_SEQUENCE) -> SignedTx:
    """Sign every input by the key path of secret's key, tweaked by each input's merkle root."""
    if not inputs or not outputs:
        raise ValueError("a transaction needs inputs and outputs")
    sigs = [PrivateKey(tweaked_secret(secret, prev.merkle_root)).sign_schnorr(
        taproot_sighash(inputs, outputs, n, sequence), aux) for n, prev in enumerate(inputs)]
    return finalize(inputs, outputs, [[sig] for sig in sigs], sequence)


def finalize(inputs: Sequence[Prevout], outputs: Sequence[TxOut], stacks: Sequence[Sequence[bytes]],
             sequence: int = RBF_SEQUENCE) -> SignedTx:
    """The transaction with each input's witness stack (items bottom first: a key-path spend is [signature], a
    script-path spend ends with the leaf script and the control block), its txid, vsize and fee."""
    if not inputs or not outputs:
        raise ValueError("a transaction needs inputs and outputs")
    if len(stacks) != len(inputs):
        raise ValueError(f"{len(stacks)} witness stacks for {len(inputs)} inputs")
    tx = _transaction(inputs, outputs, sequence, stacks)
    fee = sum(i.amount_sat for i in inputs) - sum(o.amount_sat for o in outputs)
    return SignedTx(tx.to_bytes(True), bytes.fromhex(tx.get_txid())[::-1], tx.get_vsize(), fee)


def estimate_vsize(n_inputs: int, outputs: Sequence[TxOut]) -> int:
    """Exact vsize of a transaction of n key-path P2TR inputs (64-byte signatures) and these outputs."""
    dummy = [Prevout(b"\1" * 32, 0, 0, b"")] * n_inputs  # not all-zero: that would read as a coinbase input
    return int(_transaction(dummy, outputs, RBF_SEQUENCE, [[b"\0" * 64]] * n_inputs).get_vsize())
