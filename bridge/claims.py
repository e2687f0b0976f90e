"""A member's signing policy on Bitcoin claims: does what a block says about Bitcoin agree with *my* bitcoind?

Consensus checks what it can without a bitcoind (relayed headers link and carry their proof of work; an anchor or
peg-out update is signed by a member and moves a known record forward). Whether those claims are true of Bitcoin's
best chain is something only a bitcoind can tell, and each member asks its own before it signs
(docs/federation.md, "Signing policy"):

- a header relay: every relayed header is the block my bitcoind has at that height in its best chain;
- an anchor update CONFIRMED or FINAL: the named block is my best chain's block at that height, the anchor
  transaction is in it, and (FINAL) it is at least ``final_confirmations`` deep;
- a peg-out update BROADCAST: my bitcoind knows the transaction (mempool or chain; with -txindex for a mined one);
  COMPLETED, and a roll's PlanCompleted: it is mined at least ``pegout_confirmations`` deep;
- a peg-out plan, a roll or an anchor plan: its fee rate is within my cap (``bridge.fee_max_sat_per_vb``), at most FEE_TOLERANCE
  times and at least a FEE_TOLERANCE-th of the rate my own bitcoind estimates (``estimatesmartfee``, or
  ``bridge.fee_fallback_sat_per_vb`` without an estimate): a proposer cannot make the federation overpay.
  Replacements double the rate, so at an unchanged estimate two of them are accepted.

An anchor update SUBMITTED is not checked: it moves no money and commits nothing; the CONFIRMED update that
follows is. Anything my bitcoind cannot answer (not synced yet, down, no -txindex) is a refusal for now: the
member does not sign, and asks again when the block is proposed again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from l2d.core.anchor import AnchorEntry
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.pegs_tx import AnchorPlan, BtcHeaders, PegoutPlan, PegoutStatus, PegoutUpdate, PlanCompleted, RollPlan
from l2d.core.spv import dsha256
from l2d.core.tx import Transaction

from .rpc import BitcoinRPC, hash_to_hex
from .rpc_errors import RPCError


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why I do not sign: reason for the log; refuted when my bitcoind contradicts the claim of transaction txid
    (its best chain has another block there, the named block lacks the transaction), not merely cannot confirm it
    yet (behind, down, too shallow)."""

    reason: str
    txid: Optional[bytes] = None
    refuted: bool = False


FEE_TOLERANCE = 4


def _claim(p: Any) -> bool:
    return isinstance(p, (BtcHeaders, PegoutUpdate, PegoutPlan, RollPlan, AnchorPlan, PlanCompleted)) or (
        isinstance(p, AnchorUpdate) and p.status != AnchorStatus.SUBMITTED)


class BitcoinClaims:
    """The claims policy of one member, against its own bitcoind."""

    def __init__(self, rpc: BitcoinRPC, *, final_confirmations: int, pegout_confirmations: int,
                 fee_fallback_sat_per_vb: int = 2, fee_max_sat_per_vb: int = 500) -> None:
        self.rpc, self.final_confirmations, self.pegout_confirmations = rpc, final_confirmations, pegout_confirmations
        self.fee_fallback, self.fee_max = fee_fallback_sat_per_vb, fee_max_sat_per_vb

    @staticmethod
    def relevant(txs: Sequence[Transaction]) -> bool:
        """Does any transaction say something about Bitcoin that my bitcoind should confirm?"""
        return any(_claim(tx.payload) for tx in txs)

    async def check(self, txs: Sequence[Transaction]) -> Optional[Refusal]:
        """None when every claim in txs agrees with my bitcoind's best chain, else the first refusal."""
        rpc = self.rpc
        try:
            tip = await rpc.getblockcount()
            for tx in txs:
                p = tx.payload
                if isinstance(p, BtcHeaders):
                    why = await _headers(rpc, tip, p)
                elif isinstance(p, AnchorUpdate) and p.status != AnchorStatus.SUBMITTED:
                    why = await _anchor(rpc, tip, p, self.final_confirmations)
                elif isinstance(p, PegoutUpdate):
                    why = await _mined(rpc, f"peg-out {p.pegout_id.hex()}", p.btc_txid,
                                       self.pegout_confirmations if p.status == PegoutStatus.COMPLETED else 0)
                elif isinstance(p, PlanCompleted):
                    why = await _mined(rpc, "roll", p.plan_id, self.pegout_confirmations)
                elif isinstance(p, (PegoutPlan, RollPlan, AnchorPlan)):
                    why = await self._plan_fee(p)
                else:
                    continue
                if why is not None:
                    return Refusal(f"transaction {tx.txid.hex()}: {why[0]}", tx.txid, why[1])
        except RPCError as e:
            return Refusal(f"my bitcoind did not answer ({type(e).__name__}: {e})")
        return None

    async def _plan_fee(self, p: PegoutPlan | RollPlan | AnchorPlan) -> "Why":
        mine = await my_feerate(self.rpc, self.fee_fallback, self.fee_max)
        limit = min(self.fee_max, FEE_TOLERANCE * mine)
        if p.feerate_sat_vb > limit:
            return (f"peg-out plan pays {p.feerate_sat_vb} sat/vB; my limit is {limit} (cap {self.fee_max}, "
                    f"{FEE_TOLERANCE} x my estimate of {mine})"), True
        if p.feerate_sat_vb < mine // FEE_TOLERANCE:  # would only wait in (or out of) the mempools
            return (f"peg-out plan pays {p.feerate_sat_vb} sat/vB, below a {FEE_TOLERANCE}th of my estimate of "
                    f"{mine}"), True
        return None


async def my_feerate(rpc: BitcoinRPC, fallback: int, cap: int) -> int:
    """The fee rate (sat/vB) my bitcoind estimates for 6 blocks, or fallback without an estimate, within 1..cap."""
    est = await rpc.estimatesmartfee(6)
    return max(1, min(cap, fallback if est is None else -(-est // 1000)))


Why = Optional[tuple[str, bool]]  # (reason, refuted) or None


async def _in_best_chain(rpc: BitcoinRPC, tip: int, height: int, block_hash: bytes) -> Why:
    if height > tip:
        return f"my bitcoind's best chain ends at height {tip}, below {height}", False
    if await rpc.getblockhash(height) != block_hash:
        return f"block {hash_to_hex(block_hash)} is not my bitcoind's best-chain block at height {height}", True
    return None


async def _headers(rpc: BitcoinRPC, tip: int, p: BtcHeaders) -> Why:
    for i, header in enumerate(p.headers):
        why = await _in_best_chain(rpc, tip, p.start_height + i, dsha256(header))
        if why is not None:
            return f"relayed header: {why[0]}", why[1]
    return None


async def anchor_in_my_chain(rpc: BitcoinRPC, entry: AnchorEntry, l2_height: int, min_depth: int) -> Why:
    """Is the anchor of L2 height l2_height, as the state records it, in my bitcoind's best chain, at least
    min_depth deep? (The bridge asks this before it signs a plan paying burns the anchor covers.)"""
    if entry.btc_height == 0:
        return f"anchor of L2 height {l2_height} is not confirmed in the L2 state", False
    return await _anchor_in_chain(rpc, await rpc.getblockcount(), l2_height, entry.btc_txid, entry.btc_block_hash,
                                  entry.btc_height, min_depth)


async def _anchor(rpc: BitcoinRPC, tip: int, p: AnchorUpdate, final_confirmations: int) -> Why:
    return await _anchor_in_chain(rpc, tip, p.l2_height, p.btc_txid, p.btc_block_hash, p.btc_height,
                                  final_confirmations if p.status == AnchorStatus.FINAL else 1)


async def _anchor_in_chain(rpc: BitcoinRPC, tip: int, l2_height: int, txid: bytes, block_hash: bytes,
                           btc_height: int, min_depth: int) -> Why:
    why = await _in_best_chain(rpc, tip, btc_height, block_hash)
    if why is not None:
        return f"anchor of L2 height {l2_height}: {why[0]}", why[1]
    try:
        await rpc.getrawtransaction(txid, block_hash)
    except RPCError:
        return (f"anchor of L2 height {l2_height}: transaction {hash_to_hex(txid)} is not in block "
                f"{hash_to_hex(block_hash)}"), True
    depth = tip - btc_height + 1
    if depth < min_depth:
        return f"anchor of L2 height {l2_height} is at depth {depth} in my bitcoind, {min_depth} required", False
    return None


async def _mined(rpc: BitcoinRPC, what: str, txid: bytes, confirmations: int) -> Why:
    """My bitcoind knows the transaction (mempool or chain) and, with confirmations > 0, has it that deep."""
    try:
        info = await rpc.call("getrawtransaction", [hash_to_hex(txid), 1])
    except RPCError:
        return (f"{what}: my bitcoind does not know transaction {hash_to_hex(txid)} "
                "(not in its mempool, nor in a block it indexes: -txindex)"), False
    depth = int(info.get("confirmations", 0)) if isinstance(info, dict) else 0
    if depth < confirmations:
        return f"{what} claimed completed at depth {depth} < {confirmations}", False
    return None
