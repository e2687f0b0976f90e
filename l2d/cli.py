"""l2-cli: keys, queries, signed transfers and burns, admin mint, snapshot and proof export over the REST API;
federation-init writes the configs, keys and genesis file of an n-member federation on one machine."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from coincurve import PrivateKey

from .client import ApiError, Client, Unreachable
from .config import DEFAULT_GENESIS_TIMESTAMP_MS, Config, ConfigError
from .core.coin_tx import Burn, Transfer
from .core.errors import DecodeError
from .core.genesis_file import FederationGenesis, write_genesis_file
from .core.members import MAX_MEMBERS, default_threshold
from .core.params import Network, network_by_name
from .core.payload import Payload
from .core.pegs import BridgeRejected, Federation, address_script, deposit_script_pubkey
from .core.pegs_tx import PeginClaim
from .core.tree import Proof, verify_proof
from .core.tx import public_key
from .genesis import NodeError, genesis_block_header, load_genesis
from .keys import KeyFileError, load_or_create_secret, load_secret

DEFAULT_API = os.environ.get("L2D_API", "http://127.0.0.1:8650")


class CliError(Exception):
    """A failure to report in one line (exit 1)."""

    exit_code = 1


class UsageError(CliError):
    """Arguments that cannot be used (exit 2, as argparse's own usage errors)."""

    exit_code = 2


class RefusedOverwrite(UsageError):
    """federation-init would overwrite a member's directory or the genesis file (exit 2, nothing written)."""


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
    em = fed_json.get("emergency") or {"threshold": 0, "keys": [], "delay_blocks": 0}
    fed = Federation(fed_json["threshold"], tuple(bytes.fromhex(k) for k in fed_json["keys"]),
                     fed_json["pegin_min_depth"], em["threshold"], tuple(bytes.fromhex(k) for k in em["keys"]),
                     em["delay_blocks"])
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


def cmd_federation_fund(a: argparse.Namespace) -> dict[str, Any]:
    """The member behind --api records a deposit to the federation's funding address (GET /api/bridge/federation
    names it): the raw Bitcoin transaction and `bitcoin-cli gettxoutproof` of its block, as for pegin-claim."""
    try:
        btc_tx, proof = bytes.fromhex(a.tx), bytes.fromhex(a.proof)
    except ValueError:
        raise CliError("--tx and --proof must be hex") from None
    c = _client(a, _token(a))
    res = c.fund(a.btc_height, a.vout, btc_tx, proof)
    if a.wait:
        res.update(c.wait_tx(res["txid"], a.wait))
    return res


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


def cmd_plans(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).plans(a.status, a.limit)


def cmd_block(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).block(a.height)


def cmd_tx(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).tx(a.txid)


# -- federation-init ---------------------------------------------------------------------------------------------
DEFAULT_BASE_PORT = 8661  # `make run` serves 8650, config/regtest.toml 8651
# The demo accounts of config/local.toml (public on purpose): secret of account N = sha256("l2d demo account N").
DEMO_ACCOUNTS = ((1, 50_000_000_000), (2, 20_000_000_000), (3, 5_000_000_000))


def demo_alloc() -> dict[str, int]:
    """The demo accounts' genesis allocations: 64-hex account -> satoshis."""
    return {public_key(hashlib.sha256(b"l2d demo account %d" % n).digest()).hex(): sat for n, sat in DEMO_ACCOUNTS}


def _member_toml(k: int, n: int, network: str, threshold: int, port: int, mint: str, token: str,
                 members: list[tuple[str, str, str]]) -> str:
    """Member k's l2d.toml (k is 1-based): every member has the same [chain] and [[federation.members]]."""
    if k == 1:
        mint_line = ('mint_authority_key_file = "mint_authority.key"   # this member holds the mint authority: '
                     '`l2-cli mint` goes to its API')
    else:
        mint_line = (f'mint_authority_key = "{mint}"   # the mint authority\'s public key (its secret is '
                     f'member-1/mint_authority.key)')
    alloc = "\n".join(f"{pk} = {sat}" for pk, sat in demo_alloc().items())
    listed = "\n".join(f'[[federation.members]]   # member index {i}\nid = "{mid}"\nkey = "{key}"\nurl = "{url}"\n'
                       for i, (mid, key, url) in enumerate(members))
    return f"""# l2d: member {k} of a {n}-member {network} federation, written by `l2-cli federation-init`.
# Start it with `l2d --config <this file>`. Relative paths resolve against this file's directory.
# This file holds the admin token (mode 0600). Details: docs/federation.md.

[node]
network = "{network}"
data_dir = "data"

[chain]
# Identical for every member: together they give block 0 of ../genesis.json.
genesis_timestamp_ms = {DEFAULT_GENESIS_TIMESTAMP_MS}
min_fee_sat = 1
{mint_line}

# Demo accounts, NOT SECRET: the secret of account N is sha256("l2d demo account N") (as in config/local.toml).
[chain.genesis_alloc]
{alloc}

[api]
host = "127.0.0.1"
port = {port}
admin_token = "{token}"   # the same for every member of this federation; $L2D_ADMIN_TOKEN overrides it

# [anchoring] and [bridge] stay off: the Bitcoin keys (anchor key, peg-out signer keys) are spread across the
# members' own processes by a later issue.

[federation]
key_file = "member.key"   # this member's BIP340 block-signing secret (mode 0600)
threshold = {threshold}   # a block needs this many of the {n} member signatures
# round_ms, max_round_ms and max_clock_drift_ms keep their defaults (docs/federation.md).

{listed}"""


def _write_durably(path: Path, data: bytes) -> None:
    """Write path through a temporary file beside it: fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_genesis(dirs: list[Path], network: Network, genesis_path: Path) -> FederationGenesis:
    """Each member's genesis, computed as its daemon will from DIR/member-K/l2d.toml: the same block 0 for all (or
    CliError), written to genesis_path (the file `l2-verify chain --members` reads)."""
    headers = []
    for k, d in enumerate(dirs, 1):
        config = Config.load(d / "l2d.toml", env={})
        genesis = load_genesis(config, network)
        if genesis.member_index != k - 1:
            raise CliError(f"member {k}: its key resolves to member index {genesis.member_index}")
        headers.append(genesis_block_header(network, genesis.state, config.chain.genesis_timestamp_ms))
    if len({h.hash for h in headers}) != 1:
        raise CliError("the members' configs describe different genesis blocks")
    fed = FederationGenesis(network, genesis.membership, genesis.member_ids, headers[0])
    buf = io.BytesIO()
    write_genesis_file(buf, fed)
    _write_durably(genesis_path, buf.getvalue())
    return fed


def cmd_federation_genesis(a: argparse.Namespace) -> dict[str, Any]:
    """DIR/genesis.json written anew from DIR/member-K/l2d.toml, after an operator changed what the genesis state
    depends on (e.g. added the same [bridge] section to every member): the members must agree, or nothing is
    written."""
    root = Path(a.dir).expanduser().resolve()
    dirs: list[Path] = []
    while (root / f"member-{len(dirs) + 1}" / "l2d.toml").is_file():
        dirs.append(root / f"member-{len(dirs) + 1}")
    if not dirs:
        raise UsageError(f"--dir {root}: no member-1/l2d.toml (the layout federation-init writes)")
    network = network_by_name(Config.load(dirs[0] / "l2d.toml", env={}).node.network)
    fed = _write_genesis(dirs, network, root / "genesis.json")
    return {"genesis_file": str(root / "genesis.json"), "genesis_hash": fed.genesis_hash.hex(), "members": len(dirs)}


def cmd_federation_init(a: argparse.Namespace) -> dict[str, Any]:
    """DIR/member-K/{l2d.toml, member.key} for K = 1..N (member 1 also mint_authority.key) and DIR/genesis.json,
    the block 0 every member computes from its config (checked by loading each config as the daemon does)."""
    n, network = a.members, network_by_name(a.network)
    if not 1 <= n <= MAX_MEMBERS:
        raise UsageError(f"--members {n}: a federation has 1..{MAX_MEMBERS} members")
    threshold = default_threshold(n) if a.threshold is None else a.threshold
    if not n / 2 < threshold <= n:
        raise UsageError(f"--threshold {threshold}: must be above n/2 = {n / 2:g} and at most n = {n} (two blocks "
                         f"signed by m members at one height must share a signer; n >= 4 is needed to tolerate one "
                         f"Byzantine member)")
    if not 1 <= a.base_port <= 65536 - n:
        raise UsageError(f"--base-port {a.base_port}: the API ports {a.base_port}..{a.base_port + n - 1} must be "
                         f"between 1 and 65535")
    root = Path(a.dir).expanduser().resolve()
    dirs = [root / f"member-{k}" for k in range(1, n + 1)]
    genesis_path = root / "genesis.json"
    for p in (*dirs, genesis_path):
        if os.path.lexists(p):
            raise RefusedOverwrite(f"{p} exists: federation-init never overwrites a member's keys or config; "
                                   f"choose another --dir")
    created: list[Path] = [] if root.exists() else [root]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            try:
                d.mkdir()
            except FileExistsError:
                raise RefusedOverwrite(f"{d} exists: federation-init never overwrites a member's keys or config; "
                                       f"choose another --dir") from None
            created.append(d)
        keys = [public_key(load_or_create_secret(d / "member.key", "federation member")).hex() for d in dirs]
        mint = public_key(load_or_create_secret(dirs[0] / "mint_authority.key")).hex()
        token = secrets.token_hex(16)
        members = [(f"member-{k}", keys[k - 1], f"http://127.0.0.1:{a.base_port + k - 1}") for k in range(1, n + 1)]
        for k, d in enumerate(dirs, 1):
            write_private(d / "l2d.toml", _member_toml(k, n, network.name, threshold, a.base_port + k - 1, mint,
                                                       token, members).encode())
        fed = _write_genesis(dirs, network, genesis_path)
    except BaseException:
        for d in reversed(created):  # a failure leaves nothing half-made behind
            shutil.rmtree(d, ignore_errors=True)
        genesis_path.with_name(genesis_path.name + ".tmp").unlink(missing_ok=True)
        raise
    return {"dir": str(root), "network": network.name, "members": n, "threshold": threshold,
            "genesis_file": str(genesis_path), "genesis_hash": fed.genesis_hash.hex(),
            "configs": [str(d / "l2d.toml") for d in dirs], "apis": [url for _, _, url in members],
            "admin_token": token, "start_with": f"l2d --config {root}/member-K/l2d.toml (K = 1..{n})"}


def _sat(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of satoshis")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="l2-cli", description=__doc__)
    ap.add_argument("--api", default=DEFAULT_API, help="daemon REST address (default %(default)s, or $L2D_API); several members' addresses, "
                    "comma-separated: each request goes to the first that answers")
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
    p = sub.add_parser("federation-fund", help="admin: the member behind --api records a deposit to the federation's "
                                               "funding address (coins for Bitcoin fees)")
    p.add_argument("--tx", required=True, help="raw Bitcoin transaction (hex)")
    p.add_argument("--proof", required=True, help="bitcoin-cli gettxoutproof output (hex)")
    p.add_argument("--btc-height", type=int, required=True, help="height of the block holding the deposit")
    p.add_argument("--vout", type=int, required=True, help="index of the output paying the funding address")
    p.add_argument("--token", help="admin token (or L2D_ADMIN_TOKEN)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait until committed")
    p.set_defaults(fn=cmd_federation_fund)
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
    p = sub.add_parser("plans", help="the federation's peg-out plans, newest first: transaction, PSBT, who signed, "
                       "status")
    p.add_argument("--status", choices=("PLANNED", "REPLACED", "COMPLETED"))
    p.add_argument("--limit", type=int, default=50, help="at most this many (1..500, default 50)")
    p.set_defaults(fn=cmd_plans)
    p = sub.add_parser("block", help="show a block")
    p.add_argument("height", type=int)
    p.set_defaults(fn=cmd_block)
    p = sub.add_parser("tx", help="status of a transaction")
    p.add_argument("txid")
    p.set_defaults(fn=cmd_tx)
    p = sub.add_parser("federation-init", help="write the configs, member keys and genesis file of an N-member "
                                                 "federation on this machine (never overwrites)")
    p.add_argument("--members", type=int, required=True, metavar="N", help=f"1..{MAX_MEMBERS} members")
    p.add_argument("--dir", required=True, help="DIR/member-K/l2d.toml, DIR/member-K/member.key, DIR/genesis.json")
    p.add_argument("--network", choices=("local", "regtest"), default="local")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, metavar="P",
                   help="member K serves its API on P + K - 1 (default %(default)s)")
    p.add_argument("--threshold", type=int, metavar="M", help="signatures a block needs (default floor(2N/3) + 1)")
    p.set_defaults(fn=cmd_federation_init)
    p = sub.add_parser("federation-genesis", help="rewrite DIR/genesis.json from the members' configs (after a change "
                                                    "every member made, such as the same [bridge] section)")
    p.add_argument("--dir", required=True, help="the federation-init directory")
    p.set_defaults(fn=cmd_federation_genesis)
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
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (KeyFileError, DecodeError, ValueError, NodeError, ConfigError) as e:
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
