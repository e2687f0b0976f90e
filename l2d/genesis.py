"""What the config says the chain starts from: the authority and federation keys, the genesis state (allocations,
authorities, the bridge federation), and the refusal of a data dir made for another chain."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from coincurve import PrivateKey

from .config import Config
from .core.block import genesis_header
from .core.errors import L2Error
from .core.params import Network
from .core.pegs import Federation, federation_genesis
from .core.state import genesis_state
from .core.tree import root_of
from .keys import load_or_create_secret
from .ledger import Ledger


class NodeError(Exception):
    """The node cannot start (unusable key file, data dir made for another chain, ...)."""


@dataclass(frozen=True)
class Genesis:
    """The genesis state this config describes and the secrets this daemon holds."""

    state: dict[bytes, bytes]
    authority_secret: Optional[bytes]  # the mint authority (local/regtest only)
    federation_secret: Optional[bytes]  # the federation key: the anchor authority of every coordinator-posted type
    federation: Optional[Federation]  # the bridge's m-of-n federation
    signer_secrets: tuple[bytes, ...]  # the bridge signers this daemon runs


def load_genesis(config: Config, network: Network) -> Genesis:
    """Read (or, on local and regtest, create) the key files and build the genesis state. Raises NodeError."""
    authority_secret: Optional[bytes] = None
    authority: Optional[bytes] = None
    if network.admin_mint:
        key_file = config.chain.mint_authority_key_file
        if key_file is None:
            raise NodeError(f"chain.mint_authority_key_file is required on {network.name}")
        authority_secret = load_or_create_secret(Path(key_file))
        authority = PrivateKey(authority_secret).public_key_xonly.format()
    federation_secret: Optional[bytes] = None
    fed_file = config.anchoring.federation_key_file
    if fed_file is not None:
        if not network.admin_mint and not Path(fed_file).exists():
            raise NodeError(f"anchoring.federation_key_file {fed_file} does not exist (it is only created "
                            f"on local and regtest)")
        federation_secret = load_or_create_secret(Path(fed_file), "federation")
    federation = None if federation_secret is None else PrivateKey(federation_secret).public_key_xonly.format()
    try:
        state = genesis_state(config.chain.genesis_alloc, authority, federation)
    except L2Error as e:
        raise NodeError(f"chain.genesis_alloc: {e}") from None
    signer_secrets, fed = _bridge_federation(config, network)
    if fed is not None:
        state.update(federation_genesis(fed))
    return Genesis(state, authority_secret, federation_secret, fed, tuple(signer_secrets))


def _bridge_federation(config: Config, network: Network) -> tuple[list[bytes], Optional[Federation]]:
    """The federation of [bridge] (a genesis parameter) and the secrets of the signers this daemon runs."""
    cfg = config.bridge
    if not cfg.enabled:
        return [], None
    secrets_: list[bytes] = []
    for f in cfg.signer_key_files:
        if not network.admin_mint and not f.exists():
            raise NodeError(f"bridge.signer_key_files: {f} does not exist (keys are only created on local and "
                            f"regtest)")
        secrets_.append(load_or_create_secret(f, "federation signer"))
    keys = [PrivateKey(s).public_key.format(compressed=True) for s in secrets_] + list(cfg.other_keys)
    if len(set(keys)) != len(keys):
        raise NodeError("bridge: the same federation key is configured twice (a key counts once in a quorum)")
    try:
        return secrets_, Federation(cfg.threshold, tuple(sorted(keys)), cfg.pegin_min_depth)
    except L2Error as e:
        raise NodeError(f"bridge: {e}") from None


def check_genesis(ledger: Ledger, network: Network, genesis: dict[bytes, bytes], timestamp_ms: int) -> None:
    """Refuse a data dir whose block 0 is not the genesis this config describes."""
    stored = ledger.block(0)
    expected = genesis_header(network, timestamp_ms, root_of(genesis.items()))
    if stored is None or stored.header.hash != expected.hash:
        raise NodeError(
            f"data dir {ledger.store.path} holds another chain: its genesis block "
            f"{stored.header.hash.hex() if stored else 'is missing'} differs from the one this config describes "
            f"({expected.hash.hex()}); check chain.genesis_alloc, chain.genesis_timestamp_ms, "
            f"chain.mint_authority_key_file and anchoring.federation_key_file, or use another node.data_dir")
