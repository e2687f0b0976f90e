"""A 4-member federation (real l2d processes) against real bitcoinds: anchoring, header relay, peg-in and peg-out
work with every block signed by 3 of 4 members, and a member whose bitcoind is on another branch refuses to sign
what it cannot confirm (docs/federation.md, "Signing policy: Bitcoin claims").

Members 1-3 use bitcoind A. Member 4 uses bitcoind B, which holds A's blocks up to height S and then one block of
its own: from S+1 on, B's best chain is not A's. Member 1 holds the Bitcoin keys (the anchor key and 2 of the 3
peg-out signer keys), as issue 12 leaves them; every member relays headers.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

from coincurve import PrivateKey

from anchoring.btc_tx import key_path_script
from bridge.rpc import BitcoinRPC
from l2d.core.block import Block
from l2d.core.coin_tx import Burn
from l2d.core.commit import Commit
from l2d.core.params import REGTEST
from l2d.core.pegs_tx import BtcHeaders, PeginClaim
from l2d.core.tx import sign
from regtest.harness import BitcoindNode, find_bitcoind, fund_wallet
from tests.conftest import REPO, L2dProcess
from tests.l2d.federation_procs import Federation

MIN_DEPTH = 2


def secret(tag: str) -> bytes:
    return hashlib.sha256(b"l2d federation regtest " + tag.encode()).digest()


ANCHOR_KEY = secret("anchor")
SIGNERS = [secret(f"signer {i}") for i in range(3)]
ALICE = secret("alice")
ALICE_ID = PrivateKey(ALICE).public_key_xonly.format()


def write_configs(fed: Federation, btc: list[BitcoindNode]) -> None:
    """Every member: its bitcoind, the bridge (same genesis federation: 2 of the 3 signer keys), the claims
    policy's depths. Member 1: the anchor key and signer keys 1 and 2."""
    pubs = [PrivateKey(s).public_key.format().hex() for s in SIGNERS]
    for k in range(fed.n):
        d = fed.dir(k)
        b = btc[k]
        if k == 0:
            (d / "anchor.key").write_text(ANCHOR_KEY.hex())
            for i in range(2):
                (d / f"signer{i}.key").write_text(SIGNERS[i].hex())
            for f in d.glob("*.key"):
                f.chmod(0o600)
            bridge_keys = 'signer_key_files = ["signer0.key", "signer1.key"]\n' f'other_keys = ["{pubs[2]}"]\n'
            anchoring = ('enabled = true\nmode = "taproot"\nevery_blocks = 2\nfederation_key_file = "anchor.key"\n'
                         "rbf_after_blocks = 50\npoll_interval_ms = 100\n")
        else:
            bridge_keys = f"other_keys = {json.dumps(pubs)}\n"
            anchoring = "enabled = false\n"
        with fed.config(k).open("a") as f:
            f.write(f"""
[bitcoind]
rpc_url = "{b.rpc_url}"
cookie_file = "{b.cookie_path}"

[anchoring]
{anchoring}confirmations = 1
final_confirmations = 3

[bridge]
enabled = true
threshold = 2
{bridge_keys}pegin_min_depth = {MIN_DEPTH}
pegout_confirmations = 1
poll_interval_ms = 100
""")


def relayed_tip(p: L2dProcess) -> Any:
    return p.get("/api/bridge/federation")["btc_tip"]


async def test_four_members_anchor_relay_and_peg_against_real_bitcoinds_and_a_member_on_another_branch_refuses(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Callable[..., Awaitable[Any]]) -> None:
    # bitcoind A: coins to mine with and to fund the anchor key
    w, mine_addr = await fund_wallet(rpc, "miner")
    spk = key_path_script(PrivateKey(ANCHOR_KEY).public_key_xonly.format())
    desc = (await rpc.call("getdescriptorinfo", [f"rawtr({spk[2:].hex()})"]))["descriptor"]
    await w.sendtoaddress((await rpc.call("deriveaddresses", [desc]))[0], 50_000_000)
    await rpc.generatetoaddress(1, mine_addr)
    s = await rpc.getblockcount()
    # bitcoind B: A's blocks up to S, then one of its own
    binary = find_bitcoind()
    assert binary is not None
    node_b = BitcoindNode(tmp_path / "bitcoind-b", bitcoind=binary)
    node_b.start()
    rpc_b = node_b.rpc()
    fed = Federation(tmp_path / "fed", 4, network=REGTEST, federation={"round_ms": 1000})
    try:
        for h in range(1, s + 1):
            raw = await rpc.call("getblock", [(await rpc.getblockhash(h))[::-1].hex(), 0])
            assert await rpc_b.call("submitblock", [raw]) is None
        [b_own] = await rpc_b.call("generatetodescriptor", [1, "raw(51)"])
        write_configs(fed, [bitcoind, bitcoind, bitcoind, node_b])
        fed.rewrite_genesis()  # the bridge's federation is part of the genesis state
        for k in range(4):
            fed.start(k)
        procs = fed.procs
        [a_own] = await rpc.generatetoaddress(1, mine_addr)  # A's own block at S+1: B's S+1 is now refuted
        assert a_own != bytes.fromhex(b_own)[::-1]

        async def relayed_to_a() -> bool:
            tip = await rpc.getblockcount()
            r = relayed_tip(procs[1])
            return r is not None and r["height"] == tip and r["hash"] == (await rpc.getblockhash(tip))[::-1].hex()
        await poll(relayed_to_a, 120, "A's headers relayed past the fork")

        async def proven_deposit(address: str, amount: int) -> tuple[bytes, PeginClaim]:
            """Pay address on A, mine it MIN_DEPTH deep, wait for the relay: (txid, its claim's payload)."""
            txid = await w.sendtoaddress(address, amount)
            info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
            [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == address]
            await rpc.generatetoaddress(MIN_DEPTH, mine_addr)
            await poll(relayed_to_a, 60, f"the block paying {address} relayed")
            block = bytes.fromhex((await rpc.call("getrawtransaction", [txid[::-1].hex(), True]))["blockhash"])[::-1]
            return txid, PeginClaim((await rpc.getblockheader(block, True)).height, vout,
                                    await rpc.getrawtransaction(txid), await rpc.gettxoutproof([txid], block))

        # peg-in: Alice deposits 1 BTC on A and claims it through member 3
        addr = procs[2].get(f"/api/bridge/pegin-address/{ALICE_ID.hex()}")["address"]
        txid, proof = await proven_deposit(addr, 100_000_000)
        vout = proof.vout
        claim = sign(REGTEST, ALICE, 0, 1, proof, bytes(32))
        fed.submit(2, claim)
        await poll(lambda: fed.tx_height(3, claim) is not None, 60, "the claim committed (seen by member 4)")
        assert procs[3].get(f"/api/l2/accounts/{ALICE_ID.hex()}")["balance_sat"] == 100_000_000 - 1

        # funding: an operator pays the federation's funding address; member 2 records it (l2-cli federation-fund),
        # and the coin is in every member's state; member 3 posting the same deposit is a duplicate duty
        fund_addr = procs[1].get("/api/bridge/federation")["funding_address"]
        fund_txid, funding = await proven_deposit(fund_addr, 2_000_000)
        fund_vout = funding.vout
        fund_args = ["--btc-height", str(funding.btc_height), "--vout", str(fund_vout), "--tx", funding.btc_tx.hex(),
                     "--proof", funding.merkle_block.hex(), "--token", fed.token]
        out = subprocess.run([sys.executable, "-m", "l2d.cli", "--json", "--api", procs[1].url(""),
                              "federation-fund", *fund_args, "--wait", "60"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "committed", out.stdout + out.stderr
        await poll(lambda: procs[3].get("/api/bridge/federation")["funded_sat"] == 2_000_000, 60, "funding seen")
        coins = {(c["txid"], c["vout"]): c for c in procs[3].get("/api/bridge/coins")["coins"]}
        assert coins[(fund_txid[::-1].hex(), fund_vout)]["kind"] == "FUNDING"
        assert coins[(txid[::-1].hex(), vout)] == {"txid": txid[::-1].hex(), "vout": vout, "amount_sat": 100_000_000,
                                                  "kind": "DEPOSIT", "contract": ALICE_ID.hex(), "address": addr,
                                                  "spent_by": None}
        out = subprocess.run([sys.executable, "-m", "l2d.cli", "--api", procs[2].url(""), "federation-fund",
                              *fund_args], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 1 and "duplicate-duty" in out.stderr, out.stdout + out.stderr

        # peg-out: Alice burns 0.3 BTC through member 2; member 1 pays once an anchor covers the burn
        dest = await w.getnewaddress()
        burn = sign(REGTEST, ALICE, 1, 1, Burn(30_000_000, dest.encode()), bytes(32))
        fed.submit(1, burn)
        await poll(lambda: fed.tx_height(0, burn) is not None, 60, "the burn committed")
        pid = burn.txid.hex()

        async def completed() -> Any:
            [p] = [p for p in procs[3].get("/api/bridge/pegouts")["pegouts"] if p["id"] == pid]
            if p["status"] == "COMPLETED":
                return p
            await rpc.generatetoaddress(1, mine_addr)
            return None
        p = await poll(completed, 180, "the peg-out COMPLETED in member 4's state")
        paid = await rpc.call("getrawtransaction", [p["btc_txid"], True])
        assert paid["confirmations"] >= 1
        assert [o for o in paid["vout"] if o["scriptPubKey"].get("address") == dest]

        # an anchor FINAL in the L2 state; its audit bundle checks out to m member signatures
        async def anchored_final() -> Any:
            found = [a for a in procs[0].get("/api/anchors")["anchors"]
                     if a["l2_state"] and a["l2_state"]["status"] == "FINAL"]
            if not found:
                await rpc.generatetoaddress(1, mine_addr)
            return found
        anchors = await poll(anchored_final, 120, "an anchor FINAL in the L2 state")
        height = anchors[0]["l2_height"]
        bundle = tmp_path / "audit.bin"
        with urllib.request.urlopen(procs[0].url(f"/api/anchors/{height}/audit"), timeout=60) as r:
            bundle.write_bytes(r.read())
        out = subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(bundle), "--min-conf", "1",
                              "--members", str(fed.root / "genesis.json")], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr

        # the chain of member 4 with its commits passes the auditor's check too
        final = fed.final(3)
        chain = tmp_path / "chain.bin"
        with urllib.request.urlopen(procs[3].url(f"/api/l2/commits?from=0&to={final}"), timeout=60) as r:
            chain.write_bytes(r.read())
        out = subprocess.run([sys.executable, "-m", "verify_tool.cli", "chain", str(chain), "--members",
                              str(fed.root / "genesis.json")], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        refusals = [r for r in fed.log_lines(3) if r["msg"].startswith("not signing: my bitcoind does not confirm")]
    finally:
        fed.kill_all()
        await rpc_b.close()
        node_b.stop()

    lowest, _ = fed.check()  # same final blocks everywhere, commits valid, signer rules kept
    assert lowest >= 1
    # member 4 signed blocks (it was part of the federation) but none relaying A's headers past the fork
    chains = {c.member: c for c in fed.chains()}
    signed_by_4 = relays_past_fork = 0
    for h, (raw, commit_raw) in chains[3].blocks.items():
        blk, commit = Block.decode(raw, REGTEST), Commit.decode(commit_raw)
        signed_by_4 += 3 in commit.signers
        for t in blk.txs:
            if isinstance(t.payload, BtcHeaders) and t.payload.start_height + len(t.payload.headers) - 1 > s:
                relays_past_fork += 1
                assert 3 not in commit.signers, f"member 4 signed block {h}, which relays A's headers past the fork"
    assert signed_by_4 > 0 and relays_past_fork > 0
    assert any(r.get("refuted") for r in refusals), refusals[:3]
