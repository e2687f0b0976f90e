"""LMDB store: a block and its state commit all or nothing; readers see whole blocks; foreign databases refused;
a full map or a full disk is a typed error saying what to do, and nothing of that block is stored."""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from l2d.core.params import LOCAL, REGTEST
from l2d.core.tree import ROOT_PATH, TreeChanges, TreeOverlay, build_tree, stored_root
from l2d.store import _CACHE_ENTRY, READER_CHECK_EVERY, SCHEMA_VERSION, Store, StoreError, StoreFull, StoreWriteError

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
    s.commit_block(1, b"b1", [b"x" * 32, b"y" * 32], {K1: None})
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


def _fill(s: Store, value_size: int) -> tuple[int, StoreError]:
    """Commit blocks with a new state record each until the store refuses one; (that height, the error)."""
    h = s.tip_height()
    h = 0 if h is None else h + 1
    while True:
        try:
            key = b"\x01" + h.to_bytes(32, "big")
            s.commit_block(h, b"b" * 20_000, [h.to_bytes(32, "big")], {key: b"v" * value_size})
        except StoreError as e:
            return h, e
        h += 1


def test_a_full_map_is_a_typed_error_naming_store_map_size(tmp_path: Path) -> None:
    s = Store(tmp_path, LOCAL, map_size=1 << 20)
    height, err = _fill(s, 1000)
    assert isinstance(err, StoreFull) and isinstance(err.__cause__, lmdb.MapFullError)
    assert str(err) == (f"cannot commit block {height}: the LMDB map of {tmp_path} is full (store.map_size = "
                        "1048576 bytes): raise store.map_size in the config and restart; nothing committed was lost")
    assert s.tip_height() == height - 1 and s.get_block(height) is None  # nothing of the refused block
    s.close()
    bigger = Store(tmp_path, LOCAL, map_size=8 << 20)  # the key's advice works: the same block now commits
    bigger.commit_block(height, b"b", [], {})
    assert bigger.tip_height() == height
    bigger.close()


def test_a_full_disk_is_a_typed_error_giving_the_free_space(small_fs: Path) -> None:
    """LMDB reports a full disk as EIO (mdb_txn_commit: Input/output error): the error adds the free space."""
    s = Store(small_fs / "ledger", LOCAL, map_size=1 << 30)
    height, err = _fill(s, 1000)
    assert isinstance(err, StoreWriteError) and isinstance(err.__cause__, lmdb.Error)
    assert str(err).startswith(f"cannot commit block {height}: LMDB cannot write to {small_fs / 'ledger'} (")
    assert str(err).endswith("; 0 bytes free on its filesystem): if the disk is full, free space and restart; "
                             "nothing committed was lost")
    assert s.tip_height() == height - 1
    s.close()
    again = Store(small_fs / "ledger", LOCAL, map_size=1 << 30)
    assert again.tip_height() == height - 1 and again.get_block(height - 1) == b"b" * 20_000
    again.close()


def test_lmdb_files_are_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        Store(tmp_path / "ledger", LOCAL).close()
    finally:
        os.umask(old)
    assert oct((tmp_path / "ledger").stat().st_mode & 0o777) == "0o700"
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "ledger").iterdir()} == \
        {"data.mdb": "0o600", "lock.mdb": "0o600"}


def test_the_tree_cache_serves_a_reader_only_the_version_its_transaction_sees(tmp_path: Path) -> None:
    """The cache holds the nodes the last commit wrote; a reader that began before that commit, or while a commit
    was under way (odd generation), reads its own transaction instead."""
    s = Store(tmp_path, LOCAL)
    items = {bytes([1, i]) + bytes(31): b"v%d" % i for i in range(40)}
    root0, tree = build_tree(sorted(items.items()))
    s.commit_block(0, b"g", [], dict(items), tree=tree)
    with s.reader() as before:
        overlay = TreeOverlay(s.tree_loader(before))
        overlay.set(K1, b"new")
        root1, changes = overlay.root(), overlay.changes()
        s.commit_block(1, b"b", [], {K1: b"new"}, tree=changes)
        assert ROOT_PATH in s._cache and s._cache[ROOT_PATH] == changes.puts[ROOT_PATH]
        assert stored_root(before.get_node) == root0
        assert s.tree_loader(before)(ROOT_PATH) == before.get_node(ROOT_PATH) != changes.puts[ROOT_PATH]
    s._cache[ROOT_PATH] = b"poison"  # to tell what the cache served from what LMDB did
    with s.reader() as after:
        assert s.tree_loader(after)(ROOT_PATH) == b"poison"
        assert stored_root(after.get_node) == root1
    s._gen += 1  # a commit under way
    with s.reader() as during:
        assert s.tree_loader(during)(ROOT_PATH) == changes.puts[ROOT_PATH]
    s.close()


def test_the_reader_slot_of_a_process_killed_mid_read_is_freed(tmp_path: Path) -> None:
    # a read API worker killed inside a read transaction leaves its slot in LMDB's reader table, pinning the version
    # it read; the store frees such slots at open and every READER_CHECK_EVERY commits
    s = Store(tmp_path / "db", LOCAL)
    s.commit_block(0, b"genesis", [], {b"k": b"v"})  # the first commit since open
    reader = subprocess.Popen([sys.executable, "-c", (
        "import lmdb, time\n"
        f"e = lmdb.open({str(tmp_path / 'db')!r}, max_dbs=16, readonly=True)\n"
        "t = e.begin()\n"
        "print('reading', flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    slot = re.compile(rf"^\s*{reader.pid}\s", re.M)  # env.readers(): one line per slot, its pid first
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
        assert slot.search(s.env.readers())
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
        reader.stdout.close()  # type: ignore[union-attr]
    for h in range(1, READER_CHECK_EVERY - 1):
        s.commit_block(h, b"block", [], {b"k": bytes([h])})
    assert slot.search(s.env.readers())  # dead, still pinning: the sweep is one commit away
    s.commit_block(READER_CHECK_EVERY - 1, b"block", [], {b"k": b"x"})
    assert not slot.search(s.env.readers())
    s.close()
    reopened = Store(tmp_path / "db", LOCAL)  # and at open, for a process that died while the daemon was down
    reopened.close()


def _keys(n: int) -> list[bytes]:
    return sorted(b"\x01" + hashlib.sha256(b"%d" % i).digest() for i in range(n))


def test_the_tree_cache_stays_within_its_limit_and_holds_only_committed_nodes(tmp_path: Path) -> None:
    limit = 12_000  # bytes: less than one commit below writes, so every commit evicts
    s = Store(tmp_path, LOCAL, tree_cache=limit)
    keys = _keys(2000)
    _, tree = build_tree([(k, b"v0") for k in keys])
    s.commit_block(0, b"g", [], {k: b"v0" for k in keys}, tree=tree)
    rnd = random.Random(5)
    for h in range(1, 8):
        writes: dict[bytes, bytes | None] = {k: b"v%d" % h for k in rnd.sample(keys, 150)}
        with s.reader() as r:
            overlay = TreeOverlay(s.tree_loader(r))
            for k in sorted(writes):
                overlay.set(k, writes[k])  # type: ignore[arg-type]
            overlay.root()
            changes = overlay.changes()
        s.commit_block(h, b"b", [], writes, tree=changes)
        assert 0 < s._cache_bytes <= limit
        assert s._cache_bytes == sum(len(p) + len(v) + _CACHE_ENTRY for p, v in s._cache.items())
        with s.env.begin() as txn:  # every cached node is the committed one
            assert all(txn.get(p, db=s._nodes) == v for p, v in s._cache.items())
        # more than fit: what is kept is the end of this commit's writes
        assert sum(len(p) + len(v) + _CACHE_ENTRY for p, v in changes.puts.items()) > limit
        assert list(s._cache) == list(changes.puts)[-len(s._cache):]
    s.close()


def test_a_commit_that_fails_leaves_no_cached_node_of_it(tmp_path: Path) -> None:
    s = Store(tmp_path, LOCAL, map_size=1 << 20)
    keys = _keys(200)
    _, tree = build_tree([(k, b"v") for k in keys])
    s.commit_block(0, b"g", [], {k: b"v" for k in keys}, tree=tree)

    def changed(value: bytes) -> TreeChanges:
        with s.reader() as r:
            overlay = TreeOverlay(s.tree_loader(r))
            overlay.set(keys[0], value)
            overlay.root()
            return overlay.changes()
    s.commit_block(1, b"b", [], {keys[0]: b"w"}, tree=changed(b"w"))
    assert s._cache  # the nodes block 1 wrote
    with pytest.raises(StoreFull):
        s.commit_block(2, b"x" * (2 << 20), [], {keys[0]: b"y"}, tree=changed(b"y"))  # larger than the map
    assert not s._cache and s._cache_bytes == 0 and s._gen % 2 == 0  # nothing of it; loaders trust the cache again
    with s.reader() as r:
        assert stored_root(s.tree_loader(r)) == stored_root(r.get_node)  # the committed tree, from LMDB
    s.close()
