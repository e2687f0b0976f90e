"""The workers' AI task: a small MLP trained deterministically on scikit-learn's bundled digits, its real torch
inference, and the compact result fingerprint (quantised top-k logits per image) the ledger compares."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from l2d.core.work_tx import FP_ENTRY, IMAGE_BYTES, MAX_PIXEL, QUANT_SCALE, TOPK

log = logging.getLogger(__name__)

MODEL_NAME = "digits-mlp"
_I16 = (-(1 << 15), (1 << 15) - 1)


def device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, pixels 0..16; shipped with the package, no download)."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    d = load_digits()
    return d.data.astype(np.uint8), d.target.astype(np.int64)


def train(seed: int = 0, epochs: int = 150) -> torch.nn.Module:
    """A 64-32-10 MLP trained full-batch with Adam from a fixed seed on the first 1500 images (the rest are
    held out): the same weights on every run on the same platform."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    model = _net()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() > 1 else 0.0))
    xt = torch.from_numpy(x[:1500]).float() / MAX_PIXEL
    yt = torch.from_numpy(y[:1500])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    model.eval()
    return model.to(device())  # type: ignore[no-any-return]


def _net() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def load_or_train(cache: Path | None = None) -> torch.nn.Module:
    """The trained model; with a cache file, trained once and then loaded (the weights are the same either way)."""
    if cache is not None and cache.exists():
        net = _net()
        net.load_state_dict(torch.load(cache, weights_only=True))
        net.eval()
        return net.to(device())
    model = train()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, cache)  # atomic: concurrent agents never read half a file
    return model


def accuracy(model: torch.nn.Module) -> float:
    """Held-out accuracy (images 1500..1796)."""
    x, y = digits()
    with torch.no_grad():
        pred = model(torch.from_numpy(x[1500:]).float().to(device()) / MAX_PIXEL).argmax(1).cpu().numpy()
    return float((pred == y[1500:]).mean())


def logits(model: torch.nn.Module, images: bytes) -> torch.Tensor:
    """Run the model on a task's input (IMAGE_BYTES bytes per image, pixels 0..16); returns (n, 10) logits on CPU."""
    if not images or len(images) % IMAGE_BYTES:
        raise ValueError(f"input is {len(images)} bytes, not a whole number of {IMAGE_BYTES}-byte images")
    x = torch.frombuffer(bytearray(images), dtype=torch.uint8).reshape(-1, IMAGE_BYTES).float() / MAX_PIXEL
    with torch.no_grad():
        return model(x.to(device())).float().cpu()


def fingerprint(lg: torch.Tensor) -> tuple[bytes, bytes]:
    """(output, fingerprint): the predicted class per image, and per image the TOPK (class, round(logit*256))
    pairs ordered by quantised logit descending then class ascending (the canonical order the ledger checks)."""
    q = torch.clamp(torch.round(lg * QUANT_SCALE), *_I16).to(torch.int64).tolist()
    out = bytearray()
    fp = bytearray()
    for row in q:
        ranked = sorted(range(len(row)), key=lambda c: (-row[c], c))[:TOPK]
        out.append(ranked[0])
        for c in ranked:
            fp += FP_ENTRY.pack(c, row[c])
    return bytes(out), bytes(fp)


def cheat(lg: torch.Tensor) -> torch.Tensor:
    """What a dishonest worker returns (tests only): logits shifted by one class, so every prediction changes."""
    return torch.roll(lg, 1, dims=1)


def sample_images(seed: int, n: int) -> bytes:
    """n held-out digit images (from index 1500 on) picked by seed: a realistic task input."""
    x, _ = digits()
    idx = (1500 + (seed * 7919 + np.arange(n) * 31) % 297).astype(np.int64)
    return x[idx].tobytes()


__all__ = ["MODEL_NAME", "train", "load_or_train", "accuracy", "logits", "fingerprint", "cheat", "sample_images",
           "device"]
