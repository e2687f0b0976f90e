"""The ledger over the store: executing a block on any parent at hand (the tip, the final block below a non-final
tip, a stored sibling of the tip) leaves the tree at the tip's state; a non-final tip is replaced by a sibling in
one LMDB transaction; the final height drops undo records and siblings; a reopened ledger agrees with the store."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from l2d.core.block import Block
from l2d.core.coin_tx import Transfer
from l2d.core.errors import Rejected
from l2d.core.params import LOCAL
from l2d.core.state import Rules, account_key, genesis_state
from l2d.core.tree import ROOT_REF, prove_stored, root_of, verify_proof
from l2d.core.tx import Transaction, sign
from l2d.ledger import Ledger, TipMoved, UnknownParent
from l2d.store import Store, StoreError
from tests.conftest import Keys

GENESIS_TS = 1_767_225_600_000


def transfer(frm: int, to: int, amount: int, nonce: int) -> Transaction:
    return sign(LOCAL, Keys.secret(frm), nonce, 1, Transfer(Keys.pubkey(to), amount), b"\0" * 32)


def _open(path: Path) -> Ledger:
    ledger = Ledger(Store(path, LOCAL), Rules(LOCAL, 1))
    ledger.open(genesis_state(((Keys.pubkey(1), 1_000_000), (Keys.pubkey(2), 1_000_000)), None, None), GENESIS_TS)
    return ledger


def _state_root(ledger: Ledger) -> bytes:
    with ledger.store.reader() as r:
        return root_of((bytes(k), bytes(v)) for k, v in r.iter_state())


def test_a_sibling_replaces_the_non_final_tip_and_a_child_of_the_other_sibling_makes_it_final(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "db")
    g = ledger.tip
    assert g is not None and ledger.final == g
    a = ledger.execute(g, [transfer(1, 3, 100, 0)], GENESIS_TS + 1)
    b = ledger.execute(g, [transfer(2, 3, 7, 0), transfer(1, 4, 5, 0)], GENESIS_TS + 2)
    assert ledger.state_root() == g.state_root  # executing leaves the tree at the tip
    ledger.store_block(a, b"commit-a", None)
    assert ledger.tip == a.header and ledger.final == g and ledger.store.get_undo(1) is not None

    # b (a sibling, built on the final block below the tip) is executed on the final state, then replaces a
    b2 = ledger.execute(g, b.block.txs, GENESIS_TS + 2)
    assert b2.header == b.header and ledger.state_root() == a.header.state_root
    ledger.store_block(b2, b"commit-b", None)
    assert ledger.tip == b.header and ledger.state_root() == b.header.state_root == _state_root(ledger)
    assert ledger.store.tx_location(a.block.txs[0].txid) is None
    assert ledger.store.tx_location(b.block.txs[1].txid) == (1, 1)
    assert [Block.decode(raw, LOCAL).header for raw, _ in ledger.store.siblings()] == [a.header]

    # a child of the stored sibling a: executed on a's state through the siblings table
    c = ledger.execute(a.header, [transfer(1, 3, 1, 1)], GENESIS_TS + 3)
    assert ledger.state_root() == b.header.state_root
    with pytest.raises(Rejected):  # a's nonce 0 of member 1 is spent on a's branch: strict execution refuses
        ledger.execute(a.header, [transfer(1, 3, 1, 0)], GENESIS_TS + 3, strict=True)
    # the host makes a the tip again (re-executed on the final block), then stores c, making a final
    ledger.store_block(ledger.execute(g, a.block.txs, GENESIS_TS + 1), b"commit-a", None)
    ledger.store_block(c, b"commit-c", a.header)
    assert (ledger.tip, ledger.final) == (c.header, a.header)
    assert ledger.store.siblings() == [] and ledger.store.get_undo(1) is None and ledger.store.get_undo(2) is not None
    assert ledger.state_root() == c.header.state_root == _state_root(ledger)
    with pytest.raises(UnknownParent):
        ledger.execute(b.header, [], GENESIS_TS + 4)  # the lost sibling is gone
    ledger.store.close()

    again = _open(tmp_path / "db")  # the store alone gives the same chain: tip, final, state
    assert (again.tip, again.final) == (c.header, a.header) and again.state_root() == c.header.state_root
    assert again.store.get_commit(2) == b"commit-c"
    again.store.close()


def test_the_final_height_cannot_go_back_or_pass_the_tip(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "db")
    g = ledger.tip
    assert g is not None
    a = ledger.execute(g, [], GENESIS_TS + 1)
    ledger.store_block(a, b"x", None)
    c = ledger.execute(a.header, [], GENESIS_TS + 2)
    with pytest.raises(Exception, match="final height 3 outside"):
        ledger.store.commit_block(2, c.raw, [], c.writes, commit=b"y", final=3)
    assert ledger.store.tip_height() == 1  # nothing of the refused write was stored
    ledger.store.close()


def test_the_stored_tree_agrees_with_every_record_and_a_reader_keeps_its_version(tmp_path: Path) -> None:
    """The tree's nodes are stored with each block: after appends, a replaced tip and a reopen, its root is the
    one recomputed from every record (check()), and a read transaction opened before a block proves against the
    tree of its own tip (the cache of newer nodes is not used for it)."""
    ledger = _open(tmp_path / "db")
    g = ledger.tip
    assert g is not None
    key = account_key(Keys.pubkey(1))
    with ledger.store.reader() as old:
        for nonce in range(3):
            b = ledger.execute(ledger.tip, [transfer(1, 5 + nonce, 100, nonce)], GENESIS_TS + 1 + nonce)  # type: ignore[arg-type]
            ledger.store_block(b, b"", b.header if nonce < 2 else None)
            assert ledger.check() == b.header.state_root
        load = ledger.store.tree_loader(old)
        proof = prove_stored(load, key, lambda k: bytes(old.get_state(k)))
        assert verify_proof(g.state_root, proof) == bytes(old.get_state(key))
    tip = ledger.tip
    sib = ledger.execute(ledger.final, [transfer(2, 9, 1, 0)], GENESIS_TS + 9)  # type: ignore[arg-type]
    ledger.store_block(sib, b"", None)  # replaces the non-final tip
    assert ledger.tip == sib.header != tip and ledger.check() == sib.header.state_root
    ledger.store.close()
    again = _open(tmp_path / "db")
    assert again.tip == sib.header and again.check() == sib.header.state_root


def test_a_database_of_schema_2_gets_its_tree_nodes_on_open(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "db")
    b = ledger.execute(ledger.tip, [transfer(1, 3, 100, 0)], GENESIS_TS + 1)  # type: ignore[arg-type]
    ledger.commit(b)
    store = ledger.store
    with store.env.begin(write=True) as txn:  # as schema 2 left it: records, no nodes
        txn.drop(store._nodes, delete=False)
        txn.put(b"schema", struct.pack(">Q", 2), db=store._meta)
    store.close()
    again = _open(tmp_path / "db")
    assert again.tip == b.header and again.check() == b.header.state_root


def test_a_stored_tree_that_disagrees_with_the_tip_is_refused_at_open(tmp_path: Path) -> None:
    ledger = _open(tmp_path / "db")
    store = ledger.store
    with store.env.begin(write=True) as txn:
        txn.put(ROOT_REF, b"\x11" * 32, db=store._nodes)
    with pytest.raises(StoreError, match="the database is corrupt"):
        ledger.check()
    store.close()
    with pytest.raises(StoreError, match="stored state tree's root is 1111"):
        _open(tmp_path / "db")


def test_executing_over_a_tip_that_was_replaced_meanwhile_raises_tip_moved(tmp_path: Path) -> None:
    """Blocks execute in a worker thread beside stores: one that began over the old tip, while LMDB already holds
    a newer block, must not build on a mix of the two (TipMoved, then it is executed again)."""
    ledger = _open(tmp_path / "db")
    g = ledger.tip
    assert g is not None
    b = ledger.execute(g, [transfer(1, 3, 100, 0)], GENESIS_TS + 1)
    ledger.store.commit_block(1, b.raw, [], b.writes, tree=b.tree)  # stored, the ledger's tip not yet moved
    with pytest.raises(TipMoved):
        ledger.execute(g, [transfer(2, 3, 5, 0)], GENESIS_TS + 2)
    ledger.tip = b.header
    c = ledger.execute(b.header, [transfer(2, 3, 5, 0)], GENESIS_TS + 2)
    ledger.commit(c)
    assert ledger.check() == c.header.state_root
