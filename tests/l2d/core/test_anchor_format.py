"""Anchor record, OP_RETURN script and Taproot commitment: vectors, strictness, BIP341 official vectors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest

from l2d.core.anchor_format import (NO_PREVIOUS, RECORD_SIZE, AnchorFormatError, AnchorRecord, Leaf, ScriptTree,
                                    TaprootAnchor, control_block, op_return_script, output_key, p2tr_script,
                                    parse_op_return, tapleaf_hash, taptweak, tree_root)
from l2d.core.errors import DecodeError, OutOfRange, UnknownVersion, WrongNetwork
from l2d.core.params import LOCAL, REGTEST

BIP341 = Path(__file__).resolve().parents[4] / "shared" / "vectors" / "bip341_wallet_vectors.json"
FED = bytes.fromhex("93478e9488f956df2396be2ce6c5cced75f900dfa18e7dabd2428aae78451820")
if not BIP341.exists():
    pytest.skip(f"BIP341 vectors not found at {BIP341} (shared/ must sit beside the repository)", allow_module_level=True)
REC = AnchorRecord(REGTEST.id, 42, bytes(range(32)), bytes(range(32, 64)))


def _tree(t: Any) -> Optional[ScriptTree]:
    if t is None:
        return None
    if isinstance(t, dict):
        return Leaf(t["leafVersion"], bytes.fromhex(t["script"]))
    return [_tree(x) for x in t]  # type: ignore[misc]


def _leaves(t: Optional[ScriptTree]) -> list[Leaf]:
    if t is None:
        return []
    if isinstance(t, Leaf):
        return [t]
    return [leaf for x in t for leaf in _leaves(x)]


def test_record_layout_is_pinned() -> None:
    raw = REC.encode()
    assert len(raw) == RECORD_SIZE == 78
    assert raw.hex() == ("4c324441" "01" "02" "000000000000002a" + bytes(range(32)).hex() + bytes(range(32, 64)).hex())
    assert AnchorRecord.decode(raw, REGTEST) == REC
    script = op_return_script(REC)
    assert script[:3] == bytes.fromhex("6a4c4e") and len(script) == 81 <= 83
    assert parse_op_return(script, REGTEST) == REC


def test_link_chains_records() -> None:
    nxt = AnchorRecord(REGTEST.id, 43, b"\x07" * 32, REC.link)
    assert nxt.prev_link == REC.link != AnchorRecord(REGTEST.id, 42, bytes(range(32))).link
    assert len(REC.link) == 32 and REC.link != nxt.link


@pytest.mark.parametrize("mutate, error", [
    (lambda b: b[:-1], AnchorFormatError),
    (lambda b: b + b"\0", AnchorFormatError),
    (lambda b: b"XXXX" + b[4:], AnchorFormatError),
    (lambda b: b[:4] + b"\x02" + b[5:], UnknownVersion),
    (lambda b: b[:5] + bytes((LOCAL.id,)) + b[6:], WrongNetwork),
])
def test_record_decoder_is_strict(mutate: Any, error: type[DecodeError]) -> None:
    with pytest.raises(error):
        AnchorRecord.decode(mutate(REC.encode()), REGTEST)


@pytest.mark.parametrize("script", [
    bytes.fromhex("6a4e") + REC.encode(),                 # push without PUSHDATA1 (not a valid push)
    bytes.fromhex("6a4d4e00") + REC.encode(),             # non-minimal PUSHDATA2
    bytes.fromhex("6a4c4f") + REC.encode() + b"\0",        # 79-byte push
    bytes.fromhex("6a4c4e") + REC.encode() + b"\x51",      # trailing opcode
    bytes.fromhex("514c4e") + REC.encode(),                # not OP_RETURN
    b"",
])
def test_op_return_parser_accepts_only_the_canonical_script(script: bytes) -> None:
    with pytest.raises(DecodeError):
        parse_op_return(script, REGTEST)


def test_record_fields_are_validated() -> None:
    with pytest.raises(OutOfRange):
        AnchorRecord(REGTEST.id, 1, b"\0" * 31)
    with pytest.raises(OutOfRange):
        AnchorRecord(REGTEST.id, -1, b"\0" * 32)
    assert AnchorRecord(REGTEST.id, 0, b"\0" * 32).prev_link == NO_PREVIOUS


def test_taproot_anchor_commits_to_the_record_and_never_op_true() -> None:
    a = TaprootAnchor(REC, FED)
    version, script = a.leaf.version, a.leaf.script
    assert version == 0xC0
    assert script == bytes([32]) + REC.link + bytes([0x75, 32]) + FED + bytes([0xAC])
    assert b"\x51" != script[-1:]  # ends in OP_CHECKSIG, never OP_TRUE
    assert a.script_pubkey == p2tr_script(output_key(FED, tapleaf_hash(a.leaf))[0])
    other = TaprootAnchor(AnchorRecord(REGTEST.id, 42, bytes(range(32)), NO_PREVIOUS), FED)
    assert other.script_pubkey != a.script_pubkey
    assert a.control_block[1:33] == FED and len(a.control_block) == 33


def _bip341() -> list[dict[str, Any]]:
    return json.loads(BIP341.read_text())["scriptPubKey"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("vec", _bip341(), ids=lambda v: v["expected"]["bip350Address"][:16])
def test_bip341_official_script_pubkey_vectors(vec: dict[str, Any]) -> None:
    given, inter, exp = vec["given"], vec["intermediary"], vec["expected"]
    tree = _tree(given["scriptTree"])
    ik = bytes.fromhex(given["internalPubkey"])
    leaves = _leaves(tree)
    assert [tapleaf_hash(leaf).hex() for leaf in leaves] == inter.get("leafHashes", [])
    root = tree_root(tree)
    assert (root.hex() if root else None) == inter["merkleRoot"]
    assert taptweak(ik, root).hex() == inter["tweak"]
    assert output_key(ik, root)[0].hex() == inter["tweakedPubkey"]
    assert p2tr_script(bytes.fromhex(inter["tweakedPubkey"])).hex() == exp["scriptPubKey"]
    if tree is not None:
        assert [control_block(ik, tree, leaf).hex() for leaf in leaves] == exp["scriptPathControlBlocks"]


def test_bip341_key_path_tweaks() -> None:
    spending = json.loads(BIP341.read_text())["keyPathSpending"][0]
    for inp in spending["inputSpending"]:
        given, inter = inp["given"], inp["intermediary"]
        ik = bytes.fromhex(inter["internalPubkey"])
        root = bytes.fromhex(given["merkleRoot"]) if given["merkleRoot"] else None
        assert taptweak(ik, root).hex() == inter["tweak"]


def test_pinned_anchor_vectors() -> None:
    vectors = json.loads((Path(__file__).resolve().parents[2] / "vectors" / "anchors.json").read_text())["vectors"]
    for v in vectors:
        rec = AnchorRecord(v["network_id"], v["l2_height"], bytes.fromhex(v["state_root"]), bytes.fromhex(v["prev_link"]))
        assert rec.encode().hex() == v["record"] and rec.link.hex() == v["link"]
        assert op_return_script(rec).hex() == v["op_return_script"]
        t = TaprootAnchor(rec, bytes.fromhex(v["federation_key"]))
        assert t.leaf.script.hex() == v["leaf_script"] and t.merkle_root.hex() == v["leaf_hash"]
        assert t.output_key.hex() == v["output_key"] and t.script_pubkey.hex() == v["script_pubkey"]
        assert t.control_block.hex() == v["control_block"]
    assert vectors[1]["prev_link"] == vectors[0]["link"]
