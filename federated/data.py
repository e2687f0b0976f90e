"""Bundled dataset (scikit-learn digits) and its fixed-seed Dirichlet non-IID partition."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
NUM_FEATURES = 64
TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Split:
    """Features (float32, scaled to [0, 1]) and integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _load(seed: int) -> tuple[Split, Split]:
    from sklearn.datasets import load_digits  # lazy: a ClientApp reading an .npz skips sklearn

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


def train_test(seed: int = 0) -> tuple[Split, Split]:
    """The global train split (to be partitioned) and the held-out test split."""
    return _load(seed)


def dirichlet_partition(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Split indices across partitions with per-class Dirichlet(alpha) proportions.

    Deterministic for a given (labels, num_partitions, alpha, seed). Re-draws (with the
    same generator) until every partition has at least ``min_size`` examples.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for cls in range(NUM_CLASSES):
            idx = np.flatnonzero(labels == cls)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for p, chunk in enumerate(np.split(idx, cuts)):
                parts[p].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError("could not draw a partition with the requested min_size")


def load_partition(
    partition_id: int, num_partitions: int, alpha: float = 0.5, seed: int = 0
) -> Split:
    """The local training data of one participant."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} not in [0, {num_partitions})")
    train, _ = _load(seed)
    idx = dirichlet_partition(train.y, num_partitions, alpha, seed)[partition_id]
    return Split(train.x[idx], train.y[idx])


def load_test(seed: int = 0) -> Split:
    """The held-out test split the server evaluates the global model on."""
    return _load(seed)[1]


def write_partition(path: str | Path, partition_id: int, num_partitions: int,
                    alpha: float = 0.5, seed: int = 0) -> Path:
    """Save one participant's partition as .npz (x, y) — what ``l2-fl join --data`` reads."""
    split = load_partition(partition_id, num_partitions, alpha, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=split.x, y=split.y)
    return path


def read_split(path: str | Path) -> Split:
    """Load an .npz written by :func:`write_partition` (validated)."""
    with np.load(Path(path)) as z:
        x = np.asarray(z["x"], dtype=np.float32)
        y = np.asarray(z["y"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != NUM_FEATURES or y.shape != (x.shape[0],):
        raise ValueError(f"{path}: expected x (N, {NUM_FEATURES}) and y (N,)")
    if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"{path}: labels outside [0, {NUM_CLASSES})")
    return Split(x, y)
