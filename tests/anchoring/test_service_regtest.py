"""Anchor service end to end: a real l2d process against a regtest bitcoind, anchors as plans of the federation.

The daemon runs a 1-key federation ([bridge] threshold = 1, one signer key file): an operator pays the federation's
funding address and records the payment with its SPV proof (POST /api/admin/bridge/fund); from then on the anchor
service proposes each anchor as an AnchorPlan paid by the funding coin, the daemon's bridge signs and broadcasts it,
and the anchor service follows it (ZMQ + RPC) to CONFIRMED and FINAL, recording each step in the L2 state by
AnchorUpdate transactions (the FINAL one completes the plan). Tested:
* Taproot mode end to end: signed transfers make L2 blocks; the anchor is proposed, signed, broadcast, mined,
  CONFIRMED and FINAL; a restart loses nothing and the next anchor, proposed by the restarted process, names the
  first's link and spends its k-of-n output; the audit bundle (k-of-n kind) verifies with `l2-verify audit` and
  tampered variants exit 1;
* OP_RETURN mode: the anchor transaction carries the record in an OP_RETURN output and its change goes back to the
  federation as a FUNDING coin, which the next anchor spends;
* fee bump: an anchor kept out of blocks is replaced by the bridge (bridge.rbf_after_blocks) at a higher rate
  spending the same coins; the anchor service follows the replacement, which is mined; the original never is.
  If a miner still holding the original mines it instead, that version becomes the anchor and completes the plan;
* reorg: the anchor's block is invalidated: SUBMITTED again (in the L2 state too), back in the mempool, mined
  again on the new branch, CONFIRMED with the new block, then FINAL;
* a SIGKILL as soon as the anchor transaction is in the mempool, the transaction mined while the daemon is down:
  after the restart the anchor is found mined, CONFIRMED and FINAL, and nothing is proposed or broadcast again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC
from bridge.rpc_errors import RPCError
from l2d.core.anchor_format import AnchorRecord
from l2d.core.audit import AuditBundle, ProofEvidence
from l2d.core.coin_tx import Transfer
from l2d.core.kofn import KofN
from l2d.core.params import REGTEST
from l2d.core.tx import sign
from regtest.harness import BitcoindNode, fund_wallet
from regtest.members import MIN_DEPTH, fund_body, proven_deposit
from tests.conftest import L2dProcess

TOKEN = "anchor-test-admin-token-0001"
USER_SECRET = hashlib.sha256(b"l2d anchor test user").digest()
USER = PrivateKey(USER_SECRET).public_key_xonly.format()
REPO = Path(__file__).resolve().parents[2]
FUNDING_SAT = 2_000_000
Poll = Callable[..., Awaitable[Any]]


def write_config(tmp: Path, btc: BitcoindNode, name: str, mode: str = "taproot", poll_ms: int = 200,
                 rbf_after: int = 50, bridge_poll_ms: int = 100, zmq: bool = True) -> Path:
    """A regtest daemon anchoring every 2 L2 blocks (CONFIRMED at 1 Bitcoin confirmation, FINAL at 3) through a
    1-key federation whose key file the daemon creates; its bridge replaces a plan unconfirmed rbf_after blocks.
    The anchor service steps on every L2 block, every bitcoind block (ZMQ) and every poll_ms; the bridge only
    every bridge_poll_ms (without zmq, only L2 blocks and polls wake them)."""
    data = tmp / f"l2d-{name}"
    data.mkdir(parents=True, exist_ok=True)
    cfg = tmp / f"l2d-{name}.toml"
    cfg.write_text(f"""
[node]
network = "regtest"
data_dir = "{data}"
log_level = "DEBUG"

[chain]
min_fee_sat = 1
[chain.genesis_alloc]
{USER.hex()} = 100000000

[block]
interval_ms = 50

[api]
host = "127.0.0.1"
port = 0
admin_token = "{TOKEN}"

[snapshots]
every_blocks = 0

[anchoring]
enabled = true
mode = "{mode}"
every_blocks = 2
confirmations = 1
final_confirmations = 3
poll_interval_ms = {poll_ms}

[bridge]
enabled = true
threshold = 1
signer_key_files = ["{data / 'signer.key'}"]
pegin_min_depth = {MIN_DEPTH}
pegout_confirmations = 1
rbf_after_blocks = {rbf_after}
poll_interval_ms = {bridge_poll_ms}

[bitcoind]
rpc_url = "{btc.rpc_url}"
cookie_file = "{btc.cookie_path}"
zmq_hashblock = "{btc.zmq_endpoint if zmq else ''}"
zmq_sequence = "{btc.zmq_endpoint if zmq else ''}"
""")
    return cfg


async def relayed(p: L2dProcess, rpc: BitcoinRPC) -> bool:
    """The federation's relayed Bitcoin tip (in the L2 state) is bitcoind's tip."""
    tip = p.get("/api/bridge/federation")["btc_tip"]
    height = await rpc.getblockcount()
    return tip is not None and tip["height"] == height and tip["hash"] == (await rpc.getblockhash(height))[::-1].hex()


async def funded_daemon(tmp: Path, btc: BitcoindNode, rpc: BitcoinRPC, l2d_process: Callable[..., L2dProcess],
                        poll: Poll, name: str, **config: Any
                        ) -> tuple[L2dProcess, Path, str, tuple[str, int]]:
    """A miner wallet, the daemon started, and FUNDING_SAT paid to the federation's funding address and recorded
    with its proof: (process, config path, mining address, the funding outpoint (display txid, vout))."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    cfg = write_config(tmp, btc, name, **config)
    p = l2d_process(cfg, tmp / f"l2d-{name}-1.log")
    fund_addr = p.get("/api/bridge/federation")["funding_address"]
    txid, proof = await proven_deposit(rpc, w, mine_addr, lambda: relayed(p, rpc), fund_addr, FUNDING_SAT)
    l2_txid = p.post("/api/admin/bridge/fund", fund_body(proof), TOKEN)["txid"]
    await poll(lambda: p.get(f"/api/l2/tx/{l2_txid}")["status"] == "committed", 60, "the funding recorded")
    coin = (txid[::-1].hex(), proof.vout)
    coins = {(c["txid"], c["vout"]): c for c in p.get("/api/bridge/coins")["coins"]}
    assert coins[coin]["kind"] == "FUNDING" and coins[coin]["amount_sat"] == FUNDING_SAT
    return p, cfg, mine_addr, coin


async def zmq_sync(p: L2dProcess, rpc: BitcoinRPC, addr: str, poll: Poll) -> None:
    """Mine until the anchor service sees a block within 2 s: it follows bitcoind's chain (its ZMQ subscription is
    connected, slow joiner; the header relay's L2 block wakes it too)."""
    for _ in range(15):
        [h] = await rpc.generatetoaddress(1, addr)
        height = (await rpc.getblockheader(h, True)).height
        try:
            await poll(lambda: p.get("/api/anchors")["btc_tip_height"] == height, 2, "ZMQ")
            return
        except BaseException:  # pytest.fail raises Failed (a BaseException): try another block
            continue
    raise AssertionError("the anchor service never saw a ZMQ hashblock")


def anchors(p: L2dProcess) -> dict[int, dict[str, Any]]:
    return {a["l2_height"]: a for a in p.get("/api/anchors")["anchors"]}


def anchor_at(p: L2dProcess, height: int, status: str) -> Any:
    """The anchor of this L2 height if it has this status (else None)."""
    a = anchors(p).get(height)
    return a if a is not None and a["status"] == status else None


def l2_status(p: L2dProcess, height: int, status: str) -> Any:
    """The anchor of this L2 height if the L2 state records it with this status (else None)."""
    a = anchors(p).get(height)
    return a if a is not None and a["l2_state"] and a["l2_state"]["status"] == status else None


def first_submitted(p: L2dProcess, above: int = -1) -> Any:
    """The lowest anchor above this L2 height that is SUBMITTED (else None)."""
    found = [a for h, a in sorted(anchors(p).items()) if h > above and a["status"] == "SUBMITTED"]
    return found[0] if found else None


def plan(p: L2dProcess, txid: str) -> dict[str, Any]:
    [x] = [x for x in p.get("/api/bridge/plans")["plans"] if x["id"] == txid]
    return x


def coins(p: L2dProcess) -> dict[tuple[str, int], dict[str, Any]]:
    return {(c["txid"], c["vout"]): c for c in p.get("/api/bridge/coins")["coins"]}


async def mempool(rpc: BitcoinRPC) -> list[str]:
    return [h[::-1].hex() for h in await rpc.getrawmempool()]


async def transfer(p: L2dProcess, n: int, poll: Poll) -> None:
    """n signed transfers from the genesis-funded user, each waited for: n L2 blocks."""
    recipient = PrivateKey(hashlib.sha256(b"l2d anchor test recipient").digest()).public_key_xonly.format()
    for _ in range(n):
        nonce = p.get(f"/api/l2/accounts/{USER.hex()}")["nonce"]
        tx = sign(REGTEST, USER_SECRET, nonce, 1, Transfer(recipient, 1000), b"\0" * 32)
        txid = p.post("/api/l2/tx", {"tx": tx.raw.hex()}, TOKEN)["txid"]
        await poll(lambda: p.get(f"/api/l2/tx/{txid}")["status"] == "committed", 60, "transfer committed")


async def submitted_after_broadcast(p: L2dProcess, rpc: BitcoinRPC, poll: Poll, above: int = -1) -> dict[str, Any]:
    """The bridge broadcasts an anchor plan (its transaction in bitcoind's mempool), and the anchor service marks the
    anchor above this L2 height SUBMITTED with that txid: woken by bitcoind's ZMQ sequence notice of that
    transaction (its RPC poll is 60 s in the tests that use this; no L2 block is made meanwhile)."""
    [txid] = await poll(lambda: mempool(rpc), 60, "an anchor broadcast")
    a = await poll(lambda: first_submitted(p, above), 30, "the anchor SUBMITTED")
    assert a["txid"] == txid
    return dict(a)


def verify(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(bundle), *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def vins(raw: dict[str, Any]) -> list[tuple[str, int]]:
    return [(i["txid"], i["vout"]) for i in raw["vin"]]


async def test_end_to_end_taproot(tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC,
                                  l2d_process: Callable[..., L2dProcess], poll: Poll) -> None:
    """Taproot anchors as plans: proposed (paid by the funding coin), signed by the federation's key, broadcast,
    mined, CONFIRMED and FINAL, each step in the L2 state; the FINAL update completes the plan and its output is the
    federation's ANCHOR coin. A restart loses nothing; the next anchor, proposed by the restarted process, names the
    first's link and spends its k-of-n output. The audit bundle verifies; tampered variants do not."""
    # RPC poll every 60 s: within this test, every Bitcoin event reaches the anchor service through ZMQ (or the L2
    # block of the header relay), never through its poll
    p, cfg, mine_addr, funding = await funded_daemon(tmp_path, bitcoind, rpc, l2d_process, poll, "taproot",
                                                     poll_ms=60_000)
    await zmq_sync(p, rpc, mine_addr, poll)
    fed = p.get("/api/bridge/federation")
    await transfer(p, 2, poll)  # signed transfers make L2 blocks

    # proposed as a plan paid by the funding coin, signed by the federation's key, broadcast by the bridge
    a = await submitted_after_broadcast(p, rpc, poll)
    h, txid = a["l2_height"], a["txid"]
    assert a["mode"] == "taproot" and a["replaced_txids"] == [] and h % 2 == 0
    assert txid in await mempool(rpc)
    pl = plan(p, txid)
    assert (pl["kind"], pl["anchor_height"], pl["status"]) == ("anchor", h, "PLANNED")
    assert pl["signed_by"] == fed["keys"] and pl["signed_tx"]
    assert [(i["txid"], i["vout"], i["kind"]) for i in pl["inputs"]] == [(*funding, "FUNDING")]
    raw = await rpc.call("getrawtransaction", [txid, 1])
    assert vins(raw) == [funding] and raw["hex"] == pl["signed_tx"]
    assert raw["vout"][0]["scriptPubKey"]["type"] == "witness_v1_taproot"  # the k-of-n output
    assert p.get("/api/anchors/latest")["l2_height"] == h and a["record"][-64:] == "00" * 32  # the first: no prev

    [b1] = await rpc.generatetoaddress(1, mine_addr)
    a = await poll(lambda: anchor_at(p, h, "CONFIRMED"), 60, "anchor confirmed (ZMQ)")
    assert a["btc_block_hash"] == b1[::-1].hex() and a["txid"] == txid
    a = await poll(lambda: l2_status(p, h, "CONFIRMED"), 60, "AnchorUpdate CONFIRMED in the L2 state")
    assert a["l2_state"]["btc_txid"] == txid and a["l2_state"]["btc_block_hash"] == b1[::-1].hex()
    assert a["l2_state"]["state_root"] == a["state_root"]
    assert plan(p, txid)["status"] == "PLANNED"  # CONFIRMED does not complete the plan (a reorg may undo it)

    # restart mid-way: everything survives
    before = anchors(p)
    assert p.stop() == 0
    p = l2d_process(cfg, tmp_path / "l2d-taproot-2.log")
    after = anchors(p)
    assert {k: (x["status"], x["txid"], x["btc_block_hash"], x["record"]) for k, x in before.items()} == \
        {k: (x["status"], x["txid"], x["btc_block_hash"], x["record"]) for k, x in after.items()}
    await zmq_sync(p, rpc, mine_addr, poll)  # the second confirmation

    # FINAL after 3 confirmations; the FINAL update completes the plan: its output is the federation's ANCHOR coin
    await rpc.generatetoaddress(1, mine_addr)
    await poll(lambda: anchor_at(p, h, "FINAL"), 60, "anchor FINAL")
    await poll(lambda: l2_status(p, h, "FINAL"), 60, "FINAL in the L2 state")
    await poll(lambda: plan(p, txid)["status"] == "COMPLETED", 60, "the anchor plan COMPLETED")
    anchor_coin = coins(p)[(txid, 0)]
    assert anchor_coin["kind"] == "ANCHOR" and anchor_coin["amount_sat"] == FUNDING_SAT - pl["fee_sat"]
    assert coins(p)[funding]["spent_by"] == txid

    # the next anchor, proposed by the restarted process, chains to this one and spends its k-of-n output
    nxt = await submitted_after_broadcast(p, rpc, poll, above=h)
    assert [r for r in p.lines() if r["msg"] == "anchor plan proposed" and r["l2_height"] == nxt["l2_height"]]
    assert nxt["record"][92:] == a["link"]  # prev_link: the record's last 32 bytes
    status, text = p.get_raw("/metrics")  # the restarted process timed the stages (from their persisted times)
    counts = {ln.split('"')[1]: int(ln.rsplit(" ", 1)[1]) for ln in text.decode().splitlines()
              if ln.startswith("l2d_anchor_stage_seconds_count{")}
    assert status == 200 and counts.get("SUBMITTED", 0) >= 1 and counts.get("FINAL", 0) >= 1, counts
    assert [(i["txid"], i["vout"], i["kind"]) for i in plan(p, nxt["txid"])["inputs"]] == [(txid, 0, "ANCHOR")]
    raw = await rpc.call("getrawtransaction", [nxt["txid"], 1])
    assert vins(raw) == [(txid, 0)]
    # the 1-of-1 leaf's witness: one BIP340 signature (65 bytes: SIGHASH_ALL explicit), the leaf, the control block
    witness = raw["vin"][0]["txinwitness"]
    assert len(witness) == 3 and len(witness[0]) // 2 == 65
    await rpc.generatetoaddress(1, mine_addr)
    await poll(lambda: anchor_at(p, nxt["l2_height"], "CONFIRMED"), 60, "the next anchor confirmed")
    assert coins(p)[(txid, 0)]["spent_by"] == nxt["txid"]

    # audit bundle: export with l2-cli, verify offline; tampered variants exit 1
    out = tmp_path / "audit.bin"
    cli = subprocess.run([sys.executable, "-m", "l2d.cli", "--api", p.url(""), "export-audit", "--height", str(h),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert cli.returncode == 0, cli.stderr
    res = verify(out, "--min-conf", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert verify(out, "--min-conf", "1000").returncode == 1  # too few confirmations
    assert p.get_raw("/api/anchors/999/audit")[0] == 404

    bundle = AuditBundle.decode(out.read_bytes())
    assert bundle.kofn is not None and bundle.kofn.k == 1 and [bytes.fromhex(k)[1:] for k in fed["keys"]] == \
        list(bundle.kofn.keys)
    rec = bundle.record
    other_key = PrivateKey(hashlib.sha256(b"not the federation").digest()).public_key_xonly.format()
    variants = {
        "changed-root": dataclasses.replace(bundle, record=AnchorRecord(rec.network_id, rec.l2_height,
                                                                        b"\x01" * 32, rec.prev_link)),
        "root-evidence-mismatch": dataclasses.replace(bundle, evidence=ProofEvidence(b"\x02" * 32)),
        # header 80 | tx count 4 | hash count 1 | first hash...: one bit of the first hash flipped
        "wrong-proof": dataclasses.replace(bundle, merkleblock=bundle.merkleblock[:85] + bytes(
            [bundle.merkleblock[85] ^ 1]) + bundle.merkleblock[86:]),
        "broken-header-link": dataclasses.replace(bundle, headers=bundle.headers[:80 * 2]
                                                  + bundle.headers[80 * 3:]),
        # another federation's policy: the anchor output is not its k-of-n output
        "other-policy": dataclasses.replace(bundle, kofn=KofN.of(1, [other_key])),
    }
    for name, v in variants.items():
        f = tmp_path / f"tampered-{name}.bin"
        f.write_bytes(v.encode())
        r = verify(f, "--min-conf", "1")
        assert r.returncode == 1, (name, r.stdout, r.stderr)
    assert p.stop() == 0


async def test_op_return_mode_anchors_return_the_change_as_a_funding_coin(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, l2d_process: Callable[..., L2dProcess],
        poll: Poll) -> None:
    """OP_RETURN mode: the anchor transaction spends the funding coin into OP_RETURN <record> and a change output to
    the federation's funding address, which becomes a FUNDING coin once the anchor is FINAL; the next anchor spends
    it; the audit bundle (OP_RETURN kind) verifies."""
    p, cfg, mine_addr, funding = await funded_daemon(tmp_path, bitcoind, rpc, l2d_process, poll, "op_return",
                                                     mode="op_return")
    await transfer(p, 2, poll)
    a = await poll(lambda: first_submitted(p), 60, "an anchor SUBMITTED")
    h, txid = a["l2_height"], a["txid"]
    raw = await rpc.call("getrawtransaction", [txid, 1])
    assert vins(raw) == [funding] and len(raw["vout"]) == 2
    assert raw["vout"][0]["scriptPubKey"]["hex"] == "6a4c4e" + a["record"]  # OP_RETURN OP_PUSHDATA1 78 <record>
    assert raw["vout"][0]["value"] == 0
    fund_addr = p.get("/api/bridge/federation")["funding_address"]
    assert raw["vout"][1]["scriptPubKey"]["address"] == fund_addr  # the change back to the federation's funding
    change = round(raw["vout"][1]["value"] * 100_000_000)
    assert change == FUNDING_SAT - plan(p, txid)["fee_sat"]

    await rpc.generatetoaddress(3, mine_addr)
    await poll(lambda: anchor_at(p, h, "FINAL"), 60, "anchor FINAL")
    a = await poll(lambda: l2_status(p, h, "FINAL"), 60, "FINAL in the L2 state")
    assert a["l2_state"]["btc_txid"] == txid
    await poll(lambda: plan(p, txid)["status"] == "COMPLETED", 60, "the anchor plan COMPLETED")
    c = coins(p)
    assert c[funding]["spent_by"] == txid and (txid, 0) not in c
    assert c[(txid, 1)] == {**c[(txid, 1)], "kind": "FUNDING", "amount_sat": change, "address": fund_addr}
    assert p.get("/api/bridge/federation")["funded_sat"] == FUNDING_SAT  # recorded funding, not the change

    out = tmp_path / "audit.bin"
    status, body = p.get_raw(f"/api/anchors/{h}/audit")
    assert status == 200
    out.write_bytes(body)
    assert AuditBundle.decode(body).kofn is None  # the OP_RETURN kind carries no policy
    res = verify(out, "--min-conf", "3")
    assert res.returncode == 0, res.stdout + res.stderr

    # the next anchor is paid by that change
    await transfer(p, 2, poll)
    nxt = await poll(lambda: first_submitted(p, h), 60, "the next anchor SUBMITTED")
    assert vins(await rpc.call("getrawtransaction", [nxt["txid"], 1])) == [(txid, 1)]
    assert nxt["record"][92:] == a["link"]
    assert p.stop() == 0


async def replaced_by_fee(p: L2dProcess, rpc: BitcoinRPC, mine_addr: str, poll: Poll) -> tuple[int, str, str, str]:
    """The first anchor transaction is kept out of blocks (prioritisetransaction with a large negative delta, as if
    its fee were too low) until the bridge replaces its plan (bridge.rbf_after_blocks Bitcoin blocks later) and
    the anchor service follows the replacement: (L2 height, original txid, original raw tx hex, replacement txid)."""
    await transfer(p, 2, poll)
    a = await poll(lambda: first_submitted(p), 60, "an anchor SUBMITTED")
    h, old = a["l2_height"], a["txid"]
    old_raw = (await rpc.call("getrawtransaction", [old, 1]))["hex"]
    await rpc.call("prioritisetransaction", [old, 0, -10_000_000])

    async def replaced() -> Any:
        """The anchor, once the service follows its replacement (before, the signed replacement not yet in
        bitcoind is listed in replaced_txids: the other signed versions); mines a block while only the original
        waits."""
        x = anchors(p)[h]
        if x["txid"] != old:
            return x
        if await mempool(rpc) == [old]:
            await rpc.generatetoaddress(1, mine_addr)
            await poll(lambda: relayed(p, rpc), 60, "the block relayed")
        return None
    b = await poll(replaced, 120, "the anchor replaced by fee")
    assert b["status"] == "SUBMITTED" and b["replaced_txids"] == [old]
    assert await mempool(rpc) == [b["txid"]]  # the replacement evicted the original
    return h, old, old_raw, b["txid"]


async def test_a_starved_anchor_is_replaced_by_fee_and_the_service_follows_the_replacement(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, l2d_process: Callable[..., L2dProcess],
        poll: Poll) -> None:
    """The first anchor transaction is kept out of blocks; bridge.rbf_after_blocks = 2 blocks later the bridge
    replaces the plan at a higher rate, spending the same coins; the anchor service follows the replacement, which
    is mined, CONFIRMED and FINAL; the original never is."""
    p, cfg, mine_addr, funding = await funded_daemon(tmp_path, bitcoind, rpc, l2d_process, poll, "rbf", rbf_after=2)
    h, old, _, new = await replaced_by_fee(p, rpc, mine_addr, poll)
    first, second = plan(p, old), plan(p, new)
    assert second["replaces"] == old and first["replaced_by"] == new and first["status"] == "REPLACED"
    assert second["feerate_sat_vb"] > first["feerate_sat_vb"] and second["fee_sat"] > first["fee_sat"]
    assert second["signed_by"] == first["signed_by"] and second["anchor_height"] == h
    assert vins(await rpc.call("getrawtransaction", [new, 1])) == [funding]  # the same coin

    [block] = await rpc.generatetoaddress(1, mine_addr)
    c = await poll(lambda: anchor_at(p, h, "CONFIRMED"), 60, "the replacement confirmed")
    assert (c["txid"], c["btc_block_hash"], c["replaced_txids"]) == (new, block[::-1].hex(), [old])
    c = await poll(lambda: l2_status(p, h, "CONFIRMED"), 60, "CONFIRMED in the L2 state")
    assert c["l2_state"]["btc_txid"] == new
    await rpc.generatetoaddress(2, mine_addr)
    await poll(lambda: l2_status(p, h, "FINAL"), 60, "FINAL in the L2 state")
    await poll(lambda: plan(p, new)["status"] == "COMPLETED", 60, "the replacement's plan COMPLETED")
    assert plan(p, old)["status"] == "REPLACED" and coins(p)[funding]["spent_by"] == new
    with pytest.raises(RPCError):  # the original was never mined (txindex knows every mined transaction)
        await rpc.call("getrawtransaction", [old, 1])
    status, body = p.get_raw(f"/api/anchors/{h}/audit")  # the audit bundle carries the mined version
    assert status == 200
    (tmp_path / "audit.bin").write_bytes(body)
    res = verify(tmp_path / "audit.bin", "--min-conf", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    # the anchor's fee and vsize (GET /api/anchors) are the mined version's (its vsize at most the plan's bound)
    mined = await rpc.call("getrawtransaction", [new, 1])
    assert FUNDING_SAT - round(mined["vout"][0]["value"] * 100_000_000) == second["fee_sat"]
    c = anchors(p)[h]
    assert c["fee_sat"] == second["fee_sat"], f"the anchor service records no fee for a federation anchor: {c}"
    assert mined["vsize"] <= c["vsize"] <= second["fee_sat"] // second["feerate_sat_vb"]
    assert p.stop() == 0


async def test_a_replaced_version_mined_by_a_miner_still_holding_it_becomes_the_anchor(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, l2d_process: Callable[..., L2dProcess],
        poll: Poll) -> None:
    """After the fee bump, a miner that still holds the original mines it: that version becomes the anchor (the
    replacement joins replaced_txids), its FINAL update completes the plan with it, and the audit bundle carries
    it."""
    p, cfg, mine_addr, funding = await funded_daemon(tmp_path, bitcoind, rpc, l2d_process, poll, "rbf-old",
                                                     rbf_after=2)
    h, old, old_raw, new = await replaced_by_fee(p, rpc, mine_addr, poll)
    block = (await rpc.call("generateblock", [mine_addr, [old_raw]]))["hash"]
    c = await poll(lambda: anchor_at(p, h, "CONFIRMED"), 60, "the original confirmed")
    assert (c["txid"], c["btc_block_hash"], c["replaced_txids"]) == (old, block, [new])
    c = await poll(lambda: l2_status(p, h, "CONFIRMED"), 60, "CONFIRMED in the L2 state")
    assert c["l2_state"]["btc_txid"] == old
    assert new not in await mempool(rpc)  # the block's conflict evicted the replacement
    await rpc.generatetoaddress(2, mine_addr)
    await poll(lambda: l2_status(p, h, "FINAL"), 60, "FINAL in the L2 state")
    await poll(lambda: plan(p, old)["status"] == "COMPLETED", 60, "the original's plan COMPLETED")
    assert plan(p, new)["status"] == "REPLACED" and coins(p)[funding]["spent_by"] == old
    with pytest.raises(RPCError):  # the replacement was never mined
        await rpc.call("getrawtransaction", [new, 1])
    status, body = p.get_raw(f"/api/anchors/{h}/audit")
    assert status == 200 and AuditBundle.decode(body).anchor_tx.hex() == old_raw
    (tmp_path / "audit.bin").write_bytes(body)
    res = verify(tmp_path / "audit.bin", "--min-conf", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    # the anchor's fee and vsize (GET /api/anchors) are those of the version mined
    c = anchors(p)[h]
    assert c["fee_sat"] == plan(p, old)["fee_sat"], f"the fee of the replacement, not of the version mined: {c}"
    assert c["vsize"] == (await rpc.call("getrawtransaction", [old, 1]))["vsize"]
    assert p.stop() == 0


async def test_a_reorg_of_the_anchor_block_moves_it_back_to_submitted_and_it_confirms_again(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, l2d_process: Callable[..., L2dProcess],
        poll: Poll) -> None:
    """The anchor's block is invalidated: the anchor is SUBMITTED again (the L2 state is told), its transaction is
    back in the mempool and is mined on the new branch: CONFIRMED with the new block, then FINAL. (The key-mode test
    of a conflicting spend of the anchor's input during the reorg is gone: only threshold federation keys can spend
    the federation's coins, and every spend of an anchor plan's coins is a version of that plan.)"""
    p, cfg, mine_addr, funding = await funded_daemon(tmp_path, bitcoind, rpc, l2d_process, poll, "reorg")
    await transfer(p, 2, poll)
    a = await poll(lambda: first_submitted(p), 60, "an anchor SUBMITTED")
    h, txid = a["l2_height"], a["txid"]
    [b1] = await rpc.generatetoaddress(1, mine_addr)
    await poll(lambda: anchor_at(p, h, "CONFIRMED"), 60, "anchor confirmed")
    await poll(lambda: l2_status(p, h, "CONFIRMED"), 60, "CONFIRMED in the L2 state")
    # b1's header relayed first: a relay of it still in the L2 mempool when bitcoind's tip drops below it would stop
    # the L2 chain (the member signs no block whose Bitcoin claims its bitcoind does not confirm) until bitcoind is
    # back at that height
    await poll(lambda: relayed(p, rpc), 60, "b1 relayed")

    await rpc.invalidateblock(b1)
    a = await poll(lambda: anchor_at(p, h, "SUBMITTED"), 60, "anchor back to SUBMITTED after the reorg")
    assert (a["txid"], a["btc_block_hash"], a["confirmations"]) == (txid, None, 0)
    a = await poll(lambda: l2_status(p, h, "SUBMITTED"), 60, "the L2 state learns about the reorg")
    assert a["l2_state"]["btc_txid"] == txid
    assert txid in await mempool(rpc)  # back in the mempool
    # another address: the same coinbase at the same height and time would rebuild the invalidated block
    [b2] = await rpc.generatetoaddress(1, await rpc.for_wallet("miner").getnewaddress())
    a = await poll(lambda: anchor_at(p, h, "CONFIRMED"), 60, "anchor confirmed again")
    assert (a["txid"], a["btc_block_hash"]) == (txid, b2[::-1].hex()) and b2 != b1
    a = await poll(lambda: l2_status(p, h, "CONFIRMED"), 60, "CONFIRMED again in the L2 state")
    assert a["l2_state"]["btc_block_hash"] == b2[::-1].hex()
    await rpc.generatetoaddress(2, mine_addr)
    a = await poll(lambda: l2_status(p, h, "FINAL"), 60, "FINAL in the L2 state")
    assert a["l2_state"]["btc_block_hash"] == b2[::-1].hex() and a["replaced_txids"] == []
    await poll(lambda: plan(p, txid)["status"] == "COMPLETED", 60, "the anchor plan COMPLETED")
    assert p.stop() == 0


async def test_a_kill_right_after_the_broadcast_loses_no_anchor(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, l2d_process: Callable[..., L2dProcess],
        poll: Poll) -> None:
    """The daemon is SIGKILLed as soon as its anchor transaction is in bitcoind's mempool, and the transaction is
    mined while it is down. After the restart the anchor is found mined (the anchor service had not seen the
    broadcast before the kill: it finds that version already mined, and rescans from just below its block),
    CONFIRMED and FINAL; nothing is proposed or broadcast again."""
    # The anchor service must not step between the broadcast and the kill: no ZMQ (whose notice of the broadcast
    # would wake it), its RPC poll is 60 s, no transfers (the header relay's L2 blocks reach height 2), and the bridge
    # steps once a second: it broadcasts the anchor long after the last L2 block (the empty one that makes its
    # signature's block final) woke the anchor service.
    p, cfg, mine_addr, funding = await funded_daemon(tmp_path, bitcoind, rpc, l2d_process, poll, "kill",
                                                     poll_ms=60_000, bridge_poll_ms=1000, zmq=False)
    [txid] = await poll(lambda: mempool(rpc), 60, "the anchor broadcast")
    p.kill()
    [h] = [r["l2_height"] for r in p.lines() if r["msg"] == "anchor plan proposed"]
    seen = [r for r in p.lines() if r["msg"] == "anchor plan broadcast"]
    [block] = await rpc.generatetoaddress(1, mine_addr)

    p = l2d_process(cfg, tmp_path / "l2d-kill-2.log")
    a = await poll(lambda: anchor_at(p, h, "CONFIRMED"), 60, "the anchor found mined after the restart")
    assert (a["txid"], a["btc_block_hash"], a["replaced_txids"]) == (txid, block[::-1].hex(), [])
    await poll(lambda: l2_status(p, h, "CONFIRMED"), 60, "CONFIRMED in the L2 state")
    await rpc.generatetoaddress(2, mine_addr)
    a = await poll(lambda: l2_status(p, h, "FINAL"), 60, "FINAL in the L2 state")
    assert a["l2_state"]["btc_txid"] == txid and a["l2_state"]["btc_block_hash"] == block[::-1].hex()
    await poll(lambda: plan(p, txid)["status"] == "COMPLETED", 60, "the anchor plan COMPLETED")
    # one plan, one version: nothing re-proposed, replaced or broadcast again
    assert [x["id"] for x in p.get("/api/bridge/plans")["plans"] if x["anchor_height"] == h] == [txid]
    assert not [r for r in p.lines() if r["msg"] == "anchor plan proposed" and r["l2_height"] == h]
    assert (await rpc.call("getrawtransaction", [txid, 1]))["confirmations"] == 3
    assert seen == [], "the anchor service saw the broadcast before the kill: the restart took the ordinary path"
    assert p.stop() == 0
