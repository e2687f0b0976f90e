"""A 4-member federation (real l2d processes) against real bitcoinds: anchoring, header relay, peg-in and peg-out
work with every block signed by 3 of 4 members, and a member whose bitcoind is on another branch refuses to sign
what it cannot confirm (docs/federation.md, "Signing policy: Bitcoin claims").

Members 1-3 use bitcoind A. Member 4 uses bitcoind B, which holds A's blocks up to height S and then one block of
its own: from S+1 on, B's best chain is not A's. Each member holds one of the 4 peg-out keys (3 of 4 sign a payout,
each in its own process); member 1 also holds the anchor key; every member relays headers. Member 4 cannot see the
anchor covering the burn in its bitcoind and refuses to sign the plan: members 1-3 pay it.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Awaitable, Callable

from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC
from l2d.core.block import Block
from l2d.core.coin_tx import Burn
from l2d.core.commit import Commit
from l2d.core.params import REGTEST
from l2d.core.pegs_tx import BtcHeaders, PeginClaim
from l2d.core.tx import sign
from regtest.harness import BitcoindNode, find_bitcoind, fund_wallet, scan_sat
from regtest.members import fund_body, proven_deposit, secret, signer_pubkey, write_configs
from tests.conftest import REPO, L2dProcess
from tests.l2d.federation_procs import Federation

ALICE = secret("alice")
ALICE_ID = PrivateKey(ALICE).public_key_xonly.format()
ONE_KEY_EACH = [[0], [1], [2], [3]]  # member k holds peg-out key k


def relayed_tip(p: L2dProcess) -> Any:
    return p.get("/api/bridge/federation")["btc_tip"]


def audited(p: L2dProcess, height: int, fed: Federation, tmp_path: Path) -> None:
    """The audit bundle of the anchor of `height`, fetched from p, passes `l2-verify audit` down to the members'
    commit (the genesis file names them)."""
    bundle = tmp_path / f"audit-{height}.bin"
    with urllib.request.urlopen(p.url(f"/api/anchors/{height}/audit"), timeout=60) as r:
        bundle.write_bytes(r.read())
    out = subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(bundle), "--min-conf", "1",
                          "--members", str(fed.root / "genesis.json")], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


async def holdings_on_chain(rpc: BitcoinRPC, p: L2dProcess) -> int:
    """The federation's coins on bitcoind A (Alice's deposit script and the change script), by scantxoutset."""
    spks = [p.get(f"/api/bridge/pegin-address/{c}")["script_pubkey"] for c in (ALICE_ID.hex(), "00" * 32)]
    return await scan_sat(rpc, [f"raw({x})" for x in spks])



async def test_four_members_anchor_relay_and_peg_against_real_bitcoinds_and_a_member_on_another_branch_refuses(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Callable[..., Awaitable[Any]]) -> None:
    w, mine_addr = await fund_wallet(rpc, "miner")
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
        write_configs([fed.dir(k) for k in range(4)], [bitcoind, bitcoind, bitcoind, node_b], ONE_KEY_EACH, 3)
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

        async def deposit(address: str, amount: int) -> tuple[bytes, PeginClaim]:
            return await proven_deposit(rpc, w, mine_addr, relayed_to_a, address, amount)

        # peg-in: Alice deposits 1 BTC on A and claims it through member 3
        addr = procs[2].get(f"/api/bridge/pegin-address/{ALICE_ID.hex()}")["address"]
        txid, proof = await deposit(addr, 100_000_000)
        vout = proof.vout
        claim = sign(REGTEST, ALICE, 0, 1, proof, bytes(32))
        fed.submit(2, claim)
        await poll(lambda: fed.tx_height(3, claim) is not None, 60, "the claim committed (seen by member 4)")
        assert procs[3].get(f"/api/l2/accounts/{ALICE_ID.hex()}")["balance_sat"] == 100_000_000 - 1

        # funding: an operator pays the federation's funding address; member 2 records it (l2-cli federation-fund),
        # and the coin is in every member's state; member 3 posting the same deposit is a duplicate duty
        fund_addr = procs[1].get("/api/bridge/federation")["funding_address"]
        fund_txid, funding = await deposit(fund_addr, 2_000_000)
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
            # member 4 may not have committed the burn's block yet (it was seen committed at member 1): not yet
            mine = [p for p in procs[3].get("/api/bridge/pegouts")["pegouts"] if p["id"] == pid]
            assert len(mine) <= 1, mine
            if mine and mine[0]["status"] == "COMPLETED":
                return mine[0]
            await rpc.generatetoaddress(1, mine_addr)
            return None
        p = await poll(completed, 180, "the peg-out COMPLETED in member 4's state")
        paid_by = fed.status(3)["height"]  # the state at this height, and every later one, has it COMPLETED
        paid = await rpc.call("getrawtransaction", [p["btc_txid"], True])
        assert paid["confirmations"] >= 1
        assert [o for o in paid["vout"] if o["scriptPubKey"].get("address") == dest]
        assert len(paid["vin"][0]["txinwitness"]) == 5  # "", 3 signatures, the witness script
        # members 1-3 signed the plan, each in its own process, with its own key; member 4 refused
        [plan] = [x for x in procs[3].get("/api/bridge/plans")["plans"] if x["id"] == p["btc_txid"]]
        pubs = [signer_pubkey(i) for i in range(4)]
        assert plan["status"] == "COMPLETED" and sorted(plan["signed_by"]) == sorted(pubs[:3])
        assert [r for r in fed.log_lines(3)  # its bitcoind does not have the anchor's block
                if r["msg"].startswith(f"bridge: not signing plan {plan['id']}: anchor of L2 height")]
        # the federation's coins on Bitcoin == pegged in - paid out == every member's figure
        on_chain = await holdings_on_chain(rpc, procs[0])
        assert on_chain == 100_000_000 - 30_000_000
        for k in range(4):
            f = procs[k].get("/api/bridge/federation")
            assert f["pegged_in_sat"] - f["paid_out_sat"] == on_chain == f["holdings_sat"], (k, f)

        # an anchor FINAL in the L2 state; its audit bundle checks out to m member signatures
        async def anchored_final() -> Any:
            found = [a for a in procs[0].get("/api/anchors")["anchors"]
                     if a["l2_state"] and a["l2_state"]["status"] == "FINAL"]
            if not found:
                await rpc.generatetoaddress(1, mine_addr)
            return found
        anchors = await poll(anchored_final, 120, "an anchor FINAL in the L2 state")
        height = anchors[0]["l2_height"]
        audited(procs[0], height, fed, tmp_path)

        # recovery from the bundle of a FINAL anchor past the payout (its snapshot evidence): the coins by the books
        # are what bitcoind holds, and Alice is owed what she has left
        async def final_past_payout() -> Any:
            found = [a["l2_height"] for a in procs[0].get("/api/anchors")["anchors"]
                     if a["l2_height"] >= paid_by and a["l2_state"] and a["l2_state"]["status"] == "FINAL"]
            if not found:
                await rpc.generatetoaddress(1, mine_addr)
            return found
        late = (await poll(final_past_payout, 120, "an anchor FINAL past the payout"))[0]
        bundle = tmp_path / "audit.bin"
        with urllib.request.urlopen(procs[0].url(f"/api/anchors/{late}/audit"), timeout=60) as r:
            bundle.write_bytes(r.read())
        out = subprocess.run([sys.executable, "-m", "verify_tool.cli", "recovery", str(bundle), "--json",
                              "--members", str(fed.root / "genesis.json")], capture_output=True, text=True, cwd=REPO,
                             timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        rec = json.loads(out.stdout)
        assert rec["audit"]["evidence"] == "snapshot" and rec["l2_height"] == late
        assert rec["holdings_sat"] == on_chain and rec["books"]["agree"] and rec["locked"]["agree"]
        assert rec["funding_sat"] == 2_000_000 and not [c for c in rec["claims"] if c["kind"] == "pegout"]
        [owed] = [c for c in rec["claims"] if c["kind"] == "account" and c["owner"] == ALICE_ID.hex()]
        assert owed["amount_sat"] == 100_000_000 - 1 - 30_000_000 - 1
        assert rec["payout_sat"] + rec["unallocated_sat"] == on_chain

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


class Pegged:
    """4 member processes on bitcoind A, one peg-out key each, `threshold` keys needed to pay; Alice has pegged in
    1 BTC (claimed through member 1)."""

    def __init__(self, fed: Federation, rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str,
                 poll: Callable[..., Awaitable[Any]]) -> None:
        self.fed, self.rpc, self.w, self.mine_addr, self.poll = fed, rpc, w, mine_addr, poll

    @classmethod
    async def start(cls, root: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Callable[..., Awaitable[Any]],
                    threshold: int) -> "Pegged":
        w, mine_addr = await fund_wallet(rpc, "miner")
        fed = Federation(root, 4, network=REGTEST, federation={"round_ms": 1000})
        write_configs([fed.dir(k) for k in range(4)], [bitcoind] * 4, ONE_KEY_EACH, threshold)
        fed.rewrite_genesis()
        pegged = cls(fed, rpc, w, mine_addr, poll)
        try:
            for k in range(4):
                fed.start(k)
            await poll(pegged.relayed, 120, "headers relayed")
            # the federation's funding coin, which pays the anchors (signed by threshold members, as payouts)
            fund_addr = fed.procs[0].get("/api/bridge/federation")["funding_address"]
            _, funding = await proven_deposit(rpc, w, mine_addr, pegged.relayed, fund_addr, 2_000_000)
            fed.procs[0].post("/api/admin/bridge/fund", fund_body(funding), fed.token)
            await poll(lambda: fed.procs[0].get("/api/bridge/federation")["funded_sat"] == 2_000_000, 60,
                       "the funding coin recorded")
            addr = fed.procs[0].get(f"/api/bridge/pegin-address/{ALICE_ID.hex()}")["address"]
            _, proof = await proven_deposit(rpc, w, mine_addr, pegged.relayed, addr, 100_000_000)
            claim = sign(REGTEST, ALICE, 0, 1, proof, bytes(32))
            fed.submit(0, claim)
            await poll(lambda: fed.tx_height(0, claim) is not None, 60, "the claim committed")
        except BaseException:
            fed.kill_all()
            raise
        return pegged

    async def relayed(self) -> bool:
        tip = await self.rpc.getblockcount()
        r = relayed_tip(self.fed.procs[0])
        return r is not None and r["height"] == tip and r["hash"] == (await self.rpc.getblockhash(tip))[::-1].hex()

    async def burn(self, nonce: int, amount: int) -> tuple[str, str]:
        """Alice burns amount to a new address of the miner's wallet: (peg-out id, address)."""
        dest = await self.w.getnewaddress()
        b = sign(REGTEST, ALICE, nonce, 1, Burn(amount, dest.encode()), bytes(32))
        self.fed.submit(0, b)
        await self.poll(lambda: self.fed.tx_height(0, b) is not None, 60, "the burn committed")
        return b.txid.hex(), dest

    def pegout(self, pid: str) -> Any:
        [p] = [p for p in self.fed.procs[0].get("/api/bridge/pegouts")["pegouts"] if p["id"] == pid]
        return p

    def plans_paying(self, pid: str) -> list[Any]:
        plans = self.fed.procs[0].get("/api/bridge/plans")["plans"]
        return [x for x in plans if pid in [q["id"] for q in x["pegouts"]]]

    async def completed(self, pid: str) -> Any:
        """Mine a block at a time until the peg-out is COMPLETED in member 1's state."""
        async def done() -> Any:
            p = self.pegout(pid)
            if p["status"] == "COMPLETED":
                return p
            await self.rpc.generatetoaddress(1, self.mine_addr)
            return None
        return await self.poll(done, 180, f"peg-out {pid} COMPLETED")

    async def unpaid(self, dest: str) -> bool:
        """Nothing pays dest, in the chain or in the mempool."""
        for txid in await self.rpc.call("getrawmempool"):
            tx = await self.rpc.call("getrawtransaction", [txid, True])
            if any(o["scriptPubKey"].get("address") == dest for o in tx["vout"]):
                return False
        return await scan_sat(self.rpc, [f"addr({dest})"]) == 0


async def test_a_payout_needs_three_members_signing_in_their_own_processes_and_completes_once(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Callable[..., Awaitable[Any]]) -> None:
    """All 4 members on bitcoind A, 3 of 4 peg-out keys needed, one key per member process.
    - Member 4 is SIGKILLed before its payout's plan exists: members 1-3 sign and pay it.
    - Members 3 and 4 are SIGKILLed before the next payout's plan exists: with two members the federation can
      neither agree on a plan nor gather 3 signatures, so nothing is broadcast however many Bitcoin blocks pass,
      and nothing is lost; restarted, the federation pays it exactly once."""
    pegged = await Pegged.start(tmp_path / "fed", bitcoind, rpc, poll, 3)
    fed, procs, burn, completed = pegged.fed, pegged.fed.procs, pegged.burn, pegged.completed
    mine_addr = pegged.mine_addr
    pubs = [signer_pubkey(i) for i in range(4)]
    try:
        # member 4 down before the plan exists (a plan needs a FINAL anchor, and no block is mined until now)
        pid1, dest1 = await burn(1, 20_000_000)
        fed.kill(3)
        p1 = await completed(pid1)
        [plan1] = [x for x in procs[0].get("/api/bridge/plans")["plans"] if x["id"] == p1["btc_txid"]]
        assert plan1["status"] == "COMPLETED" and sorted(plan1["signed_by"]) == sorted(pubs[:3])
        fed.start(3)

        # two members down: nothing is broadcast, nothing is lost
        pid2, dest2 = await burn(2, 10_000_000)
        fed.kill(2)
        fed.kill(3)
        for _ in range(8):  # enough for an anchor to become FINAL, had the federation been able to record it
            await rpc.generatetoaddress(1, mine_addr)
        assert await pegged.unpaid(dest2) and pegged.pegout(pid2)["status"] != "COMPLETED"
        fed.start(2)
        fed.start(3)
        await completed(pid2)
        paid = await scan_sat(rpc, [f"addr({dest2})"])
        payouts = pegged.plans_paying(pid2)
        assert [x["status"] for x in payouts if x["status"] == "COMPLETED"] == ["COMPLETED"]
        [done2] = [x for x in payouts if x["status"] == "COMPLETED"]
        assert paid == done2["pegouts"][0]["payout_sat"]  # one payment, not two
        on_chain = await holdings_on_chain(rpc, procs[0])
        assert on_chain == 100_000_000 - 30_000_000
        await poll(lambda: all(procs[k].get("/api/bridge/pegouts")["pegouts"] and
                               procs[k].get("/api/bridge/federation")["paid_out_sat"] == 30_000_000
                               for k in range(4)), 60, "every member sees both payouts")
        for k in range(4):
            f = procs[k].get("/api/bridge/federation")
            assert f["pegged_in_sat"] - f["paid_out_sat"] == on_chain == f["holdings_sat"], (k, f)
        out = subprocess.run([sys.executable, "-m", "l2d.cli", "--json", "--api", procs[1].url(""), "plans"],
                             capture_output=True, text=True, cwd=REPO, timeout=120)  # the operator's view
        assert out.returncode == 0, out.stderr

        def payouts(plans: dict[str, Any]) -> list[Any]:  # the anchors' plans go on meanwhile
            return [x for x in plans["plans"] if x["kind"] == "payout"]
        assert payouts(json.loads(out.stdout)) == payouts(procs[1].get("/api/bridge/plans"))
        assert {x["status"] for x in payouts(json.loads(out.stdout))} == {"COMPLETED"}
    finally:
        fed.kill_all()
    lowest, _ = fed.check()  # same final blocks everywhere, commits valid, signer rules kept
    assert lowest >= 1


async def test_three_members_cannot_move_a_coin_that_needs_four_keys(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Callable[..., Awaitable[Any]]) -> None:
    """4 of 4 keys needed, one per member process. Member 4 is SIGKILLed after Alice's burn: the other three keep
    the L2 going (3 of 4 members sign blocks), record the next anchor's plan and post their 3 signatures, but 3 keys
    cannot move the coin it spends: nothing is broadcast however many blocks pass, the plan stays PLANNED with no
    signed transaction and its coins unspent, so no anchor covers the burn and the peg-out stays PENDING, unpaid.
    Member 4 restarted signs too: the anchor and then the payout (signed by all 4) are made, the payout once."""
    pegged = await Pegged.start(tmp_path / "fed", bitcoind, rpc, poll, 4)
    fed, procs = pegged.fed, pegged.fed.procs
    pubs = [signer_pubkey(i) for i in range(4)]
    try:
        pid, dest = await pegged.burn(1, 20_000_000)
        fed.kill(3)

        async def signed_by_three() -> Any:  # by members 1-3 (member 4 may have signed the plan in flight at the kill)
            plans = [x for x in procs[0].get("/api/bridge/plans")["plans"]
                     if x["kind"] == "anchor" and x["final"] and sorted(x["signed_by"]) == sorted(pubs[:3])]
            if plans:
                return plans[0]
            await rpc.generatetoaddress(1, pegged.mine_addr)
            return None
        plan = await poll(signed_by_three, 180, "an anchor plan signed by the three members alive")
        assert sorted(plan["signed_by"]) == sorted(pubs[:3]) and plan["threshold"] == 4
        for _ in range(5):  # blocks pass: still nothing can pay
            await rpc.generatetoaddress(1, pegged.mine_addr)
        [plan] = [x for x in procs[0].get("/api/bridge/plans")["plans"] if x["id"] == plan["id"]]
        assert plan["status"] == "PLANNED" and plan["signed_tx"] is None and len(plan["signed_by"]) == 3
        assert plan["id"] not in await rpc.call("getrawmempool")
        for i in plan["inputs"]:  # the coins it would spend are where they were
            assert await rpc.call("gettxout", [i["txid"], i["vout"], True]) is not None
        assert not pegged.plans_paying(pid)  # no anchor covers the burn: no payout is even planned
        assert pegged.pegout(pid)["status"] == "PENDING" and await pegged.unpaid(dest)
        fed.start(3)
        p = await pegged.completed(pid)
        [payout] = pegged.plans_paying(pid)
        assert payout["status"] == "COMPLETED" and payout["id"] == p["btc_txid"]
        assert sorted(payout["signed_by"]) == sorted(pubs)
        assert await scan_sat(rpc, [f"addr({dest})"]) == payout["pegouts"][0]["payout_sat"]  # paid once
        assert await holdings_on_chain(rpc, fed.procs[0]) == 100_000_000 - 20_000_000
    finally:
        fed.kill_all()
    lowest, _ = fed.check()
    assert lowest >= 1


async def test_anchors_are_signed_by_three_of_four_member_processes_and_audited(
        tmp_path: Path, bitcoind: BitcoindNode, rpc: BitcoinRPC, poll: Callable[..., Awaitable[Any]]) -> None:
    """Anchors on 4 member processes, 3 of 4 keys, one per process; member 4 is SIGKILLed
    once the federation is funded (federation-fund). Every K L2 blocks an anchor plan is proposed, signed by the 3
    live members in their own processes, mined, CONFIRMED and FINAL; each anchor spends the previous one's k-of-n
    output; the audit bundle of one verifies with l2-verify audit down to the commit of the members."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    fed = Federation(tmp_path / "fed", 4, network=REGTEST, federation={"round_ms": 1000})
    write_configs([fed.dir(k) for k in range(4)], [bitcoind] * 4, ONE_KEY_EACH, 3)
    fed.rewrite_genesis()
    try:
        for k in range(4):
            fed.start(k)
        procs = fed.procs

        async def relayed() -> bool:
            tip = await rpc.getblockcount()
            r = relayed_tip(procs[0])
            return r is not None and r["height"] == tip and r["hash"] == (await rpc.getblockhash(tip))[::-1].hex()
        await poll(relayed, 120, "headers relayed")
        fund_addr = procs[0].get("/api/bridge/federation")["funding_address"]
        _, funding = await proven_deposit(rpc, w, mine_addr, relayed, fund_addr, 2_000_000)
        out = subprocess.run([sys.executable, "-m", "l2d.cli", "--json", "--api", procs[1].url(""), "federation-fund",
                              "--btc-height", str(funding.btc_height), "--vout", str(funding.vout), "--tx",
                              funding.btc_tx.hex(), "--proof", funding.merkle_block.hex(), "--token", fed.token,
                              "--wait", "60"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "committed", out.stdout + out.stderr
        fed.kill(3)  # SIGKILL: the other three anchor without it

        async def two_completed() -> Any:
            done = [p for p in procs[0].get("/api/bridge/plans")["plans"]
                    if p["kind"] == "anchor" and p["status"] == "COMPLETED"]
            if len(done) >= 2:
                return sorted(done, key=lambda p: p["anchor_height"])
            await rpc.generatetoaddress(1, mine_addr)
            await asyncio.sleep(0.5)
            return None
        done = await poll(two_completed, 240, "two anchors signed by the federation completed")
        first, second = done[0], done[1]
        member4 = signer_pubkey(3)
        assert all(len(p["signed_by"]) >= 3 and member4 not in p["signed_by"] for p in (first, second))
        assert (first["id"], 0) in [(i["txid"], i["vout"]) for i in second["inputs"]]
        tx = await rpc.call("getrawtransaction", [second["id"], True])
        witness = tx["vin"][[(i["txid"], i["vout"]) for i in second["inputs"]].index((first["id"], 0))]["txinwitness"]
        assert sorted(len(x) // 2 for x in witness[:4]) == [0, 65, 65, 65]  # 3 of the 4 keys of the leaf
        audited(procs[0], first["anchor_height"], fed, tmp_path)
        for k in range(3):  # every live member's anchor service followed the plans
            anchors = {a["l2_height"]: a for a in procs[k].get("/api/anchors")["anchors"]}
            assert anchors[first["anchor_height"]]["txid"] == first["id"]
    finally:
        fed.kill_all()
