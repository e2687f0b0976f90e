"""What every payload codec test asserts: a payload survives its own encoding and a signed transaction, and its
decoder refuses a byte less (Truncated) and a byte more (TrailingBytes)."""
from __future__ import annotations

import hashlib
from typing import Any

import pytest

from l2d.core import tx as T
from l2d.core.errors import DecodeError, TrailingBytes, Truncated
from l2d.core.params import LOCAL
from l2d.core.payload import Payload

_SECRET = hashlib.sha256(b"l2d payload check key").digest()


def check_round_trip(payload: Payload, fee: int = 2) -> None:
    cls: Any = type(payload)
    assert cls.decode(payload.encode()) == payload
    t = T.sign(LOCAL, _SECRET, 0, 0 if payload.FEELESS else fee, payload, b"\0" * 32)
    assert T.decode(t.raw, LOCAL).payload == payload


def check_strict(payload: Payload) -> None:
    raw = payload.encode()
    cls: Any = type(payload)
    if raw:
        with pytest.raises(Truncated):
            cls.decode(raw[:-1])
    with pytest.raises(TrailingBytes if raw else DecodeError):  # an empty payload: not empty
        cls.decode(raw + b"\0")
