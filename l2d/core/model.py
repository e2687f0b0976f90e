"""Model registry state transitions (docs/inference.md): models by content hash, and the workers' offers to serve
them.

State values (canonical, big-endian):
  model_key(weights_sha256)   = 0x10 || weights_sha256          -> ModelRecord
  offer_key(model, worker)    = 0x11 || H("l2d/model/offer", model || worker) -> OfferRecord (88 bytes)
  completion_key(id)          = 0x12 || completion id (the recording txid) -> CompletionRecord (436 bytes)
  servers_key(model)          = 0x14 || weights_sha256 -> n u16 | n x worker key 32 (the workers that offered it, in
                                order of their first offer: the pool its referees are drawn from)
  challenge_key(id)           = 0x13 || completion id -> ChallengeRecord (a dispute of it, its referee, its verdict)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Optional

from .codec import Reader, write_bytes

from .errors import DecodeError, DuplicateDuty, InvalidTransaction, Unauthorized
from .hashing import tagged_hash
from .model_tx import (CHALLENGE_WINDOW, COMPLETION_SLASH_SAT, FP_LEAF, MAX_MODEL_NAME, MAX_MODEL_VERSION,
                       REFEREE_WINDOW, Completion, CompletionChallenge, CompletionReferee, ModelFormat, ModelRegister,
                       ModelServe, TopK, agrees, draw_seed, fp_verify, leaf_parts, reveal_positions, split_sat,
                       token_cost_msat)
from .session import ReceiptOverEscrow, SessionExpired, open_session, session_key
from .session_tx import MSAT
from .state import Namespace, Rules, StateView, add_locked, charge_sender
from .tx import Transaction, xonly_key
from .work import WorkerRecord, WorkerStatus, burn_supply, check_credits, credit_all, get_worker, rep_up, worker_key
from .work_tx import PPM

_M = bytes((Namespace.MODEL,))
_O = bytes((Namespace.MODEL_OFFER,))
_MODEL_HEAD = struct.Struct(">32sBIQ")
_OFFER = struct.Struct(">32s32sIQQQ")
_C = bytes((Namespace.COMPLETION,))
_COMPLETION_HEAD = struct.Struct(">BQ32s32sQQQQQ")
_X = bytes((Namespace.COMPLETION_CHALLENGE,))
_CHALLENGE_HEAD = struct.Struct(">B32sQ32sQB")


def model_key(weights_sha256: bytes) -> bytes:
    return _M + weights_sha256


def offer_key(model: bytes, worker: bytes) -> bytes:
    return _O + tagged_hash("l2d/model/offer", model + worker)


def servers_key(model: bytes) -> bytes:
    return bytes((Namespace.MODEL_SERVERS,)) + model


MAX_SERVERS = 1024  # workers a model's referee pool holds


def get_servers(view: StateView, model: bytes) -> list[bytes]:
    raw = view.get(servers_key(model))
    if raw is None:
        return []
    n = int.from_bytes(raw[:2], "big")
    if len(raw) != 2 + 32 * n:
        raise DecodeError(f"servers record of {len(raw)} bytes for {n} workers")
    return [raw[2 + 32 * i:34 + 32 * i] for i in range(n)]


def completion_key(completion_id: bytes) -> bytes:
    return _C + completion_id


def challenge_key(completion_id: bytes) -> bytes:
    return _X + completion_id


class CompletionStatus(IntEnum):
    RECORDED = 1  # billed and paid out; open to audit
    CHALLENGED = 2  # a worker's re-execution disagrees: waiting for a referee
    WORKER_SLASHED = 3  # the referee agreed with the challenger
    CHALLENGER_SLASHED = 4  # the referee agreed with the worker


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """Value under model_key: registrant 32 | format u8 | context_length u32 | height u64 | name | version."""

    registrant: bytes
    format: ModelFormat
    context_length: int
    height: int
    name: bytes
    version: bytes

    def encode(self) -> bytes:
        return (_MODEL_HEAD.pack(self.registrant, self.format, self.context_length, self.height)
                + write_bytes(self.name) + write_bytes(self.version))

    @classmethod
    def decode(cls, b: bytes) -> "ModelRecord":
        r = Reader(b, "model record")
        reg, fmt, ctx, height = _MODEL_HEAD.unpack(r.take(_MODEL_HEAD.size))
        name = r.var_bytes(MAX_MODEL_NAME)
        version = r.var_bytes(MAX_MODEL_VERSION)
        r.end()
        if fmt not in tuple(ModelFormat):
            raise DecodeError(f"model record format {fmt}")
        return cls(reg, ModelFormat(fmt), ctx, height, name, version)


@dataclass(frozen=True, slots=True)
class OfferRecord:
    """Value under offer_key: worker 32 | model 32 | context_length u32 | price_in u64 | price_out u64 (msat per 1k
    tokens) | height u64."""

    worker: bytes
    model: bytes
    context_length: int
    price_in_msat_per_1k: int
    price_out_msat_per_1k: int
    height: int

    def encode(self) -> bytes:
        return _OFFER.pack(self.worker, self.model, self.context_length, self.price_in_msat_per_1k,
                           self.price_out_msat_per_1k, self.height)

    @classmethod
    def decode(cls, b: bytes) -> "OfferRecord":
        if len(b) != _OFFER.size:
            raise DecodeError(f"model offer record of {len(b)} bytes, expected {_OFFER.size}")
        w, m, ctx, pin, pout, height = _OFFER.unpack(b)
        return cls(w, m, ctx, pin, pout, height)


def get_model(view: StateView, weights_sha256: bytes) -> Optional[ModelRecord]:
    raw = view.get(model_key(weights_sha256))
    return None if raw is None else ModelRecord.decode(raw)


def apply_register(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, ModelRegister)
    old = get_model(view, p.weights_sha256)
    if old is not None:
        raise InvalidTransaction(f"model {p.weights_sha256.hex()} is registered already, as "
                                 f"{old.name.decode()} {old.version.decode()} by {old.registrant.hex()}")
    charge_sender(view, tx, rules, 0)
    view.put(model_key(p.weights_sha256), ModelRecord(tx.sender, ModelFormat(p.format), p.context_length,
                                                      view.height, p.name, p.version).encode())


def apply_serve(view: StateView, tx: Transaction, rules: Rules) -> None:
    p = tx.payload
    assert isinstance(p, ModelServe)
    _active_worker(view, tx.sender, "sender")
    m = get_model(view, p.model)
    if m is None:
        raise InvalidTransaction(f"model {p.model.hex()} is not registered")
    if p.context_length > m.context_length:
        raise InvalidTransaction(f"context length {p.context_length} exceeds the model's {m.context_length}")
    servers = get_servers(view, p.model)
    if tx.sender not in servers and len(servers) >= MAX_SERVERS:
        raise InvalidTransaction(f"model {p.model.hex()} has {MAX_SERVERS} workers already")
    charge_sender(view, tx, rules, 0)
    if tx.sender not in servers:
        servers.append(tx.sender)
        view.put(servers_key(p.model), len(servers).to_bytes(2, "big") + b"".join(servers))
    view.put(offer_key(p.model, tx.sender), OfferRecord(tx.sender, p.model, p.context_length, p.price_in_msat_per_1k,
                                                        p.price_out_msat_per_1k, view.height).encode())


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """Value under completion_key: status u8 | height u64 | gateway 32 | draw_seed 32 (draw_seed(id, the parent
    block's hash): its audit draw) | units_after u64 (the session's billed msat after it) | worker_sat u64 |
    verifier_sat u64 | treasury_sat u64 | burned_sat u64 (what its recording paid out) | the Completion payload (323
    bytes)."""

    status: CompletionStatus
    height: int
    gateway: bytes
    draw_seed: bytes
    units_after: int
    worker_sat: int
    verifier_sat: int
    treasury_sat: int
    burned_sat: int
    completion: Completion

    SIZE = _COMPLETION_HEAD.size + 323

    def encode(self) -> bytes:
        return _COMPLETION_HEAD.pack(self.status, self.height, self.gateway, self.draw_seed, self.units_after,
                                     self.worker_sat, self.verifier_sat, self.treasury_sat,
                                     self.burned_sat) + self.completion.encode()

    @classmethod
    def decode(cls, b: bytes) -> "CompletionRecord":
        if len(b) != cls.SIZE:
            raise DecodeError(f"completion record of {len(b)} bytes, expected {cls.SIZE}")
        status, height, gateway, seed, units, worker, verifier, treasury, burned = _COMPLETION_HEAD.unpack(
            b[:_COMPLETION_HEAD.size])
        if status not in tuple(CompletionStatus):
            raise DecodeError(f"completion record status {status}")
        return cls(CompletionStatus(status), height, gateway, seed, units, worker, verifier, treasury, burned,
                   Completion.decode(b[_COMPLETION_HEAD.size:]))

    def positions(self) -> list[int]:
        """The output positions its audit reveals."""
        return reveal_positions(self.draw_seed, self.completion.n_output)


class Loser(IntEnum):
    NONE = 0
    WORKER = 1
    CHALLENGER = 2


@dataclass(frozen=True, slots=True)
class ChallengeRecord:
    """Value under challenge_key: loser u8 (0 until decided) | challenger 32 | height u64 | referee 32 (drawn by the
    ledger when the challenge is applied) | slash_sat u64 | k u8 | k x the worker's leaf (36) | k x the
    challenger's top-4 (32)."""

    loser: Loser
    challenger: bytes
    height: int
    referee: bytes
    slash_sat: int
    leaves: tuple[bytes, ...]
    tops: tuple[TopK, ...]

    def encode(self) -> bytes:
        head = _CHALLENGE_HEAD.pack(self.loser, self.challenger, self.height, self.referee, self.slash_sat,
                                    len(self.leaves))
        return head + b"".join(self.leaves) + b"".join(t.encode() for t in self.tops)

    @classmethod
    def decode(cls, b: bytes) -> "ChallengeRecord":
        r = Reader(b, "challenge record")
        loser, challenger, height, referee, slash, k = _CHALLENGE_HEAD.unpack(r.take(_CHALLENGE_HEAD.size))
        if loser not in tuple(Loser):
            raise DecodeError(f"challenge record loser {loser}")
        leaves = tuple(r.take(FP_LEAF.size) for _ in range(k))
        tops = tuple(TopK.decode(r.take(32)) for _ in range(k))
        r.end()
        return cls(Loser(loser), challenger, height, referee, slash, leaves, tops)

    def claims(self, positions: list[int]) -> tuple[dict[int, int], dict[int, TopK], dict[int, TopK]]:
        """(the worker's tokens, the worker's top-K, the challenger's top-K) by position."""
        parts = [leaf_parts(leaf) for leaf in self.leaves]
        return ({p: t for p, (t, _) in zip(positions, parts)}, {p: k for p, (_, k) in zip(positions, parts)},
                dict(zip(positions, self.tops)))


def get_challenge(view: StateView, completion_id: bytes) -> Optional[ChallengeRecord]:
    raw = view.get(challenge_key(completion_id))
    return None if raw is None else ChallengeRecord.decode(raw)


class BadResultSignature(InvalidTransaction):
    """A completion's fingerprint is not signed by the worker it names."""

    reason = "bad-result-signature"


def get_completion(view: StateView, completion_id: bytes) -> Optional[CompletionRecord]:
    raw = view.get(completion_key(completion_id))
    return None if raw is None else CompletionRecord.decode(raw)


def apply_completion(view: StateView, tx: Transaction, rules: Rules) -> None:
    """Bill a completion to its paid session (the sender is the session's server) and pay the split out."""
    p = tx.payload
    assert isinstance(p, Completion)
    rec = open_session(view, p.session_id)
    if tx.sender != rec.server:
        raise Unauthorized(f"only the session's server {rec.server.hex()} bills completions to it")
    if view.height > rec.expiry_height:
        raise SessionExpired(f"the session expired at L2 height {rec.expiry_height}; this is {view.height}")
    if (rec.price_msat, rec.unit) != (1, 1):
        raise InvalidTransaction(f"completions bill msat: the session must be opened at 1 msat per unit, not "
                                 f"{rec.price_msat} msat per {rec.unit}")
    raw = view.get(offer_key(p.model, p.worker))
    if raw is None:
        raise InvalidTransaction(f"worker {p.worker.hex()} offers no model {p.model.hex()}")
    offer = OfferRecord.decode(raw)
    w_rec = get_worker(view, p.worker)
    if w_rec is None or w_rec.status != WorkerStatus.ACTIVE:  # an exiting worker's stake must outlast the disputes
        raise InvalidTransaction(f"worker {p.worker.hex()} is not active")
    if p.fingerprint != bytes(32) and not xonly_key(p.worker).verify(p.worker_sig, p.result_digest(rules.network.id)):
        raise BadResultSignature(f"the result is not signed by worker {p.worker.hex()}")
    if p.n_prompt + p.n_output > offer.context_length:
        raise InvalidTransaction(f"{p.n_prompt} + {p.n_output} tokens exceed the offer's context length "
                                 f"{offer.context_length}")
    cost = token_cost_msat(p.n_prompt, p.n_output, offer.price_in_msat_per_1k, offer.price_out_msat_per_1k)
    if p.cost_msat != cost:
        raise InvalidTransaction(f"cost {p.cost_msat} msat, the offer's prices make it {cost} msat")
    units = rec.units + cost
    settled = units // MSAT
    if settled > rec.deposit_sat:
        raise ReceiptOverEscrow(f"billing {cost} msat brings the session to {units} msat; its deposit is "
                                f"{rec.deposit_sat} sat")
    if get_completion(view, tx.txid) is not None:  # unreachable while txids are unique; kept as the invariant
        raise InvalidTransaction(f"completion {tx.txid.hex()} is recorded already")
    w, v, t, burned = split_sat(settled - rec.settled_sat, *p.split)
    payouts = [(p.worker, w), (p.verifier, v), (tx.sender, t)]
    check_credits(view, payouts)
    charge_sender(view, tx, rules, 0)
    add_locked(view, rec.settled_sat - settled)
    credit_all(view, payouts)
    burn_supply(view, burned)
    view.put(session_key(p.session_id), replace(rec, seq=rec.seq + 1, settled_sat=settled, units=units,
                                                receipt_id=tx.txid).encode())
    view.put(completion_key(tx.txid), CompletionRecord(CompletionStatus.RECORDED, view.height, tx.sender,
                                                       draw_seed(tx.txid, view.parent_hash), units, w, v, t, burned,
                                                       p).encode())


def _active_worker(view: StateView, pk: bytes, role: str) -> WorkerRecord:
    w = get_worker(view, pk)
    if w is None or w.status != WorkerStatus.ACTIVE:
        raise InvalidTransaction(f"the {role} {pk.hex()} is not an active worker")
    return w


def _serving_worker(view: StateView, pk: bytes, model: bytes, role: str) -> WorkerRecord:
    """An ACTIVE worker that offers the model: only such a worker re-executes it for a dispute."""
    w = _active_worker(view, pk, role)
    if view.get(offer_key(model, pk)) is None:
        raise InvalidTransaction(f"the {role} {pk.hex()} does not serve model {model.hex()}")
    return w


def _need_completion(view: StateView, completion_id: bytes) -> CompletionRecord:
    rec = get_completion(view, completion_id)
    if rec is None:
        raise InvalidTransaction(f"no completion {completion_id.hex()}")
    return rec


def apply_challenge(view: StateView, tx: Transaction, rules: Rules) -> None:
    """A worker disputes a recorded completion: the worker's leaves at the drawn positions must prove against its
    fingerprint, and the challenger's top-K disagree with them by the audit rule."""
    p = tx.payload
    assert isinstance(p, CompletionChallenge)
    rec = _need_completion(view, p.completion_id)
    c = rec.completion
    if rec.status != CompletionStatus.RECORDED:
        raise DuplicateDuty(f"completion {p.completion_id.hex()} is {rec.status.name} already")
    if c.fingerprint == bytes(32):
        raise InvalidTransaction("the completion was cut short: it has no fingerprint to dispute")
    if view.height > rec.height + CHALLENGE_WINDOW:
        raise InvalidTransaction(f"the challenge window closed at height {rec.height + CHALLENGE_WINDOW}")
    if tx.sender == c.worker:
        raise InvalidTransaction("a worker does not challenge its own result")
    _serving_worker(view, tx.sender, c.model, "challenger")
    positions = rec.positions()
    if len(p.leaves) != len(positions):
        raise InvalidTransaction(f"the audit reveals {len(positions)} positions, the challenge {len(p.leaves)}")
    for pos, leaf, proof in zip(positions, p.leaves, p.proofs):
        if not fp_verify(c.fingerprint, c.n_output, pos, leaf, list(proof)):
            raise InvalidTransaction(f"position {pos}: the leaf is not the one the worker committed to")
    ch = ChallengeRecord(Loser.NONE, tx.sender, view.height, bytes(32), 0, p.leaves, p.tops)
    tokens, worker_tops, mine = ch.claims(positions)
    if agrees(tokens, worker_tops, mine, c.sampling == 0):
        raise InvalidTransaction("the challenger's re-execution agrees with the worker's result: nothing to dispute")
    ch = replace(ch, referee=draw_referee(view, c.model, p.completion_id, (c.worker, tx.sender)))
    charge_sender(view, tx, rules, 0)
    view.put(challenge_key(p.completion_id), ch.encode())
    view.put(completion_key(p.completion_id), replace(rec, status=CompletionStatus.CHALLENGED).encode())


def draw_referee(view: StateView, model: bytes, completion_id: bytes, parties: tuple[bytes, ...]) -> bytes:
    """The referee of a challenge, drawn by the ledger (neither side chooses it): from the model's workers, starting
    at H("l2d/inference/referee", completion id ‖ parent block hash) mod their count, the first that is ACTIVE, still
    offers the model, is neither party and has at least COMPLETION_SLASH_SAT staked."""
    servers = get_servers(view, model)
    if servers:
        start = int.from_bytes(tagged_hash("l2d/inference/referee", completion_id + view.parent_hash)[:8], "big")
        for i in range(len(servers)):
            pk = servers[(start + i) % len(servers)]
            w = get_worker(view, pk)
            if (pk not in parties and w is not None and w.status == WorkerStatus.ACTIVE
                    and w.stake_sat >= COMPLETION_SLASH_SAT and view.get(offer_key(model, pk)) is not None):
                return pk
    raise InvalidTransaction("no third worker with a stake of at least "
                             f"{COMPLETION_SLASH_SAT} sat serves the model: nobody could referee the challenge")


def apply_referee(view: StateView, tx: Transaction, rules: Rules) -> None:
    """The drawn referee's re-execution decides a challenge: if the worker's committed leaves agree with it, the
    challenger loses, else the worker does: up to COMPLETION_SLASH_SAT of the loser's stake, half to the other side,
    a quarter to the referee, the rest burned."""
    p = tx.payload
    assert isinstance(p, CompletionReferee)
    rec = _need_completion(view, p.completion_id)
    c = rec.completion
    ch = get_challenge(view, p.completion_id)
    if rec.status != CompletionStatus.CHALLENGED or ch is None:
        raise DuplicateDuty(f"completion {p.completion_id.hex()} is {rec.status.name}: nothing to referee")
    if view.height > ch.height + REFEREE_WINDOW:
        raise InvalidTransaction(f"the referee window closed at height {ch.height + REFEREE_WINDOW}")
    if tx.sender != ch.referee:
        raise Unauthorized(f"the referee drawn for this challenge is {ch.referee.hex()}")
    _serving_worker(view, tx.sender, c.model, "referee")
    if len(p.tops) != len(ch.tops):
        raise InvalidTransaction(f"the challenge reveals {len(ch.tops)} positions, the referee {len(p.tops)}")
    positions = rec.positions()
    tokens, worker_tops, _ = ch.claims(positions)
    worker_ok = agrees(tokens, worker_tops, dict(zip(positions, p.tops)), c.sampling == 0)
    loser_pk, winner_pk = (ch.challenger, c.worker) if worker_ok else (c.worker, ch.challenger)
    ws = {pk: get_worker(view, pk) for pk in (loser_pk, winner_pk, tx.sender)}
    loser, winner, referee = ws[loser_pk], ws[winner_pk], ws[tx.sender]
    if loser is None or winner is None or referee is None:  # unreachable: workers are never deleted
        raise InvalidTransaction("a party is not a registered worker")
    slash = min(loser.stake_sat, COMPLETION_SLASH_SAT)
    payouts = [(winner_pk, slash // 2), (tx.sender, slash // 4)]
    check_credits(view, payouts)
    charge_sender(view, tx, rules, 0)
    slashes = loser.slashes + 1
    updated = {loser_pk: replace(loser, stake_sat=loser.stake_sat - slash, slashes=slashes,
                                 tasks_failed=loser.tasks_failed + 1,
                                 reputation_ppm=min(loser.reputation_ppm // 4, PPM // (1 + slashes))),
               winner_pk: replace(winner, tasks_done=winner.tasks_done + 1, reputation_ppm=rep_up(winner)),
               tx.sender: replace(referee, tasks_done=referee.tasks_done + 1, reputation_ppm=rep_up(referee))}
    for pk in sorted(updated):
        view.put(worker_key(pk), updated[pk].encode())
    add_locked(view, -slash)
    burn_supply(view, slash - slash // 2 - slash // 4)
    credit_all(view, payouts)
    who = Loser.CHALLENGER if worker_ok else Loser.WORKER
    view.put(challenge_key(p.completion_id), replace(ch, loser=who, referee=tx.sender, slash_sat=slash).encode())
    status = CompletionStatus.CHALLENGER_SLASHED if worker_ok else CompletionStatus.WORKER_SLASHED
    view.put(completion_key(p.completion_id), replace(rec, status=status).encode())
