"""Leaving a staked role from the command line: the `exit` and `withdraw` subcommands that l2-worker (and so
l2-llm-worker, which registers the same worker record) and l2-relay share, and the note each logs when it stops
while its stake is still locked.

An exit is a signed transaction of the role's own key (WorkerExit, RelayExit): the role gets no new work and its
stake stays locked (slashable) for the role's exit delay; then `withdraw` (WorkerWithdraw, RelayWithdraw) returns
the stake to the key's balance. Both are refused with the ledger's reason (e.g. "stake is locked until height H").
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .client import ApiError, Client
from .core.payload import Payload
from .core.relay import EXIT_DELAY_BLOCKS as RELAY_EXIT_DELAY
from .core.relay_tx import RelayExit, RelayWithdraw
from .core.tx import public_key
from .core.work import EXIT_DELAY_BLOCKS as WORKER_EXIT_DELAY
from .core.work_tx import WorkerExit, WorkerWithdraw
from .keys import KeyFileError, load_secret

COMMANDS = ("exit", "withdraw")


@dataclass(frozen=True, slots=True)
class StakedRole:
    """What differs between a worker and a relay: its transactions, where its record is listed, its flags."""

    program: str  # "l2-worker"
    noun: str  # "worker"
    exit: Payload
    withdraw: Payload
    delay_blocks: int
    listing: str  # the REST path listing every record
    list_key: str  # the listing's array
    id_key: str  # each record's key field
    node_flag: str  # how the program names the daemon's URL and the key file
    key_flag: str


WORKER = StakedRole("l2-worker", "worker", WorkerExit(), WorkerWithdraw(), WORKER_EXIT_DELAY,
                    "/api/orchestration/workers", "workers", "worker", "--node", "--key-file")
RELAY = StakedRole("l2-relay", "relay", RelayExit(), RelayWithdraw(), RELAY_EXIT_DELAY,
                   "/api/netflow/relays", "relays", "identity", "--api", "--key")


class LeaveError(Exception):
    """The exit or withdrawal cannot be done (not registered, refused by the ledger, not committed in time)."""


def command(role: StakedRole, verb: str, node: str, key_file: str) -> str:
    """The exact command line that does `verb` for this key (quoted for a shell)."""
    return " ".join(shlex.quote(x) for x in (role.program, verb, role.node_flag, node, role.key_flag, key_file))


def record(c: Client, role: StakedRole, ident: str) -> Optional[dict[str, Any]]:
    """The role's record as the daemon lists it, None when not registered."""
    return find(role, c.get(role.listing), ident)


def find(role: StakedRole, listing: dict[str, Any], ident: str) -> Optional[dict[str, Any]]:
    """ident's record in the role's listing (GET role.listing's answer), None when not registered."""
    return next((r for r in listing[role.list_key] if r[role.id_key] == ident), None)


def stop_note(role: StakedRole, node: str, key_file: str, rec: Optional[dict[str, Any]]) -> str:
    """What a stopping process says about its stake: still ACTIVE (and how to leave), or where its exit stands."""
    if rec is None:
        return f"{role.noun} is not registered: no stake is locked"
    if rec["status"] == "ACTIVE":
        return (f"{role.noun} {rec[role.id_key]} stays registered ACTIVE with {rec['stake_sat']} sat staked (a "
                f"restart resumes it; it gets no new work once its heartbeats stop). To leave and get the stake "
                f"back: `{command(role, 'exit', node, key_file)}`, then {role.delay_blocks} L2 blocks later "
                f"`{command(role, 'withdraw', node, key_file)}`")
    if rec["status"] == "EXITING":
        return (f"{role.noun} {rec[role.id_key]} is EXITING since L2 height {rec['exit_height']}: its "
                f"{rec['stake_sat']} sat can be withdrawn from height {rec['exit_height'] + role.delay_blocks} "
                f"with `{command(role, 'withdraw', node, key_file)}`")
    return f"{role.noun} {rec[role.id_key]} is {rec['status']}: no stake is locked"


def leave(role: StakedRole, verb: str, node: str, key_file: str, fee: int = 1, wait_s: float = 30.0) -> str:
    """Post the role's exit or withdrawal signed with key_file, wait until it is committed, and say what follows."""
    try:
        secret = load_secret(Path(key_file))
    except KeyFileError as e:
        raise LeaveError(str(e)) from None
    ident = public_key(secret).hex()
    c = Client(node)
    before = record(c, role, ident)
    if before is None:
        raise LeaveError(f"{role.noun} {ident} is not registered at {node}")
    res = c.sign_and_submit(secret, role.exit if verb == "exit" else role.withdraw, fee)
    st = c.wait_tx(res["txid"], wait_s)
    if st.get("status") != "committed":
        why = st.get("reason") or f"not committed within {wait_s} s"
        raise LeaveError(f"{verb} transaction {res['txid']} is {st.get('status')}: {why}")
    after = record(c, role, ident) or before
    if verb == "exit":
        held = f" once it holds no task roles (now {after['active_tasks']})" if after.get("active_tasks") else ""
        return (f"{role.noun} {ident} is EXITING since L2 height {after['exit_height']} (transaction {res['txid']}): "
                f"no new work; its {after['stake_sat']} sat stake can be withdrawn from L2 height "
                f"{after['exit_height'] + role.delay_blocks}{held}: `{command(role, 'withdraw', node, key_file)}`")
    balance = c.account(ident)["balance_sat"]
    return (f"{role.noun} {ident} is {after['status']} (transaction {res['txid']}): {before['stake_sat']} sat of stake "
            f"back to its balance, now {balance} sat")


def build_parser(role: StakedRole, default_node: str) -> argparse.ArgumentParser:
    """`PROGRAM exit|withdraw NODE_FLAG URL KEY_FLAG FILE [--fee N] [--wait S]`."""
    ap = argparse.ArgumentParser(prog=role.program, description=f"leave the {role.noun} registry and take the stake "
                                 "back")
    sub = ap.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for verb, text in (("exit", f"post this {role.noun}'s exit: no new work; the stake stays locked "
                                f"{role.delay_blocks} L2 blocks"),
                       ("withdraw", f"after the exit delay, return the exited {role.noun}'s stake to its balance")):
        p = sub.add_parser(verb, help=text, description=text)
        p.add_argument(role.node_flag, dest="node", default=default_node,
                       help="l2d REST base URL (default %(default)s)")
        p.add_argument(role.key_flag, dest="key_file", required=True, help=f"the {role.noun}'s key file")
        p.add_argument("--fee", type=int, default=1, help="transaction fee in sat (default %(default)s)")
        p.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                       help="wait this long for the transaction to be committed (default %(default)s)")
    return ap


def main(role: StakedRole, argv: Sequence[str], default_node: str) -> int:
    """Run `exit` or `withdraw`: exit code 0 done, 1 refused or failed, 2 usage."""
    try:
        a = build_parser(role, default_node).parse_args(list(argv))
    except SystemExit as e:  # argparse: usage errors (2), --help (0)
        return e.code if isinstance(e.code, int) else 0
    try:
        print(leave(role, a.verb, a.node, a.key_file, a.fee, a.wait))
    except (ApiError, LeaveError) as e:  # refused by the ledger (its reason), unreachable, not registered
        print(f"error: {role.program} {a.verb}: {e}", file=sys.stderr)
        return 1
    return 0
