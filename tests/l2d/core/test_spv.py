"""SPV checks against real mainnet/testnet3 blocks and synthetic ground chains; one mutated input per rule."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Callable, Optional

import pytest
from bitcoin.core import CBlock, CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.errors import DecodeError, NonMinimalVarint, OutOfRange, TrailingBytes, Truncated
from l2d.core.spv import (BITCOIN_MAINNET, BITCOIN_REGTEST, BITCOIN_SIGNET, BITCOIN_TESTNET3, HEADER_SIZE,
                          MAX_BLOCK_TXS, BadDifficulty, BadHeader, BadLink, BadProofOfWork, ChainParams,
                          CheckpointMismatch, Header, HeaderChain, HeaderTree, MalformedTransaction, MerkleBadCount,
                          MerkleHeaderMismatch, MerkleMutation, MerkleRootMismatch, MerkleTooDeep, MerkleUnusedBits,
                          MerkleUnusedHashes, NegativeTarget, PartialMerkleTree, SixtyFourByteTx, SpvError,
                          TargetAboveLimit, TargetOverflow, TimeTooNew, TimeTooOld, TxNotInProof, ZeroTarget, best_tip,
                          bits_to_target, block_work, build_partial_merkle_tree, calculate_next_bits,
                          chain_params_by_name, check_future, check_pow, compute_merkle_root, decode_compact,
                          make_header, parse_header, parse_merkleblock, parse_tx, permitted_transition,
                          serialize_merkleblock, target_to_bits, verify_tx_in_block)

VECTORS = Path(__file__).resolve().parents[4] / "shared" / "vectors"
_sha = hashlib.sha256
LOW_LIMIT = BITCOIN_REGTEST.pow_limit  # 0x7fff..ff: about two nonces per header at the limit


# -- real data -----------------------------------------------------------------------------------------------------
def _load(name: str) -> list:  # type: ignore[type-arg]
    path = VECTORS / name
    if not path.exists():
        pytest.skip(f"real Bitcoin vectors not found at {path} (shared/ must sit beside the repository)")
    with path.open() as f:
        return json.load(f)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def mainnet_blocks() -> list[tuple[str, int, bytes]]:
    """(comment, cur_time, raw block) of the valid mainnet vectors (genesis, 99960, 99993)."""
    return [(r[0], int(r[3]), bytes.fromhex(r[4])) for r in _load("mainnet_checkblock_valid.json") if len(r) == 5]


@pytest.fixture(scope="module")
def mainnet_invalid() -> dict[str, tuple[int, bytes]]:
    return {r[0]: (int(r[3]), bytes.fromhex(r[4])) for r in _load("mainnet_checkblock_invalid.json") if len(r) == 5}


@pytest.fixture(scope="module")
def testnet_blocks() -> list[tuple[int, str, bytes]]:
    """(height, display hash, raw block) for the ten testnet3 blocks."""
    return [(int(r[0]), r[1], bytes.fromhex(r[2])) for r in _load("testnet3_blocks_bip158.json")[1:]]


@pytest.fixture(scope="module")
def real_blocks(mainnet_blocks: list[tuple[str, int, bytes]], testnet_blocks: list[tuple[int, str, bytes]]
                ) -> list[tuple[str, ChainParams, bytes, CBlock]]:
    out = [(f"mainnet {c}", BITCOIN_MAINNET, raw, CBlock.deserialize(raw)) for c, _, raw in mainnet_blocks[1:]]
    out += [(f"testnet3 {h}", BITCOIN_TESTNET3, raw, CBlock.deserialize(raw)) for h, _, raw in testnet_blocks]
    return out


def _txids(block: CBlock) -> list[bytes]:
    return [tx.GetTxid() for tx in block.vtx]


def test_parse_and_pow_of_every_real_header(mainnet_blocks: list[tuple[str, int, bytes]],
                                            testnet_blocks: list[tuple[int, str, bytes]]) -> None:
    for _, _, raw in mainnet_blocks:
        h = parse_header(raw[:80])
        ref = CBlock.deserialize(raw)
        assert (h.version, h.prev_hash, h.merkle_root, h.time, h.bits, h.nonce) == (
            ref.nVersion, ref.hashPrevBlock, ref.hashMerkleRoot, ref.nTime, ref.nBits, ref.nNonce)
        assert h.hash == ref.GetHash() and h.serialize() == raw[:80]
        check_pow(h, BITCOIN_MAINNET)
    assert parse_header(mainnet_blocks[0][2][:80]).hash == BITCOIN_MAINNET.genesis_hash
    for height, display, raw in testnet_blocks:
        h = parse_header(raw[:80])
        assert h.hash_hex == display
        assert check_pow(h, BITCOIN_TESTNET3) == bits_to_target(h.bits)
    assert parse_header(testnet_blocks[0][2][:80]).hash == BITCOIN_TESTNET3.genesis_hash


def test_merkle_root_of_every_real_block(real_blocks: list[tuple[str, ChainParams, bytes, CBlock]]) -> None:
    segwit = 0
    for name, _, raw, block in real_blocks:
        root, mutated = compute_merkle_root(_txids(block))
        assert root == parse_header(raw[:80]).merkle_root, name
        assert not mutated
        for tx in block.vtx:  # txid is the hash of the non-witness serialization; wtxid differs with witness
            info = parse_tx(tx.serialize())
            assert info.txid == tx.GetTxid()
            if tx.has_witness():
                segwit += 1
                assert info.txid != hashlib.sha256(hashlib.sha256(tx.serialize()).digest()).digest()
    assert segwit >= 4  # testnet3 926485 and 1263442 carry witness data


def test_partial_merkle_trees_over_real_blocks(real_blocks: list[tuple[str, ChainParams, bytes, CBlock]]) -> None:
    counts = set()
    for name, _, raw, block in real_blocks:
        ids = _txids(block)
        n = len(ids)
        counts.add(n)
        header = parse_header(raw[:80])
        patterns = [[i == j for i in range(n)] for j in range(n)] + [[True] * n, [i % 2 == 0 for i in range(n)]]
        for flags in patterns:
            pmt = build_partial_merkle_tree(ids, flags)
            again = PartialMerkleTree.deserialize(pmt.serialize())
            assert again == pmt
            root, matches = again.extract_matches()
            assert root == header.merkle_root, name
            assert matches == [(i, ids[i]) for i in range(n) if flags[i]]
        for i, tx in enumerate(block.vtx):  # every transaction, segwit ones by their full (witness) bytes
            mb = serialize_merkleblock(header, build_partial_merkle_tree(ids, [k == i for k in range(n)]))
            got_header, index = verify_tx_in_block(tx.serialize(), mb, expected_header=header)
            assert (got_header, index) == (header, i)
    assert {3, 5} <= counts  # odd transaction counts


def test_real_invalid_vectors(mainnet_blocks: list[tuple[str, int, bytes]],
                              mainnet_invalid: dict[str, tuple[int, bytes]]) -> None:
    genesis = parse_header(mainnet_blocks[0][2][:80])
    chain = HeaderChain(BITCOIN_MAINNET, genesis, 0, now=None)
    assert chain.work == block_work(bits_to_target(0x1D00FFFF)) == 0x100010001
    # The future limit: "two hours - 1 s behind" passes, "+ 1 s" is too new.
    now_ok = next(t for c, t, _ in mainnet_blocks if "- 1 second" in c)
    now_bad = mainnet_invalid["Genesis block with time set to two hours + 1 second behind"][0]
    check_future(genesis, BITCOIN_MAINNET, now_ok)
    with pytest.raises(TimeTooNew):
        check_future(genesis, BITCOIN_MAINNET, now_bad)
    with pytest.raises(BadProofOfWork):
        check_pow(parse_header(mainnet_invalid["Genesis with one byte changed"][1][:80]), BITCOIN_MAINNET)
    raw = mainnet_invalid["Merkle root mismatch"][1]
    assert compute_merkle_root(_txids(CBlock.deserialize(raw)))[0] != parse_header(raw[:80]).merkle_root


def test_real_linkage_testnet(testnet_blocks: list[tuple[int, str, bytes]]) -> None:
    by_height = {h: parse_header(raw[:80]) for h, _, raw in testnet_blocks}
    chain = HeaderChain(BITCOIN_TESTNET3, by_height[2], 2, now=by_height[3].time)
    chain.add(by_height[3])
    assert (chain.height, chain.tip) == (3, by_height[3].hash)
    assert chain.work == 2 * block_work(bits_to_target(0x1D00FFFF))
    genesis_chain = HeaderChain(BITCOIN_TESTNET3, by_height[0], 0, now=None)
    with pytest.raises(BadLink):
        genesis_chain.add(by_height[2])  # block 1 is missing
    with pytest.raises(CheckpointMismatch):
        HeaderChain(BITCOIN_MAINNET, by_height[0], 0, now=None)  # testnet genesis is not mainnet's
    with pytest.raises(CheckpointMismatch):
        HeaderChain(BITCOIN_TESTNET3, by_height[2], 2, now=None, checkpoints={3: b"\1" * 32}).add(by_height[3])


def test_regtest_genesis_rebuilt_from_its_fields() -> None:
    root = bytes.fromhex("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")[::-1]
    g = make_header(1, b"\0" * 32, root, 1296688602, 0x207FFFFF, 2)
    assert g.hash == BITCOIN_REGTEST.genesis_hash
    assert g.hash_hex == "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"


# -- header mutations on real headers ------------------------------------------------------------------------------
def _with(h: Header, **fields: int) -> Header:
    values = dict(version=h.version, prev_hash=h.prev_hash, merkle_root=h.merkle_root, time=h.time, bits=h.bits,
                  nonce=h.nonce)
    values.update(fields)
    return make_header(**values)  # type: ignore[arg-type]


def test_header_mutations_each_with_its_own_error(mainnet_blocks: list[tuple[str, int, bytes]]) -> None:
    raw = mainnet_blocks[2][2][:80]  # block 99960
    h = parse_header(raw)
    with pytest.raises(BadHeader):
        parse_header(raw[:79])
    with pytest.raises(BadHeader):
        parse_header(raw + b"\0")
    assert isinstance(BadHeader("x"), DecodeError)
    cases: list[tuple[int, type[SpvError]]] = [
        (h.bits | 0x00800000, NegativeTarget),
        (0xFF123456, TargetOverflow),
        (0x22010000, TargetOverflow),
        (0x00000000, ZeroTarget),
        (0x01003456, ZeroTarget),
        (0x1D01FFFF, TargetAboveLimit),
        (0x207FFFFF, TargetAboveLimit),
    ]
    for bits, err in cases:
        with pytest.raises(err):
            check_pow(_with(h, bits=bits), BITCOIN_MAINNET)
    with pytest.raises(BadProofOfWork):
        check_pow(_with(h, nonce=h.nonce + 1), BITCOIN_MAINNET)


def test_compact_encoding_matches_core() -> None:
    # Core's arith_uint256_tests SetCompact/GetCompact cases.
    assert decode_compact(0x01123456) == (0x12, False, False)
    assert decode_compact(0x01FEDCBA) == (0x7E, True, False)
    assert decode_compact(0x04923456) == (0x12345600, True, False)
    assert decode_compact(0x05009234) == (0x92340000, False, False)
    assert decode_compact(0x20123456) == (0x1234560000000000000000000000000000000000000000000000000000000000,
                                          False, False)
    assert decode_compact(0xFF123456)[2]
    assert decode_compact(0x00123456) == (0, False, False)
    assert decode_compact(0x01803456) == (0, False, False)  # zero is never negative
    for v, compact in [(0x12, 0x01120000), (0x80, 0x02008000), (0x12345600, 0x04123456), (0x92340000, 0x05009234),
                       (0, 0)]:
        assert target_to_bits(v) == compact
    for p in (BITCOIN_MAINNET, BITCOIN_TESTNET3, BITCOIN_SIGNET, BITCOIN_REGTEST):
        assert bits_to_target(p.pow_limit_bits, p.pow_limit) <= p.pow_limit
        # Core's arith_uint256 wraps at 2**256; every real retargeting chain stays below that (module docstring).
        assert p.no_retargeting or p.pow_limit * 4 * p.target_timespan < 1 << 256
    assert [BITCOIN_MAINNET.pow_limit_bits, BITCOIN_SIGNET.pow_limit_bits, BITCOIN_REGTEST.pow_limit_bits] == [
        0x1D00FFFF, 0x1E0377AE, 0x207FFFFF]
    assert chain_params_by_name("testnet") is BITCOIN_TESTNET3
    with pytest.raises(OutOfRange):
        chain_params_by_name("litecoin")


def test_retarget_matches_core_mainnet_history() -> None:
    # Core's pow_tests: get_next_work, get_next_work_pow_limit, get_next_work_lower_limit_actual,
    # get_next_work_upper_limit_actual (mainnet, last block of a period, time of its first block).
    assert calculate_next_bits(BITCOIN_MAINNET, 0x1D00FFFF, 1262152739 - 1261130161) == 0x1D00D86A
    assert calculate_next_bits(BITCOIN_MAINNET, 0x1D00FFFF, 1233061996 - 1231006505) == 0x1D00FFFF
    assert calculate_next_bits(BITCOIN_MAINNET, 0x1C05A3F4, 1279297671 - 1279008237) == 0x1C0168FD
    assert calculate_next_bits(BITCOIN_MAINNET, 0x1C387F6F, 1269211443 - 1263163443) == 0x1D00E1FD
    assert permitted_transition(BITCOIN_MAINNET, 2016, 0x1C05A3F4, 0x1C0168FD)
    assert not permitted_transition(BITCOIN_MAINNET, 2016, 0x1C05A3F4, 0x1C0168FC)
    assert not permitted_transition(BITCOIN_MAINNET, 2017, 0x1C05A3F4, 0x1C0168FD)
    assert calculate_next_bits(BITCOIN_REGTEST, 0x207FFFFF, 1) == 0x207FFFFF  # regtest never retargets


# -- synthetic chains ground at a low target -----------------------------------------------------------------------
_PACK = struct.Struct("<i32s32sIII")


def grind(prev: bytes, root: bytes, t: int, bits: int, version: int = 4) -> Header:
    target = bits_to_target(bits)
    base = _PACK.pack(version, prev, root, t, bits, 0)[:76]
    nonce = 0
    while True:
        raw = base + nonce.to_bytes(4, "little")
        h = _sha(_sha(raw).digest()).digest()
        if int.from_bytes(h, "little") <= target:
            return Header(version, prev, root, t, bits, nonce, h)
        nonce += 1


def synthetic_params(genesis: Header, **kw: object) -> ChainParams:
    return ChainParams("synthetic", LOW_LIMIT, genesis.hash, **kw)  # type: ignore[arg-type]


def build_chain(params: ChainParams, start: Header, start_height: int, count: int,
                spacing: Callable[[int], int], period_start: Optional[int] = None) -> list[Header]:
    """count headers after start following the retarget rules of params (no min-difficulty blocks)."""
    out: list[Header] = []
    prev, bits, t = start, start.bits, start.time
    first = start.time if start_height % params.interval == 0 else period_start
    for height in range(start_height + 1, start_height + 1 + count):
        t += spacing(height)
        if height % params.interval == 0:
            assert first is not None
            bits = calculate_next_bits(params, bits, prev.time - first)
            first = t
        prev = grind(prev.hash, height.to_bytes(32, "little"), t, bits)
        out.append(prev)
    return out


GENESIS_BITS = target_to_bits(LOW_LIMIT // 16)  # 16 nonces a header: room for a x4 easing below the limit
T0 = 1_700_000_000


@pytest.fixture(scope="module")
def genesis() -> Header:
    return grind(b"\0" * 32, b"\x42" * 32, T0, GENESIS_BITS, version=1)


@pytest.fixture(scope="module")
def slow_chain(genesis: Header) -> list[Header]:
    """Mainnet rules, period 0 ten times too slow: the retarget at 2016 eases by the x4 clamp."""
    return build_chain(synthetic_params(genesis), genesis, 0, 2020, lambda h: 6000)


@pytest.fixture(scope="module")
def fast_chain(genesis: Header) -> list[Header]:
    """Mainnet rules, period 0 ten times too fast: the retarget at 2016 hardens by the x4 clamp."""
    return build_chain(synthetic_params(genesis), genesis, 0, 2018, lambda h: 60)


def _blob(headers: list[Header]) -> bytes:
    return b"".join(h.serialize() for h in headers)


def test_retarget_clamps_both_ways(genesis: Header, slow_chain: list[Header], fast_chain: list[Header]) -> None:
    params = synthetic_params(genesis)
    old = bits_to_target(GENESIS_BITS)
    assert bits_to_target(slow_chain[2015].bits) == bits_to_target(target_to_bits(old * 4))  # x4 easier, clamped
    assert bits_to_target(fast_chain[2015].bits) == bits_to_target(target_to_bits(old // 4))  # x4 harder, clamped
    for headers in (slow_chain, fast_chain):
        chain = HeaderChain(params, genesis, 0, now=headers[-1].time)
        assert chain.extend_raw(_blob(headers)) == len(headers)
        assert (chain.height, chain.tip) == (len(headers), headers[-1].hash)
        expected = block_work(old) * 2016 + sum(block_work(bits_to_target(h.bits)) for h in headers[2015:])
        assert chain.work == expected


def test_wrong_retarget_bits_fail(genesis: Header, slow_chain: list[Header]) -> None:
    params = synthetic_params(genesis)
    chain = HeaderChain(params, genesis, 0, now=None)
    chain.extend_raw(_blob(slow_chain[:2015]))
    at = slow_chain[2015]
    for bits in (GENESIS_BITS, target_to_bits(bits_to_target(at.bits) // 2)):  # unchanged / not the computed value
        bad = grind(at.prev_hash, at.merkle_root, at.time, bits)
        with pytest.raises(BadDifficulty) as e:
            chain.copy().add(bad)
        assert e.value.height == 2016
    chain.add(at)
    changed = grind(at.hash, b"\7" * 32, at.time + 600, target_to_bits(bits_to_target(at.bits) // 2))
    with pytest.raises(BadDifficulty):  # a change outside a retarget height
        chain.add(changed)


def test_checkpoint_start_without_period_start_uses_core_bounds(genesis: Header, slow_chain: list[Header]) -> None:
    params = synthetic_params(genesis)
    start, rest = slow_chain[99], slow_chain[100:]  # height 100, period start unknown
    HeaderChain(params, start, 100, now=None).extend_raw(_blob(rest))
    at = slow_chain[2015]
    within = grind(at.prev_hash, at.merkle_root, at.time, target_to_bits(bits_to_target(at.bits) // 2))
    beyond = grind(at.prev_hash, at.merkle_root, at.time, params.pow_limit_bits)  # x16 easier than before
    c = HeaderChain(params, start, 100, now=None)
    c.extend_raw(_blob(slow_chain[100:2015]))
    c.copy().add(within)  # the documented weakening: within Core's x4 bounds, not exact
    with pytest.raises(BadDifficulty):
        c.copy().add(beyond)
    exact = HeaderChain(params, start, 100, now=None, period_start_time=genesis.time)
    exact.extend_raw(_blob(slow_chain[100:2015]))
    with pytest.raises(BadDifficulty):
        exact.add(within)


def test_link_checkpoint_and_atomic_batches(genesis: Header, slow_chain: list[Header]) -> None:
    params = synthetic_params(genesis)
    h5 = slow_chain[4]
    with pytest.raises(CheckpointMismatch) as e:
        HeaderChain(params, genesis, 0, now=None, checkpoints={5: b"\1" * 32}).extend_raw(_blob(slow_chain[:10]))
    assert e.value.height == 5
    HeaderChain(params, genesis, 0, now=None, checkpoints={5: h5.hash}).extend_raw(_blob(slow_chain[:10]))
    chain = HeaderChain(params, genesis, 0, now=None)
    broken = slow_chain[:10] + slow_chain[11:20]
    with pytest.raises(BadLink) as e:
        chain.extend_raw(_blob(broken))
    assert e.value.height == 11
    assert (chain.height, chain.tip) == (0, genesis.hash)  # nothing of the failed batch was kept
    with pytest.raises(BadHeader):
        chain.extend_raw(_blob(slow_chain[:2])[:-1])
    with pytest.raises(CheckpointMismatch):
        HeaderChain(params, slow_chain[0], 0, now=None)  # height 0 must be the genesis


def test_median_time_past_and_future_limit(genesis: Header, slow_chain: list[Header]) -> None:
    params = synthetic_params(genesis)
    chain = HeaderChain(params, genesis, 0, now=None)
    chain.extend_raw(_blob(slow_chain[:20]))
    tip = slow_chain[19]
    mtp = chain.median_time_past()
    assert mtp == slow_chain[14].time  # median of heights 10..20
    with pytest.raises(TimeTooOld):
        chain.copy().add(grind(tip.hash, b"\1" * 32, mtp, tip.bits))
    chain.copy().add(grind(tip.hash, b"\1" * 32, mtp + 1, tip.bits))  # not monotonic, but after the MTP
    late = grind(tip.hash, b"\1" * 32, tip.time + 600, tip.bits)
    HeaderChain(params, genesis, 0, now=late.time - 7200).extend_raw(_blob(slow_chain[:20]) + late.serialize())
    c = HeaderChain(params, genesis, 0, now=late.time - 7201)
    c.extend_raw(_blob(slow_chain[:20]))
    with pytest.raises(TimeTooNew):
        c.add(late)
    # near genesis the median is over the headers there are (Core does the same)
    early = HeaderChain(params, genesis, 0, now=None)
    with pytest.raises(TimeTooOld):
        early.add(grind(genesis.hash, b"\2" * 32, genesis.time, genesis.bits))
    # from a checkpoint without prior times the rule starts once 11 times are known ...
    from_cp = HeaderChain(params, slow_chain[9], 10, now=None)
    from_cp.add(grind(slow_chain[9].hash, b"\3" * 32, slow_chain[9].time - 1, slow_chain[9].bits))
    # ... or at once with them
    with_prior = HeaderChain(params, slow_chain[9], 10, now=None, prior_times=[genesis.time] + [
        h.time for h in slow_chain[:9]])
    with pytest.raises(TimeTooOld):
        with_prior.add(grind(slow_chain[9].hash, b"\3" * 32, slow_chain[4].time, slow_chain[9].bits))


def test_regtest_does_not_retarget() -> None:
    root = bytes.fromhex("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")[::-1]
    g = make_header(1, b"\0" * 32, root, 1296688602, 0x207FFFFF, 2)
    headers = build_chain(BITCOIN_REGTEST, g, 0, 150, lambda h: 1)  # a block a second, across height 144
    assert all(h.bits == 0x207FFFFF for h in headers)
    chain = HeaderChain(BITCOIN_REGTEST, g, 0, now=None)
    chain.extend_raw(_blob(headers))
    assert chain.height == 150
    at = headers[143]
    c = HeaderChain(BITCOIN_REGTEST, g, 0, now=None)
    c.extend_raw(_blob(headers[:143]))
    with pytest.raises(BadDifficulty):
        c.add(grind(at.prev_hash, at.merkle_root, at.time, 0x2001FFFF))


def test_min_difficulty_rule_and_most_work_tip(genesis: Header) -> None:
    """Testnet's 20-minute rule; the shorter branch of normal-difficulty headers has the most work."""
    params = synthetic_params(genesis, allow_min_difficulty=True)
    limit = params.pow_limit_bits
    tree = HeaderTree(HeaderChain(params, genesis, 0, now=None))
    a_branch = [genesis]
    for i in range(20):  # 20-minute gaps: min-difficulty headers, work about 2 each
        prev = a_branch[-1]
        a_branch.append(grind(prev.hash, b"a%d".ljust(32, b"\0") % i, prev.time + 1201, limit))
    a1, a_tip = a_branch[1], a_branch[-1]
    b1 = grind(genesis.hash, b"b1".ljust(32, b"\0"), genesis.time + 600, GENESIS_BITS)  # work about 32 each
    b2 = grind(b1.hash, b"b2".ljust(32, b"\0"), b1.time + 600, GENESIS_BITS)
    for h in a_branch[1:]:
        tree.add(h)
    assert tree.best_tip().tip == a_tip.hash
    tree.add(b1)
    assert tree.best_tip().tip == a_tip.hash
    tree.add(b2)
    best = tree.best_tip()
    assert (best.tip, best.height) == (b2.hash, 2)
    assert best.work > tree.chain_at(a_tip.hash).work and tree.chain_at(a_tip.hash).height == 20
    assert best_tip([tree.chain_at(a_tip.hash), tree.chain_at(b2.hash)]).tip == b2.hash
    with pytest.raises(BadLink):
        tree.add(grind(b"\5" * 32, b"\0" * 32, genesis.time + 600, GENESIS_BITS))
    # after a min-difficulty header, a quick one goes back to the last normal nBits
    back = grind(a1.hash, b"c".ljust(32, b"\0"), a1.time + 600, GENESIS_BITS)
    tree.add(back)
    with pytest.raises(BadDifficulty):  # a 20-minute gap must be min difficulty
        tree.add(grind(genesis.hash, b"d".ljust(32, b"\0"), genesis.time + 1201, GENESIS_BITS))
    with pytest.raises(BadDifficulty):  # a quick header may not be min difficulty
        tree.add(grind(genesis.hash, b"e".ljust(32, b"\0"), genesis.time + 600, limit))
    with pytest.raises(BadDifficulty):  # not the last normal nBits
        tree.add(grind(a1.hash, b"f".ljust(32, b"\0"), a1.time + 600, target_to_bits(LOW_LIMIT // 8)))
    # equal work: the first seen stays best
    t2 = HeaderTree(HeaderChain(params, genesis, 0, now=None))
    t2.add(b1)
    t2.add(grind(genesis.hash, b"x".ljust(32, b"\0"), genesis.time + 600, GENESIS_BITS))
    assert t2.best_tip().tip == b1.hash


# -- partial merkle tree mutations ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def five(testnet_blocks: list[tuple[int, str, bytes]]) -> tuple[Header, CBlock, list[bytes]]:
    raw = next(raw for h, _, raw in testnet_blocks if h == 180480)  # five transactions
    block = CBlock.deserialize(raw)
    return parse_header(raw[:80]), block, _txids(block)


def _pmt(pmt: PartialMerkleTree, **kw: object) -> PartialMerkleTree:
    values = dict(tx_count=pmt.tx_count, hashes=pmt.hashes, flags=pmt.flags)
    values.update(kw)
    return PartialMerkleTree(**values)  # type: ignore[arg-type]


def test_merkle_mutations_each_with_its_own_error(five: tuple[Header, CBlock, list[bytes]]) -> None:
    header, block, ids = five
    good = build_partial_merkle_tree(ids, [i == 3 for i in range(5)])
    assert good.extract_matches() == (header.merkle_root, [(3, ids[3])])
    with pytest.raises(MerkleUnusedBits):
        _pmt(good, flags=good.flags + b"\0").extract_matches()
    with pytest.raises(MerkleUnusedBits):  # a set padding bit after the last used one (Core's writer never sets it)
        _pmt(good, flags=good.flags[:-1] + bytes((good.flags[-1] | 0x80,))).extract_matches()
    with pytest.raises(MerkleUnusedHashes):
        _pmt(good, hashes=good.hashes + (b"\x09" * 32,)).extract_matches()
    with pytest.raises(MerkleUnusedHashes):
        _pmt(good, hashes=good.hashes * 2).extract_matches()  # more hashes than transactions
    with pytest.raises(MerkleBadCount):
        _pmt(good, tx_count=0).extract_matches()
    with pytest.raises(MerkleBadCount):
        _pmt(good, tx_count=MAX_BLOCK_TXS + 1).extract_matches()
    with pytest.raises(MerkleTooDeep):  # a count implying a deeper tree than the proof describes
        _pmt(good, tx_count=9).extract_matches()
    with pytest.raises(MerkleTooDeep):  # runs out of hashes
        _pmt(good, flags=b"\xff").extract_matches()
    with pytest.raises(MerkleTooDeep):  # runs out of flag bits
        _pmt(good, tx_count=5 * 64, hashes=good.hashes[:1], flags=b"\xff").extract_matches()
    flipped = list(good.hashes)
    flipped[0] = bytes([flipped[0][0] ^ 1]) + flipped[0][1:]
    mb = serialize_merkleblock(header, _pmt(good, hashes=tuple(flipped)))
    with pytest.raises(MerkleRootMismatch):
        verify_tx_in_block(block.vtx[3].serialize(), mb)
    mb = serialize_merkleblock(header, good)
    with pytest.raises(TxNotInProof):
        verify_tx_in_block(block.vtx[2].serialize(), mb)
    with pytest.raises(MerkleHeaderMismatch):
        verify_tx_in_block(block.vtx[3].serialize(), mb, expected_header=_with(header, nonce=1))
    assert verify_tx_in_block(block.vtx[3].serialize(), mb)[1] == 3


def test_duplicated_last_node_mutation_cve_2012_2459(five: tuple[Header, CBlock, list[bytes]]) -> None:
    header, block, ids = five
    mutated_ids = ids + [ids[-1]]  # six "transactions", the last one twice: same merkle root
    root, mutated = compute_merkle_root(mutated_ids)
    assert root == header.merkle_root and mutated
    assert compute_merkle_root(ids) == (header.merkle_root, False)
    pmt = build_partial_merkle_tree(mutated_ids, [i == 5 for i in range(6)])
    with pytest.raises(MerkleMutation):
        pmt.extract_matches()
    with pytest.raises(MerkleMutation):
        verify_tx_in_block(block.vtx[4].serialize(), serialize_merkleblock(header, pmt))
    # the honest proof for the same transaction verifies
    honest = build_partial_merkle_tree(ids, [i == 4 for i in range(5)])
    assert verify_tx_in_block(block.vtx[4].serialize(), serialize_merkleblock(header, honest))[1] == 4


def _tx(script_out: bytes, n_in: int = 1) -> CMutableTransaction:
    vin = [CMutableTxIn(COutPoint(bytes([i + 1]) * 32, i)) for i in range(n_in)]
    return CMutableTransaction(vin, [CMutableTxOut(1000, CScript(script_out))])


def test_sixty_four_byte_transaction_is_refused() -> None:
    tx = _tx(b"\x51\x52\x53\x54")  # 60 + 4 bytes
    raw = tx.serialize()
    assert len(raw) == 64
    other = _tx(b"\x51", 2).serialize()
    ids = [parse_tx(other).txid, parse_tx(raw).txid]
    root, _ = compute_merkle_root(ids)
    header = grind(b"\0" * 32, root, T0, 0x207FFFFF)
    mb = serialize_merkleblock(header, build_partial_merkle_tree(ids, [False, True]))
    with pytest.raises(SixtyFourByteTx):
        verify_tx_in_block(raw, mb)
    mb0 = serialize_merkleblock(header, build_partial_merkle_tree(ids, [True, False]))
    assert verify_tx_in_block(other, mb0)[1] == 0


def test_malformed_inputs_are_decode_errors(five: tuple[Header, CBlock, list[bytes]]) -> None:
    header, block, ids = five
    good = build_partial_merkle_tree(ids, [i == 1 for i in range(5)])
    mb = serialize_merkleblock(header, good)
    assert parse_merkleblock(mb) == (header, good)
    with pytest.raises(TrailingBytes):
        parse_merkleblock(mb + b"\0")
    with pytest.raises(Truncated):
        parse_merkleblock(mb[:-1])
    with pytest.raises(Truncated):
        parse_merkleblock(mb[:90])
    with pytest.raises(BadHeader):
        parse_merkleblock(mb[:70])
    nonminimal = mb[:84] + b"\xfd" + len(good.hashes).to_bytes(2, "little") + mb[85:]
    with pytest.raises(NonMinimalVarint):
        parse_merkleblock(nonminimal)
    raw = block.vtx[1].serialize()
    for bad in (raw[:-1], raw + b"\0", b"\x01\x02\x03"):
        with pytest.raises(MalformedTransaction):
            parse_tx(bad)
    assert issubclass(MalformedTransaction, DecodeError)


def test_header_roundtrip_and_sizes() -> None:
    h = make_header(0x20000000, b"\1" * 32, b"\2" * 32, 123, 0x207FFFFF, 7)
    assert len(h.serialize()) == HEADER_SIZE and parse_header(h.serialize()) == h
    assert make_header(-1, b"\1" * 32, b"\2" * 32, 0, 0, 0).version == -1  # nVersion is signed



@settings(max_examples=150, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.booleans(), min_size=n, max_size=n))))
def test_partial_merkle_tree_roundtrip_property(case: tuple[int, list[bool]]) -> None:
    """Core's TraverseAndBuild then ExtractMatches: the block root and exactly the matched (index, txid)."""
    n, flags = case
    ids = [_sha(b"tx%d" % i).digest() for i in range(n)]
    pmt = PartialMerkleTree.deserialize(build_partial_merkle_tree(ids, flags).serialize())
    root, matches = pmt.extract_matches()
    assert root == compute_merkle_root(ids)[0]
    assert matches == [(i, ids[i]) for i in range(n) if flags[i]]


@given(st.integers(1, (1 << 255) - 1))
def test_compact_roundtrip_property(target: int) -> None:
    bits = target_to_bits(target)
    value, negative, overflow = decode_compact(bits)
    assert not negative and not overflow
    assert value <= target and target_to_bits(value) == bits  # GetCompact keeps the top 23 bits
    assert target - value < 1 << max(0, target.bit_length() - 16)
