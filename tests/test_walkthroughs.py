"""The walkthroughs of README.md and regtest/README.md, run command by command as the documents write them.

A fenced block whose info string is ``sh walkthrough=NAME`` belongs to walkthrough NAME (GitHub highlights it as
``sh`` and shows nothing of the rest); ``sh walkthrough=NAME background`` marks a command the reader leaves running
in another terminal (``make run``). Each walkthrough's blocks, in document order, run in one ``bash -euo
pipefail`` session, a background block as ``( block ) &``; a command failing fails the test. Nothing is copied
from the documents into this file, so a document that rots fails here.

The session runs in a checkout of its own under tmp_path, as a reader's would be after ``make run`` once:
``.venv``, ``regtest/`` and the Makefile are links to this repository's, ``config/`` a copy (the configs resolve
their data dirs against their own folder, so ``.data/`` is the tmp checkout's), and ``regtest/start.sh`` keeps
``.regtest/`` in the checkout it runs from. HOME is a tmp folder too. The REST ports are the documents' own
(8650, 8651): pytest runs one test at a time and each walkthrough stops its daemons (or this test does, by
process group and ``regtest/stop.sh``) before the next starts. The regtest walkthroughs need bitcoind and are
skipped with one line without it.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from regtest.harness import find_bitcoin_cli, find_bitcoind

REPO = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "regtest/README.md")
SKIP_REASON = "bitcoind not found (set $BITCOIND or put it on PATH)"
FENCE = re.compile(r"^```sh walkthrough=(?P<name>[\w-]+)(?P<background> background)?\s*$")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the block's first command in doc
    text: str
    background: bool


def blocks(name: str) -> list[Block]:
    """The code blocks of walkthrough `name`, README.md's first, each document's in order."""
    found = []
    for doc in DOCS:
        lines = (REPO / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            i += 1
            if m is None or m["name"] != name:
                continue
            start = i
            while not lines[i].startswith("```"):
                i += 1
            found.append(Block(doc, start + 1, "\n".join(lines[start:i]), bool(m["background"])))
    return found


def script(name: str, logs: Path) -> str:
    parts = []
    for n, b in enumerate(blocks(name)):
        parts.append(f": {b.doc} line {b.line}")  # traced by bash -x: where a failing command comes from
        if b.background:
            parts.append(f"( {b.text}\n) > {shlex.quote(str(logs / f'background-{n}.log'))} 2>&1 &")
        else:
            parts.append(b.text)
    return "\n".join(parts) + "\n"


def checkout(tmp: Path) -> Path:
    """A checkout of this repository for the reader's session: links to what is installed, a copy of config/."""
    root = tmp / "checkout"
    root.mkdir()
    for link in (".venv", "regtest", "Makefile"):
        (root / link).symlink_to(REPO / link)
    shutil.copytree(REPO / "config", root / "config")
    # make run needs pyproject.toml no newer than the venv's install stamp (the venv is installed: make test made it)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    stamp = (REPO / ".venv" / ".installed").stat()
    os.utime(root / "pyproject.toml", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    return root


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM the session's process group (background daemons included), SIGKILL what outlives `timeout`."""
    sig = signal.SIGTERM
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if proc.poll() is None:
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(0.2)  # poll interval while the group's other members stop
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        elif sig == signal.SIGTERM:
            sig = 0  # sent once; then only check whether the group is gone


def stop_regtest(root: Path, env: dict[str, str]) -> None:
    """What regtest/stop.sh does, when a failed walkthrough did not get to run it."""
    if (root / ".regtest" / "env").exists():
        subprocess.run(["regtest/stop.sh"], cwd=root, env=env, capture_output=True, timeout=150)


# walkthrough -> (needs bitcoind, REST port its daemon takes, lines its output must hold, session timeout in s)
WALKTHROUGHS = {
    "operator": (False, 8650, [r"(?s)balance_sat: 100000\n.*balance_sat: 2500\n"], 120),  # alice's, then bob's
    "regtest-scripts": (True, 8651, [r'"chain": "regtest"', "bitcoind stopped"], 120),
    "regtest": (True, 8651, [r"(?m)^OK audit a\.bundle: ", r"(?m)^OK audit final\.bundle: ", "bitcoind stopped"], 240),
    "pegin": (True, 8651, [r'"status": "(PENDING|BROADCAST|COMPLETED)"', "bitcoind stopped"], 240),
}


def test_every_walkthrough_block_is_run() -> None:
    """A tagged block whose name this file does not know, or a misspelt tag, would be skipped without a word."""
    fences = [(doc, line) for doc in DOCS for line in (REPO / doc).read_text().splitlines()
              if line.startswith("```") and "walkthrough" in line]
    names = {m["name"] for _, line in fences if (m := FENCE.match(line))}
    bad = [f"{doc}: {line}" for doc, line in fences if not FENCE.match(line)]
    assert bad == [], "malformed walkthrough tags (```sh walkthrough=NAME [background]):\n" + "\n".join(bad)
    assert names == set(WALKTHROUGHS), f"tagged in the documents: {sorted(names)}; run here: {sorted(WALKTHROUGHS)}"


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.regtest] if WALKTHROUGHS[n][0] else [])
                                  for n in WALKTHROUGHS])
def test_walkthrough(name: str, tmp_path: Path) -> None:
    needs_bitcoind, port, expected, timeout = WALKTHROUGHS[name]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("L2D_", "BITCOIN", "MAKE", "MFLAGS"))}  # a reader's shell, not make test's
    if needs_bitcoind:
        bitcoind = find_bitcoind()
        if bitcoind is None:
            pytest.skip(SKIP_REASON)
        cli = find_bitcoin_cli(bitcoind)
        env["BITCOIND"] = bitcoind
        # the documents call bitcoin-cli by name: the reader has it on PATH
        env["PATH"] = os.pathsep.join(str(Path(p).parent) for p in (bitcoind, cli) if p) + os.pathsep + env["PATH"]
    assert blocks(name), f"no ```sh walkthrough={name} block in {' or '.join(DOCS)}"
    if not port_free(port):
        pytest.fail(f"127.0.0.1:{port} is taken (a daemon left running?): walkthrough {name} needs it")
    root = checkout(tmp_path)
    home, logs = tmp_path / "home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    env.update(HOME=str(home), PS4="+ ")
    path = tmp_path / f"{name}.sh"
    path.write_text(script(name, logs))
    out_path = logs / "session.log"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-x", str(path)], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            stop_group(proc)
            stop_regtest(root, env)
    output = out_path.read_text(errors="replace")
    background = "".join(f"\n--- {p.name} (last lines) ---\n" + "\n".join(p.read_text().splitlines()[-15:])
                         for p in sorted(logs.glob("background-*.log")))
    failed = ("timed out after %d s" % timeout) if code is None else f"exit code {code}"
    assert code == 0, (f"walkthrough {name} ({path}, run in {root}): {failed}; last lines:\n"
                       + "\n".join(output.splitlines()[-40:]) + background)
    for pattern in expected:
        assert re.search(pattern, output), f"walkthrough {name}: no /{pattern}/ in its output:\n{output[-4000:]}"
    assert port_free(port), f"walkthrough {name} left 127.0.0.1:{port} taken"
