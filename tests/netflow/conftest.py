"""Fixtures of the NetFlow tests."""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.netflow.procs import Proc


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Netflow processes a test starts; any still running at teardown is killed."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill()
