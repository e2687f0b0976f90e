"""Snapshot format: canonical, streamable file of the whole state at one block (see docs/snapshot-format.md).

    header  : magic b"L2DSNAP\\0" | format u8 | network u8 | height u64 | block_hash 32 | state_root 32 | count u64
    records : count x (key 33 | value CompactSize-length-prefixed), strictly increasing keys
    trailer : SHA-256 of every preceding byte (32)
"""
