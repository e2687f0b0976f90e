"""Typed errors of the member protocol: a refused message or signer file names what was wrong and changes nothing."""
from __future__ import annotations

from ..core.errors import L2Error


class FederationError(L2Error):
    """Root of the member protocol's own errors (decoding errors reuse the core's DecodeError tree)."""


class UnknownMember(FederationError):
    """A message whose sender index names no member of the federation."""


class BadMessageSignature(FederationError):
    """A message whose BIP340 signature does not verify for the member key of its sender."""


class BadBlockSignature(FederationError):
    """A SIGNATURE message whose block signature does not verify for its sender and block hash."""


class WrongProposer(FederationError):
    """A proposal from a member who is not the proposer of its height and round."""


class InconsistentMessage(FederationError):
    """A well-formed message whose fields contradict each other (header height, transaction root, commit size)."""


class BadEvidence(FederationError):
    """An equivocation record that does not prove two conflicting proposals by one member."""


class SignerStateError(FederationError):
    """A signer state file that cannot be trusted; the member must not sign until an operator resolves it."""


class SignerStateCorrupt(SignerStateError):
    """The signer state file is damaged (length, magic, version, checksum, field values)."""


class SignerStateMismatch(SignerStateError):
    """The signer state file belongs to another network or member key."""


class StaleSignerState(SignerStateError):
    """The signer state is older than a signature of this member found in the stored chain (a restored copy)."""


class TimingError(FederationError):
    """Round timing parameters that cannot work (non-positive, or a cap below the first round)."""
