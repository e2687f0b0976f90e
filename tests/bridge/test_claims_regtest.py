"""The signing policy on Bitcoin claims (bridge/claims.py) against a real bitcoind: every claim that agrees with its
best chain passes, and each way a claim can be false is refused with a reason."""
from __future__ import annotations

import hashlib
from typing import Optional

from bridge.claims import BitcoinClaims, Refusal
from bridge.rpc import BitcoinRPC
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.coin_tx import Transfer
from l2d.core.params import REGTEST
from l2d.core.payload import Payload
from l2d.core.pegs_tx import BtcHeaders, PegoutPlan, PegoutStatus, PegoutUpdate
from l2d.core.tx import Transaction, sign
from regtest.harness import BitcoindNode, fund_wallet

MEMBER = hashlib.sha256(b"claims test member").digest()
ROOT = bytes(range(32))


def refused(why: Optional[Refusal], text: str, *, refuted: bool) -> None:
    """A refusal naming text; refuted = my bitcoind contradicts the claim (not merely cannot confirm it yet)."""
    assert why is not None and text in why.reason and why.refuted is refuted, why


def tx(payload: Payload, nonce: int = 0) -> Transaction:
    return sign(REGTEST, MEMBER, nonce, 0, payload, bytes(32))


def anchor(txid: bytes, block: bytes, height: int, status: AnchorStatus = AnchorStatus.CONFIRMED) -> Transaction:
    return tx(AnchorUpdate(7, ROOT, txid, block, height, status))


def pegout(txid: bytes, status: PegoutStatus) -> Transaction:
    return tx(PegoutUpdate(bytes([9]) * 32, status, txid, 1))


async def test_claims_agreeing_with_the_best_chain_pass_and_false_ones_are_refused(
        bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    w, addr = await fund_wallet(rpc, "claims", blocks=101)
    claims = BitcoinClaims(rpc, final_confirmations=3, pegout_confirmations=1)
    tip = await rpc.getblockcount()
    headers = [await rpc.getblockheader(await rpc.getblockhash(h)) for h in range(tip - 4, tip + 1)]

    # a transfer says nothing about Bitcoin: not even asked
    assert not claims.relevant([tx(Transfer(bytes(32), 1))])
    relay = tx(BtcHeaders(tip - 4, tuple(headers)))
    assert claims.relevant([relay])
    assert await claims.check([relay]) is None
    # one height off: not the best chain's block there
    why = await claims.check([tx(BtcHeaders(tip - 3, tuple(headers)))])
    refused(why, "not my bitcoind's best-chain block", refuted=True)
    # past my tip: my bitcoind has not seen it (yet)
    why = await claims.check([tx(BtcHeaders(tip, tuple(headers[-1:] * 2)))])
    refused(why, f"ends at height {tip}", refuted=False)

    # a transaction mined in a block: an anchor there is confirmed, final only once 3 deep
    paid = await w.sendtoaddress(addr, 100_000)
    assert await claims.check([pegout(paid, PegoutStatus.BROADCAST)]) is None  # in my mempool
    why = await claims.check([pegout(paid, PegoutStatus.COMPLETED)])
    refused(why, "depth 0 < 1", refuted=False)
    [block] = await rpc.generatetoaddress(1, addr)
    height = tip + 1
    assert await claims.check([pegout(paid, PegoutStatus.COMPLETED)]) is None
    assert await claims.check([anchor(paid, block, height)]) is None
    why = await claims.check([anchor(paid, block, height, AnchorStatus.FINAL)])
    refused(why, "at depth 1 in my bitcoind, 3 required", refuted=False)
    await rpc.generatetoaddress(2, addr)
    assert await claims.check([anchor(paid, block, height, AnchorStatus.FINAL)]) is None
    # the wrong block for that height, and a transaction that is not in the named block
    other = await rpc.getblockhash(height - 1)
    why = await claims.check([anchor(paid, other, height)])
    refused(why, "not my bitcoind's best-chain block at height", refuted=True)
    why = await claims.check([anchor(bytes([1]) * 32, block, height)])
    refused(why, "is not in block", refuted=True)
    # a peg-out transaction my bitcoind never saw
    why = await claims.check([pegout(bytes([2]) * 32, PegoutStatus.BROADCAST)])
    refused(why, "does not know transaction", refuted=False)
    # one false claim among true ones refuses the lot
    unknown = pegout(bytes([2]) * 32, PegoutStatus.BROADCAST)
    why = await claims.check([relay, anchor(paid, block, height), unknown])
    refused(why, "does not know", refuted=False)
    assert why is not None and why.txid == unknown.txid

    # a block my bitcoind no longer has in its best chain (a reorg): the relay of it is refused
    await rpc.invalidateblock(block)
    why = await claims.check([tx(BtcHeaders(height, (await rpc.getblockheader(block),)))])
    refused(why, "best chain ends", refuted=False)
    await rpc.generatetoaddress(1, await w.getnewaddress())  # another block at that height
    why = await claims.check([tx(BtcHeaders(height, (await rpc.getblockheader(block),)))])
    refused(why, "not my bitcoind's best-chain block", refuted=True)
    await rpc.reconsiderblock(block)  # the old branch is longer: back to it
    assert await claims.check([tx(BtcHeaders(height, (await rpc.getblockheader(block),)))]) is None


async def test_a_plan_paying_more_than_my_fee_limit_is_refused(bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    """A peg-out plan's fee rate is checked against my cap and my own estimate (regtest has none: the fallback)."""
    claims = BitcoinClaims(rpc, final_confirmations=3, pegout_confirmations=1, fee_fallback_sat_per_vb=3,
                           fee_max_sat_per_vb=10)

    def plan(rate: int) -> Transaction:
        return tx(PegoutPlan(5, rate, bytes(32), ((bytes([1]) * 32, 0),), (bytes([2]) * 32,)))
    assert claims.relevant([plan(1)])
    assert await claims.check([plan(1)]) is None
    assert await claims.check([plan(10)]) is None  # within 4 x 3 and the cap
    refused(await claims.check([plan(11)]), "my limit is 10 (cap 10", refuted=True)
    claims.fee_max = 100
    assert await claims.check([plan(12)]) is None
    refused(await claims.check([plan(13)]), "my limit is 12 (cap 100, 4 x my estimate of 3)", refuted=True)
    claims.fee_fallback = 8  # an estimate of 8: a plan below 8 // 4 = 2 would only wait in the mempools
    assert await claims.check([plan(2)]) is None
    refused(await claims.check([plan(1)]), "pays 1 sat/vB, below a 4th of my estimate of 8", refuted=True)


async def test_a_bitcoind_that_does_not_answer_means_no_signature(bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    claims = BitcoinClaims(rpc, final_confirmations=3, pegout_confirmations=1)
    header = await rpc.getblockheader(await rpc.getblockhash(0))
    relay = tx(BtcHeaders(0, (header,)))
    assert await claims.check([relay]) is None
    bitcoind.stop()
    why = await claims.check([relay])
    refused(why, "my bitcoind did not answer", refuted=False)
