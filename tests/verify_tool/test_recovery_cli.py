"""l2-verify recovery: the audit's checks, then the claims and the payout; exit codes 0/1/2/3, --json, a subprocess
run. The bundles anchor the state of tests/l2d/core/test_recovery.py, built from real applied transactions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from l2d.core.audit import AnchorKind
from l2d.core.pegs import FEDERATION_KEY
from l2d.core.recovery import ClaimKind
from l2d.core.state import LOCKED_KEY
from l2d.core.work import worker_key
from tests.l2d.core.test_audit import FEDERATION, make_world, with_commit
from tests.l2d.core.test_recovery import HOLDINGS, MINTED_FUNDS, TOY_FUNDS, Scenario, scenario
from tests.verify_tool.test_audit_cli import run, run_json
from verify_tool.recovery import EXIT_NO_RECOVERY, run_recovery

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def full() -> Scenario:
    return scenario(TOY_FUNDS)


def write(tmp_path: Path, name: str, items: dict[bytes, bytes], evidence: str = "snapshot") -> Path:
    p = tmp_path / f"{name}.l2audit"
    p.write_bytes(make_world(AnchorKind.OP_RETURN, evidence, items=items).bundle.encode())
    return p


def test_subprocess_recovery_of_an_anchored_state(tmp_path: Path, full: Scenario) -> None:
    bundle = write(tmp_path, "full", full.state)
    r = subprocess.run([sys.executable, "-m", "verify_tool.cli", "recovery", str(bundle), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    audit = obj["audit"]  # every check of l2-verify audit, its report as it prints it
    assert (audit["evidence"], audit["confirmations"], audit["block_height"]) == ("snapshot", 21, 5)
    assert obj["l2_height"] == audit["l2_height"] and obj["state_root"] == audit["state_root"]
    assert (obj["holdings_sat"], obj["claims_sat"], obj["payout_sat"], obj["unallocated_sat"]) == (
        HOLDINGS, 249_270, 249_270, 730)
    assert obj["pro_rata"] is False and obj["books"]["agree"] and obj["locked"]["agree"]
    assert [c["kind"] for c in obj["claims"]] == ["account"] * 3 + ["stake", "bounty", "fl-pool", "pegout", "pegout"]
    assert all(c["payout_sat"] == c["amount_sat"] for c in obj["claims"])
    assert len(obj["coins"]) == 3 and obj["funding_sat"] == 400_000
    text = subprocess.run([sys.executable, "-m", "verify_tool.cli", "recovery", str(bundle)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"OK recovery {bundle}: L2 regtest height ") and "21 confirmation(s) >= 1" in lines[0]
    assert lines[1] == (f"holdings: {HOLDINGS} sat in 3 coin(s); by the books pegged in 350000 - paid out 100000 = "
                        f"{HOLDINGS} sat: agree")
    assert lines[3] == "claims: 8 totalling 249270 sat, paid in full: 249270 sat; unallocated 730 sat"
    assert sum(line.startswith("  pegout ") for line in lines) == 2
    assert any("(BROADCAST; first check txid(s) " in line for line in lines)


def test_pro_rata_and_disagreement_in_the_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    s = scenario(MINTED_FUNDS)
    items = dict(s.state)
    bundle = write(tmp_path, "minted", items)
    code, obj = run_json(capsys, "recovery", str(bundle))
    assert code == 0 and obj["pro_rata"] is True
    total = obj["claims_sat"]
    assert [c["payout_sat"] for c in obj["claims"]] == [c["amount_sat"] * HOLDINGS // total for c in obj["claims"]]
    assert obj["payout_sat"] + obj["unallocated_sat"] == HOLDINGS
    code, out, _ = run(capsys, "recovery", str(bundle))
    assert code == 0 and "paid pro rata, floor(claim x holdings / claims)" in out
    items[LOCKED_KEY] = (1).to_bytes(8, "big")
    code, out, _ = run(capsys, "recovery", str(write(tmp_path, "locked", items)))
    assert code == 0 and "add up to 32000 sat: DISAGREE" in out


def test_audit_failures_and_usage_are_those_of_audit(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     full: Scenario) -> None:
    bundle = write(tmp_path, "full", full.state)
    code, out, err = run(capsys, "recovery", str(bundle), "--min-conf", "22")
    assert (code, out) == (1, "") and err.startswith(f"FAIL recovery {bundle}: ") and "22 required" in err
    raw = bytearray(bundle.read_bytes())
    raw[len(raw) // 2] ^= 1
    damaged = tmp_path / "damaged.l2audit"
    damaged.write_bytes(bytes(raw))
    assert run_json(capsys, "recovery", str(damaged))[1]["error_type"] == "BundleChecksumMismatch"
    short = tmp_path / "short.l2audit"
    short.write_bytes(bundle.read_bytes()[:-50])
    assert run_json(capsys, "recovery", str(short))[1]["error_type"] == "Truncated"
    code, obj = run_json(capsys, "recovery", str(bundle), "--checkpoint", "12:abc")
    assert (code, obj["error_type"]) == (2, "bad-argument")
    code, _, err = run(capsys, "recovery")
    assert code == 2 and "error:" in err
    code, out, _ = run(capsys, "recovery", "--json")
    assert code == 2 and json.loads(out)["command"] == "recovery"
    # --members: the anchored block's commit is required and checked, exactly as by audit
    members = tmp_path / "genesis.json"
    members.write_bytes(FEDERATION.encode())
    code, obj = run_json(capsys, "recovery", str(bundle), "--members", str(members))
    assert (code, obj["error_type"]) == (1, "CommitMissing")
    v2 = tmp_path / "v2.l2audit"
    v2.write_bytes(with_commit(make_world(AnchorKind.OP_RETURN, "snapshot", items=full.state)).encode())
    code, obj = run_json(capsys, "recovery", str(v2), "--members", str(members))
    assert code == 0 and obj["audit"]["commit"]["checked"] is True and obj["claims_sat"] == 249_270


def test_no_recovery_from_proofs_or_a_chain_without_a_bridge(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                             full: Scenario) -> None:
    proofs = write(tmp_path, "proofs", full.state, evidence="proofs")
    assert run(capsys, "audit", str(proofs))[0] == 0  # a bundle that verifies...
    code, out, err = run(capsys, "recovery", str(proofs))  # ... but carries no snapshot
    assert (code, out) == (EXIT_NO_RECOVERY, "") == (3, "")
    assert err.startswith(f"ERROR recovery {proofs}: the bundle's L2 evidence is a state root with 3 proof(s), not "
                          f"a snapshot")
    code, obj = run_json(capsys, "recovery", str(proofs))
    assert (code, obj["error_type"]) == (3, "NoSnapshotEvidence")
    plain = write(tmp_path, "plain", {k: v for k, v in full.state.items() if k != FEDERATION_KEY})
    code, obj = run_json(capsys, "recovery", str(plain))
    assert (code, obj["error_type"]) == (3, "NotABridgeChain")


def test_a_record_that_does_not_decode_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                               full: Scenario) -> None:
    items = dict(full.state)
    items[worker_key(full.worker)] = b"\x09" + items[worker_key(full.worker)][1:]
    bundle = write(tmp_path, "bad-worker", items)
    assert run(capsys, "audit", str(bundle))[0] == 0  # the snapshot verifies: its root is its records'
    code, obj = run_json(capsys, "recovery", str(bundle))
    assert (code, obj["error_type"]) == (2, "RecordMalformed")
    assert worker_key(full.worker).hex() in obj["error"]


def test_run_recovery_directly(tmp_path: Path, full: Scenario) -> None:
    bundle = write(tmp_path, "full", full.state)
    code, result, text = run_recovery(str(bundle), None, 1, None)
    assert code == 0 and result["ok"] and text.startswith("OK recovery")
    assert [c["kind"] for c in result["claims"]].count(ClaimKind.PEGOUT.label) == 2
    code, result, text = run_recovery(str(bundle), None, 1, None, now=1)  # headers 2 hours in the future
    assert (code, result["error_type"]) == (1, "TimeTooNew") and text.startswith("FAIL recovery")
