"""Model registry: payload codecs, and the register / serve transitions on a dict-backed ledger (every refusal
typed, nothing written)."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Optional

import pytest
from coincurve import PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from l2d.core.errors import DuplicateDuty, InvalidTransaction, OutOfRange, Unauthorized
from l2d.core.model import (CompletionRecord, CompletionStatus, ModelRecord, OfferRecord, get_completion, get_model,
                            model_key, offer_key)
from l2d.core.model import BadResultSignature, Loser, get_challenge, get_servers
from l2d.core.model_tx import (BP, CHALLENGE_WINDOW, COMPLETION_SLASH_SAT, DEFAULT_SPLIT, MAX_CONTEXT,
                               REFEREE_WINDOW, Completion, CompletionChallenge, CompletionReferee, ModelFormat,
                               ModelRegister, ModelServe, Sampling, TopK, fp_leaf, fp_proof, fp_root, fp_verify,
                               result_digest, split_sat, token_cost_msat)
from l2d.core.params import LOCAL
from l2d.core.params import MAX_MONEY
from l2d.core.payload import Payload
from l2d.core.session import ReceiptOverEscrow, SessionClosed, SessionExpired, UnknownSession, get_session
from l2d.core.session_tx import SessionClose, SessionOpen
from l2d.core.state import SUPPLY_KEY, Account, StateView, Supply, account_key
from l2d.core.work import WorkerRecord, get_worker
from l2d.core.work_tx import PPM, WorkerCaps, WorkerExit, WorkerRegister
from tests.l2d.core.payload_checks import check_round_trip, check_strict
from tests.l2d.core.test_relay import FEE, MEMBER, OTHER, RELAY, RELAY2, Chain, pk, secret

H = hashlib.sha256(b"SmolLM2-135M-Instruct.Q4_1.gguf bytes").digest()
CAPS = WorkerCaps(0, 0, 10, 500_000, 100, 2, b"eu", (b"smollm2",), b"127.0.0.1:9000")
REGISTRANT, WORKER = RELAY, RELAY2


def smol(h: bytes = H, ctx: int = 8192) -> ModelRegister:
    return ModelRegister(h, ModelFormat.GGUF, ctx, b"SmolLM2-135M-Instruct", b"Q4_1")


def sample_payloads() -> list[Payload]:
    return [smol(), ModelServe(H, 2048, 1_000, 4_000)]


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_payloads_round_trip_through_signed_transactions(payload: Payload) -> None:
    check_round_trip(payload)


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: type(p).__name__)
def test_decoders_are_strict(payload: Payload) -> None:
    check_strict(payload)


@pytest.mark.parametrize("make, match", [
    (lambda: smol(h=b"\0" * 32), "weights hash"),
    (lambda: ModelRegister(H, 7, 10, b"m", b"1"), "model format 7"),
    (lambda: smol(ctx=0), "context length 0"),
    (lambda: smol(ctx=MAX_CONTEXT + 1), "context length"),
    (lambda: ModelRegister(H, 1, 10, b"-bad", b"1"), "model name"),
    (lambda: ModelRegister(H, 1, 10, b"m" * 65, b"1"), "model name"),
    (lambda: ModelRegister(H, 1, 10, b"m", b"v 1"), "model version"),
    (lambda: ModelServe(H, 10, -1, 0), "input token price"),
    (lambda: ModelServe(b"\0" * 32, 10, 1, 1), "served model"),
])
def test_invalid_payload_fields_are_refused(make: Any, match: str) -> None:
    with pytest.raises(OutOfRange, match=match):
        make()


def test_a_model_is_registered_once_by_its_hash_and_served_by_active_workers() -> None:
    c = Chain()
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 2048, 1, 1), match="not an active worker")
    c.apply(WORKER, WorkerRegister(1000, CAPS))
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 2048, 1, 1), match="is not registered")
    c.apply(REGISTRANT, smol())
    rec = get_model(StateView(c.state.get), H)
    assert rec == ModelRecord(pk(REGISTRANT), ModelFormat.GGUF, 8192, c.height - 1, b"SmolLM2-135M-Instruct",
                              b"Q4_1")
    assert c.state[model_key(H)] == rec.encode() and ModelRecord.decode(rec.encode()) == rec
    c.reject(InvalidTransaction, OTHER, smol(), match="registered already")  # the hash is the identity
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 8193, 1, 1), match="exceeds the model's 8192")
    c.apply(WORKER, ModelServe(H, 2048, 1_000, 4_000))
    offer = OfferRecord.decode(c.state[offer_key(H, pk(WORKER))])
    assert offer == OfferRecord(pk(WORKER), H, 2048, 1_000, 4_000, c.height - 1)
    c.apply(WORKER, ModelServe(H, 4096, 800, 3_000))  # a later offer replaces the earlier
    assert OfferRecord.decode(c.state[offer_key(H, pk(WORKER))]).price_in_msat_per_1k == 800
    c.apply(WORKER, WorkerExit())
    c.reject(InvalidTransaction, WORKER, ModelServe(H, 2048, 1, 1), match="not an active worker")


# -- completions: billed to a paid session, the split paid out ------------------------------------------------------
GATEWAY, CLIENT = REGISTRANT, OTHER
SESSION_KEY = bytes.fromhex("79be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
PRICES = (100_000, 400_000)  # msat per 1k input / output tokens: 7 in + 11 out cost 5,100 msat


def completion(sid: bytes, n_prompt: int = 7, n_output: int = 11, cost: Optional[int] = None,
               split: tuple[int, int, int] = DEFAULT_SPLIT, verifier: bytes = b"\0" * 32, **kw: Any) -> Completion:
    fields: dict[str, Any] = dict(
        session_id=sid, worker=pk(WORKER), model=H, verifier=verifier, prompt_hash=b"\1" * 32,
        output_hash=b"\2" * 32, fingerprint=b"\3" * 32, n_prompt=n_prompt, n_output=n_output,
        cost_msat=token_cost_msat(n_prompt, n_output, *PRICES) if cost is None else cost, seed=0,
        sampling=Sampling.GREEDY, temperature_milli=0, worker_bp=split[0], verifier_bp=split[1],
        treasury_bp=split[2])
    fields.update(kw)
    if "worker_sig" not in fields:  # the worker's signature over the result, on the test chain's network
        digest = result_digest(LOCAL.id, *(fields[f] for f in ("model", "prompt_hash", "output_hash", "fingerprint",
                                                                "n_prompt", "n_output", "sampling", "seed",
                                                                "temperature_milli")))
        fields["worker_sig"] = PrivateKey(secret(WORKER)).sign_schnorr(digest, b"\0" * 32)
    return Completion(**fields)


def served_chain(deposit: int = 1_000, price: int = 1, expiry: int = 50) -> tuple[Chain, bytes]:
    c = Chain()
    c.apply(WORKER, WorkerRegister(1000, CAPS))
    c.apply(REGISTRANT, smol())
    c.apply(WORKER, ModelServe(H, 2048, *PRICES))
    sid = c.apply(CLIENT, SessionOpen(pk(GATEWAY), SESSION_KEY, deposit, price, 1, expiry)).txid
    return c, sid


def balance(c: Chain, n: int) -> int:
    return Account.decode(c.state[account_key(pk(n))]).balance_sat


def test_completion_payloads_round_trip_and_refuse_bad_fields() -> None:
    sid = b"\7" * 32
    for p in (completion(sid), completion(sid, verifier=b"\5" * 32, split=(5_000, 1_000, 1_000), seed=9,
                                          sampling=Sampling.SEEDED, temperature_milli=700)):
        check_round_trip(p)
        check_strict(p)
    for kw, match in [(dict(split=(9_000, 0, 1_001)), "exceeds 10000"),
                      (dict(split=(5_000, 100, 0)), "verifier share needs a verifier key"),
                      (dict(verifier=b"\5" * 32), "verifier share needs a verifier key"),
                      (dict(n_prompt=0), "at least one prompt token"),
                      (dict(seed=3), "greedy completion has no seed"),
                      (dict(sampling=Sampling.SEEDED, temperature_milli=0), "temperature 0 milli"),
                      (dict(sampling=2), "sampling 2"), (dict(cost=-1), "cost_msat"),
                      (dict(worker=b"\0" * 32), "completion worker"),
                      (dict(worker_sig=b"\0" * 64), "comes with the worker's signature"),
                      (dict(fingerprint=b"\0" * 32), "comes with the worker's signature"),
                      (dict(worker_sig=b"\1" * 63), "worker_sig must be 64 bytes")]:
        with pytest.raises(OutOfRange, match=match):
            completion(sid, **kw)


@given(st.integers(0, MAX_MONEY), st.integers(0, BP), st.integers(0, BP), st.integers(0, BP))
def test_the_split_always_sums_to_the_amount(amount: int, a: int, b: int, c: int) -> None:
    if a + b + c > BP:
        return
    shares = split_sat(amount, a, b, c)
    assert sum(shares) == amount and min(shares) >= 0
    assert shares[:3] == tuple(amount * x // BP for x in (a, b, c))


def test_completions_bill_the_session_cumulatively_and_pay_the_split_exactly() -> None:
    c, sid = served_chain()
    before = {n: balance(c, n) for n in (GATEWAY, WORKER, CLIENT)}
    burned0 = Supply.decode(c.state[SUPPLY_KEY]).burned_sat
    ids = [c.apply(GATEWAY, completion(sid)).txid for _ in range(3)]  # 5,100 msat each: 5.1 sat
    s = get_session(StateView(c.state.get), sid)
    assert s is not None and (s.units, s.settled_sat, s.seq, s.receipt_id) == (15_300, 15, 3, ids[-1])
    recs = [get_completion(StateView(c.state.get), i) for i in ids]
    assert [(r.units_after, r.worker_sat, r.treasury_sat, r.burned_sat) for r in recs if r] == [
        (5_100, 2, 0, 3), (10_200, 2, 0, 3), (15_300, 2, 0, 3)]  # 5 sat crossed each time: 50 % / 10 % / rest
    assert balance(c, WORKER) - before[WORKER] == 6 and balance(c, CLIENT) == before[CLIENT]
    assert balance(c, GATEWAY) - before[GATEWAY] == 0 - 3 * FEE
    assert Supply.decode(c.state[SUPPLY_KEY]).burned_sat - burned0 == 9
    big = c.apply(GATEWAY, completion(sid, 1000, 1000, split=(5_000, 1_000, 1_000), verifier=pk(MEMBER))).txid
    r = get_completion(StateView(c.state.get), big)
    assert r is not None and (r.worker_sat, r.verifier_sat, r.treasury_sat, r.burned_sat) == (250, 50, 50, 150)
    assert r.status == CompletionStatus.RECORDED and r.gateway == pk(GATEWAY) and r.height == c.height - 1
    assert CompletionRecord.decode(r.encode()) == r and len(r.encode()) == CompletionRecord.SIZE
    c.apply(GATEWAY, SessionClose(sid))  # the gateway closes: the client gets back what was not billed
    assert balance(c, CLIENT) == before[CLIENT] + 1_000 - 515


def test_completions_that_break_a_rule_are_refused_and_write_nothing() -> None:
    c, sid = served_chain(deposit=10)
    c.reject(Unauthorized, CLIENT, completion(sid), match="only the session's server")
    c.reject(UnknownSession, GATEWAY, completion(b"\7" * 32))
    c.reject(InvalidTransaction, GATEWAY, completion(sid, cost=5_099), match="the offer's prices make it 5100")
    c.reject(InvalidTransaction, GATEWAY, completion(sid, model=b"\4" * 32), match="offers no model")
    c.reject(InvalidTransaction, GATEWAY, completion(sid, 2000, 49), match="exceed the offer's context length")
    c.reject(ReceiptOverEscrow, GATEWAY, completion(sid, 10, 26), match="deposit is 10 sat")  # 11,400 msat
    # a fingerprint is the worker's: signed by someone else, for other tokens, or on another network, refused
    c.reject(BadResultSignature, GATEWAY, completion(
        sid, worker_sig=PrivateKey(secret(GATEWAY)).sign_schnorr(b"\0" * 32, b"\0" * 32)), match="not signed by worker")
    c.reject(BadResultSignature, GATEWAY, replace(completion(sid), output_hash=b"\6" * 32))
    wrong_net = result_digest(LOCAL.id + 1, H, b"\1" * 32, b"\2" * 32, b"\3" * 32, 7, 11, 0, 0, 0)
    c.reject(BadResultSignature, GATEWAY, completion(
        sid, worker_sig=PrivateKey(secret(WORKER)).sign_schnorr(wrong_net, b"\0" * 32)))
    c.apply(GATEWAY, completion(sid, 10, 22))  # 9,800 msat: 9 sat of the 10
    c.reject(ReceiptOverEscrow, GATEWAY, completion(sid, 1, 3))  # 11,100 msat
    c.apply(GATEWAY, completion(sid, 1, 0, fingerprint=b"\0" * 32, worker_sig=b"\0" * 64))  # a cut-short answer:
    # billed (100 msat more: 9,900), with no fingerprint and no signature to check
    c2, sid2 = served_chain(price=2)
    c2.reject(InvalidTransaction, GATEWAY, completion(sid2), match="1 msat per unit")
    c3, sid3 = served_chain(expiry=7)
    c3.height = 8
    c3.reject(SessionExpired, GATEWAY, completion(sid3))
    c3.height = 7
    c3.apply(GATEWAY, SessionClose(sid3))
    c3.reject(SessionClosed, GATEWAY, completion(sid3))


def test_fingerprint_merkle_proofs_prove_every_position_and_nothing_else() -> None:
    """The fingerprint root commits to each position's token and top-4 (and to the count): every position of every
    size proves against it with fp_proof, and a changed leaf, position, count, or sibling does not."""
    for n in range(1, 34):
        leaves = [fp_leaf(i * 7, (i, i + 1, i + 2, i + 3), (900 - i, 800, -5, -(1 << 31))) for i in range(n)]
        root = fp_root(leaves)
        for pos in range(n):
            proof = fp_proof(leaves, pos)
            assert fp_verify(root, n, pos, leaves[pos], proof)
            assert len(proof) <= max(1, (n - 1).bit_length())
            assert not fp_verify(root, n, pos, fp_leaf(pos * 7 + 1, (pos, pos + 1, pos + 2, pos + 3),
                                                       (900 - pos, 800, -5, -(1 << 31))), proof)
            assert not fp_verify(root, n + 1, pos, leaves[pos], proof)
            assert not fp_verify(root, n, (pos + 1) % n, leaves[pos], proof) or n == 1
            if proof:
                assert not fp_verify(root, n, pos, leaves[pos], proof[:-1])
                assert not fp_verify(root, n, pos, leaves[pos], [b"\x09" * 32] + proof[1:])
            assert not fp_verify(root, n, pos, leaves[pos], proof + [b"\x09" * 32])
        assert not fp_verify(root, n, n, leaves[0], fp_proof(leaves, 0))
    assert fp_root([]) != fp_root([fp_leaf(0, (0, 0, 0, 0), (0, 0, 0, 0))])
    with pytest.raises(OutOfRange):
        fp_leaf(1, (1, 2, 3), (1, 2, 3))
    with pytest.raises(OutOfRange):
        fp_leaf(1, (1, 2, 3, 4), (1, 2, 3, 1 << 31))


# -- disputes: a challenger's re-execution against the worker's committed leaves, a referee's verdict -------------
CHALLENGER, REFEREE = CLIENT, GATEWAY  # workers too (roles are per transaction)
HONEST = (160, 150, 140, -130)


def disputed_chain(tokens: Optional[list[int]] = None) -> tuple[Chain, bytes, list[bytes], list[int]]:
    """A chain where the worker's recorded 20-token completion commits to top logits HONEST at every position
    (token i, top-4 ids (i, 1, 2, 3) unless tokens says otherwise), and two more workers serve the model."""
    c, sid = served_chain()
    for who in (CHALLENGER, REFEREE):
        c.apply(who, WorkerRegister(COMPLETION_SLASH_SAT, CAPS))  # a referee stakes at least what it may cost
        c.apply(who, ModelServe(H, 2048, *PRICES))
    toks = tokens or list(range(20))
    leaves = [fp_leaf(toks[i], (i, 1, 2, 3), HONEST) for i in range(20)]
    done = c.apply(GATEWAY, completion(sid, 7, 20, fingerprint=fp_root(leaves))).txid
    rec = get_completion(StateView(c.state.get), done)
    assert rec is not None
    return c, done, leaves, rec.positions()


def tops(positions: list[int], top: int) -> tuple[TopK, ...]:
    return tuple(TopK((p, 1, 2, 3), (top, 150, 140, -130)) for p in positions)


def challenge(done: bytes, leaves: list[bytes], positions: list[int], top: int) -> CompletionChallenge:
    return CompletionChallenge(done, tuple(leaves[p] for p in positions),
                               tuple(tuple(fp_proof(leaves, p)) for p in positions), tops(positions, top))


def worker(c: Chain, n: int) -> WorkerRecord:
    w = get_worker(StateView(c.state.get), pk(n))
    assert w is not None
    return w


def test_dispute_payloads_round_trip_and_refuse_bad_fields() -> None:
    leaves = [fp_leaf(i, (i, 1, 2, 3), HONEST) for i in range(20)]
    for p in (challenge(b"\7" * 32, leaves, [0, 5, 19], 170), CompletionReferee(b"\7" * 32, tops([1, 2], 150))):
        check_round_trip(p)
        check_strict(p)
    with pytest.raises(OutOfRange, match="1..8 positions"):
        CompletionReferee(b"\7" * 32, tops(list(range(9)), 1))
    with pytest.raises(OutOfRange, match="1..8 positions"):
        CompletionReferee(b"\7" * 32, ())
    with pytest.raises(OutOfRange, match="one leaf, proof and top-K per position"):
        CompletionChallenge(b"\7" * 32, (leaves[0],), (), tops([0], 1))
    with pytest.raises(OutOfRange, match="36 bytes"):
        CompletionChallenge(b"\7" * 32, (leaves[0][:35],), ((),), tops([0], 1))
    with pytest.raises(OutOfRange, match="top-K out of range"):
        CompletionReferee(b"\7" * 32, (TopK((1, 2, 3, -4), (0, 0, 0, 0)),))


def test_a_challenge_upheld_by_the_referee_slashes_the_worker() -> None:
    c, done, leaves, positions = disputed_chain()
    assert len(positions) == 8
    before = {n: balance(c, n) for n in (CHALLENGER, REFEREE)}
    burned0 = Supply.decode(c.state[SUPPLY_KEY]).burned_sat
    rep0 = worker(c, WORKER).reputation_ppm
    c.apply(CHALLENGER, challenge(done, leaves, positions, 165))  # 5 quanta away: beyond the tolerance of 2
    c.apply(REFEREE, CompletionReferee(done, tops(positions, 166)))  # within 2 of the challenger, 6 of the worker
    rec, ch = get_completion(StateView(c.state.get), done), get_challenge(StateView(c.state.get), done)
    assert rec is not None and ch is not None and rec.status == CompletionStatus.WORKER_SLASHED
    assert (ch.loser, ch.challenger, ch.referee, ch.slash_sat) == (Loser.WORKER, pk(CHALLENGER), pk(REFEREE), 1000)
    assert get_servers(StateView(c.state.get), H) == [pk(WORKER), pk(CHALLENGER), pk(REFEREE)]
    assert worker(c, WORKER).stake_sat == 0 and worker(c, WORKER).slashes == 1
    assert worker(c, WORKER).reputation_ppm == min(rep0 // 4, PPM // 2) < rep0
    assert balance(c, CHALLENGER) == before[CHALLENGER] - FEE + 500
    assert balance(c, REFEREE) == before[REFEREE] - FEE + 250
    assert Supply.decode(c.state[SUPPLY_KEY]).burned_sat - burned0 == 250
    c.reject(DuplicateDuty, REFEREE, CompletionReferee(done, tops(positions, 166)))
    c.reject(DuplicateDuty, CHALLENGER, challenge(done, leaves, positions, 165))


def test_a_challenge_the_referee_rejects_slashes_the_challenger() -> None:
    c, done, leaves, positions = disputed_chain()
    c.apply(CHALLENGER, challenge(done, leaves, positions, 170))
    c.apply(REFEREE, CompletionReferee(done, tops(positions, 161)))  # within 2 of the worker's leaves
    rec = get_completion(StateView(c.state.get), done)
    assert rec is not None and rec.status == CompletionStatus.CHALLENGER_SLASHED
    assert worker(c, CHALLENGER).stake_sat == 0 and worker(c, WORKER).stake_sat == 1000
    assert worker(c, WORKER).tasks_done == 1


def test_sampling_noise_is_slashed_from_the_workers_own_leaves() -> None:
    """A greedy answer whose tokens are not its own top-1: the challenger and the referee see the same logits, and
    the worker's committed tokens convict it."""
    c, done, leaves, positions = disputed_chain(tokens=[1] * 20)  # top-1 of position i is i: token 1 is noise
    c.apply(CHALLENGER, challenge(done, leaves, positions, 160))
    c.apply(REFEREE, CompletionReferee(done, tops(positions, 160)))
    rec = get_completion(StateView(c.state.get), done)
    assert rec is not None and rec.status == CompletionStatus.WORKER_SLASHED


def test_disputes_that_break_a_rule_are_refused_and_write_nothing() -> None:
    c, done, leaves, positions = disputed_chain()
    c.reject(InvalidTransaction, CHALLENGER, challenge(done, leaves, positions, 161), match="nothing to dispute")
    c.reject(InvalidTransaction, WORKER, challenge(done, leaves, positions, 170), match="its own result")
    c.reject(InvalidTransaction, MEMBER, challenge(done, leaves, positions, 170), match="not an active worker")
    c.reject(InvalidTransaction, CHALLENGER, challenge(b"\5" * 32, leaves, positions, 170), match="no completion")
    forged = [fp_leaf(i, (i, 1, 2, 3), (170, 150, 140, -130)) for i in range(20)]
    c.reject(InvalidTransaction, CHALLENGER, challenge(done, forged, positions, 170), match="committed to")
    c.reject(InvalidTransaction, CHALLENGER, challenge(done, leaves, positions[:-1], 170), match="reveals 8")
    shifted = [(p + 1) % 20 for p in positions]
    c.reject(InvalidTransaction, CHALLENGER, challenge(done, leaves, shifted, 170))
    c.reject(DuplicateDuty, REFEREE, CompletionReferee(done, tops(positions, 170)), match="nothing to referee")
    height = c.height
    c.height = height + CHALLENGE_WINDOW + 1
    c.reject(InvalidTransaction, CHALLENGER, challenge(done, leaves, positions, 170), match="window closed")
    c.height = height
    c.apply(CHALLENGER, challenge(done, leaves, positions, 170))
    ch = get_challenge(StateView(c.state.get), done)
    assert ch is not None and ch.referee == pk(REFEREE)  # drawn by the ledger: the only third worker staked enough
    for who in (WORKER, CHALLENGER, MEMBER):
        c.reject(Unauthorized, who, CompletionReferee(done, tops(positions, 170)), match="drawn for this challenge")
    c.reject(InvalidTransaction, REFEREE, CompletionReferee(done, tops(positions[:3], 170)), match="reveals 8")
    c.height += REFEREE_WINDOW + 1
    c.reject(InvalidTransaction, REFEREE, CompletionReferee(done, tops(positions, 170)), match="window closed")


def test_no_challenge_without_a_third_worker_staked_enough_to_referee_it() -> None:
    c, sid = served_chain()
    c.apply(CHALLENGER, WorkerRegister(COMPLETION_SLASH_SAT, CAPS))
    c.apply(CHALLENGER, ModelServe(H, 2048, *PRICES))
    c.apply(REFEREE, WorkerRegister(COMPLETION_SLASH_SAT - 1, CAPS))  # staked too little to judge
    c.apply(REFEREE, ModelServe(H, 2048, *PRICES))
    leaves = [fp_leaf(i, (i, 1, 2, 3), HONEST) for i in range(20)]
    done = c.apply(GATEWAY, completion(sid, 7, 20, fingerprint=fp_root(leaves))).txid
    rec = get_completion(StateView(c.state.get), done)
    assert rec is not None
    c.reject(InvalidTransaction, CHALLENGER, challenge(done, leaves, rec.positions(), 170), match="nobody could")


def test_a_cut_short_answer_cannot_be_challenged_and_an_exited_worker_is_not_billed() -> None:
    c, sid = served_chain()
    c.apply(CHALLENGER, WorkerRegister(1000, CAPS))
    c.apply(CHALLENGER, ModelServe(H, 2048, *PRICES))
    short = c.apply(GATEWAY, completion(sid, 7, 3, fingerprint=b"\0" * 32, worker_sig=b"\0" * 64)).txid
    leaves = [fp_leaf(i, (i, 1, 2, 3), HONEST) for i in range(3)]
    c.reject(InvalidTransaction, CHALLENGER, challenge(short, leaves, [0, 1, 2], 170), match="no fingerprint")
    c.apply(WORKER, WorkerExit())
    c.reject(InvalidTransaction, GATEWAY, completion(sid), match="is not active")
