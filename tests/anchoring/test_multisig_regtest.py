"""The federation's k-of-n Taproot outputs (anchoring/multisig.py) on regtest: bitcoind derives the same outputs from
its multi_a descriptors, and spends them with k member signatures and refuses k - 1, a wrong key's and a tampered
signature."""
from __future__ import annotations

import hashlib
from typing import Optional

from coincurve import PrivateKey

from anchoring.btc_tx import Prevout, SignedTx, TxOut, finalize
from anchoring.multisig import MemberSignature, assemble, prevout, sighash, sign
from bridge.rpc import BitcoinRPC, sat_to_btc_str
from l2d.core.anchor_format import LEAF_VERSION_TAPSCRIPT, AnchorRecord, Leaf
from l2d.core.kofn import FederationOutput, KofN
from regtest.harness import fund_wallet

SECRETS = [hashlib.sha256(b"l2d test key %d" % n).digest() for n in (1, 2, 3, 4)]
KEYS = [PrivateKey(s).public_key_xonly.format() for s in SECRETS]
OUTSIDER = hashlib.sha256(b"l2d test other key").digest()
AUX = b"\x01" * 32
NUMS = "50929b74c1a04954b78b4b6035e97a5e078a5a0f28ec96d547bfee9ace803ac0"  # BIP341's H, written out independently


async def _descriptor_script(rpc: BitcoinRPC, descriptor: str) -> bytes:
    """The scriptPubKey bitcoind derives from a descriptor (checksum added by getdescriptorinfo)."""
    info = await rpc.call("getdescriptorinfo", [descriptor])
    address = (await rpc.call("deriveaddresses", [info["descriptor"]]))[0]
    return bytes.fromhex((await rpc.call("validateaddress", [address]))["scriptPubKey"])


async def test_outputs_are_bitcoinds_multi_a_descriptors(rpc: BitcoinRPC) -> None:
    many = [PrivateKey(hashlib.sha256(b"many %d" % i).digest()).public_key_xonly.format() for i in range(20)]
    for k, keys in ((1, KEYS[:1]), (2, KEYS[:3]), (3, KEYS), (17, many)):
        policy = KofN.of(k, keys)
        ours = FederationOutput(policy).script_pubkey
        # multi_a over the keys in our order, and sortedmulti_a over them in any order, give our output.
        ordered = ",".join(key.hex() for key in policy.keys)
        assert await _descriptor_script(rpc, f"tr({NUMS},multi_a({k},{ordered}))") == ours, (k, len(keys))
        shuffled = ",".join(key.hex() for key in reversed(keys))
        assert await _descriptor_script(rpc, f"tr({NUMS},sortedmulti_a({k},{shuffled}))") == ours
    # Two leaves side by side: the k-of-n leaf and a second leaf (here pk(X), which a descriptor can name; the
    # anchor's OP_RETURN <link> leaf has no descriptor, and the spend below checks it).
    policy = KofN.of(3, KEYS)
    x = PrivateKey(OUTSIDER).public_key_xonly.format()
    ours = FederationOutput(policy, Leaf(LEAF_VERSION_TAPSCRIPT, b"\x20" + x + b"\xac")).script_pubkey
    ordered = ",".join(key.hex() for key in policy.keys)
    for tree in (f"{{multi_a(3,{ordered}),pk({x.hex()})}}", f"{{pk({x.hex()}),multi_a(3,{ordered})}}"):
        assert await _descriptor_script(rpc, f"tr({NUMS},{tree})") == ours


async def _fund(rpc: BitcoinRPC, outputs: list[tuple[FederationOutput, int]]) -> list[Prevout]:
    """One wallet transaction paying each output its amount, mined; the coins it made."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    amounts = {}
    for out, amount in outputs:
        info = await rpc.call("getdescriptorinfo", [f"rawtr({out.output_key.hex()})"])
        amounts[(await rpc.call("deriveaddresses", [info["descriptor"]]))[0]] = sat_to_btc_str(amount)
    txid_hex = await w.call("sendmany", ["", amounts])
    await rpc.generatetoaddress(1, mine_addr)
    tx = await rpc.call("getrawtransaction", [txid_hex, 1])
    coins = []
    for out, amount in outputs:
        vout = next(o["n"] for o in tx["vout"] if o["scriptPubKey"]["hex"] == out.script_pubkey.hex())
        coins.append(prevout(out, bytes.fromhex(txid_hex)[::-1], vout, amount))
    return coins


def _stack(out: FederationOutput, sigs: dict[bytes, bytes]) -> list[bytes]:
    """A witness stack written out here, unchecked (assemble refuses the bad ones): last key's slot first."""
    return [sigs.get(key, b"") for key in reversed(out.policy.keys)] + [out.policy.script, out.control_block]


async def _reject_reason(rpc: BitcoinRPC, tx: SignedTx) -> str:
    """Why bitcoind's testmempoolaccept refuses tx (failing if it accepts it), for the anchor input."""
    res = (await rpc.testmempoolaccept([tx.raw]))[0]
    assert not res.allowed, "bitcoind accepted a spend it should refuse"
    assert "input 0 of" in (res.reject_details or ""), res  # the anchor input; the coin input's witness is good
    return f"{res.reject_reason} {res.reject_details}"


async def test_k_of_n_anchor_spent_with_k_signatures_and_not_fewer(rpc: BitcoinRPC) -> None:
    policy = KofN.of(3, KEYS)  # 3-of-4
    anchor = FederationOutput.anchor(policy, AnchorRecord(2, 10, b"\x42" * 32))
    coin = FederationOutput(policy)
    inputs = await _fund(rpc, [(anchor, 500_000), (coin, 300_000)])
    outputs = [TxOut(790_000, FederationOutput.anchor(policy, AnchorRecord(2, 20, b"\x43" * 32)).script_pubkey)]

    def signed(index: int, out: FederationOutput, signers: list[bytes]) -> dict[bytes, bytes]:
        return {s.key: s.signature for s in (sign(x, out, inputs, outputs, index, AUX) for x in signers)}

    # Members 1, 3 and 4 sign both inputs; member 2 is absent (its slot an empty vector).
    quorum = [SECRETS[0], SECRETS[2], SECRETS[3]]
    a_sigs, c_sigs = signed(0, anchor, quorum), signed(1, coin, quorum)

    def tx(a: dict[bytes, bytes], c: Optional[dict[bytes, bytes]] = None) -> SignedTx:
        return finalize(inputs, outputs, [_stack(anchor, a), _stack(coin, c_sigs if c is None else c)])

    # k - 1 signatures: the leaf counts 2, not 3.
    two = {key: a_sigs[key] for key in list(a_sigs)[:2]}
    assert "false/empty top stack element" in await _reject_reason(rpc, tx(two))
    # A non-member's signature in member 2's slot, beside two valid ones.
    outsider = PrivateKey(OUTSIDER).sign_schnorr(sighash(anchor, inputs, outputs, 0), AUX)
    assert "Invalid Schnorr signature" in await _reject_reason(rpc, tx({**two, KEYS[1]: outsider}))
    # A tampered signature among three.
    k3 = KEYS[3]
    tampered = {**a_sigs, k3: a_sigs[k3][:-1] + bytes([a_sigs[k3][-1] ^ 1])}
    assert "Invalid Schnorr signature" in await _reject_reason(rpc, tx(tampered))
    # The coin input's signatures are for input 1: under input 0 they do not verify.
    assert "Invalid Schnorr signature" in await _reject_reason(rpc, tx(c_sigs))
    # assemble refuses the same ones itself (each refusal is tested in test_multisig.py).
    for bad in (two, {**two, KEYS[1]: outsider}, tampered):
        try:
            assemble(anchor, inputs, outputs, 0, [MemberSignature(k, s) for k, s in bad.items()])
        except ValueError:
            continue
        raise AssertionError("assemble accepted a witness bitcoind refuses")

    # k signatures, assembled: accepted, sent, mined.
    good = finalize(inputs, outputs,
                    [assemble(anchor, inputs, outputs, 0, [MemberSignature(k, s) for k, s in a_sigs.items()]),
                     assemble(coin, inputs, outputs, 1, [MemberSignature(k, s) for k, s in c_sigs.items()])])
    assert good.raw == tx(a_sigs).raw  # assemble wrote the stack as the leaf needs it
    res = (await rpc.testmempoolaccept([good.raw]))[0]
    assert res.allowed, res
    assert res.txid == good.txid and res.vsize == good.vsize and res.fee_sat == good.fee_sat == 10_000
    assert await rpc.sendrawtransaction(good.raw) == good.txid
    await rpc.generatetoaddress(1, await rpc.for_wallet("miner").getnewaddress())
    mined = await rpc.call("gettxout", [good.txid_hex, 0])
    assert mined["confirmations"] == 1 and mined["scriptPubKey"]["hex"] == outputs[0].script_pubkey.hex()
    for spent in inputs:
        assert await rpc.call("gettxout", [spent.txid[::-1].hex(), spent.vout]) is None
