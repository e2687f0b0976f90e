"""Audit bundles: one file that lets an auditor check, offline, that Bitcoin proof-of-work commits to an L2 state.

A bundle holds the anchor record and how it is committed (OP_RETURN, Taproot under one federation key, or
Taproot under the federation's k-of-n policy and BIP341's NUMS key), the raw anchor transaction, its
gettxoutproof merkle block, a Bitcoin header chain from a checkpoint past the anchor block, and the L2 evidence (a
whole snapshot, or a state root with account proofs); a version 2 bundle also holds the anchored L2 block's header
and its commit, the member signatures that tie the state root to the federation. Byte layout and the order of
checks: docs/audit-bundle.md.

Pure and consensus-critical: the verifier imports it. No clock (``now`` is an argument), no I/O beyond the
in-memory bytes handed in.
"""
from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Union

from .anchor_format import RECORD_SIZE, AnchorRecord, TaprootAnchor, op_return_script
from .block import BlockHeader
from .codec import Reader
from .commit import Commit
from .errors import DecodeError, L2Error, OutOfRange, ProofError, Truncated, UnknownVersion, WrongNetwork
from .genesis_file import FederationGenesis
from .kofn import NUMS_KEY, FederationOutput, KofN
from .params import NETWORKS, Network
from .snapshot import HEADER_SIZE as SNAPSHOT_HEADER_SIZE
from .snapshot import SnapshotHeader, verify_snapshot
from .spv import (HEADER_SIZE, ChainParams, CheckpointMismatch, HeaderChain, parse_header, parse_merkleblock, parse_tx,
                  verify_tx_in_block)
from .tree import Proof, verify_proof

MAGIC = b"L2DAUDIT"
BUNDLE_VERSION = 1  # five sections
BUNDLE_VERSION_COMMIT = 2  # the five, then COMMIT
TRAILER_SIZE = 32
_PREAMBLE = struct.Struct(">8sBB")
_SECTION = struct.Struct(">BQ")
_U32 = struct.Struct(">I")
MAX_TX_SIZE = 4_000_000  # no transaction is larger than a block's weight limit
MAX_MERKLEBLOCK_SIZE = 1 << 20  # 16666 hashes at most (bridge.spv.MAX_BLOCK_TXS): well under 1 MiB
MAX_PROOF_SIZE = 1 << 20
_ID_TO_NETWORK = {n.id: n for n in NETWORKS.values()}


class Section(IntEnum):
    ANCHOR = 1
    ANCHOR_TX = 2
    MERKLEBLOCK = 3
    HEADERS = 4
    EVIDENCE = 5
    COMMIT = 6


class AnchorKind(IntEnum):
    OP_RETURN = 0
    TAPROOT = 1  # key path of one federation key, tweaked by the <link> OP_DROP <F> OP_CHECKSIG leaf
    TAPROOT_KOFN = 2  # NUMS internal key; the k-of-n leaf beside the OP_RETURN <link> leaf (l2d.core.kofn)


class EvidenceKind(IntEnum):
    SNAPSHOT = 0
    ROOT_AND_PROOFS = 1


# -- errors --------------------------------------------------------------------------------------------------------
class BundleMalformed(DecodeError):
    """Bytes that are not an audit bundle this code reads (l2-verify exit 2)."""


class AuditError(L2Error):
    """A well-formed bundle that does not verify (l2-verify exit 1)."""


class BundleChecksumMismatch(AuditError):
    pass


class AccountProofInvalid(AuditError):
    pass


class EvidenceHeightMismatch(AuditError):
    pass


class StateRootMismatch(AuditError):
    pass


class AnchorNotInTx(AuditError):
    pass


class BlockNotInChain(AuditError):
    pass


class TooFewConfirmations(AuditError):
    pass


class CommitMissing(AuditError):
    """The auditor asked for the federation's signatures (members given) and the bundle carries no commit."""


class CommitMismatch(AuditError):
    """The bundle's L2 block header is not at the anchor record's height or not for its state root."""


class FederationMismatch(AuditError):
    """The federation genesis given is for another network than the bundle."""


# -- the bundle ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SnapshotEvidence:
    """A whole snapshot file (l2d.core.snapshot format); its recomputed root is the evidence root."""

    snapshot: bytes

    def encode(self) -> bytes:
        return bytes((EvidenceKind.SNAPSHOT,)) + self.snapshot


@dataclass(frozen=True, slots=True)
class ProofEvidence:
    """A state root and proofs (inclusion or non-inclusion) of some keys under it."""

    state_root: bytes
    proofs: tuple[Proof, ...] = ()

    def __post_init__(self) -> None:
        if len(self.state_root) != 32:
            raise OutOfRange("evidence state root must be 32 bytes")

    def encode(self) -> bytes:
        out = [bytes((EvidenceKind.ROOT_AND_PROOFS,)), self.state_root, _U32.pack(len(self.proofs))]
        for p in self.proofs:
            raw = p.encode()
            out += [_U32.pack(len(raw)), raw]
        return b"".join(out)


Evidence = Union[SnapshotEvidence, ProofEvidence]


@dataclass(frozen=True, slots=True)
class CommitEvidence:
    """The anchored L2 block's header and its commit: which members signed the block (so its state root)."""

    header: BlockHeader
    commit: Commit

    def encode(self) -> bytes:
        return self.header.encode() + self.commit.encode()


@dataclass(frozen=True, slots=True)
class AuditBundle:
    network_id: int  # the L2 network
    record: AnchorRecord
    anchor_kind: AnchorKind
    federation_key: bytes  # x-only, Taproot anchors only (b"" for OP_RETURN)
    anchor_tx: bytes  # raw Bitcoin transaction, with or without witness
    merkleblock: bytes  # gettxoutproof result: block header + partial merkle tree
    headers_start_height: int  # height of the first header (the checkpoint)
    headers: bytes  # concatenated 80-byte headers, first = checkpoint, ascending
    evidence: Evidence
    commit: Optional[CommitEvidence] = None  # version 2 bundles only
    kofn: Optional[KofN] = None  # the federation's k-of-n policy, TAPROOT_KOFN anchors only

    def __post_init__(self) -> None:
        if not 0 <= self.network_id <= 0xFF or self.record.network_id != self.network_id:
            raise OutOfRange(f"bundle network id {self.network_id} and record network id "
                             f"{self.record.network_id} must be the same byte")
        if self.anchor_kind == AnchorKind.TAPROOT and len(self.federation_key) != 32:
            raise OutOfRange("a Taproot anchor needs the 32-byte x-only federation key")
        if self.anchor_kind != AnchorKind.TAPROOT and self.federation_key:
            raise OutOfRange(f"an anchor of kind {self.anchor_kind.name} carries no single federation key")
        if (self.anchor_kind == AnchorKind.TAPROOT_KOFN) != (self.kofn is not None):
            raise OutOfRange("a k-of-n policy is carried by a TAPROOT_KOFN anchor, and only by one")
        if not self.headers or len(self.headers) % HEADER_SIZE:
            raise OutOfRange(f"header chain is {len(self.headers)} bytes: not a non-zero multiple of {HEADER_SIZE}")
        if not 0 <= self.headers_start_height <= 0xFFFFFFFF:
            raise OutOfRange(f"start height {self.headers_start_height} outside u32")
        if len(self.headers) // HEADER_SIZE > 0xFFFFFFFF:
            raise OutOfRange("too many headers")

    @property
    def header_count(self) -> int:
        return len(self.headers) // HEADER_SIZE

    @property
    def tip_height(self) -> int:
        return self.headers_start_height + self.header_count - 1

    def encode(self) -> bytes:
        policy = b"" if self.kofn is None else self.kofn.encode()
        anchor = self.record.encode() + bytes((self.anchor_kind,)) + self.federation_key + policy
        headers = _U32.pack(self.headers_start_height) + _U32.pack(self.header_count) + self.headers
        sections = [(Section.ANCHOR, anchor), (Section.ANCHOR_TX, self.anchor_tx),
                    (Section.MERKLEBLOCK, self.merkleblock), (Section.HEADERS, headers),
                    (Section.EVIDENCE, self.evidence.encode())]
        if self.commit is not None:
            sections.append((Section.COMMIT, self.commit.encode()))
        version = BUNDLE_VERSION if self.commit is None else BUNDLE_VERSION_COMMIT
        body = [_PREAMBLE.pack(MAGIC, version, self.network_id)]
        for tag, data in sections:
            body += [_SECTION.pack(tag, len(data)), data]
        raw = b"".join(body)
        return raw + hashlib.sha256(raw).digest()

    @classmethod
    def decode(cls, b: bytes) -> "AuditBundle":
        """Strict decode: magic, version, known network, the five sections (version 2: six) in order, no trailing
        bytes, checksum.

        A structural error in a file whose checksum does not hold either is reported as BundleChecksumMismatch
        (the file was damaged); running out of bytes is always Truncated.
        """
        b = bytes(b)
        head = b[:len(MAGIC)]
        if head != MAGIC[:len(head)] or not head:
            raise BundleMalformed(f"not an l2d audit bundle: starts with {head.hex()}, expected magic {MAGIC.hex()}")
        try:
            bundle = cls._parse(b)
        except DecodeError as e:
            if not isinstance(e, (Truncated, UnknownVersion)) and _checksum_fails(b):
                raise BundleChecksumMismatch(f"checksum mismatch: the bundle is damaged (first inconsistency: "
                                             f"{e})") from e
            raise
        if _checksum_fails(b):
            raise BundleChecksumMismatch("checksum mismatch: the bundle's SHA-256 trailer does not match its "
                                         "contents (damaged or altered)")
        return bundle

    @classmethod
    def _parse(cls, b: bytes) -> "AuditBundle":
        r = Reader(b, "audit bundle")
        magic, version, net_id = _PREAMBLE.unpack(r.take(_PREAMBLE.size))
        if version not in (BUNDLE_VERSION, BUNDLE_VERSION_COMMIT):
            raise UnknownVersion(f"audit bundle version {version} (this code reads versions {BUNDLE_VERSION} and "
                                 f"{BUNDLE_VERSION_COMMIT})")
        network = _ID_TO_NETWORK.get(net_id)
        if network is None:
            raise WrongNetwork(f"audit bundle is for unknown network id {net_id}")
        if len(b) - r.pos < TRAILER_SIZE:
            raise _truncated(r, TRAILER_SIZE)
        r = Reader(b[:-TRAILER_SIZE], "audit bundle")
        r.pos = _PREAMBLE.size
        sections = {}
        for tag in Section if version == BUNDLE_VERSION_COMMIT else tuple(Section)[:-1]:
            got, length = _SECTION.unpack(r.take(_SECTION.size))
            if got != tag:
                raise BundleMalformed(f"section {got} at offset {r.pos - _SECTION.size}, expected {tag.name} ({tag})")
            sections[tag] = r.take(length)
        r.end()

        a = Reader(sections[Section.ANCHOR], "anchor section")
        record = AnchorRecord.decode(a.take(RECORD_SIZE), network)
        kind_byte = a.u8()
        if kind_byte not in tuple(AnchorKind):
            raise BundleMalformed(f"anchor kind {kind_byte}")
        kind = AnchorKind(kind_byte)
        fed_key = a.take(32) if kind == AnchorKind.TAPROOT else b""
        kofn = KofN.read(a) if kind == AnchorKind.TAPROOT_KOFN else None  # InvalidPolicy: k, n, keys
        a.end()

        anchor_tx = sections[Section.ANCHOR_TX]
        if not 0 < len(anchor_tx) <= MAX_TX_SIZE:
            raise BundleMalformed(f"anchor transaction is {len(anchor_tx)} bytes")
        merkleblock = sections[Section.MERKLEBLOCK]
        if len(merkleblock) > MAX_MERKLEBLOCK_SIZE:
            raise BundleMalformed(f"merkle block is {len(merkleblock)} bytes, more than {MAX_MERKLEBLOCK_SIZE}")
        parse_merkleblock(merkleblock)  # structure only (DecodeError); the rules are checked by verify_bundle

        h = Reader(sections[Section.HEADERS], "headers section")
        start = h.u32()
        count = h.u32()
        if count == 0:
            raise BundleMalformed("header chain is empty")
        headers = h.take(count * HEADER_SIZE)
        h.end()

        evidence = _decode_evidence(sections[Section.EVIDENCE], network)
        commit = None
        if Section.COMMIT in sections:
            c = Reader(sections[Section.COMMIT], "commit section")
            commit = CommitEvidence(BlockHeader.read(c, network), Commit.decode(c.take(c.remaining())))
        return cls(net_id, record, kind, fed_key, anchor_tx, merkleblock, start, headers, evidence, commit, kofn)


def _truncated(r: Reader, need: int) -> DecodeError:
    return Truncated(f"{r.what}: needs {need} bytes at offset {r.pos}, only {len(r.buf) - r.pos} left")


def _checksum_fails(b: bytes) -> bool:
    return len(b) < TRAILER_SIZE or hashlib.sha256(b[:-TRAILER_SIZE]).digest() != b[-TRAILER_SIZE:]


def _decode_evidence(data: bytes, network: Network) -> Evidence:
    r = Reader(data, "evidence section")
    kind = r.u8()
    if kind == EvidenceKind.SNAPSHOT:
        snap = r.take(r.remaining())
        SnapshotHeader.decode(snap[:SNAPSHOT_HEADER_SIZE], network)  # header structure (the rest: verify_bundle)
        return SnapshotEvidence(snap)
    if kind == EvidenceKind.ROOT_AND_PROOFS:
        root = r.take(32)
        n = r.u32()
        proofs = []
        for i in range(n):
            length = r.u32()
            if length > MAX_PROOF_SIZE:
                raise BundleMalformed(f"account proof {i} is {length} bytes, more than {MAX_PROOF_SIZE}")
            raw = r.take(length)
            p = Proof.decode(raw)
            if p.encode() != raw:
                raise BundleMalformed(f"account proof {i} is not in its canonical encoding")
            proofs.append(p)
        r.end()
        return ProofEvidence(root, tuple(proofs))
    raise BundleMalformed(f"evidence kind {kind}")


# -- verification --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditReport:
    network: str
    l2_height: int
    state_root: bytes
    evidence: str  # "snapshot" or "root+proofs"
    records: Optional[int]  # snapshot record count
    proven: tuple[tuple[bytes, Optional[bytes]], ...]  # (key, value or None if proven absent)
    anchor_kind: AnchorKind
    txid: bytes  # internal order
    vout: int
    block_hash: bytes
    block_height: int
    tx_index: int
    chain: str
    start_height: int
    start_hash: bytes
    tip_height: int
    tip_hash: bytes
    confirmations: int
    chain_work: int  # cumulative work from the first header of the bundle to the tip
    checkpoint: Optional[tuple[int, bytes]]
    l2_block_hash: Optional[bytes] = None  # the anchored L2 block's, when the bundle carries its commit
    signers: Optional[tuple[int, ...]] = None  # member indices in that commit
    signers_checked: bool = False  # their signatures were verified against a federation genesis
    kofn: Optional[KofN] = None  # the k-of-n policy of a TAPROOT_KOFN anchor
    merkle_root: bytes = b""  # its script tree's root: TapBranch(k-of-n leaf, OP_RETURN <link> leaf)

    def to_dict(self) -> dict[str, object]:
        return {
            "network": self.network, "l2_height": self.l2_height, "state_root": self.state_root.hex(),
            "evidence": self.evidence, "records": self.records,
            "proven": [{"key": k.hex(), "present": v is not None, "value": None if v is None else v.hex()}
                       for k, v in self.proven],
            "anchor_kind": self.anchor_kind.name.lower().replace("_", "-"), "txid": self.txid[::-1].hex(),
            "vout": self.vout, "block_hash": self.block_hash[::-1].hex(), "block_height": self.block_height,
            "tx_index": self.tx_index, "chain": self.chain, "start_height": self.start_height,
            "start_hash": self.start_hash[::-1].hex(), "tip_height": self.tip_height,
            "tip_hash": self.tip_hash[::-1].hex(), "confirmations": self.confirmations,
            "chain_work": hex(self.chain_work),
            "checkpoint": None if self.checkpoint is None else f"{self.checkpoint[0]}:{self.checkpoint[1][::-1].hex()}",
            "commit": None if self.signers is None or self.l2_block_hash is None else {
                "l2_block_hash": self.l2_block_hash.hex(), "signers": list(self.signers),
                "checked": self.signers_checked},
            "k_of_n": None if self.kofn is None else {
                "k": self.kofn.k, "n": self.kofn.n, "keys": [key.hex() for key in self.kofn.keys],
                "internal_key": NUMS_KEY.hex(), "merkle_root": self.merkle_root.hex()},
        }


def kofn_output(bundle: AuditBundle) -> FederationOutput:
    """The P2TR output a TAPROOT_KOFN anchor must be: NUMS_KEY tweaked by the tree of the bundle's k-of-n leaf and
    the commitment leaf OP_RETURN <link> of its record."""
    if bundle.kofn is None:
        raise OutOfRange(f"an anchor of kind {bundle.anchor_kind.name} has no k-of-n policy")
    return FederationOutput.anchor(bundle.kofn, bundle.record)


def anchor_script(bundle: AuditBundle) -> bytes:
    """The output script that must carry the bundle's record."""
    if bundle.anchor_kind == AnchorKind.TAPROOT:
        return TaprootAnchor(bundle.record, bundle.federation_key).script_pubkey
    if bundle.anchor_kind == AnchorKind.TAPROOT_KOFN:
        return kofn_output(bundle).script_pubkey
    return op_return_script(bundle.record)


def verify_bundle(bundle: AuditBundle, network: Network, chain_params: ChainParams,
                  checkpoint: Optional[tuple[int, bytes]], min_conf: int, *, now: Optional[int] = None,
                  federation: Optional[FederationGenesis] = None) -> AuditReport:
    """Check the whole chain of evidence, in this order (each failure its own error, see docs/audit-bundle.md):

    0. federation given: it is for the bundle's network (FederationMismatch) and the bundle carries a commit
       (CommitMissing);
    1. the L2 evidence: the snapshot verifies (its records hash to its root) and is at the record's height, or
       every account proof verifies under the given root;
    2. the anchor record's state root is that root;
    2a. a bundle with a commit: its L2 block header is at the record's height with the record's state root
       (CommitMismatch) and, federation given, at least m of its members signed that block (NotEnoughSignatures,
       BadCommitSignature); without a federation the signatures are not checked (the report says so);
    3. the anchor transaction has an output carrying the record (the canonical OP_RETURN script, the P2TR
       output committing to it under the federation key, or for a k-of-n anchor the P2TR output of NUMS_KEY
       tweaked by TapBranch(the bundle's k-of-n leaf, OP_RETURN <link>): AnchorNotInTx otherwise);
    4. the transaction is in the merkle block's block (bridge.spv.verify_tx_in_block: Core's partial merkle tree
       rules, txid from the non-witness serialization, no 64-byte transactions);
    5. the header chain: the checkpoint (height:hash, internal byte order) if given, linkage, proof of work,
       difficulty, median time past and, if now is given, the 2-hour future limit;
    6. the merkle block's header is in that chain;
    7. confirmations (tip height - block height + 1) >= min_conf.
    """
    network.check(bundle.network_id, "audit bundle")
    if min_conf < 0:
        raise OutOfRange(f"min_conf {min_conf} is negative")
    record = bundle.record
    if federation is not None:
        if federation.network != network:
            raise FederationMismatch(f"the federation genesis is for network {federation.network.name}, the bundle "
                                     f"for {network.name}")
        if bundle.commit is None:
            raise CommitMissing(f"the bundle carries no commit of L2 block {record.l2_height} (a version "
                                f"{bundle_version(bundle)} bundle): nothing shows the federation's members signed "
                                f"its state root")

    # 1-2. L2 evidence -> root == record root
    ev = bundle.evidence
    proven: list[tuple[bytes, Optional[bytes]]] = []
    records: Optional[int] = None
    if isinstance(ev, SnapshotEvidence):
        header = verify_snapshot(io.BytesIO(ev.snapshot), network)
        root, records, evidence_name = header.state_root, header.record_count, "snapshot"
        if header.height != record.l2_height:
            raise EvidenceHeightMismatch(f"snapshot is at L2 height {header.height}, the anchor record at "
                                         f"{record.l2_height}")
    else:
        root, evidence_name = ev.state_root, "root+proofs"
        for i, p in enumerate(ev.proofs):
            try:
                value = verify_proof(root, p)
            except ProofError as e:
                raise AccountProofInvalid(f"account proof {i} (key {p.key.hex()}): {e}") from None
            proven.append((p.key, value))
    if root != record.state_root:
        raise StateRootMismatch(f"anchor record commits to state root {record.state_root.hex()}, the "
                                f"{evidence_name} evidence has root {root.hex()}")

    # 2a. the federation signed the anchored block
    l2_block_hash: Optional[bytes] = None
    signers: Optional[tuple[int, ...]] = None
    if bundle.commit is not None:
        l2_block = bundle.commit.header
        if l2_block.height != record.l2_height or l2_block.state_root != record.state_root:
            raise CommitMismatch(f"the bundle's L2 block is at height {l2_block.height} with state root "
                                 f"{l2_block.state_root.hex()}, the anchor record at {record.l2_height} with "
                                 f"{record.state_root.hex()}")
        l2_block_hash, signers = l2_block.hash, bundle.commit.commit.signers
        if federation is not None:
            federation.verify_commit(bundle.commit.commit, l2_block_hash)

    # 3. the transaction carries the record
    info = parse_tx(bundle.anchor_tx)
    script = anchor_script(bundle)
    vout = next((i for i, o in enumerate(info.tx.vout) if bytes(o.scriptPubKey) == script), None)
    if vout is None:
        kind = {AnchorKind.OP_RETURN: "OP_RETURN", AnchorKind.TAPROOT: "Taproot (P2TR)"}.get(
            bundle.anchor_kind, f"k-of-n Taproot ({_policy_name(bundle.kofn)}, NUMS internal key, P2TR {script.hex()})")
        raise AnchorNotInTx(f"no output of transaction {info.txid_hex} is the {kind} anchor of the record "
                            f"(L2 height {record.l2_height}, root {record.state_root.hex()})")

    # 4. the transaction is in the block
    block, tx_index = verify_tx_in_block(bundle.anchor_tx, bundle.merkleblock)

    # 5. the header chain from the checkpoint
    headers = bundle.headers
    start_height = bundle.headers_start_height
    checkpoints = {}
    if checkpoint is not None:
        cp_height, cp_hash = checkpoint
        if not start_height <= cp_height <= bundle.tip_height:
            raise CheckpointMismatch(f"checkpoint height {cp_height} is outside the bundle's header chain "
                                     f"({start_height}..{bundle.tip_height})", height=cp_height)
        checkpoints[cp_height] = cp_hash
    chain = HeaderChain(chain_params, parse_header(headers[:HEADER_SIZE]), start_height, now=now,
                        checkpoints=checkpoints)
    chain.extend_raw(memoryview(headers)[HEADER_SIZE:])

    # 6. the block is in the chain
    block_raw = block.serialize()
    pos = headers.find(block_raw)
    while pos >= 0 and pos % HEADER_SIZE:
        pos = headers.find(block_raw, pos + 1)
    if pos < 0:
        raise BlockNotInChain(f"block {block.hash_hex} of the merkle proof is not in the bundle's header chain "
                              f"({start_height}..{chain.height})")
    block_height = start_height + pos // HEADER_SIZE

    # 7. confirmations
    confirmations = chain.height - block_height + 1
    if confirmations < min_conf:
        raise TooFewConfirmations(f"block {block.hash_hex} at height {block_height} has {confirmations} "
                                  f"confirmation(s) in the bundle's chain, at least {min_conf} required")
    return AuditReport(
        network=network.name, l2_height=record.l2_height, state_root=root, evidence=evidence_name, records=records,
        proven=tuple(proven), anchor_kind=bundle.anchor_kind, txid=info.txid, vout=vout, block_hash=block.hash,
        block_height=block_height, tx_index=tx_index, chain=chain_params.name, start_height=start_height,
        start_hash=chain.start_hash, tip_height=chain.height, tip_hash=chain.tip, confirmations=confirmations,
        chain_work=chain.work, checkpoint=checkpoint, l2_block_hash=l2_block_hash, signers=signers,
        signers_checked=federation is not None, kofn=bundle.kofn,
        merkle_root=b"" if bundle.kofn is None else kofn_output(bundle).merkle_root)


def _policy_name(kofn: Optional[KofN]) -> str:
    return "no policy" if kofn is None else f"{kofn.k}-of-{kofn.n}"


def bundle_version(bundle: AuditBundle) -> int:
    return BUNDLE_VERSION if bundle.commit is None else BUNDLE_VERSION_COMMIT
