"""Anchor transactions (anchoring/btc_tx.py) without bitcoind: BIP341 key tweaks, signatures, sizes, txids."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from coincurve import PrivateKey, PublicKeyXOnly

from anchoring.btc_tx import (Prevout, TxOut, build_signed, estimate_vsize, key_path_script, sha256d,
                              taproot_sighash, tweaked_secret)
from anchoring.payload import AnchorRecord, TaprootAnchor, output_key, op_return_script

BIP341 = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "bip341_wallet_vectors.json"
SECRET = hashlib.sha256(b"l2d test federation key").digest()
FED = PrivateKey(SECRET).public_key_xonly.format()


@pytest.mark.skipif(not BIP341.exists(), reason="BIP341 wallet vectors not present")
def test_tweaked_secret_matches_bip341_vectors() -> None:
    spending = json.loads(BIP341.read_text())["keyPathSpending"][0]
    for inp in spending["inputSpending"]:
        given, inter = inp["given"], inp["intermediary"]
        root = bytes.fromhex(given["merkleRoot"]) if given["merkleRoot"] else None
        assert tweaked_secret(bytes.fromhex(given["internalPrivkey"]), root).hex() == inter["tweakedPrivkey"]


@pytest.mark.parametrize("root", [None, TaprootAnchor(AnchorRecord(2, 1, b"\x01" * 32), FED).merkle_root])
def test_tweaked_secret_signs_for_the_output_key(root: bytes | None) -> None:
    tweaked = PrivateKey(tweaked_secret(SECRET, root)).public_key_xonly.format()
    assert tweaked == output_key(FED, root)[0]


def test_build_signed_key_path() -> None:
    anchor = TaprootAnchor(AnchorRecord(2, 7, b"\x07" * 32), FED)
    inputs = [Prevout(b"\x11" * 32, 1, 50_000, key_path_script(FED)),
              Prevout(b"\x22" * 32, 0, 20_000, anchor.script_pubkey, anchor.merkle_root)]
    outputs = [TxOut(0, op_return_script(anchor.record)), TxOut(69_000, key_path_script(FED))]
    tx = build_signed(SECRET, inputs, outputs, b"\0" * 32)
    assert tx.fee_sat == 1_000 and tx.vsize == estimate_vsize(2, outputs)
    # each witness is one 64-byte BIP340 signature valid for that input's output key
    for n, prev in enumerate(inputs):
        q = PublicKeyXOnly(prev.script_pubkey[2:])
        sig_at = tx.raw.index(b"\x01\x40", len(tx.raw) - 4 - 2 * 66 + 66 * n)
        sig = tx.raw[sig_at + 2:sig_at + 66]
        assert q.verify(sig, taproot_sighash(inputs, outputs, n, 0xFFFFFFFD))
    # txid: double SHA-256 of the serialization without marker, flag and witnesses
    base = tx.raw[:4] + tx.raw[6:len(tx.raw) - 4 - 2 * 66] + tx.raw[-4:]
    assert tx.txid == sha256d(base)
    assert tx.raw[4:6] == b"\x00\x01"  # segwit marker and flag
    with pytest.raises(ValueError):
        build_signed(SECRET, [], outputs, b"\0" * 32)
