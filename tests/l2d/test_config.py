"""Tests for l2d.config: the sample configs load, and every validation rule names key and value."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from coincurve import PrivateKey

from l2d.config import ADMIN_TOKEN_ENV, Config, ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
MAX_MONEY = 21_000_000 * 100_000_000
TOKEN = "a-valid-admin-token-0123456789"


def demo_pubkey(n: int) -> str:
    secret = hashlib.sha256(b"l2d demo account %d" % n).digest()
    return PrivateKey(secret).public_key_xonly.format().hex()


PK1, PK2, PK3 = demo_pubkey(1), demo_pubkey(2), demo_pubkey(3)
OFF_CURVE = "ff" * 32  # 64 hex characters, but not the x coordinate of any secp256k1 point


@pytest.fixture(autouse=True)
def no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)


def base() -> dict[str, Any]:
    return {
        "node": {"network": "local", "data_dir": "data"},
        "chain": {"genesis_alloc": {PK1: 1000}},
        "api": {"admin_token": TOKEN},
    }


def build(mutate: Callable[[dict[str, Any]], None], tmp_path: Path) -> Config:
    d = copy.deepcopy(base())
    mutate(d)
    return Config.from_dict(d, tmp_path, env={})


def reject(mutate: Callable[[dict[str, Any]], None], tmp_path: Path) -> str:
    with pytest.raises(ConfigError) as e:
        build(mutate, tmp_path)
    return str(e.value)


# -- the shipped configs -------------------------------------------------------------------------

def test_local_toml_loads() -> None:
    c = Config.load(CONFIG_DIR / "local.toml")
    assert c.node.network == "local"
    assert c.node.data_dir == (CONFIG_DIR.parent / ".data" / "local").resolve()
    assert c.block.interval_ms == 1000 and c.block.max_txs == 1000
    assert (c.api.host, c.api.port) == ("127.0.0.1", 8650)
    assert c.snapshots.every_blocks == 100 and c.snapshots.keep == 5
    assert c.chain.genesis_timestamp_ms == 1767225600000 and c.chain.min_fee_sat == 1
    assert c.chain.mint_authority_key_file == (CONFIG_DIR.parent / ".data/local/mint_authority.key").resolve()
    assert c.source == (CONFIG_DIR / "local.toml").resolve()
    assert c.anchoring.enabled and c.bitcoind.rpc_url == ""  # `make run`: anchors built, not broadcast
    # the anchors' federation: one bridge key, held here
    assert c.bridge.enabled and c.bridge.threshold == 1
    assert c.bridge.signer_key_files == ((CONFIG_DIR.parent / ".data/local/signer.key").resolve(),)
    # The demo allocations are the documented, reproducible keys.
    assert dict((pk.hex(), amount) for pk, amount in c.chain.genesis_alloc) == {
        PK1: 50_000_000_000, PK2: 20_000_000_000, PK3: 5_000_000_000}


def test_regtest_toml_loads() -> None:
    c = Config.load(CONFIG_DIR / "regtest.toml")
    assert c.node.network == "regtest"
    assert c.node.data_dir == (CONFIG_DIR.parent / ".data" / "regtest").resolve()
    assert c.api.port == 8651
    assert c.chain.genesis_alloc == ()
    assert not c.anchoring.enabled and not c.bridge.enabled


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    c = Config.from_dict({"node": {"network": "local", "data_dir": "d"}}, tmp_path, env={})
    assert c.node.log_level == "INFO"
    assert c.api.host == "127.0.0.1" and c.api.admin_token == ""
    assert c.snapshots.dir == c.node.data_dir / "snapshots"
    assert c.chain.mint_authority_key_file == c.node.data_dir / "mint_authority.key"
    assert c.mempool.min_fee_sat == c.chain.min_fee_sat
    assert c.source is None


def test_config_is_immutable() -> None:
    c = Config.load(CONFIG_DIR / "local.toml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.block.interval_ms = 5  # type: ignore[misc]


# -- rejections: each names the dotted key and the bad value ---------------------------------------

def test_out_of_range_message_is_exact(tmp_path: Path) -> None:
    msg = reject(lambda d: d.setdefault("block", {}).update(interval_ms=-5), tmp_path)
    assert msg == "config: block.interval_ms = -5: must be an integer between 10 and 3600000"


def test_unknown_key(tmp_path: Path) -> None:
    msg = reject(lambda d: d["api"].update(prot=8650), tmp_path)
    assert msg.startswith("config: unknown key api.prot")
    assert "did you mean api.port?" in msg


def test_unknown_section(tmp_path: Path) -> None:
    msg = reject(lambda d: d.update(bitcoin={}), tmp_path)
    assert msg.startswith("config: unknown key bitcoin (did you mean bitcoind?)")


def test_section_must_be_a_table(tmp_path: Path) -> None:
    assert reject(lambda d: d.update(block=5), tmp_path) == "config: block = 5: must be a table"


@pytest.mark.parametrize("key", ["network", "data_dir"])
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    msg = reject(lambda d: d["node"].pop(key), tmp_path)
    assert msg == f"config: missing required key node.{key}"


def test_missing_node_table(tmp_path: Path) -> None:
    assert reject(lambda d: d.pop("node"), tmp_path) == "config: missing required key node.network"


@pytest.mark.parametrize("section,key,value,shown", [
    ("block", "interval_ms", "1000", '"1000"'),       # string
    ("block", "interval_ms", 1000.0, "1000.0"),       # float
    ("block", "max_txs", True, "true"),               # bool is an int subclass: still rejected
    ("mempool", "max_txs", False, "false"),
    ("api", "port", True, "true"),
    ("snapshots", "every_blocks", [1], "[1]"),
])
def test_wrong_type_for_int(tmp_path: Path, section: str, key: str, value: object, shown: str) -> None:
    msg = reject(lambda d: d.setdefault(section, {}).update({key: value}), tmp_path)
    assert msg.startswith(f"config: {section}.{key} = {shown}: must be an integer between ")


def test_wrong_type_for_string(tmp_path: Path) -> None:
    msg = reject(lambda d: d["api"].update(host=127), tmp_path)
    assert msg == "config: api.host = 127: must be a string"


@pytest.mark.parametrize("section,key,value", [
    ("block", "interval_ms", 9),
    ("block", "interval_ms", 3_600_001),
    ("block", "max_txs", 0),
    ("block", "max_txs", 100_001),
    ("api", "port", -1),
    ("api", "port", 65536),
    ("api", "max_body_bytes", 0),
    ("api", "max_body_bytes", 10 * 1024 * 1024 + 1),
    ("snapshots", "every_blocks", -1),
    ("snapshots", "keep", 0),
    ("chain", "min_fee_sat", -1),
    ("chain", "genesis_timestamp_ms", 1767225600),   # seconds, not milliseconds
    ("mempool", "max_txs", 0),
])
def test_out_of_range(tmp_path: Path, section: str, key: str, value: int) -> None:
    msg = reject(lambda d: d.setdefault(section, {}).update({key: value}), tmp_path)
    assert msg.startswith(f"config: {section}.{key} = {value}: must be an integer between ")


def test_range_edges_accepted(tmp_path: Path) -> None:
    def edges(d: dict[str, Any]) -> None:
        d["block"] = {"interval_ms": 10, "max_txs": 100_000}
        d["api"].update(port=0, max_body_bytes=10 * 1024 * 1024)
        d["snapshots"] = {"every_blocks": 0, "keep": 1}
    c = build(edges, tmp_path)
    assert c.api.port == 0 and c.snapshots.every_blocks == 0 and c.block.interval_ms == 10


API_LIMITS = {"max_connections": (512, 1, 100_000), "header_timeout_ms": (20_000, 100, 600_000),
              "body_timeout_ms": (60_000, 100, 3_600_000), "keepalive_timeout_ms": (75_000, 100, 3_600_000)}


def test_api_limits_default(tmp_path: Path) -> None:
    c = build(lambda d: None, tmp_path)
    for key, (default, _, _) in API_LIMITS.items():
        assert getattr(c.api, key) == default
        assert c.effective()["api"][key] == default
        assert f"{key}={default}" in repr(c.api)


@pytest.mark.parametrize("key", sorted(API_LIMITS))
def test_api_limits_validated_naming_the_key(tmp_path: Path, key: str) -> None:
    _, lo, hi = API_LIMITS[key]
    for bad in (lo - 1, hi + 1, "10", 1.5, True):
        msg = reject(lambda d: d["api"].update({key: bad}), tmp_path)
        assert msg == f"config: api.{key} = {json.dumps(bad)}: must be an integer between {lo} and {hi}"
    assert getattr(build(lambda d: d["api"].update({key: lo}), tmp_path).api, key) == lo
    assert getattr(build(lambda d: d["api"].update({key: hi}), tmp_path).api, key) == hi


def test_max_per_sender_cannot_exceed_mempool_size(tmp_path: Path) -> None:
    msg = reject(lambda d: d.update(mempool={"max_txs": 10, "max_per_sender": 11}), tmp_path)
    assert msg == "config: mempool.max_per_sender = 11: must be an integer between 1 and 10"


def test_mempool_fee_not_below_chain_fee(tmp_path: Path) -> None:
    def m(d: dict[str, Any]) -> None:
        d["chain"]["min_fee_sat"] = 10
        d["mempool"] = {"min_fee_sat": 5}
    msg = reject(m, tmp_path)
    assert msg.startswith("config: mempool.min_fee_sat = 5: must be an integer between 10 and ")


def test_bad_network(tmp_path: Path) -> None:
    msg = reject(lambda d: d["node"].update(network="testnet"), tmp_path)
    assert msg == 'config: node.network = "testnet": must be one of local, regtest, signet, mainnet'


def test_log_level(tmp_path: Path) -> None:
    assert build(lambda d: d["node"].update(log_level="debug"), tmp_path).node.log_level == "DEBUG"
    msg = reject(lambda d: d["node"].update(log_level="LOUD"), tmp_path)
    assert msg.startswith('config: node.log_level = "LOUD": must be one of DEBUG, INFO')


@pytest.mark.parametrize("value", ["", "   ", 5])
def test_bad_path(tmp_path: Path, value: object) -> None:
    msg = reject(lambda d: d["node"].update(data_dir=value), tmp_path)
    assert msg == f"config: node.data_dir = {json.dumps(value)}: must be a non-empty path string"


@pytest.mark.parametrize("host", ["example.com", "", "127.0.0.1:80"])
def test_bad_host(tmp_path: Path, host: str) -> None:
    msg = reject(lambda d: d["api"].update(host=host), tmp_path)
    assert msg.startswith(f"config: api.host = {json.dumps(host)}: must be an IP address literal")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "0.0.0.0", "10.1.2.3"])
def test_good_host(tmp_path: Path, host: str) -> None:
    assert build(lambda d: d["api"].update(host=host), tmp_path).api.host == host


# -- genesis allocations ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", [
    "zz" * 32,        # not hex
    PK1[:62],         # 31 bytes
    PK1 + "00",       # 33 bytes
    "02" + PK1,       # compressed (33-byte) key instead of x-only
    OFF_CURVE,        # 32 bytes, but not on the curve
])
def test_bad_alloc_pubkey(tmp_path: Path, key: str) -> None:
    msg = reject(lambda d: d["chain"].update(genesis_alloc={key: 1000}), tmp_path)
    assert msg.startswith(f"config: chain.genesis_alloc.{key} = 1000: the key must be a 64-hex-character x-only")


@pytest.mark.parametrize("amount,shown", [(-1, "-1"), (0, "0"), (MAX_MONEY + 1, str(MAX_MONEY + 1)),
                                          (True, "true"), ("1000", '"1000"'), (1.5, "1.5")])
def test_bad_alloc_amount(tmp_path: Path, amount: object, shown: str) -> None:
    msg = reject(lambda d: d["chain"].update(genesis_alloc={PK1: amount}), tmp_path)
    assert msg == f"config: chain.genesis_alloc.{PK1} = {shown}: must be an integer between 1 and {MAX_MONEY}"


def test_alloc_total_cannot_exceed_max_money(tmp_path: Path) -> None:
    half = MAX_MONEY // 2 + 1
    msg = reject(lambda d: d["chain"].update(genesis_alloc={PK1: half, PK2: half}), tmp_path)
    assert msg.startswith(f"config: chain.genesis_alloc = {2 * half} sat in total: must not exceed {MAX_MONEY}")


def test_alloc_total_at_max_money_accepted(tmp_path: Path) -> None:
    c = build(lambda d: d["chain"].update(genesis_alloc={PK1: MAX_MONEY - 1, PK2: 1}), tmp_path)
    assert c.chain.genesis_supply_sat == MAX_MONEY


def test_alloc_duplicate_key_in_other_case(tmp_path: Path) -> None:
    msg = reject(lambda d: d["chain"].update(genesis_alloc={PK1: 1, PK1.upper(): 2}), tmp_path)
    assert msg.startswith(f"config: duplicate key chain.genesis_alloc.{PK1.upper()}")


def test_alloc_must_be_a_table(tmp_path: Path) -> None:
    msg = reject(lambda d: d["chain"].update(genesis_alloc=[PK1]), tmp_path)
    assert msg == f'config: chain.genesis_alloc = ["{PK1}"]: must be a table'


def test_genesis_alloc_is_sorted_by_pubkey_bytes(tmp_path: Path) -> None:
    alloc = {PK2: 2, PK3: 3, PK1: 1}  # insertion order deliberately unsorted
    c = build(lambda d: d["chain"].update(genesis_alloc=alloc), tmp_path)
    keys = [pk for pk, _ in c.chain.genesis_alloc]
    assert keys == sorted(keys)
    assert all(isinstance(pk, bytes) and len(pk) == 32 for pk in keys)
    assert dict(c.chain.genesis_alloc) == {bytes.fromhex(k): v for k, v in alloc.items()}
    # Same allocations in another order give the same value.
    other = build(lambda d: d["chain"].update(genesis_alloc=dict(reversed(alloc.items()))), tmp_path)
    assert other.chain.genesis_alloc == c.chain.genesis_alloc


def test_mint_authority_only_on_admin_mint_networks(tmp_path: Path) -> None:
    def mainnet(d: dict[str, Any]) -> None:
        d["node"]["network"] = "mainnet"
    assert build(mainnet, tmp_path).chain.mint_authority_key_file is None

    def mainnet_with_key(d: dict[str, Any]) -> None:
        mainnet(d)
        d["chain"]["mint_authority_key_file"] = "mint.key"
    msg = reject(mainnet_with_key, tmp_path)
    assert msg.startswith('config: chain.mint_authority_key_file = "mint.key": network mainnet has no mint authority')


# -- admin token -----------------------------------------------------------------------------------

def test_short_token_rejected_without_echoing_it(tmp_path: Path) -> None:
    msg = reject(lambda d: d["api"].update(admin_token="short-secret"), tmp_path)
    assert msg.startswith("config: api.admin_token = <12 characters, redacted>: must be empty")
    assert "short-secret" not in msg


def test_token_with_whitespace_rejected(tmp_path: Path) -> None:
    msg = reject(lambda d: d["api"].update(admin_token=TOKEN + "\n"), tmp_path)
    assert msg.startswith("config: api.admin_token = <")


def test_empty_token_disables_admin(tmp_path: Path) -> None:
    c = build(lambda d: d["api"].update(admin_token=""), tmp_path)
    assert c.api.admin_token == ""
    assert c.effective()["api"]["admin_token"] is None


def test_env_token_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    env_token = "token-from-the-environment-42"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, env_token)
    assert Config.load(CONFIG_DIR / "local.toml").api.admin_token == env_token


def test_empty_env_token_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "")
    assert Config.load(CONFIG_DIR / "local.toml").api.admin_token == "local-dev-token-change-me-0001"


def test_short_env_token_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "tiny")
    with pytest.raises(ConfigError) as e:
        Config.load(CONFIG_DIR / "local.toml")
    assert str(e.value).startswith(f"config: api.admin_token (from ${ADMIN_TOKEN_ENV}) = <4 characters, redacted>")
    assert "tiny" not in str(e.value)


def test_effective_redacts_token_and_is_json() -> None:
    c = Config.load(CONFIG_DIR / "local.toml")
    eff = c.effective()
    text = json.dumps(eff)
    assert c.api.admin_token not in text
    assert eff["api"]["admin_token"] == "<redacted>"
    assert eff["node"] == {"network": "local", "data_dir": str(c.node.data_dir), "log_level": "INFO"}
    assert eff["chain"]["genesis_alloc"][PK1] == 50_000_000_000
    assert c.api.admin_token not in repr(c)


# -- files and paths -------------------------------------------------------------------------------

def test_relative_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc" / "l2d"
    conf_dir.mkdir(parents=True)
    absolute = tmp_path / "abs" / "snaps"
    (conf_dir / "node.toml").write_text(
        '[node]\nnetwork = "regtest"\ndata_dir = "../data"\n'
        f'[snapshots]\ndir = "{absolute.as_posix()}"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = Config.load(conf_dir / "node.toml")
    assert c.node.data_dir == (tmp_path / "etc" / "data").resolve()
    assert c.snapshots.dir == absolute.resolve()
    assert c.chain.mint_authority_key_file == c.node.data_dir / "mint_authority.key"
    # A relative path to the config file itself is taken from the working directory, as usual.
    monkeypatch.chdir(tmp_path)
    assert Config.load(Path("etc/l2d/node.toml")).node.data_dir == (tmp_path / "etc" / "data").resolve()


def test_unparseable_toml(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[node\nnetwork = ")
    with pytest.raises(ConfigError, match=r"^config: cannot parse .*bad\.toml"):
        Config.load(p)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: cannot read .*nope\.toml"):
        Config.load(tmp_path / "nope.toml")


def test_toml_unknown_key_from_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[node]\nnetwork = "local"\ndata_dir = "d"\n[api]\nprot = 1\n')
    with pytest.raises(ConfigError, match=r"^config: unknown key api\.prot"):
        Config.load(p)


# -- [anchoring] and [bitcoind] ----------------------------------------------------------------------------

def test_anchoring_defaults_off(tmp_path: Path) -> None:
    c = build(lambda d: None, tmp_path)
    a = c.anchoring
    assert (a.enabled, a.mode, a.every_blocks, a.confirmations, a.final_confirmations) == (False, "taproot", 10, 1, 6)
    assert (a.fee_fallback_sat_per_vb, a.fee_max_sat_per_vb, a.poll_interval_ms) == (2, 100, 5000)
    assert c.bitcoind.rpc_url == "" and c.bitcoind.chain == "regtest"


def _bridge(d: dict[str, Any]) -> None:
    d["bridge"] = {"enabled": True, "signer_key_files": ["signer.key"]}


def test_anchoring_needs_the_federation_of_the_bridge(tmp_path: Path) -> None:
    # anchors are paid by the federation's coins and signed k-of-n by its keys: there is no anchor key of its own
    assert reject(lambda d: d.update(anchoring={"enabled": True}), tmp_path) == (
        "config: anchoring.enabled needs bridge.enabled: anchors are paid by the federation's coins and signed k-of-n "
        "by the members' bridge keys (bridge.signer_key_files)")

    def on(d: dict[str, Any]) -> None:
        _bridge(d)
        d["anchoring"] = {"enabled": True, "mode": "op_return", "every_blocks": 2}
    c = build(on, tmp_path)
    assert c.anchoring.enabled and c.anchoring.mode == "op_return" and c.anchoring.every_blocks == 2


@pytest.mark.parametrize("key,value", [("federation_key_file", "fed.key"), ("signer", "key"),
                                       ("rbf_after_blocks", 3)])
def test_the_single_anchor_key_settings_are_gone_and_say_so(tmp_path: Path, key: str, value: Any) -> None:
    def old(d: dict[str, Any]) -> None:
        _bridge(d)
        d["anchoring"] = {"enabled": True, key: value}
    assert reject(old, tmp_path) == (
        f"config: anchoring.{key} was removed: anchors are plans of the federation, signed k-of-n by the members' "
        "bridge keys ([bridge] signer_key_files; fee bumps: bridge.rbf_after_blocks). Delete the key "
        "(docs/anchoring.md)")


@pytest.mark.parametrize("table,msg", [
    ({"enabled": 1}, "config: anchoring.enabled = 1: must be true or false"),
    ({"mode": "opreturn"}, 'config: anchoring.mode = "opreturn": must be one of taproot, op_return'),
    ({"every_blocks": 0}, "config: anchoring.every_blocks = 0: must be an integer between 1 and 10000000"),
    ({"confirmations": 3, "final_confirmations": 2},
     "config: anchoring.final_confirmations = 2: must be at least anchoring.confirmations (3)"),
    ({"fee_fallback_sat_per_vb": 10, "fee_max_sat_per_vb": 5},
     "config: anchoring.fee_max_sat_per_vb = 5: must be at least anchoring.fee_fallback_sat_per_vb (10)"),
    ({"confirmation": 1}, "config: unknown key anchoring.confirmation (did you mean anchoring.confirmations?)"),
])
def test_anchoring_rejections(tmp_path: Path, table: dict[str, Any], msg: str) -> None:
    assert reject(lambda d: d.update(anchoring=table), tmp_path) == msg


G = "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"  # secp256k1's generator


@pytest.mark.parametrize("table,msg", [
    ({"fee_max_sat_per_vb": 10_001},
     "config: bridge.fee_max_sat_per_vb = 10001: must be an integer between 1 and 10000"),
    ({"fee_fallback_sat_per_vb": 10, "fee_max_sat_per_vb": 5},
     "config: bridge.fee_max_sat_per_vb = 5: must be at least bridge.fee_fallback_sat_per_vb (10)"),
    ({"emergency_keys": ["02" + "11" * 31]},
     'config: bridge.emergency_keys = ["02' + "11" * 31 + '"]: must be a list of 66-hex compressed public keys'),
    ({"emergency_keys": ["02" + "11" * 32, "02" + "11" * 32]},
     'config: bridge.emergency_keys = ["02' + "11" * 32 + '", "02' + "11" * 32
     + '"]: must be at most 15 distinct keys'),
    ({"emergency_keys": [G], "emergency_threshold": 2},
     "config: bridge.emergency_threshold = 2: exceeds the number of emergency keys (1)"),
    ({"emergency_delay_blocks": 0},
     "config: bridge.emergency_delay_blocks = 0: must be an integer between 1 and 65535"),
    ({"emergency_threshold": 1}, "config: bridge.emergency_threshold = 1: needs bridge.emergency_keys"),
    ({"emergency_keys": ["02" + "00" * 32]},
     'config: bridge.emergency_keys = ["02' + "00" * 32 + '"]: 02' + "00" * 32 + " is not a point on secp256k1"),
    ({"emergency_keys": [G], "emergency_delay_blocks": 30, "roll_margin_blocks": 30},
     "config: bridge.roll_margin_blocks = 30: must be below bridge.emergency_delay_blocks (30): coins are rolled "
     "before the emergency keys can spend them"),
    ({"roll_margin_blocks": -1}, "config: bridge.roll_margin_blocks = -1: must be an integer between 0 and 65534"),
])
def test_bridge_rejections(tmp_path: Path, table: dict[str, Any], msg: str) -> None:
    """A plan's fee rate is at most 10000 sat/vB in consensus (MAX_FEERATE): a cap above it could never be used; the
    emergency path's keys, threshold and delay are checked before a genesis is written with them."""
    assert reject(lambda d: d.update(bridge=table), tmp_path) == msg


@pytest.mark.parametrize("table,msg", [
    ({"pegout_confirmations": 5}, "config: bridge.pegout_confirmations = 5: must be an integer between 6 and 1000"),
    ({"emergency_keys": [G], "emergency_delay_blocks": 1007},
     "config: bridge.emergency_delay_blocks = 1007: must be an integer between 1008 and 65535"),
])
def test_bridge_floors_on_signet_and_mainnet(tmp_path: Path, table: dict[str, Any], msg: str) -> None:
    """Off the test chains a payout is COMPLETED only 6 deep (a reorg after it would leave the books a change coin
    Bitcoin lacks) and the emergency keys wait at least 1008 blocks (a week; a short delay makes them the owners)."""
    def signet(d: dict[str, Any]) -> None:
        d["node"]["network"] = "signet"
        d.pop("chain", None)
        d.update(bridge=table)
    assert reject(signet, tmp_path) == msg
    local = build(lambda d: d.update(bridge=table), tmp_path).bridge  # the same on local/regtest is taken as is
    for key, value in table.items():
        assert getattr(local, key) == (tuple(bytes.fromhex(k) for k in value) if key == "emergency_keys" else value)


@pytest.mark.parametrize("delay,margin", [(4032, 144), (100, 50), (3, 1), (1, 0)])
def test_the_roll_margin_defaults_to_144_blocks_or_half_the_emergency_delay(tmp_path: Path, delay: int,
                                                                             margin: int) -> None:
    """Half the delay on short test chains; 0 (no rolls: no time to roll) with a 1-block delay."""
    b = build(lambda d: d.update(bridge={"emergency_keys": [G], "emergency_delay_blocks": delay}), tmp_path).bridge
    assert b.roll_margin_blocks == margin


def test_bitcoind_section(tmp_path: Path) -> None:
    c = build(lambda d: d.update(bitcoind={"rpc_url": "http://127.0.0.1:18443/", "cookie_file": "btc/.cookie",
                                           "zmq_hashblock": "tcp://127.0.0.1:28332",
                                           "zmq_sequence": "tcp://127.0.0.1:28333"}), tmp_path)
    b = c.bitcoind
    assert b.rpc_url == "http://127.0.0.1:18443" and b.cookie_file == tmp_path / "btc" / ".cookie"
    assert b.zmq_hashblock == "tcp://127.0.0.1:28332" and b.zmq_rawtx == ""
    assert b.zmq_sequence == "tcp://127.0.0.1:28333"
    c2 = build(lambda d: d.update(bitcoind={"rpc_url": "http://h:1", "rpc_user": "u",
                                            "rpc_password": "secret-pw"}), tmp_path)
    assert "secret-pw" not in repr(c2) and "secret-pw" not in json.dumps(c2.effective())


@pytest.mark.parametrize("table,start", [
    ({"rpc_url": "127.0.0.1:18443", "rpc_user": "u", "rpc_password": "p"}, 'config: bitcoind.rpc_url = "127.0.0.1:18443"'),
    ({"rpc_url": "http://h:1"}, 'config: bitcoind.rpc_url = "http://h:1": needs bitcoind.cookie_file'),
    ({"rpc_user": "u"}, "config: bitcoind.rpc_user and bitcoind.rpc_password must be given together"),
    ({"cookie_file": "c", "rpc_user": "u", "rpc_password": "p"}, 'config: bitcoind.rpc_user = "u": give either'),
    ({"zmq_hashblock": "localhost:28332"}, 'config: bitcoind.zmq_hashblock = "localhost:28332"'),
    ({"wallet": "w"}, "config: unknown key bitcoind.wallet"),
])
def test_bitcoind_rejections(tmp_path: Path, table: dict[str, Any], start: str) -> None:
    assert reject(lambda d: d.update(bitcoind=table), tmp_path).startswith(start)


# -- [store] and the anchored snapshots' keys ------------------------------------------------------------------

def test_store_and_anchored_snapshot_defaults(tmp_path: Path) -> None:
    c = Config.from_dict({"node": {"network": "local", "data_dir": "d"}}, tmp_path, env={})
    assert c.store.map_size == 64 << 30 and c.store.min_free_bytes == 256 << 20
    assert c.snapshots.anchored_keep_final == 2 and c.snapshots.anchored_max_bytes == 4 << 30
    assert c.effective()["store"] == {"map_size": 64 << 30, "min_free_bytes": 256 << 20, "tree_cache_mb": 256}
    assert c.effective()["snapshots"]["anchored_max_bytes"] == 4 << 30


@pytest.mark.parametrize("section,key,value,bounds", [
    ("store", "map_size", (1 << 20) - 1, "1048576 and 1125899906842624"),  # below 1 MiB
    ("store", "map_size", (1 << 50) + 1, "1048576 and 1125899906842624"),
    ("store", "map_size", "64G", "1048576 and 1125899906842624"),
    ("store", "map_size", True, "1048576 and 1125899906842624"),
    ("store", "min_free_bytes", -1, "0 and 1125899906842624"),
    ("store", "min_free_bytes", 1.5, "0 and 1125899906842624"),
    ("snapshots", "anchored_keep_final", -1, "0 and 10000"),
    ("snapshots", "anchored_keep_final", 10_001, "0 and 10000"),
    ("snapshots", "anchored_max_bytes", -1, "0 and 1125899906842624"),
    ("snapshots", "anchored_max_bytes", "4GiB", "0 and 1125899906842624"),
])
def test_store_and_anchored_snapshot_keys_rejected(tmp_path: Path, section: str, key: str, value: object,
                                                   bounds: str) -> None:
    msg = reject(lambda d: d.setdefault(section, {}).update({key: value}), tmp_path)
    assert msg == f"config: {section}.{key} = {json.dumps(value)}: must be an integer between {bounds}"


def test_store_unknown_key_suggests(tmp_path: Path) -> None:
    msg = reject(lambda d: d.update(store={"mapsize": 1 << 30}), tmp_path)
    assert msg == "config: unknown key store.mapsize (did you mean store.map_size?)"
    assert reject(lambda d: d.update(store=[]), tmp_path) == "config: store = []: must be a table"


def test_store_edges_accepted(tmp_path: Path) -> None:
    def edges(d: dict[str, Any]) -> None:
        d["store"] = {"map_size": 1 << 20, "min_free_bytes": 0}
        d["snapshots"] = {"anchored_keep_final": 0, "anchored_max_bytes": 0}
    c = build(edges, tmp_path)
    assert (c.store.map_size, c.store.min_free_bytes) == (1 << 20, 0)
    assert (c.snapshots.anchored_keep_final, c.snapshots.anchored_max_bytes) == (0, 0)


# -- chain.mint_authority_key ----------------------------------------------------------------------------

def test_mint_authority_key_instead_of_the_file(tmp_path: Path) -> None:
    c = build(lambda d: d["chain"].update(mint_authority_key=PK2), tmp_path)
    assert c.chain.mint_authority_key == bytes.fromhex(PK2) and c.chain.mint_authority_key_file is None
    assert c.effective()["chain"]["mint_authority_key"] == PK2
    # Neither given on local: the default file, as before.
    default = build(lambda d: None, tmp_path)
    assert default.chain.mint_authority_key is None
    assert default.chain.mint_authority_key_file == default.node.data_dir / "mint_authority.key"


@pytest.mark.parametrize("chain,network,start", [
    ({"mint_authority_key": PK2, "mint_authority_key_file": "m.key"}, "local",
     f'config: chain.mint_authority_key = "{PK2}": give either chain.mint_authority_key or '
     f'chain.mint_authority_key_file, not both'),
    ({"mint_authority_key": OFF_CURVE}, "local",
     f'config: chain.mint_authority_key = "{OFF_CURVE}": must be a 64-hex-character x-only'),
    ({"mint_authority_key": PK2[:62]}, "regtest",
     f'config: chain.mint_authority_key = "{PK2[:62]}": must be a 64-hex-character x-only'),
    ({"mint_authority_key": 5}, "local", "config: chain.mint_authority_key = 5: must be a 64-hex"),
    ({"mint_authority_key": PK2}, "signet",
     f'config: chain.mint_authority_key = "{PK2}": network signet has no mint authority'),
])
def test_mint_authority_key_rejections(tmp_path: Path, chain: dict[str, Any], network: str, start: str) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["node"]["network"] = network
        d["chain"].update(chain)
    assert reject(mutate, tmp_path).startswith(start)


# -- [federation] ----------------------------------------------------------------------------------------

def member_key(i: int) -> str:
    return PrivateKey(hashlib.sha256(b"member %d" % i).digest()).public_key_xonly.format().hex()


def members(n: int) -> list[dict[str, Any]]:
    return [{"id": f"m{i}", "key": member_key(i), "url": f"http://127.0.0.1:{9000 + i}"} for i in range(n)]


def with_federation(**table: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(federation=table)


def test_federation_defaults_to_this_daemon_alone(tmp_path: Path) -> None:
    f = build(lambda d: None, tmp_path).federation
    assert f.members is None and f.threshold == 1
    assert f.key_file == (tmp_path / "data" / "member.key").resolve()
    assert (f.round_ms, f.max_round_ms, f.max_clock_drift_ms) == (2000, 30_000, 2000)
    assert Config.load(CONFIG_DIR / "local.toml").federation.members is None  # `make run`: 1 of 1


def test_federation_members_parsed(tmp_path: Path) -> None:
    listed = members(4)
    listed[1]["url"] = "https://[::1]:8443/"
    c = build(with_federation(members=listed, key_file="keys/me.key", round_ms=500, max_round_ms=4000,
                              max_clock_drift_ms=0), tmp_path)
    f = c.federation
    assert f.members is not None
    assert [(m.id, m.key.hex(), m.url) for m in f.members] == [
        ("m0", member_key(0), "http://127.0.0.1:9000"), ("m1", member_key(1), "https://[::1]:8443"),
        ("m2", member_key(2), "http://127.0.0.1:9002"), ("m3", member_key(3), "http://127.0.0.1:9003")]
    assert f.key_file == (tmp_path / "keys" / "me.key").resolve()
    assert (f.threshold, f.round_ms, f.max_round_ms, f.max_clock_drift_ms) == (3, 500, 4000, 0)
    eff = json.loads(json.dumps(c.effective()))["federation"]
    assert eff["members"][1] == {"id": "m1", "key": member_key(1), "url": "https://[::1]:8443"}
    assert eff["threshold"] == 3


@pytest.mark.parametrize("n,m", [(1, 1), (2, 2), (3, 3), (4, 3), (7, 5), (15, 11), (64, 43)])
def test_federation_default_threshold(tmp_path: Path, n: int, m: int) -> None:
    assert build(with_federation(members=members(n)), tmp_path).federation.threshold == m


@pytest.mark.parametrize("n,m", [(4, 4), (5, 3), (1, 1)])
def test_federation_threshold_accepted(tmp_path: Path, n: int, m: int) -> None:
    assert build(with_federation(members=members(n), threshold=m), tmp_path).federation.threshold == m


@pytest.mark.parametrize("n,m", [(4, 2), (4, 5), (3, 1), (2, 1), (0, 2)])
def test_federation_threshold_refused(tmp_path: Path, n: int, m: int) -> None:
    table: dict[str, Any] = {"threshold": m} if n == 0 else {"threshold": m, "members": members(n)}
    msg = reject(with_federation(**table), tmp_path)
    shown_n = max(n, 1)  # no members: this daemon alone
    assert msg.startswith(f"config: federation.threshold = {m}: must be above n/2 = {shown_n / 2:g} and at most "
                          f"n = {shown_n} members: two blocks signed by m members at one height must share a signer")
    assert "n >= 4 is needed to tolerate one" in msg


@pytest.mark.parametrize("table,start", [
    ({"threshold": 0}, "config: federation.threshold = 0: must be an integer between 1 and 64"),
    ({"threshold": True}, "config: federation.threshold = true: must be an integer"),
    ({"round_ms": 10}, "config: federation.round_ms = 10: must be an integer between 50 and 600000"),
    ({"round_ms": 3000, "max_round_ms": 2000},
     "config: federation.max_round_ms = 2000: must be at least federation.round_ms (3000)"),
    ({"max_round_ms": "30s"}, 'config: federation.max_round_ms = "30s": must be an integer'),
    ({"max_clock_drift_ms": -1}, "config: federation.max_clock_drift_ms = -1: must be an integer between 0"),
    ({"key_file": ""}, 'config: federation.key_file = "": must be a non-empty path string'),
    ({"members": []}, "config: federation.members = []: must be a non-empty array of tables"),
    ({"members": {"id": "a"}}, 'config: federation.members = {"id": "a"}: must be a non-empty array'),
    ({"members": ["m0"]}, 'config: federation.members = ["m0"]: must be a non-empty array'),
    ({"members": members(65)}, "config: federation.members = \"<65 members>\": a federation has 1..64 members"),
    ({"memebrs": []}, "config: unknown key federation.memebrs (did you mean federation.members?)"),
])
def test_federation_rejections(tmp_path: Path, table: dict[str, Any], start: str) -> None:
    assert reject(with_federation(**table), tmp_path).startswith(start)


ID_RULE = "must be 1..64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
URL_RULE = "must be the base URL of the member's API: http:// or https://, host and port"


@pytest.mark.parametrize("field,value,why", [
    ("id", "", ID_RULE), ("id", "-m", ID_RULE), ("id", "a b", ID_RULE), ("id", "x" * 65, ID_RULE),
    ("id", "é", ID_RULE), ("id", 7, "must be a string"),
    ("key", OFF_CURVE, "must be a 64-hex-character x-only secp256k1 public key"),
    ("key", PK1[:-2], "must be a 64-hex-character x-only secp256k1 public key"),
    ("key", "02" + PK1, "must be a 64-hex-character x-only secp256k1 public key"),
    ("url", "ftp://127.0.0.1:9001", URL_RULE), ("url", "http://127.0.0.1", URL_RULE),
    ("url", "http://127.0.0.1:99999", URL_RULE), ("url", "http://127.0.0.1:9001/api", URL_RULE),
    ("url", "http://u:p@127.0.0.1:9001", URL_RULE), ("url", "http://127.0.0.1:9001?x=1", URL_RULE),
    ("url", "http://:9001", URL_RULE), ("url", "127.0.0.1:9001", URL_RULE), ("url", " http://h:1", URL_RULE),
])
def test_federation_member_rejections(tmp_path: Path, field: str, value: object, why: str) -> None:
    listed = members(4)
    listed[1][field] = value
    msg = reject(with_federation(members=listed), tmp_path)
    assert msg.startswith(f"config: federation.members[1].{field} = {json.dumps(value, ensure_ascii=False)}: {why}")


@pytest.mark.parametrize("field", ["id", "key", "url"])
def test_federation_member_fields_unique(tmp_path: Path, field: str) -> None:
    listed = members(4)
    listed[3][field] = listed[1][field]
    msg = reject(with_federation(members=listed), tmp_path)
    assert msg == (f"config: federation.members[3].{field} = {json.dumps(listed[1][field])}: the same as "
                   f"federation.members[1].{field} (each member has its own)")


def test_federation_member_fields_required_and_known(tmp_path: Path) -> None:
    listed = members(2)
    del listed[0]["url"]
    assert reject(with_federation(members=listed), tmp_path) == "config: missing required key federation.members[0].url"
    listed = members(2)
    listed[1]["ulr"] = "x"
    assert reject(with_federation(members=listed), tmp_path).startswith(
        "config: unknown key federation.members[1].ulr (did you mean federation.members[1].url?)")


def test_federation_from_toml_array_of_tables(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[node]\nnetwork = "regtest"\ndata_dir = "d"\n[federation]\nthreshold = 2\n'
                 + "".join(f'[[federation.members]]\nid = "m{i}"\nkey = "{member_key(i)}"\n'
                           f'url = "http://10.0.0.{i + 1}:8661"\n' for i in range(3)))
    f = Config.load(p).federation
    assert f.members is not None and [m.id for m in f.members] == ["m0", "m1", "m2"] and f.threshold == 2
