"""bitcoind JSON-RPC errors: an exception class per bitcoind error code, transient vs fatal.

Every failure of an RPC call is an :class:`RPCError`. :class:`RPCTransient` (warm-up -28, connection
refused/reset, timeouts, HTTP 503) is worth retrying; :class:`RPCFatal` subclasses map bitcoind's error codes
(src/rpc/protocol.h); :class:`RPCProtocolError` means the reply could not be understood (or auth failed).
"""
from __future__ import annotations

from typing import Mapping, Optional


class RPCError(Exception):
    """Any failure of a bitcoind RPC call."""

    def __init__(self, message: str, *, code: Optional[int] = None, method: Optional[str] = None):
        super().__init__(message if method is None else f"{method}: {message}")
        self.message = message
        self.code = code
        self.method = method


class RPCTransient(RPCError):
    """A failure worth retrying later: bitcoind warming up, unreachable, overloaded or slow.

    ``executed_maybe`` is True when the request may have reached bitcoind and run (a timeout or
    a dropped connection), so a non-idempotent call must not be blindly repeated.
    """

    executed_maybe: bool = False


class RPCWarmup(RPCTransient):
    """-28 RPC_IN_WARMUP: bitcoind is still starting (loading the block index, wallets...)."""


class RPCConnectionRefused(RPCTransient):
    """bitcoind is not listening (not started yet, restarting, or stopped)."""


class RPCCookieMissing(RPCTransient):
    """The cookie file does not exist: bitcoind is not running or has not written it yet."""


class RPCConnectionLost(RPCTransient):
    """The connection broke after the request was sent (reset, server disconnected)."""

    executed_maybe = True


class RPCTimeout(RPCTransient):
    """No complete reply within the client's timeout."""

    executed_maybe = True


class RPCServiceUnavailable(RPCTransient):
    """HTTP 503: bitcoind's work queue is full; the request was not run."""


class RPCLimitExceeded(RPCTransient):
    """-37 RPC_LIMIT_EXCEEDED: a bounded resource is at capacity right now."""


class RPCProtocolError(RPCError):
    """The reply could not be understood: non-JSON, malformed JSON-RPC, unexpected shape."""


class RPCAuthError(RPCProtocolError):
    """HTTP 401/403: bad credentials (after one cookie re-read) or a non-allowed client IP."""


class RPCFatal(RPCError):
    """bitcoind refused the call with a JSON-RPC error; repeating it will not help."""


class RPCMiscError(RPCFatal):
    """-1 RPC_MISC_ERROR."""


class RPCTypeError(RPCFatal):
    """-3 RPC_TYPE_ERROR: a parameter had the wrong type (or an invalid amount)."""


class RPCInvalidAddressOrKey(RPCFatal):
    """-5 RPC_INVALID_ADDRESS_OR_KEY: also bitcoind's "not found" (tx, block, mempool entry)."""


RPCNotFound = RPCInvalidAddressOrKey


class RPCOutOfMemory(RPCFatal):
    """-7 RPC_OUT_OF_MEMORY."""


class RPCInvalidParameter(RPCFatal):
    """-8 RPC_INVALID_PARAMETER (e.g. block height out of range)."""


class RPCClientNotConnected(RPCFatal):
    """-9 RPC_CLIENT_NOT_CONNECTED."""


class RPCInInitialDownload(RPCFatal):
    """-10 RPC_CLIENT_IN_INITIAL_DOWNLOAD."""


class RPCDatabaseError(RPCFatal):
    """-20 RPC_DATABASE_ERROR."""


class RPCDeserializationError(RPCFatal):
    """-22 RPC_DESERIALIZATION_ERROR: raw transaction/block/PSBT did not decode."""


class RPCVerifyError(RPCFatal):
    """-25 RPC_VERIFY_ERROR: general error during transaction or block submission."""


class RPCVerifyRejected(RPCFatal):
    """-26 RPC_VERIFY_REJECTED: rejected by consensus or policy rules."""


class RPCAlreadyInChain(RPCFatal):
    """-27 RPC_VERIFY_ALREADY_IN_UTXO_SET: the transaction is already confirmed."""


class RPCMethodDeprecated(RPCFatal):
    """-32 RPC_METHOD_DEPRECATED."""


class RPCMempoolDisabled(RPCFatal):
    """-33 RPC_CLIENT_MEMPOOL_DISABLED."""


class RPCWalletError(RPCFatal):
    """-4 RPC_WALLET_ERROR, and the parent of all wallet error codes."""


class RPCInsufficientFunds(RPCWalletError):
    """-6 RPC_WALLET_INSUFFICIENT_FUNDS."""


class RPCWalletUnlockNeeded(RPCWalletError):
    """-13 RPC_WALLET_UNLOCK_NEEDED."""


class RPCWalletNotFound(RPCWalletError):
    """-18 RPC_WALLET_NOT_FOUND: no such wallet, or not loaded."""


class RPCWalletNotSpecified(RPCWalletError):
    """-19 RPC_WALLET_NOT_SPECIFIED: several wallets loaded and none named."""


class RPCWalletAlreadyLoaded(RPCWalletError):
    """-35 RPC_WALLET_ALREADY_LOADED."""


class RPCWalletAlreadyExists(RPCWalletError):
    """-36 RPC_WALLET_ALREADY_EXISTS."""


class RPCInvalidRequest(RPCFatal):
    """-32600 RPC_INVALID_REQUEST."""


class RPCMethodNotFound(RPCFatal):
    """-32601 RPC_METHOD_NOT_FOUND (also: wallet RPC on a node without wallet support)."""


class RPCInvalidParams(RPCFatal):
    """-32602 RPC_INVALID_PARAMS."""


class RPCInternalError(RPCFatal):
    """-32603 RPC_INTERNAL_ERROR."""


class RPCParseError(RPCFatal):
    """-32700 RPC_PARSE_ERROR: bitcoind could not parse our request."""


# Codes from Bitcoin Core's src/rpc/protocol.h. Codes not listed map to plain RPCFatal.
ERROR_CLASSES: Mapping[int, type[RPCError]] = {
    -1: RPCMiscError,
    -3: RPCTypeError,
    -4: RPCWalletError,
    -5: RPCInvalidAddressOrKey,
    -6: RPCInsufficientFunds,
    -7: RPCOutOfMemory,
    -8: RPCInvalidParameter,
    -9: RPCClientNotConnected,
    -10: RPCInInitialDownload,
    -11: RPCWalletError,  # invalid label name
    -12: RPCWalletError,  # keypool ran out
    -13: RPCWalletUnlockNeeded,
    -14: RPCWalletError,  # passphrase incorrect
    -15: RPCWalletError,  # wrong encryption state
    -16: RPCWalletError,  # encryption failed
    -17: RPCWalletError,  # already unlocked
    -18: RPCWalletNotFound,
    -19: RPCWalletNotSpecified,
    -20: RPCDatabaseError,
    -22: RPCDeserializationError,
    -25: RPCVerifyError,
    -26: RPCVerifyRejected,
    -27: RPCAlreadyInChain,
    -28: RPCWarmup,
    -32: RPCMethodDeprecated,
    -33: RPCMempoolDisabled,
    -35: RPCWalletAlreadyLoaded,
    -36: RPCWalletAlreadyExists,
    -37: RPCLimitExceeded,
    -32600: RPCInvalidRequest,
    -32601: RPCMethodNotFound,
    -32602: RPCInvalidParams,
    -32603: RPCInternalError,
    -32700: RPCParseError,
}


def error_from_code(code: int, message: str, method: Optional[str] = None) -> RPCError:
    """The typed exception for a bitcoind JSON-RPC error object."""
    cls = ERROR_CLASSES.get(code, RPCFatal)
    return cls(message, code=code, method=method)
