"""The bridge's REST endpoints and admission rules on a daemon without bitcoind (no bridge service running).

The federation is a genesis parameter: [bridge] keys and threshold become state records; deposit addresses are
tweaked per L2 account; a burn to a Bitcoin address of the right network is a PENDING peg-out; a wrong-network
or malformed address, or an amount under the minimum, is refused at admission with state unchanged.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from coincurve import PrivateKey

from l2d.cli import main as cli_main
from l2d.config import Config, ConfigError
from l2d.core.coin_tx import Burn
from l2d.core.params import LOCAL
from l2d.core.pegs import (FUNDING_CONTRACT, PEGOUT_MIN_SAT, address_script, deposit_script_pubkey, script_address,
                           witness_script)
from l2d.core.tx import sign
from l2d.genesis import NodeError
from l2d.node import Node
from tests.conftest import ADMIN_TOKEN
from tests.l2d.api.test_openapi import assert_conforms

REGTEST_P2WPKH = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
MAINNET_P2WPKH = "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4"


def bridge_config(tmp_path: Path, make_cfg: Callable[..., Config], **bridge: Any) -> Config:
    data = tmp_path / "data"
    section = {"enabled": True, "threshold": 2, "pegin_min_depth": 3,
               "signer_key_files": [str(tmp_path / f"signer{i}.key") for i in range(3)]} | bridge
    return make_cfg(data, anchoring={"enabled": True}, bridge=section)


@pytest.fixture
async def bridge_client(tmp_path: Path, make_cfg: Callable[..., Config]) -> AsyncIterator[tuple[Node, TestClient]]:
    node = Node.from_config(bridge_config(tmp_path, make_cfg))
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        yield node, client
    finally:
        await client.close()
        await node.stop()


async def test_federation_endpoint(bridge_client: tuple[Node, TestClient], tmp_path: Path) -> None:
    node, client = bridge_client
    resp = await client.get("/api/bridge/federation")
    assert resp.status == 200
    f = await resp.json()
    secrets = [bytes.fromhex((tmp_path / f"signer{i}.key").read_text().strip()) for i in range(3)]
    keys = sorted(PrivateKey(s).public_key.format() for s in secrets)
    assert f["keys"] == [k.hex() for k in keys] and f["threshold"] == 2 and f["pegin_min_depth"] == 3
    assert f["deposit_descriptor"].startswith("wsh(sortedmulti(2,")
    assert f["pegged_in_sat"] == f["pending_pegouts_sat"] == f["paid_out_sat"] == f["bridged_supply_sat"] == 0
    assert f["holdings_sat"] == 0 and f["invariant_ok"] is True  # the books, from the state (no bitcoind needed)
    assert f["btc_tip"] is None
    assert f["change_address"].startswith("bcrt1q")


async def test_plans_endpoint_lists_and_refuses_bad_queries(bridge_client: tuple[Node, TestClient]) -> None:
    _, client = bridge_client
    assert await (await client.get("/api/bridge/plans")).json() == {"plans": []}
    assert await (await client.get("/api/bridge/plans?status=PLANNED&limit=500")).json() == {"plans": []}
    for query in ("status=planned", "status=", "limit=0", "limit=501", "limit=-1", "limit=ten"):
        resp = await client.get(f"/api/bridge/plans?{query}")
        assert resp.status == 400 and (await resp.json())["error"] == "malformed", query


async def test_funding_address_coins_and_the_fund_endpoint_refuse_bad_input(
        bridge_client: tuple[Node, TestClient]) -> None:
    node, client = bridge_client
    f = await (await client.get("/api/bridge/federation")).json()
    fed = node.federation
    assert fed is not None
    assert f["funding_address"] == script_address(deposit_script_pubkey(fed, LOCAL.id, FUNDING_CONTRACT), LOCAL)
    assert f["funded_sat"] == 0
    assert await (await client.get("/api/bridge/coins")).json() == {"coins": []}
    root = (await (await client.get("/api/l2/state")).json())["state_root"]
    good = {"btc_height": 1, "vout": 0, "tx": "00" * 60, "proof": "00" * 100}
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    resp = await client.post("/api/admin/bridge/fund", json=good)
    assert resp.status == 401
    for bad, code in [({**good, "tx": "zz"}, "malformed"), ({**good, "proof": "00" * 1001}, "malformed"),
                      ({**good, "btc_height": -1}, "out-of-range"), ({**good, "proof": "00" * 80}, "out-of-range"),
                      ({**good, "vout": "0"}, "bad-field")]:
        resp = await client.post("/api/admin/bridge/fund", json=bad, headers=auth)
        assert resp.status == 400 and (await resp.json())["error"] == code, (bad, await resp.text())
    # well formed, but no relayed Bitcoin block holds it: refused by consensus at admission
    resp = await client.post("/api/admin/bridge/fund", json=good, headers=auth)
    assert resp.status == 400 and (await resp.json())["error"] == "unknown-btc-block"
    assert (await (await client.get("/api/l2/state")).json())["state_root"] == root


async def test_pegin_address_is_per_account(bridge_client: tuple[Node, TestClient], keys: Any) -> None:
    node, client = bridge_client
    fed = node.federation
    assert fed is not None
    got = {}
    for n in (1, 2):
        resp = await client.get(f"/api/bridge/pegin-address/{keys.pubkey(n).hex()}")
        assert resp.status == 200
        a = await resp.json()
        spk = deposit_script_pubkey(fed, LOCAL.id, keys.pubkey(n))
        assert a["address"] == script_address(spk, LOCAL) and address_script(a["address"], LOCAL) == spk
        assert a["witness_script"] == witness_script(fed, LOCAL.id, keys.pubkey(n)).hex()
        # the tweaked keys differ from the federation's own keys, and per account
        assert not any(k.hex() in a["witness_script"] for k in fed.keys)
        got[n] = a["address"]
    assert got[1] != got[2]
    for bad in ("zz", "00" * 31, "g" * 64):
        resp = await client.get(f"/api/bridge/pegin-address/{bad}")
        assert resp.status == 400 and (await resp.json())["error"] == "malformed"


async def _state(client: TestClient) -> Any:
    return (await (await client.get("/api/l2/state")).json())["state_root"]


async def test_burn_to_an_address_is_a_pending_pegout(bridge_client: tuple[Node, TestClient], keys: Any,
                                                      wait_until: Any) -> None:
    node, client = bridge_client
    tx = sign(LOCAL, keys.secret(1), 0, 1, Burn(50_000, REGTEST_P2WPKH.encode()), b"\0" * 32)
    resp = await client.post("/api/l2/tx", json={"tx": tx.raw.hex()})
    assert resp.status == 202, await resp.text()

    async def listed() -> bool:
        return bool((await (await client.get("/api/bridge/pegouts")).json())["pegouts"])
    await wait_until(listed, what="peg-out listed")
    [p] = (await (await client.get("/api/bridge/pegouts")).json())["pegouts"]
    assert p == {"id": tx.txid.hex(), "status": "PENDING", "amount_sat": 50_000, "l2_height": p["l2_height"],
                 "address": REGTEST_P2WPKH, "btc_txid": None, "paid_sat": None, "fee_share_sat": None}
    f = await (await client.get("/api/bridge/federation")).json()
    assert f["pending_pegouts_sat"] == 50_000 and f["bridged_supply_sat"] == -50_000
    assert_conforms("GET", "/api/bridge/pegouts", 200, "application/json", {"pegouts": [p]})  # GET /api/openapi.json
    assert_conforms("GET", "/api/bridge/federation", 200, "application/json", f)


@pytest.mark.parametrize("dest, amount, reason", [
    (MAINNET_P2WPKH, 50_000, "bad-address"),  # wrong network
    ("mipcBbFg9gMiCh81Kj8tqqdgoZub1ZJRfn", 50_000, "bad-address"),  # testnet base58 on... valid version: see below
    ("bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt081", 50_000, "bad-address"),  # checksum
    ("not an address", 50_000, "bad-address"),
    (REGTEST_P2WPKH, PEGOUT_MIN_SAT - 1, "pegout-too-small"),
])
async def test_bad_pegout_refused_at_admission(bridge_client: tuple[Node, TestClient], keys: Any, dest: str,
                                               amount: int, reason: str) -> None:
    node, client = bridge_client
    if dest.startswith("mipc"):  # testnet/regtest P2PKH version 0x6f is valid on regtest: corrupt its checksum
        dest = dest[:-1] + ("o" if dest[-1] != "o" else "p")
    before = await _state(client)
    tx = sign(LOCAL, keys.secret(1), 0, 1, Burn(amount, dest.encode()), b"\0" * 32)
    resp = await client.post("/api/l2/tx", json={"tx": tx.raw.hex()})
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"] == reason
    assert await _state(client) == before
    assert (await (await client.get("/api/bridge/pegouts")).json())["pegouts"] == []


async def test_no_bridge_is_404(node_client: tuple[Node, TestClient]) -> None:
    _, client = node_client
    for path in ("/api/bridge/federation", "/api/bridge/pegins", "/api/bridge/pegouts",
                 "/api/bridge/pegin-address/" + "11" * 32):
        resp = await client.get(path)
        assert resp.status == 404 and (await resp.json())["error"] == "no-bridge"


def test_a_key_configured_twice_is_refused(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match="twice"):
        bridge_config(tmp_path, make_cfg, signer_key_files=[str(tmp_path / "a.key")] * 2)
    secret = b"\x07" * 32
    (tmp_path / "a.key").write_text(secret.hex())
    dup = PrivateKey(secret).public_key.format().hex()
    cfg = bridge_config(tmp_path, make_cfg, signer_key_files=[str(tmp_path / "a.key")], other_keys=[dup],
                        threshold=1)
    with pytest.raises(NodeError, match="twice"):
        Node.from_config(cfg)


def test_threshold_above_n_is_refused(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    with pytest.raises(ConfigError, match="bridge.threshold"):
        bridge_config(tmp_path, make_cfg, threshold=4)


async def test_cli_pegin_address_and_wrong_network_burn(bridge_client: tuple[Node, TestClient], keys: Any,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio
    import json

    from l2d import cli

    node, client = bridge_client
    api = str(client.make_url("/"))
    account = keys.pubkey(2).hex()
    code = await asyncio.to_thread(cli.main, ["--api", api, "--json", "pegin-address", account])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["verified_locally"] is True and out["address"].startswith("bcrt1q")
    key = tmp_path / "k2.key"
    key.write_text(keys.secret(2).hex())
    before = await _state(client)
    code = await asyncio.to_thread(cli.main, ["--api", api, "burn", "--key", str(key), "--amount", "20000",
                                              "--destination", MAINNET_P2WPKH])
    assert code == 1 and "mainnet address" in capsys.readouterr().err
    assert await _state(client) == before


async def test_an_emergency_path_shows_in_the_federation_the_addresses_and_the_cli_derivation(
        tmp_path: Path, make_cfg: Callable[..., Config], capsys: pytest.CaptureFixture[str]) -> None:
    """[bridge] emergency_keys put the timelocked emergency path into every deposit script: the federation endpoint
    shows it, the deposit address is the one the state derives (its descriptor the miniscript), and l2-cli
    pegin-address re-derives the same address from the endpoint's keys."""
    ekeys = sorted(PrivateKey(bytes([i]) * 32).public_key.format().hex() for i in (7, 8, 9))
    node = Node.from_config(bridge_config(tmp_path, make_cfg, emergency_keys=ekeys, emergency_delay_blocks=144))
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    try:
        f = await (await client.get("/api/bridge/federation")).json()
        assert f["emergency"] == {"threshold": 2, "keys": ekeys, "delay_blocks": 144}  # default threshold: 3 // 2 + 1
        fed = node.federation
        assert fed is not None and fed.emergency_delay == 144
        account = PrivateKey(bytes([5]) * 32).public_key_xonly.format()
        a = await (await client.get(f"/api/bridge/pegin-address/{account.hex()}")).json()
        assert a["address"] == script_address(deposit_script_pubkey(fed, LOCAL.id, account), LOCAL)
        assert a["descriptor"].startswith("wsh(or_i(multi(2,") and "and_v(v:older(144),multi(2," in a["descriptor"]
        code = await asyncio.to_thread(cli_main, ["--json", "--api", str(client.make_url("")).rstrip("/"),
                                                  "pegin-address", account.hex()])
        out = json.loads(capsys.readouterr().out)
        assert code == 0 and out["verified_locally"] is True and out["address"] == a["address"]
    finally:
        await client.close()
        await node.stop()
