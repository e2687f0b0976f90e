"""Generate the consensus test vectors in tests/vectors/*.json (run by hand; the output is committed).

    cd /work/main && PYTHONPATH=. .venv/bin/python tests/vectors/make_vectors.py           # rewrite the files
    cd /work/main && PYTHONPATH=. .venv/bin/python tests/vectors/make_vectors.py --check   # exit 1 if stale

Everything here is deterministic: secrets are sha256(b"l2d test key N"), BIP340 aux randomness is fixed
per vector, and no clock or RNG is read. Regenerating must therefore reproduce the committed files byte for
byte; if it does not, a consensus encoding changed, and that needs a deliberate decision (new versions, a
changelog entry), not a silent refresh. tests/l2d/core/test_vectors.py recomputes every vector from its inputs;
the daemon and l2-verify must both pass them.

Files written:
    transactions.json  signed transactions (inputs, raw, sighash, txid) and invalid encodings with their error
    state_tree.json    key/value sets with their roots, and encoded proofs with the expected result
    blocks.json        a genesis header and a block with three transactions applied to it
    commits.json       federation memberships, block commits (sighashes, signatures, encodings) and invalid commits
                       with the error they raise, genesis files, and a chain file
    audit_kofn.json    the federation's k-of-n Taproot outputs (leaf, commitment leaf, tree, output key, control
                       block) for the vector memberships, and audit bundles of a k-of-n anchor (anchor kind 2): one
                       that verifies (with and without the anchored block's commit) and tampered or malformed ones
                       with the error l2-verify audit reports
    plans.json         a peg-out plan over a fixed small state (2-of-3 federation, two coins, two peg-outs): the
                       PegoutPlan and PlanSignature payloads and transactions, the derived payouts, change, fee and
                       vsize, the unsigned transaction and plan id, per-input sighashes, signatures and the signed
                       transaction, and what each transaction writes
    anchor_plans.json  two chained Taproot anchor plans (a funding coin, then the first anchor's k-of-n output): every
                       step's payload, transaction and writes, the unsigned transactions, sighashes (BIP143 and
                       BIP341 script path) and the second anchor's signed transaction
    rolls.json         a roll (a deposit coin and a funding coin of a federation with an emergency path): the
                       RollPlan and PlanCompleted payloads and transactions, fee, outputs, the unsigned transaction
                       and roll id, per-input sighashes, and what each transaction writes
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bitcoin.core import CScriptWitness, CTransaction, CTxInWitness, CTxWitness
from coincurve import PrivateKey  # noqa: E402

from anchoring.btc_tx import TxOut, finalize  # noqa: E402
from anchoring.multisig import assemble, prevout
from anchoring.multisig import sign as sign_input  # noqa: E402
from bridge.federation import signed_transaction
from l2d.core.anchor import AnchorEntry, anchor_key
from l2d.core.anchor_format import AnchorRecord, tapleaf_hash  # noqa: E402
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.audit import AnchorKind, AuditBundle, CommitEvidence, ProofEvidence, verify_bundle  # noqa: E402
from l2d.core.block import Block, BlockHeader, genesis_header, tx_root  # noqa: E402
from l2d.core.chain_file import ChainFileError, genesis_commit, verify_chain, write_chain_file
from l2d.core.coin_tx import Burn, Mint, Transfer
from l2d.core.commit import Commit, commit_sighash, sign_block
from l2d.core.errors import CommitError, DecodeError, L2Error, ProofError  # noqa: E402
from l2d.core.genesis_file import FederationGenesis
from l2d.core.hashing import EMPTY_ROOT  # noqa: E402
from l2d.core.kofn import FederationOutput, KofN
from l2d.core.members import Membership
from l2d.core.model_tx import (DEFAULT_SPLIT, Completion, CompletionChallenge, CompletionReferee, ModelFormat,
                               ModelRegister, ModelServe, TopK, draw_seed, fp_leaf, fp_proof, fp_root,
                               reveal_positions, sign_result, token_cost_msat)
from l2d.core.params import LOCAL, MAINNET, MAX_MONEY, REGTEST, SIGNET, Network  # noqa: E402
from l2d.core.payload import Payload
from l2d.core.pegs import (CHANGE_CONTRACT, FUNDING_CONTRACT, CoinKind, FedCoin, Federation, PegoutEntry, coin_key,
                           deposit_script_pubkey, federation_genesis, pegin_tweak, pegout_key)
from l2d.core.pegs_tx import AnchorMode, AnchorPlan, PegoutPlan, PegoutStatus, PlanCompleted, PlanSignature, RollPlan
from l2d.core.plans import PlanEntry, PlanTx, plan_key, plan_tx, price, price_roll, vsize_bound
from l2d.core.relay_tx import FLAG_ENTRY, FLAG_EXIT, Measurement, RelayRegister, RelayWeights
from l2d.core.rules import apply_tx
from l2d.core.session import StaleReceipt
from l2d.core.session_tx import Receipt, SessionClose, SessionOpen, SessionSettle
from l2d.core.spv import (BITCOIN_REGTEST, Header, bits_to_target, build_partial_merkle_tree, compute_merkle_root,
                          dsha256, make_header, parse_tx, serialize_merkleblock)
from l2d.core.state import Namespace, Rules, StateView, genesis_state
from l2d.core.tree import Proof, StateTree, root_of, verify_proof  # noqa: E402
from l2d.core.tx import Transaction, decode, sign, signature_ok
from l2d.core.work_tx import WorkerCaps, WorkerRegister

OUT = Path(__file__).resolve().parent
AUX_ZERO = bytes(32)
AUX_COUNT = bytes(range(1, 33))
AUX_FF = b"\xff" * 32


def secret(n: int) -> bytes:
    return hashlib.sha256(b"l2d test key %d" % n).digest()


def pubkey(n: int) -> bytes:
    return PrivateKey(secret(n)).public_key_xonly.format()


def k33(label: str) -> bytes:
    """A deterministic 33-byte state key."""
    return hashlib.sha256(label.encode()).digest() + hashlib.sha256(b"x" + label.encode()).digest()[:1]


def payload_json(p: Payload) -> dict[str, Any]:
    if isinstance(p, Burn):
        return {"amount_sat": p.amount_sat, "destination": p.destination.hex()}
    return {"recipient": p.recipient.hex(), "amount_sat": p.amount_sat}


TYPE_NAMES = {1: "transfer", 2: "mint", 3: "burn"}


def tx_json(name: str, net: Network, key: int, nonce: int, fee: int, payload: Payload, aux: bytes) -> dict[str, Any]:
    t = sign(net, secret(key), nonce, fee, payload, aux)
    if decode(t.raw, net) != t:
        raise SystemExit(f"vector {name}: does not round-trip")
    return {
        "name": name, "network": net.name, "network_id": net.id, "key_index": key, "secret": secret(key).hex(),
        "aux": aux.hex(), "sender": t.sender.hex(), "type": TYPE_NAMES[int(t.type)], "nonce": nonce,
        "fee_sat": fee, "payload": payload_json(payload), "payload_hex": payload.encode().hex(), "raw": t.raw.hex(),
        "sighash": t.sighash.hex(), "txid": t.txid.hex(),
    }


def error_name(fn: Callable[[], object]) -> Optional[str]:
    try:
        fn()
    except (DecodeError, ProofError) as e:
        return type(e).__name__
    return None


def transactions() -> dict[str, Any]:
    valid = [
        tx_json("transfer-basic", LOCAL, 1, 0, 10, Transfer(pubkey(2), 1_000), AUX_ZERO),
        tx_json("transfer-limits", REGTEST, 2, 2**64 - 1, MAX_MONEY, Transfer(pubkey(1), MAX_MONEY), AUX_COUNT),
        tx_json("transfer-signet", SIGNET, 3, 41, 250, Transfer(pubkey(1), 1), AUX_FF),
        tx_json("transfer-mainnet", MAINNET, 1, 7, 1, Transfer(pubkey(3), 123_456_789), AUX_ZERO),
        tx_json("mint-basic", REGTEST, 0, 0, 0, Mint(pubkey(1), 5_000_000_000), AUX_ZERO),
        tx_json("mint-to-self", LOCAL, 0, 1, 0, Mint(pubkey(0), 1), AUX_COUNT),
        tx_json("burn-empty-destination", LOCAL, 2, 3, 5, Burn(700), AUX_ZERO),
        tx_json("burn-with-destination", REGTEST, 1, 1, 2, Burn(99_000, b"bcrt1qexampledestination"), AUX_FF),
        tx_json("burn-max-destination", LOCAL, 3, 0, 0, Burn(MAX_MONEY, bytes(range(128))), AUX_COUNT),
    ]
    base = bytes.fromhex(valid[0]["raw"])

    def patched(offset: int, new: bytes) -> bytes:
        return base[:offset] + new + base[offset + len(new):]

    payload = base[52:92]
    invalid_raw = [
        ("truncated-signature", base[:-1], "local"),
        ("truncated-header", base[:50], "local"),
        ("trailing-byte", base + b"\0", "local"),
        ("unknown-version", patched(0, b"\x02"), "local"),
        ("unknown-type", patched(2, b"\xff"), "local"),
        ("wrong-network", base, "regtest"),
        ("fee-above-max-money", patched(43, (MAX_MONEY + 1).to_bytes(8, "big")), "local"),
        ("amount-zero", patched(84, bytes(8)), "local"),
        ("amount-above-max-money", patched(84, (MAX_MONEY + 1).to_bytes(8, "big")), "local"),
        ("payload-length-short", base[:51] + b"\x27" + payload[:39] + base[92:], "local"),
        ("payload-length-non-minimal", base[:51] + b"\xfd\x28\x00" + base[52:], "local"),
        ("oversize", b"\x01" * 1143, "local"),
        ("bad-signature", base[:-1] + bytes((base[-1] ^ 1,)), "local"),
        ("sender-not-on-curve", patched(3, (5).to_bytes(32, "big")), "local"),
    ]
    invalid = []
    for name, raw, net_name in invalid_raw:
        net = {"local": LOCAL, "regtest": REGTEST}[net_name]
        err = error_name(lambda: decode(raw, net))
        if err is None:
            err = "BadSignature" if not signature_ok(raw) else None
        if err is None:
            raise SystemExit(f"invalid vector {name} is valid")
        invalid.append({"name": name, "network": net_name, "raw": raw.hex(), "error": err})
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. secret = sha256(b'l2d test key "
                   "N'); raw is the full encoding; sighash = H('l2d/tx/sighash', raw[:-64]); txid = H('l2d/tx/id', "
                   "raw). 'error' of an invalid vector is the DecodeError subclass decode() raises, or BadSignature "
                   "when it decodes but the signature does not verify.",
        "valid": valid,
        "invalid": invalid,
    }


# ---------------------------------------------------------------------------------------------- state tree


def tree_sets() -> list[tuple[str, list[tuple[str, bytes, bytes]]]]:
    """(name, history) with history a list of ("set", key, value) / ("delete", key, b"")."""
    prefix = b"\x01" + b"\xa5" * 31
    two = [("set", prefix + b"\x1f", b"second"), ("set", prefix + b"\x10", b"first")]  # share 65 nibbles
    fifty = [("set", k33(f"fifty {i}"), hashlib.sha256(b"v%d" % i).digest()[: i % 9 * 4]) for i in range(50)]
    hist: list[tuple[str, bytes, bytes]] = [("set", k33(f"del {i}"), b"value %d" % i) for i in range(20)]
    hist += [("set", k33(f"del {i}"), b"updated %d" % i) for i in range(0, 20, 3)]
    hist += [("delete", k33(f"del {i}"), b"") for i in range(0, 20, 2)]
    hist += [("delete", k33("never there"), b"")]
    genesis = genesis_state([(pubkey(1), 10_000), (pubkey(2), 5_000)], pubkey(0))
    return [
        ("empty", []),
        ("one-key", [("set", k33("one"), b"only value")]),
        ("two-keys-long-prefix", two),
        ("fifty-keys", fifty),
        ("with-deletions", hist),
        ("deleted-to-empty", [("set", k33("a"), b"1"), ("set", k33("b"), b"2"), ("delete", k33("a"), b""),
                              ("delete", k33("b"), b"")]),
        ("genesis-state", [("set", k, v) for k, v in genesis.items()]),
    ]


def replay(history: list[tuple[str, bytes, bytes]]) -> tuple[StateTree, dict[bytes, bytes]]:
    tree, model = StateTree(), {}
    for op, k, v in history:
        if op == "set":
            tree.set(k, v)
            model[k] = v
        else:
            tree.delete(k)
            model.pop(k, None)
    return tree, model


def state_tree() -> dict[str, Any]:
    sets = []
    trees: dict[str, tuple[StateTree, dict[bytes, bytes]]] = {}
    for name, history in tree_sets():
        tree, model = replay(history)
        root = tree.root()
        if root != root_of(model.items()):
            raise SystemExit(f"set {name}: StateTree and RootBuilder disagree")
        trees[name] = (tree, model)
        sets.append({
            "name": name,
            "history": [[op, k.hex()] + ([v.hex()] if op == "set" else []) for op, k, v in history],
            "items": [[k.hex(), model[k].hex()] for k in sorted(model)],
            "root": root.hex(),
        })

    prefix = b"\x01" + b"\xa5" * 31
    probes = [
        ("empty-absent", "empty", k33("anything")),
        ("one-key-present", "one-key", k33("one")),
        ("one-key-absent-other", "one-key", k33("not one")),
        ("two-keys-present-deepest", "two-keys-long-prefix", prefix + b"\x10"),
        ("two-keys-absent-empty-deepest", "two-keys-long-prefix", prefix + b"\x17"),
        ("two-keys-absent-empty-shallow", "two-keys-long-prefix", b"\x01\xa5\xa4" + b"\0" * 30),
        ("fifty-present", "fifty-keys", k33("fifty 17")),
        ("fifty-present-empty-value", "fifty-keys", k33("fifty 0")),
        ("with-deletions-present-updated", "with-deletions", k33("del 3")),
        ("with-deletions-absent-deleted", "with-deletions", k33("del 4")),
        ("deleted-to-empty-absent", "deleted-to-empty", k33("a")),
        ("genesis-present-supply", "genesis-state", b"\x00" + b"supply".ljust(32, b"\0")),
        ("genesis-present-account", "genesis-state", b"\x01" + pubkey(1)),
        ("genesis-absent-account", "genesis-state", b"\x01" + pubkey(3)),
    ]
    # one absence proof of each kind in the fifty-key tree
    fifty_tree, fifty_model = trees["fifty-keys"]
    kinds_needed = {"absent-empty", "absent-other"}
    i = 0
    while kinds_needed:
        k = k33(f"fifty probe {i}")
        p = fifty_tree.prove(k, fifty_model.__getitem__)
        kind = ("present", "absent-empty", "absent-other")[p.kind]
        if kind in kinds_needed and (kind != "absent-other" or p.other_value):
            kinds_needed.discard(kind)
            probes.append((f"fifty-{kind}", "fifty-keys", k))
        i += 1

    proofs = []
    kinds_seen = set()
    for name, set_name, key in probes:
        tree, model = trees[set_name]
        p = tree.prove(key, model.__getitem__)
        raw = p.encode()
        got = verify_proof(tree.root(), Proof.decode(raw))
        if got != model.get(key):
            raise SystemExit(f"proof {name} does not verify to the truth")
        kind = ("present", "absent-empty", "absent-other")[p.kind]
        kinds_seen.add(kind)
        proofs.append({
            "name": name, "set": set_name, "kind": kind, "key": key.hex(), "levels": len(p.levels),
            "root": tree.root().hex(), "proof": raw.hex(), "expect": "present" if got is not None else "absent",
            "value": None if got is None else got.hex(),
        })
    if kinds_seen != {"present", "absent-empty", "absent-other"}:
        raise SystemExit(f"proof kinds covered: {kinds_seen}")

    by_name = {p["name"]: p for p in proofs}
    present = by_name["fifty-present"]
    absent = by_name["fifty-absent-other"]
    p_raw, a_raw = bytes.fromhex(present["proof"]), bytes.fromhex(absent["proof"])
    value_off = 1 + 33 + 1 + 1  # version, key, kind, value length (a one-byte CompactSize here)

    def flip(b: bytes, i: int) -> bytes:
        return b[:i] + bytes((b[i] ^ 1,)) + b[i + 1:]

    bad = [
        ("wrong-root", present["root"], p_raw, by_name["one-key-present"]["root"]),
        ("value-changed", present["root"], flip(p_raw, value_off), None),
        ("sibling-changed", present["root"], flip(p_raw, len(p_raw) - 1), None),
        ("other-value-changed", absent["root"], flip(a_raw, 1 + 33 + 1 + 33 + 1), None),
        ("present-relabelled-absent", present["root"], p_raw[:34] + b"\x01" + p_raw[35:], None),
        ("truncated", present["root"], p_raw[:-1], None),
        ("trailing-byte", present["root"], p_raw + b"\0", None),
        ("unknown-version", present["root"], b"\x02" + p_raw[1:], None),
        ("too-many-levels", EMPTY_ROOT.hex(), b"\x01" + b"\0" * 33 + b"\x01" + b"\x43", None),
    ]
    invalid = []
    for name, root_hex, raw, other_root in bad:
        root = bytes.fromhex(other_root or root_hex)
        err = error_name(lambda: verify_proof(root, Proof.decode(raw)))
        if err is None:
            raise SystemExit(f"invalid proof {name} verifies")
        invalid.append({"name": name, "root": root.hex(), "proof": raw.hex(), "error": err})
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. Keys are 33 bytes. A set's "
                   "root is the root of 'items'; 'history' ([\"set\", key, value] / [\"delete\", key]) replayed on "
                   "an empty tree gives the same root. A proof vector verifies against 'root' to 'value' when "
                   "'expect' is present and to absence otherwise. Invalid proofs fail to decode (a DecodeError "
                   "subclass) or to verify (ProofError).",
        "sets": sets,
        "proofs": proofs,
        "invalid_proofs": invalid,
    }


# ---------------------------------------------------------------------------------------------- blocks


def header_json(h: BlockHeader) -> dict[str, Any]:
    return {"version": h.version, "network_id": h.network_id, "height": h.height, "prev_hash": h.prev_hash.hex(),
            "timestamp_ms": h.timestamp_ms, "tx_count": h.tx_count, "tx_root": h.tx_root.hex(),
            "state_root": h.state_root.hex()}


def blocks() -> dict[str, Any]:
    net = REGTEST
    alloc = [(pubkey(1), 10_000_000), (pubkey(2), 2_500_000)]
    authority = pubkey(0)
    state = genesis_state(alloc, authority)
    g = genesis_header(net, 1_700_000_000_000, root_of(state.items()))
    genesis_block = Block(g, ())

    rules = Rules(net, 1)
    txs: list[Transaction] = [
        sign(net, secret(1), 0, 100, Transfer(pubkey(2), 1_000_000), AUX_ZERO),
        sign(net, secret(0), 0, 0, Mint(pubkey(3), 42_000), AUX_ZERO),
        sign(net, secret(2), 0, 50, Burn(300_000, b"bcrt1qpegoutdestination"), AUX_ZERO),
    ]
    view = StateView(state.get)
    for t in txs:
        apply_tx(view, t, rules)
    after = dict(state)
    for k, v in view.writes.items():
        if v is None:
            after.pop(k, None)
        else:
            after[k] = v
    h1 = BlockHeader(net.id, 1, g.hash, 1_700_000_060_000, len(txs), tx_root([t.txid for t in txs]),
                     root_of(after.items()))
    b1 = Block(h1, tuple(txs))
    if Block.decode(b1.encode(), net) != b1:
        raise SystemExit("block 1 does not round-trip")
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. Block 1's transactions are "
                   "applied in order to the genesis state with min_fee_sat 1; its state_root is the root of the "
                   "result. hash = H('l2d/block', header_hex).",
        "network": net.name,
        "min_fee_sat": rules.min_fee_sat,
        "genesis": {
            "alloc": [[pk.hex(), amount] for pk, amount in alloc],
            "mint_authority": authority.hex(),
            "state_root": g.state_root.hex(),
            "header": header_json(g),
            "header_hex": g.encode().hex(),
            "block_hex": genesis_block.encode().hex(),
            "hash": g.hash.hex(),
        },
        "block": {
            "txs": [t.raw.hex() for t in txs],
            "txids": [t.txid.hex() for t in txs],
            "header": header_json(h1),
            "header_hex": h1.encode().hex(),
            "block_hex": b1.encode().hex(),
            "hash": h1.hash.hex(),
        },
    }


# ---------------------------------------------------------------------------------------------- commits

MEMBERSHIPS = {"1-of-1": (1, 1), "3-of-4": (4, 3), "5-of-7": (7, 5), "7-of-10": (10, 7)}
MEMBER_KEY = 10  # member i of every membership has secret(MEMBER_KEY + i)
OUTSIDER_KEY = 30  # a key of no membership


def member_secret(i: int) -> bytes:
    return secret(MEMBER_KEY + i)


def commit_aux(i: int) -> bytes:
    return hashlib.sha256(b"l2d test commit aux %d" % i).digest()


def membership(name: str) -> Membership:
    n, m = MEMBERSHIPS[name]
    return Membership(tuple(pubkey(MEMBER_KEY + i) for i in range(n)), m)


def federation(name: str, net: Network) -> FederationGenesis:
    """The genesis file of a vector membership on net: blocks.json's genesis (on regtest; the same time and state
    root on another network), member ids member-1..member-n."""
    g = bytes.fromhex(blocks()["genesis"]["header_hex"])
    header = BlockHeader.decode(g, REGTEST)
    members = membership(name)
    return FederationGenesis(net, members, tuple(f"member-{i + 1}" for i in range(members.n)),
                             genesis_header(net, header.timestamp_ms, header.state_root))


def block_1(net: Network) -> BlockHeader:
    """The block the commit vectors sign: blocks.json's block 1 on regtest; an empty child of the genesis on local."""
    if net == REGTEST:
        return BlockHeader.decode(bytes.fromhex(blocks()["block"]["header_hex"]), REGTEST)
    g = federation("3-of-4", net).genesis
    return BlockHeader(net.id, 1, g.hash, g.timestamp_ms + 60_000, 0, tx_root([]), g.state_root)


def sign_commit(n: int, block_hash: bytes, net: Network, signers: dict[int, bytes]) -> Commit:
    """The commit of the given member index -> secret pairs over block_hash on net."""
    return Commit.assemble(n, {i: sign_block(sec, net, block_hash, commit_aux(i)) for i, sec in signers.items()})


def chain_file_bytes(fed: FederationGenesis, entries: list[tuple[BlockHeader, Commit]]) -> bytes:
    buf = io.BytesIO()
    write_chain_file(buf, fed.network, entries[0][0].height, len(entries), entries)
    return buf.getvalue()


def chain_file_with_raw_commit(fed: FederationGenesis, block: BlockHeader, raw: bytes) -> bytes:
    """The chain file of the genesis and block with raw as its commit, framed by hand (the writer only writes commits
    that decode): preamble, the genesis with the empty commit, block, length, raw, SHA-256."""
    empty = genesis_commit(fed.members.n).encode()
    body = (b"L2DCHAIN" + bytes((1, fed.network.id)) + (0).to_bytes(8, "big") + (2).to_bytes(8, "big")
            + fed.genesis.encode() + len(empty).to_bytes(2, "big") + empty
            + block.encode() + len(raw).to_bytes(2, "big") + raw)
    return body + hashlib.sha256(body).digest()


def chain_verdict(fed: FederationGenesis, raw: bytes) -> Optional[str]:
    """What verify_chain says about a chain file: None (verified) or the error's class name."""
    try:
        verify_chain(io.BytesIO(raw), fed)
    except ChainFileError as e:
        return type(e).__name__
    return None


def commits() -> dict[str, Any]:
    memberships = [{"name": name, "n": m.n, "threshold": m.threshold,
                    "secrets": [member_secret(i).hex() for i in range(m.n)], "keys": [k.hex() for k in m.keys],
                    "encoding": m.encode().hex()} for name, m in ((name, membership(name)) for name in MEMBERSHIPS)]
    nets = (REGTEST, LOCAL)
    blocks_ = [{"network": net.name, "genesis_hash": federation("3-of-4", net).genesis_hash.hex(),
                "header_hex": block_1(net).encode().hex(), "hash": block_1(net).hash.hex(),
                "sighash": commit_sighash(net, block_1(net).hash).hex()} for net in nets]

    def entry(name: str, ms: str, net: Network, commit: Commit, signed_on: Network) -> dict[str, Any]:
        fed = federation(ms, net)
        h = block_1(net)
        raw = commit.encode()
        if Commit.decode(raw) != commit:
            raise SystemExit(f"commit {name} does not round-trip")
        chain_raw = chain_file_bytes(fed, [(fed.genesis, genesis_commit(fed.members.n)), (h, commit)])
        if chain_raw != chain_file_with_raw_commit(fed, h, raw):
            raise SystemExit(f"commit {name}: the writer and the hand framing disagree")
        return {"name": name, "membership": ms, "network": net.name, "block_hash": h.hash.hex(),
                "signed_on": signed_on.name, "sighash": commit_sighash(signed_on, h.hash).hex(),
                "signers": list(commit.signers), "aux": [commit_aux(i).hex() for i in commit.signers],
                "signatures": [sig.hex() for sig in commit.signatures], "commit": raw.hex(),
                "chain_file": chain_raw.hex(), "l2_verify": chain_verdict(fed, chain_raw)}

    def members_signing(ms: str, net: Network, indices: list[int], n: Optional[int] = None) -> Commit:
        return sign_commit(n or membership(ms).n, block_1(net).hash, net, {i: member_secret(i) for i in indices})

    valid = [
        entry("1-of-1", "1-of-1", REGTEST, members_signing("1-of-1", REGTEST, [0]), REGTEST),
        entry("3-of-4-threshold", "3-of-4", REGTEST, members_signing("3-of-4", REGTEST, [0, 2, 3]), REGTEST),
        entry("3-of-4-all", "3-of-4", REGTEST, members_signing("3-of-4", REGTEST, [0, 1, 2, 3]), REGTEST),
        entry("3-of-4-local", "3-of-4", LOCAL, members_signing("3-of-4", LOCAL, [1, 2, 3]), LOCAL),
        entry("5-of-7", "5-of-7", REGTEST, members_signing("5-of-7", REGTEST, [0, 1, 3, 5, 6]), REGTEST),
        entry("7-of-10-two-byte-bitmap", "7-of-10", REGTEST,
              members_signing("7-of-10", REGTEST, [0, 2, 3, 5, 7, 8, 9]), REGTEST),
    ]
    for v in valid:
        if v["l2_verify"] is not None:
            raise SystemExit(f"commit vector {v['name']} does not verify: {v['l2_verify']}")
        Commit.decode(bytes.fromhex(v["commit"])).verify(membership(v["membership"]), network_of(v["network"]),
                                                          bytes.fromhex(v["block_hash"]))

    good = members_signing("3-of-4", REGTEST, [0, 1, 2])
    two = members_signing("3-of-4", REGTEST, [0, 1])
    outsider = sign_commit(4, block_1(REGTEST).hash, REGTEST,
                           {0: member_secret(0), 1: member_secret(1), 3: secret(OUTSIDER_KEY)})
    ten = members_signing("7-of-10", REGTEST, [0, 1, 2, 3, 4, 5, 6]).encode()
    invalid_raw = [
        ("m-minus-1", "3-of-4", REGTEST, two.encode(), "the threshold is 3; members 0 and 1 signed"),
        ("non-member-signature", "3-of-4", REGTEST, outsider.encode(), "slot 3 holds an outsider's signature"),
        ("signed-for-another-network", "3-of-4", REGTEST, members_signing("3-of-4", LOCAL, [0, 1, 2]).encode(),
         "members 0..2 signed the same block hash with the local network's sighash"),
        ("signature-under-another-members-bit", "3-of-4", REGTEST,
         Commit(4, (0, 1, 2), two.signatures + two.signatures[1:]).encode(),
         "a duplicated signer: member 1's signature again, under member 2's bit"),
        ("extra-signature", "3-of-4", REGTEST, two.encode() + two.signatures[1],
         "a duplicated signer: member 1's signature again, with no bit for it"),
        ("bit-above-n", "3-of-4", REGTEST, bytes((4, good.encode()[1] | 0x10)) + good.encode()[2:] + good.signatures[0],
         "bit 4 set in a commit for 4 members"),
        ("bit-above-n-two-byte-bitmap", "7-of-10", REGTEST, ten[:2] + bytes((ten[2] | 0x04,)) + ten[3:] + bytes(64),
         "bit 10 set in a commit for 10 members"),
        ("made-for-another-member-count", "3-of-4", REGTEST, members_signing("3-of-4", REGTEST, [0, 1, 2], 5).encode(),
         "n = 5 in a 4-member federation"),
        ("truncated", "3-of-4", REGTEST, good.encode()[:-1], "the last signature is one byte short"),
        ("no-member-count", "3-of-4", REGTEST, b"\x00\x00", "n = 0"),
    ]
    invalid = []
    for name, ms, net, raw, why in invalid_raw:
        h = block_1(net)
        err = error_name(lambda: Commit.decode(raw))
        if err is None:
            try:
                Commit.decode(raw).verify(membership(ms), net, h.hash)
            except CommitError as e:
                err = type(e).__name__
        if err is None:
            raise SystemExit(f"invalid commit {name} verifies")
        fed = federation(ms, net)
        chain_raw = chain_file_with_raw_commit(fed, h, raw)
        invalid.append({"name": name, "why": why, "membership": ms, "network": net.name, "block_hash": h.hash.hex(),
                        "commit": raw.hex(), "error": err, "chain_file": chain_raw.hex(),
                        "l2_verify": chain_verdict(fed, chain_raw)})

    fed = federation("3-of-4", REGTEST)
    entries: list[tuple[BlockHeader, Commit]] = [(fed.genesis, genesis_commit(4))]
    for height in range(1, 4):
        h = block_1(REGTEST) if height == 1 else BlockHeader(
            REGTEST.id, height, entries[-1][0].hash, entries[-1][0].timestamp_ms + 60_000, 0, tx_root([]),
            entries[-1][0].state_root)
        signers = [(height + k) % 4 for k in range(3)]
        entries.append((h, sign_commit(4, h.hash, REGTEST, {i: member_secret(i) for i in signers})))
    chain_raw = chain_file_bytes(fed, entries)
    if chain_verdict(fed, chain_raw) is not None:
        raise SystemExit(f"the vector chain file does not verify: {chain_verdict(fed, chain_raw)}")
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. Member i of a membership has "
                   "secret sha256(b'l2d test key %d' % (10 + i)); an outsider has key 30. A member signs "
                   "sighash = H('l2d/block/commit', network id || block hash) with BIP340 aux "
                   "sha256(b'l2d test commit aux %d' % i). Every commit signs block 1 of its network (blocks.json's "
                   "block 1 on regtest; on local an empty child of a genesis with the same time and state root). "
                   "'error' of an invalid commit is what Commit.decode or Commit.verify raises. 'genesis_file' is "
                   "the canonical federation genesis file; 'l2_verify' is what verify_chain (and l2-verify chain) "
                   "says about the chain file of the genesis and block 1 carrying that commit: null when it "
                   "verifies, else the error type.",
        "memberships": memberships,
        "blocks": blocks_,
        "genesis_files": {f"{ms}/{net.name}": federation(ms, net).encode().decode()
                          for ms in MEMBERSHIPS for net in nets},
        "commits": valid,
        "invalid_commits": invalid,
        "chain": {"membership": "3-of-4", "network": "regtest", "tip_height": 3, "tip_hash": entries[-1][0].hash.hex(),
                  "signers": [list(c.signers) for _, c in entries], "chain_file": chain_raw.hex()},
    }


def network_of(name: str) -> Network:
    return {"regtest": REGTEST, "local": LOCAL}[name]


# ---------------------------------------------------------------------------------------------- k-of-n anchors

REGTEST_BITS = 0x207FFFFF
# Bitcoin regtest's genesis block header (the chain a local or regtest L2 anchors to).
BTC_GENESIS = make_header(1, bytes(32), bytes.fromhex("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")
                          [::-1], 1296688602, REGTEST_BITS, 2)
ANCHOR_BTC_HEIGHT = 2  # the anchor transaction's block
BTC_TIP = 8  # the bundle's header chain runs from genesis to here: 7 confirmations
KOFN_SIGNERS = (0, 2, 3)  # the members who sign the anchor transaction's input


def grind(prev: Header, merkle_root: bytes) -> Header:
    """The regtest header after prev, 10 minutes later, with the first nonce that meets the target."""
    target = bits_to_target(REGTEST_BITS)
    nonce = 0
    while True:
        h = make_header(0x20000000, prev.hash, merkle_root, prev.time + 600, REGTEST_BITS, nonce)
        if int.from_bytes(h.hash, "little") <= target:
            return h
        nonce += 1


def coinbase(height: int) -> bytes:
    """A canonical coinbase transaction (version 1, the null outpoint, BIP34 height push, one OP_TRUE output)."""
    return (b"\x01\x00\x00\x00\x01" + bytes(32) + b"\xff\xff\xff\xff" + bytes((2, 1, height)) + b"\xff\xff\xff\xff"
            + b"\x01" + (50 * 10**8).to_bytes(8, "little") + b"\x01\x51" + bytes(4))


def kofn_policy(name: str) -> KofN:
    """The k-of-n policy over a vector membership's keys (member i: secret(MEMBER_KEY + i)), k its threshold."""
    m = membership(name)
    return KofN.of(m.threshold, m.keys)


def kofn_output_json(name: str, record: AnchorRecord) -> dict[str, Any]:
    policy = kofn_policy(name)
    anchor, coin = FederationOutput.anchor(policy, record), FederationOutput(policy)
    if anchor.commitment is None:
        raise SystemExit("an anchor output has a commitment leaf")
    return {"membership": name, "k": policy.k, "keys": [k.hex() for k in policy.keys],
            "policy_encoding": policy.encode().hex(), "leaf_script": policy.script.hex(),
            "leaf_hash": tapleaf_hash(policy.leaf).hex(), "commitment_leaf_script": anchor.commitment.script.hex(),
            "commitment_leaf_hash": tapleaf_hash(anchor.commitment).hex(), "merkle_root": anchor.merkle_root.hex(),
            "output_key": anchor.output_key.hex(), "script_pubkey": anchor.script_pubkey.hex(),
            "control_block": anchor.control_block.hex(), "coin_script_pubkey": coin.script_pubkey.hex(),
            "coin_control_block": coin.control_block.hex()}


def kofn_bundle() -> tuple[AuditBundle, list[Header]]:
    """A version 1 bundle of a 3-of-4 anchor of blocks.json's block 1 (the state root alone as evidence): the anchor
    transaction spends a federation coin of the same policy by its k-of-n leaf, signed by members 0, 2 and 3
    (anchoring.multisig), to the anchor output; it is the second transaction of regtest block 2."""
    h1 = block_1(REGTEST)
    record = AnchorRecord(REGTEST.id, h1.height, h1.state_root)
    policy = kofn_policy("3-of-4")
    coin, anchor = FederationOutput(policy), FederationOutput.anchor(policy, record)
    inputs = [prevout(coin, hashlib.sha256(b"l2d vector federation coin").digest(), 0, 100_000)]
    outputs = [TxOut(99_000, anchor.script_pubkey)]
    sigs = [sign_input(member_secret(i), coin, inputs, outputs, 0, commit_aux(i)) for i in KOFN_SIGNERS]
    tx = finalize(inputs, outputs, [assemble(coin, inputs, outputs, 0, sigs)]).raw
    txs = [coinbase(ANCHOR_BTC_HEIGHT), tx]
    txids = [parse_tx(t).txid for t in txs]
    headers = [BTC_GENESIS]
    for height in range(1, BTC_TIP + 1):
        merkle = compute_merkle_root(txids)[0] if height == ANCHOR_BTC_HEIGHT else dsha256(b"block %d" % height)
        headers.append(grind(headers[-1], merkle))
    mb = serialize_merkleblock(headers[ANCHOR_BTC_HEIGHT], build_partial_merkle_tree(txids, [False, True]))
    bundle = AuditBundle(REGTEST.id, record, AnchorKind.TAPROOT_KOFN, b"", tx, mb, 0,
                         b"".join(h.serialize() for h in headers), ProofEvidence(h1.state_root), kofn=policy)
    return bundle, headers


def reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def with_anchor_body(raw: bytes, body: bytes) -> bytes:
    """raw (a sealed bundle) with its ANCHOR section's body (after the preamble and the section's tag and length)
    replaced and the trailer recomputed."""
    old = int.from_bytes(raw[11:19], "big")
    return reseal(raw[:11] + len(body).to_bytes(8, "big") + body + raw[19 + old:-32])


def audit_verdict(raw: bytes, fed: Optional[FederationGenesis], now: int) -> Optional[str]:
    """What decoding and verifying a bundle says: None (verified) or the error's class name."""
    try:
        verify_bundle(AuditBundle.decode(raw), REGTEST, BITCOIN_REGTEST, None, 1, now=now, federation=fed)
    except (DecodeError, L2Error) as e:
        return type(e).__name__
    return None


def audit_kofn() -> dict[str, Any]:
    record = AnchorRecord(REGTEST.id, 100, hashlib.sha256(b"l2d vector state").digest())
    outputs = [kofn_output_json(name, record) for name in MEMBERSHIPS]

    bundle, headers = kofn_bundle()
    now = headers[-1].time
    fed = federation("3-of-4", REGTEST)
    commit = next(v for v in commits()["commits"] if v["name"] == "3-of-4-threshold")
    v2 = dataclasses.replace(bundle, commit=CommitEvidence(block_1(REGTEST), Commit.decode(bytes.fromhex(
        commit["commit"]))))
    raw = bundle.encode()
    head = bundle.record.encode() + bytes((AnchorKind.TAPROOT_KOFN,))
    keys = list(bundle.kofn.keys) if bundle.kofn is not None else []
    outsider = pubkey(OUTSIDER_KEY)
    valid = []
    for name, b, members in (("3-of-4", bundle, None), ("3-of-4-with-commit", v2, "3-of-4/regtest")):
        r = verify_bundle(AuditBundle.decode(b.encode()), REGTEST, BITCOIN_REGTEST, None, 1, now=now,
                          federation=fed if members else None)
        valid.append({"name": name, "bundle": b.encode().hex(), "members": members, "k": 3, "n": 4,
                      "l2_height": r.l2_height, "state_root": r.state_root.hex(), "txid": r.txid[::-1].hex(),
                      "vout": r.vout, "block_hash": r.block_hash[::-1].hex(), "block_height": r.block_height,
                      "confirmations": r.confirmations, "merkle_root": r.merkle_root.hex(),
                      "signers": None if r.signers is None else list(r.signers), "now": now})

    def policy(k: int, n: int, ks: list[bytes]) -> bytes:
        return with_anchor_body(raw, head + bytes((k, n)) + b"".join(ks))

    tampered = [
        ("k-changed", "k = 2 instead of 3 (resealed)", dataclasses.replace(bundle, kofn=KofN(2, tuple(keys))).encode()),
        ("key-swapped", "member 1's key replaced by an outsider's (resealed)",
         dataclasses.replace(bundle, kofn=KofN.of(3, [k for k in keys if k != pubkey(MEMBER_KEY + 1)] + [outsider]))
         .encode()),
        ("key-missing", "3 of the 3 other keys: member 1's key left out (resealed)",
         dataclasses.replace(bundle, kofn=KofN.of(3, [k for k in keys if k != pubkey(MEMBER_KEY + 1)])).encode()),
        ("key-added", "3 of 5: an outsider's key added (resealed)",
         dataclasses.replace(bundle, kofn=KofN.of(3, keys + [outsider])).encode()),
        ("link-changed", "the record's previous link changed: another link, another commitment leaf (resealed)",
         dataclasses.replace(bundle, record=dataclasses.replace(bundle.record, prev_link=b"\x01" * 32)).encode()),
        ("single-key", "the same output claimed as a single-key Taproot anchor of member 0's key (kind 1)",
         dataclasses.replace(bundle, anchor_kind=AnchorKind.TAPROOT, federation_key=keys[0], kofn=None).encode()),
        ("k-changed-not-resealed", "k = 2 written over the bundle's byte, trailer unchanged",
         raw[:19 + 79] + b"\x02" + raw[19 + 80:]),
        ("k-zero", "k = 0", policy(0, 4, keys)),
        ("k-above-n", "k = 5 of 4 keys", policy(5, 4, keys)),
        ("n-zero", "no keys", policy(1, 0, [])),
        ("n-above-64", "n = 65", policy(1, 65, keys)),
        ("keys-unsorted", "the keys in descending order", policy(3, 4, keys[::-1])),
        ("key-twice", "the third key twice, the fourth left out", policy(3, 4, keys[:3] + keys[2:3])),
        ("key-not-on-curve", "the last key is ff..ff, not an x coordinate on secp256k1",
         policy(3, 4, keys[:3] + [b"\xff" * 32])),
        ("fewer-keys-than-n", "n = 4 with three keys", policy(3, 4, keys[:3])),
        ("more-keys-than-n", "n = 3 with four keys", policy(3, 3, keys)),
        ("unknown-kind", "anchor kind 3", with_anchor_body(raw, bundle.record.encode() + b"\x03"
                                                           + bytes((3, 4)) + b"".join(keys))),
    ]
    if raw[19 + 79] != 3:
        raise SystemExit("k is not at offset 98 of the k-of-n bundle")
    invalid = []
    for name, why, data in tampered:
        err = audit_verdict(data, None, now)
        if err is None:
            raise SystemExit(f"invalid audit bundle {name} verifies")
        invalid.append({"name": name, "why": why, "bundle": data.hex(), "error": err,
                        "exit_code": 2 if err in MALFORMED_BUNDLE_ERRORS else 1})
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. Federation outputs: the k-of-n "
                   "policy over each commits.json membership's keys (k = its threshold), as a federation coin and as "
                   "the anchor of 'record' (NUMS internal key, the k-of-n leaf beside OP_RETURN <link>; "
                   "docs/anchoring.md). Bundles (docs/audit-bundle.md, anchor kind 2): a 3-of-4 anchor of "
                   "blocks.json's block 1 whose transaction spends a coin of the same policy with members 0, 2 and 3's "
                   "signatures; Bitcoin regtest from genesis to height 8, the anchor in block 2; 'now' is the "
                   "verifier's clock. 'members' names the genesis file in commits.json to verify the commit with. "
                   "'error' of an invalid bundle is what AuditBundle.decode or verify_bundle raises and 'exit_code' "
                   "what l2-verify audit exits with.",
        "record": record.encode().hex(),
        "outputs": outputs,
        "bundles": valid,
        "invalid_bundles": invalid,
    }


# DecodeError subclasses among the bundle refusals: l2-verify audit exits 2 for them (malformed input)
MALFORMED_BUNDLE_ERRORS = ("InvalidPolicy", "Truncated", "TrailingBytes", "BundleMalformed")


# ---------------------------------------------------------------------------------------------- peg-out plans

PLAN_FED_KEYS = (11, 12, 13)  # docs/bridge.md's worked example: 2-of-3 with the keys of secret(11..13), depth 6
PLAN_MEMBER = MEMBER_KEY  # the L2 federation member posting the plan and the signatures
PLAN_ANCHOR = 45  # the L2 height of the FINAL anchor covering the peg-outs
PLAN_FEERATE = 7


def plan_records() -> tuple[Federation, list[FedCoin], list[tuple[bytes, PegoutEntry]], AnchorEntry]:
    """The state the plan vector starts from: the federation, a deposit coin of contract pubkey(1) and a change coin,
    two PENDING peg-outs (burned at L2 heights 40 and 41, to a P2WPKH and a P2TR) and a FINAL anchor at 45."""
    fed = Federation(2, tuple(sorted(PrivateKey(secret(n)).public_key.format() for n in PLAN_FED_KEYS)), 6)
    coins = [FedCoin(hashlib.sha256(b"l2d vector deposit").digest(), 1, 250_000, CoinKind.DEPOSIT, pubkey(1)),
             FedCoin(hashlib.sha256(b"l2d vector earlier plan").digest(), 2, 180_000, CoinKind.CHANGE,
                     CHANGE_CONTRACT)]
    pegouts = [(hashlib.sha256(b"l2d vector burn 1").digest(),
                PegoutEntry(PegoutStatus.PENDING, 200_000, 40, bytes(32), b"\x00\x14" + b"\x13" * 20)),
               (hashlib.sha256(b"l2d vector burn 2").digest(),
                PegoutEntry(PegoutStatus.PENDING, 150_000, 41, bytes(32), b"\x51\x20" + b"\x37" * 32))]
    anchor = AnchorEntry(hashlib.sha256(b"l2d vector anchored root").digest(), hashlib.sha256(b"anchor tx").digest(),
                         hashlib.sha256(b"anchor block").digest(), 210, AnchorStatus.FINAL)
    return fed, coins, pegouts, anchor


def apply_all(state: dict[bytes, bytes], txs: list[Transaction], rules: Rules, height: int,
              parent_hash: bytes = bytes(32)) -> list[dict[bytes, bytes]]:
    """Apply txs one after the other to state (in place), in a block at height built on parent_hash; the writes of
    each."""
    out = []
    for t in txs:
        view = StateView(state.get, height, parent_hash)
        apply_tx(view, t, rules)
        writes = {k: v for k, v in view.writes.items() if v is not None}
        if len(writes) != len(view.writes):
            raise SystemExit("a plan vector transaction deleted a record")
        state.update(writes)
        out.append(writes)
    return out


def plans() -> dict[str, Any]:
    net, rules = REGTEST, Rules(REGTEST, 1)
    fed, coins, pegouts, anchor = plan_records()
    state = genesis_state([], None, (pubkey(PLAN_MEMBER),))
    state.update(federation_genesis(fed))
    state.update({coin_key(c.btc_txid, c.vout): c.encode() for c in coins})
    state.update({pegout_key(pid): e.encode() for pid, e in pegouts})
    state[anchor_key(PLAN_ANCHOR)] = anchor.encode()
    initial = sorted(state.items())
    inputs = tuple((c.btc_txid, c.vout) for c in coins)
    plan = PegoutPlan(PLAN_ANCHOR, PLAN_FEERATE, bytes(32), inputs, tuple(pid for pid, _ in pegouts))
    plan_tx_l2 = sign(net, secret(PLAN_MEMBER), 0, 0, plan, AUX_ZERO)
    height = PLAN_ANCHOR + 5
    (plan_writes,) = apply_all(state, [plan_tx_l2], rules, height)
    (plan_id,) = [k[1:] for k in plan_writes if k[0] == Namespace.PLAN]
    entry = PlanEntry.decode(state[plan_key(plan_id)])
    ptx = plan_tx(StateView(state.get), fed, net.id, entry)
    if ptx.txid != plan_id:
        raise SystemExit("the plan's transaction is not its id")
    priced = price(fed, net.id, coins, [e for _, e in pegouts], PLAN_FEERATE)
    vsize = vsize_bound(fed, net.id, coins, priced.outputs)
    signers = []
    sig_txs = []
    by_key: dict[tuple[int, bytes], bytes] = {}  # (input, tweaked key) -> signature
    for nonce, n in enumerate(PLAN_FED_KEYS[:fed.threshold], start=1):
        key = PrivateKey(secret(n)).public_key.format()
        index = fed.keys.index(key)
        tweaked = [PrivateKey(secret(n)).add(pegin_tweak(key, net.id, c.contract)) for c in coins]
        sigs = tuple(k.sign(ptx.sighash(i), hasher=None) + b"\x01" for i, k in enumerate(tweaked))
        payload = PlanSignature(plan_id, index, sigs)
        t = sign(net, secret(PLAN_MEMBER), nonce, 0, payload, AUX_ZERO)
        sig_txs.append(t)
        by_key.update({(i, k.public_key.format()): sigs[i] for i, k in enumerate(tweaked)})
        signers.append({"secret_index": n, "key_index": index, "key": key.hex(),
                        "tweaked_secrets": [k.secret.hex() for k in tweaked],
                        "tweaked_keys": [k.public_key.format().hex() for k in tweaked],
                        "signatures": [s.hex() for s in sigs], "payload_hex": payload.encode().hex(),
                        "tx": t.raw.hex()})
    sig_writes = apply_all(state, sig_txs, rules, height)
    witnesses = []
    for i, ws in enumerate(ptx.witness_scripts):
        keys = [ws[2 + 34 * k:2 + 34 * k + 33] for k in range(len(fed.keys))]
        ordered = [by_key[i, k] for k in keys if (i, k) in by_key]  # CHECKMULTISIG: in the script's key order
        witnesses.append(CTxInWitness(CScriptWitness([b""] + ordered + [ws])))
    signed = CTransaction(ptx.tx.vin, ptx.tx.vout, ptx.tx.nLockTime, ptx.tx.nVersion, CTxWitness(witnesses))
    signed_raw = signed.serialize()
    if parse_tx(signed_raw).txid != plan_id:
        raise SystemExit("the signed plan transaction has another txid")
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. A peg-out plan "
                   "(l2d/core/plans.py) on regtest: 'state' holds the records the plan rules read (the federation of "
                   "docs/bridge.md's worked example: 2-of-3 with the keys of secret(11..13), depth 6; member "
                   "secret(10); two federation coins, two PENDING peg-outs, a FINAL anchor). The member's PegoutPlan "
                   "(nonce 0) and two PlanSignatures (nonces 1 and 2, keys secret(11) and secret(12)) are applied in "
                   "order at L2 height 'height'; 'writes' are what each wrote. Bitcoin txids are in internal byte "
                   "order, except 'txid' (the plan's, in display order). sighashes are BIP143 (SIGHASH_ALL, "
                   "scriptCode the witness script); signatures are RFC 6979 DER by the federation key tweaked for "
                   "the input's contract, plus 0x01. 'signed_tx' carries the m signatures per input in the witness "
                   "script's key order.",
        "network": net.name,
        "height": height,
        "federation": {"threshold": fed.threshold, "keys": [k.hex() for k in fed.keys], "min_depth": fed.min_depth,
                       "secret_indexes": list(PLAN_FED_KEYS)},
        "member": {"secret": secret(PLAN_MEMBER).hex(), "pubkey": pubkey(PLAN_MEMBER).hex()},
        "coins": [{"btc_txid": c.btc_txid.hex(), "vout": c.vout, "amount_sat": c.amount_sat, "kind": c.kind.name,
                   "contract": c.contract.hex(), "key": coin_key(c.btc_txid, c.vout).hex(), "value": c.encode().hex()}
                  for c in coins],
        "pegouts": [{"id": pid.hex(), "amount_sat": e.amount_sat, "l2_height": e.l2_height,
                     "script_pubkey": e.script_pubkey.hex(), "key": pegout_key(pid).hex(), "value": e.encode().hex()}
                    for pid, e in pegouts],
        "anchor": {"l2_height": PLAN_ANCHOR, "key": anchor_key(PLAN_ANCHOR).hex(), "value": anchor.encode().hex()},
        "state": [[k.hex(), v.hex()] for k, v in initial],
        "plan": {
            "anchor_height": plan.anchor_height, "feerate_sat_vb": plan.feerate_sat_vb, "replaces": plan.replaces.hex(),
            "inputs": [[t.hex(), v] for t, v in plan.inputs], "pegouts": [p.hex() for p in plan.pegouts],
            "payload_hex": plan.encode().hex(), "tx": plan_tx_l2.raw.hex(), "l2_txid": plan_tx_l2.txid.hex(),
            "vsize": vsize, "fee_sat": priced.fee_sat, "payouts": list(priced.payouts), "change_sat": priced.change_sat,
            "change_script_pubkey": deposit_script_pubkey(fed, net.id, CHANGE_CONTRACT).hex(),
            "witness_scripts": [ws.hex() for ws in ptx.witness_scripts],
            "input_script_pubkeys": [deposit_script_pubkey(fed, net.id, c.contract).hex() for c in coins],
            "unsigned_tx": ptx.tx.serialize().hex(), "plan_id": plan_id.hex(), "txid": plan_id[::-1].hex(),
            "sighashes": [ptx.sighash(i).hex() for i in range(len(coins))],
            "entry": entry.encode().hex(),
            "writes": [[k.hex(), v.hex()] for k, v in sorted(plan_writes.items())],
        },
        "signatures": [dict(s, writes=[[k.hex(), v.hex()] for k, v in sorted(w.items())])
                       for s, w in zip(signers, sig_writes)],
        "signed_tx": signed_raw.hex(),
    }


# ---------------------------------------------------------------------------------------------- rolls

ROLL_EMERGENCY_KEYS = (21, 22)  # 1 of the keys of secret(21), secret(22) after 4032 blocks
ROLL_FEERATE = 3


def rolls() -> dict[str, Any]:
    """A roll (RollPlan, PlanCompleted) of the plan vector's federation with an emergency path: a deposit coin and a
    funding coin in, the deposit whole to CHANGE, the funding rest to FUNDING."""
    net, rules = REGTEST, Rules(REGTEST, 1)
    plain, _, _, _ = plan_records()
    fed = Federation(plain.threshold, plain.keys, plain.min_depth, 1,
                     tuple(sorted(PrivateKey(secret(n)).public_key.format() for n in ROLL_EMERGENCY_KEYS)), 4032)
    coins = [FedCoin(hashlib.sha256(b"l2d vector rolled deposit").digest(), 0, 250_000, CoinKind.DEPOSIT, pubkey(1)),
             FedCoin(hashlib.sha256(b"l2d vector funding").digest(), 3, 40_000, CoinKind.FUNDING, FUNDING_CONTRACT)]
    state = genesis_state([], None, (pubkey(PLAN_MEMBER),))
    state.update(federation_genesis(fed))
    state.update({coin_key(c.btc_txid, c.vout): c.encode() for c in coins})
    initial = sorted(state.items())
    roll = RollPlan(ROLL_FEERATE, bytes(32), tuple((c.btc_txid, c.vout) for c in coins))
    roll_l2 = sign(net, secret(PLAN_MEMBER), 0, 0, roll, AUX_ZERO)
    height = 60
    (roll_writes,) = apply_all(state, [roll_l2], rules, height)
    (roll_id,) = [k[1:] for k in roll_writes if k[0] == Namespace.PLAN]
    entry = PlanEntry.decode(state[plan_key(roll_id)])
    ptx = plan_tx(StateView(state.get), fed, net.id, entry)
    if ptx.txid != roll_id:
        raise SystemExit("the roll's transaction is not its id")
    priced = price_roll(fed, net.id, coins, ROLL_FEERATE)
    done = PlanCompleted(roll_id)
    done_l2 = sign(net, secret(PLAN_MEMBER), 1, 0, done, AUX_ZERO)
    (done_writes,) = apply_all(state, [done_l2], rules, height + 10)
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. A roll (l2d/core/plans.py, "
                   "docs/bridge.md 'Rolls') on regtest: the plan vector's 2-of-3 federation with an emergency path "
                   "(1 of the keys of secret(21), secret(22), 4032 blocks); a DEPOSIT coin and a FUNDING coin. The "
                   "member's RollPlan (nonce 0) is applied at 'height', its PlanCompleted (nonce 1) at 'height' + 10; "
                   "'writes' are what each wrote. Bitcoin txids in internal byte order, except 'txid'. sighashes are "
                   "BIP143 (SIGHASH_ALL, scriptCode the witness script), as for peg-out plans.",
        "network": net.name,
        "height": height,
        "federation": fed.encode().hex(),
        "member": {"secret": secret(PLAN_MEMBER).hex(), "pubkey": pubkey(PLAN_MEMBER).hex()},
        "state": [[k.hex(), v.hex()] for k, v in initial],
        "roll": {"feerate_sat_vb": roll.feerate_sat_vb, "inputs": [[t.hex(), v] for t, v in roll.inputs],
                 "payload_hex": roll.encode().hex(), "tx": roll_l2.raw.hex(), "fee_sat": priced.fee_sat,
                 "change_sat": priced.change_sat, "outputs": [[spk.hex(), v] for spk, v in priced.outputs],
                 "unsigned_tx": ptx.tx.serialize().hex(), "roll_id": roll_id.hex(), "txid": roll_id[::-1].hex(),
                 "sighashes": [ptx.sighash(i).hex() for i in range(len(coins))], "entry": entry.encode().hex(),
                 "writes": [[k.hex(), v.hex()] for k, v in sorted(roll_writes.items())]},
        "completed": {"payload_hex": done.encode().hex(), "tx": done_l2.raw.hex(),
                      "writes": [[k.hex(), v.hex()] for k, v in sorted(done_writes.items())]},
    }


# ---------------------------------------------------------------------------------------------- anchor plans

def anchor_plans() -> dict[str, Any]:
    """Two chained Taproot anchor plans of the plan vector's federation: the first paid by a funding coin (ECDSA),
    completed by AnchorUpdate FINAL, the second spending its k-of-n output (BIP340, aux zero)."""
    net, rules = REGTEST, Rules(REGTEST, 1)
    fed, _, _, _ = plan_records()
    funding = FedCoin(hashlib.sha256(b"l2d vector anchor funding").digest(), 1, 60_000, CoinKind.FUNDING,
                      FUNDING_CONTRACT)
    state = genesis_state([], None, (pubkey(PLAN_MEMBER),))
    state.update(federation_genesis(fed))
    state[coin_key(funding.btc_txid, funding.vout)] = funding.encode()
    initial = sorted(state.items())
    member = secret(PLAN_MEMBER)
    nonce = iter(range(100))
    steps: list[dict[str, Any]] = []

    def step(what: str, payload: Payload, height: int) -> dict[bytes, bytes]:
        t = sign(net, member, next(nonce), 0, payload, AUX_ZERO)
        (writes,) = apply_all(state, [t], rules, height)
        steps.append({"what": what, "height": height, "payload_hex": payload.encode().hex(), "tx": t.raw.hex(),
                      "writes": [[k.hex(), v.hex()] for k, v in sorted(writes.items())]})
        return writes

    def signatures(plan_id: bytes, height: int) -> tuple[PlanTx, dict[int, tuple[bytes, ...]]]:
        ptx = plan_tx(StateView(state.get), fed, net.id, PlanEntry.decode(state[plan_key(plan_id)]))
        by_index = {}
        for n in PLAN_FED_KEYS[:fed.threshold]:
            key = PrivateKey(secret(n))
            index = fed.keys.index(key.public_key.format())
            sigs = tuple((key.sign_schnorr(ptx.sighash(i), AUX_ZERO) if c.kind == CoinKind.ANCHOR
                          else key.add(pegin_tweak(key.public_key.format(), net.id, c.contract)).sign(
                              ptx.sighash(i), hasher=None)) + b"\x01" for i, c in enumerate(ptx.coins))
            step(f"signatures of key {index}", PlanSignature(plan_id, index, sigs), height)
            by_index[index] = sigs
        return ptx, by_index

    root1, root2 = hashlib.sha256(b"l2d vector anchored root 1").digest(), hashlib.sha256(b"l2d vector root 2").digest()
    (first,) = [k[1:] for k in step("anchor plan 10", AnchorPlan(10, AnchorMode.TAPROOT, root1, bytes(32), 3,
                                                                  bytes(32), ((funding.btc_txid, funding.vout),)), 20)
                if k[0] == Namespace.PLAN]
    ptx1, sigs1 = signatures(first, 21)
    step("anchor 10 FINAL", AnchorUpdate(10, root1, first, hashlib.sha256(b"block").digest(), 500,
                                         AnchorStatus.FINAL), 30)
    link1 = AnchorRecord(net.id, 10, root1).link
    (second,) = [k[1:] for k in step("anchor plan 12", AnchorPlan(12, AnchorMode.TAPROOT, root2, link1, 3, bytes(32),
                                                                   ((first, 0),)), 31) if k[0] == Namespace.PLAN]
    ptx2, sigs2 = signatures(second, 32)
    raw2 = signed_transaction(fed, net, ptx2, sigs2)
    if raw2 is None or parse_tx(raw2).txid != second:
        raise SystemExit("the second anchor's signed transaction is not its plan")
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. Two chained Taproot anchor plans "
                   "(l2d/core/plans.py, docs/anchoring.md 'Anchor plans') of the plan vector's 2-of-3 federation on "
                   "regtest, member secret(10): each step is applied at its height in order and wrote 'writes'. The "
                   "first spends a funding coin (ECDSA, BIP143) and its FINAL update makes its output the anchor coin; "
                   "the second spends that output by the k-of-n leaf (BIP340 with 32 zero bytes of aux randomness "
                   "over the BIP341 script-path digest, hash type 0x01). Txids in internal byte order.",
        "network": net.name,
        "state": [[k.hex(), v.hex()] for k, v in initial],
        "steps": steps,
        "first": {"plan_id": first.hex(), "unsigned_tx": ptx1.tx.serialize().hex(),
                  "sighashes": [ptx1.sighash(i).hex() for i in range(len(ptx1.coins))]},
        "second": {"plan_id": second.hex(), "unsigned_tx": ptx2.tx.serialize().hex(),
                   "sighashes": [ptx2.sighash(i).hex() for i in range(len(ptx2.coins))],
                   "leaf_script": ptx2.witness_scripts[0].hex(), "signed_tx": raw2.hex()},
    }


def sessions() -> dict[str, Any]:
    """A paid session on regtest: opened by secret(1) for the server secret(2) (2,000,000 msat per MiB of bytes,
    expiry height 40), two receipts settled (seq 3, then seq 7: the second pays only the difference), a stale
    receipt refused, then closed by the server (the rest refunded to the client). Fees 2 sat, aux randomness zero."""
    net, rules = REGTEST, Rules(REGTEST, 1)
    client, server, session_secret = secret(1), secret(2), hashlib.sha256(b"l2d vector session key").digest()
    state = genesis_state([(pubkey(1), 5_000_000), (pubkey(2), 10_000)], None, (pubkey(10),))
    initial = sorted(state.items())
    nonces = {client: 0, server: 0}
    steps: list[dict[str, Any]] = []

    def step(what: str, who: bytes, payload: Payload, height: int) -> Transaction:
        t = sign(net, who, nonces[who], 2, payload, AUX_ZERO)
        nonces[who] += 1
        (writes,) = apply_all(state, [t], rules, height)
        steps.append({"what": what, "height": height, "payload_hex": payload.encode().hex(), "tx": t.raw.hex(),
                      "writes": [[k.hex(), v.hex()] for k, v in sorted(writes.items())]})
        return t

    mib = 1 << 20
    opened = step("open", client, SessionOpen(pubkey(2), PrivateKey(session_secret).public_key_xonly.format(),
                                              1_000_000, 2_000_000, mib, 40), 10)
    sid = opened.txid
    session_key = PrivateKey(session_secret)
    receipts = [Receipt.sign(net.id, session_key, sid, seq, 2_000 * seq, seq * mib, AUX_ZERO) for seq in (3, 7)]
    for r in receipts:
        step(f"settle seq {r.seq}", server, SessionSettle(r), 11 + r.seq)
    stale = sign(net, server, nonces[server], 2, SessionSettle(receipts[0]), AUX_ZERO)
    try:
        apply_all(dict(state), [stale], rules, 20)
        raise SystemExit("the stale receipt was accepted")
    except StaleReceipt:
        pass
    step("close by the server", server, SessionClose(sid), 21)
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. A paid session "
                   "(l2d/core/session.py, docs/sessions.md) on regtest: each step is applied at its height in order "
                   "and wrote 'writes'; the receipts are BIP340 signatures by the session key (aux zero) over "
                   "'digest'; 'stale' (the seq 3 receipt again, after seq 7) is refused with StaleReceipt and writes "
                   "nothing.",
        "network": net.name,
        "state": [[k.hex(), v.hex()] for k, v in initial],
        "session_id": sid.hex(),
        "session_key": PrivateKey(session_secret).public_key_xonly.format().hex(),
        "receipts": [{"seq": r.seq, "amount_sat": r.amount_sat, "units": r.units, "digest": r.digest(net.id).hex(),
                      "encoded": r.encode().hex(), "receipt_id": r.receipt_id.hex()} for r in receipts],
        "steps": steps,
        "stale": {"tx": stale.raw.hex(), "height": 20, "error": "StaleReceipt"},
    }


def registries() -> dict[str, Any]:
    """The NetFlow relay registry and the model registry on regtest: secret(1) registers as a relay and the member
    secret(10) posts its measured weights; secret(2) registers a model by its weights hash, registers as a worker and
    offers to serve the model; secret(3) opens a paid session (msat) with secret(1) as its gateway, which records one
    completion served by secret(2). Fees 2 sat (0 for the member's weights), aux randomness zero."""
    net, rules = REGTEST, Rules(REGTEST, 1)
    state = genesis_state([(pubkey(1), 5_000_000), (pubkey(2), 5_000_000), (pubkey(3), 5_000_000)], None,
                          (pubkey(10),))
    initial = sorted(state.items())
    nonces = {1: 0, 2: 0, 3: 0, 10: 0}
    steps: list[dict[str, Any]] = []

    def step(what: str, who: int, payload: Payload, height: int) -> Transaction:
        t = sign(net, secret(who), nonces[who], 0 if payload.FEELESS else 2, payload, AUX_ZERO)
        nonces[who] += 1
        parent = hashlib.sha256(b"l2d vector block %d" % (height - 1)).digest()  # the block it is built on
        (writes,) = apply_all(state, [t], rules, height, parent)
        steps.append({"what": what, "height": height, "parent_hash": parent.hex(), "payload_hex": payload.encode().hex(),
                      "tx": t.raw.hex(), "writes": [[k.hex(), v.hex()] for k, v in sorted(writes.items())]})
        return t

    step("relay register", 1, RelayRegister(50_000, hashlib.sha256(b"l2d vector x25519").digest(),
                                            hashlib.sha256(b"l2d vector operator").digest(), FLAG_ENTRY | FLAG_EXIT,
                                            100_000, 1_000_000, b"relay.example:9050"), 5)
    step("relay weights", 10, RelayWeights(6, (Measurement(pubkey(1), 10_000, 900_000),)), 7)
    weights = hashlib.sha256(b"l2d vector model weights").digest()
    step("model register", 2, ModelRegister(weights, ModelFormat.GGUF, 8192, b"SmolLM2-135M-Instruct", b"Q4_1"), 8)
    step("worker register", 2, WorkerRegister(1000, WorkerCaps(0, 0, 10, 500_000, 100, 2, b"eu", (b"smollm2",),
                                                                b"127.0.0.1:9000")), 9)
    step("model serve", 2, ModelServe(weights, 2048, 100_000, 400_000), 10)
    session = sign(net, secret(3), nonces[3], 2, SessionOpen(pubkey(1), pubkey(4), 1_000, 1, 1, 100), AUX_ZERO)
    step("session open", 3, session.payload, 11)
    prompt, output = hashlib.sha256(b"prompt").digest(), hashlib.sha256(b"output").digest()
    leaves = [fp_leaf(i, (i, 1, 2, 3), (160, 150, 140, -130)) for i in range(200)]
    fp = fp_root(leaves)
    done = step("completion", 1, Completion(session.txid, pubkey(2), weights, b"\0" * 32, prompt, output, fp, 30, 200,
                                            token_cost_msat(30, 200, 100_000, 400_000), 0, 0, 0, *DEFAULT_SPLIT,
                                            sign_result(secret(2), net.id, weights, prompt, output, fp, 30, 200, 0, 0,
                                                        0)), 12)
    for who, h in ((3, 13), (1, 15)):  # two more workers serving the model: a challenger and a referee
        step("worker register", who, WorkerRegister(10_000, WorkerCaps(0, 0, 10, 500_000, 100, 2, b"eu", (b"smollm2",),
                                                                     b"127.0.0.1:9001")), h)
        step("model serve", who, ModelServe(weights, 2048, 100_000, 400_000), h + 1)
    positions = reveal_positions(draw_seed(done.txid, hashlib.sha256(b"l2d vector block 11").digest()), 200)
    other = tuple(TopK((p, 1, 2, 3), (165, 150, 140, -130)) for p in positions)  # the top logit 5 quanta higher
    step("completion challenge", 3, CompletionChallenge(done.txid, tuple(leaves[p] for p in positions),
                                                        tuple(tuple(fp_proof(leaves, p)) for p in positions), other), 17)
    step("completion referee", 1, CompletionReferee(done.txid, other), 18)
    return {
        "comment": "Generated by tests/vectors/make_vectors.py; do not edit by hand. The relay registry "
                   "(l2d/core/relay.py, docs/netflow.md) and the model registry (l2d/core/model.py, "
                   "docs/inference.md) on regtest: each step is applied at its height in order and wrote 'writes'. "
                   "The member's vote is kept under 0x15 || H_RELAY_VOTE(relay || member); with one member it "
                   "alone decides the relay's weight: min(10,000 measured, 100,000 advertised) x 0.9 = 9,000. The completion "
                   "costs ceil((30 x 100,000 + 200 x 400,000) / 1000) = 83,000 msat = 83 sat: 41 to the worker, 8 to "
                   "the gateway (treasury), 34 burned. Its worker's fingerprint commits to a top logit of 160 "
                   "quanta at every position; secret(3) re-executes and challenges with 165 at the 8 drawn "
                   "positions (beyond the tolerance of 2); the ledger draws secret(1), the only third worker staked "
                   "10,000, as the referee, which answers 165: the worker loses "
                   "min(1,000 stake, 10,000) = 1,000 sat, 500 to the challenger, 250 to the referee, 250 burned.",
        "network": net.name,
        "state": [[k.hex(), v.hex()] for k, v in initial],
        "steps": steps,
    }


def render() -> dict[str, str]:
    docs = {"transactions.json": transactions(), "state_tree.json": state_tree(), "blocks.json": blocks(),
            "commits.json": commits(), "audit_kofn.json": audit_kofn(), "plans.json": plans(),
            "rolls.json": rolls(), "anchor_plans.json": anchor_plans(), "sessions.json": sessions(),
            "registries.json": registries()}
    return {name: json.dumps(doc, indent=1) + "\n" for name, doc in docs.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args()
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale vectors: {', '.join(stale)} (regenerate deliberately; see the module docstring)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
