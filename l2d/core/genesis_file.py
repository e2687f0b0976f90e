"""Federation genesis files: what an auditor starts from -- the network, the members (id and x-only block-signing
key, in member-index order), the threshold m, and the genesis block header with its hash.

JSON, not binary: it is a small file that people read, compare against the keys each member publishes, and pass
around by hand; every binary value in it (keys, the header, its hash) is fixed-length lowercase hex. Layout and
rules: docs/federation.md. Pure (the offline verifier imports it): the file is bytes or a binary stream.

Reading is strict -- UTF-8 JSON with no duplicate names, no floats, NaN or Infinity, exactly the documented
fields with their types, lowercase hex of the exact length -- and every refusal is a typed error:

    GenesisFileError
      GenesisFileMalformed (also a DecodeError)  the bytes are not a genesis file this code reads (l2-verify exit 2)
        NotAGenesisFile                          not a JSON object whose "format" is "l2d-federation-genesis"
        GenesisFileVersionError (UnknownVersion) a format version other than 1
        GenesisFileUnknownNetwork (WrongNetwork) a network name this code does not know
        GenesisFileInvalid                       well-formed, but the content breaks a rule: the membership (n, m,
                                                 keys), the genesis header (not a genesis of this network), the
                                                 hash not that of the header

The writer produces one canonical text (fields in the documented order, two-space indent, a final newline); the
reader accepts any JSON whitespace around the same content.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, NoReturn

from .block import BLOCK_VERSION, HEADER_SIZE, ZERO_HASH, BlockHeader, tx_root
from .commit import Commit, signature_valid
from .errors import (BadCommitSignature, DecodeError, InvalidMembership, L2Error, NotEnoughSignatures, UnknownVersion,
                     WrongNetwork)
from .members import Membership
from .params import NETWORKS, Network

FORMAT = "l2d-federation-genesis"
FORMAT_VERSION = 1
MAX_SIZE = 64 * 1024  # 64 members at about 100 bytes each, with room for whitespace
MAX_ID = 64
FIELDS = ("format", "version", "network", "genesis_hash", "genesis_header", "threshold", "members")
MEMBER_FIELDS = ("id", "key")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MEMBER_ID_RULE = f"1..{MAX_ID} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
_HEX = re.compile(r"[0-9a-f]*")


def valid_member_id(mid: object) -> bool:
    """A member id: MEMBER_ID_RULE (the genesis file's rule; the daemon's [[federation.members]] use it too)."""
    return isinstance(mid, str) and len(mid) <= MAX_ID and _ID.fullmatch(mid) is not None


class GenesisFileError(L2Error):
    """A federation genesis file that cannot be used."""


class GenesisFileMalformed(GenesisFileError, DecodeError):
    pass


class NotAGenesisFile(GenesisFileMalformed):
    pass


class GenesisFileVersionError(GenesisFileMalformed, UnknownVersion):
    pass


class GenesisFileUnknownNetwork(GenesisFileMalformed, WrongNetwork):
    pass


class GenesisFileInvalid(GenesisFileMalformed):
    pass


@dataclass(frozen=True, slots=True)
class FederationGenesis:
    """The trust anchor of an auditor: a chain (network, genesis header) and who signs its blocks."""

    network: Network
    members: Membership
    member_ids: tuple[str, ...]  # member i's id, same order as members.keys
    genesis: BlockHeader

    def __post_init__(self) -> None:
        if len(self.member_ids) != self.members.n:
            raise GenesisFileInvalid(f"{len(self.member_ids)} member ids for {self.members.n} members")
        for i, mid in enumerate(self.member_ids):
            if not valid_member_id(mid):
                raise GenesisFileInvalid(f"member {i} id {mid!r}: {MEMBER_ID_RULE}")
        if len(set(self.member_ids)) != len(self.member_ids):
            raise GenesisFileInvalid("a member id appears twice")
        check_genesis_header(self.genesis, self.network)

    @property
    def genesis_hash(self) -> bytes:
        return self.genesis.hash

    def describe(self, index: int) -> str:
        """'member 2 (carol)': how messages name a member."""
        if not 0 <= index < len(self.member_ids):
            return f"member {index} (not a member)"
        return f"member {index} ({self.member_ids[index]})"

    def names(self, indices: Iterable[int]) -> str:
        return ", ".join(self.describe(i) for i in indices) or "nobody"

    def verify_commit(self, commit: Commit, block_hash: bytes) -> None:
        """Commit.verify for this federation's members and network; the refusal names the members concerned
        (NotEnoughSignatures: who signed; BadCommitSignature: whose signature does not verify)."""
        try:
            commit.verify(self.members, self.network, block_hash)
        except NotEnoughSignatures as e:
            raise NotEnoughSignatures(f"{e} (signed by {self.names(commit.signers)})") from None
        except BadCommitSignature:
            bad = [i for i, sig in zip(commit.signers, commit.signatures)
                   if not signature_valid(self.members.keys[i], self.network, block_hash, sig)]
            raise BadCommitSignature(f"the signature of {self.names(bad[:1])} does not verify for block "
                                     f"{block_hash.hex()}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "network": self.network.name,
            "genesis_hash": self.genesis.hash.hex(), "genesis_header": self.genesis.encode().hex(),
            "threshold": self.members.threshold,
            "members": [{"id": mid, "key": key.hex()} for mid, key in zip(self.member_ids, self.members.keys)],
        }

    def encode(self) -> bytes:
        """The canonical file: the fields in the documented order, two-space indent, a final newline."""
        return (json.dumps(self.to_json(), indent=2) + "\n").encode()

    @classmethod
    def decode(cls, b: bytes) -> "FederationGenesis":
        if len(b) > MAX_SIZE:
            raise GenesisFileMalformed(f"genesis file is {len(b)} bytes, more than {MAX_SIZE}")
        try:
            text = b.decode("utf-8")
            doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_float=_no_float,
                             parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise NotAGenesisFile(f"not a federation genesis file (not UTF-8 JSON): {e}") from None
        except _Refused as e:
            raise GenesisFileMalformed(str(e)) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise NotAGenesisFile(f'not a federation genesis file: expected a JSON object with "format": "{FORMAT}"')
        _exact_fields(doc, FIELDS, "genesis file")
        version = _int(doc, "version")
        if version != FORMAT_VERSION:
            raise GenesisFileVersionError(f"genesis file version {version}, this code reads {FORMAT_VERSION}")
        name = _str(doc, "network")
        network = NETWORKS.get(name)
        if network is None:
            raise GenesisFileUnknownNetwork(f"genesis file network {name!r} is not one of {', '.join(NETWORKS)}")
        raw_header = _hex(doc, "genesis_header", HEADER_SIZE)
        claimed = _hex(doc, "genesis_hash", 32)
        try:
            header = BlockHeader.decode(raw_header, network)
        except DecodeError as e:
            raise GenesisFileInvalid(f"genesis_header: {e}") from None
        if header.hash != claimed:
            raise GenesisFileInvalid(f"genesis_hash {claimed.hex()} is not the hash of genesis_header "
                                     f"({header.hash.hex()})")
        members = doc["members"]
        if not isinstance(members, list):
            raise GenesisFileMalformed('"members" must be a list of {"id", "key"} objects')
        ids, keys = [], []
        for i, m in enumerate(members):
            what = f"members[{i}]"
            if not isinstance(m, dict):
                raise GenesisFileMalformed(f'{what} must be an object with "id" and "key"')
            _exact_fields(m, MEMBER_FIELDS, what)
            ids.append(_str(m, "id", what))
            keys.append(_hex(m, "key", 32, what))
        try:
            membership = Membership(tuple(keys), _int(doc, "threshold"))
        except InvalidMembership as e:
            raise GenesisFileInvalid(f"membership: {e}") from None
        return cls(network, membership, tuple(ids), header)


def check_genesis_header(header: BlockHeader, network: Network) -> None:
    """Raise GenesisFileInvalid unless header is a genesis block header of network (height 0, no parent, no
    transactions, this network's id, the current block version)."""
    if header.network_id != network.id:
        raise GenesisFileInvalid(f"genesis header is for network id {header.network_id}, not {network.name} "
                                 f"({network.id})")
    if header.version != BLOCK_VERSION:
        raise GenesisFileInvalid(f"genesis header version {header.version}, expected {BLOCK_VERSION}")
    if header.height != 0 or header.prev_hash != ZERO_HASH:
        raise GenesisFileInvalid(f"genesis header is at height {header.height} with parent "
                                 f"{header.prev_hash.hex()}: a genesis is at height 0 with the zero parent")
    if header.tx_count != 0 or header.tx_root != tx_root([]):
        raise GenesisFileInvalid(f"genesis header has {header.tx_count} transactions (root "
                                 f"{header.tx_root.hex()}): a genesis has none")


def write_genesis_file(f: BinaryIO, genesis: FederationGenesis) -> None:
    """Write the canonical genesis file to f (the caller makes it durable: temporary file, fsync, rename)."""
    f.write(genesis.encode())


def load_genesis_file(f: BinaryIO) -> FederationGenesis:
    """Read and check a genesis file from a binary stream (at most MAX_SIZE bytes)."""
    data = f.read(MAX_SIZE + 1)
    return FederationGenesis.decode(data)


# -- strict JSON -----------------------------------------------------------------------------------------------------
class _Refused(Exception):
    """Raised from inside json.loads' hooks; turned into GenesisFileMalformed."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"field {k!r} appears twice")
        out[k] = v
    return out


def _no_float(text: str) -> NoReturn:
    raise _Refused(f"number {text}: only integers are allowed")


def _no_constant(text: str) -> NoReturn:
    raise _Refused(f"{text} is not allowed")


def _exact_fields(obj: dict[str, Any], fields: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise GenesisFileMalformed(f"{what}: unknown field(s) {', '.join(unknown)}")
    missing = [k for k in fields if k not in obj]
    if missing:
        raise GenesisFileMalformed(f"{what}: missing field(s) {', '.join(missing)}")


def _int(obj: dict[str, Any], key: str, what: str = "genesis file") -> int:
    v = obj[key]
    if type(v) is not int:  # bool is an int subclass: refused too
        raise GenesisFileMalformed(f"{what}: {key!r} must be an integer, got {json.dumps(v)}")
    return v


def _str(obj: dict[str, Any], key: str, what: str = "genesis file") -> str:
    v = obj[key]
    if not isinstance(v, str):
        raise GenesisFileMalformed(f"{what}: {key!r} must be a string, got {json.dumps(v)}")
    return v


def _hex(obj: dict[str, Any], key: str, size: int, what: str = "genesis file") -> bytes:
    v = _str(obj, key, what)
    if len(v) != 2 * size or not _HEX.fullmatch(v):
        raise GenesisFileMalformed(f"{what}: {key!r} must be {2 * size} lowercase hex characters ({size} bytes)")
    return bytes.fromhex(v)
