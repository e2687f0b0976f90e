"""l2-verify audit: check an audit bundle offline (anchor commitment, SPV proof, header chain, confirmations).

    l2-verify audit BUNDLE [--members GENESIS_FILE] [--checkpoint HEIGHT:HASH] [--min-conf K]
                    [--chain regtest|testnet|signet|mainnet] [--json]

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
       proof of work / difficulty / timestamps, checkpoint, block not in the chain, too few confirmations;
    2  malformed input or usage: not a bundle, unknown version or network, truncated, trailing bytes, an
       undecodable transaction / merkle block / proof / snapshot / commit, a k-of-n policy that is none
       (InvalidPolicy: k outside 1..n, n outside 1..64, keys unsorted or repeated, a key not on the curve),
       unreadable file, bad --checkpoint or --min-conf, an unusable --members file.
The verifier's clock is read here, at the command-line boundary, for the 2-hour future limit on headers; the
checks themselves (anchoring.audit, bridge.spv) are pure.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Any, Optional

from l2d.core.audit import AuditBundle, verify_bundle
from l2d.core.errors import DecodeError, L2Error
from l2d.core.genesis_file import FederationGenesis, GenesisFileError, load_genesis_file
from l2d.core.params import NETWORKS, Network
from l2d.core.snapshot import SnapshotError, SnapshotInvalid
from l2d.core.spv import BITCOIN_CHAINS, HEADER_SIZE, ChainParams, SpvError

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
CHAIN_CHOICES = ("regtest", "testnet", "signet", "mainnet")
# The Bitcoin chain an L2 network anchors to, when --chain is not given.
DEFAULT_CHAIN = {"local": "regtest", "regtest": "regtest", "signet": "signet", "mainnet": "mainnet"}
_CHECKPOINT = re.compile(r"(\d{1,10}):([0-9a-fA-F]{64})")
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
        raise Fail(EXIT_ERROR, f"--checkpoint must be HEIGHT:HASH (a height and 64 hex characters), got {text!r}",
                   "bad-argument")
    return int(m.group(1)), bytes.fromhex(m.group(2))[::-1]


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
                now: Optional[int], members: Optional[str]) -> tuple[dict[str, Any], str, AuditBundle, Network]:
    """Every check of l2-verify audit on the bundle at path: (the --json details, the line after "OK audit PATH: ",
    the verified bundle, its network), or Fail with the exit code, message and error type."""
    checkpoint = parse_checkpoint(checkpoint_str) if checkpoint_str is not None else None
    if min_conf < 0:
        raise Fail(EXIT_ERROR, f"--min-conf must be 0 or more, got {min_conf}", "bad-argument")
    if chain_name is not None and chain_name not in CHAIN_CHOICES:
        raise Fail(EXIT_ERROR, f"--chain must be one of {', '.join(CHAIN_CHOICES)}, got {chain_name!r}",
                   "bad-argument")
    if path == "-" and members == "-":
        raise Fail(EXIT_ERROR, "the bundle and --members cannot both be stdin", "bad-argument")
    federation = _federation(members) if members is not None else None
    data = _read(path)
    try:
        bundle = AuditBundle.decode(data)
        network = _ID_TO_NETWORK[bundle.network_id]  # decode refuses unknown ids
        params = _chain(chain_name, network)
        report = verify_bundle(bundle, network, params, checkpoint, min_conf,
                               now=int(time.time()) if now is None else now, federation=federation)
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


def failed(command: str, path: str, f: Fail) -> tuple[int, dict[str, Any], str]:
    """run_*'s answer for a check that did not pass: (exit code, the --json object, one line)."""
    word = "FAIL" if f.code == EXIT_FAIL else "ERROR"
    result = {"ok": False, "command": command, "file": path, "exit_code": f.code, "error": f.message,
              "error_type": f.error_type, **f.fields}
    return f.code, result, f"{word} {command} {path}: {f.message}"


def run_audit(path: str, checkpoint_str: Optional[str] = None, min_conf: int = 1, chain_name: Optional[str] = None,
              *, now: Optional[int] = None, members: Optional[str] = None) -> tuple[int, dict[str, Any], str]:
    """Verify the bundle at path: (exit code, the --json object, one human-readable line).

    chain_name None picks the Bitcoin chain the bundle's L2 network anchors to; now None reads the clock; members
    is the path of a federation genesis file whose members must have signed the anchored block.
    """
    try:
        details, line, _, _ = verify_file(path, checkpoint_str, min_conf, chain_name, now, members)
    except Fail as f:
        return failed("audit", path, f)
    return EXIT_OK, {"ok": True, "command": "audit", "file": path, "exit_code": EXIT_OK, "error": None,
                     "error_type": None, **details}, f"OK audit {path}: {line}"
