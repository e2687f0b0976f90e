"""Authenticated state tree: a hexary Merkle trie over 33-byte keys with single-leaf subtrees collapsed.

Definition (the one every implementation here must agree with; see docs/state-tree.md):
    root({})                    = EMPTY_ROOT
    node(S) for |S| == 1        = H_LEAF(key || value)        (keys are fixed-size, so this is unambiguous)
    node(S) for |S| >= 2 at depth d
                                = H_NODE(bitmap_u16_be || node(S_0) || ... || node(S_15))
where S_i are the keys of S whose nibble d is i, only non-empty S_i are hashed (in nibble order) and
bit i of the bitmap is set for each of them. The root is therefore a function of the key/value set alone.

Three implementations share that definition:
    StateTree     in memory, incremental: only the nodes on changed paths are rehashed; fork() is a copy in O(1)
                  whose changes copy the nodes they touch, so a tree that is only read (the committed state,
                  proved by readers while the next block is built on a fork of it) is never modified;
    RootBuilder   streaming from key-sorted records in O(depth) memory (used by snapshots and l2-verify);
    reference_root  a direct recursive transcription, for tests.
Proofs (inclusion and non-inclusion) come from StateTree.prove and are checked by verify_proof.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Callable, Iterable, Mapping, Optional

from .codec import U16, Reader, write_bytes, write_varint
from .errors import DecodeError, OutOfRange, ProofError, UnknownVersion
from .hashing import EMPTY_ROOT, H_LEAF, H_NODE

KEY_SIZE = 33
NIBBLES = 2 * KEY_SIZE
_BITS = 8 * KEY_SIZE
_SHIFT1 = 4 * NIBBLES  # nibble d of key int k is (k >> (_SHIFT1 - 4 * (d + 1))) & 15
MAX_VALUE = 1 << 16
_BITMAP = [U16.pack(i) for i in range(1 << 16)]  # bitmap -> its 2 encoded bytes

# Leaf: tuple (leaf_hash, key).  Internal node: list [hash|None, bitmap, child_0 .. child_15, owner]: owner is the
# token of the tree (fork) that made it; a tree changes only its own nodes and copies any other it must change.
# The hot paths tell them apart with type(); a precise Union would only add casts, so children are Any.
Leaf = tuple[bytes, bytes]
Node = list[Any]
Child = Any  # Leaf | Node | None


def leaf_hash(key: bytes, value: bytes) -> bytes:
    return H_LEAF(key + value)


def _nib(key: bytes, d: int) -> int:
    b = key[d >> 1]
    return b & 15 if d & 1 else b >> 4


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise OutOfRange(f"state key is {len(key)} bytes, expected {KEY_SIZE}")


def _hash_node(node: Node) -> bytes:
    h = H_NODE(_BITMAP[node[1]] + b"".join([c[0] or _hash_node(c) for c in node[2:18] if c is not None]))
    node[0] = h
    return h


_OWNER = 18


def _split(a: Leaf, b: Leaf, d: int, owner: object) -> Node:
    """A new internal node at depth d holding two leaves that share their first d nibbles."""
    node: Node = [None, 0] + [None] * 16 + [owner]
    na, nb = _nib(a[1], d), _nib(b[1], d)
    if na == nb:
        node[2 + na] = _split(a, b, d + 1, owner)
        node[1] = 1 << na
    else:
        node[2 + na], node[2 + nb] = a, b
        node[1] = (1 << na) | (1 << nb)
    return node


def _delete(node: Node, key: bytes, d: int, owner: object) -> Child:
    """Remove key (present) below node (depth d); returns what replaces node in its parent (node, or its copy
    owned by owner)."""
    if node[_OWNER] is not owner:
        node = node[:_OWNER] + [owner]
    slot = _nib(key, d)
    child = node[2 + slot]
    if type(child) is tuple:
        node[2 + slot] = None
        node[1] &= ~(1 << slot)
    else:
        node[2 + slot] = _delete(child, key, d + 1, owner)
    node[0] = None
    bm = node[1]
    if bm & (bm - 1) == 0:  # one child left: a lone leaf moves up, a lone internal node stays
        only = node[2 + bm.bit_length() - 1]
        if type(only) is tuple:
            return only
    return node


class StateTree:
    """In-memory incremental tree. set/delete mark paths dirty; root() rehashes only dirty nodes."""

    __slots__ = ("_root", "_count", "_owner")

    def __init__(self) -> None:
        self._root: Child = None
        self._count = 0
        self._owner = object()

    def __len__(self) -> int:
        return self._count

    def fork(self) -> "StateTree":
        """A tree equal to this one, sharing its nodes: changing either copies what it changes, so neither sees
        the other's changes. Hash this tree first (root()) if another thread may read it meanwhile."""
        t = StateTree()
        t._root, t._count = self._root, self._count
        self._owner = object()  # the nodes both now share are neither's to change
        return t

    def set(self, key: bytes, value: bytes) -> None:
        _check_key(key)
        self.set_hash(key, leaf_hash(key, value))

    def set_hash(self, key: bytes, lh: bytes) -> None:
        new: Leaf = (lh, key)
        owner = self._owner
        node = self._root
        if node is None:
            self._root = new
            self._count += 1
            return
        if type(node) is tuple:
            if node[1] == key:
                self._root = new
            else:
                self._root = _split(node, new, 0, owner)
                self._count += 1
            return
        if node[18] is not owner:
            node = self._root = node[:18] + [owner]
        d = 0
        while True:
            node[0] = None
            nib = key[d >> 1]
            nib = nib & 15 if d & 1 else nib >> 4
            child = node[2 + nib]
            if child is None:
                node[2 + nib] = new
                node[1] |= 1 << nib
                self._count += 1
                return
            if type(child) is tuple:
                if child[1] == key:
                    node[2 + nib] = new
                else:
                    node[2 + nib] = _split(child, new, d + 1, owner)
                    self._count += 1
                return
            if child[18] is not owner:
                child = node[2 + nib] = child[:18] + [owner]
            node = child
            d += 1

    def delete(self, key: bytes) -> None:
        """Remove key if present (absent keys are a no-op)."""
        _check_key(key)
        node = self._root
        if node is None:
            return
        before = self._count
        if type(node) is tuple:
            if node[1] == key:
                self._root = None
                self._count -= 1
            return
        if self.contains(key):
            self._count = before - 1
            self._root = _delete(node, key, 0, self._owner)

    def contains(self, key: bytes) -> bool:
        node = self._root
        d = 0
        while node is not None:
            if type(node) is tuple:
                return bool(node[1] == key)
            node = node[2 + _nib(key, d)]
            d += 1
        return False

    def root(self) -> bytes:
        node = self._root
        if node is None:
            return EMPTY_ROOT
        h = node[0]
        return h if h is not None else _hash_node(node)

    def prove(self, key: bytes, value_of: Callable[[bytes], bytes]) -> "Proof":
        """Inclusion or non-inclusion proof for key; value_of(k) returns the stored value of a key in the tree."""
        _check_key(key)
        self.root()
        levels: list[tuple[int, tuple[bytes, ...]]] = []
        node = self._root
        d = 0
        while node is not None and type(node) is not tuple:
            slot = _nib(key, d)
            sibs = tuple(c[0] for i, c in enumerate(node[2:18]) if c is not None and i != slot)
            levels.append((node[1], sibs))
            node = node[2 + slot]
            d += 1
        if node is None:
            return Proof(key, ProofKind.ABSENT_EMPTY, b"", b"", b"", tuple(levels))
        if node[1] == key:
            return Proof(key, ProofKind.PRESENT, value_of(key), b"", b"", tuple(levels))
        other = node[1]
        return Proof(key, ProofKind.ABSENT_OTHER, b"", other, value_of(other), tuple(levels))


class RootBuilder:
    """Root of a key-sorted stream of (key, value) in memory bounded by the key length.

    add() raises DecodeError if keys are not strictly increasing (so duplicates and reordering are caught).
    """

    __slots__ = ("_open", "_prev", "_prev_int", "_prev_lh", "_prev_l", "count", "_root")

    def __init__(self) -> None:
        self._open: list[list[Any]] = []  # per depth: [bitmap, parts]
        self._prev: Optional[bytes] = None
        self._prev_int = -1
        self._prev_lh = b""
        self._prev_l = -1
        self.count = 0
        self._root: Optional[bytes] = None

    def add(self, key: bytes, value: bytes) -> None:
        """Feed the next record; keys must be strictly increasing."""
        if len(key) != KEY_SIZE:
            raise OutOfRange(f"record {self.count}: key is {len(key)} bytes, expected {KEY_SIZE}")
        k = int.from_bytes(key, "big")
        if self._prev is not None:
            prev_int = self._prev_int
            if k <= prev_int:
                what = "duplicate key" if k == prev_int else "key out of order"
                raise DecodeError(f"record {self.count}: {what} {key.hex()} (previous {self._prev.hex()})")
            common = (_BITS - (k ^ prev_int).bit_length()) >> 2
            # Inlined _emit(common) for the previous leaf: this loop is the verifier's hot path.
            prev_l = self._prev_l
            depth = (prev_l if prev_l > common else common) + 1
            stack = self._open
            while len(stack) < depth:
                stack.append([0, []])
            top = stack[depth - 1]
            top[0] |= 1 << ((prev_int >> (_SHIFT1 - 4 * depth)) & 15)
            top[1].append(self._prev_lh)
            if len(stack) > common + 1:
                self._close(common + 1, prev_int)
            self._prev_l = common
        self._prev, self._prev_int, self._prev_lh = key, k, H_LEAF(key + value)
        self.count += 1

    def _close(self, keep: int, k: int) -> None:
        """Hash and pop every open node deeper than keep - 1 (k is a key below all of them)."""
        stack = self._open
        while len(stack) > keep:
            bm, parts = stack.pop()
            h = H_NODE(_BITMAP[bm] + b"".join(parts))
            d = len(stack)
            if d == 0:
                self._root = h
            else:
                parent = stack[d - 1]
                parent[0] |= 1 << ((k >> (_SHIFT1 - 4 * d)) & 15)
                parent[1].append(h)

    def _finish(self) -> None:
        k, prev_l = self._prev_int, self._prev_l
        depth = prev_l + 1
        if depth == 0:
            self._root = self._prev_lh
            return
        stack = self._open
        while len(stack) < depth:
            stack.append([0, []])
        top = stack[depth - 1]
        top[0] |= 1 << ((k >> (_SHIFT1 - 4 * depth)) & 15)
        top[1].append(self._prev_lh)
        self._close(0, k)

    def root(self) -> bytes:
        """Finish the stream and return its root (call once)."""
        if self._prev is None:
            return EMPTY_ROOT
        if self._root is None or self._open:
            self._finish()
        assert self._root is not None  # internal invariant, not input validation
        return self._root


def reference_root(items: Mapping[bytes, bytes]) -> bytes:
    """Direct recursive transcription of the definition; slow, for tests only."""

    def node(keys: list[bytes], d: int) -> bytes:
        if len(keys) == 1:
            return leaf_hash(keys[0], items[keys[0]])
        groups: dict[int, list[bytes]] = {}
        for k in keys:
            groups.setdefault(_nib(k, d), []).append(k)
        bitmap = sum(1 << i for i in groups)
        return H_NODE(U16.pack(bitmap) + b"".join(node(groups[i], d + 1) for i in sorted(groups)))

    return node(sorted(items), 0) if items else EMPTY_ROOT


def root_of(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Root of (key, value) pairs in any order."""
    b = RootBuilder()
    for k, v in sorted(items):
        b.add(k, v)
    return b.root()


class ProofKind(IntEnum):
    PRESENT = 0  # key is in the tree with value
    ABSENT_EMPTY = 1  # the key's path ends in an empty slot (or the tree is empty)
    ABSENT_OTHER = 2  # the key's path ends at a leaf holding another key


PROOF_VERSION = 1


@dataclass(frozen=True, slots=True)
class Proof:
    key: bytes
    kind: ProofKind
    value: bytes  # PRESENT only
    other_key: bytes  # ABSENT_OTHER only
    other_value: bytes  # ABSENT_OTHER only
    levels: tuple[tuple[int, tuple[bytes, ...]], ...]  # root first: (bitmap, sibling hashes in nibble order)

    def encode(self) -> bytes:
        out = [bytes((PROOF_VERSION,)), self.key, bytes((self.kind,))]
        if self.kind == ProofKind.PRESENT:
            out.append(write_bytes(self.value))
        elif self.kind == ProofKind.ABSENT_OTHER:
            out += [self.other_key, write_bytes(self.other_value)]
        out.append(write_varint(len(self.levels)))
        for bitmap, sibs in self.levels:
            out.append(U16.pack(bitmap))
            out += sibs
        return b"".join(out)

    @classmethod
    def decode(cls, b: bytes) -> "Proof":
        r = Reader(b, "proof")
        if (v := r.u8()) != PROOF_VERSION:
            raise UnknownVersion(f"proof version {v}")
        key = r.take(KEY_SIZE)
        k = r.u8()
        if k not in (0, 1, 2):
            raise DecodeError(f"proof kind {k}")
        kind = ProofKind(k)
        value = other = ovh = b""
        if kind == ProofKind.PRESENT:
            value = r.var_bytes(MAX_VALUE)
        elif kind == ProofKind.ABSENT_OTHER:
            other, ovh = r.take(KEY_SIZE), r.var_bytes(MAX_VALUE)
        n = r.varint()
        if n > NIBBLES:
            raise OutOfRange(f"proof has {n} levels, keys have only {NIBBLES} nibbles")
        levels = []
        for i in range(n):
            bitmap = r.u16()
            bottom_empty = kind == ProofKind.ABSENT_EMPTY and i == n - 1
            count = bin(bitmap).count("1") - (0 if bottom_empty else 1)
            if count < 0:
                raise DecodeError(f"proof level {i}: empty bitmap")
            levels.append((bitmap, tuple(r.take(32) for _ in range(count))))
        r.end()
        return cls(key, kind, value, other, ovh, tuple(levels))


def verify_proof(root: bytes, proof: Proof) -> Optional[bytes]:
    """Check proof against root: the value if the key is present, None if it is proven absent.

    Raises ProofError naming the first thing that does not hold.
    """
    key, levels = proof.key, proof.levels
    if len(key) != KEY_SIZE:
        raise ProofError(f"key is {len(key)} bytes, expected {KEY_SIZE}")
    n = len(levels)
    if n > NIBBLES:
        raise ProofError(f"proof has {n} levels, keys have only {NIBBLES} nibbles")
    if proof.kind == ProofKind.PRESENT:
        h: Optional[bytes] = leaf_hash(key, proof.value)
    elif proof.kind == ProofKind.ABSENT_OTHER:
        other = proof.other_key
        if len(other) != KEY_SIZE or other == key:
            raise ProofError("non-inclusion leaf must hold a different 33-byte key")
        if any(_nib(other, d) != _nib(key, d) for d in range(n)):
            raise ProofError("non-inclusion leaf is not on the key's path")
        h = leaf_hash(other, proof.other_value)
    else:
        h = None  # the slot at the bottom level is empty
    for d in range(n - 1, -1, -1):
        bitmap, sibs = levels[d]
        slot = _nib(key, d)
        bit = 1 << slot
        if h is None:
            if bitmap & bit:
                raise ProofError(f"level {d}: the key's slot {slot} is occupied, not empty")
            if len(sibs) != bin(bitmap).count("1") or not sibs:
                raise ProofError(f"level {d}: bitmap and sibling count disagree")
            children = list(sibs)
        else:
            if not bitmap & bit:
                raise ProofError(f"level {d}: bitmap lacks the key's slot {slot}")
            if len(sibs) != bin(bitmap).count("1") - 1:
                raise ProofError(f"level {d}: bitmap and sibling count disagree")
            pos = bin(bitmap & (bit - 1)).count("1")
            children = list(sibs[:pos]) + [h] + list(sibs[pos:])
        h = H_NODE(U16.pack(bitmap) + b"".join(children))
    if h is None:
        h = EMPTY_ROOT
    if h != root:
        raise ProofError(f"proof computes root {h.hex()}, expected {root.hex()}")
    return proof.value if proof.kind == ProofKind.PRESENT else None
