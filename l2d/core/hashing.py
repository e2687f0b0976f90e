"""BIP340-style tagged SHA-256 hashes, one tag per distinct use, with precomputed midstates."""
from __future__ import annotations

import hashlib
from typing import Callable

_sha256 = hashlib.sha256


def _tagged(tag: str) -> Callable[[bytes], bytes]:
    th = _sha256(tag.encode()).digest()
    midstate = _sha256(th + th)  # one 64-byte block: copying it costs less than rehashing the tag

    def h(data: bytes) -> bytes:
        c = midstate.copy()
        c.update(data)
        return c.digest()

    h.__name__ = "tagged_" + tag.replace("/", "_")
    h.__doc__ = f"SHA256(SHA256({tag!r})*2 || data)"
    return h


def tagged_hash(tag: str, data: bytes) -> bytes:
    """BIP340 tagged hash for an arbitrary tag (slow path; the named hashers below are precomputed)."""
    th = _sha256(tag.encode()).digest()
    return _sha256(th + th + data).digest()


def sha256(data: bytes) -> bytes:
    return _sha256(data).digest()


# One tag per use. Changing any of these strings is a consensus change.
H_TX_SIG = _tagged("l2d/tx/sighash")
H_TXID = _tagged("l2d/tx/id")
H_TXROOT_NODE = _tagged("l2d/txroot/node")
H_TXROOT = _tagged("l2d/txroot")
H_BLOCK = _tagged("l2d/block")
H_LEAF = _tagged("l2d/state/leaf")
H_NODE = _tagged("l2d/state/node")
H_VALUE = _tagged("l2d/state/value")
H_KEY = _tagged("l2d/state/key")
EMPTY_ROOT = _tagged("l2d/state/empty")(b"")
H_PEGIN_TWEAK = _tagged("l2d/pegin/tweak")
H_PEGIN_OUTPOINT = _tagged("l2d/pegin/outpoint")
H_PLAN_SIG = _tagged("l2d/plan/signature")
H_RELAY_VOTE = _tagged("l2d/relay/vote")  # a member's vote on a relay's weight: its state key (l2d/core/relay.py)
H_RECEIPT = _tagged("l2d/session/receipt")  # what a session key signs (l2d/core/session_tx.py)
H_RECEIPT_ID = _tagged("l2d/session/receipt-id")  # a settled receipt's hash, kept in its session record
H_FP_LEAF = _tagged("l2d/inference/fp-leaf")  # one output position of a completion's fingerprint (model_tx.py)
H_FP_NODE = _tagged("l2d/inference/fp-node")
H_FP_ROOT = _tagged("l2d/inference/fp-root")
H_RESULT = _tagged("l2d/inference/result")  # what a worker signs for a result it produced
H_DRAW = _tagged("l2d/inference/draw")  # a recorded completion's audit seed: its id and the block it was built on
# Member transport (l2d/federation/wire.py): not consensus, but fixed so members of one version interoperate.
H_FED_HANDSHAKE = _tagged("l2d/federation/handshake")
H_FED_REQUEST = _tagged("l2d/federation/request")
H_COMMIT = _tagged("l2d/block/commit")
H_FED_MESSAGE = _tagged("l2d/federation/message")  # member-to-member protocol messages (l2d/federation)
