"""Bridge transaction payloads: Bitcoin header relay, peg-in claims, peg-out updates (docs/transaction-format.md)."""
from __future__ import annotations

from .tx import register_payloads

register_payloads()
