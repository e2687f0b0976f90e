"""l2d.genesis: the key files a config names, the genesis state it describes, and the block-signing federation
resolved from [federation] and this member's key file."""
from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
from coincurve import PrivateKey

from l2d.config import Config
from l2d.core.members import Membership
from l2d.core.params import LOCAL, SIGNET
from l2d.core.state import FEDERATION_MEMBERS_KEY
from l2d.genesis import NodeError, genesis_block_header, load_genesis
from l2d.node import Node


def secret(i: int) -> bytes:
    return hashlib.sha256(b"member %d" % i).digest()


def xonly(s: bytes) -> bytes:
    return PrivateKey(s).public_key_xonly.format()


def members(n: int) -> list[dict[str, Any]]:
    return [{"id": f"m{i}", "key": xonly(secret(i)).hex(), "url": f"http://127.0.0.1:{9000 + i}"} for i in range(n)]


def write_key(path: Path, s: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(s.hex() + "\n")
    return path


def test_one_member_federation_of_its_own_key_by_default(tmp_path: Path,
                                                         make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(tmp_path / "data", api={"host": "::1", "port": 8123})
    g = load_genesis(cfg, LOCAL)
    key_file = tmp_path / "data" / "member.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # created on local
    assert g.member_secret == bytes.fromhex(key_file.read_text().strip())
    assert g.membership == Membership((xonly(g.member_secret),), 1)
    assert (g.member_ids, g.member_urls, g.member_index) == (("member-1",), ("http://[::1]:8123",), 0)
    again = load_genesis(cfg, LOCAL)  # the same key next start
    assert again.member_secret == g.member_secret


def test_members_resolved_with_this_members_index(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    key_file = write_key(tmp_path / "me.key", secret(2))
    cfg = make_cfg(tmp_path / "data", federation={"key_file": str(key_file), "members": members(4)})
    g = load_genesis(cfg, LOCAL)
    assert g.member_secret == secret(2) and g.member_index == 2
    assert g.membership == Membership(tuple(xonly(secret(i)) for i in range(4)), 3)
    assert g.member_ids == ("m0", "m1", "m2", "m3")
    assert g.member_urls == tuple(f"http://127.0.0.1:{9000 + i}" for i in range(4))


def test_own_key_not_a_member_refused(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    key_file = write_key(tmp_path / "me.key", secret(9))
    cfg = make_cfg(tmp_path / "data", federation={"key_file": str(key_file), "members": members(4)})
    with pytest.raises(NodeError) as e:
        load_genesis(cfg, LOCAL)
    msg = str(e.value)
    assert msg.startswith(f"federation.key_file {key_file}: its public key {xonly(secret(9)).hex()} is not one of "
                          f"the 4 federation.members keys")
    assert secret(9).hex() not in msg


def test_member_key_file_required_where_keys_are_never_created(tmp_path: Path,
                                                                make_cfg: Callable[..., Config]) -> None:
    cfg = make_cfg(tmp_path / "data", "signet")
    with pytest.raises(NodeError, match=r"^federation\.key_file .*member\.key does not exist \(it is only created "
                                        r"on local and regtest\)"):
        load_genesis(cfg, SIGNET)
    assert not cfg.federation.key_file.exists()
    write_key(cfg.federation.key_file, secret(1))
    assert load_genesis(cfg, SIGNET).member_secret == secret(1)


def test_members_are_in_the_genesis_state_whichever_bridge_keys_a_member_holds(
        tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    """The member keys, in member order, are the genesis record FEDERATION_MEMBERS_KEY (the authorities of the
    system transactions); the federation's Bitcoin keys ([bridge], which also sign the anchors) are in the genesis
    state too, the same whichever of them a member holds."""
    mint = write_key(tmp_path / "mint.key", secret(7))
    key_file = write_key(tmp_path / "me.key", secret(0))
    alone = make_cfg(tmp_path / "a", chain={"mint_authority_key_file": str(mint)},
                     federation={"key_file": str(key_file)})
    assert load_genesis(alone, LOCAL).state[FEDERATION_MEMBERS_KEY] == b"\x01" + xonly(secret(0))
    federated = make_cfg(tmp_path / "b", chain={"mint_authority_key_file": str(mint)},
                         federation={"key_file": str(key_file), "members": members(4), "threshold": 4})
    fed_state = load_genesis(federated, LOCAL).state
    assert fed_state[FEDERATION_MEMBERS_KEY] == b"\x04" + b"".join(xonly(secret(i)) for i in range(4))
    anchored = [make_cfg(tmp_path / d, chain={"mint_authority_key_file": str(mint)},
                         federation={"key_file": str(key_file), "members": members(4), "threshold": 4},
                         anchoring={"enabled": True},
                         bridge={"enabled": True, "threshold": 2,
                                 "signer_key_files": [str(write_key(tmp_path / f"{d}.key", secret(k)))],
                                 "other_keys": [PrivateKey(secret(other)).public_key.format().hex()]})
                for d, k, other in (("c", 5, 6), ("d", 6, 5))]
    states = [load_genesis(c, LOCAL).state for c in anchored]
    assert states[0] == states[1] != fed_state
    assert {k: v for k, v in states[0].items() if k in fed_state} == fed_state  # the members' records unchanged


def test_mint_authority_key_gives_the_same_genesis_without_the_secret(tmp_path: Path,
                                                                      make_cfg: Callable[..., Config]) -> None:
    mint = write_key(tmp_path / "mint.key", secret(7))
    fed = {"key_file": str(write_key(tmp_path / "me.key", secret(0)))}  # one member key: one member set
    holder = make_cfg(tmp_path / "a", chain={"mint_authority_key_file": str(mint)}, federation=fed)
    other = make_cfg(tmp_path / "b", chain={"mint_authority_key": xonly(secret(7)).hex()}, federation=fed)
    g1, g2 = load_genesis(holder, LOCAL), load_genesis(other, LOCAL)
    assert g1.authority_secret == secret(7) and g2.authority_secret is None
    assert g1.state == g2.state
    assert not (tmp_path / "b" / "mint_authority.key").exists()  # no key file created for it
    t = holder.chain.genesis_timestamp_ms
    assert genesis_block_header(LOCAL, g1.state, t).hash == genesis_block_header(LOCAL, g2.state, t).hash
    third = make_cfg(tmp_path / "c", chain={"mint_authority_key": xonly(secret(8)).hex()}, federation=fed)
    assert load_genesis(third, LOCAL).state != g1.state


def test_node_refuses_to_start_when_not_a_member(tmp_path: Path, make_cfg: Callable[..., Config]) -> None:
    key_file = write_key(tmp_path / "me.key", secret(9))
    cfg = make_cfg(tmp_path / "data", federation={"key_file": str(key_file), "members": members(4)})
    with pytest.raises(NodeError, match="is not one of the 4 federation.members keys"):
        Node.from_config(cfg)
    assert not (tmp_path / "data" / "ledger").exists()  # nothing created for a node that cannot be a member
