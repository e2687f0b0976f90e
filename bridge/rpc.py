"""Async bitcoind JSON-RPC client: typed methods and results, sats at the boundary, retries.

Conventions at this boundary:

* Amounts: bitcoind speaks BTC as JSON numbers. Replies are parsed with
  ``json.loads(..., parse_float=Decimal)`` and converted with :func:`btc_to_sat`, which refuses
  anything that is not a whole number of satoshis. Amounts we send are formatted from integer
  sats as decimal *strings* ("0.00010000"), which bitcoind's ``AmountFromValue`` accepts, so no
  float ever touches money.
* Hashes: bitcoind's RPC shows txids and block hashes in *display* order (the byte-reversed
  double-SHA256). Every hash this module returns is ``bytes`` in *internal* (serialized) order,
  the order python-bitcoinlib's ``GetHash()``/``GetTxid()`` return and the order inside blocks
  and transactions. Display-order hex strings are only produced by properties named ``*_hex``.
  Hashes passed *to* methods are internal-order bytes too.
* Errors: every failure is a :class:`bridge.rpc_errors.RPCError`. :class:`RPCTransient` ones are
  retried with capped exponential backoff (:class:`RetryPolicy`); the others are raised at once.
* Non-idempotent calls (mining, wallet sends, stop, ...) are retried only when the request
  certainly did not run (connection refused, warm-up, 503): a timeout or a dropped connection
  after the request was sent may have executed it.

The client speaks JSON-RPC 2.0, so bitcoind answers errors with HTTP 200 and an error object.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import urllib.parse
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union, overload

import aiohttp

from bridge.rpc_errors import (RPCAuthError, RPCConnectionLost, RPCConnectionRefused, RPCCookieMissing, RPCFatal,
                               RPCProtocolError, RPCServiceUnavailable, RPCTimeout, RPCTransient, error_from_code)

log = logging.getLogger(__name__)

COIN = 100_000_000
_SAT = Decimal("0.00000001")

# --------------------------------------------------------------------------------------------
# Amounts and hashes at the boundary
# --------------------------------------------------------------------------------------------


def btc_to_sat(value: Union[Decimal, int]) -> int:
    """Convert an exact BTC amount (as parsed from bitcoind's JSON) to integer satoshis.

    Raises TypeError for floats (never let a float near money) and ValueError for non-finite
    values or amounts that are not a whole number of satoshis.
    """
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        raise TypeError(f"BTC amount must be Decimal or int, not {type(value).__name__}")
    if isinstance(value, int):
        return value * COIN
    if not value.is_finite():
        raise ValueError(f"BTC amount is not finite: {value}")
    with localcontext() as ctx:
        ctx.prec = 60
        sats = value * COIN
        if sats != sats.to_integral_value():
            raise ValueError(f"BTC amount {value} is not a whole number of satoshis")
        return int(sats)


def sat_to_btc(sats: int) -> Decimal:
    """Integer satoshis to an exact 8-decimal BTC Decimal."""
    if isinstance(sats, bool) or not isinstance(sats, int):
        raise TypeError(f"satoshi amount must be int, not {type(sats).__name__}")
    with localcontext() as ctx:
        ctx.prec = 60
        return (Decimal(sats) / COIN).quantize(_SAT)


def sat_to_btc_str(sats: int) -> str:
    """Integer satoshis as the decimal string sent to bitcoind (e.g. ``"0.00010000"``)."""
    return format(sat_to_btc(sats), "f")


def hash_to_hex(h: bytes) -> str:
    """Internal-order 32-byte hash -> display-order hex (as RPC and explorers show it)."""
    if len(h) != 32:
        raise ValueError(f"hash must be 32 bytes, got {len(h)}")
    return h[::-1].hex()


def hash_from_hex(s: str) -> bytes:
    """Display-order hex (as RPC shows it) -> internal-order 32-byte hash."""
    b = bytes.fromhex(s)
    if len(b) != 32:
        raise ValueError(f"hash hex must be 64 characters, got {len(s)}")
    return b[::-1]


# --------------------------------------------------------------------------------------------
# Authentication and retry settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserPassAuth:
    """Static ``-rpcuser``/``-rpcpassword`` or ``-rpcauth`` credentials."""

    user: str
    password: str = field(repr=False)


class CookieAuth:
    """bitcoind's ``.cookie`` file ("__cookie__:<random>"), re-read when bitcoind rewrites it.

    bitcoind writes a new cookie on every start and deletes it on shutdown, so the client
    re-reads the file once after an HTTP 401.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self._cached: Optional[tuple[str, str]] = None

    def __repr__(self) -> str:
        return f"CookieAuth({str(self.path)!r})"

    def credentials(self) -> tuple[str, str]:
        """The (user, password) pair, read from the file on first use."""
        if self._cached is None:
            self._cached = self._read()
        return self._cached

    def reload(self) -> bool:
        """Forget the cached cookie and read it again; True when it changed."""
        old = self._cached
        self._cached = None
        return self.credentials() != old

    def _read(self) -> tuple[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise RPCCookieMissing(f"cookie file {self.path} does not exist (is bitcoind running?)") from None
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise RPCAuthError(f"cookie file {self.path} is not in user:password form")
        return user, password


Auth = Union[CookieAuth, UserPassAuth]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff for transient failures.

    Attempt n (1-based) that fails transiently is followed by a delay of
    ``min(max_delay, base_delay * 2 ** (n - 1))``; after ``max_attempts`` attempts the last
    transient error is raised. ``max_attempts=1`` disables retries.
    """

    max_attempts: int = 6
    base_delay: float = 0.1
    max_delay: float = 5.0
    log_interval: float = 30.0  # at most one retry warning per method per this many seconds

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must be non-negative")

    def delay(self, attempt: int) -> float:
        """Backoff after the given failed attempt (1-based)."""
        return float(min(self.max_delay, self.base_delay * (2 ** min(attempt - 1, 62))))


class _RateLimitedWarning:
    """Log a warning per key at most once per interval, counting what was suppressed."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            self._logger.debug(msg, *args)
            return
        self._last[key] = now
        n = self._suppressed.pop(key, 0)
        if n:
            self._logger.warning(msg + " (%d similar suppressed)", *args, n)
        else:
            self._logger.warning(msg, *args)


# --------------------------------------------------------------------------------------------
# Typed results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """getblockchaininfo. ``blocks`` and ``best_block_hash`` come from the same tip."""

    chain: str  # "main", "test", "testnet4", "signet", "regtest"
    blocks: int
    headers: int
    best_block_hash: bytes  # internal order
    bits: int
    median_time: int
    verification_progress: Decimal
    initial_block_download: bool
    pruned: bool
    warnings: tuple[str, ...]

    @property
    def best_block_hash_hex(self) -> str:
        return hash_to_hex(self.best_block_hash)


@dataclass(frozen=True, slots=True)
class BlockHeaderInfo:
    """getblockheader verbose. ``confirmations`` is -1 when the block is not on the best chain."""

    block_hash: bytes
    height: int
    confirmations: int
    version: int
    merkle_root: bytes
    time: int
    median_time: int
    nonce: int
    bits: int
    n_tx: int
    prev_block_hash: Optional[bytes]  # None for genesis
    next_block_hash: Optional[bytes]

    @property
    def block_hash_hex(self) -> str:
        return hash_to_hex(self.block_hash)


@dataclass(frozen=True, slots=True)
class MempoolAcceptResult:
    """One entry of testmempoolaccept. Fees in sats, fee rate in sat/kvB."""

    txid: bytes
    wtxid: Optional[bytes]
    allowed: bool
    reject_reason: Optional[str]
    reject_details: Optional[str]
    package_error: Optional[str]
    vsize: Optional[int]
    fee_sat: Optional[int]
    effective_feerate_sat_per_kvb: Optional[int]

    @property
    def txid_hex(self) -> str:
        return hash_to_hex(self.txid)


@dataclass(frozen=True, slots=True)
class MempoolEntry:
    """getmempoolentry (the fields the project uses)."""

    txid: bytes
    wtxid: bytes
    vsize: int
    weight: int
    time: int
    height: int
    fee_sat: int
    modified_fee_sat: int
    ancestor_count: int
    descendant_count: int
    depends: tuple[bytes, ...]
    spent_by: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Utxo:
    """One listunspent entry."""

    txid: bytes
    vout: int
    amount_sat: int
    script_pubkey: bytes
    confirmations: int
    address: Optional[str]
    spendable: bool
    solvable: bool
    safe: bool

    @property
    def txid_hex(self) -> str:
        return hash_to_hex(self.txid)


@dataclass(frozen=True, slots=True)
class FundedTransaction:
    """fundrawtransaction: unsigned transaction with inputs and change added."""

    raw: bytes
    fee_sat: int
    change_position: int  # -1 when no change output


@dataclass(frozen=True, slots=True)
class SignedTransaction:
    """signrawtransactionwithwallet."""

    raw: bytes
    complete: bool
    errors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DescriptorInfo:
    """getdescriptorinfo."""

    descriptor: str
    checksum: str
    is_range: bool
    is_solvable: bool
    has_private_keys: bool


@dataclass(frozen=True, slots=True)
class ImportDescriptorResult:
    """One importdescriptors result."""

    success: bool
    warnings: tuple[str, ...]
    error: Optional[str]


@dataclass(frozen=True, slots=True)
class ZmqNotification:
    """getzmqnotifications: one active publisher."""

    type: str  # "pubhashblock", "pubrawtx", ...
    address: str
    hwm: int


# --------------------------------------------------------------------------------------------
# Reply field readers: a reply of the wrong shape is an RPCProtocolError, never a KeyError.
# --------------------------------------------------------------------------------------------


def _bad(what: str, value: object) -> RPCProtocolError:
    return RPCProtocolError(f"unexpected {what} in reply: {value!r:.200}")


def _obj(v: Any, what: str = "object") -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _bad(what, v)
    return v


def _list(v: Any, what: str = "list") -> list[Any]:
    if not isinstance(v, list):
        raise _bad(what, v)
    return v


def _int(v: Any, what: str = "integer") -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(what, v)
    return v


def _bool(v: Any, what: str = "boolean") -> bool:
    if not isinstance(v, bool):
        raise _bad(what, v)
    return v


def _str(v: Any, what: str = "string") -> str:
    if not isinstance(v, str):
        raise _bad(what, v)
    return v


def _hex(v: Any, what: str = "hex") -> bytes:
    try:
        return bytes.fromhex(_str(v, what))
    except ValueError:
        raise _bad(what, v) from None


def _hash(v: Any, what: str = "hash") -> bytes:
    try:
        return hash_from_hex(_str(v, what))
    except ValueError:
        raise _bad(what, v) from None


def _sat(v: Any, what: str = "amount") -> int:
    if isinstance(v, bool) or not isinstance(v, (Decimal, int)):
        raise _bad(what, v)
    try:
        return btc_to_sat(v)
    except ValueError as e:
        raise RPCProtocolError(f"{what}: {e}") from None


def _key(d: Mapping[str, Any], key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise RPCProtocolError(f"reply lacks field {key!r}") from None


def _json_default(o: object) -> object:
    if isinstance(o, Decimal):
        return format(o, "f")  # bitcoind's AmountFromValue accepts decimal strings
    if isinstance(o, bytes):
        return o.hex()
    raise TypeError(f"cannot send {type(o).__name__} to bitcoind")


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class _Transport:
    """HTTP session, credentials, concurrency limit and retry policy shared by wallet views."""

    def __init__(
        self,
        url: str,
        auth: Auth,
        timeout: float,
        max_concurrency: int,
        retry: RetryPolicy,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"bitcoind RPC URL must be http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout = timeout
        self.max_concurrency = max_concurrency
        self.retry = retry
        self.semaphore = asyncio.Semaphore(max_concurrency)
        self.session: Optional[aiohttp.ClientSession] = None
        self.closed = False
        self.ids = itertools.count(1)
        self.warn = _RateLimitedWarning(log, retry.log_interval)

    def get_session(self) -> aiohttp.ClientSession:
        if self.closed:
            raise RuntimeError("BitcoinRPC is closed")
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=self.max_concurrency),
                headers={"Content-Type": "application/json"},
            )
        return self.session

    async def close(self) -> None:
        self.closed = True
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


class BitcoinRPC:
    """Async client for one bitcoind's JSON-RPC interface.

    Owns an aiohttp ``ClientSession`` (created on first use inside the running loop); close it
    with ``await rpc.close()`` or use ``async with BitcoinRPC(...) as rpc``. At most
    ``max_concurrency`` calls are in flight at once. Transient failures are retried per
    ``retry``. ``wallet`` names the wallet used by wallet methods (``/wallet/<name>``);
    :meth:`for_wallet` gives a view on another wallet that shares this client's session.
    """

    def __init__(
        self,
        url: str,
        auth: Auth,
        *,
        timeout: float = 30.0,
        max_concurrency: int = 8,
        retry: RetryPolicy = RetryPolicy(),
        wallet: Optional[str] = None,
        _transport: Optional[_Transport] = None,
    ) -> None:
        self._t = _transport or _Transport(url, auth, timeout, max_concurrency, retry)
        self._owner = _transport is None
        self.wallet = wallet

    def __repr__(self) -> str:
        return f"BitcoinRPC({self._t.url!r}, wallet={self.wallet!r})"

    @property
    def url(self) -> str:
        return self._t.url

    def for_wallet(self, wallet: Optional[str]) -> "BitcoinRPC":
        """A client for ``wallet`` sharing this one's session, limit and retry policy."""
        return BitcoinRPC(self._t.url, self._t.auth, wallet=wallet, _transport=self._t)

    async def __aenter__(self) -> "BitcoinRPC":
        self._t.get_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session (only the owning client closes a shared session)."""
        if self._owner:
            await self._t.close()

    # ---- generic call ------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: Union[Sequence[Any], Mapping[str, Any]] = (),
        *,
        wallet: bool = False,
        idempotent: bool = True,
    ) -> Any:
        """Call ``method`` and return its ``result`` (JSON with Decimal floats).

        ``wallet=True`` routes the call to this client's wallet endpoint, if one is set.
        ``idempotent=False`` restricts retries to failures where the call certainly did not run.
        """
        t = self._t
        path = ""
        if wallet and self.wallet is not None:
            path = "/wallet/" + urllib.parse.quote(self.wallet, safe="")
        body_params: Any = dict(params) if isinstance(params, Mapping) else list(params)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._call_once(t.url + path, method, body_params)
            except RPCTransient as e:
                retryable = idempotent or not e.executed_maybe
                if attempt >= t.retry.max_attempts or not retryable:
                    if not retryable:
                        log.warning("%s failed (%s); not retried: the call may have run", method, e)
                    raise
                delay = t.retry.delay(attempt)
                t.warn.warning(
                    "retry:" + method,
                    "bitcoind %s: %s: %s (attempt %d/%d, retrying in %.2fs)",
                    method, type(e).__name__, e.message, attempt, t.retry.max_attempts, delay,
                )
                await asyncio.sleep(delay)  # backoff between attempts, not a wait for state

    async def _call_once(self, url: str, method: str, params: Any) -> Any:
        t = self._t
        req_id = next(t.ids)
        body = json.dumps(
            {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params},
            default=_json_default,
        ).encode()
        auth = t.auth
        reread_cookie = isinstance(auth, CookieAuth)
        async with t.semaphore:
            while True:
                if isinstance(auth, CookieAuth):
                    user, password = auth.credentials()
                else:
                    user, password = auth.user, auth.password
                status, reply = await self._post(url, body, aiohttp.encode_basic_auth(user, password), method)
                if status == 401 and reread_cookie and isinstance(auth, CookieAuth):
                    # bitcoind writes a fresh cookie on every start: re-read it once.
                    reread_cookie = False
                    changed = auth.reload()
                    log.info("bitcoind rejected the cookie; re-read %s (changed: %s)", auth.path, changed)
                    continue
                break
        return self._parse_reply(status, reply, method, req_id)

    async def _post(self, url: str, body: bytes, authorization: str, method: str) -> tuple[int, bytes]:
        session = self._t.get_session()
        try:
            async with session.post(url, data=body, headers={"Authorization": authorization}) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise RPCTimeout(f"no reply within {self._t.timeout}s", method=method) from None
        except aiohttp.ClientConnectorError as e:
            # Covers refused and unreachable: the request was never sent.
            raise RPCConnectionRefused(f"cannot connect to {self._t.url}: {e.os_error}", method=method) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
            raise RPCConnectionLost(f"connection lost: {e!r}", method=method) from None

    @staticmethod
    def _parse_reply(status: int, reply: bytes, method: str, req_id: int) -> Any:
        if status in (401, 403):
            raise RPCAuthError(f"HTTP {status}: bitcoind refused the credentials", code=None, method=method)
        if status == 503:
            raise RPCServiceUnavailable("HTTP 503: work queue full", method=method)
        try:
            doc = json.loads(reply, parse_float=Decimal)
        except (ValueError, UnicodeDecodeError):
            raise RPCProtocolError(
                f"HTTP {status}: reply is not JSON: {reply[:200]!r}", method=method
            ) from None
        if not isinstance(doc, dict):
            raise RPCProtocolError(f"HTTP {status}: reply is not a JSON-RPC object: {reply[:200]!r}", method=method)
        err = doc.get("error")
        if err is not None:
            if not isinstance(err, dict) or isinstance(err.get("code"), bool) or not isinstance(err.get("code"), int):
                raise RPCProtocolError(f"HTTP {status}: malformed error object {err!r:.200}", method=method)
            raise error_from_code(err["code"], str(err.get("message", "")), method)
        if status != 200:
            raise RPCProtocolError(f"HTTP {status} without an error object: {reply[:200]!r}", method=method)
        if doc.get("id") != req_id:
            raise RPCProtocolError(f"reply id {doc.get('id')!r} does not match request id {req_id}", method=method)
        if "result" not in doc:
            raise RPCProtocolError("reply has neither result nor error", method=method)
        return doc["result"]

    # ---- blockchain ----------------------------------------------------------------------------

    async def getblockchaininfo(self) -> ChainInfo:
        r = _obj(await self.call("getblockchaininfo"))
        raw_warnings = r.get("warnings", [])
        if isinstance(raw_warnings, str):  # before v28 a single string
            raw_warnings = [raw_warnings] if raw_warnings else []
        return ChainInfo(
            chain=_str(_key(r, "chain")),
            blocks=_int(_key(r, "blocks")),
            headers=_int(_key(r, "headers")),
            best_block_hash=_hash(_key(r, "bestblockhash")),
            bits=int(_str(r.get("bits", "0")), 16),
            median_time=_int(_key(r, "mediantime")),
            verification_progress=Decimal(_key(r, "verificationprogress")),
            initial_block_download=_bool(_key(r, "initialblockdownload")),
            pruned=_bool(_key(r, "pruned")),
            warnings=tuple(_str(w) for w in _list(raw_warnings)),
        )

    async def require_chain(self, expected: str) -> ChainInfo:
        """getblockchaininfo, refusing a node on another chain ("main", "signet", "regtest"...)."""
        info = await self.getblockchaininfo()
        if info.chain != expected:
            raise RPCFatal(f"bitcoind is on chain {info.chain!r}, expected {expected!r}", method="getblockchaininfo")
        return info

    async def getblockcount(self) -> int:
        return _int(await self.call("getblockcount"))

    async def getbestblockhash(self) -> bytes:
        return _hash(await self.call("getbestblockhash"))

    async def getblockhash(self, height: int) -> bytes:
        """Hash (internal order) of the best-chain block at ``height``; -8 if out of range."""
        return _hash(await self.call("getblockhash", [height]))

    @overload
    async def getblockheader(self, block_hash: bytes, verbose: Literal[False] = ...) -> bytes: ...

    @overload
    async def getblockheader(self, block_hash: bytes, verbose: Literal[True]) -> BlockHeaderInfo: ...

    async def getblockheader(self, block_hash: bytes, verbose: bool = False) -> Union[bytes, BlockHeaderInfo]:
        """The 80-byte serialized header, or (verbose) its decoded fields and chain position."""
        if not verbose:
            raw = _hex(await self.call("getblockheader", [hash_to_hex(block_hash), False]))
            if len(raw) != 80:
                raise RPCProtocolError(f"block header is {len(raw)} bytes, not 80", method="getblockheader")
            return raw
        r = _obj(await self.call("getblockheader", [hash_to_hex(block_hash), True]))
        prev = r.get("previousblockhash")
        nxt = r.get("nextblockhash")
        return BlockHeaderInfo(
            block_hash=_hash(_key(r, "hash")),
            height=_int(_key(r, "height")),
            confirmations=_int(_key(r, "confirmations")),
            version=_int(_key(r, "version")),
            merkle_root=_hash(_key(r, "merkleroot")),
            time=_int(_key(r, "time")),
            median_time=_int(_key(r, "mediantime")),
            nonce=_int(_key(r, "nonce")),
            bits=int(_str(_key(r, "bits")), 16),
            n_tx=_int(_key(r, "nTx")),
            prev_block_hash=None if prev is None else _hash(prev),
            next_block_hash=None if nxt is None else _hash(nxt),
        )

    async def getblock(self, block_hash: bytes) -> bytes:
        """The serialized block (verbosity 0)."""
        return _hex(await self.call("getblock", [hash_to_hex(block_hash), 0]))

    async def getrawtransaction(self, txid: bytes, block_hash: Optional[bytes] = None) -> bytes:
        """The serialized transaction (with witness). Needs -txindex, the mempool, or ``block_hash``."""
        params: list[Any] = [hash_to_hex(txid), 0]
        if block_hash is not None:
            params.append(hash_to_hex(block_hash))
        return _hex(await self.call("getrawtransaction", params))

    async def gettxoutproof(self, txids: Sequence[bytes], block_hash: Optional[bytes] = None) -> bytes:
        """Serialized CMerkleBlock: the 80-byte header then the partial merkle tree."""
        params: list[Any] = [[hash_to_hex(t) for t in txids]]
        if block_hash is not None:
            params.append(hash_to_hex(block_hash))
        return _hex(await self.call("gettxoutproof", params))

    async def verifytxoutproof(self, proof: bytes) -> list[bytes]:
        """txids the proof commits to; empty when the proof is invalid or not on the best chain."""
        return [_hash(x) for x in _list(await self.call("verifytxoutproof", [proof.hex()]))]

    async def invalidateblock(self, block_hash: bytes) -> None:
        await self.call("invalidateblock", [hash_to_hex(block_hash)], idempotent=False)

    async def reconsiderblock(self, block_hash: bytes) -> None:
        await self.call("reconsiderblock", [hash_to_hex(block_hash)], idempotent=False)

    # ---- mempool and transactions --------------------------------------------------------------

    async def sendrawtransaction(self, raw: bytes, max_fee_rate_sat_per_kvb: Optional[int] = None) -> bytes:
        """Submit a transaction; returns its txid. Resubmitting one already in the mempool succeeds."""
        params: list[Any] = [raw.hex()]
        if max_fee_rate_sat_per_kvb is not None:
            params.append(sat_to_btc_str(max_fee_rate_sat_per_kvb))
        # Idempotent: a repeat returns the same txid (mempool) or -27 (confirmed meanwhile).
        return _hash(await self.call("sendrawtransaction", params))

    async def testmempoolaccept(
        self, raws: Sequence[bytes], max_fee_rate_sat_per_kvb: Optional[int] = None
    ) -> list[MempoolAcceptResult]:
        params: list[Any] = [[r.hex() for r in raws]]
        if max_fee_rate_sat_per_kvb is not None:
            params.append(sat_to_btc_str(max_fee_rate_sat_per_kvb))
        out = []
        for item in _list(await self.call("testmempoolaccept", params)):
            r = _obj(item)
            fees = r.get("fees")
            fees_d = _obj(fees) if fees is not None else {}
            wtxid = r.get("wtxid")
            vsize = r.get("vsize")
            out.append(
                MempoolAcceptResult(
                    txid=_hash(_key(r, "txid")),
                    wtxid=None if wtxid is None else _hash(wtxid),
                    allowed=bool(r.get("allowed", False)),
                    reject_reason=r.get("reject-reason"),
                    reject_details=r.get("reject-details"),
                    package_error=r.get("package-error"),
                    vsize=None if vsize is None else _int(vsize),
                    fee_sat=None if "base" not in fees_d else _sat(fees_d["base"]),
                    effective_feerate_sat_per_kvb=(
                        None if "effective-feerate" not in fees_d else _sat(fees_d["effective-feerate"])
                    ),
                )
            )
        return out

    async def estimatesmartfee(self, conf_target: int, estimate_mode: Optional[str] = None) -> Optional[int]:
        """Fee rate estimate in sat/kvB, or None when bitcoind has none (e.g. fresh regtest)."""
        params: list[Any] = [conf_target]
        if estimate_mode is not None:
            params.append(estimate_mode)
        r = _obj(await self.call("estimatesmartfee", params))
        rate = r.get("feerate")
        if rate is None:
            log.debug("estimatesmartfee(%d): no estimate: %s", conf_target, r.get("errors"))
            return None
        return _sat(rate, "feerate")

    async def getrawmempool(self) -> list[bytes]:
        return [_hash(x) for x in _list(await self.call("getrawmempool", [False]))]

    async def getmempoolentry(self, txid: bytes) -> MempoolEntry:
        r = _obj(await self.call("getmempoolentry", [hash_to_hex(txid)]))
        fees = _obj(_key(r, "fees"))
        return MempoolEntry(
            txid=txid,
            wtxid=_hash(_key(r, "wtxid")),
            vsize=_int(_key(r, "vsize")),
            weight=_int(_key(r, "weight")),
            time=_int(_key(r, "time")),
            height=_int(_key(r, "height")),
            fee_sat=_sat(_key(fees, "base")),
            modified_fee_sat=_sat(_key(fees, "modified")),
            ancestor_count=_int(_key(r, "ancestorcount")),
            descendant_count=_int(_key(r, "descendantcount")),
            depends=tuple(_hash(x) for x in _list(r.get("depends", []))),
            spent_by=tuple(_hash(x) for x in _list(r.get("spentby", []))),
        )

    async def createrawtransaction(self, outputs: Mapping[str, int], data: Optional[bytes] = None) -> bytes:
        """An unsigned transaction without inputs paying ``outputs`` (address -> sats)."""
        outs: list[dict[str, str]] = [{addr: sat_to_btc_str(sats)} for addr, sats in outputs.items()]
        if data is not None:
            outs.append({"data": data.hex()})
        return _hex(await self.call("createrawtransaction", [[], outs]))

    # ---- wallet (regtest harness and tests) ----------------------------------------------------

    async def createwallet(self, name: str, *, disable_private_keys: bool = False, blank: bool = False) -> str:
        r = _obj(
            await self.call(
                "createwallet",
                {"wallet_name": name, "disable_private_keys": disable_private_keys, "blank": blank,
                 "load_on_startup": False},
                idempotent=False,
            )
        )
        return _str(_key(r, "name"))

    async def loadwallet(self, name: str) -> str:
        r = _obj(await self.call("loadwallet", {"filename": name, "load_on_startup": False}, idempotent=False))
        return _str(_key(r, "name"))

    async def listwallets(self) -> list[str]:
        return [_str(x) for x in _list(await self.call("listwallets"))]

    async def getnewaddress(self, label: str = "", address_type: Optional[str] = None) -> str:
        params: list[Any] = [label]
        if address_type is not None:
            params.append(address_type)
        return _str(await self.call("getnewaddress", params, wallet=True, idempotent=False))

    async def generatetoaddress(self, n: int, address: str) -> list[bytes]:
        """Mine ``n`` blocks (regtest); returns their hashes, oldest first."""
        r = await self.call("generatetoaddress", [n, address], idempotent=False)
        return [_hash(x) for x in _list(r)]

    async def sendtoaddress(self, address: str, amount_sat: int) -> bytes:
        """Wallet send; returns the txid."""
        return _hash(await self.call("sendtoaddress", [address, sat_to_btc_str(amount_sat)], wallet=True,
                                     idempotent=False))

    async def listunspent(
        self, minconf: int = 1, maxconf: int = 9_999_999, addresses: Optional[Sequence[str]] = None
    ) -> list[Utxo]:
        params: list[Any] = [minconf, maxconf]
        if addresses is not None:
            params.append(list(addresses))
        out = []
        for item in _list(await self.call("listunspent", params, wallet=True)):
            r = _obj(item)
            out.append(
                Utxo(
                    txid=_hash(_key(r, "txid")),
                    vout=_int(_key(r, "vout")),
                    amount_sat=_sat(_key(r, "amount")),
                    script_pubkey=_hex(_key(r, "scriptPubKey")),
                    confirmations=_int(_key(r, "confirmations")),
                    address=r.get("address"),
                    spendable=bool(r.get("spendable", False)),
                    solvable=bool(r.get("solvable", False)),
                    safe=bool(r.get("safe", False)),
                )
            )
        return out

    async def getbalance(self, minconf: int = 0) -> int:
        """Trusted wallet balance in sats (``minconf`` confirmations, default like bitcoind's 0)."""
        return _sat(await self.call("getbalance", ["*", minconf], wallet=True))

    async def fundrawtransaction(self, raw: bytes) -> FundedTransaction:
        r = _obj(await self.call("fundrawtransaction", [raw.hex()], wallet=True))
        return FundedTransaction(
            raw=_hex(_key(r, "hex")), fee_sat=_sat(_key(r, "fee")), change_position=_int(_key(r, "changepos"))
        )

    async def signrawtransactionwithwallet(self, raw: bytes) -> SignedTransaction:
        r = _obj(await self.call("signrawtransactionwithwallet", [raw.hex()], wallet=True))
        errors = tuple(str(_obj(e).get("error", "")) for e in _list(r.get("errors", [])))
        return SignedTransaction(raw=_hex(_key(r, "hex")), complete=_bool(_key(r, "complete")), errors=errors)

    async def getdescriptorinfo(self, descriptor: str) -> DescriptorInfo:
        r = _obj(await self.call("getdescriptorinfo", [descriptor]))
        return DescriptorInfo(
            descriptor=_str(_key(r, "descriptor")),
            checksum=_str(_key(r, "checksum")),
            is_range=_bool(_key(r, "isrange")),
            is_solvable=_bool(_key(r, "issolvable")),
            has_private_keys=_bool(_key(r, "hasprivatekeys")),
        )

    async def importdescriptors(self, requests: Sequence[Mapping[str, Any]]) -> list[ImportDescriptorResult]:
        """Import descriptors into the wallet; ``requests`` as in bitcoind's help (desc, timestamp, ...)."""
        out = []
        for item in _list(await self.call("importdescriptors", [list(requests)], wallet=True, idempotent=False)):
            r = _obj(item)
            err = r.get("error")
            out.append(
                ImportDescriptorResult(
                    success=_bool(_key(r, "success")),
                    warnings=tuple(_str(w) for w in _list(r.get("warnings", []))),
                    error=None if err is None else str(_obj(err).get("message", err)),
                )
            )
        return out

    # ---- node ----------------------------------------------------------------------------------

    async def getzmqnotifications(self) -> list[ZmqNotification]:
        out = []
        for item in _list(await self.call("getzmqnotifications")):
            r = _obj(item)
            out.append(ZmqNotification(type=_str(_key(r, "type")), address=_str(_key(r, "address")),
                                       hwm=_int(_key(r, "hwm"))))
        return out

    async def stop(self) -> str:
        """Ask bitcoind to shut down (it replies first, then exits)."""
        return str(await self.call("stop", idempotent=False))
