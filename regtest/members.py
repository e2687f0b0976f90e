"""A federation of l2d member processes on regtest, each member holding its own Bitcoin keys.

The members' directories are the layout `l2-cli federation-init --network regtest` writes (DIR/member-K/l2d.toml);
this module adds what the Bitcoin side needs, for tests (tests/l2d/test_federation_regtest.py) and benchmarks
(bench/bench_pegout.py) alike:
- `write_configs`: each member's [bitcoind], [anchoring] and [bridge] sections and its signer key files (the
  federation's keys are SIGNERS; each member holds the ones it is given, one process per holder). Every member's
  [bridge] names the same federation (its own keys' files, the others' public keys, the threshold), which is part
  of the genesis state: re-write genesis.json afterwards (`l2-cli federation-genesis`). Every member runs the anchor
  service: anchors are plans of the federation, signed by threshold of the keys and paid by its funding coins.
- `proven_deposit`: pay an address, mine it MIN_DEPTH deep, wait for the federation's header relay, and return the
  PeginClaim (or FederationFund) payload proving it; `fund_body` is the admin endpoint's body recording a funding
  coin (POST /api/admin/bridge/fund, as `l2-cli federation-fund`): anchors start once the federation is funded.
Starting and stopping the member processes is the caller's (each has its own process helpers).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC
from l2d.core.pegs_tx import PeginClaim

from .harness import BitcoindNode

MIN_DEPTH = 2  # bridge.pegin_min_depth: a deposit is claimable this many blocks deep
# the members' settings (docs/anchoring.md, docs/bridge.md): an anchor every 2 L2 blocks, CONFIRMED at 1 Bitcoin
# confirmation and FINAL at 3; a peg-out COMPLETED at 1; both services poll their bitcoind every 100 ms
ANCHOR_EVERY_BLOCKS = 2
ANCHOR_FINAL_CONFIRMATIONS = 3
POLL_INTERVAL_MS = 100


def secret(tag: str) -> bytes:
    """A deterministic secret key (public on purpose: regtest only)."""
    return hashlib.sha256(b"l2d federation regtest " + tag.encode()).digest()


SIGNERS = [secret(f"signer {i}") for i in range(4)]  # the peg-out federation's keys


def signer_pubkey(i: int) -> str:
    """SIGNERS[i]'s compressed public key, hex (as the bridge's other_keys and the plans' signed_by list it)."""
    return str(PrivateKey(SIGNERS[i]).public_key.format().hex())


def write_configs(dirs: Sequence[Path], btc: Sequence[BitcoindNode], held: Sequence[Sequence[int]],
                  threshold: int) -> None:
    """Member k (its directory dirs[k], its bitcoind btc[k]) holds the federation keys SIGNERS[i] for i in held[k]
    (files signer-I.key) and knows the others of SIGNERS[0..max] by their public keys; threshold of them sign a
    payout or an anchor. Every member runs the anchor service (the federation must be funded: fund_body)."""
    keys = sorted({i for h in held for i in h})
    if keys != list(range(len(keys))) or len(dirs) != len(btc) or len(dirs) != len(held):
        raise ValueError(f"held {held}: every key 0..n-1 held by some member, one entry per member and bitcoind")
    for k, d in enumerate(dirs):
        for i in held[k]:
            (d / f"signer-{i}.key").write_text(SIGNERS[i].hex())
        for key_file in d.glob("*.key"):
            key_file.chmod(0o600)
        files = json.dumps([f"signer-{i}.key" for i in held[k]])
        others = json.dumps([signer_pubkey(i) for i in keys if i not in held[k]])
        with (d / "l2d.toml").open("a") as f:
            f.write(f"""
[bitcoind]
rpc_url = "{btc[k].rpc_url}"
cookie_file = "{btc[k].cookie_path}"

[anchoring]
enabled = true
mode = "taproot"
every_blocks = {ANCHOR_EVERY_BLOCKS}
poll_interval_ms = {POLL_INTERVAL_MS}
confirmations = 1
final_confirmations = {ANCHOR_FINAL_CONFIRMATIONS}

[bridge]
enabled = true
threshold = {threshold}
signer_key_files = {files}
other_keys = {others}
pegin_min_depth = {MIN_DEPTH}
pegout_confirmations = 1
poll_interval_ms = {POLL_INTERVAL_MS}
""")


async def poll(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call cond (sync or async) until it returns something truthy; return that, or TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def proven_deposit(rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str, relayed: Callable[[], Awaitable[Any]],
                         address: str, amount: int, depth: int = MIN_DEPTH) -> tuple[bytes, PeginClaim]:
    """Pay address from the wallet w, mine it depth deep, wait until relayed() (the federation's relayed tip
    reaches those blocks): (txid, its claim's payload)."""
    txid = await w.sendtoaddress(address, amount)
    info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
    [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == address]
    await rpc.generatetoaddress(depth, mine_addr)
    await poll(relayed, 60, f"the block paying {address} relayed")
    block = bytes.fromhex((await rpc.call("getrawtransaction", [txid[::-1].hex(), True]))["blockhash"])[::-1]
    return txid, PeginClaim((await rpc.getblockheader(block, True)).height, vout,
                            await rpc.getrawtransaction(txid), await rpc.gettxoutproof([txid], block))


def fund_body(p: PeginClaim) -> dict[str, Any]:
    """The body of POST /api/admin/bridge/fund recording the proven payment p to the federation's funding address
    (GET /api/bridge/federation: funding_address) as a funding coin."""
    return {"btc_height": p.btc_height, "vout": p.vout, "tx": p.btc_tx.hex(), "proof": p.merkle_block.hex()}


async def fund_node(node: Any, rpc: BitcoinRPC, w: BitcoinRPC, mine_addr: str, amount: int) -> None:
    """Fund the federation of an in-process l2d Node (l2d/node.py) from the wallet w: pay its funding address, mine
    the payment bridge.pegin_min_depth deep, wait until the node's bridge has relayed those blocks, and record the
    coin with a FederationFund posted as this member (what `l2-cli federation-fund` does over REST)."""
    from l2d.core.pegs import FUNDING_CONTRACT, btc_tip, deposit_script_pubkey, funded_sat, script_address
    from l2d.core.pegs_tx import FederationFund
    from l2d.core.state import StateView

    fed = node.federation
    addr = script_address(deposit_script_pubkey(fed, node.network.id, FUNDING_CONTRACT), node.network)
    txid = await w.sendtoaddress(addr, amount)
    [block] = await rpc.generatetoaddress(1, mine_addr)
    await rpc.generatetoaddress(fed.min_depth - 1, mine_addr)
    tip_hash = await rpc.getblockhash(await rpc.getblockcount())

    def relayed() -> bool:
        tip = btc_tip(StateView(node.store.get_state))
        return tip is not None and tip.block_hash == tip_hash
    await poll(relayed, 120, "the funding payment's blocks relayed")
    info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
    [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == addr]
    before = funded_sat(StateView(node.store.get_state))
    node.admission.submit_as_member(FederationFund((await rpc.getblockheader(block, True)).height, vout,
                                                   await rpc.getrawtransaction(txid),
                                                   await rpc.gettxoutproof([txid], block)))
    await poll(lambda: funded_sat(StateView(node.store.get_state)) == before + amount, 60, "the funding recorded")

