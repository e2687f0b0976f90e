"""Runs l2d with its wall clock ahead: `python tests/l2d/skewed_clock.py SKEW_MS --config FILE`.

A test-only launcher for a member whose system clock is wrong: time.time and time.time_ns are replaced, before
l2d is imported, by the true clock plus SKEW_MS, so every wall-clock reader in the process (the consensus host's
clock, block timestamps, fetch-request timestamps, log times) is skewed alike, as with a wrongly set system clock;
monotonic clocks stay true, as they do then. (libfaketime would do the same from outside, but it is not installed
here and would make the test depend on a system package.)"""
from __future__ import annotations

import sys
import time

skew_ms = int(sys.argv.pop(1))
_time, _time_ns = time.time, time.time_ns
time.time = lambda: _time() + skew_ms / 1000
time.time_ns = lambda: _time_ns() + skew_ms * 1_000_000

from l2d.node import main  # noqa: E402  (after the clock is replaced: modules bind time.time at import)

sys.exit(main(sys.argv[1:]))
