"""Update compression: int8 quantisation (per-tensor scale) and top-k sparsification.

Both act on the *update* (local params minus the global params the round started from).
Encoded updates travel as an ArrayRecord of numpy arrays plus a dict of float scales.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

MODES = ("none", "int8", "topk")


class CompressionError(ValueError):
    """An encoded update that does not decode against the reference parameters."""


def encode(delta: "OrderedDict[str, np.ndarray]", mode: str, topk_fraction: float = 0.1
           ) -> tuple["OrderedDict[str, np.ndarray]", dict[str, float]]:
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    scales: dict[str, float] = {}
    if mode == "int8":
        for k, d in delta.items():
            m = float(np.max(np.abs(d))) if d.size else 0.0
            s = m / 127.0 if m > 0 else 1.0
            out[k] = np.clip(np.rint(d / s), -127, 127).astype(np.int8)
            scales[k] = s
    elif mode == "topk":
        for k, d in delta.items():
            flat = d.ravel()
            n = max(1, int(np.ceil(topk_fraction * flat.size)))
            idx = np.argpartition(np.abs(flat), -n)[-n:].astype(np.int32)
            idx.sort()
            out[k + ".idx"] = idx
            out[k + ".val"] = flat[idx].astype(np.float32)
    else:
        raise CompressionError(f"unknown compression mode {mode!r}")
    return out, scales


def decode(encoded: dict[str, np.ndarray], scales: dict[str, float], mode: str,
           reference: "OrderedDict[str, np.ndarray]") -> "OrderedDict[str, np.ndarray]":
    """Rebuild the delta against the reference (global) parameter names and shapes."""
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    if mode == "int8":
        if set(encoded) != set(reference):
            raise CompressionError("int8 update names do not match the model")
        for k, ref in reference.items():
            q = encoded[k]
            if q.dtype != np.int8 or q.shape != ref.shape:
                raise CompressionError(f"{k}: bad int8 tensor {q.dtype} {q.shape}")
            s = float(scales.get(k, float("nan")))
            if not np.isfinite(s) or s <= 0:
                raise CompressionError(f"{k}: bad scale")
            out[k] = q.astype(np.float32) * np.float32(s)
    elif mode == "topk":
        want = {k + sfx for k in reference for sfx in (".idx", ".val")}
        if set(encoded) != want:
            raise CompressionError("top-k update names do not match the model")
        for k, ref in reference.items():
            idx, val = encoded[k + ".idx"], encoded[k + ".val"]
            if idx.ndim != 1 or idx.shape != val.shape or idx.dtype.kind not in "iu":
                raise CompressionError(f"{k}: bad top-k tensors")
            if idx.size and (idx.min() < 0 or idx.max() >= ref.size):
                raise CompressionError(f"{k}: top-k index out of range")
            flat = np.zeros(ref.size, dtype=np.float32)
            flat[idx] = val.astype(np.float32)
            out[k] = flat.reshape(ref.shape)
    else:
        raise CompressionError(f"unknown compression mode {mode!r}")
    return out
