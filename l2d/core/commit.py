"""Block commits: which members signed a block, and their BIP340 signatures (docs/federation.md).

A member signs sighash = H("l2d/block/commit", network id u8 || block hash 32); the block hash itself stays
signature-free, so every member computes the same block. Byte layout:
    n u8 | signer bitmap ceil(n/8) bytes (member i is bit i % 8 of byte i // 8; unused high bits zero)
    | one 64-byte signature per set bit, in member-index order
"""
from __future__ import annotations

from dataclasses import dataclass

from coincurve import PrivateKey

from .errors import BadCommitSignature, DecodeError, NotEnoughSignatures, OutOfRange, TrailingBytes, Truncated
from .hashing import H_COMMIT
from .members import MAX_MEMBERS, Membership
from .params import Network
from .tx import xonly_key

SIG_SIZE = 64


def commit_sighash(network: Network, block_hash: bytes) -> bytes:
    if len(block_hash) != 32:
        raise OutOfRange(f"block hash is {len(block_hash)} bytes, expected 32")
    return H_COMMIT(bytes((network.id,)) + block_hash)


def sign_block(secret: bytes, network: Network, block_hash: bytes, aux: bytes) -> bytes:
    """A member's signature of a block (aux: 32 bytes of BIP340 auxiliary randomness, the caller's)."""
    return PrivateKey(secret).sign_schnorr(commit_sighash(network, block_hash), aux)


def signature_valid(key: bytes, network: Network, block_hash: bytes, signature: bytes) -> bool:
    try:
        return bool(xonly_key(key).verify(signature, commit_sighash(network, block_hash)))
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Commit:
    n: int
    signers: tuple[int, ...]  # member indices, strictly increasing
    signatures: tuple[bytes, ...]  # one per signer, same order

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_MEMBERS:
            raise OutOfRange(f"commit for {self.n} members, expected 1..{MAX_MEMBERS}")
        if list(self.signers) != sorted(set(self.signers)) or any(not 0 <= i < self.n for i in self.signers):
            raise OutOfRange(f"commit signers {self.signers} are not distinct increasing indices below {self.n}")
        if len(self.signatures) != len(self.signers) or any(len(s) != SIG_SIZE for s in self.signatures):
            raise OutOfRange("a commit carries one 64-byte signature per signer")

    @classmethod
    def assemble(cls, n: int, signatures: dict[int, bytes]) -> "Commit":
        """The commit of the given member index -> signature pairs."""
        order = sorted(signatures)
        return cls(n, tuple(order), tuple(signatures[i] for i in order))

    def encode(self) -> bytes:
        bitmap = bytearray((self.n + 7) // 8)
        for i in self.signers:
            bitmap[i // 8] |= 1 << (i % 8)
        return bytes((self.n,)) + bytes(bitmap) + b"".join(self.signatures)

    @classmethod
    def decode(cls, b: bytes) -> "Commit":
        if not b:
            raise Truncated("commit: empty")
        n = b[0]
        if not 1 <= n <= MAX_MEMBERS:
            raise OutOfRange(f"commit for {n} members, expected 1..{MAX_MEMBERS}")
        width = (n + 7) // 8
        if len(b) < 1 + width:
            raise Truncated(f"commit: {len(b)} bytes, the signer bitmap of {n} members needs {1 + width}")
        bitmap = b[1:1 + width]
        if n % 8 and bitmap[-1] >> (n % 8):
            raise DecodeError(f"commit: bitmap bits set above member {n - 1}")
        signers = tuple(i for i in range(n) if bitmap[i // 8] >> (i % 8) & 1)
        need = 1 + width + SIG_SIZE * len(signers)
        if len(b) < need:
            raise Truncated(f"commit: {len(b)} bytes, {len(signers)} signatures need {need}")
        if len(b) > need:
            raise TrailingBytes(f"commit: {len(b) - need} bytes after the last signature")
        sigs = tuple(b[1 + width + SIG_SIZE * k:1 + width + SIG_SIZE * (k + 1)] for k in range(len(signers)))
        return cls(n, signers, sigs)

    def verify(self, members: Membership, network: Network, block_hash: bytes) -> None:
        """Raise a CommitError unless at least members.threshold distinct members signed block_hash."""
        if self.n != members.n:
            raise NotEnoughSignatures(f"commit names {self.n} members, the federation has {members.n}")
        if len(self.signers) < members.threshold:
            raise NotEnoughSignatures(f"{len(self.signers)} member signatures, the threshold is {members.threshold}")
        msg = commit_sighash(network, block_hash)
        for i, sig in zip(self.signers, self.signatures):
            if not xonly_key(members.keys[i]).verify(sig, msg):
                raise BadCommitSignature(f"member {i}'s signature does not verify for block {block_hash.hex()}")
