"""bitcoind error codes to exception classes: the transient/fatal tree."""
from __future__ import annotations

from bridge.rpc_errors import (ERROR_CLASSES, RPCFatal, RPCTransient, RPCWalletError, RPCWalletNotFound, RPCWarmup,
                               error_from_code)


def test_error_mapping_tree() -> None:
    assert isinstance(error_from_code(-28, "warming up"), RPCWarmup)
    assert isinstance(error_from_code(-28, "warming up"), RPCTransient)
    e = error_from_code(-18, "no wallet", "getbalance")
    assert isinstance(e, RPCWalletNotFound) and isinstance(e, RPCWalletError) and isinstance(e, RPCFatal)
    assert str(e) == "getbalance: no wallet" and e.code == -18
    assert type(error_from_code(-424242, "?")) is RPCFatal
    transient_codes = {code for code, cls in ERROR_CLASSES.items() if issubclass(cls, RPCTransient)}
    assert transient_codes == {-28, -37}
