"""A short run of every fuzz target (tests/fuzz/targets.py) in `make test`, and the validity of their seeds.

Hypothesis mutates the seeds (bit flips, byte writes of boundary values, inserts, deletes, duplicated and
truncated ranges, splices of two seeds) and each target checks that only typed errors escape and that what is
accepted round-trips. A few hundred inputs per target, a few seconds in all; `make fuzz` (tests/fuzz/run.py)
runs the same targets coverage-guided under atheris for 10^6 inputs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l2d.core.audit import AnchorKind, AuditBundle, verify_bundle
from l2d.core.block import Block
from l2d.core.chain_file import ChainFileError, ChainReader, verify_chain
from l2d.core.errors import InvalidTransaction, Truncated
from l2d.core.genesis_file import FederationGenesis
from l2d.core.header_file import load_header_file
from l2d.core.params import LOCAL, REGTEST
from l2d.core.payload import TxType
from l2d.core.rules import RULES, apply_tx
from l2d.core.snapshot import verify_snapshot
from l2d.core.spv import BITCOIN_REGTEST
from l2d.core.state import Rules, StateView
from l2d.core.tree import Proof, verify_proof
from l2d.core.tx import PAYLOAD_TYPES, Transaction, check_signature, decode
from verify_tool import cli as verify_cli


def _targets() -> ModuleType:
    """tests/fuzz/targets.py (test modules cannot import each other as a package: site-packages has `tests`)."""
    if (mod := sys.modules.get("l2d_fuzz_targets")) is None:
        spec = importlib.util.spec_from_file_location("l2d_fuzz_targets", Path(__file__).with_name("targets.py"))
        assert spec is not None and spec.loader is not None
        mod = sys.modules["l2d_fuzz_targets"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


T = _targets()
# Inputs per target: the l2-verify target builds its argument parser per input, the audit target verifies a chain.
EXAMPLES = {"l2_verify": 150, "audit": 120}
BOUNDARY = (0x00, 0x01, 0x7F, 0x80, 0xFC, 0xFD, 0xFE, 0xFF)


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    b = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "duplicate", "truncate", "splice")))
        i = draw(st.integers(0, len(b)))
        j = draw(st.integers(i, min(len(b), i + 64)))
        if op == "flip" and i < len(b):
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and i < len(b):
            b[i] = draw(st.sampled_from(BOUNDARY) | st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del b[i:j]
        elif op == "duplicate":
            b[i:i] = b[i:j]
        elif op == "truncate":
            del b[i:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            b[i:] = other[draw(st.integers(0, len(other))):]
    return bytes(b)


@pytest.mark.parametrize("name", sorted(T.TARGETS))
def test_short_run(name: str) -> None:
    target = T.TARGETS[name]
    seeds = target.seeds()

    @settings(max_examples=EXAMPLES.get(name, 300), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.one_of(mutated(seeds), st.binary(max_size=200)))
    def run(data: bytes) -> None:
        target.run(data)

    run()


@pytest.mark.parametrize("name", sorted(T.TARGETS))
def test_seeds_pass_their_target(name: str) -> None:
    for seed in T.TARGETS[name].seeds():
        T.TARGETS[name].run(seed)


# -- the seeds are valid encodings (a fuzz run from rejected seeds would never reach the code behind them) --------
def test_transaction_seeds_decode_and_verify() -> None:
    world = T.world()
    assert {t.type for t in world.seeds} == set(PAYLOAD_TYPES)
    for t in world.seeds:
        check_signature(decode(t.raw, LOCAL))


def test_the_bridge_seeds_apply_to_the_world() -> None:
    """The bridge's seeds are accepted by the world's state (a seed refused at its first check would keep the fuzzer
    away from the rules behind it): the relay, the claim, the funding record, a fresh plan (of two coins, both
    needed), the replacement of the world's plan (signed by m keys), a plan signature and the peg-out update."""
    world = T.world()
    kinds = {TxType.BTC_HEADERS, TxType.PEGIN_CLAIM, TxType.FEDERATION_FUND, TxType.PEGOUT_PLAN,
             TxType.PLAN_SIGNATURE, TxType.PEGOUT_UPDATE}
    seeds = [t for t in world.seeds if t.type in kinds]
    assert {t.type for t in seeds} == kinds
    assert sorted(t.payload.replaces != bytes(32) for t in seeds if t.type == TxType.PEGOUT_PLAN) == [False, True]
    for t in seeds:
        view = StateView(world.state.get, T.HEIGHT)
        apply_tx(view, t, T.RULES)
        assert view.writes


def test_proof_seeds_verify_against_the_seed_root() -> None:
    root, items = T.proof_tree()
    tree_proofs = [Proof.decode(raw) for raw in T.proof_seeds()[:12]]
    got = [verify_proof(root, p) for p in tree_proofs]
    assert any(v is None for v in got) and any(v is not None for v in got)
    for p, v in zip(tree_proofs, got):
        assert v == items.get(p.key)


def test_block_snapshot_header_and_bundle_seeds_are_valid() -> None:
    for raw in T.block_seeds()[1:]:
        assert Block.decode(raw, LOCAL).encode() == raw
    for raw in T.snapshot_seeds():
        verify_snapshot(io.BytesIO(raw))
    for raw in T.header_file_seeds():
        load_header_file(io.BytesIO(raw), now=T.NOW)
    bundles = [AuditBundle.decode(raw) for raw in T.bundle_seeds()]
    for b in bundles:
        verify_bundle(b, REGTEST, BITCOIN_REGTEST, None, 1, now=T.NOW)
    assert bundles[-1].commit is not None and {b.anchor_kind for b in bundles} == set(AnchorKind)
    verify_bundle(bundles[-1], REGTEST, BITCOIN_REGTEST, None, 1, now=T.NOW, federation=T.federation())


def test_genesis_and_chain_file_seeds_are_valid() -> None:
    for raw in T.genesis_file_seeds():
        FederationGenesis.decode(raw)
    fed = T.federation()
    verified = 0
    seeds = T.chain_file_seeds()
    for raw in seeds:
        start = ChainReader(io.BytesIO(raw)).preamble.start_height
        cp = (start - 1, ChainReader(io.BytesIO(raw)).entries().__next__().header.prev_hash) if start > 1 else None
        try:
            verify_chain(io.BytesIO(raw), fed, cp)
            verified += 1
        except ChainFileError:  # the invalid commit vectors: chains the federation did not sign, or cannot decode
            pass
    assert verified >= 4 and len(seeds) > verified


def test_l2_verify_accepts_each_seed_with_its_command() -> None:
    path = T._input_path()
    root = T.proof_tree()[0].hex()
    seeds = T.l2_verify_seeds()
    members = ["--members", str(T._genesis_path())]
    commands = [["snapshot"], ["snapshot"], ["proof", "--root", root], ["proof", "--root", root],
                ["proof", "--root", root], ["headers"], ["audit"], ["audit", *members], ["chain", *members],
                ["chain", str(T._chain_path()), "--members"]]
    assert len(seeds) == len(commands)
    for raw, cmd in zip(seeds, commands):
        path.write_bytes(raw)
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert T.l2_verify(cmd + [str(path)]) == 0, (cmd, raw[:16])
        assert out.getvalue().startswith("OK ")
        if cmd[-1] == "--members":
            assert out.getvalue().startswith("OK chain regtest 0..3")
        elif cmd[0] == "audit" and len(cmd) > 1:
            assert "signed by 3 of 4 members" in out.getvalue()


# -- the targets do report a finding (a fuzz target that cannot fail would prove nothing) ---------------------------
def test_an_untyped_exception_escapes_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = T.proof_seeds()[0]
    monkeypatch.setattr(Proof, "decode", classmethod(lambda cls, b: cls.__name__[len(b)]))  # an IndexError
    with pytest.raises(IndexError):
        T.run_proof(seed)


def test_a_typed_refusal_is_not_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(cls: type, b: bytes) -> None:
        raise Truncated("refused")

    monkeypatch.setattr(Proof, "decode", classmethod(refuse))
    T.run_proof(T.proof_seeds()[0])


def test_a_broken_round_trip_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = T.block_seeds()[-1]
    monkeypatch.setattr(Block, "encode", lambda self: b"")
    with pytest.raises(AssertionError):
        T.run_block(seed)


def test_a_rejection_that_wrote_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    def write_then_refuse(view: StateView, tx: Transaction, rules: Rules) -> None:
        view.put(b"\x01" + tx.sender, b"")
        raise InvalidTransaction("refused after a write")

    monkeypatch.setitem(RULES, TxType.TRANSFER, write_then_refuse)
    with pytest.raises(AssertionError, match="rejected after writing 1 records"):
        T.run_apply_tx(T.world().seeds[0].raw)


def test_l2_verify_exceptions_are_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **kw: object) -> None:
        raise ValueError("a library error")

    monkeypatch.setattr(verify_cli, "verify_snapshot", boom)
    with pytest.raises(ValueError):
        T.run_l2_verify(T.snapshot_seeds()[0])
