"""l2-cli: keys, queries, signed transfers and burns, admin mint, snapshot and proof export over the REST API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from coincurve import PrivateKey

from .client import ApiError, Client, Unreachable
from .core.coin_tx import Burn, Transfer
from .core.errors import DecodeError
from .core.payload import Payload
from .core.pegs import BridgeRejected, Federation, address_script, deposit_script_pubkey
from .core.pegs_tx import PeginClaim
from .core.tree import Proof, verify_proof
from .core.tx import public_key
from .keys import KeyFileError, load_secret

DEFAULT_API = os.environ.get("L2D_API", "http://127.0.0.1:8650")


class CliError(Exception):
    """A failure to report in one line (exit 1)."""


def _client(a: argparse.Namespace, token: str = "") -> Client:
    return Client(a.api, token)


def write_private(path: Path, data: bytes, force: bool = False) -> None:
    """Create path with mode 0600 (never world-readable, even briefly)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CliError(f"{path} exists; use --force to overwrite") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _account_id(arg: str) -> str:
    p = Path(arg)
    if p.is_file():
        return public_key(load_secret(p)).hex()
    try:
        if len(bytes.fromhex(arg)) == 32:
            return arg.lower()
    except ValueError:
        pass
    raise CliError(f"{arg!r} is neither a key file nor a 64-hex-character account")


def _send(a: argparse.Namespace, payload: Payload) -> dict[str, Any]:
    """Sign payload with --key (the account's committed nonce unless --nonce) and submit it; --wait follows it."""
    secret = load_secret(Path(a.key))
    c = _client(a)
    res = c.sign_and_submit(secret, payload, a.fee, nonce=a.nonce)
    if a.wait:
        res.update(c.wait_tx(res["txid"], a.wait))
    return res


def cmd_keygen(a: argparse.Namespace) -> dict[str, Any]:
    secret = PrivateKey().secret
    write_private(Path(a.out), secret.hex().encode() + b"\n", a.force)
    return {"key_file": a.out, "account": public_key(secret).hex()}


def cmd_pubkey(a: argparse.Namespace) -> dict[str, Any]:
    return {"account": public_key(load_secret(Path(a.key))).hex()}


def cmd_status(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).status()


def cmd_balance(a: argparse.Namespace) -> dict[str, Any]:
    acc = _client(a).account(_account_id(a.account))
    value = verify_proof(bytes.fromhex(acc["state_root"]), Proof.decode(bytes.fromhex(acc["proof"])))
    if (value is not None) != acc["exists"]:
        raise CliError("the daemon's proof disagrees with its answer")
    acc["proof_verified"] = True
    return {k: acc[k] for k in ("account", "exists", "balance_sat", "nonce", "height", "state_root", "proof_verified")}


def cmd_proof(a: argparse.Namespace) -> dict[str, Any]:
    acc = _client(a).account(_account_id(a.account))
    Path(a.out).write_bytes(bytes.fromhex(acc["proof"]))
    return {"proof_file": a.out, "root": acc["state_root"], "height": acc["height"],
            "verify_with": f"l2-verify proof --root {acc['state_root']} {a.out}"}


def cmd_transfer(a: argparse.Namespace) -> dict[str, Any]:
    return _send(a, Transfer(bytes.fromhex(_account_id(a.to)), a.amount))


def cmd_burn(a: argparse.Namespace) -> dict[str, Any]:
    if a.destination:  # a peg-out: refuse an address of another network before signing anything
        network = _client(a).network()
        try:
            address_script(a.destination, network)
        except BridgeRejected as e:
            raise CliError(str(e)) from None
    return _send(a, Burn(a.amount, a.destination.encode()))


def cmd_pegin_address(a: argparse.Namespace) -> dict[str, Any]:
    """The deposit address only this account can claim, re-derived locally from the federation's keys."""
    account = _account_id(a.account)
    c = _client(a)
    network = c.network()
    fed_json = c.federation()
    fed = Federation(fed_json["threshold"], tuple(bytes.fromhex(k) for k in fed_json["keys"]),
                     fed_json["pegin_min_depth"])
    res = c.pegin_address(account)
    if res["script_pubkey"] != deposit_script_pubkey(fed, network.id, bytes.fromhex(account)).hex():
        raise CliError("the daemon's deposit address does not match the one derived from the federation keys")
    res["verified_locally"] = True
    return res


def cmd_pegin_claim(a: argparse.Namespace) -> dict[str, Any]:
    """Claim a deposit: the raw Bitcoin transaction and `bitcoin-cli gettxoutproof` of its block."""
    try:
        btc_tx, proof = bytes.fromhex(a.tx), bytes.fromhex(a.proof)
    except ValueError:
        raise CliError("--tx and --proof must be hex") from None
    return _send(a, PeginClaim(a.btc_height, a.vout, btc_tx, proof))


def _token(a: argparse.Namespace) -> str:
    tok = a.token or os.environ.get("L2D_ADMIN_TOKEN")
    if not tok:
        raise CliError("admin command needs --token or L2D_ADMIN_TOKEN")
    return tok


def cmd_mint(a: argparse.Namespace) -> dict[str, Any]:
    recipient = _account_id(a.to)
    c = _client(a, _token(a))
    res = c.mint(recipient, a.amount)
    if a.wait:
        res.update(c.wait_tx(res["txid"], a.wait))
    return res


def cmd_snapshot(a: argparse.Namespace) -> dict[str, Any]:
    c = _client(a, _token(a))
    info = c.snapshot()
    data = c.snapshot_file(info["name"])
    Path(a.out).write_bytes(data)
    info.update(snapshot_file=a.out, verify_with=f"l2-verify snapshot {a.out} --expect-root {info['state_root']}")
    return info


def cmd_export_audit(a: argparse.Namespace) -> dict[str, Any]:
    data = _client(a).audit_bundle(a.height)
    Path(a.out).write_bytes(data)
    return {"l2_height": a.height, "audit_file": a.out, "size": len(data),
            "verify_with": f"l2-verify audit {a.out} --min-conf 1"}


def cmd_anchors(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).anchors()


def cmd_block(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).block(a.height)


def cmd_tx(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).tx(a.txid)


def _sat(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of satoshis")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="l2-cli", description=__doc__)
    ap.add_argument("--api", default=DEFAULT_API, help="daemon REST address (default %(default)s, or $L2D_API)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("keygen", help="create a key file (mode 0600)")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_keygen)
    p = sub.add_parser("pubkey", help="account id (x-only public key) of a key file")
    p.add_argument("--key", required=True)
    p.set_defaults(fn=cmd_pubkey)
    sub.add_parser("status", help="daemon status").set_defaults(fn=cmd_status)
    p = sub.add_parser("balance", help="balance and nonce, with the proof checked locally")
    p.add_argument("account", help="64-hex account id or a key file")
    p.set_defaults(fn=cmd_balance)
    p = sub.add_parser("proof", help="write an account's state proof for l2-verify")
    p.add_argument("account")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_proof)
    for name, fn in (("transfer", cmd_transfer), ("burn", cmd_burn)):
        p = sub.add_parser(name, help=f"sign and submit a {name}")
        p.add_argument("--key", required=True)
        if name == "transfer":
            p.add_argument("--to", required=True, help="recipient account id or key file")
        else:
            p.add_argument("--destination", default="",
                           help="a Bitcoin address of the daemon's network: the burn becomes a peg-out")
        p.add_argument("--amount", type=_sat, required=True, help="satoshis")
        p.add_argument("--fee", type=int, default=1, help="satoshis (default %(default)s)")
        p.add_argument("--nonce", type=int, help="override the committed nonce (to queue several)")
        p.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait until committed")
        p.set_defaults(fn=fn)
    p = sub.add_parser("pegin-address", help="the deposit address only ACCOUNT can claim (checked locally)")
    p.add_argument("account", help="64-hex account id or a key file")
    p.set_defaults(fn=cmd_pegin_address)
    p = sub.add_parser("pegin-claim", help="claim a deposit with its raw transaction and merkle proof")
    p.add_argument("--key", required=True, help="the key of the account the deposit address was made for")
    p.add_argument("--tx", required=True, help="raw Bitcoin transaction (hex)")
    p.add_argument("--proof", required=True, help="bitcoin-cli gettxoutproof output (hex)")
    p.add_argument("--btc-height", type=int, required=True, help="height of the block holding the deposit")
    p.add_argument("--vout", type=int, required=True, help="index of the output paying the deposit address")
    p.add_argument("--fee", type=int, default=1, help="satoshis, taken from the deposit (default %(default)s)")
    p.add_argument("--nonce", type=int, help="override the committed nonce")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait until committed")
    p.set_defaults(fn=cmd_pegin_claim)
    p = sub.add_parser("mint", help="admin: mint on local/regtest")
    p.add_argument("--to", required=True)
    p.add_argument("--amount", type=_sat, required=True)
    p.add_argument("--token", help="admin token (default $L2D_ADMIN_TOKEN)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS")
    p.set_defaults(fn=cmd_mint)
    p = sub.add_parser("snapshot", help="admin: take a snapshot now and download it")
    p.add_argument("--out", required=True)
    p.add_argument("--token")
    p.set_defaults(fn=cmd_snapshot)
    p = sub.add_parser("export-audit", help="download the audit bundle of a confirmed anchor (for l2-verify audit)")
    p.add_argument("--height", type=int, required=True, help="anchored L2 height")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_export_audit)
    sub.add_parser("anchors", help="anchors and their status").set_defaults(fn=cmd_anchors)
    p = sub.add_parser("block", help="show a block")
    p.add_argument("height", type=int)
    p.set_defaults(fn=cmd_block)
    p = sub.add_parser("tx", help="status of a transaction")
    p.add_argument("txid")
    p.set_defaults(fn=cmd_tx)
    return ap


def _describe(e: ApiError) -> str:
    """A refusal names the request: "POST /api/admin/mint -> HTTP 401 unauthorized: admin token rejected"."""
    if isinstance(e, Unreachable):
        return str(e)
    return f"{e.method} {e.path} -> HTTP {e.status} {e.detail}"


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        res = a.fn(a)
    except ApiError as e:
        print(f"error: {_describe(e)}", file=sys.stderr)
        return 1
    except (CliError, KeyFileError, DecodeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
