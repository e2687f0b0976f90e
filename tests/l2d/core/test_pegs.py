"""Bridge consensus (l2d/core/pegs.py, l2d/core/pegs_tx.py) without bitcoind, in the world of pegs_world.py: real
regtest Bitcoin data built there (transactions, blocks, headers, gettxoutproof proofs) and a real L2 state.

Every refusal asserts the exact exception class and that the view recorded no write.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Optional

import pytest
from bitcoin.core import CScript
from bitcoin.core.script import OP_CHECKMULTISIG, OP_CHECKSEQUENCEVERIFY, OP_ELSE, OP_ENDIF, OP_IF, OP_VERIFY
from bitcoin.segwit_addr import decode as bitcoinlib_segwit_decode
from bitcoinutils.bech32 import Encoding
from bitcoinutils.bech32 import bech32_encode as bu_bech32_encode
from bitcoinutils.bech32 import convertbits
from bitcoinutils.keys import P2wshAddress
from bitcoinutils.script import Script
from coincurve import PrivateKey, PublicKey
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from l2d.core.anchor_tx import AnchorStatus
from l2d.core.coin_tx import Burn, Transfer
from l2d.core.errors import (BadNonce, DecodeError, DuplicateDuty, FeeTooLow, InsufficientBalance, InvalidTransaction,
                             OutOfRange, Overflow, Rejected, Unauthorized, UnknownSender)
from l2d.core.hashing import H_PEGIN_TWEAK
from l2d.core.params import LOCAL, MAINNET, MAX_MONEY, REGTEST, SIGNET, Network
from l2d.core.pegs import (BRIDGE_TOTALS_KEY, BTC_TIP_KEY, FEDERATION_KEY, FUNDED_KEY, FUNDING_CONTRACT,
                           PEGOUT_MIN_SAT, SECP256K1_N, AlreadyClaimed, BadAddress, BadPegoutTransition, BadRelay,
                           BridgeTotals, BtcTip, ClaimTooShallow, CoinKind, FedCoin, Federation, InvalidPeginProof,
                           NoBridge, PeginEntry, PegoutEntry, PegoutNotAnchored, PegoutTooSmall, UnknownBtcBlock,
                           UnknownPegout, WrongDepositAddress, address_script, btc_header_key, coin_key,
                           deposit_script_pubkey, descriptor_of, federation_genesis, funded_sat, pegin_key,
                           pegin_tweak, pegout_key, script_address, witness_script)
from l2d.core.pegs_tx import MAX_RELAY_HEADERS, BtcHeaders, FederationFund, PeginClaim, PegoutStatus, PegoutUpdate
from l2d.core.rules import apply_tx
from l2d.core.spv import (BITCOIN_REGTEST, build_partial_merkle_tree, compute_merkle_root, decode_compact, dsha256,
                          parse_tx, serialize_merkleblock)
from l2d.core.state import SUPPLY_KEY, Account, Namespace, StateView, Supply, account_key
from l2d.core.tx import MAX_TX_SIZE, decode, sign
from tests.l2d.core.pegs_world import (ALICE, ANCHOR_HEIGHT, AUTH, AUTH2, AUX, BASE, BITS, BOB, BOB_FUNDS, BURN_HEIGHT,
                                       CAROL, FED, FED_KEYS, FED_SECRETS, MIN_DEPTH, MINT, RULES, Block, Chain, World,
                                       burn, check_invariants, coin_world, grind, outpoint, p2wpkh, post_plan,
                                       post_signatures, record_anchor, secret, spend, spk, xonly)

DEPOSIT_ALICE = spend([(250_000, spk(ALICE)), (99_000, p2wpkh(b"alice change"))], b"alice")
# Carol: two deposits in one transaction, a zero-value output to her address, and an output for another network
DEPOSIT_CAROL = spend([(1_000, p2wpkh(b"x")), (70_000, spk(CAROL)), (30_000, spk(CAROL)), (0, spk(CAROL)),
                       (40_000, spk(CAROL, MAINNET))], b"carol")
FILLERS = tuple(spend([(5_000 + i, p2wpkh(b"f%d" % i))], b"filler%d" % i) for i in range(4))


def main_chain() -> Chain:
    """BASE: coinbase only; BASE+1: deposits (coinbase, Alice at 1, Carol at 2, 4 fillers); up to BASE+3."""
    c = Chain(b"main")
    c.mine()
    c.mine((DEPOSIT_ALICE, DEPOSIT_CAROL) + FILLERS)
    c.mine()
    c.mine()
    return c


CHAIN = main_chain()
DEP = CHAIN.blocks[BASE + 1]


def relayed_world(chain: Chain = CHAIN, end: Optional[int] = None) -> World:
    w = World()
    w.do(AUTH, chain.relay(BASE, end))
    return w


# == the Bitcoin data itself =======================================================================================
def test_built_bitcoin_data_is_consistent() -> None:
    """Guards the fixtures: PoW under the regtest limit, linkage, txids from the stripped serialization."""
    prev = None
    for h in range(BASE, CHAIN.tip() + 1):
        b = CHAIN.blocks[h]
        assert int.from_bytes(b.header.hash, "little") <= decode_compact(BITS)[0] <= BITCOIN_REGTEST.pow_limit
        if prev is not None:
            assert b.header.prev_hash == prev
        prev = b.header.hash
        assert compute_merkle_root(b.txids)[0] == b.header.merkle_root
    info = parse_tx(DEPOSIT_ALICE)
    assert info.tx.has_witness() and info.txid != dsha256(DEPOSIT_ALICE)
    assert DEP.txids[1] == info.txid and len(DEP.txids) == 7
    assert bytes(info.tx.vout[0].scriptPubKey) == spk(ALICE)


# == payload layouts ===============================================================================================
def test_payload_layouts_round_trip() -> None:
    relay = CHAIN.relay(BASE, BASE + 1)
    raw = relay.encode()
    assert raw[:5] == BASE.to_bytes(4, "big") + b"\x02" and len(raw) == 5 + 160
    assert BtcHeaders.decode(raw) == relay
    claim = DEP.claim(1, 0)
    raw = claim.encode()
    assert raw[:8] == (BASE + 1).to_bytes(4, "big") + (0).to_bytes(4, "big")
    n = len(DEPOSIT_ALICE)
    assert n < 253 and raw[8] == n and raw[9:9 + n] == DEPOSIT_ALICE  # CompactSize, one byte here
    assert raw[9 + n] == len(claim.merkle_block) == 80 + 4 + 1 + 4 * 32 + 1 + 1  # 7 txs: 4 hashes, 1 flag byte
    assert raw[10 + n:] == claim.merkle_block
    assert PeginClaim.decode(raw) == claim
    upd = PegoutUpdate(b"\x01" * 32, PegoutStatus.BROADCAST, b"\x02" * 32, 7)
    raw = upd.encode()
    assert raw == b"\x01" * 32 + b"\x02" + b"\x02" * 32 + (7).to_bytes(8, "big") and len(raw) == 73
    assert PegoutUpdate.decode(raw) == upd and isinstance(PegoutUpdate.decode(raw).status, PegoutStatus)
    tx = sign(REGTEST, ALICE, 0, 10, claim, AUX)
    assert decode(tx.encode(), REGTEST) == tx and len(tx.encode()) <= MAX_TX_SIZE


@pytest.mark.parametrize("cls,raw", [
    (BtcHeaders, BASE.to_bytes(4, "big") + b"\x00"),  # zero headers
    (BtcHeaders, BASE.to_bytes(4, "big") + bytes((MAX_RELAY_HEADERS + 1,)) + b"\0" * 80 * (MAX_RELAY_HEADERS + 1)),
    (BtcHeaders, BASE.to_bytes(4, "big") + b"\x01" + b"\0" * 79),  # truncated header
    (BtcHeaders, BASE.to_bytes(4, "big") + b"\x01" + b"\0" * 81),  # trailing byte
    (BtcHeaders, (2**32 - 1).to_bytes(4, "big") + b"\x02" + b"\0" * 160),  # runs past height 2**32 - 1
    (PeginClaim, b"\0" * 8 + b"\x00" + b"\x51" + b"\0" * 81),  # empty transaction
    (PeginClaim, b"\0" * 8 + b"\x01\x00" + bytes((80,)) + b"\0" * 80),  # merkle block of a bare header
    (PeginClaim, b"\0" * 8 + b"\x01\x00" + b"\x51" + b"\0" * 81 + b"\0"),  # trailing byte
    (PeginClaim, b"\0" * 8 + b"\xfd\xb9\x0b" + b"\0" * 3001 + b"\x51" + b"\0" * 81),  # tx above 3000 bytes
    (PeginClaim, b"\0" * 8 + b"\xfd\x01\x00" + b"\0" + b"\x51" + b"\0" * 81),  # non-minimal CompactSize
    (PegoutUpdate, b"\x01" * 32 + b"\x01" + b"\x02" * 32 + b"\0" * 8),  # status PENDING is not an update
    (PegoutUpdate, b"\x01" * 32 + b"\x04" + b"\x02" * 32 + b"\0" * 8),  # status 4
    (PegoutUpdate, b"\x01" * 32 + b"\x02" + b"\x00" * 32 + b"\0" * 8),  # zero Bitcoin txid
    (PegoutUpdate, b"\x01" * 32 + b"\x02" + b"\x02" * 32 + b"\0" * 7),  # 72 bytes
])
def test_payloads_decode_strictly(cls: type[BtcHeaders] | type[PeginClaim] | type[PegoutUpdate],
                                  raw: bytes) -> None:
    with pytest.raises(DecodeError):
        cls.decode(raw)


def test_federation_record_and_validation() -> None:
    raw = FED.encode()
    assert raw[:4] == b"\x02\x03\x00\x03" and raw[4:] == b"".join(FED_KEYS) and len(raw) == 4 + 99
    assert Federation.decode(raw) == FED
    assert federation_genesis(FED) == {FEDERATION_KEY: raw, BRIDGE_TOTALS_KEY: b"\0" * 24}
    assert FEDERATION_KEY == b"\0" + b"bridge/federation".ljust(32, b"\0")
    with pytest.raises(DecodeError):
        Federation.decode(raw + b"\0")
    for bad in [lambda: Federation(0, FED_KEYS, 3), lambda: Federation(4, FED_KEYS, 3),
                lambda: Federation(2, FED_KEYS, 0), lambda: Federation(2, FED_KEYS, 65536),
                lambda: Federation(2, FED_KEYS[::-1], 3),  # not sorted
                lambda: Federation(2, (FED_KEYS[0], FED_KEYS[0], FED_KEYS[1]), 3),  # one key twice
                lambda: Federation(1, (b"\x02" + b"\0" * 32,), 3),  # not a curve point
                lambda: Federation(1, (PrivateKey(ALICE).public_key.format(compressed=False)[:33],), 3),
                lambda: Federation(1, (), 3)]:
        with pytest.raises(InvalidTransaction):
            bad()


# == header relay ==================================================================================================
def test_first_relay_sets_the_base_and_the_tip() -> None:
    w = World()
    writes = w.apply(w.sign(AUTH, CHAIN.relay(BASE, BASE + 1)))
    assert w.tip() == BtcTip(BASE, BASE + 1, CHAIN.blocks[BASE + 1].header.hash)
    for h in (BASE, BASE + 1):
        key = btc_header_key(h)
        assert key == b"\x09" + h.to_bytes(32, "big")
        assert w.state[key] == CHAIN.blocks[h].header.serialize()
    assert set(writes) == {btc_header_key(BASE), btc_header_key(BASE + 1), BTC_TIP_KEY, account_key(xonly(AUTH))}
    assert w.account(AUTH) == Account(0, 1)
    assert len(w.state[BTC_TIP_KEY]) == 40


def test_relay_extends_the_tip() -> None:
    w = World()
    w.do(AUTH, CHAIN.relay(BASE, BASE + 1))
    w.do(AUTH, CHAIN.relay(BASE + 2, BASE + 3))
    assert w.tip() == BtcTip(BASE, BASE + 3, CHAIN.blocks[BASE + 3].header.hash)
    # re-relaying headers already relayed (the tip, or any run at or below it) adds nothing: a duplicate duty
    w.refuse(w.sign(AUTH, CHAIN.relay(BASE + 3)), DuplicateDuty)
    w.refuse(w.sign(AUTH, CHAIN.relay(BASE + 1, BASE + 2)), DuplicateDuty)
    # a gap after the tip, and a relay replacing the base (the checkpoint), are refused
    fresh = World()
    fresh.do(AUTH, CHAIN.relay(BASE, BASE + 1))
    fresh.refuse(fresh.sign(AUTH, CHAIN.relay(BASE + 3, BASE + 3)), BadRelay)  # gap at BASE + 2
    fresh.refuse(fresh.sign(AUTH, CHAIN.relay(BASE, BASE + 2)), BadRelay)  # replaces the base


def test_reorg_replacement_from_a_lower_height() -> None:
    w = relayed_world()  # BASE .. BASE+3
    fork = CHAIN.fork(BASE + 1, b"fork")
    for _ in range(4):
        fork.mine()
    assert fork.blocks[BASE + 1].header.hash != CHAIN.blocks[BASE + 1].header.hash
    # same length: allowed (the authority follows bitcoind's best chain)
    w.do(AUTH, fork.relay(BASE + 1, BASE + 3))
    assert w.tip() == BtcTip(BASE, BASE + 3, fork.blocks[BASE + 3].header.hash)
    # back to the original chain, longer
    w.do(AUTH, CHAIN.relay(BASE + 1))
    assert w.tip().block_hash == CHAIN.blocks[BASE + 3].header.hash
    w.do(AUTH, fork.relay(BASE + 1, BASE + 4))
    assert w.tip() == BtcTip(BASE, BASE + 4, fork.blocks[BASE + 4].header.hash)
    for h in range(BASE + 1, BASE + 5):
        assert w.state[btc_header_key(h)] == fork.blocks[h].header.serialize()
    assert w.state[btc_header_key(BASE)] == CHAIN.blocks[BASE].header.serialize()


def test_relay_may_end_below_the_tip_and_stale_records_are_never_read() -> None:
    """A deep reorg is followed from its fork point in steps: the first replacement ends below the old tip; the
    records above the new tip are stale (a claim of a block there is UnknownBtcBlock) and get overwritten as the
    relayed chain grows again."""
    w = relayed_world()  # BASE .. BASE+3
    fork = CHAIN.fork(BASE + 1, b"fork")
    for _ in range(4):
        fork.mine()
    w.do(AUTH, fork.relay(BASE + 1, BASE + 1))  # one header: the tip moves down from BASE+3 to BASE+1
    assert w.tip() == BtcTip(BASE, BASE + 1, fork.blocks[BASE + 1].header.hash)
    assert w.state[btc_header_key(BASE + 3)] == CHAIN.blocks[BASE + 3].header.serialize()  # stale, above the tip
    w.refuse(w.sign(AUTH, fork.relay(BASE + 3, BASE + 3)), BadRelay)  # may not start past tip + 1
    w.do(AUTH, fork.relay(BASE + 2, BASE + 4))
    for h in range(BASE + 1, BASE + 5):
        assert w.state[btc_header_key(h)] == fork.blocks[h].header.serialize()


def test_relay_refusals() -> None:
    w = relayed_world()  # tip BASE+3
    fork = CHAIN.fork(BASE + 1, b"fork")
    for _ in range(2):
        fork.mine()
    # bad link to the relayed chain: the fork's BASE+2 does not follow the relayed BASE+1
    w.refuse(w.sign(AUTH, BtcHeaders(BASE + 2, (fork.blocks[BASE + 2].header.serialize(),
                                                 CHAIN.blocks[BASE + 3].header.serialize()))), BadRelay)
    # linked among themselves, but not to the relayed BASE + 1 (the fork's own BASE + 1 was never relayed)
    fork.mine()
    w.refuse(w.sign(AUTH, fork.relay(BASE + 2, BASE + 3)), BadRelay)
    # bad link inside the batch
    w.refuse(w.sign(AUTH, BtcHeaders(BASE + 1, (CHAIN.blocks[BASE + 1].header.serialize(),
                                                 fork.blocks[BASE + 2].header.serialize(),
                                                 CHAIN.blocks[BASE + 3].header.serialize()))), BadRelay)
    # a gap
    ext = Chain(b"main", dict(CHAIN.blocks))
    ext.mine()
    ext.mine()
    w.refuse(w.sign(AUTH, ext.relay(BASE + 5)), BadRelay)
    # the extension itself is fine: the refusals above consumed nothing
    w.do(AUTH, ext.relay(BASE + 4))
    assert w.tip().height == BASE + 5


@pytest.mark.parametrize("bits,valid,what", [
    (BITS, False, "hash above the target"),
    (0x1D00FFFF, False, "hash above the target"),  # mainnet's difficulty, not met
    (0x2100FFFF, None, "above the chain's proof-of-work limit"),
    (0x20800001, None, "negative target"),
    (0x20000000, None, "zero target"),
    (0x2300FFFF, None, "overflow 256 bits"),
])
def test_relay_bad_proof_of_work(bits: int, valid: Optional[bool], what: str) -> None:
    tip = CHAIN.blocks[BASE + 3].header
    bad = grind(tip.hash, b"\x42" * 32, tip.time + 600, bits, valid=valid)
    w = relayed_world()
    err = w.refuse(w.sign(AUTH, BtcHeaders(BASE + 4, (bad.serialize(),))), BadRelay)
    assert f"height {BASE + 4}" in str(err) and what in str(err) and err.reason == "bad-header-relay"
    # also as the first relay of a chain (no tip to link to)
    fresh = World()
    fresh.refuse(fresh.sign(AUTH, BtcHeaders(BASE + 4, (bad.serialize(),))), BadRelay)


def test_relay_authority_fee_nonce_and_no_bridge() -> None:
    w = World()
    relay = CHAIN.relay(BASE, BASE + 1)
    w.refuse(w.sign(BOB, relay), Unauthorized)
    w.refuse(w.sign(MINT, relay), Unauthorized)
    w.refuse(w.sign(AUTH, relay, fee=1), InvalidTransaction)
    w.refuse(w.sign(secret("fed0"), relay), Unauthorized)  # a bridge signer's Bitcoin key is no member key
    tx = w.sign(AUTH, relay, nonce=1)  # a gap in a member's nonces is allowed (a refused duplicate leaves one)
    w.apply(tx)
    assert w.account(AUTH) == Account(0, 2)
    w.nonce[xonly(AUTH)] = 2
    w.refuse(tx, BadNonce)  # the same signed relay again: a member's nonce is checked first
    w.refuse(w.sign(AUTH, CHAIN.relay(BASE + 2), nonce=0), BadNonce)  # the nonce the gap skipped: never again
    w.refuse(w.sign(AUTH2, relay), DuplicateDuty)  # the other member's copy of it: relayed already
    again = CHAIN.relay(BASE + 2)
    w.refuse(w.sign(AUTH, again, nonce=1), BadNonce)  # replayed nonce
    w.refuse(w.sign(BOB, again), Unauthorized)
    w.do(AUTH2, again)  # the other member extends the chain, with its own nonce 0
    assert w.tip().height == CHAIN.tip() and w.nonce[xonly(AUTH2)] == 1
    w.refuse(w.sign(AUTH, CHAIN.relay(BASE + 1, BASE + 2)), DuplicateDuty)  # a run inside the relayed chain
    plain = World(bridge=False)
    assert FEDERATION_KEY not in plain.state
    plain.refuse(plain.sign(AUTH, relay), NoBridge)


# == peg-in claims =================================================================================================
def test_claim_happy_path() -> None:
    w = relayed_world()
    before_sup, before_tot = w.supply(), w.totals()
    assert w.account(ALICE) is None  # the claimant needs no account
    fee = 500
    writes = w.apply(w.sign(ALICE, DEP.claim(1, 0), fee=fee))
    amount = 250_000
    assert w.account(ALICE) == Account(amount - fee, 1)
    sup = w.supply()
    assert sup == Supply(before_sup.minted_sat + amount, before_sup.burned_sat, before_sup.fees_sat + fee)
    assert w.totals() == BridgeTotals(before_tot.pegged_in_sat + amount, 0, 0)
    key = pegin_key(DEP.txids[1], 0)
    assert key[0] == Namespace.PEGIN and len(key) == 33
    entry = PeginEntry.decode(w.state[key])
    assert entry == PeginEntry(DEP.txids[1], 0, amount, BASE + 1, xonly(ALICE))
    assert len(entry.encode()) == 80
    coin = coin_key(DEP.txids[1], 0)
    # the federation's coin, under a 33-byte key as every state key
    assert FedCoin.decode(w.state[coin]) == FedCoin(DEP.txids[1], 0, amount, CoinKind.DEPOSIT, xonly(ALICE))
    assert coin[0] == Namespace.FED_COIN and len(coin) == 33 and len(w.state[coin]) == 109
    assert set(writes) == {account_key(xonly(ALICE)), SUPPLY_KEY, key, coin, BRIDGE_TOTALS_KEY}
    check_invariants(w.state)


FUNDING_DEPOSIT = spend([(400_000, deposit_script_pubkey(FED, REGTEST.id, FUNDING_CONTRACT)),
                         (150_000, spk(ALICE))], b"operator funding")


def funding_world() -> tuple[World, Block]:
    """The chain BASE..BASE+3 with the operator's funding deposit (output 0; output 1 pays Alice) at BASE+1."""
    c = Chain(b"funding")
    c.mine()
    blk = c.mine((FUNDING_DEPOSIT,))
    c.mine()
    c.mine()
    w = World()
    w.do(AUTH, c.relay(BASE))
    return w, blk


def fund(blk: Block, vout: int) -> FederationFund:
    c = blk.claim(1, vout)
    return FederationFund(c.btc_height, c.vout, c.btc_tx, c.merkle_block)


def test_a_member_records_a_funding_deposit_as_a_federation_coin_and_no_money_is_made() -> None:
    w, blk = funding_world()
    sup = w.supply()
    w.refuse(w.sign(ALICE, fund(blk, 0)), Unauthorized)  # members only
    w.refuse(w.sign(AUTH, fund(blk, 0), fee=1), InvalidTransaction)  # a system transaction carries no fee
    w.refuse(w.sign(AUTH, fund(blk, 1)), WrongDepositAddress)  # Alice's deposit is no funding
    w.refuse(w.sign(ALICE, blk.claim(1, 0), fee=1), WrongDepositAddress)  # nor can anyone claim the funding as L2
    writes = w.apply(w.sign(AUTH, fund(blk, 0)))
    key = coin_key(blk.txids[1], 0)
    assert FedCoin.decode(w.state[key]) == FedCoin(blk.txids[1], 0, 400_000, CoinKind.FUNDING, FUNDING_CONTRACT)
    assert funded_sat(StateView(w.state.get)) == 400_000
    assert set(writes) == {key, FUNDED_KEY, account_key(xonly(AUTH))}  # the member's nonce; no supply change
    assert w.supply() == sup and w.totals() == BridgeTotals(0, 0, 0)
    w.refuse(w.sign(AUTH2, fund(blk, 0)), DuplicateDuty)  # another member posting the same duty
    w.refuse(w.sign(AUTH, fund(blk, 0)), DuplicateDuty)
    # the same proof as a claim: a block the relayed chain does not hold is refused the same way
    bad = fund(blk, 0)
    w.refuse(w.sign(AUTH, FederationFund(bad.btc_height + 5, 0, bad.btc_tx, bad.merkle_block)), UnknownBtcBlock)
    w.apply(w.sign(ALICE, blk.claim(1, 1), fee=1))  # Alice's output of the same transaction is hers to claim
    assert FedCoin.decode(w.state[coin_key(blk.txids[1], 1)]).kind == CoinKind.DEPOSIT
    check_invariants(w.state)
    assert FederationFund.decode(fund(blk, 0).encode()) == fund(blk, 0)


def test_same_claim_again_refused() -> None:
    w = relayed_world()
    claim = DEP.claim(1, 0)
    tx = w.sign(ALICE, claim, fee=10)
    w.apply(tx)
    w.refuse(w.sign(ALICE, claim, fee=10), AlreadyClaimed)
    w.refuse(w.sign(ALICE, claim, fee=99), AlreadyClaimed)  # another fee, same outpoint
    w.refuse(tx, AlreadyClaimed)  # replay of the very transaction
    # the same outpoint proved in a re-mined block at another height is still the same outpoint
    fork = CHAIN.fork(BASE + 1, b"fork")
    fork.mine()
    moved = fork.mine((DEPOSIT_ALICE,))
    for _ in range(2):
        fork.mine()
    w.do(AUTH, fork.relay(BASE + 1))
    w.refuse(w.sign(ALICE, moved.claim(1, 0), fee=10), AlreadyClaimed)


def test_claim_below_depth_then_at_depth() -> None:
    w = relayed_world(end=BASE + 2)  # deposit block has 2 confirmations
    claim = DEP.claim(1, 0)
    err = w.refuse(w.sign(ALICE, claim, fee=10), ClaimTooShallow)
    assert err.reason == "pegin-too-shallow" and "2 confirmations, 3 required" in str(err)
    w.do(AUTH, CHAIN.relay(BASE + 3))
    w.do(ALICE, claim, fee=10)


def test_claim_of_unrelayed_or_mismatched_block() -> None:
    claim = DEP.claim(1, 0)
    w = World()  # nothing relayed yet
    w.refuse(w.sign(ALICE, claim, fee=10), UnknownBtcBlock)
    w = relayed_world(end=BASE)  # only the base block
    w.refuse(w.sign(ALICE, claim, fee=10), UnknownBtcBlock)
    w = relayed_world()
    # the proof's header is block BASE+1 but the claim names another height
    for height in (BASE, BASE + 2, BASE + 9):
        w.refuse(w.sign(ALICE, PeginClaim(height, 0, DEPOSIT_ALICE, claim.merkle_block), fee=10), UnknownBtcBlock)
    # a header that is not the relayed one at that height (same merkle root, other nonce)
    h = CHAIN.blocks[BASE + 1].header
    other = grind(h.prev_hash, h.merkle_root, h.time + 1)
    mb = other.serialize() + claim.merkle_block[80:]
    w.refuse(w.sign(ALICE, PeginClaim(BASE + 1, 0, DEPOSIT_ALICE, mb), fee=10), UnknownBtcBlock)


def test_claim_of_a_reorged_out_deposit() -> None:
    w = relayed_world()
    fork = CHAIN.fork(BASE + 1, b"fork")  # the deposit block is replaced by one without it
    for _ in range(4):
        fork.mine()
    w.do(AUTH, fork.relay(BASE + 1))
    err = w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=10), UnknownBtcBlock)
    assert err.reason == "unknown-btc-block"
    # re-mined in the new best chain, it is claimable from its new block
    w2 = relayed_world()
    w2.do(AUTH, fork.relay(BASE + 1))
    fork2 = Chain(b"fork", dict(fork.blocks))
    again = fork2.mine((DEPOSIT_ALICE,))
    for _ in range(2):
        fork2.mine()
    w2.do(AUTH, fork2.relay(again.height))
    w2.do(ALICE, again.claim(1, 0), fee=10)
    assert PeginEntry.decode(w2.state[pegin_key(DEP.txids[1], 0)]).btc_height == again.height


def test_claim_of_another_recipients_deposit() -> None:
    w = relayed_world()
    err = w.refuse(w.sign(CAROL, DEP.claim(1, 0), fee=10), WrongDepositAddress)  # Alice's deposit
    assert err.reason == "wrong-deposit-address"
    w.refuse(w.sign(BOB, DEP.claim(1, 0), fee=10), WrongDepositAddress)
    w.refuse(w.sign(ALICE, DEP.claim(1, 1), fee=10), WrongDepositAddress)  # Alice's change output
    w.refuse(w.sign(ALICE, DEP.claim(2, 1), fee=10), WrongDepositAddress)  # Carol's
    w.refuse(w.sign(CAROL, DEP.claim(2, 4), fee=10), WrongDepositAddress)  # Carol's address on mainnet
    w.refuse(w.sign(CAROL, DEP.claim(0, 0), fee=10), WrongDepositAddress)  # the coinbase
    # Alice can still claim hers
    w.do(ALICE, DEP.claim(1, 0), fee=10)


def test_two_outputs_of_one_deposit_transaction() -> None:
    w = relayed_world()
    w.do(CAROL, DEP.claim(2, 1), fee=10)
    w.do(CAROL, DEP.claim(2, 2), fee=10)
    assert w.account(CAROL) == Account(70_000 + 30_000 - 20, 2)
    assert w.totals().pegged_in_sat == 100_000
    w.refuse(w.sign(CAROL, DEP.claim(2, 2), fee=10), AlreadyClaimed)
    check_invariants(w.state)


def test_claim_output_index_and_amount_range() -> None:
    w = relayed_world()
    w.refuse(w.sign(ALICE, DEP.claim(1, 2), fee=10), InvalidPeginProof)  # Alice's tx has 2 outputs
    w.refuse(w.sign(ALICE, DEP.claim(1, 2**32 - 1), fee=10), InvalidPeginProof)
    w.refuse(w.sign(CAROL, DEP.claim(2, 3), fee=0), InvalidPeginProof)  # zero-value output to Carol's address


def _mutations() -> list[tuple[str, bytes, str]]:
    mb = DEP.proof(1)
    hdr, count, rest = mb[:80], int.from_bytes(mb[80:84], "little"), mb[84:]
    nh = rest[0]
    hashes = rest[1:1 + 32 * nh]
    nf = rest[1 + 32 * nh]
    flags = rest[2 + 32 * nh:]
    assert len(flags) == nf == 1
    flip = bytearray(hashes)
    flip[40] ^= 1

    def pmt(c: int = count, hs: bytes = hashes, fl: bytes = flags) -> bytes:
        return hdr + c.to_bytes(4, "little") + bytes((len(hs) // 32,)) + hs + bytes((len(fl),)) + fl

    return [
        ("flipped hash", pmt(hs=bytes(flip)), "MerkleRootMismatch"),
        ("extra flag byte", pmt(fl=flags + b"\0"), "MerkleUnusedBits"),
        ("padding bit set", pmt(fl=bytes((flags[0] | 0x80,))), "MerkleUnusedBits"),
        ("extra hash", pmt(hs=hashes + b"\x55" * 32), "MerkleUnusedHashes"),
        ("a shallower tree", pmt(c=4), "MerkleRootMismatch"),
        ("a deeper tree", pmt(c=count * 2), "MerkleTooDeep"),
        ("one transaction", pmt(c=1), "MerkleUnusedHashes"),
        ("more than a block holds", pmt(c=16_667), "MerkleBadCount"),
        ("zero transactions", pmt(c=0), "MerkleBadCount"),
        ("trailing byte", mb + b"\0", "TrailingBytes"),
        ("truncated", mb[:-1], "Truncated"),
    ]


@pytest.mark.parametrize("what,merkle_block,spv_error", _mutations(), ids=[m[0] for m in _mutations()])
def test_claim_with_a_mutated_proof(what: str, merkle_block: bytes, spv_error: str) -> None:
    w = relayed_world()
    err = w.refuse(w.sign(ALICE, PeginClaim(BASE + 1, 0, DEPOSIT_ALICE, merkle_block), fee=10), InvalidPeginProof)
    assert err.reason == "invalid-spv-proof" and str(err).startswith(spv_error + ":"), str(err)


def test_transaction_count_is_not_committed() -> None:
    """As in Bitcoin Core: the header does not commit to the transaction count, so a count giving the same tree
    shape along the proven path (5..8 for this 7-transaction block and index 1) yields the same root and match.
    Harmless: the matched leaf is still at the tree's full depth (no inner node can pass as a transaction) and the
    claim is keyed by the outpoint, so a re-encoded proof cannot claim twice."""
    mb = DEP.proof(1)
    w = relayed_world()
    w.do(ALICE, PeginClaim(BASE + 1, 0, DEPOSIT_ALICE, mb[:80] + (8).to_bytes(4, "little") + mb[84:]), fee=10)
    w.refuse(w.sign(ALICE, PeginClaim(BASE + 1, 0, DEPOSIT_ALICE, mb[:80] + (5).to_bytes(4, "little") + mb[84:]),
                    fee=10), AlreadyClaimed)


def test_claim_with_a_proof_of_another_transaction_or_a_bad_transaction() -> None:
    w = relayed_world()
    err = w.refuse(w.sign(ALICE, PeginClaim(BASE + 1, 0, DEPOSIT_ALICE, DEP.proof(2)), fee=10), InvalidPeginProof)
    assert str(err).startswith("TxNotInProof:")
    for bad_tx in (DEPOSIT_ALICE[:-1], DEPOSIT_ALICE + b"\0", DEPOSIT_ALICE[:5] + b"\x02" + DEPOSIT_ALICE[6:]):
        err = w.refuse(w.sign(ALICE, PeginClaim(BASE + 1, 0, bad_tx, DEP.proof(1)), fee=10), InvalidPeginProof)
        assert str(err).startswith("MalformedTransaction:"), str(err)
    # the same transaction without its witness has the same txid: the proof holds
    stripped = parse_tx(DEPOSIT_ALICE).tx.serialize({"include_witness": False})
    w.do(ALICE, PeginClaim(BASE + 1, 0, stripped, DEP.proof(1)), fee=10)


def test_duplicated_node_mutation_refused() -> None:
    """CVE-2012-2459: a block of n (odd) transactions has the root of the n+1 list with the last one repeated."""
    dep_last = Chain(b"odd", {h: b for h, b in CHAIN.blocks.items() if h < BASE + 1})
    blk = dep_last.mine((FILLERS[1], DEPOSIT_ALICE))  # the deposit is the last of 3
    for _ in range(3):
        dep_last.mine()
    w = World()
    w.do(AUTH, dep_last.relay(BASE))
    four = blk.txids + [blk.txids[-1]]
    assert compute_merkle_root(four) == (blk.header.merkle_root, True)  # same root, flagged as mutated
    for match in ([False, False, False, True], [False, False, True, False]):
        mb = serialize_merkleblock(blk.header, build_partial_merkle_tree(four, match))
        err = w.refuse(w.sign(ALICE, PeginClaim(blk.height, 0, DEPOSIT_ALICE, mb), fee=10), InvalidPeginProof)
        assert str(err).startswith("MerkleMutation:"), str(err)
    w.do(ALICE, blk.claim(2, 0), fee=10)  # the honest proof


def test_sixty_four_byte_transaction_refused() -> None:
    tx64 = spend([(1_000, b"\x6a\x02\xab\xcd")], b"64", witness=False)
    assert len(tx64) == 64
    c = Chain(b"main", {h: b for h, b in CHAIN.blocks.items() if h <= BASE})
    blk = c.mine((tx64,))
    c.mine()
    c.mine()
    w = World()
    w.do(AUTH, c.relay(BASE))
    err = w.refuse(w.sign(ALICE, blk.claim(1, 0), fee=10), InvalidPeginProof)
    assert str(err).startswith("SixtyFourByteTx:"), str(err)


def test_claim_fee_and_nonce_rules() -> None:
    w = relayed_world()
    w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=250_000), InsufficientBalance)  # fee == amount
    w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=250_001), InsufficientBalance)
    w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=0), FeeTooLow)  # floor is 1
    w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=10, nonce=1), BadNonce)
    w.do(ALICE, DEP.claim(1, 0), fee=249_999)  # leaves 1 sat
    assert w.account(ALICE) == Account(1, 1)
    w.refuse(w.sign(CAROL, DEP.claim(2, 1), fee=10, nonce=3), BadNonce)
    # an existing account's nonce is the one to use
    w.do(BOB, Transfer(xonly(CAROL), 5_000), fee=10)
    w.refuse(w.sign(CAROL, DEP.claim(2, 1), fee=10, nonce=1), BadNonce)
    w.do(CAROL, DEP.claim(2, 1), fee=10)
    assert w.account(CAROL) == Account(5_000 + 70_000 - 10, 1)
    check_invariants(w.state)


def test_claim_beyond_the_supply_cap() -> None:
    w = World(bob_funds=MAX_MONEY - 100_000)
    w.do(AUTH, CHAIN.relay(BASE))
    w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=10), Overflow)
    w.do(CAROL, DEP.claim(2, 2), fee=10)  # 30 000 still fits


def test_claim_without_a_federation() -> None:
    w = World(bridge=False)
    w.refuse(w.sign(ALICE, DEP.claim(1, 0), fee=10), NoBridge)


# == burns as peg-outs =============================================================================================
PROGRAM20, PROGRAM32 = b"\x13" * 20, b"\x37" * 32


def _regtest_addresses() -> list[tuple[str, str, bytes]]:
    return [
        ("p2wpkh", script_address(b"\x00\x14" + PROGRAM20, REGTEST) or "", b"\x00\x14" + PROGRAM20),
        ("p2wsh", script_address(b"\x00\x20" + PROGRAM32, REGTEST) or "", b"\x00\x20" + PROGRAM32),
        ("p2tr", script_address(b"\x51\x20" + PROGRAM32, REGTEST) or "", b"\x51\x20" + PROGRAM32),
        ("p2pkh", script_address(b"\x76\xa9\x14" + PROGRAM20 + b"\x88\xac", REGTEST) or "",
         b"\x76\xa9\x14" + PROGRAM20 + b"\x88\xac"),
        ("p2sh", script_address(b"\xa9\x14" + PROGRAM20 + b"\x87", REGTEST) or "", b"\xa9\x14" + PROGRAM20 + b"\x87"),
    ]


def test_regtest_address_forms() -> None:
    kinds = {k: a for k, a, _ in _regtest_addresses()}
    assert kinds["p2wpkh"].startswith("bcrt1q") and len(kinds["p2wpkh"]) == 44
    assert kinds["p2wsh"].startswith("bcrt1q") and len(kinds["p2wsh"]) == 64
    assert kinds["p2tr"].startswith("bcrt1p") and len(kinds["p2tr"]) == 64
    assert kinds["p2pkh"][0] in "mn" and kinds["p2sh"][0] == "2"
    # bech32 (v0) against python-bitcoinlib's reference implementation
    assert bitcoinlib_segwit_decode("bcrt", kinds["p2wsh"]) == (0, list(PROGRAM32))
    assert bitcoinlib_segwit_decode("bcrt", kinds["p2wpkh"]) == (0, list(PROGRAM20))


@pytest.mark.parametrize("kind,address,script", _regtest_addresses(), ids=[a[0] for a in _regtest_addresses()])
def test_burn_to_a_regtest_address_is_a_pegout(kind: str, address: str, script: bytes) -> None:
    w = World()
    w.height = 17
    amount, fee = 123_456, 20
    before = w.supply()
    tx = w.sign(BOB, Burn(amount, address.encode()), fee=fee)
    writes = w.apply(tx)
    entry = PegoutEntry.decode(w.state[pegout_key(tx.txid)])
    assert entry == PegoutEntry(PegoutStatus.PENDING, amount, 17, b"\0" * 32, script)
    assert pegout_key(tx.txid) == b"\x03" + tx.txid
    assert w.totals() == BridgeTotals(0, amount, 0)
    assert w.supply() == Supply(before.minted_sat, before.burned_sat + amount, before.fees_sat + fee)
    assert w.account(BOB) == Account(BOB_FUNDS - amount - fee, 1)
    assert set(writes) == {account_key(xonly(BOB)), SUPPLY_KEY, pegout_key(tx.txid), BRIDGE_TOTALS_KEY}
    check_invariants(w.state)


def test_uppercase_bech32_is_the_same_address() -> None:
    addr = script_address(b"\x00\x14" + PROGRAM20, REGTEST)
    assert addr is not None
    assert address_script(addr.upper(), REGTEST) == b"\x00\x14" + PROGRAM20


def _bech32(hrp: str, ver: int, prog: bytes, enc: Encoding) -> str:
    s: str = bu_bech32_encode(hrp, [ver] + convertbits(list(prog), 8, 5), enc)
    return s


def _b58(version: int, h: bytes) -> str:
    from bitcoin.base58 import encode
    payload = bytes((version,)) + h
    s: str = encode(payload + dsha256(payload)[:4])
    return s


BAD_DESTINATIONS: list[tuple[str, bytes]] = [
    ("mainnet p2wpkh (BIP173)", b"BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4"),
    ("mainnet p2tr (BIP350)", b"bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0"),
    ("testnet p2wsh (BIP173)", b"tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7"),
    ("mainnet p2pkh", b"1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2"),
    ("mainnet p2sh", b"3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy"),
    ("unknown base58 version", _b58(0x30, PROGRAM20).encode()),
    ("base58 bad checksum", _b58(0x6F, PROGRAM20)[:-1].encode() + b"1"),
    ("base58 wrong length", _b58(0x6F, PROGRAM20 + b"\0").encode()),
    ("bech32 bad checksum", _bech32("bcrt", 0, PROGRAM20, Encoding.BECH32)[:-1].encode() + b"q"),
    ("v0 in bech32m", _bech32("bcrt", 0, PROGRAM20, Encoding.BECH32M).encode()),
    ("v1 in bech32", _bech32("bcrt", 1, PROGRAM32, Encoding.BECH32).encode()),
    ("v1 with 20 bytes", _bech32("bcrt", 1, PROGRAM20, Encoding.BECH32M).encode()),
    ("v2", _bech32("bcrt", 2, PROGRAM32, Encoding.BECH32M).encode()),
    ("v0 with 25 bytes", _bech32("bcrt", 0, PROGRAM20 + b"\0" * 5, Encoding.BECH32).encode()),
    ("mixed case", (lambda a: a[:6] + a[6:].upper())(_bech32("bcrt", 0, PROGRAM20, Encoding.BECH32)).encode()),
    ("leading space", b" " + _bech32("bcrt", 0, PROGRAM20, Encoding.BECH32).encode()),
    ("garbage", b"hello world"),
    ("base58 alphabet only", b"0OIl"),
    ("non-ASCII bytes", b"\xff\xfe\x00bcrt1"),
    ("non-ASCII UTF-8", "bcrt1q\u00e9".encode()),
    ("NUL", b"\0"),
    ("too long", b"bcrt1" + b"q" * 100),
]


@pytest.mark.parametrize("what,destination", BAD_DESTINATIONS, ids=[b[0] for b in BAD_DESTINATIONS])
def test_burn_to_a_bad_address(what: str, destination: bytes) -> None:
    w = World()
    err = w.refuse(w.sign(BOB, Burn(100_000, destination), fee=10), BadAddress)
    assert err.reason == "bad-address"
    if not destination.isascii() or b"\0" in destination:
        return
    with pytest.raises(BadAddress):
        address_script(destination.decode(), REGTEST)


def test_addresses_of_other_networks() -> None:
    regtest_p2pkh = _b58(0x6F, PROGRAM20)
    with pytest.raises(BadAddress):
        address_script(regtest_p2pkh, MAINNET)
    with pytest.raises(BadAddress):
        address_script(_bech32("bcrt", 0, PROGRAM20, Encoding.BECH32), MAINNET)
    with pytest.raises(BadAddress):
        address_script(_bech32("bcrt", 0, PROGRAM20, Encoding.BECH32), SIGNET)
    for addr, name in (("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "mainnet"),
                       ("tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7", "signet")):
        with pytest.raises(BadAddress, match=f"is a {name} address; this is regtest"):
            address_script(addr, REGTEST)
    # testnet and regtest share the base58 version bytes (as in Bitcoin Core): one address, both chains
    assert address_script(regtest_p2pkh, SIGNET) == address_script(regtest_p2pkh, REGTEST)
    # known vectors (BIP173, BIP350, base58check)
    assert address_script("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", MAINNET).hex() == \
        "0014751e76e8199196d454941c45d1b3a323f1433bd6"
    assert address_script("tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7", SIGNET).hex() == \
        "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262"
    assert address_script("bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0", MAINNET).hex() == \
        "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
    assert address_script("1BvBMSEYstWetqTFn5Au4m4GFg7xJaNVN2", MAINNET).hex() == \
        "76a91477bff20c60e522dfaa3350c39b030a5d004e839a88ac"
    assert address_script("3J98t1WpEZ73CNmQviecrnyiWrnqRhWNLy", MAINNET).hex() == \
        "a914b472a266d0bd89c13706a4132ccfb16f7c3b9fcb87"
    # LOCAL pairs with regtest
    assert address_script(regtest_p2pkh, LOCAL) == address_script(regtest_p2pkh, REGTEST)


def test_pegout_minimum_and_balance() -> None:
    w = World()
    addr = (script_address(b"\x00\x14" + PROGRAM20, REGTEST) or "").encode()
    w.refuse(w.sign(BOB, Burn(PEGOUT_MIN_SAT - 1, addr), fee=10), PegoutTooSmall)
    w.refuse(w.sign(BOB, Burn(BOB_FUNDS, addr), fee=10), InsufficientBalance)
    w.refuse(w.sign(BOB, Burn(PEGOUT_MIN_SAT, addr), fee=0), FeeTooLow)
    w.refuse(w.sign(BOB, Burn(PEGOUT_MIN_SAT, addr), fee=10, nonce=1), BadNonce)
    w.refuse(w.sign(CAROL, Burn(PEGOUT_MIN_SAT, addr), fee=10), UnknownSender)
    w.do(BOB, Burn(PEGOUT_MIN_SAT, addr), fee=10)
    assert w.totals().pending_out_sat == PEGOUT_MIN_SAT
    # a plain burn (no destination) on a bridge chain is no peg-out, whatever its size
    tx = w.do(BOB, Burn(1), fee=10)
    assert pegout_key(tx.txid) not in w.state and w.totals().pending_out_sat == PEGOUT_MIN_SAT
    check_invariants(w.state)


@pytest.mark.parametrize("destination", [b"", b"bcrt1qexampledestination", b"bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4",
                                         b"\xff\xfe", b"x" * 128])
def test_burn_without_a_federation_stays_a_plain_burn(destination: bytes) -> None:
    """Chains without a bridge (and the committed vectors) keep Burn's destination opaque."""
    w = World(bridge=False)
    before = w.supply()
    tx = w.sign(BOB, Burn(1_000, destination), fee=10)
    writes = w.apply(tx)
    assert set(writes) == {account_key(xonly(BOB)), SUPPLY_KEY}
    assert w.supply() == Supply(before.minted_sat, before.burned_sat + 1_000, before.fees_sat + 10)
    assert pegout_key(tx.txid) not in w.state and BRIDGE_TOTALS_KEY not in w.state


# == peg-out updates ===============================================================================================
# A peg-out is paid by a plan (l2d/core/plans.py; its own rules are tested in test_plans.py): PegoutUpdate records one
# version of the plan's transaction as broadcast, then as mined (COMPLETED).
def pegout_world(amount: int = 300_000) -> tuple[World, bytes, bytes, bytes]:
    """Bob's burn of amount at BURN_HEIGHT, a FINAL anchor at ANCHOR_HEIGHT, plan A (1 sat/vB) paying it from Alice's
    400 000 sat coin, signed by m federation keys, and its replacement B (2 sat/vB): (world, peg-out id, A, B)."""
    w = coin_world()
    pid = burn(w, amount)
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.FINAL)
    a = post_plan(w, [outpoint(0)], [pid], rate=1)
    post_signatures(w, a)  # only a version that can be broadcast is replaced
    b = post_plan(w, [outpoint(0)], [pid], rate=2, replaces=a)
    return w, pid, a, b


def test_pegout_needs_a_confirmed_anchor_covering_the_burn() -> None:
    w, pid, a, _ = pegout_world()
    upd = PegoutUpdate(pid, PegoutStatus.BROADCAST, a, BURN_HEIGHT)
    err = w.refuse(w.sign(AUTH, upd), PegoutNotAnchored)  # no anchor at that height
    assert err.reason == "pegout-not-anchored"
    record_anchor(w, BURN_HEIGHT, AnchorStatus.SUBMITTED)
    w.refuse(w.sign(AUTH, upd), PegoutNotAnchored)
    record_anchor(w, BURN_HEIGHT - 1, AnchorStatus.CONFIRMED)  # confirmed, but before the burn
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, a, BURN_HEIGHT - 1)), PegoutNotAnchored)
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT + 5)), PegoutNotAnchored)
    w.do(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT))  # a later FINAL anchor covers it
    # an anchor reorged back to SUBMITTED no longer covers anything
    record_anchor(w, ANCHOR_HEIGHT, AnchorStatus.SUBMITTED)
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), PegoutNotAnchored)
    record_anchor(w, BURN_HEIGHT, AnchorStatus.CONFIRMED)
    w.do(AUTH, PegoutUpdate(pid, PegoutStatus.COMPLETED, a, BURN_HEIGHT))
    assert w.pegout(pid).status == PegoutStatus.COMPLETED


def test_pegout_lifecycle_with_rbf() -> None:
    amount = 300_000
    w, pid, a, b = pegout_world(amount)
    before = w.totals()
    assert (before.pending_out_sat, before.paid_out_sat) == (amount, 0)
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), BadPegoutTransition)
    writes = w.apply(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)))
    assert set(writes) == {pegout_key(pid), account_key(xonly(AUTH))}
    e = w.pegout(pid)
    assert (e.status, e.btc_txid, e.amount_sat, e.l2_height) == (PegoutStatus.BROADCAST, a, amount, BURN_HEIGHT)
    assert w.totals() == before
    err = w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)), DuplicateDuty)
    assert err.reason == "duplicate-duty"  # recorded already (by another member, or by me before)
    w.do(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, b, ANCHOR_HEIGHT))  # the RBF replacement
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.BROADCAST, b, ANCHOR_HEIGHT)), DuplicateDuty)
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.COMPLETED, a, ANCHOR_HEIGHT)), BadPegoutTransition)
    w.do(AUTH, PegoutUpdate(pid, PegoutStatus.COMPLETED, b, ANCHOR_HEIGHT))
    e = w.pegout(pid)
    assert (e.status, e.btc_txid) == (PegoutStatus.COMPLETED, b)
    assert w.totals() == BridgeTotals(before.pegged_in_sat, 0, amount)
    w.refuse(w.sign(AUTH, PegoutUpdate(pid, PegoutStatus.COMPLETED, b, ANCHOR_HEIGHT)), DuplicateDuty)
    for status, txid in [(PegoutStatus.BROADCAST, a), (PegoutStatus.BROADCAST, b), (PegoutStatus.COMPLETED, a)]:
        w.refuse(w.sign(AUTH, PegoutUpdate(pid, status, txid, ANCHOR_HEIGHT)), BadPegoutTransition)
    check_invariants(w.state)


def test_pegout_update_refusals() -> None:
    w, pid, a, _ = pegout_world()
    upd = PegoutUpdate(pid, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)
    err = w.refuse(w.sign(AUTH, PegoutUpdate(b"\x99" * 32, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)), UnknownPegout)
    assert err.reason == "unknown-pegout"
    w.refuse(w.sign(BOB, upd), Unauthorized)
    w.refuse(w.sign(MINT, upd), Unauthorized)
    w.refuse(w.sign(secret("fed0"), upd), Unauthorized)  # a federation Bitcoin key is not the L2 authority
    w.refuse(w.sign(AUTH, upd, fee=1), InvalidTransaction)
    w.refuse(w.sign(AUTH, upd, nonce=0), BadNonce)  # the authority has relayed/anchored before
    w.do(AUTH, upd)
    plain = World(bridge=False)
    plain.refuse(plain.sign(AUTH, upd), NoBridge)
    # a plain burn (no destination) is not a peg-out
    t = w.do(BOB, Burn(50_000), fee=10, height=BURN_HEIGHT)
    w.refuse(w.sign(AUTH, PegoutUpdate(t.txid, PegoutStatus.BROADCAST, a, ANCHOR_HEIGHT)), UnknownPegout)


def test_pegout_entry_decoding() -> None:
    e = PegoutEntry(PegoutStatus.BROADCAST, 5, 6, b"\x07" * 32, b"\x00\x14" + PROGRAM20)
    raw = e.encode()
    assert len(raw) == 1 + 8 + 8 + 32 + 1 + 22 and PegoutEntry.decode(raw) == e
    for bad in (raw[:-1], raw + b"\0", b"\x04" + raw[1:], b"\x00" + raw[1:], raw[:40]):
        with pytest.raises(DecodeError):
            PegoutEntry.decode(bad)
    for cls, n in ((PeginEntry, 80), (BtcTip, 40), (BridgeTotals, 24)):
        with pytest.raises(DecodeError):
            cls.decode(b"\0" * (n + 1))  # type: ignore[attr-defined]


# == deposit scripts ===============================================================================================
_P = 2**256 - 2**32 - 977
_G = (0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
      0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8)


def _ec_add(a: Optional[tuple[int, int]], b: Optional[tuple[int, int]]) -> Optional[tuple[int, int]]:
    if a is None:
        return b
    if b is None:
        return a
    if a[0] == b[0] and (a[1] + b[1]) % _P == 0:
        return None
    if a == b:
        lam = 3 * a[0] * a[0] * pow(2 * a[1], -1, _P) % _P
    else:
        lam = (b[1] - a[1]) * pow(b[0] - a[0], -1, _P) % _P
    x = (lam * lam - a[0] - b[0]) % _P
    return x, (lam * (a[0] - x) - a[1]) % _P


def _ec_mul(k: int, pt: tuple[int, int]) -> Optional[tuple[int, int]]:
    acc: Optional[tuple[int, int]] = None
    add: Optional[tuple[int, int]] = pt
    while k:
        if k & 1:
            acc = _ec_add(acc, add)
        add = _ec_add(add, add)
        k >>= 1
    return acc


def _decompress(key: bytes) -> tuple[int, int]:
    x = int.from_bytes(key[1:], "big")
    y = pow((x ** 3 + 7) % _P, (_P + 1) // 4, _P)
    if y % 2 != key[0] - 2:
        y = _P - y
    return x, y


def _compress(pt: tuple[int, int]) -> bytes:
    return bytes((2 + pt[1] % 2,)) + pt[0].to_bytes(32, "big")


def test_deposit_script_cross_checked() -> None:
    contract = xonly(ALICE)
    ws = witness_script(FED, REGTEST.id, contract)
    # independent tweak: P + H("l2d/pegin/tweak", P || network id || contract) * G in pure Python
    expected = []
    for k in FED_KEYS:
        t = hashlib.sha256(hashlib.sha256(b"l2d/pegin/tweak").digest() * 2 + k + bytes((REGTEST.id,)) + contract)
        assert t.digest() == H_PEGIN_TWEAK(k + bytes((REGTEST.id,)) + contract) == pegin_tweak(k, REGTEST.id, contract)
        pt = _ec_add(_decompress(k), _ec_mul(int.from_bytes(t.digest(), "big") % SECP256K1_N, _G))
        assert pt is not None
        expected.append(_compress(pt))
    expected.sort()
    assert ws == b"\x52" + b"".join(b"\x21" + k for k in expected) + b"\x53\xae"
    # the same script from bitcoin-utils' and python-bitcoinlib's script builders
    assert Script(["OP_2", *(k.hex() for k in expected), "OP_3", "OP_CHECKMULTISIG"]).to_bytes() == ws
    assert bytes(CScript([2, *expected, 3, OP_CHECKMULTISIG])) == ws
    # P2WSH: 0x00 0x20 sha256(witness script); bitcoin-utils' P2wshAddress agrees (no global setup needed)
    program = hashlib.sha256(ws).digest()
    assert deposit_script_pubkey(FED, REGTEST.id, contract) == b"\x00\x20" + program
    assert P2wshAddress.from_script(Script.from_raw(ws.hex())).to_witness_program() == program.hex()
    addr = script_address(b"\x00\x20" + program, REGTEST)
    assert addr is not None and addr.startswith("bcrt1q")
    assert bitcoinlib_segwit_decode("bcrt", addr) == (0, list(program))
    # the federation can spend: each member's secret tweaked the same way gives the tweaked key
    for s in FED_SECRETS:
        k = PrivateKey(s).public_key.format()
        tweaked = PrivateKey(s).add(pegin_tweak(k, REGTEST.id, contract)).public_key.format()
        assert tweaked in expected
        assert PublicKey(k).add(pegin_tweak(k, REGTEST.id, contract)).format() == tweaked


def test_deposit_scripts_differ_by_recipient_network_and_federation() -> None:
    a, c = xonly(ALICE), xonly(CAROL)
    scripts = {deposit_script_pubkey(FED, REGTEST.id, a), deposit_script_pubkey(FED, REGTEST.id, c),
               deposit_script_pubkey(FED, MAINNET.id, a), deposit_script_pubkey(FED, SIGNET.id, a),
               deposit_script_pubkey(Federation(3, FED_KEYS, MIN_DEPTH), REGTEST.id, a),
               deposit_script_pubkey(Federation(2, FED_KEYS[:2], MIN_DEPTH), REGTEST.id, a)}
    assert len(scripts) == 6
    # the depth is no part of the script (it is a claim rule, not an address property)
    assert deposit_script_pubkey(Federation(2, FED_KEYS, 102), REGTEST.id, a) == \
        deposit_script_pubkey(FED, REGTEST.id, a)
    with pytest.raises(InvalidTransaction):
        witness_script(FED, REGTEST.id, b"\0" * 31)


def test_worked_example_of_docs_bridge_md() -> None:
    """The example at the end of docs/bridge.md."""
    def key(n: int) -> bytes:
        return hashlib.sha256(b"l2d test key %d" % n).digest()

    fed = Federation(2, tuple(sorted(PrivateKey(key(n)).public_key.format() for n in (11, 12, 13))), 6)
    contract = xonly(key(1))
    assert contract.hex() == "753671b667f8bcbca301a273ca7d784269a7c9fac9304772e26eb244ec87bdde"
    assert fed.encode().hex().startswith("0203000603404276") and len(fed.encode()) == 103
    assert [pegin_tweak(k, REGTEST.id, contract).hex()[:8] for k in fed.keys] == ["7bf4ce8f", "73744af0", "20adb377"]
    assert witness_script(fed, REGTEST.id, contract).hex() == (
        "522102ce0c990e012586152dd6d0785c2397c0e62f2ff26965a91d35dcf00fb118c899"
        "2103b4ab40bfbb4201b2e7544a2809e70c27e0c4fa2d137bdf51cf9c195c3d1dc8c3"
        "2103b6babcfc4987dd9717dafd76891760333c705ec98b9b1de180bd9eccfc5c0f5a53ae")
    spk_ = deposit_script_pubkey(fed, REGTEST.id, contract)
    assert spk_.hex() == "002000caaaeee233f0d770c7a9df83db907123afa0b66a26e1d5d3bcf7e0abce9ca7"
    assert script_address(spk_, REGTEST) == "bcrt1qqr924mhzx0cdwux8480c8kuswy36lg9kdgnwr4wnhnm7p27wnjnslktqsr"


# == address round trip ============================================================================================
NETWORKS = [LOCAL, REGTEST, SIGNET, MAINNET]


@given(st.sampled_from(NETWORKS), st.sampled_from(["p2wpkh", "p2wsh", "p2tr", "p2pkh", "p2sh"]),
       st.binary(min_size=32, max_size=32))
def test_address_round_trip(network: Network, kind: str, data: bytes) -> None:
    script = {"p2wpkh": b"\x00\x14" + data[:20], "p2wsh": b"\x00\x20" + data, "p2tr": b"\x51\x20" + data,
              "p2pkh": b"\x76\xa9\x14" + data[:20] + b"\x88\xac", "p2sh": b"\xa9\x14" + data[:20] + b"\x87"}[kind]
    addr = script_address(script, network)
    assert addr is not None and addr.isascii()
    assert address_script(addr, network) == script


@given(st.sampled_from(NETWORKS), st.binary(max_size=40))
def test_script_address_only_for_standard_payouts(network: Network, script: bytes) -> None:
    """Whatever script_address names, address_script maps back to the same script (and nothing else has one)."""
    addr = script_address(script, network)
    if addr is not None:
        assert address_script(addr, network) == script


@pytest.mark.parametrize("script", [
    b"\x51\x14" + PROGRAM20,  # witness v1 with a 20-byte program: no standard payout
    b"\x52\x20" + PROGRAM32,  # witness v2
    b"\x00\x21" + PROGRAM32 + b"\0",  # v0, 33 bytes
    b"\x76\xa9\x14" + PROGRAM20 + b"\x88\xad",
    b"\x6a\x04abcd",  # OP_RETURN
    b"",
])
def test_nonstandard_scripts_have_no_address(script: bytes) -> None:
    for network in NETWORKS:
        assert script_address(script, network) is None


# == invariants over random sequences ==============================================================================
INV_SIGNERS = [ALICE, BOB, CAROL]
INV_DEPOSITS = [(1, 0, ALICE), (2, 1, CAROL), (2, 2, CAROL), (1, 0, CAROL), (2, 1, ALICE)]  # the last two: wrong
INV_ADDRESS = (script_address(b"\x00\x14" + PROGRAM20, REGTEST) or "").encode()
INV_STATE = relayed_world()

Op = tuple[str, int, int, int]
op = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, len(INV_DEPOSITS) - 1), st.integers(1, 2_000), st.just(0)),
    st.tuples(st.just("burn"), st.sampled_from([1, 1, 0, 2]),  # mostly Bob, who has money from genesis
              st.one_of(st.integers(1, 400_000), st.integers(PEGOUT_MIN_SAT - 1, PEGOUT_MIN_SAT + 50_000)),
              st.sampled_from([1, 1, 1, 0])),  # mostly with a Bitcoin destination
    st.tuples(st.just("transfer"), st.integers(0, 2), st.integers(0, 2), st.integers(1, 300_000)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=10, max_size=30))
def test_invariants_over_random_sequences(ops: list[Op]) -> None:
    """sum(balances) + fees + locked == minted - burned, and pegged_in - pending - paid == money that entered by
    claims - money burned as peg-outs, after every step; a refused step changes nothing. (Paying peg-outs, with
    plans and their updates, has its own property in test_plans.py.)"""
    w = World()
    w.state = dict(INV_STATE.state)
    w.nonce = Counter(INV_STATE.nonce)
    claimed = pegged_out = 0
    for step, (kind, a, b, c) in enumerate(ops):
        w.height = 2 + step
        if kind == "claim":
            index, vout, who = INV_DEPOSITS[a]
            tx = w.sign(who, DEP.claim(index, vout), fee=b)
        elif kind == "burn":
            tx = w.sign(INV_SIGNERS[a], Burn(b, INV_ADDRESS if c else b""), fee=5)
        else:
            tx = w.sign(INV_SIGNERS[a], Transfer(xonly(INV_SIGNERS[b]), c), fee=5)
        before = dict(w.state)
        try:
            writes = w.apply(tx)
        except Rejected as e:
            event(f"{kind}: {type(e).__name__}")
            assert w.state == before
            continue
        event(f"{kind}: applied")
        if kind == "claim":
            index, vout, _ = INV_DEPOSITS[a]
            claimed += PeginEntry.decode(w.state[pegin_key(DEP.txids[index], vout)]).amount_sat
        if kind == "burn" and pegout_key(tx.txid) in writes:
            pegged_out += b
        totals = check_invariants(w.state)
        assert totals.pegged_in_sat - totals.pending_out_sat - totals.paid_out_sat == claimed - pegged_out
        assert w.supply().minted_sat == BOB_FUNDS + totals.pegged_in_sat


# == robustness: bad input is refused with a typed error, never an exception of another kind =====================
def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, val in edits:
        p = pos % (len(b) + 1)
        if kind == 0 and p < len(b):
            b[p] = val
        elif kind == 1:
            del b[p:p + 1 + val % 4]
        else:
            b[p:p] = bytes((val,)) * (1 + val % 3)
    return bytes(b)


_edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=3)
FUZZ_STATE = relayed_world().state


@settings(max_examples=150, deadline=None)
@given(_edits, _edits, st.integers(0, 2))
def test_mutated_claims_are_refused_cleanly(tx_edits: list[tuple[int, int, int]],
                                            mb_edits: list[tuple[int, int, int]], which: int) -> None:
    """A claim with mutated bytes either still proves the same deposit (witness bytes, a same-shape count) or is
    refused with a Rejected subclass and no write."""
    c = DEP.claim(1, 0)
    btc_tx = c.btc_tx if which == 1 else _mutate(c.btc_tx, tx_edits)
    mb = c.merkle_block if which == 0 else c.merkle_block[:80] + _mutate(c.merkle_block[80:], mb_edits)
    try:
        claim = PeginClaim(BASE + 1, 0, btc_tx, mb)
    except OutOfRange:
        return
    view = StateView(FUZZ_STATE.get, 1)
    try:
        apply_tx(view, sign(REGTEST, ALICE, 0, 10, claim, AUX), RULES)
    except Rejected:
        assert view.writes == {}
        return
    # accepted: it is the same outpoint with the same amount
    assert parse_tx(btc_tx).txid == DEP.txids[1]
    assert PeginEntry.decode(view.writes[pegin_key(DEP.txids[1], 0)] or b"").amount_sat == 250_000


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l1bcrtBCRT"


@settings(max_examples=300)
@given(st.sampled_from(NETWORKS), st.one_of(st.text(max_size=100), st.text(alphabet=_B32, max_size=70),
                                            st.text(alphabet=_B58, min_size=20, max_size=40)))
def test_address_parsing_raises_only_bad_address(network: Network, address: str) -> None:
    try:
        script = address_script(address, network)
    except BadAddress:
        return
    assert script_address(script, network) in (address, address.lower())  # one address per script


# -- the emergency path ------------------------------------------------------------------------------------------
EMERGENCY_KEYS = tuple(sorted(PrivateKey(bytes([i]) * 32).public_key.format() for i in (21, 22, 23)))


def with_emergency(e: int = 2, delay: int = 4032, keys: tuple[bytes, ...] = EMERGENCY_KEYS) -> Federation:
    plain = Federation.decode(bytes.fromhex("0203" "0006") + b"".join(
        sorted(PrivateKey(bytes([i]) * 32).public_key.format() for i in (11, 12, 13))))
    return Federation(plain.threshold, plain.keys, plain.min_depth, e, keys, delay)


@pytest.mark.parametrize("delay", [1, 2, 16, 17, 127, 128, 255, 256, 4032, 32767, 32768, 65535])
def test_the_emergency_path_is_the_miniscript_with_the_delay_as_core_writes_it(delay: int) -> None:
    fed = with_emergency(delay=delay)
    ws = witness_script(fed, REGTEST.id, ALICE)
    plain = witness_script(Federation(fed.threshold, fed.keys, fed.min_depth), REGTEST.id, ALICE)
    # python-bitcoinlib writes the script numbers: the delay and the thresholds, as Bitcoin Core's CScript does
    tail = CScript([delay, OP_CHECKSEQUENCEVERIFY, OP_VERIFY, 2, *EMERGENCY_KEYS, 3, OP_CHECKMULTISIG])
    assert ws == bytes(CScript([OP_IF])) + plain + bytes(CScript([OP_ELSE])) + bytes(tail) + bytes(CScript([OP_ENDIF]))
    assert Federation.decode(fed.encode()) == fed
    assert fed.encode()[:-(4 + 33 * 3)] == Federation(fed.threshold, fed.keys, fed.min_depth).encode()
    assert descriptor_of(fed, REGTEST.id, ALICE).endswith(
        f"and_v(v:older({delay}),multi(2,{','.join(k.hex() for k in EMERGENCY_KEYS)}))))")


def test_a_federation_without_emergency_path_encodes_as_before() -> None:
    fed = with_emergency()
    plain = Federation(fed.threshold, fed.keys, fed.min_depth)
    assert plain.encode() == bytes.fromhex("0203" "0006") + b"".join(fed.keys)
    assert Federation.decode(plain.encode()) == plain and not plain.emergency_keys
    assert descriptor_of(plain, REGTEST.id, ALICE).startswith("wsh(multi(2,")


@pytest.mark.parametrize("case,error", [
    ("no-keys", "an emergency path with no keys"),
    ("truncated", "needs"),
    ("trailing", "trailing"),
])
def test_a_malformed_emergency_tail_is_refused(case: str, error: str) -> None:
    raw = with_emergency().encode()
    bad = {"no-keys": raw[:-(4 + 33 * 3)] + bytes.fromhex("02000fc0"), "truncated": raw[:-1],
           "trailing": raw + b"\0"}[case]
    with pytest.raises(DecodeError, match=error):
        Federation.decode(bad)


@pytest.mark.parametrize("kwargs,error", [
    ({"e": 4}, "emergency threshold 4 outside 1..3"),
    ({"e": 0}, "emergency threshold 0 outside 1..3"),
    ({"delay": 0}, "emergency delay 0 blocks outside 1..65535"),
    ({"delay": 65536}, "emergency delay 65536 blocks outside 1..65535"),
    ({"keys": EMERGENCY_KEYS[::-1]}, "emergency keys must be distinct and sorted"),
    ({"keys": (EMERGENCY_KEYS[0], EMERGENCY_KEYS[0])}, "emergency keys must be distinct and sorted"),
    ({"keys": (b"\x02" + b"\0" * 32,), "e": 1}, "is not a compressed secp256k1 key"),
    ({"keys": ()}, "0 emergency keys"),
])
def test_emergency_parameters_are_checked(kwargs: dict[str, object], error: str) -> None:
    with pytest.raises(InvalidTransaction, match=error):
        with_emergency(**kwargs)  # type: ignore[arg-type]
