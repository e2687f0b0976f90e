"""Federation genesis files: the canonical text round-trips, and every way a file can be unusable is a typed error."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Callable

import pytest
from coincurve import PrivateKey

from l2d.core.block import BlockHeader, genesis_header
from l2d.core.errors import DecodeError, UnknownVersion, WrongNetwork
from l2d.core.genesis_file import (FORMAT, FederationGenesis, GenesisFileInvalid, GenesisFileMalformed,
                                   GenesisFileUnknownNetwork, GenesisFileVersionError, NotAGenesisFile,
                                   load_genesis_file, write_genesis_file)
from l2d.core.members import Membership
from l2d.core.params import LOCAL, REGTEST

SECRETS = [hashlib.sha256(b"genesis file member %d" % i).digest() for i in range(5)]
KEYS = tuple(PrivateKey(s).public_key_xonly.format() for s in SECRETS)
HEADER = genesis_header(REGTEST, 1_700_000_000_000, hashlib.sha256(b"genesis state").digest())
GENESIS = FederationGenesis(REGTEST, Membership(KEYS[:4], 3), ("alice", "bob", "carol", "dave"), HEADER)


def doc() -> dict[str, Any]:
    return json.loads(GENESIS.encode())


def encode(d: Any) -> bytes:
    return json.dumps(d).encode()


def test_canonical_text_round_trips() -> None:
    raw = GENESIS.encode()
    assert FederationGenesis.decode(raw) == GENESIS
    assert raw.endswith(b"}\n") and raw.startswith(b'{\n  "format": "l2d-federation-genesis",\n  "version": 1,')
    d = doc()
    assert list(d) == ["format", "version", "network", "genesis_hash", "genesis_header", "threshold", "members"]
    assert d["genesis_hash"] == HEADER.hash.hex() and d["genesis_header"] == HEADER.encode().hex()
    assert d["members"][2] == {"id": "carol", "key": KEYS[2].hex()}
    # any JSON whitespace (a reformatted file) reads the same; the writer writes the one canonical text
    assert FederationGenesis.decode(json.dumps(d, separators=(",", ":")).encode()) == GENESIS
    buf = io.BytesIO()
    write_genesis_file(buf, GENESIS)
    assert buf.getvalue() == raw
    assert load_genesis_file(io.BytesIO(raw)) == GENESIS
    assert GENESIS.genesis_hash == HEADER.hash and GENESIS.describe(1) == "member 1 (bob)"


def _edit(change: Callable[[dict[str, Any]], None]) -> bytes:
    d = doc()
    change(d)
    return encode(d)


@pytest.mark.parametrize("raw, error, match", [
    (b"", NotAGenesisFile, "not UTF-8 JSON"),
    (b"\xff\xfe{}", NotAGenesisFile, "not UTF-8 JSON"),
    (b"[1, 2]", NotAGenesisFile, "format"),
    (b'{"format": "l2d-snapshot"}', NotAGenesisFile, "format"),
    (b"[" * 5000 + b"]" * 5000, NotAGenesisFile, "not UTF-8 JSON"),  # nesting deeper than the parser's recursion limit
    (GENESIS.encode()[:-3], NotAGenesisFile, "not UTF-8 JSON"),  # truncated
    (GENESIS.encode() + b"{}", NotAGenesisFile, "not UTF-8 JSON"),  # trailing data
    (b" " * 70_000, GenesisFileMalformed, "more than"),
])
def test_not_a_genesis_file(raw: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        FederationGenesis.decode(raw)


def test_strict_json() -> None:
    text = GENESIS.encode().decode()
    with pytest.raises(GenesisFileMalformed, match="appears twice"):  # the later one would silently win
        FederationGenesis.decode(text.replace('"threshold": 3,', '"threshold": 1, "threshold": 3,').encode())
    with pytest.raises(GenesisFileMalformed, match="only integers"):
        FederationGenesis.decode(text.replace('"threshold": 3', '"threshold": 3.0').encode())
    with pytest.raises(GenesisFileMalformed, match="NaN is not allowed"):
        FederationGenesis.decode(text.replace('"threshold": 3', '"threshold": NaN').encode())
    with pytest.raises(GenesisFileMalformed, match="integer"):
        FederationGenesis.decode(text.replace('"threshold": 3', '"threshold": true').encode())
    with pytest.raises(GenesisFileMalformed, match="integer"):
        FederationGenesis.decode(text.replace('"threshold": 3', '"threshold": "3"').encode())


@pytest.mark.parametrize("change, error, match", [
    (lambda d: d.update(version=2), GenesisFileVersionError, "version 2"),
    (lambda d: d.update(network="testnet"), GenesisFileUnknownNetwork, "testnet"),
    (lambda d: d.update(network=LOCAL.name), GenesisFileInvalid, "network id 2"),  # header says regtest
    (lambda d: d.update(comment="hi"), GenesisFileMalformed, "unknown field"),
    (lambda d: d.pop("genesis_hash"), GenesisFileMalformed, "missing field"),
    (lambda d: d.update(genesis_hash=d["genesis_hash"].upper()), GenesisFileMalformed, "lowercase hex"),
    (lambda d: d.update(genesis_hash=d["genesis_hash"][:-2]), GenesisFileMalformed, "64 lowercase hex"),
    (lambda d: d.update(genesis_hash="00" * 32), GenesisFileInvalid, "not the hash"),
    (lambda d: d.update(genesis_header=d["genesis_header"] + "00"), GenesisFileMalformed, "236 lowercase hex"),
    (lambda d: d.update(members={}), GenesisFileMalformed, "list"),
    (lambda d: d["members"].append("erin"), GenesisFileMalformed, "members\\[4\\] must be an object"),
    (lambda d: d["members"][1].update(url="http://x"), GenesisFileMalformed, "members\\[1\\]: unknown field"),
    (lambda d: d["members"][1].pop("key"), GenesisFileMalformed, "members\\[1\\]: missing field"),
    (lambda d: d["members"][1].update(key=(5).to_bytes(32, "big").hex()), GenesisFileInvalid, "member 1 key"),
    (lambda d: d["members"][1].update(key=d["members"][0]["key"]), GenesisFileInvalid, "appears twice"),
    (lambda d: d["members"][1].update(id="alice"), GenesisFileInvalid, "id appears twice"),
    (lambda d: d["members"][1].update(id=""), GenesisFileInvalid, "member 1 id"),
    (lambda d: d["members"][1].update(id="bob smith"), GenesisFileInvalid, "member 1 id"),
    (lambda d: d["members"][1].update(id="b" * 65), GenesisFileInvalid, "member 1 id"),
    (lambda d: d["members"][1].update(id=7), GenesisFileMalformed, "must be a string"),
    (lambda d: d.update(threshold=2), GenesisFileInvalid, "threshold 2 of 4"),
    (lambda d: d.update(threshold=5), GenesisFileInvalid, "threshold 5 of 4"),
    (lambda d: d.update(members=[]), GenesisFileInvalid, "1..64 members"),
])
def test_bad_content_is_refused(change: Callable[[dict[str, Any]], None], error: type[Exception],
                                match: str) -> None:
    with pytest.raises(error, match=match) as e:
        FederationGenesis.decode(_edit(change))
    assert isinstance(e.value, DecodeError)  # l2-verify: exit 2


def test_typed_error_tree() -> None:
    assert issubclass(GenesisFileVersionError, UnknownVersion)
    assert issubclass(GenesisFileUnknownNetwork, WrongNetwork)


def _header(**change: Any) -> BlockHeader:
    return dataclasses.replace(HEADER, **change)


def _header_edit(**change: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        h = _header(**change)
        d.update(genesis_header=h.encode().hex(), genesis_hash=h.hash.hex())
    return edit


@pytest.mark.parametrize("change, match", [
    (dict(height=1), "height 1"),
    (dict(prev_hash=b"\x01" * 32), "zero parent"),
    (dict(tx_count=1), "1 transactions"),
    (dict(tx_root=b"\x02" * 32), "has 0 transactions \\(root 0202"),
    (dict(version=2), "block version 2"),
])
def test_the_header_must_be_a_genesis(change: dict[str, Any], match: str) -> None:
    with pytest.raises(GenesisFileInvalid, match=match):
        FederationGenesis.decode(_edit(_header_edit(**change)))


def test_construction_is_checked() -> None:
    with pytest.raises(GenesisFileInvalid, match="3 member ids for 4"):
        FederationGenesis(REGTEST, GENESIS.members, ("a", "b", "c"), HEADER)
    with pytest.raises(GenesisFileInvalid, match="network id 2"):
        FederationGenesis(LOCAL, GENESIS.members, GENESIS.member_ids, HEADER)
    for change, match in ((dict(version=2), "genesis header version 2"), (dict(height=3), "height 3")):
        with pytest.raises(GenesisFileInvalid, match=match):  # what the writer is given is checked as well
            FederationGenesis(REGTEST, GENESIS.members, GENESIS.member_ids, _header(**change))


def test_format_name() -> None:
    assert doc()["format"] == FORMAT == "l2d-federation-genesis"
