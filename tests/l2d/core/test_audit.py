"""Audit bundles built end to end (BIP340 federation key or a 3-of-4 k-of-n policy, a real Bitcoin transaction, a
ground regtest chain): verified as is, and every tampered variant fails with the error for the rule it breaks."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
from typing import Callable, Optional

import pytest
from bitcoin.core import CMutableTransaction, CMutableTxIn, CMutableTxOut, COutPoint, CScript, CTxInWitness, CTxWitness
from bitcoin.core.script import CScriptWitness
from coincurve import PrivateKey

from l2d.core.anchor_format import AnchorRecord, TaprootAnchor, op_return_script
from l2d.core.audit import (MAGIC, AccountProofInvalid, AnchorKind, AnchorNotInTx, AuditBundle, BlockNotInChain,
                            BundleChecksumMismatch, BundleMalformed, CommitEvidence, CommitMismatch, CommitMissing,
                            EvidenceHeightMismatch, FederationMismatch, ProofEvidence, Section, SnapshotEvidence,
                            StateRootMismatch, TooFewConfirmations, verify_bundle)
from l2d.core.block import BlockHeader, genesis_header, tx_root
from l2d.core.commit import Commit, sign_block
from l2d.core.errors import (BadCommitSignature, NotEnoughSignatures, OutOfRange, TrailingBytes, Truncated,
                             UnknownVersion, WrongNetwork)
from l2d.core.genesis_file import FederationGenesis
from l2d.core.kofn import NUMS_KEY, FederationOutput, InvalidPolicy, KofN
from l2d.core.members import Membership
from l2d.core.params import LOCAL, REGTEST, Network
from l2d.core.snapshot import SnapshotInvalid, write_snapshot
from l2d.core.spv import (BITCOIN_MAINNET, BITCOIN_REGTEST, BadLink, BadProofOfWork, CheckpointMismatch, Header,
                          MerkleMutation, MerkleRootMismatch, PartialMerkleTree, TimeTooNew, TxNotInProof,
                          bits_to_target, build_partial_merkle_tree, compute_merkle_root, make_header,
                          parse_merkleblock, parse_tx, serialize_merkleblock)
from l2d.core.tree import KEY_SIZE, StateTree

L2_HEIGHT = 1234
ANCHOR_HEIGHT = 5  # Bitcoin height of the anchor block
AFTER = 20  # headers after it
ANCHOR_INDEX = 2  # position of the anchor transaction in its block (of five)
_sha = hashlib.sha256
_PACK = struct.Struct("<i32s32sIII")
REGTEST_GENESIS = make_header(1, b"\0" * 32,
                              bytes.fromhex("4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b")[::-1],
                              1296688602, 0x207FFFFF, 2)


def grind(prev: bytes, root: bytes, t: int, bits: int = 0x207FFFFF, *, fail: bool = False) -> Header:
    """A header meeting its target (or, with fail, one that misses it)."""
    target = bits_to_target(bits)
    base = _PACK.pack(0x20000000, prev, root, t, bits, 0)[:76]
    nonce = 0
    while True:
        raw = base + nonce.to_bytes(4, "little")
        h = _sha(_sha(raw).digest()).digest()
        if (int.from_bytes(h, "little") <= target) != fail:
            return Header(0x20000000, prev, root, t, bits, nonce, h)
        nonce += 1


def state(n: int, salt: bytes = b"") -> dict[bytes, bytes]:
    return {b"\x01" + _sha(salt + b"acct%d" % i).digest(): b"balance %d" % (1000 * i) for i in range(n)}


def tree_of(items: dict[bytes, bytes]) -> StateTree:
    t = StateTree()
    for k, v in items.items():
        t.set(k, v)
    return t


def snapshot_bytes(items: dict[bytes, bytes], height: int = L2_HEIGHT) -> bytes:
    buf = io.BytesIO()
    root = tree_of(items).root()
    write_snapshot(buf, REGTEST, height, b"\x07" * 32, root, sorted(items.items()), len(items))
    return buf.getvalue()


def proofs_for(items: dict[bytes, bytes], keys: list[bytes]) -> ProofEvidence:
    t = tree_of(items)
    return ProofEvidence(t.root(), tuple(t.prove(k, items.__getitem__) for k in keys))


FED_SECRET = _sha(b"l2d test federation key").digest()
FED_KEY = PrivateKey(FED_SECRET).public_key_xonly.format()
# The federation's Bitcoin keys for k-of-n anchors: 3 of these 4; OUTSIDER_KEY is nobody's.
KOFN_SECRETS = [_sha(b"l2d audit bitcoin key %d" % i).digest() for i in range(4)]
KOFN = KofN.of(3, [PrivateKey(s).public_key_xonly.format() for s in KOFN_SECRETS])
OUTSIDER_KEY = PrivateKey(_sha(b"l2d audit bitcoin outsider").digest()).public_key_xonly.format()


def spend(i: int, script: bytes, value: int = 50_000, witness: bool = True) -> CMutableTransaction:
    tx = CMutableTransaction([CMutableTxIn(COutPoint(_sha(b"prev%d" % i).digest(), i), nSequence=0xFFFFFFFD)],
                             [CMutableTxOut(value, CScript(script))])
    if witness:  # segwit spend: the txid must come from the serialization without it
        sig = PrivateKey(FED_SECRET).sign_schnorr(_sha(b"msg%d" % i).digest(), b"\0" * 32)
        tx.wit = CTxWitness([CTxInWitness(CScriptWitness([sig]))])
    return tx


def anchor_tx(record: AnchorRecord, kind: AnchorKind) -> bytes:
    if kind == AnchorKind.OP_RETURN:
        out = op_return_script(record)
        value = 0
    elif kind == AnchorKind.TAPROOT:
        out = TaprootAnchor(record, FED_KEY).script_pubkey
        value = 330
    else:
        out = FederationOutput.anchor(KOFN, record).script_pubkey
        value = 330
    tx = spend(99, b"\x00\x14" + b"\x33" * 20, witness=True)
    tx.vout = [CMutableTxOut(value, CScript(out)), CMutableTxOut(90_000, CScript(b"\x00\x14" + b"\x44" * 20))]
    return tx.serialize()


@dataclasses.dataclass
class World:
    bundle: AuditBundle
    headers: list[Header]  # heights 0.. (genesis first)
    txs: list[bytes]  # raw transactions of the anchor block
    txids: list[bytes]
    items: dict[bytes, bytes]


def make_world(kind: AnchorKind, evidence: str = "proofs", start: int = 0,
               items: Optional[dict[bytes, bytes]] = None) -> World:
    """A bundle anchoring items (default: eight made-up accounts) at L2_HEIGHT in a ground regtest chain."""
    items = state(8) if items is None else items
    keys = sorted(items)
    ev = SnapshotEvidence(snapshot_bytes(items)) if evidence == "snapshot" else proofs_for(
        items, [keys[1], keys[5], b"\x02" + b"\0" * (KEY_SIZE - 1)])  # two present, one absent
    record = AnchorRecord(REGTEST.id, L2_HEIGHT, tree_of(items).root())
    coinbase = CMutableTransaction([CMutableTxIn(COutPoint(), CScript(b"\x01\x05"))],
                                   [CMutableTxOut(50 * 10**8, CScript(b"\x51"))]).serialize()
    txs = [coinbase, spend(1, b"\x51").serialize(), anchor_tx(record, kind), spend(3, b"\x52", witness=False)
           .serialize(), spend(4, b"\x53").serialize()]
    txids = [parse_tx(t).txid for t in txs]
    root, _ = compute_merkle_root(txids)
    headers = [REGTEST_GENESIS]
    for height in range(1, ANCHOR_HEIGHT + AFTER + 1):
        prev = headers[-1]
        merkle = root if height == ANCHOR_HEIGHT else _sha(b"block%d" % height).digest()
        headers.append(grind(prev.hash, merkle, prev.time + 600))
    pmt = build_partial_merkle_tree(txids, [i == ANCHOR_INDEX for i in range(len(txids))])
    bundle = AuditBundle(REGTEST.id, record, kind, FED_KEY if kind == AnchorKind.TAPROOT else b"",
                         txs[ANCHOR_INDEX], serialize_merkleblock(headers[ANCHOR_HEIGHT], pmt), start,
                         b"".join(h.serialize() for h in headers[start:]), ev,
                         kofn=KOFN if kind == AnchorKind.TAPROOT_KOFN else None)
    return World(bundle, headers, txs, txids, items)


@pytest.fixture(scope="module", params=list(AnchorKind), ids=["op_return", "taproot", "taproot_kofn"])
def world(request: pytest.FixtureRequest) -> World:
    return make_world(request.param)


def verify(b: AuditBundle, checkpoint: Optional[tuple[int, bytes]] = None, min_conf: int = 1,
           now: Optional[int] = None, federation: Optional[FederationGenesis] = None
           ):  # type: ignore[no-untyped-def]
    return verify_bundle(AuditBundle.decode(b.encode()), REGTEST, BITCOIN_REGTEST, checkpoint, min_conf, now=now,
                         federation=federation)


# -- verifies ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("evidence", ["proofs", "snapshot"])
@pytest.mark.parametrize("kind", list(AnchorKind))
def test_complete_bundle_verifies(kind: AnchorKind, evidence: str) -> None:
    w = make_world(kind, evidence)
    raw = w.bundle.encode()
    assert raw.startswith(MAGIC) and AuditBundle.decode(raw) == w.bundle
    assert AuditBundle.decode(raw).encode() == raw
    r = verify(w.bundle, now=w.headers[-1].time)
    assert (r.block_height, r.tx_index, r.confirmations) == (ANCHOR_HEIGHT, ANCHOR_INDEX, AFTER + 1)
    assert (r.tip_height, r.start_height, r.l2_height) == (ANCHOR_HEIGHT + AFTER, 0, L2_HEIGHT)
    assert r.txid == w.txids[ANCHOR_INDEX] and r.block_hash == w.headers[ANCHOR_HEIGHT].hash
    assert r.state_root == w.bundle.record.state_root and r.anchor_kind == kind
    assert r.vout == 0 and r.start_hash == BITCOIN_REGTEST.genesis_hash
    if evidence == "snapshot":
        assert (r.evidence, r.records, r.proven) == ("snapshot", 8, ())
    else:
        assert r.evidence == "root+proofs"
        assert [v is not None for _, v in r.proven] == [True, True, False]
    d = r.to_dict()
    assert d["txid"] == parse_tx(w.txs[ANCHOR_INDEX]).txid_hex and d["confirmations"] == AFTER + 1


def test_checkpoints(world: World) -> None:
    b, hs = world.bundle, world.headers
    verify(b, checkpoint=(0, hs[0].hash))
    verify(b, checkpoint=(7, hs[7].hash))
    with pytest.raises(CheckpointMismatch):
        verify(b, checkpoint=(7, hs[8].hash))
    with pytest.raises(CheckpointMismatch):
        verify(b, checkpoint=(ANCHOR_HEIGHT + AFTER + 1, hs[0].hash))  # not covered by the bundle
    from_cp = make_world(world.bundle.anchor_kind, start=3)
    r = verify(from_cp.bundle, checkpoint=(3, hs[3].hash))
    assert (r.start_height, r.confirmations, r.checkpoint) == (3, AFTER + 1, (3, hs[3].hash))
    with pytest.raises(CheckpointMismatch):
        verify(from_cp.bundle, checkpoint=(3, hs[4].hash))
    with pytest.raises(CheckpointMismatch):  # a chain starting at height 0 must start with the genesis
        verify(dataclasses.replace(from_cp.bundle, headers_start_height=0))
    with pytest.raises(CheckpointMismatch):  # mainnet parameters: not the mainnet genesis
        verify_bundle(b, REGTEST, BITCOIN_MAINNET, None, 1)


# -- tampered variants ---------------------------------------------------------------------------------------------
def test_changed_root(world: World) -> None:
    other = state(8, b"other")
    with pytest.raises(StateRootMismatch):
        verify(dataclasses.replace(world.bundle, evidence=proofs_for(other, sorted(other)[:2])))
    with pytest.raises(StateRootMismatch):
        verify(dataclasses.replace(world.bundle, evidence=SnapshotEvidence(snapshot_bytes(other))))
    with pytest.raises(StateRootMismatch):
        verify(dataclasses.replace(world.bundle, evidence=ProofEvidence(b"\x09" * 32)))


def test_bad_evidence(world: World) -> None:
    items = world.items
    with pytest.raises(EvidenceHeightMismatch):
        verify(dataclasses.replace(world.bundle, evidence=SnapshotEvidence(snapshot_bytes(items, L2_HEIGHT + 1))))
    snap = bytearray(snapshot_bytes(items))
    snap[120] ^= 1  # inside a record: the snapshot's own checksum catches it
    with pytest.raises(SnapshotInvalid):
        verify(dataclasses.replace(world.bundle, evidence=SnapshotEvidence(bytes(snap))))
    good = proofs_for(items, sorted(items)[:2])
    other = state(8, b"other")
    foreign = proofs_for(other, sorted(other)[:1]).proofs
    with pytest.raises(AccountProofInvalid, match="account proof 2"):
        verify(dataclasses.replace(world.bundle, evidence=ProofEvidence(good.state_root, good.proofs + foreign)))


def test_changed_record(world: World) -> None:
    rec = world.bundle.record
    for changed in (dataclasses.replace(rec, l2_height=rec.l2_height + 1),
                    dataclasses.replace(rec, prev_link=b"\x01" * 32)):
        with pytest.raises(AnchorNotInTx):
            verify(dataclasses.replace(world.bundle, record=changed))
    if world.bundle.anchor_kind == AnchorKind.TAPROOT_KOFN:
        with pytest.raises(AnchorNotInTx):  # right record, claimed as OP_RETURN
            verify(dataclasses.replace(world.bundle, anchor_kind=AnchorKind.OP_RETURN, kofn=None))
    elif world.bundle.anchor_kind == AnchorKind.TAPROOT:
        other_key = PrivateKey(_sha(b"someone else").digest()).public_key_xonly.format()
        with pytest.raises(AnchorNotInTx):
            verify(dataclasses.replace(world.bundle, federation_key=other_key))
        with pytest.raises(AnchorNotInTx):  # right record, claimed as OP_RETURN
            verify(dataclasses.replace(world.bundle, anchor_kind=AnchorKind.OP_RETURN, federation_key=b""))
    else:
        with pytest.raises(AnchorNotInTx):
            verify(dataclasses.replace(world.bundle, anchor_kind=AnchorKind.TAPROOT, federation_key=FED_KEY))


def _mb(world: World, pmt: PartialMerkleTree) -> bytes:
    return serialize_merkleblock(world.headers[ANCHOR_HEIGHT], pmt)


def test_wrong_merkle_proof(world: World) -> None:
    header, pmt = parse_merkleblock(world.bundle.merkleblock)
    flipped = (pmt.hashes[0][:5] + bytes([pmt.hashes[0][5] ^ 0x40]) + pmt.hashes[0][6:],) + pmt.hashes[1:]
    with pytest.raises(MerkleRootMismatch):
        verify(dataclasses.replace(world.bundle, merkleblock=_mb(world, dataclasses.replace(pmt, hashes=flipped))))
    other = build_partial_merkle_tree(world.txids, [i == 1 for i in range(5)])
    with pytest.raises(TxNotInProof):  # tx not in block (as far as the proof shows)
        verify(dataclasses.replace(world.bundle, merkleblock=_mb(world, other)))
    with pytest.raises(AnchorNotInTx):  # another transaction of the block claimed as the anchor
        verify(dataclasses.replace(world.bundle, anchor_tx=world.txs[3]))
    # CVE-2012-2459: the last transaction duplicated gives the same root; the proof is refused
    dup = build_partial_merkle_tree(world.txids + [world.txids[-1]], [i in (ANCHOR_INDEX, 5) for i in range(6)])
    with pytest.raises(MerkleMutation):
        verify(dataclasses.replace(world.bundle, merkleblock=_mb(world, dup)))


def _headers(world: World, edit: Callable[[list[Header]], list[Header]]) -> AuditBundle:
    hs = edit(list(world.headers))
    return dataclasses.replace(world.bundle, headers=b"".join(h.serialize() for h in hs))


def test_broken_header_chain(world: World) -> None:
    with pytest.raises(BadLink) as e:
        verify(_headers(world, lambda hs: hs[:10] + hs[11:]))
    assert e.value.height == 10

    def bad_pow(hs: list[Header]) -> list[Header]:
        h = hs[12]
        hs[12] = grind(h.prev_hash, h.merkle_root, h.time, fail=True)
        return hs

    with pytest.raises(BadProofOfWork) as e2:
        verify(_headers(world, bad_pow))
    assert e2.value.height == 12
    with pytest.raises(BlockNotInChain):
        verify(_headers(world, lambda hs: hs[:ANCHOR_HEIGHT]))
    with pytest.raises(TimeTooNew):  # headers more than two hours after the verifier's clock
        verify(world.bundle, now=world.headers[-1].time - 7201)


def test_too_few_confirmations(world: World) -> None:
    assert verify(world.bundle, min_conf=AFTER + 1).confirmations == AFTER + 1
    with pytest.raises(TooFewConfirmations):
        verify(world.bundle, min_conf=AFTER + 2)


def test_trailer_checksum(world: World) -> None:
    raw = world.bundle.encode()
    for pos in (len(raw) - 1, len(raw) // 2, 20):
        bad = bytearray(raw)
        bad[pos] ^= 1
        with pytest.raises(BundleChecksumMismatch):
            AuditBundle.decode(bytes(bad))


def _reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_malformed_bundles(world: World) -> None:
    raw = world.bundle.encode()
    body = raw[:-32]
    with pytest.raises(BundleMalformed):
        AuditBundle.decode(b"L2DSNAP\0" + raw[8:])
    with pytest.raises(BundleMalformed):
        AuditBundle.decode(b"")
    with pytest.raises(UnknownVersion):
        AuditBundle.decode(_reseal(body[:8] + b"\x03" + body[9:]))
    with pytest.raises(Truncated):  # version 2 has a sixth section, the commit
        AuditBundle.decode(_reseal(body[:8] + b"\x02" + body[9:]))
    with pytest.raises(WrongNetwork):
        AuditBundle.decode(_reseal(body[:9] + b"\x63" + body[10:]))
    for cut in (len(raw) - 1, len(raw) - 40, 30, 12):
        with pytest.raises(Truncated):
            AuditBundle.decode(raw[:cut])
    with pytest.raises(TrailingBytes):
        AuditBundle.decode(_reseal(body + b"\0"))
    with pytest.raises(BundleMalformed):  # first section tag is not ANCHOR
        AuditBundle.decode(_reseal(body[:10] + bytes((Section.ANCHOR_TX,)) + body[11:]))
    with pytest.raises(WrongNetwork):  # the bundle is fine, but not for this network
        verify_bundle(world.bundle, LOCAL, BITCOIN_REGTEST, None, 1)


# -- the anchored block's commit (version 2 bundles) ---------------------------------------------------------------
MEMBER_SECRETS = [_sha(b"l2d audit member %d" % i).digest() for i in range(5)]  # 0..3 members, 4 an outsider
FEDERATION = FederationGenesis(REGTEST, Membership(tuple(PrivateKey(s).public_key_xonly.format()
                                                         for s in MEMBER_SECRETS[:4]), 3),
                               ("alice", "bob", "carol", "dave"), genesis_header(REGTEST, 1_700_000_000_000,
                                                                                 _sha(b"genesis").digest()))


def anchored_block(world: World, **change: object) -> BlockHeader:
    header = BlockHeader(REGTEST.id, L2_HEIGHT, _sha(b"parent").digest(), 1_700_000_600_000, 0, tx_root([]),
                         world.bundle.record.state_root)
    return dataclasses.replace(header, **change)  # type: ignore[arg-type]


def with_commit(world: World, signers: tuple[int, ...] = (0, 1, 2), network: Network = REGTEST,
                secrets: Optional[list[bytes]] = None, **change: object) -> AuditBundle:
    """The world's bundle with the commit of its anchored L2 block, signed by the given member indices."""
    header = anchored_block(world, **change)
    keys = secrets or MEMBER_SECRETS
    commit = Commit.assemble(4, {i: sign_block(keys[i], network, header.hash, bytes(32)) for i in signers})
    return dataclasses.replace(world.bundle, commit=CommitEvidence(header, commit))


def test_a_bundle_with_the_commit_verifies(world: World) -> None:
    b = with_commit(world)
    raw = b.encode()
    assert raw[8] == 2 and world.bundle.encode()[8] == 1  # the version says whether the sixth section is there
    assert AuditBundle.decode(raw) == b and b.commit is not None
    assert raw[-32 - 9 - 118 - 2 - 3 * 64:-32 - 118 - 2 - 3 * 64] == bytes((Section.COMMIT,)) + (
        118 + 2 + 3 * 64).to_bytes(8, "big")
    r = verify(b, federation=FEDERATION)
    assert (r.l2_block_hash, r.signers, r.signers_checked) == (b.commit.header.hash, (0, 1, 2), True)
    d = r.to_dict()["commit"]
    assert d == {"l2_block_hash": b.commit.header.hash.hex(), "signers": [0, 1, 2], "checked": True}
    unchecked = verify(b)  # no federation: everything else is checked, the signatures are not
    assert (unchecked.signers, unchecked.signers_checked) == ((0, 1, 2), False)
    assert verify(world.bundle).to_dict()["commit"] is None  # a version 1 bundle verifies as before


def test_the_commit_must_be_the_anchored_blocks(world: World) -> None:
    with pytest.raises(CommitMismatch, match=f"height {L2_HEIGHT + 1}"):
        verify(with_commit(world, height=L2_HEIGHT + 1))
    with pytest.raises(CommitMismatch, match="state root 0909"):  # checked with or without a federation
        verify(with_commit(world, state_root=b"\x09" * 32))


def test_the_federation_must_have_signed(world: World) -> None:
    with pytest.raises(NotEnoughSignatures, match="2 member signatures, the threshold is 3 \\(signed by member 0 "
                                                  "\\(alice\\), member 3 \\(dave\\)\\)"):
        verify(with_commit(world, (0, 3)), federation=FEDERATION)
    outsider = MEMBER_SECRETS[:2] + [MEMBER_SECRETS[4], MEMBER_SECRETS[3]]  # slot 2 signed by a non-member
    with pytest.raises(BadCommitSignature, match="member 2 \\(carol\\) does not verify"):
        verify(with_commit(world, (0, 1, 2), secrets=outsider), federation=FEDERATION)
    with pytest.raises(BadCommitSignature, match="member 0 \\(alice\\)"):
        verify(with_commit(world, network=LOCAL), federation=FEDERATION)
    b = with_commit(world, (0, 1))
    assert b.commit is not None
    copied = Commit(4, (0, 1, 2), b.commit.commit.signatures + b.commit.commit.signatures[1:])  # bob's, twice
    with pytest.raises(BadCommitSignature, match="member 2 \\(carol\\)"):
        verify(dataclasses.replace(b, commit=CommitEvidence(b.commit.header, copied)), federation=FEDERATION)


def test_members_given_need_a_commit_of_their_network(world: World) -> None:
    with pytest.raises(CommitMissing, match="version 1 bundle"):
        verify(world.bundle, federation=FEDERATION)
    local = FederationGenesis(LOCAL, FEDERATION.members, FEDERATION.member_ids,
                              genesis_header(LOCAL, 1_700_000_000_000, _sha(b"genesis").digest()))
    with pytest.raises(FederationMismatch, match="network local, the bundle for regtest"):
        verify(with_commit(world), federation=local)


def test_malformed_commit_sections(world: World) -> None:
    b = with_commit(world, (0, 1))
    assert b.commit is not None
    raw = b.encode()
    body = raw[:-32]
    sig_end = len(body)
    section = 1 + 8 + 118 + 2 + 2 * 64
    head = body[:sig_end - section]
    length = (118 + 2 + 3 * 64).to_bytes(8, "big")
    # one more signature than the bitmap has bits (a duplicated signer): not a commit
    forged = head + bytes((Section.COMMIT,)) + length + body[sig_end - section + 9:] + b.commit.commit.signatures[1]
    with pytest.raises(TrailingBytes, match="after the last signature"):
        AuditBundle.decode(_reseal(forged))
    with pytest.raises(WrongNetwork):  # the header names another network
        AuditBundle.decode(_reseal(body[:sig_end - section + 9 + 1] + bytes((LOCAL.id,))
                                   + body[sig_end - section + 9 + 2:]))
    with pytest.raises(Truncated):  # the section ends inside the header
        AuditBundle.decode(_reseal(head + bytes((Section.COMMIT,)) + (100).to_bytes(8, "big")
                                   + body[sig_end - section + 9:sig_end - section + 109]))
    with pytest.raises(BundleMalformed, match="section 7"):
        AuditBundle.decode(_reseal(head + b"\x07" + body[sig_end - section + 1:]))


# -- k-of-n anchors (kind 2): k and the n member keys instead of one federation key --------------------------------
@pytest.fixture(scope="module")
def kofn_world() -> World:
    return make_world(AnchorKind.TAPROOT_KOFN)


ANCHOR_BODY = 10 + 9  # the ANCHOR section's body starts after the preamble, its tag and its u64 length


def with_anchor_body(raw: bytes, body: bytes) -> bytes:
    """raw (a sealed bundle) with its ANCHOR section's body replaced and the trailer resealed."""
    old = int.from_bytes(raw[11:19], "big")
    return _reseal(raw[:11] + len(body).to_bytes(8, "big") + body + raw[ANCHOR_BODY + old:-32])


def test_kofn_bundle_layout_and_report(kofn_world: World) -> None:
    b = kofn_world.bundle
    raw = b.encode()
    n = KOFN.n
    body = raw[ANCHOR_BODY:ANCHOR_BODY + 78 + 1 + 2 + 32 * n]
    assert int.from_bytes(raw[11:19], "big") == 78 + 1 + 2 + 32 * n == len(body)
    assert body == b.record.encode() + b"\x02" + bytes((3, 4)) + b"".join(sorted(KOFN.keys))
    assert raw[8] == 1 and AuditBundle.decode(raw) == b  # the bundle version is unchanged: the kind byte says it
    r = verify(b)
    output = FederationOutput.anchor(KOFN, b.record)
    assert (r.anchor_kind, r.kofn, r.merkle_root, r.vout) == (AnchorKind.TAPROOT_KOFN, KOFN, output.merkle_root, 0)
    d = r.to_dict()
    assert d["anchor_kind"] == "taproot-kofn"
    assert d["k_of_n"] == {"k": 3, "n": 4, "keys": [key.hex() for key in KOFN.keys], "internal_key": NUMS_KEY.hex(),
                           "merkle_root": output.merkle_root.hex()}
    assert verify(make_world(AnchorKind.TAPROOT).bundle).to_dict()["k_of_n"] is None
    v2 = with_commit(kofn_world)  # a version 2 bundle of a k-of-n anchor
    assert AuditBundle.decode(v2.encode()) == v2 and verify(v2, federation=FEDERATION).kofn == KOFN


def test_kofn_tree_must_be_the_outputs(kofn_world: World) -> None:
    """Another k, a key swapped for an outsider's, a key missing or added, another record: another tree, another
    P2TR output, which the transaction does not have."""
    b, keys = kofn_world.bundle, list(KOFN.keys)
    variants = {
        "k = 2": KofN(2, KOFN.keys),
        "k = 4": KofN(4, KOFN.keys),
        "a key swapped": KofN.of(3, keys[:3] + [OUTSIDER_KEY]),
        "a key missing": KofN.of(3, keys[1:]),
        "a key added": KofN.of(3, keys + [OUTSIDER_KEY]),
    }
    for name, policy in variants.items():
        with pytest.raises(AnchorNotInTx, match=f"k-of-n Taproot \\({policy.k}-of-{policy.n}, NUMS internal key"):
            verify(dataclasses.replace(b, kofn=policy))
    with pytest.raises(AnchorNotInTx):  # another link: the commitment leaf differs
        verify(dataclasses.replace(b, record=dataclasses.replace(b.record, prev_link=b"\x01" * 32)))
    for key in KOFN.keys:  # no member's key alone is the anchor
        with pytest.raises(AnchorNotInTx):
            verify(dataclasses.replace(b, anchor_kind=AnchorKind.TAPROOT, federation_key=key, kofn=None))
    with pytest.raises(AnchorNotInTx):  # nor is NUMS as a single-key Taproot anchor of the record
        verify(dataclasses.replace(b, anchor_kind=AnchorKind.TAPROOT, federation_key=NUMS_KEY, kofn=None))


def test_kofn_malformed_policies(kofn_world: World) -> None:
    raw = kofn_world.bundle.encode()
    record = kofn_world.bundle.record.encode()
    keys = b"".join(KOFN.keys)
    cases = {
        "k = 0": (bytes((0, 4)) + keys, InvalidPolicy, "threshold k = 0 is outside 1..4"),
        "k > n": (bytes((5, 4)) + keys, InvalidPolicy, "threshold k = 5 is outside 1..4"),
        "n = 0": (bytes((1, 0)), InvalidPolicy, "1..64 keys, not 0"),
        "n = 65": (bytes((1, 65)) + keys, InvalidPolicy, "1..64 keys, not 65"),
        "unsorted": (bytes((3, 4)) + keys[32:64] + keys[:32] + keys[64:], InvalidPolicy, "ascending"),
        "duplicate": (bytes((3, 4)) + keys[:64] + keys[32:64] + keys[96:], InvalidPolicy, "appears twice"),
        "not an x-only key": (bytes((3, 4)) + keys[:96] + b"\xff" * 32, InvalidPolicy, "not the x coordinate"),
        "fewer keys than n": (bytes((3, 4)) + keys[:96], Truncated, "anchor section"),
        "more keys than n": (bytes((3, 3)) + keys, TrailingBytes, None),
    }
    for name, (policy, error, message) in cases.items():
        bad = with_anchor_body(raw, record + b"\x02" + policy)
        with pytest.raises(error, match=message):
            AuditBundle.decode(bad)
        damaged = bytearray(bad)
        damaged[len(bad) // 2] ^= 1  # the same, with a broken trailer: the damage is reported, not the policy
        if error is not Truncated:
            with pytest.raises(BundleChecksumMismatch, match="first inconsistency"):
                AuditBundle.decode(bytes(damaged))
    assert AuditBundle.decode(with_anchor_body(raw, record + b"\x02" + KOFN.encode())) == kofn_world.bundle
    with pytest.raises(BundleMalformed, match="anchor kind 3"):
        AuditBundle.decode(with_anchor_body(raw, record + b"\x03" + KOFN.encode()))
    with pytest.raises(TrailingBytes):  # a policy after a single-key Taproot anchor
        AuditBundle.decode(with_anchor_body(raw, record + b"\x01" + FED_KEY + KOFN.encode()))


def test_kofn_bundle_fields_agree(kofn_world: World) -> None:
    b = kofn_world.bundle
    with pytest.raises(OutOfRange, match="k-of-n policy"):
        dataclasses.replace(b, kofn=None)
    with pytest.raises(OutOfRange, match="k-of-n policy"):
        dataclasses.replace(b, anchor_kind=AnchorKind.OP_RETURN)
    with pytest.raises(OutOfRange, match="no single federation key"):
        dataclasses.replace(b, federation_key=FED_KEY)
