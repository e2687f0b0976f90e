"""The signer's safety state: what this member last signed (and last proposed), the rules that decide whether it may
sign a block, and the small file that keeps the state across crashes.

The rules (issue 12, item 5), given the last block signed (height H, round R, block B, parent P):
    height < H                                  refuse: below the last signed height
    height > H                                  sign
    height = H, block = B                       re-send the same signature
    height = H, other block, parent != P        refuse: never another parent at one height
    height = H, other block, parent = P         sign only in a round later than R and when no complete (m-signed)
                                                block at H has been seen
The file is written (temporary file, fsync, atomic rename, directory fsync) BEFORE a signature or a proposal leaves
the process, lives outside LMDB and outside snapshots (restoring an old copy is how validators double-sign), and is
read strictly: a damaged file is refused with a typed error, never treated as "nothing signed yet".

File layout (227 bytes):
    magic "l2dsignr" | version u8 (1) | network id u8 | member key 32
    | signed u8 (0/1) | height u64 | round u32 | block hash 32 | parent hash 32 | block signature 64
    | proposal height u64 | proposal round u32 | SHA-256 of every byte before, 32
(signed = 0: the five signed fields are zero; proposal height 0: nothing proposed, round 0.)
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterable, Optional

from ..core.commit import SIG_SIZE, Commit, signature_valid
from ..core.params import Network
from .errors import SignerStateCorrupt, SignerStateMismatch, StaleSignerState

SIGNER_FILE = "member.signer"  # in the data dir, beside (not inside) the LMDB ledger and the snapshots
MAGIC = b"l2dsignr"
VERSION = 1
_LAYOUT = struct.Struct(">8sBB32sBQI32s32s64sQI")
FILE_SIZE = _LAYOUT.size + 32  # 227


@dataclass(frozen=True, slots=True)
class Signed:
    """The last block this member signed, and the signature it released."""

    height: int
    round: int
    block_hash: bytes
    parent_hash: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class SignerState:
    signed: Optional[Signed] = None
    proposed: Optional[tuple[int, int]] = None  # (height, round) of my last proposal: never two in one round

    def may_propose(self, height: int, round_: int) -> bool:
        return self.proposed is None or (height, round_) > self.proposed


class Verdict(Enum):
    SIGN = "sign"
    RESEND = "resend"  # the same block again: release the stored signature, the state is unchanged
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str


def decide(last: Optional[Signed], height: int, round_: int, block_hash: bytes, parent_hash: bytes,
           complete_seen: bool) -> Decision:
    """May I sign block_hash (child of parent_hash) at (height, round)? complete_seen: I hold a complete (m-signed)
    block at this height."""
    if last is None or height > last.height:
        return Decision(Verdict.SIGN, "nothing signed at this height")
    if height < last.height:
        return Decision(Verdict.REFUSE, f"height {height} is below my last signed height {last.height}")
    if block_hash == last.block_hash:
        return Decision(Verdict.RESEND, "the block I signed at this height")
    if parent_hash != last.parent_hash:
        return Decision(Verdict.REFUSE, f"I signed a block with another parent at height {height}")
    if round_ <= last.round:
        return Decision(Verdict.REFUSE, f"round {round_} is not later than my signature in round {last.round}")
    if complete_seen:
        return Decision(Verdict.REFUSE, f"a complete block at height {height} exists")
    return Decision(Verdict.SIGN, f"same parent, round {round_} after {last.round}, no complete block seen")


def encode_state(state: SignerState, network: Network, key: bytes) -> bytes:
    s = state.signed
    signed = (1, s.height, s.round, s.block_hash, s.parent_hash, s.signature) if s is not None else (
        0, 0, 0, bytes(32), bytes(32), bytes(SIG_SIZE))
    proposed = state.proposed or (0, 0)
    body = _LAYOUT.pack(MAGIC, VERSION, network.id, key, *signed, *proposed)
    return body + hashlib.sha256(body).digest()


def decode_state(b: bytes, network: Network, key: bytes) -> SignerState:
    """The state in b, written by encode_state for this network and member key; a SignerStateError otherwise."""
    if len(b) != FILE_SIZE:
        raise SignerStateCorrupt(f"signer state is {len(b)} bytes, expected {FILE_SIZE}")
    body, checksum = b[:-32], b[-32:]
    if hashlib.sha256(body).digest() != checksum:
        raise SignerStateCorrupt("signer state checksum does not match its contents")
    magic, version, net, file_key, flag, height, round_, block, parent, sig, p_height, p_round = _LAYOUT.unpack(body)
    if magic != MAGIC:
        raise SignerStateCorrupt("not a signer state file (bad magic)")
    if version != VERSION:
        raise SignerStateCorrupt(f"signer state version {version} (this code knows {VERSION})")
    if net != network.id:
        raise SignerStateMismatch(f"signer state is for network id {net}, this is {network.name} (id {network.id})")
    if file_key != key:
        raise SignerStateMismatch(f"signer state belongs to member key {file_key.hex()}, not {key.hex()}")
    if p_height == 0 and p_round != 0:
        raise SignerStateCorrupt("signer state: a proposal round without a proposal height")
    proposed = (p_height, p_round) if p_height else None
    if flag == 0:
        if (height, round_, block, parent, sig) != (0, 0, bytes(32), bytes(32), bytes(SIG_SIZE)):
            raise SignerStateCorrupt("signer state: fields set although nothing was signed")
        return SignerState(None, proposed)
    if flag != 1:
        raise SignerStateCorrupt(f"signer state: signed flag {flag}, expected 0 or 1")
    if height < 1:
        raise SignerStateCorrupt("signer state: a signature at height 0")
    if not signature_valid(key, network, block, sig):
        raise SignerStateCorrupt(f"signer state: the stored signature does not verify for block {block.hex()}")
    return SignerState(Signed(height, round_, block, parent, sig), proposed)


def save_state(path: Path, state: SignerState, network: Network, key: bytes) -> None:
    """Write the state durably before anything that depends on it leaves: a temporary file beside it, fsynced,
    renamed over the old one, the directory fsynced. A crash leaves the old state or the new one."""
    data = encode_state(state, network, key)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write of {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load_state(path: Path, network: Network, key: bytes) -> SignerState:
    """The saved state; an empty state if the file does not exist (a member that never signed); a SignerStateError
    for a file that exists but cannot be trusted, and an OSError for one that cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return SignerState()
    return decode_state(data, network, key)


def check_not_stale(state: SignerState, index: int, stored: Iterable[tuple[int, Commit]]) -> None:
    """StaleSignerState if a stored block (height, commit) carries this member's signature at a height above the
    last signed one: the state file is an old copy, and signing from it could contradict a released signature."""
    last = state.signed.height if state.signed is not None else 0
    for height, commit in stored:
        if index in commit.signers and height > last:
            raise StaleSignerState(f"the stored block at height {height} carries my signature, but my signer state "
                                   f"only records signatures up to height {last}: it is an old copy")
