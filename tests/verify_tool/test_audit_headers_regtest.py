"""l2-verify audit --checkpoint HASH --headers FILE on a real bitcoind's chain: a real OP_RETURN anchor transaction,
its gettxoutproof, the bundle's headers and a header file from getblockheader (written with the header file writer,
byte for byte what GET /api/bridge/headers serves); then a reorg onto another branch (invalidateblock) for the
checkpoint on another branch. Skipped when bitcoind is absent ($BITCOIND or PATH)."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from l2d.core.anchor_format import AnchorRecord, op_return_script
from l2d.core.audit import AnchorKind, AuditBundle
from l2d.core.header_file import write_header_file
from l2d.core.params import REGTEST
from regtest.harness import BitcoindNode
from tests.conftest import load_by_path
from verify_tool.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.regtest


B = load_by_path("tests/l2d/core/test_audit.py", "_l2d_audit_bundle_builder")  # its builders


def header_at(node: BitcoindNode, height: int) -> bytes:
    return bytes.fromhex(node.call_sync("getblockheader", [node.call_sync("getblockhash", [height]), False]))


def export(node: BitcoindNode, path: Path, start: int, end: int) -> Path:
    """bitcoind's best chain start..end as a header file."""
    buf = io.BytesIO()
    write_header_file(buf, "regtest", start, end - start + 1, (header_at(node, h) for h in range(start, end + 1)))
    path.write_bytes(buf.getvalue())
    return path


def audit(capsys: pytest.CaptureFixture[str], bundle: Path, checkpoint: str, headers: Path,
          *extra: str) -> tuple[int, dict[str, Any]]:
    code = main(["audit", str(bundle), "--checkpoint", checkpoint, "--headers", str(headers), *extra, "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert obj["exit_code"] == code
    return code, obj


def test_checkpoint_through_a_header_file_of_bitcoinds_chain(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             bitcoind: BitcoindNode) -> None:
    node = bitcoind
    node.call_sync("createwallet", ["miner"])
    addr = node.call_sync("getnewaddress")
    node.call_sync("generatetoaddress", [101, addr])

    # a real anchor: an OP_RETURN output carrying the record of a made-up state, mined at 102, 10 blocks on top
    items = B.state(8)
    keys = sorted(items)
    evidence = B.proofs_for(items, [keys[0], keys[3]])
    record = AnchorRecord(REGTEST.id, B.L2_HEIGHT, evidence.state_root)
    raw = node.call_sync("createrawtransaction", [[], [{"data": record.encode().hex()}]])
    funded = node.call_sync("fundrawtransaction", [raw])["hex"]
    signed = node.call_sync("signrawtransactionwithwallet", [funded])["hex"]
    txid = node.call_sync("sendrawtransaction", [signed])
    [anchor_block] = node.call_sync("generatetoaddress", [1, addr])
    node.call_sync("generatetoaddress", [10, addr])
    tx = node.call_sync("getrawtransaction", [txid, True])
    assert any(o["scriptPubKey"]["hex"] == op_return_script(record).hex() for o in tx["vout"])
    anchor_height, tip, start = 102, 112, 100
    bundle = AuditBundle(REGTEST.id, record, AnchorKind.OP_RETURN, b"", bytes.fromhex(signed),
                         bytes.fromhex(node.call_sync("gettxoutproof", [[txid], anchor_block])), start,
                         b"".join(header_at(node, h) for h in range(start, tip + 1)), evidence)
    bpath = tmp_path / "anchor.l2audit"
    bpath.write_bytes(bundle.encode())
    hf = export(node, tmp_path / "headers.l2dh", 0, tip)
    cp50 = node.call_sync("getblockhash", [50])

    # an old checkpoint (50), far below the bundle's 100..112: refused without --headers, verified with them
    code = main(["audit", str(bpath), "--checkpoint", f"50:{cp50}", "--json"])
    assert (code, json.loads(capsys.readouterr().out)["error_type"]) == (1, "CheckpointMismatch")
    code, obj = audit(capsys, bpath, cp50, hf, "--min-conf", "11")
    assert code == 0, obj["error"]
    assert (obj["checkpoint"], obj["block_height"], obj["confirmations"]) == (f"50:{cp50}", anchor_height, 11)
    assert obj["txid"] == txid and obj["header_file"]["connected_at"].startswith(f"{start}:")
    r = subprocess.run([sys.executable, "-m", "verify_tool.cli", "audit", str(bpath), "--checkpoint", cp50,
                        "--headers", "-"], input=hf.read_bytes(), cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == 0 and b"linked from checkpoint 50:" + cp50.encode() in r.stdout, r.stderr

    # the file invalid: a real header's nonce changed
    damaged = bytearray(hf.read_bytes())
    damaged[33 + 80 * 60 + 76] ^= 0x01  # the nonce of header 60 (the preamble of a regtest file is 33 bytes)
    (tmp_path / "damaged.l2dh").write_bytes(bytes(damaged))
    code, obj = audit(capsys, bpath, cp50, tmp_path / "damaged.l2dh")
    assert code == 1 and obj["error_type"] in ("BadProofOfWork", "BadLink") and obj["height"] in (60, 61)

    # a reorg: the chain leaves the bundle's after 104 (the anchor block, 102, is on both branches)
    old_110 = node.call_sync("getblockhash", [110])
    node.call_sync("invalidateblock", [node.call_sync("getblockhash", [105])])
    node.call_sync("generatetoaddress", [12, node.call_sync("getnewaddress")])
    assert node.call_sync("getblockcount") == 116
    hf2 = export(node, tmp_path / "reorged.l2dh", 0, 116)
    new_110 = node.call_sync("getblockhash", [110])
    code, obj = audit(capsys, bpath, new_110, hf2)  # the checkpoint on the new branch, the bundle on the old
    assert (code, obj["error_type"]) == (1, "CheckpointOnOtherBranch") and "at height 105" in obj["error"]
    code, obj = audit(capsys, bpath, old_110, hf2)  # the old branch's block is not in the new chain's file
    assert (code, obj["error_type"]) == (1, "CheckpointNotInFile")
    code, obj = audit(capsys, bpath, node.call_sync("getblockhash", [104]), hf2)  # common to both: fine
    assert code == 0 and obj["confirmations"] == 11
    code, obj = audit(capsys, bpath, cp50, export(node, tmp_path / "low.l2dh", 0, start - 1))
    assert (code, obj["error_type"]) == (1, "BundleNotConnected")
