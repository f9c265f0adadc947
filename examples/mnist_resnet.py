"""A small ResNet for 1x28x28 MNIST digits, trained on the 3,000 training digits of mnist_digits.

Stem conv 1->16 + BN + ReLU, then three stages of two basic blocks at 16/32/64 channels
(stride-2 stage transitions with 1x1 conv + BN downsample shortcuts, ``out += identity``
residuals), global average pool and Linear(64, 10).

``build_model()`` returns the *trained* model. Weights are cached as safetensors at
``${LEGOC_CACHE:-~/.cache/legoc}/examples/mnist_resnet-<hash>.safetensors``, where <hash>
covers the architecture and the training hyper-parameters, so changing either retrains.
When the cache file is missing the model is trained (seeded, deterministic, CPU, well under
three minutes on two cores) and the cache written atomically.

Training (examples/mnist_training.py) uses the train split and keeps the epoch with the best
val-split accuracy; the test split is only for reporting.

legoc model.py convention: ``build_model()``, ``example_inputs()``, ``train_data()``,
``val_data()``, ``test_data()``, ``evaluate(model, data)`` (top-1 accuracy in [0, 1]).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import mnist_digits  # same folder; on sys.path when legoc loads this file or when run directly
import mnist_training

NUM_CLASSES = 10
BATCH_SIZE = 64
ARCH = {
    "name": "mnist_resnet",
    "in_channels": 1,
    "stem_channels": 16,
    "stage_channels": [16, 32, 64],
    "blocks_per_stage": 2,
    "num_classes": NUM_CLASSES,
}
TRAIN = {
    "seed": 0,
    "split_seed": 0,
    "epochs": 8,
    "batch_size": BATCH_SIZE,
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "augment_shift": 2,  # random translation by up to this many pixels
    "keep": "best_val_epoch",  # the epoch with the best val-split accuracy is returned
    "num_threads": 2,
}
CACHE_VERSION = 2  # bump to invalidate caches written by an older training procedure


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:  # structural, not data-dependent: fx-traceable
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class MnistResNet(nn.Module):
    def __init__(self, arch=ARCH):
        super().__init__()
        c0 = arch["stem_channels"]
        self.conv1 = nn.Conv2d(arch["in_channels"], c0, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c0)
        self.relu = nn.ReLU(inplace=True)
        stages, in_ch = [], c0
        for i, ch in enumerate(arch["stage_channels"]):
            blocks = []
            for j in range(arch["blocks_per_stage"]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, arch["num_classes"])

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _new_model() -> MnistResNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN["seed"])
        model = MnistResNet()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def spec() -> dict:
    """Everything that determines the trained weights: the cache key of ``build_model()``."""
    with torch.random.fork_rng(devices=[]):  # building a throwaway model must not touch the RNG
        modules = repr(MnistResNet())
    return {
        "version": CACHE_VERSION,
        "arch": ARCH,
        "train": TRAIN,
        "modules": modules,  # catches layer changes not reflected in ARCH
        "n_train": mnist_digits.N_TRAIN_PER_CLASS,
        "n_val": mnist_digits.N_VAL_PER_CLASS,
        "n_test": mnist_digits.N_TEST_PER_CLASS,
    }


def config_hash() -> str:
    """Hash of everything that determines the trained weights (architecture + training)."""
    return mnist_training.spec_hash(spec())


def cache_path() -> Path:
    return mnist_training.cache_path(ARCH["name"], spec())


# --------------------------------------------------------------------------------- data

_SPLITS = None


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    global _SPLITS
    if _SPLITS is None:
        _SPLITS = mnist_digits.load_splits(seed=TRAIN["split_seed"])
    return _SPLITS[name]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 3,000 training digits as (x, y) batches of 64 (fixed order)."""
    return mnist_training.batches(*_split("train"), BATCH_SIZE)


def val_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 1,000 validation digits as (x, y) batches of 64: what `legoc compile` measures on."""
    return mnist_training.batches(*_split("val"), BATCH_SIZE)


def test_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 1,000 test digits as (x, y) batches of 64: reported accuracy only, never compile."""
    return mnist_training.batches(*_split("test"), BATCH_SIZE)


evaluate = mnist_training.evaluate  # top-1 accuracy in [0, 1] over (x, y) batches


def example_inputs() -> tuple[torch.Tensor, ...]:
    x, _ = _split("val")
    return (torch.from_numpy(x[:1].copy()),)


# ----------------------------------------------------------------------------- training

def train(log=None) -> MnistResNet:
    """Train a fresh model on the training split; the best epoch on the val split is kept."""
    log = log or (lambda msg: print(f"mnist_resnet: {msg}", file=sys.stderr, flush=True))
    x, y = _split("train")
    return mnist_training.train_classifier(
        _new_model(), x, y, epochs=TRAIN["epochs"], lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"],
        batch_size=TRAIN["batch_size"], seed=TRAIN["seed"], augment_shift=TRAIN["augment_shift"],
        num_threads=TRAIN["num_threads"], val=val_data(), log=log)


def build_model() -> nn.Module:
    """The trained model (eval mode): loaded from the cache, or trained and cached."""
    return mnist_training.cached_weights(ARCH["name"], spec(), _new_model, train)


if __name__ == "__main__":
    t = time.perf_counter()
    m = build_model()
    print(f"build_model {time.perf_counter() - t:.1f}s, val accuracy {evaluate(m, val_data()):.4f}, "
          f"test accuracy {evaluate(m, test_data()):.4f}, "
          f"{sum(p.numel() for p in m.parameters())} params, cache {cache_path()}")
