"""l2-cli against a real daemon process: keys, admin mint, proofs checked locally, transfers, exports for l2-verify."""
from __future__ import annotations

import hashlib
import io
import json
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from coincurve import PrivateKey

from l2d import cli
from l2d.client import Client as L2Client
from l2d.config import Config
from l2d.core.coin_tx import Transfer
from l2d.core.errors import Rejected
from l2d.core.genesis_file import load_genesis_file
from l2d.core.params import LOCAL
from l2d.core.session_tx import SessionOpen
from l2d.core.tx import public_key, sign
from l2d.genesis import NodeError
from l2d.keys import load_secret
from l2d.node import Node
from verify_tool import cli as verify_cli

TOKEN = "cli-test-token-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    rc = cli.main(["--json", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else err)


def test_cli_end_to_end(tmp_path: Path, keys: Any, l2d_process: Callable[..., Any],
                        node_toml: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = node_toml(tmp_path / "node.toml", {keys.pubkey(1): 1_000_000}, TOKEN, block={"interval_ms": 20})
    d = l2d_process(cfg)
    api = ["--api", d.url("")]
    alice = tmp_path / "alice.key"
    rc, out = run(capsys, *api, "keygen", "--out", str(alice))
    assert rc == 0 and len(out["account"]) == 64
    assert stat.S_IMODE(alice.stat().st_mode) == 0o600
    rc, err = run(capsys, *api, "keygen", "--out", str(alice))
    assert rc == 1 and "exists" in err  # never overwrites a key silently
    alice_id = out["account"]

    rc, bal = run(capsys, *api, "balance", str(alice))
    assert rc == 0 and bal["exists"] is False and bal["proof_verified"] is True  # non-inclusion proof checked

    rc, err = run(capsys, *api, "mint", "--to", alice_id, "--amount", "5000", "--token", "wrong-token-0123456789")
    assert rc == 1 and "401" in err
    rc, out = run(capsys, *api, "mint", "--to", alice_id, "--amount", "5000", "--token", TOKEN, "--wait", "20")
    assert rc == 0 and out["status"] == "committed"
    rc, bal = run(capsys, *api, "balance", alice_id)
    assert (bal["balance_sat"], bal["nonce"], bal["proof_verified"]) == (5000, 0, True)

    bob = tmp_path / "bob.key"
    run(capsys, *api, "keygen", "--out", str(bob))
    rc, out = run(capsys, *api, "transfer", "--key", str(alice), "--to", str(bob), "--amount", "1200", "--fee", "3",
                  "--wait", "20")
    assert rc == 0 and out["status"] == "committed"
    assert cli.main([*api, "block", str(out["height"])]) == 0  # the real API's block, read by a human
    text = capsys.readouterr().out
    assert text.startswith(f"block {out['height']} ") and "raw" not in text
    assert [line.split()[1:9] for line in text.splitlines() if " transfer " in line] == [
        ["transfer", "amount", "1200", "sat", "fee", "3", "sat", "from"]]
    assert run(capsys, *api, "balance", str(alice))[1]["balance_sat"] == 5000 - 1200 - 3
    assert run(capsys, *api, "balance", str(bob))[1]["balance_sat"] == 1200

    # The same transfer again (nonce 0 is spent): refused with the daemon's reason, exit 1.
    rc, err = run(capsys, *api, "transfer", "--key", str(alice), "--to", str(bob), "--amount", "1", "--nonce", "0")
    assert rc == 1 and "stale-nonce" in err
    rc, err = run(capsys, *api, "transfer", "--key", str(alice), "--to", str(bob), "--amount", "10000000")
    assert rc == 1 and "insufficient-balance" in err

    # Exports that the offline verifier accepts.
    rc, out = run(capsys, *api, "proof", str(bob), "--out", str(tmp_path / "bob.proof"))
    assert rc == 0
    # the REST API proves against the tip only, and says so; this node anchors nothing
    assert out["root_is"] == f"state root at tip height {out['height']} (not an anchored root)"
    assert out["latest_anchor"] is None
    assert verify_cli.main(["proof", "--root", out["root"], str(tmp_path / "bob.proof")]) == 0
    assert "balance 1200 sat, nonce 0" in capsys.readouterr().out
    rc, snap = run(capsys, *api, "snapshot", "--out", str(tmp_path / "s.l2snap"), "--token", TOKEN)
    assert rc == 0
    assert verify_cli.main(["snapshot", str(tmp_path / "s.l2snap"), "--expect-root", snap["state_root"]]) == 0
    capsys.readouterr()

    # signed transactions from a file, in one batch: each admitted or refused alone
    signed = [sign(LOCAL, keys.secret(1), n, 1, Transfer(bytes.fromhex(alice_id), 10 + n), bytes(32)) for n in range(3)]
    txfile = tmp_path / "txs.hex"
    txfile.write_text("".join(t.raw.hex() + "\n" for t in signed))
    rc, out = run(capsys, *api, "submit", str(txfile))
    assert rc == 0 and out["pending"] == 3 and [r["txid"] for r in out["results"]] == [t.txid.hex() for t in signed]
    assert cli.main([*api, "submit", str(txfile)]) == 1  # the same again: each one a duplicate (or committed)
    outerr = capsys.readouterr()
    assert outerr.out.count(" refused: ") == 3 and "3 of 3 transactions refused" in outerr.err
    txfile.write_text("zz\n")
    assert run(capsys, *api, "submit", str(txfile))[0] == 2

    rc, err = run(capsys, *api, "balance", "not-an-account")
    assert rc == 2 and "neither a key file" in err and "usage: l2-cli balance" in err
    assert d.stop() == 0


def test_session_close_refunds_the_client_after_expiry_and_not_before(
        tmp_path: Path, keys: Any, l2d_process: Callable[..., Any], node_toml: Callable[..., Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = node_toml(tmp_path / "node.toml", {keys.pubkey(1): 1_000_000}, TOKEN, block={"interval_ms": 20})
    d = l2d_process(cfg)
    api = ["--api", d.url("")]
    client_key = tmp_path / "client.key"
    client_key.write_text(keys.secret(1).hex())
    c = L2Client(d.url(""))
    expiry = int(c.status()["height"]) + 3
    opened = c.sign_and_submit(keys.secret(1), SessionOpen(keys.pubkey(2), keys.pubkey(3), 5000, 1000, 1 << 20,
                                                           expiry), 1)
    assert c.wait_tx(opened["txid"], 20)["status"] == "committed"
    before = run(capsys, *api, "balance", str(client_key))[1]["balance_sat"]
    rc, err = run(capsys, *api, "session-close", opened["txid"], "--key", str(client_key))
    assert rc == 1 and "session-not-expired" in err  # the client waits for the expiry; nothing written
    while int(c.status()["height"]) <= expiry:  # blocks are made for transactions: a few transfers pass it
        sent = c.sign_and_submit(keys.secret(1), Transfer(keys.pubkey(4), 1), 1)
        assert c.wait_tx(sent["txid"], 20)["status"] == "committed"
        before -= 2
    rc, out = run(capsys, *api, "session-close", opened["txid"], "--key", str(client_key), "--fee", "2",
                  "--wait", "20")
    assert rc == 0 and out["status"] == "committed"
    s = c.get(f"/api/sessions/{opened['txid']}")
    assert (s["status"], s["refunded_sat"]) == ("CLOSED", 5000)
    assert run(capsys, *api, "balance", str(client_key))[1]["balance_sat"] == before + 5000 - 2
    assert run(capsys, *api, "session-close", "not-a-session", "--key", str(client_key))[0] == 2
    assert d.stop() == 0


def test_cli_reports_an_unreachable_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["--api", "http://127.0.0.1:9", "status"])
    assert rc == 1 and "cannot reach the daemon" in capsys.readouterr().err


# -- help, argument style, output ---------------------------------------------------------------------------------
ACCOUNT = "ab" * 32
ROOT = "cd" * 32


def test_every_command_and_argument_has_help(undocumented: Callable[[Any], list[str]]) -> None:
    assert undocumented(cli.build_parser()) == []


def test_pubkey_takes_the_key_file_as_its_siblings_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.key"
    rc, out = run(capsys, "keygen", "--out", str(key))
    assert rc == 0
    assert run(capsys, "pubkey", str(key)) == (0, {"account": out["account"]})
    assert run(capsys, "pubkey", "--key", str(key)) == (0, {"account": out["account"]})  # the old spelling
    rc, err = run(capsys, "pubkey")
    assert rc == 2 and "pubkey KEY_FILE" in err


@pytest.mark.parametrize("argv", [
    ["pubkey", "{missing}"],
    ["balance", "{missing}"],
    ["pegin-address", "{missing}"],
    ["proof", "{missing}", "--out", "{tmp}/p"],
    ["proof", ACCOUNT, "--out", "{tmp}/no-such-dir/p"],
    ["keygen", "--out", "{tmp}/no-such-dir/k.key"],
    ["transfer", "--key", "{missing}", "--to", ACCOUNT, "--amount", "1"],
    ["transfer", "--key", "{tmp}", "--to", ACCOUNT, "--amount", "1"],
    ["burn", "--key", "{missing}", "--amount", "1"],
    ["pegin-claim", "--key", "{missing}", "--tx", "00", "--proof", "00", "--btc-height", "1", "--vout", "0"],
    ["mint", "--to", "{missing}", "--amount", "1", "--token", TOKEN],
    ["snapshot", "--out", "{tmp}/no-such-dir/s.l2snap", "--token", TOKEN],
    ["export-audit", "--height", "1", "--out", "{tmp}/no-such-dir/a.bundle"],
])
def test_a_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """Before anything is asked of the daemon (nothing listens on --api): argparse's message, exit 2."""
    args = [a.format(missing=tmp_path / "missing.key", tmp=tmp_path) for a in argv]
    assert cli.main(["--api", "http://127.0.0.1:9", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"usage: l2-cli {argv[0]}" in err and "error: argument " in err, err
    assert "Traceback" not in err and "cannot reach" not in err
    assert not (tmp_path / "no-such-dir").exists()


ANCHORS = {"broadcasting": True, "mode": "kofn", "every_blocks": 5, "btc_tip_height": 130, "anchors": [
    {"l2_height": 10, "state_root": ROOT, "status": "FINAL", "mode": "kofn", "txid": "e1" * 32,
     "btc_block_hash": "b1" * 32, "btc_height": 120, "confirmations": 11, "fee_sat": 300, "vsize": 150,
     "record": "00" * 40, "link": "11" * 32, "replaced_txids": [], "accept_latency_ms": 40,
     "l2_state": {"status": "FINAL", "btc_txid": "e1" * 32, "btc_block_hash": "b1" * 32, "btc_height": 120,
                  "state_root": ROOT}},
    {"l2_height": 15, "state_root": "ef" * 32, "status": "BUILT", "mode": "kofn", "txid": None,
     "btc_block_hash": None, "btc_height": None, "confirmations": 0, "fee_sat": 0, "vsize": 0,
     "record": "00" * 40, "link": "22" * 32, "replaced_txids": [], "accept_latency_ms": None, "l2_state": None},
]}
RAW_BLOCK = "5a" * 300
BLOCK = {"height": 7, "hash": "a7" * 32, "prev_hash": "a6" * 32, "timestamp_ms": 1_700_000_000_123, "tx_count": 2,
         "tx_root": "77" * 32, "state_root": ROOT, "final": True, "raw": RAW_BLOCK,
         "commit": {"signers": [0, 2], "threshold": 2, "raw": "6b" * 100},
         "txs": [{"txid": "f1" * 32, "type": "transfer", "sender": "51" * 32, "nonce": 4, "fee_sat": 3,
                  "recipient": "52" * 32, "amount_sat": 1200},
                 {"txid": "f2" * 32, "type": "burn", "sender": "53" * 32, "nonce": 0, "fee_sat": 2,
                  "amount_sat": 30000, "destination": b"bcrt1qdest".hex()}]}
PLANS = {"plans": [{"id": "9a" * 32, "kind": "payout", "status": "PLANNED", "l2_height": 12, "final": True,
                    "replaces": None, "replaced_by": None, "anchor_height": 0, "feerate_sat_vb": 2, "fee_sat": 400,
                    "change_sat": 100, "inputs": [{"txid": "c1" * 32, "vout": 0, "amount_sat": 50000,
                                                   "kind": "PEGIN"}],
                    "pegouts": [{"id": "d1" * 32, "payout_sat": 29600, "address": "bcrt1qdest"}], "threshold": 2,
                    "signed_by": ["02" + "e5" * 32], "psbt": "cHNidP8BAHECAAAAAf" * 10, "signed_tx": None}]}


class FakeClient:
    """The daemon's answers, as l2d/client.py returns them; latest is what GET /api/anchors/latest answers."""

    latest: Optional[dict[str, Any]] = None

    def __init__(self, url: str, token: str = "") -> None:
        pass

    def anchors(self) -> dict[str, Any]:
        return ANCHORS

    def block(self, height: int) -> dict[str, Any]:
        return BLOCK

    def plans(self, status: Optional[str], limit: int) -> dict[str, Any]:
        return PLANS

    def account(self, account: str) -> dict[str, Any]:
        return {"account": account, "exists": True, "balance_sat": 5, "nonce": 1, "height": 57, "state_root": ROOT,
                "key": "01" + account, "proof": "0102"}

    def latest_anchor(self) -> dict[str, Any]:
        if self.latest is None:
            raise cli.ApiError(404, "not-found", "anchoring is not enabled on this node", "GET",
                               "/api/anchors/latest")
        return self.latest

    def snapshot(self) -> dict[str, Any]:
        return {"name": "snap-57.l2snap", "height": 57, "state_root": ROOT, "block_hash": "a7" * 32, "size": 2}

    def download_snapshot(self, name: str, out: Any, progress: Any) -> int:
        for i, part in enumerate((b"S", b"N")):
            out.write(part)
            progress(i + 1, 2)
        return 2


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeClient]:
    monkeypatch.setattr(cli, "Client", FakeClient)
    monkeypatch.setattr(FakeClient, "latest", None)
    return FakeClient


def human(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    out = capsys.readouterr().out
    assert "{'" not in out and "['" not in out, out  # never a Python repr
    return out


def test_anchors_prints_a_table_and_json_on_request(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = human(capsys, "anchors").splitlines()
    assert out[0] == "anchors: mode kofn, every 5 L2 blocks, broadcasting, Bitcoin tip 130"
    assert out[1].split() == ["L2", "HEIGHT", "STATUS", "CONFIRMATIONS", "BTC", "HEIGHT", "TXID"]
    assert out[2].split() == ["10", "FINAL", "11", "120", "e1" * 32]
    assert out[3].split() == ["15", "BUILT", "0", "-", "-"]
    for argv in (["--json", "anchors"], ["anchors", "--json"]):  # before or after the command
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out) == ANCHORS  # the API's JSON as is


def test_block_prints_a_summary_not_its_hex(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = human(capsys, "block", "7")
    assert RAW_BLOCK not in out and "5a5a5a" not in out and "6b6b6b" not in out
    lines = out.splitlines()
    assert lines[:7] == ["block 7 (final)", f"hash:       {'a7' * 32}", f"prev:       {'a6' * 32}",
                         "time:       2023-11-14 22:13:20.123 UTC", f"state root: {ROOT}",
                         "signed by:  members 0, 2 (threshold 2)", "tx count:   2"]
    assert lines[7].split() == ["0", "transfer", "amount", "1200", "sat", "fee", "3", "sat", "from", "51" * 32, "to",
                                "52" * 32, "txid", "f1" * 32]
    assert lines[8].split() == ["1", "burn", "amount", "30000", "sat", "fee", "2", "sat", "from", "53" * 32, "to",
                                "bcrt1qdest", "txid", "f2" * 32]
    assert cli.main(["block", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == BLOCK


def test_plans_print_one_line_each(fake: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = human(capsys, "plans").splitlines()
    assert out[1].split() == ["9a" * 32, "payout", "PLANNED", "12", "1/2", "400", "29600"]
    assert len(out) == 2 and "cHNidP8" not in "".join(out)
    assert cli.main(["plans", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == PLANS


def test_proof_and_snapshot_name_the_tip_root_and_the_latest_anchor(fake: Any, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The REST API proves against the tip only (no --height): the output says so and names the anchored root."""
    tip = f"state root at tip height 57 (not an anchored root): {ROOT}"
    out = human(capsys, "proof", ACCOUNT, "--out", str(tmp_path / "p")).splitlines()
    assert out[1] == tip
    assert out[2] == "latest anchor: none (anchoring is off on this node, or nothing is anchored yet)"
    assert out[3] == f"verify with: l2-verify proof --root {ROOT} {tmp_path / 'p'}"
    fake.latest = ANCHORS["anchors"][0]
    out = human(capsys, "proof", ACCOUNT, "--out", str(tmp_path / "p")).splitlines()
    assert out[1] == tip
    assert out[2].startswith(f"latest anchor: L2 height 10, status FINAL, state root {ROOT} ")
    out = human(capsys, "snapshot", "--out", str(tmp_path / "s"), "--token", TOKEN).splitlines()
    assert out[1] == tip and out[2].startswith("latest anchor: L2 height 10, status FINAL")
    assert (tmp_path / "s").read_bytes() == b"SN"
    rc, res = run(capsys, "proof", ACCOUNT, "--out", str(tmp_path / "p"))
    assert rc == 0 and (tmp_path / "p").read_bytes() == b"\x01\x02"
    assert res["root_is"] == "state root at tip height 57 (not an anchored root)" and res["root"] == ROOT
    assert res["latest_anchor"] == {"l2_height": 10, "state_root": ROOT, "status": "FINAL", "l2_status": "FINAL",
                                    "txid": "e1" * 32}


def test_other_results_print_as_lines_not_reprs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = human(capsys, "federation-init", "--members", "2", "--dir", str(tmp_path / "fed"), "--base-port", "18671")
    assert "apis:\n  - http://127.0.0.1:18671\n  - http://127.0.0.1:18672\n" in out


# -- federation-init ------------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (directories as empty values): to show nothing changed."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"") for p in sorted(root.rglob("*"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_federation_init_writes_members_that_share_one_genesis(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    fed = tmp_path / "fed"
    rc, out = run(capsys, "federation-init", "--members", "4", "--dir", str(fed), "--base-port", "18661")
    assert rc == 0, out
    assert (out["members"], out["threshold"], out["network"]) == (4, 3, "local")
    assert out["apis"] == [f"http://127.0.0.1:{18661 + k}" for k in range(4)]
    with (fed / "genesis.json").open("rb") as f:
        genesis = load_genesis_file(f)  # the auditors' reader accepts it
    assert (fed / "genesis.json").read_bytes() == genesis.encode()  # canonical
    assert genesis.genesis_hash.hex() == out["genesis_hash"] and genesis.network.name == "local"
    assert genesis.member_ids == ("member-1", "member-2", "member-3", "member-4")
    assert genesis.members.threshold == 3

    demo = Config.load(REPO / "config" / "local.toml", env={}).chain.genesis_alloc
    mint_pub = public_key(load_secret(fed / "member-1" / "mint_authority.key"))
    for k in range(1, 5):
        d = fed / f"member-{k}"
        for name in ("l2d.toml", "member.key") + (("mint_authority.key",) if k == 1 else ()):
            assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
        assert (d / "mint_authority.key").exists() == (k == 1)
        cfg = Config.load(d / "l2d.toml", env={})
        assert cfg.node.network == "local" and cfg.node.data_dir == d / "data"
        assert cfg.api.port == 18661 + k - 1 and cfg.api.admin_token == out["admin_token"]
        assert cfg.chain.genesis_alloc == demo
        assert (cfg.chain.mint_authority_key_file, cfg.chain.mint_authority_key) == (
            (d / "mint_authority.key", None) if k == 1 else (None, mint_pub))
        assert not cfg.anchoring.enabled and not cfg.bridge.enabled
        f = cfg.federation
        assert f.key_file == d / "member.key" and f.threshold == 3 and f.members is not None
        assert [(m.id, m.key, m.url) for m in f.members] == [
            (mid, key, url) for mid, key, url in zip(genesis.member_ids, genesis.members.keys, out["apis"])]
        assert f.members[k - 1].key == public_key(load_secret(d / "member.key"))
        node = Node.from_config(cfg)  # what `l2d --config` opens: block 0 is the genesis file's
        try:
            block0 = node.ledger.block(0)
            assert block0 is not None and block0.header == genesis.genesis
            assert node.genesis.member_index == k - 1 and node.genesis.membership == genesis.members
            if k > 1:  # only member 1 holds the mint secret
                with pytest.raises(Rejected, match="this node does not hold the mint authority key"):
                    node.admission.mint(mint_pub, 1)
        finally:
            await node.stop()


@pytest.mark.parametrize("n,args,m", [(7, [], 5), (15, [], 11), (5, ["--threshold", "5"], 5), (1, [], 1)])
def test_federation_init_threshold_and_regtest(tmp_path: Path, capsys: pytest.CaptureFixture[str], n: int,
                                               args: list[str], m: int) -> None:
    rc, out = run(capsys, "federation-init", "--members", str(n), "--dir", str(tmp_path), "--network", "regtest",
                  *args)
    assert rc == 0 and out["threshold"] == m and out["apis"][0] == "http://127.0.0.1:8661"
    with (tmp_path / "genesis.json").open("rb") as f:
        genesis = load_genesis_file(f)
    assert genesis.network.name == "regtest" and genesis.members.n == n and genesis.members.threshold == m
    for k in (1, n):
        cfg = Config.load(tmp_path / f"member-{k}" / "l2d.toml", env={})
        assert cfg.node.network == "regtest" and cfg.federation.threshold == m


@pytest.mark.parametrize("existing", ["member-1", "member-3", "genesis.json"])
def test_federation_init_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str) -> None:
    fed = tmp_path / "fed"
    fed.mkdir()
    (fed / "notes.txt").write_text("mine")
    if existing.endswith(".json"):
        (fed / existing).write_text("{}")
    else:
        (fed / existing).mkdir()
        (fed / existing / "member.key").write_text("ab" * 32 + "\n")
    before = tree(fed)
    rc, err = run(capsys, "federation-init", "--members", "4", "--dir", str(fed))
    assert rc == 2
    assert err == (f"error: {fed / existing} exists: federation-init never overwrites a member's keys or config; "
                   f"choose another --dir\n")
    assert tree(fed) == before  # nothing written


def test_federation_init_refuses_a_second_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "federation-init", "--members", "2", "--dir", str(tmp_path))[0] == 0
    before = tree(tmp_path)
    rc, err = run(capsys, "federation-init", "--members", "4", "--dir", str(tmp_path))
    assert rc == 2 and "member-1 exists" in err
    assert tree(tmp_path) == before


def test_federation_genesis_rewrites_the_file_only_when_every_member_agrees(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fed = tmp_path / "fed"
    assert run(capsys, "federation-init", "--members", "3", "--dir", str(fed), "--network", "regtest")[0] == 0
    with fed.joinpath("genesis.json").open("rb") as f:
        old = load_genesis_file(f)
    signers = [PrivateKey(hashlib.sha256(bytes([i])).digest()).public_key.format().hex() for i in range(3)]
    bridge = f"\n[bridge]\nenabled = true\nthreshold = 2\nother_keys = {json.dumps(signers)}\n"
    configs = [fed / f"member-{k}" / "l2d.toml" for k in (1, 2, 3)]
    for c in configs[:2]:
        c.write_text(c.read_text() + bridge)
    before = tree(fed)
    rc, err = run(capsys, "federation-genesis", "--dir", str(fed))  # member 3 does not have the bridge yet
    assert rc == 1 and "the members' configs describe different genesis blocks" in err
    assert tree(fed) == before
    configs[2].write_text(configs[2].read_text() + bridge)
    rc, out = run(capsys, "federation-genesis", "--dir", str(fed))
    assert rc == 0 and out["members"] == 3
    with fed.joinpath("genesis.json").open("rb") as f:
        new = load_genesis_file(f)
    assert new.genesis_hash.hex() == out["genesis_hash"] != old.genesis_hash.hex()
    assert new.members == old.members  # the same members and threshold; only the genesis state changed
    node = Node.from_config(Config.load(configs[1], env={}))
    try:  # what the daemon computes from the same config
        assert node.ledger.block(0).header.hash == new.genesis_hash  # type: ignore[union-attr]
    finally:
        node.store.close()
        node.datadir.close()
    rc, err = run(capsys, "federation-genesis", "--dir", str(tmp_path / "nowhere"))
    assert rc == 2 and "no member-1/l2d.toml" in err


@pytest.mark.parametrize("args,msg", [
    (["--members", "4", "--threshold", "2"], "--threshold 2: must be above n/2 = 2 and at most n = 4"),
    (["--members", "4", "--threshold", "5"], "--threshold 5: must be above n/2 = 2 and at most n = 4"),
    (["--members", "0"], "--members 0: a federation has 1..64 members"),
    (["--members", "65"], "--members 65: a federation has 1..64 members"),
    (["--members", "4", "--base-port", "65533"], "--base-port 65533: the API ports 65533..65536 must be between"),
    (["--members", "4", "--base-port", "0"], "--base-port 0: the API ports 0..3 must be between"),
])
def test_federation_init_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                      msg: str) -> None:
    rc, err = run(capsys, "federation-init", "--dir", str(tmp_path / "fed"), *args)
    assert rc == 2 and err.startswith(f"error: {msg}")
    assert not (tmp_path / "fed").exists()


def test_federation_init_member_1_mints(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        l2d_process: Callable[..., Any]) -> None:
    """A real member 1 process: it holds the mint authority, and the printed admin token works against it."""
    port = free_port()
    rc, out = run(capsys, "federation-init", "--members", "2", "--dir", str(tmp_path), "--base-port", str(port),
                  "--threshold", "2")
    assert rc == 0
    first = l2d_process(tmp_path / "member-1" / "l2d.toml")
    assert first.port == port
    alice = public_key(hashlib.sha256(b"l2d demo account 1").digest()).hex()
    rc, res = run(capsys, "--api", out["apis"][0], "mint", "--to", alice, "--amount", "5000",
                  "--token", out["admin_token"])
    assert rc == 0 and len(res["txid"]) == 64
    assert first.stop() == 0


@pytest.mark.parametrize("fresh", [True, False])
def test_federation_init_failure_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch, fresh: bool) -> None:
    """A failure after the first file is written (provoked: the real parts do not fail) removes what it wrote."""
    def broken(*_: Any) -> Any:
        raise NodeError("provoked")
    monkeypatch.setattr(cli, "load_genesis", broken)
    fed = tmp_path / "fed"
    if not fresh:
        fed.mkdir()
        (fed / "notes.txt").write_text("mine")
    rc, err = run(capsys, "federation-init", "--members", "4", "--dir", str(fed))
    assert rc == 1 and err == "error: provoked\n"
    assert (tree(fed) == {"notes.txt": b"mine"}) if not fresh else not fed.exists()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_snapshot_download_shows_progress_on_a_terminal_only(fake: Any, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for argv, shown in ((["snapshot"], True), (["--json", "snapshot"], False)):
        err = Terminal()
        monkeypatch.setattr(cli.sys, "stderr", err)
        assert cli.main([*argv, "--out", str(tmp_path / "s"), "--token", TOKEN]) == 0
        assert (tmp_path / "s").read_bytes() == b"SN"
        assert ("snapshot:" in err.getvalue() and "/2.00" in err.getvalue()) == shown, err.getvalue()  # of 2 B
