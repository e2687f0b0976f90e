"""SPV verification of Bitcoin data: headers, proof of work, difficulty, chain work and partial merkle trees.

Pure and consensus-critical (the offline verifier imports it): no I/O, no clock, no global state. The current
time, the chain parameters and any trusted checkpoint are arguments. Nothing here calls python-bitcoinlib's
``SelectParams``; python-bitcoinlib is used only to deserialize transactions.

Ported from Bitcoin Core (src/pow.cpp, src/arith_uint256.cpp SetCompact/GetCompact, src/validation.cpp
ContextualCheckBlockHeader, src/chain.h GetMedianTimePast, src/merkleblock.cpp, src/consensus/merkle.cpp).
Every rule raises its own exception class (see the tree below); each message names the height and hash, or the
proof position, that failed.

    SpvError
      BadHeader (also a DecodeError)            not 80 bytes
      MalformedTransaction (also a DecodeError) raw transaction that does not deserialize canonically
      BadTarget                                 nBits that cannot be a target: NegativeTarget, TargetOverflow,
                                                ZeroTarget, TargetAboveLimit
      BadProofOfWork                            hash above the target its nBits claims
      BadLink                                   prev_hash is not the tip (or no known parent)
      BadDifficulty                             nBits other than what the retarget rules require
      TimeTooOld                                time <= median time past of the previous 11 headers
      TimeTooNew                                time > now + 2 hours
      CheckpointMismatch                        a header at a checkpoint height with another hash
      MerkleError                               MerkleUnusedBits, MerkleUnusedHashes, MerkleMutation,
                                                MerkleBadCount (MerkleTooDeep), MerkleRootMismatch,
                                                MerkleHeaderMismatch, TxNotInProof, SixtyFourByteTx

Arithmetic note: targets are Python integers. Core's arith_uint256 wraps modulo 2**256 in the retarget
multiplication; for every real parameter set (mainnet, testnet3, signet) pow_limit * 4 * timespan < 2**256, so the
two agree exactly. Synthetic parameter sets with a huge pow_limit (used by tests and benchmarks) get the
mathematically intended result rather than Core's wrapped one.
"""
from __future__ import annotations

import hashlib
import struct
from collections import deque
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Optional, Sequence, Union

from bitcoin.core import CTransaction
from bitcoin.core.serialize import SerializationError

from .codec import Reader, write_varint
from .errors import DecodeError, L2Error, OutOfRange, Truncated

HEADER_SIZE = 80
MAX_FUTURE_BLOCK_TIME = 2 * 60 * 60
MEDIAN_TIME_SPAN = 11
MAX_BLOCK_WEIGHT = 4_000_000
MIN_TRANSACTION_WEIGHT = 4 * 60
MAX_BLOCK_TXS = MAX_BLOCK_WEIGHT // MIN_TRANSACTION_WEIGHT  # 16666: Core's bound on a merkle block's tx count
_TWO_256 = 1 << 256
_HDR = struct.Struct("<i32s32sIII")
_TIME_BITS = struct.Struct("<II")  # time, bits at offset 68
_sha256 = hashlib.sha256


def dsha256(b: Union[bytes, memoryview]) -> bytes:
    """Bitcoin's Hash(): SHA-256 twice."""
    return _sha256(_sha256(b).digest()).digest()


# -- errors --------------------------------------------------------------------------------------------------------
class SpvError(L2Error):
    """Bitcoin data that does not verify; height says where in a header chain, when known."""

    def __init__(self, message: str, *, height: Optional[int] = None) -> None:
        super().__init__(message)
        self.height = height


class BadHeader(SpvError, DecodeError):
    """A block header that is not exactly 80 bytes."""


class MalformedTransaction(SpvError, DecodeError):
    """A raw transaction that does not deserialize, or not in its one canonical serialization."""


class BadTarget(SpvError):
    """nBits that do not encode an acceptable target."""


class NegativeTarget(BadTarget):
    pass


class TargetOverflow(BadTarget):
    pass


class ZeroTarget(BadTarget):
    pass


class TargetAboveLimit(BadTarget):
    pass


class BadProofOfWork(SpvError):
    pass


class BadLink(SpvError):
    pass


class BadDifficulty(SpvError):
    pass


class TimeTooOld(SpvError):
    pass


class TimeTooNew(SpvError):
    pass


class CheckpointMismatch(SpvError):
    pass


class MerkleError(SpvError):
    """A partial merkle tree (gettxoutproof) that Core would reject, or that does not prove what is claimed."""


class MerkleUnusedBits(MerkleError):
    pass


class MerkleUnusedHashes(MerkleError):
    pass


class MerkleMutation(MerkleError):
    """Identical left and right subtrees: the CVE-2012-2459 duplicated-node mutation."""


class MerkleBadCount(MerkleError):
    """A transaction count that no block can have (0, above the block-weight bound)."""


class MerkleTooDeep(MerkleBadCount):
    """The tree the transaction count implies is deeper than the proof: it ran out of flag bits or hashes."""


class MerkleRootMismatch(MerkleError):
    pass


class MerkleHeaderMismatch(MerkleError):
    """The merkle block's header is not the header it was expected to be."""


class TxNotInProof(MerkleError):
    pass


class SixtyFourByteTx(MerkleError):
    """A 64-byte transaction: indistinguishable from an inner merkle node, so never accepted as proven."""


# -- chain parameters ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChainParams:
    """Bitcoin consensus parameters for header validation (Core's Consensus::Params subset)."""

    name: str
    pow_limit: int
    genesis_hash: bytes  # internal byte order
    target_timespan: int = 14 * 24 * 60 * 60
    target_spacing: int = 10 * 60
    allow_min_difficulty: bool = False  # testnet's 20-minute rule (fPowAllowMinDifficultyBlocks)
    no_retargeting: bool = False  # fPowNoRetargeting
    max_future_block_time: int = MAX_FUTURE_BLOCK_TIME

    @property
    def interval(self) -> int:
        """DifficultyAdjustmentInterval: 2016 on mainnet, testnet3 and signet; 144 on regtest."""
        return self.target_timespan // self.target_spacing

    @property
    def pow_limit_bits(self) -> int:
        return target_to_bits(self.pow_limit)


def _h(display_hex: str) -> bytes:
    return bytes.fromhex(display_hex)[::-1]


BITCOIN_MAINNET = ChainParams(
    "mainnet", 0x00000000FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF,
    _h("000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f"))
BITCOIN_TESTNET3 = ChainParams(
    "testnet", 0x00000000FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF,
    _h("000000000933ea01ad0ee984209779baaec3ced90fa3f408719526f8d77f4943"), allow_min_difficulty=True)
BITCOIN_SIGNET = ChainParams(
    "signet", 0x00000377AE000000000000000000000000000000000000000000000000000000,
    _h("00000008819873e925422c1ff0f99f7cc9bbb232af63a077a480a3633bee1ef6"))
BITCOIN_REGTEST = ChainParams(
    "regtest", 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF,
    _h("0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"),
    target_timespan=24 * 60 * 60, allow_min_difficulty=True, no_retargeting=True)

BITCOIN_CHAINS: Mapping[str, ChainParams] = MappingProxyType({
    "mainnet": BITCOIN_MAINNET, "testnet": BITCOIN_TESTNET3, "testnet3": BITCOIN_TESTNET3,
    "signet": BITCOIN_SIGNET, "regtest": BITCOIN_REGTEST,
})


def chain_params_by_name(name: str) -> ChainParams:
    try:
        return BITCOIN_CHAINS[name]
    except KeyError:
        raise OutOfRange(f"unknown Bitcoin chain {name!r}; known: {', '.join(BITCOIN_CHAINS)}") from None


# -- compact targets -----------------------------------------------------------------------------------------------
def decode_compact(bits: int) -> tuple[int, bool, bool]:
    """Core's arith_uint256::SetCompact: (value, negative, overflow)."""
    size = bits >> 24
    word = bits & 0x007FFFFF
    if size <= 3:
        word >>= 8 * (3 - size)
        value = word
    else:
        value = word << (8 * (size - 3))
    negative = word != 0 and (bits & 0x00800000) != 0
    overflow = word != 0 and (size > 34 or (word > 0xFF and size > 33) or (word > 0xFFFF and size > 32))
    return value, negative, overflow


def target_to_bits(target: int) -> int:
    """Core's arith_uint256::GetCompact (non-negative)."""
    if target < 0 or target >= _TWO_256:
        raise OutOfRange(f"target {target} outside 0..2**256-1")
    size = (target.bit_length() + 7) // 8
    if size <= 3:
        compact = (target << (8 * (3 - size))) & 0xFFFFFFFF
    else:
        compact = (target >> (8 * (size - 3))) & 0xFFFFFFFF
    if compact & 0x00800000:
        compact >>= 8
        size += 1
    return compact | (size << 24)


def bits_to_target(bits: int, pow_limit: Optional[int] = None) -> int:
    """The target nBits encode; raises the BadTarget subclass for negative, overflowing, zero or above pow_limit
    (Core's DeriveTarget). pow_limit None skips only the last check."""
    target, negative, overflow = decode_compact(bits)
    if negative:
        raise NegativeTarget(f"nBits {bits:#010x} has the sign bit set (negative target)")
    if target == 0:
        raise ZeroTarget(f"nBits {bits:#010x} encode a zero target")
    if overflow:
        raise TargetOverflow(f"nBits {bits:#010x} overflow 256 bits")
    if pow_limit is not None and target > pow_limit:
        raise TargetAboveLimit(f"nBits {bits:#010x} encode a target above the chain's proof-of-work limit")
    return target


def block_work(target: int) -> int:
    """Core's GetBlockProof: expected number of hashes for a target, 2**256 / (target + 1)."""
    return _TWO_256 // (target + 1)


def calculate_next_bits(params: ChainParams, prev_bits: int, actual_timespan: int) -> int:
    """Core's CalculateNextWorkRequired, given the last header's nBits and last.time - first.time of the period."""
    if params.no_retargeting:
        return prev_bits
    span = params.target_timespan
    actual_timespan = min(max(actual_timespan, span // 4), span * 4)
    new = decode_compact(prev_bits)[0] * actual_timespan // span
    if new > params.pow_limit:
        new = params.pow_limit
    return target_to_bits(new)


def permitted_transition(params: ChainParams, height: int, old_bits: int, new_bits: int) -> bool:
    """Core's PermittedDifficultyTransition: may new_bits at height follow old_bits (bounds only, ×4 each way)."""
    if params.allow_min_difficulty:
        return True
    if height % params.interval == 0:
        span = params.target_timespan
        observed = decode_compact(new_bits)[0]
        old = decode_compact(old_bits)[0]
        largest = min(old * (span * 4) // span, params.pow_limit)
        if decode_compact(target_to_bits(largest))[0] < observed:
            return False
        smallest = min(old * (span // 4) // span, params.pow_limit)
        if decode_compact(target_to_bits(smallest))[0] > observed:
            return False
        return True
    return old_bits == new_bits


# -- headers -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Header:
    """An 80-byte Bitcoin block header; hashes in internal (serialized) byte order."""

    version: int
    prev_hash: bytes
    merkle_root: bytes
    time: int
    bits: int
    nonce: int
    hash: bytes

    @property
    def hash_hex(self) -> str:
        """Display order (as block explorers and bitcoind RPC show it)."""
        return self.hash[::-1].hex()

    @property
    def prev_hash_hex(self) -> str:
        return self.prev_hash[::-1].hex()

    def serialize(self) -> bytes:
        return _HDR.pack(self.version, self.prev_hash, self.merkle_root, self.time, self.bits, self.nonce)


def parse_header(b: Union[bytes, bytearray, memoryview]) -> Header:
    if len(b) != HEADER_SIZE:
        raise BadHeader(f"block header is {len(b)} bytes, expected {HEADER_SIZE}")
    raw = bytes(b)
    version, prev, root, t, bits, nonce = _HDR.unpack(raw)
    return Header(version, prev, root, t, bits, nonce, dsha256(raw))


def make_header(version: int, prev_hash: bytes, merkle_root: bytes, time: int, bits: int, nonce: int) -> Header:
    """A Header from its fields (hash computed)."""
    return parse_header(_HDR.pack(version, prev_hash, merkle_root, time, bits, nonce))


def check_pow(header: Header, params: ChainParams) -> int:
    """Core's CheckProofOfWork; returns the header's target."""
    target = bits_to_target(header.bits, params.pow_limit)
    if int.from_bytes(header.hash, "little") > target:
        raise BadProofOfWork(f"block {header.hash_hex}: hash above the target of nBits {header.bits:#010x}")
    return target


def check_future(header: Header, params: ChainParams, now: int) -> None:
    """Core's time-too-new rule: a header's time may be at most max_future_block_time (2 h) after now."""
    if header.time > now + params.max_future_block_time:
        raise TimeTooNew(f"block {header.hash_hex}: time {header.time} is more than {params.max_future_block_time}s "
                         f"after now ({now})")


def _fail(cls: type[SpvError], height: int, h: bytes, what: str) -> SpvError:
    return cls(f"header at height {height} ({h[::-1].hex()}): {what}", height=height)


class HeaderChain:
    """Validates a linear sequence of headers extending a trusted start (genesis or a checkpoint).

    Memory is bounded: the tip, the last 11 timestamps (median time past), the first time of the current
    retarget period and, on min-difficulty chains, the last non-special nBits. Each batch given to extend_raw
    is all-or-nothing: on error nothing is changed and the error names the first failing header.

    Context that a checkpoint cannot supply is either passed in or the rule is weakened, never guessed:
      prior_times        up to 10 timestamps of the headers before start (oldest first). Without them the
                         median-time-past rule is enforced from the 11th header on (from genesis it always is);
      period_start_time  time of the first header of start's retarget period. Without it (and when start is
                         not itself a period start) the first retarget is checked with Core's
                         PermittedDifficultyTransition bounds (×4 clamp) instead of the exact value;
      last_normal_bits   (min-difficulty chains) nBits of the last header that was not a min-difficulty
                         exception; when unknown, the first such nBits seen is adopted.
    now: the current time for the 2-hour future limit (None skips that one rule, e.g. for archived data).
    """

    __slots__ = ("params", "now", "checkpoints", "start_height", "start_hash", "_tip", "_height", "_work",
                 "_bits", "_time", "_times", "_hi", "_complete", "_period_start", "_last_normal")

    def __init__(self, params: ChainParams, start: Header, start_height: int, *, now: Optional[int],
                 checkpoints: Optional[Mapping[int, bytes]] = None, prior_times: Sequence[int] = (),
                 period_start_time: Optional[int] = None, last_normal_bits: Optional[int] = None) -> None:
        if start_height < 0:
            raise OutOfRange(f"start height {start_height} is negative")
        if len(prior_times) > MEDIAN_TIME_SPAN - 1 or len(prior_times) > start_height:
            raise OutOfRange(f"{len(prior_times)} prior times for a start at height {start_height}")
        self.params = params
        self.now = now
        self.checkpoints = dict(checkpoints or {})
        if start_height == 0 and start.hash != params.genesis_hash:
            raise CheckpointMismatch(f"start at height 0 is {start.hash_hex}, not the {params.name} genesis "
                                     f"{params.genesis_hash[::-1].hex()}", height=0)
        cp = self.checkpoints.get(start_height)
        if cp is not None and cp != start.hash:
            raise _fail(CheckpointMismatch, start_height, start.hash, f"checkpoint requires {cp[::-1].hex()}")
        target = check_pow(start, params)
        self.start_height = start_height
        self.start_hash = start.hash
        self._tip = start.hash
        self._height = start_height
        self._work = block_work(target)
        self._bits = start.bits
        self._time = start.time
        self._times: deque[int] = deque(list(prior_times) + [start.time], maxlen=MEDIAN_TIME_SPAN)
        self._hi = max(self._times)
        self._complete = len(self._times) == start_height + 1  # every timestamp since genesis is known
        at_boundary = start_height % params.interval == 0
        self._period_start = start.time if at_boundary else period_start_time
        if at_boundary or start.bits != params.pow_limit_bits:
            last_normal_bits = start.bits
        self._last_normal = last_normal_bits

    # -- state --
    @property
    def tip(self) -> bytes:
        return self._tip

    @property
    def tip_hex(self) -> str:
        return self._tip[::-1].hex()

    @property
    def height(self) -> int:
        return self._height

    @property
    def work(self) -> int:
        """Cumulative work of the headers from start (inclusive) to the tip."""
        return self._work

    @property
    def tip_time(self) -> int:
        return self._time

    @property
    def tip_bits(self) -> int:
        return self._bits

    @property
    def count(self) -> int:
        return self._height - self.start_height + 1

    def median_time_past(self) -> int:
        s = sorted(self._times)
        return s[len(s) // 2]

    def copy(self) -> "HeaderChain":
        c = object.__new__(HeaderChain)
        for name in HeaderChain.__slots__:
            setattr(c, name, getattr(self, name))
        c._times = deque(self._times, maxlen=MEDIAN_TIME_SPAN)
        return c

    # -- validation --
    def add(self, header: Header) -> None:
        self.extend_raw(header.serialize())

    def extend_raw(self, data: Union[bytes, bytearray, memoryview]) -> int:
        """Validate and append concatenated 80-byte headers; returns how many were appended."""
        n, rem = divmod(len(data), HEADER_SIZE)
        if rem:
            raise BadHeader(f"{len(data)} bytes of headers is not a multiple of {HEADER_SIZE}")
        params = self.params
        interval = params.interval
        limit_bits = params.pow_limit_bits
        allow_min = params.allow_min_difficulty
        min_gap = 2 * params.target_spacing
        future = None if self.now is None else self.now + params.max_future_block_time
        checkpoints = self.checkpoints
        tip, height, work = self._tip, self._height, self._work
        prev_bits, prev_time, hi = self._bits, self._time, self._hi
        period_start, last_normal, complete = self._period_start, self._last_normal, self._complete
        times = deque(self._times, maxlen=MEDIAN_TIME_SPAN)
        push = times.append
        cur_bits, cur_target, cur_work = -1, 0, 0
        mv = memoryview(data)
        sha = _sha256
        unpack = _TIME_BITS.unpack_from
        from_bytes = int.from_bytes
        for off in range(0, n * HEADER_SIZE, HEADER_SIZE):
            raw = mv[off:off + HEADER_SIZE]
            h = sha(sha(raw).digest()).digest()
            height += 1
            if raw[4:36] != tip:
                raise _fail(BadLink, height, h, f"previous hash {bytes(raw[4:36])[::-1].hex()} is not the tip "
                                                f"{tip[::-1].hex()}")
            t, bits = unpack(raw, 68)
            if bits != cur_bits:
                try:
                    cur_target = bits_to_target(bits, params.pow_limit)
                except BadTarget as e:
                    raise _fail(type(e), height, h, str(e)) from None
                cur_bits, cur_work = bits, block_work(cur_target)
            if from_bytes(h, "little") > cur_target:
                raise _fail(BadProofOfWork, height, h, f"hash above the target of nBits {bits:#010x}")
            if checkpoints and height in checkpoints and checkpoints[height] != h:
                raise _fail(CheckpointMismatch, height, h, f"checkpoint requires {checkpoints[height][::-1].hex()}")
            # difficulty (Core's GetNextWorkRequired)
            pos = height % interval
            if pos == 0:
                if period_start is not None:
                    expected = calculate_next_bits(params, prev_bits, prev_time - period_start)
                    if bits != expected:
                        raise _fail(BadDifficulty, height, h, f"nBits {bits:#010x}, the retarget requires "
                                                              f"{expected:#010x}")
                elif not permitted_transition(params, height, prev_bits, bits):
                    raise _fail(BadDifficulty, height, h, f"nBits {bits:#010x} is outside the x4 retarget bounds "
                                                          f"from {prev_bits:#010x}")
            elif allow_min:
                if t > prev_time + min_gap:
                    if bits != limit_bits:
                        raise _fail(BadDifficulty, height, h, f"nBits {bits:#010x} after a {t - prev_time}s gap, "
                                                              f"the min-difficulty rule requires {limit_bits:#010x}")
                elif last_normal is None:
                    if bits != limit_bits:
                        last_normal = bits  # context unknown (checkpoint start): adopt
                elif bits != last_normal:
                    raise _fail(BadDifficulty, height, h, f"nBits {bits:#010x}, expected {last_normal:#010x} "
                                                          f"(last non-min-difficulty header)")
            elif bits != prev_bits:
                raise _fail(BadDifficulty, height, h, f"nBits {bits:#010x} changed from {prev_bits:#010x} "
                                                      f"outside a retarget")
            # timestamps
            if t <= hi and (complete or len(times) == MEDIAN_TIME_SPAN):
                s = sorted(times)
                mtp = s[len(s) // 2]
                if t <= mtp:
                    raise _fail(TimeTooOld, height, h, f"time {t} is not after the median time past {mtp}")
            if future is not None and t > future:
                raise _fail(TimeTooNew, height, h, f"time {t} is more than {params.max_future_block_time}s "
                                                   f"after now ({self.now})")
            # accepted
            push(t)
            if t > hi:
                hi = t
            if pos == 0:
                period_start = t
            if allow_min and (pos == 0 or bits != limit_bits):
                last_normal = bits
            work += cur_work
            tip, prev_bits, prev_time = h, bits, t
        self._tip, self._height, self._work = tip, height, work
        self._bits, self._time, self._hi = prev_bits, prev_time, hi
        self._period_start, self._last_normal, self._times = period_start, last_normal, times
        return n


def best_tip(chains: Iterable[HeaderChain]) -> HeaderChain:
    """The chain with the most cumulative work; on a tie the first one given (Core keeps the first seen)."""
    best: Optional[HeaderChain] = None
    for c in chains:
        if best is None or c.work > best.work:
            best = c
    if best is None:
        raise OutOfRange("best_tip of no chains")
    return best


class HeaderTree:
    """Competing branches from one trusted start; keeps the validation state of every accepted header.

    Meant for forks near the tip (memory grows with the number of headers); a single long chain is validated
    with HeaderChain in bounded memory.
    """

    def __init__(self, root: HeaderChain) -> None:
        self._nodes: dict[bytes, HeaderChain] = {root.tip: root.copy()}
        self._best = root.tip

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._nodes

    def add(self, header: Header) -> HeaderChain:
        """Validate header on top of its parent (which must be known); returns the chain ending at it."""
        known = self._nodes.get(header.hash)
        if known is not None:
            return known
        parent = self._nodes.get(header.prev_hash)
        if parent is None:
            raise BadLink(f"header {header.hash_hex}: unknown parent {header.prev_hash_hex}")
        chain = parent.copy()
        chain.add(header)
        self._nodes[header.hash] = chain
        if chain.work > self._nodes[self._best].work:
            self._best = header.hash
        return chain

    def chain_at(self, block_hash: bytes) -> HeaderChain:
        return self._nodes[block_hash].copy()

    def best_tip(self) -> HeaderChain:
        """Most cumulative work; the first seen among equals."""
        return self._nodes[self._best].copy()


# -- merkle trees --------------------------------------------------------------------------------------------------
def compute_merkle_root(txids: Sequence[bytes]) -> tuple[bytes, bool]:
    """Core's ComputeMerkleRoot: (root, mutated) where mutated flags identical sibling pairs (CVE-2012-2459)."""
    if not txids:
        return b"\0" * 32, False
    level = list(txids)
    mutated = False
    while len(level) > 1:
        for i in range(0, len(level) - 1, 2):
            if level[i] == level[i + 1]:
                mutated = True
        if len(level) & 1:
            level.append(level[-1])
        level = [dsha256(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0], mutated


def _width(n: int, height: int) -> int:
    return (n + (1 << height) - 1) >> height


def _tree_height(n: int) -> int:
    h = 0
    while _width(n, h) > 1:
        h += 1
    return h


@dataclass(frozen=True, slots=True)
class PartialMerkleTree:
    """Core's CPartialMerkleTree: the part of a gettxoutproof / merkleblock after the 80-byte header."""

    tx_count: int
    hashes: tuple[bytes, ...]
    flags: bytes  # flag bits, least significant bit of the first byte first

    def serialize(self) -> bytes:
        return (self.tx_count.to_bytes(4, "little") + write_varint(len(self.hashes)) + b"".join(self.hashes)
                + write_varint(len(self.flags)) + self.flags)

    @classmethod
    def read(cls, r: Reader) -> "PartialMerkleTree":
        count = int.from_bytes(r.take(4), "little")
        nh = r.varint()
        if nh * 32 > r.remaining():
            raise _truncated(r, nh * 32)
        hashes = tuple(r.take(32) for _ in range(nh))
        nf = r.varint()
        if nf > r.remaining():
            raise _truncated(r, nf)
        return cls(count, hashes, r.take(nf))

    @classmethod
    def deserialize(cls, b: bytes) -> "PartialMerkleTree":
        """Strict: minimal CompactSize counts, no trailing bytes (DecodeError subclasses otherwise)."""
        r = Reader(bytes(b), "partial merkle tree")
        pmt = cls.read(r)
        r.end()
        return pmt

    def extract_matches(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        """Core's ExtractMatches: (merkle root, [(index, txid)]) or the MerkleError for the first rule broken.

        Stricter than Core in one respect: the padding bits after the last used flag bit must be zero (Core only
        requires that no whole byte is unused; its own serializer always writes zero padding).
        """
        n = self.tx_count
        hashes, flags = self.hashes, self.flags
        if n == 0:
            raise MerkleBadCount("partial merkle tree claims 0 transactions")
        if n > MAX_BLOCK_TXS:
            raise MerkleBadCount(f"partial merkle tree claims {n} transactions, more than a block can hold "
                                 f"({MAX_BLOCK_TXS})")
        if len(hashes) > n:
            raise MerkleUnusedHashes(f"{len(hashes)} hashes for {n} transactions")
        nbits = 8 * len(flags)
        if nbits < len(hashes):
            raise MerkleUnusedHashes(f"{len(hashes)} hashes but only {nbits} flag bits")
        height = _tree_height(n)
        used = [0, 0]  # bits, hashes
        matches: list[tuple[int, bytes]] = []

        def traverse(h: int, pos: int) -> bytes:
            b = used[0]
            if b >= nbits:
                raise MerkleTooDeep(f"ran out of flag bits at depth {height - h}: the {n}-transaction tree is "
                                    f"deeper than the proof")
            used[0] = b + 1
            parent_of_match = (flags[b >> 3] >> (b & 7)) & 1
            if h == 0 or not parent_of_match:
                k = used[1]
                if k >= len(hashes):
                    raise MerkleTooDeep(f"ran out of hashes at depth {height - h}: the {n}-transaction tree is "
                                        f"deeper than the proof")
                used[1] = k + 1
                node = hashes[k]
                if h == 0 and parent_of_match:
                    matches.append((pos, node))
                return node
            left = traverse(h - 1, pos * 2)
            if pos * 2 + 1 < _width(n, h - 1):
                right = traverse(h - 1, pos * 2 + 1)
                if right == left:
                    raise MerkleMutation(f"identical subtrees at depth {height - h + 1}, positions {pos * 2} and "
                                         f"{pos * 2 + 1} (duplicated-node mutation, CVE-2012-2459)")
            else:
                right = left
            return dsha256(left + right)

        root = traverse(height, 0)
        bits_used, hashes_used = used
        if (bits_used + 7) // 8 != len(flags):
            raise MerkleUnusedBits(f"{len(flags)} flag bytes, only {bits_used} bits used")
        if flags and flags[-1] >> (bits_used - 8 * (len(flags) - 1)):
            raise MerkleUnusedBits(f"non-zero padding after the {bits_used} used flag bits")
        if hashes_used != len(hashes):
            raise MerkleUnusedHashes(f"{len(hashes)} hashes, only {hashes_used} used")
        return root, matches


def _truncated(r: Reader, need: int) -> DecodeError:
    return Truncated(f"{r.what}: needs {need} bytes at offset {r.pos}, only {r.remaining()} left")


def build_partial_merkle_tree(txids: Sequence[bytes], match_flags: Sequence[bool]) -> PartialMerkleTree:
    """Core's CPartialMerkleTree(vTxid, vMatch) (TraverseAndBuild): a proof for the matched txids."""
    n = len(txids)
    if n == 0 or n != len(match_flags):
        raise MerkleBadCount(f"{n} txids and {len(match_flags)} match flags")
    bits: list[bool] = []
    hashes: list[bytes] = []

    def calc(h: int, pos: int) -> bytes:
        if h == 0:
            return txids[pos]
        left = calc(h - 1, pos * 2)
        right = calc(h - 1, pos * 2 + 1) if pos * 2 + 1 < _width(n, h - 1) else left
        return dsha256(left + right)

    def build(h: int, pos: int) -> None:
        parent = any(match_flags[p] for p in range(pos << h, min((pos + 1) << h, n)))
        bits.append(parent)
        if h == 0 or not parent:
            hashes.append(calc(h, pos))
        else:
            build(h - 1, pos * 2)
            if pos * 2 + 1 < _width(n, h - 1):
                build(h - 1, pos * 2 + 1)

    build(_tree_height(n), 0)
    flags = bytearray((len(bits) + 7) // 8)
    for p, bit in enumerate(bits):
        flags[p >> 3] |= bit << (p & 7)
    return PartialMerkleTree(n, tuple(hashes), bytes(flags))


def parse_merkleblock(b: bytes) -> tuple[Header, PartialMerkleTree]:
    """A gettxoutproof result (CMerkleBlock serialization): header + partial merkle tree, nothing after."""
    if len(b) < HEADER_SIZE:
        raise BadHeader(f"merkle block is {len(b)} bytes, shorter than a header")
    return parse_header(b[:HEADER_SIZE]), PartialMerkleTree.deserialize(b[HEADER_SIZE:])


def serialize_merkleblock(header: Header, pmt: PartialMerkleTree) -> bytes:
    return header.serialize() + pmt.serialize()


@dataclass(frozen=True, slots=True)
class TxInfo:
    txid: bytes  # internal order, from the non-witness serialization
    stripped_size: int
    tx: CTransaction = field(compare=False)

    @property
    def txid_hex(self) -> str:
        return self.txid[::-1].hex()


def parse_tx(raw_tx: bytes) -> TxInfo:
    """Deserialize a transaction (with or without witness) strictly; txid from the non-witness serialization."""
    try:
        tx = CTransaction.deserialize(bytes(raw_tx))
        again = tx.serialize()
    except (SerializationError, ValueError, struct.error, AssertionError) as e:
        raise MalformedTransaction(f"transaction does not deserialize: {e}") from None
    if again != bytes(raw_tx):
        raise MalformedTransaction("transaction is not in its canonical serialization")
    stripped = tx.serialize({"include_witness": False}) if tx.has_witness() else again
    return TxInfo(dsha256(stripped), len(stripped), tx)


def verify_tx_in_block(raw_tx: bytes, merkleblock: bytes,
                       expected_header: Optional[Header] = None) -> tuple[Header, int]:
    """Check that raw_tx is committed to by the merkle block's header; returns (header, tx index in the block).

    Order: the transaction (canonical, not 64 bytes without witness), the header (if expected_header is given),
    the partial merkle tree (Core's rules), its root against the header, the txid among the matches.
    """
    info = parse_tx(raw_tx)
    if info.stripped_size == 64:
        raise SixtyFourByteTx(f"transaction {info.txid_hex} is 64 bytes without witness: it could be an inner "
                              f"merkle node, refused")
    header, pmt = parse_merkleblock(merkleblock)
    if expected_header is not None and header.hash != expected_header.hash:
        raise MerkleHeaderMismatch(f"merkle block is for block {header.hash_hex}, expected "
                                   f"{expected_header.hash_hex}")
    root, matches = pmt.extract_matches()
    if root != header.merkle_root:
        raise MerkleRootMismatch(f"proof hashes to merkle root {root[::-1].hex()}, block {header.hash_hex} "
                                 f"commits to {header.merkle_root[::-1].hex()}")
    for index, txid in matches:
        if txid == info.txid:
            return header, index
    raise TxNotInProof(f"transaction {info.txid_hex} is not among the {len(matches)} matched transactions of the "
                       f"proof for block {header.hash_hex}")
