"""l2-verify recovery: from an audit bundle alone, what every account is owed at its anchored state.

    l2-verify recovery BUNDLE [--members GENESIS_FILE] [--checkpoint HEIGHT:HASH] [--min-conf K]
                       [--chain regtest|testnet|signet|mainnet] [--json]

First every check of l2-verify audit (verify_tool/audit.py, same options, same errors and exit codes); then, from
the bundle's snapshot evidence, the claims on the federation and its Bitcoin (l2d/core/recovery.py,
docs/recovery.md). Exit codes: those of l2-verify audit (0 verified, 1 verification failed, 2 malformed input or
usage, including a record of the snapshot that does not decode), and
    3  the bundle verifies but no recovery follows from it: its evidence is a root with proofs, not a snapshot
       (NoSnapshotEvidence), or its chain has no bridge (NotABridgeChain).
"""
from __future__ import annotations

from typing import Any, Optional

from l2d.core.errors import DecodeError, L2Error
from l2d.core.recovery import ClaimKind, Recovery, RecoveryError, bundle_recovery
from verify_tool.audit import EXIT_ERROR, EXIT_FAIL, EXIT_OK, Fail, failed, verify_file

EXIT_NO_RECOVERY = 3


def _lines(r: Recovery) -> list[str]:
    """The human-readable report after the first line."""
    agree = "agree" if r.books_agree else "DISAGREE"
    out = [f"holdings: {r.holdings_sat} sat in {len(r.coins)} coin(s); by the books pegged in "
           f"{r.totals.pegged_in_sat} - paid out {r.totals.paid_out_sat} = {r.books_sat} sat: {agree}",
           f"locked: the state says {r.locked_sat} sat, stakes + bounties + pools add up to {r.locked_claims_sat} "
           f"sat: {'agree' if r.locked_agrees else 'DISAGREE'}"]
    how = ("pro rata, floor(claim x holdings / claims)" if r.pro_rata else "in full")
    out.append(f"claims: {len(r.claims)} totalling {r.claims_sat} sat, paid {how}: {r.payout_sat} sat; "
               f"unallocated {r.unallocated_sat} sat")
    for c in r.claims:
        if c.kind == ClaimKind.PEGOUT:
            check = (f"; first check txid(s) {', '.join(t[::-1].hex() for t in c.check_txids)}"
                     if c.check_txids else "")
            to = f"to {c.address or c.script_pubkey.hex()} ({c.status}{check})"
        elif c.kind == ClaimKind.ACCOUNT:
            to = "(the account's key)"
        else:
            to = f"to {c.owner.hex()} ({c.status})"
        out.append(f"  {c.kind.label} {c.record_id.hex()}: {c.amount_sat} sat {to} -> pay {c.payout_sat} sat")
    for coin in r.coins:
        planned = ("" if coin.spent_by == b"\0" * 32
                   else f", a planned spend {coin.spent_by[::-1].hex()} may have spent it")
        out.append(f"  coin {coin.btc_txid[::-1].hex()}:{coin.vout} {coin.amount_sat} sat {coin.kind.name.lower()} "
                   f"at {r.coin_address(coin)}{planned}")
    if r.funding:
        out.append(f"funding coins (not counted): {r.funding_sat} sat in {len(r.funding)}")
    return out


def run_recovery(path: str, checkpoint_str: Optional[str] = None, min_conf: int = 1,
                 chain_name: Optional[str] = None, *, now: Optional[int] = None,
                 members: Optional[str] = None) -> tuple[int, dict[str, Any], str]:
    """Verify the bundle at path as l2-verify audit does, then compute the recovery at its anchored state:
    (exit code, the --json object, the human-readable text)."""
    try:
        audit, line, bundle, network = verify_file(path, checkpoint_str, min_conf, chain_name, now, members)
        try:
            r = bundle_recovery(bundle, network)
        except RecoveryError as e:
            code = EXIT_ERROR if isinstance(e, DecodeError) else EXIT_NO_RECOVERY
            raise Fail(code, str(e), type(e).__name__) from None
        except DecodeError as e:
            raise Fail(EXIT_ERROR, f"embedded snapshot: {e}", type(e).__name__) from None
        except L2Error as e:
            raise Fail(EXIT_FAIL, f"embedded snapshot: {e}", type(e).__name__) from None
    except Fail as f:
        return failed("recovery", path, f)
    text = "\n".join([f"OK recovery {path}: {line}", *_lines(r)])
    return EXIT_OK, {"ok": True, "command": "recovery", "file": path, "exit_code": EXIT_OK, "error": None,
                     "error_type": None, "audit": audit, **r.to_dict()}, text
