"""l2-cli against a real daemon process: keys, admin mint, proofs checked locally, transfers, exports for l2-verify."""
from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any, Callable

import pytest

from l2d import cli
from verify_tool import cli as verify_cli

TOKEN = "cli-test-token-0123456789abcdef"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    rc = cli.main(["--json", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if rc == 0 else err)


def test_cli_end_to_end(tmp_path: Path, keys: Any, l2d_process: Callable[..., Any],
                        node_toml: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = node_toml(tmp_path / "node.toml", {keys.pubkey(1): 1_000_000}, TOKEN, block={"interval_ms": 20})
    d = l2d_process(cfg)
    api = ["--api", d.url("")]
    alice = tmp_path / "alice.key"
    rc, out = run(capsys, *api, "keygen", "--out", str(alice))
    assert rc == 0 and len(out["account"]) == 64
    assert stat.S_IMODE(alice.stat().st_mode) == 0o600
    rc, err = run(capsys, *api, "keygen", "--out", str(alice))
    assert rc == 1 and "exists" in err  # never overwrites a key silently
    alice_id = out["account"]

    rc, bal = run(capsys, *api, "balance", str(alice))
    assert rc == 0 and bal["exists"] is False and bal["proof_verified"] is True  # non-inclusion proof checked

    rc, err = run(capsys, *api, "mint", "--to", alice_id, "--amount", "5000", "--token", "wrong-token-0123456789")
    assert rc == 1 and "401" in err
    rc, out = run(capsys, *api, "mint", "--to", alice_id, "--amount", "5000", "--token", TOKEN, "--wait", "20")
    assert rc == 0 and out["status"] == "committed"
    rc, bal = run(capsys, *api, "balance", alice_id)
    assert (bal["balance_sat"], bal["nonce"], bal["proof_verified"]) == (5000, 0, True)

    bob = tmp_path / "bob.key"
    run(capsys, *api, "keygen", "--out", str(bob))
    rc, out = run(capsys, *api, "transfer", "--key", str(alice), "--to", str(bob), "--amount", "1200", "--fee", "3",
                  "--wait", "20")
    assert rc == 0 and out["status"] == "committed"
    assert run(capsys, *api, "balance", str(alice))[1]["balance_sat"] == 5000 - 1200 - 3
    assert run(capsys, *api, "balance", str(bob))[1]["balance_sat"] == 1200

    # The same transfer again (nonce 0 is spent): refused with the daemon's reason, exit 1.
    rc, err = run(capsys, *api, "transfer", "--key", str(alice), "--to", str(bob), "--amount", "1", "--nonce", "0")
    assert rc == 1 and "stale-nonce" in err
    rc, err = run(capsys, *api, "transfer", "--key", str(alice), "--to", str(bob), "--amount", "10000000")
    assert rc == 1 and "insufficient-balance" in err

    # Exports that the offline verifier accepts.
    rc, out = run(capsys, *api, "proof", str(bob), "--out", str(tmp_path / "bob.proof"))
    assert rc == 0
    assert verify_cli.main(["proof", "--root", out["root"], str(tmp_path / "bob.proof")]) == 0
    assert "present" in capsys.readouterr().out
    rc, snap = run(capsys, *api, "snapshot", "--out", str(tmp_path / "s.l2snap"), "--token", TOKEN)
    assert rc == 0
    assert verify_cli.main(["snapshot", str(tmp_path / "s.l2snap"), "--expect-root", snap["state_root"]]) == 0
    capsys.readouterr()

    rc, err = run(capsys, *api, "balance", "not-an-account")
    assert rc == 1 and "neither a key file" in err
    assert d.stop() == 0


def test_cli_reports_an_unreachable_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["--api", "http://127.0.0.1:9", "status"])
    assert rc == 1 and "cannot reach the daemon" in capsys.readouterr().err
