"""A federation of l2d member processes on regtest, each member holding its own Bitcoin keys.

The members' directories are the layout `l2-cli federation-init --network regtest` writes (DIR/member-K/l2d.toml);
this module adds what the Bitcoin side needs, for tests (tests/l2d/test_federation_regtest.py) and benchmarks
(bench/bench_pegout.py) alike:
- `write_configs`: each member's [bitcoind], [anchoring] and [bridge] sections, its peg-out signer key files
  (the federation's keys are SIGNERS; each member holds the ones it is given, one process per holder) and, for
  member 1, the anchor key. Every member's [bridge] names the same federation (its own keys' files, the others'
  public keys, the threshold), which is part of the genesis state: re-write genesis.json afterwards
  (`l2-cli federation-genesis`).
- `fund_anchor_key`: a miner wallet, and the anchor key's Taproot output funded (anchors are paid from it).
- `proven_deposit`: pay an address, mine it MIN_DEPTH deep, wait for the federation's header relay, and return the
  PeginClaim (or FederationFund) payload proving it.
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

from anchoring.btc_tx import key_path_script
from bridge.rpc import BitcoinRPC
from l2d.core.pegs_tx import PeginClaim

from .harness import BitcoindNode, fund_wallet

MIN_DEPTH = 2  # bridge.pegin_min_depth: a deposit is claimable this many blocks deep
# the members' settings (docs/anchoring.md, docs/bridge.md): an anchor every 2 L2 blocks, CONFIRMED at 1 Bitcoin
# confirmation and FINAL at 3; a peg-out COMPLETED at 1; both services poll their bitcoind every 100 ms
ANCHOR_EVERY_BLOCKS = 2
ANCHOR_FINAL_CONFIRMATIONS = 3
POLL_INTERVAL_MS = 100


def secret(tag: str) -> bytes:
    """A deterministic secret key (public on purpose: regtest only)."""
    return hashlib.sha256(b"l2d federation regtest " + tag.encode()).digest()


ANCHOR_KEY = secret("anchor")
SIGNERS = [secret(f"signer {i}") for i in range(4)]  # the peg-out federation's keys


def signer_pubkey(i: int) -> str:
    """SIGNERS[i]'s compressed public key, hex (as the bridge's other_keys and the plans' signed_by list it)."""
    return str(PrivateKey(SIGNERS[i]).public_key.format().hex())


def write_configs(dirs: Sequence[Path], btc: Sequence[BitcoindNode], held: Sequence[Sequence[int]],
                  threshold: int, anchor_signer: str = "key") -> None:
    """Member k (its directory dirs[k], its bitcoind btc[k]) holds the peg-out keys SIGNERS[i] for i in held[k]
    (files signer-I.key) and knows the others of the federation SIGNERS[0..max] by their public keys; threshold of
    them sign a payout. With anchor_signer "key", member 1 (k = 0) also holds the anchor key and anchors; with
    "federation", every member runs the anchor service on anchor plans, which threshold of the keys sign (the
    federation must then be funded: federation-fund)."""
    keys = sorted({i for h in held for i in h})
    if keys != list(range(len(keys))) or len(dirs) != len(btc) or len(dirs) != len(held):
        raise ValueError(f"held {held}: every key 0..n-1 held by some member, one entry per member and bitcoind")
    for k, d in enumerate(dirs):
        for i in held[k]:
            (d / f"signer-{i}.key").write_text(SIGNERS[i].hex())
        if anchor_signer == "federation":
            anchoring = (f'enabled = true\nmode = "taproot"\nevery_blocks = {ANCHOR_EVERY_BLOCKS}\n'
                         f'signer = "federation"\npoll_interval_ms = {POLL_INTERVAL_MS}\n')
        elif k == 0:
            (d / "anchor.key").write_text(ANCHOR_KEY.hex())
            anchoring = (f'enabled = true\nmode = "taproot"\nevery_blocks = {ANCHOR_EVERY_BLOCKS}\n'
                         f'federation_key_file = "anchor.key"\nrbf_after_blocks = 50\n'
                         f"poll_interval_ms = {POLL_INTERVAL_MS}\n")
        else:
            anchoring = "enabled = false\n"
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
{anchoring}confirmations = 1
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


async def fund_anchor_key(rpc: BitcoinRPC) -> tuple[BitcoinRPC, str]:
    """A miner wallet on the node (101 blocks mined to it), and the anchor key's Taproot output funded with 0.5 BTC
    and mined: (the wallet's client, its mining address)."""
    w, mine_addr = await fund_wallet(rpc, "miner")
    spk = key_path_script(PrivateKey(ANCHOR_KEY).public_key_xonly.format())
    desc = (await rpc.call("getdescriptorinfo", [f"rawtr({spk[2:].hex()})"]))["descriptor"]
    await w.sendtoaddress((await rpc.call("deriveaddresses", [desc]))[0], 50_000_000)
    await rpc.generatetoaddress(1, mine_addr)
    return w, mine_addr


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
                         address: str, amount: int) -> tuple[bytes, PeginClaim]:
    """Pay address from the wallet w, mine it MIN_DEPTH deep, wait until relayed() (the federation's relayed tip
    reaches those blocks): (txid, its claim's payload)."""
    txid = await w.sendtoaddress(address, amount)
    info = await rpc.call("getrawtransaction", [txid[::-1].hex(), True])
    [vout] = [o["n"] for o in info["vout"] if o["scriptPubKey"].get("address") == address]
    await rpc.generatetoaddress(MIN_DEPTH, mine_addr)
    await poll(relayed, 60, f"the block paying {address} relayed")
    block = bytes.fromhex((await rpc.call("getrawtransaction", [txid[::-1].hex(), True]))["blockhash"])[::-1]
    return txid, PeginClaim((await rpc.getblockheader(block, True)).height, vout,
                            await rpc.getrawtransaction(txid), await rpc.gettxoutproof([txid], block))
