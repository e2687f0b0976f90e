"""Recompute every committed vector in tests/vectors/ from its inputs and compare byte for byte."""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from pathlib import Path
from typing import Any, Optional

import pytest
from bitcoin.core import CTransaction
from coincurve import PrivateKey, PublicKey, PublicKeyXOnly

from l2d.core import chain_file, errors
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_format import AnchorRecord, tapleaf_hash
from l2d.core.anchor_tx import AnchorStatus
from l2d.core.audit import AnchorKind, AuditBundle, AuditReport, verify_bundle
from l2d.core.block import Block, BlockHeader, check_link, genesis_header, tx_root
from l2d.core.chain_file import verify_chain
from l2d.core.codec import Reader
from l2d.core.coin_tx import Burn, Mint, Transfer
from l2d.core.commit import Commit, commit_sighash, sign_block, signature_valid
from l2d.core.errors import BadSignature, DecodeError, ProofError
from l2d.core.genesis_file import FederationGenesis
from l2d.core.kofn import FederationOutput, KofN, commitment_leaf
from l2d.core.members import Membership
from l2d.core.model import ChallengeRecord, CompletionRecord, CompletionStatus, Loser, ModelRecord, OfferRecord
from l2d.core.work import WorkerRecord
from l2d.core.params import network_by_name
from l2d.core.payload import Payload
from l2d.core.pegs import (CHANGE_CONTRACT, FUNDING_CONTRACT, CoinKind, FedCoin, Federation, PegoutEntry, coin_key,
                           deposit_script_pubkey, federation, pegin_tweak, pegout_key, script_address, tweaked_key)
from l2d.core.pegs_tx import PegoutPlan, PegoutStatus, PlanCompleted, PlanSignature, RollPlan
from l2d.core.plans import (PlanEntry, PlanStatus, anchor_policy, anchor_tip, plan_key, plan_signatures, plan_tx,
                            price, price_roll, vsize_bound)
from l2d.core.relay import RelayRecord
from l2d.core.rules import apply_tx
from l2d.core.session import SessionRecord, SessionStatus, StaleReceipt, session_key
from l2d.core.session_tx import Receipt
from l2d.core.spv import BITCOIN_REGTEST
from l2d.core.state import Namespace, Rules, StateView, genesis_state, is_member
from l2d.core.tree import (ROOT_REF, Proof, ProofKind, RootBuilder, StateTree, TreeOverlay, build_tree, prove_stored,
                           reference_root, root_of, stored_root, verify_proof)
from l2d.core.tx import check_signature, decode, sign, signature_ok

VECTORS = Path(__file__).resolve().parents[2] / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


TXS = load("transactions.json")
TREE = load("state_tree.json")
BLOCKS = load("blocks.json")
KINDS = {"present": ProofKind.PRESENT, "absent-empty": ProofKind.ABSENT_EMPTY, "absent-other": ProofKind.ABSENT_OTHER}


def x(s: str) -> bytes:
    return bytes.fromhex(s)


def payload_of(v: dict[str, Any]) -> Payload:
    p = v["payload"]
    if v["type"] == "burn":
        return Burn(p["amount_sat"], x(p["destination"]))
    cls = {"transfer": Transfer, "mint": Mint}[v["type"]]
    return cls(x(p["recipient"]), p["amount_sat"])


def error_class(name: str) -> type[Exception]:
    cls = getattr(errors, name)
    assert isinstance(cls, type) and issubclass(cls, errors.L2Error)
    return cls


# ---------------------------------------------------------------------------------------------- transactions


def test_transaction_vectors_cover_every_type_and_network() -> None:
    assert {v["type"] for v in TXS["valid"]} == {"transfer", "mint", "burn"}
    assert len({v["network"] for v in TXS["valid"]}) >= 3


@pytest.mark.parametrize("v", TXS["valid"], ids=[v["name"] for v in TXS["valid"]])
def test_transaction_vector(v: dict[str, Any]) -> None:
    net = network_by_name(v["network"])
    assert net.id == v["network_id"]
    secret = x(v["secret"])
    assert PrivateKey(secret).public_key_xonly.format().hex() == v["sender"]
    payload = payload_of(v)
    assert payload.encode().hex() == v["payload_hex"]
    t = sign(net, secret, v["nonce"], v["fee_sat"], payload, x(v["aux"]))
    assert t.raw.hex() == v["raw"]
    assert t.sighash.hex() == v["sighash"]
    assert t.txid.hex() == v["txid"]
    got = decode(x(v["raw"]), net)
    assert got == t
    assert (got.sender.hex(), got.nonce, got.fee_sat, got.payload) == (v["sender"], v["nonce"], v["fee_sat"], payload)
    check_signature(got)
    assert signature_ok(got.raw)


@pytest.mark.parametrize("v", TXS["invalid"], ids=[v["name"] for v in TXS["invalid"]])
def test_invalid_transaction_vector(v: dict[str, Any]) -> None:
    net, raw = network_by_name(v["network"]), x(v["raw"])
    cls = error_class(v["error"])
    if cls is BadSignature:
        t = decode(raw, net)
        with pytest.raises(BadSignature):
            check_signature(t)
        assert not signature_ok(raw)
        return
    assert issubclass(cls, DecodeError)
    with pytest.raises(cls) as info:
        decode(raw, net)
    assert type(info.value) is cls


# ---------------------------------------------------------------------------------------------- state tree

SETS = {s["name"]: s for s in TREE["sets"]}


def replay_stored(history: list[list[str]]) -> dict[bytes, bytes]:
    """The stored tree (path key -> node) after the history, one TreeOverlay per operation (as blocks would)."""
    store: dict[bytes, bytes] = {}
    for op in history:
        overlay = TreeOverlay(store.get)
        if op[0] == "set":
            overlay.set(x(op[1]), x(op[2]))
        else:
            overlay.delete(x(op[1]))
        ch = overlay.changes()
        for path in ch.deletes:
            store.pop(path, None)
        store.update(ch.puts)
        store.pop(ROOT_REF, None)
        if ch.root_ref:
            store[ROOT_REF] = ch.root_ref
    return store


def replay(history: list[list[str]]) -> tuple[StateTree, dict[bytes, bytes]]:
    tree, model = StateTree(), {}
    for op in history:
        if op[0] == "set":
            tree.set(x(op[1]), x(op[2]))
            model[x(op[1])] = x(op[2])
        else:
            assert op[0] == "delete" and len(op) == 2
            tree.delete(x(op[1]))
            model.pop(x(op[1]), None)
    return tree, model


def test_tree_vectors_cover_the_required_sets() -> None:
    sizes = {n: len(s["items"]) for n, s in SETS.items()}
    assert sizes["empty"] == 0 and sizes["one-key"] == 1 and sizes["two-keys-long-prefix"] == 2
    assert sizes["fifty-keys"] == 50
    assert any(op[0] == "delete" for op in SETS["with-deletions"]["history"])
    assert {p["kind"] for p in TREE["proofs"]} == set(KINDS)


@pytest.mark.parametrize("name", SETS)
def test_tree_set_vector(name: str) -> None:
    s = SETS[name]
    root = x(s["root"])
    items = [(x(k), x(v)) for k, v in s["items"]]
    assert [k for k, _ in items] == sorted({k for k, _ in items})  # strictly increasing
    tree, model = replay(s["history"])
    assert model == dict(items)
    assert tree.root() == root
    assert len(tree) == len(items)
    b = RootBuilder()
    for k, v in items:
        b.add(k, v)
    assert b.root() == root
    assert reference_root(dict(items)) == root
    assert root_of(reversed(items)) == root
    fresh = StateTree()
    for k, v in reversed(items):
        fresh.set(k, v)
    assert fresh.root() == root
    stored = replay_stored(s["history"])  # the daemon's stored tree: same root, same nodes as a bulk load
    assert stored_root(stored.get) == root
    bulk_root, bulk = build_tree(items)
    assert bulk_root == root and {**bulk.puts, **({ROOT_REF: bulk.root_ref} if bulk.root_ref else {})} == stored


@pytest.mark.parametrize("p", TREE["proofs"], ids=[p["name"] for p in TREE["proofs"]])
def test_proof_vector(p: dict[str, Any]) -> None:
    assert set(p) >= {"root", "proof", "expect", "value"}
    root, raw = x(p["root"]), x(p["proof"])
    proof = Proof.decode(raw)
    assert proof.encode() == raw
    assert proof.key.hex() == p["key"] and proof.kind == KINDS[p["kind"]] and len(proof.levels) == p["levels"]
    got: Optional[bytes] = verify_proof(root, proof)
    if p["expect"] == "present":
        assert got is not None and got.hex() == p["value"]
    else:
        assert p["expect"] == "absent" and p["value"] is None and got is None
    # the tree the proof came from produces exactly these bytes
    tree, model = replay(SETS[p["set"]]["history"])
    assert tree.root() == root
    assert tree.prove(proof.key, model.__getitem__).encode() == raw
    assert prove_stored(replay_stored(SETS[p["set"]]["history"]).get, proof.key, model.__getitem__).encode() == raw


@pytest.mark.parametrize("p", TREE["invalid_proofs"], ids=[p["name"] for p in TREE["invalid_proofs"]])
def test_invalid_proof_vector(p: dict[str, Any]) -> None:
    cls = error_class(p["error"])
    assert issubclass(cls, (DecodeError, ProofError))
    with pytest.raises(cls) as info:
        verify_proof(x(p["root"]), Proof.decode(x(p["proof"])))
    assert type(info.value) is cls


# ---------------------------------------------------------------------------------------------- blocks


def header_of(h: dict[str, Any]) -> BlockHeader:
    return BlockHeader(h["network_id"], h["height"], x(h["prev_hash"]), h["timestamp_ms"], h["tx_count"],
                       x(h["tx_root"]), x(h["state_root"]), h["version"])


def test_genesis_block_vector() -> None:
    net = network_by_name(BLOCKS["network"])
    g = BLOCKS["genesis"]
    state = genesis_state([(x(pk), amount) for pk, amount in g["alloc"]], x(g["mint_authority"]))
    assert root_of(state.items()).hex() == g["state_root"]
    header = genesis_header(net, g["header"]["timestamp_ms"], x(g["state_root"]))
    assert header == header_of(g["header"])
    assert header.encode().hex() == g["header_hex"]
    assert header.hash.hex() == g["hash"]
    assert Block(header, ()).encode().hex() == g["block_hex"]
    assert Block.decode(x(g["block_hex"]), net) == Block(header, ())


def test_block_vector() -> None:
    net = network_by_name(BLOCKS["network"])
    g, b = BLOCKS["genesis"], BLOCKS["block"]
    state = genesis_state([(x(pk), amount) for pk, amount in g["alloc"]], x(g["mint_authority"]))
    txs = [decode(x(raw), net) for raw in b["txs"]]
    assert [t.txid.hex() for t in txs] == b["txids"]
    tree = StateTree()
    for k, v in state.items():
        tree.set(k, v)
    view = StateView(state.get)
    for t in txs:
        apply_tx(view, t, Rules(net, BLOCKS["min_fee_sat"]))
    for k, v in view.writes.items():
        if v is None:
            tree.delete(k)
        else:
            tree.set(k, v)
    header = BlockHeader(net.id, 1, x(g["hash"]), b["header"]["timestamp_ms"], len(txs),
                         tx_root([t.txid for t in txs]), tree.root())
    assert header == header_of(b["header"])
    assert header.encode().hex() == b["header_hex"]
    assert header.hash.hex() == b["hash"]
    block = Block(header, tuple(txs))
    assert block.encode().hex() == b["block_hex"]
    assert Block.decode(x(b["block_hex"]), net) == block
    check_link(header_of(g["header"]), header)


# ---------------------------------------------------------------------------------------------- commits

COMMITS = load("commits.json")
MEMBERSHIPS = {m["name"]: m for m in COMMITS["memberships"]}


def membership_of(name: str) -> Membership:
    m = MEMBERSHIPS[name]
    return Membership(tuple(x(k) for k in m["keys"]), m["threshold"])


def federation_of(v: dict[str, Any]) -> FederationGenesis:
    return FederationGenesis.decode(COMMITS["genesis_files"][f"{v['membership']}/{v['network']}"].encode())


@pytest.mark.parametrize("m", COMMITS["memberships"], ids=[m["name"] for m in COMMITS["memberships"]])
def test_membership_vector(m: dict[str, Any]) -> None:
    keys = tuple(PrivateKey(x(sec)).public_key_xonly.format() for sec in m["secrets"])
    assert [k.hex() for k in keys] == m["keys"] and len(keys) == m["n"]
    members = Membership(keys, m["threshold"])
    assert members.encode().hex() == m["encoding"] and Membership.decode(x(m["encoding"])) == members


def test_commit_vectors_sign_the_block_vectors() -> None:
    by_net = {b["network"]: b for b in COMMITS["blocks"]}
    regtest = by_net["regtest"]
    assert regtest["header_hex"] == BLOCKS["block"]["header_hex"] and regtest["hash"] == BLOCKS["block"]["hash"]
    assert {v["name"] for v in COMMITS["invalid_commits"]} >= {
        "m-minus-1", "non-member-signature", "signed-for-another-network", "bit-above-n", "extra-signature",
        "signature-under-another-members-bit"}
    for b in COMMITS["blocks"]:
        net = network_by_name(b["network"])
        header = BlockHeader.decode(x(b["header_hex"]), net)
        assert header.hash.hex() == b["hash"] and header.prev_hash.hex() == b["genesis_hash"]
        assert commit_sighash(net, header.hash).hex() == b["sighash"]


@pytest.mark.parametrize("v", COMMITS["commits"], ids=[v["name"] for v in COMMITS["commits"]])
def test_commit_vector(v: dict[str, Any]) -> None:
    members = membership_of(v["membership"])
    net = network_by_name(v["network"])
    block_hash = x(v["block_hash"])
    assert v["signed_on"] == v["network"] and commit_sighash(net, block_hash).hex() == v["sighash"]
    secrets = MEMBERSHIPS[v["membership"]]["secrets"]
    sigs = {i: sign_block(x(secrets[i]), net, block_hash, x(aux)) for i, aux in zip(v["signers"], v["aux"])}
    assert [s.hex() for s in sigs.values()] == v["signatures"]
    commit = Commit.assemble(members.n, sigs)
    assert commit.encode().hex() == v["commit"] and Commit.decode(x(v["commit"])) == commit
    commit.verify(members, net, block_hash)
    assert all(signature_valid(members.keys[i], net, block_hash, s) for i, s in sigs.items())
    assert v["l2_verify"] is None
    fed = federation_of(v)
    assert fed.members == members
    assert verify_chain(io.BytesIO(x(v["chain_file"])), fed).tip_hash == block_hash


@pytest.mark.parametrize("v", COMMITS["invalid_commits"], ids=[v["name"] for v in COMMITS["invalid_commits"]])
def test_invalid_commit_vector(v: dict[str, Any]) -> None:
    cls = error_class(v["error"])
    with pytest.raises(cls) as info:
        Commit.decode(x(v["commit"])).verify(membership_of(v["membership"]), network_by_name(v["network"]),
                                             x(v["block_hash"]))
    assert type(info.value) is cls
    expected = getattr(chain_file, v["l2_verify"])
    with pytest.raises(expected) as chain_info:
        verify_chain(io.BytesIO(x(v["chain_file"])), federation_of(v))
    assert type(chain_info.value) is expected and chain_info.value.height == 1
    assert issubclass(expected, chain_file.ChainFileMalformed) == issubclass(cls, DecodeError)


def test_genesis_file_vectors_are_canonical() -> None:
    for key, text in COMMITS["genesis_files"].items():
        ms, net = key.split("/")
        g = FederationGenesis.decode(text.encode())
        assert g.encode().decode() == text
        assert g.network.name == net and g.members == membership_of(ms)
        assert g.member_ids == tuple(f"member-{i + 1}" for i in range(g.members.n))
        assert g.genesis.state_root.hex() == BLOCKS["genesis"]["state_root"]
    assert FederationGenesis.decode(COMMITS["genesis_files"]["3-of-4/regtest"].encode()).genesis_hash.hex() == \
        BLOCKS["genesis"]["hash"]


def test_chain_file_vector() -> None:
    c = COMMITS["chain"]
    fed = federation_of(c)
    raw = x(c["chain_file"])
    r = verify_chain(io.BytesIO(raw), fed)
    assert (r.tip_height, r.tip_hash.hex(), r.start_hash) == (c["tip_height"], c["tip_hash"], fed.genesis_hash)
    reader = chain_file.ChainReader(io.BytesIO(raw))
    entries = [(e.header, e.commit) for e in reader.entries()]
    assert [list(commit.signers) for _, commit in entries] == c["signers"]
    buf = io.BytesIO()
    chain_file.write_chain_file(buf, fed.network, 0, len(entries), entries)
    assert buf.getvalue() == raw


# ---------------------------------------------------------------------------------------------- generator


def test_committed_vectors_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("l2d_make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, text in mod.render().items():
        assert (VECTORS / name).read_text() == text, f"{name} is stale: run tests/vectors/make_vectors.py"


def test_worked_example_in_the_doc_matches_the_vector() -> None:
    doc = (Path(__file__).resolve().parents[3] / "docs" / "transaction-format.md").read_text()
    example = doc[doc.index("## Worked example"):]
    block = example[example.index("raw     = "):example.index("sighash = ")]
    raw = "".join(line.split("=")[-1].strip() for line in block.splitlines())
    v = next(v for v in TXS["valid"] if v["name"] == "transfer-basic")
    assert raw == v["raw"]
    assert v["sighash"] in example and v["txid"] in example


# ---------------------------------------------------------------------------------------------- k-of-n anchors

KOFN = load("audit_kofn.json")


@pytest.mark.parametrize("v", KOFN["outputs"], ids=lambda v: v["membership"])
def test_kofn_output_vector(v: dict[str, Any]) -> None:
    record = AnchorRecord.decode(x(KOFN["record"]), network_by_name("regtest"))
    policy = KofN.of(v["k"], [x(k) for k in reversed(v["keys"])])  # any order in, the sorted policy out
    assert [k.hex() for k in policy.keys] == v["keys"] and policy.encode().hex() == v["policy_encoding"]
    r = Reader(x(v["policy_encoding"]), "policy")
    assert KofN.read(r) == policy
    r.end()
    anchor, coin = FederationOutput.anchor(policy, record), FederationOutput(policy)
    assert policy.script.hex() == v["leaf_script"] and tapleaf_hash(policy.leaf).hex() == v["leaf_hash"]
    assert commitment_leaf(record).script.hex() == v["commitment_leaf_script"]
    assert tapleaf_hash(commitment_leaf(record)).hex() == v["commitment_leaf_hash"]
    assert (anchor.merkle_root.hex(), anchor.output_key.hex()) == (v["merkle_root"], v["output_key"])
    assert anchor.script_pubkey.hex() == v["script_pubkey"] and anchor.control_block.hex() == v["control_block"]
    assert (coin.script_pubkey.hex(), coin.control_block.hex()) == (v["coin_script_pubkey"], v["coin_control_block"])


def _verify_kofn_bundle(raw: bytes, members: Optional[str], now: int) -> AuditReport:
    fed = None if members is None else FederationGenesis.decode(COMMITS["genesis_files"][members].encode())
    return verify_bundle(AuditBundle.decode(raw), network_by_name("regtest"), BITCOIN_REGTEST, None, 1, now=now,
                         federation=fed)


@pytest.mark.parametrize("v", KOFN["bundles"], ids=lambda v: v["name"])
def test_kofn_bundle_vector(v: dict[str, Any]) -> None:
    raw = x(v["bundle"])
    b = AuditBundle.decode(raw)
    assert b.encode() == raw and b.anchor_kind == AnchorKind.TAPROOT_KOFN and b.kofn is not None
    assert (b.kofn.k, b.kofn.n) == (v["k"], v["n"])
    r = _verify_kofn_bundle(raw, v["members"], v["now"])
    assert (r.l2_height, r.state_root.hex(), r.txid[::-1].hex(), r.vout) == (v["l2_height"], v["state_root"],
                                                                             v["txid"], v["vout"])
    assert (r.block_hash[::-1].hex(), r.block_height, r.confirmations) == (v["block_hash"], v["block_height"],
                                                                           v["confirmations"])
    assert r.merkle_root.hex() == v["merkle_root"] and r.kofn == b.kofn
    assert (None if r.signers is None else list(r.signers)) == v["signers"]
    assert r.signers_checked is (v["members"] is not None)


@pytest.mark.parametrize("v", KOFN["invalid_bundles"], ids=lambda v: v["name"])
def test_invalid_kofn_bundle_vector(v: dict[str, Any]) -> None:
    now = KOFN["bundles"][0]["now"]
    with pytest.raises(errors.L2Error) as e:
        _verify_kofn_bundle(x(v["bundle"]), None, now)
    assert type(e.value).__name__ == v["error"]
    assert isinstance(e.value, errors.DecodeError) is (v["exit_code"] == 2)


# ---------------------------------------------------------------------------------------------- peg-out plans

PLANS = load("plans.json")


def _plan_state() -> dict[bytes, bytes]:
    return {x(k): x(v) for k, v in PLANS["state"]}


def _apply_vector_tx(state: dict[bytes, bytes], raw: str, vector: Optional[dict[str, Any]] = None,
                     height: Optional[int] = None, parent_hash: bytes = bytes(32)) -> dict[bytes, bytes]:
    """Decode and apply one of the vector's L2 transactions at the vector's height (or `height`); returns (and keeps)
    its writes."""
    vector = PLANS if vector is None else vector
    net = network_by_name(vector["network"])
    t = decode(x(raw), net)
    check_signature(t)
    view = StateView(state.get, vector["height"] if height is None else height, parent_hash)
    apply_tx(view, t, Rules(net, 1))
    writes = {k: v for k, v in view.writes.items() if v is not None}
    assert len(writes) == len(view.writes)
    state.update(writes)
    return writes


def test_plan_vector_state_records() -> None:
    net = network_by_name(PLANS["network"])
    state = _plan_state()
    f = PLANS["federation"]
    fed = federation(StateView(state.get))
    assert fed == Federation(f["threshold"], tuple(x(k) for k in f["keys"]), f["min_depth"])
    assert sorted(x(k) for k in f["keys"]) == sorted(
        PrivateKey(hashlib.sha256(b"l2d test key %d" % n).digest()).public_key.format() for n in f["secret_indexes"])
    assert [x(k) for k in f["keys"]] == [bytes.fromhex(k) for k in (  # docs/bridge.md's worked example
        "03404276a65796ea2a6fb62c01cb845948268bb62617741c2a13f8468c1e32b7ce",
        "03c0919eac88e96865fc78d454950dd7e4a2329fada6ec5071cb3b6ac7f647288b",
        "03cf3b900a23107688e4c5a00beb630586c8fa3d5aa8c380dcc9f9a714c2679aba")]
    assert is_member(StateView(state.get), x(PLANS["member"]["pubkey"]))
    assert PrivateKey(x(PLANS["member"]["secret"])).public_key_xonly.format().hex() == PLANS["member"]["pubkey"]
    for c in PLANS["coins"]:
        coin = FedCoin(x(c["btc_txid"]), c["vout"], c["amount_sat"], CoinKind[c["kind"]], x(c["contract"]))
        assert coin_key(coin.btc_txid, coin.vout).hex() == c["key"] and coin.encode().hex() == c["value"]
        assert state[x(c["key"])] == x(c["value"])
    for p in PLANS["pegouts"]:
        e = PegoutEntry(PegoutStatus.PENDING, p["amount_sat"], p["l2_height"], bytes(32), x(p["script_pubkey"]))
        assert pegout_key(x(p["id"])).hex() == p["key"] and e.encode().hex() == p["value"]
        assert state[x(p["key"])] == x(p["value"])
        assert script_address(e.script_pubkey, net) is not None  # a standard payout
    a = PLANS["anchor"]
    assert anchor_key(a["l2_height"]).hex() == a["key"] and state[x(a["key"])] == x(a["value"])
    assert AnchorEntry.decode(x(a["value"])).status == AnchorStatus.FINAL


def test_plan_vector() -> None:
    net = network_by_name(PLANS["network"])
    state = _plan_state()
    fed = federation(StateView(state.get))
    p = PLANS["plan"]
    payload = PegoutPlan(p["anchor_height"], p["feerate_sat_vb"], x(p["replaces"]),
                         tuple((x(t), v) for t, v in p["inputs"]), tuple(x(i) for i in p["pegouts"]))
    assert payload.encode().hex() == p["payload_hex"] and PegoutPlan.decode(x(p["payload_hex"])) == payload
    t = decode(x(p["tx"]), net)
    assert t.payload == payload and t.txid.hex() == p["l2_txid"] and t.sender.hex() == PLANS["member"]["pubkey"]
    coins = [FedCoin.decode(state[coin_key(*o)]) for o in payload.inputs]
    pegouts = [PegoutEntry.decode(state[pegout_key(i)]) for i in payload.pegouts]
    writes = _apply_vector_tx(state, p["tx"])
    assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == p["writes"]
    plan_id = x(p["plan_id"])
    assert plan_id[::-1].hex() == p["txid"] and state[plan_key(plan_id)].hex() == p["entry"]
    entry = PlanEntry.decode(state[plan_key(plan_id)])
    assert (entry.status, entry.fee_sat, list(entry.payouts), entry.change_sat) == (
        PlanStatus.PLANNED, p["fee_sat"], p["payouts"], p["change_sat"])
    priced = price(fed, net.id, coins, pegouts, payload.feerate_sat_vb)
    assert (priced.fee_sat, list(priced.payouts), priced.change_sat) == (p["fee_sat"], p["payouts"], p["change_sat"])
    assert vsize_bound(fed, net.id, coins, priced.outputs) == p["vsize"]
    assert p["fee_sat"] == p["vsize"] * p["feerate_sat_vb"] and sum(p["payouts"]) + p["fee_sat"] == sum(
        e.amount_sat for e in pegouts)
    assert deposit_script_pubkey(fed, net.id, CHANGE_CONTRACT).hex() == p["change_script_pubkey"]
    assert [deposit_script_pubkey(fed, net.id, c.contract).hex() for c in coins] == p["input_script_pubkeys"]
    ptx = plan_tx(StateView(state.get), fed, net.id, entry)
    assert ptx.tx.serialize().hex() == p["unsigned_tx"] and ptx.txid == plan_id
    assert [ws.hex() for ws in ptx.witness_scripts] == p["witness_scripts"]
    assert [ptx.sighash(i).hex() for i in range(len(coins))] == p["sighashes"]
    assert [(bytes(o.scriptPubKey).hex(), o.nValue) for o in ptx.tx.vout] == (
        [(e.script_pubkey.hex(), v) for e, v in zip(pegouts, p["payouts"])]
        + [(p["change_script_pubkey"], p["change_sat"])])


def test_plan_signature_vectors() -> None:
    net = network_by_name(PLANS["network"])
    state = _plan_state()
    fed = federation(StateView(state.get))
    p = PLANS["plan"]
    _apply_vector_tx(state, p["tx"])
    plan_id = x(p["plan_id"])
    sighashes = [x(s) for s in p["sighashes"]]
    contracts = [x(c["contract"]) for c in PLANS["coins"]]
    for s in PLANS["signatures"]:
        secret = hashlib.sha256(b"l2d test key %d" % s["secret_index"]).digest()
        key = PrivateKey(secret).public_key.format()
        assert key.hex() == s["key"] == fed.keys[s["key_index"]].hex()
        for i, contract in enumerate(contracts):
            tweaked = PrivateKey(secret).add(pegin_tweak(key, net.id, contract))
            assert tweaked.secret.hex() == s["tweaked_secrets"][i]
            assert tweaked.public_key.format().hex() == s["tweaked_keys"][i] == tweaked_key(key, net.id, contract).hex()
            sig = x(s["signatures"][i])
            assert tweaked.sign(sighashes[i], hasher=None) + b"\x01" == sig  # RFC 6979: deterministic
            assert PublicKey(x(s["tweaked_keys"][i])).verify(sig[:-1], sighashes[i], hasher=None)
        payload = PlanSignature(plan_id, s["key_index"], tuple(x(sig) for sig in s["signatures"]))
        assert payload.encode().hex() == s["payload_hex"] and decode(x(s["tx"]), net).payload == payload
        writes = _apply_vector_tx(state, s["tx"])
        assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == s["writes"]
        assert plan_signatures(state.get, plan_id, s["key_index"]) == payload.signatures


def test_plan_vector_signed_transaction() -> None:
    """The signed transaction has the plan's id as txid, and each input's witness is a CHECKMULTISIG spend: the empty
    dummy, m signatures in the order of their keys in the witness script, each verifying, then the script."""
    p = PLANS["plan"]
    signed = CTransaction.deserialize(x(PLANS["signed_tx"]))
    assert signed.GetTxid() == x(p["plan_id"]) and signed.serialize().hex() == PLANS["signed_tx"]
    unsigned = CTransaction(signed.vin, signed.vout, signed.nLockTime, signed.nVersion)
    assert unsigned.serialize().hex() == p["unsigned_tx"]
    m = PLANS["federation"]["threshold"]
    for i, wit in enumerate(signed.wit.vtxinwit):
        stack = list(wit.scriptWitness.stack)
        ws = x(p["witness_scripts"][i])
        assert len(stack) == m + 2 and stack[0] == b"" and stack[-1] == ws
        assert x(p["input_script_pubkeys"][i]) == b"\x00\x20" + hashlib.sha256(ws).digest()
        keys = [ws[2 + 34 * k:35 + 34 * k] for k in range(ws[-2] - 0x50)]
        k = 0
        for sig in stack[1:-1]:  # as OP_CHECKMULTISIG walks them: each key at most once, in order
            while k < len(keys) and not PublicKey(keys[k]).verify(sig[:-1], x(p["sighashes"][i]), hasher=None):
                k += 1
            assert k < len(keys), f"input {i}: a signature by no later key of the script"
            k += 1


# ---------------------------------------------------------------------------------------------- rolls

ROLLS = load("rolls.json")


def test_roll_vector() -> None:
    """The RollPlan and PlanCompleted applied to the vector's state write exactly the recorded records; the roll's
    transaction, fee, outputs and sighashes are the recorded ones; the books (held coins) keep their total."""
    net = network_by_name(ROLLS["network"])
    state = {x(k): x(v) for k, v in ROLLS["state"]}
    fed = federation(StateView(state.get))
    assert fed.encode().hex() == ROLLS["federation"] and fed.emergency_keys and fed.emergency_delay == 4032
    r = ROLLS["roll"]
    payload = RollPlan(r["feerate_sat_vb"], bytes(32), tuple((x(t), v) for t, v in r["inputs"]))
    assert payload.encode().hex() == r["payload_hex"] and RollPlan.decode(x(r["payload_hex"])) == payload
    t = decode(x(r["tx"]), net)
    assert t.payload == payload and t.sender.hex() == ROLLS["member"]["pubkey"]
    coins = [FedCoin.decode(state[coin_key(*o)]) for o in payload.inputs]
    priced = price_roll(fed, net.id, coins, payload.feerate_sat_vb)
    assert (priced.fee_sat, priced.change_sat) == (r["fee_sat"], r["change_sat"])
    assert [[spk.hex(), v] for spk, v in priced.outputs] == r["outputs"]
    assert r["outputs"] == [[deposit_script_pubkey(fed, net.id, CHANGE_CONTRACT).hex(), 250_000],
                            [deposit_script_pubkey(fed, net.id, FUNDING_CONTRACT).hex(), 40_000 - r["fee_sat"]]]
    writes = _apply_vector_tx(state, r["tx"], ROLLS)
    assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == r["writes"]
    roll_id = x(r["roll_id"])
    entry = PlanEntry.decode(state[plan_key(roll_id)])
    assert entry.encode().hex() == r["entry"] and entry.pegouts == () and entry.status == PlanStatus.PLANNED
    ptx = plan_tx(StateView(state.get), fed, net.id, entry)
    assert ptx.tx.serialize().hex() == r["unsigned_tx"] and ptx.txid == roll_id and roll_id[::-1].hex() == r["txid"]
    assert [ptx.sighash(i).hex() for i in range(len(coins))] == r["sighashes"]
    c = ROLLS["completed"]
    assert PlanCompleted(roll_id).encode().hex() == c["payload_hex"]
    writes = _apply_vector_tx(state, c["tx"], ROLLS, ROLLS["height"] + 10)
    assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == c["writes"]
    assert FedCoin.decode(state[coin_key(roll_id, 0)]) == FedCoin(roll_id, 0, 250_000, CoinKind.CHANGE,
                                                                  CHANGE_CONTRACT)
    assert FedCoin.decode(state[coin_key(roll_id, 1)]).amount_sat == 40_000 - r["fee_sat"]


# ---------------------------------------------------------------------------------------------- anchor plans

ANCHOR_PLANS = load("anchor_plans.json")


def test_anchor_plan_vector() -> None:
    """Every step (two AnchorPlans, their PlanSignatures, the FINAL update between them) decodes, verifies and writes
    exactly the recorded records; the derived transactions and sighashes are the recorded ones; the second anchor's
    signed transaction carries the 2 BIP340 signatures of the state in multi_a's order and has the plan's txid."""
    net = network_by_name(ANCHOR_PLANS["network"])
    state = {x(k): x(v) for k, v in ANCHOR_PLANS["state"]}
    fed = federation(StateView(state.get))
    for st in ANCHOR_PLANS["steps"]:
        t = decode(x(st["tx"]), net)
        assert t.payload.encode().hex() == st["payload_hex"]
        writes = _apply_vector_tx(state, st["tx"], ANCHOR_PLANS, st["height"])
        assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == st["writes"], st["what"]
    for name in ("first", "second"):
        v = ANCHOR_PLANS[name]
        plan_id = x(v["plan_id"])
        ptx = plan_tx(StateView(state.get), fed, net.id, PlanEntry.decode(state[plan_key(plan_id)]))
        assert ptx.tx.serialize().hex() == v["unsigned_tx"] and ptx.txid == plan_id
        assert [ptx.sighash(i).hex() for i in range(len(ptx.coins))] == v["sighashes"]
    second = ANCHOR_PLANS["second"]
    signed = CTransaction.deserialize(x(second["signed_tx"]))
    assert signed.GetTxid() == x(second["plan_id"])
    stack = list(signed.wit.vtxinwit[0].scriptWitness.stack)
    policy = anchor_policy(fed)
    assert stack[-2].hex() == second["leaf_script"] == policy.script.hex()
    digest = x(second["sighashes"][0])
    for key, item in zip(reversed(policy.keys), stack[:-2]):  # the last key's item first
        assert item == b"" or (len(item) == 65 and item[-1] == 1 and PublicKeyXOnly(key).verify(item[:64], digest))
    assert sum(len(item) == 65 for item in stack[:-2]) == fed.threshold
    assert AnchorEntry.decode(state[anchor_key(10)]).status == AnchorStatus.FINAL
    assert anchor_tip(state.get).open == x(second["plan_id"])


# ---------------------------------------------------------------------------------------------- paid sessions

SESSIONS = load("sessions.json")


def test_session_vector() -> None:
    """The session's steps (open, two settlements, the server's close) decode, verify and write exactly the recorded
    records; its receipts have the recorded digests, encodings and ids and verify under the session key; the stale
    receipt is refused with StaleReceipt and writes nothing."""
    net = network_by_name(SESSIONS["network"])
    state = {x(k): x(v) for k, v in SESSIONS["state"]}
    key = PublicKeyXOnly(x(SESSIONS["session_key"]))
    for r in SESSIONS["receipts"]:
        receipt = Receipt.decode(x(r["encoded"]))
        assert (receipt.session_id.hex(), receipt.seq, receipt.amount_sat, receipt.units) == (
            SESSIONS["session_id"], r["seq"], r["amount_sat"], r["units"])
        assert receipt.digest(net.id).hex() == r["digest"] and receipt.receipt_id.hex() == r["receipt_id"]
        assert key.verify(receipt.signature, receipt.digest(net.id))
    for st in SESSIONS["steps"]:
        t = decode(x(st["tx"]), net)
        assert t.payload.encode().hex() == st["payload_hex"]
        if st["what"] == "close by the server":  # refused before the close, after the second settlement
            stale = decode(x(SESSIONS["stale"]["tx"]), net)
            view = StateView(state.get, SESSIONS["stale"]["height"])
            with pytest.raises(StaleReceipt):
                apply_tx(view, stale, Rules(net, 1))
            assert view.writes == {}
        writes = _apply_vector_tx(state, st["tx"], SESSIONS, st["height"])
        assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == st["writes"], st["what"]
    rec = SessionRecord.decode(state[session_key(x(SESSIONS["session_id"]))])
    assert (rec.status, rec.settled_sat, rec.refunded_sat, rec.seq) == (SessionStatus.CLOSED, 14_000, 986_000, 7)
    assert rec.receipt_id.hex() == SESSIONS["receipts"][-1]["receipt_id"]


# ---------------------------------------------------------------------------------------------- registries

REGISTRIES = load("registries.json")


def test_registries_vector() -> None:
    """The relay and model registry steps decode, verify and write exactly the recorded records; the relay's weight
    is derived from the measurement, never the advertised rate."""
    net = network_by_name(REGISTRIES["network"])
    state = {x(k): x(v) for k, v in REGISTRIES["state"]}
    for st in REGISTRIES["steps"]:
        t = decode(x(st["tx"]), net)
        assert t.payload.encode().hex() == st["payload_hex"]
        writes = _apply_vector_tx(state, st["tx"], REGISTRIES, st["height"], x(st["parent_hash"]))
        assert [[k.hex(), v.hex()] for k, v in sorted(writes.items())] == st["writes"], st["what"]
    [relay] = [RelayRecord.decode(v) for k, v in state.items() if k[0] == Namespace.RELAY]
    assert (relay.weight, relay.measured_height) == (9_000, 6)
    [model] = [ModelRecord.decode(v) for k, v in state.items() if k[0] == Namespace.MODEL]
    offers = [OfferRecord.decode(v) for k, v in state.items() if k[0] == Namespace.MODEL_OFFER]
    assert model.name == b"SmolLM2-135M-Instruct" and [o.price_out_msat_per_1k for o in offers] == [400_000] * 3
    [done] = [CompletionRecord.decode(v) for k, v in state.items() if k[0] == Namespace.COMPLETION]
    assert (done.units_after, done.worker_sat, done.treasury_sat, done.burned_sat) == (83_000, 41, 8, 34)
    # challenged with a top logit 5 quanta away at the drawn positions, refereed the same way: the worker slashed
    assert done.status == CompletionStatus.WORKER_SLASHED and len(done.positions()) == 8
    [ch] = [ChallengeRecord.decode(v) for k, v in state.items() if k[0] == Namespace.COMPLETION_CHALLENGE]
    assert (ch.loser, ch.slash_sat, ch.height) == (Loser.WORKER, 1_000, 17)
    stakes = {k[1:]: WorkerRecord.decode(v).stake_sat for k, v in state.items() if k[0] == Namespace.WORKER}
    assert sorted(stakes.values()) == [0, 10_000, 10_000]  # the worker slashed its whole 1,000
