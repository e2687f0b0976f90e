"""Fuzz targets: every decoder of untrusted bytes in the consensus core, the state transition, and l2-verify.

A target is a function of one byte string. It feeds the bytes to the code under test and checks:
    * only the code's typed errors escape (``l2d.core.errors.L2Error`` and its subclasses; ``Rejected`` for
      ``apply_tx``; exit codes 0/1/2 for ``l2-verify``): anything else -- IndexError, struct.error, a ValueError
      from a library, RecursionError, AssertionError from a broken property -- propagates and is a finding;
    * a round trip where one can be stated: what a strict decoder accepts re-encodes to exactly the input (one
      canonical encoding per value), a rejected transaction wrote nothing, an applied one kept the supply invariant.
Files protected by a SHA-256 trailer (snapshots, audit bundles, header files, chain files) are also tried with the trailer
recomputed over the mutated bytes, so a checksum does not hide the structural checks behind it.

Seeds are real encodings: the pinned vectors of tests/vectors/ and objects built with the core's own encoders.
Two drivers share these targets: tests/fuzz/test_targets.py (hypothesis, a short run in `make test`) and
tests/fuzz/run.py (atheris, coverage-guided, `make fuzz`).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import struct
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from coincurve import PrivateKey

from l2d.core.anchor_format import AnchorRecord, TaprootAnchor, op_return_script
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.audit import MAGIC as BUNDLE_MAGIC
from l2d.core.audit import AnchorKind, AuditBundle, CommitEvidence, ProofEvidence, SnapshotEvidence, verify_bundle
from l2d.core.block import Block, BlockHeader, tx_root
from l2d.core.chain_file import MAGIC as CHAIN_MAGIC
from l2d.core.chain_file import ChainReader, verify_chain, write_chain_file
from l2d.core.coin_tx import Burn, Mint, Transfer
from l2d.core.commit import Commit, sign_block
from l2d.core.errors import L2Error, Rejected
from l2d.core.fl_tx import FlFinish, FlJobPost, FlReclaim, FlRegister, FlRound, RoundParticipant
from l2d.core.genesis_file import FederationGenesis
from l2d.core.header_file import MAGIC as HEADERS_MAGIC
from l2d.core.header_file import load_header_file, write_header_file
from l2d.core.kofn import FederationOutput, KofN
from l2d.core.model_tx import (DEFAULT_SPLIT, Completion, CompletionChallenge, CompletionReferee, ModelFormat,
                               ModelRegister, ModelServe, TopK, fp_leaf, sign_result)
from l2d.core.params import LOCAL, NETWORKS, REGTEST, Network
from l2d.core.payload import Payload
from l2d.core.pegs import (FUNDING_CONTRACT, Federation, deposit_script_pubkey, federation_genesis, pegin_tweak,
                           script_address)
from l2d.core.pegs_tx import (AnchorMode, AnchorPlan, BtcHeaders, FederationFund, PeginClaim, PegoutPlan, PegoutStatus,
                              PegoutUpdate, PlanCompleted, PlanSignature, RollPlan)
from l2d.core.plans import PlanEntry, plan_key, plan_tx
from l2d.core.relay_tx import Measurement, RelayExit, RelayHeartbeat, RelayRegister, RelayWeights, RelayWithdraw
from l2d.core.rules import apply_tx
from l2d.core.session_tx import Receipt, SessionClose, SessionOpen, SessionSettle
from l2d.core.snapshot import MAGIC as SNAPSHOT_MAGIC
from l2d.core.snapshot import SnapshotHeader, read_snapshot, verify_snapshot, write_snapshot
from l2d.core.spv import (BITCOIN_REGTEST, Header, bits_to_target, build_partial_merkle_tree, compute_merkle_root,
                          make_header, serialize_merkleblock)
from l2d.core.state import LOCKED_KEY, SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, genesis_state
from l2d.core.tree import Proof, ProofKind, StateTree, verify_proof
from l2d.core.tx import Transaction, check_signature, decode, encode_body, public_key, sign, signature_ok
from l2d.core.work_tx import (FP_ENTRY, Role, TaskAssign, TaskCancel, TaskDispute, TaskReassign, TaskResolve,
                              TaskResult, TaskSettle, TaskSubmit, WorkerCaps, WorkerExit, WorkerHeartbeat,
                              WorkerRegister, WorkerWithdraw)
from verify_tool.cli import main as l2_verify

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
NOW = 1_900_000_000  # "now" of the header rules (2-hour future limit): fixed, so a run is reproducible
RULES = Rules(LOCAL, 1)
HEIGHT = 10  # the L2 height the fuzzed transactions are applied at
_ID_TO_NETWORK = {n.id: n for n in NETWORKS.values()}
_sha = hashlib.sha256
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]  # raises nothing but a finding: expected refusals are caught inside
    seeds: Callable[[], list[bytes]]  # valid (or nearly valid) encodings to start mutating from


def _try(fn: Callable[..., T], *args: Any, **kw: Any) -> Optional[T]:
    """fn's result, or None when fn refused the input with one of the core's typed errors."""
    try:
        return fn(*args, **kw)
    except L2Error:
        return None


def reseal(data: bytes) -> bytes:
    """data with its last 32 bytes replaced by the SHA-256 of the rest (the trailer of every checksummed file)."""
    return data[:-32] + _sha(data[:-32]).digest() if len(data) >= 32 else data


def secret(n: int) -> bytes:
    return _sha(b"l2d fuzz key %d" % n).digest()


def pk(n: int) -> bytes:
    return public_key(secret(n))


def h(label: str) -> bytes:
    return _sha(label.encode()).digest()


# -- transactions: a small chain with something of every kind in it ----------------------------------------------
MINT_AUTHORITY, FEDERATION = 7, 8  # key numbers; 1..6 hold money
SESSION_KEY = 11  # the key that signs the world's session receipts
CAPS = WorkerCaps(0, 0, 10, 500_000, 200, 2, b"eu", (b"digits-mlp",), b"127.0.0.1:1234")


def node_key(n: int) -> bytes:
    return b"ecdsa-sha2-nistp384 " + base64.b64encode(hashlib.sha512(b"node %d" % n).digest())


def fingerprint(classes: list[int]) -> bytes:
    return b"".join(FP_ENTRY.pack((c + j) % 10, q) for c in classes for j, q in enumerate((1000, 500, 100)))


@dataclass
class Chain:
    state: dict[bytes, bytes]
    nonces: dict[int, int]
    height: int = 1

    def sign(self, n: int, payload: Payload, fee: Optional[int] = None) -> Transaction:
        fee = (0 if payload.FEELESS else 1) if fee is None else fee
        return sign(LOCAL, secret(n), self.nonces.get(n, 0), fee, payload, b"\0" * 32)

    def apply(self, n: int, payload: Payload) -> Transaction:
        """Sign and apply (it must be accepted): the chain moves on."""
        t = self.sign(n, payload)
        view = StateView(self.state.get, self.height)
        apply_tx(view, t, RULES)
        for k, v in view.writes.items():
            if v is None:
                self.state.pop(k, None)
            else:
                self.state[k] = v
        self.nonces[n] = self.nonces.get(n, 0) + 1
        self.height += 1
        return t


@dataclass(frozen=True)
class World:
    state: dict[bytes, bytes]  # the base state the fuzzed transactions are applied to
    seeds: list[Transaction]  # one or more signed transactions of every type, at the senders' next nonces


BRIDGE_KEYS = (9, 10)  # the federation's Bitcoin keys (secret numbers), 1-of-2
BRIDGE_FED = Federation(1, tuple(sorted(PrivateKey(secret(n)).public_key.format() for n in BRIDGE_KEYS)), 1)
PAYOUT_ADDRESS = (script_address(b"\x00\x14" + h("payout")[:20], LOCAL) or "").encode()
ANCHORED = 100  # the L2 height of the FINAL anchor the world's peg-out plan names


@cache
def world() -> World:
    """A chain with an FL job (two participants, one round), three workers and an assigned task, and a bridge: relayed
    Bitcoin headers, a claimed deposit (a federation coin), a peg-out under a FINAL anchor and a plan paying it,
    signed by key 9 (so it can be broadcast, and replaced; key 10's signature is a seed)."""
    state = genesis_state([(pk(n), 10**10) for n in range(1, 7)], pk(MINT_AUTHORITY), (pk(FEDERATION),))
    state.update(federation_genesis(BRIDGE_FED))
    c = Chain(state, {})
    job = c.apply(1, FlJobPost(100_000, h("config"), 3, 2, 4)).txid
    c.apply(2, FlRegister(job, node_key(2)))
    c.apply(3, FlRegister(job, node_key(3)))
    parts = tuple(sorted((RoundParticipant(pk(2), 120, True), RoundParticipant(pk(3), 80, True)),
                         key=lambda p: p.key))
    c.apply(FEDERATION, FlRound(job, 1, h("params 1"), h("params 0"), 900_000, 350_000, 9640, 0, parts))
    for n in (3, 4, 5):
        c.apply(n, WorkerRegister(1000, CAPS))
    task = c.apply(1, TaskSubmit(500, 0, 20, b"digits-mlp", b"", bytes(128))).txid
    task2 = c.apply(6, TaskSubmit(300, 0, 20, b"digits-mlp", b"", bytes(64))).txid
    c.apply(FEDERATION, TaskAssign(task, pk(3), pk(4), pk(5), 100, 5, 30))
    c.apply(3, TaskResult(task, bytes([3, 4]), fingerprint([3, 4])))
    deposit, merkle_block = bytes.fromhex(_deposit_tx_hex()), _deposit_merkleblock()
    c.apply(FEDERATION, BtcHeaders(1, tuple(x.serialize() for x in _bridge_headers()[:4])))
    coin = (_sha(_sha(deposit).digest()).digest(), 1)
    c.apply(3, PeginClaim(3, coin[1], deposit, merkle_block))
    free = ((coin[0], 3), (coin[0], 4))
    c.apply(5, PeginClaim(3, 3, deposit, merkle_block))
    c.apply(6, PeginClaim(3, 4, deposit, merkle_block))
    pegout = c.apply(4, Burn(100_000, PAYOUT_ADDRESS)).txid
    pegout2 = c.apply(4, Burn(100_000, PAYOUT_ADDRESS)).txid
    c.apply(FEDERATION, AnchorUpdate(ANCHORED, h("root"), h("btc tx"), h("btc block"), 102, AnchorStatus.FINAL))
    c.apply(FEDERATION, PegoutPlan(ANCHORED, 2, b"\0" * 32, (coin,), (pegout,)))
    (plan_id,) = [k[1:] for k in c.state if k[0] == Namespace.PLAN]
    ptx = plan_tx(StateView(c.state.get), BRIDGE_FED, LOCAL.id, PlanEntry.decode(c.state[plan_key(plan_id)]))

    def plan_signature(n: int) -> PlanSignature:
        key = PrivateKey(secret(n)).public_key.format()
        tweaked = PrivateKey(secret(n)).add(pegin_tweak(key, LOCAL.id, ptx.coins[0].contract))
        sig = tweaked.sign(ptx.sighash(0), hasher=None) + b"\x01"
        return PlanSignature(plan_id, BRIDGE_FED.keys.index(key), (sig,))

    c.apply(FEDERATION, plan_signature(BRIDGE_KEYS[0]))
    session = c.apply(1, SessionOpen(pk(2), pk(SESSION_KEY), 50_000, 1000, 1, 10**6)).txid
    c.apply(2, RelayRegister(3000, h("x25519 2"), h("operator"), 3, 1000, 2_000_000, b"127.0.0.1:9050"))
    c.apply(1, ModelRegister(h("weights"), ModelFormat.GGUF, 8192, b"SmolLM2-135M-Instruct", b"Q4_1"))
    c.apply(4, ModelServe(h("weights"), 4096, 1_000, 4_000))
    billed = c.apply(1, SessionOpen(pk(2), pk(SESSION_KEY), 50_000, 1, 1, 10**6)).txid
    seeds = [
        c.sign(1, Transfer(pk(2), 1000)), c.sign(MINT_AUTHORITY, Mint(pk(2), 5000)), c.sign(2, Burn(700, b"")),
        c.sign(FEDERATION, AnchorUpdate(5, h("root"), h("btc tx"), h("btc block"), 101, AnchorStatus.CONFIRMED)),
        c.sign(FEDERATION, AnchorUpdate(6, h("root"), h("btc tx"), b"\0" * 32, 0, AnchorStatus.SUBMITTED)),
        c.sign(FEDERATION, BtcHeaders(5, (_bridge_headers()[4].serialize(),))),
        c.sign(FEDERATION, PegoutUpdate(pegout, PegoutStatus.BROADCAST, plan_id, ANCHORED)),
        c.sign(2, PeginClaim(3, 0, deposit, merkle_block)),
        c.sign(FEDERATION, FederationFund(3, 2, deposit, merkle_block)),
        c.sign(FEDERATION, PegoutPlan(ANCHORED, 3, plan_id, (coin,), (pegout,))),  # a replacement by fee
        c.sign(FEDERATION, PegoutPlan(ANCHORED, 2, b"\0" * 32, free, (pegout2,))),  # a fresh plan of two coins
        c.sign(FEDERATION, plan_signature(BRIDGE_KEYS[1])),
        c.sign(FEDERATION, RollPlan(2, b"\0" * 32, free)),  # refused: this federation has no emergency path
        c.sign(FEDERATION, PlanCompleted(plan_id)),  # refused: a peg-out plan completes through PegoutUpdate
        c.sign(FEDERATION, AnchorPlan(ANCHORED + 4, AnchorMode.TAPROOT, h("root"), b"\0" * 32, 2, b"\0" * 32,
                                      ((coin[0], 2),))),  # the funding deposit is not recorded: refused
        c.sign(6, WorkerRegister(2000, CAPS)), c.sign(4, WorkerHeartbeat()), c.sign(5, WorkerExit()),
        c.sign(4, WorkerWithdraw()),
        c.sign(FEDERATION, TaskAssign(task2, pk(4), pk(5), b"\0" * 32, 100, 5)),
        c.sign(4, TaskResult(task, bytes([3, 4]), fingerprint([3, 4]))),
        c.sign(FEDERATION, TaskReassign(task, Role.WORKER, pk(3), pk(4), 120)),
        c.sign(FEDERATION, TaskSettle(task, 400, 50, 50)), c.sign(5, TaskDispute(task, pk(5), 30)),
        c.sign(FEDERATION, TaskResolve(task, Role.WORKER, 100, 50, 0, 40, 40, 20)), c.sign(6, TaskCancel(task2)),
        c.sign(1, TaskSubmit(500, 300_000, 20, b"digits-mlp", b"eu", bytes(range(17)) * 7 + bytes(9))),
        c.sign(4, FlRegister(job, node_key(4))),
        c.sign(FEDERATION, FlRound(job, 2, h("params 2"), h("params 1"), 910_000, 340_000, 9640, 1_234, parts)),
        c.sign(FEDERATION, FlFinish(job, h("params 1"), tuple(sorted(((pk(2), 60_000), (pk(3), 40_000)))))),
        c.sign(1, FlReclaim(job)), c.sign(1, FlJobPost(5000, h("config 2"), 2, 2, 2)),
        c.sign(1, SessionOpen(pk(3), pk(SESSION_KEY), 7000, 2_000_000, 1 << 20, 10**5)),
        c.sign(2, SessionSettle(Receipt.sign(LOCAL.id, PrivateKey(secret(SESSION_KEY)), session, 1, 500, 500))),
        c.sign(2, SessionClose(session)),
        c.sign(3, RelayRegister(2000, h("x25519 3"), h("operator 3"), 1, 500, 1_000_000, b"relay.example:443")),
        c.sign(2, RelayHeartbeat()), c.sign(2, RelayExit()), c.sign(2, RelayWithdraw()),  # refused: not exited
        c.sign(FEDERATION, RelayWeights(1, (Measurement(pk(2), 900, 900_000),))),
        c.sign(2, ModelRegister(h("weights 2"), ModelFormat.SAFETENSORS, 2048, b"tiny", b"1.0")),
        c.sign(3, ModelServe(h("weights"), 4096, 1_000, 4_000)),
        c.sign(2, Completion(billed, pk(4), h("weights"), b"\0" * 32, h("prompt"), h("output"), h("fingerprint"), 30,
                             200, 830, 0, 0, 0, *DEFAULT_SPLIT, sign_result(
                                 secret(4), LOCAL.id, h("weights"), h("prompt"), h("output"), h("fingerprint"), 30,
                                 200, 0, 0, 0))),
        c.sign(3, CompletionChallenge(h("completion"), (fp_leaf(5, (5, 1, 2, 3), (160, 150, 140, -130)),),
                                      ((h("sibling 1"), h("sibling 2")),), (TopK((5, 1, 2, 3), (170, 150, 140, 0)),))),
        c.sign(3, CompletionReferee(h("completion"), (TopK((5, 1, 2, 3), (170, 150, 140, 0)),))),
    ]
    return World(c.state, seeds)


@cache
def _deposit_tx_hex() -> str:
    """A one-input transaction to the federation: 50 000 sat to key 2's deposit address (the claim seed), 400 000 to
    key 3's (claimed in the world: the coin its plan spends), 100 000 to the funding address (the funding seed),
    60 000 and 70 000 to keys 5's and 6's (claimed in the world: the coins of the fresh plan seed, both needed)."""
    outs = [(50_000, pk(2)), (400_000, pk(3)), (100_000, FUNDING_CONTRACT), (60_000, pk(5)), (70_000, pk(6))]
    return ("0100000001" + "11" * 32 + "00000000" + "00" + "ffffffff" + "05"
            + "".join(v.to_bytes(8, "little").hex() + "22" + deposit_script_pubkey(BRIDGE_FED, LOCAL.id, c).hex()
                      for v, c in outs) + "00000000")


@cache
def _deposit_block() -> tuple[Header, bytes]:
    """The header at height 3 (after header_chain()[2]) of the block holding the deposit, and its merkle block."""
    txid = _sha(_sha(bytes.fromhex(_deposit_tx_hex())).digest()).digest()
    other = h("other tx")
    root, _ = compute_merkle_root([txid, other])
    header = grind(header_chain()[2].hash, root, header_chain()[2].time + 600)
    return header, serialize_merkleblock(header, build_partial_merkle_tree([txid, other], [True, False]))


def _deposit_merkleblock() -> bytes:
    return _deposit_block()[1]


@cache
def _bridge_headers() -> tuple[Header, ...]:
    """The Bitcoin headers of heights 1..5 the world's bridge follows: header_chain()'s 1 and 2, the deposit's block,
    and two more (heights 1..4 are relayed; 5 is the relay seed)."""
    out = [*header_chain()[1:3], _deposit_block()[0]]
    for height in (4, 5):
        out.append(grind(out[-1].hash, h("bridge block %d" % height), out[-1].time + 600))
    return tuple(out)


def run_tx_decode(data: bytes) -> None:
    """decode() under the network the bytes name (local if none): canonical, and signature checks stay typed."""
    assert signature_ok(data) in (True, False)
    net = _ID_TO_NETWORK.get(data[1], LOCAL) if len(data) > 1 else LOCAL
    t = _try(decode, data, net)
    if t is None:
        return
    assert encode_body(t.network_id, t.sender, t.nonce, t.fee_sat, t.payload) + t.signature == data
    assert type(t.payload).decode(t.payload.encode()) == t.payload
    _try(check_signature, t)


def tx_seeds() -> list[bytes]:
    vectors = json.loads((VECTORS / "transactions.json").read_text())
    raws = [bytes.fromhex(v["raw"]) for v in vectors["valid"] + vectors["invalid"]]
    return raws + [t.raw for t in world().seeds]


def run_apply_tx(data: bytes) -> None:
    """apply_tx on a decoded (mutated) transaction, signature taken as checked so the rules themselves are reached:
    a refusal is a Rejected that wrote nothing; an accepted transaction keeps the supply invariant."""
    t = _try(decode, data, LOCAL)
    if t is None:
        return
    base = world().state
    view = StateView(base.get, HEIGHT)
    try:
        apply_tx(view, t, RULES, signature_checked=True)
    except Rejected:
        assert view.writes == {}, f"{t.type.name} rejected after writing {len(view.writes)} records"
        return
    after = {**base, **view.writes}
    balances = sum(Account.decode(v).balance_sat for k, v in after.items() if v is not None
                   and k[0] == Namespace.ACCOUNT)
    supply = Supply.decode(after[SUPPLY_KEY] or b"")
    locked = after.get(LOCKED_KEY)
    locked_sat = 0 if locked is None else int.from_bytes(locked, "big")
    assert balances + supply.fees_sat + locked_sat == supply.minted_sat - supply.burned_sat, (
        f"{t.type.name} broke the supply invariant")


# -- state proofs ----------------------------------------------------------------------------------------------------
@cache
def proof_tree() -> tuple[bytes, dict[bytes, bytes]]:
    """(root, items) of a 64-record tree whose keys share prefixes (deep proofs) and some long values."""
    items = {b"\x01" + h("acct %d" % i) : b"v%d" % i * (1 + i % 5) for i in range(48)}
    items.update({b"\x06" + b"\x55" * 31 + bytes((i,)): bytes(300 + i) for i in range(16)})
    t = StateTree()
    for k, v in items.items():
        t.set(k, v)
    return t.root(), items


def proof_seeds() -> list[bytes]:
    root, items = proof_tree()
    t = StateTree()
    for k, v in items.items():
        t.set(k, v)
    keys = sorted(items)
    probes = keys[::7] + [b"\x06" + b"\x55" * 31 + b"\xff", b"\x02" + b"\0" * 32, b"\x01" + keys[3][1:-1] + b"\0"]
    vectors = json.loads((VECTORS / "state_tree.json").read_text())
    return ([t.prove(k, items.__getitem__).encode() for k in probes]
            + [bytes.fromhex(v["proof"]) for v in vectors["proofs"]])


def run_proof(data: bytes) -> None:
    """Proof.decode is canonical; verify_proof against the seeds' root refuses with ProofError only."""
    p = _try(Proof.decode, data)
    if p is None:
        return
    assert p.encode() == data
    value = _try(verify_proof, proof_tree()[0], p)
    if value is not None:
        assert p.kind == ProofKind.PRESENT and value == p.value


# -- blocks --------------------------------------------------------------------------------------------------------
def block_seeds() -> list[bytes]:
    vectors = json.loads((VECTORS / "blocks.json").read_text())
    out = [bytes.fromhex(vectors["block"]["block_hex"])]
    txs = tuple(world().seeds[:6])
    for n in (0, 1, len(txs)):
        header = BlockHeader(LOCAL.id, 7, h("parent"), 1_700_000_000_000, n, tx_root([t.txid for t in txs[:n]]),
                             h("state"))
        out.append(Block(header, txs[:n]).encode())
    return out


def run_block(data: bytes) -> None:
    """Block.decode (header, count, every transaction, transaction root) is canonical."""
    for net in (LOCAL, REGTEST):
        b = _try(Block.decode, data, net)
        if b is not None:
            assert b.encode() == data


# -- snapshots -----------------------------------------------------------------------------------------------------
def snapshot_bytes(items: dict[bytes, bytes], network: Network = REGTEST, height: int = 1234) -> bytes:
    t = StateTree()
    for k, v in items.items():
        t.set(k, v)
    buf = io.BytesIO()
    write_snapshot(buf, network, height, h("block"), t.root(), sorted(items.items()), len(items))
    return buf.getvalue()


def snapshot_seeds() -> list[bytes]:
    _, items = proof_tree()
    few = dict(sorted(items.items())[:3])
    return [snapshot_bytes({}), snapshot_bytes(few, LOCAL, 0), snapshot_bytes(items)]


def _read_all(d: bytes) -> tuple[SnapshotHeader, list[tuple[bytes, bytes]]]:
    header, records = read_snapshot(io.BytesIO(d))
    return header, list(records)


def run_snapshot(data: bytes) -> None:
    """verify_snapshot and read_snapshot refuse with SnapshotError/DecodeError only; a verified snapshot is
    canonical (its records written back give the same bytes) and read_snapshot yields exactly its records."""
    for d in (data, reseal(data)):
        header = _try(verify_snapshot, io.BytesIO(d))
        got = _try(_read_all, d)
        if header is None:
            continue
        assert got is not None and got[0] == header and len(got[1]) == header.record_count
        net = _ID_TO_NETWORK.get(header.network_id, Network("other", header.network_id, False))
        buf = io.BytesIO()
        write_snapshot(buf, net, header.height, header.block_hash, header.state_root, got[1], header.record_count)
        assert buf.getvalue() == d


# -- Bitcoin headers, header files, audit bundles ------------------------------------------------------------------
REGTEST_GENESIS = make_header(1, b"\0" * 32,
                              bytes.fromhex("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")[::-1],
                              1296688602, 0x207FFFFF, 2)
_PACK = struct.Struct("<i32s32sIII")


def grind(prev: bytes, root: bytes, t: int, bits: int = 0x207FFFFF) -> Header:
    """A header meeting its target (regtest's: about two tries)."""
    target = bits_to_target(bits)
    base = _PACK.pack(0x20000000, prev, root, t, bits, 0)[:76]
    nonce = 0
    while True:
        raw = base + nonce.to_bytes(4, "little")
        hh = _sha(_sha(raw).digest()).digest()
        if int.from_bytes(hh, "little") <= target:
            return Header(0x20000000, prev, root, t, bits, nonce, hh)
        nonce += 1


@cache
def header_chain() -> tuple[Header, ...]:
    """Regtest genesis and 12 blocks on it."""
    chain = [REGTEST_GENESIS]
    for height in range(1, 13):
        chain.append(grind(chain[-1].hash, h("block %d" % height), chain[-1].time + 600))
    return tuple(chain)


def header_file(start: int, headers: tuple[Header, ...]) -> bytes:
    buf = io.BytesIO()
    write_header_file(buf, "regtest", start, len(headers), [x.serialize() for x in headers])
    return buf.getvalue()


def header_file_seeds() -> list[bytes]:
    chain = header_chain()
    return [header_file(0, chain), header_file(0, chain[:1]), header_file(5, chain[5:])]


def run_header_file(data: bytes) -> None:
    """load_header_file refuses with HeaderFileError/SpvError only; a file it loads is canonical."""
    for d in (data, reseal(data)):
        loaded = _try(load_header_file, io.BytesIO(d), now=NOW)
        if loaded is None:
            continue
        pre = 8 + 1 + 1 + len(loaded.chain_name) + 16
        body = d[pre:pre + loaded.count * 80]
        buf = io.BytesIO()
        write_header_file(buf, loaded.chain_name, loaded.start_height, loaded.count,
                          [body[i:i + 80] for i in range(0, len(body), 80)])
        assert buf.getvalue() == d


FED_KEY = PrivateKey(_sha(b"l2d fuzz federation key").digest()).public_key_xonly.format()
KOFN = KofN.of(2, [PrivateKey(_sha(b"l2d fuzz member key %d" % i).digest()).public_key_xonly.format() for i in range(3)])


def _btc_tx(script: bytes, value: int, i: int) -> bytes:
    return (b"\x01\x00\x00\x00\x01" + h("prev %d" % i) + b"\0\0\0\0\x00\xfd\xff\xff\xff\x01"
            + value.to_bytes(8, "little") + bytes((len(script),)) + script + b"\0\0\0\0")


def bundle_seeds() -> list[bytes]:
    """Complete bundles (OP_RETURN, k-of-n Taproot and Taproot anchors; snapshot and proof evidence) that verify."""
    root, items = proof_tree()
    keys = sorted(items)
    out = []
    for kind, evidence in ((AnchorKind.OP_RETURN, "proofs"), (AnchorKind.TAPROOT_KOFN, "proofs"),
                           (AnchorKind.TAPROOT, "snapshot")):
        record = AnchorRecord(REGTEST.id, 1234, root)
        t = StateTree()
        for k, v in items.items():
            t.set(k, v)
        ev = (SnapshotEvidence(snapshot_bytes(items)) if evidence == "snapshot" else
              ProofEvidence(root, tuple(t.prove(k, items.__getitem__) for k in (keys[1], keys[40],
                                                                               b"\x02" + b"\0" * 32))))
        script = (op_return_script(record) if kind == AnchorKind.OP_RETURN else
                  FederationOutput.anchor(KOFN, record).script_pubkey if kind == AnchorKind.TAPROOT_KOFN else
                  TaprootAnchor(record, FED_KEY).script_pubkey)
        txs = [_btc_tx(b"\x51", 50 * 10**8, 0), _btc_tx(script, 330, 1), _btc_tx(b"\x52", 1000, 2)]
        txids = [_sha(_sha(x).digest()).digest() for x in txs]
        merkle, _ = compute_merkle_root(txids)
        chain = list(header_chain()[:4])
        chain.append(grind(chain[-1].hash, merkle, chain[-1].time + 600))
        for _ in range(3):
            chain.append(grind(chain[-1].hash, h("after %d" % len(chain)), chain[-1].time + 600))
        mb = serialize_merkleblock(chain[4], build_partial_merkle_tree(txids, [False, True, False]))
        bundle = AuditBundle(REGTEST.id, record, kind, FED_KEY if kind == AnchorKind.TAPROOT else b"", txs[1], mb,
                             0, b"".join(x.serialize() for x in chain), ev,
                             kofn=KOFN if kind == AnchorKind.TAPROOT_KOFN else None)
        verify_bundle(bundle, REGTEST, BITCOIN_REGTEST, None, 1, now=NOW)  # the seed is valid
        out.append(bundle.encode())
    # a version 2 bundle: the anchored L2 block's header and its commit by the vector federation's members 0..2
    last = AuditBundle.decode(out[-1])
    fed = federation()
    block = BlockHeader(REGTEST.id, last.record.l2_height, h("parent"), 1_700_000_000_000, 0, tx_root([]),
                        last.record.state_root)
    secrets = _commit_vectors()["memberships"][1]["secrets"]
    commit = Commit.assemble(4, {i: sign_block(bytes.fromhex(secrets[i]), REGTEST, block.hash, bytes(32))
                                 for i in range(3)})
    v2 = dataclasses.replace(last, commit=CommitEvidence(block, commit))
    verify_bundle(v2, REGTEST, BITCOIN_REGTEST, None, 1, now=NOW, federation=fed)
    out.append(v2.encode())
    return out


def run_audit(data: bytes) -> None:
    """AuditBundle.decode is canonical; verify_bundle refuses with the core's typed errors only (with and without
    the vector federation's members)."""
    for d in (data, reseal(data)):
        b = _try(AuditBundle.decode, d)
        if b is None:
            continue
        assert b.encode() == d
        net = _ID_TO_NETWORK[b.network_id]
        _try(verify_bundle, b, net, BITCOIN_REGTEST, None, 1, now=NOW)
        if b.commit is not None:
            _try(verify_bundle, b, net, BITCOIN_REGTEST, None, 1, now=NOW, federation=federation())


# -- federation genesis files and chain files ----------------------------------------------------------------------
@cache
def _commit_vectors() -> Any:
    return json.loads((VECTORS / "commits.json").read_text())


@cache
def federation() -> FederationGenesis:
    """The 3-of-4 regtest federation of tests/vectors/commits.json."""
    return FederationGenesis.decode(_commit_vectors()["genesis_files"]["3-of-4/regtest"].encode())


def genesis_file_seeds() -> list[bytes]:
    first = federation().encode()  # the one the chain seeds verify against
    texts = [first] + [t.encode() for t in _commit_vectors()["genesis_files"].values() if t.encode() != first]
    return texts + [json.dumps(json.loads(first), separators=(",", ":")).encode()]


def run_genesis_file(data: bytes) -> None:
    """FederationGenesis.decode refuses with GenesisFileError only; what it accepts re-encodes to the canonical text,
    which decodes to the same value."""
    g = _try(FederationGenesis.decode, data)
    if g is None:
        return
    canonical = g.encode()
    assert FederationGenesis.decode(canonical) == g
    assert canonical == data or json.loads(data) == json.loads(canonical), (data, canonical)


def chain_file_seeds() -> list[bytes]:
    v = _commit_vectors()
    seeds = [bytes.fromhex(v["chain"]["chain_file"])]
    seeds += [bytes.fromhex(c["chain_file"]) for c in v["commits"] + v["invalid_commits"]
              if c["membership"] == "3-of-4"]
    # the same chain from block 2 (verified from a checkpoint at block 1)
    reader = ChainReader(io.BytesIO(seeds[0]))
    entries = [(e.header, e.commit) for e in reader.entries()][2:]
    buf = io.BytesIO()
    write_chain_file(buf, REGTEST, 2, len(entries), entries)
    return seeds + [buf.getvalue()]


def _chain_entries(d: bytes) -> Optional[list[tuple[BlockHeader, Commit]]]:
    reader = ChainReader(io.BytesIO(d))
    return [(e.header, e.commit) for e in reader.entries()]


def run_chain_file(data: bytes) -> None:
    """ChainReader and verify_chain (against the vector federation; a later start from a checkpoint at the first
    block's parent) refuse with ChainFileError only; a file that reads back is canonical: the writer, given its
    entries, writes the same bytes."""
    for d in (data, reseal(data)):
        entries = _try(_chain_entries, d)
        if entries is not None:
            start = entries[0][0].height if entries else 0
            buf = io.BytesIO()
            write_chain_file(buf, _ID_TO_NETWORK[d[9]], int.from_bytes(d[10:18], "big"), len(entries), entries)
            assert buf.getvalue() == d
            checkpoint = (start - 1, entries[0][0].prev_hash) if start > 1 else None
            _try(verify_chain, io.BytesIO(d), federation(), checkpoint)
        else:
            _try(verify_chain, io.BytesIO(d), federation())


# -- l2-verify -----------------------------------------------------------------------------------------------------
@cache
def _input_path() -> Path:
    return Path(tempfile.mkdtemp(prefix="l2d-fuzz-")) / "input"


@cache
def _genesis_path() -> Path:
    p = _input_path().with_name("genesis.json")
    p.write_bytes(federation().encode())
    return p


@cache
def _chain_path() -> Path:
    p = _input_path().with_name("chain.l2chain")
    p.write_bytes(chain_file_seeds()[0])
    return p


def l2_verify_seeds() -> list[bytes]:
    proofs = proof_seeds()
    return (snapshot_seeds()[1:] + proofs[:2] + [proofs[0].hex().encode() + b"\n"] + header_file_seeds()[:1]
            + bundle_seeds()[:1] + bundle_seeds()[-1:] + chain_file_seeds()[:1] + genesis_file_seeds()[:1])


def run_l2_verify(data: bytes) -> None:
    """l2-verify's main on the bytes as a file, with the command for the file's magic (proof for anything else):
    exit code 0, 1 or 2, never an exception; with --json one JSON object that agrees with the exit code.
    Checksummed files are also tried resealed."""
    path = _input_path()
    root = proof_tree()[0].hex()
    f = str(path)
    if data.startswith(SNAPSHOT_MAGIC):
        argv = ["snapshot", f, "--expect-root", root]
    elif data.startswith(HEADERS_MAGIC):
        argv = ["headers", f]
    elif data.startswith(BUNDLE_MAGIC):
        argv = ["audit", f] + (["--members", str(_genesis_path())] if data[8:9] == b"\x02" else [])
    elif data.startswith(CHAIN_MAGIC):
        argv = ["chain", f, "--members", str(_genesis_path())]
    elif data.startswith(b"{"):  # a genesis file, given to `chain` with the vector chain file
        argv = ["chain", str(_chain_path()), "--members", f]
    else:
        argv = ["proof", "--root", root, f]
    want_json = len(data) % 2 == 0
    if want_json:
        argv.append("--json")
    for d in (data, reseal(data)) if argv[0] != "proof" and not data.startswith(b"{") else (data,):
        path.write_bytes(d)
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = l2_verify(argv)
        assert code in (0, 1, 2), (argv, code)
        assert "Traceback" not in err.getvalue()
        if want_json:
            obj = json.loads(out.getvalue())
            assert obj["exit_code"] == code and obj["ok"] == (code == 0), obj


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("tx_decode", run_tx_decode, tx_seeds),
    Target("apply_tx", run_apply_tx, tx_seeds),
    Target("proof", run_proof, proof_seeds),
    Target("block", run_block, block_seeds),
    Target("snapshot", run_snapshot, snapshot_seeds),
    Target("header_file", run_header_file, header_file_seeds),
    Target("audit", run_audit, bundle_seeds),
    Target("genesis_file", run_genesis_file, genesis_file_seeds),
    Target("chain_file", run_chain_file, chain_file_seeds),
    Target("l2_verify", run_l2_verify, l2_verify_seeds),
)}
