"""A netflow process (l2-relay, l2-netflow) for the tests: its first stdout line says where it listens."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


class Proc:
    """A netflow process whose first stdout line says where it listens."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, cwd=REPO)

    def first_line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"{self.log.name}: exited: {self.log.read_text()[-2000:]}"
        return line

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        self._err.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
