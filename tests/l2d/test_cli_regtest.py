"""`l2-cli pegin-claim --txid` against a real regtest bitcoind and an l2d whose bridge follows it: the claim finds the
deposit's height, output and merkle proof in the user's bitcoind itself (through its data dir, as `bitcoin-cli
-datadir`, or its RPC URL and cookie), refuses with what to do below the federation's depth, and mints once."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bridge.rpc import BitcoinRPC
from regtest.harness import BitcoindNode, fund_wallet
from tests.bridge.test_service_regtest import (ALICE, ALICE_ID, MIN_DEPTH, committed, make_config, relayed_to, start,
                                               stop)

pytestmark = pytest.mark.regtest
REPO = Path(__file__).resolve().parents[2]


async def l2_cli(*argv: str) -> tuple[int, Any, str]:
    """l2-cli in its own process (the daemon runs in this test's event loop, which must keep serving)."""
    p = await asyncio.create_subprocess_exec(sys.executable, "-m", "l2d.cli", "--json", *argv, cwd=REPO,
                                             env={**os.environ, "PYTHONPATH": str(REPO)},
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await p.communicate()
    assert p.returncode is not None
    return p.returncode, json.loads(out) if out.strip() else None, err.decode()


async def test_pegin_claim_by_txid_reads_height_output_and_proof_from_bitcoind(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    w, mine_addr = await fund_wallet(rpc, "miner")
    d = await start(make_config(tmp_path / "l2d", bitcoind, anchoring=False))
    try:
        api = str(d.client.make_url("")).rstrip("/")
        key = tmp_path / "alice.key"
        key.write_text(ALICE.hex())
        key.chmod(0o600)
        addr = (await d.get(f"/api/bridge/pegin-address/{ALICE_ID.hex()}"))["address"]
        txid = (await w.sendtoaddress(addr, 50_000_000))[::-1].hex()
        via_datadir = ("--api", api, "pegin-claim", "--key", str(key), "--txid", txid,
                       "--bitcoin-datadir", str(bitcoind.datadir), "--wait", "30")

        # in the mempool, then mined but not deep enough: refused with what to do, nothing sent
        rc, _, err = await l2_cli(*via_datadir)
        assert rc == 1 and "not in a block yet" in err
        await rpc.generatetoaddress(MIN_DEPTH - 1, mine_addr)
        await relayed_to(d, rpc)
        rc, _, err = await l2_cli(*via_datadir)
        assert rc == 1 and f"has {MIN_DEPTH - 1} confirmation(s); the federation needs {MIN_DEPTH}" in err
        assert (await d.get(f"/api/l2/accounts/{ALICE_ID.hex()}"))["balance_sat"] == 0

        # deep enough: height, output and proof found in bitcoind, the claim committed and minted
        await rpc.generatetoaddress(1, mine_addr)  # not waited for: --wait covers the header relay catching up
        info = await rpc.call("getrawtransaction", [txid, True])
        [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == addr]
        height = (await rpc.getblockheader(bytes.fromhex(info["blockhash"])[::-1], True)).height
        rc, res, err = await l2_cli(*via_datadir)
        assert rc == 0, err
        assert (res["status"], res["btc_height"], res["vout"], res["amount_sat"]) == ("committed", height, vout,
                                                                                       50_000_000)
        await committed(d, res["txid"])
        assert (await d.get(f"/api/l2/accounts/{ALICE_ID.hex()}"))["balance_sat"] == 50_000_000 - 1  # less the fee
        [p] = (await d.get("/api/bridge/pegins"))["pegins"]
        assert (p["btc_txid"], p["vout"], p["btc_height"]) == (txid, vout, height)

        # the same deposit through the RPC URL and cookie: bitcoind is read the same way, the ledger refuses it twice
        rc, _, err = await l2_cli("--api", api, "pegin-claim", "--key", str(key), "--txid", txid, "--bitcoin-rpc",
                                  bitcoind.rpc_url, "--bitcoin-cookie", str(bitcoind.cookie_path))
        assert rc == 1 and "claimed" in err.lower(), err

        # a transaction that pays another address: named, nothing sent
        other = (await w.sendtoaddress(await w.getnewaddress(), 1_000_000))[::-1].hex()
        await rpc.generatetoaddress(MIN_DEPTH, mine_addr)
        rc, _, err = await l2_cli("--api", api, "pegin-claim", "--key", str(key), "--txid", other,
                                  "--bitcoin-datadir", str(bitcoind.datadir))
        assert rc == 1 and f"pays nothing to the deposit address of {ALICE_ID.hex()}" in err
    finally:
        await stop(d)
