"""What the config says the chain starts from: the mint authority, the anchor and bridge Bitcoin keys, the genesis
state (allocations, the mint authority, the federation members, the bridge federation), the block-signing members
and this member's key, and the refusal of a data dir made for another chain."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from coincurve import PrivateKey

from .config import Config
from .core.block import BlockHeader, genesis_header
from .core.errors import L2Error
from .core.members import Membership
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
    federation: Optional[Federation]  # the bridge's m-of-n federation
    signer_secrets: tuple[bytes, ...]  # the bridge signers this daemon runs
    # The block-signing federation ([federation]): this member's BIP340 secret (it also signs this member's system
    # transactions), the members (keys in member-index order, threshold m; the keys are in the genesis state, the
    # authorities of every system transaction), their ids and API base URLs in the same order, and this member's
    # index.
    member_secret: bytes
    membership: Membership
    member_ids: tuple[str, ...]
    member_urls: tuple[str, ...]
    member_index: int


def load_genesis(config: Config, network: Network) -> Genesis:
    """Read (or, on local and regtest, create) the key files and build the genesis state. Raises NodeError."""
    authority_secret: Optional[bytes] = None
    authority: Optional[bytes] = None
    if network.admin_mint:
        key_file = config.chain.mint_authority_key_file
        if config.chain.mint_authority_key is not None:  # this member does not hold the mint secret
            authority = config.chain.mint_authority_key
        elif key_file is None:
            raise NodeError(f"chain.mint_authority_key_file or chain.mint_authority_key is required on "
                            f"{network.name}")
        else:
            authority_secret = load_or_create_secret(Path(key_file))
            authority = PrivateKey(authority_secret).public_key_xonly.format()
    member_secret, membership, ids, urls, index = load_members(config, network)
    try:
        state = genesis_state(config.chain.genesis_alloc, authority, membership.keys)
    except L2Error as e:
        raise NodeError(f"chain.genesis_alloc: {e}") from None
    signer_secrets, fed = _bridge_federation(config, network)
    if fed is not None:
        state.update(federation_genesis(fed))
    return Genesis(state, authority_secret, fed, tuple(signer_secrets), member_secret=member_secret,
                   membership=membership, member_ids=ids, member_urls=urls, member_index=index)


def load_members(config: Config, network: Network) -> tuple[bytes, Membership, tuple[str, ...], tuple[str, ...], int]:
    """This member's secret (federation.key_file: created on local and regtest when missing, required elsewhere),
    the membership, the members' ids and URLs, and this member's index. Without [[federation.members]] the
    federation is this daemon alone (1 of 1, its own key, its own API address). Raises NodeError."""
    cfg = config.federation
    if not network.admin_mint and not cfg.key_file.exists():
        raise NodeError(f"federation.key_file {cfg.key_file} does not exist (it is only created on local and "
                        f"regtest)")
    secret = load_or_create_secret(cfg.key_file, "federation member")
    key = PrivateKey(secret).public_key_xonly.format()
    if cfg.members is None:
        host = f"[{config.api.host}]" if ":" in config.api.host else config.api.host
        return secret, Membership((key,), 1), ("member-1",), (f"http://{host}:{config.api.port}",), 0
    keys = tuple(m.key for m in cfg.members)
    if key not in keys:
        raise NodeError(f"federation.key_file {cfg.key_file}: its public key {key.hex()} is not one of the "
                        f"{len(keys)} federation.members keys (is this the right key file for this config?)")
    try:
        membership = Membership(keys, cfg.threshold)
    except L2Error as e:  # the config checked this already
        raise NodeError(f"federation.members: {e}") from None
    return (secret, membership, tuple(m.id for m in cfg.members), tuple(m.url for m in cfg.members),
            keys.index(key))


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
        return secrets_, Federation(cfg.threshold, tuple(sorted(keys)), cfg.pegin_min_depth, cfg.emergency_threshold,
                                    tuple(sorted(cfg.emergency_keys)),
                                    cfg.emergency_delay_blocks if cfg.emergency_keys else 0)
    except L2Error as e:
        raise NodeError(f"bridge: {e}") from None


def genesis_block_header(network: Network, genesis: dict[bytes, bytes], timestamp_ms: int) -> BlockHeader:
    """The header of block 0 for this genesis state (what the federation genesis file carries)."""
    return genesis_header(network, timestamp_ms, root_of(genesis.items()))


def check_genesis(ledger: Ledger, network: Network, genesis: dict[bytes, bytes], timestamp_ms: int) -> None:
    """Refuse a data dir whose block 0 is not the genesis this config describes."""
    stored = ledger.block(0)
    expected = genesis_block_header(network, genesis, timestamp_ms)
    if stored is None or stored.header.hash != expected.hash:
        raise NodeError(
            f"data dir {ledger.store.path} holds another chain: its genesis block "
            f"{stored.header.hash.hex() if stored else 'is missing'} differs from the one this config describes "
            f"({expected.hash.hex()}); check chain.genesis_alloc, chain.genesis_timestamp_ms, "
            f"chain.mint_authority_key_file (or chain.mint_authority_key), the federation members "
            f"(federation.members, or federation.key_file for a 1-member federation) and bridge, or use another "
            f"node.data_dir")
