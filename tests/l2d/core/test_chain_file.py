"""Chain files signed by real member keys (BIP340, 4 members, m = 3): the honest export verifies from genesis or a
checkpoint, every forgery is refused with the error for the rule it breaks, and every malformed file is a typed
error. The builders here are shared with tests/verify_tool/test_chain_cli.py and the audit tests."""
from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any, Optional, Sequence

import pytest
from coincurve import PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.block import BlockHeader, genesis_header, tx_root
from l2d.core.chain_file import (MAGIC, MAX_COMMIT_SIZE, ChainBadCommitSignature, ChainBrokenLink,
                                 ChainCheckpointMismatch, ChainFileBadEntry, ChainFileChecksum, ChainFileEmpty,
                                 ChainFileMalformed, ChainFileTrailingBytes, ChainFileTruncated,
                                 ChainFileUnknownNetwork, ChainFileVersionError, ChainGenesisMismatch, ChainHeightGap,
                                 ChainNotEnoughSignatures, ChainNoTrustedStart, ChainReader, ChainWrongNetwork,
                                 NotAChainFile, genesis_commit, verify_chain, write_chain_file)
from l2d.core.commit import Commit, sign_block
from l2d.core.errors import BadCommitSignature, DecodeError, NotEnoughSignatures, OutOfRange
from l2d.core.genesis_file import FederationGenesis
from l2d.core.members import Membership
from l2d.core.params import LOCAL, REGTEST, Network

_sha = hashlib.sha256
SECRETS = [_sha(b"l2d chain member %d" % i).digest() for i in range(6)]  # 0..3 members, 4 and 5 outsiders
KEYS = tuple(PrivateKey(s).public_key_xonly.format() for s in SECRETS)
IDS = ("alice", "bob", "carol", "dave")
FED = Membership(KEYS[:4], 3)
T0 = 1_700_000_000_000
STATE = _sha(b"genesis state").digest()
GENESIS = FederationGenesis(REGTEST, FED, IDS, genesis_header(REGTEST, T0, STATE))
Entry = tuple[BlockHeader, Commit]


def aux(i: int, header: BlockHeader) -> bytes:
    return _sha(b"aux %d %d" % (i, header.height)).digest()


def signed(header: BlockHeader, signers: Sequence[int] = (0, 1, 2), network: Network = REGTEST,
           n: int = 4, secrets: Sequence[bytes] = SECRETS) -> Commit:
    """A commit of header by the given member indices (secrets[i] signs for index i)."""
    return Commit.assemble(n, {i: sign_block(secrets[i], network, header.hash, aux(i, header)) for i in signers})


def child(parent: BlockHeader, **change: Any) -> BlockHeader:
    h = BlockHeader(parent.network_id, parent.height + 1, parent.hash, parent.timestamp_ms + 1000, 0, tx_root([]),
                    _sha(b"state %d" % (parent.height + 1)).digest())
    return dataclasses.replace(h, **change)


def make_chain(tip: int, genesis: FederationGenesis = GENESIS) -> list[Entry]:
    """Blocks 0..tip: the genesis with the empty commit, then blocks signed by members 0, 1, 2 (block 4 by all)."""
    out: list[Entry] = [(genesis.genesis, genesis_commit(genesis.members.n))]
    for height in range(1, tip + 1):
        h = child(out[-1][0])
        out.append((h, signed(h, (0, 1, 2, 3) if height == 4 else (0, 1, 2), genesis.network)))
    return out


CHAIN = make_chain(8)


def relink(entries: list[Entry], frm: int) -> list[Entry]:
    """Entries with every block from position frm on re-parented onto its (changed) predecessor and re-signed:
    a forgery the members would have had to sign, so only the rule being tested can catch it."""
    out = entries[:frm]
    for h, c in entries[frm:]:
        h = dataclasses.replace(h, prev_hash=out[-1][0].hash)
        out.append((h, signed(h, c.signers, network=REGTEST)))
    return out


def forge(entries: list[Entry], position: int, **change: Any) -> list[Entry]:
    """The block at position changed and re-signed by its signers, every later block re-parented and re-signed."""
    h, c = entries[position]
    h = dataclasses.replace(h, **change)
    out = entries[:position] + [(h, signed(h, c.signers))]
    return relink(out + entries[position + 1:], position + 1)


def chain_bytes(entries: Sequence[Entry], network: Network = REGTEST, start: Optional[int] = None,
                count: Optional[int] = None) -> bytes:
    buf = io.BytesIO()
    write_chain_file(buf, network, entries[0][0].height if start is None else start,
                     len(entries) if count is None else count, entries)
    return buf.getvalue()


def reseal(b: bytes) -> bytes:
    return b[:-32] + _sha(b[:-32]).digest()


def verify(raw: bytes, genesis: FederationGenesis = GENESIS, checkpoint: Optional[tuple[int, bytes]] = None
           ):  # type: ignore[no-untyped-def]
    return verify_chain(io.BytesIO(raw), genesis, checkpoint)


def entry_offset(raw: bytes, position: int) -> int:
    """Offset of the position-th entry of a file (entries are header | u16 length | commit)."""
    at = 26
    for _ in range(position):
        at += 118 + 2 + int.from_bytes(raw[at + 118:at + 120], "big")
    return at


# -- verifies ------------------------------------------------------------------------------------------------------
def test_honest_export_from_genesis_verifies() -> None:
    raw = chain_bytes(CHAIN)
    assert raw.startswith(MAGIC + b"\x01\x02" + (0).to_bytes(8, "big") + (9).to_bytes(8, "big"))
    r = verify(raw)
    assert (r.network, r.start_height, r.tip_height, r.count) == ("regtest", 0, 8, 9)
    assert r.start_hash == GENESIS.genesis_hash == r.genesis_hash and r.tip_hash == CHAIN[-1][0].hash
    assert (r.threshold, r.members, r.final_height, r.trusted_start) == (3, 4, 7, "genesis")
    assert r.signed == (8, 8, 8, 1) and r.checksum == raw[-32:]


def test_entries_read_back() -> None:
    reader = ChainReader(io.BytesIO(chain_bytes(CHAIN)))
    got = [(e.header, e.commit) for e in reader.entries()]
    assert got == CHAIN and reader.checksum is not None


def test_from_block_1_links_to_the_genesis_header() -> None:
    r = verify(chain_bytes(CHAIN[1:]))
    assert (r.start_height, r.count, r.start_hash) == (1, 8, CHAIN[1][0].hash)
    other = FederationGenesis(REGTEST, FED, IDS, genesis_header(REGTEST, T0 + 1, STATE))
    with pytest.raises(ChainBrokenLink, match="block 1 does not link") as e:
        verify(chain_bytes(CHAIN[1:]), other)
    assert e.value.height == 1


def test_a_later_start_needs_a_checkpoint() -> None:
    raw = chain_bytes(CHAIN[5:])
    with pytest.raises(ChainNoTrustedStart, match="starts at height 5"):
        verify(raw)
    for height in (4, 5, 8):  # the first block's parent, the first block, the tip
        r = verify(raw, checkpoint=(height, CHAIN[height][0].hash))
        assert r.trusted_start == f"checkpoint {height}:{CHAIN[height][0].hash.hex()}" and r.start_height == 5
    with pytest.raises(ChainCheckpointMismatch) as e:
        verify(raw, checkpoint=(4, CHAIN[3][0].hash))
    assert e.value.height == 4
    with pytest.raises(ChainCheckpointMismatch) as e:
        verify(raw, checkpoint=(7, CHAIN[6][0].hash))
    assert e.value.height == 7
    with pytest.raises(ChainCheckpointMismatch, match="block 8 is ") as e:  # at the tip: no child to link to it
        verify(raw, checkpoint=(8, CHAIN[7][0].hash))
    assert e.value.height == 8
    for height in (3, 9):
        with pytest.raises(ChainCheckpointMismatch, match="outside the file's heights 4..8"):
            verify(raw, checkpoint=(height, CHAIN[0][0].hash))
    verify(chain_bytes(CHAIN), checkpoint=(0, GENESIS.genesis_hash))  # from genesis, a checkpoint is optional
    with pytest.raises(ChainCheckpointMismatch):
        verify(chain_bytes(CHAIN), checkpoint=(3, CHAIN[2][0].hash))


def test_any_m_members_and_more_than_m() -> None:
    chain = CHAIN[:2]
    for signers in ((1, 2, 3), (0, 2, 3), (0, 1, 2, 3)):
        h = child(chain[-1][0])
        chain = chain + [(h, signed(h, signers))]
    assert verify(chain_bytes(chain)).signed == (3, 3, 4, 3)


# -- refused: the federation did not sign this chain ---------------------------------------------------------------
def with_commit(position: int, commit: Commit, entries: list[Entry] = CHAIN) -> bytes:
    changed = list(entries)
    changed[position] = (changed[position][0], commit)
    return chain_bytes(changed)


def test_m_minus_1_signatures() -> None:
    h = CHAIN[3][0]
    with pytest.raises(ChainNotEnoughSignatures, match="2 member signatures, the threshold is 3") as e:
        verify(with_commit(3, signed(h, (0, 2))))
    assert e.value.height == 3 and isinstance(e.value, NotEnoughSignatures)
    assert "signed by member 0 (alice), member 2 (carol)" in str(e.value)
    with pytest.raises(ChainNotEnoughSignatures, match="signed by nobody"):
        verify(with_commit(3, signed(h, ())))


def test_a_non_member_signature() -> None:
    h = CHAIN[6][0]
    outsider_in_slot_3 = list(SECRETS[:3]) + [SECRETS[4]]
    with pytest.raises(ChainBadCommitSignature, match="signature of member 3 \\(dave\\) does not verify") as e:
        verify(with_commit(6, signed(h, (0, 1, 3), secrets=outsider_in_slot_3)))
    assert e.value.height == 6 and isinstance(e.value, BadCommitSignature)
    five = list(SECRETS[:4]) + [SECRETS[4]]  # a commit made for a federation with an extra member
    with pytest.raises(ChainNotEnoughSignatures, match="commit names 5 members, the federation has 4"):
        verify(with_commit(6, signed(h, (0, 1, 4), n=5, secrets=five)))


def test_signed_for_another_network() -> None:
    h = CHAIN[2][0]
    with pytest.raises(ChainBadCommitSignature, match="member 0 \\(alice\\)") as e:
        verify(with_commit(2, signed(h, (0, 1, 2), network=LOCAL)))
    assert e.value.height == 2


def test_a_signature_over_another_block() -> None:
    c = signed(CHAIN[2][0])
    with pytest.raises(ChainBadCommitSignature):
        verify(with_commit(3, c))


def test_a_duplicated_signer_cannot_be_expressed() -> None:
    """The bitmap names each member once. The two forgeries left: one more signature than the bitmap has bits
    (refused at decode: the file is malformed), or a bit for a member who did not sign, carrying another member's
    signature (refused: it does not verify under that member's key)."""
    h = CHAIN[5][0]
    two = signed(h, (0, 1))
    with pytest.raises(OutOfRange):
        Commit(4, (0, 1, 1), two.signatures + two.signatures[1:])
    forged = two.encode() + two.signatures[1]  # member 1's signature twice; the bitmap counts two signers
    raw = bytearray(chain_bytes(CHAIN))
    at = entry_offset(bytes(raw), 5)
    length = int.from_bytes(raw[at + 118:at + 120], "big")
    raw[at + 118:at + 120 + length] = len(forged).to_bytes(2, "big") + forged
    with pytest.raises(ChainFileBadEntry, match="block 5: commit: 64 bytes after the last signature") as e:
        verify(reseal(bytes(raw)))
    assert isinstance(e.value, DecodeError) and e.value.height == 5
    copied = Commit(4, (0, 1, 2), two.signatures + two.signatures[1:])
    with pytest.raises(ChainBadCommitSignature, match="member 2 \\(carol\\) does not verify"):
        verify(with_commit(5, copied))


def test_a_broken_link() -> None:
    with pytest.raises(ChainBrokenLink, match="block 3 does not link to the hash of block 2") as e:
        verify(chain_bytes(forge(CHAIN, 3, prev_hash=b"\x05" * 32)))
    assert e.value.height == 3
    with pytest.raises(ChainBrokenLink, match="block 5 timestamp goes backwards"):
        verify(chain_bytes(forge(CHAIN, 5, timestamp_ms=CHAIN[4][0].timestamp_ms - 1)))


def test_a_height_gap() -> None:
    gap = relink(CHAIN[:3] + CHAIN[4:], 3)  # block 3 left out, the rest re-parented and re-signed
    with pytest.raises(ChainHeightGap, match="expected block 3 after block 2, found a block at height 4") as e:
        verify(chain_bytes(gap))
    assert e.value.height == 3
    with pytest.raises(ChainHeightGap, match="expected block 6 after block 5, found a block at height 7"):
        verify(chain_bytes(forge(CHAIN, 6, height=7)))


def test_a_block_of_another_network() -> None:
    with pytest.raises(ChainWrongNetwork, match="block 4 is for network id 1") as e:
        verify(chain_bytes(forge(CHAIN, 4, network_id=LOCAL.id)))
    assert e.value.height == 4
    local = FederationGenesis(LOCAL, FED, IDS, genesis_header(LOCAL, T0, STATE))
    local_chain = make_chain(3, local)
    assert verify(chain_bytes(local_chain, LOCAL), local).network == "local"
    with pytest.raises(ChainWrongNetwork, match="the file is for network local"):
        verify(chain_bytes(local_chain, LOCAL))


def test_block_0_must_be_the_genesis() -> None:
    with pytest.raises(ChainGenesisMismatch, match="not the federation's genesis") as e:
        verify(chain_bytes(forge(CHAIN, 0, state_root=_sha(b"another genesis state").digest())))
    assert e.value.height == 0
    with pytest.raises(ChainGenesisMismatch, match="empty commit"):
        verify(with_commit(0, signed(GENESIS.genesis)))
    with pytest.raises(ChainGenesisMismatch, match="empty commit for 4"):
        verify(with_commit(0, genesis_commit(5)))


# -- malformed -----------------------------------------------------------------------------------------------------
def test_truncated_anywhere() -> None:
    raw = chain_bytes(CHAIN[:4])
    for cut in (0, 3, 8, 20, 26, 100, 26 + 119, entry_offset(raw, 2) + 130, len(raw) - 33, len(raw) - 1):
        with pytest.raises(ChainFileTruncated):
            verify(raw[:cut])
    with pytest.raises(NotAChainFile):
        verify(b"L2DCHAIX")


def test_trailing_bytes_and_checksum() -> None:
    raw = chain_bytes(CHAIN[:4])
    with pytest.raises(ChainFileTrailingBytes, match="1 bytes after the checksum"):
        verify(raw + b"\0")
    with pytest.raises(ChainFileChecksum, match="trailer at offset"):
        verify(raw[:-1] + bytes((raw[-1] ^ 1,)))
    with pytest.raises(ChainFileChecksum, match="more bytes follow"):  # count lowered: the trailer is misplaced
        verify(reseal(raw)[:18] + (3).to_bytes(8, "big") + raw[26:])


def test_damage_is_reported_as_damage() -> None:
    """A flipped bit that breaks a rule mid-stream is reported as a checksum mismatch naming the first
    inconsistency; the same change with the checksum recomputed (a deliberate edit) is the rule's own error."""
    raw = chain_bytes(CHAIN)
    at = entry_offset(raw, 3)
    sig = bytearray(raw)
    sig[at + 118 + 2 + 1 + 1 + 5] ^= 1  # inside member 0's signature of block 3
    with pytest.raises(ChainFileChecksum, match="inconsistency: block 3: the signature of member 0 \\(alice\\)") as e:
        verify(bytes(sig))
    assert e.value.height == 3
    with pytest.raises(ChainBadCommitSignature):
        verify(reseal(bytes(sig)))
    bits = bytearray(raw)
    bits[at + 118 + 2 + 1] |= 0x10  # a bitmap bit above member 3
    with pytest.raises(ChainFileChecksum, match="bits set above member 3"):
        verify(bytes(bits))
    with pytest.raises(ChainFileBadEntry, match="block 3: commit: bitmap bits set above member 3"):
        verify(reseal(bytes(bits)))
    net = bytearray(raw)
    net[at + 1] = LOCAL.id  # block 3's network byte
    with pytest.raises(ChainFileChecksum, match="inconsistency: block 3 is for network id 1"):
        verify(bytes(net))
    with pytest.raises(ChainWrongNetwork):
        verify(reseal(bytes(net)))


@pytest.mark.parametrize("offset, value, error", [
    (0, b"L2DSNAP\0", NotAChainFile),
    (8, b"\x02", ChainFileVersionError),
    (8, b"\x00", ChainFileVersionError),
    (9, b"\x63", ChainFileUnknownNetwork),
    (18, bytes(8), ChainFileEmpty),
    (10, b"\xff" * 8, ChainFileEmpty),  # start + count - 1 beyond u64
])
def test_bad_preamble(offset: int, value: bytes, error: type[Exception]) -> None:
    raw = chain_bytes(CHAIN[:3])
    with pytest.raises(error) as e:
        verify(reseal(raw[:offset] + value + raw[offset + len(value):]))
    assert isinstance(e.value, ChainFileMalformed)


@pytest.mark.parametrize("length", [0, 1, MAX_COMMIT_SIZE + 1, 0xFFFF])
def test_commit_length_out_of_range(length: int) -> None:
    raw = bytearray(chain_bytes(CHAIN[:3]))
    at = entry_offset(bytes(raw), 1) + 118
    raw[at:at + 2] = length.to_bytes(2, "big")
    with pytest.raises(ChainFileBadEntry, match=f"commit length {length} outside"):
        verify(reseal(bytes(raw)))


def test_unknown_block_version() -> None:
    raw = bytearray(chain_bytes(CHAIN[:3]))
    raw[entry_offset(bytes(raw), 2)] = 2
    with pytest.raises(ChainFileBadEntry, match="block 2: header: block version 2"):
        verify(reseal(bytes(raw)))


def test_writer_checks_the_framing() -> None:
    with pytest.raises(ChainFileEmpty):
        write_chain_file(io.BytesIO(), REGTEST, 0, 0, [])
    with pytest.raises(ChainFileMalformed, match="2 blocks written, 3 announced"):
        chain_bytes(CHAIN[:2], count=3)
    with pytest.raises(ChainFileMalformed, match="more than the 1"):
        chain_bytes(CHAIN[:2], count=1)


class Trickle(io.RawIOBase):
    """A pipe-like stream: at most 7 bytes per read, not seekable."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(7, len(b), len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_short_reads_of_a_pipe() -> None:
    raw = chain_bytes(CHAIN)
    assert verify_chain(Trickle(raw), GENESIS).tip_height == 8  # type: ignore[arg-type]
    with pytest.raises(ChainFileTruncated):
        verify_chain(Trickle(raw[:-5]), GENESIS)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 7), count=st.integers(1, 9))
def test_any_range_round_trips(start: int, count: int) -> None:
    entries = CHAIN[start:start + count]
    raw = chain_bytes(entries)
    reader = ChainReader(io.BytesIO(raw))
    assert [(e.header, e.commit) for e in reader.entries()] == entries
    assert reader.preamble.start_height == start and reader.preamble.count == len(entries)
    cp = None if start <= 1 else (start, entries[0][0].hash)
    assert verify(raw, checkpoint=cp).tip_hash == entries[-1][0].hash
