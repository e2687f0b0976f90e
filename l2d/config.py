"""The daemon's one validated, immutable configuration object, built from a TOML file."""
from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from coincurve import PublicKey, PublicKeyXOnly

from .core.chains import btc_chain
from .core.errors import InvalidMembership
from .core.genesis_file import MEMBER_ID_RULE, valid_member_id
from .core.members import MAX_MEMBERS, Membership, default_threshold
from .core.params import MAX_MONEY, NETWORKS, network_by_name
from .core.pegs_tx import MAX_FEERATE

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV: Final = "L2D_ADMIN_TOKEN"
MIN_ADMIN_TOKEN_LEN: Final = 16
MAX_BODY_LIMIT: Final = 10 * 1024 * 1024
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
REDACTED: Final = "<redacted>"
# A millisecond Unix timestamp: the lower bound (2001-09-09) catches seconds given by mistake,
# the upper bound is the end of year 9999.
MIN_TIMESTAMP_MS: Final = 1_000_000_000_000
MAX_TIMESTAMP_MS: Final = 253_402_300_799_999
DEFAULT_GENESIS_TIMESTAMP_MS: Final = 1_767_225_600_000  # 2026-01-01T00:00:00Z
_HEX64: Final = re.compile(r"[0-9a-fA-F]{64}")
MIB: Final = 1 << 20
GIB: Final = 1 << 30
MAX_BYTES: Final = 1 << 50  # 1 PiB: the bound of every byte-count key
MIN_MAP_SIZE: Final = 1 * MIB  # an LMDB map below this cannot hold a ledger worth the name


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


_REQUIRED: Final = object()  # sentinel: the key has no default


def _show(value: object) -> str:
    """A value as the user would write it in TOML/JSON (strings quoted, booleans lower-case)."""
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


class _Section:
    """One TOML table being read: typed getters that name the dotted key in every error."""

    def __init__(self, name: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
        self.name = name
        self.data = data
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            key = unknown[0]
            hint = difflib.get_close_matches(key, allowed, n=1)
            suffix = f" (did you mean {self.dotted(hint[0])}?)" if hint else ""
            raise ConfigError(f"config: unknown key {self.dotted(key)}{suffix}")

    def dotted(self, key: str) -> str:
        return f"{self.name}.{key}"

    def fail(self, key: str, value: object, why: str) -> ConfigError:
        return ConfigError(f"config: {self.dotted(key)} = {_show(value)}: {why}")

    def raw(self, key: str, default: object) -> object:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise ConfigError(f"config: missing required key {self.dotted(key)}")
        return default

    def get_int(self, key: str, lo: int, hi: int, default: object = _REQUIRED) -> int:
        value = self.raw(key, default)
        # bool is a subclass of int: `true` must not pass for 1.
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise self.fail(key, value, f"must be an integer between {lo} and {hi}")
        return value

    def get_str(self, key: str, default: object = _REQUIRED) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.fail(key, value, "must be a string")
        return value

    def get_choice(self, key: str, choices: tuple[str, ...], default: object = _REQUIRED,
               fold_case: bool = False) -> str:
        value = self.get_str(key, default)
        norm = value.upper() if fold_case else value
        if norm not in choices:
            raise self.fail(key, value, f"must be one of {', '.join(choices)}")
        return norm

    def get_path(self, key: str, base_dir: Path, default: object = _REQUIRED) -> Path:
        value = self.raw(key, default)
        if isinstance(value, Path):  # defaults are already resolved
            return value
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise self.fail(key, value, "must be a non-empty path string")
        return _resolve(Path(value).expanduser(), base_dir)

    def get_table(self, key: str) -> Mapping[str, Any]:
        value = self.raw(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, value, "must be a table")
        return value


def _resolve(p: Path, base_dir: Path) -> Path:
    """Relative paths are relative to the config file's directory, never to the working directory."""
    return (p if p.is_absolute() else base_dir / p).resolve()


@dataclass(frozen=True, slots=True)
class NodeConfig:
    network: str  # one of l2d.core.params.NETWORKS
    data_dir: Path  # absolute
    log_level: str  # upper-case logging level name


@dataclass(frozen=True, slots=True)
class ChainConfig:
    genesis_timestamp_ms: int
    min_fee_sat: int  # consensus minimum fee per transaction
    genesis_alloc: tuple[tuple[bytes, int], ...]  # (x-only pubkey, sats), sorted by pubkey
    mint_authority_key_file: Path | None  # absolute; None on networks without an admin mint, or with the key below
    mint_authority_key: bytes | None = None  # x-only public key given instead of the file (this node cannot mint)

    @property
    def genesis_supply_sat(self) -> int:
        return sum(amount for _, amount in self.genesis_alloc)


@dataclass(frozen=True, slots=True)
class BlockConfig:
    interval_ms: int
    max_txs: int


@dataclass(frozen=True, slots=True)
class MempoolConfig:
    max_txs: int
    max_per_sender: int
    min_fee_sat: int  # relay policy; never below chain.min_fee_sat


@dataclass(frozen=True, slots=True)
class ApiConfig:
    host: str
    port: int  # 0 = let the OS pick a free port (tests)
    admin_token: str  # "" = admin endpoints disabled
    max_body_bytes: int
    # Limits against hostile clients (l2d/api/server.py): open connections beyond max_connections are refused at
    # once; a request header must arrive within header_timeout_ms of its first byte (or of connecting), its body
    # within body_timeout_ms of the header; an idle keep-alive connection is closed after keepalive_timeout_ms.
    max_connections: int
    header_timeout_ms: int
    body_timeout_ms: int
    keepalive_timeout_ms: int
    # Writes and large downloads per client (its address, or the admin token's holder) and second, in bursts of
    # rate_limit_burst; 0 = no limit (l2d/api/limits.py).
    rate_limit_per_s: int = 0
    rate_limit_burst: int = 1
    # Processes checking the signatures of batch submissions (POST /api/l2/txs, l2d/sigpool.py); 0 = in the loop.
    signature_workers: int = 0
    # Read-only API processes serving GET /api/l2/accounts/{id} on read_port from the ledger's LMDB (l2d/readapi.py),
    # beside the main API; 0 = none.
    read_workers: int = 0
    read_port: int = 0

    def __repr__(self) -> str:  # keep the token out of tracebacks and debug logs
        token = REDACTED if self.admin_token else ""
        return (f"ApiConfig(host={self.host!r}, port={self.port}, admin_token={token!r}, "
                f"max_body_bytes={self.max_body_bytes}, max_connections={self.max_connections}, "
                f"header_timeout_ms={self.header_timeout_ms}, body_timeout_ms={self.body_timeout_ms}, "
                f"keepalive_timeout_ms={self.keepalive_timeout_ms})")


@dataclass(frozen=True, slots=True)
class SnapshotConfig:
    dir: Path  # absolute
    every_blocks: int  # 0 = no periodic snapshots
    keep: int
    anchored_keep_final: int  # anchored snapshots kept for FINAL anchors (the newest N)
    anchored_max_bytes: int  # byte budget of <dir>/anchored (oldest deleted first); 0 = none written


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """[store]: the LMDB environments (ledger, Bitcoin headers) and the free-space floor of the data dir."""

    map_size: int  # bytes: the most each LMDB environment may hold (sparse: only what is used takes disk)
    min_free_bytes: int  # below this free space on the data dir's filesystem new transactions get 503; 0 = off
    tree_cache_mb: int  # MiB of recently written state-tree nodes the block executor keeps in memory


ANCHOR_MODES: Final = ("taproot", "op_return")
_ANCHOR_KEY_MODE: Final = ("federation_key_file", "signer", "rbf_after_blocks")  # removed [anchoring] keys


@dataclass(frozen=True, slots=True)
class AnchoringConfig:
    """[anchoring]: commit every K-th L2 block's state root to Bitcoin (anchoring/service.py)."""

    enabled: bool
    mode: str  # "taproot" | "op_return"
    every_blocks: int  # anchor L2 heights that are multiples of K
    confirmations: int  # SUBMITTED -> CONFIRMED at this many Bitcoin confirmations
    final_confirmations: int  # CONFIRMED -> FINAL
    fee_fallback_sat_per_vb: int  # the rate an anchor plan is proposed at when estimatesmartfee has no estimate
    fee_max_sat_per_vb: int  # cap on the rate an anchor plan is proposed at (fee bumps: bridge.rbf_after_blocks)
    poll_interval_ms: int  # RPC poll fallback when ZMQ is silent or not configured


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """[bridge]: the m-of-n federation (a genesis parameter), peg-in depth and peg-out payment (docs/bridge.md)."""

    enabled: bool
    threshold: int  # m
    signer_key_files: tuple[Path, ...]  # the federation keys this daemon signs with (absolute paths)
    other_keys: tuple[bytes, ...]  # 33-byte compressed keys of members whose keys live elsewhere
    pegin_min_depth: int  # confirmations a deposit needs before it can be claimed
    pegout_confirmations: int  # a payout is COMPLETED at this many Bitcoin confirmations
    rbf_after_blocks: int
    fee_fallback_sat_per_vb: int
    fee_max_sat_per_vb: int
    poll_interval_ms: int
    header_start_height: int  # the header store (and the relay) start here: a trusted checkpoint
    header_start_hash: bytes | None  # its block hash (internal order); None = bitcoind's block at that height
    emergency_keys: tuple[bytes, ...] = ()  # 33-byte keys that may spend a coin emergency_delay_blocks old
    emergency_threshold: int = 0  # of them (0: no emergency path)
    emergency_delay_blocks: int = 4032  # BIP68 relative lock of the emergency path (about 4 weeks)
    roll_margin_blocks: int = 144  # coins are rolled at emergency_delay_blocks - this many confirmations (0: never)


@dataclass(frozen=True, slots=True)
class BitcoindConfig:
    """[bitcoind]: how to reach bitcoind; rpc_url "" = no bitcoind (anchors are built but not broadcast)."""

    rpc_url: str
    cookie_file: Path | None
    rpc_user: str
    rpc_password: str
    zmq_hashblock: str  # "" = no ZMQ, poll only
    zmq_sequence: str  # "" = none; block disconnects (reorgs) come only through this topic, not hashblock
    zmq_rawtx: str
    chain: str  # the bitcoind chain this network anchors to ("regtest", "signet", "main")

    def __repr__(self) -> str:  # keep the password out of tracebacks and debug logs
        pw = REDACTED if self.rpc_password else ""
        return (f"BitcoindConfig(rpc_url={self.rpc_url!r}, cookie_file={self.cookie_file!r}, "
                f"rpc_user={self.rpc_user!r}, rpc_password={pw!r}, zmq_hashblock={self.zmq_hashblock!r}, "
                f"zmq_sequence={self.zmq_sequence!r}, zmq_rawtx={self.zmq_rawtx!r}, chain={self.chain!r})")


ORCHESTRATION_STRATEGIES: Final = ("weighted", "round_robin", "least_loaded", "lowest_latency",
                                   "highest_reputation", "lowest_cost")
SCORE_COMPONENTS: Final = ("reputation", "latency", "capacity", "cost", "region", "green")
_PPM: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class OrchestrationConfig:
    """[orchestration]: the federation's task coordinator (orchestration/service.py, docs/orchestration.md).

    Fractions are held in parts per million (exact: a config value must be a multiple of 1e-6).
    """

    enabled: bool
    strategy: str  # one of ORCHESTRATION_STRATEGIES
    weights_ppm: tuple[tuple[str, int], ...]  # (component, ppm) in SCORE_COMPONENTS order, summing to 1_000_000
    audit_rate_ppm: int  # share of tasks also run by an independent verifier
    timeout_blocks: int  # a role's result is due this many L2 blocks after it was handed out
    challenge_window_blocks: int
    worker_share_ppm: int  # settlement split of the bounty (the three sum to 1_000_000)
    verifier_share_ppm: int
    treasury_share_ppm: int
    slash_ppm: int  # share of the losing side's stake slashed in a dispute
    slash_challenger_ppm: int  # share of the slashed amount paid to the winning side (the rest is burned)
    min_reputation_ppm: int  # never assign below this reputation
    min_stake_sat: int
    heartbeat_timeout_blocks: int  # not scheduled when the last heartbeat is older
    heartbeat_grace_blocks: int  # a party silent this long may be replaced before its deadline (0 = never)
    probe_interval_ms: int  # latency/health probe of each worker's endpoint
    probe_failures: int  # consecutive failed probes that take a worker off the schedule
    probe_private_endpoints: bool  # probe endpoints on loopback/private/link-local addresses (local/regtest only)
    preferred_region: str  # "" = none
    poll_interval_ms: int


@dataclass(frozen=True, slots=True)
class FederationMember:
    """One [[federation.members]] entry; its member index is its position in the list."""

    id: str  # l2d.core.genesis_file.MEMBER_ID_RULE
    key: bytes  # 32-byte x-only BIP340 block-signing public key
    url: str  # base URL of its API: "http(s)://host:port", no trailing slash


@dataclass(frozen=True, slots=True)
class FederationConfig:
    """[federation]: the members that sign blocks, this member's key file, the threshold m and round timing
    (docs/federation.md). members None = a 1-member federation of this daemon's own key (resolved with the key in
    l2d/genesis.py), as `make run` uses."""

    key_file: Path  # absolute: this member's BIP340 block-signing secret
    members: tuple[FederationMember, ...] | None  # in member-index order; None = just this daemon
    threshold: int  # m: n/2 < m <= n (1 when members is None)
    round_ms: int  # length of a round's first attempt
    max_round_ms: int  # cap on a round's length as it grows after failed rounds
    max_clock_drift_ms: int  # signing policy: a proposal's timestamp may be at most this far ahead of my clock


_SECTIONS: Final = ("node", "chain", "block", "mempool", "api", "snapshots", "anchoring", "bitcoind", "bridge",
                       "orchestration", "store", "federation", "netflow")


@dataclass(frozen=True, slots=True)
class NetflowConfig:
    """[netflow]: this member's probing duty (netflow/prober.py): it downloads probe_bytes through each NetFlow relay
    from a sink of its own, paying like any client, and posts the measurements (RelayWeights)."""

    probe: bool
    probe_interval_ms: int
    probe_bytes: int
    probe_timeout_ms: int
    probe_deposit_sat: int  # escrowed per relay session the prober opens
    sink_host: str  # where the sink listens: relays must reach it (an IP literal)


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig
    chain: ChainConfig
    block: BlockConfig
    mempool: MempoolConfig
    api: ApiConfig
    snapshots: SnapshotConfig
    anchoring: AnchoringConfig
    bitcoind: BitcoindConfig
    source: Path | None  # the TOML file it was loaded from; None when built from a dict
    bridge: BridgeConfig = None  # type: ignore[assignment]  # always set by from_dict
    orchestration: OrchestrationConfig = None  # type: ignore[assignment]  # always set by from_dict
    store: StoreConfig = None  # type: ignore[assignment]  # always set by from_dict
    federation: FederationConfig = None  # type: ignore[assignment]  # always set by from_dict
    netflow: NetflowConfig = None  # type: ignore[assignment]  # always set by from_dict

    @classmethod
    def load(cls, path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
        """Read and validate a TOML config file; relative paths in it resolve against its directory."""
        source = Path(path).expanduser().resolve()
        try:
            with source.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config: cannot read {source}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: cannot parse {source}: {e}") from None
        return cls.from_dict(data, source.parent, env=env, source=source)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], base_dir: str | os.PathLike[str],
                  env: Mapping[str, str] | None = None, source: Path | None = None) -> Config:
        """Validate a parsed config; `env` defaults to os.environ (for $L2D_ADMIN_TOKEN)."""
        base = Path(base_dir).expanduser().resolve()
        env = os.environ if env is None else env
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: top level = {_show(d)}: must be a table")
        unknown = sorted(set(d) - set(_SECTIONS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], _SECTIONS, n=1)
            suffix = f" (did you mean {hint[0]}?)" if hint else ""
            raise ConfigError(f"config: unknown key {unknown[0]}{suffix}")
        tables: dict[str, Mapping[str, Any]] = {}
        for name in _SECTIONS:
            value = d.get(name, {})
            if not isinstance(value, Mapping):
                raise ConfigError(f"config: {name} = {_show(value)}: must be a table")
            tables[name] = value

        node = _node(tables["node"], base)
        chain = _chain(tables["chain"], base, node)
        block = _block(tables["block"])
        mempool = _mempool(tables["mempool"], chain)
        api = _api(tables["api"], env)
        snapshots = _snapshots(tables["snapshots"], base, node)
        anchoring = _anchoring(tables["anchoring"])
        bitcoind = _bitcoind(tables["bitcoind"], base, node)
        bridge = _bridge(tables["bridge"], base, node, anchoring)
        orchestration = _orchestration(tables["orchestration"], node)
        store = _store(tables["store"])
        federation = _federation(tables["federation"], base, node)
        netflow = _netflow(tables["netflow"])
        return cls(node, chain, block, mempool, api, snapshots, anchoring, bitcoind, source, bridge=bridge,
                   orchestration=orchestration, store=store, federation=federation, netflow=netflow)

    def effective(self) -> dict[str, Any]:
        """The effective configuration as a JSON-able dict, admin token redacted (for the start-up log)."""
        c = self.chain
        return {
            "source": None if self.source is None else str(self.source),
            "node": {"network": self.node.network, "data_dir": str(self.node.data_dir),
                     "log_level": self.node.log_level},
            "chain": {
                "genesis_timestamp_ms": c.genesis_timestamp_ms,
                "min_fee_sat": c.min_fee_sat,
                "genesis_alloc": {pk.hex(): amount for pk, amount in c.genesis_alloc},
                "mint_authority_key_file": (None if c.mint_authority_key_file is None
                                            else str(c.mint_authority_key_file)),
                "mint_authority_key": None if c.mint_authority_key is None else c.mint_authority_key.hex(),
            },
            "block": {"interval_ms": self.block.interval_ms, "max_txs": self.block.max_txs},
            "mempool": {"max_txs": self.mempool.max_txs, "max_per_sender": self.mempool.max_per_sender,
                        "min_fee_sat": self.mempool.min_fee_sat},
            "api": {"host": self.api.host, "port": self.api.port,
                    "admin_token": REDACTED if self.api.admin_token else None,
                    "max_body_bytes": self.api.max_body_bytes, "max_connections": self.api.max_connections,
                    "header_timeout_ms": self.api.header_timeout_ms, "body_timeout_ms": self.api.body_timeout_ms,
                    "keepalive_timeout_ms": self.api.keepalive_timeout_ms,
                    "rate_limit_per_s": self.api.rate_limit_per_s, "rate_limit_burst": self.api.rate_limit_burst,
                    "signature_workers": self.api.signature_workers, "read_workers": self.api.read_workers,
                    "read_port": self.api.read_port},
            "snapshots": {"dir": str(self.snapshots.dir), "every_blocks": self.snapshots.every_blocks,
                          "keep": self.snapshots.keep, "anchored_keep_final": self.snapshots.anchored_keep_final,
                          "anchored_max_bytes": self.snapshots.anchored_max_bytes},
            "store": {"map_size": self.store.map_size, "min_free_bytes": self.store.min_free_bytes,
                      "tree_cache_mb": self.store.tree_cache_mb},
            "anchoring": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in ((f, getattr(self.anchoring, f)) for f in AnchoringConfig.__slots__)},
            "bridge": {k: ([str(x) for x in v] if isinstance(v, tuple) and k == "signer_key_files"
                           else [x.hex() for x in v] if isinstance(v, tuple)
                           else v[::-1].hex() if isinstance(v, bytes) else v)
                       for k, v in ((f, getattr(self.bridge, f)) for f in BridgeConfig.__slots__)},
            "orchestration": {k: (dict(v) if k == "weights_ppm" else v) for k, v in
                              ((f, getattr(self.orchestration, f)) for f in OrchestrationConfig.__slots__)},
            "netflow": {f: getattr(self.netflow, f) for f in NetflowConfig.__slots__},
            "bitcoind": {"rpc_url": self.bitcoind.rpc_url,
                         "cookie_file": None if self.bitcoind.cookie_file is None else str(self.bitcoind.cookie_file),
                         "rpc_user": self.bitcoind.rpc_user,
                         "rpc_password": REDACTED if self.bitcoind.rpc_password else None,
                         "zmq_hashblock": self.bitcoind.zmq_hashblock, "zmq_sequence": self.bitcoind.zmq_sequence,
                         "zmq_rawtx": self.bitcoind.zmq_rawtx,
                         "chain": self.bitcoind.chain},
            "federation": {
                "key_file": str(self.federation.key_file), "threshold": self.federation.threshold,
                "members": (None if self.federation.members is None else
                            [{"id": m.id, "key": m.key.hex(), "url": m.url} for m in self.federation.members]),
                "round_ms": self.federation.round_ms, "max_round_ms": self.federation.max_round_ms,
                "max_clock_drift_ms": self.federation.max_clock_drift_ms},
        }


def _node(t: Mapping[str, Any], base: Path) -> NodeConfig:
    s = _Section("node", t, ("network", "data_dir", "log_level"))
    return NodeConfig(
        network=s.get_choice("network", tuple(NETWORKS)),
        data_dir=s.get_path("data_dir", base),
        log_level=s.get_choice("log_level", LOG_LEVELS, default="INFO", fold_case=True),
    )


def _chain(t: Mapping[str, Any], base: Path, node: NodeConfig) -> ChainConfig:
    s = _Section("chain", t, ("genesis_timestamp_ms", "min_fee_sat", "genesis_alloc",
                              "mint_authority_key_file", "mint_authority_key"))
    timestamp = s.get_int("genesis_timestamp_ms", MIN_TIMESTAMP_MS, MAX_TIMESTAMP_MS,
                      default=DEFAULT_GENESIS_TIMESTAMP_MS)
    min_fee = s.get_int("min_fee_sat", 0, MAX_MONEY, default=1)

    alloc: dict[bytes, int] = {}
    table = s.get_table("genesis_alloc")
    a = _Section("chain.genesis_alloc", table, tuple(table))
    total = 0
    for key_hex, amount in table.items():
        try:
            if not _HEX64.fullmatch(key_hex):
                raise ValueError(key_hex)
            pubkey = bytes.fromhex(key_hex)
            PublicKeyXOnly(pubkey)  # a key off the curve could never spend its allocation
        except ValueError:
            raise a.fail(key_hex, amount, "the key must be a 64-hex-character x-only secp256k1 "
                         "public key") from None
        if pubkey in alloc:
            raise ConfigError(f"config: duplicate key {a.dotted(key_hex)} (same public key listed twice)")
        alloc[pubkey] = a.get_int(key_hex, 1, MAX_MONEY)
        total += alloc[pubkey]
        if total > MAX_MONEY:
            raise ConfigError(f"config: chain.genesis_alloc = {total} sat in total: must not exceed "
                              f"{MAX_MONEY} (21 million BTC)")

    mint_default: object = node.data_dir / "mint_authority.key"
    mint_file: Path | None = None
    mint_key: bytes | None = None
    if not NETWORKS[node.network].admin_mint:
        for key in ("mint_authority_key_file", "mint_authority_key"):
            if key in t:
                raise s.fail(key, t[key], f"network {node.network} has no mint authority; remove this key")
    elif "mint_authority_key" in t:
        # A member that does not hold the mint secret still computes the same genesis state.
        if "mint_authority_key_file" in t:
            raise s.fail("mint_authority_key", t["mint_authority_key"],
                         "give either chain.mint_authority_key or chain.mint_authority_key_file, not both")
        mint_key = _xonly_key(s, "mint_authority_key")
    else:
        mint_file = s.get_path("mint_authority_key_file", base, default=mint_default)

    return ChainConfig(
        genesis_timestamp_ms=timestamp,
        min_fee_sat=min_fee,
        genesis_alloc=tuple(sorted(alloc.items())),
        mint_authority_key_file=mint_file,
        mint_authority_key=mint_key,
    )


def _xonly_key(s: _Section, key: str) -> bytes:
    """A required 64-hex x-only secp256k1 public key on the curve."""
    value = s.raw(key, _REQUIRED)
    try:
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise ValueError(value)
        PublicKeyXOnly(bytes.fromhex(value))
    except ValueError:
        raise s.fail(key, value, "must be a 64-hex-character x-only secp256k1 public key") from None
    return bytes.fromhex(value)


def _block(t: Mapping[str, Any]) -> BlockConfig:
    s = _Section("block", t, ("interval_ms", "max_txs"))
    return BlockConfig(
        interval_ms=s.get_int("interval_ms", 10, 3_600_000, default=1000),
        max_txs=s.get_int("max_txs", 1, 100_000, default=1000),
    )


def _mempool(t: Mapping[str, Any], chain: ChainConfig) -> MempoolConfig:
    s = _Section("mempool", t, ("max_txs", "max_per_sender", "min_fee_sat"))
    max_txs = s.get_int("max_txs", 1, 1_000_000, default=10_000)
    return MempoolConfig(
        max_txs=max_txs,
        max_per_sender=s.get_int("max_per_sender", 1, max_txs, default=min(64, max_txs)),
        # Relaying below the consensus minimum would only fill the pool with unminable txs.
        min_fee_sat=s.get_int("min_fee_sat", chain.min_fee_sat, MAX_MONEY, default=chain.min_fee_sat),
    )


def _api(t: Mapping[str, Any], env: Mapping[str, str]) -> ApiConfig:
    s = _Section("api", t, ("host", "port", "admin_token", "max_body_bytes", "max_connections", "header_timeout_ms",
                            "body_timeout_ms", "keepalive_timeout_ms", "rate_limit_per_s", "rate_limit_burst",
                            "signature_workers", "read_workers", "read_port"))
    host = s.get_str("host", default="127.0.0.1")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise s.fail("host", host, "must be an IP address literal (e.g. 127.0.0.1, ::1) "
                         "or localhost") from None
    port = s.get_int("port", 0, 65535, default=8650)
    read_workers = s.get_int("read_workers", 0, 64, default=0)
    read_port = s.get_int("read_port", 0, 65535, default=0)
    if read_workers and (read_port == 0 or read_port == port):
        raise s.fail("read_port", read_port, "must be a port of its own (not 0, not api.port) when "
                     "api.read_workers is set")

    token = s.get_str("admin_token", default="")
    where = "api.admin_token"
    env_token = env.get(ADMIN_TOKEN_ENV, "")
    if env_token:  # an empty variable counts as unset, so `export L2D_ADMIN_TOKEN=` cannot disable auth
        token, where = env_token, f"api.admin_token (from ${ADMIN_TOKEN_ENV})"
    # The value itself is a secret: the error shows its length, never its characters.
    if token and (len(token) < MIN_ADMIN_TOKEN_LEN or token != token.strip()):
        raise ConfigError(f"config: {where} = <{len(token)} characters, redacted>: must be empty (admin "
                          f"API disabled) or at least {MIN_ADMIN_TOKEN_LEN} characters without "
                          "surrounding whitespace")

    return ApiConfig(
        host=host,
        port=port,
        admin_token=token,
        max_body_bytes=s.get_int("max_body_bytes", 1, MAX_BODY_LIMIT, default=1024 * 1024),
        max_connections=s.get_int("max_connections", 1, 100_000, default=512),
        header_timeout_ms=s.get_int("header_timeout_ms", 100, 600_000, default=20_000),
        body_timeout_ms=s.get_int("body_timeout_ms", 100, 3_600_000, default=60_000),
        keepalive_timeout_ms=s.get_int("keepalive_timeout_ms", 100, 3_600_000, default=75_000),
        rate_limit_per_s=s.get_int("rate_limit_per_s", 0, 1_000_000, default=0),
        rate_limit_burst=s.get_int("rate_limit_burst", 1, 1_000_000, default=20),
        signature_workers=s.get_int("signature_workers", 0, 64, default=max(1, (os.cpu_count() or 2) - 1)),
        read_workers=read_workers,
        read_port=read_port,
    )


def _snapshots(t: Mapping[str, Any], base: Path, node: NodeConfig) -> SnapshotConfig:
    s = _Section("snapshots", t, ("dir", "every_blocks", "keep", "anchored_keep_final", "anchored_max_bytes"))
    return SnapshotConfig(
        dir=s.get_path("dir", base, default=node.data_dir / "snapshots"),
        every_blocks=s.get_int("every_blocks", 0, 10_000_000, default=1000),
        keep=s.get_int("keep", 1, 10_000, default=5),
        anchored_keep_final=s.get_int("anchored_keep_final", 0, 10_000, default=2),
        anchored_max_bytes=s.get_int("anchored_max_bytes", 0, MAX_BYTES, default=4 * GIB),
    )


def _netflow(t: Mapping[str, Any]) -> NetflowConfig:
    s = _Section("netflow", t, ("probe", "probe_interval_ms", "probe_bytes", "probe_timeout_ms", "probe_deposit_sat",
                                "sink_host"))
    sink = s.get_str("sink_host", default="127.0.0.1")
    try:
        ipaddress.ip_address(sink)
    except ValueError:
        raise s.fail("sink_host", sink, "must be an IP address literal the relays can reach") from None
    return NetflowConfig(
        probe=_get_bool(s, "probe", False),
        probe_interval_ms=s.get_int("probe_interval_ms", 1000, 86_400_000, default=300_000),
        probe_bytes=s.get_int("probe_bytes", 65_536, 1 << 26, default=1 << 20),
        probe_timeout_ms=s.get_int("probe_timeout_ms", 1000, 600_000, default=30_000),
        probe_deposit_sat=s.get_int("probe_deposit_sat", 1, 10**12, default=20_000),
        sink_host=sink,
    )


def _store(t: Mapping[str, Any]) -> StoreConfig:
    s = _Section("store", t, ("map_size", "min_free_bytes", "tree_cache_mb"))
    return StoreConfig(
        map_size=s.get_int("map_size", MIN_MAP_SIZE, MAX_BYTES, default=64 * GIB),
        min_free_bytes=s.get_int("min_free_bytes", 0, MAX_BYTES, default=256 * MIB),
        tree_cache_mb=s.get_int("tree_cache_mb", 0, 1 << 20, default=256),
    )


def _get_bool(s: _Section, key: str, default: bool) -> bool:
    value = s.raw(key, default)
    if not isinstance(value, bool):
        raise s.fail(key, value, "must be true or false")
    return value


def _anchoring(t: Mapping[str, Any]) -> AnchoringConfig:
    for key in _ANCHOR_KEY_MODE:  # the single anchor key is gone: say so rather than "unknown key"
        if key in t:
            raise ConfigError(f"config: anchoring.{key} was removed: anchors are plans of the federation, signed "
                              f"k-of-n by the members' bridge keys ([bridge] signer_key_files; fee bumps: "
                              f"bridge.rbf_after_blocks). Delete the key (docs/anchoring.md)")
    s = _Section("anchoring", t, ("enabled", "mode", "every_blocks", "confirmations", "final_confirmations",
                                  "fee_fallback_sat_per_vb", "fee_max_sat_per_vb", "poll_interval_ms"))
    enabled = _get_bool(s, "enabled", False)
    confirmations = s.get_int("confirmations", 1, 1000, default=1)
    final = s.get_int("final_confirmations", 1, 10_000, default=6)
    if final < confirmations:
        raise s.fail("final_confirmations", final, f"must be at least anchoring.confirmations ({confirmations})")
    fallback = s.get_int("fee_fallback_sat_per_vb", 1, 100_000, default=2)
    fee_max = s.get_int("fee_max_sat_per_vb", 1, 100_000, default=100)
    if fee_max < fallback:
        raise s.fail("fee_max_sat_per_vb", fee_max,
                     f"must be at least anchoring.fee_fallback_sat_per_vb ({fallback})")
    return AnchoringConfig(
        enabled=enabled,
        mode=s.get_choice("mode", ANCHOR_MODES, default="taproot"),
        every_blocks=s.get_int("every_blocks", 1, 10_000_000, default=10),
        confirmations=confirmations,
        final_confirmations=final,
        fee_fallback_sat_per_vb=fallback,
        fee_max_sat_per_vb=fee_max,
        poll_interval_ms=s.get_int("poll_interval_ms", 50, 3_600_000, default=5000),
    )


def _bridge(t: Mapping[str, Any], base: Path, node: NodeConfig, anchoring: AnchoringConfig) -> BridgeConfig:
    s = _Section("bridge", t, ("enabled", "threshold", "signer_key_files", "other_keys", "pegin_min_depth",
                               "pegout_confirmations", "rbf_after_blocks", "fee_fallback_sat_per_vb",
                               "fee_max_sat_per_vb", "poll_interval_ms",
                               "header_start_height", "header_start_hash", "emergency_keys",
                               "emergency_threshold", "emergency_delay_blocks", "roll_margin_blocks"))
    enabled = _get_bool(s, "enabled", False)
    if anchoring.enabled and not enabled:
        raise ConfigError("config: anchoring.enabled needs bridge.enabled: anchors are paid by the federation's "
                          "coins and signed k-of-n by the members' bridge keys (bridge.signer_key_files)")
    start_hash = s.get_str("header_start_hash", default="")
    if start_hash and not _HEX64.fullmatch(start_hash):
        raise s.fail("header_start_hash", start_hash, 'must be "" or a 64-hex block hash (as bitcoin-cli shows it)')
    files = s.raw("signer_key_files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f.strip() for f in files):
        raise s.fail("signer_key_files", files, "must be a list of key file paths")
    paths = tuple(_resolve(Path(f).expanduser(), base) for f in files)
    if len(set(paths)) != len(paths):
        raise s.fail("signer_key_files", files, "lists a file twice")
    others = s.raw("other_keys", [])
    if not isinstance(others, list) or not all(isinstance(k, str) and re.fullmatch(r"0[23][0-9a-fA-F]{64}", k)
                                                 for k in others):
        raise s.fail("other_keys", others, "must be a list of 66-hex compressed public keys")
    n = len(paths) + len(others)
    if enabled:
        if n == 0:
            raise s.fail("signer_key_files", files, "the federation needs at least one key")
    threshold = s.get_int("threshold", 1, 15, default=max(1, n // 2 + 1))
    if enabled and threshold > n:
        raise s.fail("threshold", threshold, f"exceeds the number of federation keys ({n})")
    emergency = s.raw("emergency_keys", [])
    if not isinstance(emergency, list) or not all(isinstance(k, str) and re.fullmatch(r"0[23][0-9a-fA-F]{64}", k)
                                                  for k in emergency):
        raise s.fail("emergency_keys", emergency, "must be a list of 66-hex compressed public keys")
    if len(set(k.lower() for k in emergency)) != len(emergency) or len(emergency) > 15:
        raise s.fail("emergency_keys", emergency, "must be at most 15 distinct keys")
    for k in emergency:
        try:
            PublicKey(bytes.fromhex(k))
        except ValueError:
            raise s.fail("emergency_keys", emergency, f"{k} is not a point on secp256k1") from None
    if not emergency and "emergency_threshold" in t:
        raise s.fail("emergency_threshold", t["emergency_threshold"], "needs bridge.emergency_keys")
    emergency_threshold = s.get_int("emergency_threshold", 1, 15, default=max(1, len(emergency) // 2 + 1))
    if emergency and emergency_threshold > len(emergency):
        raise s.fail("emergency_threshold", emergency_threshold,
                     f"exceeds the number of emergency keys ({len(emergency)})")
    test_chain = NETWORKS[node.network].admin_mint  # local and regtest
    emergency_delay = s.get_int("emergency_delay_blocks", 1 if test_chain else 1008, 65_535, default=4032)
    # a roll must be mined before the coin is emergency_delay blocks old: room for signing, broadcast and fee bumps
    # 0: no rolls (the default only with a 1-block delay, which leaves no time to roll)
    roll_margin = s.get_int("roll_margin_blocks", 0, 65_534, default=min(144, emergency_delay // 2))
    if emergency and roll_margin >= emergency_delay:
        raise s.fail("roll_margin_blocks", roll_margin,
                     f"must be below bridge.emergency_delay_blocks ({emergency_delay}): coins are rolled before the "
                     f"emergency keys can spend them")
    fallback = s.get_int("fee_fallback_sat_per_vb", 1, MAX_FEERATE, default=2)
    fee_max = s.get_int("fee_max_sat_per_vb", 1, MAX_FEERATE, default=500)  # a plan's fee rate is at most MAX_FEERATE
    if fee_max < fallback:
        raise s.fail("fee_max_sat_per_vb", fee_max, f"must be at least bridge.fee_fallback_sat_per_vb ({fallback})")
    return BridgeConfig(
        enabled=enabled, threshold=threshold, signer_key_files=paths,
        other_keys=tuple(bytes.fromhex(k) for k in others),
        pegin_min_depth=s.get_int("pegin_min_depth", 1, 65_535, default=102),
        # a payout recorded COMPLETED and then reorged out would leave the books with a change coin Bitcoin lacks
        pegout_confirmations=s.get_int("pegout_confirmations", 1 if test_chain else 6, 1000, default=6),
        rbf_after_blocks=s.get_int("rbf_after_blocks", 1, 10_000, default=3),
        fee_fallback_sat_per_vb=fallback, fee_max_sat_per_vb=fee_max,
        poll_interval_ms=s.get_int("poll_interval_ms", 50, 3_600_000, default=2000),
        header_start_height=s.get_int("header_start_height", 0, 2**31, default=0),
        header_start_hash=bytes.fromhex(start_hash)[::-1] if start_hash else None,
        emergency_keys=tuple(bytes.fromhex(k) for k in emergency),
        emergency_threshold=emergency_threshold if emergency else 0,
        emergency_delay_blocks=emergency_delay, roll_margin_blocks=roll_margin,
    )


def _zmq_endpoint(s: _Section, key: str) -> str:
    value = s.get_str(key, default="")
    if value and not re.fullmatch(r"(tcp://[^\s]+:[0-9]{1,5}|ipc://[^\s]+)", value):
        raise s.fail(key, value, 'must be "" or a ZMQ endpoint such as "tcp://127.0.0.1:28332"')
    return value


def _bitcoind(t: Mapping[str, Any], base: Path, node: NodeConfig) -> BitcoindConfig:
    s = _Section("bitcoind", t, ("rpc_url", "cookie_file", "rpc_user", "rpc_password", "zmq_hashblock",
                                 "zmq_sequence", "zmq_rawtx"))
    url = s.get_str("rpc_url", default="")
    if url and not re.fullmatch(r"https?://[^\s/]+(:[0-9]{1,5})?/?", url):
        raise s.fail("rpc_url", url, 'must be "" (no bitcoind) or an http URL such as "http://127.0.0.1:18443"')
    cookie = s.get_path("cookie_file", base) if "cookie_file" in t else None
    user = s.get_str("rpc_user", default="")
    password = s.get_str("rpc_password", default="")
    if cookie is not None and (user or password):
        raise s.fail("rpc_user", user, "give either bitcoind.cookie_file or bitcoind.rpc_user/rpc_password, "
                     "not both")
    if bool(user) != bool(password):
        raise ConfigError("config: bitcoind.rpc_user and bitcoind.rpc_password must be given together")
    if url and cookie is None and not user:
        raise s.fail("rpc_url", url, "needs bitcoind.cookie_file or bitcoind.rpc_user/rpc_password")
    return BitcoindConfig(
        rpc_url=url.rstrip("/"), cookie_file=cookie, rpc_user=user, rpc_password=password,
        zmq_hashblock=_zmq_endpoint(s, "zmq_hashblock"), zmq_sequence=_zmq_endpoint(s, "zmq_sequence"),
        zmq_rawtx=_zmq_endpoint(s, "zmq_rawtx"),
        chain=btc_chain(network_by_name(node.network)).bitcoind_chain,
    )


def _ppm(s: _Section, key: str, value: object) -> int:
    """A fraction of 1 given as a TOML number (or decimal string), exactly in ppm; 0..1 inclusive."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise s.fail(key, value, "must be a number between 0 and 1")
    try:
        frac = Fraction(repr(value) if isinstance(value, float) else str(value).strip())
    except (ValueError, ZeroDivisionError):
        raise s.fail(key, value, "must be a number between 0 and 1") from None
    if not 0 <= frac <= 1:
        raise s.fail(key, value, "must be between 0 and 1" + (" (negative)" if frac < 0 else ""))
    scaled = frac * _PPM
    if scaled.denominator != 1:
        raise s.fail(key, value, "must be a multiple of 0.000001")
    return int(scaled)


def _orchestration(t: Mapping[str, Any], node: NodeConfig) -> OrchestrationConfig:
    s = _Section("orchestration", t, (
        "enabled", "strategy", "weights", "audit_rate", "timeout_blocks", "challenge_window_blocks", "worker_share",
        "verifier_share", "treasury_share", "slash_fraction", "slash_challenger_share", "min_reputation",
        "min_stake_sat", "heartbeat_timeout_blocks", "heartbeat_grace_blocks", "probe_interval_ms", "probe_failures",
        "probe_private_endpoints", "preferred_region", "poll_interval_ms"))
    defaults = {"reputation": 0.35, "latency": 0.2, "capacity": 0.15, "cost": 0.15, "region": 0.05, "green": 0.1}
    table = s.get_table("weights") if "weights" in t else defaults
    w = _Section("orchestration.weights", table, SCORE_COMPONENTS)
    weights = tuple((name, _ppm(w, name, table.get(name, 0))) for name in SCORE_COMPONENTS)
    if sum(v for _, v in weights) != _PPM:
        raise ConfigError("config: orchestration.weights must sum to 1, got "
                          + " + ".join(f"{k}={v / _PPM:g}" for k, v in weights) + f" = "
                          f"{sum(v for _, v in weights) / _PPM:g}")
    shares = {k: _ppm(s, k, s.raw(k, d)) for k, d in
              (("worker_share", 0.85), ("verifier_share", 0.1), ("treasury_share", 0.05))}
    if sum(shares.values()) != _PPM:
        raise ConfigError("config: orchestration.worker_share + verifier_share + treasury_share must sum to 1, got "
                          + " + ".join(f"{k}={v / _PPM:g}" for k, v in shares.items()))
    region = s.get_str("preferred_region", default="")
    if region and not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,15}", region):
        raise s.fail("preferred_region", region, "must be \"\" or 1..16 characters of [a-z0-9._-]")
    return OrchestrationConfig(
        enabled=_get_bool(s, "enabled", False),
        strategy=s.get_choice("strategy", ORCHESTRATION_STRATEGIES, default="weighted"),
        weights_ppm=weights,
        audit_rate_ppm=_ppm(s, "audit_rate", s.raw("audit_rate", 0.1)),
        timeout_blocks=s.get_int("timeout_blocks", 1, 1_000_000, default=30),
        challenge_window_blocks=s.get_int("challenge_window_blocks", 0, 100_000, default=5),
        worker_share_ppm=shares["worker_share"],
        verifier_share_ppm=shares["verifier_share"],
        treasury_share_ppm=shares["treasury_share"],
        slash_ppm=_ppm(s, "slash_fraction", s.raw("slash_fraction", 0.5)),
        slash_challenger_ppm=_ppm(s, "slash_challenger_share", s.raw("slash_challenger_share", 0.5)),
        min_reputation_ppm=_ppm(s, "min_reputation", s.raw("min_reputation", 0.3)),
        min_stake_sat=s.get_int("min_stake_sat", 0, MAX_MONEY, default=1000),
        heartbeat_timeout_blocks=s.get_int("heartbeat_timeout_blocks", 1, 1_000_000, default=60),
        heartbeat_grace_blocks=s.get_int("heartbeat_grace_blocks", 0, 100_000, default=30),
        probe_interval_ms=s.get_int("probe_interval_ms", 50, 3_600_000, default=2000),
        probe_failures=s.get_int("probe_failures", 1, 1000, default=3),
        # A worker names its own probe endpoint: on public networks the coordinator must not be steered into
        # requests to its own host or private network (server-side request forgery).
        probe_private_endpoints=_get_bool(s, "probe_private_endpoints", node.network in ("local", "regtest")),
        preferred_region=region,
        poll_interval_ms=s.get_int("poll_interval_ms", 10, 60_000, default=200),
    )


def _federation(t: Mapping[str, Any], base: Path, node: NodeConfig) -> FederationConfig:
    s = _Section("federation", t, ("key_file", "members", "threshold", "round_ms", "max_round_ms",
                                   "max_clock_drift_ms"))
    members: tuple[FederationMember, ...] | None = None
    if "members" in t:
        listed = t["members"]
        if not isinstance(listed, list) or not listed or not all(isinstance(m, Mapping) for m in listed):
            raise s.fail("members", listed, "must be a non-empty array of tables [[federation.members]] with id, "
                         "key and url (leave it out for a 1-member federation of this daemon's own key)")
        members = tuple(_federation_member(i, m) for i, m in enumerate(listed))
        for field in ("id", "key", "url"):
            seen: dict[object, int] = {}
            for i, m in enumerate(members):
                value = getattr(m, field)
                if value in seen:
                    shown = value.hex() if isinstance(value, bytes) else value
                    raise ConfigError(f"config: federation.members[{i}].{field} = {_show(shown)}: the same as "
                                      f"federation.members[{seen[value]}].{field} (each member has its own)")
                seen[value] = i
    n = 1 if members is None else len(members)
    threshold = s.get_int("threshold", 1, MAX_MEMBERS, default=default_threshold(n))
    if not n / 2 < threshold <= n:
        raise s.fail("threshold", threshold,
                     f"must be above n/2 = {n / 2:g} and at most n = {n} members: two blocks signed by m members at "
                     f"one height must share a signer (the default floor(2n/3)+1 = {default_threshold(n)} tolerates "
                     f"floor((n-1)/3) = {(n - 1) // 3} Byzantine members; n >= 4 is needed to tolerate one)")
    if members is not None:
        try:
            Membership(tuple(m.key for m in members), threshold)
        except InvalidMembership as e:
            raise s.fail("members", f"<{len(members)} members>", str(e)) from None
    round_ms = s.get_int("round_ms", 50, 600_000, default=2000)
    max_round_ms = s.get_int("max_round_ms", 50, 3_600_000, default=max(30_000, round_ms))
    if max_round_ms < round_ms:
        raise s.fail("max_round_ms", max_round_ms, f"must be at least federation.round_ms ({round_ms})")
    return FederationConfig(
        key_file=s.get_path("key_file", base, default=node.data_dir / "member.key"),
        members=members,
        threshold=threshold,
        round_ms=round_ms,
        max_round_ms=max_round_ms,
        max_clock_drift_ms=s.get_int("max_clock_drift_ms", 0, 3_600_000, default=2000),
    )


def _federation_member(i: int, t: Mapping[str, Any]) -> FederationMember:
    s = _Section(f"federation.members[{i}]", t, ("id", "key", "url"))
    mid = s.get_str("id")
    if not valid_member_id(mid):
        raise s.fail("id", mid, f"must be {MEMBER_ID_RULE}")
    url = s.get_str("url")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range
    except ValueError:
        parts, port = None, None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or port is None
            or parts.username is not None or parts.password is not None or parts.path not in ("", "/")
            or parts.query or parts.fragment or url != url.strip()):
        raise s.fail("url", url, 'must be the base URL of the member\'s API: http:// or https://, host and port, '
                     'e.g. "http://127.0.0.1:8661"')
    return FederationMember(id=mid, key=_xonly_key(s, "key"), url=url.rstrip("/"))
