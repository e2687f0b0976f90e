"""The tiny torch model, its training loop, and the canonical parameter bytes / hash.

Canonical parameter bytes (version 1)::

    b"L2FLPARM" | u8 version=1 | u32le n_tensors
    per tensor, in state_dict order:
        u16le len(name) | name (utf-8) | u8 ndim | ndim * u32le dim
    then per tensor, in the same order: the tensor's values as little-endian float32 (C order)

``params_hash`` is SHA-256 over these bytes.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from federated.data import NUM_CLASSES, NUM_FEATURES, Split

MAGIC = b"L2FLPARM"
VERSION = 1
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class ParamsFormatError(ValueError):
    """Canonical parameter bytes that do not decode."""


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Net(nn.Module):
    """64 -> hidden -> 10 MLP for 8x8 digits."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def new_model(seed: int = 0, hidden: int = 32) -> Net:
    """A freshly initialised model; same seed, same weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Net(hidden)
    finally:
        torch.random.set_rng_state(gen_state)


def get_ndarrays(model: nn.Module) -> "OrderedDict[str, np.ndarray]":
    return OrderedDict(
        (k, v.detach().cpu().numpy().astype(np.float32, copy=True))
        for k, v in model.state_dict().items()
    )


def set_ndarrays(model: nn.Module, arrays: "OrderedDict[str, np.ndarray] | dict[str, np.ndarray]") -> None:
    state = model.state_dict()
    if list(arrays.keys()) != list(state.keys()):
        raise ParamsFormatError(f"names {list(arrays)} != model's {list(state)}")
    new = OrderedDict()
    for k, ref in state.items():
        a = np.asarray(arrays[k])
        if tuple(a.shape) != tuple(ref.shape):
            raise ParamsFormatError(f"{k}: shape {a.shape} != {tuple(ref.shape)}")
        new[k] = torch.from_numpy(a.astype(np.float32, copy=True))
    model.load_state_dict(new)


def canonical_bytes(arrays: "OrderedDict[str, np.ndarray] | dict[str, np.ndarray]") -> bytes:
    """The canonical encoding (see module docstring) of named float32 tensors."""
    head = [MAGIC, bytes([VERSION]), _U32.pack(len(arrays))]
    body = []
    for name, a in arrays.items():
        arr = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
        nb = name.encode("utf-8")
        head.append(_U16.pack(len(nb)) + nb + bytes([arr.ndim]))
        head.extend(_U32.pack(d) for d in arr.shape)
        body.append(arr.tobytes(order="C"))
    return b"".join(head + body)


def decode_canonical(data: bytes) -> "OrderedDict[str, np.ndarray]":
    """Strict inverse of :func:`canonical_bytes`."""
    mv = memoryview(data)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(mv):
            raise ParamsFormatError("truncated parameter bytes")
        out = bytes(mv[pos : pos + n])
        pos += n
        return out

    if take(8) != MAGIC:
        raise ParamsFormatError("bad magic")
    if take(1)[0] != VERSION:
        raise ParamsFormatError("unknown version")
    (n,) = _U32.unpack(take(4))
    specs = []
    for _ in range(n):
        (ln,) = _U16.unpack(take(2))
        name = take(ln).decode("utf-8")
        ndim = take(1)[0]
        shape = tuple(_U32.unpack(take(4))[0] for _ in range(ndim))
        specs.append((name, shape))
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name, shape in specs:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        out[name] = np.frombuffer(take(4 * count), dtype="<f4").reshape(shape).astype(np.float32)
    if pos != len(mv):
        raise ParamsFormatError("trailing bytes")
    return out


def params_hash(arrays: "OrderedDict[str, np.ndarray] | dict[str, np.ndarray]") -> str:
    """SHA-256 hex of the canonical parameter bytes."""
    return hashlib.sha256(canonical_bytes(arrays)).hexdigest()


def train(model: nn.Module, data: Split, epochs: int, lr: float, batch_size: int = 32, seed: int = 0) -> float:
    """Plain SGD on the local split; returns the mean loss of the last epoch."""
    dev = device()
    model.to(dev)
    model.train()
    x = torch.from_numpy(data.x).to(dev)
    y = torch.from_numpy(data.y).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    last = 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen).to(dev)
        total, batches = 0.0, 0
        for i in range(0, len(data), batch_size):
            b = perm[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[b]), y[b])
            loss.backward()
            opt.step()
            total += float(loss.item())
            batches += 1
        last = total / max(batches, 1)
    model.to("cpu")
    return last


@torch.no_grad()
def evaluate(model: nn.Module, data: Split) -> tuple[float, float]:
    """(loss, accuracy) on a split."""
    model.eval()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y).item())
    if not np.isfinite(loss):
        loss = float("inf")
    acc = float((logits.argmax(dim=1) == y).float().mean().item())
    return loss, acc
