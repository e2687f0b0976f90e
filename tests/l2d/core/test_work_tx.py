"""Orchestration payloads: canonical round trips, strict decoding with typed errors, the fingerprint rule."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.errors import DecodeError, OutOfRange, TrailingBytes, Truncated
from l2d.core.params import LOCAL
from l2d.core.payload import TxType
from l2d.core.tx import PAYLOAD_TYPES, decode, sign
from l2d.core.work_tx import (FP_ENTRY, FP_TOLERANCE, TOPK, ZERO_KEY, Role, TaskAssign, TaskCancel, TaskDispute,
                              TaskReassign, TaskResolve, TaskResult, TaskSettle, TaskSubmit, WorkerCaps, WorkerExit,
                              WorkerHeartbeat, WorkerRegister, WorkerWithdraw, fingerprints_match, parse_fingerprint)

K1, K2, K3, TID = (hashlib.sha256(b"k%d" % i).digest() for i in range(4))


def fp(classes: list[int], shift: int = 0) -> bytes:
    """A canonical fingerprint whose top classes are `classes` (logits shifted by `shift` steps)."""
    out = b""
    for c in classes:
        for j, q in enumerate((1000, 500, 100)):
            out += FP_ENTRY.pack((c + j) % 10, q + shift)
    return out


CAPS = WorkerCaps(0, 0, 10, 500_000, 200, 2, b"eu", (b"digits-mlp",), b"127.0.0.1:1234")
PAYLOADS = [
    WorkerRegister(1000, CAPS), WorkerHeartbeat(), WorkerExit(), WorkerWithdraw(),
    TaskSubmit(500, 0, 0, b"digits-mlp", b"", bytes(64)),
    TaskSubmit(500, 300_000, 20, b"digits-mlp", b"eu", bytes(range(17)) * 7 + bytes(9)),
    TaskAssign(TID, K1, K2, K3, 10, 2, 30), TaskAssign(TID, K1, ZERO_KEY, ZERO_KEY, 10, 0),
    TaskResult(TID, bytes([3, 4]), fp([3, 4])),
    TaskReassign(TID, Role.WORKER, K2, K3, 20), TaskReassign(TID, Role.REFEREE, K2, ZERO_KEY, 20),
    TaskSettle(TID, 80, 10, 10), TaskDispute(TID, K3, 30),
    TaskResolve(TID, Role.WORKER, 100, 50, 0, 40, 40, 20), TaskCancel(TID),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda p: type(p).__name__)
def test_round_trip_through_a_signed_transaction(payload: object) -> None:
    t = sign(LOCAL, hashlib.sha256(b"s").digest(), 0, 0, payload, b"\0" * 32)  # type: ignore[arg-type]
    back = decode(t.raw, LOCAL)
    assert back.payload == payload
    assert back.payload.encode() == payload.encode()  # type: ignore[attr-defined]
    cls = PAYLOAD_TYPES[payload.TYPE]  # type: ignore[attr-defined]
    enc = payload.encode()  # type: ignore[attr-defined]
    with pytest.raises(DecodeError):
        cls.decode(enc + b"\0")
    if enc:
        with pytest.raises(DecodeError):
            cls.decode(enc[:-1])


def test_type_numbers_are_in_the_orchestration_range() -> None:
    for p in PAYLOADS:
        assert 16 <= p.TYPE <= 31  # type: ignore[attr-defined]
    assert TxType.TASK_CANCEL == 27


def test_debits_are_stake_and_bounty_only() -> None:
    assert WorkerRegister(1000, CAPS).debit_sat() == 1000
    assert TaskSubmit(500, 0, 0, b"digits-mlp", b"", bytes(64)).debit_sat() == 500
    assert all(p.debit_sat() == 0 for p in PAYLOADS if not isinstance(p, (WorkerRegister, TaskSubmit)))
    feeless = {type(p).__name__ for p in PAYLOADS if p.FEELESS}  # type: ignore[attr-defined]
    assert feeless == {"TaskAssign", "TaskReassign", "TaskSettle", "TaskDispute", "TaskResolve"}


def _caps(**kw: object) -> WorkerCaps:
    base: dict[str, object] = dict(device=0, accel_mem_mb=0, price_sat=10, green_ppm=0, carbon_g_per_kwh=0,
                                   capacity=1, region=b"eu", models=(b"digits-mlp",), endpoint=b"")
    base.update(kw)
    return WorkerCaps(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("kw, words", [
    (dict(device=6), "device"), (dict(device=True), "device"), (dict(price_sat=10**12 + 1), "price"),
    (dict(green_ppm=1_000_001), "green"), (dict(capacity=0), "capacity"), (dict(region=b""), "region"),
    (dict(region=b"EU"), "region"), (dict(region=b"x" * 17), "region"), (dict(models=()), "models"),
    (dict(models=(b"b", b"a")), "ascending"), (dict(models=(b"a", b"a")), "distinct"),
    (dict(models=(b"a b",)), "model"), (dict(endpoint=b"h o"), "endpoint"), (dict(endpoint=b"x" * 65), "endpoint"),
])
def test_malformed_registrations_are_out_of_range(kw: dict[str, object], words: str) -> None:
    with pytest.raises(OutOfRange, match=words):
        _caps(**kw)


def test_register_needs_a_stake() -> None:
    with pytest.raises(OutOfRange, match="stake"):
        WorkerRegister(0, CAPS)


def test_register_decode_rejects_too_many_models_and_truncation() -> None:
    enc = WorkerRegister(5, CAPS).encode()
    with pytest.raises(Truncated):
        WorkerRegister.decode(enc[:10])
    bad = bytearray(enc)
    bad[8 + 23 + 3] = 9  # model count (after stake, fixed caps, region "eu")
    with pytest.raises(OutOfRange, match="models"):
        WorkerRegister.decode(bytes(bad))


@pytest.mark.parametrize("kw, words", [
    (dict(bounty_sat=0), "bounty"), (dict(input=b""), "input"), (dict(input=bytes(63)), "input"),
    (dict(input=bytes(17 * 64)), "input"), (dict(input=bytes([17]) + bytes(63)), "pixel"),
    (dict(model=b""), "model"), (dict(region=b"Eu"), "region"), (dict(min_reputation_ppm=1_000_001), "reputation"),
])
def test_malformed_submissions(kw: dict[str, object], words: str) -> None:
    base: dict[str, object] = dict(bounty_sat=1, min_reputation_ppm=0, max_price_sat=0, model=b"digits-mlp",
                                   region=b"", input=bytes(64))
    base.update(kw)
    with pytest.raises(OutOfRange, match=words):
        TaskSubmit(**base)  # type: ignore[arg-type]


def test_parties_must_be_distinct_and_roles_known() -> None:
    with pytest.raises(OutOfRange, match="distinct"):
        TaskAssign(TID, K1, K1, ZERO_KEY, 1, 1)
    with pytest.raises(OutOfRange, match="distinct"):
        TaskAssign(TID, K1, K2, K2, 1, 1)
    with pytest.raises(OutOfRange, match="zero key"):
        TaskAssign(TID, ZERO_KEY, K2, ZERO_KEY, 1, 1)
    with pytest.raises(OutOfRange, match="role"):
        TaskReassign.decode(TaskReassign(TID, Role.WORKER, K1, K2, 3).encode().replace(TID + b"\x01", TID + b"\x04"))
    with pytest.raises(OutOfRange, match="backup"):
        TaskReassign(TID, Role.VERIFIER, K1, K2, 3)
    with pytest.raises(OutOfRange, match="loser"):
        TaskResolve(TID, Role.REFEREE, 0, 0, 0, 0, 0, 0)
    with pytest.raises(OutOfRange, match="cannot be paid"):
        TaskResolve(TID, Role.VERIFIER, 10, 5, 10, 1, 0, 0)
    with pytest.raises(OutOfRange, match="challenger"):
        TaskResolve(TID, Role.WORKER, 10, 11, 0, 0, 0, 0)


def test_empty_payloads_are_empty() -> None:
    for cls in (WorkerHeartbeat, WorkerExit, WorkerWithdraw):
        assert cls.decode(b"") == cls()
        with pytest.raises(DecodeError):
            cls.decode(b"\0")
    with pytest.raises(TrailingBytes):
        TaskResult.decode(TaskResult(TID, b"\3", fp([3])).encode() + b"\0")


def test_result_fingerprint_must_be_canonical_and_agree_with_the_output() -> None:
    with pytest.raises(OutOfRange, match="top class"):
        TaskResult(TID, bytes([4]), fp([3]))
    with pytest.raises(OutOfRange, match="bytes"):
        TaskResult(TID, bytes([3, 3]), fp([3]))
    rep = FP_ENTRY.pack(3, 9) + FP_ENTRY.pack(3, 8) + FP_ENTRY.pack(1, 7)
    with pytest.raises(OutOfRange, match="repeated"):
        TaskResult(TID, bytes([3]), rep)
    unordered = FP_ENTRY.pack(3, 9) + FP_ENTRY.pack(1, 7) + FP_ENTRY.pack(2, 8)
    with pytest.raises(OutOfRange, match="ordered"):
        TaskResult(TID, bytes([3]), unordered)
    with pytest.raises(OutOfRange, match="output"):
        TaskResult(TID, b"", b"")


def test_fingerprint_tolerance_rule() -> None:
    a = parse_fingerprint(fp([3, 7]), bytes([3, 7]))
    assert fingerprints_match(a, parse_fingerprint(fp([3, 7], FP_TOLERANCE), bytes([3, 7])))
    assert not fingerprints_match(a, parse_fingerprint(fp([3, 7], FP_TOLERANCE + 1), bytes([3, 7])))
    assert not fingerprints_match(a, parse_fingerprint(fp([3, 8]), bytes([3, 8])))  # another prediction
    assert not fingerprints_match(a, parse_fingerprint(fp([3]), bytes([3])))
    assert len(fp([1])) == TOPK * FP_ENTRY.size


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=16), st.integers(-FP_TOLERANCE, FP_TOLERANCE))
def test_fingerprint_match_is_symmetric_within_tolerance(classes: list[int], shift: int) -> None:
    out = bytes(classes)
    a, b = parse_fingerprint(fp(classes), out), parse_fingerprint(fp(classes, shift), out)
    assert fingerprints_match(a, b) and fingerprints_match(b, a)



def test_encodings_are_pinned() -> None:
    """Consensus formats: any change to these bytes is a hard fork (docs/orchestration.md has the layouts)."""
    from l2d.core.work import Outcome, TaskRecord, TaskStatus, WorkerRecord, WorkerStatus
    k = [hashlib.sha256(b"k%d" % i).digest() for i in range(4)]
    caps = WorkerCaps(1, 16000, 25, 300000, 120, 4, b"eu-west", (b"digits-mlp", b"resnet"), b"127.0.0.1:9000")
    spec = TaskSubmit(5000, 250000, 30, b"digits-mlp", b"eu-west", bytes(range(16)) * 4)
    res = (b"\x07", FP_ENTRY.pack(7, 900) + FP_ENTRY.pack(1, -20) + FP_ENTRY.pack(2, -20))
    values = {
        "register": WorkerRegister(123456, caps).encode(),
        "submit": spec.encode(),
        "assign": TaskAssign(k[0], k[1], k[2], k[3], 1000, 5, 30).encode(),
        "result": TaskResult(k[0], *res).encode(),
        "resolve": TaskResolve(k[0], Role.VERIFIER, 500, 200, 100, 0, 50, 25).encode(),
        "worker_record": WorkerRecord(WorkerStatus.EXITING, 99, 7, 480000, 1, 3, 2, 1, 55, 4, caps).encode(),
        "task_record": TaskRecord(TaskStatus.DISPUTED, Outcome.NONE, k[0], 5000, 3, k[1], k[2], k[3], k[0], 90, 5, 60,
                                  1, 61, 30, spec, (res, (b"", b""), (b"", b""))).encode(),
    }
    pinned = {
        "register": ("d26f24d78a8194e00564a04ade59760bba696e60fef38cd3181f446352e1c4df", 73),
        "submit": ("467fdf4353bef82082d1e3489862895e83b3519a97cedd3828c5a2a336330010", 104),
        "assign": ("52bed2ab4d1555de89c9a8b1d36cd6c2dad87c8a5543a520caaeb5fd08798490", 144),
        "result": ("7e155da143bcf360c07af75d1e8de06ad379d99b95542e64eb6d1d2e70f75f96", 44),
        "resolve": ("33f4ee4615160e3e04222734bb814810d7bfe09a43e41d10f5f3f8cf6f2bb28b", 81),
        "worker_record": ("bd4f2e885852d84f21ea0ed4054e1e4fda9ef6bca9206cc5620a26087e48fab5", 116),
        "task_record": ("0a23b892d303cf9364fc8a63e24b7cb6348d8d00ed7b95f6576d1fd7abe420d1", 331),
    }
    assert {n: (hashlib.sha256(v).hexdigest(), len(v)) for n, v in values.items()} == pinned
    assert TaskRecord.decode(values["task_record"]).encode() == values["task_record"]
    assert WorkerRecord.decode(values["worker_record"]).encode() == values["worker_record"]
