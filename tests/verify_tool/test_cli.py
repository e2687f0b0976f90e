"""l2-verify: exit codes 0/1/2, one-line messages, --json shape, proofs, and an import list free of the daemon."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from l2d.core import snapshot as S
from l2d.core.params import LOCAL
from l2d.core.state import Account, account_key, meta_key
from l2d.core.tree import Proof, ProofKind, StateTree, root_of
from verify_tool.cli import main

REPO = Path(__file__).resolve().parents[2]
BLOCK = b"\x07" * 32
HDR = struct.Struct(">8sBBQ32s32sQ")


def key(i: int) -> bytes:
    return b"\x01" + hashlib.sha256(b"k%d" % i).digest()


ITEMS = sorted((key(i), b"value-%d" % i) for i in range(20))
ROOT = root_of(ITEMS)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, *argv, "--json")
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert obj["ok"] is (code == 0) and obj["exit_code"] == code
    assert {"ok", "command", "error", "error_type", "exit_code"} <= obj.keys()
    return code, obj


@pytest.fixture
def snap(tmp_path: Path) -> Path:
    return S.write_snapshot_file(tmp_path, LOCAL, 42, BLOCK, ROOT, ITEMS, len(ITEMS))


def rebuilt(items: list[tuple[bytes, bytes]], root: bytes = ROOT) -> bytes:
    """A snapshot of any records (in any order) with a correct header count and checksum."""
    body = HDR.pack(S.MAGIC, 1, LOCAL.id, 42, BLOCK, root, len(items))
    body += b"".join(k + bytes((len(v),)) + v for k, v in items)
    return body + hashlib.sha256(body).digest()


# -- snapshot ------------------------------------------------------------------------------------------------------
def test_snapshot_ok_line(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    code, out, err = run(capsys, "snapshot", str(snap))
    assert code == 0 and err == ""
    assert out == (f"OK snapshot height 42 root {ROOT.hex()} (20 records, network local, block {BLOCK.hex()})\n")


def test_snapshot_json(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    code, obj = run_json(capsys, "snapshot", str(snap), "--expect-root", ROOT.hex(), "--network", "local")
    assert code == 0
    assert obj == {"ok": True, "command": "snapshot", "file": str(snap), "exit_code": 0, "error": None,
                   "error_type": None, "network": "local", "network_id": 1, "height": 42,
                   "block_hash": BLOCK.hex(), "state_root": ROOT.hex(), "record_count": 20,
                   "checksum": snap.read_bytes()[-32:].hex()}
    code, obj = run_json(capsys, "--json", "snapshot", str(snap))  # --json also accepted before the command
    assert code == 0


def test_expect_root_mismatch_is_1(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    code, out, err = run(capsys, "snapshot", str(snap), "--expect-root", "00" * 32)
    assert code == 1 and out == ""
    assert err == f"FAIL snapshot {snap}: snapshot root {ROOT.hex()} is not the expected root {'00' * 32}\n"


def test_flipped_byte_is_1_checksum(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    data = bytearray(snap.read_bytes())
    data[S.HEADER_SIZE + 36] ^= 0x40  # inside record 0's value
    snap.write_bytes(bytes(data))
    code, out, err = run(capsys, "snapshot", str(snap))
    assert code == 1 and err.startswith(f"FAIL snapshot {snap}: checksum mismatch") and err.count("\n") == 1
    code, obj = run_json(capsys, "snapshot", str(snap))
    assert code == 1 and obj["error_type"] == "checksum-mismatch" and "checksum mismatch" in obj["error"]


def test_reordered_records_is_1_and_names_the_record(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    items = ITEMS[:5] + [ITEMS[6], ITEMS[5]] + ITEMS[7:]
    p = tmp_path / "swapped.l2snap"
    p.write_bytes(rebuilt(items))
    offset = S.HEADER_SIZE + sum(33 + 1 + len(v) for _, v in items[:6])
    code, out, err = run(capsys, "snapshot", str(p))
    assert code == 1
    assert err.startswith(f"FAIL snapshot {p}: record 6 at offset {offset}: key out of order {ITEMS[5][0].hex()}")
    code, obj = run_json(capsys, "snapshot", str(p))
    assert (code, obj["error_type"], obj["record"], obj["offset"]) == (1, "key-out-of-order", 6, offset)


def test_duplicate_record_is_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "dup.l2snap"
    p.write_bytes(rebuilt(ITEMS[:3] + [ITEMS[2]] + ITEMS[3:]))
    code, out, err = run(capsys, "snapshot", str(p))
    assert code == 1 and ": record 3 at offset " in err and "duplicate key" in err


def test_root_mismatch_is_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = tmp_path / "forged.l2snap"
    p.write_bytes(rebuilt(ITEMS, root=b"\x55" * 32))
    code, obj = run_json(capsys, "snapshot", str(p))
    assert code == 1 and obj["error_type"] == "root-mismatch" and "state root mismatch" in obj["error"]


@pytest.mark.parametrize("how,kind,words", [
    ("truncate", "truncated", "truncated"),
    ("trailing", "trailing-bytes", "trailing bytes"),
    ("magic", "bad-magic", "not an l2d snapshot"),
    ("version", "unknown-version", "format version 3"),
])
def test_malformed_is_2(capsys: pytest.CaptureFixture[str], snap: Path, how: str, kind: str, words: str) -> None:
    data = snap.read_bytes()
    bad = {"truncate": data[:200], "trailing": data + b"\n", "magic": b"PK\x03\x04" + data[4:],
           "version": data[:8] + b"\x03" + data[9:]}[how]
    snap.write_bytes(bad)
    code, out, err = run(capsys, "snapshot", str(snap))
    assert code == 2 and out == "" and err.startswith(f"ERROR snapshot {snap}: ") and words in err
    assert err.count("\n") == 1
    code, obj = run_json(capsys, "snapshot", str(snap))
    assert code == 2 and obj["error_type"] == kind


def test_wrong_network_is_2(capsys: pytest.CaptureFixture[str], snap: Path) -> None:
    code, out, err = run(capsys, "snapshot", str(snap), "--network", "regtest")
    assert code == 2 and "snapshot is for network local (id 1), expected regtest (id 2)" in err


def test_usage_and_input_errors_are_2(capsys: pytest.CaptureFixture[str], snap: Path, tmp_path: Path) -> None:
    code, out, err = run(capsys, "snapshot", str(tmp_path / "missing.l2snap"))
    assert code == 2 and "cannot open" in err and "No such file" in err
    code, out, err = run(capsys, "snapshot", str(snap), "--expect-root", "xyz")
    assert code == 2 and "--expect-root must be 64 hex characters" in err
    code, out, err = run(capsys, "snapshot", str(snap), "--network", "moon")
    assert code == 2 and "invalid choice" in err
    code, out, err = run(capsys)
    assert code == 2 and "usage:" in err
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, obj = run_json(capsys, "snapshot")
    assert code == 2 and obj["error_type"] == "usage" and "FILE" in obj["error"]
    code, out, err = run(capsys, "--help")
    assert code == 0 and "exit codes" in out


# -- proof ---------------------------------------------------------------------------------------------------------
A = b"\x01" + b"\x00" * 32
B = b"\x01\xf0" + b"\x00" * 31
STATE = {A: b"alpha", B: b"beta"}


def tree() -> StateTree:
    t = StateTree()
    for k, v in STATE.items():
        t.set(k, v)
    return t


def proof_file(tmp_path: Path, proof: Proof, hex_form: bool = False) -> Path:
    p = tmp_path / ("proof.hex" if hex_form else "proof.bin")
    enc = proof.encode()
    if hex_form:
        h = enc.hex()
        p.write_text("\n".join(h[i:i + 60] for i in range(0, len(h), 60)) + "\n")
    else:
        p.write_bytes(enc)
    return p


def test_proof_present(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    t = tree()
    root = t.root()
    proof = t.prove(A, STATE.__getitem__)
    assert proof.kind == ProofKind.PRESENT
    for hex_form in (False, True):
        p = proof_file(tmp_path, proof, hex_form)
        code, out, err = run(capsys, "proof", "--root", root.hex(), str(p))
        assert code == 0 and err == ""
        # under an account key but not an account's 16 bytes: shown as what it is, labelled hex
        assert out == (f"OK proof: key {A.hex()} present, value (hex) {b'alpha'.hex()} (5 bytes) under root "
                       f"{root.hex()}\n")
    code, obj = run_json(capsys, "proof", "--root", root.hex(), str(p))
    assert obj == {"ok": True, "command": "proof", "file": str(p), "exit_code": 0, "error": None,
                   "error_type": None, "root": root.hex(), "key": A.hex(), "kind": "present",
                   "levels": len(proof.levels), "present": True, "value": b"alpha".hex()}


def test_proof_of_an_account_prints_its_balance_and_nonce(capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    pk = bytes.fromhex("5e" * 32)
    state = {**STATE, account_key(pk): Account(123_456, 7).encode(), meta_key("x"): b"\x00\x01"}
    t = StateTree()
    for k, v in state.items():
        t.set(k, v)
    root = t.root().hex()
    p = proof_file(tmp_path, t.prove(account_key(pk), state.__getitem__))
    code, out, err = run(capsys, "proof", "--root", root, str(p))
    assert code == 0 and err == ""
    assert out == f"OK proof: account {pk.hex()} present under root {root}: balance 123456 sat, nonce 7\n"
    code, obj = run_json(capsys, "proof", "--root", root, str(p))
    assert obj["account"] == {"id": pk.hex(), "balance_sat": 123_456, "nonce": 7}
    assert obj["value"] == Account(123_456, 7).encode().hex() and obj["present"] is True
    p = proof_file(tmp_path, t.prove(meta_key("x"), state.__getitem__))  # not an account: its value in hex
    code, out, err = run(capsys, "proof", "--root", root, str(p))
    assert code == 0 and out.startswith(f"OK proof: key {meta_key('x').hex()} present, value (hex) 0001 (2 bytes)")
    code, obj = run_json(capsys, "proof", "--root", root, str(p))
    assert "account" not in obj and obj["value"] == "0001"


@pytest.mark.parametrize("missing,kind", [
    (b"\x01" + b"\x00" * 31 + b"\x01", "absent-other"),  # its path ends at A's leaf
    (b"\x01\x50" + b"\x00" * 31, "absent-empty"),  # its path ends in an empty slot
])
def test_proof_absent(capsys: pytest.CaptureFixture[str], tmp_path: Path, missing: bytes, kind: str) -> None:
    t = tree()
    proof = t.prove(missing, STATE.__getitem__)
    p = proof_file(tmp_path, proof)
    code, out, err = run(capsys, "proof", "--root", t.root().hex(), str(p))
    assert code == 0 and out.startswith(f"OK proof: key {missing.hex()} absent under root {t.root().hex()}")
    code, obj = run_json(capsys, "proof", "--root", t.root().hex(), str(p))
    assert code == 0 and obj["kind"] == kind and obj["present"] is False and obj["value"] is None


def test_proof_tampered_or_wrong_root_is_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    t = tree()
    root = t.root()
    proof = t.prove(A, STATE.__getitem__)
    forged = Proof(proof.key, proof.kind, b"omega", b"", b"", proof.levels)
    code, out, err = run(capsys, "proof", "--root", root.hex(), str(proof_file(tmp_path, forged)))
    assert code == 1 and err.startswith("FAIL proof ") and f"expected {root.hex()}" in err
    code, obj = run_json(capsys, "proof", "--root", "11" * 32, str(proof_file(tmp_path, proof)))
    assert code == 1 and obj["error_type"] == "proof-mismatch" and obj["key"] == A.hex()


def test_proof_malformed_is_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    t = tree()
    root = t.root().hex()
    enc = t.prove(A, STATE.__getitem__).encode()
    p = tmp_path / "p"
    for bad, words in [(enc[:-1], "not a valid proof encoding"), (enc + b"\0", "trailing"), (b"", "not a valid"),
                       (b"\x09" + enc[1:], "proof version 9"), (b"abc", "odd number of hex digits")]:
        p.write_bytes(bad)
        code, out, err = run(capsys, "proof", "--root", root, str(p))
        assert code == 2 and err.startswith(f"ERROR proof {p}: ") and words in err, err
    code, out, err = run(capsys, "proof", "--root", "zz" * 32, str(p))
    assert code == 2 and "--root must be 64 hex characters" in err
    code, out, err = run(capsys, "proof", "--root", root, str(tmp_path / "nope"))
    assert code == 2 and "cannot open" in err
    code, out, err = run(capsys, "proof", str(p))
    assert code == 2 and "--root" in err


def test_every_command_and_argument_has_help(undocumented: Any) -> None:
    from verify_tool.cli import _parser

    assert undocumented(_parser()) == []


@pytest.mark.parametrize("argv", [
    ["snapshot", "{missing}"], ["proof", "--root", "11" * 32, "{missing}"], ["audit", "{missing}"],
    ["recovery", "{missing}"], ["headers", "{missing}"], ["chain", "{missing}", "--members", "{missing}"],
    ["audit", "{file}", "--members", "{missing}"], ["chain", "{file}", "--members", "{missing}"],
])
def test_a_missing_file_is_a_one_line_error_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              argv: list[str]) -> None:
    (tmp_path / "file").write_bytes(b"x")
    args = [a.format(missing=tmp_path / "missing", file=tmp_path / "file") for a in argv]
    code, out, err = run(capsys, *args)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"ERROR {argv[0]} ") and f"{tmp_path / 'missing'}: No such file or directory" in err


# -- as a program --------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_subprocess_exit_codes(snap: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "verify_tool.cli", "snapshot", str(snap)], capture_output=True,
                        text=True, env=_env(), cwd=REPO, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("OK snapshot height 42 root ")
    data = bytearray(snap.read_bytes())
    data[-1] ^= 1
    snap.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "verify_tool.cli", "snapshot", str(snap), "--json"],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error_type"] == "checksum-mismatch"
    usage = subprocess.run([sys.executable, "-m", "verify_tool.cli", "snapshot"], capture_output=True, text=True,
                           env=_env(), cwd=REPO, timeout=120)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_verifier_imports_only_the_core() -> None:
    code = ("import sys, verify_tool.cli\n"
            "bad = [m for m in ('lmdb', 'aiohttp', 'zmq', 'l2d.store', 'l2d.node', 'l2d.api', 'l2d.ledger', "
            "'coincurve', 'torch', 'flwr') if m in sys.modules]\n"
            "other = [m for m in sys.modules if m.startswith('l2d.') and not m.startswith('l2d.core')]\n"
            "print(bad + other)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _on_a_terminal(*argv: str) -> tuple[int, str, str]:
    """l2-verify with its stderr on a pseudo-terminal: (exit code, stdout, what the terminal showed)."""
    import pty
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "verify_tool.cli", *argv], stdout=subprocess.PIPE, stderr=slave,
                         env=_env(), cwd=REPO)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal is gone once the process exits
            break
        if not chunk:
            break
        shown += chunk
    out, _ = p.communicate(timeout=120)
    os.close(master)
    return p.returncode, out.decode(), shown.decode(errors="replace")


def test_progress_shows_on_a_terminal_and_never_in_json_or_a_pipe(snap: Path) -> None:
    code, out, shown = _on_a_terminal("snapshot", str(snap))
    assert code == 0 and out.startswith("OK snapshot height 42")
    assert f"snapshot {snap.name}" in shown and "B" in shown  # the bar: what is read, in bytes
    code, out, shown = _on_a_terminal("snapshot", str(snap), "--json")
    assert code == 0 and json.loads(out)["ok"] is True and shown == ""  # --json: quiet
    piped = subprocess.run([sys.executable, "-m", "verify_tool.cli", "snapshot", str(snap)], capture_output=True,
                           text=True, env=_env(), cwd=REPO, timeout=120)
    assert piped.returncode == 0 and piped.stderr == ""  # not a terminal: quiet
