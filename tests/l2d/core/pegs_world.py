"""The world of the bridge consensus tests (test_pegs.py, test_plans.py): a regtest Bitcoin chain built here, an
L2 state with a 2-of-3 federation, and the steps from a deposit to a completed peg-out plan, all through apply_tx.

The Bitcoin side is real regtest data: segwit transactions serialized by python-bitcoinlib, a coinbase with its
witness commitment, merkle roots, headers mined against nBits 0x207fffff (the regtest proof-of-work limit) and
partial merkle trees serialized exactly as bitcoind's gettxoutproof returns them. The L2 side is real too:
secp256k1 keys, BIP340-signed transactions, apply_tx over a StateView.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pytest
from bitcoin.core import (COIN, CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript, CScriptWitness,
                          CTxInWitness, CTxWitness)
from coincurve import PrivateKey

from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.coin_tx import Burn
from l2d.core.errors import Rejected
from l2d.core.params import REGTEST, Network
from l2d.core.payload import Payload
from l2d.core.pegs import (BRIDGE_TOTALS_KEY, BTC_TIP_KEY, FUNDING_CONTRACT, BridgeTotals, BtcTip, CoinKind, FedCoin,
                           Federation, PeginEntry, PegoutEntry, coin_key, deposit_script_pubkey, federation_genesis,
                           pegin_tweak, pegout_key, script_address)
from l2d.core.pegs_tx import (BtcHeaders, FederationFund, PeginClaim, PegoutPlan, PegoutStatus, PegoutUpdate,
                              PlanSignature)
from l2d.core.plans import ZERO, PlanEntry, PlanStatus, plan_key, plan_tx
from l2d.core.rules import apply_tx
from l2d.core.spv import (Header, build_partial_merkle_tree, compute_merkle_root, decode_compact, dsha256, make_header,
                          parse_tx, serialize_merkleblock)
from l2d.core.state import (SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key, genesis_state,
                            locked_sat)
from l2d.core.tree import KEY_SIZE
from l2d.core.tx import Transaction, sign

AUX = b"\0" * 32
RULES = Rules(REGTEST, 1)
MIN_DEPTH = 3  # regtest tests; signet/mainnet default to 102 (docs/bridge.md)
BITS = 0x207FFFFF  # regtest pow limit
T0 = 1_700_000_000
BASE = 100  # first relayed Bitcoin height (the federation's checkpoint)


def secret(name: str) -> bytes:
    return hashlib.sha256(b"l2d pegs consensus test key " + name.encode()).digest()


def xonly(sec: bytes) -> bytes:
    return PrivateKey(sec).public_key_xonly.format()


FED_SECRETS = [secret(f"fed{i}") for i in range(3)]
FED_KEYS = tuple(sorted(PrivateKey(s).public_key.format() for s in FED_SECRETS))
FED = Federation(2, FED_KEYS, MIN_DEPTH)
AUTH, AUTH2 = secret("member 1"), secret("member 2")  # federation members: sign BtcHeaders, AnchorUpdate, PegoutUpdate
MINT = secret("mint authority")
ALICE, BOB, CAROL = secret("alice"), secret("bob"), secret("carol")
BOB_FUNDS = 10_000_000


def spk(who: bytes, network: Network = REGTEST, fed: Federation = FED) -> bytes:
    return deposit_script_pubkey(fed, network.id, xonly(who))


def p2wpkh(tag: bytes) -> bytes:
    return b"\x00\x14" + hashlib.sha256(tag).digest()[:20]


# -- Bitcoin data --------------------------------------------------------------------------------------------------
def grind(prev: bytes, root: bytes, time: int, bits: int = BITS, *, valid: Optional[bool] = True) -> Header:
    """A header whose hash is at or below (valid) or above (not valid) the target of bits; None: nonce 0."""
    target = decode_compact(bits)[0]
    for nonce in range(1 << 20):
        h = make_header(0x20000000, prev, root, time, bits, nonce)
        if valid is None or (int.from_bytes(h.hash, "little") <= target) == valid:
            return h
    raise RuntimeError("no nonce found")  # pragma: no cover


def spend(outputs: list[tuple[int, bytes]], tag: bytes, *, witness: bool = True) -> bytes:
    """A transaction paying outputs from a made-up outpoint (signed-looking P2WPKH witness)."""
    txin = CMutableTxIn(COutPoint(dsha256(tag), 0), CScript(), 0xFFFFFFFD)
    wit = CTxWitness([CTxInWitness(CScriptWitness([b"\x30" * 71, b"\x02" + tag[:1] * 32]))]) if witness else None
    raw: bytes = CMutableTransaction([txin], [CMutableTxOut(v, CScript(s)) for v, s in outputs], 0, 2,
                                     wit).serialize()
    return raw


def coinbase(height: int, tag: bytes, txs: list[bytes]) -> bytes:
    """BIP34 height, BIP141 witness commitment over the block's wtxids (the coinbase's counts as zero)."""
    wtxids = [b"\0" * 32] + [dsha256(t) for t in txs]
    commitment = dsha256(compute_merkle_root(wtxids)[0] + b"\0" * 32)
    txin = CMutableTxIn(COutPoint(), CScript([height, tag]), 0xFFFFFFFF)
    outs = [CMutableTxOut(50 * COIN, CScript(p2wpkh(b"miner"))),
            CMutableTxOut(0, CScript(b"\x6a\x24\xaa\x21\xa9\xed" + commitment))]
    wit = CTxWitness([CTxInWitness(CScriptWitness([b"\0" * 32]))])
    raw: bytes = CMutableTransaction([txin], outs, 0, 2, wit).serialize()
    return raw


@dataclass
class Block:
    height: int
    header: Header
    txs: list[bytes]  # coinbase first, with witnesses
    txids: list[bytes]  # internal order

    def proof(self, index: int) -> bytes:
        """What `bitcoin-cli gettxoutproof '["<txid>"]'` returns for txs[index]."""
        pmt = build_partial_merkle_tree(self.txids, [i == index for i in range(len(self.txids))])
        return serialize_merkleblock(self.header, pmt)

    def claim(self, index: int, vout: int) -> PeginClaim:
        return PeginClaim(self.height, vout, self.txs[index], self.proof(index))


@dataclass
class Chain:
    """A regtest chain from BASE on (the headers before BASE are not needed by the L2)."""

    tag: bytes
    blocks: dict[int, Block] = field(default_factory=dict)

    def tip(self) -> int:
        return max(self.blocks, default=BASE - 1)

    def mine(self, txs: tuple[bytes, ...] = ()) -> Block:
        height = self.tip() + 1
        prev = self.blocks[height - 1].header.hash if height > BASE else dsha256(b"the block before the checkpoint")
        all_txs = [coinbase(height, self.tag, list(txs)), *txs]
        txids = [parse_tx(t).txid for t in all_txs]
        root, mutated = compute_merkle_root(txids)
        if mutated:
            raise ValueError("duplicate transactions")
        block = Block(height, grind(prev, root, T0 + 600 * height), all_txs, txids)
        self.blocks[height] = block
        return block

    def fork(self, height: int, tag: bytes) -> "Chain":
        """A chain sharing the blocks below height; blocks from height on are mined anew with another coinbase."""
        return Chain(tag, {h: b for h, b in self.blocks.items() if h < height})

    def relay(self, start: int, end: Optional[int] = None) -> BtcHeaders:
        end = self.tip() if end is None else end
        return BtcHeaders(start, tuple(self.blocks[h].header.serialize() for h in range(start, end + 1)))




# -- the L2 side ---------------------------------------------------------------------------------------------------
class World:
    """A state dict, the nonces of every signer, and apply/refuse helpers."""

    def __init__(self, *, bridge: bool = True, bob_funds: int = BOB_FUNDS, fed: Federation = FED) -> None:
        self.state = genesis_state([(xonly(BOB), bob_funds)], xonly(MINT), (xonly(AUTH), xonly(AUTH2)))
        self.fed = fed
        if bridge:
            self.state.update(federation_genesis(fed))
        self.nonce: Counter[bytes] = Counter()
        self.height = 1

    def sign(self, who: bytes, payload: Payload, fee: int = 0, nonce: Optional[int] = None) -> Transaction:
        return sign(REGTEST, who, self.nonce[xonly(who)] if nonce is None else nonce, fee, payload, AUX)

    def apply(self, tx: Transaction, height: Optional[int] = None) -> dict[bytes, Optional[bytes]]:
        view = StateView(self.state.get, self.height if height is None else height)
        apply_tx(view, tx, RULES)
        for k, v in view.writes.items():
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v
        self.nonce[tx.sender] += 1
        return view.writes

    def do(self, who: bytes, payload: Payload, fee: int = 0, height: Optional[int] = None) -> Transaction:
        tx = self.sign(who, payload, fee)
        self.apply(tx, height)
        return tx

    def refuse(self, tx: Transaction, err: type[Rejected], rules: Rules = RULES) -> Rejected:
        """tx is refused with exactly err, and the view it was applied to recorded nothing."""
        view = StateView(self.state.get, self.height)
        with pytest.raises(Rejected) as info:
            apply_tx(view, tx, rules)
        assert type(info.value) is err, f"{type(info.value).__name__}: {info.value}"
        assert view.writes == {}
        return info.value

    def account(self, who: bytes) -> Optional[Account]:
        raw = self.state.get(account_key(xonly(who)))
        return None if raw is None else Account.decode(raw)

    def supply(self) -> Supply:
        return Supply.decode(self.state[SUPPLY_KEY])

    def totals(self) -> BridgeTotals:
        return BridgeTotals.decode(self.state[BRIDGE_TOTALS_KEY])

    def tip(self) -> BtcTip:
        return BtcTip.decode(self.state[BTC_TIP_KEY])

    def coin(self, outpoint: tuple[bytes, int]) -> FedCoin:
        return FedCoin.decode(self.state[coin_key(*outpoint)])

    def pegout(self, pegout_id: bytes) -> PegoutEntry:
        return PegoutEntry.decode(self.state[pegout_key(pegout_id)])

    def plan(self, plan_id: bytes) -> PlanEntry:
        return PlanEntry.decode(self.state[plan_key(plan_id)])


def check_invariants(state: dict[bytes, bytes]) -> BridgeTotals:
    """The ledger invariant; the bridge totals re-derived from the peg-in and peg-out records; the federation's
    Bitcoin holdings (deposit and change coins not spent by a completed plan) equal pegged in - paid out; every key
    is a state tree key (33 bytes)."""
    assert {len(k) for k in state} == {KEY_SIZE}
    balances = sum(Account.decode(v).balance_sat for k, v in state.items() if k[0] == Namespace.ACCOUNT)
    sup = Supply.decode(state[SUPPLY_KEY])
    assert balances + sup.fees_sat + locked_sat(StateView(state.get)) == sup.minted_sat - sup.burned_sat
    totals = BridgeTotals.decode(state[BRIDGE_TOTALS_KEY])
    pegins = [PeginEntry.decode(v) for k, v in state.items() if k[0] == Namespace.PEGIN]
    pegouts = [PegoutEntry.decode(v) for k, v in state.items() if k[0] == Namespace.PEGOUT]
    assert totals.pegged_in_sat == sum(e.amount_sat for e in pegins)
    assert totals.pending_out_sat == sum(e.amount_sat for e in pegouts if e.status != PegoutStatus.COMPLETED)
    assert totals.paid_out_sat == sum(e.amount_sat for e in pegouts if e.status == PegoutStatus.COMPLETED)
    assert holdings(state) == totals.pegged_in_sat - totals.paid_out_sat
    return totals


def holdings(state: dict[bytes, bytes]) -> int:
    """Satoshis of the federation's deposit and change coins that no completed plan spent."""
    completed = {k[1:] for k, v in state.items() if k[0] == Namespace.PLAN
                 and PlanEntry.decode(v).status == PlanStatus.COMPLETED}
    coins = [FedCoin.decode(v) for k, v in state.items() if k[0] == Namespace.FED_COIN]
    return sum(c.amount_sat for c in coins if c.kind in (CoinKind.DEPOSIT, CoinKind.CHANGE)
               and c.spent_by not in completed)


# -- federation coins and peg-out plans --------------------------------------------------------------------------
BURN_HEIGHT = 10  # the L2 height of the peg-out burns
ANCHOR_HEIGHT = 12  # a FINAL anchor covering them
PAYOUTS = (b"\x00\x14" + b"\x13" * 20, b"\x00\x20" + b"\x37" * 32, b"\x51\x20" + b"\x42" * 32)  # P2WPKH, P2WSH, P2TR
CLAIM_FEE = 100


def address(script: bytes) -> bytes:
    """The regtest address of a payout script, as a Burn's destination."""
    addr = script_address(script, REGTEST)
    assert addr is not None
    return addr.encode()


# Deposits to the federation in block BASE+1 of COIN_CHAIN: (transaction index, vout, claimant, amount); the funding
# deposit is output 0 of transaction 4.
DEPOSITS: tuple[tuple[int, int, bytes, int], ...] = (
    (1, 0, ALICE, 400_000), (1, 1, ALICE, 150_000), (2, 0, CAROL, 300_000), (2, 2, CAROL, 90_000),
    (3, 0, BOB, 1_000_000), (3, 1, ALICE, 60_000))
FUNDING_SAT = 200_000


def coin_chain(fed: Federation = FED) -> Chain:
    """BASE: coinbase only; BASE+1: the deposits of DEPOSITS and a funding deposit to fed's scripts; up to BASE+3
    (depth 3)."""
    txs = [spend([(400_000, spk(ALICE, fed=fed)), (150_000, spk(ALICE, fed=fed))], b"coins alice"),
           spend([(300_000, spk(CAROL, fed=fed)), (5_000, p2wpkh(b"carol change")), (90_000, spk(CAROL, fed=fed))],
                 b"coins carol"),
           spend([(1_000_000, spk(BOB, fed=fed)), (60_000, spk(ALICE, fed=fed))], b"coins bob"),
           spend([(FUNDING_SAT, deposit_script_pubkey(fed, REGTEST.id, FUNDING_CONTRACT))], b"coins funding")]
    c = Chain(b"coins")
    c.mine()
    c.mine(tuple(txs))
    c.mine()
    c.mine()
    return c


COIN_CHAIN = coin_chain()
COIN_BLOCK = COIN_CHAIN.blocks[BASE + 1]
# A 2-of-3 federation with an emergency path (1 of 2 emergency keys, 144 blocks), its coin chain and block
FED_E = Federation(2, FED_KEYS, MIN_DEPTH, 1, tuple(sorted(PrivateKey(secret(f"emergency{i}")).public_key.format()
                                                          for i in range(2))), 144)
COIN_CHAIN_E = coin_chain(FED_E)
COIN_BLOCK_E = COIN_CHAIN_E.blocks[BASE + 1]


def outpoint(deposit: int, block: Block = COIN_BLOCK) -> tuple[bytes, int]:
    """The Bitcoin outpoint (txid internal order, vout) of DEPOSITS[deposit] (in `block`: COIN_BLOCK_E for FED_E)."""
    tx, vout, _, _ = DEPOSITS[deposit]
    return block.txids[tx], vout


FUNDING_OUTPOINT = (COIN_BLOCK.txids[4], 0)
FUNDING_OUTPOINT_E = (COIN_BLOCK_E.txids[4], 0)


def claim(w: World, deposit: int, block: Block = COIN_BLOCK) -> Transaction:
    tx, vout, who, _ = DEPOSITS[deposit]
    return w.do(who, block.claim(tx, vout), fee=CLAIM_FEE)


def coin_world(claimed: Sequence[int] = tuple(range(len(DEPOSITS))), fed: Federation = FED) -> World:
    """The coin chain of fed (FED or FED_E) relayed, the deposits `claimed` claimed (federation coins of kind
    DEPOSIT) and the funding deposit recorded (a FUNDING coin)."""
    w = World(fed=fed)
    chain, block = (COIN_CHAIN, COIN_BLOCK) if fed == FED else (COIN_CHAIN_E, COIN_BLOCK_E)
    w.do(AUTH, chain.relay(BASE))
    for d in claimed:
        claim(w, d, block)
    f = block.claim(4, 0)
    w.do(AUTH, FederationFund(f.btc_height, f.vout, f.btc_tx, f.merkle_block))
    return w


def record_anchor(w: World, l2_height: int, status: AnchorStatus) -> None:
    confirmed = status != AnchorStatus.SUBMITTED
    w.do(AUTH, AnchorUpdate(l2_height, b"\x11" * 32, b"\x22" * 32, b"\x33" * 32 if confirmed else b"\0" * 32,
                            150 if confirmed else 0, status))


def burn(w: World, amount: int, script: bytes = PAYOUTS[1], height: int = BURN_HEIGHT) -> bytes:
    """Bob burns amount to script's address at height: a PENDING peg-out; returns its id."""
    return w.do(BOB, Burn(amount, address(script)), fee=10, height=height).txid


def plan_of(writes: dict[bytes, Optional[bytes]]) -> bytes:
    """The id of the plan a PegoutPlan recorded (the one PLANNED record among its writes)."""
    (pid,) = [k[1:] for k, v in writes.items() if k[0] == Namespace.PLAN and v is not None
              and PlanEntry.decode(v).status == PlanStatus.PLANNED]
    return pid


def post_plan(w: World, inputs: Sequence[tuple[bytes, int]], pegouts: Sequence[bytes], rate: int = 1,
              replaces: bytes = ZERO, anchor_height: int = ANCHOR_HEIGHT, who: bytes = AUTH) -> bytes:
    """A member's PegoutPlan applied; returns the plan's id."""
    return plan_of(w.apply(w.sign(who, PegoutPlan(anchor_height, rate, replaces, tuple(inputs), tuple(pegouts)))))


def key_index(sec: bytes) -> int:
    """The index of the federation key of sec in FED's (sorted) keys: what a PlanSignature names."""
    return FED_KEYS.index(PrivateKey(sec).public_key.format())


def sign_plan(w: World, plan_id: bytes, sec: bytes) -> tuple[bytes, ...]:
    """sec's signatures of the plan's inputs, made directly with coincurve: DER over PlanTx.sighash by the secret
    tweaked for each input's contract (an anchor output's: BIP340 by the untweaked secret), plus SIGHASH_ALL."""
    ptx = plan_tx(StateView(w.state.get, w.height), w.fed, REGTEST.id, w.plan(plan_id))
    pub = PrivateKey(sec).public_key.format()
    return tuple((PrivateKey(sec).sign_schnorr(ptx.sighash(i), AUX) if c.kind == CoinKind.ANCHOR  # BIP340, ALL
                  else PrivateKey(sec).add(pegin_tweak(pub, REGTEST.id, c.contract)).sign(ptx.sighash(i), hasher=None))
                 + b"\x01" for i, c in enumerate(ptx.coins))


def post_signatures(w: World, plan_id: bytes, secrets: Sequence[bytes] = FED_SECRETS[:FED.threshold],
                    who: bytes = AUTH) -> None:
    """A member posts the PlanSignatures of the federation keys of secrets (by default m of them: the version can
    then be finalized and broadcast, so it may be replaced)."""
    for sec in secrets:
        w.do(who, PlanSignature(plan_id, key_index(sec), sign_plan(w, plan_id, sec)))


def complete(w: World, plan_id: bytes, pegout_id: bytes, anchor_height: int = ANCHOR_HEIGHT) -> None:
    """Record plan_id's transaction for pegout_id as BROADCAST, then COMPLETED (mined)."""
    w.do(AUTH, PegoutUpdate(pegout_id, PegoutStatus.BROADCAST, plan_id, anchor_height))
    w.do(AUTH, PegoutUpdate(pegout_id, PegoutStatus.COMPLETED, plan_id, anchor_height))
