"""Anchor transactions (anchoring/btc_tx.py) without bitcoind: BIP341 key tweaks, signatures, sizes, txids."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from coincurve import PrivateKey, PublicKeyXOnly

from anchoring.btc_tx import (Prevout, TxOut, build_signed, estimate_vsize, key_path_script, sha256d, taproot_sighash,
                              tweaked_secret)
from l2d.core.anchor_format import AnchorRecord, TaprootAnchor, op_return_script, output_key

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


@pytest.mark.skipif(not BIP341.exists(), reason="BIP341 wallet vectors not present")
def test_library_sighash_matches_bip341_key_path_vectors() -> None:
    """The BIP341 digest we take from bitcoin-utils reproduces every official key-path sigHash."""
    from bitcoin.core import CTransaction
    from bitcoinutils.transactions import Transaction, TxInput, TxOutput

    from anchoring.btc_tx import RawScript

    spending = json.loads(BIP341.read_text())["keyPathSpending"][0]
    raw = bytes.fromhex(spending["given"]["rawUnsignedTx"])
    parsed = CTransaction.deserialize(raw)  # python-bitcoinlib reads the scripts as bytes, unparsed
    tx = Transaction([TxInput(i.prevout.hash[::-1].hex(), i.prevout.n, sequence=i.nSequence.to_bytes(4, "little"))
                      for i in parsed.vin],
                     [TxOutput(o.nValue, RawScript(bytes(o.scriptPubKey))) for o in parsed.vout],
                     locktime=parsed.nLockTime.to_bytes(4, "little"), version=parsed.nVersion.to_bytes(4, "little"),
                     has_segwit=True)
    assert tx.to_bytes(False) == raw
    utxos = spending["given"]["utxosSpent"]
    scripts = [RawScript(bytes.fromhex(u["scriptPubKey"])) for u in utxos]
    amounts = [u["amountSats"] for u in utxos]
    for inp in spending["inputSpending"]:
        g = inp["given"]
        digest = tx.get_transaction_taproot_digest(g["txinIndex"], scripts, amounts, 0, sighash=g["hashType"])
        assert bytes(digest).hex() == inp["intermediary"]["sigHash"], g
    assert len(spending["inputSpending"]) >= 7
