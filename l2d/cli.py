"""l2-cli: keys, queries, signed transfers and burns, admin mint, snapshot and proof export over the REST API;
federation-init writes the configs, keys and genesis file of an n-member federation on one machine."""
from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import io
import json
import os
import secrets
import shutil
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, Optional, Sequence

from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC, CookieAuth, RetryPolicy, UserPassAuth, hash_from_hex
from bridge.rpc_errors import RPCError

from .argtypes import existing_file, output_file
from .client import ApiError, Client, Unreachable
from .config import DEFAULT_GENESIS_TIMESTAMP_MS, Config, ConfigError
from .core.chains import btc_chain
from .core.coin_tx import Burn, Transfer
from .core.errors import DecodeError
from .core.genesis_file import FederationGenesis, write_genesis_file
from .core.members import MAX_MEMBERS, default_threshold
from .core.params import Network, network_by_name
from .core.payload import Payload
from .core.pegs import BridgeRejected, Federation, address_script, deposit_script_pubkey, script_address
from .core.pegs_tx import PeginClaim
from .core.session_tx import SessionClose
from .core.tree import Proof, verify_proof
from .core.tx import public_key
from .datadir import write_atomic
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


def _is_account_hex(arg: str) -> bool:
    try:
        return len(bytes.fromhex(arg)) == 32
    except ValueError:
        return False


def _account_id(arg: str) -> str:
    p = Path(arg)
    if p.is_file():
        return public_key(load_secret(p)).hex()
    if _is_account_hex(arg):
        return arg.lower()
    raise UsageError(f"{arg!r} is neither a key file nor a 64-hex-character account")


def hex32_arg(arg: str) -> str:
    """An argparse type: 64 hex characters (a session or transaction id)."""
    if not _is_account_hex(arg):
        raise argparse.ArgumentTypeError(f"{arg!r} is not 64 hex characters")
    return arg.lower()


def account_arg(arg: str) -> str:
    """An argparse type: a key file or a 64-hex account id."""
    if Path(arg).expanduser().is_file():
        return str(Path(arg).expanduser())
    if _is_account_hex(arg):
        return arg
    raise argparse.ArgumentTypeError(f"{arg!r} is neither a key file nor a 64-hex-character account id")


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
    key = a.key_file or a.key  # --key: the old spelling, kept as a hidden alias
    if key is None or (a.key_file and a.key):
        raise UsageError("pubkey takes one key file: l2-cli pubkey KEY_FILE")
    return {"account": public_key(load_secret(Path(key))).hex()}


def cmd_status(a: argparse.Namespace) -> dict[str, Any]:
    return _client(a).status()


def cmd_balance(a: argparse.Namespace) -> dict[str, Any]:
    acc = _client(a).account(_account_id(a.account))
    value = verify_proof(bytes.fromhex(acc["state_root"]), Proof.decode(bytes.fromhex(acc["proof"])))
    if (value is not None) != acc["exists"]:
        raise CliError("the daemon's proof disagrees with its answer")
    acc["proof_verified"] = True
    return {k: acc[k] for k in ("account", "exists", "balance_sat", "nonce", "height", "state_root", "proof_verified")}


def _latest_anchor(c: Client) -> Optional[dict[str, Any]]:
    """The latest anchor's L2 height, state root and status; None where anchoring is off or nothing is anchored."""
    try:
        a = c.latest_anchor()
    except ApiError as e:
        if e.status == 404:
            return None
        raise
    l2 = a.get("l2_state") or {}
    return {"l2_height": a["l2_height"], "state_root": l2.get("state_root") or a["state_root"],
            "status": a["status"], "l2_status": l2.get("status"), "txid": a.get("txid")}


def _root_fields(c: Client, height: int, root: str) -> dict[str, Any]:
    """Say which root a proof or snapshot is under: the tip's (the REST API proves against the tip only), and the
    latest anchored root, the one an auditor compares with."""
    return {"root": root, "height": height, "root_is": f"state root at tip height {height} (not an anchored root)",
            "latest_anchor": _latest_anchor(c)}


def cmd_proof(a: argparse.Namespace) -> dict[str, Any]:
    c = _client(a)
    acc = c.account(_account_id(a.account))
    Path(a.out).write_bytes(bytes.fromhex(acc["proof"]))
    return {"proof_file": a.out, "account": acc["account"], "exists": acc["exists"],
            **_root_fields(c, acc["height"], acc["state_root"]),
            "verify_with": f"l2-verify proof --root {acc['state_root']} {a.out}"}


def cmd_transfer(a: argparse.Namespace) -> dict[str, Any]:
    return _send(a, Transfer(bytes.fromhex(_account_id(a.to)), a.amount))


def cmd_session_close(a: argparse.Namespace) -> dict[str, Any]:
    """Close a paid session: its server at any time, its client once it expired; the deposit's unsettled rest goes
    back to the client (docs/sessions.md)."""
    return _send(a, SessionClose(bytes.fromhex(a.session_id)))


def cmd_burn(a: argparse.Namespace) -> dict[str, Any]:
    if a.destination:  # a peg-out: refuse an address of another network before signing anything
        network = _client(a).network()
        try:
            address_script(a.destination, network)
        except BridgeRejected as e:
            raise CliError(str(e)) from None
    return _send(a, Burn(a.amount, a.destination.encode()))


def _federation_of(fed_json: dict[str, Any]) -> Federation:
    """The bridge's federation from GET /api/bridge/federation (to derive deposit addresses locally)."""
    em = fed_json.get("emergency") or {"threshold": 0, "keys": [], "delay_blocks": 0}
    return Federation(fed_json["threshold"], tuple(bytes.fromhex(k) for k in fed_json["keys"]),
                      fed_json["pegin_min_depth"], em["threshold"], tuple(bytes.fromhex(k) for k in em["keys"]),
                      em["delay_blocks"])


def cmd_pegin_address(a: argparse.Namespace) -> dict[str, Any]:
    """The deposit address only this account can claim, re-derived locally from the federation's keys."""
    account = _account_id(a.account)
    c = _client(a)
    network = c.network()
    fed = _federation_of(c.federation())
    res = c.pegin_address(account)
    if res["script_pubkey"] != deposit_script_pubkey(fed, network.id, bytes.fromhex(account)).hex():
        raise CliError("the daemon's deposit address does not match the one derived from the federation keys")
    res["verified_locally"] = True
    return res


def cmd_pegin_claim(a: argparse.Namespace) -> dict[str, Any]:
    """Claim a deposit: the raw Bitcoin transaction and `bitcoin-cli gettxoutproof` of its block, its height and the
    output paying the deposit address; or, with --txid, all of these found in the user's bitcoind."""
    if a.txid is not None:
        if a.tx is not None or a.proof is not None or a.btc_height is not None:
            raise UsageError("--txid finds the transaction, its proof and its height itself: drop --tx, --proof and "
                             "--btc-height")
        found = _deposit_from_bitcoind(a)
        res = _send(a, PeginClaim(found["btc_height"], found["vout"], found["tx"], found["proof"]))
        return {**res, "btc_txid": a.txid, "btc_height": found["btc_height"], "vout": found["vout"],
                "amount_sat": found["amount_sat"], "confirmations": found["confirmations"]}
    if a.tx is None or a.proof is None or a.btc_height is None or a.vout is None:
        raise UsageError("pegin-claim needs --txid (with --bitcoin-datadir or --bitcoin-rpc), or all of --tx, --proof, "
                         "--btc-height and --vout")
    try:
        btc_tx, proof = bytes.fromhex(a.tx), bytes.fromhex(a.proof)
    except ValueError:
        raise CliError("--tx and --proof must be hex") from None
    return _send(a, PeginClaim(a.btc_height, a.vout, btc_tx, proof))


# bitcoind's data dir layout, as bitcoin-cli -datadir reads it: the chain's subdirectory (its .cookie) and RPC port
_CHAIN_DIRS = {"main": ("", 8332), "test": ("testnet3", 18332), "testnet4": ("testnet4", 48332),
               "signet": ("signet", 38332), "regtest": ("regtest", 18443)}


def bitcoind_from_datadir(datadir: Path, chain: str) -> tuple[str, Path]:
    """The RPC URL and cookie file bitcoin-cli -datadir=DIR uses for chain: rpcconnect and rpcport from DIR/bitcoin.conf
    (the top section, then the chain's `[section]`), else 127.0.0.1 and the chain's default port; the cookie in the
    chain's subdirectory."""
    subdir, port = _CHAIN_DIRS[chain]
    section, conf = "", {}  # later settings win; the chain's section over the top one
    conf_file = datadir / "bitcoin.conf"
    lines = conf_file.read_text().splitlines() if conf_file.is_file() else []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif "=" in line and section in ("", chain):
            k, v = (x.strip() for x in line.split("=", 1))
            if section or k not in conf:
                conf[k] = v
    host = conf.get("rpcconnect", "127.0.0.1")
    return f"http://{host}:{conf.get('rpcport', port)}", Path(conf.get("rpccookiefile") or datadir / subdir / ".cookie")


def _deposit_from_bitcoind(a: argparse.Namespace) -> dict[str, Any]:
    """Find a deposit to --key's address in the user's bitcoind: the transaction, its block's height, the output that
    pays the address, the confirmations and the merkle proof; refused (with what to do) below the federation's depth
    or when the federation's header relay has not reached the block yet."""
    c = _client(a)
    network = c.network()
    chain = btc_chain(network).bitcoind_chain
    account = public_key(load_secret(Path(a.key)))
    fed_json = c.federation()
    spk = deposit_script_pubkey(_federation_of(fed_json), network.id, account)
    auth: Any
    if a.bitcoin_datadir:
        url, cookie = bitcoind_from_datadir(Path(a.bitcoin_datadir).expanduser(), chain)
        auth = CookieAuth(a.bitcoin_cookie or cookie)
    elif a.bitcoin_rpc:
        url = a.bitcoin_rpc
        if a.bitcoin_cookie:
            auth = CookieAuth(a.bitcoin_cookie)
        elif a.bitcoin_rpc_user:
            auth = UserPassAuth(a.bitcoin_rpc_user, a.bitcoin_rpc_password or "")
        else:
            raise UsageError("--bitcoin-rpc needs --bitcoin-cookie FILE or --bitcoin-rpc-user/--bitcoin-rpc-password")
    else:
        raise UsageError("--txid needs the bitcoind to read it from: --bitcoin-datadir DIR (as bitcoin-cli -datadir) "
                         "or --bitcoin-rpc URL with --bitcoin-cookie FILE")
    try:
        txid = hash_from_hex(a.txid)
    except ValueError:
        raise UsageError(f"--txid {a.txid!r} is not a 64-hex-character transaction id") from None

    async def find() -> dict[str, Any]:
        async with BitcoinRPC(url, auth, retry=RetryPolicy(max_attempts=2)) as rpc:
            await rpc.require_chain(chain)
            info = await rpc.call("getrawtransaction", [a.txid, True])
            outs = [o for o in info["vout"] if o["scriptPubKey"]["hex"] == spk.hex()]
            if not outs:
                raise CliError(f"transaction {a.txid} pays nothing to the deposit address of {account.hex()} "
                               f"({script_address(spk, network)})")
            if a.vout is not None:
                outs = [o for o in outs if o["n"] == a.vout]
                if not outs:
                    raise CliError(f"output {a.vout} of {a.txid} does not pay the deposit address of {account.hex()}")
            elif len(outs) > 1:
                raise CliError(f"transaction {a.txid} pays the deposit address in outputs "
                               f"{', '.join(str(o['n']) for o in outs)}: claim each with --vout N")
            if not info.get("blockhash"):
                raise CliError(f"transaction {a.txid} is not in a block yet: wait until it is mined and "
                               f"{fed_json['pegin_min_depth']} deep")
            block = hash_from_hex(info["blockhash"])
            header = await rpc.getblockheader(block, True)
            if header.confirmations < 0:
                raise CliError(f"the block of {a.txid} ({info['blockhash']}) is not on bitcoind's best chain")
            proof = await rpc.gettxoutproof([txid], block)
            return {"tx": bytes.fromhex(info["hex"]), "proof": proof, "btc_height": header.height,
                    "vout": int(outs[0]["n"]), "confirmations": header.confirmations,
                    "amount_sat": _btc_sat(outs[0]["value"])}
    try:
        found = asyncio.run(find())
    except RPCError as e:
        raise CliError(f"bitcoind at {url}: {e}") from None
    depth = int(fed_json["pegin_min_depth"])
    if found["confirmations"] < depth:
        raise CliError(f"deposit {a.txid}:{found['vout']} has {found['confirmations']} confirmation(s); the federation "
                       f"needs {depth} (bridge.pegin_min_depth): claim it after {depth - found['confirmations']} more "
                       "block(s)")
    need = found["btc_height"] + depth - 1

    def relayed() -> int:
        return int((c.federation().get("btc_tip") or {}).get("height", -1))
    tip = relayed()
    if tip < need and a.wait:  # the header relay follows bitcoind within moments: --wait covers it too
        try:
            c.wait(lambda: relayed() >= need, "the header relay", a.wait)
        except ApiError:
            pass  # timed out: refused below, naming the heights
        tip = relayed()
    if tip < need:
        raise CliError(f"the federation's Bitcoin headers reach height {tip}; the claim needs {need} (the deposit's "
                       f"block and {depth - 1} on top): the header relay follows bitcoind, try again shortly")
    return found


def _btc_sat(value: Any) -> int:
    """A bitcoind JSON amount (BTC, parsed as Decimal or float) in satoshis, exactly."""
    sat = Decimal(str(value)) * 100_000_000
    if sat != sat.to_integral_value():
        raise CliError(f"amount {value} BTC is not a whole number of satoshis")
    return int(sat)


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
    bar = None
    if not getattr(a, "json", False) and sys.stderr.isatty():  # progress on a terminal only, never with --json
        from tqdm import tqdm
        bar = tqdm(total=info.get("size"), desc="snapshot", unit="B", unit_scale=True, file=sys.stderr, leave=False)

    def progress(done: int, total: Optional[int]) -> None:
        if bar is not None:
            bar.update(done - bar.n)
    try:
        with open(a.out, "wb") as f:
            c.download_snapshot(info["name"], f, progress)
    finally:
        if bar is not None:
            bar.close()
    info.update(snapshot_file=a.out, **_root_fields(c, info["height"], info["state_root"]),
                verify_with=f"l2-verify snapshot {a.out} --expect-root {info['state_root']}")
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


def cmd_submit(a: argparse.Namespace) -> dict[str, Any]:
    """Signed transactions from a file, one hex encoding per line, sent in batches (POST /api/l2/txs)."""
    text = sys.stdin.read() if a.file == "-" else Path(a.file).read_text()
    raws = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                raws.append(bytes.fromhex(line.strip()))
            except ValueError:
                raise UsageError(f"{a.file} line {n}: not a transaction's hex encoding") from None
    if not raws:
        raise UsageError(f"{a.file}: no transactions")
    results = _client(a).submit_txs(raws)
    refused: dict[str, int] = {}
    for r in results:
        if "error" in r:
            refused[r["error"]] = refused.get(r["error"], 0) + 1
    out = {"submitted": len(raws), "pending": len(raws) - sum(refused.values()), "results": results}
    if refused:  # every result on stdout (the refused ones, or all with --json), then exit 1
        sys.stdout.write((json.dumps(out) if getattr(a, "json", False) else "\n".join(
            f"{r['txid']} refused: {r['error']}: {r['message']}" for r in results if "error" in r)) + "\n")
        raise CliError(f"{sum(refused.values())} of {len(raws)} transactions refused: " +
                       ", ".join(f"{k} {v}" for k, v in sorted(refused.items())))
    return out


# -- human output (the default; --json prints the result, for read commands the API's JSON, as is) --------------
def _scalar(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def _lines(d: dict[str, Any], indent: str = "") -> list[str]:
    """Nested JSON as indented "key: value" lines (lists one item a line), never a Python repr."""
    out: list[str] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += [f"{indent}{k}:", *_lines(v, indent + "  ")]
        elif isinstance(v, list):
            out.append(f"{indent}{k}:" + ("" if v else " (none)"))
            for item in v:
                if isinstance(item, dict):
                    sub = _lines(item, indent + "    ")
                    out += [f"{indent}  - {sub[0].lstrip()}", *sub[1:]] if sub else [f"{indent}  - {{}}"]
                else:
                    out.append(f"{indent}  - {_scalar(item)}")
        else:
            out.append(f"{indent}{k}: {_scalar(v)}")
    return out


def human_default(res: dict[str, Any]) -> str:
    return "\n".join(_lines(res))


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows)]


def human_anchors(res: dict[str, Any]) -> str:
    """GET /api/anchors as a table: L2 height, status, confirmations, Bitcoin height, txid."""
    head = (f"anchors: mode {res.get('mode')}, every {res.get('every_blocks')} L2 blocks, "
            f"{'broadcasting' if res.get('broadcasting') else 'not broadcasting (no bitcoind)'}, "
            f"Bitcoin tip {_scalar(res.get('btc_tip_height'))}")
    items = res.get("anchors") or []
    if not items:
        return f"{head}\nno anchors yet"
    rows = [(str(x["l2_height"]), str(x["status"]), str(x.get("confirmations", 0)), _scalar(x.get("btc_height")),
             _scalar(x.get("txid"))) for x in items]
    return "\n".join([head, *_table(("L2 HEIGHT", "STATUS", "CONFIRMATIONS", "BTC HEIGHT", "TXID"), rows)])


def _utc(ms: int) -> str:
    t = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d} UTC"


def _tx_line(i: int, t: dict[str, Any]) -> str:
    amount = f"{t['amount_sat']} sat" if "amount_sat" in t else "-"
    line = f"  {i:>3}  {t['type']:<16} amount {amount:<16} fee {t['fee_sat']} sat  from {t['sender']}"
    if t.get("recipient"):
        line += f"  to {t['recipient']}"
    if t.get("destination"):
        line += f"  to {bytes.fromhex(t['destination']).decode('ascii', 'replace')}"
    return f"{line}  txid {t['txid']}"


def human_block(res: dict[str, Any]) -> str:
    """GET /api/l2/blocks/H as a summary and one line per transaction (the raw bytes only with --json)."""
    commit = res.get("commit")
    signed = ("-" if commit is None else
              f"members {', '.join(map(str, commit['signers'])) or 'none'} (threshold {commit['threshold']})")
    txs = res.get("txs") or []
    return "\n".join([
        f"block {res['height']}" + (" (final)" if res.get("final") else " (not final)"),
        f"hash:       {res['hash']}",
        f"prev:       {res['prev_hash']}",
        f"time:       {_utc(res['timestamp_ms'])}",
        f"state root: {res['state_root']}",
        f"signed by:  {signed}",
        f"tx count:   {res['tx_count']}",
        *(_tx_line(i, t) for i, t in enumerate(txs)),
    ])


def human_plans(res: dict[str, Any]) -> str:
    """GET /api/bridge/plans as one line per plan (PSBT and signed transaction only with --json)."""
    plans = res.get("plans") or []
    if not plans:
        return "no plans"
    rows = [(p["id"], p["kind"], p["status"], str(p["l2_height"]), f"{len(p['signed_by'])}/{p['threshold']}",
             str(p["fee_sat"]), str(sum(x["payout_sat"] for x in p.get("pegouts") or [])))
            for p in plans]
    return "\n".join(_table(("ID", "KIND", "STATUS", "L2 HEIGHT", "SIGNED", "FEE SAT", "PAYS SAT"), rows))


def _anchor_line(res: dict[str, Any]) -> str:
    la = res.get("latest_anchor")
    if la is None:
        return "latest anchor: none (anchoring is off on this node, or nothing is anchored yet)"
    return (f"latest anchor: L2 height {la['l2_height']}, status {la['status']}, state root {la['state_root']} "
            f"(the root to compare with; its audit bundle: l2-cli export-audit --height {la['l2_height']})")


def human_proof(res: dict[str, Any]) -> str:
    return "\n".join([
        f"proof of account {res['account']} ({'present' if res['exists'] else 'absent'}) written to "
        f"{res['proof_file']}",
        f"{res['root_is']}: {res['root']}",
        _anchor_line(res),
        f"verify with: {res['verify_with']}",
    ])


def human_submit(res: dict[str, Any]) -> str:
    return f"{res['pending']} of {res['submitted']} transactions admitted (pending)"


def human_snapshot(res: dict[str, Any]) -> str:
    return "\n".join([
        f"snapshot {res['name']} ({res['size']} bytes, block {res['block_hash']}) written to {res['snapshot_file']}",
        f"{res['root_is']}: {res['root']}",
        _anchor_line(res),
        f"verify with: {res['verify_with']}",
    ])


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
    write_atomic(genesis_path, buf.getvalue(), 0o644)
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
    ap = argparse.ArgumentParser(prog="l2-cli", description=__doc__,
                                 epilog="Output: readable lines; --json (before or after the command) prints one "
                                        "JSON object, for read commands the API's JSON as is. Exit codes: 0 done, "
                                        "1 refused or failed, 2 usage (a missing file, bad arguments).")
    ap.add_argument("--api", default=DEFAULT_API, help="daemon REST address (default %(default)s, or $L2D_API); "
                    "several members' addresses, comma-separated: each request goes to the first that answers")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    common = argparse.ArgumentParser(add_help=False)  # --json also after the command: `l2-cli anchors --json`
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, fn: Any, help: str, human: Any = human_default) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(fn=fn, human=human)
        return p

    def wait(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                       help="wait up to SECONDS until the transaction is committed (default: do not wait)")

    def token(p: argparse.ArgumentParser) -> None:
        p.add_argument("--token", help="admin token (default $L2D_ADMIN_TOKEN)")

    p = cmd("keygen", cmd_keygen, "create a key file (mode 0600) and print its account id")
    p.add_argument("--out", required=True, type=output_file, metavar="KEY_FILE", help="the key file to create")
    p.add_argument("--force", action="store_true", help="overwrite KEY_FILE if it exists")
    p = cmd("pubkey", cmd_pubkey, "account id (x-only public key) of a key file")
    p.add_argument("key_file", nargs="?", type=existing_file, metavar="KEY_FILE", help="key file (64 hex characters)")
    p.add_argument("--key", type=existing_file, help=argparse.SUPPRESS)  # deprecated spelling of KEY_FILE
    cmd("status", cmd_status, "daemon status: network, tip height and hash, final height, state root, mempool")
    p = cmd("balance", cmd_balance, "balance and nonce, with the proof checked locally")
    p.add_argument("account", type=account_arg, metavar="ACCOUNT", help="64-hex account id or a key file")
    p = cmd("proof", cmd_proof, "write an account's state proof (against the tip's state root) for l2-verify",
            human_proof)
    p.add_argument("account", type=account_arg, metavar="ACCOUNT", help="64-hex account id or a key file")
    p.add_argument("--out", required=True, type=output_file, metavar="FILE", help="proof file to write")
    for name, fn in (("transfer", cmd_transfer), ("burn", cmd_burn)):
        p = cmd(name, fn, "sign and submit a transfer to another account" if name == "transfer" else
                "sign and submit a burn (with --destination, a peg-out to Bitcoin)")
        p.add_argument("--key", required=True, type=existing_file, metavar="KEY_FILE", help="the sender's key file")
        if name == "transfer":
            p.add_argument("--to", required=True, type=account_arg, help="recipient account id or key file")
        else:
            p.add_argument("--destination", default="",
                           help="a Bitcoin address of the daemon's network: the burn becomes a peg-out")
        p.add_argument("--amount", type=_sat, required=True, help="satoshis")
        p.add_argument("--fee", type=int, default=1, help="satoshis (default %(default)s)")
        p.add_argument("--nonce", type=int, help="override the committed nonce (to queue several)")
        wait(p)
    p = cmd("session-close", cmd_session_close, "close a paid session (its server at any time, its client after "
            "it expired): the deposit's unsettled rest goes back to the client")
    p.add_argument("session_id", type=hex32_arg, metavar="SESSION_ID", help="the session (the txid that opened it)")
    p.add_argument("--key", required=True, type=existing_file, metavar="KEY_FILE",
                   help="the key of the session's client or server")
    p.add_argument("--fee", type=int, default=1, help="satoshis (default %(default)s)")
    p.add_argument("--nonce", type=int, help="override the committed nonce")
    wait(p)
    p = cmd("pegin-address", cmd_pegin_address, "the deposit address only ACCOUNT can claim (checked locally)")
    p.add_argument("account", type=account_arg, metavar="ACCOUNT", help="64-hex account id or a key file")
    p = cmd("pegin-claim", cmd_pegin_claim, "claim a deposit: by its txid, read from your bitcoind (--txid with "
            "--bitcoin-datadir or --bitcoin-rpc), or with its raw transaction, merkle proof, height and output")
    p.add_argument("--key", required=True, type=existing_file, metavar="KEY_FILE",
                   help="the key of the account the deposit address was made for")
    p.add_argument("--txid", help="the deposit's Bitcoin txid: transaction, height, output and proof are read from "
                   "bitcoind (which needs -txindex, or the wallet that sent it)")
    p.add_argument("--bitcoin-datadir", metavar="DIR", help="bitcoind's data dir, as bitcoin-cli -datadir: RPC port "
                   "from DIR/bitcoin.conf, cookie from the chain's subdirectory")
    p.add_argument("--bitcoin-rpc", metavar="URL", help="bitcoind's RPC URL, e.g. http://127.0.0.1:18443")
    p.add_argument("--bitcoin-cookie", metavar="FILE", help="bitcoind's .cookie file (RPC credentials)")
    p.add_argument("--bitcoin-rpc-user", metavar="USER", help="RPC user (instead of the cookie)")
    p.add_argument("--bitcoin-rpc-password", metavar="PASSWORD", help="RPC password of --bitcoin-rpc-user")
    p.add_argument("--tx", help="raw Bitcoin transaction (hex), without --txid")
    p.add_argument("--proof", help="bitcoin-cli gettxoutproof output (hex), without --txid")
    p.add_argument("--btc-height", type=int, help="height of the block holding the deposit, without --txid")
    p.add_argument("--vout", type=int, help="index of the output paying the deposit address (with --txid: only "
                   "needed when several outputs pay it)")
    p.add_argument("--fee", type=int, default=1, help="satoshis, taken from the deposit (default %(default)s)")
    p.add_argument("--nonce", type=int, help="override the committed nonce")
    wait(p)
    p = cmd("federation-fund", cmd_federation_fund, "admin: the member behind --api records a deposit to the "
            "federation's funding address (coins for Bitcoin fees)")
    p.add_argument("--tx", required=True, help="raw Bitcoin transaction (hex)")
    p.add_argument("--proof", required=True, help="bitcoin-cli gettxoutproof output (hex)")
    p.add_argument("--btc-height", type=int, required=True, help="height of the block holding the deposit")
    p.add_argument("--vout", type=int, required=True, help="index of the output paying the funding address")
    token(p)
    wait(p)
    p = cmd("mint", cmd_mint, "admin: mint on local/regtest")
    p.add_argument("--to", required=True, type=account_arg, help="recipient account id or key file")
    p.add_argument("--amount", type=_sat, required=True, help="satoshis")
    token(p)
    wait(p)
    p = cmd("snapshot", cmd_snapshot, "admin: take a snapshot of the tip now and download it", human_snapshot)
    p.add_argument("--out", required=True, type=output_file, metavar="FILE", help="snapshot file to write")
    token(p)
    p = cmd("export-audit", cmd_export_audit, "download the audit bundle of a confirmed anchor (for l2-verify audit)")
    p.add_argument("--height", type=int, required=True, help="anchored L2 height")
    p.add_argument("--out", required=True, type=output_file, metavar="FILE", help="bundle file to write")
    cmd("anchors", cmd_anchors, "anchors and their status: L2 height, status, confirmations, Bitcoin height, txid",
        human_anchors)
    p = cmd("plans", cmd_plans, "the federation's peg-out plans, newest first: kind, status, who signed, fee "
            "(transaction and PSBT with --json)", human_plans)
    p.add_argument("--status", choices=("PLANNED", "REPLACED", "COMPLETED"), help="only plans with this status")
    p.add_argument("--limit", type=int, default=50, help="at most this many (1..500, default 50)")
    p = cmd("block", cmd_block, "show a block: header and one line per transaction (raw bytes with --json)",
            human_block)
    p.add_argument("height", type=int, help="L2 block height")
    p = cmd("tx", cmd_tx, "status of a transaction: committed (height, index), pending or dropped (reason)")
    p.add_argument("txid", help="transaction id (64 hex characters)")
    p = cmd("submit", cmd_submit, "send signed transactions, one hex encoding per line, in batches of up to 1,000 "
            "(each admitted or refused alone)", human_submit)
    p.add_argument("file", help="the file of transactions, or - for standard input")
    p = cmd("federation-init", cmd_federation_init, "write the configs, member keys and genesis file of an "
            "N-member federation on this machine (never overwrites)")
    p.add_argument("--members", type=int, required=True, metavar="N", help=f"1..{MAX_MEMBERS} members")
    p.add_argument("--dir", required=True, help="DIR/member-K/l2d.toml, DIR/member-K/member.key, DIR/genesis.json")
    p.add_argument("--network", choices=("local", "regtest"), default="local", help="default %(default)s")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT, metavar="P",
                   help="member K serves its API on P + K - 1 (default %(default)s)")
    p.add_argument("--threshold", type=int, metavar="M", help="signatures a block needs (default floor(2N/3) + 1)")
    p = cmd("federation-genesis", cmd_federation_genesis, "rewrite DIR/genesis.json from the members' configs "
            "(after a change every member made, such as the same [bridge] section)")
    p.add_argument("--dir", required=True, help="the federation-init directory")
    return ap


def _describe(e: ApiError) -> str:
    """A refusal names the request: "POST /api/admin/mint -> HTTP 401 unauthorized: admin token rejected"."""
    if isinstance(e, Unreachable):
        return str(e)
    return f"{e.method} {e.path} -> HTTP {e.status} {e.detail}"


def main(argv: Optional[list[str]] = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage errors (2), --help (0)
        return e.code if isinstance(e.code, int) else 0
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
    except OSError as e:  # e.g. an output file that cannot be written
        print(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res) if a.json else a.human(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
