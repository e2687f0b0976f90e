"""Every test of the daemon's own code logs at DEBUG and checks that each record renders as one JSON line; `small_fs`
is a small real filesystem to fill up."""
from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from l2d.logs import JsonFormatter


@pytest.fixture(autouse=True)
def json_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Log everything at DEBUG (so every log call really builds its record) and check each record renders
    as one JSON line with the daemon's formatter."""
    caplog.set_level(logging.DEBUG)
    yield
    fmt = JsonFormatter()
    for record in caplog.records:
        line = fmt.format(record)
        assert "\n" not in line
        assert json.loads(line)["msg"] == record.getMessage()



@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 16 MiB tmpfs under tmp_path, to fill up for real (mounting needs root; skipped otherwise)."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {r.stderr.strip()[:200]}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)
