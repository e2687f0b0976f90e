"""Anchor plans against a real bitcoind: the transactions the state derives for two chained Taproot anchors (the
first paid by a funding coin, the second spending the first's k-of-n output by its tapscript leaf, BIP340 over the
BIP341 SIGHASH_ALL digest) are valid Bitcoin with m = 2 member signatures and refused with 1. bitcoind checking the
second's control block against the first's output key is the check that the output commits to the k-of-n leaf and
the record's link (descriptors have no leaf for a bare OP_RETURN <link>)."""
from __future__ import annotations

from bitcoin.core import CMutableTransaction, CTransaction, CTxInWitness, CTxWitness
from bitcoin.core.script import CScriptWitness

from bridge.federation import signed_transaction
from bridge.rpc import BitcoinRPC
from l2d.core.anchor_format import NO_PREVIOUS, AnchorRecord
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.params import REGTEST
from l2d.core.pegs import FUNDING_CONTRACT, CoinKind, FedCoin, coin_key, deposit_script_pubkey, script_address
from l2d.core.pegs_tx import AnchorMode, AnchorPlan
from l2d.core.plans import anchor_output, plan_tx, signatures_by_key
from l2d.core.state import StateView
from regtest.harness import BitcoindNode, fund_wallet
from tests.l2d.core.pegs_world import AUTH, FED, World, plan_of, post_signatures

ROOT1, ROOT2 = b"\x11" * 32, b"\x22" * 32


async def accepted(rpc: BitcoinRPC, raw: bytes) -> tuple[bool, str]:
    [res] = await rpc.testmempoolaccept([raw])
    return res.allowed, str(res.reject_reason)


def signed(w: World, plan_id: bytes) -> bytes:
    ptx = plan_tx(StateView(w.state.get), FED, REGTEST.id, w.plan(plan_id))
    raw = signed_transaction(FED, REGTEST, ptx, signatures_by_key(w.state.get, FED, plan_id))
    assert raw is not None
    return raw


def one_signature_fewer(raw: bytes) -> bytes:
    """The same transaction with one signature of the k-of-n leaf's witness emptied: k - 1 valid signatures and
    empty items (OP_CHECKSIGADD counts an empty signature as a failed check, not an error)."""
    tx = CMutableTransaction.from_tx(CTransaction.deserialize(raw))
    stack = list(tx.wit.vtxinwit[0].scriptWitness.stack)
    stack[next(i for i, item in enumerate(stack) if len(item) == 65)] = b""
    tx.wit = CTxWitness([CTxInWitness(CScriptWitness(stack))])
    return bytes(tx.serialize())


async def test_chained_taproot_anchor_plans_spend_with_m_member_signatures_and_not_fewer(
        bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    w, mine = await fund_wallet(rpc, "anchors", blocks=101)
    funding_spk = deposit_script_pubkey(FED, REGTEST.id, FUNDING_CONTRACT)
    txid = await w.sendtoaddress(script_address(funding_spk, REGTEST), 100_000)
    [vout] = [n for n, o in enumerate(CTransaction.deserialize(await rpc.getrawtransaction(txid)).vout)
              if bytes(o.scriptPubKey) == funding_spk]
    await rpc.generatetoaddress(1, mine)
    world = World()
    world.height = 20
    world.state[coin_key(txid, vout)] = FedCoin(txid, vout, 100_000, CoinKind.FUNDING, FUNDING_CONTRACT).encode()

    # the first anchor: the funding coin (P2WSH, ECDSA) to the k-of-n anchor output
    first = plan_of(world.apply(world.sign(AUTH, AnchorPlan(10, AnchorMode.TAPROOT, ROOT1, NO_PREVIOUS, 2, bytes(32),
                                                            ((txid, vout),)))))
    post_signatures(world, first)
    raw1 = signed(world, first)
    assert await accepted(rpc, raw1) == (True, "None")
    assert await rpc.sendrawtransaction(raw1) == first
    [block] = await rpc.generatetoaddress(1, mine)
    record1 = AnchorRecord(REGTEST.id, 10, ROOT1, NO_PREVIOUS)
    out = anchor_output(FED, record1.link)
    tx1 = await rpc.call("getrawtransaction", [first[::-1].hex(), True])
    assert tx1["vout"][0]["scriptPubKey"]["hex"] == out.script_pubkey.hex()
    world.do(AUTH, AnchorUpdate(10, ROOT1, first, block, 111, AnchorStatus.FINAL))
    assert world.coin((first, 0)).kind == CoinKind.ANCHOR

    # the second anchor spends the first's output by the 2-of-3 leaf: 2 BIP340 signatures pass, 1 does not
    second = plan_of(world.apply(world.sign(AUTH, AnchorPlan(12, AnchorMode.TAPROOT, ROOT2, record1.link, 2,
                                                             bytes(32), ((first, 0),)))))
    post_signatures(world, second)
    raw2 = signed(world, second)
    ok, reason = await accepted(rpc, one_signature_fewer(raw2))
    assert not ok and "script-verify-flag-failed" in reason, reason
    assert await accepted(rpc, raw2) == (True, "None")
    assert await rpc.sendrawtransaction(raw2) == second
    await rpc.generatetoaddress(1, mine)
    tx2 = await rpc.call("getrawtransaction", [second[::-1].hex(), True])
    witness = tx2["vin"][0]["txinwitness"]  # for each key from the last: its signature or empty; script; control
    assert sorted(len(x) // 2 for x in witness[:3]) == [0, 65, 65] and all(x[-2:] == "01" for x in witness[:3] if x)
    assert witness[3:] == [out.policy.script.hex(), out.control_block.hex()]
    assert tx2["vout"][0]["scriptPubKey"]["hex"] == anchor_output(
        FED, AnchorRecord(REGTEST.id, 12, ROOT2, record1.link).link).script_pubkey.hex()
