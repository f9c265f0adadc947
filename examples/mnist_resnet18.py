"""A ResNet-18-width network on MNIST digits upsampled to 64x64: the example whose latency scales.

The bundled small example (mnist_resnet.py, 20 M MACs) runs in about half a millisecond, where
call overheads hide most of what pruning saves. This one has ImageNet ResNet-18's widths and
depth (stages of two basic blocks at 64/128/256/512 channels, stride-2 stage transitions with
1x1 conv + BN downsample shortcuts) on 1x64x64 inputs, 157.6 M MACs:

* stem: conv 3x3 stride 2 (1->32) + BN + ReLU, conv 3x3 (32->64) + BN + ReLU, max-pool 3x3
  stride 2 -> 64x16x16 (a two-conv "deep stem": ImageNet's 7x7 stride-2 conv + max-pool gives
  139 M MACs at 64x64, short of the 150 M this example is meant to have);
* layer1..layer4 at 16x16, 8x8, 4x4, 2x2; global average pool; Linear(512, 10).

``legoc compile examples/mnist_resnet18.py --blocks 8`` cuts it into its 8 basic blocks.

Data: the 3,000 / 1,000 / 1,000 train / val / test digits of mnist_digits, upsampled to 64x64
(bilinear, torch interpolate) in the data functions, so the model and legoc only ever see
64x64 images. Training (examples/mnist_training.py): AdamW + one-cycle, random shifts of up to
2 pixels at 28x28 before upsampling, the epoch with the best val-split accuracy kept; cached
as safetensors in ``${LEGOC_CACHE:-~/.cache/legoc}/examples/mnist_resnet18-<hash>.safetensors``.
Training took 2,148 s (3 epochs, 2 threads, on the shared 2-core build machine with a load
average of about 10 from other jobs; an idle machine takes a fraction of that) and reached
97.7% on the val split and 97.9% on the test split.

legoc model.py convention: ``build_model()``, ``example_inputs()``, ``train_data()``,
``val_data()``, ``test_data()``, ``evaluate(model, data)`` (top-1 accuracy in [0, 1]).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch import nn

import mnist_digits  # same folder; on sys.path when legoc loads this file or when run directly
import mnist_training
from mnist_resnet import BasicBlock  # the same residual block as the small example

SIZE = 64  # input side after upsampling
BATCH_SIZE = 64
ARCH = {
    "name": "mnist_resnet18",
    "in_channels": 1,
    "input_size": SIZE,
    "stem": [32, 64],
    "stage_channels": [64, 128, 256, 512],
    "blocks_per_stage": 2,
    "num_classes": 10,
}
TRAIN = {
    "seed": 0,
    "split_seed": 0,
    "epochs": 8,
    "batch_size": BATCH_SIZE,
    "optimizer": "adamw",
    "lr": 2e-3,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "augment_shift": 2,  # random translation (28x28 pixels) before upsampling
    "num_threads": 2,
    "keep": "best_val_epoch",
}
CACHE_VERSION = 1  # bump to invalidate caches written by an older training procedure


class MnistResNet18(nn.Module):
    def __init__(self, arch=ARCH):
        super().__init__()
        s0, s1 = arch["stem"]
        self.stem = nn.Sequential(
            nn.Conv2d(arch["in_channels"], s0, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(s0),
            nn.ReLU(inplace=True),
            nn.Conv2d(s0, s1, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(s1), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, in_ch = [], s1
        for i, ch in enumerate(arch["stage_channels"]):
            blocks = []
            for j in range(arch["blocks_per_stage"]):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_ch, ch, stride))
                in_ch = ch
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, arch["num_classes"])

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _new_model() -> MnistResNet18:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN["seed"])
        model = MnistResNet18()
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def spec() -> dict:
    """Everything that determines the trained weights: the cache key of ``build_model()``."""
    with torch.random.fork_rng(devices=[]):  # building a throwaway model must not touch the RNG
        modules = repr(MnistResNet18())
    return {
        "version": CACHE_VERSION,
        "arch": ARCH,
        "train": TRAIN,
        "modules": modules,  # catches layer changes not reflected in ARCH
        "n_train": mnist_digits.N_TRAIN_PER_CLASS,
        "n_val": mnist_digits.N_VAL_PER_CLASS,
        "n_test": mnist_digits.N_TEST_PER_CLASS,
    }


# --------------------------------------------------------------------------------- data

_SPLITS = None
_BATCHES: dict[str, list] = {}


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    global _SPLITS
    if _SPLITS is None:
        _SPLITS = mnist_digits.load_splits(seed=TRAIN["split_seed"])
    return _SPLITS[name]


def _upsampled(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One split as (x, y) batches of 64 with x upsampled to 1xSIZExSIZE (computed once)."""
    if name not in _BATCHES:
        _BATCHES[name] = [(mnist_training.resize(x, SIZE), y)
                          for x, y in mnist_training.batches(*_split(name), BATCH_SIZE)]
    return _BATCHES[name]


def train_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 3,000 training digits at 64x64 as (x, y) batches of 64 (fixed order)."""
    return list(_upsampled("train"))


def val_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 1,000 validation digits at 64x64: what `legoc compile` measures on."""
    return list(_upsampled("val"))


def test_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 1,000 test digits at 64x64: reported accuracy only, never compile."""
    return list(_upsampled("test"))


evaluate = mnist_training.evaluate  # top-1 accuracy in [0, 1] over (x, y) batches


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (_upsampled("val")[0][0][:1].clone(),)


# ----------------------------------------------------------------------------- training

def train(log=None) -> nn.Module:
    """Train a fresh model on the training split (28x28 digits shifted, then upsampled per
    batch); the best epoch on the val split is kept."""
    log = log or (lambda msg: print(f"mnist_resnet18: {msg}", file=sys.stderr, flush=True))
    x, y = _split("train")
    return mnist_training.train_classifier(
        _new_model(), x, y, epochs=TRAIN["epochs"], lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"],
        batch_size=TRAIN["batch_size"], seed=TRAIN["seed"], augment_shift=TRAIN["augment_shift"],
        num_threads=TRAIN["num_threads"], val=val_data(), log=log, input_size=SIZE)


def build_model() -> nn.Module:
    """The trained model (eval mode): loaded from the cache, or trained and cached."""
    return mnist_training.cached_weights(ARCH["name"], spec(), _new_model, train)


if __name__ == "__main__":
    t = time.perf_counter()
    m = build_model()
    print(f"build_model {time.perf_counter() - t:.1f}s, val accuracy {evaluate(m, val_data()):.4f}, "
          f"test accuracy {evaluate(m, test_data()):.4f}, {sum(p.numel() for p in m.parameters())} params, "
          f"cache {mnist_training.cache_path(ARCH['name'], spec())}")
