"""State tree: three root implementations agree, proofs verify, and no mutated proof verifies a false claim."""
from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2d.core.errors import DecodeError, OutOfRange, ProofError, TrailingBytes, Truncated, UnknownVersion
from l2d.core.hashing import EMPTY_ROOT, tagged_hash
from l2d.core.tree import (KEY_SIZE, NIBBLES, ROOT_REF, NodeBuilder, Proof, ProofKind, RootBuilder, StateTree,
                           TreeChanges, TreeCorrupt, TreeOverlay, path_key, prove_stored, reference_root, root_of,
                           stored_root, verify_proof)

U16 = struct.Struct(">H")


def leaf(k: bytes, v: bytes) -> bytes:
    return tagged_hash("l2d/state/leaf", k + v)


def node(bitmap: int, *children: bytes) -> bytes:
    return tagged_hash("l2d/state/node", U16.pack(bitmap) + b"".join(children))


def key_from_nibbles(nibs: list[int]) -> bytes:
    assert len(nibs) == NIBBLES
    return bytes((nibs[i] << 4) | nibs[i + 1] for i in range(0, NIBBLES, 2))


def nibbles(key: bytes) -> list[int]:
    return [n for b in key for n in (b >> 4, b & 15)]


def variant(base: bytes, depth: int, xor: int, tail: bytes) -> bytes:
    """A key sharing exactly `depth` leading nibbles with base (then a different nibble, then tail)."""
    nibs = nibbles(base)[:depth] + [nibbles(base)[depth] ^ xor]
    rest = nibbles(tail)
    nibs += rest[: NIBBLES - len(nibs)]
    return key_from_nibbles(nibs)


def h33(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest() + b"\x5a"


BASES = [b"\0" * 33, b"\xff" * 33, h33("base")]

keys_st = st.one_of(
    st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE),
    st.builds(variant, st.sampled_from(BASES), st.integers(0, NIBBLES - 1), st.integers(1, 15),
              st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE)),
    st.sampled_from(BASES),
)
values_st = st.binary(max_size=40)


def build(model: dict[bytes, bytes]) -> StateTree:
    t = StateTree()
    for k, v in model.items():
        t.set(k, v)
    return t


def streamed_root(model: dict[bytes, bytes]) -> bytes:
    b = RootBuilder()
    for k in sorted(model):
        b.add(k, model[k])
    assert b.count == len(model)
    return b.root()


def check_all_roots(tree: StateTree, model: dict[bytes, bytes]) -> bytes:
    r = reference_root(model)
    assert tree.root() == r
    assert root_of(model.items()) == r
    assert streamed_root(model) == r
    assert len(tree) == len(model)
    return r


# ---------------------------------------------------------------------------------------------- definition


def test_empty_tree() -> None:
    assert EMPTY_ROOT == tagged_hash("l2d/state/empty", b"")
    assert StateTree().root() == EMPTY_ROOT == reference_root({}) == root_of([]) == RootBuilder().root()
    t = StateTree()
    p = t.prove(b"\x01" * 33, lambda k: pytest.fail("no value lookups in an empty tree"))
    assert p.kind == ProofKind.ABSENT_EMPTY and p.levels == ()
    assert p.encode() == b"\x01" + b"\x01" * 33 + b"\x01" + b"\x00"
    assert verify_proof(EMPTY_ROOT, Proof.decode(p.encode())) is None
    with pytest.raises(ProofError):
        verify_proof(leaf(b"\x01" * 33, b""), p)


def test_single_key_root_is_its_leaf() -> None:
    k, v = h33("one"), b"value"
    t = build({k: v})
    assert check_all_roots(t, {k: v}) == leaf(k, v)
    assert verify_proof(t.root(), t.prove(k, {k: v}.__getitem__)) == v
    other = t.prove(b"\x07" * 33, {k: v}.__getitem__)
    assert other.kind == ProofKind.ABSENT_OTHER and other.other_key == k and other.levels == ()
    assert verify_proof(t.root(), other) is None


def test_two_keys_hand_computed() -> None:
    a = bytes.fromhex("3a") + b"\x11" * 32  # nibble 0 = 3
    b = bytes.fromhex("c0") + b"\x22" * 32  # nibble 0 = 12
    model = {b: b"B", a: b"A"}
    assert check_all_roots(build(model), model) == node((1 << 3) | (1 << 12), leaf(a, b"A"), leaf(b, b"B"))
    # sharing the first nibble: a chain node at depth 0 with one child
    c = bytes.fromhex("3b") + b"\x33" * 32  # nibbles 3, 11
    model = {c: b"C", a: b"A"}
    inner = node((1 << 10) | (1 << 11), leaf(a, b"A"), leaf(c, b"C"))
    assert check_all_roots(build(model), model) == node(1 << 3, inner)


def test_keys_differing_only_in_last_nibble() -> None:
    a, b = b"\0" * 33, b"\0" * 32 + b"\x01"
    model = {a: b"", b: b"x"}
    expected = node(0b11, leaf(a, b""), leaf(b, b"x"))
    for _ in range(NIBBLES - 1):
        expected = node(1, expected)
    assert check_all_roots(build(model), model) == expected
    p = build(model).prove(b, model.__getitem__)
    assert len(p.levels) == NIBBLES
    assert verify_proof(expected, Proof.decode(p.encode())) == b"x"


def test_set_rejects_wrong_key_size() -> None:
    t = StateTree()
    for k in (b"", b"\0" * 32, b"\0" * 34):
        with pytest.raises(OutOfRange):
            t.set(k, b"v")
        with pytest.raises(OutOfRange):
            t.delete(k)
        with pytest.raises(OutOfRange):
            t.prove(k, lambda _: b"")
    assert t.root() == EMPTY_ROOT and len(t) == 0


def test_root_builder_rejects_duplicates_order_and_size() -> None:
    a, b = b"\x01" * 33, b"\x02" * 33
    rb = RootBuilder()
    rb.add(a, b"1")
    with pytest.raises(DecodeError, match="duplicate"):
        rb.add(a, b"1")
    rb = RootBuilder()
    rb.add(b, b"2")
    with pytest.raises(DecodeError, match="out of order"):
        rb.add(a, b"1")
    with pytest.raises(OutOfRange):
        RootBuilder().add(b"\x01" * 32, b"")
    rb = RootBuilder()
    rb.add(a, b"1")
    rb.add(b, b"2")
    assert rb.root() == rb.root() == reference_root({a: b"1", b: b"2"})


def test_delete_to_empty_and_absent_delete_is_noop() -> None:
    model = {h33(f"k{i}"): bytes([i]) for i in range(20)}
    t = build(model)
    before = t.root()
    t.delete(h33("absent"))
    assert t.root() == before and len(t) == 20
    for k in list(model):
        t.delete(k)
        del model[k]
        check_all_roots(t, model)
    assert t.root() == EMPTY_ROOT and len(t) == 0
    t.delete(h33("k0"))
    assert t.root() == EMPTY_ROOT


# ---------------------------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_incremental_root_matches_reference_after_random_ops(data: st.DataObject) -> None:
    model: dict[bytes, bytes] = {}
    touched: set[bytes] = set()
    eager, lazy = StateTree(), StateTree()
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["set", "set", "update", "delete", "delete-absent"]))
        if op in ("update", "delete") and model:
            k = data.draw(st.sampled_from(sorted(model)))
        else:
            k = data.draw(keys_st)
        touched.add(k)
        if op.startswith("delete"):
            model.pop(k, None)
            eager.delete(k)
            lazy.delete(k)
        else:
            v = data.draw(values_st)
            model[k] = v
            eager.set(k, v)
            lazy.set(k, v)
        assert eager.root() == reference_root(model)
        assert eager.contains(k) is (k in model)
    root = check_all_roots(lazy, model)
    assert all(lazy.contains(k) for k in model)
    # proofs stay valid on a tree shaped by deletions (collapsed leaves, one-child chains)
    for k in set(model) | touched:
        assert verify_proof(root, Proof.decode(lazy.prove(k, model.__getitem__).encode())) == model.get(k)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(keys_st, values_st, min_size=1, max_size=25), st.lists(keys_st, max_size=8))
def test_every_proof_verifies(model: dict[bytes, bytes], probes: list[bytes]) -> None:
    t = build(model)
    root = t.root()
    for k, v in model.items():
        p = t.prove(k, model.__getitem__)
        assert p.kind == ProofKind.PRESENT
        dec = Proof.decode(p.encode())
        assert dec == p and dec.encode() == p.encode()
        assert verify_proof(root, dec) == v
    for k in probes:
        p = t.prove(k, model.__getitem__)
        if k in model:
            assert verify_proof(root, p) == model[k]
            continue
        assert p.kind in (ProofKind.ABSENT_EMPTY, ProofKind.ABSENT_OTHER)
        if p.kind == ProofKind.ABSENT_OTHER:
            assert p.other_key in model and p.other_value == model[p.other_key]
        assert verify_proof(root, Proof.decode(p.encode())) is None


# A fixed tree with clustered keys, so that proofs have several levels and every kind occurs.
def _fixed_model() -> dict[bytes, bytes]:
    m = {h33(f"fixed {i}"): b"v%d" % i for i in range(30)}
    base = h33("fixed 0")
    for d in (1, 2, 9, 40, 65):
        m[variant(base, d, 5, h33(f"tail {d}"))] = b"deep %d" % d
    return m


MODEL = _fixed_model()
TREE = build(MODEL)
ROOT = TREE.root()
DEEP = variant(h33("fixed 0"), 40, 5, h33("tail 40"))  # shares 40 nibbles with "fixed 0"


def _absent_empty_key() -> bytes:
    # the root has some unused nibble slot; a key starting there lands on an empty slot
    bitmap = TREE.prove(DEEP, MODEL.__getitem__).levels[0][0]
    free = next(i for i in range(16) if not bitmap >> i & 1)
    return bytes((free << 4,)) + b"\x99" * 32


def _absent_deep_empty_key() -> bytes:
    # DEEP and "fixed 0" split at depth 40 (nibble 40 differs by xor 5); this key takes a third slot there
    return variant(DEEP, 40, 3, b"\x77" * 33)


def _absent_other_key() -> bytes:
    return variant(DEEP, 50, 1, b"\x42" * 33)  # its path ends at DEEP's leaf


PROOF_CASES = {
    "present-deep": (DEEP, ProofKind.PRESENT),
    "present-shallow": (h33("fixed 7"), ProofKind.PRESENT),
    "absent-empty-top": (_absent_empty_key(), ProofKind.ABSENT_EMPTY),
    "absent-empty-deep": (_absent_deep_empty_key(), ProofKind.ABSENT_EMPTY),
    "absent-other": (_absent_other_key(), ProofKind.ABSENT_OTHER),
}


@pytest.mark.parametrize("name", PROOF_CASES)
def test_proof_kinds(name: str) -> None:
    key, kind = PROOF_CASES[name]
    p = TREE.prove(key, MODEL.__getitem__)
    assert p.kind == kind
    assert verify_proof(ROOT, Proof.decode(p.encode())) == MODEL.get(key)
    if kind == ProofKind.ABSENT_OTHER:
        assert p.other_key == DEEP and p.other_value == MODEL[DEEP]
    if name.endswith("deep"):
        assert len(p.levels) >= 41


@pytest.mark.parametrize("name", PROOF_CASES)
def test_wrong_root_fails(name: str) -> None:
    key, _ = PROOF_CASES[name]
    p = TREE.prove(key, MODEL.__getitem__)
    for root in (EMPTY_ROOT, b"\0" * 32, bytes(a ^ 1 if i == 0 else a for i, a in enumerate(ROOT))):
        with pytest.raises(ProofError):
            verify_proof(root, p)
    changed = dict(MODEL)
    changed[h33("fixed 3")] = b"changed"
    with pytest.raises(ProofError):
        verify_proof(build(changed).root(), p)


def _mutation_cases() -> dict[str, tuple[StateTree, dict[bytes, bytes], bytes]]:
    single = {h33("only"): b"only value"}
    cases = {n: (TREE, MODEL, k) for n, (k, _) in PROOF_CASES.items()}
    cases["single-present"] = (build(single), single, h33("only"))
    cases["single-absent-other"] = (build(single), single, b"\x10" * 33)
    cases["empty-absent"] = (StateTree(), {}, b"\x10" * 33)
    return cases


MUTATION_CASES = _mutation_cases()


@pytest.mark.parametrize("name", MUTATION_CASES)
def test_no_mutated_proof_verifies_a_false_claim(name: str) -> None:
    tree, model, key = MUTATION_CASES[name]
    root = tree.root()
    proof = tree.prove(key, model.__getitem__)
    raw = proof.encode()
    truth = model.get(key)
    assert verify_proof(root, Proof.decode(raw)) == truth
    value_span = range(0)
    if proof.kind == ProofKind.PRESENT:
        start = 1 + KEY_SIZE + 1
        value_span = range(start, start + 1 + len(proof.value))
    rejected = verified = 0
    for i in range(len(raw)):
        for mask in (0x01, 0x10, 0x80, 0xFF):
            m = bytearray(raw)
            m[i] ^= mask
            mutated = bytes(m)
            try:
                p = Proof.decode(mutated)
                assert p.encode() == mutated  # decoding is canonical
                got = verify_proof(root, p)
            except (DecodeError, ProofError):
                rejected += 1
                continue
            verified += 1
            # Whatever still verifies must be a true statement about the tree: only the key bytes below the
            # proof's depth of an absence proof can change, naming another key that is absent just the same.
            assert i not in value_span, f"mutated value byte {i} verified"
            assert p.kind == proof.kind != ProofKind.PRESENT
            assert p.key != key and got is None and p.key not in model
            assert got == model.get(p.key)
    assert rejected > 0
    if proof.kind == ProofKind.PRESENT:
        assert verified == 0


def test_proof_decode_strictness() -> None:
    p = TREE.prove(DEEP, MODEL.__getitem__)
    raw = p.encode()
    with pytest.raises(TrailingBytes):
        Proof.decode(raw + b"\0")
    for version in (0, 2, 255):
        with pytest.raises(UnknownVersion):
            Proof.decode(bytes((version,)) + raw[1:])
    with pytest.raises(DecodeError):
        Proof.decode(raw[:34] + b"\x03" + raw[35:])  # unknown kind
    for cut in range(len(raw)):
        with pytest.raises(Truncated):
            Proof.decode(raw[:cut])


def test_proof_decode_level_limit() -> None:
    k = b"\0" * 33
    head = b"\x01" + k + bytes((ProofKind.ABSENT_EMPTY,))
    with pytest.raises(OutOfRange):
        Proof.decode(head + bytes((NIBBLES + 1,)))
    with pytest.raises(OutOfRange):
        Proof.decode(head + b"\xfd\x00\x01")
    # the limit itself is allowed: 66 levels (65 one-child levels, then an empty slot beside one sibling)
    levels = U16.pack(1) * 65 + U16.pack(0b10) + b"\xab" * 32
    Proof.decode(head + bytes((NIBBLES,)) + levels)


def test_proof_decode_rejects_empty_bitmap_above_the_bottom() -> None:
    k = b"\0" * 33
    raw = b"\x01" + k + bytes((ProofKind.PRESENT,)) + b"\x00" + b"\x01" + U16.pack(0)
    with pytest.raises(DecodeError):
        Proof.decode(raw)
    # an empty bitmap at the bottom of an absence proof decodes but cannot verify
    raw = b"\x01" + k + bytes((ProofKind.ABSENT_EMPTY,)) + b"\x01" + U16.pack(0)
    with pytest.raises(ProofError):
        verify_proof(EMPTY_ROOT, Proof.decode(raw))


def test_verify_rejects_inconsistent_proof_objects() -> None:
    p = TREE.prove(_absent_other_key(), MODEL.__getitem__)
    same = Proof(p.key, p.kind, b"", p.key, MODEL[DEEP], p.levels)
    with pytest.raises(ProofError):
        verify_proof(ROOT, same)  # the "other" leaf holds the key itself
    off_path = Proof(p.key, p.kind, b"", h33("fixed 9"), MODEL[h33("fixed 9")], p.levels)
    with pytest.raises(ProofError):
        verify_proof(ROOT, off_path)
    with pytest.raises(ProofError):
        verify_proof(ROOT, Proof(p.key[:32], p.kind, b"", p.other_key, p.other_value, p.levels))
    # a present proof relabelled as absent-empty, and vice versa
    q = TREE.prove(DEEP, MODEL.__getitem__)
    with pytest.raises(ProofError):
        verify_proof(ROOT, Proof(q.key, ProofKind.ABSENT_EMPTY, b"", b"", b"", q.levels))
    e = TREE.prove(_absent_empty_key(), MODEL.__getitem__)
    with pytest.raises(ProofError):
        verify_proof(ROOT, Proof(e.key, ProofKind.PRESENT, b"", b"", b"", e.levels))


def test_verify_proof_with_too_many_levels_raises_proof_error() -> None:
    levels = tuple((1, ()) for _ in range(NIBBLES + 1))
    for kind in (ProofKind.PRESENT, ProofKind.ABSENT_OTHER):
        with pytest.raises(ProofError):
            verify_proof(ROOT, Proof(b"\0" * 33, kind, b"", b"\x01" * 33, b"", levels))


def test_stale_proof_fails_after_update() -> None:
    model = dict(MODEL)
    t = build(model)
    p = t.prove(DEEP, model.__getitem__)
    model[DEEP] = b"new value"
    t.set(DEEP, b"new value")
    with pytest.raises(ProofError):
        verify_proof(t.root(), p)
    assert verify_proof(t.root(), t.prove(DEEP, model.__getitem__)) == b"new value"


def test_value_of_is_only_asked_for_the_leaf_on_the_path() -> None:
    asked: list[bytes] = []

    def value_of(k: bytes) -> bytes:
        asked.append(k)
        return MODEL[k]

    TREE.prove(_absent_empty_key(), value_of)
    assert asked == []
    TREE.prove(_absent_other_key(), value_of)
    assert asked == [DEEP]



@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PROOF_CASES)), st.data())
def test_decode_of_mutated_proofs_is_strict_and_canonical(name: str, data: st.DataObject) -> None:
    raw = bytearray(TREE.prove(PROOF_CASES[name][0], MODEL.__getitem__).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[i] = data.draw(st.integers(0, 255))
        else:
            raw[i:i + data.draw(st.integers(0, 40))] = data.draw(st.binary(max_size=40))
        if not raw:
            raw = bytearray(b"\x01")
    try:
        p = Proof.decode(bytes(raw))
    except DecodeError:
        return
    assert p.encode() == bytes(raw)
    try:
        got = verify_proof(ROOT, p)
    except ProofError:
        return
    assert got == MODEL.get(p.key)


ops_st = st.lists(st.tuples(keys_st, st.one_of(st.none(), values_st)), max_size=30)


def _store_changes(store: dict[bytes, bytes], ch: TreeChanges) -> None:
    for p in ch.deletes:
        store.pop(p, None)
    store.update(ch.puts)
    if ch.root_ref:
        store[ROOT_REF] = ch.root_ref
    else:
        store.pop(ROOT_REF, None)


def _bulk(model: dict[bytes, bytes]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    b = NodeBuilder(out.__setitem__)
    for k in sorted(model):
        b.add(k, leaf(k, model[k]))
    ref = b.finish()
    if ref:
        out[ROOT_REF] = ref
    return out


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys_st, values_st, max_size=30), st.lists(ops_st, min_size=1, max_size=4))
def test_the_stored_tree_matches_the_reference_block_after_block(
        base: dict[bytes, bytes], blocks: list[list[tuple[bytes, bytes | None]]]) -> None:
    """Blocks of changes applied through TreeOverlay to a stored tree: after each, the root is the reference's,
    the stored nodes are exactly those a bulk load of the same records writes (nothing stale is left), and every
    proof is StateTree's, byte for byte."""
    store = _bulk(base)
    model = dict(base)
    assert stored_root(store.get) == reference_root(model)
    for ops in blocks:
        overlay = TreeOverlay(store.get)
        for k, v in ops:
            if v is None:
                overlay.delete(k)
                model.pop(k, None)
            else:
                overlay.set(k, v)
                model[k] = v
        root = overlay.root()
        assert root == reference_root(model)
        _store_changes(store, overlay.changes())
        assert store == _bulk(model) and stored_root(store.get) == root
    tree = build(model)
    for k in list(model)[:6] + [k for ops in blocks for k, _ in ops[:3]]:
        proof = prove_stored(store.get, k, model.__getitem__)
        assert proof == tree.prove(k, model.__getitem__)
        assert verify_proof(tree.root(), proof) == model.get(k)


def test_a_missing_or_malformed_stored_node_is_tree_corrupt() -> None:
    model = {h33(str(i)): b"v" for i in range(40)}
    store = _bulk(model)
    key = sorted(model)[7]
    deepest = [path_key(key, d) for d in range(NIBBLES) if path_key(key, d) in store][-1]
    for broken in ({**store, deepest: store[deepest][:-1]}, {k: v for k, v in store.items() if k != deepest},
                   {**store, ROOT_REF: b"\1" * 5}):
        with pytest.raises(TreeCorrupt):
            prove_stored(broken.get, key, model.__getitem__)
        with pytest.raises(TreeCorrupt):
            overlay = TreeOverlay(broken.get)
            overlay.set(key, b"w")
            overlay.root()
