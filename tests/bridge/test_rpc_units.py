"""Pure parts of the RPC client: amounts, byte order, backoff."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.rpc import RetryPolicy, btc_to_sat, hash_from_hex, hash_to_hex, sat_to_btc, sat_to_btc_str

MAX_MONEY = 21_000_000 * 100_000_000


def test_btc_to_sat_exact() -> None:
    assert btc_to_sat(Decimal("50.00000000")) == 5_000_000_000
    assert btc_to_sat(Decimal("0.29")) == 29_000_000
    assert btc_to_sat(Decimal("0.00000001")) == 1
    assert btc_to_sat(Decimal("-0.5")) == -50_000_000  # e.g. wallet fees are negative
    assert btc_to_sat(Decimal("20999999.97690000")) == 2_099_999_997_690_000
    assert btc_to_sat(Decimal("1E-8")) == 1
    assert btc_to_sat(3) == 300_000_000


@pytest.mark.parametrize("bad", [Decimal("0.000000001"), Decimal("1.123456789"), Decimal("NaN"), Decimal("Infinity")])
def test_btc_to_sat_rejects_fractional_and_non_finite(bad: Decimal) -> None:
    with pytest.raises(ValueError):
        btc_to_sat(bad)


@pytest.mark.parametrize("bad", [0.1, "0.1", True, None])
def test_btc_to_sat_rejects_non_decimal(bad: object) -> None:
    with pytest.raises(TypeError):
        btc_to_sat(bad)  # type: ignore[arg-type]


@given(st.integers(-MAX_MONEY, MAX_MONEY))
def test_sat_btc_round_trip(sats: int) -> None:
    assert btc_to_sat(sat_to_btc(sats)) == sats
    assert btc_to_sat(Decimal(sat_to_btc_str(sats))) == sats
    assert len(sat_to_btc_str(abs(sats)).split(".")[1]) == 8


def test_hash_byte_order() -> None:
    display = "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"  # regtest genesis
    internal = hash_from_hex(display)
    assert internal[0] == 0x06 and internal[-1] == 0x0F
    assert hash_to_hex(internal) == display
    with pytest.raises(ValueError):
        hash_from_hex("00" * 31)
    with pytest.raises(ValueError):
        hash_to_hex(b"\0" * 33)


def test_backoff_is_capped_exponential() -> None:
    p = RetryPolicy(max_attempts=10, base_delay=0.1, max_delay=1.0)
    assert [p.delay(n) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert p.delay(1000) == 1.0
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
