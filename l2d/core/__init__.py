"""Consensus-critical core: pure functions of their inputs (no clock, RNG, network or globals)."""
