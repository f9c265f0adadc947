"""VGG-style plain chain (3x32x32 input, 10 classes) with random, seeded weights.

Eight conv-BN-ReLU layers (32-32-M-64-64-M-128-128-M-256-256-M), then flatten + Linear.
No residuals: the simplest graph for the compiler to split into blocks.

legoc model.py convention: ``build_model()``, ``example_inputs()``.
"""
from __future__ import annotations

import torch
from torch import nn

import seeded  # same folder; on sys.path when legoc loads this file or when run directly

SEED = 0
NUM_CLASSES = 10
CFG = (32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGChain(nn.Module):
    def __init__(self, cfg=CFG, num_classes=NUM_CLASSES, in_ch=3, in_size=32):
        super().__init__()
        layers, size = [], in_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False),
                           nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_ch * size * size, num_classes)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def build_model() -> nn.Module:
    return seeded.build(VGGChain, SEED)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return seeded.random_input((1, 3, 32, 32), SEED + 1)


if __name__ == "__main__":
    seeded.describe(build_model, example_inputs)
