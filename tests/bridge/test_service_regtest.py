"""Bridge end to end against a real regtest bitcoind (the daemon runs in-process so a crash can be injected).

Peg-in: deposit to the account's tweaked 2-of-3 address -> mined -> headers relayed into the L2 state -> a
claim below the depth is refused -> at depth the claim mints -> the same claim again, and another account's
claim of it, are refused -> a deposit whose block is invalidated (reorged out) cannot be claimed with its proof.
Peg-out: burn to a regtest address -> anchored (FINAL) -> a plan in an L2 block -> signed by the 2 keys this daemon
holds (the third key lives elsewhere), signatures in the L2 state -> broadcast -> mined -> COMPLETED in the L2 state
with the Bitcoin txid; the federation's on-chain holdings (scantxoutset) equal pegged-in minus paid-out. A crash
after signing, before broadcast, then a restart: the signed transaction is broadcast, nothing is paid twice.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer
from bitcoin.core import CTransaction
from coincurve import PrivateKey

from anchoring.service import AnchorService
from bridge.rpc import BitcoinRPC
from bridge.rpc_errors import RPCError
from l2d.config import Config
from l2d.core.anchor_tx import AnchorStatus, AnchorUpdate
from l2d.core.coin_tx import Burn
from l2d.core.params import REGTEST
from l2d.core.pegs import CHANGE_CONTRACT, deposit_script_pubkey
from l2d.core.pegs_tx import AnchorMode, AnchorPlan, PeginClaim, RollPlan
from l2d.core.plans import SUPERSEDE_AFTER
from l2d.core.tx import sign
from l2d.node import Node
from regtest.harness import BitcoindNode, fund_wallet, scan_sat

MIN_DEPTH = 6
ADMIN = {"Authorization": "Bearer bridge-test-admin-token-01"}


def secret(tag: str) -> bytes:
    return hashlib.sha256(b"l2d bridge regtest " + tag.encode()).digest()


ALICE, BOB = secret("alice"), secret("bob")
ALICE_ID = PrivateKey(ALICE).public_key_xonly.format()
SIGNERS = [secret(f"signer {i}") for i in range(3)]


def make_config(tmp: Path, btc: BitcoindNode, rbf_after_blocks: int = 50, anchoring: bool = True,
                pegout_confirmations: int = 1, emergency_delay: int = 1000, roll_margin: int = 144) -> Config:
    tmp.mkdir(parents=True, exist_ok=True)
    files = []
    for i, s in enumerate(SIGNERS[:2]):
        f = tmp / f"key{i}"
        f.write_text(s.hex())
        f.chmod(0o600)
        files.append(str(f))
    d = {
        "node": {"network": "regtest", "data_dir": str(tmp / "data"), "log_level": "DEBUG"},
        "chain": {"min_fee_sat": 1, "mint_authority_key_file": str(tmp / "mint.key")},
        "block": {"interval_ms": 50},
        "api": {"host": "127.0.0.1", "port": 0, "admin_token": "bridge-test-admin-token-01"},
        "snapshots": {"every_blocks": 0},
        "anchoring": {"enabled": anchoring, "mode": "taproot", "every_blocks": 2, "confirmations": 1,
                      "final_confirmations": 2, "poll_interval_ms": 100},
        "bitcoind": {"rpc_url": btc.rpc_url, "cookie_file": str(btc.cookie_path),
                     "zmq_hashblock": btc.zmq_endpoint, "zmq_sequence": btc.zmq_endpoint},
        "bridge": {"enabled": True, "threshold": 2, "signer_key_files": files,
                   "other_keys": [PrivateKey(SIGNERS[2]).public_key.format().hex()],
                   # deposits and change carry the emergency path: the plans spend the federation's branch of it
                   "emergency_keys": [PrivateKey(secret(f"emergency {i}")).public_key.format().hex()
                                      for i in range(2)],
                   "emergency_threshold": 2, "emergency_delay_blocks": emergency_delay,
                   "roll_margin_blocks": roll_margin,
                   "pegin_min_depth": MIN_DEPTH, "pegout_confirmations": pegout_confirmations,
                   "rbf_after_blocks": rbf_after_blocks,
                   "poll_interval_ms": 100},
    }
    return Config.from_dict(d, tmp, env={})


class Daemon:
    def __init__(self, node: Node, client: TestClient) -> None:
        self.node, self.client = node, client

    async def get(self, path: str) -> Any:
        resp = await self.client.get(path)
        assert resp.status == 200, (path, await resp.text())
        return await resp.json()

    async def submit(self, raw: bytes) -> tuple[int, Any]:
        resp = await self.client.post("/api/l2/tx", json={"tx": raw.hex()})
        return resp.status, await resp.json()

    async def nonce(self, secret_: bytes) -> int:
        return int((await self.get(f"/api/l2/accounts/{PrivateKey(secret_).public_key_xonly.format().hex()}"))["nonce"])


async def start(cfg: Config) -> Daemon:
    node = Node.from_config(cfg)
    await node.start(serve_http=False)
    client = TestClient(TestServer(node.web_app()))
    await client.start_server()
    return Daemon(node, client)


async def stop(d: Daemon) -> None:
    await d.client.close()
    await d.node.stop()


async def until(cond: Callable[[], Awaitable[Any]], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = await cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def relayed_to(d: Daemon, rpc: BitcoinRPC) -> None:
    height = await rpc.getblockcount()

    async def done() -> bool:
        tip = (await d.get("/api/bridge/federation"))["btc_tip"]
        return tip is not None and tip["height"] == height and tip["hash"] == (await rpc.getblockhash(height))[::-1].hex()
    await until(done, f"headers relayed to height {height}")


async def committed(d: Daemon, txid: str) -> None:
    async def done() -> bool:
        return (await d.get(f"/api/l2/tx/{txid}"))["status"] == "committed"
    await until(done, f"tx {txid} committed")


async def claim(d: Daemon, rpc: BitcoinRPC, who: bytes, txid: bytes, vout: int, fee: int = 1) -> tuple[int, Any]:
    info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
    block = bytes.fromhex(info["blockhash"])[::-1]
    height = (await rpc.getblockheader(block, True)).height
    raw = await rpc.getrawtransaction(txid)
    proof = await rpc.gettxoutproof([txid], block)
    tx = sign(REGTEST, who, await d.nonce(who), fee, PeginClaim(height, vout, raw, proof), b"\0" * 32)
    return await d.submit(tx.raw)


async def deposit(d: Daemon, rpc: BitcoinRPC, w: BitcoinRPC, account: bytes, amount: int) -> tuple[bytes, int]:
    addr = (await d.get(f"/api/bridge/pegin-address/{account.hex()}"))["address"]
    txid = await w.sendtoaddress(addr, amount)
    info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
    [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == addr]
    return txid, vout


async def holdings_on_chain(rpc: BitcoinRPC, d: Daemon) -> int:
    fed = d.node.federation
    assert fed is not None
    spks = [deposit_script_pubkey(fed, REGTEST.id, c) for c in (ALICE_ID, CHANGE_CONTRACT)]
    return await scan_sat(rpc, [f"raw({s.hex()})" for s in spks])


@pytest.fixture
async def setup(tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC,
                request: pytest.FixtureRequest) -> AsyncIterator[tuple[Config, BitcoinRPC, str, Daemon]]:
    w, mine_addr = await fund_wallet(rpc, "miner")
    cfg = make_config(tmp_path / "l2d", bitcoind, getattr(request, "param", 50))
    d = await start(cfg)
    try:
        await fund_federation(d, rpc, w, mine_addr)  # the anchors' fees
        yield cfg, w, mine_addr, d
    finally:
        if not d.node.stopping:
            await stop(d)


async def fund_federation(d: Daemon, rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str, amount: int = 1_000_000
                          ) -> tuple[bytes, int]:
    """Pay the federation's funding address, mine it MIN_DEPTH deep and record it (l2-cli federation-fund's admin
    endpoint, with its SPV proof): the coin anchors are paid from. Returns its outpoint (txid internal order)."""
    fund_addr = (await d.get("/api/bridge/federation"))["funding_address"]
    txid = await w.sendtoaddress(fund_addr, amount)
    [block] = await rpc.generatetoaddress(1, mine_addr)
    await rpc.generatetoaddress(MIN_DEPTH - 1, mine_addr)
    await relayed_to(d, rpc)
    info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
    [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == fund_addr]
    resp = await d.client.post("/api/admin/bridge/fund", headers=ADMIN, json={
        "btc_height": (await rpc.getblockheader(block, True)).height, "vout": vout,
        "tx": (await rpc.getrawtransaction(txid)).hex(), "proof": (await rpc.gettxoutproof([txid], block)).hex()})
    assert resp.status == 202, await resp.text()
    await committed(d, (await resp.json())["txid"])
    return txid, vout


async def test_a_bridge_without_anchoring_follows_the_configured_bitcoind(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, caplog: pytest.LogCaptureFixture) -> None:
    """The one bitcoind client of [bitcoind] reaches the bridge service even with anchoring off (it used to be
    built only with the anchor service: such a node warned "no bitcoind configured" and relayed nothing)."""
    _, mine_addr = await fund_wallet(rpc, "miner")
    await rpc.generatetoaddress(3, mine_addr)
    d = await start(make_config(tmp_path / "l2d", bitcoind, anchoring=False))
    try:
        assert d.node.anchor_service is None and d.node.bridge_service is not None
        await relayed_to(d, rpc)
        assert not [r for r in caplog.records if "no bitcoind configured" in r.getMessage()]
    finally:
        await stop(d)


async def test_pegin_claims(setup: tuple[Config, BitcoinRPC, str, Daemon], rpc: BitcoinRPC) -> None:
    cfg, w, mine_addr, d = setup
    txid, vout = await deposit(d, rpc, w, ALICE_ID, 100_000_000)
    await rpc.generatetoaddress(1, mine_addr)
    await relayed_to(d, rpc)
    status, body = await claim(d, rpc, ALICE, txid, vout)
    assert status == 400 and body["error"] == "pegin-too-shallow", body
    await rpc.generatetoaddress(MIN_DEPTH - 1, mine_addr)
    await relayed_to(d, rpc)
    status, body = await claim(d, rpc, ALICE, txid, vout)
    assert status == 202, body
    await committed(d, body["txid"])
    acc = await d.get(f"/api/l2/accounts/{ALICE_ID.hex()}")
    assert acc["balance_sat"] == 100_000_000 - 1 and acc["nonce"] == 1
    [p] = (await d.get("/api/bridge/pegins"))["pegins"]
    assert p == {"btc_txid": txid[::-1].hex(), "vout": vout, "amount_sat": 100_000_000, "btc_height": p["btc_height"],
                 "recipient": ALICE_ID.hex()}
    before = (await d.get("/api/l2/state"))["state_root"]
    status, body = await claim(d, rpc, ALICE, txid, vout)  # the same deposit again
    assert status == 400 and body["error"] == "already-claimed", body
    status, body = await claim(d, rpc, BOB, txid, vout)  # someone else's deposit
    assert status == 400 and body["error"] == "wrong-deposit-address", body
    assert (await d.get("/api/l2/state"))["state_root"] == before

    # a deposit whose block is invalidated: its proof names a block the relayed chain no longer has
    txid2, vout2 = await deposit(d, rpc, w, ALICE_ID, 20_000_000)
    [b2] = await rpc.generatetoaddress(1, mine_addr)
    await rpc.generatetoaddress(MIN_DEPTH, mine_addr)
    await relayed_to(d, rpc)
    h2 = (await rpc.getblockheader(b2, True)).height
    raw2, proof2 = await rpc.getrawtransaction(txid2), await rpc.gettxoutproof([txid2], b2)
    await rpc.invalidateblock(b2)
    # a longer branch without block b2 (another address: the same template again would be b2 itself)
    await rpc.generatetoaddress(MIN_DEPTH + 2, await w.getnewaddress())
    await relayed_to(d, rpc)
    fed_tip = (await d.get("/api/bridge/federation"))["btc_tip"]
    assert fed_tip["hash"] != b2[::-1].hex()
    tx = sign(REGTEST, ALICE, await d.nonce(ALICE), 1, PeginClaim(h2, vout2, raw2, proof2), b"\0" * 32)
    status, body = await d.submit(tx.raw)
    assert status == 400 and body["error"] == "unknown-btc-block", body
    f = await d.get("/api/bridge/federation")
    assert f["pegged_in_sat"] == 100_000_000

    # the auditor's copy of the header chain: exported over REST, checked offline by l2-verify headers
    resp = await d.client.get("/api/bridge/headers?from=100")
    assert resp.status == 200
    path = Path(cfg.node.data_dir).parent / "btc.headers"
    path.write_bytes(await resp.read())
    tip = await rpc.getblockcount()
    out = subprocess.run([sys.executable, "-m", "verify_tool.cli", "headers", str(path), "--json", "--checkpoint",
                          f"100:{(await rpc.getblockhash(100))[::-1].hex()}"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["tip_height"] == tip
    resp = await d.client.get(f"/api/bridge/headers?from={tip + 5}")
    assert resp.status == 400 and (await resp.json())["error"] == "bad-range"


async def funded(d: Daemon, rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str) -> None:
    """Alice deposits and claims 1 BTC."""
    txid, vout = await deposit(d, rpc, w, ALICE_ID, 100_000_000)
    await rpc.generatetoaddress(MIN_DEPTH, mine_addr)
    await relayed_to(d, rpc)
    status, body = await claim(d, rpc, ALICE, txid, vout)
    assert status == 202, body
    await committed(d, body["txid"])


async def pegout(d: Daemon, w: BitcoinRPC, amount: int, dest: str = "") -> tuple[str, str]:
    dest = dest or await w.getnewaddress()
    tx = sign(REGTEST, ALICE, await d.nonce(ALICE), 1, Burn(amount, dest.encode()), b"\0" * 32)
    status, body = await d.submit(tx.raw)
    assert status == 202, body
    await committed(d, body["txid"])
    return body["txid"], dest


async def mine_until(d: Daemon, rpc: BitcoinRPC, mine_addr: str, pid: str, status: str,
                     before_mining: Callable[[], Awaitable[None]] | None = None) -> dict[str, Any]:
    async def done() -> Any:
        [p] = [p for p in (await d.get("/api/bridge/pegouts"))["pegouts"] if p["id"] == pid]
        if p["status"] == status:
            return p
        if before_mining is not None:
            await before_mining()
        await rpc.generatetoaddress(1, mine_addr)
        await asyncio.sleep(0.3)
        return None
    return await until(done, f"peg-out {pid} {status}", timeout=90)


async def test_pegout_completes_and_survives_a_crash_before_broadcast(
        setup: tuple[Config, BitcoinRPC, str, Daemon], rpc: BitcoinRPC) -> None:
    cfg, w, mine_addr, d = setup
    await funded(d, rpc, w, mine_addr)

    pid, dest = await pegout(d, w, 30_000_000)
    p = await mine_until(d, rpc, mine_addr, pid, "COMPLETED")
    info = await rpc.call("getrawtransaction", [p["btc_txid"], True])
    assert info["confirmations"] >= 1
    paid = [round(o["value"] * 100_000_000) for o in info["vout"] if o["scriptPubKey"].get("address") == dest]
    assert len(paid) == 1 and 27_000_000 <= paid[0] < 30_000_000  # amount less its share of the fee
    # the API names the exact figure the Bitcoin output paid, from the plan recorded in the state
    assert (p["paid_sat"], p["fee_share_sat"]) == (paid[0], 30_000_000 - paid[0])
    [plan] = [x for x in (await d.get("/api/bridge/plans"))["plans"] if x["id"] == p["btc_txid"]]
    assert p["fee_share_sat"] <= plan["fee_sat"]
    witness = info["vin"][0]["txinwitness"]
    # "", 2 signatures (2-of-3 with the third key elsewhere), 01 (OP_IF: the federation's path), the script
    assert len(witness) == 5 and witness[0] == "" and witness[3] == "01"
    f = await d.get("/api/bridge/federation")
    assert f["paid_out_sat"] == 30_000_000 and f["pending_pegouts_sat"] == 0
    assert f["holdings_sat"] == await holdings_on_chain(rpc, d) == 100_000_000 - 30_000_000
    assert f["invariant_ok"] is True

    # crash after the plan is signed (signatures in the L2 state), before it is broadcast
    svc = d.node.bridge_service
    assert svc is not None

    dest2 = await w.getnewaddress()
    dest2_spk = bytes.fromhex((await w.call("getaddressinfo", [dest2]))["scriptPubKey"])
    broadcast = svc._broadcast

    async def crash(raw: bytes) -> bool:  # the payout only: the bridge broadcasts the anchors too
        if any(o.scriptPubKey == dest2_spk for o in CTransaction.deserialize(raw).vout):
            raise RuntimeError("injected crash before broadcast")
        return await broadcast(raw)
    svc._broadcast = crash  # type: ignore[method-assign]
    pid2, _ = await pegout(d, w, 10_000_000, dest2)

    async def signed() -> Any:
        await rpc.generatetoaddress(1, mine_addr)  # confirms the anchor covering the burn
        await asyncio.sleep(0.3)
        for plan in (await d.get("/api/bridge/plans"))["plans"]:
            if pid2 in [p["id"] for p in plan["pegouts"]] and plan["signed_tx"]:
                return plan
        return None
    saved = await until(signed, "second plan signed", timeout=90)
    assert len(saved["signed_by"]) == 2 and saved["status"] == "PLANNED"
    await stop(d)
    mempool = await rpc.call("getrawmempool")
    assert saved["id"] not in mempool  # never broadcast
    d = await start(cfg)
    try:
        p2 = await mine_until(d, rpc, mine_addr, pid2, "COMPLETED")
        assert p2["btc_txid"] == saved["id"]  # the signed transaction, not a new one
        info = await rpc.call("getrawtransaction", [saved["id"], True])
        assert info["hex"] == saved["signed_tx"]
        for rec in (Path(cfg.node.data_dir) / "bridge").glob("signer-*.json"):
            assert list(json.loads(rec.read_text())[pid2]) == [saved["id"]]  # each signer signed one tx
        [plan] = [p for p in (await d.get("/api/bridge/plans"))["plans"] if p["id"] == saved["id"]]
        assert plan["status"] == "COMPLETED"
        f = await d.get("/api/bridge/federation")
        assert f["holdings_sat"] == await holdings_on_chain(rpc, d) == 100_000_000 - 40_000_000
        assert f["invariant_ok"] is True
    finally:
        await stop(d)


async def test_a_mined_payout_not_yet_completed_keeps_the_breaker_closed(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    """Between a payout being mined and its COMPLETED record (pegout_confirmations = 3 deep), its input is gone from
    the UTXO set: the breaker sees that a version of the coin's plan is mined and stays closed."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    d = await start(make_config(tmp_path / "l2d", bitcoind, pegout_confirmations=3))
    try:
        svc = d.node.bridge_service
        assert svc is not None
        await fund_federation(d, rpc, w, mine_addr)
        await funded(d, rpc, w, mine_addr)
        pid, _ = await pegout(d, w, 30_000_000)
        p = await mine_until(d, rpc, mine_addr, pid, "BROADCAST")
        while (await rpc.call("getrawtransaction", [p["btc_txid"], True])).get("confirmations", 0) < 1:
            await rpc.generatetoaddress(1, mine_addr)
        [p] = [x for x in (await d.get("/api/bridge/pegouts"))["pegouts"] if x["id"] == pid]
        assert p["status"] == "BROADCAST"  # mined once, 3 needed
        [coin] = [c for c in (await d.get("/api/bridge/coins"))["coins"] if c["kind"] == "DEPOSIT"]
        assert coin["spent_by"] == p["btc_txid"] and await rpc.call("gettxout", [coin["txid"], coin["vout"]]) is None
        assert await svc.audit() is None
        await mine_until(d, rpc, mine_addr, pid, "COMPLETED")
        assert await svc.audit() is None and svc.halted is None
    finally:
        await stop(d)


@pytest.mark.parametrize("setup", [2], indirect=True)  # replace a payout unconfirmed for 2 blocks
async def test_stuck_pegout_is_replaced_by_fee(setup: tuple[Config, BitcoinRPC, str, Daemon], rpc: BitcoinRPC) -> None:
    """The first payout is kept out of blocks (prioritisetransaction with a large negative delta, as if its fee were
    too low); after rbf_after_blocks the federation replaces it with a higher fee rate, spending the same coins;
    the replacement confirms and the peg-out is COMPLETED with its txid; the payee is paid once."""
    cfg, w, mine_addr, d = setup
    await funded(d, rpc, w, mine_addr)
    pid, dest = await pegout(d, w, 30_000_000)
    first: list[str] = []
    first_inputs: set[tuple[str, int]] = set()

    async def starve_first() -> None:
        for p in (await d.get("/api/bridge/pegouts"))["pegouts"]:
            if p["id"] == pid and p["btc_txid"] and not first and p["btc_txid"] in await rpc.call("getrawmempool"):
                first.append(p["btc_txid"])
                vin = (await rpc.call("getrawtransaction", [p["btc_txid"], True]))["vin"]
                first_inputs.update((i["txid"], i["vout"]) for i in vin)
                await rpc.call("prioritisetransaction", [p["btc_txid"], 0, -10_000_000])
    p = await mine_until(d, rpc, mine_addr, pid, "COMPLETED", before_mining=starve_first)
    assert first and p["btc_txid"] != first[0]
    assert first[0] not in await rpc.call("getrawmempool")
    with pytest.raises(RPCError):  # evicted by the replacement and never mined (txindex knows every mined tx)
        await rpc.call("getrawtransaction", [first[0], True])
    info = await rpc.call("getrawtransaction", [p["btc_txid"], True])
    assert {(i["txid"], i["vout"]) for i in info["vin"]} == first_inputs  # the same federation coins
    paid = [o for o in info["vout"] if o["scriptPubKey"].get("address") == dest]
    assert len(paid) == 1
    assert await scan_sat(rpc, [f"addr({dest})"]) == round(paid[0]["value"] * 100_000_000)  # one payment, not two
    f = await d.get("/api/bridge/federation")
    assert f["invariant_ok"] is True and f["holdings_sat"] == await holdings_on_chain(rpc, d)


async def test_the_circuit_breaker_signs_nothing_while_a_coin_of_the_books_is_off_chain(
        setup: tuple[Config, BitcoinRPC, str, Daemon], rpc: BitcoinRPC, caplog: pytest.LogCaptureFixture) -> None:
    """A deep reorg takes Alice's claimed deposit off the chain (it waits in the mempool, kept out of blocks by a
    large negative priority): the federation's books hold a coin its bitcoind does not. A peg-out request then gets
    no plan and no signature, and the node says why on REST, metrics and the log; once the deposit is mined again
    the breaker resets by itself and the peg-out is paid."""
    cfg, w, mine_addr, d = setup
    svc = d.node.bridge_service
    assert svc is not None
    txid, vout = await deposit(d, rpc, w, ALICE_ID, 100_000_000)
    [block] = await rpc.generatetoaddress(1, mine_addr)
    await rpc.generatetoaddress(MIN_DEPTH - 1, mine_addr)
    await relayed_to(d, rpc)
    status, body = await claim(d, rpc, ALICE, txid, vout)
    assert status == 202, body
    await committed(d, body["txid"])
    assert await svc.audit() is None

    await rpc.invalidateblock(block)
    await rpc.call("prioritisetransaction", [txid[::-1].hex(), 0, -100_000_000])
    await rpc.generatetoaddress(MIN_DEPTH + 1, await w.getnewaddress())  # a longer branch without the deposit
    why = await svc.audit()
    assert why is not None and f"{txid[::-1].hex()}:{vout}" in why and "not in my bitcoind's UTXO set" in why

    pid, _ = await pegout(d, w, 30_000_000)
    height = (await d.get(f"/api/l2/tx/{pid}"))["height"]

    async def held_back() -> bool:  # the burn is anchored, so only the breaker stops a plan
        if svc.halted is not None and (svc.final_anchor_height() or -1) >= height:
            return True
        await rpc.generatetoaddress(1, mine_addr)
        await asyncio.sleep(0.3)
        return False
    await until(held_back, "an anchor covering the burn while the breaker is open", timeout=90)
    await svc.step()  # one more full step with everything in place: still nothing planned
    assert not [p for p in svc.plans().values() if p.pegouts] and svc.halted is not None  # anchors go on
    [p] = [p for p in (await d.get("/api/bridge/pegouts"))["pegouts"] if p["id"] == pid]
    assert p["status"] == "PENDING" and p["btc_txid"] is None
    f = await d.get("/api/bridge/federation")
    assert f["halted"] == svc.halted and "not in my bitcoind's UTXO set" in f["halted"]
    metrics = await (await d.client.get("/metrics")).text()
    assert "l2d_bridge_halted 1" in metrics
    assert any("circuit breaker tripped" in r.getMessage() for r in caplog.records)

    await rpc.call("prioritisetransaction", [txid[::-1].hex(), 0, 100_000_000])  # mined again: the books match
    p = await mine_until(d, rpc, mine_addr, pid, "COMPLETED")
    assert svc.halted is None and (await d.get("/api/bridge/federation"))["halted"] is None
    assert "l2d_bridge_halted 0" in await (await d.client.get("/metrics")).text()
    assert any("circuit breaker reset" in r.getMessage() for r in caplog.records)
    f = await d.get("/api/bridge/federation")
    assert f["invariant_ok"] is True and f["holdings_sat"] == await holdings_on_chain(rpc, d) == 70_000_000


async def rolling_daemon(tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, emergency_delay: int = 30,
                         anchoring: bool = False
                         ) -> tuple[Daemon, BitcoinRPC, str, int, tuple[bytes, int], tuple[bytes, int]]:
    """A daemon whose federation has a 30-block (emergency_delay) emergency delay and rolls 10 blocks before it,
    anchoring off unless asked; Alice's claimed 1 BTC deposit and a recorded 0.01 BTC funding coin, mined in one block at
    `height`. Returns (daemon, wallet, mining address, height, deposit outpoint, funding outpoint), txids internal."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    d = await start(make_config(tmp_path / "l2d", bitcoind, anchoring=anchoring, emergency_delay=emergency_delay,
                                roll_margin=10))
    txid, vout = await deposit(d, rpc, w, ALICE_ID, 100_000_000)
    fund_addr = (await d.get("/api/bridge/federation"))["funding_address"]
    fund_txid = await w.sendtoaddress(fund_addr, 1_000_000)
    [block] = await rpc.generatetoaddress(1, mine_addr)
    height = (await rpc.getblockheader(block, True)).height
    await rpc.generatetoaddress(MIN_DEPTH - 1, mine_addr)
    await relayed_to(d, rpc)
    status, body = await claim(d, rpc, ALICE, txid, vout)
    assert status == 202, body
    await committed(d, body["txid"])
    info = await rpc.call("getrawtransaction", [fund_txid[::-1].hex(), True])
    [fund_vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == fund_addr]
    resp = await d.client.post("/api/admin/bridge/fund", headers=ADMIN, json={
        "btc_height": height, "vout": fund_vout, "tx": (await rpc.getrawtransaction(fund_txid)).hex(),
        "proof": (await rpc.gettxoutproof([fund_txid], block)).hex()})
    assert resp.status == 202, await resp.text()
    await committed(d, (await resp.json())["txid"])
    return d, w, mine_addr, height, (txid, vout), (fund_txid, fund_vout)


async def roll_completes(d: Daemon, rpc: BitcoinRPC, mine_addr: str, height: int, inputs: set[tuple[str, int]]
                         ) -> dict[str, Any]:
    """The roll of `inputs` (display txids) is signed by both keys, broadcast, mined before the coins are 30 blocks
    old and COMPLETED; the deposit's value is then one CHANGE coin, the funding rest a FUNDING coin, and the books
    equal what bitcoind holds."""
    async def rolled() -> Any:
        plans = (await d.get("/api/bridge/plans"))["plans"]
        return plans[0] if plans and plans[0]["signed_tx"] else None
    roll = await until(rolled, "the roll signed by both keys")
    assert roll["kind"] == "roll" and roll["pegouts"] == [] and len(roll["signed_by"]) == 2
    assert {(i["txid"], i["vout"]) for i in roll["inputs"]} == inputs
    assert roll["change_sat"] == 100_000_000

    async def in_mempool() -> bool:
        return roll["id"] in await rpc.call("getrawmempool")
    await until(in_mempool, "the roll broadcast")
    [mined] = await rpc.generatetoaddress(1, mine_addr)
    assert (await rpc.getblockheader(mined, True)).height < height + 30  # before the emergency keys could spend

    async def completed() -> Any:
        [p] = [p for p in (await d.get("/api/bridge/plans"))["plans"] if p["id"] == roll["id"]]
        return p["status"] == "COMPLETED"
    await until(completed, "the roll COMPLETED")
    coins = {(c["txid"], c["vout"]): c for c in (await d.get("/api/bridge/coins"))["coins"]}
    assert all(coins[i]["spent_by"] == roll["id"] for i in inputs)
    assert coins[(roll["id"], 0)]["kind"] == "CHANGE" and coins[(roll["id"], 0)]["amount_sat"] == 100_000_000
    assert coins[(roll["id"], 1)] == {**coins[(roll["id"], 1)], "kind": "FUNDING",
                                      "amount_sat": 1_000_000 - roll["fee_sat"], "spent_by": None}
    f = await d.get("/api/bridge/federation")
    assert f["holdings_sat"] == await holdings_on_chain(rpc, d) == 100_000_000 == f["pegged_in_sat"]
    assert f["invariant_ok"] is True and f["halted"] is None
    return roll


async def test_coins_nearing_the_emergency_timelock_are_rolled_before_the_emergency_keys_could_spend_them(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    """The deposit and the funding coin are due at 20 confirmations, not at 19; the daemon proposes their roll, its
    two keys sign it, it is mined before the coins are 30 blocks old and completed; the fresh coins are not due."""
    d, w, mine_addr, height, dep, fund = await rolling_daemon(tmp_path, bitcoind, rpc)
    try:
        svc = d.node.bridge_service
        assert svc is not None and svc.roll_at == 20
        await rpc.generatetoaddress(height + 18 - await rpc.getblockcount(), mine_addr)  # 19 confirmations
        await relayed_to(d, rpc)
        assert [await svc._due(c, fresh=True) for c in svc.fed_coins()] == [False, False]
        await svc._roll()  # the duty itself, at 19 confirmations: it proposes nothing
        assert not [k for k in svc._submitted if k[0] == "roll"]
        assert (await d.get("/api/bridge/plans"))["plans"] == []
        await rpc.generatetoaddress(1, mine_addr)
        assert [await svc._due(c, fresh=True) for c in svc.fed_coins()] == [True, True]
        roll = await roll_completes(d, rpc, mine_addr, height, {(t[::-1].hex(), v) for t, v in (dep, fund)})
        fresh = [c for c in svc.fed_coins() if c.spent_by == bytes(32)]
        assert {(c.btc_txid[::-1].hex(), c.vout) for c in fresh} == {(roll["id"], 0), (roll["id"], 1)}
        assert [await svc._due(c, fresh=True) for c in fresh] == [False, False]  # a new timelock starts
    finally:
        await stop(d)


async def test_a_roll_proposed_early_is_signed_only_once_its_coins_are_due(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, caplog: pytest.LogCaptureFixture) -> None:
    """A member proposes a roll of the deposit at 6 confirmations: consensus records it (which coins are due is
    each signer's judgement), but the signers refuse while their bitcoind does not see the deposit 20 blocks deep,
    and sign the same roll once it is."""
    d, w, mine_addr, height, dep, fund = await rolling_daemon(tmp_path, bitcoind, rpc)
    try:
        early = RollPlan(2, bytes(32), (dep, fund))
        d.node.admission.submit_as_member(early)

        async def refused() -> Any:
            plans = (await d.get("/api/bridge/plans"))["plans"]
            warned = any("is not due for a roll in my bitcoind" in r.getMessage() for r in caplog.records)
            return plans if plans and plans[0]["final"] and warned else None
        [plan] = await until(refused, "the early roll refused")
        assert plan["signed_by"] == [] and plan["status"] == "PLANNED"
        await rpc.generatetoaddress(height + 19 - await rpc.getblockcount(), mine_addr)  # 20 confirmations
        roll = await roll_completes(d, rpc, mine_addr, height, {(t[::-1].hex(), v) for t, v in (dep, fund)})
        assert roll["id"] == plan["id"] and roll["feerate_sat_vb"] == 2  # the early plan itself, signed now
    finally:
        await stop(d)


async def test_the_members_keys_sign_an_anchor_plan_whose_root_is_their_blocks_and_the_final_update_completes_it(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, caplog: pytest.LogCaptureFixture) -> None:
    """An AnchorPlan with a wrong root is refused by the signers; one committing this daemon's own block root at
    that height is signed by its two keys (BIP143 for the funding coin), broadcast and mined; the FINAL update
    completes it, and the anchor output is the federation's next anchor coin. (The emergency delay is long here: no
    roll takes the funding coin.)"""
    d, w, mine_addr, height, dep, fund = await rolling_daemon(tmp_path, bitcoind, rpc, emergency_delay=1000)
    try:
        at = d.node.chain.final.height
        wrong = AnchorPlan(at, AnchorMode.TAPROOT, b"\x66" * 32, bytes(32), 2, bytes(32), (fund,))
        d.node.admission.submit_as_member(wrong)

        async def refused() -> Any:
            return any("bridge: not signing anchor plan" in r.getMessage() for r in caplog.records)
        await until(refused, "the wrong-root anchor plan refused")
        [bad] = (await d.get("/api/bridge/plans"))["plans"]
        assert bad["signed_by"] == [] and bad["kind"] == "anchor"
        # superseded (no version of it has m signatures) once SUPERSEDE_AFTER blocks old, by a version of a higher
        # height spending the same coin
        async def later() -> Any:  # L2 blocks come with transactions: each Bitcoin block brings a header relay
            if d.node.chain.final.height >= bad["l2_height"] + SUPERSEDE_AFTER + 1:
                return True
            await rpc.generatetoaddress(1, mine_addr)
            await asyncio.sleep(0.2)
            return None
        await until(later, "the bad plan stale")
        at = d.node.chain.final.height
        header = d.node._header_at(at)
        assert header is not None
        d.node.admission.submit_as_member(AnchorPlan(at, AnchorMode.TAPROOT, header.state_root, bytes(32), 2,
                                                     bytes.fromhex(bad["id"])[::-1], (fund,)))

        async def signed() -> Any:
            plans = [p for p in (await d.get("/api/bridge/plans"))["plans"] if p["l2_height"] and p["kind"] == "anchor"
                     and p["status"] == "PLANNED"]
            return plans[0] if plans and plans[0]["signed_tx"] else None
        plan = await until(signed, "the anchor plan signed by both keys")
        assert len(plan["signed_by"]) == 2 and plan["anchor_height"] == at

        async def in_mempool() -> bool:
            return plan["id"] in await rpc.call("getrawmempool")
        await until(in_mempool, "the anchor broadcast")
        [block] = await rpc.generatetoaddress(1, mine_addr)
        await rpc.generatetoaddress(2, mine_addr)
        btc_height = (await rpc.getblockheader(block, True)).height
        d.node.admission.submit_as_member(AnchorUpdate(at, header.state_root, bytes.fromhex(plan["id"])[::-1],
                                                       block, btc_height, AnchorStatus.FINAL))

        async def completed() -> Any:
            [p] = [p for p in (await d.get("/api/bridge/plans"))["plans"] if p["id"] == plan["id"]]
            return p["status"] == "COMPLETED"
        await until(completed, "the anchor plan COMPLETED")
        coins = {(c["txid"], c["vout"]): c for c in (await d.get("/api/bridge/coins"))["coins"]}
        anchor_coin = coins[(plan["id"], 0)]
        assert anchor_coin["kind"] == "ANCHOR" and anchor_coin["amount_sat"] == 1_000_000 - plan["fee_sat"]
        out = await rpc.call("gettxout", [plan["id"], 0])
        assert out["scriptPubKey"]["address"] == anchor_coin["address"]
        f = await d.get("/api/bridge/federation")
        assert f["holdings_sat"] == await holdings_on_chain(rpc, d) == 100_000_000 and f["invariant_ok"] is True
    finally:
        await stop(d)


async def test_anchors_signed_by_the_federation_chain_through_their_k_of_n_outputs(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    """The anchor service proposes each anchor as a plan paid by the funding coin,
    the daemon's two keys of the 2-of-3 sign it (no anchor key), it is mined, CONFIRMED and FINAL, and the FINAL update
    completes the plan; the next anchor spends the previous one's k-of-n output; the audit bundle (k-of-n kind)
    verifies with l2-verify."""
    d, w, mine_addr, height, dep, fund = await rolling_daemon(tmp_path, bitcoind, rpc, emergency_delay=1000,
                                                              anchoring=True)
    try:

        async def two_final() -> Any:
            await rpc.generatetoaddress(1, mine_addr)
            await asyncio.sleep(0.3)
            done = [p for p in (await d.get("/api/bridge/plans"))["plans"]
                    if p["kind"] == "anchor" and p["status"] == "COMPLETED"]
            return done if len(done) >= 2 else None
        done = sorted(await until(two_final, "two anchor plans completed", timeout=120), key=lambda p: p["l2_height"])
        first, second = done[0], done[1]
        assert len(first["signed_by"]) == 2 and first["inputs"][0]["kind"] == "FUNDING"
        assert {"txid": first["id"], "vout": 0} in [{"txid": i["txid"], "vout": i["vout"]} for i in second["inputs"]]
        anchors = {a["l2_height"]: a for a in (await d.get("/api/anchors"))["anchors"]}
        assert anchors[first["anchor_height"]]["txid"] == first["id"]
        assert anchors[first["anchor_height"]]["status"] == "FINAL"
        tx = await rpc.call("getrawtransaction", [second["id"], True])
        witness = tx["vin"][0]["txinwitness"]  # the previous anchor output, spent by the 2-of-3 leaf
        assert sorted(len(x) // 2 for x in witness[:3]) == [0, 65, 65]
        bundle = tmp_path / "audit.bin"
        resp = await d.client.get(f"/api/anchors/{first['anchor_height']}/audit")
        assert resp.status == 200, await resp.text()
        bundle.write_bytes(await resp.read())
        out = subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(bundle), "--min-conf", "1",
                              "--json"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        f = await d.get("/api/bridge/federation")
        assert f["holdings_sat"] == await holdings_on_chain(rpc, d) == 100_000_000 and f["invariant_ok"] is True
    finally:
        await stop(d)


async def test_an_anchor_plan_the_members_refuse_is_superseded_by_the_anchor_service(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another member's anchor plan commits a root that is not this daemon's block's: its keys refuse it, and once
    SUPERSEDE_AFTER L2 blocks pass without m signatures the anchor service posts a version spending the same coin
    for a newer height with its own root, which is signed, mined and completed; the refused one never is."""
    own_propose = AnchorService._propose

    async def held(self: AnchorService, a: Any) -> None:
        return None
    # the other member's plan comes first: this daemon's own first proposal is held back until it is in
    monkeypatch.setattr(AnchorService, "_propose", held)
    d, w, mine_addr, height, dep, fund = await rolling_daemon(tmp_path, bitcoind, rpc, emergency_delay=1000,
                                                              anchoring=True)
    svc = d.node.anchor_service
    assert svc is not None
    try:
        at = d.node.chain.final.height
        d.node.admission.submit_as_member(AnchorPlan(at, AnchorMode.TAPROOT, b"\x66" * 32, bytes(32), 2, bytes(32),
                                                     (fund,)))

        async def recorded() -> Any:
            plans = (await d.get("/api/bridge/plans"))["plans"]
            return plans[0] if plans else None
        bad = await until(recorded, "the wrong-root plan recorded")
        monkeypatch.setattr(AnchorService, "_propose", own_propose)

        async def completed() -> Any:
            await rpc.generatetoaddress(1, mine_addr)  # each block's header relay is an L2 block
            await asyncio.sleep(0.3)
            done = [p for p in (await d.get("/api/bridge/plans"))["plans"]
                    if p["kind"] == "anchor" and p["status"] == "COMPLETED"]
            return done[0] if done else None
        good = await until(completed, "an anchor plan completed", timeout=120)
        assert good["replaces"] == bad["id"] and good["anchor_height"] > bad["anchor_height"]
        assert good["inputs"] == bad["inputs"] and len(good["signed_by"]) == 2
        header = d.node._header_at(good["anchor_height"])
        assert header is not None and svc.anchors[good["anchor_height"]].state_root == header.state_root.hex()
        [old] = [p for p in (await d.get("/api/bridge/plans"))["plans"] if p["id"] == bad["id"]]
        assert old["signed_by"] == [] and old["status"] != "COMPLETED"
        assert not await rpc.call("getrawmempool") or bad["id"] not in await rpc.call("getrawmempool")
        assert any(r.getMessage().startswith(f"anchoring: anchor plan {bad['id']} commits root {'66' * 32}")
                   for r in caplog.records)
    finally:
        await stop(d)
