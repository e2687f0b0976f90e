"""Every test of the daemon's own code logs at DEBUG and checks that each record renders as one JSON line."""
from __future__ import annotations

import json
import logging
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

