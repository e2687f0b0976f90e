"""Typed errors of the consensus core: every rejection names what was wrong."""
from __future__ import annotations


class L2Error(Exception):
    """Root of every error the core raises on bad input."""


class DecodeError(L2Error):
    """Bytes that are not the canonical encoding of the value asked for."""


class Truncated(DecodeError):
    """Input ended before the value did."""


class TrailingBytes(DecodeError):
    """Bytes left over after a complete value."""


class NonMinimalVarint(DecodeError):
    """A CompactSize integer not written in its shortest form."""


class UnknownVersion(DecodeError):
    """A version byte this code does not implement."""


class UnknownType(DecodeError):
    """A type tag this code does not implement."""


class WrongNetwork(DecodeError):
    """Data made for another network."""


class OutOfRange(DecodeError):
    """A field outside its allowed range (amount above MAX_MONEY, oversized field, ...)."""


class Rejected(L2Error):
    """A well-formed transaction that the state transition refuses; nothing was changed."""

    reason = "rejected"


class BadSignature(Rejected):
    reason = "bad-signature"


class BadNonce(Rejected):
    reason = "bad-nonce"


class InsufficientBalance(Rejected):
    reason = "insufficient-balance"


class Overflow(Rejected):
    reason = "overflow"


class FeeTooLow(Rejected):
    reason = "fee-below-floor"


class UnknownSender(Rejected):
    reason = "unknown-sender"


class Unauthorized(Rejected):
    reason = "unauthorized"


class InvalidTransaction(Rejected):
    reason = "invalid-transaction"


class DuplicateDuty(Rejected):
    """A member-posted system transaction whose work is already in the state (an anchor status already recorded,
    headers already relayed, a peg-out status already applied, a task already assigned or settled, an FL round
    already committed): several members may post the same duty, the first one applied wins."""

    reason = "duplicate-duty"


class ForeignNetwork(Rejected):
    """A transaction signed for another network id than the rules it is applied under."""

    reason = "wrong-network"


class InvalidBlock(L2Error):
    """A block that does not apply to its parent state (bad link, root or transaction)."""


class ProofError(L2Error):
    """A state proof that does not verify against the given root."""


class InvalidMembership(L2Error):
    """A federation membership that cannot be used (threshold, key count, duplicate or invalid keys)."""


class CommitError(L2Error):
    """A block commit that does not prove the federation signed the block."""


class NotEnoughSignatures(CommitError):
    """Fewer member signatures than the threshold."""


class BadCommitSignature(CommitError):
    """A signature in the commit does not verify for the member its bitmap names."""
