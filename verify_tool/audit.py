"""l2-verify audit: check an audit bundle offline (anchor commitment, SPV proof, header chain, confirmations).

    l2-verify audit BUNDLE [--members GENESIS_FILE] [--checkpoint HEIGHT:HASH] [--min-conf K]
                    [--chain regtest|testnet|signet|mainnet] [--json]
    l2-verify audit BUNDLE --checkpoint [HEIGHT:]HASH --headers HEADER_FILE [...]

With --headers (a header file, docs/header-file.md, as GET /api/bridge/headers serves it) the checkpoint may be at
any height of that file rather than inside the bundle's few headers: the file must hold the checkpoint, verify as
`l2-verify headers` verifies it (with the checkpoint), hold the bundle's first header at the bundle's start height
and, up to the checkpoint's height, every bundle header (the bundle is on the checkpoint's branch). Confirmations
are then counted in the bundle as without --headers. Failures: CheckpointNotInFile, BundleNotConnected,
CheckpointOnOtherBranch, and the header file's own errors (consensus rules and checksum 1, malformed 2).

The anchor is an OP_RETURN output, a Taproot output of one federation key, or a k-of-n Taproot anchor: the bundle
carries k and the n member keys, and the transaction must have the P2TR output of BIP341's NUMS key tweaked by the
tree of that k-of-n leaf and the record's OP_RETURN <link> leaf (the output line says "taproot-kofn (k=.. of n=..
keys...)", --json "anchor_kind": "taproot-kofn" and "k_of_n": {k, n, keys, internal_key, merkle_root}).

A version 2 bundle also carries the anchored L2 block's header and commit. With --members (a federation genesis
file) the bundle must carry it and at least m of the members must have signed that block; without --members the
commit's header must still match the anchor record, and the output says the signatures were not checked.

Exit codes (as for the other verifier commands):
    0  verified;
    1  verification failed: bundle checksum, snapshot or account proof, state root, the L2 block's commit (not the
       anchored block, fewer than m valid member signatures, missing with --members), anchor output (a k-of-n
       anchor: no output is the one its k, keys and record give), partial merkle tree (unused bits/hashes,
       duplicated-node mutation, bad count, root), transaction not in the proof, 64-byte transaction, header link /
       proof of work / difficulty / timestamps, checkpoint, block not in the chain, too few confirmations; with
       --headers: the checkpoint not in the header file, the header file's headers or checksum, the bundle not
       connected to the file's chain or on another branch than the checkpoint;
    2  malformed input or usage: not a bundle, unknown version or network, truncated, trailing bytes, an
       undecodable transaction / merkle block / proof / snapshot / commit, a k-of-n policy that is none
       (InvalidPolicy: k outside 1..n, n outside 1..64, keys unsorted or repeated, a key not on the curve),
       unreadable file, bad --checkpoint or --min-conf, an unusable --members file, a --headers file that is not a
       header file (or for another chain), --headers without --checkpoint.
The verifier's clock is read here, at the command-line boundary, for the 2-hour future limit on headers; the
checks themselves (anchoring.audit, bridge.spv) are pure.
"""
from __future__ import annotations

import io
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional

from l2d.core.audit import AuditBundle, AuditError, verify_bundle
from l2d.core.errors import DecodeError, L2Error
from l2d.core.genesis_file import FederationGenesis, GenesisFileError, load_genesis_file
from l2d.core.header_file import (CheckpointNotInFile, HeaderFileChecksum, HeaderFileError, LoadedHeaders,
                                  load_header_file, read_preamble)
from l2d.core.params import NETWORKS, Network
from l2d.core.snapshot import SnapshotError, SnapshotInvalid
from l2d.core.spv import BITCOIN_CHAINS, HEADER_SIZE, ChainParams, SpvError, dsha256

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
CHAIN_CHOICES = ("regtest", "testnet", "signet", "mainnet")
# The Bitcoin chain an L2 network anchors to, when --chain is not given.
DEFAULT_CHAIN = {"local": "regtest", "regtest": "regtest", "signet": "signet", "mainnet": "mainnet"}
_CHECKPOINT = re.compile(r"(\d{1,10}):([0-9a-fA-F]{64})")
_FILE_CHECKPOINT = re.compile(r"(?:(\d{1,10}):)?([0-9a-fA-F]{64})")  # with --headers the height may be left out
_SCAN_BATCH = 2000  # headers hashed per read when looking the checkpoint up: 160 kB at a time
_ID_TO_NETWORK = {n.id: n for n in NETWORKS.values()}


class Fail(Exception):
    """A check that did not pass: exit code, message, error type and extra --json fields."""

    def __init__(self, code: int, message: str, error_type: str, **fields: Any) -> None:
        super().__init__(message)
        self.code, self.message, self.error_type, self.fields = code, message, error_type, fields


def parse_checkpoint(text: str) -> tuple[int, bytes]:
    """'HEIGHT:HASH' (hash in display order, as bitcoind prints it) -> (height, hash in internal order)."""
    m = _CHECKPOINT.fullmatch(text.strip())
    if m is None:
        hint = " (a HASH alone needs --headers)" if _FILE_CHECKPOINT.fullmatch(text.strip()) else ""
        raise Fail(EXIT_ERROR, f"--checkpoint must be HEIGHT:HASH (a height and 64 hex characters), got {text!r}"
                               f"{hint}", "bad-argument")
    return int(m.group(1)), bytes.fromhex(m.group(2))[::-1]


def parse_file_checkpoint(text: str) -> tuple[Optional[int], bytes]:
    """'[HEIGHT:]HASH' for --headers -> (height or None, hash in internal order); the height is found in the file."""
    m = _FILE_CHECKPOINT.fullmatch(text.strip())
    if m is None:
        raise Fail(EXIT_ERROR, f"--checkpoint must be HASH or HEIGHT:HASH (64 hex characters), got {text!r}",
                   "bad-argument")
    return (None if m.group(1) is None else int(m.group(1))), bytes.fromhex(m.group(2))[::-1]


# -- --headers: a checkpoint anywhere in a header file that the bundle's headers connect to -------------------------
class BundleNotConnected(AuditError):
    """The header file has no header at the bundle's start height, or another one: the bundle's chain does not
    start on the file's chain (l2-verify exit 1)."""


class CheckpointOnOtherBranch(AuditError):
    """The bundle starts on the header file's chain but leaves it below the checkpoint's height: its headers are
    not on the checkpoint's branch (l2-verify exit 1)."""


@dataclass(frozen=True, slots=True)
class FileAnchor:
    """What --checkpoint with --headers established: the checkpoint's height in the file, the verified file, and the
    bundle header (its start) that the file connects to the checkpoint."""

    path: str
    checkpoint: tuple[int, bytes]  # (height, hash in internal order)
    loaded: LoadedHeaders
    connected_at: tuple[int, bytes]  # the bundle's start: (height, hash), now trusted

    def to_dict(self) -> dict[str, Any]:
        lo = self.loaded
        return {"file": self.path, "chain": lo.chain_name, "start_height": lo.start_height,
                "start_hash": lo.start_hash_hex, "tip_height": lo.tip_height, "tip_hash": lo.tip_hash_hex,
                "count": lo.count, "work": f"{lo.work:#x}", "checksum": lo.checksum.hex(),
                "connected_at": f"{self.connected_at[0]}:{self.connected_at[1][::-1].hex()}"}


def _scan(f: BinaryIO, chain_name: str, want: bytes, heights: range) -> tuple[Optional[int], dict[int, bytes]]:
    """One pass over a header file's headers, validating nothing: (the height whose header hashes to want, or None;
    the hashes of the headers at the given heights that the file holds). Memory: one batch and len(heights) hashes.
    A file too short or malformed stops the scan quietly; load_header_file reports it."""
    pre, _ = read_preamble(f, chain_name)
    found: Optional[int] = None
    hashes: dict[int, bytes] = {}
    height, left = pre.start_height, pre.count
    while left:
        n = min(left, _SCAN_BATCH)
        data = f.read(n * HEADER_SIZE)
        for off in range(0, len(data) - HEADER_SIZE + 1, HEADER_SIZE):
            h = dsha256(data[off:off + HEADER_SIZE])
            if found is None and h == want:
                found = height
            if height in heights:
                hashes[height] = h
            height += 1
        if len(data) != n * HEADER_SIZE:
            break
        left -= n
    return found, hashes


def _open_twice(path: str) -> tuple[BinaryIO, BinaryIO]:
    """Two independent readers of the header file (stdin is read into memory once)."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
            return io.BytesIO(data), io.BytesIO(data)
        return open(path, "rb"), open(path, "rb")
    except OSError as e:
        raise Fail(EXIT_ERROR, f"cannot read {path}: {e.strerror or e}", "io-error") from None


def anchor_via_header_file(bundle: AuditBundle, chain_name: str, params: ChainParams, path: str,
                           checkpoint: tuple[Optional[int], bytes], now: int) -> FileAnchor:
    """Connect the bundle to a checkpoint at any height through a header file, in this order:

    1. the file verifies as `l2-verify headers` verifies it (load_header_file: framing, proof of work, difficulty,
       links, timestamps, checksum), with the checkpoint at the height where the file holds its hash;
    2. the file holds the checkpoint's hash (at the given height, if one was given): CheckpointNotInFile;
    3. the file's header at the bundle's start height is the bundle's first header: BundleNotConnected;
    4. if the checkpoint is above the bundle's start, every bundle header up to the checkpoint's height is the
       file's header at that height (the bundle is on the checkpoint's branch): CheckpointOnOtherBranch.

    The file's errors propagate as they are (spv errors, HeaderFileError). Step 1 runs before step 2 so that a
    damaged file is reported as damaged rather than as missing the checkpoint.
    """
    cp_height, cp_hash = checkpoint
    start, tip = bundle.headers_start_height, bundle.tip_height
    bundle_hashes = {start + i: dsha256(bundle.headers[i * HEADER_SIZE:(i + 1) * HEADER_SIZE])
                     for i in range(bundle.header_count)}
    scan_f, load_f = _open_twice(path)
    try:
        try:
            found, file_hashes = _scan(scan_f, chain_name, cp_hash, range(start, tip + 1))
        except HeaderFileError:
            found, file_hashes = None, {}  # malformed: the loader below names the problem
        usable = found is not None and (cp_height is None or cp_height == found)
        loaded = load_header_file(load_f, now=now, require_chain=chain_name, params=params,
                                  checkpoint=(found, cp_hash) if usable and found is not None else None)
    except OSError as e:
        raise Fail(EXIT_ERROR, f"cannot read {path}: {e.strerror or e}", "io-error") from None
    finally:
        scan_f.close()
        load_f.close()
    heights = f"{loaded.start_height}..{loaded.tip_height}"
    shown = cp_hash[::-1].hex()
    if found is None:
        raise CheckpointNotInFile(f"checkpoint {shown} is not in the header file {path} (heights {heights})")
    if cp_height is not None and cp_height != found:
        raise CheckpointNotInFile(f"checkpoint {shown} is at height {found} of the header file {path}, not at "
                                  f"{cp_height}")
    first = bundle_hashes[start]
    at_start = file_hashes.get(start)
    if at_start != first:
        where = ("has no header at that height" if at_start is None
                 else f"has {at_start[::-1].hex()} at that height")
        raise BundleNotConnected(f"the bundle's first header {first[::-1].hex()} at height {start} is not on the "
                                 f"header file's chain: the file (heights {heights}) {where}")
    for h in range(start + 1, min(found, tip) + 1):
        if file_hashes[h] != bundle_hashes[h]:
            raise CheckpointOnOtherBranch(
                f"the bundle's header {bundle_hashes[h][::-1].hex()} at height {h} is not the header file's "
                f"{file_hashes[h][::-1].hex()}: the bundle leaves the chain of checkpoint {found}:{shown} below its "
                f"height (another branch)")
    return FileAnchor(path, (found, cp_hash), loaded, (start, first))


def _read(path: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise Fail(EXIT_ERROR, f"cannot read {path}: {e.strerror or e}", "io-error") from None


def _federation(path: str) -> FederationGenesis:
    try:
        if path == "-":
            return load_genesis_file(sys.stdin.buffer)
        with open(path, "rb") as f:
            return load_genesis_file(f)
    except GenesisFileError as e:
        raise Fail(EXIT_ERROR, f"--members {path}: {e}", type(e).__name__) from None
    except OSError as e:
        raise Fail(EXIT_ERROR, f"cannot read {path}: {e.strerror or e}", "io-error") from None


def _chain(name: Optional[str], network: Network) -> ChainParams:
    chosen = name or DEFAULT_CHAIN.get(network.name)
    if chosen is None:
        raise Fail(EXIT_ERROR, f"no default Bitcoin chain for L2 network {network.name}: give --chain",
                   "bad-argument")
    return BITCOIN_CHAINS[chosen]


def verify_file(path: str, checkpoint_str: Optional[str], min_conf: int, chain_name: Optional[str],
                now: Optional[int], members: Optional[str], headers: Optional[str] = None
                ) -> tuple[dict[str, Any], str, AuditBundle, Network]:
    """Every check of l2-verify audit on the bundle at path: (the --json details, the line after "OK audit PATH: ",
    the verified bundle, its network), or Fail with the exit code, message and error type.

    headers: the path of a header file that connects the checkpoint (then required, and at any height of the file)
    to the bundle's first header (anchor_via_header_file)."""
    checkpoint: Optional[tuple[int, bytes]] = None
    file_checkpoint: Optional[tuple[Optional[int], bytes]] = None
    if headers is not None:
        if checkpoint_str is None:
            raise Fail(EXIT_ERROR, "--headers needs --checkpoint: the header file is trusted only from a checkpoint "
                                   "it holds", "bad-argument")
        if headers == "-" and "-" in (path, members):
            raise Fail(EXIT_ERROR, "only one of the bundle, --members and --headers can be stdin", "bad-argument")
        file_checkpoint = parse_file_checkpoint(checkpoint_str)
    elif checkpoint_str is not None:
        checkpoint = parse_checkpoint(checkpoint_str)
    if min_conf < 0:
        raise Fail(EXIT_ERROR, f"--min-conf must be 0 or more, got {min_conf}", "bad-argument")
    if chain_name is not None and chain_name not in CHAIN_CHOICES:
        raise Fail(EXIT_ERROR, f"--chain must be one of {', '.join(CHAIN_CHOICES)}, got {chain_name!r}",
                   "bad-argument")
    if path == "-" and members == "-":
        raise Fail(EXIT_ERROR, "the bundle and --members cannot both be stdin", "bad-argument")
    federation = _federation(members) if members is not None else None
    data = _read(path)
    via: Optional[FileAnchor] = None
    try:
        bundle = AuditBundle.decode(data)
        network = _ID_TO_NETWORK[bundle.network_id]  # decode refuses unknown ids
        params = _chain(chain_name, network)
        clock = int(time.time()) if now is None else now
        if headers is not None and file_checkpoint is not None:
            via = _via_file(bundle, chain_name or DEFAULT_CHAIN[network.name], params, headers, file_checkpoint,
                            clock)
            checkpoint = via.connected_at  # the bundle's first header, trusted through the file
        report = verify_bundle(bundle, network, params, checkpoint, min_conf, now=clock, federation=federation)
    except DecodeError as e:  # before L2Error: malformed beats "failed"
        raise Fail(EXIT_ERROR, str(e), type(e).__name__) from None
    except SnapshotError as e:
        code = EXIT_FAIL if isinstance(e, SnapshotInvalid) else EXIT_ERROR
        raise Fail(code, f"embedded snapshot: {e}", type(e).__name__) from None
    except SpvError as e:
        raise Fail(EXIT_FAIL, str(e), type(e).__name__, height=e.height) from None
    except L2Error as e:  # AuditError and any other core rejection of a well-formed bundle
        raise Fail(EXIT_FAIL, str(e), type(e).__name__) from None
    d = report.to_dict()
    if via is not None:
        d["checkpoint"] = f"{via.checkpoint[0]}:{via.checkpoint[1][::-1].hex()}"
        d["header_file"] = via.to_dict()
        trust = (f"checkpoint {d['checkpoint']} through header file {headers} (heights "
                 f"{via.loaded.start_height}..{via.loaded.tip_height})")
    else:
        trust = (f"checkpoint {d['checkpoint']}" if checkpoint is not None
                 else "genesis" if report.start_height == 0
                 else f"start {report.start_height}:{d['start_hash']} taken from the bundle (no --checkpoint)")
    d["trusted_start"] = trust
    d["min_conf"] = min_conf
    d["headers"] = len(bundle.headers) // HEADER_SIZE
    evidence = (f"snapshot of {report.records} records" if report.records is not None
                else f"{len(report.proven)} account proof(s)")
    if report.signers is None or report.l2_block_hash is None:
        signed = ""  # a version 1 bundle: the line is what it always was
    elif federation is not None:
        ids = [federation.member_ids[i] for i in report.signers]
        commit = d["commit"]
        if isinstance(commit, dict):
            commit["signer_ids"] = ids
        signed = (f", block {report.l2_block_hash.hex()} signed by {len(ids)} of {federation.members.n} members "
                  f"({', '.join(ids)}; threshold {federation.members.threshold}),")
    else:
        signed = (f", block {report.l2_block_hash.hex()} with a commit of {len(report.signers)} member "
                  f"signature(s) NOT checked (no --members),")
    anchor = str(d["anchor_kind"])
    if report.kofn is not None:
        anchor += f" (k={report.kofn.k} of n={report.kofn.n} keys, NUMS internal key)"
    line = (f"L2 {report.network} height {report.l2_height} root {d['state_root']} ({evidence})"
            f"{signed} anchored by {anchor} output {d['txid']}:{report.vout} in block {d['block_hash']} at "
            f"{report.chain} height {report.block_height}, {report.confirmations} confirmation(s) >= {min_conf}, "
            f"{d['headers']} headers linked from {trust}")
    return d, line, bundle, network


def _via_file(bundle: AuditBundle, chain_name: str, params: ChainParams, headers: str,
              checkpoint: tuple[Optional[int], bytes], now: int) -> FileAnchor:
    """anchor_via_header_file, with the header file's own errors named as the file's (exit 1 for a rule, the checksum
    or a missing checkpoint; 2 for a file that is not a header file for the chain)."""
    try:
        return anchor_via_header_file(bundle, chain_name, params, headers, checkpoint, now)
    except SpvError as e:
        raise Fail(EXIT_FAIL, f"header file {headers}: {e}", type(e).__name__, height=e.height) from None
    except (HeaderFileChecksum, CheckpointNotInFile) as e:
        raise Fail(EXIT_FAIL, f"header file {headers}: {e}" if isinstance(e, HeaderFileChecksum) else str(e),
                   type(e).__name__, offset=e.offset) from None
    except HeaderFileError as e:  # malformed: not a header file, version, chain, truncated, trailing bytes
        raise Fail(EXIT_ERROR, f"header file {headers}: {e}", type(e).__name__, offset=e.offset) from None


def failed(command: str, path: str, f: Fail) -> tuple[int, dict[str, Any], str]:
    """run_*'s answer for a check that did not pass: (exit code, the --json object, one line)."""
    word = "FAIL" if f.code == EXIT_FAIL else "ERROR"
    result = {"ok": False, "command": command, "file": path, "exit_code": f.code, "error": f.message,
              "error_type": f.error_type, **f.fields}
    return f.code, result, f"{word} {command} {path}: {f.message}"


def run_audit(path: str, checkpoint_str: Optional[str] = None, min_conf: int = 1, chain_name: Optional[str] = None,
              *, now: Optional[int] = None, members: Optional[str] = None,
              headers: Optional[str] = None) -> tuple[int, dict[str, Any], str]:
    """Verify the bundle at path: (exit code, the --json object, one human-readable line).

    chain_name None picks the Bitcoin chain the bundle's L2 network anchors to; now None reads the clock; members
    is the path of a federation genesis file whose members must have signed the anchored block; headers the path of
    a header file connecting checkpoint_str (then at any height of the file) to the bundle.
    """
    try:
        details, line, _, _ = verify_file(path, checkpoint_str, min_conf, chain_name, now, members, headers)
    except Fail as f:
        return failed("audit", path, f)
    return EXIT_OK, {"ok": True, "command": "audit", "file": path, "exit_code": EXIT_OK, "error": None,
                     "error_type": None, **details}, f"OK audit {path}: {line}"
