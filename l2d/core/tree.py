"""Authenticated state tree: a hexary Merkle trie over 33-byte keys with single-leaf subtrees collapsed.

Definition (the one every implementation here must agree with; see docs/state-tree.md):
    root({})                    = EMPTY_ROOT
    node(S) for |S| == 1        = H_LEAF(key || value)        (keys are fixed-size, so this is unambiguous)
    node(S) for |S| >= 2 at depth d
                                = H_NODE(bitmap_u16_be || node(S_0) || ... || node(S_15))
where S_i are the keys of S whose nibble d is i, only non-empty S_i are hashed (in nibble order) and
bit i of the bitmap is set for each of them. The root is therefore a function of the key/value set alone.

Four implementations share that definition:
    TreeOverlay   over the stored tree (one record per inner node, keyed by its path, in the daemon's LMDB): only
                  the nodes on changed paths are read, rehashed and written back; NodeBuilder bulk-loads it;
    StateTree     in memory, incremental (the reference the stored tree is tested against; vectors, benchmarks);
    RootBuilder   streaming from key-sorted records in O(depth) memory (used by snapshots and l2-verify);
    reference_root  a direct recursive transcription, for tests.
Proofs (inclusion and non-inclusion) come from prove_stored / StateTree.prove and are checked by verify_proof.
"""
from __future__ import annotations

import struct
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

# Leaf: tuple (leaf_hash, key).  Internal node: list [hash|None, bitmap, child_0 .. child_15].
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
    h = H_NODE(_BITMAP[node[1]] + b"".join([c[0] or _hash_node(c) for c in node[2:] if c is not None]))
    node[0] = h
    return h


def _split(a: Leaf, b: Leaf, d: int) -> Node:
    """A new internal node at depth d holding two leaves that share their first d nibbles."""
    node: Node = [None, 0] + [None] * 16
    na, nb = _nib(a[1], d), _nib(b[1], d)
    if na == nb:
        node[2 + na] = _split(a, b, d + 1)
        node[1] = 1 << na
    else:
        node[2 + na], node[2 + nb] = a, b
        node[1] = (1 << na) | (1 << nb)
    return node


def _delete(node: Node, key: bytes, d: int) -> Child:
    """Remove key below node (depth d); returns what replaces node in its parent."""
    slot = _nib(key, d)
    child = node[2 + slot]
    if child is None:
        return node
    if type(child) is tuple:
        if child[1] != key:
            return node
        node[2 + slot] = None
        node[1] &= ~(1 << slot)
    else:
        node[2 + slot] = _delete(child, key, d + 1)
    node[0] = None
    bm = node[1]
    if bm & (bm - 1) == 0:  # one child left: a lone leaf moves up, a lone internal node stays
        only = node[2 + bm.bit_length() - 1]
        if type(only) is tuple:
            return only
    return node


class StateTree:
    """In-memory incremental tree. set/delete mark paths dirty; root() rehashes only dirty nodes."""

    __slots__ = ("_root", "_count")

    def __init__(self) -> None:
        self._root: Child = None
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def set(self, key: bytes, value: bytes) -> None:
        _check_key(key)
        self.set_hash(key, leaf_hash(key, value))

    def set_hash(self, key: bytes, lh: bytes) -> None:
        new: Leaf = (lh, key)
        node = self._root
        if node is None:
            self._root = new
            self._count += 1
            return
        if type(node) is tuple:
            if node[1] == key:
                self._root = new
            else:
                self._root = _split(node, new, 0)
                self._count += 1
            return
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
                    node[2 + nib] = _split(child, new, d + 1)
                    self._count += 1
                return
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
            self._root = _delete(node, key, 0)

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
            sibs = tuple(c[0] for i, c in enumerate(node[2:]) if c is not None and i != slot)
            levels.append((node[1], sibs))
            node = node[2 + slot]
            d += 1
        return _proof(key, node, levels, value_of)


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


def _proof(key: bytes, end: Optional[Leaf], levels: list[tuple[int, tuple[bytes, ...]]],
           value_of: Callable[[bytes], bytes]) -> Proof:
    """The proof for key whose path (levels) ends at `end`: an empty slot, key's leaf or another key's leaf."""
    if end is None:
        return Proof(key, ProofKind.ABSENT_EMPTY, b"", b"", b"", tuple(levels))
    if end[1] == key:
        return Proof(key, ProofKind.PRESENT, value_of(key), b"", b"", tuple(levels))
    return Proof(key, ProofKind.ABSENT_OTHER, b"", end[1], value_of(end[1]), tuple(levels))


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


# -- the stored tree -------------------------------------------------------------------------------------------
# The same tree kept as one record per inner node in a key-value store (the daemon's LMDB), keyed by the node's
# path, so a node holds only the current version of the tree: a change overwrites the nodes on its path and
# deletes the ones it collapses (readers of an older version keep it through the store's own snapshots, LMDB's
# MVCC). Layout (docs/state-tree.md, "Stored tree"):
#   path key   packed nibbles of the path (ceil(d/2) bytes, an odd path's last low nibble 0) || depth u8
#   node       bitmap u16 | leafmask u16 | child hash (32) per bitmap bit | key (33) per leafmask bit
#   ROOT_REF   absent: empty tree | root hash (32): an inner node at ROOT_PATH | leaf hash || key (65): one leaf
ROOT_PATH = b"\x00"
ROOT_REF = b"root"  # its last byte (116) is no depth (<= 65), so it is no path key
_U16x2 = struct.Struct(">HH")
_DIRTY = b""  # in a decoded node: an inner child changed since it was last hashed
Load = Callable[[bytes], Optional[bytes]]


class TreeCorrupt(Exception):
    """A stored node the tree refers to is missing or malformed."""


def path_key(key: bytes, d: int) -> bytes:
    """The path key of the node at depth d on key's path."""
    h = d >> 1
    return key[:h] + (bytes((key[h] & 0xF0, d)) if d & 1 else bytes((d,)))


def _child_path(path: bytes, slot: int) -> bytes:
    d = path[-1]
    if d & 1:
        return path[:-2] + bytes((path[-2] | slot, d + 1))
    return path[:-1] + bytes((slot << 4, d + 1))


def decode_node(enc: bytes) -> list[Any]:
    """A stored node as 16 slots: None, a leaf (hash, key), or an inner child's hash."""
    try:
        bm, lm = _U16x2.unpack_from(enc)
    except struct.error:
        raise TreeCorrupt("stored node shorter than its bitmaps") from None
    slots: list[Any] = [None] * 16
    hi, ki = 4, 4 + 32 * bin(bm).count("1")
    if lm & ~bm or not bm or len(enc) != ki + KEY_SIZE * bin(lm).count("1"):
        raise TreeCorrupt(f"stored node of {len(enc)} bytes disagrees with its bitmaps {bm:04x}/{lm:04x}")
    for i in range(16):
        if bm >> i & 1:
            if lm >> i & 1:
                slots[i] = (enc[hi:hi + 32], enc[ki:ki + KEY_SIZE])
                ki += KEY_SIZE
            else:
                slots[i] = enc[hi:hi + 32]
            hi += 32
    return slots


def encode_node(slots: list[Any]) -> tuple[bytes, bytes]:
    """(stored bytes, hash) of a node whose slots are all hashed."""
    bm = lm = 0
    hs: list[bytes] = []
    ks: list[bytes] = []
    for i in range(16):
        c = slots[i]
        if c is None:
            continue
        bm |= 1 << i
        if type(c) is tuple:
            lm |= 1 << i
            hs.append(c[0])
            ks.append(c[1])
        else:
            hs.append(c)
    body = b"".join(hs)
    b = _BITMAP[bm]
    return b + _BITMAP[lm] + body + b"".join(ks), H_NODE(b + body)


def _decode_ref(ref: Optional[bytes]) -> Child:
    if not ref:
        return None
    if len(ref) == 32:
        return bytes(ref)
    if len(ref) == 32 + KEY_SIZE:
        return (bytes(ref[:32]), bytes(ref[32:]))
    raise TreeCorrupt(f"stored root reference of {len(ref)} bytes")


def stored_root(load: Load) -> bytes:
    """The root of a stored tree."""
    ref = _decode_ref(load(ROOT_REF))
    return EMPTY_ROOT if ref is None else ref[0] if type(ref) is tuple else ref


def _check_node(enc: bytes, path: bytes) -> bytes:
    if len(enc) >= 4:
        bm, lm = _U16x2.unpack_from(enc)
        if bm and not lm & ~bm and len(enc) == 4 + 32 * bm.bit_count() + KEY_SIZE * lm.bit_count():
            return enc
    raise TreeCorrupt(f"stored node at path {path.hex()} ({len(enc)} bytes) disagrees with its bitmaps")


class TreeOverlay:
    """Changes to a stored tree, kept in memory until written: set/delete load the nodes on their paths through
    load(path key), root() rehashes what changed, changes() is what to write so the store holds the new tree.

    A changed node is kept in its stored form (a bytearray) with a mask of its inner children that changed: a new
    leaf hash or child hash is patched in place and the node's hash is H_NODE over its own bytes, so the common
    change (a record's value) neither decodes nor re-encodes a node. Keys set in key order share the walk down
    the nodes their paths share (the previous key's path is kept until a delete)."""

    __slots__ = ("_load", "_nodes", "_ref", "_puts", "_deleted", "_last", "_walk")

    def __init__(self, load: Load) -> None:
        self._load = load
        self._nodes: dict[bytes, list[Any]] = {}  # path key -> [node bytes (bytearray), mask of changed children]
        self._ref: Any = _decode_ref(load(ROOT_REF))
        self._puts: dict[bytes, bytes] = {}
        self._deleted: set[bytes] = set()
        self._last = b""  # the key set last, and the inner nodes its walk passed, by depth
        self._walk: list[list[Any]] = []

    def _node(self, path: bytes) -> list[Any]:
        n = self._nodes.get(path)
        if n is None:
            enc = self._load(path)
            if enc is None:
                raise TreeCorrupt(f"stored tree lacks the node at path {path.hex()}")
            n = self._nodes[path] = [bytearray(_check_node(enc, path)), 0]
        return n

    def set(self, key: bytes, value: bytes) -> None:
        _check_key(key)
        self.set_hash(key, leaf_hash(key, value))

    def set_hash(self, key: bytes, lh: bytes) -> None:
        ref = self._ref
        if ref is None or (type(ref) is tuple and ref[1] == key):
            self._ref = (lh, key)
            return
        self._ref = _DIRTY
        if type(ref) is tuple:
            self._split(ref, (lh, key), 0)
            return
        walk = self._walk
        if walk:  # resume at the deepest node this key's path shares with the last key's
            common = (_BITS - (int.from_bytes(key, "big") ^ int.from_bytes(self._last, "big")).bit_length()) >> 2
            d = min(common, len(walk) - 1)
            del walk[d + 1:]
            node = walk[d]
        else:
            d = 0
            node = self._node(ROOT_PATH)
            walk.append(node)
        self._last = key
        nodes = self._nodes
        while True:
            enc = node[0]
            bm = enc[0] << 8 | enc[1]
            lm = enc[2] << 8 | enc[3]
            slot = key[d >> 1]
            slot = slot & 15 if d & 1 else slot >> 4
            bit = 1 << slot
            hpos = 4 + 32 * (bm & (bit - 1)).bit_count()
            if not bm & bit:  # an empty slot: the new leaf goes there
                kpos = 4 + 32 * bm.bit_count() + KEY_SIZE * (lm & (bit - 1)).bit_count()
                enc[kpos:kpos] = key  # keys follow the hashes: insert it first, then the hash before it
                enc[hpos:hpos] = lh
                enc[0:4] = _BITMAP[bm | bit] + _BITMAP[lm | bit]
                return
            if not lm & bit:  # an inner child: on down
                node[1] |= bit
                d += 1
                path = path_key(key, d)
                node = nodes.get(path) or self._node(path)
                walk.append(node)
                continue
            kpos = 4 + 32 * bm.bit_count() + KEY_SIZE * (lm & (bit - 1)).bit_count()
            other = bytes(enc[kpos:kpos + KEY_SIZE])
            if other == key:
                enc[hpos:hpos + 32] = lh
                return
            # another key's leaf: the slot becomes an inner node holding both
            old = (bytes(enc[hpos:hpos + 32]), other)
            del enc[kpos:kpos + KEY_SIZE]
            enc[2:4] = _BITMAP[lm & ~bit]
            node[1] |= bit
            self._split(old, (lh, key), d + 1)
            return

    def _split(self, a: Leaf, b: Leaf, d: int) -> None:
        """New inner nodes from depth d down, holding two leaves that share their first d nibbles."""
        while True:
            path = path_key(b[1], d)
            self._deleted.discard(path)
            na, nb = _nib(a[1], d), _nib(b[1], d)
            if na != nb:
                lo, hi = (a, b) if na < nb else (b, a)
                bits = (1 << na) | (1 << nb)
                self._nodes[path] = [bytearray(_BITMAP[bits] + _BITMAP[bits] + lo[0] + hi[0] + lo[1] + hi[1]), 0]
                return
            bit = 1 << na
            self._nodes[path] = [bytearray(_BITMAP[bit] + _BITMAP[0] + bytes(32)), bit]
            d += 1

    def delete(self, key: bytes) -> None:
        """Remove key if present (absent keys are a no-op)."""
        _check_key(key)
        self._walk.clear()  # a delete may remove nodes on the last walk
        ref = self._ref
        if type(ref) is tuple or ref is None:
            if ref is not None and ref[1] == key:
                self._ref = None
            return
        stack: list[tuple[bytes, list[Any], int]] = []
        path, d = ROOT_PATH, 0
        while True:  # find the key's leaf first: an absent key changes nothing
            node = self._node(path)
            enc = node[0]
            bm, lm = _U16x2.unpack_from(enc)
            slot = _nib(key, d)
            bit = 1 << slot
            if not bm & bit:
                return
            stack.append((path, node, slot))
            if lm & bit:
                kpos = 4 + 32 * bm.bit_count() + KEY_SIZE * (lm & (bit - 1)).bit_count()
                if enc[kpos:kpos + KEY_SIZE] != key:
                    return
                break
            d += 1
            path = path_key(key, d)
        self._ref = _DIRTY
        for _, n, s in stack[:-1]:
            n[1] |= 1 << s
        path, node, slot = stack.pop()
        leaf: Optional[Leaf] = None  # what replaces the child at `slot`: nothing, or a leaf moving up
        while True:
            enc = node[0]
            bm, lm = _U16x2.unpack_from(enc)
            bit = 1 << slot
            hpos = 4 + 32 * (bm & (bit - 1)).bit_count()
            if leaf is None:  # remove the child
                kpos = 4 + 32 * bm.bit_count() + KEY_SIZE * (lm & (bit - 1)).bit_count()
                if lm & bit:
                    del enc[kpos:kpos + KEY_SIZE]
                del enc[hpos:hpos + 32]
                bm, lm = bm & ~bit, lm & ~bit
            else:  # the inner child at slot became a leaf
                kpos = 4 + 32 * bm.bit_count() + KEY_SIZE * (lm & (bit - 1)).bit_count()
                enc[kpos:kpos] = leaf[1]
                enc[hpos:hpos + 32] = leaf[0]
                lm |= bit
            enc[0:4] = _BITMAP[bm] + _BITMAP[lm]
            node[1] &= ~bit
            if bm.bit_count() != 1 or lm != bm:
                return  # the node stays (a lone inner child keeps its node too)
            leaf = (bytes(enc[4:36]), bytes(enc[36:36 + KEY_SIZE]))  # one leaf left: it moves up
            del self._nodes[path]
            self._puts.pop(path, None)
            self._deleted.add(path)
            if not stack:
                self._ref = leaf
                return
            path, node, slot = stack.pop()

    def root(self) -> bytes:
        ref = self._ref
        if ref is None:
            return EMPTY_ROOT
        if ref is _DIRTY:
            ref = self._ref = self._hash(ROOT_PATH)
        return ref[0] if type(ref) is tuple else ref  # type: ignore[no-any-return]

    def _hash(self, path: bytes) -> bytes:
        node = self._nodes[path]
        enc, dirty = node
        bm = enc[0] << 8 | enc[1]
        while dirty:
            bit = dirty & -dirty
            dirty ^= bit
            pos = 4 + 32 * (bm & (bit - 1)).bit_count()
            enc[pos:pos + 32] = self._hash(_child_path(path, bit.bit_length() - 1))
        node[1] = 0
        self._puts[path] = b = bytes(enc)
        return H_NODE(b[:2] + b[4:4 + 32 * bm.bit_count()])

    def changes(self) -> "TreeChanges":
        """What to write (after root()): node puts, paths to delete, and the new root reference."""
        self.root()
        ref = self._ref
        ref_b = b"" if ref is None else ref[0] + ref[1] if type(ref) is tuple else ref
        return TreeChanges(dict(self._puts), frozenset(self._deleted - self._puts.keys()), ref_b)


@dataclass(frozen=True, slots=True)
class TreeChanges:
    puts: dict[bytes, bytes]  # path key -> node
    deletes: frozenset[bytes]  # path keys
    root_ref: bytes  # b"" for the empty tree
    replace: bool = False  # the puts are the whole tree: every other stored node goes


def build_tree(items: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, TreeChanges]:
    """The root and the whole stored tree of key-sorted (key, value) records."""
    puts: dict[bytes, bytes] = {}
    b = NodeBuilder(puts.__setitem__)
    for k, v in items:
        b.add(k, leaf_hash(k, v))
    ref = b.finish()
    return stored_root({ROOT_REF: ref}.get), TreeChanges(puts, frozenset(), ref, replace=True)


def prove_stored(load: Load, key: bytes, value_of: Callable[[bytes], bytes]) -> "Proof":
    """StateTree.prove over a stored tree (load: path key -> node; all reads from one version)."""
    _check_key(key)
    ref = _decode_ref(load(ROOT_REF))
    levels: list[tuple[int, tuple[bytes, ...]]] = []
    d = 0
    c: Child = ref
    while c is not None and type(c) is not tuple:
        enc = load(path_key(key, d))
        if enc is None:
            raise TreeCorrupt(f"stored tree lacks the node at depth {d} on the path of {key.hex()}")
        node = decode_node(bytes(enc))
        slot = _nib(key, d)
        bm, _ = _U16x2.unpack_from(enc)
        levels.append((bm, tuple((s if type(s) is bytes else s[0]) for i, s in enumerate(node)
                                 if s is not None and i != slot)))
        c = node[slot]
        d += 1
    return _proof(key, c, levels, value_of)


class NodeBuilder:
    """The stored tree of a key-sorted stream of (key, leaf hash): emit(path key, node) for every inner node, in
    bounded memory (the bulk load of a store that has records but no nodes, e.g. after an upgrade)."""

    __slots__ = ("_emit", "_open", "_prev", "count")

    def __init__(self, emit: Callable[[bytes, bytes], None]) -> None:
        self._emit = emit
        self._open: list[list[Any]] = []  # per depth: 16 slots
        self._prev: Optional[Leaf] = None
        self.count = 0

    def add(self, key: bytes, lh: bytes) -> None:
        prev = self._prev
        if prev is not None:
            if key <= prev[1]:
                raise DecodeError(f"record {self.count}: key {key.hex()} not after {prev[1].hex()}")
            common = (_BITS - (int.from_bytes(key, "big") ^ int.from_bytes(prev[1], "big")).bit_length()) >> 2
            self._place(prev, common)
        self._prev = (lh, key)
        self.count += 1

    def _place(self, leaf: Leaf, common: int) -> None:
        """Put the previous leaf in the node at depth max(depth it shares with its left neighbour, common) and
        close every open node deeper than common (the next key leaves them)."""
        stack = self._open
        depth = max(len(stack), common + 1)
        while len(stack) < depth:
            stack.append([None] * 16)
        stack[depth - 1][_nib(leaf[1], depth - 1)] = leaf
        self._close(common + 1, leaf[1])

    def _close(self, keep: int, key: bytes) -> None:
        stack = self._open
        while len(stack) > keep:
            node = stack.pop()
            d = len(stack)
            enc, h = encode_node(node)
            self._emit(path_key(key, d), enc)
            if d:
                stack[d - 1][_nib(key, d - 1)] = h

    def finish(self) -> bytes:
        """Emit what is still open; returns the root reference (see ROOT_REF)."""
        prev = self._prev
        if prev is None:
            return b""
        if not self._open:
            return prev[0] + prev[1]
        stack = self._open
        stack[-1][_nib(prev[1], len(stack) - 1)] = prev
        self._close(1, prev[1])
        enc, h = encode_node(stack.pop())
        self._emit(ROOT_PATH, enc)
        return h
