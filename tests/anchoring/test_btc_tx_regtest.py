"""Taproot anchors on regtest: the anchor output is spendable by the federation key path and by no one else."""
from __future__ import annotations

import hashlib

from coincurve import PrivateKey

from anchoring.btc_tx import Prevout, TxOut, build_signed, key_path_script
from bridge.rpc import BitcoinRPC
from l2d.core.anchor_format import AnchorRecord, TaprootAnchor, op_return_script
from regtest.harness import fund_wallet

FED_SECRET = hashlib.sha256(b"l2d test federation key").digest()
FED = PrivateKey(FED_SECRET).public_key_xonly.format()
OTHER_SECRET = hashlib.sha256(b"l2d test other key").digest()
AUX = b"\x01" * 32


async def _fund_federation(rpc: BitcoinRPC, amount_sat: int) -> Prevout:
    """Send amount_sat to the federation's key-path P2TR output, mine it, return the coin."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    spk = key_path_script(FED)
    info = await rpc.call("getdescriptorinfo", [f"rawtr({spk[2:].hex()})"])
    addr = (await rpc.call("deriveaddresses", [info["descriptor"]]))[0]
    txid = await w.sendtoaddress(addr, amount_sat)
    await rpc.generatetoaddress(1, mine_addr)
    tx = await rpc.call("getrawtransaction", [txid[::-1].hex(), 1])
    vout = next(o["n"] for o in tx["vout"] if o["scriptPubKey"]["hex"] == spk.hex())
    return Prevout(txid, vout, amount_sat, spk)


async def test_taproot_anchor_spendable_by_federation_key_path_only(rpc: BitcoinRPC) -> None:
    coin = await _fund_federation(rpc, 1_000_000)
    record = AnchorRecord(2, 10, b"\x42" * 32)
    anchor = TaprootAnchor(record, FED)
    # The anchor transaction: the federation coin in, the Taproot anchor out (the federation's change).
    tx = build_signed(FED_SECRET, [coin], [TxOut(990_000, anchor.script_pubkey)], AUX)
    res = (await rpc.testmempoolaccept([tx.raw]))[0]
    assert res.allowed, res.reject_reason
    assert res.txid == tx.txid and res.vsize == tx.vsize
    assert await rpc.sendrawtransaction(tx.raw) == tx.txid
    addr = await rpc.for_wallet("miner").getnewaddress()
    await rpc.generatetoaddress(1, addr)

    spent = Prevout(tx.txid, 0, 990_000, anchor.script_pubkey, anchor.merkle_root)
    out = [TxOut(980_000, key_path_script(FED))]
    # The federation spends it by the key path (its key tweaked with the anchor's script tree).
    ok = build_signed(FED_SECRET, [spent], out, AUX)
    assert (await rpc.testmempoolaccept([ok.raw]))[0].allowed
    # Another key cannot, tweaked or not; nor can the federation key with the wrong tweak.
    for secret, root in ((OTHER_SECRET, anchor.merkle_root), (OTHER_SECRET, None), (FED_SECRET, None)):
        bad = build_signed(secret, [Prevout(spent.txid, 0, 990_000, spent.script_pubkey, root)], out, AUX)
        r = (await rpc.testmempoolaccept([bad.raw]))[0]
        assert not r.allowed and "signature" in (r.reject_reason or "") + (r.reject_details or ""), r


async def test_op_return_anchor_accepted(rpc: BitcoinRPC) -> None:
    coin = await _fund_federation(rpc, 500_000)
    record = AnchorRecord(2, 4, b"\x17" * 32)
    tx = build_signed(FED_SECRET, [coin], [TxOut(0, op_return_script(record)), TxOut(490_000, coin.script_pubkey)],
                      AUX)
    res = (await rpc.testmempoolaccept([tx.raw]))[0]
    assert res.allowed, res.reject_reason
