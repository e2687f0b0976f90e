"""Bridge state transitions: Bitcoin header relay, peg-in claims, peg-outs (docs/bridge.md)."""
from __future__ import annotations

from .state import register_handlers

register_handlers({})
