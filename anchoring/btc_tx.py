"""Minimal Bitcoin transactions for anchors: segwit v1 serialization, BIP341 key-path sighash and signing.

Only what the anchor service needs: version-2 transactions whose inputs are all P2TR key-path spends
(SIGHASH_DEFAULT, 64-byte signatures) and raw-scriptPubKey outputs. Pure: no network parameters, no
globals (no bitcoinutils.setup()); keys and tweaks are arguments. The txid is the double SHA-256 of the
non-witness serialization (internal byte order).
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from coincurve import PrivateKey

from l2d.core.codec import write_varint
from l2d.core.hashing import tagged_hash

from .payload import output_key, p2tr_script, taptweak

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
RBF_SEQUENCE = 0xFFFFFFFD  # signals BIP125 replaceability
P2TR_DUST_SAT = 330


def sha256d(b: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


def _sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


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


def _serialize(inputs: Sequence[Prevout], outputs: Sequence[TxOut], witnesses: Optional[Sequence[bytes]],
               sequence: int, locktime: int = 0) -> bytes:
    out = [struct.pack("<i", 2)]
    if witnesses is not None:
        out.append(b"\x00\x01")
    out.append(write_varint(len(inputs)))
    for i in inputs:
        out.append(i.txid + struct.pack("<I", i.vout) + b"\x00" + struct.pack("<I", sequence))
    out.append(write_varint(len(outputs)))
    out += [o.encode() for o in outputs]
    if witnesses is not None:
        for sig in witnesses:
            out.append(b"\x01" + write_varint(len(sig)) + sig)
    out.append(struct.pack("<I", locktime))
    return b"".join(out)


def taproot_sighash(inputs: Sequence[Prevout], outputs: Sequence[TxOut], index: int, sequence: int,
                    locktime: int = 0) -> bytes:
    """BIP341 signature hash, SIGHASH_DEFAULT, key path, no annex, for input `index`."""
    sha_prevouts = _sha(b"".join(i.txid + struct.pack("<I", i.vout) for i in inputs))
    sha_amounts = _sha(b"".join(struct.pack("<q", i.amount_sat) for i in inputs))
    sha_spks = _sha(b"".join(write_varint(len(i.script_pubkey)) + i.script_pubkey for i in inputs))
    sha_sequences = _sha(struct.pack("<I", sequence) * len(inputs))
    sha_outputs = _sha(b"".join(o.encode() for o in outputs))
    msg = (b"\x00" + b"\x00" + struct.pack("<i", 2) + struct.pack("<I", locktime) + sha_prevouts + sha_amounts
           + sha_spks + sha_sequences + sha_outputs + b"\x00" + struct.pack("<I", index))
    return tagged_hash("TapSighash", msg)


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
    sigs = []
    for n, prev in enumerate(inputs):
        tsec = PrivateKey(tweaked_secret(secret, prev.merkle_root))
        sigs.append(tsec.sign_schnorr(taproot_sighash(inputs, outputs, n, sequence), aux))
    raw = _serialize(inputs, outputs, sigs, sequence)
    base = _serialize(inputs, outputs, None, sequence)
    weight = len(base) * 3 + len(raw)
    fee = sum(i.amount_sat for i in inputs) - sum(o.amount_sat for o in outputs)
    return SignedTx(raw, sha256d(base), (weight + 3) // 4, fee)


def estimate_vsize(n_inputs: int, outputs: Sequence[TxOut]) -> int:
    """Exact vsize of a transaction of n key-path P2TR inputs (64-byte signatures) and these outputs."""
    dummy = [Prevout(b"\0" * 32, 0, 0, b"")] * n_inputs
    base = _serialize(dummy, outputs, None, RBF_SEQUENCE)
    full = _serialize(dummy, outputs, [b"\0" * 64] * n_inputs, RBF_SEQUENCE)
    return (len(base) * 3 + len(full) + 3) // 4
