"""LMDB store: a block and its state commit all or nothing; readers see whole blocks; foreign databases refused."""
from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import lmdb
import pytest

from l2d.core.params import LOCAL, REGTEST
from l2d.store import SCHEMA_VERSION, Store, StoreError

K1, K2 = b"\x01" + b"a" * 32, b"\x01" + b"b" * 32


def test_commit_is_all_or_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path, LOCAL)
    s.commit_block(0, b"genesis", [], {K1: b"v1"})
    with pytest.raises(TypeError):  # the second write fails inside the LMDB transaction
        s.commit_block(1, b"block1", [b"t" * 32], {K2: b"v2", K1: 12345})  # type: ignore[dict-item]
    assert s.tip_height() == 0
    assert s.get_block(1) is None and s.get_state(K2) is None and s.tx_location(b"t" * 32) is None
    assert s.get_state(K1) == b"v1"
    s.close()


def test_heights_must_follow_the_tip(tmp_path: Path) -> None:
    s = Store(tmp_path, LOCAL)
    with pytest.raises(StoreError, match="next height is 0"):
        s.commit_block(1, b"x", [], {})
    s.commit_block(0, b"g", [], {})
    with pytest.raises(StoreError, match="next height is 1"):
        s.commit_block(0, b"g", [], {})
    s.close()


def test_deletes_and_index(tmp_path: Path) -> None:
    s = Store(tmp_path, LOCAL)
    s.commit_block(0, b"g", [], {K1: b"v1", K2: b"v2"})
    asyncio.run(s.commit_block_async(1, b"b1", [b"x" * 32, b"y" * 32], {K1: None}))
    assert s.get_state(K1) is None and s.get_state(K2) == b"v2"
    assert s.tx_location(b"y" * 32) == (1, 1)
    with s.reader() as r:
        assert list(r.iter_state()) == [(K2, b"v2")] and r.state_count() == 1 and r.tip_height() == 1
    s.close()


def test_reader_sees_a_consistent_view_while_a_block_commits(tmp_path: Path) -> None:
    s = Store(tmp_path, LOCAL)
    s.commit_block(0, b"g", [], {K1: b"old"})
    with s.reader() as r:
        s.commit_block(1, b"b1", [], {K1: b"new", K2: b"v2"})
        assert r.tip_height() == 0 and r.get_state(K1) == b"old" and r.get_state(K2) is None
    assert s.get_state(K1) == b"new"
    s.close()


def test_refuses_another_networks_database(tmp_path: Path) -> None:
    Store(tmp_path, LOCAL).close()
    with pytest.raises(StoreError, match="made for network"):
        Store(tmp_path, REGTEST)
    Store(tmp_path, LOCAL).close()  # and the refusal left it usable


def test_refuses_another_schema_version(tmp_path: Path) -> None:
    Store(tmp_path, LOCAL).close()
    env = lmdb.open(str(tmp_path), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True, db=meta) as txn:
        txn.put(b"schema", struct.pack(">Q", SCHEMA_VERSION + 1))
    env.close()
    with pytest.raises(StoreError, match="schema version"):
        Store(tmp_path, LOCAL)
