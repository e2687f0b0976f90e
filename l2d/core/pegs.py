"""Bridge consensus: the federation, per-recipient deposit scripts, Bitcoin addresses, header relay, peg-ins, peg-outs.

Everything the bridge decides is decided here, from the state alone (docs/bridge.md):
- The federation (threshold m, n compressed keys, the peg-in confirmation depth) is fixed at genesis.
- Deposit script for L2 account A: P2WSH of `OP_m <k_1'..k_n'> OP_n OP_CHECKMULTISIG`, where each federation key
  P_i is tweaked for A as P_i' = P_i + t_i*G, t_i = H("l2d/pegin/tweak", P_i || network id || A), and the tweaked
  keys are sorted (as descriptors' sortedmulti). Only A can claim a deposit to it; the federation can spend it
  by tweaking its secrets the same way. Change outputs of peg-out transactions use A = 32 zero bytes.
- Bitcoin headers enter the state through BtcHeaders (a federation member): linked, each with valid
  proof of work for its nBits under the paired Bitcoin chain's pow limit. A relay may replace the chain from
  any height above the base and may end below the old tip (a deep reorg is followed 50 headers at a time);
  records above the tip are stale and never read. A claim is checked against them:
  its block must be at that height in the relayed best chain (so a reorged-out deposit cannot be claimed),
  at least min_depth deep, and the proof must pass Bitcoin Core's partial merkle tree rules.
- A Burn whose destination is a Bitcoin address (on a chain with a federation) is a peg-out request; the
  federation pays it through a plan (l2d/core/plans.py) once an anchor covering the burn is FINAL.
- Several members may post the same duty: a relay whose headers are all relayed already (at or below the tip)
  and a peg-out update recording the status and txid already recorded are DuplicateDuty, applied once.
- The federation's coins are state records (FedCoin under coin_key(txid, vout), 33 bytes as every state key): every
  claimed deposit, and every
  deposit to the funding address (contract FUNDING_CONTRACT) that a member records with FederationFund (the same
  SPV proof as a claim; no L2 money is made; the total is under FUNDED_KEY). Members spend what the state says,
  not what each one's bitcoind happens to see.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Optional, Sequence, cast

from bitcoin.base58 import Base58Error
from bitcoin.base58 import decode as b58decode
from bitcoinutils.bech32 import decode as bech32_decode
from bitcoinutils.bech32 import encode as bech32_encode
from coincurve import PublicKey

from .chains import BTC_CHAINS, btc_chain
from .codec import Reader
from .coin_tx import Burn
from .errors import (BadNonce, DecodeError, DuplicateDuty, FeeTooLow, InsufficientBalance, InvalidTransaction,
                     Overflow, Rejected)
from .hashing import H_PEGIN_OUTPOINT, H_PEGIN_TWEAK, sha256
from .params import MAX_MONEY, Network
from .pegs_tx import BTC_HEADER_SIZE, BtcHeaders, FederationFund, PeginClaim, PegoutStatus
from .spv import SpvError, check_pow, dsha256, parse_header, parse_tx, verify_tx_in_block
from .state import (SUPPLY_KEY, Account, Namespace, Rules, StateView, Supply, account_key, bump_member_nonce,
                    charge_sender, check_member, meta_key)
from .tx import Transaction

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
MAX_FEDERATION = 15  # keeps the witness script standard (P2WSH multisig of up to 15 keys, < 3600 bytes)
OP_IF, OP_ELSE, OP_ENDIF, OP_VERIFY, OP_CHECKSEQUENCEVERIFY, OP_CHECKMULTISIG = 0x63, 0x67, 0x68, 0x69, 0xB2, 0xAE
PEGOUT_MIN_SAT = 10_000  # a peg-out must leave a payout above dust after its share of the Bitcoin fee
CHANGE_CONTRACT = b"\0" * 32
# The contract of the federation's funding address (coins for Bitcoin fees, such as anchors').
FUNDING_CONTRACT = sha256(b"l2d/federation/funding")

FEDERATION_KEY = meta_key("bridge/federation")
BTC_TIP_KEY = meta_key("bridge/btc_tip")
BRIDGE_TOTALS_KEY = meta_key("bridge/totals")
FUNDED_KEY = meta_key("bridge/funded")  # u64: satoshis recorded by FederationFund, absent = 0

_FED_HEAD = struct.Struct(">BBH")
_BTC_TIP = struct.Struct(">II32s")  # base height, tip height, tip hash
_TOTALS = struct.Struct(">QQQ")  # pegged in, pending out, paid out
_PEGIN = struct.Struct(">32sIQI32s")  # btc txid, vout, amount, btc height, recipient
_PEGOUT_HEAD = struct.Struct(">BQQ32sB")  # status, amount, l2 height, btc txid, script length
_COIN = struct.Struct(">32sIQB32s32s")  # txid, vout, amount, kind, contract, spent by (zero: unspent)


# -- errors ---------------------------------------------------------------------------------------------------------
class BridgeRejected(Rejected):
    reason = "bridge"


class NoBridge(BridgeRejected):
    reason = "no-bridge"


class BadRelay(BridgeRejected):
    reason = "bad-header-relay"


class UnknownBtcBlock(BridgeRejected):
    reason = "unknown-btc-block"


class ClaimTooShallow(BridgeRejected):
    reason = "pegin-too-shallow"


class InvalidPeginProof(BridgeRejected):
    reason = "invalid-spv-proof"


class WrongDepositAddress(BridgeRejected):
    reason = "wrong-deposit-address"


class AlreadyClaimed(BridgeRejected):
    reason = "already-claimed"


class BadAddress(BridgeRejected):
    reason = "bad-address"


class PegoutTooSmall(BridgeRejected):
    reason = "pegout-too-small"


class UnknownPegout(BridgeRejected):
    reason = "unknown-pegout"


class PegoutNotAnchored(BridgeRejected):
    reason = "pegout-not-anchored"


class BadPegoutTransition(BridgeRejected):
    reason = "bad-pegout-transition"


def address_script(address: str, network: Network) -> bytes:
    """scriptPubKey of a Bitcoin address of the network's paired chain; BadAddress for anything else.

    Accepted: P2PKH and P2SH (base58check), P2WPKH and P2WSH (bech32, v0), P2TR (bech32m, v1, 32 bytes).
    """
    chain = btc_chain(network)
    if not 0 < len(address) <= 90 or not address.isascii():
        raise BadAddress(f"{address!r} is not a Bitcoin address")
    if address.lower().startswith(chain.hrp + "1"):
        ver, prog = bech32_decode(chain.hrp, address)
        if ver is None:
            raise BadAddress(f"{address!r} is not a valid {chain.spv.name} segwit address")
        prog = bytes(prog)
        if (ver, len(prog)) in ((0, 20), (0, 32), (1, 32)):
            return bytes((0x50 + ver if ver else 0, len(prog))) + prog
        raise BadAddress(f"{address!r}: witness v{ver} with a {len(prog)}-byte program is not a standard payout")
    for other in BTC_CHAINS:
        if other.hrp != chain.hrp and address.lower().startswith(other.hrp + "1"):
            raise BadAddress(f"{address!r} is a {other.spv.name} address; this is {chain.spv.name}")
    try:
        raw = bytes(b58decode(address))
    except (Base58Error, ValueError, IndexError):
        raise BadAddress(f"{address!r} is not a Bitcoin address") from None
    if len(raw) != 25 or dsha256(raw[:21])[:4] != raw[21:]:
        raise BadAddress(f"{address!r} is not a valid base58check address")
    version, h = raw[0], raw[1:21]
    if version == chain.p2pkh_version:
        return b"\x76\xa9\x14" + h + b"\x88\xac"
    if version == chain.p2sh_version:
        return b"\xa9\x14" + h + b"\x87"
    raise BadAddress(f"{address!r} has version byte {version:#04x}, not a {chain.spv.name} address")


def script_address(script: bytes, network: Network) -> Optional[str]:
    """The address of a standard scriptPubKey on the network's paired chain (None if it has none)."""
    chain = btc_chain(network)
    if (script[:2] in (b"\x00\x14", b"\x00\x20") and len(script) == 2 + script[1]) or (
            script[:2] == b"\x51\x20" and len(script) == 34):  # the payouts address_script accepts, no others
        ver = 0 if script[0] == 0 else 1
        return cast(Optional[str], bech32_encode(chain.hrp, ver, list(script[2:])))
    from bitcoin.base58 import encode as b58encode

    if len(script) == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        payload = bytes((chain.p2pkh_version,)) + script[3:23]
    elif len(script) == 23 and script[:2] == b"\xa9\x14" and script[22] == 0x87:
        payload = bytes((chain.p2sh_version,)) + script[2:22]
    else:
        return None
    return cast(str, b58encode(payload + dsha256(payload)[:4]))


# -- the federation -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Federation:
    """m-of-n federation keys (33-byte compressed secp256k1, sorted, distinct) and the peg-in depth; optionally the
    emergency path: e-of-ne emergency keys that may spend any federation coin once it is `emergency_delay` blocks
    old (BIP68 relative lock), so coins are never lost if the federation disappears.

    State value under FEDERATION_KEY: threshold u8 | n u8 | min_depth u16 | n x 33-byte keys, then only with an
    emergency path: e u8 | ne u8 | delay u16 | ne x 33-byte emergency keys (sorted, distinct).
    """

    threshold: int
    keys: tuple[bytes, ...]
    min_depth: int
    emergency_threshold: int = 0
    emergency_keys: tuple[bytes, ...] = ()
    emergency_delay: int = 0

    def __post_init__(self) -> None:
        n = len(self.keys)
        if not 1 <= n <= MAX_FEDERATION:
            raise InvalidTransaction(f"federation of {n} keys, expected 1..{MAX_FEDERATION}")
        if not 1 <= self.threshold <= n:
            raise InvalidTransaction(f"federation threshold {self.threshold} outside 1..{n}")
        if not 1 <= self.min_depth < 2**16:
            raise InvalidTransaction(f"peg-in depth {self.min_depth} outside 1..65535")
        _check_keys(self.keys, "federation")
        ne = len(self.emergency_keys)
        if ne or self.emergency_threshold or self.emergency_delay:
            if not 1 <= ne <= MAX_FEDERATION:
                raise InvalidTransaction(f"{ne} emergency keys, expected 1..{MAX_FEDERATION}")
            if not 1 <= self.emergency_threshold <= ne:
                raise InvalidTransaction(f"emergency threshold {self.emergency_threshold} outside 1..{ne}")
            if not 1 <= self.emergency_delay < 2**16:
                raise InvalidTransaction(f"emergency delay {self.emergency_delay} blocks outside 1..65535")
            _check_keys(self.emergency_keys, "emergency")

    def encode(self) -> bytes:
        out = _FED_HEAD.pack(self.threshold, len(self.keys), self.min_depth) + b"".join(self.keys)
        if self.emergency_keys:
            out += _FED_HEAD.pack(self.emergency_threshold, len(self.emergency_keys), self.emergency_delay)
            out += b"".join(self.emergency_keys)
        return out

    @classmethod
    def decode(cls, b: bytes) -> "Federation":
        r = Reader(b, "federation value")
        m, n, depth = _FED_HEAD.unpack(r.take(_FED_HEAD.size))
        keys = tuple(r.take(33) for _ in range(n))
        if r.pos == len(b):
            return cls(m, keys, depth)
        e, ne, delay = _FED_HEAD.unpack(r.take(_FED_HEAD.size))
        if ne == 0:
            raise DecodeError("federation value: an emergency path with no keys")
        emergency = tuple(r.take(33) for _ in range(ne))
        r.end()
        return cls(m, keys, depth, e, emergency, delay)


def _check_keys(keys: tuple[bytes, ...], what: str) -> None:
    if list(keys) != sorted(set(keys)):
        raise InvalidTransaction(f"{what} keys must be distinct and sorted")
    for k in keys:
        try:
            if len(k) != 33 or PublicKey(k).format(compressed=True) != k:
                raise ValueError
        except ValueError:
            raise InvalidTransaction(f"{what} key {k.hex()} is not a compressed secp256k1 key") from None


def pegin_tweak(key: bytes, network_id: int, contract: bytes) -> bytes:
    """The 32-byte scalar federation key `key` is tweaked by for deposits to `contract` (an L2 account)."""
    t = H_PEGIN_TWEAK(key + bytes((network_id,)) + contract)
    if int.from_bytes(t, "big") >= SECP256K1_N:  # probability ~2**-128
        raise InvalidTransaction("peg-in tweak out of range")
    return t


@lru_cache(maxsize=16384)
def tweaked_key(key: bytes, network_id: int, contract: bytes) -> bytes:
    """Federation key `key` tweaked for deposits to contract (33-byte compressed)."""
    return PublicKey(key).add(pegin_tweak(key, network_id, contract)).format(compressed=True)


def _multi(k: int, keys: Sequence[bytes]) -> bytes:
    return bytes((0x50 + k,)) + b"".join(b"\x21" + key for key in keys) + bytes((0x50 + len(keys), OP_CHECKMULTISIG))


def _push_int(n: int) -> bytes:
    """A positive script number as Bitcoin Core's CScript() << n writes it (OP_1..OP_16, else minimal bytes)."""
    if n <= 16:
        return bytes((0x50 + n,))
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little")  # room for the sign bit
    return bytes((len(raw),)) + raw


@lru_cache(maxsize=4096)
def witness_script(fed: Federation, network_id: int, contract: bytes) -> bytes:
    """The deposit script for contract: OP_m <sorted tweaked keys> OP_n OP_CHECKMULTISIG, or with an emergency path
    OP_IF <that> OP_ELSE <delay> OP_CHECKSEQUENCEVERIFY OP_VERIFY OP_e <sorted emergency keys> OP_ne
    OP_CHECKMULTISIG OP_ENDIF, which is the miniscript
    or_i(multi(m,K1',...),and_v(v:older(delay),multi(e,E1,...))) (descriptor_of gives it)."""
    if len(contract) != 32:
        raise InvalidTransaction("peg-in contract is 32 bytes")
    federation_path = _multi(fed.threshold, sorted(tweaked_key(k, network_id, contract) for k in fed.keys))
    if not fed.emergency_keys:
        return federation_path
    return (bytes((OP_IF,)) + federation_path + bytes((OP_ELSE,)) + _push_int(fed.emergency_delay)
            + bytes((OP_CHECKSEQUENCEVERIFY, OP_VERIFY)) + _multi(fed.emergency_threshold, fed.emergency_keys)
            + bytes((OP_ENDIF,)))


def descriptor_of(fed: Federation, network_id: int, contract: bytes) -> str:
    """The output descriptor of contract's deposit script (without checksum), as Bitcoin Core reads it."""
    keys = ",".join(k.hex() for k in sorted(tweaked_key(k, network_id, contract) for k in fed.keys))
    multi = f"multi({fed.threshold},{keys})"
    if not fed.emergency_keys:
        return f"wsh({multi})"
    emergency = ",".join(k.hex() for k in fed.emergency_keys)
    return (f"wsh(or_i({multi},and_v(v:older({fed.emergency_delay}),"
            f"multi({fed.emergency_threshold},{emergency}))))")


def deposit_script_pubkey(fed: Federation, network_id: int, contract: bytes) -> bytes:
    """P2WSH scriptPubKey (0x00 0x20 sha256(witness script)) of the deposit address for contract."""
    return b"\x00\x20" + sha256(witness_script(fed, network_id, contract))


def federation(view: StateView) -> Federation:
    raw = view.get(FEDERATION_KEY)
    if raw is None:
        raise NoBridge("this chain has no federation (no bridge)")
    return Federation.decode(raw)


def federation_genesis(fed: Federation) -> dict[bytes, bytes]:
    """The genesis records of a chain with a bridge."""
    return {FEDERATION_KEY: fed.encode(), BRIDGE_TOTALS_KEY: _TOTALS.pack(0, 0, 0)}


# -- state records --------------------------------------------------------------------------------------------------
def btc_header_key(height: int) -> bytes:
    return bytes((Namespace.BTC_HEADER,)) + height.to_bytes(32, "big")


def pegin_key(btc_txid: bytes, vout: int) -> bytes:
    return bytes((Namespace.PEGIN,)) + H_PEGIN_OUTPOINT(btc_txid + struct.pack(">I", vout))


def pegout_key(pegout_id: bytes) -> bytes:
    return bytes((Namespace.PEGOUT,)) + pegout_id


def coin_key(btc_txid: bytes, vout: int) -> bytes:
    """0x0B || H("l2d/pegin/outpoint", txid || vout u32): the outpoint hash of pegin_key, in the coin namespace."""
    return bytes((Namespace.FED_COIN,)) + H_PEGIN_OUTPOINT(btc_txid + struct.pack(">I", vout))


class CoinKind(IntEnum):
    DEPOSIT = 1  # a claimed peg-in deposit (contract: the L2 recipient)
    FUNDING = 2  # a deposit to the funding address (contract: FUNDING_CONTRACT)
    CHANGE = 3  # the change of a completed peg-out plan (contract: CHANGE_CONTRACT)
    ANCHOR = 4  # the k-of-n Taproot output of a completed anchor plan (contract: the anchor record's link)


@dataclass(frozen=True, slots=True)
class FedCoin:
    """State value under coin_key(txid, vout) (109 bytes): txid 32 (internal order) | vout u32 | amount u64 | kind u8
    | contract 32 | spent_by 32 (the id of the plan spending it, l2d/core/plans.py; zero while unspent). The
    contract says which deposit script holds the coin (deposit_script_pubkey(federation, network, contract)); an
    ANCHOR coin's is the anchor record's link, its script the federation's k-of-n anchor output
    (l2d.core.plans.coin_script_pubkey)."""

    btc_txid: bytes
    vout: int
    amount_sat: int
    kind: CoinKind
    contract: bytes
    spent_by: bytes = b"\0" * 32

    def encode(self) -> bytes:
        return _COIN.pack(self.btc_txid, self.vout, self.amount_sat, self.kind, self.contract, self.spent_by)

    @classmethod
    def decode(cls, b: bytes) -> "FedCoin":
        if len(b) != _COIN.size:
            raise DecodeError(f"federation coin value is {len(b)} bytes")
        txid, vout, amount, kind, contract, spent = _COIN.unpack(b)
        if kind not in (1, 2, 3, 4):
            raise DecodeError(f"federation coin kind {kind}")
        return cls(txid, vout, amount, CoinKind(kind), contract, spent)


def funded_sat(view: StateView) -> int:
    raw = view.get(FUNDED_KEY)
    return 0 if raw is None else int.from_bytes(raw, "big")


@dataclass(frozen=True, slots=True)
class BtcTip:
    base_height: int  # the first relayed height (the federation's checkpoint)
    height: int
    block_hash: bytes

    def encode(self) -> bytes:
        return _BTC_TIP.pack(self.base_height, self.height, self.block_hash)

    @classmethod
    def decode(cls, b: bytes) -> "BtcTip":
        if len(b) != _BTC_TIP.size:
            raise DecodeError(f"Bitcoin tip value is {len(b)} bytes")
        return cls(*_BTC_TIP.unpack(b))


def btc_tip(view: StateView) -> Optional[BtcTip]:
    raw = view.get(BTC_TIP_KEY)
    return None if raw is None else BtcTip.decode(raw)


@dataclass(frozen=True, slots=True)
class BridgeTotals:
    """Satoshis pegged in, requested out and not yet paid, and paid out. pegged_in - pending - paid is the
    L2 money backed by the federation; the federation's Bitcoin holdings must equal pegged_in - paid."""

    pegged_in_sat: int
    pending_out_sat: int
    paid_out_sat: int

    def encode(self) -> bytes:
        return _TOTALS.pack(self.pegged_in_sat, self.pending_out_sat, self.paid_out_sat)

    @classmethod
    def decode(cls, b: bytes) -> "BridgeTotals":
        if len(b) != _TOTALS.size:
            raise DecodeError(f"bridge totals value is {len(b)} bytes")
        return cls(*_TOTALS.unpack(b))


def bridge_totals(view: StateView) -> BridgeTotals:
    raw = view.get(BRIDGE_TOTALS_KEY)
    return BridgeTotals(0, 0, 0) if raw is None else BridgeTotals.decode(raw)


@dataclass(frozen=True, slots=True)
class PeginEntry:
    """State value under pegin_key(txid, vout): the claimed outpoint (80 bytes)."""

    btc_txid: bytes
    vout: int
    amount_sat: int
    btc_height: int
    recipient: bytes

    def encode(self) -> bytes:
        return _PEGIN.pack(self.btc_txid, self.vout, self.amount_sat, self.btc_height, self.recipient)

    @classmethod
    def decode(cls, b: bytes) -> "PeginEntry":
        if len(b) != _PEGIN.size:
            raise DecodeError(f"peg-in value is {len(b)} bytes")
        return cls(*_PEGIN.unpack(b))


@dataclass(frozen=True, slots=True)
class PegoutEntry:
    """State value under pegout_key(burn txid): status u8 | amount u64 | l2_height u64 | btc_txid 32
    | script length u8 | scriptPubKey."""

    status: PegoutStatus
    amount_sat: int
    l2_height: int
    btc_txid: bytes
    script_pubkey: bytes

    def encode(self) -> bytes:
        return (_PEGOUT_HEAD.pack(self.status, self.amount_sat, self.l2_height, self.btc_txid,
                                  len(self.script_pubkey)) + self.script_pubkey)

    @classmethod
    def decode(cls, b: bytes) -> "PegoutEntry":
        if len(b) < _PEGOUT_HEAD.size:
            raise DecodeError("peg-out value too short")
        status, amount, height, txid, n = _PEGOUT_HEAD.unpack_from(b)
        if len(b) != _PEGOUT_HEAD.size + n or status not in (1, 2, 3):
            raise DecodeError("malformed peg-out value")
        return cls(PegoutStatus(status), amount, height, txid, b[_PEGOUT_HEAD.size:])


# -- state transitions ----------------------------------------------------------------------------------------------
def apply_btc_headers(view: StateView, tx: Transaction, rules: Rules) -> None:
    check_member(view, tx)
    federation(view)
    p = cast(BtcHeaders, tx.payload)
    params = btc_chain(rules.network).spv
    tip = btc_tip(view)
    if (tip is not None and tip.base_height <= p.start_height and p.start_height + len(p.headers) - 1 <= tip.height
            and all(view.get(btc_header_key(p.start_height + i)) == raw for i, raw in enumerate(p.headers))):
        raise DuplicateDuty(f"headers {p.start_height}..{p.start_height + len(p.headers) - 1} are relayed already "
                            f"(relayed tip {tip.height})")
    headers = [parse_header(h) for h in p.headers]
    for i, h in enumerate(headers):
        try:
            check_pow(h, params)
        except SpvError as e:
            raise BadRelay(f"relayed header at height {p.start_height + i}: {e}") from None
        if i and h.prev_hash != headers[i - 1].hash:
            raise BadRelay(f"relayed header at height {p.start_height + i} does not link to the one before it")
    new_tip = p.start_height + len(headers) - 1
    if tip is not None:
        if not tip.base_height < p.start_height <= tip.height + 1:
            raise BadRelay(f"relay starts at height {p.start_height}; it must extend or replace heights "
                           f"{tip.base_height + 1}..{tip.height + 1}")
        parent = view.get(btc_header_key(p.start_height - 1))
        if parent is None or dsha256(parent) != headers[0].prev_hash:
            raise BadRelay(f"relayed header at height {p.start_height} does not link to the relayed chain")
    bump_member_nonce(view, tx)
    for i, raw in enumerate(p.headers):
        view.put(btc_header_key(p.start_height + i), raw)
    base = p.start_height if tip is None else tip.base_height
    view.put(BTC_TIP_KEY, BtcTip(base, new_tip, headers[-1].hash).encode())


def _proven_deposit(view: StateView, fed: Federation, p: PeginClaim, rules: Rules, contract: bytes
                    ) -> tuple[bytes, str, int]:
    """The deposit a claim proves: (txid, txid hex, amount) of output p.vout, which must pay contract's deposit
    address, in a block of the relayed best chain at least min_depth deep."""
    tip = btc_tip(view)
    relayed = view.get(btc_header_key(p.btc_height))
    if (tip is None or p.btc_height > tip.height  # above the tip: a stale record of a replaced branch
            or relayed is None or relayed != p.merkle_block[:BTC_HEADER_SIZE]):
        raise UnknownBtcBlock(f"the claim's block is not at height {p.btc_height} of the relayed Bitcoin chain")
    depth = tip.height - p.btc_height + 1
    if depth < fed.min_depth:
        raise ClaimTooShallow(f"deposit block has {depth} confirmations, {fed.min_depth} required")
    try:
        info = parse_tx(p.btc_tx)
        verify_tx_in_block(p.btc_tx, p.merkle_block)
    except (SpvError, DecodeError) as e:
        raise InvalidPeginProof(f"{type(e).__name__}: {e}") from None
    outs = info.tx.vout
    if p.vout >= len(outs):
        raise InvalidPeginProof(f"transaction {info.txid_hex} has no output {p.vout}")
    amount = int(outs[p.vout].nValue)
    if bytes(outs[p.vout].scriptPubKey) != deposit_script_pubkey(fed, rules.network.id, contract):
        raise WrongDepositAddress(f"output {p.vout} of {info.txid_hex} does not pay the deposit address of "
                                  f"{contract.hex()}")
    if not 0 < amount <= MAX_MONEY:
        raise InvalidPeginProof(f"deposit amount {amount} outside 1..{MAX_MONEY}")
    return info.txid, info.txid_hex, amount


def apply_pegin_claim(view: StateView, tx: Transaction, rules: Rules) -> None:
    fed = federation(view)
    p = cast(PeginClaim, tx.payload)
    txid, txid_hex, amount = _proven_deposit(view, fed, p, rules, tx.sender)
    key = pegin_key(txid, p.vout)
    if view.get(key) is not None or view.get(coin_key(txid, p.vout)) is not None:
        raise AlreadyClaimed(f"deposit {txid_hex}:{p.vout} is already claimed")
    skey = account_key(tx.sender)
    raw = view.get(skey)
    acc = Account.decode(raw) if raw is not None else Account(0, 0)
    if tx.nonce != acc.nonce:
        raise BadNonce(f"nonce {tx.nonce}, expected {acc.nonce}")
    fee = tx.fee_sat
    if fee < rules.min_fee_sat:
        raise FeeTooLow(f"fee {fee} sat is below the floor of {rules.min_fee_sat} sat")
    if fee >= amount:
        raise InsufficientBalance(f"deposit of {amount} sat does not cover the fee of {fee} sat")
    sup = Supply.decode(view.get(SUPPLY_KEY) or bytes(24))
    if sup.minted_sat + amount > MAX_MONEY:
        raise Overflow(f"claiming {amount} would exceed the supply cap")
    totals = bridge_totals(view)
    view.put(skey, Account(acc.balance_sat + amount - fee, acc.nonce + 1).encode())
    view.put(SUPPLY_KEY, Supply(sup.minted_sat + amount, sup.burned_sat, sup.fees_sat + fee).encode())
    view.put(key, PeginEntry(txid, p.vout, amount, p.btc_height, tx.sender).encode())
    view.put(coin_key(txid, p.vout), FedCoin(txid, p.vout, amount, CoinKind.DEPOSIT, tx.sender).encode())
    view.put(BRIDGE_TOTALS_KEY, BridgeTotals(totals.pegged_in_sat + amount, totals.pending_out_sat,
                                             totals.paid_out_sat).encode())


def apply_federation_fund(view: StateView, tx: Transaction, rules: Rules) -> None:
    """A member records a deposit to the funding address as a federation coin; no L2 money is made."""
    check_member(view, tx)
    fed = federation(view)
    p = cast(FederationFund, tx.payload)
    txid, txid_hex, amount = _proven_deposit(view, fed, p, rules, FUNDING_CONTRACT)
    if view.get(coin_key(txid, p.vout)) is not None:
        raise DuplicateDuty(f"funding deposit {txid_hex}:{p.vout} is recorded already")
    bump_member_nonce(view, tx)
    view.put(coin_key(txid, p.vout), FedCoin(txid, p.vout, amount, CoinKind.FUNDING, FUNDING_CONTRACT).encode())
    view.put(FUNDED_KEY, (funded_sat(view) + amount).to_bytes(8, "big"))


def apply_burn(view: StateView, tx: Transaction, rules: Rules) -> None:
    """Burn: destroy amount; on a chain with a federation, a non-empty destination makes it a peg-out request."""
    p = cast(Burn, tx.payload)
    amount = p.amount_sat
    script: Optional[bytes] = None
    if p.destination and view.get(FEDERATION_KEY) is not None:
        try:
            address = p.destination.decode("ascii")
        except UnicodeDecodeError:
            raise BadAddress("peg-out destination is not an ASCII Bitcoin address") from None
        script = address_script(address, rules.network)
        if amount < PEGOUT_MIN_SAT:
            raise PegoutTooSmall(f"peg-out of {amount} sat is below the minimum of {PEGOUT_MIN_SAT} sat")
    charge_sender(view, tx, rules, amount)
    sup = Supply.decode(view.get(SUPPLY_KEY) or bytes(24))
    view.put(SUPPLY_KEY, Supply(sup.minted_sat, sup.burned_sat + amount, sup.fees_sat).encode())
    if script is not None:
        totals = bridge_totals(view)
        view.put(pegout_key(tx.txid), PegoutEntry(PegoutStatus.PENDING, amount, view.height, b"\0" * 32,
                                                  script).encode())
        view.put(BRIDGE_TOTALS_KEY, BridgeTotals(totals.pegged_in_sat, totals.pending_out_sat + amount,
                                                 totals.paid_out_sat).encode())
