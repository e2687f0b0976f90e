"""Model registry payloads (docs/inference.md): a model recorded by the SHA-256 of its weights file, and a worker's
offer to serve one at a price per 1,000 input and output tokens.

Byte layouts (big-endian integers):
    ModelRegister  weights_sha256 32 | format u8 | context_length u32 | name (CompactSize + 1..64 bytes)
                   | version (CompactSize + 1..32 bytes)                                                   (40..135)
    ModelServe     model 32 (a registered weights_sha256) | context_length u32 | price_in_msat_per_1k u64
                   | price_out_msat_per_1k u64                                                                 (52)
    Completion     session_id 32 | worker 32 | model 32 | verifier 32 (all zero: none) | prompt_hash 32
                   | output_hash 32 | fingerprint 32 | n_prompt u32 | n_output u32 | cost_msat u64 | seed u64
                   | sampling u8 (0 greedy, 1 seeded) | temperature_milli u32 | worker_bp u16 | verifier_bp u16
                   | treasury_bp u16 | worker_sig 64 (zero when fingerprint is)                                (323)
    CompletionChallenge  completion_id 32 | k u8 (1..8) | k x (worker's leaf 36 | m u8 | m x proof hash 32
                   | challenger's top-4 ids u32 x 4 | quantised logits i32 x 4)
    CompletionReferee    completion_id 32 | k u8 (1..8) | k x (top-4 ids u32 x 4 | quantised logits i32 x 4)
The registrant is the transaction's sender: its BIP340 signature is the creator's signature over the record.

A completion's fingerprint is a Merkle root over its output positions: leaf i = H_FP_LEAF(i u32 | token u32 | the
top-4 token ids u32 each | their logits quantised, i32 each); a level's odd last node is promoted, never duplicated;
root = H_FP_ROOT(n u32 | the top node) (n = 0: no node). The worker signs H_RESULT(network id u8 | model | prompt_hash |
output_hash | fingerprint | n_prompt u32 | n_output u32 | sampling u8 | seed u64 | temperature_milli u32).
"""
from __future__ import annotations

import enum
import hashlib
import re
import struct
from dataclasses import dataclass
from typing import ClassVar, Mapping

from coincurve import PrivateKey

from .codec import U32, Reader, write_bytes
from .errors import OutOfRange
from .hashing import H_DRAW, H_FP_LEAF, H_FP_NODE, H_FP_ROOT, H_RESULT
from .params import MAX_MONEY
from .payload import TxType

MAX_MODEL_NAME = 64
MAX_MODEL_VERSION = 32
MAX_CONTEXT = 1 << 24
MAX_TOKEN_PRICE_MSAT = MAX_MONEY * 1000
_NAME = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]*")
_REGISTER = struct.Struct(">32sBI")
_SERVE = struct.Struct(">32sIQQ")
_COMPLETION = struct.Struct(">32s32s32s32s32s32s32sIIQQBIHHH64s")
_RESULT = struct.Struct(">B32s32s32s32sIIBQI")
FP_TOP_K = 4
FP_LEAF = struct.Struct(">I4I4i")  # token | top-4 ids | their quantised logits (36 bytes)
_TOPS = struct.Struct(">4I4i")  # a re-execution's top-4 ids and quantised logits (32 bytes)
REVEAL = 8  # positions an audit reveals (all of them when the output is shorter)
TOLERANCE = 2  # quanta (1/16 of a logit) by which hardware may move a logit: the audit's tolerance
CHALLENGE_WINDOW = 40  # blocks after its recording in which a completion can be challenged
REFEREE_WINDOW = 40  # blocks after a challenge in which a referee decides it (both within a worker's exit delay)
COMPLETION_SLASH_SAT = 10_000  # what the side a referee shows wrong loses of its stake (at most all of it)
MAX_PROOF = 32  # siblings in a fingerprint proof (2^32 positions)
ZERO32 = b"\0" * 32
BP = 10_000  # basis points: the fee split's shares are out of BP, the burn takes what they leave
DEFAULT_SPLIT = (5_000, 0, 1_000)  # worker, verifier, treasury: 50 %, 0 %, 10 %; burned: 40 %
MAX_TEMPERATURE_MILLI = 100_000


class ModelFormat(enum.IntEnum):
    GGUF = 1
    SAFETENSORS = 2


def _b32(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != 32 or value == b"\0" * 32:
        raise OutOfRange(f"{what} must be 32 bytes, not all zero")


def _label(value: bytes, limit: int, what: str) -> None:
    if not isinstance(value, bytes) or not 0 < len(value) <= limit or not _NAME.fullmatch(value):
        raise OutOfRange(f"{what} {value!r} must be 1..{limit} bytes of [A-Za-z0-9._-], starting alphanumeric")


def _context(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_CONTEXT:
        raise OutOfRange(f"context length {value!r} is outside 1..{MAX_CONTEXT}")


@dataclass(frozen=True, slots=True)
class ModelRegister:
    """Record a model: the SHA-256 of its weights file (its identity: content addressing), its format, context
    length, name and version."""

    TYPE: ClassVar[TxType] = TxType.MODEL_REGISTER
    FEELESS: ClassVar[bool] = False
    weights_sha256: bytes
    format: int
    context_length: int
    name: bytes
    version: bytes

    def __post_init__(self) -> None:
        _b32(self.weights_sha256, "model weights hash")
        if self.format not in tuple(ModelFormat):
            raise OutOfRange(f"model format {self.format!r} is not one of {[int(f) for f in ModelFormat]}")
        _context(self.context_length)
        _label(self.name, MAX_MODEL_NAME, "model name")
        _label(self.version, MAX_MODEL_VERSION, "model version")

    def encode(self) -> bytes:
        return (_REGISTER.pack(self.weights_sha256, self.format, self.context_length) + write_bytes(self.name)
                + write_bytes(self.version))

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "ModelRegister":
        r = Reader(b, "model register payload")
        h, fmt, ctx = _REGISTER.unpack(r.take(_REGISTER.size))
        name = r.var_bytes(MAX_MODEL_NAME)
        version = r.var_bytes(MAX_MODEL_VERSION)
        r.end()
        return cls(h, fmt, ctx, name, version)


@dataclass(frozen=True, slots=True)
class ModelServe:
    """A registered worker (the sender) serves a registered model up to context_length tokens, at these prices per
    1,000 input and output tokens; a later ModelServe of the same model replaces the offer."""

    TYPE: ClassVar[TxType] = TxType.MODEL_SERVE
    FEELESS: ClassVar[bool] = False
    model: bytes
    context_length: int
    price_in_msat_per_1k: int
    price_out_msat_per_1k: int

    def __post_init__(self) -> None:
        _b32(self.model, "served model")
        _context(self.context_length)
        for what, v in (("input", self.price_in_msat_per_1k), ("output", self.price_out_msat_per_1k)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKEN_PRICE_MSAT:
                raise OutOfRange(f"{what} token price {v!r} is outside 0..{MAX_TOKEN_PRICE_MSAT} msat per 1k")

    def encode(self) -> bytes:
        return _SERVE.pack(self.model, self.context_length, self.price_in_msat_per_1k, self.price_out_msat_per_1k)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "ModelServe":
        r = Reader(b, "model serve payload")
        v = _SERVE.unpack(r.take(_SERVE.size))
        r.end()
        return cls(v[0], v[1], v[2], v[3])


class Sampling(enum.IntEnum):
    GREEDY = 0
    SEEDED = 1


@dataclass(frozen=True, slots=True)
class Completion:
    """A gateway (the sender: the paid session's server) records one completion and bills it to the session: the
    worker that produced it at the worker's offered prices, cost_msat = ceil((n_prompt x price_in + n_output x
    price_out) / 1000), and the hashes an audit re-executes against (prompt and output token ids, the worker's
    fingerprint). The session is charged in msat, cumulatively; the whole satoshis that crosses are split between
    the worker, the verifier and the treasury (the gateway) by the basis points given, the rest burned."""

    TYPE: ClassVar[TxType] = TxType.COMPLETION
    FEELESS: ClassVar[bool] = False
    session_id: bytes
    worker: bytes
    model: bytes
    verifier: bytes
    prompt_hash: bytes
    output_hash: bytes
    fingerprint: bytes
    n_prompt: int
    n_output: int
    cost_msat: int
    seed: int
    sampling: int
    temperature_milli: int
    worker_bp: int
    verifier_bp: int
    treasury_bp: int
    worker_sig: bytes

    def __post_init__(self) -> None:
        for what in ("session_id", "worker", "model"):
            _b32(getattr(self, what), f"completion {what}")
        for what in ("verifier", "prompt_hash", "output_hash", "fingerprint"):
            v = getattr(self, what)
            if not isinstance(v, bytes) or len(v) != 32:
                raise OutOfRange(f"completion {what} must be 32 bytes")
        for what, bits in (("n_prompt", 32), ("n_output", 32), ("cost_msat", 64), ("seed", 64),
                           ("temperature_milli", 32), ("worker_bp", 16), ("verifier_bp", 16), ("treasury_bp", 16)):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << bits:
                raise OutOfRange(f"completion {what} {v!r} is outside u{bits}")
        if self.n_prompt == 0:
            raise OutOfRange("a completion has at least one prompt token")
        if self.sampling not in tuple(Sampling):
            raise OutOfRange(f"completion sampling {self.sampling!r} is not 0 (greedy) or 1 (seeded)")
        if self.sampling == Sampling.GREEDY and (self.seed or self.temperature_milli):
            raise OutOfRange("a greedy completion has no seed and no temperature")
        if self.sampling == Sampling.SEEDED and not 0 < self.temperature_milli <= MAX_TEMPERATURE_MILLI:
            raise OutOfRange(f"completion temperature {self.temperature_milli} milli is outside "
                             f"1..{MAX_TEMPERATURE_MILLI}")
        if self.worker_bp + self.verifier_bp + self.treasury_bp > BP:
            raise OutOfRange(f"fee split {self.worker_bp} + {self.verifier_bp} + {self.treasury_bp} bp exceeds {BP}")
        if (self.verifier_bp > 0) != (self.verifier != b"\0" * 32):
            raise OutOfRange("a verifier share needs a verifier key, and a verifier key a share")
        if not isinstance(self.worker_sig, bytes) or len(self.worker_sig) != 64:
            raise OutOfRange("completion worker_sig must be 64 bytes")
        if (self.fingerprint == ZERO32) != (self.worker_sig == b"\0" * 64):
            raise OutOfRange("a fingerprint comes with the worker's signature, and no fingerprint without one")

    def result_digest(self, network_id: int) -> bytes:
        """What the worker signed (result_digest below)."""
        return result_digest(network_id, self.model, self.prompt_hash, self.output_hash, self.fingerprint,
                             self.n_prompt, self.n_output, self.sampling, self.seed, self.temperature_milli)

    @property
    def split(self) -> tuple[int, int, int]:
        return self.worker_bp, self.verifier_bp, self.treasury_bp

    def encode(self) -> bytes:
        return _COMPLETION.pack(self.session_id, self.worker, self.model, self.verifier, self.prompt_hash,
                                self.output_hash, self.fingerprint, self.n_prompt, self.n_output, self.cost_msat,
                                self.seed, self.sampling, self.temperature_milli, self.worker_bp, self.verifier_bp,
                                self.treasury_bp, self.worker_sig)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "Completion":
        r = Reader(b, "completion payload")
        v = _COMPLETION.unpack(r.take(_COMPLETION.size))
        r.end()
        return cls(*v)


def token_cost_msat(n_prompt: int, n_output: int, price_in_msat_per_1k: int, price_out_msat_per_1k: int) -> int:
    """What n_prompt input and n_output output tokens cost at these prices per 1,000 tokens, in msat rounded up."""
    return -(-(n_prompt * price_in_msat_per_1k + n_output * price_out_msat_per_1k) // 1000)


def split_sat(amount_sat: int, worker_bp: int, verifier_bp: int, treasury_bp: int) -> tuple[int, int, int, int]:
    """amount_sat shared out (worker, verifier, treasury, burned): each share rounded down, the burn takes the rest,
    so the four sum to amount_sat exactly."""
    w, v, t = (amount_sat * bp // BP for bp in (worker_bp, verifier_bp, treasury_bp))
    return w, v, t, amount_sat - w - v - t


def result_digest(network_id: int, model: bytes, prompt_hash: bytes, output_hash: bytes, fingerprint: bytes,
                  n_prompt: int, n_output: int, sampling: int, seed: int, temperature_milli: int) -> bytes:
    """The 32-byte digest a worker signs for a result it produced (its fingerprint binds it to every position)."""
    return H_RESULT(_RESULT.pack(network_id, model, prompt_hash, output_hash, fingerprint, n_prompt, n_output,
                                 sampling, seed, temperature_milli))


def sign_result(secret: bytes, network_id: int, model: bytes, prompt_hash: bytes, output_hash: bytes,
                fingerprint: bytes, n_prompt: int, n_output: int, sampling: int, seed: int, temperature_milli: int,
                aux: bytes = ZERO32) -> bytes:
    """The worker's BIP340 signature of its result (what Completion.worker_sig holds)."""
    return bytes(PrivateKey(secret).sign_schnorr(result_digest(network_id, model, prompt_hash, output_hash, fingerprint,
                                                               n_prompt, n_output, sampling, seed, temperature_milli),
                                                 aux))


def fp_leaf(token: int, ids: tuple[int, ...], logits: tuple[int, ...]) -> bytes:
    """One output position's leaf: its token, the top-4 ids (best first) and their quantised logits."""
    if len(ids) != FP_TOP_K or len(logits) != FP_TOP_K:
        raise OutOfRange(f"a fingerprint position has {FP_TOP_K} ids and {FP_TOP_K} logits")
    try:
        return FP_LEAF.pack(token, *ids, *logits)
    except struct.error as e:
        raise OutOfRange(f"fingerprint position out of range: {e}") from None


def _fp_levels(leaves: list[bytes]) -> list[list[bytes]]:
    level = [H_FP_LEAF(U32.pack(i) + leaf) for i, leaf in enumerate(leaves)]
    levels = [level]
    while len(level) > 1:
        nxt = [H_FP_NODE(level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def fp_root(leaves: list[bytes]) -> bytes:
    """The fingerprint: the Merkle root over the output positions' leaves (fp_leaf), the count committed."""
    return H_FP_ROOT(U32.pack(len(leaves)) + (_fp_levels(leaves)[-1][0] if leaves else b""))


def fp_proof(leaves: list[bytes], pos: int) -> list[bytes]:
    """The siblings from position pos's leaf to the top (a promoted node has none at its level)."""
    out = []
    for level in _fp_levels(leaves)[:-1]:
        if pos ^ 1 < len(level):
            out.append(level[pos ^ 1])
        pos //= 2
    return out


def fp_verify(root: bytes, n: int, pos: int, leaf: bytes, proof: list[bytes]) -> bool:
    """Whether leaf is position pos of n under the fingerprint root."""
    if not 0 <= pos < n:
        return False
    h, size, i = H_FP_LEAF(U32.pack(pos) + leaf), n, 0
    while size > 1:
        if pos ^ 1 < size:
            if i == len(proof):
                return False
            h = H_FP_NODE(proof[i] + h) if pos & 1 else H_FP_NODE(h + proof[i])
            i += 1
        pos, size = pos // 2, (size + 1) // 2
    return i == len(proof) and H_FP_ROOT(U32.pack(n) + h) == root


@dataclass(frozen=True, slots=True)
class TopK:
    """One output position as a model saw it: the top-4 token ids (best first) and their logits quantised."""

    ids: tuple[int, ...]
    logits: tuple[int, ...]

    def encode(self) -> bytes:
        if len(self.ids) != FP_TOP_K or len(self.logits) != FP_TOP_K:
            raise OutOfRange(f"a top-K has {FP_TOP_K} ids and {FP_TOP_K} logits")
        try:
            return _TOPS.pack(*self.ids, *self.logits)
        except struct.error as e:
            raise OutOfRange(f"top-K out of range: {e}") from None

    @classmethod
    def decode(cls, b: bytes) -> "TopK":
        v = _TOPS.unpack(b)
        return cls(tuple(v[:FP_TOP_K]), tuple(v[FP_TOP_K:]))


def leaf_parts(leaf: bytes) -> tuple[int, TopK]:
    """A fingerprint leaf's token and top-K."""
    v = FP_LEAF.unpack(leaf)
    return v[0], TopK(tuple(v[1:1 + FP_TOP_K]), tuple(v[1 + FP_TOP_K:]))


class Mismatch(ValueError):
    """A result does not re-execute to what it claims."""


def check_revealed(tokens: Mapping[int, int], revealed: Mapping[int, TopK], reference: Mapping[int, TopK],
                   greedy: bool) -> None:
    """The audit rule, off the ledger and on it: at each revealed position, the claimed top-K has the reference's
    ids, every quantised logit within TOLERANCE of its own, and (greedy) the output token there is the reference's
    top-1. Mismatch names the first position that fails."""
    for pos, claimed in sorted(revealed.items()):
        if pos not in tokens or pos not in reference:
            raise Mismatch(f"position {pos} is outside the output")
        ref = reference[pos]
        if claimed.ids != ref.ids:
            raise Mismatch(f"position {pos}: top-{FP_TOP_K} ids {claimed.ids}, re-execution gives {ref.ids}")
        worst = max(abs(a - b) for a, b in zip(claimed.logits, ref.logits))
        if worst > TOLERANCE:
            raise Mismatch(f"position {pos}: a logit is {worst} quanta away from re-execution (tolerance "
                           f"{TOLERANCE})")
        if greedy and tokens[pos] != ref.ids[0]:
            raise Mismatch(f"position {pos}: token {tokens[pos]} is not the greedy choice {ref.ids[0]}")


def agrees(tokens: Mapping[int, int], revealed: Mapping[int, TopK], reference: Mapping[int, TopK],
           greedy: bool) -> bool:
    try:
        check_revealed(tokens, revealed, reference, greedy)
    except Mismatch:
        return False
    return True


def draw_seed(completion_id: bytes, parent_hash: bytes) -> bytes:
    """A recorded completion's audit seed: its id and the hash of the block its recording was built on, neither
    known to the worker when it committed to the result."""
    return H_DRAW(completion_id + parent_hash)


def reveal_positions(seed: bytes, n_output: int, count: int = REVEAL) -> list[int]:
    """The output positions an audit reveals: `count` distinct positions in 0..n_output-1 drawn from
    SHA-256("l2d/inference/reveal" ‖ seed ‖ i u32) (all of them when fewer), ascending."""
    if n_output <= count:
        return list(range(n_output))
    picked: set[int] = set()
    i = 0
    while len(picked) < count:
        d = hashlib.sha256(b"l2d/inference/reveal" + seed + i.to_bytes(4, "big")).digest()
        picked.add(int.from_bytes(d[:8], "big") % n_output)
        i += 1
    return sorted(picked)


def audit_drawn(seed: bytes, share_bp: int) -> bool:
    """Whether a recorded completion is drawn for audit at share_bp basis points: SHA-256("l2d/inference/audit" ‖
    seed), first 8 bytes big-endian, mod 10,000."""
    d = hashlib.sha256(b"l2d/inference/audit" + seed).digest()
    return int.from_bytes(d[:8], "big") % BP < share_bp


def _tops_list(r: Reader, k: int) -> tuple[TopK, ...]:
    return tuple(TopK.decode(r.take(_TOPS.size)) for _ in range(k))


def _check_tops(tops: tuple[TopK, ...], what: str) -> None:
    if not 1 <= len(tops) <= REVEAL:
        raise OutOfRange(f"{what}: 1..{REVEAL} positions, not {len(tops)}")
    for t in tops:
        if not isinstance(t, TopK):
            raise OutOfRange(f"{what}: a position is not a TopK")
        t.encode()


@dataclass(frozen=True, slots=True)
class CompletionChallenge:
    """A worker that re-executed a recorded completion disputes it (the sender: an ACTIVE worker offering the model,
    not the completion's): at each position drawn from the completion's seed, the worker's committed leaf with its
    proof against the recorded fingerprint, and the challenger's own top-K. The ledger checks the proofs and that
    the two disagree by the audit rule; a referee decides."""

    TYPE: ClassVar[TxType] = TxType.COMPLETION_CHALLENGE
    FEELESS: ClassVar[bool] = False
    completion_id: bytes
    leaves: tuple[bytes, ...]
    proofs: tuple[tuple[bytes, ...], ...]
    tops: tuple[TopK, ...]

    def __post_init__(self) -> None:
        _b32(self.completion_id, "challenged completion id")
        _check_tops(self.tops, "challenge")
        if len(self.leaves) != len(self.tops) or len(self.proofs) != len(self.tops):
            raise OutOfRange("a challenge has one leaf, proof and top-K per position")
        for leaf, proof in zip(self.leaves, self.proofs):
            if not isinstance(leaf, bytes) or len(leaf) != FP_LEAF.size:
                raise OutOfRange(f"a fingerprint leaf is {FP_LEAF.size} bytes")
            if len(proof) > MAX_PROOF or not all(isinstance(x, bytes) and len(x) == 32 for x in proof):
                raise OutOfRange(f"a fingerprint proof is at most {MAX_PROOF} hashes of 32 bytes")

    def encode(self) -> bytes:
        out = bytearray(self.completion_id + bytes((len(self.tops),)))
        for leaf, proof, top in zip(self.leaves, self.proofs, self.tops):
            out += leaf + bytes((len(proof),)) + b"".join(proof) + top.encode()
        return bytes(out)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "CompletionChallenge":
        r = Reader(b, "completion challenge payload")
        cid = r.take(32)
        leaves, proofs, tops = [], [], []
        for _ in range(r.u8()):
            leaves.append(r.take(FP_LEAF.size))
            proofs.append(tuple(r.take(32) for _ in range(r.u8())))
            tops.append(TopK.decode(r.take(_TOPS.size)))
        r.end()
        return cls(cid, tuple(leaves), tuple(proofs), tuple(tops))


@dataclass(frozen=True, slots=True)
class CompletionReferee:
    """A third worker's re-execution of a challenged completion (its top-K at the drawn positions): the ledger
    slashes the side it shows wrong while it agrees with the other."""

    TYPE: ClassVar[TxType] = TxType.COMPLETION_REFEREE
    FEELESS: ClassVar[bool] = False
    completion_id: bytes
    tops: tuple[TopK, ...]

    def __post_init__(self) -> None:
        _b32(self.completion_id, "refereed completion id")
        _check_tops(self.tops, "referee")

    def encode(self) -> bytes:
        return self.completion_id + bytes((len(self.tops),)) + b"".join(t.encode() for t in self.tops)

    def debit_sat(self) -> int:
        return 0

    @classmethod
    def decode(cls, b: bytes) -> "CompletionReferee":
        r = Reader(b, "completion referee payload")
        cid = r.take(32)
        tops = _tops_list(r, r.u8())
        r.end()
        return cls(cid, tops)
