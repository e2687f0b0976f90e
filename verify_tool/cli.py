"""l2-verify: check a snapshot or a state proof offline -- no daemon, no database, no network.

    l2-verify snapshot FILE [--expect-root HEX] [--network NAME] [--json]
    l2-verify proof --root HEX PROOF_FILE [--json]
    l2-verify headers FILE [--chain NAME] [--checkpoint HEIGHT:HASH] [--json]
    l2-verify audit BUNDLE [--members GENESIS_FILE] [--checkpoint HEIGHT:HASH] [--min-conf K] [--chain NAME] [--json]
    l2-verify audit BUNDLE --checkpoint [HEIGHT:]HASH --headers HEADER_FILE [...]
    l2-verify chain FILE --members GENESIS_FILE [--checkpoint HEIGHT:HASH] [--json]
    l2-verify recovery BUNDLE [--members GENESIS_FILE] [--checkpoint HEIGHT:HASH] [--min-conf K] [--chain NAME]
                       [--json]

Exit codes:
    0  verified;
    1  verification failed: checksum mismatch, state root mismatch (or not the --expect-root), keys duplicated or
       out of order, a proof that does not lead to --root; a header file whose headers break a consensus rule
       (proof of work, link, difficulty, timestamps), miss the --checkpoint, or fail their checksum; a chain file
       whose blocks do not link, skip a height, belong to another network, lack m valid member signatures, miss
       the genesis or the --checkpoint, or fail their checksum;
    2  malformed input or usage: not a snapshot (magic), unknown format version, another network, truncated file,
       trailing bytes, a badly encoded record length, an undecodable proof or commit, unreadable file, bad hex, bad
       arguments, a federation genesis file (--members) that cannot be used;
    3  (recovery only) the bundle verifies but no recovery follows from it: its evidence is not a snapshot, or its
       chain has no bridge (verify_tool/recovery.py).
A snapshot damaged after it was written (its own checksum fails) reports the checksum mismatch (1) and names the
first inconsistency found; only running out of bytes is always "truncated" (2).

Output: one line (OK ... on stdout; FAIL ... / ERROR ... on stderr), or with --json one JSON object on stdout:
{"ok", "command", "exit_code", "error", "error_type", ...details}. A proof of an account shows its balance and
nonce ("account": {"id", "balance_sat", "nonce"} in JSON); any other value is shown as hex.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, Optional, Sequence

from l2d.core.errors import DecodeError, L2Error, ProofError
from l2d.core.params import NETWORKS, network_by_name
from l2d.core.snapshot import TRAILER_SIZE, SnapshotError, SnapshotInvalid, verify_snapshot
from l2d.core.tree import Proof, ProofKind, verify_proof

if TYPE_CHECKING:
    from l2d.core.genesis_file import FederationGenesis

EXIT_OK, EXIT_FAIL, EXIT_ERROR = 0, 1, 2
MAX_PROOF_FILE = 1 << 20  # the largest binary proof is ~100 kB; its hex about twice that
_HEX = re.compile(rb"[0-9a-fA-F]+")
_KIND = {ProofKind.PRESENT: "present", ProofKind.ABSENT_EMPTY: "absent-empty", ProofKind.ABSENT_OTHER: "absent-other"}


class _Outcome(Exception):
    """A finished check that did not verify: exit code, one-line message and details for --json."""

    def __init__(self, code: int, message: str, error_type: str, **fields: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error_type = error_type
        self.fields = fields


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.format_usage().strip()}\n{self.prog}: error: {message}")


def _hex32(text: str, what: str) -> bytes:
    s = text.strip()
    if len(s) != 64 or not _HEX.fullmatch(s.encode()):
        raise _Outcome(EXIT_ERROR, f"{what} must be 64 hex characters (32 bytes), got {text!r}", "bad-argument")
    return bytes.fromhex(s)


def _open(path: str, progress: Optional[argparse.Namespace] = None) -> BinaryIO:
    """The file (stdin for "-"); with progress (the command's arguments), a bar of the bytes read on stderr when it
    is a terminal and --json is not asked for."""
    if path == "-":
        return sys.stdin.buffer
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _Outcome(EXIT_ERROR, f"cannot open {path}: {e.strerror or e}", "io-error") from None
    if progress is None or progress.json or not sys.stderr.isatty():
        return f
    return _Progress(f, f"{progress.command} {os.path.basename(path)}")  # type: ignore[return-value]


class _Progress:
    """A file read through a progress bar (tqdm, on stderr); closing it closes both."""

    def __init__(self, f: BinaryIO, what: str) -> None:
        from tqdm import tqdm

        self._f = f
        self._bar = tqdm(total=os.fstat(f.fileno()).st_size, desc=what, unit="B", unit_scale=True,
                         unit_divisor=1024, leave=False, file=sys.stderr, mininterval=0.25,
                         ncols=shutil.get_terminal_size().columns,  # 80 x 24 where a terminal reports no size
                         nrows=shutil.get_terminal_size().lines)

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self._bar.update(len(b))
        return b

    def close(self) -> None:
        self._bar.close()
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def cmd_snapshot(a: argparse.Namespace) -> dict[str, Any]:
    expect = _hex32(a.expect_root, "--expect-root") if a.expect_root is not None else None
    network = network_by_name(a.network) if a.network else None
    f = _open(a.file, a)
    try:
        header = verify_snapshot(f, network, expect)
        checksum: Optional[str] = None
        if f.seekable():
            f.seek(-TRAILER_SIZE, os.SEEK_END)
            checksum = f.read(TRAILER_SIZE).hex()
    except SnapshotError as e:
        code = EXIT_FAIL if isinstance(e, SnapshotInvalid) else EXIT_ERROR
        raise _Outcome(code, str(e), e.kind, record=e.record, offset=e.offset) from None
    except L2Error as e:  # any other core rejection of the input
        code = EXIT_ERROR if isinstance(e, DecodeError) else EXIT_FAIL
        raise _Outcome(code, str(e), type(e).__name__) from None
    except OSError as e:
        raise _Outcome(EXIT_ERROR, f"cannot read {a.file}: {e.strerror or e}", "io-error") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    root = header.state_root.hex()
    return {
        "line": f"OK snapshot height {header.height} root {root} ({header.record_count} records, "
                f"network {header.network_name}, block {header.block_hash.hex()})",
        "network": header.network_name, "network_id": header.network_id, "height": header.height,
        "block_hash": header.block_hash.hex(), "state_root": root, "record_count": header.record_count,
        "checksum": checksum,
    }


def _read_proof(path: str) -> bytes:
    f = _open(path)
    try:
        data = f.read(MAX_PROOF_FILE + 1)
    except OSError as e:
        raise _Outcome(EXIT_ERROR, f"cannot read {path}: {e.strerror or e}", "io-error") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if len(data) > MAX_PROOF_FILE:
        raise _Outcome(EXIT_ERROR, f"{path} is larger than {MAX_PROOF_FILE} bytes: not a proof", "malformed")
    compact = b"".join(data.split())
    # A binary proof starts with its version byte 0x01, never an ASCII hex digit: the two forms cannot be confused.
    if compact and _HEX.fullmatch(compact):
        if len(compact) % 2:
            raise _Outcome(EXIT_ERROR, f"{path}: odd number of hex digits ({len(compact)})", "malformed")
        return bytes.fromhex(compact.decode())
    return data


def cmd_proof(a: argparse.Namespace) -> dict[str, Any]:
    root = _hex32(a.root, "--root")
    raw = _read_proof(a.file)
    try:
        proof = Proof.decode(raw)
    except DecodeError as e:
        raise _Outcome(EXIT_ERROR, f"not a valid proof encoding: {e}", type(e).__name__) from None
    key = proof.key.hex()
    details = {"root": root.hex(), "key": key, "kind": _KIND[proof.kind], "levels": len(proof.levels)}
    try:
        value = verify_proof(root, proof)
    except ProofError as e:
        raise _Outcome(EXIT_FAIL, f"key {key}: {e}", "proof-mismatch", **details) from None
    account: Optional[dict[str, Any]] = None
    if value is not None:
        account = _account(proof.key, value)
        if account is not None:
            line = (f"OK proof: account {account['id']} present under root {root.hex()}: balance "
                    f"{account['balance_sat']} sat, nonce {account['nonce']}")
        else:
            shown = value.hex() if len(value) <= 64 else value[:64].hex() + "..."
            line = f"OK proof: key {key} present, value (hex) {shown} ({len(value)} bytes) under root {root.hex()}"
    elif proof.kind == ProofKind.ABSENT_OTHER:
        line = (f"OK proof: key {key} absent under root {root.hex()} (its path ends at the leaf of "
                f"{proof.other_key.hex()})")
    else:
        line = f"OK proof: key {key} absent under root {root.hex()} (its path ends in an empty slot)"
    return {"line": line, **details, "present": value is not None, "value": None if value is None else value.hex(),
            **({} if account is None else {"account": account})}


def _account(key: bytes, value: bytes) -> Optional[dict[str, Any]]:
    """An account's id, balance and nonce when key is in the account namespace and value decodes as one."""
    # imported here: l2d.core.state pulls in the envelope (coincurve), which snapshot runs do not need
    from l2d.core.state import Account, Namespace

    if len(key) != 33 or key[0] != Namespace.ACCOUNT:
        return None
    try:
        acc = Account.decode(value)
    except DecodeError:
        return None
    return {"id": key[1:].hex(), "balance_sat": acc.balance_sat, "nonce": acc.nonce}


# -- audit: l2-verify audit BUNDLE (the checks live in verify_tool/audit.py) -------------------------------------
def _add_audit_parser(sub: "argparse._SubParsersAction[_Parser]", common: _Parser) -> None:
    for name, fn, what in (
            ("audit", cmd_audit, "check an audit bundle: anchor commitment, merkle proof, header chain, confirmations"),
            ("recovery", cmd_recovery, "check an audit bundle as audit does, then list what every account is owed "
                                       "at its anchored state and the payout from the federation's Bitcoin")):
        c = sub.add_parser(name, parents=[common], help=what, **(_AUDIT_HELP if name == "audit" else {}))
        c.add_argument("file", metavar="BUNDLE", help="audit bundle file ('-' for stdin)")
        if name == "audit":
            c.add_argument("--checkpoint", metavar="[HEIGHT:]HASH",
                           help="trusted block hash (display hex): HEIGHT:HASH at a height of the bundle's headers, "
                                "or with --headers HASH (or HEIGHT:HASH) at any height of the header file")
            c.add_argument("--headers", metavar="HEADER_FILE",
                           help="header file (docs/header-file.md, from GET /api/bridge/headers) holding the "
                                "--checkpoint and the bundle's first header: it must verify as 'l2-verify headers' "
                                "verifies it and connect the checkpoint to the bundle ('-' for stdin)")
        else:
            c.add_argument("--checkpoint", metavar="HEIGHT:HASH", help="trusted block hash (display hex) at a height")
        c.add_argument("--min-conf", metavar="K", type=int, default=1, help="required confirmations (default 1)")
        c.add_argument("--chain", choices=("regtest", "testnet", "signet", "mainnet"),
                       help="Bitcoin chain (default: the one the bundle's L2 network anchors to)")
        c.add_argument("--members", metavar="GENESIS_FILE",
                       help="federation genesis file: also require the anchored L2 block's commit, signed by m "
                            "members")
        c.set_defaults(fn=fn)


_AUDIT_HELP: dict[str, Any] = {
    "formatter_class": argparse.RawDescriptionHelpFormatter,
    "description": "Check an audit bundle offline: L2 evidence, anchor output, merkle proof, header chain,\n"
                   "confirmations (docs/audit-bundle.md).",
    "epilog": """checkpoint at any height (--headers):
  l2-verify audit BUNDLE --checkpoint HASH --headers HEADER_FILE
  Without --headers the checkpoint must be one of the bundle's own headers. With it, HEADER_FILE must
  hold the checkpoint's hash (CheckpointNotInFile), verify from its start with that checkpoint (proof of
  work, difficulty, links, timestamps, checksum: as 'l2-verify headers'), hold the bundle's first header at
  the bundle's start height (BundleNotConnected) and, up to the checkpoint's height, every header of the
  bundle (CheckpointOnOtherBranch). Confirmations are then counted in the bundle as without --headers.

exit codes: 0 verified; 1 verification failed (including the header file's rules, checksum, the three
errors above); 2 malformed input or usage (a header file that is not one, or for another chain).""",
}


def cmd_audit(a: argparse.Namespace) -> dict[str, Any]:
    from verify_tool.audit import run_audit  # imported here: snapshot/proof runs need no Bitcoin libraries

    return _bundle_result(*run_audit(a.file, a.checkpoint, a.min_conf, a.chain, members=a.members,
                                     headers=a.headers))


def cmd_recovery(a: argparse.Namespace) -> dict[str, Any]:
    from verify_tool.recovery import run_recovery  # imported here: snapshot/proof runs need no Bitcoin libraries

    return _bundle_result(*run_recovery(a.file, a.checkpoint, a.min_conf, a.chain, members=a.members))


def _bundle_result(code: int, result: dict[str, Any], line: str) -> dict[str, Any]:
    envelope = ("ok", "command", "file", "exit_code", "error", "error_type")  # main() writes these itself
    details = {k: v for k, v in result.items() if k not in envelope}
    if code != EXIT_OK:
        raise _Outcome(code, str(result["error"]), str(result["error_type"]), **details)
    return {"line": line, **details}


# -- headers: l2-verify headers FILE (format: docs/header-file.md; loader: bridge/header_file.py) ----------------
_CHECKPOINT = re.compile(r"(\d{1,10}):([0-9a-fA-F]{64})")


def cmd_headers(a: argparse.Namespace) -> dict[str, Any]:
    # imported here: snapshot/proof runs need no Bitcoin libraries
    from l2d.core.header_file import CheckpointNotInFile, HeaderFileChecksum, HeaderFileError, load_header_file
    from l2d.core.spv import SpvError

    checkpoint: Optional[tuple[int, bytes]] = None
    if a.checkpoint is not None:
        m = _CHECKPOINT.fullmatch(a.checkpoint.strip())
        if m is None:
            raise _Outcome(EXIT_ERROR, f"--checkpoint must be HEIGHT:HASH (a height and 64 hex characters), got "
                                       f"{a.checkpoint!r}", "bad-argument")
        checkpoint = (int(m.group(1)), bytes.fromhex(m.group(2))[::-1])
    f = _open(a.file, a)
    try:
        # The clock is read here, at the command-line boundary, for the 2-hour future limit; the checks are pure.
        loaded = load_header_file(f, now=int(time.time()), require_chain=a.chain, checkpoint=checkpoint)
    except SpvError as e:
        raise _Outcome(EXIT_FAIL, str(e), type(e).__name__, height=e.height) from None
    except (HeaderFileChecksum, CheckpointNotInFile) as e:
        raise _Outcome(EXIT_FAIL, str(e), type(e).__name__, offset=e.offset) from None
    except HeaderFileError as e:  # malformed: not a header file, version, chain, truncated, trailing bytes
        raise _Outcome(EXIT_ERROR, str(e), type(e).__name__, offset=e.offset) from None
    except OSError as e:
        raise _Outcome(EXIT_ERROR, f"cannot read {a.file}: {e.strerror or e}", "io-error") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    trust = (f"checkpoint {a.checkpoint.strip()}" if checkpoint is not None
             else "genesis" if loaded.start_height == 0 else f"start {loaded.start_height} taken from the file")
    return {
        "line": f"OK headers {loaded.chain_name} {loaded.start_height}..{loaded.tip_height} ({loaded.count} headers, "
                f"tip {loaded.tip_hash_hex}, work {loaded.work:#x}) linked from {trust}",
        "chain": loaded.chain_name, "start_height": loaded.start_height, "start_hash": loaded.start_hash_hex,
        "tip_height": loaded.tip_height, "tip_hash": loaded.tip_hash_hex, "count": loaded.count,
        "work": f"{loaded.work:#x}", "checksum": loaded.checksum.hex(), "trusted_start": trust,
    }


# -- chain: l2-verify chain FILE --members GENESIS_FILE (formats: docs/federation.md) -----------------------------
_L2_CHECKPOINT = re.compile(r"(\d{1,20}):([0-9a-fA-F]{64})")


def load_federation(path: str) -> "FederationGenesis":
    """The federation genesis file at path; an unusable one is a usage error (exit 2)."""
    # imported here (and in cmd_chain): snapshot/proof runs need no secp256k1 library
    from l2d.core.genesis_file import GenesisFileError, load_genesis_file

    f = _open(path)
    try:
        return load_genesis_file(f)
    except GenesisFileError as e:
        raise _Outcome(EXIT_ERROR, f"--members {path}: {e}", type(e).__name__) from None
    except OSError as e:
        raise _Outcome(EXIT_ERROR, f"cannot read {path}: {e.strerror or e}", "io-error") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def cmd_chain(a: argparse.Namespace) -> dict[str, Any]:
    from l2d.core.chain_file import ChainFileError, ChainFileMalformed, verify_chain

    checkpoint: Optional[tuple[int, bytes]] = None
    if a.checkpoint is not None:
        m = _L2_CHECKPOINT.fullmatch(a.checkpoint.strip())
        if m is None or int(m.group(1)) >= 1 << 64:
            raise _Outcome(EXIT_ERROR, f"--checkpoint must be HEIGHT:HASH (an L2 height and the block hash, 64 hex "
                                       f"characters), got {a.checkpoint!r}", "bad-argument")
        checkpoint = (int(m.group(1)), bytes.fromhex(m.group(2)))
    if a.file == "-" and a.members == "-":
        raise _Outcome(EXIT_ERROR, "the chain file and --members cannot both be stdin", "bad-argument")
    genesis = load_federation(a.members)
    f = _open(a.file, a)
    try:
        r = verify_chain(f, genesis, checkpoint)
    except ChainFileMalformed as e:
        raise _Outcome(EXIT_ERROR, str(e), type(e).__name__, height=e.height, offset=e.offset) from None
    except ChainFileError as e:  # checksum, or a chain that does not verify
        raise _Outcome(EXIT_FAIL, str(e), type(e).__name__, height=e.height, offset=e.offset) from None
    except OSError as e:
        raise _Outcome(EXIT_ERROR, f"cannot read {a.file}: {e.strerror or e}", "io-error") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    m_, n = r.threshold, r.members
    return {
        "line": f"OK chain {r.network} {r.start_height}..{r.tip_height} ({r.count} blocks, tip {r.tip_hash.hex()}) "
                f"each signed by at least {m_} of {n} members, linked from {r.trusted_start}; final through "
                f"{r.final_height}",
        "network": r.network, "start_height": r.start_height, "tip_height": r.tip_height, "count": r.count,
        "start_hash": r.start_hash.hex(), "tip_hash": r.tip_hash.hex(), "genesis_hash": r.genesis_hash.hex(),
        "threshold": m_, "members": n, "trusted_start": r.trusted_start, "final_height": r.final_height,
        "signed": [{"member": i, "id": mid, "blocks": k}
                   for i, (mid, k) in enumerate(zip(genesis.member_ids, r.signed))],
        "checksum": r.checksum.hex(),
    }


def _add_chain_parser(sub: "argparse._SubParsersAction[_Parser]", common: _Parser) -> None:
    c = sub.add_parser("chain", parents=[common], help="check a chain file: links, heights, network and m valid "
                                                       "member signatures on every block (streaming)")
    c.add_argument("file", metavar="FILE", help="chain file from GET /api/l2/commits ('-' for stdin)")
    c.add_argument("--members", metavar="GENESIS_FILE", required=True,
                   help="federation genesis file: network, members, threshold, genesis block")
    c.add_argument("--checkpoint", metavar="HEIGHT:HASH",
                   help="trusted L2 block hash (hex, as the API shows it) at a height from the file's start - 1 "
                        "to its tip; required when the file starts above height 1")
    c.set_defaults(fn=cmd_chain)


def _parser() -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object instead of a line")
    p = _Parser(prog="l2-verify", description="Offline verifier for l2d snapshots and state proofs.",
                epilog="exit codes: 0 verified, 1 verification failed, 2 malformed input or usage, 3 (recovery) "
                       "verified but no recovery follows from the bundle")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    s = sub.add_parser("snapshot", parents=[common], help="recompute a snapshot's state root (streaming)")
    s.add_argument("file", metavar="FILE", help="snapshot file ('-' for stdin)")
    s.add_argument("--expect-root", metavar="HEX", help="also require this state root (64 hex characters)")
    s.add_argument("--network", choices=sorted(NETWORKS), help="also require this network")
    s.set_defaults(fn=cmd_snapshot)
    q = sub.add_parser("proof", parents=[common], help="check an inclusion or non-inclusion proof against a root")
    q.add_argument("--root", metavar="HEX", required=True, help="state root (64 hex characters)")
    q.add_argument("file", metavar="PROOF_FILE", help="Proof.encode() bytes, or their hex")
    q.set_defaults(fn=cmd_proof)
    _add_audit_parser(sub, common)
    hd = sub.add_parser("headers", parents=[common], help="check a header file: proof of work, links, difficulty, "
                                                          "timestamps, checksum (streaming)")
    hd.add_argument("file", metavar="FILE", help="header file written by the header store ('-' for stdin)")
    hd.add_argument("--chain", choices=("regtest", "testnet", "signet", "mainnet"),
                    help="also require this Bitcoin chain")
    hd.add_argument("--checkpoint", metavar="HEIGHT:HASH", help="trusted block hash (display hex) at a height")
    hd.set_defaults(fn=cmd_headers)
    _add_chain_parser(sub, common)
    return p


def _print(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    want_json = "--json" in args
    try:
        a = _parser().parse_args(args)
    except _UsageError as e:
        print(str(e), file=sys.stderr)
        if want_json:
            command = next((x for x in args if x in ("snapshot", "proof", "audit", "recovery", "headers", "chain")),
                           None)
            _print({"ok": False, "command": command, "exit_code": EXIT_ERROR,
                    "error": str(e).rsplit("error: ", 1)[-1], "error_type": "usage"})
        return EXIT_ERROR
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    target = a.file
    try:
        result = a.fn(a)
    except _Outcome as o:
        if a.json:
            _print({"ok": False, "command": a.command, "file": target, "exit_code": o.code, "error": o.message,
                    "error_type": o.error_type, **o.fields})
        else:
            print(f"{'FAIL' if o.code == EXIT_FAIL else 'ERROR'} {a.command} {target}: {o.message}", file=sys.stderr)
        return o.code
    line = result.pop("line")
    if a.json:
        _print({"ok": True, "command": a.command, "file": target, "exit_code": EXIT_OK, "error": None,
                "error_type": None, **result})
    else:
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
