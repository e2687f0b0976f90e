"""The two static tables of the consensus layer are complete and match: every TxType decodes and has a rule."""
from __future__ import annotations

import subprocess
import sys

from l2d.core.payload import TxType
from l2d.core.rules import RULES
from l2d.core.tx import PAYLOAD_TYPES


def test_every_type_has_a_payload_class_that_names_it() -> None:
    assert set(PAYLOAD_TYPES) == set(TxType)
    for typ, cls in PAYLOAD_TYPES.items():
        assert cls.TYPE == typ


def test_every_type_has_a_rule() -> None:
    assert set(RULES) == set(TxType)
    assert all(callable(rule) for rule in RULES.values())


def test_importing_tx_alone_decodes_every_type() -> None:
    # A fresh interpreter: which types decode must not depend on what else was imported first.
    code = ("import l2d.core.tx as T, l2d.core.payload as P; import sys; "
            "assert set(T.PAYLOAD_TYPES) == set(P.TxType); "
            "assert 'l2d.core.rules' not in sys.modules and 'l2d.core.state' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
