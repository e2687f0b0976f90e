"""Write the l2d config for the regtest started by regtest/start.sh, or fund the federation it runs.

    python regtest/l2d_config.py write OUT.toml          # config/regtest.toml + this bitcoind, anchoring and bridge on
    python regtest/l2d_config.py fund CONFIG SAT WALLET   # pay the federation's funding address and record the coin

bitcoind's settings come from the environment written to .regtest/env by regtest/start.sh. `fund` pays SAT from the
bitcoind wallet WALLET to the funding address the running l2d reports (GET /api/bridge/federation), mines it
bridge.pegin_min_depth deep to the wallet, waits for l2d's header relay and records the coin with its SPV proof
(POST /api/admin/bridge/fund, as `l2-cli federation-fund`): the anchors are paid from it.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import toml

# absolute(), not resolve(): a checkout whose regtest/ is a link to another's (tests/test_walkthroughs.py) keeps its
# own config/ and so its own .data/, as regtest/start.sh keeps its own .regtest/.
ROOT = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(ROOT))

from bridge.rpc import BitcoinRPC, CookieAuth  # noqa: E402
from l2d.config import Config  # noqa: E402
from regtest.members import fund_body, proven_deposit  # noqa: E402


def write(out: Path) -> None:
    base = ROOT / "config" / "regtest.toml"
    cfg = tomllib.loads(base.read_text())
    # Paths in config/regtest.toml are relative to config/; make them absolute for the new location.
    for section, key in (("node", "data_dir"), ("chain", "mint_authority_key_file"), ("snapshots", "dir")):
        if key in cfg.get(section, {}):
            cfg[section][key] = str((base.parent / cfg[section][key]).resolve())
    bridge = cfg.get("bridge", {})
    bridge["signer_key_files"] = [str((base.parent / f).resolve()) for f in bridge.get("signer_key_files", [])]
    cfg["bridge"] = {**bridge, "enabled": bool(bridge["signer_key_files"])}
    cfg["anchoring"] = {**cfg.get("anchoring", {}), "enabled": True}
    cfg["bitcoind"] = {**cfg.get("bitcoind", {}), "rpc_url": os.environ["BITCOIN_RPC_URL"],
                       "cookie_file": os.environ["BITCOIN_RPC_COOKIE"],
                       "zmq_hashblock": os.environ["BITCOIN_ZMQ"], "zmq_sequence": os.environ["BITCOIN_ZMQ"]}
    out.write_text("# written by regtest/start.sh from config/regtest.toml\n" + toml.dumps(cfg))
    Config.load(out)  # fail here, naming the key, rather than in the daemon


def _api(cfg: Config, path: str, body: Any = None) -> Any:
    req = urllib.request.Request(f"http://{cfg.api.host}:{cfg.api.port}{path}",
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {cfg.api.admin_token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


async def fund(config_path: Path, amount: int, wallet: str) -> str:
    cfg = Config.load(config_path)
    if not cfg.bitcoind.rpc_url or cfg.bitcoind.cookie_file is None:
        raise SystemExit(f"{config_path}: no bitcoind.rpc_url and cookie_file (write it with `write` first)")
    rpc = BitcoinRPC(cfg.bitcoind.rpc_url, CookieAuth(cfg.bitcoind.cookie_file))
    try:
        w = rpc.for_wallet(wallet)
        mine_addr = await w.getnewaddress()
        address = _api(cfg, "/api/bridge/federation")["funding_address"]

        async def relayed() -> bool:
            tip, mine = _api(cfg, "/api/bridge/federation")["btc_tip"], await rpc.getblockcount()
            return tip is not None and tip["hash"] == (await rpc.getblockhash(mine))[::-1].hex()
        txid, proof = await proven_deposit(rpc, w, mine_addr, relayed, address, amount,
                                           depth=cfg.bridge.pegin_min_depth)
        res = _api(cfg, "/api/admin/bridge/fund", fund_body(proof))
        return f"paid {amount} sat to the federation's funding address {address} (txid {txid[::-1].hex()}), " \
               f"mined {cfg.bridge.pegin_min_depth} block(s), recorded as L2 transaction {res['txid']}"
    finally:
        await rpc.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"] and len(sys.argv) == 3:
        write(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["fund"] and len(sys.argv) == 5:
        print(asyncio.run(fund(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
    else:
        raise SystemExit(__doc__)
