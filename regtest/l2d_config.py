"""Write the l2d config for the regtest started by regtest/start.sh, or print the federation's address.

    python regtest/l2d_config.py write OUT.toml     # config/regtest.toml + this bitcoind, anchoring and bridge on
    python regtest/l2d_config.py address CONFIG     # bech32m key-path address of the federation key

bitcoind's settings come from the environment written to .regtest/env by regtest/start.sh.
"""
from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import toml
from bitcoinutils.bech32 import encode as bech32_encode
from coincurve import PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from l2d.config import Config  # noqa: E402
from l2d.core.anchor_format import output_key


def write(out: Path) -> None:
    base = ROOT / "config" / "regtest.toml"
    cfg = tomllib.loads(base.read_text())
    # Paths in config/regtest.toml are relative to config/; make them absolute for the new location.
    for section, key in (("node", "data_dir"), ("chain", "mint_authority_key_file"), ("snapshots", "dir")):
        if key in cfg.get(section, {}):
            cfg[section][key] = str((base.parent / cfg[section][key]).resolve())
    data_dir = Path(cfg["node"]["data_dir"])
    bridge = cfg.get("bridge", {})
    bridge["signer_key_files"] = [str((base.parent / f).resolve()) for f in bridge.get("signer_key_files", [])]
    cfg["bridge"] = {**bridge, "enabled": bool(bridge["signer_key_files"])}
    cfg["anchoring"] = {**cfg.get("anchoring", {}), "enabled": True,
                        "federation_key_file": str(data_dir / "federation.key")}
    cfg["bitcoind"] = {**cfg.get("bitcoind", {}), "rpc_url": os.environ["BITCOIN_RPC_URL"],
                       "cookie_file": os.environ["BITCOIN_RPC_COOKIE"],
                       "zmq_hashblock": os.environ["BITCOIN_ZMQ"], "zmq_sequence": os.environ["BITCOIN_ZMQ"]}
    out.write_text("# written by regtest/start.sh from config/regtest.toml\n" + toml.dumps(cfg))
    Config.load(out)  # fail here, naming the key, rather than in the daemon


def address(config_path: Path) -> str:
    cfg = Config.load(config_path)
    key_file = cfg.anchoring.federation_key_file
    if key_file is None or not Path(key_file).exists():
        raise SystemExit(f"no federation key file yet ({key_file}): start l2d first")
    xonly = PrivateKey(bytes.fromhex(Path(key_file).read_text().strip())).public_key_xonly.format()
    addr = bech32_encode("bcrt", 1, list(output_key(xonly, None)[0]))
    if addr is None:
        raise SystemExit("could not encode the federation address")
    return str(addr)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "address"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        print(address(Path(sys.argv[2])))
